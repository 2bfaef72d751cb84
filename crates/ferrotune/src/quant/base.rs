//! `train.base_quant`: quantizing a dense base's linear weights at load (QLoRA and its
//! relatives), into the formats [`QuantWeight`] runs: bitsandbytes' NF4 / FP4 (double
//! quantization optional) and row-wise int8, or GGML's Q8_0 / Q4_0 / Q4_1.
use super::bnb::{self, FourBitKind};
use super::{BlockScales, FourBitWeight, Int8RowsWeight, QuantWeight};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

/// How to quantize a frozen base's linear weights at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseQuant {
    /// bitsandbytes 4-bit, blocks of 64 (QLoRA's format: NF4 with double quantization).
    FourBit {
        kind: FourBitKind,
        double_quant: bool,
    },
    /// LLM.int8's row-wise int8 (weight only).
    Int8,
    /// A GGML block type (Q8_0, Q4_0, Q4_1).
    Ggml(GgmlDType),
}

/// The values `train.base_quant` accepts.
pub const BASE_QUANT_NAMES: &str = "nf4, fp4, int8, q8_0, q4_0, q4_1 or none";

/// bitsandbytes' default 4-bit block size (`Linear4bit`, `BitsAndBytesConfig`).
pub const FOUR_BIT_BLOCKSIZE: usize = 64;

impl BaseQuant {
    /// `name` as in `train.base_quant` (`none`: no quantization); `double_quant` applies to the
    /// 4-bit formats.
    pub fn parse(name: &str, double_quant: bool) -> Result<Option<Self>, String> {
        Ok(Some(match name.to_ascii_lowercase().as_str() {
            "none" => return Ok(None),
            "nf4" => BaseQuant::FourBit {
                kind: FourBitKind::Nf4,
                double_quant,
            },
            "fp4" => BaseQuant::FourBit {
                kind: FourBitKind::Fp4,
                double_quant,
            },
            "int8" => BaseQuant::Int8,
            "q8_0" => BaseQuant::Ggml(GgmlDType::Q8_0),
            "q4_0" => BaseQuant::Ggml(GgmlDType::Q4_0),
            "q4_1" => BaseQuant::Ggml(GgmlDType::Q4_1),
            other => return Err(format!("`{other}` is not one of {BASE_QUANT_NAMES}")),
        }))
    }

    /// Values per block along a row: the row length must be a multiple of it.
    pub fn block_size(self) -> usize {
        match self {
            BaseQuant::FourBit { .. } => FOUR_BIT_BLOCKSIZE,
            BaseQuant::Int8 => 1,
            BaseQuant::Ggml(d) => d.block_size(),
        }
    }

    /// Short name for reports (`nf4+dq`, `int8`, `q4_0`).
    pub fn name(self) -> String {
        match self {
            BaseQuant::FourBit { kind, double_quant } => {
                format!("{}{}", kind.name(), if double_quant { "+dq" } else { "" })
            }
            BaseQuant::Int8 => "int8".into(),
            BaseQuant::Ggml(d) => format!("{d:?}").to_lowercase(),
        }
    }

    /// Bits of each weight's code (4 or 8), the width LoftQ's `loftq_bits` names.
    pub fn code_bits(self) -> u32 {
        match self {
            BaseQuant::Int8 | BaseQuant::Ggml(GgmlDType::Q8_0) => 8,
            _ => 4,
        }
    }

    /// Bits per weight of a large matrix in this format (what the memory estimate uses).
    pub fn bits_per_weight(self) -> f64 {
        match self {
            // codes + an f32 absmax per 64, or an 8-bit one plus an f32 per 256 of those
            BaseQuant::FourBit {
                double_quant: false,
                ..
            } => 4.0 + 32.0 / 64.0,
            BaseQuant::FourBit {
                double_quant: true, ..
            } => 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0),
            BaseQuant::Int8 => 8.0,
            BaseQuant::Ggml(d) => d.type_size() as f64 * 8.0 / d.block_size() as f64,
        }
    }

    /// The weight `(out, in)` in this format, or `None` when its shape does not allow it (a row
    /// length that is not a whole number of blocks): such weights stay dense.
    pub fn quantize(self, w: &Tensor) -> crate::Result<Option<QuantWeight>> {
        let (n, k) = w.dims2().map_err(|_| {
            crate::Error::msg(format!(
                "base_quant: a linear weight must be 2-D, got shape {:?}",
                w.shape()
            ))
        })?;
        let block = self.block_size();
        if k == 0 || !k.is_multiple_of(block) {
            return Ok(None);
        }
        let wf = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        super::check_finite(&wf, k).map_err(crate::Error::msg)?;
        Ok(Some(match self {
            BaseQuant::FourBit { kind, double_quant } => {
                let q = bnb::quantize_4bit(&wf, &[n, k], kind, FOUR_BIT_BLOCKSIZE, double_quant)?;
                QuantWeight::from_four_bit(n, k, kind == FourBitKind::Nf4, four_bit_weight(q)?)?
            }
            BaseQuant::Int8 => {
                let q = bnb::quantize_int8(&wf, n, k)?;
                QuantWeight::from_int8_rows(
                    n,
                    k,
                    Int8RowsWeight {
                        data: q.data,
                        scb: q.scb,
                    },
                )?
            }
            BaseQuant::Ggml(d) => QuantWeight::quantize(w, d)?,
        }))
    }
}

