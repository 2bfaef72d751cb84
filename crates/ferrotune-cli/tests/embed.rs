//! `ferrotune embed`: sentence embeddings checked against sentence-transformers' (the committed
//! fixture of reference/bert_fixtures.py), its options, and its one-line errors.
use crate::support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use support::{arg, fails, repo, succeeds, tmp};

fn minilm() -> PathBuf {
    let d = repo().join(".cache/models/all-minilm-l6-v2");
    assert!(
        d.join("model.safetensors").is_file(),
        "{} is missing: run ./scripts/fetch-models.sh",
        d.display()
    );
    d
}

fn tiny_bert() -> PathBuf {
    repo().join("tests/fixtures/bert/tiny-bert")
}

/// A JSONL file of `{"text": s}` rows.
fn jsonl(dir: &Path, name: &str, texts: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t, "id": 1 }).to_string())
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// The embeddings printed on stdout, one JSON line each.
fn embeddings(out: &std::process::Output) -> Vec<Vec<f32>> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let obj = v.as_object().unwrap();
            assert_eq!(obj.len(), 1, "{l}");
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

#[test]
fn embed_matches_sentence_transformers() {
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/bert/minilm.json")).unwrap(),
    )
    .unwrap();
    let sentences: Vec<&str> = want["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let dir = tmp("embed-minilm");
    let data = jsonl(&dir, "rows.jsonl", &sentences);
    let check = |got: Vec<Vec<f32>>, key: &str| {
        let rows = want[key].as_array().unwrap();
        assert_eq!(got.len(), rows.len());
        for (i, (g, w)) in got.iter().zip(rows).enumerate() {
            let w: Vec<f32> = w
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(g.len(), 384);
            let d = g
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{key}: row {i} differs by {d}");
        }
    };
    // The folder's modules.json: mean pooling, then Normalize.
    let out = succeeds(&[
        "embed",
        "--model",
        &arg(&minilm()),
        "--data",
        &arg(&data),
        "--field",
        "text",
        "--batch-size",
        "7",
    ]);
    check(embeddings(&out), "embeddings");
    let first6 = jsonl(&dir, "six.jsonl", &sentences[..6]);
    let out = succeeds(&[
        "embed",
        "--model",
        &arg(&minilm()),
        "--data",
        &arg(&first6),
        "--pooling",
        "cls",
        "--no-normalize",
        "-q",
    ]);
    check(embeddings(&out), "cls_embeddings");
    // --normalize on unnormalised mean pooling gives the default output back.
    let out = succeeds(&[
        "embed",
        "--model",
        &arg(&minilm()),
        "--data",
        &arg(&first6),
        "--pooling",
        "mean",
        "--normalize",
    ]);
    let got = embeddings(&out);
    let rows = &want["embeddings"].as_array().unwrap()[..6];
    for (g, w) in got.iter().zip(rows) {
        let w: Vec<f32> = w
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let d = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "--normalize: differs by {d}");
    }
}

#[test]
fn embed_reads_tsv_and_other_fields() {
    let dir = tmp("embed-tsv");
    let p = dir.join("rows.tsv");
    std::fs::write(
        &p,
        "sentence\tlabel\nthe cat sat\t1\na good movie\t0\nawful\t0\n",
    )
    .unwrap();
    let out = succeeds(&[
        "embed",
        "--model",
        &arg(&tiny_bert()),
        "--data",
        &arg(&p),
        "--field",
        "sentence",
        "--no-normalize",
    ]);
    let e = embeddings(&out);
    assert_eq!(e.len(), 3);
    assert!(e.iter().all(|v| v.len() == 32));
    // Different texts, different embeddings; normalised ones have norm 1.
    assert!(e[0] != e[1]);
    let out = succeeds(&[
        "embed",
        "--model",
        &arg(&tiny_bert()),
        "--data",
        &arg(&p),
        "--field",
        "sentence",
        "--normalize",
    ]);
    for v in embeddings(&out) {
        let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "norm {n}");
    }
}

#[test]
fn embed_errors_are_one_line() {
    let dir = tmp("embed-errors");
    let good = jsonl(&dir, "good.jsonl", &["a cat"]);
    let missing = dir.join("missing.jsonl");
    std::fs::write(&missing, "{\"text\": \"a\"}\n{\"sentence\": \"b\"}\n").unwrap();
    let e = fails(&[
        "embed",
        "--model",
        &arg(&tiny_bert()),
        "--data",
        &arg(&missing),
    ]);
    assert!(
        e.contains("missing.jsonl: line 2: no field `text` (the row has: sentence)"),
        "{e}"
    );
    let e = fails(&[
        "embed",
        "--model",
        &arg(&tiny_bert()),
        "--data",
        &arg(&good),
        "--field",
        "body",
    ]);
    assert!(e.contains("line 1: no field `body`"), "{e}");
    // A decoder is not an encoder.
    let llama = repo().join("tests/fixtures/models/tiny-qwen2");
    let e = fails(&["embed", "--model", &arg(&llama), "--data", &arg(&good)]);
    assert!(
        e.contains("key `model_type`: `qwen2` is not a BERT-family encoder"),
        "{e}"
    );
    let gguf = repo().join("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf");
    let e = fails(&["embed", "--model", &arg(&gguf), "--data", &arg(&good)]);
    assert!(
        e.contains("GGUF") && e.contains("BERT or RoBERTa encoder"),
        "{e}"
    );
    let e = fails(&[
        "embed",
        "--model",
        &arg(&tiny_bert()),
        "--data",
        &arg(&good),
        "--pooling",
        "sum",
    ]);
    assert!(e.contains("--pooling `sum`: expected mean, cls"), "{e}");
    let e = fails(&[
        "embed",
        "--model",
        &arg(&tiny_bert()),
        "--data",
        &arg(&good),
        "--batch-size",
        "0",
    ]);
    assert!(e.contains("--batch-size: 0: expected 1 to"), "{e}");
    let e = fails(&[
        "embed",
        "--model",
        &arg(&tiny_bert()),
        "--data",
        &arg(&dir.join("nope.jsonl")),
    ]);
    assert!(e.contains("--data") && e.contains("no such file"), "{e}");
    // An encoder cannot generate.
    let e = fails(&["generate", "--model", &arg(&tiny_bert()), "--prompt", "hi"]);
    assert!(
        e.contains("is an encoder") && e.contains("cannot generate"),
        "{e}"
    );
}

#[test]
fn a_sentence_transformers_module_embed_does_not_run_is_an_error() {
    // A Dense projection after pooling changes every vector: skipping it silently gave
    // embeddings sentence-transformers never computes.
    let dir = tmp("embed-modules").join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(tiny_bert()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let good = jsonl(dir.parent().unwrap(), "good.jsonl", &["a cat"]);
    let modules = |types: &[&str]| {
        let list: Vec<Value> = types
            .iter()
            .enumerate()
            .map(|(i, t)| serde_json::json!({"idx": i, "name": i.to_string(), "path": "", "type": t}))
            .collect();
        std::fs::write(dir.join("modules.json"), Value::Array(list).to_string()).unwrap();
    };
    let embed = ["embed", "--model", &arg(&dir), "--data", &arg(&good), "-q"];
    modules(&[
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Normalize",
    ]);
    succeeds(&embed);
    modules(&[
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Dense",
    ]);
    let e = fails(&embed);
    assert!(
        e.contains("modules.json")
            && e.contains("[1].type")
            && e.contains("`sentence_transformers.models.Dense` is not supported"),
        "{e}"
    );
}
