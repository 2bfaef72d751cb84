//! Model code and loading. `load` turns a user's `--model` value (a GGUF file, an HF folder, or
//! `hf:org/name[@revision]`) into a ready [`Llama`] plus its [`Tokenizer`].
pub mod config;
pub mod convert;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod weights;

pub use config::{LlamaConfig, RopeScaling};
pub use llama::{KvCache, LayerContext, Llama};
pub use weights::{GgufSource, LoadOptions, SafetensorsSource, WeightSource};

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

/// A model ready to run.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// Bytes of the weight files on disk.
    pub file_bytes: u64,
}

/// Read a GGUF header (metadata and tensor index) with a one-line error on corruption. Every
/// count and size is checked before anything is allocated ([`gguf::read_header`]).
pub fn read_gguf(path: &Path) -> Result<gguf_file::Content> {
    gguf::read_header(path)
}

pub fn load(spec: &str, opts: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    let source = resolve(spec)?;
    load_source(source, opts, device)
}

pub fn load_source(
    source: ModelSource,
    opts: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel> {
    match &source {
        ModelSource::Gguf(path) => {
            let content = read_gguf(path)?;
            let cfg = config_from_gguf(&content, path)?;
            let tokenizer = Tokenizer::from_gguf(&content, path)?;
            let permute = (content_arch(&content, path)? == "llama")
                .then_some((cfg.num_attention_heads, cfg.num_key_value_heads));
            let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let src = GgufSource::open(path, content, permute, opts, device)?;
            let model = Llama::load(&src, &cfg)?;
            Ok(LoadedModel {
                model,
                tokenizer,
                source,
                file_bytes,
            })
        }
        ModelSource::HfDir(dir) => {
            let cfg = config_from_hf_dir(dir)?;
            let tokenizer = Tokenizer::from_hf_dir(dir)?;
            let src = SafetensorsSource::open(dir, opts, device)?;
            let model = Llama::load(&src, &cfg)?;
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

pub fn config_from_hf_dir(dir: &Path) -> Result<LlamaConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&p, format!("invalid JSON: {e}")))?;
    LlamaConfig::from_hf_json(&v, &p.display().to_string())
}

fn content_arch(ct: &gguf_file::Content, path: &Path) -> Result<String> {
    ct.metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| {
            Error::key(
                path.display().to_string(),
                "general.architecture",
                "missing",
            )
        })
}

/// Hyper-parameters from GGUF metadata (`{arch}.*` keys as written by llama.cpp's converter).
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
    let md = &ct.metadata;
    let get_u = |k: &str| -> Result<Option<usize>> {
        let key = format!("{arch}.{k}");
        match md.get(&key) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(|x| x as u64))
                .map(|x| Some(x as usize))
                .map_err(|_| Error::key(&src, &key, "expected an integer")),
        }
    };
    let req_u = |k: &str| -> Result<usize> {
        get_u(k)?.ok_or_else(|| Error::key(&src, format!("{arch}.{k}"), "missing"))
    };
    let get_f = |k: &str| -> Option<f64> {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok())
    };
    let hidden = req_u("embedding_length")?;
    let heads = req_u("attention.head_count")?;
    let kv = get_u("attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 || kv == 0 || heads % kv != 0 {
        return Err(Error::key(
            &src,
            format!("{arch}.attention.head_count_kv"),
            format!("{kv} must divide head_count {heads}"),
        ));
    }
    let head_dim = get_u("attention.key_length")?
        .or(get_u("rope.dimension_count")?)
        .unwrap_or(hidden / heads);
    let vocab = match get_u("vocab_size")? {
        Some(v) => v,
        None => md
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.to_vec().ok())
            .map(|t| t.len())
            .or_else(|| {
                ct.tensor_infos
                    .get("token_embd.weight")
                    .map(|i| i.shape.dims()[0])
            })
            .ok_or_else(|| {
                Error::key(
                    &src,
                    "tokenizer.ggml.tokens",
                    "missing (cannot tell the vocabulary size)",
                )
            })?,
    };
    let rope_scaling = match md
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(|s| s.as_str())
    {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: get_f("rope.scaling.factor").unwrap_or(1.0) as f32,
        }),
        Some(other) => {
            return Err(Error::key(
                &src,
                format!("{arch}.rope.scaling.type"),
                format!("`{other}` is not supported"),
            ))
        }
    };
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::file(path, "per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 GGUF) are not supported yet; use the HF folder"));
    }
    let meta_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    Ok(LlamaConfig {
        architecture: hf_arch.to_string(),
        hidden_size: hidden,
        intermediate_size: req_u("feed_forward_length")?,
        num_hidden_layers: req_u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: get_f("rope.freq_base").unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: get_u("context_length")?.unwrap_or(2048),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        qkv_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: ct.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: ct.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: meta_u32("tokenizer.ggml.bos_token_id"),
        eos_token_ids: meta_u32("tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
    })
}
