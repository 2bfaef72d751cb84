//! A loaded LLaMA-family model (adapters already merged) written as a GGUF v3 file that llama.cpp
//! and Ollama run, in one of llama.cpp's presets (`f32` ... `q8_0`, `q4_k_m`, `q5_k_m`, `q6_k`).
//!
//! What is reproduced from llama.cpp, so the file is the one its tools would make:
//! - tensor names and layout as `convert_hf_to_gguf.py` writes them (q/k rows permuted for its
//!   interleaved RoPE: the inverse of what [`crate::model::weights`] undoes on read; 1-D tensors
//!   kept f32; Llama 3 RoPE scaling as a `rope_freqs.weight` tensor);
//! - the per-tensor type mix of `llama_model_quantize` (`src/llama-quant.cpp`,
//!   `llama_tensor_get_type`) for the LLaMA architecture: the output / tied embedding tensor,
//!   `attn_v` and `ffn_down` in the `use_more_bits` layers of the `_M` presets, the fallbacks for
//!   rows that are not whole 256-value super-blocks, tensors visited in llama.cpp's order (by
//!   layer number, then name);
//! - the quantized bytes (GGML's reference quantizers, [`crate::quant::ggml_quants`]);
//! - metadata: `general.*` with llama.cpp's `general.file_type` for the preset, every `llama.*`
//!   hyper-parameter, and the tokenizer: carried over unchanged from a GGUF source, or built from
//!   an HF folder's `tokenizer.json` as `convert_hf_to_gguf.py` builds a byte-level BPE (`gpt2`)
//!   vocabulary (other tokenizers are refused).
//!
//! The file is streamed into a temporary sibling and renamed into place; an existing file is
//! replaced only when asked, and only if it is a GGUF this module wrote (`ferrotune.writer`).
use crate::fsutil;
use crate::model::config::{llama3_rope_freqs, LlamaConfig, RopeScaling};
use crate::model::llama::Llama;
use crate::model::weights::{gguf_tensor_name, unpermute_rows};
use crate::model::{LoadedModel, ModelSource};
use crate::quant::ggml_quants::{quantize_rows, GgmlType};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::DType;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The metadata key that marks a GGUF as written by ferrotune (so `--overwrite` may replace it).
pub const WRITER_KEY: &str = "ferrotune.writer";

/// A llama.cpp file type (`llama_ftype`): what `--to` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4KM,
    Q5KM,
    Q6K,
}

impl Preset {
    pub const ALL: [Preset; 11] = [
        Preset::F32,
        Preset::F16,
        Preset::BF16,
        Preset::Q8_0,
        Preset::Q4_0,
        Preset::Q4_1,
        Preset::Q5_0,
        Preset::Q5_1,
        Preset::Q4KM,
        Preset::Q5KM,
        Preset::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::F32 => "f32",
            Preset::F16 => "f16",
            Preset::BF16 => "bf16",
            Preset::Q8_0 => "q8_0",
            Preset::Q4_0 => "q4_0",
            Preset::Q4_1 => "q4_1",
            Preset::Q5_0 => "q5_0",
            Preset::Q5_1 => "q5_1",
            Preset::Q4KM => "q4_k_m",
            Preset::Q5KM => "q5_k_m",
            Preset::Q6K => "q6_k",
        }
    }

    /// `--to VALUE` (case-insensitive); the error lists the accepted values.
    pub fn parse(s: &str) -> std::result::Result<Preset, String> {
        let l = s.trim().to_ascii_lowercase();
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == l)
            .ok_or_else(|| {
                format!(
                    "`{s}` is not a GGUF type (expected one of {})",
                    Preset::ALL.map(Preset::name).join(", ")
                )
            })
    }

    /// `general.file_type` as llama.cpp writes it (`LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Preset::F32 => 0,
            Preset::F16 => 1,
            Preset::Q4_0 => 2,
            Preset::Q4_1 => 3,
            Preset::Q8_0 => 7,
            Preset::Q5_0 => 8,
            Preset::Q5_1 => 9,
            Preset::Q4KM => 15,
            Preset::Q5KM => 17,
            Preset::Q6K => 18,
            Preset::BF16 => 32,
        }
    }

    /// `llama_ftype_get_default_type`.
    pub fn default_type(self) -> GgmlType {
        match self {
            Preset::F32 => GgmlType::F32,
            Preset::F16 => GgmlType::F16,
            Preset::BF16 => GgmlType::BF16,
            Preset::Q8_0 => GgmlType::Q8_0,
            Preset::Q4_0 => GgmlType::Q4_0,
            Preset::Q4_1 => GgmlType::Q4_1,
            Preset::Q5_0 => GgmlType::Q5_0,
            Preset::Q5_1 => GgmlType::Q5_1,
            Preset::Q4KM => GgmlType::Q4K,
            Preset::Q5KM => GgmlType::Q5K,
            Preset::Q6K => GgmlType::Q6K,
        }
    }
}

