//! T5 family encoder-decoder: T5 v1.0 (ReLU feed-forward, embeddings tied to the LM head with
//! the `d_model^-0.5` output scaling), T5 v1.1 / FLAN-T5 / mT5 (gated-GELU feed-forward, untied
//! `lm_head`), as transformers' `T5ForConditionalGeneration` computes them:
//! - T5's layer norm is an RMS norm without mean subtraction or bias ([`ops::rms_norm`]);
//! - attention scores are not scaled (T5 folds the scale into its initialization) and get a
//!   learned bias per head from bucketed relative positions: bidirectional buckets in the
//!   encoder, causal ones in the decoder, each table in layer 0 of its stack and shared by
//!   the stack's other layers; cross-attention has no position bias;
//! - the decoder reads the encoder output through cross-attention, whose keys and values are
//!   computed once per generation ([`T5Cache`]), and caches its own keys and values for
//!   incremental decoding.
//!
//! Every op has a backward pass (ReLU, GELU and SiLU are candle's, checked against finite
//! differences in `t5_tests.rs`), so the same code serves generation and training:
//! [`T5::loss_sum`] takes encoder ids and decoder labels (-100 ignored) like
//! `T5ForConditionalGeneration(labels=...)`.
//!
//! Soft prompts ([`Model::set_virtual_prompt`]) enter as PEFT's `PeftModelForSeq2SeqLM`
//! (peft 0.21, transformers 5) puts them:
//! - prompt tuning and P-tuning: the virtual tokens' embeddings go before the ENCODER input
//!   only (`inputs_embeds = cat(prompts[:, :n], embeds)`), the encoder attention mask gets
//!   ones in front, and that extended mask is also the decoder's cross-attention mask; the
//!   virtual tokens take encoder positions 0..n in the relative position bias (the input
//!   shifts by n). The decoder inputs and labels are untouched. PEFT's table holds
//!   `num_virtual_tokens · num_transformer_submodules` (= 2n) rows and saves them all, but its
//!   forward reads only the first n;
//! - prefix tuning: the prefix is past keys/values of the DECODER's self-attention only. The
//!   encoder gets nothing, and the cross-attention prefixes PEFT builds are dropped
//!   (`get_prompt` replaces the `EncoderDecoderCache`'s cross-attention cache with an empty
//!   one). The decoder's queries then sit at positions n.. in the causal relative position
//!   bias and see every prefix key. Which prefix rows a layer reads follows PEFT's split of
//!   the prompt for two submodules: the `(n, 2L, heads, d_kv)` view is concatenated with
//!   itself to 4L rows and cut in groups of four (self key, self value, cross key, cross
//!   value), so decoder layer i's self-attention reads key `4i mod 2L`, value `4i + 1 mod
//!   2L` (for L = 3: (0, 1), (4, 5), (2, 3)). `num_layers` must be the decoder's layer count
//!   and `token_dim` heads · d_kv.
use super::config::limits;
use super::family::{
    ArchitectureKind, Dims, Model, Objective, SoftPrompt, Task, TaskType, VirtualTokens,
};
use super::weights::{ExpectedTensor, WeightSource};
use super::ModelSource;
use crate::beam::{BeamConfig, BeamDecoder, BeamOutput};
use crate::data::IGNORE;
use crate::data::{Batch, Targets};
use crate::nn::{
    DropoutPass, Embedding, EmbeddingWeight, Linear, LinearWeight, ModelDropout, RmsNorm,
};
use crate::ops;
use crate::progress::{CountingSource, Progress};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// `model_type`s this file implements.
pub const MODEL_TYPES: &[&str] = &["t5", "mt5"];

/// The feed-forward activation (`feed_forward_proj`'s last part, as transformers maps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// transformers' `gelu_new`: the tanh approximation (what `gated-gelu` means).
    GeluNew,
    /// The exact (erf) GELU.
    Gelu,
    Silu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::GeluNew => x.gelu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Silu => x.silu(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    /// config.json, for messages.
    pub file: String,
    /// "t5" or "mt5".
    pub model_type: String,
    pub vocab_size: usize,
    pub d_model: usize,
    /// Size of one attention head.
    pub d_kv: usize,
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// As written (`relu`, `gated-gelu`, ...).
    pub feed_forward_proj: String,
    pub activation: Activation,
    /// `wi_0`/`wi_1` (act(wi_0 x) * wi_1 x) instead of one `wi`.
    pub gated: bool,
    /// No `lm_head` of its own: the head reads the shared embedding table.
    pub tie_word_embeddings: bool,
    /// Multiply the decoder output by `d_model^-0.5` before the head (T5 v1.0's tied head).
    pub scale_decoder_outputs: bool,
    pub pad_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub decoder_start_token_id: u32,
    /// Dropout probability in training (`dropout_rate`): on the embeddings, the attention
    /// weights, inside the feed-forward block, on each sublayer's output and after each stack.
    pub dropout_rate: f64,
    /// The config.json object as read (what `convert` writes back).
    pub raw: Value,
}

/// Whether a config.json object describes a model this file implements.
pub fn is_t5_config(v: &Value) -> bool {
    let model_type = v.get("model_type").and_then(Value::as_str);
    let arch = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str);
    model_type.is_some_and(|m| MODEL_TYPES.contains(&m))
        || matches!(
            arch,
            Some("T5ForConditionalGeneration" | "MT5ForConditionalGeneration")
        )
}

