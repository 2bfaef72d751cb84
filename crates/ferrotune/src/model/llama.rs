//! LLaMA-family decoder (SmolLM2, TinyLlama, Llama 2/3, Mistral, Qwen2): RMSNorm, RoPE, GQA
//! attention, SwiGLU MLP, tied or untied embeddings. Every op it uses has a backward pass
//! (see `ops`), so the same code serves generation and training.
use super::config::{rope_inv_freq, LlamaConfig};
use super::family::{ArchitectureKind, Dims, MicroBatchGrads, Model, Objective, Task, TaskType};
use super::family::{SoftPrompt, VirtualTokens};
use super::weights::{ExpectedTensor, WeightSource};
use crate::data::{Batch, Targets};
use crate::nn::{Embedding, EmbeddingWeight, Linear, RmsNorm};
use crate::ops;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;
use std::sync::Arc;

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// Keys and values of past positions, one entry per layer: (batch, kv_heads, seq, head_dim).
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// None when tied to the embeddings.
    pub lm_head: Linear,
    pub cos: Tensor,
    pub sin: Tensor,
    device: Device,
    /// A soft prompt read by every forward pass (see [`Model::set_virtual_prompt`]).
    prompt: Option<Arc<dyn SoftPrompt>>,
    /// The fast engine's KV cache type (`generate` / `serve --kv-cache`): 0 f32, 1 f16. An
    /// atomic so it is set through a shared `&dyn Model`, as the quantized weights' settings are.
    kv_f16: std::sync::atomic::AtomicBool,
}

/// A soft prompt's values shaped for a batch of rows.
enum PromptInput {
    /// `(b, n, hidden)`, put before the token embeddings.
    Embeddings(Tensor),
    /// Per layer `(k, v)`, each `(b, kv_heads, n, head_dim)`: the first entries of the KV cache.
    Prefix(Vec<(Tensor, Tensor)>),
}

fn linear(src: &dyn WeightSource, name: &str, bias: bool) -> crate::Result<Linear> {
    let weight = src.linear_weight(&format!("{name}.weight"))?;
    let bias = if bias {
        Some(src.dense(&format!("{name}.bias"))?.to_dtype(DType::F32)?)
    } else {
        None
    };
    Ok(Linear::new(name, weight, bias))
}

/// The weights of each decoder layer, relative to `model.layers.{i}`.
pub const LAYER_WEIGHTS: [&str; 9] = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// A weight's new value for [`Llama::set_parameter`] / [`Llama::set_frozen_weight`].
#[derive(Clone, Copy)]
enum WeightValue<'a> {
    Trainable(&'a Var),
    Frozen(&'a Tensor),
    Quantized(&'a Arc<crate::quant::QuantWeight>),
}

/// `model.layers.{i}.{rest}` -> `(i, rest)`.
pub fn layer_of_parameter(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Every tensor `cfg` implies, with its shape (the LM head when the config says it is untied).
fn expected_tensors<'a>(cfg: &'a LlamaConfig) -> Vec<ExpectedTensor<'a>> {
    let k = &cfg.keys;
    let h = (k.hidden_size.as_str(), cfg.hidden_size);
    let heads = (k.num_attention_heads.as_str(), cfg.num_attention_heads);
    let kv = (k.num_key_value_heads.as_str(), cfg.num_key_value_heads);
    let hd = (k.head_dim.as_str(), cfg.head_dim);
    let inter = (k.intermediate_size.as_str(), cfg.intermediate_size);
    let vocab = (k.vocab_size.as_str(), cfg.vocab_size);
    // validate() bounds every factor, so these products cannot wrap.
    let q_rows = cfg.num_attention_heads * cfg.head_dim;
    let kv_rows = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = Vec::new();
    let mut t = |name: String, shape: &[usize], because: &[(&'a str, usize)]| {
        out.push(ExpectedTensor {
            name,
            shape: shape.to_vec(),
            because: because.to_vec(),
        })
    };
    t(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, cfg.hidden_size],
        &[vocab, h],
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t(format!("{p}.{norm}.weight"), &[cfg.hidden_size], &[h]);
        }
        let attn = format!("{p}.self_attn");
        t(
            format!("{attn}.q_proj.weight"),
            &[q_rows, cfg.hidden_size],
            &[heads, hd, h],
        );
        t(
            format!("{attn}.k_proj.weight"),
            &[kv_rows, cfg.hidden_size],
            &[kv, hd, h],
        );
        t(
            format!("{attn}.v_proj.weight"),
            &[kv_rows, cfg.hidden_size],
            &[kv, hd, h],
        );
        t(
            format!("{attn}.o_proj.weight"),
            &[cfg.hidden_size, q_rows],
            &[h, heads, hd],
        );
        if cfg.qkv_bias {
            t(format!("{attn}.q_proj.bias"), &[q_rows], &[heads, hd]);
            t(format!("{attn}.k_proj.bias"), &[kv_rows], &[kv, hd]);
            t(format!("{attn}.v_proj.bias"), &[kv_rows], &[kv, hd]);
        }
        if cfg.o_bias {
            t(format!("{attn}.o_proj.bias"), &[cfg.hidden_size], &[h]);
        }
        let mlp = format!("{p}.mlp");
        for proj in ["gate_proj", "up_proj"] {
            t(
                format!("{mlp}.{proj}.weight"),
                &[cfg.intermediate_size, cfg.hidden_size],
                &[inter, h],
            );
            if cfg.mlp_bias {
                t(
                    format!("{mlp}.{proj}.bias"),
                    &[cfg.intermediate_size],
                    &[inter],
                );
            }
        }
        t(
            format!("{mlp}.down_proj.weight"),
            &[cfg.hidden_size, cfg.intermediate_size],
            &[h, inter],
        );
        if cfg.mlp_bias {
            t(format!("{mlp}.down_proj.bias"), &[cfg.hidden_size], &[h]);
        }
    }
    t("model.norm.weight".into(), &[cfg.hidden_size], &[h]);
    // Untied and no head: transformers would start `lm_head` from random values (a warning
    // among many); a model that prints noise is worse than an error that names the key.
    if !cfg.tie_word_embeddings {
        t(
            "lm_head.weight".into(),
            &[cfg.vocab_size, cfg.hidden_size],
            &[vocab, h],
        );
    }
    out
}