/// What `write_gguf` is asked to do.
#[derive(Debug, Clone)]
pub struct GgufExportOptions {
    pub preset: Preset,
    /// `general.name`; default: the source's name (GGUF `general.name`, or the folder's name).
    pub name: Option<String>,
    /// Replace an existing file at the output path (only a GGUF ferrotune wrote).
    pub overwrite: bool,
}

/// One tensor as written.
#[derive(Debug, Clone)]
pub struct TensorReport {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// GGUF dimensions, innermost first.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    pub bytes: u64,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub path: PathBuf,
    pub preset: Preset,
    pub tensors: Vec<TensorReport>,
    /// Size of the whole file.
    pub file_bytes: u64,
    /// Elements over all tensors.
    pub n_elements: u64,
    /// `tokenizer.ggml.pre` written (or carried over).
    pub tokenizer_pre: Option<String>,
    /// Tensors whose rows are not whole blocks of the type the preset picks for them, and the
    /// type they got instead (llama.cpp's `tensor_type_fallback`).
    pub fallbacks: Vec<Fallback>,
}

/// One tensor that took llama.cpp's fallback type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub name: String,
    /// Values per row.
    pub row: usize,
    pub wanted: GgmlType,
    pub got: GgmlType,
}

impl ExportReport {
    /// Bits per weight over all tensors (llama.cpp's "BPW": tensor bytes * 8 / elements).
    pub fn bits_per_weight(&self) -> f64 {
        let bytes: u64 = self.tensors.iter().map(|t| t.bytes).sum();
        bytes as f64 * 8.0 / self.n_elements.max(1) as f64
    }

    /// Tensor class (the name without `blk.N.`) -> type -> count, in name order.
    pub fn types_by_class(&self) -> BTreeMap<String, BTreeMap<&'static str, usize>> {
        let mut m: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
        for t in &self.tensors {
            *m.entry(tensor_class(&t.name))
                .or_default()
                .entry(t.ggml_type.name())
                .or_default() += 1;
        }
        m
    }

    /// A few lines for the CLI: types per tensor class, size, bits per weight.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "wrote {} ({}, general.file_type {}): {} tensors, {:.1} MiB, {:.2} bits per weight\n",
            self.path.display(),
            self.preset.name(),
            self.preset.file_type(),
            self.tensors.len(),
            self.file_bytes as f64 / (1024.0 * 1024.0),
            self.bits_per_weight()
        );
        for (class, types) in self.types_by_class() {
            let t: Vec<String> = types.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            s.push_str(&format!("  {class:<22} {}\n", t.join(", ")));
        }
        if let Some(p) = &self.tokenizer_pre {
            s.push_str(&format!("  tokenizer.ggml.pre = {p}\n"));
        }
        if let Some(line) = self.fallback_summary() {
            s.push_str(&line);
            s.push('\n');
        }
        s.pop();
        s
    }

    /// One line for the fallbacks, grouped by (wanted, got, row length); None without any.
    pub fn fallback_summary(&self) -> Option<String> {
        if self.fallbacks.is_empty() {
            return None;
        }
        let mut groups: BTreeMap<(&str, &str, usize), usize> = BTreeMap::new();
        for f in &self.fallbacks {
            *groups
                .entry((f.wanted.name(), f.got.name(), f.row))
                .or_default() += 1;
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|((w, g, row), n)| {
                format!("{w} -> {g} x{n} (rows of {row} values are not whole {w} blocks)")
            })
            .collect();
        Some(format!(
            "  fallback (as llama.cpp's tensor_type_fallback): {}",
            parts.join("; ")
        ))
    }
}

/// `blk.7.attn_q.weight` -> `attn_q.weight`.
fn tensor_class(name: &str) -> String {
    match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
        Some((_, rest)) => rest.to_string(),
        None => name.to_string(),
    }
}

// ------------------------------------------------------------------ type mix (llama-quant.cpp)

/// The hyper-parameters llama.cpp's type choice looks at.
#[derive(Debug, Clone, Copy)]
pub struct MixParams {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
}

/// llama.cpp's tensor order when quantizing (`weight_name_comparer`): by the `blk.N.` layer
/// number (tensors outside the layers first), then by name.
pub fn llama_cpp_order(names: &mut [String]) {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, _)| i.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    names.sort_by(|a, b| layer(a).cmp(&layer(b)).then_with(|| a.cmp(b)));
}

