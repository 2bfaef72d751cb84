//! BERT-family encoders (BERT, RoBERTa, MiniLM): absolute position and token-type embeddings,
//! post-norm layers (self-attention over the non-padding tokens, GELU feed-forward, biases,
//! LayerNorm), and the heads of transformers' `BertForSequenceClassification`,
//! `BertForTokenClassification` and `BertForMaskedLM` (and their RoBERTa twins), plus sentence
//! embeddings pooled as sentence-transformers pools them. Every op has a backward pass, so the
//! same code serves inference and fine-tuning.
//!
//! Names follow transformers' state dicts. A checkpoint of a model with a head stores the
//! encoder under `bert.` / `roberta.`; a bare `BertModel` (e.g. all-MiniLM-L6-v2) stores it
//! without a prefix. Either file loads with any head: the layers are named as the model class
//! being built names them (`bert.encoder.layer.0.attention.self.query` with a head, without the
//! prefix for the bare encoder), so PEFT adapter files match the class PEFT would wrap.
use super::config::limits;
use super::family::{cannot_generate, ArchitectureKind, Dims, Model, Objective, Task, TaskType};
use super::weights::{ExpectedTensor, WeightSource};
use super::ModelSource;
use crate::data::{Batch, Targets};
use crate::generate::Decoder;
use crate::nn::{
    DropoutPass, Embedding, EmbeddingWeight, LayerNorm, Linear, LinearWeight, ModelDropout,
};
use crate::ops;
use crate::progress::{CountingSource, NoProgress, Progress};
use crate::tokenizer::{InputEncoder, Tokenizer};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Most classes a classification head may have (a larger `num_labels` is a typo or an attack).
pub const MAX_LABELS: usize = 1 << 20;
/// Most token types (`type_vocab_size`); real models have 1 or 2.
pub const MAX_TOKEN_TYPES: usize = 1 << 16;

/// BERT or RoBERTa: the same encoder, with different names, position ids and heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertFlavor {
    /// `model_type` "bert" (BERT, MiniLM, ...): positions 0, 1, 2, ...
    Bert,
    /// `model_type` "roberta" / "xlm-roberta": positions start after `pad_token_id`, padding
    /// tokens get `pad_token_id`; the classification head has its own dense layer.
    Roberta,
}

impl BertFlavor {
    /// The encoder's prefix in models with a head (`bert.` / `roberta.`).
    pub fn prefix(self) -> &'static str {
        match self {
            BertFlavor::Bert => "bert.",
            BertFlavor::Roberta => "roberta.",
        }
    }
    fn class_prefix(self) -> &'static str {
        match self {
            BertFlavor::Bert => "Bert",
            BertFlavor::Roberta => "Roberta",
        }
    }
}

/// `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// "gelu": the exact GELU, x·Φ(x) with erf.
    GeluErf,
    /// "gelu_new", "gelu_pytorch_tanh", "gelu_fast": the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::GeluErf => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

/// What the model computes on top of the encoder (the transformers class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertHead {
    /// `BertModel`: hidden states (and the pooler output when the file has the pooler).
    None,
    /// `BertForSequenceClassification`: pooler + `classifier` (RoBERTa: `classifier.dense`,
    /// tanh, `classifier.out_proj` on the first token).
    SequenceClassification,
    /// `BertForTokenClassification`: `classifier` on every token.
    TokenClassification,
    /// `BertForMaskedLM`: `cls.predictions` (RoBERTa: `lm_head`), decoder tied to the word
    /// embeddings.
    MaskedLm,
}

impl BertHead {
    /// PEFT's `task_type` for this head.
    pub fn peft_task_type(self) -> &'static str {
        match self {
            BertHead::None => "FEATURE_EXTRACTION",
            BertHead::SequenceClassification => "SEQ_CLS",
            BertHead::TokenClassification => "TOKEN_CLS",
            // PEFT has no masked-LM task type; adapters on it are saved without one.
            BertHead::MaskedLm => "FEATURE_EXTRACTION",
        }
    }
}

/// How sequence classification computes its loss (transformers' `problem_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// Cross-entropy over `num_labels` classes (integer labels).
    SingleLabel,
    /// Mean squared error on one score (`num_labels` = 1).
    Regression,
}

/// Hyper-parameters of a BERT-family encoder, from an HF `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub flavor: BertFlavor,
    /// `architectures[0]`, e.g. "BertModel", "BertForMaskedLM".
    pub architecture: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub hidden_act: Activation,
    /// `id2label` in id order (`LABEL_0`, ... when the file has none).
    pub labels: Vec<String>,
    pub problem_type: ProblemType,
    /// Standard deviation of freshly initialised head weights (transformers' `_init_weights`).
    pub initializer_range: f64,
    pub tie_word_embeddings: bool,
    /// Dropout in training (transformers' train mode): on the embeddings and each sublayer's
    /// output (`hidden_dropout_prob`), on the attention weights
    /// (`attention_probs_dropout_prob`), before the classifier (`classifier_dropout`, else
    /// `hidden_dropout_prob`).
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub classifier_dropout: Option<f64>,
    /// The config.json, for messages.
    pub file: String,
}

impl BertConfig {
    /// Whether an HF `config.json` value describes a BERT-family encoder (`model_type` bert,
    /// roberta or xlm-roberta, or a Bert*/Roberta* architecture).
    pub fn is_bert_family(v: &Value) -> bool {
        flavor_of(v).is_some()
    }

    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The head of the class the file was saved from (`architectures[0]`); `None` for a bare
    /// encoder or an architecture without one of our heads.
    pub fn saved_head(&self) -> BertHead {
        let arch = self.architecture.as_deref().unwrap_or("");
        if arch.ends_with("ForSequenceClassification") {
            BertHead::SequenceClassification
        } else if arch.ends_with("ForTokenClassification") {
            BertHead::TokenClassification
        } else if arch.ends_with("ForMaskedLM") || arch.ends_with("ForPreTraining") {
            BertHead::MaskedLm
        } else {
            BertHead::None
        }
    }

    /// The first position id (RoBERTa counts from `pad_token_id + 1`).
    pub fn position_offset(&self) -> usize {
        match self.flavor {
            BertFlavor::Bert => 0,
            BertFlavor::Roberta => self.pad_token_id as usize + 1,
        }
    }

