//! Attach a prompt learning adapter to a model, save and load PEFT's files, and read a soft
//! prompt back as the vocabulary tokens nearest to each virtual token.
//!
//! PEFT saves a prompt learning adapter as ONE tensor, `prompt_embeddings`: the encoder's
//! output for the virtual tokens (`get_prompt_embedding_to_save`), so an MLP (P-tuning, prefix
//! projection) is not in the file, and a loaded adapter is that fixed tensor (PEFT's
//! `inference_mode`). Training checkpoints keep the whole encoder ([`encoder_tensors`]).
use super::config::{PromptLearningConfig, PromptMethod, PromptTuningInit};
use super::layer::{Activation, Dense, PromptEncoder};
use crate::fsutil::{write_atomic, write_safetensors};
use crate::model::{Model, VirtualTokens};
use crate::nn::EmbeddingWeight;
use crate::peft::format::{CONFIG_FILE, WEIGHTS_FILE};
use crate::peft::ParamCount;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The one tensor of PEFT's prompt learning adapter file.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// The model's input embedding table `(vocab, hidden)`, f32 (dequantized if need be).
pub fn input_embeddings(model: &dyn Model) -> Result<Tensor> {
    let embs = model.embeddings();
    let e = embs
        .iter()
        .find(|e| {
            let n = e.name();
            n.ends_with("embed_tokens") || n.ends_with("word_embeddings") || n == "shared"
        })
        .or(embs.first())
        .ok_or_else(|| Error::msg(format!("{} has no input embeddings", model.describe())))?;
    let t = match e.weight() {
        EmbeddingWeight::Frozen(t) => t.clone(),
        EmbeddingWeight::Trainable(v) => v.as_tensor().detach(),
        EmbeddingWeight::Quantized(q) => q.dequantize()?,
    };
    Ok(t.to_dtype(DType::F32)?)
}

fn kind_of(method: PromptMethod) -> VirtualTokens {
    match method {
        PromptMethod::PrefixTuning => VirtualTokens::Prefix,
        _ => VirtualTokens::Embeddings,
    }
}

/// N(0, 1): a fresh `torch.nn.Embedding`.
fn normal(rng: &mut StdRng, rows: usize, cols: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), dev)?)
}

/// The token ids prompt tuning's `TEXT` init takes: the text's ids (with the tokenizer's
/// special tokens, as `tokenizer(text)["input_ids"]`), repeated and cut to `total`.
pub fn init_text_ids(tokenizer: &Tokenizer, text: &str, total: usize) -> Result<Vec<u32>> {
    let ids = tokenizer.encode(text, true)?;
    if ids.is_empty() {
        return Err(Error::msg(format!(
            "prompt_tuning_init_text {text:?} has no tokens"
        )));
    }
    Ok(ids.iter().copied().cycle().take(total).collect())
}

