use candle_core::{DType, Result, Tensor, Var};

/// LayerNorm with weight and bias (BERT, RoBERTa), through our differentiable op.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            bias: bias.to_dtype(DType::F32)?,
            eps,
        })
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// Make weight and bias trainable; returns the new parameters `(weight, bias)`.
    pub fn make_trainable(&mut self) -> Result<(Var, Var)> {
        let w = Var::from_tensor(&self.weight)?;
        let b = Var::from_tensor(&self.bias)?;
        // A Var's tensor is tracked by autograd; the layer keeps using it as a plain tensor.
        self.weight = w.as_tensor().clone();
        self.bias = b.as_tensor().clone();
        Ok((w, b))
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