    /// Most tokens one sequence may have (special tokens included).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    fn err(&self, key: &str, what: impl std::fmt::Display) -> Error {
        Error::key(&self.file, key, what)
    }

    /// Parse an HF `config.json` value (`source` names the file in errors) and validate it.
    pub fn from_hf_json(v: &Value, source: &str) -> Result<Self> {
        let err = |k: &str, what: String| Error::key(source, k, what);
        let flavor = match flavor_of(v) {
            Some(f) => f,
            None => {
                let mt = v.get("model_type").and_then(|m| m.as_str());
                return Err(match mt {
                    Some(mt) => err(
                        "model_type",
                        format!("`{mt}` is not a BERT-family encoder (expected bert or roberta)"),
                    ),
                    None => err(
                        "model_type",
                        "missing (and architectures names no BERT or RoBERTa model)".into(),
                    ),
                });
            }
        };
        let usize_of = |k: &str, x: &Value| -> Result<usize> {
            x.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| err(k, format!("{x} is not a non-negative integer")))
        };
        let req = |k: &str| -> Result<usize> {
            usize_of(k, v.get(k).ok_or_else(|| err(k, "missing".into()))?)
        };
        let opt = |k: &str, default: usize| -> Result<usize> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => usize_of(k, x),
            }
        };
        let opt_f64 = |k: &str, default: f64| -> Result<f64> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| err(k, format!("{x} is not a number"))),
            }
        };
        let opt_str = |k: &str| -> Result<Option<String>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(x) => Err(err(k, format!("{x} is not a string"))),
            }
        };
        let opt_bool = |k: &str, default: bool| -> Result<bool> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(err(k, format!("{x} is not true or false"))),
            }
        };
        for k in ["is_decoder", "add_cross_attention"] {
            if opt_bool(k, false)? {
                return Err(err(
                    k,
                    "true: only the encoder (no causal or cross-attention) is supported".into(),
                ));
            }
        }
        let hidden_act = match opt_str("hidden_act")?.as_deref().unwrap_or("gelu") {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(err(
                    "hidden_act",
                    format!("`{other}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)"),
                ))
            }
        };
        if let Some(p) = opt_str("position_embedding_type")? {
            if p != "absolute" {
                return Err(err(
                    "position_embedding_type",
                    format!("`{p}` is not supported (only absolute)"),
                ));
            }
        }
        let labels = parse_labels(v, source)?;
        let problem_type = match opt_str("problem_type")?.as_deref() {
            None if labels.len() == 1 => ProblemType::Regression,
            None | Some("single_label_classification") => ProblemType::SingleLabel,
            Some("regression") => ProblemType::Regression,
            Some(other) => {
                return Err(err(
                    "problem_type",
                    format!("`{other}` is not supported (supported: single_label_classification, regression)"),
                ))
            }
        };
        let default_pad = match flavor {
            BertFlavor::Bert => 0,
            BertFlavor::Roberta => 1,
        };
        let pad_token_id = opt("pad_token_id", default_pad)?;
        let cfg = BertConfig {
            flavor,
            architecture: v
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
                .map(str::to_string),
            vocab_size: req("vocab_size")?,
            hidden_size: req("hidden_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads: req("num_attention_heads")?,
            intermediate_size: req("intermediate_size")?,
            max_position_embeddings: opt("max_position_embeddings", 512)?,
            type_vocab_size: opt("type_vocab_size", 2)?,
            layer_norm_eps: opt_f64("layer_norm_eps", 1e-12)?,
            pad_token_id: u32::try_from(pad_token_id)
                .map_err(|_| err("pad_token_id", format!("{pad_token_id} is not a token id")))?,
            hidden_act,
            labels,
            problem_type,
            initializer_range: opt_f64("initializer_range", 0.02)?,
            tie_word_embeddings: opt_bool("tie_word_embeddings", true)?,
            hidden_dropout_prob: opt_f64("hidden_dropout_prob", 0.1)?,
            attention_probs_dropout_prob: opt_f64("attention_probs_dropout_prob", 0.1)?,
            classifier_dropout: match v.get("classifier_dropout") {
                None | Some(Value::Null) => None,
                Some(_) => Some(opt_f64("classifier_dropout", 0.0)?),
            },
            file: source.to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every size against [`limits`] and every float for NaN, infinity and sign, so
    /// nothing is allocated or indexed from a bad value. Errors name config.json and the key.
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let size = |key: &str, v: usize, max: usize| -> Result<()> {
            check_size(v, max).map_err(|e| self.err(key, e))
        };
        size("hidden_size", self.hidden_size, MAX_WIDTH)?;
        size("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        size("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        size("num_attention_heads", self.num_attention_heads, MAX_HEADS)?;
        size("vocab_size", self.vocab_size, MAX_VOCAB)?;
        size(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_CONTEXT,
        )?;
        size("type_vocab_size", self.type_vocab_size, MAX_TOKEN_TYPES)?;
        size("num_labels", self.labels.len(), MAX_LABELS)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(self.err(
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.layer_norm_eps.is_finite() || self.layer_norm_eps < 0.0 {
            return Err(self.err(
                "layer_norm_eps",
                format!("{} must be a finite number >= 0", self.layer_norm_eps),
            ));
        }
        if !self.initializer_range.is_finite() || self.initializer_range < 0.0 {
            return Err(self.err(
                "initializer_range",
                format!("{} must be a finite number >= 0", self.initializer_range),
            ));
        }
        for (key, p) in [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            (
                "attention_probs_dropout_prob",
                Some(self.attention_probs_dropout_prob),
            ),
            ("classifier_dropout", self.classifier_dropout),
        ] {
            if let Some(p) = p {
                crate::nn::check_probability(p).map_err(|e| self.err(key, e))?;
            }
        }
        if self.problem_type == ProblemType::Regression && self.labels.len() != 1 {
            return Err(self.err(
                "problem_type",
                format!("regression needs num_labels 1, not {}", self.labels.len()),
            ));
        }
        if self.flavor == BertFlavor::Roberta
            && self.position_offset() + 2 > self.max_position_embeddings
        {
            return Err(self.err(
                "pad_token_id",
                format!(
                    "{}: RoBERTa's positions start after it, which leaves no room in max_position_embeddings {}",
                    self.pad_token_id, self.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }

    /// Parameters of the encoder and the head.
    pub fn num_params(&self, head: BertHead) -> u64 {
        let h = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let emb =
            (v + self.max_position_embeddings as u64 + self.type_vocab_size as u64) * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h;
        let pooler = h * h + h;
        let n = self.labels.len() as u64;
        let head = match (head, self.flavor) {
            (BertHead::None, _) => pooler,
            (BertHead::SequenceClassification, BertFlavor::Bert) => pooler + h * n + n,
            (BertHead::SequenceClassification, BertFlavor::Roberta) => h * h + h + h * n + n,
            (BertHead::TokenClassification, _) => h * n + n,
            (BertHead::MaskedLm, _) => h * h + h + 2 * h + v,
        };
        emb + layer * self.num_hidden_layers as u64 + head
    }
}

/// BERT or RoBERTa, from `model_type`, else from the architecture's name.
fn flavor_of(v: &Value) -> Option<BertFlavor> {
    match v.get("model_type").and_then(|m| m.as_str()) {
        Some("bert") => return Some(BertFlavor::Bert),
        Some("roberta" | "xlm-roberta") => return Some(BertFlavor::Roberta),
        Some(_) => return None,
        None => {}
    }
    let arch = v.get("architectures")?.get(0)?.as_str()?;
    if arch.starts_with("Bert") {
        Some(BertFlavor::Bert)
    } else if arch.starts_with("Roberta") || arch.starts_with("XLMRoberta") {
        Some(BertFlavor::Roberta)
    } else {
        None
    }
}

/// `id2label` (`{"0": "NEGATIVE", ...}`) in id order, else `num_labels` placeholder names
/// (`LABEL_0`, ...), else transformers' default of 2.
fn parse_labels(v: &Value, source: &str) -> Result<Vec<String>> {
    let num_labels = match v.get("num_labels") {
        None | Some(Value::Null) => None,
        Some(x) => Some(
            x.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .filter(|&n| n <= MAX_LABELS)
                .ok_or_else(|| {
                    Error::key(
                        source,
                        "num_labels",
                        format!("{x} is not an integer from 0 to {MAX_LABELS}"),
                    )
                })?,
        ),
    };
    let Some(map) = v.get("id2label").filter(|m| !m.is_null()) else {
        let n = num_labels.unwrap_or(2);
        return Ok((0..n).map(|i| format!("LABEL_{i}")).collect());
    };
    let map = map.as_object().ok_or_else(|| {
        Error::key(
            source,
            "id2label",
            "expected an object {\"0\": \"name\", ...}",
        )
    })?;
    if map.len() > MAX_LABELS {
        return Err(Error::key(
            source,
            "id2label",
            format!("{} labels is more than the limit {MAX_LABELS}", map.len()),
        ));
    }
    let mut labels = vec![None; map.len()];
    for (k, name) in map {
        let id = k
            .parse::<usize>()
            .ok()
            .filter(|&i| i < map.len())
            .ok_or_else(|| {
                Error::key(
                    source,
                    format!("id2label.{k}"),
                    format!("ids must be 0 to {} (one per label)", map.len() - 1),
                )
            })?;
        let name = name
            .as_str()
            .ok_or_else(|| Error::key(source, format!("id2label.{k}"), "expected a label name"))?;
        labels[id] = Some(name.to_string());
    }
    // Every id is below the map's size and ids are unique keys, so each slot is filled.
    let labels: Vec<String> = labels.into_iter().flatten().collect();
    if let Some(n) = num_labels {
        if n != labels.len() {
            return Err(Error::key(
                source,
                "num_labels",
                format!("{n} but id2label has {} labels", labels.len()),
            ));
        }
    }
    Ok(labels)
}

/// Read and validate `config.json` of an HF folder as a BERT-family config.
pub fn config_from_hf_dir(dir: &Path) -> Result<BertConfig> {
    let p = dir.join("config.json");
    let text = crate::fsutil::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&p, format!("invalid JSON: {e}")))?;
    BertConfig::from_hf_json(&v, &p.display().to_string())
}

// ---------------------------------------------------------------- layers

/// Word + position + token-type embeddings, then LayerNorm.
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
}

pub struct SelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    n_heads: usize,
    head_dim: usize,
}

pub struct BertLayer {
    pub attention: SelfAttention,
    /// `attention.output.dense`
    pub attention_output: Linear,
    /// `attention.output.LayerNorm`
    pub attention_norm: LayerNorm,
    /// `intermediate.dense`
    pub intermediate: Linear,
    /// `output.dense`
    pub output: Linear,
    /// `output.LayerNorm`
    pub output_norm: LayerNorm,
}

/// The heads' layers (all `None` where the head does not use them).
#[derive(Default)]
pub struct BertHeads {
    /// `pooler.dense` (BERT; RoBERTa's bare encoder may have one too).
    pub pooler: Option<Linear>,
    /// `classifier` (BERT sequence classification, token classification), or RoBERTa's
    /// `classifier.out_proj`.
    pub classifier: Option<Linear>,
    /// RoBERTa sequence classification: `classifier.dense`.
    pub classifier_dense: Option<Linear>,
    /// MLM transform: `cls.predictions.transform.dense` / `lm_head.dense`.
    pub mlm_dense: Option<Linear>,
    /// `cls.predictions.transform.LayerNorm` / `lm_head.layer_norm`.
    pub mlm_norm: Option<LayerNorm>,
    /// `cls.predictions.decoder` / `lm_head.decoder` (weight tied to the word embeddings,
    /// bias `cls.predictions.bias` / `lm_head.bias`).
    pub mlm_decoder: Option<Linear>,
}

/// A BERT-family encoder with one head.
pub struct Bert {
    pub cfg: BertConfig,
    pub head: BertHead,
    pub embeddings: BertEmbeddings,
    pub layers: Vec<BertLayer>,
    pub heads: BertHeads,
    /// Prefix of the encoder's module names (`bert.` with a head, empty for the bare encoder).
    module_prefix: String,
    /// The model's own dropout in training, seeded per run.
    pub dropout: ModelDropout,
    device: Device,
}

/// The inputs of one batch, each `(b, t)`: token ids (u32), token-type ids (u32), attention
/// mask (1 on tokens, 0 on padding).
#[derive(Debug, Clone)]
pub struct BertInput {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
}

impl BertInput {
    /// Rows padded to the longest one with `pad_id` (type 0, mask 0).
    pub fn from_rows(
        rows: &[crate::tokenizer::EncodedInput],
        pad_id: u32,
        dev: &Device,
    ) -> Result<Self> {
        let b = rows.len();
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; b * t];
        let mut types = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, r) in rows.iter().enumerate() {
            ids[i * t..i * t + r.ids.len()].copy_from_slice(&r.ids);
            types[i * t..i * t + r.type_ids.len()].copy_from_slice(&r.type_ids);
            mask[i * t..i * t + r.ids.len()].fill(1);
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), dev)?,
            token_type_ids: Tensor::from_vec(types, (b, t), dev)?,
            attention_mask: Tensor::from_vec(mask, (b, t), dev)?,
        })
    }

    /// Unpadded rows of ids (type ids 0, full masks).
    pub fn from_ids(rows: &[Vec<u32>], pad_id: u32, dev: &Device) -> Result<Self> {
        let rows: Vec<crate::tokenizer::EncodedInput> = rows
            .iter()
            .map(|ids| crate::tokenizer::EncodedInput {
                ids: ids.clone(),
                type_ids: vec![0; ids.len()],
            })
            .collect();
        Self::from_rows(&rows, pad_id, dev)
    }
}

/// How token states become one sentence embedding (sentence-transformers' `Pooling` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the non-padding tokens.
    Mean,
    /// The first token (`[CLS]` / `<s>`).
    Cls,
    /// Element-wise max over the non-padding tokens.
    Max,
    /// Sum over the non-padding tokens divided by the square root of their count.
    MeanSqrtLen,
}

impl Pooling {
    pub fn parse(s: &str) -> Option<Pooling> {
        Some(match s {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "max" => Pooling::Max,
            "mean_sqrt_len" => Pooling::MeanSqrtLen,
            _ => return None,
        })
    }
}

/// A linear layer `name` read from `src` as `file_name` (weight and bias).
fn linear(src: &dyn WeightSource, name: &str, file_name: &str) -> Result<Linear> {
    let weight = src.linear_weight(&format!("{file_name}.weight"))?;
    let bias = src
        .dense(&format!("{file_name}.bias"))?
        .to_dtype(DType::F32)?;
    Ok(Linear::new(name, weight, Some(bias)))
}

fn layer_norm(src: &dyn WeightSource, file_name: &str, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        src.dense(&format!("{file_name}.weight"))?,
        src.dense(&format!("{file_name}.bias"))?,
        eps,
    )?)
}

