//! Every bad input ends in one clear line on stderr that names the file and the problem, a
//! non-zero exit code, and no panic or backtrace.
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run the CLI, expect failure, return the single stderr line.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure for {args:?}, got success; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code for {args:?}: {:?}; stderr: {stderr}",
        out.status.code()
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line of error for {args:?}, got: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("backtrace")
            && !stderr.contains("internal error"),
        "{stderr}"
    );
    lines[0].to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A tiny model folder with a small word-level tokenizer, so the CLI can run it end to end.
fn tiny_model_with_tokenizer(name: &str) -> PathBuf {
    let d = tmp(name).join("model");
    copy_dir(
        &repo().join("tests/fixtures/models/tiny-llama-gqa-untied"),
        &d,
    );
    let words = [
        "<unk>", "<s>", "</s>", "hello", "world", "the", "a", "cat", "sat",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), (i as u64).into()))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        d.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "</s>", "bos_token": "<s>",
            "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"})
        .to_string(),
    )
    .unwrap();
    d
}

fn smollm2() -> PathBuf {
    let p = repo().join(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

#[test]
fn tiny_model_runs_end_to_end() {
    let d = tiny_model_with_tokenizer("ok");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args([
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], 2);
    for k in [
        "text",
        "generated_tokens",
        "prompt_tokens_per_s",
        "decode_tokens_per_s",
        "stop_reason",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
}

#[test]
fn truncated_gguf() {
    let d = tmp("trunc");
    let p = d.join("cut.gguf");
    let bytes = std::fs::read(smollm2()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["inspect", "--model", p.to_str().unwrap()]);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
}

#[test]
fn corrupt_gguf_header() {
    let d = tmp("corrupt-gguf");
    let p = d.join("bad.gguf");
    let mut bytes = std::fs::read(smollm2()).unwrap()[..4096].to_vec();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // absurd tensor count
    std::fs::write(&p, &bytes).unwrap();
    let e = fails(&["inspect", "--model", p.to_str().unwrap()]);
    assert!(e.contains("bad.gguf"), "{e}");
}

#[test]
fn not_a_gguf_file() {
    let d = tmp("notgguf");
    let p = d.join("model.bin");
    std::fs::write(&p, b"hello").unwrap();
    let e = fails(&["inspect", "--model", p.to_str().unwrap()]);
    assert!(e.contains("model.bin") && e.contains("not a GGUF"), "{e}");
}

#[test]
fn corrupt_safetensors() {
    let d = tiny_model_with_tokenizer("corrupt-st");
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1000]).unwrap();
    let e = fails(&["inspect", "--model", d.to_str().unwrap()]);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tokenizer() {
    let d = tiny_model_with_tokenizer("no-tok");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let e = fails(&["generate", "--model", d.to_str().unwrap(), "--prompt", "hi"]);
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn unknown_architecture() {
    let d = tiny_model_with_tokenizer("arch");
    let cfg = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = fails(&["inspect", "--model", d.to_str().unwrap()]);
    assert!(
        e.contains("config.json") && e.contains("GPT2LMHeadModel"),
        "{e}"
    );
}

#[test]
fn unknown_chat_template_variable() {
    let d = tiny_model_with_tokenizer("tmpl");
    std::fs::write(
        d.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "</s>", "chat_template": "{{ no_such_variable }}{% for m in messages %}{{ m.content }}{% endfor %}"}).to_string(),
    )
    .unwrap();
    let e = fails(&[
        "generate",
        "--chat",
        "--model",
        d.to_str().unwrap(),
        "--prompt",
        "hello",
    ]);
    assert!(
        e.contains("template") && e.contains("no_such_variable"),
        "{e}"
    );
}

#[test]
fn prompt_longer_than_context() {
    let d = tiny_model_with_tokenizer("ctx");
    let long = "hello ".repeat(300);
    let e = fails(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt",
        &long,
    ]);
    assert!(e.contains("300 tokens") && e.contains("256"), "{e}");
}

#[test]
fn missing_model_path() {
    let e = fails(&["inspect", "--model", "/no/such/model.gguf"]);
    assert!(
        e.contains("/no/such/model.gguf") && e.contains("no such file"),
        "{e}"
    );
}

#[test]
fn few_shot_overflow_suggests_fewer_shots() {
    let d = tiny_model_with_tokenizer("shots");
    let shots = d.join("shots.jsonl");
    let line = serde_json::json!({"text": "hello world ".repeat(30), "label": "cat"}).to_string();
    std::fs::write(&shots, format!("{line}\n").repeat(10)).unwrap();
    let e = fails(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--shots",
        shots.to_str().unwrap(),
        "--k",
        "8",
        "--template",
        "{text} => {label}",
    ]);
    assert!(e.contains("context window") && e.contains("--k"), "{e}");
}

#[test]
fn malformed_shots_line() {
    let d = tiny_model_with_tokenizer("badshots");
    let shots = d.join("shots.jsonl");
    std::fs::write(&shots, "{\"text\": \"a\", \"label\": \"b\"}\n{oops\n").unwrap();
    let e = fails(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt",
        "x",
        "--shots",
        shots.to_str().unwrap(),
        "--k",
        "1",
        "--template",
        "{text} {label}",
    ]);
    assert!(e.contains("shots.jsonl") && e.contains("line 2"), "{e}");
}
