//! A [`QuantWeight`] as self-describing bytes, and back: how ZeRO-3 sends a quantized base
//! weight (QLoRA's NF4, a GGUF's Q4_1, ...) from the rank that owns it to the others before its
//! layer runs (`train::zero3`), as FSDP + QLoRA shards a 4-bit base. The bytes hold the
//! format's own storage (block bytes, codes, absmax and nested statistics) and how the weight
//! runs (`QuantSettings`), not a re-quantization, so the copy computes exactly what the
//! original does.
//!
//! Layout, little-endian: `FTQW`, version, format kind, settings, one spare byte, `out` and
//! `in` as u64, then the format's fields, each length-prefixed. Reading checks every length
//! against the bytes left before allocating and the result against the shape.
use super::lut4::{BlockScales, FourBitWeight, Int8RowsWeight};
use super::{aligned_copy, QuantSettings, QuantWeight, Repr, WeightFormat};
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use std::borrow::Cow;

const MAGIC: &[u8; 4] = b"FTQW";
const VERSION: u8 = 1;

const KIND_GGML: u8 = 0;
const KIND_NF4: u8 = 1;
const KIND_FP4: u8 = 2;
const KIND_INT8: u8 = 3;

const SCALES_PLAIN: u8 = 0;
const SCALES_NESTED: u8 = 1;

/// The GGML types a weight can hold, by their index here (not ggml's ids: only this file reads
/// them back).
const GGML_TYPES: [GgmlDType; 15] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: usize) {
        self.0.extend_from_slice(&(v as u64).to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len());
        self.0.extend_from_slice(b);
    }
    fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len());
        self.0.reserve(v.len() * 4);
        for x in v {
            self.f32(*x);
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

fn short(what: &str) -> Error {
    Error::msg(format!(
        "quantized weight bytes: cut short in {what} (a transfer lost data)"
    ))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).ok_or_else(|| short(what))?;
        let s = self.b.get(self.at..end).ok_or_else(|| short(what))?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        self.take(1, what)?
            .first()
            .copied()
            .ok_or_else(|| short(what))
    }
    fn u64(&mut self, what: &str) -> Result<usize> {
        let b = self.take(8, what)?;
        let v = u64::from_le_bytes(b.try_into().map_err(|_| short(what))?);
        usize::try_from(v).map_err(|_| short(what))
    }
    fn f32(&mut self, what: &str) -> Result<f32> {
        let b = self.take(4, what)?;
        Ok(f32::from_le_bytes(b.try_into().map_err(|_| short(what))?))
    }
    /// A length-prefixed byte string; the length is checked against what is left first.
    fn bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.u64(what)?;
        self.take(n, what)
    }
    fn f32s(&mut self, what: &str) -> Result<Vec<f32>> {
        let n = self.u64(what)?;
        let b = self.take(n.checked_mul(4).ok_or_else(|| short(what))?, what)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
            .collect())
    }
}

