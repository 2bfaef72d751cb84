//! Fuzz targets, their seeds, and a small structure-aware mutator.
//!
//! Each target takes arbitrary bytes and runs one of ferrotune's parsers or loaders on them; the
//! only property checked is that it returns (`Ok` or `Err`) without panicking, aborting or
//! hanging. The same functions are driven by the cargo-fuzz targets in `fuzz/` (libFuzzer, long
//! runs, see docs/fuzzing.md) and by `crates/ferrotune/tests/fuzz_smoke.rs` (a short
//! deterministic run of every target on mutated seeds in `cargo test`, plus the replay of
//! `tests/fuzz/regressions/`).
//!
//! Targets whose input is several files (an HF model folder, a tokenizer folder, data + config)
//! take a [`pack`]ed bundle: `<<<file NAME>>>\n` markers, each followed by that file's bytes.
//! Only the names a target knows are written, into a fresh scratch folder.
//!
//! Not part of the library's API: hidden from the docs and free to change.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::data::{self, Batcher, DataConfig};
use crate::engine::FastDecoder;
use crate::generate::Decoder;
use crate::model::{self, gguf, LoadOptions};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// A fuzz target: `run` returns whether the input was accepted (`Ok`); it must never panic.
#[derive(Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> bool,
    /// Valid inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Where the sizes and counts of an input are, for [`mutate`].
    pub fields: fn(&[u8]) -> Vec<Field>,
    /// Smoke-run iterations in `cargo test` (about a second or two each on the 2-core dev box).
    pub smoke_iterations: usize,
}

/// Every target, in the order the smoke test runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "gguf_header",
        run: gguf_header,
        seeds: gguf_header_seeds,
        fields: gguf_fields,
        smoke_iterations: 3000,
    },
    Target {
        name: "gguf_tokenizer",
        run: gguf_tokenizer,
        seeds: gguf_tokenizer_seeds,
        fields: gguf_fields,
        smoke_iterations: 300,
    },
    Target {
        name: "gguf_model",
        run: gguf_model,
        seeds: gguf_model_seeds,
        fields: gguf_fields,
        smoke_iterations: 200,
    },
    Target {
        name: "hf_model",
        run: hf_model,
        seeds: hf_model_seeds,
        fields: model_bundle_fields,
        smoke_iterations: 200,
    },
    Target {
        name: "hf_tokenizer",
        run: hf_tokenizer,
        seeds: hf_tokenizer_seeds,
        fields: bundle_fields,
        smoke_iterations: 300,
    },
    Target {
        name: "train_config",
        run: train_config,
        seeds: train_config_seeds,
        fields: text_fields,
        smoke_iterations: 2000,
    },
    Target {
        name: "data_rows",
        run: data_rows,
        seeds: data_rows_seeds,
        fields: bundle_fields,
        smoke_iterations: 400,
    },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

// ------------------------------------------------------------------------------------ targets

/// The GGUF header reader alone.
pub fn gguf_header(data: &[u8]) -> bool {
    let _ = gguf::size_fields(data);
    gguf::parse_header(
        data,
        data.len() as u64,
        Path::new("fuzz.gguf"),
        &gguf::Limits::default(),
    )
    .is_ok()
}

/// A GGUF header, then the tokenizer its `tokenizer.ggml.*` metadata describes, used.
pub fn gguf_tokenizer(data: &[u8]) -> bool {
    let path = Path::new("fuzz.gguf");
    let Ok(ct) = gguf::parse_header(data, data.len() as u64, path, &gguf::Limits::default()) else {
        return false;
    };
    let _ = model::config_from_gguf(&ct, path);
    match Tokenizer::from_gguf(&ct, path) {
        Ok(tok) => {
            exercise_tokenizer(&tok);
            true
        }
        Err(_) => false,
    }
}

/// A whole GGUF model: header, config, tokenizer, weights, model construction, then a prompt
/// through both decoders.
pub fn gguf_model(data: &[u8]) -> bool {
    let dir = Scratch::new("input");
    let path = dir.write("model.gguf", data);
    load_and_run(&path)
}

/// An HF model folder: config.json + model.safetensors (+ tokenizer files), loaded and run.
pub fn hf_model(data: &[u8]) -> bool {
    let dir = Scratch::new("input");
    dir.unpack(data, HF_MODEL_FILES);
    load_and_run(dir.path())
}