impl T5Config {
    /// Parse an HF `config.json` value (`source` names the file in errors). Missing keys take
    /// transformers' `T5Config` defaults; every value is then checked ([`Self::validate`]).
    pub fn from_hf_json(v: &Value, source: &str) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::file(source, "expected a JSON object"));
        }
        if !is_t5_config(v) {
            return Err(Error::key(
                source,
                "model_type",
                "not a T5 model (expected model_type t5 or mt5)",
            ));
        }
        let usize_or = |k: &str, default: usize| -> Result<usize> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        Error::key(source, k, format!("{x} is not a non-negative integer"))
                    }),
            }
        };
        let token_id = |k: &str, x: &Value| -> Result<u32> {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| Error::key(source, k, format!("{x} is not a token id")))
        };
        let bool_key = |k: &str| -> Result<Option<bool>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| Error::key(source, k, "expected true or false")),
            }
        };
        let num_layers = usize_or("num_layers", 6)?;
        let feed_forward_proj = match v.get("feed_forward_proj") {
            None | Some(Value::Null) => "relu".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(x) => {
                return Err(Error::key(
                    source,
                    "feed_forward_proj",
                    format!("expected a string, found {x}"),
                ))
            }
        };
        let (gated, activation) = parse_feed_forward(&feed_forward_proj).ok_or_else(|| {
            Error::key(
                source,
                "feed_forward_proj",
                format!("`{feed_forward_proj}` is not supported (supported: relu, gelu, gelu_new, silu, and gated-<one of them>)"),
            )
        })?;
        let layer_norm_epsilon = match v.get("layer_norm_epsilon") {
            None | Some(Value::Null) => 1e-6,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| Error::key(source, "layer_norm_epsilon", "expected a number"))?,
        };
        let dropout_rate = match v.get("dropout_rate") {
            None | Some(Value::Null) => 0.1,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| Error::key(source, "dropout_rate", "expected a number"))?,
        };
        let tie_word_embeddings = bool_key("tie_word_embeddings")?.unwrap_or(true);
        // transformers >= 5 keeps T5 v1.0's output scaling in its own key; older files imply it
        // by a tied head.
        let scale_decoder_outputs =
            bool_key("scale_decoder_outputs")?.unwrap_or(tie_word_embeddings);
        let pad_token_id = match v.get("pad_token_id") {
            None | Some(Value::Null) => 0,
            Some(x) => token_id("pad_token_id", x)?,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None => vec![1],
            Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| token_id("eos_token_id", x))
                .collect::<Result<_>>()?,
            Some(x) => vec![token_id("eos_token_id", x)?],
        };
        // T5 starts decoding from the pad token; transformers requires the key for training
        // (`_shift_right`), released checkpoints all set it.
        let decoder_start_token_id = match v.get("decoder_start_token_id") {
            None | Some(Value::Null) => pad_token_id,
            Some(x) => token_id("decoder_start_token_id", x)?,
        };
        let cfg = Self {
            file: source.to_string(),
            model_type: v
                .get("model_type")
                .and_then(Value::as_str)
                .unwrap_or("t5")
                .to_string(),
            vocab_size: usize_or("vocab_size", 32128)?,
            d_model: usize_or("d_model", 512)?,
            d_kv: usize_or("d_kv", 64)?,
            d_ff: usize_or("d_ff", 2048)?,
            num_layers,
            num_decoder_layers: usize_or("num_decoder_layers", num_layers)?,
            num_heads: usize_or("num_heads", 8)?,
            relative_attention_num_buckets: usize_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: usize_or("relative_attention_max_distance", 128)?,
            layer_norm_epsilon,
            feed_forward_proj,
            activation,
            gated,
            tie_word_embeddings,
            scale_decoder_outputs,
            pad_token_id,
            eos_token_ids,
            decoder_start_token_id,
            dropout_rate,
            raw: v.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn err(&self, key: &str, what: impl std::fmt::Display) -> Error {
        Error::key(&self.file, key, what)
    }

    /// Check every size against [`limits`] and the token ids against the vocabulary, so that
    /// nothing is allocated or indexed from a bad value. Errors name config.json and the key.
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let size = |key: &str, v: usize, max: usize| -> Result<()> {
            check_size(v, max).map_err(|e| self.err(key, e))
        };
        size("vocab_size", self.vocab_size, MAX_VOCAB)?;
        size("d_model", self.d_model, MAX_WIDTH)?;
        size("d_kv", self.d_kv, MAX_WIDTH)?;
        size("d_ff", self.d_ff, MAX_WIDTH)?;
        size("num_layers", self.num_layers, MAX_LAYERS)?;
        size("num_decoder_layers", self.num_decoder_layers, MAX_LAYERS)?;
        size("num_heads", self.num_heads, MAX_HEADS)?;
        if self
            .num_heads
            .checked_mul(self.d_kv)
            .is_none_or(|w| w > MAX_WIDTH)
        {
            return Err(self.err(
                "d_kv",
                format!(
                    "{} heads of {} is wider than the limit {MAX_WIDTH}",
                    self.num_heads, self.d_kv
                ),
            ));
        }
        let nb = self.relative_attention_num_buckets;
        if !(4..=MAX_BUCKETS).contains(&nb) {
            return Err(self.err(
                "relative_attention_num_buckets",
                format!("{nb} is outside 4 to {MAX_BUCKETS}"),
            ));
        }
        let md = self.relative_attention_max_distance;
        if md <= nb / 2 || md > MAX_CONTEXT {
            // At nb/2 (the decoder's exact range) or nb/4 (the encoder's) the bucket formula
            // divides by log(1) = 0.
            return Err(self.err(
                "relative_attention_max_distance",
                format!(
                    "{md} must be above half of relative_attention_num_buckets ({nb}) and at most {MAX_CONTEXT}"
                ),
            ));
        }
        let eps = self.layer_norm_epsilon;
        if !eps.is_finite() || eps < 0.0 {
            return Err(self.err(
                "layer_norm_epsilon",
                format!("{eps} must be a finite number >= 0"),
            ));
        }
        crate::nn::check_probability(self.dropout_rate).map_err(|e| self.err("dropout_rate", e))?;
        let id = |key: &str, id: u32| -> Result<()> {
            if id as usize >= self.vocab_size {
                return Err(self.err(
                    key,
                    format!(
                        "{id} is not below vocab_size {} (no such token)",
                        self.vocab_size
                    ),
                ));
            }
            Ok(())
        };
        id("pad_token_id", self.pad_token_id)?;
        id("decoder_start_token_id", self.decoder_start_token_id)?;
        for &e in &self.eos_token_ids {
            id("eos_token_id", e)?;
        }
        Ok(())
    }

    /// Width of the attention projections (`num_heads * d_kv`; need not equal `d_model`).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Parameters, counting the shared embedding once.
    pub fn num_params(&self) -> u64 {
        let d = self.d_model as u64;
        let inner = self.inner_dim() as u64;
        let ff = self.d_ff as u64 * d * if self.gated { 3 } else { 2 };
        let attn = 4 * d * inner;
        let bias = (self.relative_attention_num_buckets * self.num_heads) as u64;
        let enc = self.num_layers as u64 * (attn + ff + 2 * d) + bias + d;
        let dec = self.num_decoder_layers as u64 * (2 * attn + ff + 3 * d) + bias + d;
        let emb = self.vocab_size as u64 * d;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + enc + dec
    }
}

/// Largest `relative_attention_num_buckets` accepted (released models use 32).
pub const MAX_BUCKETS: usize = 1 << 16;

/// `feed_forward_proj` -> (gated, activation), as transformers' `T5Config` reads it.
fn parse_feed_forward(s: &str) -> Option<(bool, Activation)> {
    let (gated, act) = match s.split('-').collect::<Vec<_>>().as_slice() {
        [act] => (false, *act),
        ["gated", act] => (true, *act),
        _ => return None,
    };
    let act = match act {
        "relu" => Activation::Relu,
        // transformers maps `gated-gelu` to gelu_new (T5 v1.1); plain `gelu` is the erf one.
        "gelu" if gated => Activation::GeluNew,
        "gelu" => Activation::Gelu,
        "gelu_new" => Activation::GeluNew,
        "silu" | "swish" => Activation::Silu,
        _ => return None,
    };
    Some((gated, act))
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// (`key position - query position`), in the same float32 arithmetic so that positions on a
/// bucket boundary land where they land in transformers.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as usize;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln();
    let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio / log_range * (num_buckets - max_exact) as f32) as i64;
    (bucket + large.min(num_buckets - 1)) as usize
}

// ---------------------------------------------------------------- layers

pub struct T5Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Layer 0 of each stack's self-attention only: (num_buckets, num_heads) biases.
    pub relative_attention_bias: Option<Embedding>,
    n_heads: usize,
    d_kv: usize,
}

/// The feed-forward block (`DenseReluDense` in transformers, whatever its activation).
pub enum DenseReluDense {
    /// T5 v1.0: wo(act(wi x)).
    Plain { wi: Linear, wo: Linear },
    /// T5 v1.1: wo(act(wi_0 x) * wi_1 x).
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

pub struct T5Block {
    /// `layer.0`: self-attention and its norm.
    pub self_attention: T5Attention,
    pub self_attention_norm: RmsNorm,
    /// Decoder blocks only, `layer.1`: cross-attention over the encoder output and its norm.
    pub cross_attention: Option<(T5Attention, RmsNorm)>,
    /// `layer.1` (encoder) / `layer.2` (decoder): the feed-forward block and its norm.
    pub ff: DenseReluDense,
    pub ff_norm: RmsNorm,
}

pub struct T5Stack {
    pub blocks: Vec<T5Block>,
    pub final_layer_norm: RmsNorm,
}

pub struct T5 {
    pub cfg: T5Config,
    /// The token embedding table of both stacks (`shared`).
    pub shared: Embedding,
    pub encoder: T5Stack,
    pub decoder: T5Stack,
    /// `lm_head`, or the shared table when the file has no head of its own.
    pub lm_head: Linear,
    /// Whether `lm_head` reads the shared table (same storage).
    lm_head_tied: bool,
    /// The model's own dropout in training (`cfg.dropout_rate`), seeded per run.
    pub dropout: ModelDropout,
    device: Device,
    /// A soft prompt read by every forward pass (see [`Model::set_virtual_prompt`]).
    prompt: Option<Arc<dyn SoftPrompt>>,
}

/// The dropout of one forward pass at T5's one rate.
#[derive(Clone, Copy)]
struct Dropping<'a> {
    pass: &'a DropoutPass,
    p: f64,
}

impl Dropping<'_> {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.pass.apply(x, self.p)
    }
}

/// What each stack's layer `i` holds, by transformers' module names.
fn block_prefix(stack: &str, i: usize) -> String {
    format!("{stack}.block.{i}")
}

/// The embedding table's tensor name: `shared.weight`, or one of its tied copies that some
/// conversions keep instead.
const EMBEDDING_NAMES: &[&str] = &[
    "shared.weight",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
];

fn embedding_name(src: &dyn WeightSource) -> Option<&'static str> {
    EMBEDDING_NAMES.iter().copied().find(|n| src.contains(n))
}

