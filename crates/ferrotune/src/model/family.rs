//! The model interface: what every family (LLaMA today; T5, BERT) implements so that PEFT
//! methods, training, evaluation, generation, perplexity, `inspect`, `convert` and `merge` work
//! for all of them without knowing which one they hold.
//!
//! A family is one file (`llama.rs`, ...) with plain structs built by `load(src, &cfg)`; it
//! implements [`Model`]: what it is (family, [`ArchitectureKind`], pre-training [`Objective`],
//! PEFT [`TaskType`]), its named layers (the `nn::Linear`s and `nn::Embedding`s PEFT wraps and
//! `targets` match, by their transformers state-dict names), its training forward (the summed
//! loss of a [`Batch`] over the positions that carry it), incremental decoding where it
//! generates, and its weights by HF name for saving. `model::load` returns a
//! [`LoadedModel`](super::LoadedModel) holding a `Box<dyn Model>`.
use crate::beam::BeamDecoder;
use crate::data::Batch;
use crate::generate::Decoder;
use crate::nn::{Embedding, EmbeddingWeight, Linear, LinearWeight};
use crate::quant::QuantSettings;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use std::any::Any;
use std::collections::HashMap;

/// Which stacks a transformer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchitectureKind {
    /// Autoencoding (BERT, RoBERTa): bidirectional attention; classification, tagging, embeddings.
    Encoder,
    /// Autoregressive (GPT, LLaMA): causal attention; generation.
    Decoder,
    /// Sequence-to-sequence (T5, BART): an encoder read by a decoder through cross-attention.
    EncoderDecoder,
}

impl ArchitectureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchitectureKind::Encoder => "encoder",
            ArchitectureKind::Decoder => "decoder",
            ArchitectureKind::EncoderDecoder => "encoder-decoder",
        }
    }
}

impl std::fmt::Display for ArchitectureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The objective a family was pre-trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Causal language modelling: predict the next token.
    Clm,
    /// Masked language modelling: predict masked tokens from both sides.
    Mlm,
    /// T5's span corruption: predict the spans replaced by sentinel tokens.
    SpanCorruption,
}

impl Objective {
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Clm => "clm",
            Objective::Mlm => "mlm",
            Objective::SpanCorruption => "span_corruption",
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// PEFT's `task_type`: what the model with its head does. Written to `adapter_config.json` and
/// checked when an adapter is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    CausalLm,
    Seq2SeqLm,
    SeqCls,
    TokenCls,
    FeatureExtraction,
}

impl TaskType {
    pub const ALL: [TaskType; 5] = [
        TaskType::CausalLm,
        TaskType::Seq2SeqLm,
        TaskType::SeqCls,
        TaskType::TokenCls,
        TaskType::FeatureExtraction,
    ];

    /// PEFT's spelling: `CAUSAL_LM`, `SEQ_2_SEQ_LM`, `SEQ_CLS`, `TOKEN_CLS`, `FEATURE_EXTRACTION`.
    pub fn as_peft(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    pub fn from_peft(s: &str) -> Option<TaskType> {
        TaskType::ALL.into_iter().find(|t| t.as_peft() == s)
    }
}

impl std::fmt::Display for TaskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_peft())
    }
}

/// What a training run teaches the model (`task = ...` in a train config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    CausalLm,
    #[serde(rename = "seq2seq_lm")]
    Seq2SeqLm,
    SequenceClassification,
    TokenClassification,
}

impl Task {
    pub const ALL: [Task; 4] = [
        Task::CausalLm,
        Task::Seq2SeqLm,
        Task::SequenceClassification,
        Task::TokenClassification,
    ];