/// A fresh prompt encoder for `cfg` (sizes filled by [`PromptLearningConfig::for_model`]) on
/// `model`: the embedding initialised as PEFT does, the MLP as torch's `nn.Linear`.
/// `tokenizer` is needed for prompt tuning's `TEXT` init.
pub fn new_encoder(
    model: &dyn Model,
    cfg: &PromptLearningConfig,
    tokenizer: Option<&Tokenizer>,
    seed: u64,
) -> Result<PromptEncoder> {
    let dev = model.device().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let total = cfg.total_virtual_tokens();
    let token_dim = cfg.token_dim.unwrap_or(0);
    let kind = kind_of(cfg.peft_type);
    let n = cfg.num_virtual_tokens;
    match cfg.peft_type {
        PromptMethod::PromptTuning => {
            let init = cfg.prompt_tuning_init.unwrap_or_default();
            let table = match init {
                PromptTuningInit::Random => normal(&mut rng, total, token_dim, &dev)?,
                PromptTuningInit::SampleVocab | PromptTuningInit::Text => {
                    let emb = input_embeddings(model)?;
                    let vocab = emb.dim(0)?;
                    let ids: Vec<u32> = if init == PromptTuningInit::Text {
                        let tok = tokenizer.ok_or_else(|| {
                            Error::msg("prompt_tuning_init = \"TEXT\" needs the model's tokenizer")
                        })?;
                        let text = cfg.prompt_tuning_init_text.as_deref().unwrap_or("");
                        let ids = init_text_ids(tok, text, total)?;
                        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                            return Err(Error::msg(format!(
                                "prompt_tuning_init_text: token id {bad} is outside the model's {vocab} embeddings"
                            )));
                        }
                        ids
                    } else {
                        (0..total)
                            .map(|_| rng.random_range(0..vocab as u32))
                            .collect()
                    };
                    emb.index_select(&Tensor::new(ids.as_slice(), &dev)?, 0)?
                }
            };
            Ok(PromptEncoder::plain(kind, n, Var::from_tensor(&table)?))
        }
        PromptMethod::PrefixTuning if !cfg.has_encoder_mlp() => {
            let table = normal(&mut rng, total, cfg.prompt_width(), &dev)?;
            Ok(PromptEncoder::plain(kind, n, Var::from_tensor(&table)?))
        }
        PromptMethod::PrefixTuning => {
            let hidden = cfg.encoder_hidden_size.unwrap_or(token_dim);
            let table = Var::from_tensor(&normal(&mut rng, total, token_dim, &dev)?)?;
            let mlp = vec![
                Dense::new(&mut rng, token_dim, hidden, &dev)?,
                Dense::new(&mut rng, hidden, cfg.prompt_width(), &dev)?,
            ];
            Ok(PromptEncoder::with_mlp(
                kind,
                n,
                table,
                mlp,
                "transform",
                Activation::Tanh,
            ))
        }
        PromptMethod::PTuning => {
            let hidden = cfg.encoder_hidden_size.unwrap_or(token_dim);
            let table = Var::from_tensor(&normal(&mut rng, total, token_dim, &dev)?)?;
            let mlp = vec![
                Dense::new(&mut rng, token_dim, hidden, &dev)?,
                Dense::new(&mut rng, hidden, hidden, &dev)?,
                Dense::new(&mut rng, hidden, token_dim, &dev)?,
            ];
            Ok(PromptEncoder::with_mlp(
                kind,
                n,
                table,
                mlp,
                "mlp_head",
                Activation::Relu,
            ))
        }
    }
}

/// What [`attach_prompt`] returns: the config with the model's sizes, the encoder the model
/// reads (its tensors are the trainable parameters) and PEFT's parameter count.
pub struct AttachedPrompt {
    pub config: PromptLearningConfig,
    pub encoder: Arc<PromptEncoder>,
    pub params: ParamCount,
}

/// Put a fresh soft prompt of `cfg` in front of `model`'s inputs. `source` names the config in
/// errors.
pub fn attach_prompt(
    model: &mut dyn Model,
    cfg: &PromptLearningConfig,
    tokenizer: Option<&Tokenizer>,
    seed: u64,
    source: &str,
) -> Result<AttachedPrompt> {
    cfg.validate(source)?;
    let config = cfg.for_model(model, source)?;
    let encoder = Arc::new(new_encoder(model, &config, tokenizer, seed)?);
    model.set_virtual_prompt(Some(encoder.clone()))?;
    let params = prompt_param_count(model, &encoder);
    Ok(AttachedPrompt {
        config,
        encoder,
        params,
    })
}

/// PEFT's count: the encoder's tensors trainable, the base frozen (a prompt touches no
/// linear, so the base count is LoRA's with no adapter).
pub fn prompt_param_count(model: &dyn Model, encoder: &PromptEncoder) -> ParamCount {
    let trainable: usize = encoder
        .trainable_params()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let base = crate::peft::param_count(model, "");
    ParamCount {
        trainable: base.trainable + trainable,
        all: base.all + trainable,
    }
}

/// The encoder's tensors by PEFT name (`prompt_encoder.default.embedding.weight`, ...): what a
/// training checkpoint keeps so that a resume is exact.
pub fn encoder_tensors(encoder: &PromptEncoder, adapter_name: &str) -> HashMap<String, Tensor> {
    encoder
        .trainable_params()
        .into_iter()
        .map(|(n, v)| {
            (
                format!("prompt_encoder.{adapter_name}.{n}"),
                v.as_tensor().clone(),
            )
        })
        .collect()
}

