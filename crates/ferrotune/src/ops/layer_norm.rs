//! LayerNorm (BERT, RoBERTa): y = (x − mean(x)) / sqrt(var(x) + eps) · w + b over the last dim,
//! with the biased variance, as `torch.nn.LayerNorm` computes it.
//!
//! candle's `layer_norm` is forward-only (it silently drops gradients); this op has a
//! hand-written backward pass. Like [`super::rms_norm`] it keeps nothing beyond its inputs: the
//! per-row mean and 1/std are recomputed in the backward pass (two passes over the row), which
//! is cheaper than keeping them in the graph.
use super::kernels::{self, multiversion, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// LayerNorm over the last dim of `x` (`(..., d)`) with weight and bias `(d)`. Gradients reach
/// `x`, and `weight` / `bias` when they are tracked (e.g. trainable `Var`s).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::reference_ops() {
        return layer_norm_reference(x, weight, bias, eps);
    }
    check_shapes(x, weight, bias)?;
    // Empty tensors take the composed path; the kernels assume non-empty rows.
    if kernels::cpu_kernel_dtype(&[x, weight, bias]).is_none()
        || [x, weight, bias].iter().any(|t| t.elem_count() == 0)
    {
        return layer_norm_reference(x, weight, bias, eps);
    }
    let x = x.contiguous()?;
    let w = weight.contiguous()?;
    let b = bias.contiguous()?;
    x.apply_op3(&w, &b, LayerNorm { eps })
}

/// The same function composed from ordinary differentiable candle ops (used off-CPU and by tests).
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    check_shapes(x, weight, bias)?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    centered
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

fn check_shapes(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let d = x.dim(D::Minus1)?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [d] {
            bail!(
                "layer_norm: {name} has shape {:?} but x {:?} needs ({d})",
                t.dims(),
                x.dims()
            )
        }
    }
    Ok(())
}

struct LayerNorm {
    eps: f64,
}

/// Mean and 1/sqrt(var + eps) of one row (two passes: the centred sum of squares does not lose
/// the variance to cancellation the way E[x²] − E[x]² does).
#[inline(always)]
fn moments<T: Float>(xr: &[T], inv_d: T, eps: T) -> (T, T) {
    let mut sum = T::ZERO;
    for v in xr {
        sum += *v;
    }
    let mean = sum * inv_d;
    let mut ss = T::ZERO;
    for v in xr {
        let c = *v - mean;
        ss += c * c;
    }
    (mean, T::ONE / (ss * inv_d + eps).sqrt())
}

#[inline(always)]
fn fwd_rows_body<T: Float>(x: &[T], w: &[T], b: &[T], out: &mut [T], eps: T) {
    let d = w.len();
    let inv_d = T::ONE / T::from_f64(d as f64);
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let (mean, r) = moments(xr, inv_d, eps);
        for (((o, xv), wv), bv) in or.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (*xv - mean) * r * *wv + *bv;
        }
    }
}
multiversion!(fn fwd_rows<T>(x: &[T], w: &[T], b: &[T], out: &mut [T], eps: T) = fwd_rows_body;);

