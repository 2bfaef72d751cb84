//! What the CLI tests share: running the binary, the one-line error check, and the tiny test
//! model (tests/fixtures/models, 2 layers, vocab 256) with a word-level tokenizer.
#![allow(dead_code)] // each test file uses its own part

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The first words of the tokenizer; ids 24..256 are `w24`..`w255`, so every id decodes to one
/// word and a text of words encodes to exactly those ids.
pub const WORDS: &[&str] = &[
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    ":",
    "system",
    "user",
    "assistant",
    "be",
    "brief",
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "rock",
    "fish",
    "bird",
    "say",
    "=",
    "one",
];
pub const VOCAB: usize = 256;

/// The tiny model's chat template: one `role: content` line per message.
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

pub fn repo() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

/// A fresh folder for one test.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The word for a token id.
pub fn word(id: usize) -> String {
    WORDS.get(id).map_or(format!("w{id}"), |w| w.to_string())
}

/// `dir/model`: the tiny GQA fixture (untied, context 256) with a word-level tokenizer, EOS
/// `</s>`, and the chat template above; `add_bos` says whether encoding prepends `<s>`.
pub fn tiny_model(dir: &Path, add_bos: bool) -> PathBuf {
    let d = dir.join("model");
    std::fs::create_dir_all(&d).unwrap();
    let src = repo().join("tests/fixtures/models/tiny-llama-gqa-untied");
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, Value> =
        (0..VOCAB).map(|i| (word(i), (i as u64).into())).collect();
    let special = |id: usize| {
        serde_json::json!({"id": id, "content": WORDS[id], "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(1), special(2), special(3)],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        d.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>",
            "add_bos_token": add_bos, "chat_template": CHAT_TEMPLATE})
        .to_string(),
    )
    .unwrap();
    d
}

/// The SmolLM2 GGUF the tests read (fetched by scripts/fetch-models.sh).
pub fn smollm2() -> PathBuf {
    let p = repo().join(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

pub fn ferrotune<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap()
}

/// Run the CLI, expect success; return its output.
pub fn succeeds<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let out = ferrotune(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run the CLI, expect exit code 1 and exactly one `error:` line on stderr (no panic, no
/// backtrace, nothing before it); return that line.
pub fn fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = ferrotune(args);
    check_error(&format!("{args:?}"), &out)
}

/// The one-line error check of [`fails`] on an output.
pub fn check_error(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code for {what}; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line for {what}, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("backtrace")
            && !stderr.contains("internal error"),
        "{stderr}"
    );
    lines[0].to_string()
}

/// stdout parsed as one JSON value.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `p` as an argument.
pub fn arg(p: &Path) -> String {
    p.display().to_string()
}