/// An HF tokenizer folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
/// generation_config.json, chat_template.jinja.
pub fn hf_tokenizer(data: &[u8]) -> bool {
    let dir = Scratch::new("input");
    dir.unpack(data, TOKENIZER_FILES);
    match Tokenizer::from_hf_dir(dir.path()) {
        Ok(tok) => {
            exercise_tokenizer(&tok);
            true
        }
        Err(_) => false,
    }
}

/// A TOML training config, with `--set` overrides after a `#--set` line (one per line).
pub fn train_config(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let (toml_text, overrides) = match text.split_once("\n#--set\n") {
        Some((t, o)) => (t, o.lines().map(str::to_string).collect()),
        None => (text.as_ref(), Vec::new()),
    };
    crate::train::parse_config(
        toml_text,
        Path::new("fuzz.toml"),
        Path::new("fuzz-base"),
        &overrides,
    )
    .is_ok()
}

/// Data rows: a `data.toml` holding a `[data]` section and one data file (`data.jsonl`,
/// `data.json`, `data.csv` or `data.tsv`, plus optionally `dev.jsonl`), read, rendered,
/// tokenized, length-checked, split, previewed and batched.
pub fn data_rows(data: &[u8]) -> bool {
    let dir = Scratch::new("input");
    dir.unpack(data, DATA_FILES);
    let Ok(text) = std::fs::read_to_string(dir.path().join("data.toml")) else {
        return false;
    };
    let parsed = toml::from_str::<toml::Table>(&text).map_err(crate::Error::msg);
    let Some(table) = accepted(parsed) else {
        return false;
    };
    let section = table
        .get("data")
        .cloned()
        .unwrap_or(toml::Value::Table(table));
    let Some(mut cfg) = accepted(section.try_into::<DataConfig>().map_err(crate::Error::msg))
    else {
        return false;
    };
    // Files are read from the scratch folder only: any other path (`/dev/zero`, `../x`) is
    // replaced by the bundle's data file.
    let data_file = DATA_FILES[1..]
        .iter()
        .find(|f| dir.path().join(f).is_file())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data.jsonl"));
    let confine = |p: &mut PathBuf| {
        if !DATA_FILES.iter().any(|f| Path::new(f) == p.as_path()) {
            *p = data_file.clone();
        }
    };
    for p in [&mut cfg.train, &mut cfg.validation, &mut cfg.test]
        .into_iter()
        .flatten()
    {
        confine(p);
    }
    for m in &mut cfg.mixture {
        confine(&mut m.path);
    }
    let tok = data_tokenizer();
    let Some(prepared) = accepted(data::load(&cfg, dir.path(), tok, 64)) else {
        return false;
    };
    let _ = data::preview(&prepared.train, tok, 3);
    let _ = prepared.summary();
    let batch_cfg = cfg.batch_config(2, prepared.max_seq_len, tok);
    if let Ok(mut b) = Batcher::new(prepared.train, batch_cfg, Device::Cpu) {
        for _ in 0..3 {
            if b.next_batch().is_err() {
                break;
            }
        }
    }
    true
}

/// Texts every tokenizer target encodes: plain, spaces, newlines, multi-byte, special tokens.
const SAMPLE_TEXTS: &[&str] = &[
    "The quick brown fox",
    "  two leading spaces\n\nand\ttabs ",
    "héllo wörld 日本語 🙂 \u{0}",
    "<s>hello</s><|im_start|>user<|im_end|>",
    "",
];

fn exercise_tokenizer(tok: &Tokenizer) {
    for text in SAMPLE_TEXTS {
        if let Ok(ids) = tok.encode(text, true) {
            let _ = tok.decode(&ids, true);
            let _ = tok.decode(&ids, false);
            let mut stream = tok.stream();
            for &id in &ids {
                let _ = stream.push(id);
            }
            let _ = stream.finish();
        }
    }
    let vocab = tok.vocab_size() as u32;
    let _ = tok.decode(&[0, 1, vocab.saturating_sub(1), vocab, u32::MAX], false);
    for id in tok.eos_ids().iter().chain(tok.bos_id().as_ref()) {
        let _ = tok.id_to_token(*id);
    }
    if let Some(t) = tok.chat_template() {
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "What is 2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "Thanks"),
        ];
        let _ = t.render(&messages, true, &serde_json::Value::Null);
        let _ = t.render(&messages[1..2], false, &json!({"enable_thinking": false}));
    }
}