/// Check the source against the config before any weight is read: the layers present match the
/// layer count, and every tensor the config implies is there with the implied shape. The
/// decoders index their buffers by the config's sizes, so a tensor one column short must be an
/// error here, naming the tensor and the keys, rather than a crash in a matmul.
pub fn check_shapes(src: &dyn WeightSource, cfg: &LlamaConfig) -> crate::Result<()> {
    let k = &cfg.keys;
    let source = src.source_name();
    let layers = src.layers_present();
    if layers != cfg.num_hidden_layers {
        return Err(k.err(
            &k.num_hidden_layers,
            format!(
                "{} but {source} has tensors for {layers} layers",
                cfg.num_hidden_layers
            ),
        ));
    }
    // In a GGUF the metadata is in the same file as the tensors.
    let config_file = if k.file == source {
        "the metadata".to_string()
    } else {
        k.file.clone()
    };
    for t in expected_tensors(cfg) {
        let label = src.tensor_label(&t.name);
        let Some(shape) = src.tensor_shape(&t.name) else {
            let why = if t.name == "lm_head.weight" {
                format!(
                    " ({config_file}: tie_word_embeddings is false or absent, so the head is not the embedding table; set it to true if it is)"
                )
            } else {
                String::new()
            };
            return Err(crate::Error::msg(format!(
                "{source}: tensor `{label}` is missing{why}"
            )));
        };
        t.check_shape(&source, &label, &shape, &config_file)?;
    }
    Ok(())
}