fn expected_tensors(
    cfg: &T5Config,
    src: &dyn WeightSource,
    emb: &str,
) -> Vec<ExpectedTensor<'static>> {
    let d = ("d_model", cfg.d_model);
    let heads = ("num_heads", cfg.num_heads);
    let kv = ("d_kv", cfg.d_kv);
    let ff = ("d_ff", cfg.d_ff);
    let vocab = ("vocab_size", cfg.vocab_size);
    let nb = (
        "relative_attention_num_buckets",
        cfg.relative_attention_num_buckets,
    );
    let inner = cfg.inner_dim();
    let mut out = Vec::new();
    let mut t = |name: String, shape: &[usize], because: &[(&'static str, usize)]| {
        out.push(ExpectedTensor {
            name,
            shape: shape.to_vec(),
            because: because.to_vec(),
        })
    };
    t(emb.to_string(), &[cfg.vocab_size, cfg.d_model], &[vocab, d]);
    if src.contains("lm_head.weight") || !cfg.tie_word_embeddings {
        t(
            "lm_head.weight".into(),
            &[cfg.vocab_size, cfg.d_model],
            &[vocab, d],
        );
    }
    for (stack, n) in [
        ("encoder", cfg.num_layers),
        ("decoder", cfg.num_decoder_layers),
    ] {
        for i in 0..n {
            let p = block_prefix(stack, i);
            let mut attentions = vec![format!("{p}.layer.0.SelfAttention")];
            if stack == "decoder" {
                attentions.push(format!("{p}.layer.1.EncDecAttention"));
            }
            for (j, a) in attentions.iter().enumerate() {
                for m in ["q", "k", "v"] {
                    t(
                        format!("{a}.{m}.weight"),
                        &[inner, cfg.d_model],
                        &[heads, kv, d],
                    );
                }
                t(
                    format!("{a}.o.weight"),
                    &[cfg.d_model, inner],
                    &[d, heads, kv],
                );
                if i == 0 && j == 0 {
                    t(
                        format!("{a}.relative_attention_bias.weight"),
                        &[cfg.relative_attention_num_buckets, cfg.num_heads],
                        &[nb, heads],
                    );
                }
                t(
                    format!("{p}.layer.{j}.layer_norm.weight"),
                    &[cfg.d_model],
                    &[d],
                );
            }
            let ff_layer = attentions.len();
            let f = format!("{p}.layer.{ff_layer}.DenseReluDense");
            let wis: &[&str] = if cfg.gated {
                &["wi_0", "wi_1"]
            } else {
                &["wi"]
            };
            for wi in wis {
                t(
                    format!("{f}.{wi}.weight"),
                    &[cfg.d_ff, cfg.d_model],
                    &[ff, d],
                );
            }
            t(format!("{f}.wo.weight"), &[cfg.d_model, cfg.d_ff], &[d, ff]);
            t(
                format!("{p}.layer.{ff_layer}.layer_norm.weight"),
                &[cfg.d_model],
                &[d],
            );
        }
        t(
            format!("{stack}.final_layer_norm.weight"),
            &[cfg.d_model],
            &[d],
        );
    }
    out
}

/// Check the weights against the config before any is read: the layer counts, and every
/// tensor the config implies, present with the implied shape. Errors name the tensor and the
/// config.json keys.
pub fn check_shapes(src: &dyn WeightSource, cfg: &T5Config) -> Result<()> {
    let source = src.source_name();
    let Some(emb) = embedding_name(src) else {
        return Err(Error::msg(format!(
            "{source}: tensor `shared.weight` (the embedding table) is missing"
        )));
    };
    for (stack, n, key) in [
        ("encoder", cfg.num_layers, "num_layers"),
        ("decoder", cfg.num_decoder_layers, "num_decoder_layers"),
    ] {
        let probe = format!("{}.layer.0.layer_norm.weight", block_prefix(stack, n));
        if src.contains(&probe) {
            return Err(cfg.err(
                key,
                format!("{n} but {source} has more {stack} layers (it has `{probe}`)"),
            ));
        }
    }
    for t in expected_tensors(cfg, src, emb) {
        let Some(shape) = src.tensor_shape(&t.name) else {
            let hint = if t.name.contains("DenseReluDense") {
                format!(
                    " (feed_forward_proj `{}` implies {} feed-forward weights)",
                    cfg.feed_forward_proj,
                    if cfg.gated {
                        "gated wi_0/wi_1"
                    } else {
                        "one wi"
                    }
                )
            } else if t.name == "lm_head.weight" {
                " (tie_word_embeddings is false)".to_string()
            } else {
                String::new()
            };
            return Err(Error::msg(format!(
                "{source}: tensor `{}` is missing{hint}",
                t.name
            )));
        };
        t.check_shape(&source, &t.name, &shape, &cfg.file)?;
    }
    Ok(())
}

fn linear(src: &dyn WeightSource, name: &str) -> Result<Linear> {
    Ok(Linear::new(
        name,
        src.linear_weight(&format!("{name}.weight"))?,
        None,
    ))
}

fn norm(src: &dyn WeightSource, cfg: &T5Config, name: &str) -> Result<RmsNorm> {
    Ok(RmsNorm::new(
        src.dense(&format!("{name}.weight"))?,
        cfg.layer_norm_epsilon,
    )?)
}

fn attention(src: &dyn WeightSource, cfg: &T5Config, p: &str, bias: bool) -> Result<T5Attention> {
    let relative_attention_bias = if bias {
        let name = format!("{p}.relative_attention_bias");
        let w = src.embedding_weight(&format!("{name}.weight"))?;
        Some(Embedding::new(name, w))
    } else {
        None
    };
    Ok(T5Attention {
        q: linear(src, &format!("{p}.q"))?,
        k: linear(src, &format!("{p}.k"))?,
        v: linear(src, &format!("{p}.v"))?,
        o: linear(src, &format!("{p}.o"))?,
        relative_attention_bias,
        n_heads: cfg.num_heads,
        d_kv: cfg.d_kv,
    })
}

fn stack(src: &dyn WeightSource, cfg: &T5Config, decoder: bool) -> Result<T5Stack> {
    let (name, n) = if decoder {
        ("decoder", cfg.num_decoder_layers)
    } else {
        ("encoder", cfg.num_layers)
    };
    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let p = block_prefix(name, i);
        let cross_attention = if decoder {
            Some((
                attention(src, cfg, &format!("{p}.layer.1.EncDecAttention"), false)?,
                norm(src, cfg, &format!("{p}.layer.1.layer_norm"))?,
            ))
        } else {
            None
        };
        let ff_layer = format!("{p}.layer.{}", if decoder { 2 } else { 1 });
        let f = format!("{ff_layer}.DenseReluDense");
        let ff = if cfg.gated {
            DenseReluDense::Gated {
                wi_0: linear(src, &format!("{f}.wi_0"))?,
                wi_1: linear(src, &format!("{f}.wi_1"))?,
                wo: linear(src, &format!("{f}.wo"))?,
            }
        } else {
            DenseReluDense::Plain {
                wi: linear(src, &format!("{f}.wi"))?,
                wo: linear(src, &format!("{f}.wo"))?,
            }
        };
        blocks.push(T5Block {
            self_attention: attention(src, cfg, &format!("{p}.layer.0.SelfAttention"), i == 0)?,
            self_attention_norm: norm(src, cfg, &format!("{p}.layer.0.layer_norm"))?,
            cross_attention,
            ff,
            ff_norm: norm(src, cfg, &format!("{ff_layer}.layer_norm"))?,
        });
    }
    Ok(T5Stack {
        blocks,
        final_layer_norm: norm(src, cfg, &format!("{name}.final_layer_norm"))?,
    })
}

// ---------------------------------------------------------------- forward

/// Additive score mask that keeps padding out: (b, s) with 1 = token, 0 = padding (any
/// nonzero counts as a token) -> (b, 1, 1, s) with 0 or float32's lowest value, as
/// transformers' masks are.
fn padding_mask(mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let on = mask.to_dtype(DType::F32)?.ne(0f64)?.to_dtype(DType::F32)?;
    let max = f32::MAX as f64;
    on.affine(max, -max)?.reshape((b, 1, 1, s))
}

/// Additive causal mask for `t` new queries after `offset` cached positions:
/// (1, 1, t, offset + t), query i may see keys up to offset + i.
fn causal_mask(t: usize, offset: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let tk = offset + t;
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..tk).map(move |j| if j > offset + i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, t, tk), dev)
}

impl T5Attention {
    /// (b, t, heads * d_kv) -> (b, heads, t, d_kv), contiguous.
    fn heads(&self, y: Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = y.dims3()?;
        y.reshape((b, t, self.n_heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values of `x (b, t, d_model)`: each (b, heads, t, d_kv).
    fn key_values(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.heads(self.k.forward_t(x, train)?)?,
            self.heads(self.v.forward_t(x, train)?)?,
        ))
    }

    /// Attention of the queries of `x (b, t, d_model)` over keys/values (b, heads, s, d_kv),
    /// with additive position `bias` (1, heads, t, s) and `mask` (broadcast to (b, heads, t,
    /// s)); no score scaling (T5's); `drop` on the attention weights. Returns the output
    /// projection (b, t, d_model).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        mask: Option<&Tensor>,
        train: bool,
        drop: Dropping,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.heads(self.q.forward_t(x, train)?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let p = drop.apply(&ops::softmax_last_dim(&scores)?)?;
        let y = p
            .matmul(v)?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.d_kv))?;
        self.o.forward_t(&y, train)
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }
}