/// `model::load`, then a short prompt through the fast engine (when it takes the model) and the
/// differentiable model.
fn load_and_run(path: &Path) -> bool {
    let Some(spec) = path.to_str() else {
        return false;
    };
    let Some(loaded) = accepted(model::load(spec, &LoadOptions::default(), &Device::Cpu)) else {
        return false;
    };
    let Ok(ids) = loaded.tokenizer.encode("hello there, 12", true) else {
        return true;
    };
    if ids.is_empty() {
        return true;
    }
    if let Some(mut fast) = FastDecoder::new(&loaded.model) {
        if let Ok(logits) = fast.prefill(&ids) {
            let _ = fast.step(crate::generate::argmax(&logits));
        }
    }
    if let Ok(mut slow) = loaded.model.decoder() {
        if let Ok(logits) = slow.prefill(&ids) {
            let _ = slow.step(crate::generate::argmax(&logits));
        }
    }
    true
}

/// `Some` for `Ok`. With `FERROTUNE_FUZZ_DEBUG` set, an error is printed (to see why a seed
/// or input is refused).
fn accepted<T>(r: crate::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            if std::env::var_os("FERROTUNE_FUZZ_DEBUG").is_some() {
                eprintln!("refused: {e}");
            }
            None
        }
    }
}

// ------------------------------------------------------------------------------------ bundles

const HF_MODEL_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];
/// `data.toml` first; then the data files a bundle may carry, the first present being the one
/// any path outside the bundle is replaced by.
const DATA_FILES: &[&str] = &[
    "data.toml",
    "data.jsonl",
    "data.json",
    "data.csv",
    "data.tsv",
    "dev.jsonl",
];

const MARK_OPEN: &[u8] = b"<<<file ";
const MARK_CLOSE: &[u8] = b">>>\n";

/// Bundle several files into one fuzz input.
pub fn pack(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, bytes) in files {
        out.extend(MARK_OPEN);
        out.extend(name.as_bytes());
        out.extend(MARK_CLOSE);
        out.extend(*bytes);
    }
    out
}