impl Llama {
    /// Build the model from a weight source that speaks HF tensor names. The config is
    /// validated and every tensor's shape checked against it before any weight is read.
    pub fn load(src: &dyn WeightSource, cfg: &LlamaConfig) -> crate::Result<Self> {
        cfg.validate()?;
        check_shapes(src, cfg)?;
        let device = src.device().clone();
        let embed_tokens = Embedding::new(
            "model.embed_tokens",
            src.embedding_weight("model.embed_tokens.weight")?,
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let norm = |n: &str| -> crate::Result<RmsNorm> {
                Ok(RmsNorm::new(
                    src.dense(&format!("{p}.{n}.weight"))?,
                    cfg.rms_norm_eps,
                )?)
            };
            layers.push(DecoderLayer {
                input_layernorm: norm("input_layernorm")?,
                self_attn: Attention {
                    q_proj: linear(src, &format!("{p}.self_attn.q_proj"), cfg.qkv_bias)?,
                    k_proj: linear(src, &format!("{p}.self_attn.k_proj"), cfg.qkv_bias)?,
                    v_proj: linear(src, &format!("{p}.self_attn.v_proj"), cfg.qkv_bias)?,
                    o_proj: linear(src, &format!("{p}.self_attn.o_proj"), cfg.o_bias)?,
                    n_heads: cfg.num_attention_heads,
                    n_kv_heads: cfg.num_key_value_heads,
                    head_dim: cfg.head_dim,
                },
                post_attention_layernorm: norm("post_attention_layernorm")?,
                mlp: Mlp {
                    gate_proj: linear(src, &format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
                    up_proj: linear(src, &format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
                    down_proj: linear(src, &format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
                },
            });
        }
        let norm = RmsNorm::new(src.dense("model.norm.weight")?, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Tied: the LM head reads the embedding table (same storage, no copy).
            Linear::new(
                "lm_head",
                src.linear_weight("model.embed_tokens.weight")?,
                None,
            )
        } else {
            linear(src, "lm_head", false)?
        };
        let (cos, sin) = rope_tables(cfg, &device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device,
            prompt: None,
            kv_f16: Default::default(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The KV cache type of the fast engine (`generate`, `serve`) on this model: f32 (the
    /// default, exact) or f16 (llama.cpp's default: half the cache memory and the bytes a
    /// batched decode step reads). The model's own forward keeps its f32 cache.
    pub fn set_kv_cache_dtype(&self, dtype: crate::engine::KvDtype) {
        self.kv_f16.store(
            dtype == crate::engine::KvDtype::F16,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// See [`Self::set_kv_cache_dtype`].
    pub fn kv_cache_dtype(&self) -> crate::engine::KvDtype {
        if self.kv_f16.load(std::sync::atomic::Ordering::Relaxed) {
            crate::engine::KvDtype::F16
        } else {
            crate::engine::KvDtype::F32
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Make every weight trainable (full fine-tuning) and return the parameters by HF name, in
    /// the order of [`Self::trainable_names_for`]. Quantized weights cannot be trained in place:
    /// load with `dequantize` first.
    ///
    /// A weight loaded as a placeholder (ZeRO-3: another rank owns it, see
    /// [`crate::model::LoadOptions::placeholders`]) becomes an empty variable, not a copy of
    /// its broadcast shape, and the model's slot keeps the placeholder, whose shape ZeRO-3's
    /// plan reads ([`crate::train::zero3::param_shape`]) before it installs its own.
    pub fn make_all_trainable(&mut self) -> crate::Result<Vec<(String, Var)>> {
        use crate::nn::LinearWeight;
        let mut params = Vec::new();
        let dev = self.device.clone();
        let emb = match self.embed_tokens.weight() {
            EmbeddingWeight::Frozen(t) if crate::model::is_placeholder(t) => None,
            EmbeddingWeight::Frozen(t) => Some(Var::from_tensor(&t.to_dtype(DType::F32)?)?),
            EmbeddingWeight::Trainable(v) => Some(v.clone()),
            EmbeddingWeight::Quantized(_) => {
                return Err(crate::Error::msg(
                    "full fine-tuning needs dense weights: load the model with --dequantize",
                ))
            }
        };
        match &emb {
            Some(e) => {
                self.embed_tokens
                    .set_weight(EmbeddingWeight::Trainable(e.clone()));
                params.push(("model.embed_tokens.weight".to_string(), e.clone()));
            }
            None => params.push((
                "model.embed_tokens.weight".to_string(),
                empty_var(DType::F32, &dev)?,
            )),
        }
        let tied = self.cfg.tie_word_embeddings;
        for lin in self.linears_mut() {
            let v = match lin.weight() {
                // The tied head shares the embedding parameter (or its placeholder).
                _ if tied && lin.name() == "lm_head" => {
                    if let Some(e) = &emb {
                        lin.set_weight(LinearWeight::Trainable(e.clone()));
                    }
                    continue;
                }
                LinearWeight::Frozen(t) if crate::model::is_placeholder(t) => {
                    params.push((
                        format!("{}.weight", lin.name()),
                        empty_var(DType::F32, &dev)?,
                    ));
                    continue;
                }
                LinearWeight::Frozen(t) => Var::from_tensor(&t.to_dtype(DType::F32)?)?,
                LinearWeight::Trainable(v) => v.clone(),
                LinearWeight::Quantized(_) => {
                    return Err(crate::Error::msg(format!(
                    "{}: full fine-tuning needs dense weights: load the model with --dequantize",
                    lin.name()
                )))
                }
            };
            lin.set_weight(LinearWeight::Trainable(v.clone()));
            params.push((format!("{}.weight", lin.name()), v));
        }
        let norm = |n: &mut RmsNorm| -> crate::Result<Var> {
            if crate::model::is_placeholder(n.weight()) {
                empty_var(DType::F32, &dev)
            } else {
                Ok(n.make_trainable()?)
            }
        };
        for (i, l) in self.layers.iter_mut().enumerate() {
            params.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                norm(&mut l.input_layernorm)?,
            ));
            params.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                norm(&mut l.post_attention_layernorm)?,
            ));
        }
        params.push(("model.norm.weight".to_string(), norm(&mut self.norm)?));
        Ok(params)
    }

    /// The names [`Self::make_all_trainable`] returns, in its order, for a model with `cfg`
    /// and `layers` layers before it is loaded (ZeRO-3 plans full fine-tuning from the files'
    /// headers with them): the embeddings, every layer's projections, an untied head, every
    /// layer's norms, the final norm.
    pub fn trainable_names_for(cfg: &LlamaConfig, layers: usize) -> Vec<String> {
        let mut out = vec!["model.embed_tokens.weight".to_string()];
        for i in 0..layers {
            for rest in &LAYER_WEIGHTS[2..] {
                out.push(format!("model.layers.{i}.{rest}"));
            }
        }
        if !cfg.tie_word_embeddings {
            out.push("lm_head.weight".to_string());
        }
        for i in 0..layers {
            for rest in &LAYER_WEIGHTS[..2] {
                out.push(format!("model.layers.{i}.{rest}"));
            }
        }
        out.push("model.norm.weight".to_string());
        out
    }

    /// Put `var` in the place of the trainable weight called `name` (an HF name that
    /// [`Self::make_all_trainable`] returns): the tied LM head follows the embeddings. ZeRO-3
    /// (`train::zero3`) installs gathered parameters this way before a layer runs and an empty
    /// placeholder after, so a rank holds only its own weights in between. `Ok(false)`: not a
    /// weight of this model (an adapter's tensor, say).
    pub fn set_parameter(&mut self, name: &str, var: &Var) -> crate::Result<bool> {
        self.set_weight_value(name, WeightValue::Trainable(var))
    }

    /// [`Self::set_parameter`] for a frozen dense weight (a PEFT method's base under ZeRO-3).
    pub fn set_frozen_weight(&mut self, name: &str, weight: &Tensor) -> crate::Result<bool> {
        self.set_weight_value(name, WeightValue::Frozen(weight))
    }

    /// [`Self::set_frozen_weight`] for a quantized weight (ZeRO-3's sharded quantized base).
    pub fn set_frozen_quantized(
        &mut self,
        name: &str,
        weight: &Arc<crate::quant::QuantWeight>,
    ) -> crate::Result<bool> {
        self.set_weight_value(name, WeightValue::Quantized(weight))
    }

    /// The quantized weight called `name`, `None` for a dense weight or a name the model does
    /// not have.
    pub fn quantized_weight(&self, name: &str) -> Option<Arc<crate::quant::QuantWeight>> {
        use crate::nn::LinearWeight;
        if name == "model.embed_tokens.weight" {
            return match self.embed_tokens.weight() {
                EmbeddingWeight::Quantized(q) => Some(q.clone()),
                _ => None,
            };
        }
        match self.linear_named(name)?.weight() {
            LinearWeight::Quantized(q) => Some(q.clone()),
            _ => None,
        }
    }

    /// The linear layer whose weight is called `name` (an untied head or a layer's
    /// projection).
    fn linear_named(&self, name: &str) -> Option<&Linear> {
        if name == "lm_head.weight" {
            return (!self.cfg.tie_word_embeddings).then_some(&self.lm_head);
        }
        let (i, rest) = layer_of_parameter(name)?;
        let l = self.layers.get(i)?;
        Some(match rest {
            "self_attn.q_proj.weight" => &l.self_attn.q_proj,
            "self_attn.k_proj.weight" => &l.self_attn.k_proj,
            "self_attn.v_proj.weight" => &l.self_attn.v_proj,
            "self_attn.o_proj.weight" => &l.self_attn.o_proj,
            "mlp.gate_proj.weight" => &l.mlp.gate_proj,
            "mlp.up_proj.weight" => &l.mlp.up_proj,
            "mlp.down_proj.weight" => &l.mlp.down_proj,
            _ => return None,
        })
    }

    /// The dense tensor of the weight called `name` (trainable or frozen), `None` for a
    /// quantized weight or a name the model does not have.
    pub fn dense_weight(&self, name: &str) -> Option<Tensor> {
        use crate::nn::LinearWeight;
        match name {
            "model.embed_tokens.weight" => {
                return match self.embed_tokens.weight() {
                    EmbeddingWeight::Frozen(t) => Some(t.clone()),
                    EmbeddingWeight::Trainable(v) => Some(v.as_tensor().clone()),
                    EmbeddingWeight::Quantized(_) => None,
                }
            }
            "model.norm.weight" => return Some(self.norm.weight().clone()),
            _ => {}
        }
        if let Some((i, rest)) = layer_of_parameter(name) {
            let l = self.layers.get(i)?;
            match rest {
                "input_layernorm.weight" => return Some(l.input_layernorm.weight().clone()),
                "post_attention_layernorm.weight" => {
                    return Some(l.post_attention_layernorm.weight().clone())
                }
                _ => {}
            }
        }
        match self.linear_named(name)?.weight() {
            LinearWeight::Frozen(t) => Some(t.clone()),
            LinearWeight::Trainable(v) => Some(v.as_tensor().clone()),
            LinearWeight::Quantized(_) => None,
        }
    }

    /// The HF names of every weight of the model (the embeddings, an untied head, the final
    /// norm, each layer's norms and projections), in that order.
    pub fn weight_names(&self) -> Vec<String> {
        Self::weight_names_for(&self.cfg, self.layers.len())
    }

    /// [`Self::weight_names`] of a model with `cfg` and `layers` layers, before it is loaded.
    pub fn weight_names_for(cfg: &LlamaConfig, layers: usize) -> Vec<String> {
        let mut out = vec!["model.embed_tokens.weight".to_string()];
        if !cfg.tie_word_embeddings {
            out.push("lm_head.weight".to_string());
        }
        out.push("model.norm.weight".to_string());
        for i in 0..layers {
            for rest in LAYER_WEIGHTS {
                out.push(format!("model.layers.{i}.{rest}"));
            }
        }
        out
    }

    fn set_weight_value(&mut self, name: &str, value: WeightValue) -> crate::Result<bool> {
        use crate::nn::LinearWeight;
        let tied = self.cfg.tie_word_embeddings;
        let linear = || match value {
            WeightValue::Trainable(v) => LinearWeight::Trainable(v.clone()),
            WeightValue::Frozen(t) => LinearWeight::Frozen(t.clone()),
            WeightValue::Quantized(q) => LinearWeight::Quantized(q.clone()),
        };
        let tensor = || match value {
            WeightValue::Trainable(v) => Ok(v.as_tensor().clone()),
            WeightValue::Frozen(t) => Ok(t.clone()),
            WeightValue::Quantized(_) => Err(crate::Error::msg(format!(
                "{name}: a norm's scale is never quantized"
            ))),
        };
        match name {
            "model.embed_tokens.weight" => {
                self.embed_tokens.set_weight(match value {
                    WeightValue::Trainable(v) => EmbeddingWeight::Trainable(v.clone()),
                    WeightValue::Frozen(t) => EmbeddingWeight::Frozen(t.clone()),
                    WeightValue::Quantized(q) => EmbeddingWeight::Quantized(q.clone()),
                });
                if tied {
                    self.lm_head.set_weight(linear());
                }
                return Ok(true);
            }
            "lm_head.weight" if !tied => {
                self.lm_head.set_weight(linear());
                return Ok(true);
            }
            "model.norm.weight" => {
                self.norm.set_weight(tensor()?);
                return Ok(true);
            }
            _ => {}
        }
        let Some((i, rest)) = layer_of_parameter(name) else {
            return Ok(false);
        };
        let Some(l) = self.layers.get_mut(i) else {
            return Ok(false);
        };
        match rest {
            "input_layernorm.weight" => l.input_layernorm.set_weight(tensor()?),
            "post_attention_layernorm.weight" => l.post_attention_layernorm.set_weight(tensor()?),
            _ => {
                let lin = match rest {
                    "self_attn.q_proj.weight" => &mut l.self_attn.q_proj,
                    "self_attn.k_proj.weight" => &mut l.self_attn.k_proj,
                    "self_attn.v_proj.weight" => &mut l.self_attn.v_proj,
                    "self_attn.o_proj.weight" => &mut l.self_attn.o_proj,
                    "mlp.gate_proj.weight" => &mut l.mlp.gate_proj,
                    "mlp.up_proj.weight" => &mut l.mlp.up_proj,
                    "mlp.down_proj.weight" => &mut l.mlp.down_proj,
                    _ => return Ok(false),
                };
                lin.set_weight(linear());
            }
        }
        Ok(true)
    }

    /// All linear layers with their module names, for PEFT methods to wrap.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for l in self.layers.iter_mut() {
            let a = &mut l.self_attn;
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            let m = &mut l.mlp;
            out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        out.push(&mut self.lm_head);
        out
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for l in self.layers.iter() {
            let a = &l.self_attn;
            out.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            let m = &l.mlp;
            out.extend([&m.gate_proj, &m.up_proj, &m.down_proj]);
        }
        out.push(&self.lm_head);
        out
    }

    /// Hidden states after the final norm: ids (b, t) -> (b, t, hidden).
    /// With a cache, `ids` are the new tokens after the cached ones and the cache is extended.
    /// A soft prompt enters when the cache is empty (or there is none), as PEFT's forward puts
    /// it before the input: the virtual tokens are cached like tokens and shift the positions.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let (h, prepended) = self.forward_hidden_prompted(ids, cache, train)?;
        if prepended == 0 {
            Ok(h)
        } else {
            h.narrow(1, prepended, t)
        }
    }

    /// [`Self::forward_hidden`] keeping the hidden states of virtual tokens put before the
    /// input (prompt tuning): `(b, n + t, hidden)` and `n` (0 without such a prompt).
    fn forward_hidden_prompted(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        let b = ids.dim(0)?;
        let fresh = cache.as_ref().map(|c| c.is_empty()).unwrap_or(true);
        let mut x = self.embed_tokens.forward(ids)?;
        let mut prepended = 0;
        let mut prefix = None;
        match if fresh { self.prompt_input(b)? } else { None } {
            Some(PromptInput::Embeddings(p)) => {
                prepended = p.dim(1)?;
                x = Tensor::cat(&[&p.to_dtype(x.dtype())?, &x], 1)?;
            }
            Some(PromptInput::Prefix(kv)) => prefix = Some(kv),
            None => {}
        }
        // A prefix is past keys and values: without a cache, a local one holds them.
        let mut local = None;
        let mut cache = match cache {
            Some(c) => Some(c),
            None if prefix.is_some() => Some(local.insert(self.new_cache())),
            None => None,
        };
        if let (Some(kv), Some(c)) = (prefix, cache.as_mut()) {
            for (slot, kv) in c.layers.iter_mut().zip(kv) {
                *slot = Some(kv);
            }
        }
        let t = x.dim(1)?;
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if offset + t > self.cos.dim(0)? {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's context window of {}",
                offset + t,
                self.cos.dim(0)?
            );
        }
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let detach = crate::nn::graph_off();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward_masked(&x, &cos, &sin, offset, slot, None, train)?;
            if detach {
                x = x.detach();
            }
        }
        Ok((self.norm.forward(&x)?, prepended))
    }

    /// The soft prompt's values for `b` rows, shaped as the forward pass takes them.
    fn prompt_input(&self, b: usize) -> Result<Option<PromptInput>> {
        let Some(p) = &self.prompt else {
            return Ok(None);
        };
        let v = p
            .values()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let n = p.num_virtual_tokens();
        let c = &self.cfg;
        match p.kind() {
            VirtualTokens::Embeddings => {
                if v.dims() != [n, c.hidden_size] {
                    candle_core::bail!(
                        "soft prompt is {:?} but the model takes ({n}, {}) (num_virtual_tokens, hidden_size)",
                        v.dims(),
                        c.hidden_size
                    );
                }
                Ok(Some(PromptInput::Embeddings(
                    v.unsqueeze(0)?
                        .broadcast_as((b, n, c.hidden_size))?
                        .contiguous()?,
                )))
            }
            VirtualTokens::Prefix => {
                let (l, kvh, hd) = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim);
                if v.dims() != [n, l * 2 * kvh * hd] {
                    candle_core::bail!(
                        "prefix is {:?} but the model takes ({n}, {}) (num_virtual_tokens, layers · 2 · kv heads · head dim)",
                        v.dims(),
                        l * 2 * kvh * hd
                    );
                }
                // PEFT: view(b, n, layers · 2, kv_heads, head_dim).permute(2, 0, 3, 1, 4).
                let v = v.reshape((n, l * 2, kvh, hd))?;
                let part = |j: usize| -> Result<Tensor> {
                    v.narrow(1, j, 1)?
                        .squeeze(1)?
                        .transpose(0, 1)?
                        .unsqueeze(0)?
                        .broadcast_as((b, kvh, n, hd))?
                        .contiguous()
                };
                let kv = (0..l)
                    .map(|i| Ok((part(2 * i)?, part(2 * i + 1)?)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(PromptInput::Prefix(kv)))
            }
        }
    }

    /// Hidden states after the final norm for packed rows: ids (b, t) -> (b, t, hidden).
    ///
    /// `positions` (b, t) is each token's position within its own example and `segments`
    /// (b, t) the example it belongs to (ids as [`ops::causal_attention_segments`] takes them;
    /// the data pipeline's `position_ids` and `segment_ids`). A token attends only to earlier
    /// tokens of its segment, so each example of a row computes exactly what it would alone.
    /// No KV cache: this is for training and scoring whole rows.
    ///
    /// RoPE scores depend only on relative positions, so once attention stays within segments
    /// an offset per example changes nothing but rounding; the positions still restart so that
    /// each example sees the very tables (and rounding) it sees alone.
    pub fn forward_hidden_packed(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let ctx = self.layer_context(ids, Some((positions, segments)))?;
        let mut x = self.embed_tokens.forward(ids)?;
        let detach = crate::nn::graph_off();
        for i in 0..self.layers.len() {
            x = self.run_layer(i, &x, &ctx, train)?;
            if detach {
                x = x.detach();
            }
        }
        self.norm.forward(&x)
    }

    /// What every decoder layer of one whole-sequence pass (no KV cache) shares: the RoPE
    /// tables for `ids (b, t)`, and for packed rows the per-token `(positions, segments)` (see
    /// [`Self::forward_hidden_packed`]). With [`Self::run_layer`] it lets a caller step through
    /// the layers one at a time (activation checkpointing does).
    pub fn layer_context(
        &self,
        ids: &Tensor,
        packed: Option<(&Tensor, &Tensor)>,
    ) -> Result<LayerContext> {
        let (b, t) = ids.dims2()?;
        let Some((positions, segments)) = packed else {
            if t > self.cos.dim(0)? {
                candle_core::bail!(
                    "sequence of {t} positions exceeds the model's context window of {}",
                    self.cos.dim(0)?
                );
            }
            return Ok(LayerContext {
                cos: self.cos.narrow(0, 0, t)?,
                sin: self.sin.narrow(0, 0, t)?,
                segments: None,
            });
        };
        for (name, x) in [("positions", positions), ("segments", segments)] {
            if x.dims() != [b, t] {
                candle_core::bail!(
                    "packed forward: {name} have shape {:?} but the ids have ({b}, {t})",
                    x.dims()
                );
            }
        }
        let positions = positions.to_dtype(DType::U32)?.flatten_all()?;
        let max_pos = positions.max(0)?.to_scalar::<u32>()? as usize;
        if max_pos >= self.cos.dim(0)? {
            candle_core::bail!(
                "position {max_pos} exceeds the model's context window of {}",
                self.cos.dim(0)?
            );
        }
        // Per-token rope tables (b, t, head_dim/2), gathered once for all layers.
        let half = self.cos.dim(1)?;
        let cos = self
            .cos
            .index_select(&positions, 0)?
            .reshape((b, t, half))?;
        let sin = self
            .sin
            .index_select(&positions, 0)?
            .reshape((b, t, half))?;
        Ok(LayerContext {
            cos,
            sin,
            segments: Some(segments.clone()),
        })
    }

    /// Decoder layer `i` on the hidden states `x (b, t, hidden)` of a whole-sequence pass.
    pub fn run_layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        train: bool,
    ) -> Result<Tensor> {
        self.layers[i].forward_masked(x, &ctx.cos, &ctx.sin, 0, None, ctx.segments.as_ref(), train)
    }

    /// The adapters' random-stream states of layer `i` (see
    /// [`crate::nn::LinearAdapter::rng_state`]), one list per linear.
    pub fn layer_rng_states(&self, i: usize) -> Vec<Vec<Option<u64>>> {
        self.layers[i]
            .linears()
            .iter()
            .map(|l| l.adapter_rng_states())
            .collect()
    }

    /// Restore what [`Self::layer_rng_states`] returned.
    pub fn set_layer_rng_states(&self, i: usize, states: &[Vec<Option<u64>>]) {
        for (l, s) in self.layers[i].linears().iter().zip(states) {
            l.set_adapter_rng_states(s);
        }
    }

    /// Logits for every position: (b, t, vocab) f32.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, false)?;
        self.lm_head.forward(&h)
    }

    /// Logits of the last position only: (b, vocab). Generation needs no more, and the
    /// vocabulary projection is the single largest matmul.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, false)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?;
        self.lm_head.forward(&last)?.squeeze(1)
    }
}

