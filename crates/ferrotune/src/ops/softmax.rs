//! Softmax over the last dim. The backward pass needs only the output y:
//! dx = y ∘ (g − ⟨g, y⟩) per row, so the op keeps no intermediates.
use super::kernels::{self, multiversion, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Softmax over the last dim, with a gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if super::reference_ops() {
        return softmax_last_dim_reference(x);
    }
    if kernels::cpu_kernel_dtype(&[x]).is_none() {
        return softmax_last_dim_reference(x);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// The same function composed from ordinary differentiable candle ops. The max is detached:
/// softmax is shift-invariant, so that changes no gradient but saves backward work.
pub fn softmax_last_dim_reference(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct Softmax;

#[inline(always)]
fn fwd_rows_body<T: Float>(x: &[T], out: &mut [T], d: usize) {
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        or.copy_from_slice(xr);
        let m = kernels::max(or);
        let s = kernels::exp_shift_sum(or, m);
        kernels::scale(or, T::ONE / s);
    }
}
multiversion!(fn fwd_rows<T>(x: &[T], out: &mut [T], d: usize) = fwd_rows_body;);

#[inline(always)]
fn bwd_rows_body<T: Float>(y: &[T], g: &[T], dx: &mut [T], d: usize) {
    for ((yr, gr), dr) in y
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let c = kernels::dot(yr, gr);
        for ((o, yv), gv) in dr.iter_mut().zip(yr).zip(gr) {
            *o = *yv * (*gv - c);
        }
    }
}
multiversion!(fn bwd_rows<T>(y: &[T], g: &[T], dx: &mut [T], d: usize) = bwd_rows_body;);

impl Softmax {
    fn fwd<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous::<T>(s, l, "softmax_last_dim")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![T::ZERO; x.len()];
        let rows = kernels::rows_per_task(x.len() / d, d);
        kernels::for_each_chunk_mut(&mut out, rows * d, |i, oc| {
            let start = i * rows * d;
            fwd_rows(&x[start..start + oc.len()], oc, d)
        });
        Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
    }

    fn bwd_t<T: Float>(&self, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let g = g.contiguous()?;
        let (ys, yl) = y.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let yv = kernels::cpu_contiguous::<T>(&ys, yl, "softmax_last_dim")?;
        let gv = kernels::cpu_contiguous::<T>(&gs, gl, "softmax_last_dim")?;
        let d = y.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![T::ZERO; yv.len()];
        let rows = kernels::rows_per_task(yv.len() / d, d);
        kernels::for_each_chunk_mut(&mut dx, rows * d, |i, dc| {
            let start = i * rows * d;
            let end = start + dc.len();
            bwd_rows(&yv[start..end], &gv[start..end], dc, d)
        });
        kernels::tensor_from_vec(dx, y.shape())
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ferrotune-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.fwd::<f32>(s, l),
            DType::F64 => self.fwd::<f64>(s, l),
            dt => bail!("softmax_last_dim: no CPU kernel for {dt:?}"),
        }
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = match y.dtype() {
            DType::F32 => self.bwd_t::<f32>(y, g)?,
            DType::F64 => self.bwd_t::<f64>(y, g)?,
            dt => bail!("softmax_last_dim: no CPU kernel for {dt:?}"),
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, check_gradients, compare_grads, rand_tensor};

    const SHAPES: &[&[usize]] = &[&[1, 1], &[3, 7], &[2, 3, 65], &[300, 100]];

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                // Scale up so rows have large logits (exercises the max shift).
                let x = (rand_tensor(shape, dt, 100 + i as u64)? * 20.0)?;
                let tol = if dt == DType::F32 { 1e-6 } else { 1e-14 };
                assert_close(
                    &softmax_last_dim(&x)?,
                    &softmax_last_dim_reference(&x)?,
                    tol,
                    &format!("softmax {dt:?} {shape:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn forward_handles_minus_infinity_entries() -> Result<()> {
        let x = Tensor::new(
            &[
                [0f32, f32::NEG_INFINITY, 1.0],
                [f32::NEG_INFINITY, 2.0, 2.0],
            ],
            &candle_core::Device::Cpu,
        )?;
        assert_close(
            &softmax_last_dim(&x)?,
            &softmax_last_dim_reference(&x)?,
            1e-6,
            "softmax -inf",
        )
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        let x = rand_tensor(&[3, 6], DType::F64, 7)?;
        check_gradients(|v| softmax_last_dim(&v[0]), &[x], 1e-6, 1e-7)
    }

    #[test]
    fn backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                let x = (rand_tensor(shape, dt, 200 + i as u64)? * 3.0)?;
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-13 };
                compare_grads(
                    |v| softmax_last_dim(&v[0]),
                    |v| softmax_last_dim_reference(&v[0]),
                    &[x],
                    tol,
                    &format!("softmax {dt:?} {shape:?}"),
                )?;
            }
        }
        Ok(())
    }
}