/// The files of a bundle: (name, byte range of its contents). Text before the first marker and
/// markers with malformed names are skipped.
pub fn unpack(data: &[u8]) -> Vec<(String, std::ops::Range<usize>)> {
    let mut marks = Vec::new(); // (marker start, content start, name)
    let mut at = 0;
    while let Some(i) = find(&data[at..], MARK_OPEN) {
        let start = at + i;
        let name_at = start + MARK_OPEN.len();
        match find(&data[name_at..], MARK_CLOSE) {
            Some(n) if n <= 64 => {
                let name = String::from_utf8_lossy(&data[name_at..name_at + n]).into_owned();
                let content = name_at + n + MARK_CLOSE.len();
                marks.push((start, content, name));
                at = content;
            }
            _ => at = name_at,
        }
    }
    let mut files = Vec::new();
    for (k, (_, content, name)) in marks.iter().enumerate() {
        let end = marks.get(k + 1).map_or(data.len(), |m| m.0);
        files.push((name.clone(), *content..end));
    }
    files
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A fresh folder per call (per tag, process and thread, so parallel fuzzing jobs do not
/// collide), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ferrotune-fuzz-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating the fuzz scratch folder");
        Scratch(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("writing a fuzz input file");
        p
    }
    /// Write the bundle's files whose names are in `allowed` (never a path of the fuzzer's making).
    fn unpack(&self, data: &[u8], allowed: &[&str]) {
        for (name, range) in unpack(data) {
            if allowed.contains(&name.as_str()) {
                self.write(&name, &data[range]);
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------------------------------------------------ seeds

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// A committed fixture; seeds come from the repository, so a missing one is a broken checkout.
fn fixture(rel: &str) -> Vec<u8> {
    let p = repo_file(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fuzz seed {}: {e}", p.display()))
}

/// The tiny HF fixture models (each 2 layers, hidden 64, vocabulary 256).
const TINY_MODELS: &[&str] = &[
    "tiny-llama-mha-tied",
    "tiny-llama-gqa-untied",
    "tiny-llama-head-dim",
    "tiny-llama3-rope-scaling",
    "tiny-mistral",
    "tiny-qwen2",
];

fn gguf_header_seeds() -> Vec<Vec<u8>> {
    let mut seeds = gguf_tokenizer_seeds();
    seeds.extend(gguf_model_seeds());
    seeds
}

fn gguf_tokenizer_seeds() -> Vec<Vec<u8>> {
    let spm = fixture("tests/fixtures/tokenizer/tiny-spm.gguf");
    let mut with_template = Vec::new();
    // The sentencepiece fixture again, with a chat template, so templates get mutated too.
    let ct = gguf::parse_header(
        spm.as_slice(),
        spm.len() as u64,
        Path::new("tiny-spm.gguf"),
        &gguf::Limits::default(),
    )
    .expect("tests/fixtures/tokenizer/tiny-spm.gguf parses");
    let mut md: Vec<(String, Value)> = ct.metadata.into_iter().collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    md.push(("tokenizer.chat_template".into(), Value::String(CHAT.into())));
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut cur = std::io::Cursor::new(&mut with_template);
    gguf_file::write(&mut cur, &md, &[]).expect("writing a GGUF to memory");
    let byte_level = tiny_gguf(1, GgmlDType::F32);
    vec![spm, with_template, byte_level]
}

fn gguf_model_seeds() -> Vec<Vec<u8>> {
    vec![
        tiny_gguf(0, GgmlDType::Q8_0),
        tiny_gguf(1, GgmlDType::Q4_1),
        tiny_gguf(5, GgmlDType::Q4_0),
    ]
}

/// The chat template the seeds carry: `<|role|> content </s>` per turn.
const CHAT: &str = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} </s> {% endfor %}\
                    {% if add_generation_prompt %}<|assistant|> {% endif %}";

/// A GGUF model from the tiny fixture `TINY_MODELS[which]`: its weights (linears stored as
/// `linear_type`, the embedding as f16, norms as f32) under llama.cpp's names, llama.cpp's
/// metadata keys, and a byte-level BPE tokenizer of 256 tokens (one per byte, no merges).
pub fn tiny_gguf(which: usize, linear_type: GgmlDType) -> Vec<u8> {
    let name = TINY_MODELS[which % TINY_MODELS.len()];
    let dir = repo_file("tests/fixtures/models").join(name);
    let cfg = model::config_from_hf_dir(&dir).expect("fixture config.json");
    let arch = match cfg.architecture.as_str() {
        "MistralForCausalLM" => "mistral",
        "Qwen2ForCausalLM" => "qwen2",
        _ => "llama",
    };
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("fixture model.safetensors");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for hf in names {
        let t: &Tensor = &tensors[hf];
        let Some(g) = model::weights::gguf_tensor_name(hf) else {
            continue;
        };
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else if hf.contains("embed_tokens") {
            GgmlDType::F16
        } else {
            linear_type
        };
        let q = QTensor::quantize(t, dtype).expect("quantizing a fixture tensor");
        qtensors.push((g, q));
    }
    let u32v = |x: usize| Value::U32(x as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let alphabet = byte_level_alphabet();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("embedding_length"), u32v(cfg.hidden_size)),
        (key("feed_forward_length"), u32v(cfg.intermediate_size)),
        (key("block_count"), u32v(cfg.num_hidden_layers)),
        (key("attention.head_count"), u32v(cfg.num_attention_heads)),
        (
            key("attention.head_count_kv"),
            u32v(cfg.num_key_value_heads),
        ),
        (key("attention.key_length"), u32v(cfg.head_dim)),
        (key("rope.dimension_count"), u32v(cfg.head_dim)),
        (key("context_length"), u32v(cfg.max_position_embeddings)),
        (key("vocab_size"), u32v(cfg.vocab_size)),
        (key("rope.freq_base"), Value::F32(cfg.rope_theta)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                (0..cfg.vocab_size)
                    .map(|i| Value::String(alphabet[i % 256].to_string()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..cfg.vocab_size)
                    .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.chat_template".into(), Value::String(CHAT.into())),
    ];
    if cfg.vocab_size != 256 {
        md.retain(|(k, _)| !k.starts_with("tokenizer."));
    }
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let qt: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Vec::new();
    gguf_file::write(&mut std::io::Cursor::new(&mut out), &md, &qt)
        .expect("writing a GGUF to memory");
    out
}

/// GPT-2's printable stand-in for each byte (what a byte-level vocabulary spells bytes with).
fn byte_level_alphabet() -> Vec<char> {
    let mut printable: Vec<u8> = (b'!'..=b'~').collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut extra = 0;
    (0..=255u8)
        .map(|b| {
            if printable.contains(&b) {
                char::from(b)
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid code point")
            }
        })
        .collect()
}

/// A word-level tokenizer.json of exactly `vocab` ids (specials, words, then numbers), with
/// BOS `<s>`, EOS `</s>`, pad `<pad>`.
fn word_level_tokenizer_json(vocab: usize) -> String {
    let specials = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
    ];
    let words = [
        "hello", "there", "the", "cat", "sat", "on", "mat", ",", ".", ":", "?",
    ];
    let mut map = serde_json::Map::new();
    let all = specials
        .iter()
        .map(|s| s.to_string())
        .chain(words.iter().map(|s| s.to_string()))
        .chain((0..).map(|n: usize| n.to_string()))
        .take(vocab);
    for (i, w) in all.enumerate() {
        map.insert(w, json!(i));
    }
    let added: Vec<_> = specials[1..]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i + 1, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "<unk>"}
    })
    .to_string()
}

fn tokenizer_config_json() -> String {
    json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
           "add_bos_token": true, "chat_template": CHAT})
    .to_string()
}