impl DenseReluDense {
    fn forward(
        &self,
        x: &Tensor,
        act: Activation,
        train: bool,
        drop: Dropping,
    ) -> candle_core::Result<Tensor> {
        match self {
            DenseReluDense::Plain { wi, wo } => {
                let h = drop.apply(&act.apply(&wi.forward_t(x, train)?)?)?;
                wo.forward_t(&h, train)
            }
            DenseReluDense::Gated { wi_0, wi_1, wo } => {
                let g = act.apply(&wi_0.forward_t(x, train)?)?;
                let u = wi_1.forward_t(x, train)?;
                wo.forward_t(&drop.apply(&(g * u)?)?, train)
            }
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        match self {
            DenseReluDense::Plain { wi, wo } => vec![wi, wo],
            DenseReluDense::Gated { wi_0, wi_1, wo } => vec![wi_0, wi_1, wo],
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            DenseReluDense::Plain { wi, wo } => vec![wi, wo],
            DenseReluDense::Gated { wi_0, wi_1, wo } => vec![wi_0, wi_1, wo],
        }
    }
}

/// One decoder block's self-attention cache slot: keys and values (b, heads, t, d_kv).
type KvSlot = Option<(Tensor, Tensor)>;

impl T5Block {
    fn forward_encoder(
        &self,
        x: &Tensor,
        bias: &Tensor,
        mask: Option<&Tensor>,
        act: Activation,
        train: bool,
        drop: Dropping,
    ) -> candle_core::Result<Tensor> {
        let a = &self.self_attention;
        let h = self.self_attention_norm.forward(x)?;
        let (k, v) = a.key_values(&h, train)?;
        let x = (x + drop.apply(&a.attend(&h, &k, &v, Some(bias), mask, train, drop)?)?)?;
        let h = self.ff_norm.forward(&x)?;
        &x + drop.apply(&self.ff.forward(&h, act, train, drop)?)?
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_decoder(
        &self,
        x: &Tensor,
        bias: &Tensor,
        causal: Option<&Tensor>,
        cache: Option<&mut KvSlot>,
        cross_kv: &(Tensor, Tensor),
        enc_mask: Option<&Tensor>,
        act: Activation,
        train: bool,
        drop: Dropping,
    ) -> candle_core::Result<Tensor> {
        let a = &self.self_attention;
        let h = self.self_attention_norm.forward(x)?;
        let (k, v) = a.key_values(&h, train)?;
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
        let x = (x + drop.apply(&a.attend(&h, &k, &v, Some(bias), causal, train, drop)?)?)?;
        let Some((cross, cross_norm)) = &self.cross_attention else {
            candle_core::bail!("T5: an encoder block was run as a decoder block")
        };
        let h = cross_norm.forward(&x)?;
        let y = cross.attend(&h, &cross_kv.0, &cross_kv.1, None, enc_mask, train, drop)?;
        let x = (&x + drop.apply(&y)?)?;
        let h = self.ff_norm.forward(&x)?;
        &x + drop.apply(&self.ff.forward(&h, act, train, drop)?)?
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = self.self_attention.linears().to_vec();
        if let Some((c, _)) = &self.cross_attention {
            out.extend(c.linears());
        }
        out.extend(self.ff.linears());
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = self.self_attention.linears_mut().into_iter().collect();
        if let Some((c, _)) = &mut self.cross_attention {
            out.extend(c.linears_mut());
        }
        out.extend(self.ff.linears_mut());
        out
    }
}

/// The decoder's incremental state for one generation: its self-attention keys and values so
/// far, and the cross-attention keys and values of the encoder output, computed once.
pub struct T5Cache {
    self_kv: Vec<KvSlot>,
    cross_kv: Vec<(Tensor, Tensor)>,
    /// Additive padding mask of the encoder output (b, 1, 1, s).
    enc_mask: Option<Tensor>,
    len: usize,
}

impl T5Cache {
    /// Decoder positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Rows (sequences) held.
    pub fn batch(&self) -> usize {
        self.cross_kv.first().map(|(k, _)| k.dims()[0]).unwrap_or(0)
    }
    /// Keep rows by index: new row `i` is old row `rows[i]` (beam search reorders and repeats
    /// beams this way).
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        let batch = self.batch();
        if let Some(bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(Error::msg(format!(
                "T5 cache: row {bad} does not exist (the cache holds {batch})"
            )));
        }
        let dev = match self.cross_kv.first() {
            Some((k, _)) => k.device().clone(),
            None => return Ok(()),
        };
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), &dev)?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        for slot in self.self_kv.iter_mut().flatten() {
            *slot = (pick(&slot.0)?, pick(&slot.1)?);
        }
        for (k, v) in self.cross_kv.iter_mut() {
            *k = pick(k)?;
            *v = pick(v)?;
        }
        if let Some(m) = &self.enc_mask {
            self.enc_mask = Some(pick(m)?);
        }
        Ok(())
    }
}

impl T5 {
    /// Build the model from a weight source that speaks HF tensor names. The config is
    /// validated and every tensor's shape checked against it before any weight is read.
    pub fn load(src: &dyn WeightSource, cfg: &T5Config) -> Result<Self> {
        cfg.validate()?;
        check_shapes(src, cfg)?;
        let emb = embedding_name(src).expect("checked by check_shapes");
        let shared = Embedding::new("shared", src.embedding_weight(emb)?);
        let encoder = stack(src, cfg, false)?;
        let decoder = stack(src, cfg, true)?;
        // A head in the file is used as it is (transformers >= 5 ties only equal tensors);
        // without one the head reads the embedding table (same storage, no copy).
        let lm_head_tied = !src.contains("lm_head.weight");
        let lm_head = if lm_head_tied {
            Linear::new("lm_head", src.linear_weight(emb)?, None)
        } else {
            linear(src, "lm_head")?
        };
        Ok(Self {
            cfg: cfg.clone(),
            shared,
            encoder,
            decoder,
            lm_head,
            lm_head_tied,
            dropout: ModelDropout::default(),
            device: src.device().clone(),
            prompt: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether `lm_head` is the shared embedding table.
    pub fn lm_head_tied(&self) -> bool {
        self.lm_head_tied
    }

    /// The tensors [`Self::load`] reads (for progress reports).
    pub fn tensor_count(cfg: &T5Config) -> u64 {
        let ff = if cfg.gated { 3 } else { 2 };
        let enc = cfg.num_layers * (4 + ff + 2) + 2;
        let dec = cfg.num_decoder_layers * (8 + ff + 3) + 2;
        (enc + dec + 2) as u64
    }

    /// All linear layers with their module names (transformers' state-dict names minus
    /// `.weight`), encoder then decoder then `lm_head`: what PEFT methods wrap.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for b in self.encoder.blocks.iter().chain(&self.decoder.blocks) {
            out.extend(b.linears());
        }
        out.push(&self.lm_head);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for b in self
            .encoder
            .blocks
            .iter_mut()
            .chain(self.decoder.blocks.iter_mut())
        {
            out.extend(b.linears_mut());
        }
        out.push(&mut self.lm_head);
        out
    }

    /// The token embedding table.
    pub fn embeddings(&self) -> Vec<&Embedding> {
        vec![&self.shared]
    }

    pub fn embeddings_mut(&mut self) -> Vec<&mut Embedding> {
        vec![&mut self.shared]
    }

    /// The relative position bias tables (`{encoder,decoder}.block.0.layer.0.SelfAttention.
    /// relative_attention_bias`).
    pub fn position_bias_tables(&self) -> Vec<&Embedding> {
        [&self.encoder, &self.decoder]
            .into_iter()
            .filter_map(|s| s.blocks[0].self_attention.relative_attention_bias.as_ref())
            .collect()
    }

    /// Every norm, by HF tensor name (the order of [`Self::norms_mut`]).
    pub fn norms(&self) -> Vec<(String, &RmsNorm)> {
        let mut out = Vec::new();
        for (name, s) in [("encoder", &self.encoder), ("decoder", &self.decoder)] {
            for (i, b) in s.blocks.iter().enumerate() {
                let p = block_prefix(name, i);
                out.push((
                    format!("{p}.layer.0.layer_norm.weight"),
                    &b.self_attention_norm,
                ));
                let ff_layer = if let Some((_, n)) = &b.cross_attention {
                    out.push((format!("{p}.layer.1.layer_norm.weight"), n));
                    2
                } else {
                    1
                };
                out.push((
                    format!("{p}.layer.{ff_layer}.layer_norm.weight"),
                    &b.ff_norm,
                ));
            }
            out.push((
                format!("{name}.final_layer_norm.weight"),
                &s.final_layer_norm,
            ));
        }
        out
    }

    fn norms_mut(&mut self) -> Vec<(String, &mut RmsNorm)> {
        let mut out = Vec::new();
        for (name, s) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            for (i, b) in s.blocks.iter_mut().enumerate() {
                let p = block_prefix(name, i);
                out.push((
                    format!("{p}.layer.0.layer_norm.weight"),
                    &mut b.self_attention_norm,
                ));
                let ff_layer = if let Some((_, n)) = &mut b.cross_attention {
                    out.push((format!("{p}.layer.1.layer_norm.weight"), n));
                    2
                } else {
                    1
                };
                out.push((
                    format!("{p}.layer.{ff_layer}.layer_norm.weight"),
                    &mut b.ff_norm,
                ));
            }
            out.push((
                format!("{name}.final_layer_norm.weight"),
                &mut s.final_layer_norm,
            ));
        }
        out
    }

