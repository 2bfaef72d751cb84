//! Model code and loading. `load` turns a user's `--model` value (a GGUF file, an HF folder, or
//! `hf:org/name[@revision]`) into a ready model of its family (a `Box<dyn` [`Model`]`>`, see
//! [`family`]) plus its [`Tokenizer`].
pub mod bert;
pub mod config;
pub mod convert;
pub mod family;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod t5;
#[cfg(test)]
mod tests_interface;
pub mod weights;

pub use bert::{load_bert, Bert, BertConfig, BertHead, BertInput, LoadedBert, Pooling};
pub use config::{ConfigKeys, LlamaConfig, RopeScaling};
pub use family::{ArchitectureKind, Dims, MicroBatchGrads, Model, Objective, Task, TaskType};
pub use family::{SoftPrompt, VirtualTokens};
pub use llama::{KvCache, LayerContext, Llama};
pub use t5::{LoadedT5, T5Config, T5};
pub use weights::{
    is_placeholder, GgufSource, HeadKind, HeadSpec, LoadOptions, SafetensorsSource, WeightSource,
};

use crate::progress::{CountingSource, NoProgress, Progress};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;
use std::path::{Path, PathBuf};

/// Where a model lives on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfDir(p) => p,
        }
    }
    pub fn format(&self) -> &'static str {
        match self {
            ModelSource::Gguf(_) => "gguf",
            ModelSource::HfDir(_) => "safetensors",
        }
    }
}