/// Write PEFT's adapter folder: `adapter_config.json` (as `save_pretrained` writes it, with
/// `inference_mode: true`) and `adapter_model.safetensors` holding `prompt_embeddings`.
pub fn save_prompt_adapter(
    cfg: &PromptLearningConfig,
    encoder: &PromptEncoder,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let out = encoder
        .output()?
        .detach()
        .to_dtype(DType::F32)?
        .contiguous()?;
    let sd = HashMap::from([(PROMPT_EMBEDDINGS.to_string(), out)]);
    write_safetensors(&dir.join(WEIGHTS_FILE), &sd)?;
    let mut cfg = cfg.clone();
    cfg.inference_mode = true;
    let text = serde_json::to_string_pretty(&cfg).expect("a config always serializes");
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Read `prompt_embeddings` from `dir`'s weights file, checked against the shape the config
/// and the model imply before anything is allocated.
pub fn read_prompt_embeddings(
    model: &dyn Model,
    cfg: &PromptLearningConfig,
    dir: &Path,
) -> Result<(PromptLearningConfig, Tensor)> {
    let config_path = dir.join(CONFIG_FILE);
    let config = cfg.for_model(model, &config_path.display().to_string())?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() {
        return Err(Error::file(&path, "missing"));
    }
    let want = [config.total_virtual_tokens(), config.prompt_width()];
    let file = crate::fsutil::open_regular(&path)?;
    // SAFETY: read-only map of a file we only read.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(&path, e))?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::file(&path, format!("not a valid safetensors file: {e}")))?;
    let mut names = st.names();
    names.sort();
    if let Some(other) = names.iter().find(|n| **n != PROMPT_EMBEDDINGS) {
        return Err(Error::file(
            &path,
            format!("tensor `{other}` is not PEFT's `{PROMPT_EMBEDDINGS}` (a prompt learning adapter holds only that)"),
        ));
    }
    let view = st
        .tensor(PROMPT_EMBEDDINGS)
        .map_err(|_| Error::file(&path, format!("tensor `{PROMPT_EMBEDDINGS}` is missing")))?;
    if view.shape() != want {
        return Err(Error::file(
            &path,
            format!(
                "tensor `{PROMPT_EMBEDDINGS}` is {:?} but {} (num_virtual_tokens {}, token_dim {}) on {} implies {want:?}",
                view.shape(),
                config_path.display(),
                config.num_virtual_tokens,
                config.token_dim.unwrap_or(0),
                model.describe()
            ),
        ));
    }
    drop(mmap);
    let mut tensors = candle_core::safetensors::load(&path, model.device())
        .map_err(|e| Error::file(&path, crate::error::first_line(&e.to_string())))?;
    let t = tensors
        .remove(PROMPT_EMBEDDINGS)
        .ok_or_else(|| {
            Error::file(
                &path,
                format!("no tensor `{PROMPT_EMBEDDINGS}` (the file changed while it was read)"),
            )
        })?
        .to_dtype(DType::F32)?;
    // A prompt that diverged in training (or a damaged file) would turn every output into NaN.
    let rows = t.to_vec2::<f32>()?;
    if let Some(i) = rows.iter().position(|r| r.iter().any(|x| !x.is_finite())) {
        return Err(Error::file(
            &path,
            format!("tensor `{PROMPT_EMBEDDINGS}`: virtual token {i} holds a non-finite value (NaN or infinity)"),
        ));
    }
    Ok((config, t))
}

/// Load the prompt learning adapter in `dir` (its config already read) onto `model`: the saved
/// prompt, fixed, as PEFT loads it in inference mode.
pub fn load_prompt_adapter(
    model: &mut dyn Model,
    cfg: &PromptLearningConfig,
    dir: &Path,
) -> Result<(PromptLearningConfig, ParamCount)> {
    if model.virtual_prompt().is_some() {
        return Err(Error::file(
            dir.join(CONFIG_FILE),
            "the model already reads a soft prompt: one prompt learning adapter at a time (as PEFT's forward takes one)",
        ));
    }
    let (config, t) = read_prompt_embeddings(model, cfg, dir)?;
    let encoder = Arc::new(PromptEncoder::plain(
        kind_of(config.peft_type),
        config.num_virtual_tokens,
        Var::from_tensor(&t)?,
    ));
    model
        .set_virtual_prompt(Some(encoder.clone()))
        .map_err(|e| Error::file(dir.join(CONFIG_FILE), e))?;
    let params = prompt_param_count(model, &encoder);
    Ok((config, params))
}

/// One vocabulary token near a virtual token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadoutToken {
    pub token: String,
    pub id: u32,
    pub cosine: f32,
}

