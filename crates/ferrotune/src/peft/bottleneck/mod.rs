//! Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small feed-forward
//! network inserted after a transformer sub-layer, `h ← h + up(act(down(h)))`, with
//! `down: hidden → hidden / reduction_factor` and `up` back. Houlsby puts one after the
//! attention block and one after the feed-forward block of every layer; Pfeiffer only after the
//! feed-forward block.
//!
//! Here an adapter wraps the sub-layer's output projection (LLaMA `o_proj` / `down_proj`, T5
//! `o` / `wo`, BERT `attention.output.dense` / `output.dense`) and transforms its output, which is
//! the sub-layer output before the residual addition — where Houlsby inserts it.
//!
//! PEFT has no bottleneck adapters, so the file format is ours, kept as close to PEFT's as the
//! method allows (see `docs/adapters.md`): `adapter_config.json` with `"peft_type":
//! "BOTTLENECK"` and `adapter_model.safetensors` with
//! `base_model.model.<module>.adapter_down.{weight,bias}` and `...adapter_up.{weight,bias}`.
//! - [`config`]: `BottleneckConfig` and where each family's adapters go.
//! - [`layer`]: `BottleneckAdapter`, the per-module network.
//! - [`model`]: attach to a whole model, the tensors a file must hold.
pub mod config;
pub mod layer;
pub mod model;

pub use config::{Activation, AdapterType, BottleneckConfig};
pub use layer::BottleneckAdapter;
pub use model::{as_bottleneck, attach_bottleneck, expected_shapes, resolve_targets};