impl Llama {
    /// Final hidden states for a batch: the packed forward pass when it has segment ids.
    fn batch_hidden(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        if self.prompt.is_some() {
            self.check_unpacked(batch)?;
        }
        match &batch.segment_ids {
            Some(seg) => {
                self.forward_hidden_packed(&batch.input_ids, &batch.position_ids, seg, train)
            }
            None => self.forward_hidden(&batch.input_ids, None, train),
        }
    }

    /// Packed rows hold several examples; a soft prompt belongs before each, which one pass
    /// over the row cannot give.
    fn check_unpacked(&self, batch: &Batch) -> Result<()> {
        if batch.segment_ids.is_some() {
            candle_core::bail!(
                "a soft prompt (prompt tuning, prefix tuning, P-tuning) cannot run on packed rows: set data.packing = false"
            );
        }
        Ok(())
    }

    /// The summed loss with a soft prompt: virtual tokens put before the input carry label
    /// -100, so the last of them predicts the first token, as in PEFT's forward.
    fn prompted_loss_sum(&self, batch: &Batch, train: bool) -> crate::Result<(Tensor, usize)> {
        self.check_unpacked(batch)?;
        let (hidden, n) = self.forward_hidden_prompted(&batch.input_ids, None, train)?;
        let labels = if n == 0 {
            batch.labels.clone()
        } else {
            let b = batch.labels.dim(0)?;
            let ignore = Tensor::full(crate::data::IGNORE, (b, n), &self.device)?
                .to_dtype(batch.labels.dtype())?;
            Tensor::cat(&[&ignore, &batch.labels], 1)?
        };
        let (rows, targets) = crate::train::loss::loss_positions(&labels)?;
        crate::train::loss::head_loss_sum(&self.lm_head, &hidden, rows, targets, train)
    }