fn hf_model_seeds() -> Vec<Vec<u8>> {
    let tj = word_level_tokenizer_json(256);
    let tc = tokenizer_config_json();
    TINY_MODELS
        .iter()
        .map(|name| {
            let dir = format!("tests/fixtures/models/{name}");
            let config = fixture(&format!("{dir}/config.json"));
            let weights = fixture(&format!("{dir}/model.safetensors"));
            let gen = fixture(&format!("{dir}/generation_config.json"));
            // Weights last: a truncation then mostly cuts tensor data, not a whole file.
            pack(&[
                ("tokenizer.json", tj.as_bytes()),
                ("tokenizer_config.json", tc.as_bytes()),
                ("generation_config.json", &gen),
                ("config.json", &config),
                ("model.safetensors", &weights),
            ])
        })
        .collect()
}

/// The sentencepiece fixture as a tokenizer.json (the pipeline we build from its GGUF).
fn spm_tokenizer_json() -> String {
    let p = repo_file("tests/fixtures/tokenizer/tiny-spm.gguf");
    let ct = model::read_gguf(&p).expect("tests/fixtures/tokenizer/tiny-spm.gguf parses");
    let tok = Tokenizer::from_gguf(&ct, &p).expect("tiny-spm.gguf has a tokenizer");
    tok.inner()
        .to_string(false)
        .expect("a tokenizer serializes to JSON")
}

fn hf_tokenizer_seeds() -> Vec<Vec<u8>> {
    let word = word_level_tokenizer_json(256);
    let spm = spm_tokenizer_json();
    let config = tokenizer_config_json();
    let gen = fixture("tests/fixtures/models/tiny-llama-mha-tied/generation_config.json");
    let spm_config = json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                            "add_bos_token": null,
                            "chat_template": [{"name": "default", "template": CHAT}]})
    .to_string();
    vec![
        pack(&[
            ("tokenizer.json", word.as_bytes()),
            ("tokenizer_config.json", config.as_bytes()),
            ("generation_config.json", &gen),
        ]),
        pack(&[
            ("tokenizer.json", spm.as_bytes()),
            ("tokenizer_config.json", spm_config.as_bytes()),
            ("special_tokens_map.json", br#"{"pad_token": "<unk>"}"#),
            ("chat_template.jinja", CHAT.as_bytes()),
        ]),
    ]
}

fn train_config_seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![
        fixture("examples/quickstart/quickstart.toml"),
        fixture("examples/dialogsum-lora.toml"),
    ];
    let mut with_set = fixture("examples/quickstart/quickstart.toml");
    with_set.extend(b"\n#--set\ntrain.lr=2e-4\ndata.train=../x.jsonl\nlora.r=4\n");
    seeds.push(with_set);
    seeds
}

/// The tokenizer the data target renders with: the sentencepiece fixture (byte fallback, so
/// every text has ids) plus a chat template.
fn data_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = Scratch::new("tokenizer");
        dir.write("tokenizer.json", spm_tokenizer_json().as_bytes());
        let config = json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT});
        dir.write("tokenizer_config.json", config.to_string().as_bytes());
        Tokenizer::from_hf_dir(dir.path()).expect("the fuzz data tokenizer loads")
    })
}

