//! Hyper-parameters of a LLaMA-family decoder, read from an HF `config.json` or GGUF metadata.
//!
//! Every value is checked here, before anything is allocated from it: sizes against the
//! [`limits`] below (the tensors actually present are checked later, in `Llama::load`), floats
//! for NaN, infinity and sign. A bad value is a one-line error naming the file and the key as
//! that file spells it (`hidden_size` in config.json, `llama.embedding_length` in a GGUF).
use crate::{Error, Result};
use serde_json::Value;

/// Architectures that share the LLaMA block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
pub const SUPPORTED_ARCHS: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Upper bounds on sizes read from model files. They sit far above every released model of the
/// supported families (the largest, Llama 3.1 405B: hidden 16384, ffn 53248, 126 layers, 128
/// heads, vocabulary 128256, context 131072) and far below what would overflow or exhaust
/// memory before the real check, the tensors in the file, is reached.
pub mod limits {
    /// `hidden_size`, `intermediate_size`, and the attention width `heads * head_dim`.
    pub const MAX_WIDTH: usize = 1 << 20;
    /// `num_hidden_layers`.
    pub const MAX_LAYERS: usize = 4096;
    /// `vocab_size`.
    pub const MAX_VOCAB: usize = 1 << 24;
    /// `num_attention_heads` and `num_key_value_heads`.
    pub const MAX_HEADS: usize = 4096;
    /// `max_position_embeddings` (and RoPE scaling's original context).
    pub const MAX_CONTEXT: usize = 1 << 24;
    /// The RoPE cos/sin tables are computed at load for the whole context: context * head_dim / 2
    /// values each, at most 1 GiB per table.
    pub const MAX_ROPE_TABLE: usize = 1 << 28;