impl QuantWeight {
    /// This weight as bytes that [`QuantWeight::from_bytes`] turns back into the same weight
    /// (same stored values, same settings).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = Writer(Vec::with_capacity(self.storage_bytes() + 64));
        w.0.extend_from_slice(MAGIC);
        w.u8(VERSION);
        let kind = match self.format {
            WeightFormat::Ggml(_) => KIND_GGML,
            WeightFormat::Nf4 => KIND_NF4,
            WeightFormat::Fp4 => KIND_FP4,
            WeightFormat::Int8 => KIND_INT8,
        };
        w.u8(kind);
        w.u8(self.settings().encode());
        w.u8(0);
        w.u64(self.out_dim);
        w.u64(self.in_dim);
        match (&self.format, &self.repr) {
            (WeightFormat::Ggml(d), Repr::Own { data, .. }) => {
                w.u8(ggml_index(*d)?);
                w.bytes(data);
            }
            (WeightFormat::Ggml(d), Repr::Candle { q, .. }) => {
                w.u8(ggml_index(*d)?);
                w.bytes(&q.data()?);
            }
            (WeightFormat::Nf4 | WeightFormat::Fp4, Repr::FourBit(fb)) => {
                w.u64(fb.blocksize);
                w.f32s(&fb.table);
                w.bytes(&fb.packed);
                match &fb.scales {
                    BlockScales::Plain(v) => {
                        w.u8(SCALES_PLAIN);
                        w.f32s(v);
                    }
                    BlockScales::Nested {
                        codes,
                        code,
                        nested_absmax,
                        nested_blocksize,
                        offset,
                    } => {
                        w.u8(SCALES_NESTED);
                        w.bytes(codes);
                        w.f32s(&code[..]);
                        w.f32s(nested_absmax);
                        w.u64(*nested_blocksize);
                        w.f32(*offset);
                    }
                }
            }
            (WeightFormat::Int8, Repr::Int8(iw)) => {
                w.bytes(&iw.data.iter().map(|&v| v as u8).collect::<Vec<u8>>());
                w.f32s(&iw.scb);
            }
            _ => {
                return Err(Error::msg(format!(
                    "{self:?}: internal error: its storage does not match its format"
                )))
            }
        }
        Ok(w.0)
    }

    /// The weight [`QuantWeight::to_bytes`] wrote. Bytes after the weight's end are ignored
    /// (a transfer pads to whole words); anything inconsistent is an error, not a panic.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = Reader { b, at: 0 };
        if r.take(4, "the header")? != MAGIC {
            return Err(Error::msg(
                "quantized weight bytes: no FTQW header (not a weight this version wrote)",
            ));
        }
        let version = r.u8("the header")?;
        if version != VERSION {
            return Err(Error::msg(format!(
                "quantized weight bytes: version {version}, this build reads {VERSION}"
            )));
        }
        let kind = r.u8("the header")?;
        let settings = QuantSettings::decode(r.u8("the header")?);
        r.u8("the header")?;
        let out_dim = r.u64("the shape")?;
        let in_dim = r.u64("the shape")?;
        // The formats' own checks multiply the two: no product may wrap.
        if out_dim == 0 || in_dim == 0 || out_dim.checked_mul(in_dim).is_none_or(|n| n > 1 << 40) {
            return Err(Error::msg(format!(
                "quantized weight bytes: a {out_dim}x{in_dim} weight"
            )));
        }
        let w = match kind {
            KIND_GGML => {
                let i = r.u8("the GGML type")? as usize;
                let dtype = *GGML_TYPES.get(i).ok_or_else(|| {
                    Error::msg(format!("quantized weight bytes: GGML type index {i}"))
                })?;
                let raw = r.bytes("the blocks")?;
                let bs = dtype.block_size();
                let expect = out_dim
                    .checked_mul(in_dim / bs)
                    .and_then(|n| n.checked_mul(dtype.type_size()));
                if !in_dim.is_multiple_of(bs) || expect != Some(raw.len()) {
                    return Err(Error::msg(format!(
                        "quantized weight bytes: {} bytes of {dtype:?} blocks for a {out_dim}x{in_dim} weight",
                        raw.len()
                    )));
                }
                let data = aligned_copy(raw);
                let st = QStorage::from_data(Cow::Borrowed(data.as_bytes()), &Device::Cpu, dtype)?;
                QuantWeight::from_qtensor(QTensor::new(st, (out_dim, in_dim))?)?
            }
            KIND_NF4 | KIND_FP4 => {
                let blocksize = r.u64("the block size")?;
                let table: [f32; 16] = r
                    .f32s("the code table")?
                    .try_into()
                    .map_err(|_| Error::msg("quantized weight bytes: a code table of 16 values"))?;
                let packed = r.bytes("the codes")?.to_vec();
                let scales = match r.u8("the absmax")? {
                    SCALES_PLAIN => BlockScales::Plain(r.f32s("the absmax")?),
                    SCALES_NESTED => {
                        let codes = r.bytes("the absmax codes")?.to_vec();
                        let code: [f32; 256] =
                            r.f32s("the nested code")?.try_into().map_err(|_| {
                                Error::msg("quantized weight bytes: a nested code of 256 values")
                            })?;
                        BlockScales::Nested {
                            codes,
                            code: Box::new(code),
                            nested_absmax: r.f32s("the nested absmax")?,
                            nested_blocksize: r.u64("the nested block size")?,
                            offset: r.f32("the nested offset")?,
                        }
                    }
                    t => {
                        return Err(Error::msg(format!(
                            "quantized weight bytes: absmax kind {t}"
                        )))
                    }
                };
                let fb = FourBitWeight {
                    table,
                    blocksize,
                    packed,
                    scales,
                };
                QuantWeight::from_four_bit(out_dim, in_dim, kind == KIND_NF4, fb)?
            }
            KIND_INT8 => {
                let data = r.bytes("the int8 rows")?.iter().map(|&v| v as i8).collect();
                let scb = r.f32s("the row scales")?;
                QuantWeight::from_int8_rows(out_dim, in_dim, Int8RowsWeight { data, scb })?
            }
            k => {
                return Err(Error::msg(format!(
                    "quantized weight bytes: format kind {k}"
                )))
            }
        };
        w.set_settings(settings);
        Ok(w)
    }
}

