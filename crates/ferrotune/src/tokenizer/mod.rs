//! Tokenizers from Hugging Face folders (`tokenizer.json` + configs) or from GGUF metadata, plus
//! chat templates and a streaming detokenizer.
//!
//! [`Tokenizer`] wraps a `tokenizers::Tokenizer` and adds what the model files say around it:
//! which BOS to add, which ids end generation, the chat template.
use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::WithPath;
use crate::{Error, Result};

mod chat;
mod encoder_input;
pub(crate) mod gguf;
pub mod spiece;
mod stream;

pub use chat::{ChatMessage, ChatTemplate};
pub use encoder_input::{EncodedInput, InputEncoder, MIN_INPUT_LEN};
pub use stream::TokenStream;

/// Texts of special tokens that end a turn, after llama.cpp's end-of-generation list
/// (`llama-vocab.cpp`): a chat model stops on these even when the file's eos id is another token.
const EOG_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    /// The unknown token, where the source names one (written back as `unk_token`, so a
    /// folder exported to GGUF keeps `tokenizer.ggml.unknown_token_id`).
    unk: Option<(u32, String)>,
    add_bos: bool,
    /// Append EOS to encoded text (T5's tokenizer does; decoders' prompts never get one).
    add_eos: bool,
    chat_template: Option<ChatTemplate>,
    /// The file it came from, for messages (an encoding can fail on the input's text).
    origin: String,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Load an HF tokenizer folder: `tokenizer.json` (or, where that is all the folder has,
    /// T5's `spiece.model`: see [`spiece`]) and, when present, `tokenizer_config.json`,
    /// `special_tokens_map.json`, `chat_template.jinja`, `generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let spm = dir.join("spiece.model");
        let config_path = dir.join("tokenizer_config.json");
        let (inner, spm_specials, config) = if tj.is_file() {
            let inner = parse_tokenizer_json(&tj)?;
            (inner, None, read_json(&config_path)?)
        } else if tj.is_dir() {
            return Err(Error::file(&tj, "is a folder, not a tokenizer file"));
        } else if spm.is_file() {
            let config = read_json(&config_path)?;
            let extra_ids = t5_extra_ids(config.as_ref(), &config_path)?;
            let (inner, specials) = spiece::t5_tokenizer(&spm, extra_ids)?;
            (inner, Some(specials), config)
        } else {
            return Err(Error::file(
                dir,
                "no tokenizer.json in this folder (an HF tokenizer folder needs one; T5 folders may have spiece.model instead)",
            ));
        };
        let special_map = read_json(&dir.join("special_tokens_map.json"))?;
        let gen_config = read_json(&dir.join("generation_config.json"))?;

        // tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        let token_text = |name: &str| -> Result<Option<String>> {
            for (file, json) in [
                ("tokenizer_config.json", &config),
                ("special_tokens_map.json", &special_map),
            ] {
                if let Some(v) = json.as_ref().and_then(|j| j.get(name)) {
                    return token_field(v).map_err(|what| {
                        Error::key(dir.join(file).display().to_string(), name, what)
                    });
                }
            }
            // A SentencePiece model names its own (transformers falls back to them too).
            Ok(spm_specials.as_ref().and_then(|s| match name {
                "bos_token" => s.bos.clone(),
                "eos_token" => s.eos.clone(),
                "pad_token" => s.pad.clone(),
                _ => None,
            }))
        };
        let resolve = |name: &str| -> Result<Option<(u32, String)>> {
            let Some(text) = token_text(name)? else {
                return Ok(None);
            };
            let id = inner.token_to_id(&text).ok_or_else(|| {
                Error::key(
                    dir.display().to_string(),
                    name,
                    format!("`{text}` is not in the vocabulary"),
                )
            })?;
            Ok(Some((id, text)))
        };
        let bos = resolve("bos_token")?;
        let eos = resolve("eos_token")?;
        let pad_id = resolve("pad_token")?.map(|(id, _)| id);
        // Only recorded: a tokenizer works without it, so a name outside the vocabulary is
        // not an error (transformers would add it as a new token).
        let unk =
            token_text("unk_token")?.and_then(|text| inner.token_to_id(&text).map(|id| (id, text)));

        let gen_path = dir.join("generation_config.json");
        let mut eos_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        if let Some(v) = gen_config.as_ref().and_then(|g| g.get("eos_token_id")) {
            eos_ids.extend(id_list(v).map_err(|what| {
                Error::key(gen_path.display().to_string(), "eos_token_id", what)
            })?);
        }

        let add_bos = match config.as_ref().and_then(|c| c.get("add_bos_token")) {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Null) | None => {
                post_processor_adds(&inner, bos.as_ref().map(|b| b.0))
            }
            Some(other) => {
                return Err(Error::key(
                    dir.join("tokenizer_config.json").display().to_string(),
                    "add_bos_token",
                    format!("expected true or false, found {other}"),
                ))
            }
        };

        // transformers v5 saves the template as chat_template.jinja; older folders keep it in
        // tokenizer_config.json (a string, or a list of named templates).
        let jinja = dir.join("chat_template.jinja");
        let template_src = if jinja.is_file() {
            Some(crate::fsutil::read_to_string(&jinja).with_path(&jinja)?)
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(template_field(v).map_err(|what| {
                    Error::key(
                        dir.join("tokenizer_config.json").display().to_string(),
                        "chat_template",
                        what,
                    )
                })?),
            }
        };
        let template_origin = if jinja.is_file() {
            jinja.display().to_string()
        } else {
            format!("{}: chat_template", config_path.display())
        };
        // An empty template is no template, as in transformers (where "" is falsy and
        // apply_chat_template says none is set): it rendered every conversation as nothing.
        let chat_template = template_src
            .filter(|src| !src.trim().is_empty())
            .map(|src| load_template(src, &bos, &eos, &template_origin));
        let mut tok = Self::assemble(inner, bos, eos, eos_ids, pad_id, add_bos, chat_template);
        tok.unk = unk;
        tok.origin = if tj.is_file() { tj } else { spm }.display().to_string();
        Ok(tok)
    }

    /// Build the tokenizer a GGUF file describes (`path` is only used in error messages).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let g = gguf::build(content, path)?;
        let text = |id: Option<u32>| id.and_then(|id| g.inner.id_to_token(id).map(|t| (id, t)));
        let bos = text(g.bos_id);
        let eos = text(g.eos_id);
        let unk = text(g.unk_id);
        let mut eos_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        eos_ids.extend(&g.extra_eog_ids);
        let chat_template = g
            .chat_template
            .filter(|src| !src.trim().is_empty())
            .map(|src| {
                let origin = format!("{}: tokenizer.chat_template", path.display());
                load_template(src, &bos, &eos, &origin)
            });
        let mut tok = Self::assemble(
            g.inner,
            bos,
            eos,
            eos_ids,
            g.pad_id,
            g.add_bos,
            chat_template,
        );
        tok.unk = unk;
        tok.origin = path.display().to_string();
        Ok(tok)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
        mut eos_ids: Vec<u32>,
        pad_id: Option<u32>,
        add_bos: bool,
        chat_template: Option<ChatTemplate>,
    ) -> Self {
        let mut named: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && EOG_TOKENS.contains(&t.content.as_str()))
            .map(|(id, _)| id)
            .collect();
        named.sort_unstable();
        eos_ids.extend(named);
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));
        Tokenizer {
            inner,
            bos,
            eos,
            eos_ids,
            pad_id,
            unk: None,
            add_bos,
            add_eos: false,
            chat_template,
            origin: String::new(),
        }
    }

    /// Append the EOS token to text encoded with special tokens (T5's tokenizers end every
    /// input with `</s>`). Off by default: a decoder's prompt must not end its own turn.
    pub fn set_add_eos(&mut self, on: bool) {
        self.add_eos = on;
    }

    /// Whether `encode(_, true)` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }

    /// Token ids of `text`. Special-token text in `text` (e.g. `<|im_start|>`) becomes its single
    /// id. With `add_special_tokens`, BOS is prepended if (and only if) the model asks for it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // The model's post-processor is not used: which BOS to add is decided here, the same way
        // for GGUF and HF folders (and EOS is never appended to a prompt).
        // Under catch_panic: a malformed tokenizer.json can make the tokenizers crate panic
        // while encoding or decoding (e.g. a Strip decoder on an empty token).
        let enc = crate::error::catch_panic(|| self.inner.encode_fast(text, false))
            .map_err(|p| self.failed("encoding", p))?
            .map_err(|e| self.failed("encoding", e))?;
        let ids = enc.get_ids();
        let mut out = match (&self.bos, add_special_tokens && self.add_bos) {
            (Some((bos, _)), true) => std::iter::once(*bos).chain(ids.iter().copied()).collect(),
            _ => ids.to_vec(),
        };
        if let (Some((eos, _)), true) = (&self.eos, add_special_tokens && self.add_eos) {
            out.push(*eos);
        }
        Ok(out)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        crate::error::catch_panic(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(|p| self.failed("decoding", p))?
            .map_err(|e| self.failed("decoding", e))
    }

    /// An encoding or decoding error, naming the tokenizer's file.
    fn failed(&self, what: &str, e: impl fmt::Display) -> Error {
        failed(&self.origin, what, e)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.0)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|b| b.1.as_str())
    }

    /// Whether `encode(_, true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Every id that ends generation: the eos token, `generation_config.json`'s `eos_token_id`s,
    /// GGUF eot/eom ids, and special tokens such as `<|im_end|>` / `<|eot_id|>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Add ids that end generation (a model's config.json `eos_token_id`s), once each.
    pub fn add_eos_ids(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|e| e.1.as_str())
    }

    /// The unknown token's text, where the source names one.
    pub fn unk_token(&self) -> Option<&str> {
        self.unk.as_ref().map(|(_, t)| t.as_str())
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Incremental detokenizer for streaming generated text.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream::new(self)
    }
}

