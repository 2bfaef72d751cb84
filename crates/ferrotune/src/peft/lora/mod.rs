//! LoRA (Hu et al. 2021) as PEFT implements it: `out = W x + (alpha / r) · B A x`, with A
//! (r, in) and B (out, r) trained and W frozen; rsLoRA scales by alpha / sqrt(r) instead.
//! - [`config`]: `LoraConfig`, PEFT's `adapter_config.json` fields and module matching.
//! - [`layer`]: `LoraAdapter`, the per-linear adapter.
//! - [`model`]: attach / select / merge / unmerge on a whole model.
//! - [`init`]: PiSSA / OLoRA, the inits that move part of the base weight into the adapter;
//!   [`convert`]: such an adapter as a plain LoRA for the original base, as PEFT saves it.
pub mod combine;
pub mod config;
pub mod convert;
mod fused;
pub mod init;
pub mod layer;
pub mod model;

pub use combine::{add_weighted_adapter, Combination, WeightedAdapter};
pub use config::{
    InitKind, InitLoraWeights, LayerIndices, LoftqConfig, LoraConfig, ModuleParams, ModuleSpec,
};
pub use layer::{LoraAdapter, LoraInit};
pub use model::{
    as_lora, attach_lora, attach_lora_with, config_for_model, merge_adapter, merge_and_unload,
    resolve_modules_to_save, resolve_targets, set_active_adapters, set_adapter_active,
    unmerge_adapter, LoraModelInfo, LoraModuleInfo, MergeReport, OriginalWeights,
};
