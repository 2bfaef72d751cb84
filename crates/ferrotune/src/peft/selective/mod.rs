//! Selective fine-tuning: train a subset of the base model's own parameters and freeze the
//! rest. The subset is the parameters whose HF name passes every rule given:
//!
//! - `modules`: under one of these module names (the original `[selective]` key);
//! - `regex`: the name matches this regular expression (searched anywhere in the name);
//! - `layers`: the name lies in one of these transformer layers (`model.layers.N.`,
//!   `encoder.layer.N.`, `encoder.block.N.` / `decoder.block.N.`), e.g. `"0-3"` or `[0, 1, 2]`;
//! - `bitfit = true`: biases only (BitFit, Ben Zaken et al. 2021), where the family has them
//!   (BERT); a family without biases (LLaMA, T5) is a one-line error naming it.
//!
//! PEFT has no format for this; ours keeps to PEFT's layout: the run's `adapter/` holds
//! [`WEIGHTS_FILE`] (the changed tensors by HF name, f32) and [`CONFIG_FILE`] (the rules, the
//! base model, the tensor names), and [`apply`] puts them onto a base model.
pub mod config;
pub mod model;

pub use config::{LayerRange, SelectiveConfig, CONFIG_FILE, PEFT_TYPE, WEIGHTS_FILE};
pub use model::{apply, is_selective_dir, save, select};
