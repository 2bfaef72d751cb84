//! The success paths of the commands, each checked against values known without ferrotune:
//! the model's published shapes, transformers' logits and perplexities (committed fixtures),
//! rouge-score / sacrebleu numbers (committed fixtures), and the inputs' own text.
use crate::support;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use support::{arg, json, smollm2, succeeds, tiny_model, tmp, word, CHAT_TEMPLATE};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn fixture(rel: &str) -> Value {
    let p = support::repo().join(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The tensors of a safetensors file: name -> (dtype, shape), from its JSON header.
fn safetensors_header(path: &Path) -> Vec<(String, String, Vec<u64>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (k.clone(), v["dtype"].as_str().unwrap().to_string(), shape)
        })
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12)
}

// ---- inspect ---------------------------------------------------------------------------------

/// The training-memory rows follow the documented formula (inspect.rs module docs).
fn check_memory_rows(v: &Value, params: u64, batch: u64, seq: u64) {
    let h = v["hidden_size"].as_u64().unwrap();
    let a = v["attention_heads"].as_u64().unwrap();
    let layers = v["layers"].as_u64().unwrap();
    let vocab = v["vocab_size"].as_u64().unwrap();
    let act16 = layers * seq * batch * (34 * h + 5 * a * seq);
    let logits = 2 * batch * seq * vocab * 4;
    let rows = v["memory"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["precision"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fp32", "bf16", "int8", "nf4"]);
    for r in rows {
        let p = r["precision"].as_str().unwrap();
        let (w, g, act) = match p {
            "fp32" => (params * 4, params * 4, 2 * act16 + logits),
            "bf16" => (params * 2, params * 2, act16 + logits),
            _ => (
                r["weights_bytes"].as_u64().unwrap(),
                params * 2,
                act16 + logits,
            ),
        };
        assert_eq!(r["weights_bytes"].as_u64().unwrap(), w, "{p}");
        assert_eq!(r["gradients_bytes"].as_u64().unwrap(), g, "{p}");
        assert_eq!(r["optimizer_bytes"].as_u64().unwrap(), params * 8, "{p}");
        assert_eq!(r["activations_bytes"].as_u64().unwrap(), act, "{p}");
        let total = w + g + params * 8 + act;
        assert_eq!(r["train_total_bytes"].as_u64().unwrap(), total, "{p}");
    }
    // Quantized weights are smaller than bf16 ones, and nf4 than int8.
    let wb = |i: usize| rows[i]["weights_bytes"].as_u64().unwrap();
    assert!(wb(1) > wb(2) && wb(2) > wb(3));
}

#[test]
fn inspect_tiny_model_text_and_json() {
    let d = tmp("ok-inspect-tiny");
    let model = tiny_model(&d, true);
    let cfg = fixture("tests/fixtures/models/tiny-llama-gqa-untied/config.json");
    let tensors = safetensors_header(&model.join("model.safetensors"));
    let params: u64 = tensors.iter().map(|t| t.2.iter().product::<u64>()).sum();
    let m = arg(&model);
    let args = ["inspect", "--model", &m, "--batch", "2", "--seq-len", "32"];
    let v = json(&succeeds(&[&args[..], &["--json"]].concat()));
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["architecture"], "LlamaForCausalLM");
    assert_eq!(v["parameters"].as_u64().unwrap(), params);
    assert_eq!(v["stored_types"], serde_json::json!({"f32": params}));
    assert_eq!(v["in_memory_bytes"].as_u64().unwrap(), params * 4);
    let file_bytes = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(v["file_bytes"].as_u64().unwrap(), file_bytes);
    for (ours, theirs) in [
        ("context_length", "max_position_embeddings"),
        ("vocab_size", "vocab_size"),
        ("hidden_size", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("attention_heads", "num_attention_heads"),
        ("kv_heads", "num_key_value_heads"),
        ("head_dim", "head_dim"),
        ("intermediate_size", "intermediate_size"),
        ("tied_embeddings", "tie_word_embeddings"),
    ] {
        assert_eq!(v[ours], cfg[theirs], "{ours}");
    }
    assert_eq!(f(&v["rope_theta"]), f(&cfg["rope_theta"]));
    assert_eq!(v["chat_template"], true);
    assert_eq!(
        (v["train_batch_size"].as_u64(), v["train_seq_len"].as_u64()),
        (Some(2), Some(32))
    );
    check_memory_rows(&v, params, 2, 32);

    let text = stdout(&succeeds(&args));
    for line in [
        format!("model            {m}"),
        "format           safetensors".to_string(),
        format!("parameters       {params} (0.1 M)"),
        "stored as        f32 100.0%".to_string(),
        "context length   256".to_string(),
        "vocab size       256".to_string(),
        "shape            2 layers, hidden 64, ffn 128, 4 heads / 2 kv heads of 16".to_string(),
        "tied embeddings  false".to_string(),
        "chat template    yes".to_string(),
        "Memory (full fine-tuning with AdamW, batch 2 x 32 tokens):".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    let (memory, formats) = text
        .split_once("Weights per storage format")
        .unwrap_or_else(|| panic!("no weights-per-format table in:\n{text}"));
    let rows: Vec<&str> = memory
        .lines()
        .filter(|l| {
            ["fp32 ", "bf16 ", "int8 ", "nf4 "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    // one row per storage format, the decoder's linears (all of this model's rows are whole
    // blocks) in the format: fewer bits, fewer bytes
    let weights: Vec<(String, f64)> = v["weights_by_format"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["format"].as_str().unwrap().to_string(),
                r["weights_bytes"].as_f64().unwrap(),
            )
        })
        .collect();
    let bytes = |f: &str| weights.iter().find(|w| w.0 == f).map(|w| w.1).unwrap();
    assert_eq!(bytes("f32"), 4.0 * params as f64);
    assert!(bytes("nf4+dq") < bytes("q4_1") && bytes("q4_1") < bytes("q8_0"));
    assert!(bytes("q8_0") < bytes("bf16/f16") && bytes("bf16/f16") < bytes("f32"));
    for f in [
        "f32", "bf16/f16", "int8", "q8_0", "q4_1", "q4_0", "nf4+dq", "fp4+dq",
    ] {
        assert!(
            formats.lines().any(|l| l.starts_with(&format!("{f} "))),
            "no {f} row in:\n{formats}"
        );
    }
}

#[test]
fn inspect_smollm2_gguf_text_and_json() {
    let gguf = smollm2();
    let m = arg(&gguf);
    let v = json(&succeeds(&["inspect", "--model", &m, "--json"]));
    // SmolLM2-135M-Instruct's published config.
    let (layers, h, ffn, heads, kv, vocab) = (30u64, 576u64, 1536u64, 9u64, 3u64, 49152u64);
    let head_dim = h / heads;
    let per_layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * ffn + 2 * h;
    let params = vocab * h + layers * per_layer + h; // tied: the LM head is the embedding
    assert_eq!(params, 134_515_008);
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["parameters"].as_u64().unwrap(), params);
    for (k, want) in [
        ("layers", layers),
        ("hidden_size", h),
        ("intermediate_size", ffn),
        ("attention_heads", heads),
        ("kv_heads", kv),
        ("head_dim", head_dim),
        ("vocab_size", vocab),
        ("context_length", 8192),
    ] {
        assert_eq!(v[k].as_u64(), Some(want), "{k}");
    }
    assert_eq!(v["tied_embeddings"], true);
    assert_eq!(v["chat_template"], true);
    assert_eq!(f(&v["rope_theta"]), 100000.0);
    // Q4_1 weights, a Q8_0 embedding, f32 norms: the shares add up to every parameter.
    let types = v["stored_types"].as_object().unwrap();
    let mut keys: Vec<&str> = types.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["f32", "q4_1", "q8_0"]);
    assert_eq!(
        types.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        params
    );
    assert_eq!(types["f32"].as_u64().unwrap(), (2 * layers + 1) * h);
    assert_eq!(
        v["file_bytes"].as_u64().unwrap(),
        std::fs::metadata(&gguf).unwrap().len()
    );
    // Quantized: well under 1 byte per parameter in memory.
    assert!(v["in_memory_bytes"].as_u64().unwrap() < params);
    check_memory_rows(&v, params, 1, 512);

    let text = stdout(&succeeds(&["inspect", "--model", &m]));
    for line in [
        "format           gguf",
        "parameters       134515008 (134.5 M)",
        "context length   8192",
        "shape            30 layers, hidden 576, ffn 1536, 9 heads / 3 kv heads of 64",
        "tied embeddings  true",
        "Memory (full fine-tuning with AdamW, batch 1 x 512 tokens):",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
}

// ---- perplexity ------------------------------------------------------------------------------

/// `perplexity --json`, checked against the text line of the same run when `with_text` is set;
/// returns (tokens, nll, perplexity).
fn perplexity(model: &Path, file: &Path, extra: &[&str], with_text: bool) -> (u64, f64, f64) {
    let mut args = vec![
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let text = with_text.then(|| stdout(&succeeds(&args)));
    args.push("--json");
    let v = json(&succeeds(&args));
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["nll", "perplexity", "tokens"]);
    let (tokens, nll, ppl) = (
        v["tokens"].as_u64().unwrap(),
        f(&v["nll"]),
        f(&v["perplexity"]),
    );
    assert!(close(ppl, nll.exp(), 1e-12), "{v}");
    if let Some(text) = text {
        assert_eq!(
            text.trim(),
            format!("tokens {tokens}  nll {nll:.5}  perplexity {ppl:.4}")
        );
    }
    (tokens, nll, ppl)
}

#[test]
fn perplexity_of_the_tiny_model_matches_transformers() {
    let d = tmp("ok-ppl-tiny");
    // No BOS: the words of a fixture sequence encode to exactly its ids.
    let model = tiny_model(&d, false);
    let fx = fixture("tests/fixtures/models/tiny-llama-gqa-untied/expected.json");
    let seqs: Vec<(Vec<usize>, f64)> = fx["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids = s["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            (ids, f(&s["nll_mean"]))
        })
        .collect();
    let text_of = |ids: &[usize]| ids.iter().map(|&i| word(i)).collect::<Vec<_>>().join(" ");
    let txt = d.join("seq0.txt");
    std::fs::write(&txt, text_of(&seqs[0].0)).unwrap();
    let (tokens, nll, _) = perplexity(&model, &txt, &[], true);
    assert_eq!(tokens as usize, seqs[0].0.len() - 1);
    assert!(
        (nll - seqs[0].1).abs() < 1e-4,
        "nll {nll} vs transformers {}",
        seqs[0].1
    );

    // JSONL: each line scored on its own; the mean is over all their tokens.
    let jsonl = d.join("both.jsonl");
    let lines: Vec<String> = seqs
        .iter()
        .map(|(ids, _)| serde_json::json!({"text": text_of(ids)}).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let (tokens, nll, _) = perplexity(&model, &jsonl, &[], true);
    let n: Vec<f64> = seqs.iter().map(|(ids, _)| (ids.len() - 1) as f64).collect();
    assert_eq!(tokens as f64, n.iter().sum::<f64>());
    let want = seqs.iter().zip(&n).map(|((_, m), k)| m * k).sum::<f64>() / (tokens as f64);
    assert!(
        (nll - want).abs() < 1e-4,
        "nll {nll} vs transformers {want}"
    );
}

#[test]
fn perplexity_of_smollm2_matches_the_transformers_fixture() {
    let gguf = smollm2();
    let fx = fixture("tests/fixtures/smollm2/perplexity.json");
    // The JSONL case: the text file's cases take a minute on a busy 2-core machine, and the
    // tiny model's test covers text files and the text output.
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"].as_str().unwrap().ends_with(".jsonl"))
        .unwrap();
    let file = support::repo().join(case["file"].as_str().unwrap());
    let (w, s) = (case["window"].to_string(), case["stride"].to_string());
    let (tokens, _, ppl) = perplexity(&gguf, &file, &["--window", &w, "--stride", &s], false);
    assert_eq!(tokens, case["tokens"].as_u64().unwrap(), "{case}");
    let want = f(&case["perplexity"]);
    assert!(
        close(ppl, want, 1e-3),
        "{case}: perplexity {ppl} vs transformers {want}"
    );
}

// ---- convert ---------------------------------------------------------------------------------

/// Logits of the fixture's first sequence, the weights computed in f32.
fn tiny_logits(model: &Path) -> Vec<Vec<f32>> {
    let opts = ferrotune::model::LoadOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    let lm = ferrotune::model::load(model.to_str().unwrap(), &opts, &Device::Cpu).unwrap();
    let fx = fixture("tests/fixtures/models/tiny-llama-gqa-untied/expected.json");
    let ids: Vec<u32> = fx["sequences"][0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    lm.llama()
        .unwrap()
        .forward(&t, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn convert_writes_f32_bf16_and_f16_folders_that_reload() {
    let d = tmp("ok-convert");
    let model = tiny_model(&d, true);
    let fx = fixture("tests/fixtures/models/tiny-llama-gqa-untied/expected.json");
    let want: Vec<Vec<f64>> = fx["sequences"][0]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(f).collect())
        .collect();
    let n_tensors = safetensors_header(&model.join("model.safetensors")).len();
    let prompt_json = |m: &Path| {
        json(&succeeds(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "red cat sun",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]))
    };
    let original_text = prompt_json(&model)["text"].clone();
    let original =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    // (dtype, stored name in safetensors, DType, max |logit - transformers' f32 logits|).
    // transformers itself, its weights rounded to bf16 / f16 and computed in f32, moves these
    // logits (|x| < 7) by 0.1152 / 0.0296 (ferrotune's reloaded folders: the same to 1e-6).
    for (dtype, stored, dt, tol) in [
        ("f32", "F32", DType::F32, 1e-4),
        ("bf16", "BF16", DType::BF16, 0.13),
        ("f16", "F16", DType::F16, 0.035),
    ] {
        let out = d.join(format!("hf-{dtype}"));
        let r = succeeds(&[
            "convert",
            "--model",
            &arg(&model),
            "--out",
            &arg(&out),
            "--out-dtype",
            dtype,
        ]);
        assert!(
            stderr(&r).contains(&format!("wrote {}", out.display())),
            "{}",
            stderr(&r)
        );
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(out.join(f).exists(), "{dtype}: no {f}");
        }
        let header = safetensors_header(&out.join("model.safetensors"));
        assert_eq!(header.len(), n_tensors, "{dtype}");
        for (name, dt, _) in &header {
            assert_eq!(dt, stored, "{dtype}: {name}");
        }
        // Reloaded as stored: inspect sees the dtype.
        let v = json(&succeeds(&["inspect", "--model", &arg(&out), "--json"]));
        // The norms are held in f32 whatever the file stores.
        let norms = 5 * 64;
        let params = v["parameters"].as_u64().unwrap();
        let mut want_types = serde_json::Map::new();
        want_types.insert(dtype.to_string(), (params - norms).into());
        *want_types.entry("f32").or_insert(0.into()) =
            (want_types.get("f32").map_or(0, |n| n.as_u64().unwrap()) + norms).into();
        assert_eq!(v["stored_types"], Value::Object(want_types), "{dtype}");
        // Every weight is the original rounded to the dtype, bit for bit.
        let written =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(written.len(), original.len());
        for (name, w) in &written {
            assert_eq!(w.dtype(), dt, "{name}");
            let want = original[name].to_dtype(dt).unwrap();
            let diff = (w.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{dtype}: {name} is not the rounded original");
        }
        let got = tiny_logits(&out);
        let mut worst = 0f64;
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((*a as f64 - b).abs());
            }
        }
        assert!(worst <= tol, "{dtype}: max |logit diff| {worst} > {tol}");
        assert!(
            worst > 0.0 || dtype == "f32",
            "{dtype}: weights not rounded?"
        );
        if dtype == "f32" {
            // The same tokenizer and weights: the same greedy continuation.
            assert_eq!(prompt_json(&out)["text"], original_text);
        }
    }
}

// ---- score -----------------------------------------------------------------------------------

#[test]
fn score_matches_rouge_score_and_sacrebleu() {
    let d = tmp("ok-score");
    let fx = fixture("tests/fixtures/metrics/cases.json");
    let cases = fx["cases"].as_array().unwrap();
    let groups = fx["groups"].as_array().unwrap();
    // Rows with `references` lists, and single `reference` rows.
    for name in ["synthetic_chunk_0", "synthetic_chunk_20", "edge_longer_hyp"] {
        let g = groups.iter().find(|g| g["name"] == name).unwrap();
        let mut lines = Vec::new();
        for id in g["cases"].as_array().unwrap() {
            let c = &cases[id.as_u64().unwrap() as usize];
            let refs = c["references"].as_array().unwrap();
            lines.push(
                if refs.len() == 1 {
                    serde_json::json!({"prediction": c["prediction"], "reference": refs[0]})
                } else {
                    serde_json::json!({"prediction": c["prediction"], "references": refs})
                }
                .to_string(),
            );
        }
        let p = d.join(format!("{name}.jsonl"));
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        let v = json(&succeeds(&["score", "--predictions", &arg(&p), "--json"]));
        let want = &g["scores"];
        for k in [
            "rouge1",
            "rouge2",
            "rougeL",
            "rougeLsum",
            "bleu",
            "exact_match",
        ] {
            assert!(
                (f(&v[k]) - f(&want[k])).abs() <= 1e-9,
                "{name} {k}: {} vs {}",
                v[k],
                want[k]
            );
        }
        assert_eq!(v["n"], want["n"]);
        let text = stdout(&succeeds(&["score", "--predictions", &arg(&p)]));
        let expected = format!(
            "n          {}\nrouge1     {:.4}\nrouge2     {:.4}\nrougeL     {:.4}\nrougeLsum  {:.4}\nbleu       {:.2}\nexact      {:.4}\n",
            want["n"], f(&want["rouge1"]), f(&want["rouge2"]), f(&want["rougeL"]),
            f(&want["rougeLsum"]), f(&want["bleu"]), f(&want["exact_match"])
        );
        assert_eq!(text, expected, "{name}");
    }
}

// ---- eval ------------------------------------------------------------------------------------

const EVAL_ROWS: [(&str, &str); 3] = [
    ("red cat", "cat red"),
    ("sun moon tree", "tree moon sun"),
    ("fish", "fish"),
];

fn eval_data(d: &Path) -> PathBuf {
    let p = d.join("rows.jsonl");
    let text: String = EVAL_ROWS
        .iter()
        .map(|(q, a)| serde_json::json!({"q": format!("say {q}"), "a": a}).to_string() + "\n")
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn eval_reports_scores_that_score_reproduces_and_writes_every_generation() {
    let d = tmp("ok-eval");
    let model = tiny_model(&d, true);
    let data = eval_data(&d);
    let output = d.join("generations.jsonl");
    let base = [
        "eval",
        "--model",
        &arg(&model),
        "--data",
        &arg(&data),
        "--template",
        "{q} =",
        "--completion",
        " {a}",
        "--max-new-tokens",
        "6",
    ];
    let mut args = base.to_vec();
    let out_arg = arg(&output);
    args.extend([
        "--metrics",
        "rouge,bleu,accuracy,perplexity",
        "--json",
        "--output",
        &out_arg,
    ]);
    let v = json(&succeeds(&args));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r["name"], "base");
    assert_eq!(r["n"], 3);
    for k in [
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "bleu",
        "accuracy",
        "loss",
        "perplexity",
    ] {
        assert!(r[k].is_number(), "{k} missing: {r}");
    }
    assert!(close(f(&r["perplexity"]), f(&r["loss"]).exp(), 1e-9), "{r}");

    // --output: one line per row, the reference being the completion's text.
    let lines: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, (l, (q, a))) in lines.iter().zip(EVAL_ROWS).enumerate() {
        assert_eq!(l["model"], "base");
        assert_eq!(l["row"], i + 1);
        assert_eq!(l["reference"], a);
        // The prediction is what greedy `generate` makes of the rendered prompt.
        let g = json(&succeeds(&[
            "generate",
            "--model",
            &arg(&model),
            "--prompt",
            &format!("say {q} ="),
            "--max-new-tokens",
            "6",
            "--json",
        ]));
        assert_eq!(
            l["prediction"].as_str().unwrap(),
            g["text"].as_str().unwrap().trim()
        );
    }
    // `score` on that file gives eval's numbers.
    let s = json(&succeeds(&["score", "--predictions", &out_arg, "--json"]));
    for k in ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"] {
        assert_eq!(f(&s[k]), f(&r[k]), "{k}");
    }

    // The table: one column per model, the same numbers.
    let text = stdout(&succeeds(&base));
    let header = text.lines().next().unwrap();
    assert!(
        header.starts_with("metric") && header.ends_with("base"),
        "{text}"
    );
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
    };
    assert_eq!(
        row("rouge1"),
        Some(format!("{:.4}", f(&r["rouge1"]))),
        "{text}"
    );
    assert_eq!(row("bleu"), Some(format!("{:.2}", f(&r["bleu"]))), "{text}");
    assert_eq!(row("n"), Some("3".to_string()));
    assert_eq!(row("accuracy"), None, "not asked for: {text}");
}