    /// A size read from a config: at least 1 and at most `max`; else what is wrong, for an
    /// error that names the file and the key.
    pub fn check_size(v: usize, max: usize) -> std::result::Result<(), String> {
        if v == 0 {
            return Err("must be at least 1".into());
        }
        if v > max {
            return Err(format!("{v} is larger than the limit {max}"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// One divisor per frequency, as llama.cpp stores Llama 3.1's scaling in GGUF files (the
    /// `rope_freqs.weight` tensor): `inv_freq_i = base^(-2i/d) / factors[i]`.
    Freqs { factors: Vec<f32> },
}

/// Where each hyper-parameter came from: the file and the key as that file names it, so an
/// error says what to fix. For a GGUF value that was inferred (the vocabulary size from the token
/// list, the head size from the width), the key says so.
#[derive(Debug, Clone)]
pub struct ConfigKeys {
    /// The file the values were read from (config.json or the .gguf file).
    pub file: String,
    pub hidden_size: String,
    pub intermediate_size: String,
    pub num_hidden_layers: String,
    pub num_attention_heads: String,
    pub num_key_value_heads: String,
    pub head_dim: String,
    pub vocab_size: String,
    pub rms_norm_eps: String,
    pub rope_theta: String,
    pub rope_scaling: String,
    pub max_position_embeddings: String,
    pub bos_token_id: String,
    pub eos_token_id: String,
}

/// Provenance is for messages only: two configs that describe the same model are equal
/// whichever file (config.json, a GGUF, another folder) they were read from.
impl PartialEq for ConfigKeys {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl ConfigKeys {
    /// Keys of an HF `config.json` at `file`.
    pub fn hf(file: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            hidden_size: "hidden_size".into(),
            intermediate_size: "intermediate_size".into(),
            num_hidden_layers: "num_hidden_layers".into(),
            num_attention_heads: "num_attention_heads".into(),
            num_key_value_heads: "num_key_value_heads".into(),
            head_dim: "head_dim".into(),
            vocab_size: "vocab_size".into(),
            rms_norm_eps: "rms_norm_eps".into(),
            rope_theta: "rope_theta".into(),
            rope_scaling: "rope_scaling".into(),
            max_position_embeddings: "max_position_embeddings".into(),
            bos_token_id: "bos_token_id".into(),
            eos_token_id: "eos_token_id".into(),
        }
    }

    /// Keys of GGUF metadata for architecture `arch` (llama.cpp's `{arch}.*` names).
    pub fn gguf(file: impl Into<String>, arch: &str) -> Self {
        Self {
            file: file.into(),
            hidden_size: format!("{arch}.embedding_length"),
            intermediate_size: format!("{arch}.feed_forward_length"),
            num_hidden_layers: format!("{arch}.block_count"),
            num_attention_heads: format!("{arch}.attention.head_count"),
            num_key_value_heads: format!("{arch}.attention.head_count_kv"),
            head_dim: format!("{arch}.attention.key_length"),
            vocab_size: format!("{arch}.vocab_size"),
            rms_norm_eps: format!("{arch}.attention.layer_norm_rms_epsilon"),
            rope_theta: format!("{arch}.rope.freq_base"),
            rope_scaling: format!("{arch}.rope.scaling"),
            max_position_embeddings: format!("{arch}.context_length"),
            bos_token_id: "tokenizer.ggml.bos_token_id".into(),
            eos_token_id: "tokenizer.ggml.eos_token_id".into(),
        }
    }

    /// A one-line error about `key` of this file.
    pub fn err(&self, key: &str, what: impl std::fmt::Display) -> Error {
        Error::key(&self.file, key, what)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// HF architecture name, e.g. "LlamaForCausalLM".
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Where the values came from, for error messages.
    pub keys: ConfigKeys,
}

/// Print a warning about a value that is valid but odd (the CLI shows stderr; there is no
/// logger to route it through).
pub(crate) fn warn(msg: impl std::fmt::Display) {
    eprintln!("warning: {msg}");
}

impl LlamaConfig {
    pub fn num_params(&self) -> u64 {
        // u64 throughout: the product of sizes must not wrap even for configs never validated.
        let h = self.hidden_size as u64;
        let q = self.num_attention_heads as u64 * self.head_dim as u64;
        let kv = self.num_key_value_heads as u64 * self.head_dim as u64;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let mut per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.o_bias {
            per_layer += h;
        }
        if self.mlp_bias {
            per_layer += 2 * i + h;
        }
        let emb = v * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        emb + head + h + per_layer * self.num_hidden_layers as u64
    }

    /// Values that are valid (transformers accepts them) but odd, one message each.
    pub fn warnings(&self) -> Vec<String> {
        let k = &self.keys;
        let mut out = Vec::new();
        if self.rms_norm_eps == 0.0 {
            out.push(format!(
                "{}: key `{}` is 0: an all-zero hidden state would normalize to NaN",
                k.file, k.rms_norm_eps
            ));
        }
        if let Some(RopeScaling::Llama3 {
            low_freq_factor,
            high_freq_factor,
            ..
        }) = &self.rope_scaling
        {
            if high_freq_factor <= low_freq_factor {
                out.push(format!(
                    "{}: key `{}`: high_freq_factor {high_freq_factor} is not above low_freq_factor {low_freq_factor}, so no frequency is smoothed",
                    k.file, k.rope_scaling
                ));
            }
        }
        out
    }

    /// [`Self::validate`], then print [`Self::warnings`]: what a loader calls once per file.
    pub fn validate_and_warn(&self) -> Result<()> {
        self.validate()?;
        self.warnings().into_iter().for_each(warn);
        Ok(())
    }

    /// Check every value against [`limits`] and for NaN, infinity, zero and sign, so nothing is
    /// allocated or indexed from a bad one. Errors name the file and the key (`self.keys`).
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let k = &self.keys;
        let size = |key: &str, v: usize, max: usize| -> Result<()> {
            check_size(v, max).map_err(|e| k.err(key, e))
        };
        size(&k.hidden_size, self.hidden_size, MAX_WIDTH)?;
        size(&k.intermediate_size, self.intermediate_size, MAX_WIDTH)?;
        size(&k.num_hidden_layers, self.num_hidden_layers, MAX_LAYERS)?;
        size(&k.num_attention_heads, self.num_attention_heads, MAX_HEADS)?;
        size(&k.num_key_value_heads, self.num_key_value_heads, MAX_HEADS)?;
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(k.err(
                &k.num_key_value_heads,
                format!(
                    "{} must divide {} {}",
                    self.num_key_value_heads, k.num_attention_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim < 2 || !self.head_dim.is_multiple_of(2) {
            return Err(k.err(
                &k.head_dim,
                format!(
                    "{} must be even and at least 2 (RoPE rotates pairs)",
                    self.head_dim
                ),
            ));
        }
        if self
            .num_attention_heads
            .checked_mul(self.head_dim)
            .is_none_or(|w| w > MAX_WIDTH)
        {
            return Err(k.err(
                &k.head_dim,
                format!(
                    "{} heads of {} is wider than the limit {MAX_WIDTH}",
                    self.num_attention_heads, self.head_dim
                ),
            ));
        }
        size(&k.vocab_size, self.vocab_size, MAX_VOCAB)?;
        // Special tokens index the embeddings (and a GGUF export's token list).
        let in_vocab = |key: &str, id: u32| -> Result<()> {
            if id as usize >= self.vocab_size {
                return Err(k.err(
                    key,
                    format!(
                        "token id {id} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                ));
            }
            Ok(())
        };
        if let Some(b) = self.bos_token_id {
            in_vocab(&k.bos_token_id, b)?;
        }
        for &e in &self.eos_token_ids {
            in_vocab(&k.eos_token_id, e)?;
        }
        size(
            &k.max_position_embeddings,
            self.max_position_embeddings,
            MAX_CONTEXT,
        )?;
        // Both factors are bounded above, so the product cannot wrap.
        let table = self.max_position_embeddings * (self.head_dim / 2);
        if table > MAX_ROPE_TABLE {
            return Err(k.err(
                &k.max_position_embeddings,
                format!(
                    "{} positions of head_dim {} need RoPE tables of {table} values, more than the limit {MAX_ROPE_TABLE}",
                    self.max_position_embeddings, self.head_dim
                ),
            ));
        }
        // an epsilon beyond 1 swamps the activations' mean square (1e308 zeroed every
        // output: the model ran and printed nothing); real models use 1e-6 to 1e-5
        if !self.rms_norm_eps.is_finite() || !(0.0..=1.0).contains(&self.rms_norm_eps) {
            return Err(k.err(
                &k.rms_norm_eps,
                format!("{} must be a number from 0 to 1", self.rms_norm_eps),
            ));
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 0.0 {
            return Err(k.err(
                &k.rope_theta,
                format!("{} must be a finite number > 0", self.rope_theta),
            ));
        }
        let sub = |name: &str| format!("{}.{name}", k.rope_scaling);
        let positive = |name: &str, x: f32| -> Result<()> {
            if !x.is_finite() || x <= 0.0 {
                return Err(k.err(&sub(name), format!("{x} must be a finite number > 0")));
            }
            Ok(())
        };
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => positive("factor", *factor)?,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                size(
                    &sub("original_max_position_embeddings"),
                    *original_max_position_embeddings,
                    MAX_CONTEXT,
                )?;
            }
            Some(RopeScaling::Freqs { factors }) => {
                if factors.len() != self.head_dim / 2 {
                    return Err(Error::msg(format!(
                        "{}: tensor `rope_freqs.weight` has {} values but {} {} implies {}",
                        k.file,
                        factors.len(),
                        k.head_dim,
                        self.head_dim,
                        self.head_dim / 2
                    )));
                }
                if let Some((i, x)) = factors
                    .iter()
                    .enumerate()
                    .find(|(_, x)| !x.is_finite() || **x <= 0.0)
                {
                    return Err(Error::msg(format!(
                        "{}: tensor `rope_freqs.weight`: value {i} is {x}; every factor must be a finite number > 0",
                        k.file
                    )));
                }
            }
        }
        Ok(())
    }

    /// Parse an HF `config.json` value. `source` names the file for error messages.
    pub fn from_hf_json(v: &Value, source: &str) -> Result<Self> {
        let arch = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(str::to_string)
            .or_else(|| {
                v.get("model_type")
                    .and_then(|m| m.as_str())
                    .and_then(|m| match m {
                        "llama" => Some("LlamaForCausalLM".to_string()),
                        "mistral" => Some("MistralForCausalLM".to_string()),
                        "qwen2" => Some("Qwen2ForCausalLM".to_string()),
                        _ => None,
                    })
            })
            .ok_or_else(|| {
                Error::key(source, "architectures", "missing (and no known model_type)")
            })?;
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(Error::UnsupportedArch {
                source_name: source.to_string(),
                arch,
                supported: SUPPORTED_ARCHS.join(", "),
            });
        }
        let as_usize = |k: &str, x: &Value| -> Result<usize> {
            x.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| Error::key(source, k, format!("{x} is not a non-negative integer")))
        };
        let usize_key = |k: &str| -> Result<usize> {
            as_usize(k, v.get(k).ok_or_else(|| Error::key(source, k, "missing"))?)
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => as_usize(k, x).map(Some),
            }
        };
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| Error::key(source, k, "expected a number")),
            }
        };
        let opt_bool = |k: &str| -> Result<Option<bool>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| Error::key(source, k, "expected true or false")),
            }
        };
        let opt_token_id = |k: &str, x: &Value| -> Result<u32> {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| Error::key(source, k, format!("{x} is not a token id")))
        };
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(Error::key(
                    source,
                    "hidden_act",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }
        let mut keys = ConfigKeys::hf(source);
        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 {
            return Err(Error::key(
                source,
                "num_attention_heads",
                "must be at least 1",
            ));
        }
        let head_dim = match opt_usize("head_dim")? {
            Some(d) => d,
            None if !hidden_size.is_multiple_of(num_attention_heads) => {
                return Err(Error::key(
                    source,
                    "hidden_size",
                    format!(
                        "{hidden_size} is not a multiple of num_attention_heads {num_attention_heads} (and there is no head_dim)"
                    ),
                ))
            }
            None => hidden_size / num_attention_heads,
        };
        // transformers >= 5 moved rope settings into `rope_parameters`; older files use
        // `rope_theta` + `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(t) => {
                keys.rope_theta = "rope_parameters.rope_theta".into();
                Some(t.as_f64().ok_or_else(|| {
                    Error::key(source, "rope_parameters.rope_theta", "expected a number")
                })?)
            }
            None => opt_f64("rope_theta")?,
        }
        .unwrap_or(10000.0) as f32;
        let scaling_v = match v.get("rope_scaling").filter(|s| s.is_object()) {
            Some(s) => Some(s),
            None if rope_params.is_some() => {
                keys.rope_scaling = "rope_parameters".into();
                rope_params
            }
            None => None,
        };
        let rope_scaling = match scaling_v {
            None => None,
            Some(s) => parse_rope_scaling(s, source, &keys.rope_scaling)?,
        };
        let is_qwen2 = arch == "Qwen2ForCausalLM";
        let attention_bias = opt_bool("attention_bias")?.unwrap_or(false);
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| opt_token_id("eos_token_id", x))
                .collect::<Result<_>>()?,
            Some(x) => vec![opt_token_id("eos_token_id", x)?],
        };
        let bos_token_id = match v.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(x) => Some(opt_token_id("bos_token_id", x)?),
        };
        let default_tied = false;
        let cfg = Self {
            architecture: arch,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: usize_key("vocab_size")?,
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(default_tied),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: opt_bool("mlp_bias")?.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
            keys,
        };
        cfg.validate_and_warn()?;
        Ok(cfg)
    }
}