fn data_rows_seeds() -> Vec<Vec<u8>> {
    let quickstart = fixture("examples/quickstart/train.jsonl");
    let rows: Vec<&[u8]> = quickstart.split(|&b| b == b'\n').take(12).collect();
    let jsonl = rows.join(&b'\n');
    let validation = fixture("examples/quickstart/validation.jsonl");
    let dev: Vec<&[u8]> = validation.split(|&b| b == b'\n').take(4).collect();
    let dev = dev.join(&b'\n');
    let parsed: Vec<serde_json::Value> = rows
        .iter()
        .filter_map(|r| serde_json::from_slice(r).ok())
        .collect();
    let json_array = serde_json::to_vec(&json!({ "data": parsed })).expect("JSON");
    let mut csv = b"sentence,iso\n".to_vec();
    for v in &parsed {
        csv.extend(
            format!(
                "\"{}\",{}\n",
                v["sentence"].as_str().unwrap_or("").replace('"', "\"\""),
                v["iso"].as_str().unwrap_or("")
            )
            .as_bytes(),
        );
    }
    let tsv = b"question\tanswer\nWhat is 2+2?\t4\nName a colour.\tred\n".to_vec();
    let chat = concat!(
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}"#,
        "\n"
    );
    let pair = "[data]\ntrain = \"data.jsonl\"\nvalidation = \"dev.jsonl\"\n\
                template = \"Write the date in this sentence as YYYY-MM-DD.\\n\\nSentence: {sentence}\\nDate:\"\n\
                completion = \" {iso}\"\nmax_seq_len = 48\n";
    vec![
        pack(&[
            ("data.toml", pair.as_bytes()),
            ("data.jsonl", &jsonl),
            ("dev.jsonl", &dev),
        ]),
        pack(&[
            (
                "data.toml",
                b"[data]\ntrain = \"data.json\"\nsplit = [0.7, 0.3]\ntemplates = [\"S: {sentence}\", \"{sentence} ->\"]\ncompletion = \" {iso}\"\nchat = true\npacking = true\nlength_policy = \"drop\"\nmax_seq_len = 256\n",
            ),
            ("data.json", &json_array),
        ]),
        pack(&[
            (
                "data.toml",
                b"[data]\ntrain = \"data.csv\"\ntemplate = \"{sentence}\"\ncompletion = \" {iso}\"\nmax_seq_len = 24\nlength_policy = \"truncate_prompt_start\"\nseed = 7\n",
            ),
            ("data.csv", &csv),
        ]),
        pack(&[
            (
                "data.toml",
                b"[data]\nmixture = [{path = \"data.tsv\", weight = 2.0, template = \"Q: {question}\\nA:\", completion = \" {answer}\"}, {path = \"data.jsonl\", weight = 1.0}]\nmixture_size = 6\nmixing = \"sample\"\n",
            ),
            ("data.tsv", &tsv),
            ("data.jsonl", chat.as_bytes()),
        ]),
        pack(&[
            (
                "data.toml",
                b"[data]\nmixture = [{path = \"data.tsv\", template = \"Q: {question}\\nA:\", completion = \" {answer}\"}, {path = \"data.jsonl\", weight = 3.0}]\nmixing_rates = \"temperature\"\nmixing_cap = 2\nmixing_temperature = 2.0\nmixture_size = 8\n",
            ),
            ("data.tsv", &tsv),
            ("data.jsonl", chat.as_bytes()),
        ]),
        pack(&[
            (
                "data.toml",
                b"[data]\ntrain = \"data.jsonl\"\nmessages_field = \"messages\"\nsplit = [0.5, 0.25, 0.25]\n",
            ),
            ("data.jsonl", chat.repeat(2).as_bytes()),
        ]),
    ]
}

// ------------------------------------------------------------------------------------ mutator

/// A place in an input where a size, count or number lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A little-endian integer of `width` bytes (1, 2, 4 or 8) at `at`.
    Binary { at: usize, width: usize },
    /// A number written as text (digits, maybe signed or with a fraction) at `start..end`.
    Text { start: usize, end: usize },
}

fn gguf_fields(data: &[u8]) -> Vec<Field> {
    gguf::size_fields(data)
        .into_iter()
        .map(|(at, width)| Field::Binary { at, width })
        .collect()
}

/// [`bundle_fields`] without the tokenizer files of an HF model bundle: its sizes are in
/// config.json and the safetensors header.
fn model_bundle_fields(data: &[u8]) -> Vec<Field> {
    let tokenizer = unpack(data)
        .into_iter()
        .filter(|(name, _)| name.starts_with("tokenizer"))
        .map(|(_, r)| r)
        .collect::<Vec<_>>();
    bundle_fields(data)
        .into_iter()
        .filter(|f| {
            !tokenizer
                .iter()
                .any(|r| r.contains(&field_end(f).saturating_sub(1)))
        })
        .collect()
}