/// Compile a model's chat template. One minijinja cannot parse is kept (its error comes back from
/// `render`) so the model still loads for plain prompts; the problem is logged now.
fn load_template(
    src: String,
    bos: &Option<(u32, String)>,
    eos: &Option<(u32, String)>,
    origin: &str,
) -> ChatTemplate {
    // A template that does not compile breaks chat formatting only: the error (naming
    // `origin`) comes when a command renders it, not as a warning at every load.
    ChatTemplate::compile(
        src,
        bos.as_ref().map(|b| b.1.as_str()),
        eos.as_ref().map(|e| e.1.as_str()),
    )
    .with_origin(origin)
}

/// An encoding or decoding error of the tokenizer read from `origin` (a file; empty: unknown).
fn failed(origin: &str, what: &str, e: impl fmt::Display) -> Error {
    let e = crate::error::first_line(&e.to_string());
    if origin.is_empty() {
        Error::msg(format!("tokenizer: {what} failed: {e}"))
    } else {
        Error::msg(format!("tokenizer {origin}: {what} failed: {e}"))
    }
}

/// Whether the folder's own post-processor (e.g. Llama's `TemplateProcessing "<s> $A"`) adds BOS.
fn post_processor_adds(inner: &tokenizers::Tokenizer, bos: Option<u32>) -> bool {
    let (Some(bos), Some(_)) = (bos, inner.get_post_processor()) else {
        return false;
    };
    let first = |special| {
        crate::error::catch_panic(|| inner.encode_fast("a", special))
            .ok()?
            .ok()
            .and_then(|e| e.get_ids().first().copied())
    };
    first(true) == Some(bos) && first(false) != Some(bos)
}

