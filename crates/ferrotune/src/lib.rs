//! ferrotune: adapt pre-trained foundation models — prompt, fine-tune, evaluate, ship.
//!
//! The library is usable without the CLI. Layers, bottom up:
//! - [`ops`]: differentiable ops with hand-written backward passes (candle's fused ops drop gradients).
//! - [`quant`]: GGML-quantized weights with SIMD kernels and an input-gradient path.
//! - [`nn`]: our layers (`Linear`, `Embedding`, `RmsNorm`) — the seam PEFT methods wrap.
//! - [`model`]: model code (LLaMA family) and loading from HF folders, GGUF files and the hub.
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or GGUF metadata, chat templates.
//! - [`generate`], [`beam`], [`icl`], [`perplexity`], [`inspect`], [`embed`], [`classify`]: what
//!   users run.
//! - [`progress`]: how long calls report their progress (the caller picks a bar or nothing).
//! - [`train`]: fine-tuning recipes (LoRA) from a TOML config, with checkpoints and exact resume.
pub mod beam;
pub mod bench;
pub mod classify;
pub mod data;
pub mod dist;
pub mod embed;
pub mod engine;
pub mod error;
pub mod eval;
pub mod export;
pub mod fsutil;
/// Fuzz targets shared by `fuzz/` (cargo-fuzz) and the `fuzz_smoke` test; not a public API.
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod icl;
pub mod inspect;
pub mod linalg;
pub mod model;
pub mod nn;
pub mod ops;
pub mod peft;
pub mod perplexity;
pub mod plan;
pub mod progress;
pub mod quant;
pub mod serve;
pub mod tokenizer;
pub mod tradeoff;
pub mod train;

pub use error::{Error, Result};