/// The type each tensor gets under `preset`: `tensors` are (GGUF name, GGUF dims, innermost
/// first) in llama.cpp's order ([`llama_cpp_order`]) — the `use_more_bits` choices count
/// tensors in that order. Mirrors `llama_tensor_get_type` for the LLaMA architecture without an
/// importance matrix, overrides or `--pure`; an error names a tensor no type fits.
pub fn tensor_types(
    tensors: &[(String, Vec<usize>)],
    preset: Preset,
    p: MixParams,
) -> Result<Vec<GgmlType>> {
    Ok(tensor_types_and_fallbacks(tensors, preset, p)?.0)
}

/// [`tensor_types`], and the tensors that took a fallback type.
pub fn tensor_types_and_fallbacks(
    tensors: &[(String, Vec<usize>)],
    preset: Preset,
    p: MixParams,
) -> Result<(Vec<GgmlType>, Vec<Fallback>)> {
    let mut fallbacks = Vec::new();
    let default = preset.default_type();
    let use_more_bits = |i: i64, n: i64| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
    let tied = !tensors.iter().any(|(n, _)| n == "output.weight");
    let n_attention_wv = tensors
        .iter()
        .filter(|(n, _)| n.contains("attn_v.weight"))
        .count() as i64;
    let n_layer = p.n_layer as i64;
    // LLM_TYPE_70B: 80 layers with grouped KV heads.
    let is_70b = p.n_layer == 80 && p.n_head != p.n_head_kv;
    let (mut i_attention_wv, mut i_ffn_down) = (0i64, 0i64);
    let mut out = Vec::with_capacity(tensors.len());
    for (name, dims) in tensors {
        let quantizable =
            dims.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight");
        if !quantizable {
            // 1-D tensors (norms, rope_freqs) stay as convert_hf_to_gguf.py wrote them: f32.
            out.push(GgmlType::F32);
            continue;
        }
        if !default.is_quantized() {
            out.push(default);
            continue;
        }
        let nx = dims[0];
        let mut t = default;
        if name == "output.weight" || (tied && name == "token_embd.weight") {
            if !nx.is_multiple_of(t.block_size()) {
                t = GgmlType::Q8_0;
            } else if t != GgmlType::Q8_0 {
                t = GgmlType::Q6K;
            }
        } else if name == "token_embd.weight" {
            // Untied embeddings keep the default type in these presets.
        } else if name.contains("attn_v.weight") {
            if matches!(preset, Preset::Q4KM | Preset::Q5KM)
                && use_more_bits(i_attention_wv, n_attention_wv)
            {
                t = GgmlType::Q6K;
            }
            if is_70b && t == GgmlType::Q4K {
                t = GgmlType::Q5K;
            }
            i_attention_wv += 1;
        } else if name.contains("ffn_down") {
            if matches!(preset, Preset::Q4KM | Preset::Q5KM) && use_more_bits(i_ffn_down, n_layer) {
                t = GgmlType::Q6K;
            }
            i_ffn_down += 1;
        }
        // tensor_type_fallback: rows that are not whole blocks of the chosen type.
        if !nx.is_multiple_of(t.block_size()) {
            let wanted = t;
            t = match t {
                GgmlType::Q4K => GgmlType::Q5_0,
                GgmlType::Q5K => GgmlType::Q5_1,
                GgmlType::Q6K => GgmlType::Q8_0,
                other => {
                    return Err(Error::msg(format!(
                        "tensor `{name}`: rows of {nx} values are not whole {}-value blocks of {} (llama.cpp has no fallback type for it either)",
                        other.block_size(),
                        other.name()
                    )))
                }
            };
            if !nx.is_multiple_of(t.block_size()) {
                t = GgmlType::F16;
            }
            fallbacks.push(Fallback {
                name: name.clone(),
                row: nx,
                wanted,
                got: t,
            });
        }
        out.push(t);
    }
    Ok((out, fallbacks))
}

// ------------------------------------------------------------------ GGUF serialisation

const GGUF_ALIGNMENT: usize = 32;

/// A GGUF string: u64 length, then the bytes.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's type id of a metadata value.
pub fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A metadata value's bytes (arrays: element type, count, items), as GGUF v3 stores them.
pub fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(b) => out.push(*b as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array still needs an element type; u32 is what llama.cpp writes for none.
            let t = items.first().map(value_type).unwrap_or(4);
            out.extend(t.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

/// The header (metadata and tensor index, padded to the alignment) of a GGUF v3 file whose
/// tensors are laid out one after another, each padded to the alignment.
fn header_bytes(
    metadata: &[(String, Value)],
    tensors: &[(String, Vec<usize>, GgmlType)],
) -> Vec<u8> {
    let mut h = b"GGUF".to_vec();
    h.extend(3u32.to_le_bytes());
    h.extend((tensors.len() as u64).to_le_bytes());
    h.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut h, k);
        h.extend(value_type(v).to_le_bytes());
        put_value(&mut h, v);
    }
    let mut offset = 0usize;
    for (name, dims, t) in tensors {
        put_str(&mut h, name);
        h.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            h.extend((*d as u64).to_le_bytes());
        }
        h.extend(t.id().to_le_bytes());
        h.extend((offset as u64).to_le_bytes());
        let n: usize = dims.iter().product();
        offset += (n / dims[0] * t.row_bytes(dims[0])).next_multiple_of(GGUF_ALIGNMENT);
    }
    h.resize(h.len().next_multiple_of(GGUF_ALIGNMENT), 0);
    h
}