/// `rope_scaling` (or transformers 5's `rope_parameters`), called `key` in `source`.
fn parse_rope_scaling(s: &Value, source: &str, key: &str) -> Result<Option<RopeScaling>> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let f = |k: &str| -> Result<f32> {
        s.get(k)
            .and_then(|x| x.as_f64())
            .map(|x| x as f32)
            .ok_or_else(|| Error::key(source, format!("{key}.{k}"), "missing or not a number"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: f("factor")?,
        })),
        "llama3" => {
            let orig_key = "original_max_position_embeddings";
            let original_max_position_embeddings = s
                .get(orig_key)
                .and_then(|x| x.as_u64())
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    Error::key(
                        source,
                        format!("{key}.{orig_key}"),
                        "missing or not a non-negative integer",
                    )
                })?;
            Ok(Some(RopeScaling::Llama3 {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings,
            }))
        }
        other => Err(Error::key(
            source,
            format!("{key}.rope_type"),
            format!("`{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

/// Inverse RoPE frequencies, computed in f32 exactly as transformers does so long positions
/// produce the same angles.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0f32 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match &cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= factor),
        Some(RopeScaling::Freqs { factors }) => {
            // llama.cpp: theta_i = p * base^(-2i/d) / rope_freqs[i].
            inv.iter_mut().zip(factors).for_each(|(f, s)| *f /= s)
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f32;
            let low_wl = old / low_freq_factor;
            let high_wl = old / high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wl { *f / factor } else { *f };
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                // transformers: not (wavelen < high) and not (wavelen > low); no NaNs occur here.
                let is_medium = wavelen >= high_wl && wavelen <= low_wl;
                *f = if is_medium { smoothed } else { scaled };
            }
        }
    }
    inv
}