/// The nearest tokens of one virtual token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readout {
    pub index: usize,
    pub nearest: Vec<ReadoutToken>,
}

/// For each virtual token of `prompt` `(n, hidden)`, the `k` vocabulary tokens whose input
/// embeddings are nearest by cosine similarity, best first (ties: lower id first).
pub fn readout(
    model: &dyn Model,
    tokenizer: &Tokenizer,
    prompt: &Tensor,
    k: usize,
) -> Result<Vec<Readout>> {
    let emb = input_embeddings(model)?;
    let (vocab, hidden) = emb.dims2()?;
    let (n, width) = prompt.dims2()?;
    if width != hidden {
        return Err(Error::msg(format!(
            "the prompt is {width} wide but the model's embeddings are {hidden}: readout reads input-embedding prompts (prompt tuning, P-tuning), not prefix tuning's key/value prefixes"
        )));
    }
    let unit = |t: &Tensor| -> Result<Tensor> {
        let norm = t.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(t.broadcast_div(&norm)?)
    };
    let sims = unit(&prompt.to_dtype(DType::F32)?)?
        .matmul(&unit(&emb)?.t()?)?
        .to_vec2::<f32>()?;
    let k = k.min(vocab);
    let mut out = Vec::with_capacity(n);
    for (index, row) in sims.iter().enumerate() {
        let mut ids: Vec<u32> = (0..vocab as u32).collect();
        let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        if k < vocab {
            ids.select_nth_unstable_by(k, by);
            ids.truncate(k);
        }
        ids.sort_by(by);
        let nearest = ids
            .into_iter()
            .map(|id| {
                Ok(ReadoutToken {
                    token: tokenizer.decode(&[id], false)?,
                    id,
                    cosine: row[id as usize],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(Readout { index, nearest });
    }
    Ok(out)
}

/// [`readout`] of the adapter in `dir` (prompt tuning or P-tuning).
pub fn readout_adapter(
    model: &dyn Model,
    tokenizer: &Tokenizer,
    dir: &Path,
    k: usize,
) -> Result<Vec<Readout>> {
    let cfg = match crate::peft::format::read_adapter_config(dir)? {
        crate::peft::format::AdapterConfig::Prompt(c) => c,
        other => {
            return Err(Error::file(
                dir.join(CONFIG_FILE),
                format!(
                    "peft_type {} has no soft prompt to read out (PROMPT_TUNING, P_TUNING)",
                    other.peft_type()
                ),
            ))
        }
    };
    if cfg.peft_type == PromptMethod::PrefixTuning {
        return Err(Error::key(
            dir.join(CONFIG_FILE).display().to_string(),
            "peft_type",
            "PREFIX_TUNING holds key/value prefixes, not input embeddings: readout reads PROMPT_TUNING and P_TUNING adapters",
        ));
    }
    if k == 0 {
        return Err(Error::msg("--k must be at least 1"));
    }
    let (config, t) = read_prompt_embeddings(model, &cfg, dir)?;
    // An encoder-decoder's table holds a prompt per stack (2n rows); the model, as PEFT's
    // forward, reads the first n: those are the virtual tokens.
    let t = t.narrow(0, 0, config.num_virtual_tokens.min(t.dim(0)?))?;
    readout(model, tokenizer, &t, k)
}