/// Numbers written as text anywhere in the input.
fn text_fields(data: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    number_runs(data, 0, &mut out);
    out
}

/// Text numbers in the text files of a bundle, and the header of a safetensors file in it (its
/// 8-byte header length, and the numbers of its JSON header: shapes and data offsets).
fn bundle_fields(data: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    for (name, range) in unpack(data) {
        let body = &data[range.clone()];
        if name.ends_with(".safetensors") {
            out.push(Field::Binary {
                at: range.start,
                width: 8,
            });
            let header_len = body
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
                .unwrap_or(0);
            let end = 8usize.saturating_add(header_len).min(body.len());
            if end > 8 {
                number_runs(&body[8..end], range.start + 8, &mut out);
            }
        } else {
            number_runs(body, range.start, &mut out);
        }
    }
    out
}

/// Every run of digits (with a leading `-` and a `.fraction` / exponent when present).
fn number_runs(text: &[u8], base: usize, out: &mut Vec<Field>) {
    let mut i = 0;
    while i < text.len() {
        if text[i].is_ascii_digit() {
            let mut start = i;
            if start > 0 && text[start - 1] == b'-' {
                start -= 1;
            }
            while i < text.len() && (text[i].is_ascii_digit() || b".eE+-".contains(&text[i])) {
                i += 1;
            }
            out.push(Field::Text {
                start: base + start,
                end: base + i,
            });
        } else {
            i += 1;
        }
    }
}

/// SplitMix64: small, seedable, the same sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Integers that break size arithmetic: 0, 1, -1, 2^31, 2^32, 2^40, 2^62, 2^63-1 and neighbours.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    u64::MAX, // -1
    2,
    3,
    7,
    63,
    64,
    65,
    255,
    256,
    577,
    1 << 16,
    (1 << 31) - 1,
    1 << 31,
    1 << 32,
    (1 << 32) + 1,
    1 << 40,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
];

/// The same as text, plus what only text can say.
const INTERESTING_TEXT: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "63",
    "65",
    "577",
    "2147483648",
    "4294967296",
    "1099511627776",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551616",
    "-9223372036854775808",
    "1e308",
    "-0.0",
    "0.5",
    "nan",
    "inf",
];

/// Bytes that break text formats.
const NASTY: &[&[u8]] = &[
    b"\"",
    b"'",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\n",
    b"\r\n",
    b"\0",
    b",",
    b"=",
    b"{{",
    b"}}",
    b"{%",
    b"%}",
    "é".as_bytes(),
    "\u{1F600}".as_bytes(),
    b"\xff\xfe",
    b"\xe2\x96",
];

