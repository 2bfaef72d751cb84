//! IA3 (Liu et al. 2022, "(IA)³") as PEFT implements it: learned vectors that rescale the
//! outputs of the key and value projections and the input of the feed-forward output layer,
//! everything else frozen. Far fewer parameters than LoRA, and it merges into the base.
//! - [`config`]: `Ia3Config`, PEFT's `adapter_config.json` fields and the family defaults.
//! - [`layer`]: `Ia3Adapter`, the per-linear vector.
//! - [`model`]: attach / merge / unmerge on a whole model.
pub mod config;
pub mod layer;
pub mod model;

pub use config::Ia3Config;
pub use layer::Ia3Adapter;
pub use model::{
    as_ia3, attach_ia3, config_for_model, is_ia3, merge_adapter, merge_and_unload, resolve_targets,
    unmerge_adapter, Ia3ModelInfo,
};
