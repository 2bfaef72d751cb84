//! SwiGLU gate of the LLaMA MLP: silu(gate) ∘ up, fused so the graph keeps only gate and up
//! (the composed version also keeps silu(gate) and the sigmoid it recomputes in backward).
use super::kernels::{self, multiversion, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// silu(gate) ∘ up for same-shaped tensors; gradients reach both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if super::reference_ops() {
        return swiglu_reference(gate, up);
    }
    check_shapes(gate, up)?;
    if kernels::cpu_kernel_dtype(&[gate, up]).is_none() {
        return swiglu_reference(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The same function composed from ordinary differentiable candle ops.
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_shapes(gate, up)?;
    gate.silu()? * up
}

fn check_shapes(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} must have the same shape",
            gate.dims(),
            up.dims()
        )
    }
    Ok(())
}

struct SwiGlu;

/// Elements per parallel task (elementwise work is cheap, so tasks are large).
const CHUNK: usize = 32 * 1024;

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

#[inline(always)]
fn fwd_body<T: Float>(gate: &[T], up: &[T], out: &mut [T]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = *g * sigmoid(*g) * *u;
    }
}
multiversion!(fn fwd_chunk<T>(gate: &[T], up: &[T], out: &mut [T]) = fwd_body;);

/// d gate = dy·up·σ(g)·(1 + g·(1 − σ(g))), d up = dy·g·σ(g). Either output may be empty (not needed).
#[inline(always)]
fn bwd_body<T: Float>(gate: &[T], up: &[T], dy: &[T], dgate: &mut [T], dup: &mut [T]) {
    if !dgate.is_empty() && !dup.is_empty() {
        // The usual case: one sigmoid per element for both gradients.
        for ((((og, ou), g), u), d) in dgate
            .iter_mut()
            .zip(dup.iter_mut())
            .zip(gate)
            .zip(up)
            .zip(dy)
        {
            let s = sigmoid(*g);
            *og = *d * *u * s * (T::ONE + *g * (T::ONE - s));
            *ou = *d * *g * s;
        }
        return;
    }
    if !dgate.is_empty() {
        for (((o, g), u), d) in dgate.iter_mut().zip(gate).zip(up).zip(dy) {
            let s = sigmoid(*g);
            *o = *d * *u * s * (T::ONE + *g * (T::ONE - s));
        }
    }
    if !dup.is_empty() {
        for ((o, g), d) in dup.iter_mut().zip(gate).zip(dy) {
            *o = *d * *g * sigmoid(*g);
        }
    }
}
multiversion!(fn bwd_chunk<T>(gate: &[T], up: &[T], dy: &[T], dgate: &mut [T], dup: &mut [T]) = bwd_body;);

