//! The bnb formats against `reference/bnb_fixtures.py`'s outputs: every byte and every bit.
use super::*;
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

pub(super) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bnb")
}

pub(super) struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub(super) fn open(name: &str) -> Fixture {
        let p = fixtures().join(name);
        Fixture {
            bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub(super) fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }
    pub(super) fn raw(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }
    pub(super) fn u8s(&self, name: &str) -> Vec<u8> {
        let (d, _, b) = self.raw(name);
        assert_eq!(d, Dtype::U8, "{name}");
        b
    }
    pub(super) fn i8s(&self, name: &str) -> Vec<i8> {
        let (d, _, b) = self.raw(name);
        assert_eq!(d, Dtype::I8, "{name}");
        b.into_iter().map(|x| x as i8).collect()
    }
    /// f32 values; bf16 and f16 tensors widened exactly.
    pub(super) fn f32s(&self, name: &str) -> Vec<f32> {
        let (d, _, b) = self.raw(name);
        match d {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            other => panic!("{name}: {other:?}"),
        }
    }
    pub(super) fn i64s(&self, name: &str) -> Vec<i64> {
        let (d, _, b) = self.raw(name);
        assert_eq!(d, Dtype::I64, "{name}");
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    pub(super) fn shape(&self, name: &str) -> Vec<usize> {
        self.raw(name).1
    }
}

/// Bit-for-bit equality of f32 slices (NaN payloads included), naming the first difference.
pub(super) fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let diffs = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: {diffs} of {} values differ; first at {i}: got {} ({:#010x}), bnb {} ({:#010x})",
            got.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        let diffs = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {diffs} of {} bytes differ; first at {i}: got {:#04x}, bnb {:#04x}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Checks one quantization recorded by `quant4` in the script: codes, statistics, dequant.
fn check_case(f: &Fixture, case: &str, kind: FourBitKind, dq: bool) -> FourBit {
    let input = f.f32s(&format!("{case}.input"));
    let shape = f.shape(&format!("{case}.input"));
    let name = format!("{case}.{}{}", kind.name(), if dq { "_dq" } else { "" });
    let q = quantize_4bit(&input, &shape, kind, 64, dq).unwrap();
    q.validate().unwrap();
    assert_bytes(
        &format!("{name} packed"),
        &q.packed,
        &f.u8s(&format!("{name}.packed")),
    );
    match &q.absmax {
        Absmax::Plain(a) => {
            assert!(!dq);
            assert_bits(
                &format!("{name} absmax"),
                a,
                &f.f32s(&format!("{name}.absmax")),
            );
        }
        Absmax::Nested {
            codes,
            offset,
            nested_absmax,
            nested_blocksize,
            nested_code,
        } => {
            assert!(dq);
            assert_eq!(*nested_blocksize, 256);
            assert_bits(
                &format!("{name} offset"),
                &[*offset],
                &f.f32s(&format!("{name}.offset")),
            );
            assert_bytes(
                &format!("{name} qabsmax"),
                codes,
                &f.u8s(&format!("{name}.qabsmax")),
            );
            assert_bits(
                &format!("{name} nested_absmax"),
                nested_absmax,
                &f.f32s(&format!("{name}.nested_absmax")),
            );
            assert_bits(&format!("{name} nested code"), nested_code, &DYNAMIC_MAP);
            assert_bits(
                &format!("{name} absmax_f32"),
                &q.absmax_f32(),
                &f.f32s(&format!("{name}.absmax_f32")),
            );
        }
    }
    let dq_name = format!("{name}.dequant");
    if f.has(&dq_name) {
        assert_bits(
            &format!("{name} dequant"),
            &q.dequantize(),
            &f.f32s(&dq_name),
        );
    }
    q
}

#[test]
fn codes_are_bnbs() {
    let f = Fixture::open("codes.safetensors");
    assert_bits("nf4", &NF4_CODE, &f.f32s("nf4"));
    assert_bits("fp4", &FP4_CODE, &f.f32s("fp4"));
    assert_bits("dynamic", &DYNAMIC_MAP, &f.f32s("dynamic"));
    let order: Vec<i64> = FP4_ORDER.iter().map(|&o| o as i64).collect();
    assert_eq!(order, f.i64s("fp4_order"));
}

#[test]
fn random_tensors_match_bnb() {
    let f = Fixture::open("random.safetensors");
    for case in ["m64", "odd", "cols50", "ties", "rounding", "nonfinite"] {
        for kind in [FourBitKind::Nf4, FourBitKind::Fp4] {
            for dq in [false, true] {
                if case == "nonfinite" && dq {
                    continue;
                }
                check_case(&f, case, kind, dq);
            }
        }
    }
}

#[test]
fn bf16_weights_quantize_and_dequantize_to_bf16() {
    let f = Fixture::open("random.safetensors");
    let input = f.f32s("bf16.input");
    let shape = f.shape("bf16.input");
    for kind in [FourBitKind::Nf4, FourBitKind::Fp4] {
        let mut q = quantize_4bit(&input, &shape, kind, 64, true).unwrap();
        q.dtype = WeightDtype::BF16;
        let name = format!("bf16.{}_dq", kind.name());
        assert_bytes(&name, &q.packed, &f.u8s(&format!("{name}.packed")));
        assert_bits(&name, &q.dequantize(), &f.f32s(&format!("{name}.dequant")));
    }
}

#[test]
fn nested_blocks_match_bnb() {
    let f = Fixture::open("nested.safetensors");
    let q = check_case(&f, "big", FourBitKind::Nf4, true);
    match &q.absmax {
        Absmax::Nested { nested_absmax, .. } => assert_eq!(nested_absmax.len(), 2),
        _ => unreachable!(),
    }
}

#[test]
fn smollm2_rows_match_bnb() {
    let f = Fixture::open("smollm2.safetensors");
    check_case(&f, "q", FourBitKind::Nf4, true);
    check_case(&f, "q", FourBitKind::Fp4, false);
    let w = f.f32s("q.input");
    let shape = f.shape("q.input");
    let q = quantize_int8(&w, shape[0], shape[1]).unwrap();
    assert_eq!(q.data, f.i8s("q.CB"));
    assert_bits("q SCB", &q.scb, &f.f32s("q.SCB"));
}

#[test]
fn int8_matches_bnb() {
    let f = Fixture::open("int8.safetensors");
    let w = f.f32s("w.input");
    let shape = f.shape("w.input");
    let q = quantize_int8(&w, shape[0], shape[1]).unwrap();
    q.validate().unwrap();
    assert_eq!(q.data, f.i8s("w.CB"));
    assert_bits("SCB", &q.scb, &f.f32s("w.SCB"));
    // Dequantization as bnb's int8_vectorwise_dequant computes it, in f64 for the check:
    // both f32 roundings happen at the same places.
    let dq = q.dequantize();
    for (i, (&c, &d)) in q.data.iter().zip(&dq).enumerate() {
        let s = q.scb[i / q.cols];
        let want = (c as f32 * s) * (1.0f64 / 127.0) as f32;
        assert_eq!(d.to_bits(), want.to_bits(), "value {i}");
    }
}

#[test]
fn torch_mean_matches() {
    let f = Fixture::open("mean.safetensors");
    for n in [1usize, 15, 16, 17, 129, 1000, 5184, 13824] {
        let v = f.f32s(&format!("v{n}"));
        assert_bits(
            &format!("mean of {n}"),
            &[torch_mean_f32(&v)],
            &f.f32s(&format!("v{n}.mean")),
        );
    }
}

#[test]
fn bad_shapes_and_blocksizes_are_errors() {
    assert!(quantize_4bit(&[1.0; 10], &[3, 3], FourBitKind::Nf4, 64, false).is_err());
    assert!(quantize_4bit(&[1.0; 10], &[10], FourBitKind::Nf4, 48, false).is_err());
    assert!(quantize_4bit(&[], &[0], FourBitKind::Nf4, 64, false).is_err());
    assert!(quantize_int8(&[1.0; 10], 3, 3).is_err());
    let mut q = quantize_4bit(&[1.0; 130], &[130], FourBitKind::Fp4, 64, true).unwrap();
    q.packed.pop();
    assert!(q.validate().is_err());
}