/// One linear layer of a head.
struct HeadLinear {
    /// The module name the model gives it (`bert.pooler.dense`, `classifier`).
    module: String,
    /// Its name in the file, without `.weight` / `.bias`.
    file: String,
    /// (out, in) features and the config keys they come from.
    dims: [(&'static str, usize); 2],
    /// Whether fine-tuning may initialise it when the file lacks it (classifiers, pooler).
    may_init: bool,
}

/// Where the head's tensors live in the file, and which are optional (initialised when absent).
struct HeadNames {
    linears: Vec<HeadLinear>,
    /// LayerNorms: file names.
    norms: Vec<String>,
}

/// The file's encoder prefix: `bert.`, `roberta.` or none (a bare `BertModel`).
fn file_prefix(src: &dyn WeightSource, flavor: BertFlavor) -> Result<&'static str> {
    for p in [flavor.prefix(), ""] {
        if src.contains(&format!("{p}embeddings.word_embeddings.weight")) {
            return Ok(p);
        }
    }
    Err(Error::msg(format!(
        "{}: tensor `{}embeddings.word_embeddings.weight` is missing (not a {} checkpoint?)",
        src.source_name(),
        flavor.prefix(),
        flavor.class_prefix()
    )))
}

/// The head's linears and norms, with their names in the model and in the file.
fn head_names(cfg: &BertConfig, head: BertHead, fp: &str, src: &dyn WeightSource) -> HeadNames {
    let h = ("hidden_size", cfg.hidden_size);
    let n = ("num_labels", cfg.num_labels());
    let mp = cfg.flavor.prefix();
    let mut linears = Vec::new();
    let mut norms = Vec::new();
    let mut lin = |module: String, file: String, dims: [(&'static str, usize); 2], may_init| {
        linears.push(HeadLinear {
            module,
            file,
            dims,
            may_init,
        })
    };
    match (head, cfg.flavor) {
        (BertHead::None, _) => {
            // The bare encoder's pooler is optional (RoBERTa classification models have none).
            if src.contains(&format!("{fp}pooler.dense.weight")) {
                lin(
                    "pooler.dense".into(),
                    format!("{fp}pooler.dense"),
                    [h, h],
                    false,
                );
            }
        }
        (BertHead::SequenceClassification, BertFlavor::Bert) => {
            lin(
                format!("{mp}pooler.dense"),
                format!("{fp}pooler.dense"),
                [h, h],
                true,
            );
            lin("classifier".into(), "classifier".into(), [n, h], true);
        }
        (BertHead::SequenceClassification, BertFlavor::Roberta) => {
            lin(
                "classifier.dense".into(),
                "classifier.dense".into(),
                [h, h],
                true,
            );
            lin(
                "classifier.out_proj".into(),
                "classifier.out_proj".into(),
                [n, h],
                true,
            );
        }
        (BertHead::TokenClassification, _) => {
            lin("classifier".into(), "classifier".into(), [n, h], true);
        }
        (BertHead::MaskedLm, BertFlavor::Bert) => {
            lin(
                "cls.predictions.transform.dense".into(),
                "cls.predictions.transform.dense".into(),
                [h, h],
                false,
            );
            norms.push("cls.predictions.transform.LayerNorm".into());
        }
        (BertHead::MaskedLm, BertFlavor::Roberta) => {
            lin(
                "lm_head.dense".into(),
                "lm_head.dense".into(),
                [h, h],
                false,
            );
            norms.push("lm_head.layer_norm".into());
        }
    }
    HeadNames { linears, norms }
}

/// The MLM decoder's bias as the file names it (`cls.predictions.bias`, or the decoder's own).
fn mlm_bias_name(cfg: &BertConfig, src: &dyn WeightSource) -> String {
    let stem = match cfg.flavor {
        BertFlavor::Bert => "cls.predictions",
        BertFlavor::Roberta => "lm_head",
    };
    let shared = format!("{stem}.bias");
    if src.contains(&shared) {
        shared
    } else {
        format!("{stem}.decoder.bias")
    }
}

/// An untied MLM decoder weight in the file, if the config unties it.
fn mlm_decoder_weight_name(cfg: &BertConfig, src: &dyn WeightSource) -> Option<String> {
    let name = match cfg.flavor {
        BertFlavor::Bert => "cls.predictions.decoder.weight",
        BertFlavor::Roberta => "lm_head.decoder.weight",
    };
    (!cfg.tie_word_embeddings && src.contains(name)).then(|| name.to_string())
}

/// Every tensor `cfg` implies for the encoder and `head`, with its shape. Head tensors that may
/// be initialised (`allow_new_head`) are listed only when present.
fn expected_tensors(
    cfg: &BertConfig,
    head: BertHead,
    fp: &str,
    src: &dyn WeightSource,
    allow_new_head: bool,
) -> Vec<ExpectedTensor<'static>> {
    let h = ("hidden_size", cfg.hidden_size);
    let inter = ("intermediate_size", cfg.intermediate_size);
    let mut out = Vec::new();
    let mut t = |name: String, shape: &[usize], because: &[(&'static str, usize)]| {
        out.push(ExpectedTensor {
            name,
            shape: shape.to_vec(),
            because: because.to_vec(),
        })
    };
    let e = format!("{fp}embeddings");
    t(
        format!("{e}.word_embeddings.weight"),
        &[cfg.vocab_size, cfg.hidden_size],
        &[("vocab_size", cfg.vocab_size), h],
    );
    t(
        format!("{e}.position_embeddings.weight"),
        &[cfg.max_position_embeddings, cfg.hidden_size],
        &[("max_position_embeddings", cfg.max_position_embeddings), h],
    );
    t(
        format!("{e}.token_type_embeddings.weight"),
        &[cfg.type_vocab_size, cfg.hidden_size],
        &[("type_vocab_size", cfg.type_vocab_size), h],
    );
    for p in ["weight", "bias"] {
        t(format!("{e}.LayerNorm.{p}"), &[cfg.hidden_size], &[h]);
    }
    for i in 0..cfg.num_hidden_layers {
        let l = format!("{fp}encoder.layer.{i}");
        let mut lin = |name: String, out_f: (&'static str, usize), in_f: (&'static str, usize)| {
            t(format!("{name}.weight"), &[out_f.1, in_f.1], &[out_f, in_f]);
            t(format!("{name}.bias"), &[out_f.1], &[out_f]);
        };
        for q in ["query", "key", "value"] {
            lin(format!("{l}.attention.self.{q}"), h, h);
        }
        lin(format!("{l}.attention.output.dense"), h, h);
        lin(format!("{l}.intermediate.dense"), inter, h);
        lin(format!("{l}.output.dense"), h, inter);
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            for p in ["weight", "bias"] {
                t(format!("{l}.{norm}.{p}"), &[cfg.hidden_size], &[h]);
            }
        }
    }
    let names = head_names(cfg, head, fp, src);
    for l in &names.linears {
        let w = format!("{}.weight", l.file);
        if l.may_init && allow_new_head && !src.contains(&w) {
            continue;
        }
        t(w, &[l.dims[0].1, l.dims[1].1], &l.dims);
        t(format!("{}.bias", l.file), &[l.dims[0].1], &l.dims[..1]);
    }
    for file in &names.norms {
        for p in ["weight", "bias"] {
            t(format!("{file}.{p}"), &[cfg.hidden_size], &[h]);
        }
    }
    if head == BertHead::MaskedLm {
        let v = ("vocab_size", cfg.vocab_size);
        t(mlm_bias_name(cfg, src), &[cfg.vocab_size], &[v]);
        if let Some(w) = mlm_decoder_weight_name(cfg, src) {
            t(w, &[cfg.vocab_size, cfg.hidden_size], &[v, h]);
        }
    }
    out
}

/// Check the source against the config before any weight is read: no layer beyond
/// `num_hidden_layers`, and every tensor the config implies present with the implied shape.
fn check_shapes(
    src: &dyn WeightSource,
    cfg: &BertConfig,
    head: BertHead,
    fp: &str,
    allow_new_head: bool,
) -> Result<()> {
    let source = src.source_name();
    let n = cfg.num_hidden_layers;
    if src.contains(&format!(
        "{fp}encoder.layer.{n}.attention.self.query.weight"
    )) {
        return Err(cfg.err(
            "num_hidden_layers",
            format!("{n} but {source} has tensors for more layers"),
        ));
    }
    for t in expected_tensors(cfg, head, fp, src, allow_new_head) {
        let Some(shape) = src.tensor_shape(&t.name) else {
            return Err(Error::msg(format!(
                "{source}: tensor `{}` is missing",
                t.name
            )));
        };
        t.check_shape(&source, &t.name, &shape, &cfg.file)?;
    }
    Ok(())
}

/// A fresh head linear as transformers initialises one: weight ~ N(0, std²), bias 0.
fn new_linear(
    name: &str,
    out_f: usize,
    in_f: usize,
    std: f64,
    rng: &mut rand::rngs::StdRng,
    dev: &Device,
) -> Result<Linear> {
    use rand::Rng;
    // Box-Muller from the seeded RNG: reproducible across platforms, no extra dependency.
    let mut normal = || {
        let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let w: Vec<f32> = (0..out_f * in_f).map(|_| (normal() * std) as f32).collect();
    Ok(Linear::new(
        name,
        LinearWeight::Frozen(Tensor::from_vec(w, (out_f, in_f), dev)?),
        Some(Tensor::zeros(out_f, DType::F32, dev)?),
    ))
}

impl Bert {
    /// Build the model with `head` from a source that speaks HF tensor names. The config is
    /// validated and every tensor's shape checked against it before any weight is read; the
    /// head's weights must be in the file.
    pub fn load(src: &dyn WeightSource, cfg: &BertConfig, head: BertHead) -> Result<Self> {
        Self::load_inner(src, cfg, head, None)
    }

    /// [`Self::load`] for fine-tuning: head layers the file lacks (a classifier on a bare
    /// encoder, a pooler) are initialised as transformers initialises them (weights
    /// N(0, `initializer_range`²) from `seed`, biases 0). Present ones must fit the config.
    pub fn load_with_new_head(
        src: &dyn WeightSource,
        cfg: &BertConfig,
        head: BertHead,
        seed: u64,
    ) -> Result<Self> {
        Self::load_inner(src, cfg, head, Some(seed))
    }

    /// The head tensors [`Self::load_with_new_head`] would initialise (file names).
    pub fn missing_head_tensors(
        src: &dyn WeightSource,
        cfg: &BertConfig,
        head: BertHead,
    ) -> Result<Vec<String>> {
        let fp = file_prefix(src, cfg.flavor)?;
        Ok(head_names(cfg, head, fp, src)
            .linears
            .into_iter()
            .filter(|l| l.may_init && !src.contains(&format!("{}.weight", l.file)))
            .map(|l| l.file)
            .collect())
    }

    fn load_inner(
        src: &dyn WeightSource,
        cfg: &BertConfig,
        head: BertHead,
        new_head_seed: Option<u64>,
    ) -> Result<Self> {
        use rand::SeedableRng;
        cfg.validate()?;
        let fp = file_prefix(src, cfg.flavor)?;
        check_shapes(src, cfg, head, fp, new_head_seed.is_some())?;
        let device = src.device().clone();
        let mp = match head {
            BertHead::None => "",
            _ => cfg.flavor.prefix(),
        };
        let eps = cfg.layer_norm_eps;
        let e = format!("{fp}embeddings");
        let emb = |n: &str| -> Result<Embedding> {
            Ok(Embedding::new(
                format!("{mp}embeddings.{n}"),
                src.embedding_weight(&format!("{e}.{n}.weight"))?,
            ))
        };
        let embeddings = BertEmbeddings {
            word_embeddings: emb("word_embeddings")?,
            position_embeddings: emb("position_embeddings")?,
            token_type_embeddings: emb("token_type_embeddings")?,
            layer_norm: layer_norm(src, &format!("{e}.LayerNorm"), eps)?,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let (m, f) = (
                format!("{mp}encoder.layer.{i}"),
                format!("{fp}encoder.layer.{i}"),
            );
            let lin = |n: &str| linear(src, &format!("{m}.{n}"), &format!("{f}.{n}"));
            layers.push(BertLayer {
                attention: SelfAttention {
                    query: lin("attention.self.query")?,
                    key: lin("attention.self.key")?,
                    value: lin("attention.self.value")?,
                    n_heads: cfg.num_attention_heads,
                    head_dim: cfg.head_dim(),
                },
                attention_output: lin("attention.output.dense")?,
                attention_norm: layer_norm(src, &format!("{f}.attention.output.LayerNorm"), eps)?,
                intermediate: lin("intermediate.dense")?,
                output: lin("output.dense")?,
                output_norm: layer_norm(src, &format!("{f}.output.LayerNorm"), eps)?,
            });
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(new_head_seed.unwrap_or(0));
        let names = head_names(cfg, head, fp, src);
        let mut heads = BertHeads::default();
        for h in names.linears {
            let l = if h.may_init
                && new_head_seed.is_some()
                && !src.contains(&format!("{}.weight", h.file))
            {
                new_linear(
                    &h.module,
                    h.dims[0].1,
                    h.dims[1].1,
                    cfg.initializer_range,
                    &mut rng,
                    &device,
                )?
            } else {
                linear(src, &h.module, &h.file)?
            };
            let slot = match h.module.as_str() {
                m if m.ends_with("pooler.dense") => &mut heads.pooler,
                "classifier" | "classifier.out_proj" => &mut heads.classifier,
                "classifier.dense" => &mut heads.classifier_dense,
                _ => &mut heads.mlm_dense,
            };
            *slot = Some(l);
        }
        for file in names.norms {
            heads.mlm_norm = Some(layer_norm(src, &file, eps)?);
        }
        if head == BertHead::MaskedLm {
            let word = format!("{e}.word_embeddings.weight");
            let weight_name = mlm_decoder_weight_name(cfg, src).unwrap_or(word);
            let bias = src.dense(&mlm_bias_name(cfg, src))?.to_dtype(DType::F32)?;
            let name = match cfg.flavor {
                BertFlavor::Bert => "cls.predictions.decoder",
                BertFlavor::Roberta => "lm_head.decoder",
            };
            // Tied: the decoder reads the embedding table (same storage, no copy).
            heads.mlm_decoder = Some(Linear::new(
                name,
                src.linear_weight(&weight_name)?,
                Some(bias),
            ));
        }
        Ok(Self {
            cfg: cfg.clone(),
            head,
            embeddings,
            layers,
            heads,
            module_prefix: mp.to_string(),
            dropout: ModelDropout::default(),
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tensors [`Self::load`] reads for `head` (for a loading progress bar).
    pub fn tensor_count(cfg: &BertConfig, head: BertHead) -> u64 {
        let per_layer = 6 * 2 + 2 * 2;
        let heads = match (head, cfg.flavor) {
            (BertHead::None, _) => 2,
            (BertHead::SequenceClassification, _) => 4,
            (BertHead::TokenClassification, _) => 2,
            (BertHead::MaskedLm, _) => 6,
        };
        (5 + cfg.num_hidden_layers * per_layer + heads) as u64
    }

    /// Module names of the trainable head (PEFT's `modules_to_save` for SEQ_CLS / TOKEN_CLS:
    /// `classifier`); empty for the bare encoder and the MLM head.
    pub fn modules_to_save(&self) -> Vec<String> {
        match self.head {
            BertHead::SequenceClassification | BertHead::TokenClassification => {
                vec!["classifier".to_string()]
            }
            _ => Vec::new(),
        }
    }

    /// All linear layers with their module names, for PEFT methods to wrap: per layer query,
    /// key, value, attention output, intermediate, output; then the head's.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for l in &self.layers {
            let a = &l.attention;
            out.extend([&a.query, &a.key, &a.value]);
            out.extend([&l.attention_output, &l.intermediate, &l.output]);
        }
        let h = &self.heads;
        for l in [
            &h.pooler,
            &h.classifier_dense,
            &h.classifier,
            &h.mlm_dense,
            &h.mlm_decoder,
        ]
        .into_iter()
        .flatten()
        {
            out.push(l);
        }
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            let a = &mut l.attention;
            out.extend([&mut a.query, &mut a.key, &mut a.value]);
            out.extend([&mut l.attention_output, &mut l.intermediate, &mut l.output]);
        }
        let h = &mut self.heads;
        for l in [
            &mut h.pooler,
            &mut h.classifier_dense,
            &mut h.classifier,
            &mut h.mlm_dense,
            &mut h.mlm_decoder,
        ]
        .into_iter()
        .flatten()
        {
            out.push(l);
        }
        out
    }

    /// The embedding tables: word, position, token type.
    pub fn embeddings(&self) -> [&Embedding; 3] {
        let e = &self.embeddings;
        [
            &e.word_embeddings,
            &e.position_embeddings,
            &e.token_type_embeddings,
        ]
    }

    /// Module names of the LayerNorms, in the order of [`Self::norms`].
    fn norm_names(&self) -> Vec<String> {
        let mp = &self.module_prefix;
        let mut out = vec![format!("{mp}embeddings.LayerNorm")];
        for i in 0..self.layers.len() {
            out.push(format!("{mp}encoder.layer.{i}.attention.output.LayerNorm"));
            out.push(format!("{mp}encoder.layer.{i}.output.LayerNorm"));
        }
        if self.heads.mlm_norm.is_some() {
            out.push(
                match self.cfg.flavor {
                    BertFlavor::Bert => "cls.predictions.transform.LayerNorm",
                    BertFlavor::Roberta => "lm_head.layer_norm",
                }
                .to_string(),
            );
        }
        out
    }

    /// The LayerNorms with their module names (their `.weight` / `.bias` are parameters that
    /// are neither linears nor embeddings).
    pub fn norms(&self) -> Vec<(String, &LayerNorm)> {
        let mut refs = vec![&self.embeddings.layer_norm];
        for l in &self.layers {
            refs.extend([&l.attention_norm, &l.output_norm]);
        }
        refs.extend(self.heads.mlm_norm.as_ref());
        self.norm_names().into_iter().zip(refs).collect()
    }

    fn norms_mut(&mut self) -> Vec<(String, &mut LayerNorm)> {
        let names = self.norm_names();
        let mut refs = vec![&mut self.embeddings.layer_norm];
        for l in &mut self.layers {
            refs.extend([&mut l.attention_norm, &mut l.output_norm]);
        }
        refs.extend(self.heads.mlm_norm.as_mut());
        names.into_iter().zip(refs).collect()
    }

    /// The linear whose weight is the word-embedding table (the tied MLM decoder), if any.
    pub fn tied_linear(&self) -> Option<&str> {
        let decoder = self.heads.mlm_decoder.as_ref()?;
        self.cfg.tie_word_embeddings.then(|| decoder.name())
    }

    /// The head's output layer (PEFT's `all-linear` leaves it out): the classifier or the MLM
    /// decoder; `None` for the bare encoder.
    pub fn output_layer(&self) -> Option<&str> {
        let h = &self.heads;
        match self.head {
            BertHead::None => None,
            BertHead::MaskedLm => h.mlm_decoder.as_ref().map(|l| l.name()),
            _ => h.classifier.as_ref().map(|l| l.name()),
        }
    }

    /// Make every weight, bias and norm trainable (full fine-tuning); returns the parameters by
    /// HF name. The tied MLM decoder shares the word-embedding parameter. Quantized weights
    /// cannot be trained in place.
    pub fn make_all_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut params = Vec::new();
        let mut word = None;
        let e = &mut self.embeddings;
        for emb in [
            &mut e.word_embeddings,
            &mut e.position_embeddings,
            &mut e.token_type_embeddings,
        ] {
            let v = match emb.weight() {
                EmbeddingWeight::Frozen(t) => Var::from_tensor(&t.to_dtype(DType::F32)?)?,
                EmbeddingWeight::Trainable(v) => v.clone(),
                EmbeddingWeight::Quantized(_) => {
                    return Err(Error::msg(format!(
                        "{}: full fine-tuning needs dense weights",
                        emb.name()
                    )))
                }
            };
            emb.set_weight(EmbeddingWeight::Trainable(v.clone()));
            if word.is_none() {
                word = Some(v.clone());
            }
            params.push((format!("{}.weight", emb.name()), v));
        }
        let tied = self.cfg.tie_word_embeddings;
        for lin in self.linears_mut() {
            let is_decoder = lin.name().ends_with("decoder");
            let w = match lin.weight() {
                _ if is_decoder && tied => None,
                LinearWeight::Frozen(t) => Some(Var::from_tensor(&t.to_dtype(DType::F32)?)?),
                LinearWeight::Trainable(v) => Some(v.clone()),
                LinearWeight::Quantized(_) => {
                    return Err(Error::msg(format!(
                        "{}: full fine-tuning needs dense weights",
                        lin.name()
                    )))
                }
            };
            match w {
                Some(v) => {
                    lin.set_weight(LinearWeight::Trainable(v.clone()));
                    params.push((format!("{}.weight", lin.name()), v));
                }
                // The tied decoder shares the word-embedding parameter.
                None => lin.set_weight(LinearWeight::Trainable(
                    word.clone().expect("word embeddings come first"),
                )),
            }
            if let Some(b) = lin.bias() {
                let v = Var::from_tensor(b)?;
                lin.set_bias(Some(v.as_tensor().clone()));
                params.push((bias_param_name(lin.name()), v));
            }
        }
        for (name, norm) in self.norms_mut() {
            let (w, b) = norm.make_trainable()?;
            params.push((format!("{name}.weight"), w));
            params.push((format!("{name}.bias"), b));
        }
        Ok(params)
    }

    /// Make the head's `modules_to_save` layers (the classifier) trainable, as PEFT does for
    /// SEQ_CLS / TOKEN_CLS; returns their parameters by HF name.
    pub fn make_head_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let modules = self.modules_to_save();
        if modules.is_empty() {
            return Err(Error::msg(
                "this model has no classification head to train (load it with a classification head)",
            ));
        }
        self.make_modules_trainable(&modules)
    }

    /// Make the weights and biases of the linears under `modules` (a module name or a prefix
    /// of one: `classifier` covers `classifier.dense` and `classifier.out_proj`) trainable;
    /// returns them by HF name. A module that matches nothing is an error.
    pub fn make_modules_trainable(&mut self, modules: &[String]) -> Result<Vec<(String, Var)>> {
        let under = |name: &str, m: &str| name == m || name.starts_with(&format!("{m}."));
        for m in modules {
            if !self.linears().iter().any(|l| under(l.name(), m)) {
                return Err(Error::msg(format!(
                    "no layer of this model is called `{m}` (or lies under it)"
                )));
            }
        }
        let tied = self.tied_linear().map(str::to_string);
        let mut params = Vec::new();
        for lin in self.linears_mut() {
            if !modules.iter().any(|m| under(lin.name(), m)) {
                continue;
            }
            if tied.as_deref() != Some(lin.name()) {
                let w = match lin.weight() {
                    LinearWeight::Trainable(v) => v.clone(),
                    other => Var::from_tensor(&other.to_dense_f32()?)?,
                };
                lin.set_weight(LinearWeight::Trainable(w.clone()));
                params.push((format!("{}.weight", lin.name()), w));
            }
            if let Some(b) = lin.bias() {
                let v = Var::from_tensor(b)?;
                lin.set_bias(Some(v.as_tensor().clone()));
                params.push((bias_param_name(lin.name()), v));
            }
        }
        Ok(params)
    }

    /// Position ids `(b, t)`: 0, 1, ... for BERT; for RoBERTa `pad + 1 + i` on tokens and `pad`
    /// on padding, as transformers derives them from the ids.
    fn position_ids(&self, input: &BertInput) -> Result<Tensor> {
        let (b, t) = input.input_ids.dims2()?;
        let max = self.cfg.max_tokens();
        if t > max {
            return Err(Error::msg(format!(
                "a sequence of {t} tokens is longer than the model's {max} positions (max_position_embeddings {})",
                self.cfg.max_position_embeddings
            )));
        }
        let pos: Vec<u32> = match self.cfg.flavor {
            BertFlavor::Bert => (0..b).flat_map(|_| 0..t as u32).collect(),
            BertFlavor::Roberta => {
                let pad = self.cfg.pad_token_id;
                let ids = input.input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                ids.iter()
                    .flat_map(|row| {
                        let mut n = 0u32;
                        row.iter()
                            .map(|&id| {
                                if id == pad {
                                    pad
                                } else {
                                    n += 1;
                                    pad + n
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            }
        };
        Ok(Tensor::from_vec(pos, (b, t), &self.device)?)
    }

    /// Check the ids against the tables before any lookup: an id past a table is an error
    /// here, with the table's name, rather than deep inside an index_select.
    fn check_input(&self, input: &BertInput) -> Result<()> {
        let dims = input.input_ids.dims2()?;
        for (name, x) in [
            ("token_type_ids", &input.token_type_ids),
            ("attention_mask", &input.attention_mask),
        ] {
            if x.dims2()? != dims {
                return Err(Error::msg(format!(
                    "{name} have shape {:?} but input_ids have {dims:?}",
                    x.dims()
                )));
            }
        }
        if dims.0 * dims.1 == 0 {
            return Err(Error::msg("an empty batch has nothing to encode"));
        }
        for (name, x, limit, key) in [
            (
                "token id",
                &input.input_ids,
                self.cfg.vocab_size,
                "vocab_size",
            ),
            (
                "token type id",
                &input.token_type_ids,
                self.cfg.type_vocab_size,
                "type_vocab_size",
            ),
        ] {
            let max = x
                .to_dtype(DType::U32)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<u32>()? as usize;
            if max >= limit {
                return Err(Error::msg(format!(
                    "{name} {max} is past the model's table ({}: {key} {limit})",
                    self.cfg.file
                )));
            }
        }
        Ok(())
    }

    /// The encoder's last hidden states `(b, t, hidden)` (transformers' `last_hidden_state`).
    /// `train` enables adapter dropout (the model's own dropout is [`Self::loss_sum`]'s).
    pub fn forward_hidden(&self, input: &BertInput, train: bool) -> Result<Tensor> {
        self.forward_hidden_with(input, train, &DropoutPass::off())
    }

    /// [`Self::forward_hidden`] with the model's dropout of one pass.
    fn forward_hidden_with(
        &self,
        input: &BertInput,
        train: bool,
        drop: &DropoutPass,
    ) -> Result<Tensor> {
        self.check_input(input)?;
        let e = &self.embeddings;
        let words = e
            .word_embeddings
            .forward(&input.input_ids.to_dtype(DType::U32)?)?;
        let types = e
            .token_type_embeddings
            .forward(&input.token_type_ids.to_dtype(DType::U32)?)?;
        let pos = e.position_embeddings.forward(&self.position_ids(input)?)?;
        // transformers' order: (words + types) + positions.
        let x = ((words + types)? + pos)?;
        let mut x = drop.apply(&e.layer_norm.forward(&x)?, self.cfg.hidden_dropout_prob)?;
        // Additive mask over the keys: 0 on tokens, the lowest f32 on padding (as transformers'
        // eager attention), so padding gets exactly zero weight.
        let (b, t) = input.input_ids.dims2()?;
        let keep = input.attention_mask.to_dtype(DType::F32)?;
        let bias = ((keep - 1.0)? * f64::from(f32::MAX))?.reshape((b, 1, 1, t))?;
        let detach = crate::nn::graph_off();
        for layer in &self.layers {
            x = layer.forward(
                &x,
                &bias,
                self.cfg.hidden_act,
                train,
                &self.layer_dropping(drop),
            )?;
            if detach {
                x = x.detach();
            }
        }
        Ok(x)
    }

    /// The pooler output `(b, hidden)`: tanh(dense(first token)).
    pub fn pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        let pooler = self.heads.pooler.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "{}: this model has no pooler (`pooler.dense`)",
                self.cfg.file
            ))
        })?;
        Ok(pooler.forward(&first_token(hidden)?)?.tanh()?)
    }

    fn need_head(&self, want: BertHead) -> Result<()> {
        if self.head != want {
            return Err(Error::msg(format!(
                "the model was loaded with the {:?} head, not {want:?}",
                self.head
            )));
        }
        Ok(())
    }

    /// The dropout probability before the classifier (transformers: `classifier_dropout`, else
    /// `hidden_dropout_prob`).
    fn classifier_dropout(&self) -> f64 {
        self.cfg
            .classifier_dropout
            .unwrap_or(self.cfg.hidden_dropout_prob)
    }

    fn layer_dropping<'a>(&self, pass: &'a DropoutPass) -> LayerDropping<'a> {
        LayerDropping {
            pass,
            hidden: self.cfg.hidden_dropout_prob,
            attention: self.cfg.attention_probs_dropout_prob,
        }
    }

    /// Sequence-classification logits from the hidden states: `(b, num_labels)`. `drop`: the
    /// model's dropout of a training pass (before the classifier, as transformers' heads).
    pub fn sequence_logits_from_hidden(
        &self,
        hidden: &Tensor,
        train: bool,
        drop: &DropoutPass,
    ) -> Result<Tensor> {
        let p = self.classifier_dropout();
        self.need_head(BertHead::SequenceClassification)?;
        let classifier = self
            .heads
            .classifier
            .as_ref()
            .ok_or_else(|| missing_head_part("classifier"))?;
        match &self.heads.classifier_dense {
            // RoBERTa: dense + tanh on the first token, then out_proj.
            Some(dense) => {
                let x = drop.apply(&first_token(hidden)?, p)?;
                let x = dense.forward_t(&x, train)?.tanh()?;
                Ok(classifier.forward_t(&drop.apply(&x, p)?, train)?)
            }
            None => {
                let pooler = self
                    .heads
                    .pooler
                    .as_ref()
                    .ok_or_else(|| missing_head_part("pooler"))?;
                let pooled = pooler.forward_t(&first_token(hidden)?, train)?.tanh()?;
                Ok(classifier.forward_t(&drop.apply(&pooled, p)?, train)?)
            }
        }
    }

    /// `BertForSequenceClassification` logits: `(b, num_labels)`.
    pub fn sequence_logits(&self, input: &BertInput) -> Result<Tensor> {
        let h = self.forward_hidden(input, false)?;
        self.sequence_logits_from_hidden(&h, false, &DropoutPass::off())
    }

    /// Per-token logits of the token-classification or MLM head from hidden states
    /// `(..., hidden)`: `(..., num_labels)` or `(..., vocab)`.
    /// `drop`: the model's dropout of a training pass (before the token classifier; the MLM
    /// head has none).
    pub fn token_head(&self, hidden: &Tensor, train: bool, drop: &DropoutPass) -> Result<Tensor> {
        let h = &self.heads;
        match self.head {
            BertHead::TokenClassification => Ok(h
                .classifier
                .as_ref()
                .ok_or_else(|| missing_head_part("classifier"))?
                .forward_t(&drop.apply(hidden, self.classifier_dropout())?, train)?),
            BertHead::MaskedLm => {
                let dense = h
                    .mlm_dense
                    .as_ref()
                    .ok_or_else(|| missing_head_part("MLM transform dense"))?;
                let norm = h
                    .mlm_norm
                    .as_ref()
                    .ok_or_else(|| missing_head_part("MLM transform LayerNorm"))?;
                let decoder = h
                    .mlm_decoder
                    .as_ref()
                    .ok_or_else(|| missing_head_part("MLM decoder"))?;
                // RoBERTa's lm_head always uses the exact GELU; BERT's uses hidden_act.
                let act = match self.cfg.flavor {
                    BertFlavor::Bert => self.cfg.hidden_act,
                    BertFlavor::Roberta => Activation::GeluErf,
                };
                let x = act.apply(&dense.forward_t(hidden, train)?)?;
                Ok(decoder.forward_t(&norm.forward(&x)?, train)?)
            }
            other => Err(Error::msg(format!(
                "the model was loaded with the {other:?} head, which has no per-token output"
            ))),
        }
    }

    /// `BertForTokenClassification` logits: `(b, t, num_labels)`.
    pub fn token_logits(&self, input: &BertInput) -> Result<Tensor> {
        self.need_head(BertHead::TokenClassification)?;
        self.token_head(
            &self.forward_hidden(input, false)?,
            false,
            &DropoutPass::off(),
        )
    }

    /// `BertForMaskedLM` logits: `(b, t, vocab)`.
    pub fn mlm_logits(&self, input: &BertInput) -> Result<Tensor> {
        self.need_head(BertHead::MaskedLm)?;
        self.token_head(
            &self.forward_hidden(input, false)?,
            false,
            &DropoutPass::off(),
        )
    }

    /// The summed loss of a batch and the number of terms it sums (the mean is `sum / n`, what
    /// transformers reports), differentiable with respect to the trainable parameters.
    ///
    /// `labels`: for sequence classification `(b)` class ids (i64, `-100`: no loss), or scores
    /// (f32) when `num_labels` is 1 (regression: squared error); for token classification and
    /// MLM `(b, t)` ids with `-100` on positions without loss. Only labelled positions go
    /// through a per-token head (the MLM decoder is the model's largest matmul).
    ///
    /// `train` enables dropout: the adapters' and the model's own, where transformers applies
    /// it in train mode (masks from [`Self::dropout`]'s stream).
    pub fn loss_sum(
        &self,
        input: &BertInput,
        labels: &Tensor,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        let pass = self.dropout.pass(train);
        let hidden = self.forward_hidden_with(input, train, &pass)?;
        self.loss_sum_from_hidden(&hidden, labels, train, &pass)
    }

    /// [`Self::loss_sum`] from the encoder's hidden states (`drop`: the head's dropout of the
    /// same pass).
    pub fn loss_sum_from_hidden(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        train: bool,
        drop: &DropoutPass,
    ) -> Result<(Tensor, usize)> {
        let dev = &self.device;
        match self.head {
            BertHead::SequenceClassification => {
                let logits = self.sequence_logits_from_hidden(hidden, train, drop)?;
                let b = logits.dim(0)?;
                if labels.dims() != [b] {
                    return Err(Error::msg(format!(
                        "sequence classification needs one label per row ({b}), got labels of shape {:?}",
                        labels.dims()
                    )));
                }
                if self.cfg.problem_type == ProblemType::Regression {
                    let y = labels.to_dtype(DType::F32)?;
                    let d = (logits.squeeze(1)? - y)?;
                    return Ok((d.sqr()?.sum_all()?, b));
                }
                let ids = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
                let (rows, targets) = labelled(&ids, self.cfg.num_labels())?;
                if rows.is_empty() {
                    return Ok((Tensor::zeros((), DType::F32, dev)?, 0));
                }
                let n = rows.len();
                let picked = logits.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
                let targets = Tensor::from_vec(targets, n, dev)?;
                Ok((ops::cross_entropy_sum(&picked, &targets)?, n))
            }
            BertHead::TokenClassification | BertHead::MaskedLm => {
                let (b, t, h) = hidden.dims3()?;
                if labels.dims() != [b, t] {
                    return Err(Error::msg(format!(
                        "per-token labels must have the ids' shape ({b}, {t}), got {:?}",
                        labels.dims()
                    )));
                }
                let classes = match self.head {
                    BertHead::MaskedLm => self.cfg.vocab_size,
                    _ => self.cfg.num_labels(),
                };
                let ids = labels
                    .to_dtype(DType::I64)?
                    .flatten_all()?
                    .to_vec1::<i64>()?;
                let (rows, targets) = labelled(&ids, classes)?;
                if rows.is_empty() {
                    return Ok((Tensor::zeros((), DType::F32, dev)?, 0));
                }
                let n = rows.len();
                let picked = hidden
                    .reshape((b * t, h))?
                    .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
                let logits = self.token_head(&picked, train, drop)?;
                let targets = Tensor::from_vec(targets, n, dev)?;
                Ok((ops::cross_entropy_sum(&logits, &targets)?, n))
            }
            BertHead::None => Err(Error::msg(
                "the bare encoder has no loss: load the model with a classification or MLM head",
            )),
        }
    }

    /// Sentence embeddings `(b, hidden)`: the hidden states pooled over the non-padding tokens,
    /// optionally L2-normalised, as sentence-transformers' `Pooling` and `Normalize` modules
    /// compute them.
    pub fn embed(&self, input: &BertInput, pooling: Pooling, normalize: bool) -> Result<Tensor> {
        let hidden = self.forward_hidden(input, false)?;
        pool(&hidden, &input.attention_mask, pooling, normalize)
    }
}

