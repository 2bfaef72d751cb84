//! `y = x @ wᵀ` for a frozen weight: the backward pass computes only dx = dy @ w.
//!
//! candle's matmul backward always computes the rhs gradient (xᵀ @ dy, as large as w) even when
//! w is a constant; for a LoRA step on frozen base weights that is ~40% wasted time and a
//! weight-sized allocation per layer (stack.md §3a). Here the matmul runs inside a `CustomOp2`
//! whose forward calls the backend's own matmul on the storages (so it works on every device,
//! without the extra output copy of the "attach" trick) and whose `bwd` returns `(Some(dy @ w), None)`.
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, DType, Layout, MetalStorage, Result, Shape, Tensor,
};

/// `x @ wᵀ` for `x` `(..., in)` and a frozen `w` `(out, in)`; returns `(..., out)` in x's dtype.
///
/// Backward gives x a gradient and never computes one for `w` (even if `w` is a `Var`).
/// When the dtypes differ the product is computed in the wider of the two (f32 for bf16 on CPU,
/// whose matmul has no bf16 kernel) and cast back; that converted copy of `w` stays alive in the
/// graph until backward, so store frozen weights in the compute dtype when training.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if super::reference_ops() {
        return frozen_linear_reference(x, w);
    }
    let (out_f, in_f, lead, dt) = check(x, w)?;
    let w = w.detach().to_dtype(dt)?.contiguous()?;
    let x2 = x
        .to_dtype(dt)?
        .reshape((lead.iter().product::<usize>(), in_f))?;
    let y = x2.apply_op2(&w, FrozenMatmul)?;
    let mut dims = lead;
    dims.push(out_f);
    y.reshape(dims)?.to_dtype(x.dtype())
}

/// The same product with candle's ordinary matmul (whose backward also computes dw).
pub fn frozen_linear_reference(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, _, _, dt) = check(x, w)?;
    x.to_dtype(dt)?
        .broadcast_matmul(&w.to_dtype(dt)?.t()?)?
        .to_dtype(x.dtype())
}

/// Returns (out, in, leading dims of x, compute dtype).
fn check(x: &Tensor, w: &Tensor) -> Result<(usize, usize, Vec<usize>, DType)> {
    let (out_f, in_f) = match w.dims() {
        &[o, i] => (o, i),
        d => bail!("frozen_linear: weight must be (out, in), got {d:?}"),
    };
    let xd = x.dims();
    if xd.is_empty() || xd[xd.len() - 1] != in_f {
        bail!(
            "frozen_linear: x {xd:?} does not end in the weight's in-features {in_f} (weight {:?})",
            w.dims()
        )
    }
    if !x.dtype().is_float() || !w.dtype().is_float() {
        bail!(
            "frozen_linear: x ({:?}) and w ({:?}) must be float tensors",
            x.dtype(),
            w.dtype()
        )
    }
    let wider = if w.dtype().size_in_bytes() > x.dtype().size_in_bytes() {
        w.dtype()
    } else {
        x.dtype()
    };
    let dt = if wider == DType::BF16 && x.device().is_cpu() {
        DType::F32
    } else {
        wider
    };
    Ok((out_f, in_f, xd[..xd.len() - 1].to_vec(), dt))
}

struct FrozenMatmul;

impl FrozenMatmul {
    /// (m, in) @ (out, in)ᵀ with the backend's matmul; wᵀ is just a transposed layout.
    fn fwd<S: BackendStorage>(&self, x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            bail!("frozen_linear: internal error: inner dims {k} vs {k2}")
        }
        let y = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((y, Shape::from((m, n))))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "ferrotune-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.fwd(s1, l1, s2, l2)
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dy is (m, out), w is (out, in): dx = dy @ w. Nothing for w, by design.
        Ok((Some(dy.matmul(w)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, check_gradients, compare_grads, rand_tensor};
    use candle_core::Var;

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, xs) in [&[1usize, 7][..], &[3, 5, 7], &[2, 3, 4, 7]]
                .iter()
                .enumerate()
            {
                let x = rand_tensor(xs, dt, 900 + i as u64)?;
                let w = rand_tensor(&[9, 7], dt, 950 + i as u64)?;
                let tol = if dt == DType::F32 { 1e-6 } else { 1e-14 };
                assert_close(
                    &frozen_linear(&x, &w)?,
                    &frozen_linear_reference(&x, &w)?,
                    tol,
                    &format!("linear {dt:?} {xs:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn mixed_dtypes_return_x_dtype() -> Result<()> {
        let x = rand_tensor(&[2, 3, 16], DType::F32, 1)?;
        let w32 = rand_tensor(&[5, 16], DType::F32, 2)?;
        for wdt in [DType::BF16, DType::F16] {
            let w = w32.to_dtype(wdt)?;
            let y = frozen_linear(&x, &w)?;
            assert_eq!(y.dtype(), DType::F32);
            // The rounded weights, exactly as f32: products must match to f32 precision.
            assert_close(
                &y,
                &frozen_linear_reference(&x, &w.to_dtype(DType::F32)?)?,
                1e-6,
                "mixed",
            )?;
        }
        // bf16 activations with f32 weights come back as bf16.
        let xb = x.to_dtype(DType::BF16)?;
        let y = frozen_linear(&xb, &w32)?;
        assert_eq!(y.dtype(), DType::BF16);
        assert_close(&y, &frozen_linear_reference(&xb, &w32)?, 1e-2, "bf16 x")
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4], DType::F64, 3)?;
        let w = rand_tensor(&[5, 4], DType::F64, 4)?;
        check_gradients(|v| frozen_linear(&v[0], &w), &[x], 1e-6, 1e-8)
    }

    #[test]
    fn backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            let x = rand_tensor(&[3, 4, 33], dt, 5)?;
            let w = rand_tensor(&[17, 33], dt, 6)?;
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-13 };
            compare_grads(
                |v| frozen_linear(&v[0], &w),
                |v| frozen_linear_reference(&v[0], &w),
                &[x],
                tol,
                "linear",
            )?;
        }
        Ok(())
    }

    #[test]
    fn weight_gets_no_gradient_even_as_a_var() -> Result<()> {
        let x = Var::from_tensor(&rand_tensor(&[2, 3, 8], DType::F32, 7)?)?;
        let w = Var::from_tensor(&rand_tensor(&[4, 8], DType::F32, 8)?)?;
        let loss = frozen_linear(x.as_tensor(), w.as_tensor())?
            .sqr()?
            .sum_all()?;
        let grads = loss.backward()?;
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "frozen weight got a gradient"
        );
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        assert!(gx.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        // And it is the right one.
        let want = frozen_linear_reference(x.as_tensor(), w.as_tensor())?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert_close(gx, want.get(x.as_tensor()).unwrap(), 1e-5, "grad x")
    }

    #[test]
    fn non_contiguous_x_and_shape_errors() -> Result<()> {
        let x = rand_tensor(&[6, 4], DType::F64, 9)?.t()?; // (4, 6), strided
        let w = rand_tensor(&[3, 6], DType::F64, 10)?;
        assert_close(
            &frozen_linear(&x, &w)?,
            &frozen_linear_reference(&x, &w)?,
            1e-14,
            "strided x",
        )?;
        let bad = rand_tensor(&[3, 5], DType::F64, 11)?;
        let err = frozen_linear(&x, &bad).unwrap_err().to_string();
        assert!(err.contains("in-features 5"), "{err}");
        Ok(())
    }
}