// ------------------------------------------------------------------ metadata

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn u32v(v: usize) -> Result<Value> {
    u32::try_from(v)
        .map(Value::U32)
        .map_err(|_| Error::msg(format!("{v} does not fit a GGUF u32")))
}

/// `general.*` and `llama.*` keys for `cfg` (as `convert_hf_to_gguf.py`'s `LlamaModel` writes).
fn model_metadata(cfg: &LlamaConfig, name: &str, preset: Preset) -> Result<Vec<(String, Value)>> {
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.type".into(), s("model")),
        ("general.name".into(), s(name)),
        ("llama.vocab_size".into(), u32v(cfg.vocab_size)?),
        (
            "llama.context_length".into(),
            u32v(cfg.max_position_embeddings)?,
        ),
        ("llama.embedding_length".into(), u32v(cfg.hidden_size)?),
        (
            "llama.feed_forward_length".into(),
            u32v(cfg.intermediate_size)?,
        ),
        ("llama.block_count".into(), u32v(cfg.num_hidden_layers)?),
        (
            "llama.attention.head_count".into(),
            u32v(cfg.num_attention_heads)?,
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(cfg.num_key_value_heads)?,
        ),
        ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.dimension_count".into(), u32v(cfg.head_dim)?),
    ];
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        m.push(("llama.attention.key_length".into(), u32v(cfg.head_dim)?));
        m.push(("llama.attention.value_length".into(), u32v(cfg.head_dim)?));
    }
    if let Some(RopeScaling::Linear { factor }) = &cfg.rope_scaling {
        m.push(("llama.rope.scaling.type".into(), s("linear")));
        m.push(("llama.rope.scaling.factor".into(), Value::F32(*factor)));
    }
    m.push(("general.file_type".into(), Value::U32(preset.file_type())));
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m.push((
        WRITER_KEY.into(),
        s(concat!("ferrotune ", env!("CARGO_PKG_VERSION"))),
    ));
    Ok(m)
}

/// Metadata keys to write, and the `tokenizer.ggml.pre` among them.
pub type TokenizerKeys = (Vec<(String, Value)>, Option<String>);

/// The tokenizer keys of a GGUF source, unchanged, and its `tokenizer.ggml.pre`.
pub fn tokenizer_from_gguf(path: &Path) -> Result<TokenizerKeys> {
    let ct = crate::model::gguf::read_header(path)?;
    let mut keys: Vec<(String, Value)> = ct
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    // Tokens before their ids, as converters write them (the hash map lost the order).
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let pre = keys.iter().find_map(|(k, v)| match (k.as_str(), v) {
        ("tokenizer.ggml.pre", Value::String(p)) => Some(p.clone()),
        _ => None,
    });
    if !keys.iter().any(|(k, _)| k == "tokenizer.ggml.model") {
        return Err(Error::file(
            path,
            "no `tokenizer.ggml.model` key: the GGUF has no tokenizer to carry over",
        ));
    }
    Ok((keys, pre))
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = crate::fsutil::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// `convert_hf_to_gguf.py`'s `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<start_of_") && t.ends_with('>'))
        || (t.starts_with("<end_of_") && t.ends_with('>'))
}