/// `tokenizer.json` through the tokenizers crate, which panics on some malformed files: on a
/// JSON syntax error inside `decoder` (`expect("Helper")`) and on a bad `Precompiled`
/// normalizer. So the syntax is checked first (an error with line and column), and the rest
/// runs under [`catch_panic`](crate::error::catch_panic).
fn parse_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = crate::fsutil::read_to_string(path).with_path(path)?;
    // The steps that may hold a `Replace`, as values; the vocabulary and merges are only
    // skipped over (checking the syntax of the whole file) rather than built as values.
    #[derive(serde::Deserialize)]
    struct Steps {
        #[serde(default)]
        normalizer: serde_json::Value,
        #[serde(default)]
        pre_tokenizer: serde_json::Value,
        #[serde(default)]
        decoder: serde_json::Value,
    }
    let steps: Steps =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let json = serde_json::json!({
        "normalizer": steps.normalizer,
        "pre_tokenizer": steps.pre_tokenizer,
        "decoder": steps.decoder,
    });
    if let Some(at) = empty_replace_pattern(&json, String::new()) {
        // the library takes it and then panics on the first text ("index out of bounds")
        return Err(Error::file(
            path,
            format!("{at}: a Replace with an empty pattern (it would match between every two characters)"),
        ));
    }
    let inner = match crate::error::catch_panic(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(parsed) => parsed.with_path(path)?,
        Err(panic) => {
            return Err(Error::file(
                path,
                format!("malformed tokenizer (the tokenizers library failed: {panic})"),
            ))
        }
    };
    // The library does not check a post-processor as it reads it (a `TemplateProcessing`
    // naming a special token it does not define, or a second sequence in the single-text
    // template, panics on the first encoding): one encoding now, so the file is named.
    for special in [false, true] {
        if let Err(panic) = crate::error::catch_panic(|| inner.encode_fast("a", special)) {
            return Err(Error::file(
                path,
                format!("post_processor: encoding with it fails (the tokenizers library failed: {panic})"),
            ));
        }
    }
    Ok(inner)
}

