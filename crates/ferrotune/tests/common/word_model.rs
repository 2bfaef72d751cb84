//! The tiny LLaMA fixture (tests/fixtures/models/tiny-llama-gqa-untied, 2 layers, vocab 256)
//! with a word-level tokenizer, and the "reverse the words" task on it: shared by the library's
//! tests (`common`) and the CLI's (`support`, which includes this file by path).
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The words of the reverse task's tokenizer: specials, `=`, `say`, `rev`, then the content
/// words (from index 7) the rows are made of.
pub const REV_WORDS: &[&str] = &[
    "<unk>", "<s>", "</s>", "<pad>", "=", "say", "rev", "red", "green", "blue", "cat", "dog",
    "sun", "moon", "tree", "rock", "fish", "bird", "one", "two", "three", "four", "five", "six",
];

pub fn repo() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

/// A fresh folder for one test, named after the test binary and `tag`.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ferrotune-{}-{tag}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `dir/model`: a copy of the tiny GQA fixture with a word-level tokenizer of `vocab` ids,
/// id `i` the word `words[i]` (`w{i}` past the list; `words[1..4]` are BOS, EOS and PAD), EOS
/// `</s>`; `add_bos` says whether encoding prepends `<s>`, `chat_template` goes into
/// tokenizer_config.json when given.
pub fn word_level_model(
    dir: &Path,
    words: &[&str],
    vocab: usize,
    add_bos: bool,
    chat_template: Option<&str>,
) -> PathBuf {
    let d = dir.join("model");
    std::fs::create_dir_all(&d).unwrap();
    let src = repo().join("tests/fixtures/models/tiny-llama-gqa-untied");
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, Value> = (0..vocab)
        .map(|i| {
            let w = words.get(i).map_or(format!("w{i}"), |w| w.to_string());
            (w, (i as u64).into())
        })
        .collect();
    let special = |id: usize| {
        serde_json::json!({"id": id, "content": words[id], "single_word": false, "lstrip": false,
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
    let mut tok_cfg = serde_json::json!({"eos_token": "</s>", "bos_token": "<s>",
        "pad_token": "<pad>", "add_bos_token": add_bos});
    if let Some(t) = chat_template {
        tok_cfg["chat_template"] = t.into();
    }
    std::fs::write(d.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
    d
}

/// One JSONL row {"q": "rev a b c", "a": "c b a"}.
pub fn reverse_row(ws: &[&str]) -> String {
    let rev: Vec<&str> = ws.iter().rev().copied().collect();
    let mut row =
        serde_json::json!({"q": format!("rev {}", ws.join(" ")), "a": rev.join(" ")}).to_string();
    row.push('\n');
    row
}