    /// The config spelling: `causal_lm`, `seq2seq_lm`, `sequence_classification`,
    /// `token_classification`.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::CausalLm => "causal_lm",
            Task::Seq2SeqLm => "seq2seq_lm",
            Task::SequenceClassification => "sequence_classification",
            Task::TokenClassification => "token_classification",
        }
    }

    pub fn parse(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The PEFT task type of a model trained for this task.
    pub fn task_type(self) -> TaskType {
        match self {
            Task::CausalLm => TaskType::CausalLm,
            Task::Seq2SeqLm => TaskType::Seq2SeqLm,
            Task::SequenceClassification => TaskType::SeqCls,
            Task::TokenClassification => TaskType::TokenCls,
        }
    }

    /// How a batch for this task carries its labels.
    pub fn targets(self) -> crate::data::Targets {
        use crate::data::Targets;
        match self {
            Task::CausalLm => Targets::NextToken,
            Task::Seq2SeqLm => Targets::Decoder,
            Task::SequenceClassification => Targets::Sequence,
            Task::TokenClassification => Targets::Token,
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sizes of a model, for `inspect` and the memory estimates. `layers` counts every stack
/// (encoder + decoder); `attention_heads` etc. are those of one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dims {
    pub hidden_size: usize,
    pub layers: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    /// RoPE base; `None` for families without rotary embeddings.
    pub rope_theta: Option<f32>,
}

/// What [`Model::loss_and_grads_checkpointed`] returns for one micro-batch.
pub struct MicroBatchGrads {
    /// The loss summed over the micro-batch's loss tokens.
    pub loss_sum: f64,
    pub loss_tokens: usize,
    /// Gradients of `loss_sum · scale`, aligned with the parameters (`None` where a parameter
    /// took no part).
    pub grads: Vec<Option<Tensor>>,
    /// Seconds in the forward pass and in the backward pass (recomputation included).
    pub forward_s: f64,
    pub backward_s: f64,
}

/// Where a soft prompt's virtual tokens enter the model (PEFT's prompt learning methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtualTokens {
    /// Input embeddings `(n, hidden)` put before every row's token embeddings (prompt tuning,
    /// P-tuning), as PEFT's `inputs_embeds = cat(prompts, inputs_embeds)`.
    Embeddings,
    /// Per-layer key/value prefixes `(n, layers · 2 · kv_heads · head_dim)`, laid out as PEFT's
    /// prefix encoder output (`view(n, layers · 2, kv_heads, head_dim)`: layer `i`'s keys at
    /// `2i`, its values at `2i + 1`), fed as the past key/values (prefix tuning).
    Prefix,
}

/// A soft prompt the model reads on every forward pass: the values are computed on each call
/// (from trainable parameters while training, so gradients reach them), `(n, width)` f32.
pub trait SoftPrompt: Send + Sync {
    fn kind(&self) -> VirtualTokens;
    /// Virtual tokens per row (`num_virtual_tokens`).
    fn num_virtual_tokens(&self) -> usize;
    /// The prompt values: `(n, hidden)` embeddings or `(n, layers · 2 · kv_dim)` prefixes.
    fn values(&self) -> Result<Tensor>;
}

/// A model of any family. Object safe: the library holds `Box<dyn Model>` and passes
/// `&dyn Model` / `&mut dyn Model`. See the module docs and ARCHITECTURE.md.
pub trait Model: Send + Sync + Any {
    // ---- What it is -----------------------------------------------------------------------

    /// The family: `llama`, `t5`, `bert`.
    fn family(&self) -> &'static str;
    /// The transformers class it stands for (`LlamaForCausalLM`, `T5ForConditionalGeneration`).
    fn architecture(&self) -> String;
    fn kind(&self) -> ArchitectureKind;
    fn pretraining_objective(&self) -> Objective;
    /// What the loaded model with its head does (PEFT's `task_type` of its adapters).
    fn task_type(&self) -> TaskType;
    /// The training tasks it supports; the first is the default when a config sets no `task`.
    fn tasks(&self) -> Vec<Task>;
    fn device(&self) -> &Device;
    fn dims(&self) -> Dims;
    /// The most positions it reads (input plus generated tokens for a decoder); `None` where
    /// there is no hard limit (relative positions).
    fn context_length(&self) -> Option<usize>;

    // ---- Named layers: what PEFT wraps, counts, merges and saves ----------------------------

    /// Every linear layer, named as in transformers' state dict minus `.weight`, in model order.
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// The embedding tables (tokens; positions and token types where they are learned).
    fn embeddings(&self) -> Vec<&Embedding>;
    fn embeddings_mut(&mut self) -> Vec<&mut Embedding>;
    /// Whether linear `name`'s weight is an embedding table (a tied LM head): counted and saved
    /// once, with the embedding, and not mergeable on its own.
    fn tied(&self, name: &str) -> bool;
    /// The output layer, which PEFT's `target_modules = "all-linear"` leaves out.
    fn output_layer(&self) -> Option<&str>;
    /// Every other parameter (norms, layer-norm biases, position biases) under its HF name
    /// (with `.weight` / `.bias`).
    fn other_params(&self) -> Vec<(String, Tensor)>;
    /// Modules PEFT trains in full next to an adapter for this task (`modules_to_save`, e.g. a
    /// classification head).
    fn modules_to_save(&self) -> Vec<String> {
        Vec::new()
    }
    /// The modules LoRA adapts when a config names none: PEFT's
    /// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` for the family.
    fn default_lora_targets(&self) -> Vec<&'static str> {
        vec!["q_proj", "v_proj"]
    }
    /// Make parameters trainable and return them by HF name: every weight (`None`: full
    /// fine-tuning) or those under the given module names (`modules_to_save`). Quantized
    /// weights cannot be trained in place (an error: load with `--dequantize`).
    fn make_trainable(&mut self, modules: Option<&[String]>) -> Result<Vec<(String, Var)>>;

    // ---- Training --------------------------------------------------------------------------

    /// The loss of `batch` summed over the positions (rows, for sequence targets) that carry
    /// it, as a scalar f32 tensor differentiable w.r.t. the trainable parameters, and their
    /// number. The trainer divides by the step's total, so micro-batches add up to one batch.
    /// `train` enables dropout. Targets the model cannot train on are a one-line error.
    fn loss_sum(&self, batch: &Batch, train: bool) -> Result<(Tensor, usize)>;
    /// The head's output for `batch`, f32: next-token logits `(b, t, vocab)`; for decoder
    /// targets the decoder's logits `(b, s, vocab)` given the labels; class logits `(b, n)`
    /// (sequence) or `(b, t, n)` (token).
    fn logits(&self, batch: &Batch) -> Result<Tensor>;
    /// [`Self::loss_sum`] and the gradients of `params` with activation checkpointing
    /// (`train.gradient_checkpointing`): the same values up to rounding, less memory.
    fn loss_and_grads_checkpointed(
        &self,
        _params: &[(String, Var)],
        _batch: &Batch,
        _scale: f64,
    ) -> Result<MicroBatchGrads> {
        Err(Error::msg(format!(
            "train.gradient_checkpointing is not supported for the {} family yet; set it to false",
            self.family()
        )))
    }
    /// f32 values autograd keeps per token over all layers of a training forward pass (with
    /// LoRA dropout if `dropout`): the activation term of the memory estimate.
    fn activation_floats_per_token(&self, dropout: bool) -> u64;
    /// The activations of one layer (per token), kept when checkpointing recomputes a layer.
    fn layer_floats_per_token(&self, dropout: bool) -> u64;

    // ---- Generation ------------------------------------------------------------------------

    /// An incremental decoder over this model (KV cache; prefill reads the prompt). Encoders
    /// cannot generate: a one-line error.
    fn decoder(&self) -> Result<Box<dyn Decoder + '_>>;
    /// A beam-search decoder over `prompt_ids` ([`crate::beam`]) where the family has one (the
    /// encoder-decoders: T5 summarizes with beams); `None` otherwise.
    fn beam_decoder(&self, _prompt_ids: &[u32]) -> Option<Box<dyn BeamDecoder + '_>> {
        None
    }

    // ---- Model dropout (transformers' train mode) -------------------------------------------

    /// Seed the model's own dropout (`dropout_rate`, `hidden_dropout_prob`, ...; applied by
    /// `loss_sum(_, train = true)`) and switch it on or off. Masks are drawn from (seed, the
    /// number of training forward passes so far, the site in the network) alone, so a resumed
    /// run sets the count ([`Self::set_dropout_calls`]) and draws the same masks. A no-op for
    /// families without dropout.
    fn configure_dropout(&self, _seed: u64, _enabled: bool) {}
    /// Training forward passes counted by the model's dropout stream (`None`: no dropout).
    fn dropout_calls(&self) -> Option<u64> {
        None
    }
    /// Seek the model's dropout stream to where it was after `calls` training forward passes
    /// (O(1): no mask is drawn).
    fn set_dropout_calls(&self, _calls: u64) {}

    // ---- Soft prompts (prompt tuning, prefix tuning, P-tuning) -------------------------------

    /// Put a soft prompt in front of every input (training, logits, perplexity and incremental
    /// decoding all see it), or remove it (`None`). Families that cannot take one: an error.
    fn set_virtual_prompt(&mut self, prompt: Option<std::sync::Arc<dyn SoftPrompt>>) -> Result<()> {
        match prompt {
            None => Ok(()),
            Some(_) => Err(Error::msg(format!(
                "soft prompts (prompt tuning, prefix tuning, P-tuning) are not supported for {} yet",
                self.describe()
            ))),
        }
    }
    /// The soft prompt set by [`Self::set_virtual_prompt`].
    fn virtual_prompt(&self) -> Option<std::sync::Arc<dyn SoftPrompt>> {
        None
    }

    // ---- Saving ----------------------------------------------------------------------------

    /// Every weight under its HF name in `dtype` (quantized ones dequantized), a tied one once.
    fn state_dict(&self, dtype: DType) -> Result<HashMap<String, Tensor>>;
    /// The `config.json` transformers reads back.
    fn hf_config(&self) -> Result<serde_json::Value>;

    // ---- Downcasts (family-specific accelerators, e.g. the LLaMA fast engine) ---------------

    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;

    // ---- Provided ----------------------------------------------------------------------------

    /// How the model's quantized weights run (activation precision, backward method): a
    /// setting of this model, so another model in the same process keeps its own.
    fn set_quant_settings(&self, s: QuantSettings) {
        for lin in self.linears() {
            if let LinearWeight::Quantized(q) = lin.weight() {
                q.set_settings(s);
            }
        }
        for e in self.embeddings() {
            if let EmbeddingWeight::Quantized(q) = e.weight() {
                q.set_settings(s);
            }
        }
    }

    /// The settings of the model's quantized weights (the first one's; the default when no
    /// weight is quantized).
    fn quant_settings(&self) -> QuantSettings {
        self.linears()
            .iter()
            .find_map(|l| match l.weight() {
                LinearWeight::Quantized(q) => Some(q.settings()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// `family (architecture, kind)`, for messages.
    fn describe(&self) -> String {
        format!(
            "{} ({}, {})",
            self.family(),
            self.architecture(),
            self.kind()
        )
    }
}

impl<'a> dyn Model + 'a {
    /// The concrete model, if it is a `T`.
    pub fn downcast_ref<T: Model>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }

    pub fn downcast_mut<T: Model>(&mut self) -> Option<&mut T> {
        self.as_any_mut().downcast_mut::<T>()
    }
}

/// A boxed model is a model (every call goes to the one inside), so `&lm.model` of a
/// [`LoadedModel`](super::LoadedModel) is accepted wherever `&dyn Model` is, and downcasts see
/// the model inside.
impl Model for Box<dyn Model> {
    fn family(&self) -> &'static str {
        (**self).family()
    }
    fn architecture(&self) -> String {
        (**self).architecture()
    }
    fn kind(&self) -> ArchitectureKind {
        (**self).kind()
    }
    fn pretraining_objective(&self) -> Objective {
        (**self).pretraining_objective()
    }
    fn task_type(&self) -> TaskType {
        (**self).task_type()
    }
    fn tasks(&self) -> Vec<Task> {
        (**self).tasks()
    }
    fn device(&self) -> &Device {
        (**self).device()
    }
    fn dims(&self) -> Dims {
        (**self).dims()
    }
    fn context_length(&self) -> Option<usize> {
        (**self).context_length()
    }
    fn linears(&self) -> Vec<&Linear> {
        (**self).linears()
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        (**self).linears_mut()
    }
    fn embeddings(&self) -> Vec<&Embedding> {
        (**self).embeddings()
    }
    fn embeddings_mut(&mut self) -> Vec<&mut Embedding> {
        (**self).embeddings_mut()
    }
    fn tied(&self, name: &str) -> bool {
        (**self).tied(name)
    }
    fn output_layer(&self) -> Option<&str> {
        (**self).output_layer()
    }
    fn other_params(&self) -> Vec<(String, Tensor)> {
        (**self).other_params()
    }
    fn modules_to_save(&self) -> Vec<String> {
        (**self).modules_to_save()
    }
    fn default_lora_targets(&self) -> Vec<&'static str> {
        (**self).default_lora_targets()
    }
    fn make_trainable(&mut self, modules: Option<&[String]>) -> Result<Vec<(String, Var)>> {
        (**self).make_trainable(modules)
    }
    fn loss_sum(&self, batch: &Batch, train: bool) -> Result<(Tensor, usize)> {
        (**self).loss_sum(batch, train)
    }
    fn logits(&self, batch: &Batch) -> Result<Tensor> {
        (**self).logits(batch)
    }
    fn loss_and_grads_checkpointed(
        &self,
        params: &[(String, Var)],
        batch: &Batch,
        scale: f64,
    ) -> Result<MicroBatchGrads> {
        (**self).loss_and_grads_checkpointed(params, batch, scale)
    }
    fn activation_floats_per_token(&self, dropout: bool) -> u64 {
        (**self).activation_floats_per_token(dropout)
    }
    fn layer_floats_per_token(&self, dropout: bool) -> u64 {
        (**self).layer_floats_per_token(dropout)
    }
    fn decoder(&self) -> Result<Box<dyn Decoder + '_>> {
        (**self).decoder()
    }
    fn beam_decoder(&self, prompt_ids: &[u32]) -> Option<Box<dyn BeamDecoder + '_>> {
        (**self).beam_decoder(prompt_ids)
    }
    fn configure_dropout(&self, seed: u64, enabled: bool) {
        (**self).configure_dropout(seed, enabled)
    }
    fn dropout_calls(&self) -> Option<u64> {
        (**self).dropout_calls()
    }
    fn set_dropout_calls(&self, calls: u64) {
        (**self).set_dropout_calls(calls)
    }
    fn set_virtual_prompt(&mut self, prompt: Option<std::sync::Arc<dyn SoftPrompt>>) -> Result<()> {
        (**self).set_virtual_prompt(prompt)
    }
    fn virtual_prompt(&self) -> Option<std::sync::Arc<dyn SoftPrompt>> {
        (**self).virtual_prompt()
    }
    fn state_dict(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        (**self).state_dict(dtype)
    }
    fn hf_config(&self) -> Result<serde_json::Value> {
        (**self).hf_config()
    }
    fn as_any(&self) -> &dyn Any {
        (**self).as_any()
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        (**self).as_any_mut()
    }
    fn set_quant_settings(&self, s: QuantSettings) {
        (**self).set_quant_settings(s)
    }
    fn quant_settings(&self) -> QuantSettings {
        (**self).quant_settings()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// The error of an encoder asked to generate.
pub fn cannot_generate(model: &dyn Model) -> Error {
    Error::msg(format!(
        "{} is an encoder: it cannot generate text (use it for embeddings or classification, or pick a decoder or encoder-decoder model)",
        model.describe()
    ))
}

/// The task a config asks for, or the model's default: a task the model cannot train on is a
/// one-line error naming `key` (as `source` spells it).
pub fn resolve_task(model: &dyn Model, asked: Option<Task>) -> std::result::Result<Task, String> {
    let tasks = model.tasks();
    match asked {
        None => tasks.first().copied().ok_or_else(|| {
            format!(
                "{} supports no training task; set one of {}",
                model.describe(),
                Task::ALL.map(Task::as_str).join(", ")
            )
        }),
        Some(t) if tasks.contains(&t) => Ok(t),
        Some(t) => Err(format!(
            "`{t}` does not fit the model, {}: it supports {}",
            model.describe(),
            tasks
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Dense f32 (or quantized) bytes and element counts of a model's parameters, for reports:
/// `(stored type, elements, bytes)` per tensor, tied linears skipped. Shared by `inspect` and
/// the memory estimate.
pub fn parameter_storage(model: &dyn Model) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for e in model.embeddings() {
        out.push(match e.weight() {
            EmbeddingWeight::Frozen(t) => (
                format!("{:?}", t.dtype()).to_lowercase(),
                t.elem_count() as u64,
                (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            ),
            EmbeddingWeight::Trainable(v) => (
                format!("{:?}", v.dtype()).to_lowercase(),
                v.elem_count() as u64,
                (v.elem_count() * v.dtype().size_in_bytes()) as u64,
            ),
            EmbeddingWeight::Quantized(q) => (
                q.format().name(),
                q.shape().0 as u64 * q.shape().1 as u64,
                q.storage_bytes() as u64,
            ),
        });
    }
    for l in model.linears() {
        if model.tied(l.name()) {
            continue;
        }
        let (o, i) = l.weight().shape();
        out.push((
            l.weight().stored_type(),
            o as u64 * i as u64,
            l.weight().storage_bytes() as u64,
        ));
        if let Some(b) = l.bias() {
            out.push((
                format!("{:?}", b.dtype()).to_lowercase(),
                b.elem_count() as u64,
                (b.elem_count() * b.dtype().size_in_bytes()) as u64,
            ));
        }
    }
    for (_, t) in model.other_params() {
        out.push((
            format!("{:?}", t.dtype()).to_lowercase(),
            t.elem_count() as u64,
            (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        ));
    }
    out
}