    /// Whether `batch` can be trained by walking the layers one at a time
    /// (`train::checkpointing::walk`): next-token targets, no soft prompt.
    pub fn check_layer_walk(&self, batch: &Batch) -> crate::Result<()> {
        self.check_targets(batch)?;
        if self.prompt.is_some() {
            return Err(crate::Error::msg(
                "train.gradient_checkpointing does not support soft prompts (prompt tuning, prefix tuning, P-tuning) yet; set it to false",
            ));
        }
        Ok(())
    }

    fn check_targets(&self, batch: &Batch) -> crate::Result<()> {
        if batch.targets != Targets::NextToken {
            return Err(crate::Error::msg(format!(
                "{} is a causal language model: it trains on next-token targets, not {}",
                Model::describe(self),
                batch.targets.as_str()
            )));
        }
        Ok(())
    }
}

/// f32 values one decoder layer keeps per token for the backward pass, by the tensors its
/// forward pass creates (autograd keeps every op's inputs alive, needed or not):
/// - attention: the input norm (h), the q/k/v projections (q + 2kv; the head-major views share
///   them), RoPE of q and k (q + kv), the attention output (q) and its token-major copy (q),
///   the output projection (h), the residual sum (h);
/// - MLP: the norm (h), gate and up (2i), SwiGLU (i), down (h), the residual sum (h);
/// - each LoRA-adapted linear (fused with its base, see `peft::lora::fused`): the rank-r
///   product (r) and, with dropout, the masked input (in).
fn layer_floats_per_token(model: &Llama, dropout: bool) -> u64 {
    use crate::train::memory::{adapter_floats, Sat};
    let c = &model.cfg;
    let h = Sat(c.hidden_size as u64);
    let hd = Sat(c.head_dim as u64);
    let q = Sat(c.num_attention_heads as u64) * hd;
    let kv = Sat(c.num_key_value_heads as u64) * hd;
    let i = Sat(c.intermediate_size as u64);
    let base = Sat(6) * h + Sat(4) * q + Sat(3) * kv + Sat(3) * i;
    let adapters = model
        .layers
        .first()
        .map(|l| {
            l.linears()
                .into_iter()
                .fold(Sat(0), |a, lin| a + Sat(adapter_floats(lin, dropout)))
        })
        .unwrap_or(Sat(0));
    (base + adapters).0
}