/// The `rope_freqs.weight` values llama.cpp's `convert_hf_to_gguf.py` writes for Llama 3
/// scaling (`LlamaModel.generate_extra_tensors`), in f32 as it computes them.
pub fn llama3_rope_freqs(
    rope_theta: f32,
    head_dim: usize,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_position_embeddings: usize,
) -> Vec<f32> {
    let old = original_max_position_embeddings as f32;
    let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0f32 / rope_theta.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wl {
                1.0
            } else if wavelen > low_wl {
                factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

impl RopeScaling {
    /// The Llama 3 parameters per-frequency factors stand for, when they are the ones every
    /// Llama 3.1 / 3.2 checkpoint uses (low 1, high 4, original context 8192, the largest factor
    /// as `factor`) and reproduce the factors to 1e-5. config.json has no way to state arbitrary
    /// per-frequency factors, so only these can be written back.
    pub fn llama3_equivalent(&self, rope_theta: f32, head_dim: usize) -> Option<RopeScaling> {
        let RopeScaling::Freqs { factors } = self else {
            return None;
        };
        let factor = factors.iter().copied().fold(f32::NAN, f32::max);
        let (low, high, old) = (1.0, 4.0, 8192);
        let want = llama3_rope_freqs(rope_theta, head_dim, factor, low, high, old);
        let same = want.len() == factors.len()
            && want
                .iter()
                .zip(factors)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * a.abs().max(1.0));
        same.then_some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        })
    }
}