    /// Parameters that are neither linears nor the embedding table, by HF tensor name: the
    /// norms and the relative position bias tables.
    pub fn other_params(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .norms()
            .into_iter()
            .map(|(n, norm)| (n, norm.weight().clone()))
            .collect();
        for t in self.position_bias_tables() {
            if let Ok(w) = embedding_tensor(t) {
                out.push((format!("{}.weight", t.name()), w));
            }
        }
        out
    }

    /// Make weights trainable and return them by HF tensor name: every weight (`None`, full
    /// fine-tuning) or those whose name starts with one of `modules`. A tied head shares the
    /// embedding's parameter. Quantized weights cannot be trained in place.
    pub fn make_trainable(&mut self, modules: Option<&[String]>) -> Result<Vec<(String, Var)>> {
        let wanted =
            |name: &str| modules.is_none_or(|m| m.iter().any(|p| name.starts_with(p.as_str())));
        let mut params = Vec::new();
        let mut shared_var = None;
        if wanted("shared.weight") || (self.lm_head_tied && wanted("lm_head.weight")) {
            let v = make_embedding_trainable(&mut self.shared)?;
            params.push(("shared.weight".to_string(), v.clone()));
            shared_var = Some(v);
        }
        let tied = self.lm_head_tied;
        for lin in self.linears_mut() {
            let name = format!("{}.weight", lin.name());
            if tied && lin.name() == "lm_head" {
                if let Some(v) = &shared_var {
                    lin.set_weight(LinearWeight::Trainable(v.clone()));
                }
                continue;
            }
            if !wanted(&name) {
                continue;
            }
            let v = match lin.weight() {
                LinearWeight::Frozen(t) => Var::from_tensor(&t.to_dtype(DType::F32)?)?,
                LinearWeight::Trainable(v) => v.clone(),
                LinearWeight::Quantized(_) => {
                    return Err(Error::msg(format!(
                    "{}: full fine-tuning needs dense weights: load the model without --requantize",
                    lin.name()
                )))
                }
            };
            lin.set_weight(LinearWeight::Trainable(v.clone()));
            params.push((name, v));
        }
        for (name, norm) in self.norms_mut() {
            if wanted(&name) {
                params.push((name, norm.make_trainable()?));
            }
        }
        for s in [&mut self.encoder, &mut self.decoder] {
            if let Some(t) = &mut s.blocks[0].self_attention.relative_attention_bias {
                let name = format!("{}.weight", t.name());
                if wanted(&name) {
                    params.push((name, make_embedding_trainable(t)?));
                }
            }
        }
        Ok(params)
    }