/// Which llama.cpp pre-tokenizer an HF `tokenizer.json`'s `pre_tokenizer` is. llama.cpp's
/// converter recognises tokenizers by hashing their output on a test text; the pre-tokenizer's
/// structure tells the same for the common byte-level ones, and anything else is refused rather
/// than guessed.
fn detect_pre(pre: &serde_json::Value) -> Option<&'static str> {
    let ty = |v: &serde_json::Value| v.get("type").and_then(|t| t.as_str()).map(str::to_string);
    let byte_level_regex = |v: &serde_json::Value, want: bool| {
        ty(v).as_deref() == Some("ByteLevel")
            && v.get("use_regex").and_then(|b| b.as_bool()).unwrap_or(true) == want
            && !v
                .get("add_prefix_space")
                .and_then(|b| b.as_bool())
                .unwrap_or(false)
    };
    if byte_level_regex(pre, true) {
        return Some("gpt-2");
    }
    if ty(pre).as_deref() != Some("Sequence") {
        return None;
    }
    let parts = pre.get("pretokenizers")?.as_array()?;
    match parts.as_slice() {
        // StarCoder's and SmolLM's: single digits, then GPT-2's byte-level split.
        [d, b]
            if ty(d).as_deref() == Some("Digits")
                && d.get("individual_digits").and_then(|v| v.as_bool()) == Some(true)
                && byte_level_regex(b, true) =>
        {
            Some("smollm")
        }
        [sp, b] if ty(sp).as_deref() == Some("Split") && byte_level_regex(b, false) => {
            let re = sp.get("pattern")?.get("Regex")?.as_str()?;
            if re.starts_with(
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}",
            ) {
                Some("llama-bpe")
            } else if re
                .starts_with("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|")
            {
                Some("qwen2")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The pre-tokenizer ferrotune writes for a GGUF tokenizer (`tokenizer/gguf.rs`): llama.cpp's
/// regexes as isolated splits, then a byte-level step without a regex. Named by the first
/// llama.cpp name (in order of how common it is) with the same splits, `ignore_merges` and NFC,
/// so an HF folder written from a GGUF exports back to a GGUF that tokenizes alike.
fn detect_llama_cpp_splits(tj: &serde_json::Value) -> Option<&'static str> {
    let pre = tj.get("pre_tokenizer")?;
    if pre.get("type")?.as_str()? != "Sequence" {
        return None;
    }
    let parts = pre.get("pretokenizers")?.as_array()?;
    let (last, splits) = parts.split_last()?;
    let byte_level_plain = last.get("type")?.as_str()? == "ByteLevel"
        && !last.get("use_regex")?.as_bool()?
        && !last
            .get("add_prefix_space")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
    if !byte_level_plain {
        return None;
    }
    let regexes: Vec<&str> = splits
        .iter()
        .map(|sp| {
            let isolated = sp.get("type")?.as_str()? == "Split"
                && sp.get("behavior")?.as_str()? == "Isolated"
                && !sp.get("invert").and_then(|b| b.as_bool()).unwrap_or(false);
            isolated
                .then(|| sp.get("pattern")?.get("Regex")?.as_str())
                .flatten()
        })
        .collect::<Option<_>>()?;
    let ignore_merges = tj
        .get("model")
        .and_then(|m| m.get("ignore_merges"))
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let nfc = tj
        .get("normalizer")
        .and_then(|n| n.get("type"))
        .and_then(|t| t.as_str())
        == Some("NFC");
    const PREFERRED: &[&str] = &[
        "gpt-2",
        "llama-bpe",
        "smollm",
        "qwen2",
        "stablelm2",
        "dbrx",
        "tekken",
        "gpt-4o",
        "default",
        "falcon",
        "deepseek-llm",
        "deepseek-coder",
    ];
    PREFERRED.iter().copied().find(|name| {
        crate::tokenizer::gguf::pre_spec(name).is_some_and(|spec| {
            spec.splits == regexes.as_slice()
                && spec.ignore_merges == ignore_merges
                && spec.nfc == nfc
        })
    })
}

/// The tokenizer keys `convert_hf_to_gguf.py` writes for an HF folder with a byte-level BPE
/// `tokenizer.json` (`_set_vocab_gpt2` + `SpecialVocab`), padded to `vocab_size` with
/// `[PADn]` tokens; `add_bos` is what the loaded tokenizer does (written explicitly, so
/// llama.cpp's default for the pre-tokenizer does not decide it).
fn tokenizer_from_hf(dir: &Path, vocab_size: usize, add_bos: bool) -> Result<TokenizerKeys> {
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?.ok_or_else(|| {
        Error::file(
            dir,
            "no tokenizer.json: a GGUF export from an HF folder needs a byte-level BPE tokenizer.json (SentencePiece-only folders: convert them with llama.cpp's convert_hf_to_gguf.py)",
        )
    })?;
    let model = tj
        .get("model")
        .ok_or_else(|| Error::key(tj_path.display().to_string(), "model", "missing"))?;
    let mtype = model.get("type").and_then(|t| t.as_str()).unwrap_or("?");
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    if mtype != "BPE" || byte_fallback {
        return Err(Error::key(
            tj_path.display().to_string(),
            "model.type",
            format!(
                "a {mtype}{} tokenizer: only byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`) is exported from an HF folder; pass a GGUF of the model as --model, or convert with llama.cpp's convert_hf_to_gguf.py",
                if byte_fallback { " (byte_fallback, SentencePiece-style)" } else { "" }
            ),
        ));
    }
    let pre_v = tj.get("pre_tokenizer").cloned().unwrap_or_default();
    let pre = detect_pre(&pre_v)
        .or_else(|| detect_llama_cpp_splits(&tj))
        .ok_or_else(|| {
        Error::key(
            tj_path.display().to_string(),
            "pre_tokenizer",
            "not a pre-tokenizer whose llama.cpp name we know (GPT-2 byte-level, StarCoder/SmolLM digits + byte-level, Llama 3, Qwen2); pass a GGUF of the model as --model",
        )
    })?;
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| {
            Error::key(
                tj_path.display().to_string(),
                "model.vocab",
                "missing or not an object",
            )
        })?;
    let mut reverse: HashMap<usize, String> = HashMap::with_capacity(vocab.len());
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| {
            Error::key(
                tj_path.display().to_string(),
                format!("model.vocab.{tok}"),
                "not a token id",
            )
        })? as usize;
        reverse.insert(id, tok.clone());
    }
    // Added tokens: (id -> (content, special)).
    let mut added: HashMap<usize, (String, bool)> = HashMap::new();
    let mut added_by_content: Vec<(String, usize)> = Vec::new();
    for a in tj
        .get("added_tokens")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(|v| v.as_u64()),
            a.get("content").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
        reverse.insert(id as usize, content.to_string());
        added.insert(id as usize, (content.to_string(), special));
        added_by_content.push((content.to_string(), id as usize));
    }
    let n = vocab_size.max(reverse.keys().map(|i| i + 1).max().unwrap_or(0));
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for i in 0..n {
        match reverse.get(&i) {
            None => {
                tokens.push(Value::String(format!("[PAD{i}]")));
                types.push(Value::I32(5)); // UNUSED
            }
            Some(tok) => {
                let t = match added.get(&i) {
                    Some((c, special)) if *special || looks_special(c) => 3, // CONTROL
                    Some(_) => 4,                                            // USER_DEFINED
                    None => 1,                                               // NORMAL
                };
                tokens.push(Value::String(tok.clone()));
                types.push(Value::I32(t));
            }
        }
    }
    let merges: Vec<Value> = match model.get("merges").and_then(|m| m.as_array()) {
        Some(list) => list
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(Value::String(s.clone())),
                serde_json::Value::Array(pair) if pair.len() == 2 => {
                    // Spaces inside a part are encoded as U+0120, as SpecialVocab does.
                    let part = |p: &serde_json::Value| {
                        p.as_str()
                            .map(|s| s.replace(' ', "\u{0120}"))
                            .ok_or_else(|| {
                                Error::key(
                                    tj_path.display().to_string(),
                                    "model.merges",
                                    "a merge pair holds a non-string",
                                )
                            })
                    };
                    Ok(Value::String(format!(
                        "{} {}",
                        part(&pair[0])?,
                        part(&pair[1])?
                    )))
                }
                _ => Err(Error::key(
                    tj_path.display().to_string(),
                    "model.merges",
                    "entries must be \"a b\" strings or [a, b] pairs",
                )),
            })
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let mut keys: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ];
    if merges.is_empty() {
        // llama.cpp (and our reader) refuse a BPE vocabulary without merges: do not write a
        // file nothing can load
        return Err(Error::key(
            dir.join("tokenizer.json").display().to_string(),
            "model.merges",
            "is empty: a GGUF BPE tokenizer needs its merges",
        ));
    }
    keys.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    // SpecialVocab: ids named in tokenizer_config.json (by content), then config.json's.
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json(&tc_path)?.unwrap_or_default();
    let cfg = read_json(&dir.join("config.json"))?.unwrap_or_default();
    let mut ids: Vec<(&str, u32)> = Vec::new();
    for (typ, key) in [
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("unk", "tokenizer.ggml.unknown_token_id"),
        ("sep", "tokenizer.ggml.seperator_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
        ("cls", "tokenizer.ggml.cls_token_id"),
        ("mask", "tokenizer.ggml.mask_token_id"),
    ] {
        let entry = tc.get(format!("{typ}_token"));
        let content = match entry {
            Some(serde_json::Value::String(c)) => Some(c.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let from_tc = content.and_then(|c| {
            added_by_content
                .iter()
                .find(|(a, _)| *a == c)
                .map(|(_, id)| *id as u64)
        });
        let from_cfg = cfg.get(format!("{typ}_token_id")).and_then(|v| v.as_u64());
        if let Some(id) = from_tc.or(from_cfg).filter(|&id| (id as usize) < n) {
            ids.push((key, id as u32));
        }
    }
    for (k, id) in ids {
        keys.push((k.into(), Value::U32(id)));
    }
    keys.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some(b) = tc.get("add_eos_token").and_then(|v| v.as_bool()) {
        keys.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(b)));
    }
    let template = match tc.get("chat_template") {
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        _ => {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                Some(crate::fsutil::read_to_string(&jinja).map_err(|e| Error::file(&jinja, e))?)
            } else {
                None
            }
        }
    };
    if let Some(t) = template {
        keys.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok((keys, Some(pre.to_string())))
}

