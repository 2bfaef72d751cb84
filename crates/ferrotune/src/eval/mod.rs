//! Evaluation of generated text against references.
pub mod metrics;