/// One mutant of `seed`: 1 to 4 stacked edits chosen by `rng` among bit flips, interesting
/// integers written at `fields` (binary or as text), nasty bytes, truncation, duplication and
/// deletion of a chunk. Half of the positions are chosen near a field.
pub fn mutate(seed: &[u8], fields: &[Field], rng: &mut Rng) -> Vec<u8> {
    let mut out = seed.to_vec();
    let mut fields = fields.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        // Half the edits land near a field (the header, the sizes), the rest anywhere.
        let near: Vec<usize> = fields.iter().map(|f| field_end(f).min(len)).collect();
        let pos = |rng: &mut Rng| {
            if len == 0 {
                0
            } else if !near.is_empty() && rng.below(2) == 0 {
                let p = near[rng.below(near.len())] + rng.below(16);
                p.saturating_sub(8).min(len - 1)
            } else {
                rng.below(len)
            }
        };
        match rng.below(10) {
            0 | 1 if len > 0 => {
                let p = pos(rng);
                out[p] ^= 1 << rng.below(8);
            }
            2..=4 if !fields.is_empty() => {
                let f = fields[rng.below(fields.len())];
                match f {
                    Field::Binary { at, width } if at + width <= out.len() => {
                        let mut v = INTERESTING[rng.below(INTERESTING.len())];
                        let old = {
                            let mut b = [0u8; 8];
                            b[..width].copy_from_slice(&out[at..at + width]);
                            u64::from_le_bytes(b)
                        };
                        match rng.below(4) {
                            0 => v = old.wrapping_add(1),
                            1 => v = old.wrapping_sub(1),
                            _ => {}
                        }
                        out[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                    }
                    Field::Text { start, end } if end <= out.len() => {
                        let v = INTERESTING_TEXT[rng.below(INTERESTING_TEXT.len())];
                        out.splice(start..end, v.bytes());
                        // Later text fields moved; drop them rather than write at stale offsets.
                        fields.retain(|f| matches!(f, Field::Text { end: e, .. } if *e <= start));
                    }
                    _ => {}
                }
            }
            5 => {
                let p = pos(rng);
                let nasty = NASTY[rng.below(NASTY.len())];
                out.splice(p..p, nasty.iter().copied());
                fields.retain(|f| field_end(f) <= p);
            }
            6 if len > 0 => {
                let p = rng.below(len);
                out.truncate(p);
                fields.retain(|f| field_end(f) <= p);
            }
            7 if len > 1 => {
                let a = pos(rng);
                let n = 1 + rng.below((len - a).min(256));
                let chunk = out[a..a + n].to_vec();
                let at = pos(rng);
                out.splice(at..at, chunk);
                fields.retain(|f| field_end(f) <= at);
            }
            8 if len > 1 => {
                let a = pos(rng);
                let n = 1 + rng.below((len - a).min(64));
                out.drain(a..a + n);
                fields.retain(|f| field_end(f) <= a);
            }
            _ if len > 0 => {
                let p = pos(rng);
                out[p] = [0u8, 0xff, 0x7f, 0x80, b'9', b' '][rng.below(6)];
            }
            _ => {}
        }
    }
    out
}

fn field_end(f: &Field) -> usize {
    match *f {
        Field::Binary { at, width } => at + width,
        Field::Text { end, .. } => end,
    }
}

/// The `i`-th smoke input of a target: seed `i % seeds` mutated with a generator seeded by the
/// target's name and `i`, so a failure is reproduced from the pair alone.
pub fn smoke_input(target: &Target, seeds: &[Vec<u8>], i: usize) -> Vec<u8> {
    let seed = &seeds[i % seeds.len()];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut rng = Rng::new(h ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    mutate(seed, &(target.fields)(seed), &mut rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_round_trip() {
        let b = pack(&[("a.json", b"{}"), ("b.bin", b"\x00<<<file x")]);
        let files = unpack(&b);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].0, "a.json");
        assert_eq!(&b[files[0].1.clone()], b"{}");
        assert_eq!(files[1].0, "b.bin");
        assert_eq!(&b[files[1].1.clone()], b"\x00<<<file x");
    }

    #[test]
    fn text_fields_find_numbers() {
        let t = b"r = 8\nlr = -1e-3\nname = \"x\"";
        let f = text_fields(t);
        let s: Vec<&[u8]> = f
            .iter()
            .map(|f| match *f {
                Field::Text { start, end } => &t[start..end],
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(s, vec![&b"8"[..], &b"-1e-3"[..]]);
    }

    #[test]
    fn mutation_is_deterministic_and_changes_inputs() {
        let t = target("train_config").unwrap();
        let seeds = vec![b"[train]\nbatch_size = 8\nlr = 1e-3\n".to_vec()];
        let a: Vec<Vec<u8>> = (0..300).map(|i| smoke_input(t, &seeds, i)).collect();
        let b: Vec<Vec<u8>> = (0..300).map(|i| smoke_input(t, &seeds, i)).collect();
        assert_eq!(a, b);
        assert!(a.iter().filter(|m| **m != seeds[0]).count() > 250);
        // Interesting integers reach the number fields.
        assert!(a
            .iter()
            .any(|m| String::from_utf8_lossy(m).contains("1099511627776")));
    }

    #[test]
    fn binary_fields_get_interesting_integers() {
        let seed = tiny_gguf(0, GgmlDType::Q8_0);
        let fields = gguf_fields(&seed);
        assert!(fields.len() > 50, "{}", fields.len());
        let mut rng = Rng::new(1);
        let hits = (0..200)
            .filter(|_| {
                let m = mutate(&seed, &fields, &mut rng);
                fields.iter().any(|f| match *f {
                    Field::Binary { at, width: 8 } if at + 8 <= m.len() => {
                        m[at..at + 8] == (1u64 << 40).to_le_bytes()
                    }
                    _ => false,
                })
            })
            .count();
        assert!(hits > 0);
    }
}