/// The HF name of a linear's bias: transformers keeps the MLM decoder's bias as
/// `cls.predictions.bias` / `lm_head.bias` (the decoder's own is an alias of it).
fn bias_param_name(linear: &str) -> String {
    match linear.strip_suffix(".decoder") {
        Some(head) => format!("{head}.bias"),
        None => format!("{linear}.bias"),
    }
}

/// Rows with a label (not `-100`) and their labels, each checked against the class count.
fn labelled(labels: &[i64], classes: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if l == crate::data::IGNORE {
            continue;
        }
        if l < 0 || l as u64 >= classes as u64 {
            return Err(Error::msg(format!(
                "label {l} is outside 0..{classes} (use -100 for positions without loss)"
            )));
        }
        rows.push(i as u32);
        targets.push(l as u32);
    }
    Ok((rows, targets))
}

/// `hidden[:, 0]`: `(b, t, h)` -> `(b, h)`.
fn first_token(hidden: &Tensor) -> Result<Tensor> {
    Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?)
}

/// Pool `hidden (b, t, h)` over the tokens where `mask (b, t)` is 1, as sentence-transformers
/// does (mean: sum / max(count, 1e-9); max: padding set to -1e9 first), then optionally divide
/// by the L2 norm (at least 1e-12, as `torch.nn.functional.normalize`).
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling, normalize: bool) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, t, 1)
    let pooled = match pooling {
        Pooling::Cls => first_token(hidden)?,
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let sum = hidden.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
            let count = match pooling {
                Pooling::MeanSqrtLen => count.sqrt()?,
                _ => count,
            };
            sum.broadcast_div(&count)?
        }
        Pooling::Max => {
            let floor = Tensor::full(-1e9f32, hidden.shape(), hidden.device())?;
            let keep = m.broadcast_as(hidden.shape())?.ne(0f32)?;
            keep.where_cond(hidden, &floor)?.max(1)?
        }
    };
    if !normalize {
        return Ok(pooled);
    }
    let norm = pooled
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(pooled.broadcast_div(&norm)?)
}