// ---- data preview ----------------------------------------------------------------------------

#[test]
fn data_preview_shows_split_sizes_and_marks_the_trained_span() {
    let d = tmp("ok-preview");
    tiny_model(&d, true);
    let rows = [
        ("red cat", "sun moon"),
        ("tree", "rock fish bird"),
        ("dog", "one"),
    ];
    let line = |(q, a): &(&str, &str)| serde_json::json!({"q": q, "a": a}).to_string();
    std::fs::write(
        d.join("train.jsonl"),
        rows.iter().map(line).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    std::fs::write(d.join("dev.jsonl"), line(&rows[0])).unwrap();
    std::fs::write(
        d.join("run.toml"),
        "model = \"model\"\noutput_dir = \"out\"\n[data]\ntrain = \"train.jsonl\"\nvalidation = \"dev.jsonl\"\ntemplate = \"{q} =\"\ncompletion = \" {a}\"\n",
    )
    .unwrap();
    let out = succeeds(&[
        "data",
        "preview",
        "--config",
        &arg(&d.join("run.toml")),
        "--n",
        "2",
    ]);
    let text = stdout(&out);
    // BOS + prompt words + "=" + completion words + EOS; the completion and EOS are trained.
    let count = |s: &str| s.split_whitespace().count();
    let tokens: usize = rows
        .iter()
        .map(|(q, a)| 1 + count(q) + 1 + count(a) + 1)
        .sum();
    let trained: usize = rows.iter().map(|(_, a)| count(a) + 1).sum();
    let summary = format!(
        "train: 3 rows -> 3 examples, {tokens} tokens ({trained} trained); 0 prompts truncated, 0 completions truncated, 0 dropped"
    );
    assert!(
        text.lines().any(|l| l == summary),
        "no {summary:?} in:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("validation: 1 rows -> 1 examples")),
        "{text}"
    );
    assert_eq!(text.matches("--- example ").count(), 2, "{text}");
    assert!(
        text.contains("train.jsonl: line 1): 7 tokens, 3 trained ---"),
        "{text}"
    );
    assert!(text.contains("<s> red cat =[[sun moon </s>]]"), "{text}");
    assert!(text.contains("<s> tree =[[rock fish bird </s>]]"), "{text}");
    assert!(
        !text.contains("\x1b["),
        "no colours when stdout is not a terminal"
    );
}

// ---- generate --stop, --chat --system, --quiet ------------------------------------------------

fn generate(model: &Path, extra: &[&str]) -> Value {
    let m = arg(model);
    let mut args = vec![
        "generate",
        "--model",
        &m,
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    json(&succeeds(&args))
}

#[test]
fn generate_stops_before_the_stop_string() {
    let d = tmp("ok-stop");
    let model = tiny_model(&d, true);
    let full = generate(&model, &["--prompt", "red cat"]);
    let text = full["text"].as_str().unwrap().to_string();
    assert_eq!(full["stop_reason"], "max_tokens");
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 8, "{text:?}");
    // A stop string starting at the 4th word (a word not seen before it).
    let k = (3..words.len())
        .find(|&k| !words[..k].contains(&words[k]))
        .expect("a new word");
    let stop = format!(" {}", words[k]);
    let cut = &text[..text.find(&stop).unwrap()];
    let stopped = generate(&model, &["--prompt", "red cat", "--stop", &stop]);
    assert_eq!(stopped["stop_reason"], "stop_string");
    assert_eq!(stopped["text"].as_str().unwrap(), cut);
    assert!(stopped["generated_tokens"].as_u64().unwrap() < 16);
    // Streamed, the text is the same (the stop string held back, never printed).
    let m = arg(&model);
    let streamed = succeeds(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "red cat",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--stop",
        &stop,
    ]);
    assert_eq!(stdout(&streamed), format!("{cut}\n"));
    assert!(
        stderr(&streamed).contains("stop: stop_string"),
        "{}",
        stderr(&streamed)
    );
}

