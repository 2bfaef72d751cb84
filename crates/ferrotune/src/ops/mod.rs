//! TEMPORARY composed ops (replaced by the ops branch with fused ops + hand-written backward).
use candle_core::{Result, Tensor, D};

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)
}
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)?.add(&rot.broadcast_mul(&sin)?)
}
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    q_offset: usize,
) -> Result<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let rep = hq / hkv;
    let k = k
        .unsqueeze(2)?
        .expand((b, hkv, rep, s, d))?
        .reshape((b, hq, s, d))?;
    let v = v
        .unsqueeze(2)?
        .expand((b, hkv, rep, s, d))?
        .reshape((b, hq, s, d))?;
    let att = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= q_offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, s), q.device())?.to_dtype(q.dtype())?;
    let att = softmax_last_dim(&att.broadcast_add(&mask)?)?;
    att.matmul(&v.contiguous()?)
}
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    (gate * candle_nn::ops::sigmoid(gate)?)? * up
}
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.to_dtype(x.dtype())?;
    x.broadcast_matmul(&w.t()?)
}
