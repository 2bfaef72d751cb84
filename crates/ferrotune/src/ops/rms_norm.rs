//! RMSNorm (LLaMA): y = x / sqrt(mean(x²) + eps) · w over the last dim.
//!
//! The CPU op saves nothing beyond its inputs: the per-row 1/rms is recomputed in the backward
//! pass (one extra dot product per row), which is cheaper than keeping it in the graph.
use super::kernels::{self, multiversion, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// RMSNorm over the last dim of `x` (`(..., d)`) with weight `(d)`. Gradients reach `x` and
/// `weight` (the latter only when it is tracked, e.g. a trainable `Var`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if super::reference_ops() {
        return rms_norm_reference(x, weight, eps);
    }
    check_shapes(x, weight)?;
    // Empty tensors (e.g. a zero-sized head dim) take the composed path; the kernels assume
    // non-empty rows.
    if kernels::cpu_kernel_dtype(&[x, weight]).is_none()
        || [x, weight].iter().any(|t| t.elem_count() == 0)
    {
        return rms_norm_reference(x, weight, eps);
    }
    let x = x.contiguous()?;
    let w = weight.contiguous()?;
    x.apply_op2(&w, RmsNorm { eps })
}

/// The same function composed from ordinary differentiable candle ops (used off-CPU and by tests).
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_shapes(x, weight)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

fn check_shapes(x: &Tensor, weight: &Tensor) -> Result<()> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        bail!(
            "rms_norm: weight has shape {:?} but x {:?} needs ({d})",
            weight.dims(),
            x.dims()
        )
    }
    Ok(())
}

struct RmsNorm {
    eps: f64,
}

#[inline(always)]
fn fwd_rows_body<T: Float>(x: &[T], w: &[T], out: &mut [T], eps: T) {
    let d = w.len();
    let inv_d = T::ONE / T::from_f64(d as f64);
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let r = T::ONE / (kernels::dot(xr, xr) * inv_d + eps).sqrt();
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = *xv * r * *wv;
        }
    }
}
multiversion!(fn fwd_rows<T>(x: &[T], w: &[T], out: &mut [T], eps: T) = fwd_rows_body;);

/// dx = r·(g∘w) − x·r³·⟨g∘w, x⟩/d and, when `dw` is given, dw += g∘x·r.
#[inline(always)]
fn bwd_rows_body<T: Float>(x: &[T], w: &[T], g: &[T], dx: &mut [T], dw: &mut [T], eps: T) {
    let d = w.len();
    let inv_d = T::ONE / T::from_f64(d as f64);
    let need_dw = !dw.is_empty();
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let r = T::ONE / (kernels::dot(xr, xr) * inv_d + eps).sqrt();
        let c = kernels::dot3(gr, w, xr) * r * r * r * inv_d;
        for (((o, xv), gv), wv) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
            *o = r * *gv * *wv - *xv * c;
        }
        if need_dw {
            for ((a, xv), gv) in dw.iter_mut().zip(xr).zip(gr) {
                *a += *gv * *xv * r;
            }
        }
    }
}
multiversion!(fn bwd_rows<T>(x: &[T], w: &[T], g: &[T], dx: &mut [T], dw: &mut [T], eps: T) = bwd_rows_body;);