/// Resolve `--model`: a `.gguf` file, an HF folder (config.json), a folder holding exactly one
/// `.gguf`, or `hf:org/name[@revision]` / `hf:org/name/file.gguf[@revision]` from the Hub.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    if let Some(rest) = spec.strip_prefix("hf:") {
        return hub::download(rest);
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        return Err(Error::file(
            &p,
            "no such file or folder (use hf:org/name for the Hugging Face Hub)",
        ));
    }
    if p.is_file() {
        if is_gguf(&p)? {
            return Ok(ModelSource::Gguf(p));
        }
        return Err(Error::file(
            &p,
            "not a GGUF file (bad magic); pass a .gguf file or an HF model folder",
        ));
    }
    if !p.is_dir() {
        return Err(Error::file(
            &p,
            "is neither a regular file nor a folder (a FIFO or device?); pass a .gguf file or an HF model folder",
        ));
    }
    if p.join("config.json").exists() {
        return Ok(ModelSource::HfDir(p));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(&p)
        .map_err(|e| Error::file(&p, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().map(|x| x == "gguf").unwrap_or(false))
        .collect();
    match ggufs.len() {
        1 => Ok(ModelSource::Gguf(ggufs[0].clone())),
        0 => Err(Error::file(
            &p,
            "folder has no config.json and no .gguf file",
        )),
        _ => Err(Error::file(
            &p,
            "folder has several .gguf files; pass one of them",
        )),
    }
}

fn is_gguf(p: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(|e| Error::file(p, e))?;
    let mut magic = [0u8; 4];
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

/// A model ready to run: any family, behind the [`Model`] interface.
pub struct LoadedModel {
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// Bytes of the weight files on disk.
    pub file_bytes: u64,
}

impl LoadedModel {
    /// The model as a LLaMA-family decoder, if it is one (the fast engine, family-specific
    /// tests).
    pub fn llama(&self) -> Option<&Llama> {
        self.model.downcast_ref::<Llama>()
    }
}

/// Read a GGUF header (metadata and tensor index) with a one-line error on corruption. Every
/// count and size is checked before anything is allocated ([`gguf::read_header`]).
pub fn read_gguf(path: &Path) -> Result<gguf_file::Content> {
    gguf::read_header(path)
}

pub fn load(spec: &str, opts: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    load_with_progress(spec, opts, device, &NoProgress)
}

/// [`load`], reporting each tensor loaded (converted, quantized) to `progress`.
pub fn load_with_progress(
    spec: &str,
    opts: &LoadOptions,
    device: &Device,
    progress: &dyn Progress,
) -> Result<LoadedModel> {
    let source = resolve(spec)?;
    load_source_with_progress(source, opts, device, progress)
}

/// Load a T5-family model (`model_type` t5 / mt5) from `--model`'s value; see
/// [`t5::load_source`]. [`t5::is_t5_source`] tells whether a resolved source is one.
pub fn load_t5(spec: &str, opts: &LoadOptions, device: &Device) -> Result<LoadedT5> {
    t5::load_source(resolve(spec)?, opts, device, &NoProgress)
}

pub fn load_source(
    source: ModelSource,
    opts: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel> {
    load_source_with_progress(source, opts, device, &NoProgress)
}

/// The tensors `Llama::load` asks for: the embedding, the final norm and the LM head, and per
/// layer two norms, seven linears and their biases.
fn tensor_count(cfg: &LlamaConfig) -> u64 {
    let biases =
        3 * usize::from(cfg.qkv_bias) + usize::from(cfg.o_bias) + 3 * usize::from(cfg.mlp_bias);
    (3 + cfg.num_hidden_layers.saturating_mul(9 + biases)) as u64
}

/// `Llama::load` from `src`, counting its tensors on `progress`.
fn load_llama(src: &dyn WeightSource, cfg: &LlamaConfig, progress: &dyn Progress) -> Result<Llama> {
    progress.start("loading", tensor_count(cfg), "tensors");
    let model = Llama::load(
        &CountingSource {
            inner: src,
            progress,
        },
        cfg,
    );
    progress.finish();
    model
}

pub fn load_source_with_progress(
    source: ModelSource,
    opts: &LoadOptions,
    device: &Device,
    progress: &dyn Progress,
) -> Result<LoadedModel> {
    match &source {
        ModelSource::Gguf(path) => {
            let content = read_gguf(path)?;
            let cfg = config_from_gguf(&content, path)?;
            let tokenizer = Tokenizer::from_gguf(&content, path)?;
            check_tokenizer_fits(&tokenizer, &cfg, path)?;
            let permute = (content_arch(&content, path)? == "llama")
                .then_some((cfg.num_attention_heads, cfg.num_key_value_heads));
            let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let src = GgufSource::open(path, content, permute, opts, device)?;
            check_no_head(opts, "a LLaMA-family decoder", path)?;
            let model = Box::new(load_llama(&src, &cfg, progress)?);
            Ok(LoadedModel {
                model,
                tokenizer,
                source,
                file_bytes,
            })
        }
        // Families other than LLaMA are told apart by config.json's `model_type` here, one arm
        // each (`"t5" | "mt5"`, `"bert" | "roberta"`), before the LLaMA config parser, which
        // names what it does not support.
        ModelSource::HfDir(dir) if is_bert_dir(dir) => {
            // The head is the one the folder was saved with (architectures[0]).
            let lb = bert::load_bert_source(source.clone(), opts, None, device, progress)?;
            Ok(LoadedModel {
                model: Box::new(lb.model),
                tokenizer: lb.tokenizer,
                source,
                file_bytes: lb.file_bytes,
            })
        }
        ModelSource::HfDir(dir) if t5::is_t5_source(&source) => {
            check_no_head(
                opts,
                "a T5-family encoder-decoder",
                &dir.join("config.json"),
            )?;
            let t5 = t5::load_source(source, opts, device, progress)?;
            Ok(LoadedModel {
                model: Box::new(t5.model),
                tokenizer: t5.tokenizer,
                source: t5.source,
                file_bytes: t5.file_bytes,
            })
        }
        ModelSource::HfDir(dir) => {
            let cfg = config_from_hf_dir(dir)?;
            check_no_head(opts, "a LLaMA-family decoder", &dir.join("config.json"))?;
            let tokenizer = Tokenizer::from_hf_dir(dir)?;
            check_tokenizer_fits(&tokenizer, &cfg, &dir.join("tokenizer.json"))?;
            let src = SafetensorsSource::open(dir, opts, device)?;
            let model = Box::new(load_llama(&src, &cfg, progress)?);
            let file_bytes = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| {
                            e.path()
                                .extension()
                                .map(|x| x == "safetensors")
                                .unwrap_or(false)
                        })
                        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                        .sum()
                })
                .unwrap_or(0);
            Ok(LoadedModel {
                model,
                tokenizer,
                source,
                file_bytes,
            })
        }
    }
}

