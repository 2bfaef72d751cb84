//! Test helpers: temp folders, a word-level tokenizer built in code, SmolLM2's real tokenizer.
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::json;

use super::{Loc, Source};
use crate::tokenizer::Tokenizer;

pub const SMOL_GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
);

/// A chat template for the tiny tokenizer: `<|role|> content </s>` per turn.
pub const TINY_CHAT: &str =
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} </s> {% endfor %}\
                             {% if add_generation_prompt %}<|assistant|> {% endif %}";

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferrotune-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn dir(&self) -> &Path {
        &self.0
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn src(line: usize) -> Source {
    Source {
        file: Arc::from(Path::new("d/train.jsonl")),
        loc: Loc::Line(line),
        task: None,
    }
}

const SPECIALS: &[&str] = &[
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
];

const WORDS: &[&str] = &[
    ":",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "summarize",
    "summary",
    "hello",
    "hi",
    "there",
    "be",
    "nice",
    "bye",
    "user",
    "assistant",
    "system",
    "last",
    "a",
    "b",
    "c",
    "d",
    "e",
    "question",
    "answer",
    "q",
    "x",
    "y",
    "z",
];

/// A word-level tokenizer (whitespace / punctuation pre-tokenizer) saved as an HF folder and
/// loaded through [`Tokenizer::from_hf_dir`], with BOS `<s>` added, EOS `</s>`, pad `<pad>`,
/// and optionally a chat template. Numbers `0`..`99` are words too.
pub fn tiny_tokenizer(chat_template: Option<&str>) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    let words = SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(WORDS.iter().map(|s| s.to_string()))
        .chain((0..100).map(|n| n.to_string()));
    for (i, w) in words.enumerate() {
        vocab.insert(w, json!(i));
    }
    let added: Vec<_> = SPECIALS[1..]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i + 1, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let mut config = json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                            "add_bos_token": true});
    if let Some(t) = chat_template {
        config["chat_template"] = json!(t);
    }
    let d = TempDir::new(&format!(
        "tok-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    d.write("tokenizer.json", &tj.to_string());
    d.write("tokenizer_config.json", &config.to_string());
    Tokenizer::from_hf_dir(d.dir()).unwrap()
}

/// The ids of whitespace-separated words, looked up one by one in the vocabulary (an
/// expectation built without the tokenizer's pre-tokenizer). Panics on a word not in it.
pub fn words(tok: &Tokenizer, text: &str) -> Vec<u32> {
    text.split_whitespace()
        .map(|w| {
            tok.token_to_id(w)
                .unwrap_or_else(|| panic!("test word {w:?} is not in the tiny vocabulary"))
        })
        .collect()
}

pub fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = Path::new(SMOL_GGUF);
        let content = crate::model::read_gguf(path).unwrap_or_else(|e| {
            panic!("{e}: run scripts/fetch-models.sh to fetch the test models")
        });
        Tokenizer::from_gguf(&content, path).unwrap()
    })
}

pub const MINILM_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../.cache/models/all-minilm-l6-v2"
);

/// The real all-MiniLM-L6-v2 tokenizer (BERT WordPiece, `[CLS] text [SEP]`, `[MASK]`).
pub fn minilm() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_hf_dir(Path::new(MINILM_DIR))
            .unwrap_or_else(|e| panic!("{e}: run scripts/fetch-models.sh to fetch the test models"))
    })
}

/// A T5-style tokenizer for tests: all-MiniLM-L6-v2's WordPiece vocabulary without its
/// post-processor, plus `</s>` (EOS, appended to encoder inputs) and 100 sentinel tokens
/// `<extra_id_0>`..`<extra_id_99>` counted down from the top of the vocabulary, as T5's.
pub fn t5_like() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let text = std::fs::read_to_string(Path::new(MINILM_DIR).join("tokenizer.json"))
            .unwrap_or_else(|e| {
                panic!("{e}: run scripts/fetch-models.sh to fetch the test models")
            });
        let mut tj: serde_json::Value = serde_json::from_str(&text).unwrap();
        let base = tj["model"]["vocab"].as_object().unwrap().len();
        let added = tj["added_tokens"].as_array_mut().unwrap();
        let mut push = |id: usize, content: String| {
            added.push(json!({"id": id, "content": content, "single_word": false,
                              "lstrip": false, "rstrip": false, "normalized": false,
                              "special": true}))
        };
        push(base, "</s>".into());
        for j in 0..100 {
            push(base + 100 - j, format!("<extra_id_{j}>"));
        }
        tj["post_processor"] = serde_json::Value::Null;
        tj["truncation"] = serde_json::Value::Null;
        tj["padding"] = serde_json::Value::Null;
        let d = TempDir::new("t5-like-tok");
        d.write("tokenizer.json", &tj.to_string());
        d.write(
            "tokenizer_config.json",
            &json!({"eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "[UNK]"}).to_string(),
        );
        // The folder is removed when `d` drops; the tokenizer is in memory by then.
        Tokenizer::from_hf_dir(d.dir()).unwrap()
    })
}

/// `data/<name>` in $FERROTUNE_SHARED_DIR, else in the `../shared` beside the repository.
pub fn shared_data(name: &str) -> PathBuf {
    let dir = match std::env::var_os("FERROTUNE_SHARED_DIR") {
        Some(shared) => PathBuf::from(shared).join("data").join(name),
        None => {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data")).join(name)
        }
    };
    assert!(
        dir.is_dir(),
        "{}: missing (put ../shared beside the repository, or set FERROTUNE_SHARED_DIR)",
        dir.display()
    );
    dir
}