fn ggml_index(d: GgmlDType) -> Result<u8> {
    GGML_TYPES
        .iter()
        .position(|&t| t == d)
        .map(|i| i as u8)
        .ok_or_else(|| Error::msg(format!("quantized weight: GGML type {d:?} cannot be sent")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::BaseQuant;
    use candle_core::Tensor;

    fn random(out: usize, inp: usize, seed: u64) -> Tensor {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..out * inp)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap()
    }

    fn same(a: &QuantWeight, b: &QuantWeight) {
        assert_eq!(a.shape(), b.shape());
        assert_eq!(a.format(), b.format());
        assert_eq!(a.settings().encode(), b.settings().encode());
        assert_eq!(a.storage_bytes(), b.storage_bytes());
        let (da, db) = (a.dequantize().unwrap(), b.dequantize().unwrap());
        let (va, vb) = (
            da.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            db.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()));
        let x = random(3, a.shape().1, 99);
        let (ya, yb) = (a.forward(&x).unwrap(), b.forward(&x).unwrap());
        let d = (ya - yb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn every_format_comes_back_as_the_same_weight() {
        use crate::quant::bnb::FourBitKind;
        let w = random(64, 128, 1);
        let mut formats: Vec<BaseQuant> = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q5_1,
            GgmlDType::Q6K,
        ]
        .into_iter()
        .map(BaseQuant::Ggml)
        .collect();
        for kind in [FourBitKind::Nf4, FourBitKind::Fp4] {
            for double_quant in [false, true] {
                formats.push(BaseQuant::FourBit { kind, double_quant });
            }
        }
        formats.push(BaseQuant::Int8);
        for f in formats {
            let q = match f {
                // The K-quants and Q5_1 have no kernels of ours (candle's storage): built directly.
                BaseQuant::Ggml(d @ (GgmlDType::Q5_1 | GgmlDType::Q6K)) => {
                    let w = if d == GgmlDType::Q6K {
                        random(64, 256, 2)
                    } else {
                        w.clone()
                    };
                    QuantWeight::from_qtensor(QTensor::quantize(&w, d).unwrap()).unwrap()
                }
                _ => f.quantize(&w).unwrap().unwrap(),
            };
            q.set_settings(QuantSettings::decode(3));
            let bytes = q.to_bytes().unwrap();
            let mut padded = bytes.clone();
            padded.extend_from_slice(&[0, 0, 0]);
            let back = QuantWeight::from_bytes(&padded).unwrap();
            same(&q, &back);
            // Every cut is an error, never a panic or a huge allocation.
            for cut in [0, 3, 8, 30, bytes.len() / 2, bytes.len() - 1] {
                assert!(
                    QuantWeight::from_bytes(&bytes[..cut]).is_err(),
                    "{} cut at {cut}",
                    f.name()
                );
            }
        }
    }

    #[test]
    fn corrupt_lengths_and_kinds_are_errors() {
        let q = QuantWeight::quantize(&random(32, 64, 3), GgmlDType::Q8_0).unwrap();
        let bytes = q.to_bytes().unwrap();
        let mut wrong_kind = bytes.clone();
        wrong_kind[5] = 9;
        assert!(QuantWeight::from_bytes(&wrong_kind).is_err());
        let mut huge = bytes.clone();
        // the block bytes' length prefix (after the 24-byte header and the type byte)
        huge[25..33].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(QuantWeight::from_bytes(&huge).is_err());
        let mut wrong_shape = bytes.clone();
        wrong_shape[8..16].copy_from_slice(&33u64.to_le_bytes());
        assert!(QuantWeight::from_bytes(&wrong_shape).is_err());
        // a shape whose product wraps around
        let mut wraps = bytes.clone();
        wraps[8..16].copy_from_slice(&(1u64 << 63).to_le_bytes());
        wraps[16..24].copy_from_slice(&4u64.to_le_bytes());
        let e = QuantWeight::from_bytes(&wraps).unwrap_err().to_string();
        assert!(e.contains("weight bytes"), "{e}");
        assert!(QuantWeight::from_bytes(b"nope").is_err());
    }
}