impl LlamaConfig {
    /// The HF `config.json` for this model (transformers 4.x layout, which 5.x also reads).
    /// Fails for per-frequency RoPE factors that no `rope_scaling` of config.json expresses.
    pub fn to_hf_json(&self) -> Result<Value> {
        let model_type = match self.architecture.as_str() {
            "MistralForCausalLM" => "mistral",
            "Qwen2ForCausalLM" => "qwen2",
            _ => "llama",
        };
        let mut v = serde_json::json!({
            "architectures": [self.architecture],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => v["eos_token_id"] = (*e).into(),
            many => v["eos_token_id"] = many.to_vec().into(),
        }
        let scaling = match &self.rope_scaling {
            Some(freqs @ RopeScaling::Freqs { .. }) => Some(
                freqs
                    .llama3_equivalent(self.rope_theta, self.head_dim)
                    .ok_or_else(|| {
                        Error::msg(format!(
                            "{}: the per-frequency RoPE factors (rope_freqs.weight) are not Llama 3.1's scaling, and config.json cannot express others",
                            self.keys.file
                        ))
                    })?,
            ),
            other => other.clone(),
        };
        match scaling {
            None | Some(RopeScaling::Freqs { .. }) => {}
            Some(RopeScaling::Linear { factor }) => {
                v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor,
                    "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny fixture's config.json with `edit` applied, parsed.
    fn parse_with(edit: impl FnOnce(&mut Value)) -> Result<LlamaConfig> {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 256
        });
        edit(&mut v);
        LlamaConfig::from_hf_json(&v, "m/config.json")
    }

    fn err_with(edit: impl FnOnce(&mut Value)) -> String {
        let e = parse_with(edit).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with("m/config.json: "), "{e}");
        e
    }

    #[test]
    fn valid_config_parses_and_names_its_keys() {
        let c = parse_with(|_| {}).unwrap();
        assert_eq!((c.hidden_size, c.head_dim, c.vocab_size), (64, 16, 256));
        assert_eq!(c.keys, ConfigKeys::hf("m/config.json"));
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn every_size_is_bounded_and_nonzero() {
        for key in [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
        ] {
            for v in [0u64, 1 << 32, 1 << 40, u64::MAX] {
                let e = err_with(|c| c[key] = v.into());
                assert!(e.contains(&format!("`{key}`")), "{key}={v}: {e}");
            }
        }
    }

    #[test]
    fn widths_that_do_not_split_into_heads() {
        let e = err_with(|c| c["num_key_value_heads"] = 3.into());
        assert!(e.contains("`num_key_value_heads`: 3 must divide"), "{e}");
        let e = err_with(|c| {
            c["hidden_size"] = 65.into();
            c.as_object_mut().unwrap().remove("head_dim");
        });
        assert!(e.contains("`hidden_size`: 65 is not a multiple"), "{e}");
        let e = err_with(|c| c["head_dim"] = 15.into());
        assert!(e.contains("`head_dim`: 15 must be even"), "{e}");
        // 4 heads of 2^19 are wider than the limit (and would overflow a u32 product).
        let e = err_with(|c| c["head_dim"] = (1u64 << 19).into());
        assert!(
            e.contains("`head_dim`") && e.contains("wider than the limit"),
            "{e}"
        );
    }

    #[test]
    fn rope_tables_are_bounded() {
        // 2^24 positions of head_dim 64: 2^29 values per table, above the 2^28 limit.
        let e = err_with(|c| {
            c["max_position_embeddings"] = (1u64 << 24).into();
            c["head_dim"] = 64.into();
            c["num_attention_heads"] = 1.into();
            c["num_key_value_heads"] = 1.into();
        });
        assert!(
            e.contains("`max_position_embeddings`") && e.contains("RoPE tables"),
            "{e}"
        );
    }

    #[test]
    fn floats_must_be_finite_and_positive() {
        for (key, v) in [
            ("rope_theta", -1.0),
            ("rope_theta", 0.0),
            ("rope_theta", 1e39),
            ("rms_norm_eps", -1e-6),
            ("rms_norm_eps", 1e308),
            ("rms_norm_eps", 2.0),
        ] {
            let e = err_with(|c| c[key] = serde_json::json!(v));
            assert!(e.contains(&format!("`{key}`")), "{key}={v}: {e}");
        }
        let e = err_with(|c| {
            c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 0.0})
        });
        assert!(e.contains("`rope_parameters.rope_theta`"), "{e}");
        // rms_norm_eps 0 is what transformers accepts: a warning, not an error
        let c = parse_with(|c| c["rms_norm_eps"] = 0.0.into()).unwrap();
        assert_eq!(c.warnings().len(), 1);
        assert!(c.warnings()[0].contains("`rms_norm_eps` is 0"));
    }