/// Where in a tokenizer.json a `Replace` step (normalizer, pre-tokenizer or decoder, at any
/// depth of `Sequence`s) has an empty pattern, as a JSON path (`normalizer.normalizers[1]`).
fn empty_replace_pattern(v: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let empty = |p: &Value| {
                ["String", "Regex"]
                    .iter()
                    .any(|k| p.get(k).and_then(Value::as_str) == Some(""))
            };
            if m.get("type").and_then(Value::as_str) == Some("Replace")
                && m.get("pattern").is_some_and(empty)
            {
                return Some(if at.is_empty() { "Replace".into() } else { at });
            }
            m.iter().find_map(|(k, x)| {
                let next = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                empty_replace_pattern(x, next)
            })
        }
        Value::Array(xs) => xs
            .iter()
            .enumerate()
            .find_map(|(i, x)| empty_replace_pattern(x, format!("{at}[{i}]"))),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = crate::fsutil::read_to_string(path).with_path(path)?;
    serde_json::from_str(&text).map(Some).with_path(path)
}

/// T5's number of sentinel tokens: tokenizer_config.json's `extra_ids`, else the number of
/// `<extra_id_N>` in its `additional_special_tokens`, else 100 (`T5Tokenizer`'s default).
fn t5_extra_ids(config: Option<&serde_json::Value>, file: &Path) -> Result<usize> {
    let Some(c) = config else { return Ok(100) };
    match c.get("extra_ids") {
        None | Some(serde_json::Value::Null) => {}
        Some(v) => {
            return v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    Error::key(
                        file.display().to_string(),
                        "extra_ids",
                        format!("expected a non-negative integer, found {v}"),
                    )
                })
        }
    }
    let listed = ["additional_special_tokens", "extra_special_tokens"]
        .iter()
        .filter_map(|k| c.get(*k).and_then(|v| v.as_array()))
        .flatten()
        .filter_map(|t| token_field(t).ok().flatten())
        .filter(|t| t.starts_with("<extra_id_"))
        .count();
    Ok(if listed > 0 { listed } else { 100 })
}

/// A special-token entry: `"<s>"`, `{"content": "<s>", ...}` (an AddedToken dump) or `null`.
fn token_field(v: &serde_json::Value) -> std::result::Result<Option<String>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Object(m) => match m.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err("object without a string `content`".into()),
        },
        other => Err(format!(
            "expected a string or {{\"content\": ...}}, found {other}"
        )),
    }
}

/// `eos_token_id`: an int or a list of ints.
fn id_list(v: &serde_json::Value) -> std::result::Result<Vec<u32>, String> {
    let one = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("expected a token id, found {x}"))
    };
    match v {
        serde_json::Value::Null => Ok(vec![]),
        serde_json::Value::Array(xs) => xs.iter().map(one).collect(),
        x => Ok(vec![one(x)?]),
    }
}

/// `chat_template`: a string, or a list of `{name, template}` (the one named `default`, else the first).
fn template_field(v: &serde_json::Value) -> std::result::Result<String, String> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(items) => {
            let named = |want: Option<&str>| {
                items.iter().find_map(|it| {
                    let name = it.get("name").and_then(|n| n.as_str());
                    let tmpl = it.get("template").and_then(|t| t.as_str())?;
                    (want.is_none() || name == want).then(|| tmpl.to_string())
                })
            };
            named(Some("default"))
                .or_else(|| named(None))
                .ok_or_else(|| "a list without any {\"name\", \"template\"} entry".to_string())
        }
        other => Err(format!(
            "expected a string or a list of named templates, found {other}"
        )),
    }
}

