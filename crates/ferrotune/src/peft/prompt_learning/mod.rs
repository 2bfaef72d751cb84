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
pub mod config;
pub mod layer;
pub mod model;

pub use config::{PromptLearningConfig, PromptMethod, PromptTuningInit};
pub use layer::PromptEncoder;
pub use model::{
    attach_prompt, load_prompt_adapter, readout, save_prompt_adapter, Readout, ReadoutToken,
};