/// With x̂ = (x − mean)·r and ĝ = g∘w:
/// dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ∘x̂)); dw += g∘x̂ and db += g when asked for (non-empty).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_rows_body<T: Float>(
    x: &[T],
    w: &[T],
    g: &[T],
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    eps: T,
) {
    let d = w.len();
    let inv_d = T::ONE / T::from_f64(d as f64);
    let (need_dw, need_db) = (!dw.is_empty(), !db.is_empty());
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, r) = moments(xr, inv_d, eps);
        let mut sum_gw = T::ZERO;
        let mut sum_gw_xhat = T::ZERO;
        for ((xv, gv), wv) in xr.iter().zip(gr).zip(w) {
            let gw = *gv * *wv;
            sum_gw += gw;
            sum_gw_xhat += gw * (*xv - mean) * r;
        }
        let (mean_gw, mean_gw_xhat) = (sum_gw * inv_d, sum_gw_xhat * inv_d);
        for (((o, xv), gv), wv) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
            let xhat = (*xv - mean) * r;
            *o = r * (*gv * *wv - mean_gw - xhat * mean_gw_xhat);
        }
        if need_dw {
            for ((a, xv), gv) in dw.iter_mut().zip(xr).zip(gr) {
                *a += *gv * (*xv - mean) * r;
            }
        }
        if need_db {
            for (a, gv) in db.iter_mut().zip(gr) {
                *a += *gv;
            }
        }
    }
}
multiversion!(fn bwd_rows<T>(x: &[T], w: &[T], g: &[T], dx: &mut [T], dw: &mut [T], db: &mut [T], eps: T) = bwd_rows_body;);

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl LayerNorm {
    #[allow(clippy::too_many_arguments)]
    fn fwd<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous::<T>(s1, l1, "layer_norm")?;
        let w = kernels::contiguous::<T>(s2, l2, "layer_norm")?;
        let b = kernels::contiguous::<T>(s3, l3, "layer_norm")?;
        let d = w.len();
        let mut out = vec![T::ZERO; x.len()];
        let eps = T::from_f64(self.eps);
        let rows = kernels::rows_per_task(x.len() / d.max(1), d);
        kernels::for_each_chunk_mut(&mut out, rows * d, |i, oc| {
            let start = i * rows * d;
            fwd_rows(&x[start..start + oc.len()], w, b, oc, eps)
        });
        Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
    }

    fn bwd_t<T: Float>(&self, x: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor) -> Result<Grads3> {
        let (need_dw, need_db) = (w.track_op(), b.track_op());
        let g = g.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let xv = kernels::cpu_contiguous::<T>(&xs, xl, "layer_norm")?;
        let wv = kernels::cpu_contiguous::<T>(&ws, wl, "layer_norm")?;
        let gv = kernels::cpu_contiguous::<T>(&gs, gl, "layer_norm")?;
        let d = wv.len();
        let eps = T::from_f64(self.eps);
        let mut dx = vec![T::ZERO; xv.len()];
        let rows = kernels::rows_per_task(xv.len() / d.max(1), d);
        let fresh = |need: bool| if need { vec![T::ZERO; d] } else { Vec::new() };
        // Each task sums its own rows' dw and db; the partial sums are added at the end.
        let partial = kernels::map_chunks_mut(&mut dx, rows * d, |i, dxc| {
            let start = i * rows * d;
            let end = start + dxc.len();
            let (mut dw, mut db) = (fresh(need_dw), fresh(need_db));
            bwd_rows(
                &xv[start..end],
                wv,
                &gv[start..end],
                dxc,
                &mut dw,
                &mut db,
                eps,
            );
            (dw, db)
        });
        let dx = kernels::tensor_from_vec(dx, x.shape())?;
        // Sum the tasks' partial dw (index 0) or db (index 1).
        let total = |need: bool, which: usize, like: &Tensor| -> Result<Option<Tensor>> {
            if !need {
                return Ok(None);
            }
            let mut acc = vec![T::ZERO; d];
            for (dw, db) in &partial {
                kernels::axpy(&mut acc, T::ONE, if which == 0 { dw } else { db });
            }
            kernels::tensor_from_vec(acc, like.shape()).map(Some)
        };
        let dw = total(need_dw, 0, w)?;
        let db = total(need_db, 1, b)?;
        Ok((Some(dx), dw, db))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "ferrotune-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => self.fwd::<f32>(s1, l1, s2, l2, s3, l3),
            DType::F64 => self.fwd::<f64>(s1, l1, s2, l2, s3, l3),
            dt => bail!("layer_norm: no CPU kernel for {dt:?}"),
        }
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Grads3> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, w, b, g),
            DType::F64 => self.bwd_t::<f64>(x, w, b, g),
            dt => bail!("layer_norm: no CPU kernel for {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, check_gradients, compare_grads, rand_tensor};
    use candle_core::Var;

    const SHAPES: &[&[usize]] = &[&[1, 7], &[3, 5, 16], &[2, 2, 3, 33], &[70, 64]];

    fn inputs(shape: &[usize], dt: DType, seed: u64) -> Result<[Tensor; 3]> {
        let d = *shape.last().unwrap();
        // An offset and a scale per row, so centring and the variance matter.
        let x = ((rand_tensor(shape, dt, seed)? * 3.0)? + 0.7)?;
        let w = rand_tensor(&[d], dt, seed + 1)?;
        let b = rand_tensor(&[d], dt, seed + 2)?;
        Ok([x, w, b])
    }

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                let [x, w, b] = inputs(shape, dt, 10 + 3 * i as u64)?;
                let got = layer_norm(&x, &w, &b, 1e-12)?;
                let want = layer_norm_reference(&x, &w, &b, 1e-12)?;
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-12 };
                assert_close(&got, &want, tol, &format!("layer_norm {dt:?} {shape:?}"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn forward_matches_candle_nn() -> Result<()> {
        // candle_nn's (forward-only) LayerNorm computes the same function.
        let [x, w, b] = inputs(&[4, 9, 32], DType::F32, 3)?;
        let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)?;
        assert_close(&layer_norm(&x, &w, &b, 1e-5)?, &want, 1e-5, "vs candle_nn")
    }

    #[test]
    fn forward_large_parallel_rows_match_reference() -> Result<()> {
        let [x, w, b] = inputs(&[600, 96], DType::F32, 4)?;
        assert_close(
            &layer_norm(&x, &w, &b, 1e-6)?,
            &layer_norm_reference(&x, &w, &b, 1e-6)?,
            1e-5,
            "layer_norm large",
        )
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        for (i, &shape) in [&[2usize, 5][..], &[2, 3, 7]].iter().enumerate() {
            let xs = inputs(shape, DType::F64, 30 + 3 * i as u64)?;
            check_gradients(|v| layer_norm(&v[0], &v[1], &v[2], 1e-5), &xs, 1e-6, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                let xs = inputs(shape, dt, 50 + 3 * i as u64)?;
                let tol = if dt == DType::F32 { 1e-4 } else { 1e-11 };
                compare_grads(
                    |v| layer_norm(&v[0], &v[1], &v[2], 1e-12),
                    |v| layer_norm_reference(&v[0], &v[1], &v[2], 1e-12),
                    &xs,
                    tol,
                    &format!("layer_norm {dt:?} {shape:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn frozen_weight_and_bias_get_no_gradient_but_x_does() -> Result<()> {
        let [x, w, b] = inputs(&[4, 8], DType::F32, 1)?;
        let x = Var::from_tensor(&x)?;
        let loss = layer_norm(x.as_tensor(), &w, &b, 1e-5)?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        assert!(gx.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn empty_input_gives_empty_output() -> Result<()> {
        let x = Tensor::zeros((0, 4), DType::F32, &candle_core::Device::Cpu)?;
        let w = rand_tensor(&[4], DType::F32, 1)?;
        assert_eq!(layer_norm(&x, &w, &w, 1e-5)?.dims(), &[0, 4]);
        Ok(())
    }
}