/// The dropout of one pass inside the encoder layers, at BERT's two rates.
struct LayerDropping<'a> {
    pass: &'a DropoutPass,
    hidden: f64,
    attention: f64,
}

impl BertLayer {
    fn forward(
        &self,
        x: &Tensor,
        mask_bias: &Tensor,
        act: Activation,
        train: bool,
        drop: &LayerDropping,
    ) -> candle_core::Result<Tensor> {
        let a = self.attention.forward(x, mask_bias, train, drop)?;
        let a = drop
            .pass
            .apply(&self.attention_output.forward_t(&a, train)?, drop.hidden)?;
        let x = self.attention_norm.forward(&(a + x)?)?;
        let h = act.apply(&self.intermediate.forward_t(&x, train)?)?;
        let h = drop
            .pass
            .apply(&self.output.forward_t(&h, train)?, drop.hidden)?;
        self.output_norm.forward(&(h + x)?)
    }
}

impl SelfAttention {
    /// softmax(q kᵀ / √d + mask) v over all heads; `mask_bias` is `(b, 1, 1, t)`.
    fn forward(
        &self,
        x: &Tensor,
        mask_bias: &Tensor,
        train: bool,
        drop: &LayerDropping,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.query.forward_t(x, train)?)?;
        let k = heads(self.key.forward_t(x, train)?)?;
        let v = heads(self.value.forward_t(x, train)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask_bias)?;
        let p = drop
            .pass
            .apply(&ops::softmax_last_dim(&scores)?, drop.attention)?;
        p.matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))
    }
}

