//! Soft prompts, PEFT's prompt learning methods: prompt tuning (`PROMPT_TUNING`: trained
//! virtual-token embeddings put before the input), prefix tuning (`PREFIX_TUNING`: per-layer
//! key/value prefixes, optionally produced by an MLP, `prefix_projection`) and P-tuning
//! (`P_TUNING`: virtual-token embeddings produced by an MLP prompt encoder).
//!
//! The three share one layout, as PEFT's `PromptLearningConfig` does: `config` (the keys of
//! `adapter_config.json`), `layer` (the prompt encoder: an embedding, optionally an MLP) and
//! `model` (attach to a model through [`Model::set_virtual_prompt`](crate::model::Model),
//! save and load PEFT's single `prompt_embeddings` tensor, and the readout of the nearest
//! vocabulary tokens).
//!
//! Families: LLaMA (the prompt before the input, prefixes as every layer's past keys/values)
//! and T5 (`SEQ_2_SEQ_LM`, PEFT's `num_transformer_submodules = 2`): prompt tuning and
//! P-tuning put the first `num_virtual_tokens` rows of a 2n-row table before the encoder input
//! only, prefix tuning feeds the decoder's self-attention only (PEFT drops the
//! cross-attention prefixes); the exact layout is in [`crate::model::t5`]'s docs. On T5,
//! `num_layers`, `token_dim` and `num_attention_heads` of a prefix are the decoder's layers and
//! heads × d_kv (PEFT's defaults, the encoder's `num_layers` and `d_model`, agree on the
//! published T5 checkpoints); for the other methods they only record PEFT's defaults.
pub mod config;
pub mod layer;
pub mod model;

pub use config::{PromptLearningConfig, PromptMethod, PromptTuningInit};
pub use layer::PromptEncoder;
pub use model::{
    attach_prompt, load_prompt_adapter, readout, save_prompt_adapter, Readout, ReadoutToken,
};