// ------------------------------------------------------------------ the export

/// Refuse an output path we must not write: an input of the run, a folder, an existing file
/// without `overwrite`, or (even with it) an existing file that is not a GGUF ferrotune wrote.
pub fn check_output(path: &Path, overwrite: bool, inputs: &[fsutil::Input]) -> Result<()> {
    fsutil::check_output_file(path, "--out", overwrite, inputs)?;
    if path.exists() || path.is_symlink() {
        let ours = crate::model::gguf::read_header(path)
            .ok()
            .is_some_and(|ct| ct.metadata.contains_key(WRITER_KEY));
        if !ours {
            return Err(Error::file(
                path,
                "--out: the file exists and is not a GGUF ferrotune wrote; refusing to replace it (choose another path or remove it yourself)",
            ));
        }
    }
    Ok(())
}

/// Write `lm` (a LLaMA-family decoder; merge adapters into it first) to `out` as a GGUF v3 file
/// in `opts.preset`. See the module documentation for what is reproduced from llama.cpp.
pub fn write_gguf(lm: &LoadedModel, out: &Path, opts: &GgufExportOptions) -> Result<ExportReport> {
    let inputs = [fsutil::Input::new("the --model", lm.source.path())];
    check_output(out, opts.overwrite, &inputs)?;
    let cfg = &llama_of(lm)?.cfg;
    // Tokenizer first: a source we cannot describe fails before minutes of quantization.
    let tokenizer = match &lm.source {
        ModelSource::Gguf(p) => tokenizer_from_gguf(p)?,
        ModelSource::HfDir(d) => tokenizer_from_hf(d, cfg.vocab_size, lm.tokenizer.add_bos())?,
    };
    write_gguf_with_tokenizer(lm, out, opts, tokenizer)
}