#[cfg(test)]
mod tests;

/// Malformed tokenizer.json files that make the tokenizers crate panic: each must be a one-line
/// error naming the file (found by the `hf_tokenizer` fuzz target).
#[cfg(test)]
mod robustness_tests {
    use super::*;

    fn load(tag: &str, tokenizer_json: &str) -> String {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-tok-robust-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json).unwrap();
        let e =
            Tokenizer::from_hf_dir(&dir).expect_err("a malformed tokenizer.json must be refused");
        let _ = std::fs::remove_dir_all(&dir);
        let e = e.to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("tokenizer.json"), "{e}");
        e
    }

    const MODEL: &str =
        r#""model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}"#;

    #[test]
    fn syntax_error_inside_decoder() {
        // tokenizers 0.23 `expect("Helper")`s on this instead of returning its error.
        let json = format!(r#"{{"decoder": {{"type": "ByteLevel" "x": 1}}, {MODEL}}}"#);
        let e = load("decoder", &json);
        assert!(e.contains("invalid JSON") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn replace_with_an_empty_pattern_is_named_by_its_place() {
        // tokenizers 0.23 reads it and panics on the first text: "index out of bounds".
        let json = format!(
            r#"{{"normalizer": {{"type": "Sequence", "normalizers": [{{"type": "NFC"}},
                {{"type": "Replace", "pattern": {{"String": ""}}, "content": "x"}}]}}, {MODEL}}}"#
        );
        let e = load("replace-empty", &json);
        assert!(
            e.contains("normalizer.normalizers[1]") && e.contains("empty pattern"),
            "{e}"
        );
        // a pattern that is not empty loads
        let json = format!(
            r#"{{"normalizer": {{"type": "Replace", "pattern": {{"String": " "}}, "content": "x"}}, {MODEL}}}"#
        );
        let dir = std::env::temp_dir().join(format!(
            "ferrotune-tok-robust-replace-ok-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
        let ok = Tokenizer::from_hf_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        ok.unwrap();
    }

    #[test]
    fn bad_precompiled_normalizer() {
        // Valid JSON, but tokenizers `expect("Precompiled")`s on a charsmap it cannot read.
        let json = format!(
            r#"{{"normalizer": {{"type": "Precompiled", "precompiled_charsmap": "not base64!"}}, {MODEL}}}"#
        );
        let e = load("precompiled", &json);
        assert!(e.contains("malformed tokenizer"), "{e}");
    }

    #[test]
    fn strip_decoder_on_an_empty_token() {
        // tokenizers 0.23 indexes chars[len - 1] of an empty token in its Strip decoder.
        let dir =
            std::env::temp_dir().join(format!("ferrotune-tok-robust-strip-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let json = r#"{"decoder": {"type": "Strip", "content": " ", "start": 0, "stop": 1},
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "": 1, "a": 2}, "unk_token": "<unk>"}}"#;
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
        let tok = Tokenizer::from_hf_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let e = tok.decode(&[2, 1], false).unwrap_err().to_string();
        assert!(
            e.starts_with("tokenizer ")
                && e.contains("tokenizer.json: decoding failed")
                && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn post_processor_naming_an_undefined_special_token() {
        // tokenizers 0.23 reads this, then indexes its special-token map on the first encoding.
        let json = format!(
            r#"{{"post_processor": {{"type": "TemplateProcessing", "single": [{{"SpecialToken": {{"id": "[NOPE]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}], "pair": [], "special_tokens": {{}}}}, {MODEL}}}"#
        );
        let e = load("postproc", &json);
        assert!(e.contains("post_processor"), "{e}");
        // a second sequence in the single-text template
        let json = format!(
            r#"{{"post_processor": {{"type": "TemplateProcessing", "single": [{{"Sequence": {{"id": "B", "type_id": 0}}}}], "pair": [], "special_tokens": {{}}}}, {MODEL}}}"#
        );
        let e = load("postproc-b", &json);
        assert!(e.contains("post_processor"), "{e}");
    }

    #[test]
    fn a_tokenizer_json_folder_is_named() {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-tok-robust-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tokenizer.json")).unwrap();
        let e = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.contains("tokenizer.json") && e.contains("is a folder"),
            "{e}"
        );
    }
}
