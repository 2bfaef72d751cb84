//! TEMPORARY (replaced by the quant branch with SIMD kernels).
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use std::sync::Arc;

pub struct QuantWeight {
    q: Arc<QTensor>,
    mm: QMatMul,
}
impl QuantWeight {
    pub fn from_qtensor(q: QTensor) -> crate::Result<Self> {
        let q = Arc::new(q);
        Ok(Self {
            mm: QMatMul::from_arc(q.clone())?,
            q,
        })
    }
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> crate::Result<Self> {
        Self::from_qtensor(QTensor::quantize(w, dtype)?)
    }
    pub fn permute_rows(&self, perm: &[usize]) -> crate::Result<Self> {
        let w = self.dequantize()?;
        let idx = Tensor::from_vec(
            perm.iter().map(|&p| p as u32).collect::<Vec<_>>(),
            perm.len(),
            &Device::Cpu,
        )?;
        Self::quantize(&w.index_select(&idx, 0)?, self.dtype())
    }
    pub fn shape(&self) -> (usize, usize) {
        let d = self.q.shape().dims();
        (d[0], d[1])
    }
    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }
    pub fn storage_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.mm.forward(x)
    }
    pub fn dequantize(&self) -> Result<Tensor> {
        self.q.dequantize(&Device::Cpu)
    }
    pub fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::new(ids, &Device::Cpu)?;
        self.dequantize()?.index_select(&idx, 0)
    }
}
pub fn linear(x: &Tensor, w: &Arc<QuantWeight>) -> Result<Tensor> {
    w.forward(&x.detach())
}