    /// Every token id of `ids` must be a row of the embedding table.
    fn check_ids(&self, ids: &Tensor, what: &str) -> Result<()> {
        let v: Vec<i64> = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        if let Some(bad) = v
            .iter()
            .find(|&&x| x < 0 || x as usize >= self.cfg.vocab_size)
        {
            return Err(Error::msg(format!(
                "{what}: token id {bad} is outside the vocabulary (0..{})",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Relative position biases (1, heads, tq, tk) for `tq` queries starting at position
    /// `offset` over `tk` keys starting at 0, from a stack's layer-0 table.
    fn position_bias(
        &self,
        stack: &T5Stack,
        tq: usize,
        tk: usize,
        offset: usize,
        bidirectional: bool,
    ) -> candle_core::Result<Tensor> {
        let Some(table) = &stack.blocks[0].self_attention.relative_attention_bias else {
            candle_core::bail!("T5: layer 0 has no relative_attention_bias")
        };
        let (nb, md) = (
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        );
        let ids: Vec<u32> = (0..tq)
            .flat_map(|i| {
                (0..tk).map(move |j| {
                    let rel = j as i64 - (offset + i) as i64;
                    relative_position_bucket(rel, bidirectional, nb, md) as u32
                })
            })
            .collect();
        let ids = Tensor::from_vec(ids, (1, tq * tk), &self.device)?;
        table
            .forward(&ids)?
            .reshape((tq, tk, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// The soft prompt of `kind`, if the model reads one of that kind: its values `(n, width)`
    /// checked against the width the model takes.
    fn prompt_values(&self, kind: VirtualTokens) -> Result<Option<Tensor>> {
        let Some(p) = self.prompt.as_ref().filter(|p| p.kind() == kind) else {
            return Ok(None);
        };
        let v = p.values()?;
        let n = p.num_virtual_tokens();
        let c = &self.cfg;
        let (width, what) = match kind {
            VirtualTokens::Embeddings => (c.d_model, "num_virtual_tokens, d_model"),
            VirtualTokens::Prefix => (
                c.num_decoder_layers * 2 * c.inner_dim(),
                "num_virtual_tokens, decoder layers · 2 · heads · d_kv",
            ),
        };
        if v.dims() != [n, width] {
            return Err(Error::msg(format!(
                "soft prompt is {:?} but {} takes ({n}, {width}) ({what})",
                v.dims(),
                Model::describe(self)
            )));
        }
        Ok(Some(v))
    }

    /// Prefix tuning's past keys and values of each decoder layer's self-attention, for `b`
    /// rows: each (b, heads, n, d_kv), picked as PEFT does (see the module docs).
    fn prompt_prefix(&self, b: usize) -> Result<Option<Vec<(Tensor, Tensor)>>> {
        let Some(v) = self.prompt_values(VirtualTokens::Prefix)? else {
            return Ok(None);
        };
        let n = v.dim(0)?;
        let (l, h, d) = (
            self.cfg.num_decoder_layers,
            self.cfg.num_heads,
            self.cfg.d_kv,
        );
        // PEFT: view(b, n, 2L, heads, d_kv), cat with itself on the 2L axis, permute to
        // (4L, b, heads, n, d_kv) and split in fours.
        let v = v.reshape((n, 2 * l, h, d))?;
        let part = |j: usize| -> candle_core::Result<Tensor> {
            v.narrow(1, j, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .broadcast_as((b, h, n, d))?
                .contiguous()
        };
        let kv = (0..l)
            .map(|i| {
                let k = (4 * i) % (2 * l);
                Ok((part(k)?, part(k + 1)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(kv))
    }

    /// The encoder: ids (b, s) and an optional attention mask (b, s) (1 = token, 0 =
    /// padding) -> hidden states (b, s, d_model) after the final norm. `train` enables adapter
    /// dropout; the model's own dropout is [`Self::loss_sum`]'s. With a prompt tuning or
    /// P-tuning soft prompt the output is (b, n + s, d_model), the virtual tokens first (the
    /// decoder then needs the mask with n ones put in front: [`Self::forward`] does that).
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let off = DropoutPass::off();
        Ok(self
            .encode_with(input_ids, attention_mask, train, self.dropping(&off))?
            .0)
    }

    fn dropping<'a>(&self, pass: &'a DropoutPass) -> Dropping<'a> {
        Dropping {
            pass,
            p: self.cfg.dropout_rate,
        }
    }

    /// [`Self::encode`]; also returns the attention mask the decoder's cross-attention reads:
    /// the given one with ones put before it for the virtual tokens of a soft prompt.
    fn encode_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        drop: Dropping,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, s) = input_ids.dims2()?;
        self.check_ids(input_ids, "encoder input")?;
        let mask = match attention_mask {
            Some(m) if m.dims() != [b, s] => {
                return Err(Error::msg(format!(
                    "attention mask has shape {:?} but the encoder ids have ({b}, {s})",
                    m.dims()
                )))
            }
            Some(m) => Some(m.clone()),
            None => None,
        };
        let mut x = self.shared.forward(input_ids)?;
        let mut mask = mask;
        if let Some(p) = self.prompt_values(VirtualTokens::Embeddings)? {
            let n = p.dim(0)?;
            let p = p
                .to_dtype(x.dtype())?
                .unsqueeze(0)?
                .broadcast_as((b, n, self.cfg.d_model))?
                .contiguous()?;
            x = Tensor::cat(&[&p, &x], 1)?;
            if let Some(m) = &mask {
                let ones = Tensor::ones((b, n), m.dtype(), m.device())?;
                mask = Some(Tensor::cat(&[&ones, m], 1)?);
            }
        }
        let s = x.dim(1)?;
        let additive = mask.as_ref().map(padding_mask).transpose()?;
        let bias = self.position_bias(&self.encoder, s, s, 0, true)?;
        let mut x = drop.apply(&x)?;
        let detach = crate::nn::graph_off();
        for block in &self.encoder.blocks {
            x = block.forward_encoder(
                &x,
                &bias,
                additive.as_ref(),
                self.cfg.activation,
                train,
                drop,
            )?;
            if detach {
                x = x.detach();
            }
        }
        let out = drop.apply(&self.encoder.final_layer_norm.forward(&x)?)?;
        Ok((out, mask))
    }

    /// Start decoding over `encoder_out (b, s, d_model)`: its cross-attention keys and values
    /// for every decoder layer, computed once. A prefix tuning prompt is cached first, as the
    /// past keys and values PEFT passes.
    pub fn start_cache(
        &self,
        encoder_out: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<T5Cache> {
        let cross_kv = self.cross_key_values(encoder_out, false)?;
        let (self_kv, len) = match self.prompt_prefix(encoder_out.dim(0)?)? {
            Some(kv) => {
                let n = kv.first().map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0);
                (kv.into_iter().map(Some).collect(), n)
            }
            None => (vec![None; self.decoder.blocks.len()], 0),
        };
        Ok(T5Cache {
            self_kv,
            cross_kv,
            enc_mask: attention_mask.map(padding_mask).transpose()?,
            len,
        })
    }

    fn cross_key_values(
        &self,
        encoder_out: &Tensor,
        train: bool,
    ) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
        self.decoder
            .blocks
            .iter()
            .map(|b| match &b.cross_attention {
                Some((a, _)) => a.key_values(encoder_out, train),
                None => candle_core::bail!("T5: a decoder block without cross-attention"),
            })
            .collect()
    }

    /// The decoder stack over `ids (b, t)` that follow `offset` cached positions; returns the
    /// hidden states (b, t, d_model) after the final norm and T5 v1.0's output scaling (what
    /// the LM head reads).
    #[allow(clippy::too_many_arguments)]
    fn run_decoder(
        &self,
        ids: &Tensor,
        cross_kv: &[(Tensor, Tensor)],
        enc_mask: Option<&Tensor>,
        mut self_cache: Option<&mut [KvSlot]>,
        offset: usize,
        train: bool,
        drop: Dropping,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        self.check_ids(ids, "decoder input")?;
        let bias = self.position_bias(&self.decoder, t, offset + t, offset, false)?;
        let causal = if t > 1 {
            Some(causal_mask(t, offset, &self.device)?)
        } else {
            None
        };
        let mut x = drop.apply(&self.shared.forward(ids)?)?;
        let detach = crate::nn::graph_off();
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let slot = self_cache.as_deref_mut().map(|c| &mut c[i]);
            x = block.forward_decoder(
                &x,
                &bias,
                causal.as_ref(),
                slot,
                &cross_kv[i],
                enc_mask,
                self.cfg.activation,
                train,
                drop,
            )?;
            if detach {
                x = x.detach();
            }
        }
        let h = drop.apply(&self.decoder.final_layer_norm.forward(&x)?)?;
        Ok(if self.cfg.scale_decoder_outputs {
            (h * (self.cfg.d_model as f64).powf(-0.5))?
        } else {
            h
        })
    }

    /// Decoder hidden states (b, t, d_model) for whole decoder inputs `decoder_ids (b, t)`
    /// over `encoder_out`, ready for the LM head (scaled for T5 v1.0). No cache.
    pub fn decode_hidden(
        &self,
        decoder_ids: &Tensor,
        encoder_out: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let off = DropoutPass::off();
        let drop = self.dropping(&off);
        self.decode_hidden_with(decoder_ids, encoder_out, attention_mask, train, drop)
    }

    fn decode_hidden_with(
        &self,
        decoder_ids: &Tensor,
        encoder_out: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        drop: Dropping,
    ) -> Result<Tensor> {
        let cross_kv = self.cross_key_values(encoder_out, train)?;
        let mask = attention_mask.map(padding_mask).transpose()?;
        match self.prompt_prefix(decoder_ids.dim(0)?)? {
            None => self.run_decoder(decoder_ids, &cross_kv, mask.as_ref(), None, 0, train, drop),
            Some(kv) => {
                // The prefix is the past of every row: the decoder's positions start after it.
                let n = kv.first().map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0);
                let mut slots: Vec<KvSlot> = kv.into_iter().map(Some).collect();
                self.run_decoder(
                    decoder_ids,
                    &cross_kv,
                    mask.as_ref(),
                    Some(&mut slots),
                    n,
                    train,
                    drop,
                )
            }
        }
    }

    /// Logits (b, t, vocab) for encoder ids and whole decoder inputs (transformers'
    /// `model(input_ids, attention_mask, decoder_input_ids).logits`).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        decoder_ids: &Tensor,
    ) -> Result<Tensor> {
        let off = DropoutPass::off();
        let drop = self.dropping(&off);
        let (enc, mask) = self.encode_with(input_ids, attention_mask, false, drop)?;
        let h = self.decode_hidden_with(decoder_ids, &enc, mask.as_ref(), false, drop)?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Feed decoder tokens `ids (b, t)` after those in `cache`; returns their logits
    /// (b, t, vocab) and extends the cache.
    pub fn decode_step(&self, ids: &Tensor, cache: &mut T5Cache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if b != cache.batch() {
            return Err(Error::msg(format!(
                "T5 decode step: {b} rows but the cache holds {}",
                cache.batch()
            )));
        }
        let offset = cache.len;
        let off = DropoutPass::off();
        let h = self.run_decoder(
            ids,
            &cache.cross_kv,
            cache.enc_mask.as_ref(),
            Some(cache.self_kv.as_mut_slice()),
            offset,
            false,
            self.dropping(&off),
        )?;
        cache.len += t;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Decoder inputs from labels as transformers' `_shift_right` makes them: the start token,
    /// then the labels but the last, with -100 replaced by the pad token.
    pub fn shift_right(&self, labels: &[Vec<i64>]) -> Vec<Vec<u32>> {
        labels
            .iter()
            .map(|row| {
                std::iter::once(self.cfg.decoder_start_token_id)
                    .chain(row.iter().take(row.len().saturating_sub(1)).map(|&l| {
                        if l == IGNORE {
                            self.cfg.pad_token_id
                        } else {
                            l as u32
                        }
                    }))
                    .collect()
            })
            .collect()
    }

    /// The summed cross-entropy over the label positions that are not -100, and their count:
    /// `T5ForConditionalGeneration(input_ids, attention_mask, labels=labels).loss` times the
    /// count. `labels (b, t)` are the decoder targets; the decoder inputs are the labels shifted
    /// right ([`Self::shift_right`]). `train` enables dropout: the adapters' and the model's
    /// own (`dropout_rate`, where transformers' T5 applies it in train mode, masks from
    /// [`Self::dropout`]'s stream). The sum is differentiable with respect to every trainable
    /// parameter.
    pub fn loss_sum(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        let (b, t) = labels.dims2()?;
        let rows: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
        let vocab = self.cfg.vocab_size;
        let mut picked = Vec::new();
        let mut targets = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            for (j, &l) in row.iter().enumerate() {
                if l == IGNORE {
                    continue;
                }
                if l < 0 || l as usize >= vocab {
                    return Err(Error::msg(format!(
                        "labels: row {i}, position {j}: {l} is neither a token id (0..{vocab}) nor -100"
                    )));
                }
                picked.push((i * t + j) as u32);
                targets.push(l as u32);
            }
        }
        // Counted even when nothing is scored: the stream counts training passes.
        let pass = self.dropout.pass(train);
        if picked.is_empty() {
            return Ok((Tensor::zeros((), DType::F32, &self.device)?, 0));
        }
        let dec: Vec<u32> = self.shift_right(&rows).concat();
        let dec = Tensor::from_vec(dec, (b, t), &self.device)?;
        let drop = self.dropping(&pass);
        let (enc, mask) = self.encode_with(input_ids, attention_mask, train, drop)?;
        let h = self.decode_hidden_with(&dec, &enc, mask.as_ref(), train, drop)?;
        let d = h.dim(2)?;
        let n = picked.len();
        let h = h
            .reshape((b * t, d))?
            .index_select(&Tensor::from_vec(picked, n, &self.device)?, 0)?;
        let head = &self.lm_head;
        let frozen = match head.weight() {
            _ if head.has_active_adapters() => None,
            LinearWeight::Frozen(w) => Some(ops::FrozenHead::Dense(w.clone())),
            LinearWeight::Quantized(q) => Some(ops::FrozenHead::Quantized(q.clone())),
            LinearWeight::Trainable(_) => None,
        };
        let loss = match frozen {
            Some(fh) => ops::linear_cross_entropy_sum(&h, &fh, &targets)?,
            None => {
                let logits = head.forward_t(&h.unsqueeze(0)?, train)?.squeeze(0)?;
                ops::cross_entropy_sum(&logits, &Tensor::from_vec(targets, n, &self.device)?)?
            }
        };
        Ok((loss, n))
    }

    /// The mean cross-entropy over label positions (`T5ForConditionalGeneration(labels=...)
    /// .loss`). An error when every label is -100 (transformers returns NaN).
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (sum, n) = self.loss_sum(input_ids, attention_mask, labels, train)?;
        if n == 0 {
            return Err(Error::msg(
                "labels: every position is -100, there is nothing to score",
            ));
        }
        Ok((sum / n as f64)?)
    }

    /// Incremental decoding for [`crate::generate::generate`]: the prompt is the encoder input,
    /// decoding starts from `decoder_start_token_id`.
    pub fn decoder(&self) -> T5Decoder<'_> {
        T5Decoder {
            model: self,
            cache: None,
        }
    }

    /// Beam search from `prompt_ids` (the encoder input), as transformers'
    /// `generate(num_beams=...)`; the tokens returned follow the start token.
    pub fn generate_beam(&self, prompt_ids: &[u32], cfg: &BeamConfig) -> Result<BeamOutput> {
        crate::beam::beam_search(&mut self.beam_decoder(prompt_ids), cfg)
    }

    /// The [`BeamDecoder`] for `prompt_ids` (the encoder input), for [`crate::beam`].
    pub fn beam_decoder(&self, prompt_ids: &[u32]) -> T5BeamDecoder<'_> {
        T5BeamDecoder {
            model: self,
            prompt: prompt_ids.to_vec(),
            cache: None,
        }
    }

    /// Encoder output and a fresh cache with `rows` copies of it, for `prompt_ids`.
    fn start_from_prompt(&self, prompt_ids: &[u32], rows: usize) -> Result<T5Cache> {
        if prompt_ids.is_empty() {
            return Err(Error::msg("the prompt is empty (0 tokens)"));
        }
        let ids = Tensor::new(prompt_ids, &self.device)?.unsqueeze(0)?;
        let off = DropoutPass::off();
        let (enc, mask) = self.encode_with(&ids, None, false, self.dropping(&off))?;
        let mut cache = self.start_cache(&enc, mask.as_ref())?;
        if rows != 1 {
            cache.select(&vec![0; rows])?;
        }
        Ok(cache)
    }

    /// Logits rows (b, 1, vocab) -> one Vec per row.
    fn last_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
        let t = logits.dim(1)?;
        Ok(logits
            .narrow(1, t - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2()?)
    }

    /// Every weight by HF tensor name (dequantized, in `dtype`); a tied head is not listed.
    pub fn state_dict(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "shared.weight".to_string(),
            embedding_tensor(&self.shared)?.to_dtype(dtype)?,
        )];
        for lin in self.linears() {
            if self.lm_head_tied && lin.name() == "lm_head" {
                continue;
            }
            out.push((
                format!("{}.weight", lin.name()),
                lin.weight().to_dense_f32()?.to_dtype(dtype)?,
            ));
        }
        for (name, n) in self.norms() {
            out.push((name, n.weight().to_dtype(dtype)?));
        }
        for t in self.position_bias_tables() {
            out.push((
                format!("{}.weight", t.name()),
                embedding_tensor(t)?.to_dtype(dtype)?,
            ));
        }
        Ok(out)
    }
}