/// The LLaMA model inside `lm`, or a one-line refusal of other families.
fn llama_of(lm: &LoadedModel) -> Result<&Llama> {
    lm.model.as_any().downcast_ref::<Llama>().ok_or_else(|| {
        Error::msg(format!(
            "{}: a {} model: GGUF export writes LLaMA-family decoders (llama, mistral) only",
            lm.source.path().display(),
            lm.model.family()
        ))
    })
}

/// [`write_gguf`] with the tokenizer keys given (`tokenizer.*` metadata and the `pre` among them)
/// rather than read from the model's source: for a model whose source has no tokenizer we can
/// describe. The output path is checked as [`write_gguf`] checks it.
pub fn write_gguf_with_tokenizer(
    lm: &LoadedModel,
    out: &Path,
    opts: &GgufExportOptions,
    tokenizer: TokenizerKeys,
) -> Result<ExportReport> {
    let inputs = [fsutil::Input::new("the --model", lm.source.path())];
    check_output(out, opts.overwrite, &inputs)?;
    let cfg = &llama_of(lm)?.cfg;
    if cfg.architecture == "Qwen2ForCausalLM" || cfg.qkv_bias || cfg.mlp_bias {
        return Err(Error::msg(format!(
            "{}: {} (biases on the projections) is not exported to GGUF yet: only LLaMA/Mistral layouts are",
            lm.source.path().display(),
            cfg.architecture
        )));
    }
    if !matches!(cfg.head_dim, d if d % 2 == 0 && d > 0) {
        return Err(Error::msg(format!("head_dim {} is not even", cfg.head_dim)));
    }

    let (tok_keys, pre) = tokenizer;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => source_name(&lm.source),
    };
    let mut metadata = model_metadata(cfg, &name, opts.preset)?;
    metadata.extend(tok_keys);

    // Tensors under their GGUF names, dims innermost first.
    let mut sd = lm.model.state_dict(DType::F32)?;
    let mut names: Vec<String> = Vec::with_capacity(sd.len() + 1);
    let mut hf_of: HashMap<String, String> = HashMap::new();
    for hf in sd.keys() {
        let g = gguf_tensor_name(hf).ok_or_else(|| {
            Error::msg(format!(
                "tensor `{hf}` has no GGUF name for the llama architecture"
            ))
        })?;
        hf_of.insert(g.clone(), hf.clone());
        names.push(g);
    }
    let rope_freqs = match &cfg.rope_scaling {
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => Some(llama3_rope_freqs(
            cfg.rope_theta,
            cfg.head_dim,
            *factor,
            *low_freq_factor,
            *high_freq_factor,
            *original_max_position_embeddings,
        )),
        Some(RopeScaling::Freqs { factors }) => Some(factors.clone()),
        _ => None,
    };
    if rope_freqs.is_some() {
        names.push("rope_freqs.weight".into());
    }
    llama_cpp_order(&mut names);
    let dims_of = |g: &str| -> Vec<usize> {
        match hf_of.get(g).and_then(|hf| sd.get(hf)) {
            Some(t) => t.dims().iter().rev().copied().collect(),
            None => vec![cfg.head_dim / 2],
        }
    };
    let shapes: Vec<(String, Vec<usize>)> = names.iter().map(|n| (n.clone(), dims_of(n))).collect();
    let (types, fallbacks) = tensor_types_and_fallbacks(
        &shapes,
        opts.preset,
        MixParams {
            n_layer: cfg.num_hidden_layers,
            n_head: cfg.num_attention_heads,
            n_head_kv: cfg.num_key_value_heads,
        },
    )?;
    let index: Vec<(String, Vec<usize>, GgmlType)> = shapes
        .iter()
        .zip(&types)
        .map(|((n, d), t)| (n.clone(), d.clone(), *t))
        .collect();
    let header = header_bytes(&metadata, &index);

    let mut reports = Vec::with_capacity(index.len());
    let mut n_elements = 0u64;
    let mut written = 0u64;
    fsutil::write_atomic_with(out, |w| {
        w.write_all(&header).map_err(|e| Error::file(out, e))?;
        written += header.len() as u64;
        for (g, dims, t) in &index {
            let values: Vec<f32> = match hf_of.get(g) {
                Some(hf) => {
                    let tensor = sd.remove(hf).ok_or_else(|| {
                        Error::msg(format!(
                            "GGUF export: tensor `{hf}` is missing from the model"
                        ))
                    })?;
                    let heads = if hf.contains("self_attn.q_proj.") {
                        Some(cfg.num_attention_heads)
                    } else if hf.contains("self_attn.k_proj.") {
                        Some(cfg.num_key_value_heads)
                    } else {
                        None
                    };
                    let v = tensor.flatten_all()?.to_vec1::<f32>()?;
                    match heads {
                        Some(h) => permute_qk(&v, dims, h)?,
                        None => v,
                    }
                }
                None => rope_freqs.clone().unwrap_or_default(),
            };
            crate::quant::check_finite(&values, dims[0])
                .map_err(|e| Error::msg(format!("tensor `{g}`: {e}")))?;
            let bytes = quantize_rows(*t, &values, dims[0])
                .map_err(|e| Error::msg(format!("tensor `{g}`: {e}")))?;
            let padded = bytes.len().next_multiple_of(GGUF_ALIGNMENT);
            w.write_all(&bytes).map_err(|e| Error::file(out, e))?;
            w.write_all(&vec![0u8; padded - bytes.len()])
                .map_err(|e| Error::file(out, e))?;
            written += padded as u64;
            n_elements += values.len() as u64;
            reports.push(TensorReport {
                name: g.clone(),
                dims: dims.clone(),
                ggml_type: *t,
                bytes: bytes.len() as u64,
            });
        }
        Ok(())
    })?;
    Ok(ExportReport {
        path: out.to_path_buf(),
        preset: opts.preset,
        tensors: reports,
        file_bytes: written,
        n_elements,
        tokenizer_pre: pre,
        fallbacks,
    })
}

