use candle_core::{DType, Result, Tensor};

/// LLaMA RMSNorm: x / sqrt(mean(x^2) + eps) * weight, through our differentiable fused op.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            eps,
        })
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm(x, &self.weight, self.eps)
    }
}
