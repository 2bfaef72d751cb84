//! Helpers shared by the integration tests: the tiny HF fixture models and random examples.
#![allow(dead_code)] // each test binary uses its own subset
use candle_core::{DType, Device, Tensor, Var};
use ferrotune::data::{Batch, Example, Loc, Source, Targets, IGNORE};
use ferrotune::model::{self, LoadOptions, Model, ModelSource, SafetensorsSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod word_model;
#[allow(unused_imports)] // each test binary uses its own subset
pub use word_model::{repo, reverse_row, tmp, word_level_model, REV_WORDS};

/// A tiny fixture model from `tests/fixtures/models/<name>` (f32, as stored).
pub fn tiny(name: &str) -> model::Llama {
    tiny_with(name, &LoadOptions::default())
}

/// [`tiny`] loaded with `opts` (quantized, another dtype).
pub fn tiny_with(name: &str, opts: &LoadOptions) -> model::Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name);
    let cfg = model::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, opts, &Device::Cpu).unwrap();
    model::Llama::load(&src, &cfg).unwrap()
}

/// Examples of the given lengths with random ids below `vocab`; the first half of each is
/// prompt (ignored), the rest trained.
pub fn examples(lens: &[usize], vocab: u32, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    lens.iter()
        .enumerate()
        .map(|(e, &n)| {
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
            Example {
                labels: ids
                    .iter()
                    .enumerate()
                    .map(|(k, &id)| if k >= n / 2 { id as i64 } else { IGNORE })
                    .collect(),
                input_ids: ids,
                source: Source {
                    file: Arc::from(Path::new("t.jsonl")),
                    loc: Loc::Line(e + 1),
                    task: None,
                },
            }
        })
        .collect()
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// `dir/model`: the tiny fixture with a word-level tokenizer over exactly [`REV_WORDS`] (adds BOS).
pub fn rev_model(dir: &Path) -> PathBuf {
    word_level_model(dir, REV_WORDS, REV_WORDS.len(), true, None)
}

/// `n` rows of "rev a b c" -> "c b a" of 1 to 6 content words, drawn from `seed`.
pub fn reverse_rows(n: usize, seed: u64) -> String {
    let content = &REV_WORDS[7..];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = String::new();
    for _ in 0..n {
        let k = rng.random_range(1..=6);
        let ws: Vec<&str> = (0..k)
            .map(|_| content[rng.random_range(0..content.len())])
            .collect();
        out.push_str(&reverse_row(&ws));
    }
    out
}

/// A JSON fixture (expected.json of a reference script); a missing one names the file.
pub fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (written by a reference script, see reference/README.md)",
            p.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// Every number of a (nested) JSON array, flattened.
pub fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

/// A JSON array of integer rows.
pub fn int_rows(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// Equal-length integer rows as a (rows, len) tensor of `dtype`.
pub fn matrix(rows: &[Vec<i64>], dtype: DType) -> Tensor {
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a - b| over two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a - b| over two tensors of one shape, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    max_abs(&(f32(a) - f32(b)).unwrap())
}

/// The SmolLM2 GGUF fetched by scripts/fetch-models.sh.
pub fn smollm2_gguf() -> PathBuf {
    let gguf = repo().join(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        gguf.display()
    );
    gguf
}

/// Load options that dequantize a GGUF to f32: SmolLM2's weights then are bit-identical to the
/// f32 HF folder the reference scripts give PEFT (proven by smollm2.rs), so CI needs no Python.
pub fn dequantized() -> LoadOptions {
    LoadOptions {
        dequantize: true,
        ..Default::default()
    }
}

/// A model folder of the repository (`tests/fixtures/t5/t5-v1_1`) through the family dispatch.
pub fn load_fixture(rel: &str) -> Box<dyn Model> {
    model::load_source(
        ModelSource::HfDir(repo().join(rel)),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap()
    .model
}

/// The central finite difference of `loss` in element `i` of `v` (whose values are `base`),
/// step `eps`; `v` is left at `base`.
pub fn finite_difference(v: &Var, base: &[f32], i: usize, eps: f32, loss: impl Fn() -> f32) -> f32 {
    let set = |w: Vec<f32>| {
        v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
            .unwrap()
    };
    let bump = |delta: f32| {
        let mut w = base.to_vec();
        w[i] += delta;
        set(w);
        loss()
    };
    let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
    set(base.to_vec());
    fd
}

/// The padded T5 batch of a reference script's expected.json (`input_ids`, `attention_mask`,
/// `labels`).
pub fn t5_batch(exp: &Value) -> Batch {
    let mask = matrix(&int_rows(&exp["attention_mask"]), DType::U8);
    Batch {
        input_ids: matrix(&int_rows(&exp["input_ids"]), DType::U32),
        labels: matrix(&int_rows(&exp["labels"]), DType::I64),
        targets: Targets::Decoder,
        position_ids: mask.to_dtype(DType::U32).unwrap(),
        attention_mask: mask,
        segment_ids: None,
        n_loss_tokens: 0,
        n_tokens: 0,
        sources: Vec::new(),
    }
}

/// The tensor names of an adapter folder's `adapter_model.safetensors`, sorted.
pub fn adapter_keys(dir: &Path) -> Vec<String> {
    let file = dir.join(ferrotune::peft::format::WEIGHTS_FILE);
    let mut k: Vec<String> = candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    k.sort();
    k
}