/// What a source holds, read from its config alone (no weights): the kind of model and, where
/// it has one obvious training task, that task (a decoder: `causal_lm`; an encoder-decoder:
/// `seq2seq_lm`; an encoder saved with a classification head: its task; a bare or masked-LM
/// encoder: none, the config must say). Unreadable configs give the default; loading reports
/// them.
pub fn peek_task(source: &ModelSource) -> (ArchitectureKind, Option<Task>) {
    match source {
        ModelSource::Gguf(_) => (ArchitectureKind::Decoder, Some(Task::CausalLm)),
        ModelSource::HfDir(_) if t5::is_t5_source(source) => {
            (ArchitectureKind::EncoderDecoder, Some(Task::Seq2SeqLm))
        }
        ModelSource::HfDir(dir) if is_bert_dir(dir) => {
            let task = bert::config_from_hf_dir(dir)
                .ok()
                .and_then(|c| match c.saved_head() {
                    BertHead::SequenceClassification => Some(Task::SequenceClassification),
                    BertHead::TokenClassification => Some(Task::TokenClassification),
                    _ => None,
                });
            (ArchitectureKind::Encoder, task)
        }
        ModelSource::HfDir(_) => (ArchitectureKind::Decoder, Some(Task::CausalLm)),
    }
}

/// Families with one head (an LM head) take no [`HeadSpec`] other than the bare model's.
fn check_no_head(opts: &LoadOptions, what: &str, file: &Path) -> Result<()> {
    match &opts.head {
        Some(h) if h.head != HeadKind::None => Err(Error::file(
            file,
            format!(
                "the model is {what}, which has no {} head (that needs a BERT-family encoder)",
                match h.head {
                    HeadKind::SequenceClassification => "sequence-classification",
                    HeadKind::TokenClassification => "token-classification",
                    _ => "masked-LM",
                }
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether `dir/config.json` names a BERT-family encoder (unreadable: no, the LLaMA path
/// reports the file's error).
fn is_bert_dir(dir: &Path) -> bool {
    crate::fsutil::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| bert::BertConfig::is_bert_family(&v))
}

pub fn config_from_hf_dir(dir: &Path) -> Result<LlamaConfig> {
    let p = dir.join("config.json");
    let text = crate::fsutil::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&p, format!("invalid JSON: {e}")))?;
    if bert::BertConfig::is_bert_family(&v) {
        // An encoder has no next-token head: say so rather than "unsupported architecture".
        return Err(Error::file(
            &p,
            "a BERT-family encoder (model_type bert/roberta) cannot generate or score text as a decoder; use `ferrotune embed`",
        ));
    }
    LlamaConfig::from_hf_json(&v, &p.display().to_string())
}

/// Every id the tokenizer can produce must have a row in the embedding table (`vocab_size` rows,
/// checked against the tensor by `Llama::load`); a larger id would index past it. A smaller
/// tokenizer is normal: HF models pad the table.
fn check_tokenizer_fits(
    tokenizer: &Tokenizer,
    cfg: &LlamaConfig,
    tokenizer_file: &Path,
) -> Result<()> {
    let vocab = tokenizer.inner().get_vocab(true);
    if let Some((token, &id)) = vocab.iter().max_by_key(|(_, &id)| id) {
        if id as usize >= cfg.vocab_size {
            return Err(cfg.keys.err(
                &cfg.keys.vocab_size,
                format!(
                    "{} but the tokenizer ({}) has token `{token}` with id {id}",
                    cfg.vocab_size,
                    tokenizer_file.display()
                ),
            ));
        }
    }
    Ok(())
}

fn content_arch(ct: &gguf_file::Content, path: &Path) -> Result<String> {
    let key = |why: String| Error::key(path.display().to_string(), "general.architecture", why);
    let arch = match ct.metadata.get("general.architecture") {
        None => return Err(key("missing".into())),
        Some(v) => v
            .to_string()
            .cloned()
            .map_err(|_| key(format!("expected a string, found a {:?}", v.value_type())))?,
    };
    if arch.is_empty() || arch.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::key(
            path.display().to_string(),
            "general.architecture",
            format!("`{}` is not an architecture name", arch.escape_debug()),
        ));
    }
    Ok(arch)
}

/// A non-negative integer GGUF metadata value of any integer type.
fn meta_usize(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    let x: u64 = match v {
        V::U8(x) => (*x).into(),
        V::U16(x) => (*x).into(),
        V::U32(x) => (*x).into(),
        V::U64(x) => *x,
        V::I8(x) => u64::try_from(*x).ok()?,
        V::I16(x) => u64::try_from(*x).ok()?,
        V::I32(x) => u64::try_from(*x).ok()?,
        V::I64(x) => u64::try_from(*x).ok()?,
        _ => return None,
    };
    usize::try_from(x).ok()
}

/// Hyper-parameters from GGUF metadata (`{arch}.*` keys as written by llama.cpp's converter),
/// validated (see [`LlamaConfig::validate`]); a `rope_freqs.weight` tensor (llama.cpp's form of
/// Llama 3.1 RoPE scaling) is read from the file once its size is known to be right.
pub fn config_from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<LlamaConfig> {
    let src = path.display().to_string();
    let arch = content_arch(ct, path)?;
    let hf_arch = match arch.as_str() {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        other => {
            return Err(Error::UnsupportedArch {
                source_name: src,
                arch: other.to_string(),
                supported: "llama, mistral, qwen2".to_string(),
            })
        }
    };
    let mut keys = ConfigKeys::gguf(&src, &arch);
    let md = &ct.metadata;
    let get_u = |k: &str| -> Result<Option<usize>> {
        let key = format!("{arch}.{k}");
        match md.get(&key) {
            None => Ok(None),
            Some(v) => meta_usize(v)
                .map(Some)
                .ok_or_else(|| Error::key(&src, &key, "expected a non-negative integer")),
        }
    };
    let req_u = |k: &str| -> Result<usize> {
        get_u(k)?.ok_or_else(|| Error::key(&src, format!("{arch}.{k}"), "missing"))
    };
    let get_f = |k: &str| -> Result<Option<f64>> {
        let key = format!("{arch}.{k}");
        match md.get(&key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|_| Error::key(&src, &key, "expected a number")),
        }
    };
    let hidden = req_u("embedding_length")?;
    let heads = req_u("attention.head_count")?;
    let kv = get_u("attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 {
        return Err(keys.err(&keys.num_attention_heads, "must be at least 1"));
    }
    if hidden == 0 {
        return Err(keys.err(&keys.hidden_size, "must be at least 1"));
    }
    // llama.cpp: the head size is attention.key_length, else embedding_length / head_count; RoPE
    // turns rope.dimension_count of those dimensions (default: all of them).
    let head_dim = match get_u("attention.key_length")? {
        Some(d) => d,
        None if !hidden.is_multiple_of(heads) => {
            return Err(keys.err(
                &keys.hidden_size,
                format!(
                    "{hidden} is not a multiple of {} {heads} (and there is no {})",
                    keys.num_attention_heads, keys.head_dim
                ),
            ))
        }
        None => hidden / heads,
    };
    if let Some(v) = get_u("attention.value_length")? {
        if v != head_dim {
            return Err(Error::key(
                &src,
                format!("{arch}.attention.value_length"),
                format!(
                    "{v} differs from {} {head_dim}; different key and value sizes are not supported",
                    keys.head_dim
                ),
            ));
        }
    }
    if let Some(r) = get_u("rope.dimension_count")? {
        if r != head_dim {
            return Err(Error::key(
                &src,
                format!("{arch}.rope.dimension_count"),
                format!("{r} differs from the head size {head_dim}: partial rotary embeddings are not supported"),
            ));
        }
    }
    let token_count = match md.get("tokenizer.ggml.tokens") {
        None => None,
        Some(t) => Some(
            t.to_vec()
                .map_err(|_| Error::key(&src, "tokenizer.ggml.tokens", "expected an array"))?
                .len(),
        ),
    };
    let vocab = match (get_u("vocab_size")?, token_count) {
        (Some(v), Some(n)) if v != n => {
            return Err(keys.err(
                &keys.vocab_size,
                format!("{v} but tokenizer.ggml.tokens has {n} tokens"),
            ))
        }
        (Some(v), _) => v,
        (None, Some(n)) => {
            keys.vocab_size = "tokenizer.ggml.tokens".into();
            n
        }
        (None, None) => {
            keys.vocab_size = "tokenizer.ggml.tokens".into();
            ct.tensor_infos
                .get("token_embd.weight")
                .and_then(|i| i.shape.dims().first().copied())
                .ok_or_else(|| {
                    Error::key(
                        &src,
                        "tokenizer.ggml.tokens",
                        "missing (cannot tell the vocabulary size)",
                    )
                })?
        }
    };
    let rope_scaling = match md.get(&format!("{arch}.rope.scaling.type")) {
        None => None,
        Some(t) => match t.to_string().map(String::as_str) {
            Ok("none") => None,
            Ok("linear") => Some(RopeScaling::Linear {
                factor: get_f("rope.scaling.factor")?.unwrap_or(1.0) as f32,
            }),
            Ok(other) => {
                return Err(Error::key(
                    &src,
                    format!("{arch}.rope.scaling.type"),
                    format!("`{other}` is not supported (supported: none, linear)"),
                ))
            }
            Err(_) => {
                return Err(Error::key(
                    &src,
                    format!("{arch}.rope.scaling.type"),
                    "expected a string",
                ))
            }
        },
    };
    let meta_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let mut cfg = LlamaConfig {
        architecture: hf_arch.to_string(),
        hidden_size: hidden,
        intermediate_size: req_u("feed_forward_length")?,
        num_hidden_layers: req_u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: get_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: get_f("rope.freq_base")?.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: get_u("context_length")?.unwrap_or(2048),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        // Qwen2 always has q/k/v biases (llama.cpp requires them too): a file without them
        // is an error naming the tensor, not a model that quietly computes something else.
        qkv_bias: arch == "qwen2" || ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: ct.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: ct.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: meta_u32("tokenizer.ggml.bos_token_id"),
        eos_token_ids: meta_u32("tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
        keys,
    };
    cfg.validate()?;
    if let Some(info) = ct.tensor_infos.get(ROPE_FREQS) {
        if cfg.rope_scaling.is_some() {
            return Err(Error::file(
                path,
                format!("both {arch}.rope.scaling.type and tensor `{ROPE_FREQS}`: combining two RoPE scalings is not supported"),
            ));
        }
        // Validated above, so head_dim / 2 is small: the read below is bounded by it.
        if info.shape.dims() != [cfg.head_dim / 2] {
            return Err(Error::file(
                path,
                format!(
                    "tensor `{ROPE_FREQS}` is {:?} but {} {} implies [{}]",
                    info.shape.dims(),
                    cfg.keys.head_dim,
                    cfg.head_dim,
                    cfg.head_dim / 2
                ),
            ));
        }
        let factors = read_small_tensor(ct, path, ROPE_FREQS)?;
        cfg.rope_scaling = Some(RopeScaling::Freqs { factors });
        cfg.validate()?;
    }
    cfg.warnings().into_iter().for_each(config::warn);
    Ok(cfg)
}

/// llama.cpp's per-frequency RoPE divisors (Llama 3.1 scaling), one per rotated pair.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// A small tensor of a GGUF file as f32 values (its shape already checked by the caller).
fn read_small_tensor(ct: &gguf_file::Content, path: &Path, name: &str) -> Result<Vec<f32>> {
    let err = |e: candle_core::Error| {
        Error::file(
            path,
            format!(
                "tensor `{name}`: {}",
                crate::error::first_line(&e.to_string())
            ),
        )
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let q = ct.tensor(&mut f, name, &Device::Cpu).map_err(err)?;
    q.dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Decoder;
    use candle_core::Tensor;

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The transformers logits of the tiny Llama 3 RoPE-scaling model: (input ids, logits rows).
    fn expected() -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
        let p = repo().join("tests/fixtures/models/tiny-llama3-rope-scaling/expected.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let ids = s["input_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                let rows = s["logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        r.as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_f64().unwrap() as f32)
                            .collect()
                    })
                    .collect();
                (ids, rows)
            })
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    const ROPE_FREQS_GGUF: &str = "tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf";

    /// The fixture: the tiny HF model written as llama.cpp writes Llama 3.1 (per-frequency
    /// factors in `rope_freqs.weight`, permuted q/k), by reference/tiny_gguf_fixture.py.
    fn rope_freqs_model() -> LoadedModel {
        let path = repo().join(ROPE_FREQS_GGUF);
        assert!(
            path.is_file(),
            "{} is missing (it is committed; .venv/bin/python reference/tiny_gguf_fixture.py writes it)",
            path.display()
        );
        load_source(
            ModelSource::Gguf(path),
            &LoadOptions::default(),
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Largest |logit - transformers| over the expected sequences.
    fn worst_diff(model: &Llama) -> f32 {
        let mut worst = 0f32;
        for (ids, want) in expected() {
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let got: Vec<Vec<f32>> = model
                .forward(&t, None)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max(max_diff(g, w));
            }
        }
        worst
    }

    #[test]
    fn gguf_with_rope_freqs_matches_transformers() {
        let lm = rope_freqs_model();
        match &lm.llama().unwrap().cfg.rope_scaling {
            Some(RopeScaling::Freqs { factors }) => {
                assert_eq!(factors.len(), 8);
                assert_eq!((factors[0], factors[7]), (1.0, 8.0));
            }
            other => panic!("expected per-frequency factors, got {other:?}"),
        }
        let worst = worst_diff(lm.llama().unwrap());
        assert!(worst < 1e-4, "max |logit diff| {worst} >= 1e-4");
        // The same weights without the factors are far off: the comparison sees the scaling.
        let path = repo().join(ROPE_FREQS_GGUF);
        let ct = read_gguf(&path).unwrap();
        let mut cfg = config_from_gguf(&ct, &path).unwrap();
        cfg.rope_scaling = None;
        let src = GgufSource::open(
            &path,
            ct,
            Some((4, 2)),
            &LoadOptions::default(),
            &Device::Cpu,
        )
        .unwrap();
        let unscaled = Llama::load(&src, &cfg).unwrap();
        let off = worst_diff(&unscaled);
        assert!(
            off > 1e-2,
            "without rope_freqs the logits differ by only {off}"
        );
    }

    #[test]
    fn gguf_with_rope_freqs_decodes_in_the_engine_like_transformers() {
        let lm = rope_freqs_model();
        let mut dec =
            crate::engine::FastDecoder::new(lm.llama().unwrap()).expect("engine supports it");
        for (ids, want) in expected() {
            // prefill all but the last token, then one decode step
            let n = ids.len();
            let prefill = dec.prefill(&ids[..n - 1]).unwrap();
            assert!(max_diff(&prefill, &want[n - 2]) < 1e-4);
            let step = dec.step(ids[n - 1]).unwrap();
            let d = max_diff(&step, &want[n - 1]);
            assert!(d < 1e-4, "max |logit diff| {d}");
        }
    }

    #[test]
    fn gguf_rope_freqs_that_config_json_cannot_express_are_not_converted() {
        let lm = rope_freqs_model();
        let dir =
            std::env::temp_dir().join(format!("ferrotune-freqs-convert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = convert::write_hf_folder(&lm, &dir).unwrap_err().to_string();
        assert!(e.contains("rope_freqs.weight"), "{e}");
        // refused before anything is written
        assert!(!dir.exists());
    }
}