// ---------------------------------------------------------------- loading a folder

/// What sentence-transformers' files in a model folder say: the pooling of `1_Pooling`
/// (via `modules.json`), whether a `Normalize` module follows, and `sentence_bert_config.json`'s
/// `max_seq_length` and `do_lower_case`. Folders without them get mean pooling, no
/// normalisation, the model's own length limit.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: Option<usize>,
    pub do_lower_case: bool,
}

impl Default for SentenceConfig {
    fn default() -> Self {
        Self {
            pooling: Pooling::Mean,
            normalize: false,
            max_seq_length: None,
            do_lower_case: false,
        }
    }
}

fn read_json_file(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = crate::fsutil::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// The sentence-transformers modules (`modules.json` types, last path part) that `embed` runs.
const SENTENCE_MODULES: &[&str] = &["Transformer", "Pooling", "Normalize", "Dropout"];

impl SentenceConfig {
    /// Read the sentence-transformers files of `dir`, if any.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut cfg = SentenceConfig::default();
        let modules_path = dir.join("modules.json");
        if let Some(modules) = read_json_file(&modules_path)? {
            let list = modules
                .as_array()
                .ok_or_else(|| Error::file(&modules_path, "expected a list of modules"))?;
            for (i, m) in list.iter().enumerate() {
                let bad = |field: &str, what: String| {
                    Error::key(
                        modules_path.display().to_string(),
                        format!("[{i}].{field}"),
                        what,
                    )
                };
                let string = |field: &str| {
                    m.get(field)
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| bad(field, "missing or not a string".into()))
                };
                let ty = string("type")?;
                // A module this reader would skip (a Dense projection, a LayerNorm...) changes
                // the embedding: skipping it would give vectors sentence-transformers never
                // computes. Dropout does nothing at inference.
                let short = ty.rsplit('.').next().unwrap_or(ty);
                if !SENTENCE_MODULES.contains(&short) {
                    return Err(bad(
                        "type",
                        format!(
                            "`{ty}` is not supported (supported: {})",
                            SENTENCE_MODULES.join(", ")
                        ),
                    ));
                }
                if ty.ends_with(".Normalize") {
                    cfg.normalize = true;
                }
                if ty.ends_with(".Pooling") {
                    let rel = string("path")?;
                    let pdir = super::weights::file_inside(dir, rel, &modules_path)?;
                    cfg.pooling = read_pooling(&pdir.join("config.json"))?;
                }
            }
        }
        let st_path = dir.join("sentence_bert_config.json");
        if let Some(st) = read_json_file(&st_path)? {
            let key = |k: &str, what: &str| {
                Error::key(st_path.display().to_string(), k, what.to_string())
            };
            match st.get("max_seq_length") {
                None | Some(Value::Null) => {}
                Some(x) => {
                    let n = x
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| key("max_seq_length", "expected a positive integer"))?;
                    cfg.max_seq_length = Some(n);
                }
            }
            match st.get("do_lower_case") {
                None | Some(Value::Null) => {}
                Some(Value::Bool(b)) => cfg.do_lower_case = *b,
                Some(_) => return Err(key("do_lower_case", "expected true or false")),
            }
        }
        Ok(cfg)
    }
}

/// The pooling mode of a sentence-transformers `Pooling` config (`pooling_mode_*_token(s)`).
fn read_pooling(path: &Path) -> Result<Pooling> {
    let v = read_json_file(path)?
        .ok_or_else(|| Error::file(path, "missing (modules.json names this Pooling module)"))?;
    let on = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
    let modes: Vec<Pooling> = [
        ("pooling_mode_cls_token", Pooling::Cls),
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_max_tokens", Pooling::Max),
        ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
    ]
    .into_iter()
    .filter(|(k, _)| on(k))
    .map(|(_, p)| p)
    .collect();
    let unsupported = ["pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"]
        .into_iter()
        .find(|k| on(k));
    match (modes.as_slice(), unsupported) {
        (_, Some(k)) => Err(Error::key(
            path.display().to_string(),
            k,
            "this pooling mode is not supported (supported: cls, mean, max, mean_sqrt_len)",
        )),
        ([one], None) => Ok(*one),
        ([], None) => Err(Error::file(path, "no pooling mode is switched on")),
        _ => Err(Error::file(
            path,
            "several pooling modes at once (concatenated embeddings) are not supported",
        )),
    }
}