impl RmsNorm {
    fn fwd<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous::<T>(s1, l1, "rms_norm")?;
        let w = kernels::contiguous::<T>(s2, l2, "rms_norm")?;
        let d = w.len();
        let eps = T::from_f64(self.eps);
        let rows = kernels::rows_per_task(x.len() / d.max(1), d);
        // SAFETY: the chunks cover `out`, and `fwd_rows` writes every value of its rows.
        let out = unsafe {
            kernels::filled_vec(x.len(), |out| {
                kernels::for_each_chunk_mut(out, rows * d, |i, oc| {
                    let start = i * rows * d;
                    fwd_rows(&x[start..start + oc.len()], w, oc, eps)
                })
            })
        };
        Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
    }

    fn bwd_t<T: Float>(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let need_dw = w.track_op();
        let g = g.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let xv = kernels::cpu_contiguous::<T>(&xs, xl, "rms_norm")?;
        let wv = kernels::cpu_contiguous::<T>(&ws, wl, "rms_norm")?;
        let gv = kernels::cpu_contiguous::<T>(&gs, gl, "rms_norm")?;
        let d = wv.len();
        let eps = T::from_f64(self.eps);
        let rows = kernels::rows_per_task(xv.len() / d.max(1), d);
        // Each task sums its own rows' dw; the partial sums are added at the end.
        let mut partial_dw = Vec::new();
        // SAFETY: the chunks cover `dx`, and `bwd_rows` writes every value of its rows.
        let dx = unsafe {
            kernels::filled_vec(xv.len(), |dx| {
                partial_dw = kernels::map_chunks_mut(dx, rows * d, |i, dxc| {
                    let start = i * rows * d;
                    let mut dw = if need_dw {
                        vec![T::ZERO; d]
                    } else {
                        Vec::new()
                    };
                    let end = start + dxc.len();
                    bwd_rows(&xv[start..end], wv, &gv[start..end], dxc, &mut dw, eps);
                    dw
                })
            })
        };
        let dx = kernels::tensor_from_vec(dx, x.shape())?;
        let dw = if need_dw {
            let mut acc = vec![T::ZERO; d];
            for p in &partial_dw {
                kernels::axpy(&mut acc, T::ONE, p);
            }
            Some(kernels::tensor_from_vec(acc, w.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ferrotune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => self.fwd::<f32>(s1, l1, s2, l2),
            DType::F64 => self.fwd::<f64>(s1, l1, s2, l2),
            dt => bail!("rms_norm: no CPU kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, w, g),
            DType::F64 => self.bwd_t::<f64>(x, w, g),
            dt => bail!("rms_norm: no CPU kernel for {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, check_gradients, compare_grads, rand_tensor};
    use candle_core::Var;

    const SHAPES: &[&[usize]] = &[&[1, 7], &[3, 5, 16], &[2, 2, 3, 33], &[70, 64]];

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                let d = *shape.last().unwrap();
                let x = rand_tensor(shape, dt, 10 + i as u64)?;
                let w = rand_tensor(&[d], dt, 20 + i as u64)?;
                let got = rms_norm(&x, &w, 1e-5)?;
                let want = rms_norm_reference(&x, &w, 1e-5)?;
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-12 };
                assert_close(&got, &want, tol, &format!("rms_norm {dt:?} {shape:?}"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn forward_large_parallel_rows_match_reference() -> Result<()> {
        // Enough rows to split across rayon tasks.
        let x = rand_tensor(&[600, 96], DType::F32, 3)?;
        let w = rand_tensor(&[96], DType::F32, 4)?;
        assert_close(
            &rms_norm(&x, &w, 1e-6)?,
            &rms_norm_reference(&x, &w, 1e-6)?,
            1e-5,
            "rms_norm large",
        )
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        for (i, &shape) in [&[2usize, 5][..], &[2, 3, 7]].iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = rand_tensor(shape, DType::F64, 30 + i as u64)?;
            let w = rand_tensor(&[d], DType::F64, 40 + i as u64)?;
            check_gradients(|v| rms_norm(&v[0], &v[1], 1e-5), &[x, w], 1e-6, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                let d = *shape.last().unwrap();
                let x = rand_tensor(shape, dt, 50 + i as u64)?;
                let w = rand_tensor(&[d], dt, 60 + i as u64)?;
                let tol = if dt == DType::F32 { 1e-4 } else { 1e-11 };
                compare_grads(
                    |v| rms_norm(&v[0], &v[1], 1e-5),
                    |v| rms_norm_reference(&v[0], &v[1], 1e-5),
                    &[x, w],
                    tol,
                    &format!("rms_norm {dt:?} {shape:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn empty_input_gives_empty_output() -> Result<()> {
        let x = Tensor::zeros((0, 4), DType::F32, &candle_core::Device::Cpu)?;
        let w = rand_tensor(&[4], DType::F32, 1)?;
        assert_eq!(rms_norm(&x, &w, 1e-5)?.dims(), &[0, 4]);
        Ok(())
    }

    #[test]
    fn frozen_weight_gets_no_gradient_but_x_does() -> Result<()> {
        let x = Var::from_tensor(&rand_tensor(&[4, 8], DType::F32, 1)?)?;
        let w = rand_tensor(&[8], DType::F32, 2)?;
        let loss = rms_norm(x.as_tensor(), &w, 1e-5)?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        assert!(grads.get(&w).is_none());
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        assert!(gx.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
