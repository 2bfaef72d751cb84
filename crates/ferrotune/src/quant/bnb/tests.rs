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

// ------------------------------------------------------------------ the safetensors layout

mod folders {
    use super::super::hf::*;
    use super::*;
    use crate::model::{config_from_hf_dir, Llama, LoadOptions, SafetensorsSource};
    use candle_core::{Device, Tensor};
    use std::collections::{BTreeMap, HashSet};
    use std::path::Path;

    fn tiny_dir(name: &str) -> PathBuf {
        fixtures().join(name)
    }

    fn f32_source() -> PathBuf {
        fixtures().join("../models/tiny-llama-gqa-untied")
    }

    fn read_folder(dir: &Path) -> BTreeMap<String, RawTensor> {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    RawTensor {
                        dtype: v.dtype(),
                        shape: v.shape().to_vec(),
                        data: v.data().to_vec(),
                    },
                )
            })
            .collect()
    }

    /// The f32 tiny model's tensors, and the linears transformers quantizes in it.
    type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;
    type Spoil = Box<dyn Fn(&mut BTreeMap<String, RawTensor>)>;

    fn f32_tensors() -> (NamedTensors, HashSet<String>) {
        let st = read_folder(&f32_source());
        let mut targets = HashSet::new();
        let tensors = st
            .into_iter()
            .map(|(n, t)| {
                if n.starts_with("model.layers.") && n.ends_with("proj.weight") {
                    targets.insert(n.trim_end_matches(".weight").to_string());
                }
                let v = t
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (n, t.shape, v)
            })
            .collect();
        (tensors, targets)
    }

    /// Every tensor of our quantization of the f32 tiny model equals the one transformers saved
    /// (same names, dtypes, shapes and bytes, the quant-state JSON included).
    fn check_same_as_transformers(folder: &str, spec: BnbSpec) {
        let (tensors, targets) = f32_tensors();
        assert_eq!(targets.len(), 14);
        let ours = quantize_tensors(tensors, &targets, &spec, WeightDtype::F32).unwrap();
        let theirs = read_folder(&tiny_dir(folder));
        let a: Vec<&String> = ours.keys().collect();
        let b: Vec<&String> = theirs.keys().collect();
        assert_eq!(a, b, "{folder}: tensor names");
        for (name, t) in &theirs {
            let o = &ours[name];
            assert_eq!((o.dtype, &o.shape), (t.dtype, &t.shape), "{folder}: {name}");
            if name.contains(".quant_state.") {
                assert_eq!(
                    String::from_utf8_lossy(&o.data),
                    String::from_utf8_lossy(&t.data),
                    "{name}"
                );
            }
            assert_bytes(&format!("{folder}: {name}"), &o.data, &t.data);
        }
        // And config.json's quantization_config.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tiny_dir(folder).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            quantization_config(&spec),
            cfg["quantization_config"],
            "{folder}"
        );
    }

    #[test]
    fn nf4_double_quant_folder_is_transformers_byte_for_byte() {
        check_same_as_transformers(
            "tiny-nf4-dq",
            BnbSpec {
                format: BnbFormat::FourBit(FourBitKind::Nf4),
                double_quant: true,
                blocksize: 64,
            },
        );
    }

    #[test]
    fn int8_folder_is_transformers_byte_for_byte() {
        check_same_as_transformers(
            "tiny-int8",
            BnbSpec {
                format: BnbFormat::Int8,
                double_quant: false,
                blocksize: 64,
            },
        );
    }

    #[test]
    fn transformers_folders_read_back() {
        for folder in ["tiny-nf4-dq", "tiny-int8"] {
            let bytes = std::fs::read(tiny_dir(folder).join("model.safetensors")).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let names: Vec<String> = st.names().into_iter().map(String::from).collect();
            let all = read_all(&st, &names).unwrap();
            assert_eq!(all.len(), 14, "{folder}");
            for (name, w) in &all {
                match w {
                    BnbWeight::FourBit(q) => {
                        assert_eq!(q.kind, FourBitKind::Nf4);
                        assert_eq!(q.blocksize, 64);
                        assert!(matches!(q.absmax, Absmax::Nested { .. }), "{name}");
                        // Writing it again gives the same tensors.
                        for (n, t) in four_bit_tensors(name, q) {
                            let (d, s, b) = st.tensor_bytes(&n).unwrap();
                            assert_eq!((t.dtype, &t.shape, t.data.as_slice()), (d, &s, b), "{n}");
                        }
                    }
                    BnbWeight::Int8(q) => {
                        let m = name.strip_suffix(".weight").unwrap();
                        for (n, t) in int8_tensors(m, q) {
                            let (d, s, b) = st.tensor_bytes(&n).unwrap();
                            assert_eq!((t.dtype, &t.shape, t.data.as_slice()), (d, &s, b), "{n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn four_bit_round_trips_through_the_layout() {
        let f = Fixture::open("random.safetensors");
        for (case, kind, dq) in [
            ("odd", FourBitKind::Fp4, true),
            ("cols50", FourBitKind::Nf4, false),
            ("m64", FourBitKind::Nf4, true),
        ] {
            let input = f.f32s(&format!("{case}.input"));
            let shape = f.shape(&format!("{case}.input"));
            let mut q = quantize_4bit(&input, &shape, kind, 64, dq).unwrap();
            q.dtype = WeightDtype::BF16;
            let map: BTreeMap<String, RawTensor> = four_bit_tensors("w", &q).into_iter().collect();
            let back = read_four_bit(&map, "w").unwrap();
            assert_eq!(back, q, "{case}");
            let q8 = quantize_int8(&input, shape[0], shape[1]).unwrap();
            let map: BTreeMap<String, RawTensor> = int8_tensors("m", &q8).into_iter().collect();
            assert_eq!(read_int8(&map, "m").unwrap(), q8);
        }
    }

    #[test]
    fn hostile_quant_states_are_errors() {
        let input: Vec<f32> = (0..200).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = quantize_4bit(&input, &[200], FourBitKind::Nf4, 64, true).unwrap();
        let good: BTreeMap<String, RawTensor> = four_bit_tensors("w", &q).into_iter().collect();
        let key = "w.quant_state.bitsandbytes__nf4";
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "absmax",
                Box::new(|m| {
                    m.remove("w.absmax");
                }),
            ),
            (
                "packed",
                Box::new(|m| {
                    m.get_mut("w").unwrap().data.pop();
                }),
            ),
            (
                "shape",
                Box::new(move |m| {
                    let j = quant_state_json(&q).replace("[200]", "[1099511627776, 1099511627776]");
                    m.insert(key.into(), RawTensor::u8(vec![j.len()], j.into_bytes()));
                }),
            ),
            (
                "quant_type",
                Box::new(|m| {
                    let j = r#"{"quant_type": "fp4", "blocksize": 64}"#;
                    m.insert(
                        key.into(),
                        RawTensor::u8(vec![j.len()], j.as_bytes().to_vec()),
                    );
                }),
            ),
            (
                "blocksize",
                Box::new(|m| {
                    let j = r#"{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [200], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}"#;
                    m.insert(
                        key.into(),
                        RawTensor::u8(vec![j.len()], j.as_bytes().to_vec()),
                    );
                }),
            ),
            (
                "quant state",
                Box::new(|m| {
                    m.insert(key.into(), RawTensor::u8(vec![3], b"{no".to_vec()));
                }),
            ),
            (
                "nested_blocksize",
                Box::new(|m| {
                    let j = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [200], "nested_blocksize": 0, "nested_dtype": "float32", "nested_offset": 0.5}"#;
                    m.insert(
                        key.into(),
                        RawTensor::u8(vec![j.len()], j.as_bytes().to_vec()),
                    );
                }),
            ),
        ];
        for (what, spoil) in cases {
            let mut m = good.clone();
            spoil(&mut m);
            let e = read_four_bit(&m, "w").unwrap_err();
            assert!(e.contains(what) || e.contains("block"), "{what}: {e}");
        }
        // a NaN scale in the nested statistics: every block it covers would decode to NaN
        let mut m = good.clone();
        m.get_mut("w.nested_absmax").unwrap().data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = read_four_bit(&m, "w").unwrap_err();
        assert!(e.contains("absmax of block 0 is NaN"), "{e}");
    }

    #[test]
    fn python_float_repr_is_pythons() {
        for (x, want) in [
            (0.524048924446106f64, "0.524048924446106"),
            (0.5, "0.5"),
            (1.0, "1.0"),
            (123456.0, "123456.0"),
            (1e-05, "1e-05"),
            (1.5e-05, "1.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-0.0123, "-0.0123"),
            (0.1f32 as f64, "0.10000000149011612"),
        ] {
            assert_eq!(python_float_repr(x), want);
        }
    }

    /// The tiny folder transformers quantized, loaded by ferrotune (dequantized to f32), against
    /// transformers' own logits from the same folder.
    #[test]
    fn loaded_nf4_folder_matches_transformers_logits() {
        let dir = tiny_dir("tiny-nf4-dq");
        let cfg = config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        let model = Llama::load(&src, &cfg).unwrap();
        let f = Fixture::open("tiny-nf4-dq.logits.safetensors");
        let ids: Vec<u32> = f.i64s("ids").iter().map(|&i| i as u32).collect();
        let want = f.f32s("logits");
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got: Vec<f32> = model
            .forward(&t, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("max |logit - transformers| on the NF4 folder: {worst:e}");
        assert!(worst < 1e-4, "{worst}");
        // The dequantized weights are bnb's exactly.
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let q = read_four_bit(&st, "model.layers.1.mlp.down_proj.weight").unwrap();
        let w: Vec<f32> = model.layers[1]
            .mlp
            .down_proj
            .weight()
            .to_dense_f32()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_bits("down_proj", &w, &q.dequantize());
        // ... and stay NF4 in memory, on the 4-bit kernels (unless asked for dense weights)
        let lin = &model.layers[1].mlp.down_proj;
        assert_eq!(lin.weight().stored_type(), "nf4");
        let dense = LoadOptions {
            dequantize: true,
            ..Default::default()
        };
        let src = SafetensorsSource::open(&dir, &dense, &Device::Cpu).unwrap();
        let model = Llama::load(&src, &cfg).unwrap();
        assert_eq!(model.layers[1].mlp.down_proj.weight().stored_type(), "f32");
    }
}