/// A BERT-family model ready to run.
pub struct LoadedBert {
    pub model: Bert,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    pub sentence: SentenceConfig,
    /// Bytes of the weight files on disk.
    pub file_bytes: u64,
}

impl LoadedBert {
    /// The input encoder for this model: special tokens, pairs and truncation as transformers'
    /// tokenizer applies them, at most `max_len` tokens per row (default: sentence-transformers'
    /// `max_seq_length` when the folder has one, else the model's position limit).
    pub fn input_encoder(&self, max_len: Option<usize>) -> Result<InputEncoder> {
        let limit = self.model.cfg.max_tokens();
        if let Some(m) = max_len.filter(|&m| m > limit) {
            // capping it quietly would embed other text than the user asked for
            return Err(Error::msg(format!(
                "max length {m} is more than this model takes: {limit} tokens (max_position_embeddings)"
            )));
        }
        let n = max_len
            .or(self.sentence.max_seq_length)
            .unwrap_or(limit)
            .min(limit);
        self.tokenizer.input_encoder(n, self.sentence.do_lower_case)
    }
}

/// Load a BERT-family model from `--model` (an HF folder or `hf:org/name`) with `head` (`None`:
/// the head of the class it was saved as). A GGUF file or a decoder's folder is a one-line
/// error naming what was found.
pub fn load_bert(
    spec: &str,
    opts: &super::LoadOptions,
    head: Option<BertHead>,
    device: &Device,
    progress: &dyn Progress,
) -> Result<LoadedBert> {
    load_bert_source(super::resolve(spec)?, opts, head, device, progress)
}

/// [`load_bert`] from a resolved source.
pub fn load_bert_source(
    source: ModelSource,
    opts: &super::LoadOptions,
    head: Option<BertHead>,
    device: &Device,
    progress: &dyn Progress,
) -> Result<LoadedBert> {
    let dir: PathBuf = match &source {
        ModelSource::Gguf(p) => {
            return Err(Error::file(
                p,
                "a GGUF file holds a decoder; this needs a BERT or RoBERTa encoder (an HF folder whose config.json has model_type bert or roberta)",
            ))
        }
        ModelSource::HfDir(d) => d.clone(),
    };
    let mut cfg = config_from_hf_dir(&dir)?;
    let tokenizer = Tokenizer::from_hf_dir(&dir)?;
    check_tokenizer_fits(&tokenizer, &cfg, &dir.join("tokenizer.json"))?;
    let sentence = SentenceConfig::from_dir(&dir)?;
    let src = super::SafetensorsSource::open(&dir, opts, device)?;
    // A head asked for (a run's task) wins over the saved one; `head` over both.
    let spec = opts.head.as_ref();
    let head = head
        .or(spec.map(|s| match s.head {
            super::HeadKind::None => BertHead::None,
            super::HeadKind::SequenceClassification => BertHead::SequenceClassification,
            super::HeadKind::TokenClassification => BertHead::TokenClassification,
            super::HeadKind::MaskedLm => BertHead::MaskedLm,
        }))
        .unwrap_or(cfg.saved_head());
    if let Some(names) = spec.and_then(|s| s.labels.as_ref()) {
        set_labels(&mut cfg, head, names, &src)?;
    }
    let seed = spec.and_then(|s| s.init_seed);
    progress.start("loading", Bert::tensor_count(&cfg, head), "tensors");
    let counting = CountingSource {
        inner: &src,
        progress,
    };
    let model = match seed {
        Some(seed) => Bert::load_with_new_head(&counting, &cfg, head, seed),
        None => Bert::load(&counting, &cfg, head),
    };
    progress.finish();
    let file_bytes = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0);
    Ok(LoadedBert {
        model: model?,
        tokenizer,
        source,
        sentence,
        file_bytes,
    })
}

/// Give a classification head `names.len()` classes named `names`. A classifier already in the
/// file must have as many outputs: a model fine-tuned for other classes is an error, not a
/// silently re-sized head.
fn set_labels(
    cfg: &mut BertConfig,
    head: BertHead,
    names: &[String],
    src: &dyn WeightSource,
) -> Result<()> {
    if !matches!(
        head,
        BertHead::SequenceClassification | BertHead::TokenClassification
    ) {
        return Ok(());
    }
    if names.is_empty() {
        return Err(Error::msg("a classification head needs at least one class"));
    }
    let fp = file_prefix(src, cfg.flavor)?;
    for l in head_names(cfg, head, fp, src).linears {
        if !(l.module == "classifier" || l.module == "classifier.out_proj") {
            continue;
        }
        if let Some(shape) = src.tensor_shape(&format!("{}.weight", l.file)) {
            if shape.first() != Some(&names.len()) {
                return Err(cfg.err(
                    "id2label",
                    format!(
                        "the saved classifier `{}` has {} classes ({}) but the data has {} ({}): fine-tune from the bare encoder, or use data with the model's classes",
                        l.file,
                        shape.first().copied().unwrap_or(0),
                        cfg.labels.join(", "),
                        names.len(),
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    cfg.labels = names.to_vec();
    Ok(())
}

/// [`load_bert`] without a progress bar.
pub fn load_bert_quiet(
    spec: &str,
    opts: &super::LoadOptions,
    head: Option<BertHead>,
    device: &Device,
) -> Result<LoadedBert> {
    load_bert(spec, opts, head, device, &NoProgress)
}

/// Every id the tokenizer can produce must have a row in the word-embedding table.
fn check_tokenizer_fits(tokenizer: &Tokenizer, cfg: &BertConfig, file: &Path) -> Result<()> {
    let vocab = tokenizer.inner().get_vocab(true);
    if let Some((token, &id)) = vocab.iter().max_by_key(|(_, &id)| id) {
        if id as usize >= cfg.vocab_size {
            return Err(cfg.err(
                "vocab_size",
                format!(
                    "{} but the tokenizer ({}) has token `{token}` with id {id}",
                    cfg.vocab_size,
                    file.display()
                ),
            ));
        }
    }
    Ok(())
}

// ---- The model interface ---------------------------------------------------------------------

impl Bert {
    /// The transformers class of this encoder with its loaded head.
    fn class_name(&self) -> String {
        let head = match self.head {
            BertHead::None => "Model",
            BertHead::SequenceClassification => "ForSequenceClassification",
            BertHead::TokenClassification => "ForTokenClassification",
            BertHead::MaskedLm => "ForMaskedLM",
        };
        format!("{}{head}", self.cfg.flavor.class_prefix())
    }

    /// The encoder input of a [`Batch`]: one segment (token types 0), the batch's mask.
    fn batch_input(&self, batch: &Batch) -> Result<BertInput> {
        let input_ids = batch.input_ids.to_dtype(DType::U32)?;
        Ok(BertInput {
            token_type_ids: input_ids.zeros_like()?,
            attention_mask: batch.attention_mask.to_dtype(DType::U32)?,
            input_ids,
        })
    }

    /// The targets the loaded head trains on: a one-line error for any other.
    fn check_targets(&self, batch: &Batch) -> Result<()> {
        let want = match self.head {
            BertHead::SequenceClassification => Targets::Sequence,
            BertHead::TokenClassification | BertHead::MaskedLm => Targets::Token,
            BertHead::None => {
                return Err(Error::msg(format!(
                    "{} is a bare encoder: it has no head to train or score (load a model saved with a classification or masked-LM head)",
                    self.class_name()
                )))
            }
        };
        if batch.targets != want {
            return Err(Error::msg(format!(
                "{} trains on {want:?} targets, but the batch has {:?} targets",
                self.class_name(),
                batch.targets
            )));
        }
        Ok(())
    }

    /// f32 values one encoder layer keeps per token for autograd: the inputs of the six
    /// linears, the attention output, the two LayerNorms and the FFN activation (the score
    /// matrices grow with the sequence and are left to the estimate's margin).
    fn layer_floats(&self, dropout: bool) -> u64 {
        let (h, i) = (
            self.cfg.hidden_size as u64,
            self.cfg.intermediate_size as u64,
        );
        let base = 10 * h + 2 * i;
        let adapters: u64 = self.layers.first().map_or(0, |l| {
            let a = &l.attention;
            [
                &a.query,
                &a.key,
                &a.value,
                &l.attention_output,
                &l.intermediate,
                &l.output,
            ]
            .into_iter()
            .map(|lin| crate::train::memory::adapter_floats(lin, dropout))
            .fold(0u64, u64::saturating_add)
        });
        base.saturating_add(adapters)
    }
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::GeluErf => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::Relu => "relu",
    }
}

fn embedding_tensor(e: &Embedding) -> Result<Tensor> {
    Ok(match e.weight() {
        EmbeddingWeight::Frozen(t) => t.clone(),
        EmbeddingWeight::Trainable(v) => v.as_tensor().clone(),
        EmbeddingWeight::Quantized(q) => q.dequantize()?,
    })
}

impl Model for Bert {
    fn family(&self) -> &'static str {
        "bert"
    }
    fn architecture(&self) -> String {
        self.class_name()
    }
    fn kind(&self) -> ArchitectureKind {
        ArchitectureKind::Encoder
    }
    fn pretraining_objective(&self) -> Objective {
        Objective::Mlm
    }
    fn task_type(&self) -> TaskType {
        match self.head {
            BertHead::SequenceClassification => TaskType::SeqCls,
            BertHead::TokenClassification => TaskType::TokenCls,
            BertHead::None | BertHead::MaskedLm => TaskType::FeatureExtraction,
        }
    }
    fn tasks(&self) -> Vec<Task> {
        match self.head {
            BertHead::SequenceClassification => vec![Task::SequenceClassification],
            BertHead::TokenClassification => vec![Task::TokenClassification],
            BertHead::None | BertHead::MaskedLm => Vec::new(),
        }
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dims(&self) -> Dims {
        let c = &self.cfg;
        Dims {
            hidden_size: c.hidden_size,
            layers: c.num_hidden_layers,
            encoder_layers: c.num_hidden_layers,
            decoder_layers: 0,
            attention_heads: c.num_attention_heads,
            kv_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            tied_embeddings: self.tied_linear().is_some(),
            rope_theta: None,
        }
    }
    fn context_length(&self) -> Option<usize> {
        Some(self.cfg.max_tokens())
    }

    fn linears(&self) -> Vec<&Linear> {
        Bert::linears(self)
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        Bert::linears_mut(self)
    }
    fn embeddings(&self) -> Vec<&Embedding> {
        Bert::embeddings(self).to_vec()
    }
    fn embeddings_mut(&mut self) -> Vec<&mut Embedding> {
        let e = &mut self.embeddings;
        vec![
            &mut e.word_embeddings,
            &mut e.position_embeddings,
            &mut e.token_type_embeddings,
        ]
    }
    fn tied(&self, name: &str) -> bool {
        self.tied_linear() == Some(name)
    }
    fn output_layer(&self) -> Option<&str> {
        Bert::output_layer(self)
    }
    fn other_params(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, norm) in self.norms() {
            out.push((format!("{name}.weight"), norm.weight().clone()));
            out.push((format!("{name}.bias"), norm.bias().clone()));
        }
        out
    }
    fn modules_to_save(&self) -> Vec<String> {
        Bert::modules_to_save(self)
    }
    fn default_lora_targets(&self) -> Vec<&'static str> {
        vec!["query", "value"]
    }
    fn make_trainable(&mut self, modules: Option<&[String]>) -> Result<Vec<(String, Var)>> {
        match modules {
            None => self.make_all_trainable(),
            Some(m) => self.make_modules_trainable(m),
        }
    }

    fn loss_sum(&self, batch: &Batch, train: bool) -> Result<(Tensor, usize)> {
        self.check_targets(batch)?;
        Bert::loss_sum(self, &self.batch_input(batch)?, &batch.labels, train)
    }
    fn logits(&self, batch: &Batch) -> Result<Tensor> {
        self.check_targets(batch)?;
        let input = self.batch_input(batch)?;
        match self.head {
            BertHead::SequenceClassification => self.sequence_logits(&input),
            BertHead::TokenClassification => self.token_logits(&input),
            _ => self.mlm_logits(&input),
        }
    }
    fn activation_floats_per_token(&self, dropout: bool) -> u64 {
        self.layer_floats(dropout)
            .saturating_mul(self.layers.len() as u64)
    }
    fn layer_floats_per_token(&self, dropout: bool) -> u64 {
        self.layer_floats(dropout)
    }

    fn decoder(&self) -> Result<Box<dyn Decoder + '_>> {
        Err(cannot_generate(self))
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

    fn state_dict(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut sd = HashMap::new();
        for e in Bert::embeddings(self) {
            sd.insert(
                format!("{}.weight", e.name()),
                embedding_tensor(e)?.to_dtype(dtype)?,
            );
        }
        for lin in Bert::linears(self) {
            if !Model::tied(self, lin.name()) {
                sd.insert(
                    format!("{}.weight", lin.name()),
                    lin.weight().to_dense_f32()?.to_dtype(dtype)?,
                );
            }
            if let Some(b) = lin.bias() {
                sd.insert(bias_param_name(lin.name()), b.to_dtype(dtype)?);
            }
        }
        for (name, t) in self.other_params() {
            sd.insert(name, t.to_dtype(dtype)?);
        }
        Ok(sd)
    }
    fn hf_config(&self) -> Result<Value> {
        let c = &self.cfg;
        let model_type = match c.flavor {
            BertFlavor::Bert => "bert",
            BertFlavor::Roberta => "roberta",
        };
        let id2label: serde_json::Map<String, Value> = c
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), Value::from(l.clone())))
            .collect();
        let label2id: serde_json::Map<String, Value> = c
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), Value::from(i)))
            .collect();
        let mut v = serde_json::json!({
            "architectures": [self.class_name()],
            "model_type": model_type,
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "max_position_embeddings": c.max_position_embeddings,
            "type_vocab_size": c.type_vocab_size,
            "layer_norm_eps": c.layer_norm_eps,
            "pad_token_id": c.pad_token_id,
            "hidden_act": activation_name(c.hidden_act),
            "initializer_range": c.initializer_range,
            "tie_word_embeddings": c.tie_word_embeddings,
            "id2label": id2label,
            "label2id": label2id,
        });
        if c.problem_type == ProblemType::Regression {
            v["problem_type"] = Value::from("regression");
        }
        Ok(v)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A head's layer that the loader should have built with the head: an error, never a panic.