    #[test]
    fn rope_scaling_factors_must_be_positive() {
        let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        for (field, v) in [
            ("factor", serde_json::json!(0.0)),
            ("factor", serde_json::json!(-8.0)),
            ("low_freq_factor", serde_json::json!(0.0)),
            ("high_freq_factor", serde_json::json!(-1.0)),
            ("original_max_position_embeddings", serde_json::json!(0)),
            (
                "original_max_position_embeddings",
                serde_json::json!(8192.5),
            ),
            (
                "original_max_position_embeddings",
                serde_json::json!(1u64 << 40),
            ),
        ] {
            let mut s = llama3.clone();
            s[field] = v.clone();
            let e = err_with(|c| c["rope_scaling"] = s);
            assert!(
                e.contains(&format!("`rope_scaling.{field}`")),
                "{field}={v}: {e}"
            );
        }
        let e = err_with(|c| {
            c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": -1.0})
        });
        assert!(e.contains("`rope_scaling.factor`"), "{e}");
        // transformers >= 5 keeps the scaling in rope_parameters; errors say so
        let e = err_with(|c| {
            c["rope_parameters"] =
                serde_json::json!({"rope_type": "linear", "factor": 0.0, "rope_theta": 1e4})
        });
        assert!(e.contains("`rope_parameters.factor`"), "{e}");
        // high <= low: transformers warns, so do we
        let mut s = llama3;
        s["high_freq_factor"] = 1.0.into();
        let c = parse_with(|c| c["rope_scaling"] = s).unwrap();
        assert!(
            c.warnings()[0].contains("high_freq_factor"),
            "{:?}",
            c.warnings()
        );
    }

