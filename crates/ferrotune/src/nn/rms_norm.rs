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
    /// Make the scale trainable; returns the new parameter.
    pub fn make_trainable(&mut self) -> Result<candle_core::Var> {
        let v = candle_core::Var::from_tensor(&self.weight)?;
        // A Var's tensor is tracked by autograd; the layer keeps using it as a plain tensor.
        self.weight = v.as_tensor().clone();
        Ok(v)
    }
    /// Replace the scale (ZeRO-3 swaps a gathered parameter in and a placeholder back).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm(x, &self.weight, self.eps)
    }
}