/// bitsandbytes' stored form -> the kernels' form (same bytes, same absmax arithmetic).
pub fn four_bit_weight(q: bnb::FourBit) -> crate::Result<FourBitWeight> {
    let scales = match q.absmax {
        bnb::Absmax::Plain(a) => BlockScales::Plain(a),
        bnb::Absmax::Nested {
            codes,
            offset,
            nested_absmax,
            nested_blocksize,
            nested_code,
        } => {
            let code: Box<[f32; 256]> =
                nested_code
                    .into_boxed_slice()
                    .try_into()
                    .map_err(|v: Box<[f32]>| {
                        crate::Error::msg(format!(
                            "4-bit weight: the nested quant map has {} entries, expected 256",
                            v.len()
                        ))
                    })?;
            BlockScales::Nested {
                codes,
                code,
                nested_absmax,
                nested_blocksize,
                offset,
            }
        }
    };
    Ok(FourBitWeight {
        table: *q.kind.code(),
        blocksize: q.blocksize,
        packed: q.packed,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, k: usize) -> Tensor {
        let v: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 0.1)
            .collect();
        Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!(BaseQuant::parse("none", true).unwrap(), None);
        assert_eq!(
            BaseQuant::parse("NF4", true).unwrap().unwrap().name(),
            "nf4+dq"
        );
        assert_eq!(
            BaseQuant::parse("q4_0", true).unwrap().unwrap().name(),
            "q4_0"
        );
        let e = BaseQuant::parse("nf3", true).unwrap_err();
        assert!(e.contains("nf3") && e.contains("nf4"), "{e}");
    }

    #[test]
    fn quantized_weights_dequantize_as_bitsandbytes_does() {
        let w = sample(8, 128);
        let wf = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (kind, dq) in [
            (FourBitKind::Nf4, true),
            (FourBitKind::Nf4, false),
            (FourBitKind::Fp4, true),
        ] {
            let q = BaseQuant::FourBit {
                kind,
                double_quant: dq,
            }
            .quantize(&w)
            .unwrap()
            .unwrap();
            let want = bnb::quantize_4bit(&wf, &[8, 128], kind, 64, dq)
                .unwrap()
                .dequantize();
            let got = q
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, want, "{kind:?} dq={dq}");
        }
        let q = BaseQuant::Int8.quantize(&w).unwrap().unwrap();
        let want = bnb::quantize_int8(&wf, 8, 128).unwrap().dequantize();
        let got = q
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn shapes_without_whole_blocks_stay_dense() {
        let w = sample(4, 96);
        let nf4 = BaseQuant::parse("nf4", true).unwrap().unwrap();
        assert!(nf4.quantize(&w).unwrap().is_none());
        assert!(BaseQuant::Int8.quantize(&w).unwrap().is_some());
        assert!(BaseQuant::Ggml(GgmlDType::Q8_0)
            .quantize(&w)
            .unwrap()
            .is_some());
    }

    #[test]
    fn weights_that_are_not_finite_are_refused_naming_the_value() {
        let mut v = vec![0.01f32; 4 * 128];
        v[2 * 128 + 5] = f32::NAN;
        v[3 * 128] = f32::INFINITY;
        let w = Tensor::from_vec(v, (4, 128), &Device::Cpu).unwrap();
        for name in ["nf4", "int8", "q8_0", "q4_1"] {
            let bq = BaseQuant::parse(name, name == "nf4").unwrap().unwrap();
            let e = bq.quantize(&w).unwrap_err().to_string();
            assert!(
                e.contains("NaN at row 2, column 5") && e.contains("not finite"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn bits_per_weight_of_qlora_format() {
        let nf4 = BaseQuant::parse("nf4", true).unwrap().unwrap();
        assert!((nf4.bits_per_weight() - 4.127).abs() < 1e-3);
        assert_eq!(BaseQuant::Ggml(GgmlDType::Q8_0).bits_per_weight(), 8.5);
    }
}