/// llama.cpp's `permute(w, n_head)` on a q/k weight (rows) or bias: the HF row order
/// (head, half, i) becomes (head, i, half) for its interleaved RoPE — the inverse of
/// [`unpermute_rows`], which the reader applies.
fn permute_qk(v: &[f32], dims: &[usize], n_head: usize) -> Result<Vec<f32>> {
    let (cols, rows) = match dims {
        [n] => (1, *n),
        [c, r] => (*c, *r),
        _ => return Err(Error::msg(format!("q/k tensor with dims {dims:?}"))),
    };
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(Error::msg(format!(
            "q/k tensor of {rows} rows does not split into {n_head} heads of an even size"
        )));
    }
    // perm[hf_row] = gguf_row.
    let perm = unpermute_rows(rows, n_head);
    let mut out = vec![0f32; v.len()];
    for (hf_row, &g_row) in perm.iter().enumerate() {
        out[g_row * cols..(g_row + 1) * cols]
            .copy_from_slice(&v[hf_row * cols..(hf_row + 1) * cols]);
    }
    Ok(out)
}

fn source_name(src: &ModelSource) -> String {
    if let ModelSource::Gguf(p) = src {
        if let Ok(ct) = crate::model::gguf::read_header(p) {
            if let Some(Value::String(n)) = ct.metadata.get("general.name") {
                return n.clone();
            }
        }
    }
    let p = src.path();
    let stem = if p.is_dir() {
        p.file_name()
    } else {
        p.file_stem()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