impl SwiGlu {
    fn fwd<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = kernels::contiguous::<T>(s1, l1, "swiglu")?;
        let up = kernels::contiguous::<T>(s2, l2, "swiglu")?;
        // SAFETY: the chunks cover `out`, and `fwd_chunk` writes every value of its chunk.
        let out = unsafe {
            kernels::filled_vec(gate.len(), |out| {
                kernels::for_each_chunk_mut(out, CHUNK, |i, oc| {
                    let r = i * CHUNK..i * CHUNK + oc.len();
                    fwd_chunk(&gate[r.clone()], &up[r], oc)
                })
            })
        };
        Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
    }

    fn bwd_t<T: Float>(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_gate, need_up) = (gate.track_op(), up.track_op());
        let dy = dy.contiguous()?;
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let g = kernels::cpu_contiguous::<T>(&gs, gl, "swiglu")?;
        let u = kernels::cpu_contiguous::<T>(&us, ul, "swiglu")?;
        let d = kernels::cpu_contiguous::<T>(&ds, dl, "swiglu")?;
        let n = g.len();
        // Both outputs are chunked identically; the one(s) not needed stay empty.
        let tasks = n.div_ceil(CHUNK).max(1);
        let run = |i: usize, dg: &mut [T], du: &mut [T]| {
            let r = i * CHUNK..((i + 1) * CHUNK).min(n);
            bwd_chunk(&g[r.clone()], &u[r.clone()], &d[r], dg, du)
        };
        let fill = |dgate: &mut [T], dup: &mut [T]| {
            if tasks == 1 {
                run(0, dgate, dup);
            } else {
                use rayon::prelude::*;
                match (need_gate, need_up) {
                    (true, true) => dgate
                        .par_chunks_mut(CHUNK)
                        .zip(dup.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(i, (dg, du))| run(i, dg, du)),
                    (true, false) => dgate
                        .par_chunks_mut(CHUNK)
                        .enumerate()
                        .for_each(|(i, dg)| run(i, dg, &mut [])),
                    (false, true) => dup
                        .par_chunks_mut(CHUNK)
                        .enumerate()
                        .for_each(|(i, du)| run(i, &mut [], du)),
                    (false, false) => {}
                }
            }
        };
        let (n_gate, n_up) = (if need_gate { n } else { 0 }, if need_up { n } else { 0 });
        let mut dup = Vec::new();
        // SAFETY: the chunks cover both outputs (each n values, or empty when not needed), and
        // `bwd_chunk` writes every value of the chunks it is given.
        let dgate = unsafe {
            kernels::filled_vec(n_gate, |dgate| {
                dup = kernels::filled_vec(n_up, |dup| fill(dgate, dup));
            })
        };
        let shape = gate.shape();
        let dgate = if need_gate {
            Some(kernels::tensor_from_vec(dgate, shape)?)
        } else {
            None
        };
        let dup = if need_up {
            Some(kernels::tensor_from_vec(dup, shape)?)
        } else {
            None
        };
        Ok((dgate, dup))
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ferrotune-swiglu"
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
            dt => bail!("swiglu: no CPU kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        match gate.dtype() {
            DType::F32 => self.bwd_t::<f32>(gate, up, dy),
            DType::F64 => self.bwd_t::<f64>(gate, up, dy),
            dt => bail!("swiglu: no CPU kernel for {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, check_gradients, compare_grads, rand_tensor};
    use candle_core::Var;

    const SHAPES: &[&[usize]] = &[&[1], &[3, 7], &[2, 5, 33], &[40, 2000]];

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                // ×12 reaches the saturated ends of the sigmoid.
                let g = (rand_tensor(shape, dt, 300 + i as u64)? * 12.0)?;
                let u = rand_tensor(shape, dt, 400 + i as u64)?;
                let tol = if dt == DType::F32 { 1e-6 } else { 1e-14 };
                assert_close(
                    &swiglu(&g, &u)?,
                    &swiglu_reference(&g, &u)?,
                    tol,
                    &format!("swiglu {dt:?} {shape:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        let g = (rand_tensor(&[3, 5], DType::F64, 8)? * 4.0)?;
        let u = rand_tensor(&[3, 5], DType::F64, 9)?;
        check_gradients(|v| swiglu(&v[0], &v[1]), &[g, u], 1e-6, 1e-7)
    }

    #[test]
    fn backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &shape) in SHAPES.iter().enumerate() {
                let g = (rand_tensor(shape, dt, 500 + i as u64)? * 5.0)?;
                let u = rand_tensor(shape, dt, 600 + i as u64)?;
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-13 };
                compare_grads(
                    |v| swiglu(&v[0], &v[1]),
                    |v| swiglu_reference(&v[0], &v[1]),
                    &[g, u],
                    tol,
                    &format!("swiglu {dt:?} {shape:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn only_tracked_inputs_get_gradients() -> Result<()> {
        // Large enough for the parallel path.
        let shape = [70, 1000];
        let g = Var::from_tensor(&rand_tensor(&shape, DType::F32, 10)?)?;
        let u = rand_tensor(&shape, DType::F32, 11)?;
        let grads = swiglu(g.as_tensor(), &u)?.sum_all()?.backward()?;
        assert!(grads.get(&u).is_none());
        let want = swiglu_reference(g.as_tensor(), &u)?.sum_all()?.backward()?;
        assert_close(
            grads.get(g.as_tensor()).unwrap(),
            want.get(g.as_tensor()).unwrap(),
            1e-5,
            "dgate",
        )
    }
}
