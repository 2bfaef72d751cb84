//! What the CLI tests share: running the binary, the one-line error check, and the tiny test
//! model (tests/fixtures/models, 2 layers, vocab 256) with a word-level tokenizer.
#![allow(dead_code)] // each test file uses its own part

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../../ferrotune/tests/common/word_model.rs"]
mod word_model;
#[allow(unused_imports)] // each test file uses its own part
pub use word_model::{repo, reverse_row, tmp, word_level_model, REV_WORDS};

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

/// The word for a token id.
pub fn word(id: usize) -> String {
    WORDS.get(id).map_or(format!("w{id}"), |w| w.to_string())
}

/// `dir/model`: the tiny GQA fixture (untied, context 256) with a word-level tokenizer over
/// [`WORDS`], EOS `</s>`, and the chat template above; `add_bos` says whether encoding prepends
/// `<s>`.
pub fn tiny_model(dir: &Path, add_bos: bool) -> PathBuf {
    word_level_model(dir, WORDS, VOCAB, add_bos, Some(CHAT_TEMPLATE))
}

/// `dir/model`: the tiny fixture with the reverse task's word-level tokenizer ([`REV_WORDS`],
/// then `w24`..`w255`), adding BOS, no chat template.
pub fn rev_model(dir: &Path) -> PathBuf {
    word_level_model(dir, REV_WORDS, VOCAB, true, None)
}

/// `n` reverse-task rows of 1 to `max_words` words of `content`, from a splitmix64 stream
/// seeded with `seed`.
pub fn reverse_rows(content: &[&str], max_words: u64, n: usize, seed: u64) -> String {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = String::new();
    for _ in 0..n {
        let k = 1 + (next() % max_words) as usize;
        let ws: Vec<&str> = (0..k)
            .map(|_| content[(next() % content.len() as u64) as usize])
            .collect();
        out.push_str(&reverse_row(&ws));
    }
    out
}

/// The complete checkpoints of a run (a checkpoint folder appears by rename, complete).
pub fn checkpoint_steps(out: &Path) -> Vec<usize> {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else {
        return Vec::new();
    };
    let mut v: Vec<usize> = rd
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().to_string();
            name.strip_prefix("step-")?.parse().ok()
        })
        .collect();
    v.sort();
    v
}

/// The steps of the complete train lines of metrics.jsonl (a kill may cut the last line).
pub fn logged_steps(out: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .collect()
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

/// `ferrotune merge --model model --adapter adapter --out out`, expecting success.
pub fn merge(model: &Path, adapter: &Path, out: &Path) -> Output {
    succeeds(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

/// `p` as an argument.
pub fn arg(p: &Path) -> String {
    p.display().to_string()
}