/// An embedding table's values as a dense f32 tensor.
fn embedding_tensor(e: &Embedding) -> Result<Tensor> {
    Ok(match e.weight() {
        EmbeddingWeight::Frozen(t) => t.to_dtype(DType::F32)?,
        EmbeddingWeight::Trainable(v) => v.as_tensor().to_dtype(DType::F32)?,
        EmbeddingWeight::Quantized(q) => q.dequantize()?,
    })
}

fn make_embedding_trainable(e: &mut Embedding) -> Result<Var> {
    let v = match e.weight() {
        EmbeddingWeight::Trainable(v) => v.clone(),
        EmbeddingWeight::Frozen(t) => Var::from_tensor(&t.to_dtype(DType::F32)?)?,
        EmbeddingWeight::Quantized(_) => {
            return Err(Error::msg(format!(
                "{}: full fine-tuning needs dense weights",
                e.name()
            )))
        }
    };
    e.set_weight(EmbeddingWeight::Trainable(v.clone()));
    Ok(v)
}

// ---------------------------------------------------------------- generation

/// [`crate::generate::Decoder`] for T5: `prefill` encodes the prompt and feeds the decoder
/// start token; each `step` feeds one generated token.
pub struct T5Decoder<'a> {
    model: &'a T5,
    cache: Option<T5Cache>,
}

impl T5 {
    /// Encode `prompt_ids` and feed the decoder start token: the first generated token's
    /// logits and the cache to continue from. [`T5Decoder`]'s prefill, with a cache the caller
    /// owns (the serving backend keeps one per sequence), so both compute the same values.
    pub fn prefill_cache(&self, prompt_ids: &[u32]) -> Result<(T5Cache, Vec<f32>)> {
        let mut cache = self.start_from_prompt(prompt_ids, 1)?;
        let start = Tensor::new(&[[self.cfg.decoder_start_token_id]], &self.device)?;
        let logits = self.decode_step(&start, &mut cache)?;
        Ok((cache, T5::last_rows(&logits)?.remove(0)))
    }

    /// Feed one generated token after `cache` (from [`Self::prefill_cache`]); its logits.
    pub fn step_cache(&self, cache: &mut T5Cache, id: u32) -> Result<Vec<f32>> {
        let ids = Tensor::new(&[[id]], &self.device)?;
        let logits = self.decode_step(&ids, cache)?;
        Ok(T5::last_rows(&logits)?.remove(0))
    }
}

impl crate::generate::Decoder for T5Decoder<'_> {
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let (cache, logits) = self.model.prefill_cache(ids)?;
        self.cache = Some(cache);
        Ok(logits)
    }

    fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| Error::msg("T5 decoder: step before prefill"))?;
        self.model.step_cache(cache, id)
    }

    /// Relative positions set no hard limit; the prompt is not part of the decoder's context.
    fn context_length(&self) -> usize {
        usize::MAX
    }
    /// The prompt is the encoder input: the decoder's history starts empty.
    fn prompt_in_context(&self) -> bool {
        false
    }
}

/// [`BeamDecoder`] for T5: the prompt is encoded once, each beam has its own decoder cache.
pub struct T5BeamDecoder<'a> {
    model: &'a T5,
    prompt: Vec<u32>,
    cache: Option<T5Cache>,
}

impl BeamDecoder for T5BeamDecoder<'_> {
    fn start(&mut self, num_beams: usize) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.model.start_from_prompt(&self.prompt, num_beams)?;
        let start = self.model.cfg.decoder_start_token_id;
        let ids = Tensor::from_vec(vec![start; num_beams], (num_beams, 1), &self.model.device)?;
        let logits = self.model.decode_step(&ids, &mut cache)?;
        self.cache = Some(cache);
        T5::last_rows(&logits)
    }

    fn advance(&mut self, parents: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| Error::msg("T5 beam decoder: advance before start"))?;
        cache.select(parents)?;
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &self.model.device)?;
        let logits = self.model.decode_step(&ids, cache)?;
        T5::last_rows(&logits)
    }
}

// ---------------------------------------------------------------- loading

/// A T5 model ready to run, with its tokenizer.
pub struct LoadedT5 {
    pub model: T5,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// Bytes of the weight files on disk.
    pub file_bytes: u64,
}

impl LoadedT5 {
    /// Tokens that end generation: the tokenizer's and config.json's `eos_token_id`.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.tokenizer.eos_ids().to_vec();
        for &e in &self.model.cfg.eos_token_ids {
            if !ids.contains(&e) {
                ids.push(e);
            }
        }
        ids
    }
}