#[test]
fn generate_chat_renders_the_system_turn() {
    let d = tmp("ok-system");
    let model = tiny_model(&d, true);
    assert!(CHAT_TEMPLATE.contains("m.role }}: {{ m.content"));
    // "user : red cat assistant :" and "system : be brief" before it (no BOS with a template).
    let without = generate(&model, &["--chat", "--prompt", "red cat"]);
    assert_eq!(without["prompt_tokens"], 6);
    let with = generate(
        &model,
        &["--chat", "--system", "be brief", "--prompt", "red cat"],
    );
    assert_eq!(with["prompt_tokens"], 10);
    assert_ne!(
        with["text"], without["text"],
        "the system turn changes nothing"
    );
}

#[test]
fn quiet_leaves_stderr_empty() {
    let d = tmp("ok-quiet");
    let model = tiny_model(&d, true);
    let m = arg(&model);
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "red cat",
        "--max-new-tokens",
        "4",
    ];
    let loud = succeeds(&args);
    assert!(stderr(&loud).contains("prompt tokens"), "{}", stderr(&loud));
    let quiet = succeeds(&[&args[..], &["--quiet"]].concat());
    assert_eq!(stderr(&quiet), "");
    assert_eq!(stdout(&quiet), stdout(&loud));
    // Global: before the command too.
    let quiet = succeeds(&[&["-q"][..], &args[..]].concat());
    assert_eq!(stderr(&quiet), "");

    let data = eval_data(&d);
    let eval = [
        "eval",
        "--model",
        &m,
        "--data",
        &arg(&data),
        "--template",
        "{q} =",
        "--completion",
        " {a}",
        "--max-new-tokens",
        "2",
    ];
    assert!(stderr(&succeeds(&eval)).contains("base: 3 rows in"));
    let quiet = succeeds(&[&eval[..], &["--quiet"]].concat());
    assert_eq!(stderr(&quiet), "");
    assert!(stdout(&quiet).starts_with("metric"));

    // Progress bars are drawn only on a terminal: piped, perplexity's stderr stays empty.
    let txt = d.join("t.txt");
    std::fs::write(&txt, "red green blue cat dog ".repeat(20)).unwrap();
    let p = succeeds(&["perplexity", "--model", &m, "--file", &arg(&txt)]);
    assert_eq!(stderr(&p), "");
}