fn missing_head_part(part: &str) -> Error {
    Error::msg(format!(
        "the model's head has no {part} (it was not loaded)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradients, rand_tensor};

    fn config(extra: Value) -> Result<BertConfig> {
        let mut v = serde_json::json!({
            "model_type": "bert", "vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        BertConfig::from_hf_json(&v, "m/config.json")
    }

    fn config_err(extra: Value) -> String {
        let e = config(extra).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with("m/config.json: key `"), "{e}");
        e
    }

    #[test]
    fn config_defaults_follow_transformers() {
        let c = config(serde_json::json!({})).unwrap();
        assert_eq!(c.flavor, BertFlavor::Bert);
        assert_eq!(c.max_position_embeddings, 512);
        assert_eq!(c.type_vocab_size, 2);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.labels, ["LABEL_0", "LABEL_1"]);
        assert_eq!(c.problem_type, ProblemType::SingleLabel);
        assert_eq!(c.hidden_act, Activation::GeluErf);
        let r = config(serde_json::json!({"model_type": "roberta", "max_position_embeddings": 66}))
            .unwrap();
        assert_eq!(
            (r.pad_token_id, r.position_offset(), r.max_tokens()),
            (1, 2, 64)
        );
        let one = config(serde_json::json!({"num_labels": 1})).unwrap();
        assert_eq!(one.problem_type, ProblemType::Regression);
        let named = config(serde_json::json!({"id2label": {"1": "pos", "0": "neg"}})).unwrap();
        assert_eq!(named.labels, ["neg", "pos"]);
    }

    #[test]
    fn bad_configs_are_one_line_errors_naming_the_key() {
        let cases = [
            (serde_json::json!({"model_type": "llama"}), "model_type"),
            (serde_json::json!({"hidden_size": 0}), "hidden_size"),
            (serde_json::json!({"hidden_size": 9}), "hidden_size"),
            (
                serde_json::json!({"hidden_size": 1u64 << 40}),
                "hidden_size",
            ),
            (
                serde_json::json!({"num_hidden_layers": -1}),
                "num_hidden_layers",
            ),
            (serde_json::json!({"vocab_size": "many"}), "vocab_size"),
            (
                serde_json::json!({"layer_norm_eps": -1.0}),
                "layer_norm_eps",
            ),
            (serde_json::json!({"hidden_act": "swish"}), "hidden_act"),
            (
                serde_json::json!({"position_embedding_type": "relative_key"}),
                "position_embedding_type",
            ),
            (
                serde_json::json!({"id2label": {"0": "a", "5": "b"}}),
                "id2label.5",
            ),
            (
                serde_json::json!({"num_labels": 3, "id2label": {"0": "a"}}),
                "num_labels",
            ),
            (serde_json::json!({"num_labels": 1u64 << 40}), "num_labels"),
            (
                serde_json::json!({"problem_type": "multi_label_classification"}),
                "problem_type",
            ),
            (serde_json::json!({"is_decoder": true}), "is_decoder"),
            (serde_json::json!({"type_vocab_size": 0}), "type_vocab_size"),
            (
                serde_json::json!({"model_type": "roberta", "max_position_embeddings": 2}),
                "pad_token_id",
            ),
        ];
        for (extra, key) in cases {
            let e = config_err(extra.clone());
            assert!(e.contains(&format!("key `{key}`")), "{extra}: {e}");
        }
        let missing =
            BertConfig::from_hf_json(&serde_json::json!({"model_type": "bert"}), "c.json")
                .unwrap_err()
                .to_string();
        assert!(missing.contains("`vocab_size`: missing"), "{missing}");
    }

    #[test]
    fn candle_gelu_erf_and_tanh_have_correct_gradients() -> candle_core::Result<()> {
        // The encoder uses candle's own gelu_erf / gelu / tanh; their backward passes must be
        // right (and not silently cut), which finite differences check.
        let x = (rand_tensor(&[3, 7], DType::F64, 1)? * 3.0)?;
        check_gradients(|v| v[0].gelu_erf(), std::slice::from_ref(&x), 1e-6, 1e-6)?;
        check_gradients(|v| v[0].gelu(), std::slice::from_ref(&x), 1e-6, 1e-5)?;
        check_gradients(|v| v[0].tanh(), &[x], 1e-6, 1e-6)
    }

    #[test]
    fn masked_softmax_attention_has_correct_gradients() -> candle_core::Result<()> {
        // Attention over keys with a padding mask, as SelfAttention computes it.
        let mask = Tensor::new(
            &[[1f64, 1., 1., 0.], [1., 1., 0., 0.]],
            &candle_core::Device::Cpu,
        )?;
        let bias = ((mask - 1.0)? * 1e30)?.reshape((2, 1, 1, 4))?;
        let q = rand_tensor(&[2, 2, 4, 3], DType::F64, 2)?;
        let k = rand_tensor(&[2, 2, 4, 3], DType::F64, 3)?;
        let v = rand_tensor(&[2, 2, 4, 3], DType::F64, 4)?;
        check_gradients(
            |x| {
                let s = x[0].matmul(&x[1].t()?)?.broadcast_add(&bias)?;
                ops::softmax_last_dim(&s)?.matmul(&x[2])
            },
            &[q, k, v],
            1e-6,
            1e-6,
        )
    }

    #[test]
    fn pooling_ignores_padding() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let h = Tensor::new(
            &[
                [[1f32, 2.], [3., 4.], [100., -100.]],
                [[-1., 0.5], [0., 0.], [0., 0.]],
            ],
            &dev,
        )?;
        let mask = Tensor::new(&[[1u32, 1, 0], [1, 0, 0]], &dev)?;
        let got = |p, n| -> Vec<Vec<f32>> { pool(&h, &mask, p, n).unwrap().to_vec2().unwrap() };
        assert_eq!(got(Pooling::Mean, false), [[2.0, 3.0], [-1.0, 0.5]]);
        assert_eq!(got(Pooling::Cls, false), [[1.0, 2.0], [-1.0, 0.5]]);
        assert_eq!(got(Pooling::Max, false), [[3.0, 4.0], [-1.0, 0.5]]);
        let s = 2f32.sqrt();
        assert_eq!(
            got(Pooling::MeanSqrtLen, false),
            [[4.0 / s, 6.0 / s], [-1.0, 0.5]]
        );
        let n = got(Pooling::Mean, true);
        let len = (4f32 + 9.0).sqrt();
        assert!((n[0][0] - 2.0 / len).abs() < 1e-6 && (n[0][1] - 3.0 / len).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn labels_outside_the_classes_are_refused() {
        assert_eq!(
            labelled(&[1, -100, 0], 2).unwrap(),
            (vec![0, 2], vec![1, 0])
        );
        let e = labelled(&[2], 2).unwrap_err().to_string();
        assert!(e.contains("label 2 is outside 0..2"), "{e}");
        assert!(labelled(&[-3], 2).is_err());
    }
}