    #[test]
    fn token_ids_must_fit_u32() {
        let e = err_with(|c| c["eos_token_id"] = serde_json::json!([2, 1u64 << 40]));
        assert!(e.contains("`eos_token_id`"), "{e}");
        let e = err_with(|c| c["bos_token_id"] = (-1).into());
        assert!(e.contains("`bos_token_id`"), "{e}");
        let e = err_with(|c| c["bos_token_id"] = 99_999_999.into());
        assert!(
            e.contains("`bos_token_id`") && e.contains("outside the vocabulary"),
            "{e}"
        );
        let e = err_with(|c| c["eos_token_id"] = serde_json::json!([2, 9_999_999]));
        assert!(e.contains("`eos_token_id`") && e.contains("9999999"), "{e}");
    }

    fn llama31_like() -> LlamaConfig {
        let mut c = parse_with(|c| {
            c["head_dim"] = 128.into();
            c["hidden_size"] = 512.into();
            c["rope_theta"] = 500000.0.into();
            c["max_position_embeddings"] = 131072.into();
        })
        .unwrap();
        c.rope_scaling = Some(RopeScaling::Freqs {
            factors: llama3_rope_freqs(500000.0, 128, 8.0, 1.0, 4.0, 8192),
        });
        c
    }

    #[test]
    fn per_frequency_factors_match_llama3_scaling() {
        // llama.cpp's factors applied as divisors give transformers' llama3 frequencies.
        let freqs = llama31_like();
        let mut l3 = freqs.clone();
        l3.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let (a, b) = (rope_inv_freq(&freqs), rope_inv_freq(&l3));
        assert_eq!(a.len(), 64);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * y.abs(), "{x} vs {y}");
        }
        // and the plain frequencies differ, so the comparison means something
        let mut plain = freqs.clone();
        plain.rope_scaling = None;
        assert!(rope_inv_freq(&plain)[63] > 7.0 * a[63]);
    }

    #[test]
    fn config_json_gets_llama3_scaling_back_from_standard_factors_only() {
        let c = llama31_like();
        let v = c.to_hf_json().unwrap();
        assert_eq!(v["rope_scaling"]["rope_type"], "llama3");
        assert_eq!(v["rope_scaling"]["factor"], 8.0);
        assert_eq!(v["rope_scaling"]["original_max_position_embeddings"], 8192);
        let mut odd = c;
        odd.rope_scaling = Some(RopeScaling::Freqs {
            factors: llama3_rope_freqs(500000.0, 128, 8.0, 1.0, 4.0, 64),
        });
        let e = odd.to_hf_json().unwrap_err().to_string();
        assert!(
            e.contains("rope_freqs.weight") && e.contains("m/config.json"),
            "{e}"
        );
    }

    #[test]
    fn per_frequency_factors_are_validated() {
        let mut c = llama31_like();
        c.validate().unwrap();
        if let Some(RopeScaling::Freqs { factors }) = &mut c.rope_scaling {
            factors[3] = f32::NAN;
        }
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("rope_freqs.weight") && e.contains("value 3"),
            "{e}"
        );
        if let Some(RopeScaling::Freqs { factors }) = &mut c.rope_scaling {
            factors.pop();
        }
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("has 63 values") && e.contains("64"), "{e}");
    }
}
