//! Logits and perplexity against transformers (fixtures written by reference/make_fixtures.py).
use candle_core::{Device, Tensor};
use ferrotune::model::{self, LoadOptions, SafetensorsSource};
use serde_json::Value;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_tiny(name: &str) {
    let dir = repo().join("tests/fixtures/models").join(name);
    let cfg = model::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let m = model::Llama::load(&src, &cfg).unwrap();
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut worst = 0f32;
    for seq in exp["sequences"].as_array().unwrap() {
        let input = ids(&seq["input_ids"]);
        let t = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.forward(&t, None).unwrap().squeeze(0).unwrap();
        let got: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (row, want) in got.iter().zip(seq["logits"].as_array().unwrap()) {
            worst = worst.max(max_abs_diff(row, &floats(want)));
        }
        // Perplexity from our own NLL routine.
        let nll = ferrotune::perplexity::sequence_nll(&m, &input, usize::MAX, usize::MAX).unwrap();
        let want_nll = seq["nll_mean"].as_f64().unwrap();
        let mean = nll.total / nll.tokens as f64;
        assert!(
            ((mean.exp() - want_nll.exp()) / want_nll.exp()).abs() < 1e-3,
            "{name}: ppl {} vs {}",
            mean.exp(),
            want_nll.exp()
        );
    }
    // Batch of two sequences.
    let batch: Vec<Vec<u32>> = exp["batch"]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let flat: Vec<u32> = batch.concat();
    let t = Tensor::from_vec(flat, (batch.len(), batch[0].len()), &Device::Cpu).unwrap();
    let logits: Vec<Vec<Vec<f32>>> = m.forward(&t, None).unwrap().to_vec3().unwrap();
    for (b, want_b) in logits
        .iter()
        .zip(exp["batch"]["logits"].as_array().unwrap())
    {
        for (row, want) in b.iter().zip(want_b.as_array().unwrap()) {
            worst = worst.max(max_abs_diff(row, &floats(want)));
        }
    }
    assert!(worst < 1e-4, "{name}: max |logit diff| {worst} >= 1e-4");
    eprintln!("{name}: max |logit diff| = {worst:e}");
}

#[test]
fn tiny_llama_gqa_untied_matches_transformers() {
    check_tiny("tiny-llama-gqa-untied");
}
#[test]
fn tiny_llama_mha_tied_matches_transformers() {
    check_tiny("tiny-llama-mha-tied");
}
#[test]
fn tiny_llama3_rope_scaling_matches_transformers() {
    check_tiny("tiny-llama3-rope-scaling");
}
#[test]
fn tiny_qwen2_matches_transformers() {
    check_tiny("tiny-qwen2");
}
#[test]
fn tiny_mistral_matches_transformers() {
    check_tiny("tiny-mistral");
}
#[test]
fn tiny_llama_head_dim_matches_transformers() {
    check_tiny("tiny-llama-head-dim");
}

/// Decoding token by token with the KV cache gives the same logits as one full forward.
#[test]
fn kv_cache_decode_equals_full_forward() {
    let dir = repo().join("tests/fixtures/models/tiny-llama-gqa-untied");
    let cfg = model::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let m = model::Llama::load(&src, &cfg).unwrap();
    let input: Vec<u32> = (0..20u32).map(|i| (i * 37 + 5) % 256).collect();
    let full: Vec<Vec<f32>> = m
        .forward(
            &Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut cache = m.new_cache();
    // Prefill 7 tokens, then one at a time.
    let pre = Tensor::new(&input[..7], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut rows: Vec<Vec<f32>> = m
        .forward(&pre, Some(&mut cache))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for &tok in &input[7..] {
        let t = Tensor::new(&[tok], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        rows.push(
            m.forward_last(&t, Some(&mut cache))
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap(),
        );
    }
    let worst = rows
        .iter()
        .zip(&full)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    assert!(
        worst < 1e-4,
        "cached decode differs from full forward by {worst}"
    );
}
