//! Differentiable ops for LLaMA-family models, each with a hand-written backward pass.
//!
//! Why: candle 0.11's fused `softmax_last_dim`, `rms_norm`, `rope*` and `sdpa` are forward-only
//! and silently cut the graph (no error, just no gradient), and its matmul backward always
//! computes the weight gradient, even for frozen weights (see stack.md §3).
//!
//! Each op is a candle `CustomOp` with a CPU forward kernel (f32 and f64, rayon over rows/heads,
//! AVX2 when the CPU has it) and a backward pass. On other devices and dtypes every public
//! function falls back to its `*_reference` twin, the same function composed from ordinary
//! differentiable candle ops; the tests check the two against each other and against finite
//! differences ([`gradcheck`]). [`frozen_linear`] is the exception: it uses the backend's matmul
//! on every device, since the composed version would compute the weight gradient it exists to avoid.
use std::sync::atomic::{AtomicBool, Ordering};

static REFERENCE_OPS: AtomicBool = AtomicBool::new(false);

/// Route every fused op (and the fused training paths built on them, such as LoRA's fused
/// linear) to its composed `*_reference` twin, process-wide. For tests that hold the fused
/// implementation to the unfused one end to end (a whole training run); it is much slower.
pub fn set_reference_ops(on: bool) {
    REFERENCE_OPS.store(on, Ordering::Relaxed)
}

/// Whether [`set_reference_ops`] is on.
pub fn reference_ops() -> bool {
    REFERENCE_OPS.load(Ordering::Relaxed)
}

mod attention;
pub mod gradcheck;
pub(crate) mod kernels;
mod layer_norm;
mod linear;
mod linear_cross_entropy;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

pub use attention::{
    causal_attention, causal_attention_reference, causal_attention_segments,
    causal_attention_segments_reference,
};
pub use layer_norm::{layer_norm, layer_norm_reference};
pub use linear::{frozen_linear, frozen_linear_reference};
pub use linear_cross_entropy::{
    cross_entropy_sum, linear_cross_entropy_sum, linear_cross_entropy_sum_reference, FrozenHead,
};
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use rope::{rope, rope_reference};
pub use softmax::{softmax_last_dim, softmax_last_dim_reference};
pub use swiglu::{swiglu, swiglu_reference};