/// Read and parse `dir/config.json` as a T5 config.
pub fn config_from_hf_dir(dir: &Path) -> Result<T5Config> {
    let p = dir.join("config.json");
    let text = crate::fsutil::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&p, format!("invalid JSON: {e}")))?;
    T5Config::from_hf_json(&v, &p.display().to_string())
}

/// Whether `source` is an HF folder whose config.json describes a T5 model. A folder whose
/// config.json cannot be read says no (the general loader reports what is wrong with it).
pub fn is_t5_source(source: &ModelSource) -> bool {
    let ModelSource::HfDir(dir) = source else {
        return false;
    };
    crate::fsutil::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| is_t5_config(&v))
}

/// Load a T5 HF folder: config.json, safetensors weights, and the tokenizer (tokenizer.json,
/// or spiece.model where that is all the folder has). Input ids end with `</s>`, as
/// transformers' T5 tokenizer makes them.
pub fn load_source(
    source: ModelSource,
    opts: &super::LoadOptions,
    device: &Device,
    progress: &dyn Progress,
) -> Result<LoadedT5> {
    let dir = match &source {
        ModelSource::HfDir(dir) => dir.clone(),
        ModelSource::Gguf(p) => {
            return Err(Error::file(
                p,
                "T5 models are read from Hugging Face folders, not GGUF files",
            ))
        }
    };
    let cfg = config_from_hf_dir(&dir)?;
    let mut tokenizer = Tokenizer::from_hf_dir(&dir)?;
    tokenizer.set_add_eos(true);
    // config.json's end tokens end generation too, whichever decoder runs it.
    tokenizer.add_eos_ids(&cfg.eos_token_ids);
    let vocab = tokenizer.inner().get_vocab(true);
    if let Some((token, &id)) = vocab.iter().max_by_key(|(_, &id)| id) {
        if id as usize >= cfg.vocab_size {
            return Err(cfg.err(
                "vocab_size",
                format!(
                    "{} but the tokenizer of {} has token `{token}` with id {id}",
                    cfg.vocab_size,
                    dir.display()
                ),
            ));
        }
    }
    let src = super::SafetensorsSource::open(&dir, opts, device)?;
    progress.start("loading", T5::tensor_count(&cfg), "tensors");
    let model = T5::load(
        &CountingSource {
            inner: &src,
            progress,
        },
        &cfg,
    );
    progress.finish();
    let file_bytes = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0);
    Ok(LoadedT5 {
        model: model?,
        tokenizer,
        source,
        file_bytes,
    })
}

// ---------------------------------------------------------------- the model interface

/// f32 values one T5 layer keeps per token for the backward pass (the larger, decoder layer:
/// self-attention, cross-attention and feed-forward), counted like LLaMA's: the norms' outputs
/// (h each), q/k/v and the attention output (inner each), the output projections (h), the
/// feed-forward input projections and activation (ff each, gated: three) and its output (h).
fn t5_layer_floats_per_token(model: &T5, dropout: bool) -> u64 {
    use crate::train::memory::{adapter_floats, Sat};
    let c = &model.cfg;
    let h = Sat(c.d_model as u64);
    let inner = Sat(c.inner_dim() as u64);
    let ff = Sat(c.d_ff as u64) * Sat(if c.gated { 3 } else { 2 });
    let base = Sat(8) * h + Sat(8) * inner + ff;
    let adapters = model
        .decoder
        .blocks
        .first()
        .or(model.encoder.blocks.first())
        .map(|b| {
            b.linears()
                .into_iter()
                .fold(Sat(0), |a, lin| a + Sat(adapter_floats(lin, dropout)))
        })
        .unwrap_or(Sat(0));
    (base + adapters).0
}

impl T5 {
    fn check_targets(&self, batch: &Batch) -> Result<()> {
        if batch.targets != Targets::Decoder {
            return Err(Error::msg(format!(
                "{} is an encoder-decoder: it trains on decoder targets (task seq2seq_lm), not {}",
                Model::describe(self),
                batch.targets.as_str()
            )));
        }
        Ok(())
    }
}

impl Model for T5 {
    fn family(&self) -> &'static str {
        "t5"
    }
    fn architecture(&self) -> String {
        self.cfg
            .raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                if self.cfg.model_type == "mt5" {
                    "MT5ForConditionalGeneration".to_string()
                } else {
                    "T5ForConditionalGeneration".to_string()
                }
            })
    }
    fn kind(&self) -> ArchitectureKind {
        ArchitectureKind::EncoderDecoder
    }
    fn pretraining_objective(&self) -> Objective {
        Objective::SpanCorruption
    }
    fn task_type(&self) -> TaskType {
        TaskType::Seq2SeqLm
    }
    fn tasks(&self) -> Vec<Task> {
        vec![Task::Seq2SeqLm]
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dims(&self) -> Dims {
        let c = &self.cfg;
        Dims {
            hidden_size: c.d_model,
            layers: c.num_layers + c.num_decoder_layers,
            encoder_layers: c.num_layers,
            decoder_layers: c.num_decoder_layers,
            attention_heads: c.num_heads,
            kv_heads: c.num_heads,
            head_dim: c.d_kv,
            intermediate_size: c.d_ff,
            vocab_size: c.vocab_size,
            tied_embeddings: self.lm_head_tied,
            rope_theta: None,
        }
    }
    fn context_length(&self) -> Option<usize> {
        None
    }

    fn linears(&self) -> Vec<&Linear> {
        T5::linears(self)
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        T5::linears_mut(self)
    }
    fn embeddings(&self) -> Vec<&Embedding> {
        T5::embeddings(self)
    }
    fn embeddings_mut(&mut self) -> Vec<&mut Embedding> {
        T5::embeddings_mut(self)
    }
    fn tied(&self, name: &str) -> bool {
        name == "lm_head" && self.lm_head_tied
    }
    fn output_layer(&self) -> Option<&str> {
        Some("lm_head")
    }
    fn other_params(&self) -> Vec<(String, Tensor)> {
        T5::other_params(self)
    }
    fn default_lora_targets(&self) -> Vec<&'static str> {
        vec!["q", "v"]
    }
    fn make_trainable(&mut self, modules: Option<&[String]>) -> Result<Vec<(String, Var)>> {
        T5::make_trainable(self, modules)
    }

    fn loss_sum(&self, batch: &Batch, train: bool) -> Result<(Tensor, usize)> {
        self.check_targets(batch)?;
        T5::loss_sum(
            self,
            &batch.input_ids,
            Some(&batch.attention_mask),
            &batch.labels,
            train,
        )
    }
    fn logits(&self, batch: &Batch) -> Result<Tensor> {
        self.check_targets(batch)?;
        let rows: Vec<Vec<i64>> = batch.labels.to_dtype(DType::I64)?.to_vec2()?;
        let (b, t) = batch.labels.dims2()?;
        let dec = Tensor::from_vec(self.shift_right(&rows).concat(), (b, t), &self.device)?;
        self.forward(&batch.input_ids, Some(&batch.attention_mask), &dec)
    }
    fn activation_floats_per_token(&self, dropout: bool) -> u64 {
        let layers = (self.cfg.num_layers + self.cfg.num_decoder_layers) as u64;
        t5_layer_floats_per_token(self, dropout).saturating_mul(layers)
    }
    fn layer_floats_per_token(&self, dropout: bool) -> u64 {
        t5_layer_floats_per_token(self, dropout)
    }

    fn decoder(&self) -> Result<Box<dyn crate::generate::Decoder + '_>> {
        Ok(Box::new(T5::decoder(self)))
    }
    fn beam_decoder(&self, prompt_ids: &[u32]) -> Option<Box<dyn BeamDecoder + '_>> {
        Some(Box::new(T5::beam_decoder(self, prompt_ids)))
    }

    fn configure_dropout(&self, seed: u64, enabled: bool) {
        self.dropout.configure(seed, enabled)
    }
    fn dropout_calls(&self) -> Option<u64> {
        Some(self.dropout.calls())
    }
    fn set_dropout_calls(&self, calls: u64) {
        self.dropout.set_calls(calls)
    }

    fn set_virtual_prompt(&mut self, prompt: Option<Arc<dyn SoftPrompt>>) -> Result<()> {
        self.prompt = prompt;
        Ok(())
    }
    fn virtual_prompt(&self) -> Option<Arc<dyn SoftPrompt>> {
        self.prompt.clone()
    }

    fn state_dict(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        Ok(T5::state_dict(self, dtype)?.into_iter().collect())
    }
    fn hf_config(&self) -> Result<Value> {
        Ok(self.cfg.raw.clone())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
#[path = "t5_tests.rs"]
mod tests;