#[test]
fn quiet_training_prints_nothing_and_still_writes_the_adapter() {
    let d = tmp("ok-quiet-train");
    tiny_model(&d, true);
    let rows: String = ["red cat", "sun moon", "tree rock", "fish bird"]
        .iter()
        .map(|q| serde_json::json!({"q": q, "a": "one"}).to_string() + "\n")
        .collect();
    std::fs::write(d.join("train.jsonl"), rows).unwrap();
    let config = |out: &str| {
        let p = d.join(format!("{out}.toml"));
        std::fs::write(
            &p,
            format!(
                "model = \"model\"\noutput_dir = \"{out}\"\n[data]\ntrain = \"train.jsonl\"\ntemplate = \"{{q}} =\"\ncompletion = \" {{a}}\"\n[lora]\nr = 2\n[train]\nbatch_size = 2\nmax_steps = 2\nmax_seq_len = 16\n"
            ),
        )
        .unwrap();
        arg(&p)
    };
    let loud = succeeds(&["train", "--config", &config("loud")]);
    assert!(
        stderr(&loud).contains("trainable params"),
        "{}",
        stderr(&loud)
    );
    let quiet = succeeds(&["train", "--config", &config("quiet"), "--quiet"]);
    assert_eq!(stderr(&quiet), "");
    assert!(d.join("quiet/adapter/adapter_model.safetensors").exists());
}
