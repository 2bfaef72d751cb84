//! Hyper-parameters of a LLaMA-family decoder, read from an HF `config.json` or GGUF metadata.
use crate::{Error, Result};
use serde_json::Value;

/// Architectures that share the LLaMA block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
pub const SUPPORTED_ARCHS: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

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
}

impl LlamaConfig {
    pub fn num_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
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
        let usize_key = |k: &str| -> Result<usize> {
            v.get(k)
                .ok_or_else(|| Error::key(source, k, "missing"))?
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| Error::key(source, k, "expected a non-negative integer"))
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| Error::key(source, k, "expected a non-negative integer")),
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
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(Error::key(
                    source,
                    "hidden_act",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }
        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(Error::key(
                source,
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} must divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim % 2 != 0 {
            return Err(Error::key(source, "head_dim", "must be even for RoPE"));
        }
        // transformers >= 5 moved rope settings into `rope_parameters`; older files use
        // `rope_theta` + `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(opt_f64("rope_theta")?)
            .unwrap_or(10000.0) as f32;
        let scaling_v = v
            .get("rope_scaling")
            .filter(|s| s.is_object())
            .or(rope_params);
        let rope_scaling = match scaling_v {
            None => None,
            Some(s) => parse_rope_scaling(s, source)?,
        };
        let is_qwen2 = arch == "Qwen2ForCausalLM";
        let attention_bias = opt_bool("attention_bias")?.unwrap_or(false);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        };
        let default_tied = false;
        Ok(Self {
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
            bos_token_id: opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
        })
    }
}

fn parse_rope_scaling(s: &Value, source: &str) -> Result<Option<RopeScaling>> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let f = |k: &str| -> Result<f32> {
        s.get(k)
            .and_then(|x| x.as_f64())
            .map(|x| x as f32)
            .ok_or_else(|| {
                Error::key(
                    source,
                    format!("rope_scaling.{k}"),
                    "missing or not a number",
                )
            })
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: f("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
        })),
        other => Err(Error::key(
            source,
            "rope_scaling.rope_type",
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

impl LlamaConfig {
    /// The HF `config.json` for this model (transformers 4.x layout, which 5.x also reads).
    pub fn to_hf_json(&self) -> Value {
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
        match &self.rope_scaling {
            None => {}
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
        v
    }
}
