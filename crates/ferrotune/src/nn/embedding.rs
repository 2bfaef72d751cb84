use crate::quant::QuantWeight;
use candle_core::{DType, Result, Tensor, Var};
use std::sync::Arc;

#[derive(Clone)]
pub enum EmbeddingWeight {
    Frozen(Tensor),
    Trainable(Var),
    Quantized(Arc<QuantWeight>),
}

/// Token embedding table (vocab, hidden). Lookups return f32.
pub struct Embedding {
    name: String,
    weight: EmbeddingWeight,
}

impl Embedding {
    pub fn new(name: impl Into<String>, weight: EmbeddingWeight) -> Self {
        Self {
            name: name.into(),
            weight,
        }
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn weight(&self) -> &EmbeddingWeight {
        &self.weight
    }
    pub fn set_weight(&mut self, w: EmbeddingWeight) {
        self.weight = w;
    }
    /// ids (b, t) u32 -> (b, t, hidden) f32
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = match &self.weight {
            EmbeddingWeight::Frozen(w) => w.index_select(&flat, 0)?.to_dtype(DType::F32)?,
            EmbeddingWeight::Trainable(w) => {
                w.as_tensor().index_select(&flat, 0)?.to_dtype(DType::F32)?
            }
            EmbeddingWeight::Quantized(q) => q
                .embedding(&flat.to_vec1::<u32>()?)?
                .to_device(ids.device())?,
        };
        let hidden = rows.dim(1)?;
        rows.reshape((b, t, hidden))
    }
}