impl Model for Llama {
    fn family(&self) -> &'static str {
        "llama"
    }
    fn architecture(&self) -> String {
        self.cfg.architecture.clone()
    }
    fn kind(&self) -> ArchitectureKind {
        ArchitectureKind::Decoder
    }
    fn pretraining_objective(&self) -> Objective {
        Objective::Clm
    }
    fn task_type(&self) -> TaskType {
        TaskType::CausalLm
    }
    fn tasks(&self) -> Vec<Task> {
        vec![Task::CausalLm]
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dims(&self) -> Dims {
        let c = &self.cfg;
        Dims {
            hidden_size: c.hidden_size,
            layers: c.num_hidden_layers,
            encoder_layers: 0,
            decoder_layers: c.num_hidden_layers,
            attention_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            tied_embeddings: c.tie_word_embeddings,
            rope_theta: Some(c.rope_theta),
        }
    }
    fn context_length(&self) -> Option<usize> {
        Some(self.cfg.max_position_embeddings)
    }

    fn linears(&self) -> Vec<&Linear> {
        Llama::linears(self)
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        Llama::linears_mut(self)
    }
    fn embeddings(&self) -> Vec<&Embedding> {
        vec![&self.embed_tokens]
    }
    fn embeddings_mut(&mut self) -> Vec<&mut Embedding> {
        vec![&mut self.embed_tokens]
    }
    fn tied(&self, name: &str) -> bool {
        name == "lm_head" && self.cfg.tie_word_embeddings
    }
    fn output_layer(&self) -> Option<&str> {
        Some("lm_head")
    }
    fn other_params(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.layers.len() + 1);
        for (i, l) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                l.input_layernorm.weight().clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight().clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight().clone()));
        out
    }
    fn make_trainable(&mut self, modules: Option<&[String]>) -> crate::Result<Vec<(String, Var)>> {
        let Some(modules) = modules else {
            return self.make_all_trainable();
        };
        // A causal LM has no head of its own to save beside an adapter; only linears by name.
        let mut params = Vec::new();
        for m in modules {
            let mut found = false;
            for lin in Llama::linears_mut(self) {
                if lin.name() == m || lin.name().starts_with(&format!("{m}.")) {
                    found = true;
                    params.push((
                        format!("{}.weight", lin.name()),
                        make_linear_trainable(lin)?,
                    ));
                }
            }
            if !found {
                return Err(crate::Error::msg(format!(
                    "module `{m}` is not a linear layer of the model (modules to save must be linears, e.g. lm_head)"
                )));
            }
        }
        Ok(params)
    }

    fn loss_sum(&self, batch: &Batch, train: bool) -> crate::Result<(Tensor, usize)> {
        self.check_targets(batch)?;
        if batch.n_loss_tokens == 0 {
            return Ok((Tensor::zeros((), DType::F32, &self.device)?, 0));
        }
        if self.prompt.is_some() {
            return self.prompted_loss_sum(batch, train);
        }
        let hidden = self.batch_hidden(batch, train)?;
        crate::train::loss::loss_from_hidden(&self.lm_head, &hidden, batch, train)
    }
    fn logits(&self, batch: &Batch) -> crate::Result<Tensor> {
        self.check_targets(batch)?;
        let hidden = self.batch_hidden(batch, false)?;
        Ok(self.lm_head.forward(&hidden)?)
    }
    fn loss_and_grads_checkpointed(
        &self,
        params: &[(String, Var)],
        batch: &Batch,
        scale: f64,
    ) -> crate::Result<MicroBatchGrads> {
        crate::train::checkpointing::loss_and_grads(self, params, batch, scale)
    }
    fn activation_floats_per_token(&self, dropout: bool) -> u64 {
        layer_floats_per_token(self, dropout).saturating_mul(self.layers.len() as u64)
    }
    fn layer_floats_per_token(&self, dropout: bool) -> u64 {
        layer_floats_per_token(self, dropout)
    }

    fn decoder(&self) -> crate::Result<Box<dyn crate::generate::Decoder + '_>> {
        Ok(Box::new(crate::generate::LlamaDecoder::new(self)))
    }

    fn set_virtual_prompt(&mut self, prompt: Option<Arc<dyn SoftPrompt>>) -> crate::Result<()> {
        self.prompt = prompt;
        Ok(())
    }
    fn virtual_prompt(&self) -> Option<Arc<dyn SoftPrompt>> {
        self.prompt.clone()
    }

    fn state_dict(&self, dtype: DType) -> crate::Result<HashMap<String, Tensor>> {
        let mut sd = HashMap::new();
        let emb = match self.embed_tokens.weight() {
            EmbeddingWeight::Frozen(t) => t.clone(),
            EmbeddingWeight::Trainable(v) => v.as_tensor().clone(),
            EmbeddingWeight::Quantized(q) => q.dequantize()?,
        };
        sd.insert(
            "model.embed_tokens.weight".to_string(),
            emb.to_dtype(dtype)?,
        );
        for lin in Llama::linears(self) {
            if Model::tied(self, lin.name()) {
                continue;
            }
            sd.insert(
                format!("{}.weight", lin.name()),
                lin.weight().to_dense_f32()?.to_dtype(dtype)?,
            );
            if let Some(b) = lin.bias() {
                sd.insert(format!("{}.bias", lin.name()), b.to_dtype(dtype)?);
            }
        }
        for (name, t) in self.other_params() {
            sd.insert(name, t.to_dtype(dtype)?);
        }
        Ok(sd)
    }
    fn hf_config(&self) -> crate::Result<serde_json::Value> {
        self.cfg.to_hf_json()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The parameter of a weight another rank owns under ZeRO-3: no values until its owner sends
/// them (`train::zero3` sizes it from the model's placeholder, and puts one of these back in
/// its place between uses).
pub(crate) fn empty_var(dtype: DType, device: &Device) -> crate::Result<Var> {
    Ok(Var::from_tensor(&Tensor::zeros(0, dtype, device)?)?)
}

/// Make `lin`'s weight a trainable f32 parameter (or return the one it has).
fn make_linear_trainable(lin: &mut Linear) -> crate::Result<Var> {
    use crate::nn::LinearWeight;
    let v = match lin.weight() {
        LinearWeight::Frozen(t) => Var::from_tensor(&t.to_dtype(DType::F32)?)?,
        LinearWeight::Trainable(v) => return Ok(v.clone()),
        LinearWeight::Quantized(_) => {
            return Err(crate::Error::msg(format!(
                "{}: training this weight needs dense weights: load the model with --dequantize",
                lin.name()
            )))
        }
    };
    lin.set_weight(LinearWeight::Trainable(v.clone()));
    Ok(v)
}

/// See [`Llama::layer_context`].
pub struct LayerContext {
    cos: Tensor,
    sin: Tensor,
    segments: Option<Tensor>,
}

impl DecoderLayer {
    /// The layer's linears: q, k, v, o, gate, up, down.
    pub fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_masked(x, cos, sin, offset, cache, None, train)
    }

    /// [`Self::forward`] with optional segment ids (b, t) that keep attention within each
    /// packed example (no cache then); cos/sin may be per-row `(b, t, head_dim/2)` tables.
    #[allow(clippy::too_many_arguments)]
    fn forward_masked(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        segments: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self
            .self_attn
            .forward(&h, cos, sin, offset, cache, segments, train)?;
        let x = (x + h)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h, train)?;
        x + h
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        segments: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // Head-major views, no copies: RoPE reads q and k through their strides and writes
        // contiguous results, attention reads v likewise. (A copy here would be kept by the
        // autograd graph until backward: 960 floats per token and layer for SmolLM2.)
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)
        };
        let q = heads(self.q_proj.forward_t(x, train)?, self.n_heads)?;
        let k = heads(self.k_proj.forward_t(x, train)?, self.n_kv_heads)?;
        let v = heads(self.v_proj.forward_t(x, train)?, self.n_kv_heads)?;
        let q = ops::rope(&q, cos, sin)?;
        let k = ops::rope(&k, cos, sin)?;
        let cache_used = cache.is_some();
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let kv = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                };
                *slot = Some(kv.clone());
                kv
            }
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = match segments {
            Some(_) if cache_used => {
                candle_core::bail!("segment ids cannot be combined with a KV cache")
            }
            Some(seg) => ops::causal_attention_segments(&q, &k, &v, scale, seg)?,
            None => ops::causal_attention(&q, &k, &v, scale, offset)?,
        };
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))?;
        self.o_proj.forward_t(&y, train)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let g = self.gate_proj.forward_t(x, train)?;
        let u = self.up_proj.forward_t(x, train)?;
        self.down_proj.forward_t(&ops::swiglu(&g, &u)?, train)
    }
}

/// cos/sin tables (max_positions, head_dim/2), f32, computed the way transformers does.
fn rope_tables(cfg: &LlamaConfig, dev: &Device) -> Result<(Tensor, Tensor)> {
    let inv = rope_inv_freq(cfg);
    let n = cfg.max_position_embeddings;
    let half = inv.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), dev)?,
        Tensor::from_vec(sin, (n, half), dev)?,
    ))
}
