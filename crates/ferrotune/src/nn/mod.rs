//! Our layers. Every model is built from these, so every PEFT method can wrap them the way
//! PEFT's tuners wrap torch modules: a [`Linear`] owns its base weight (dense, trainable or
//! quantized) plus a list of [`LinearAdapter`]s that each method attaches by module name.
mod dropout;
mod embedding;
mod layer_norm;
mod linear;
mod rms_norm;

pub use dropout::{check_probability, DropoutPass, ModelDropout};
pub use embedding::{Embedding, EmbeddingWeight};
pub use layer_norm::LayerNorm;
pub use linear::{Linear, LinearAdapter, LinearWeight};
pub use rms_norm::RmsNorm;
