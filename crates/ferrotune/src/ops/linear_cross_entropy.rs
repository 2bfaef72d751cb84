//! The LM head and the cross-entropy in one op, chunk by chunk: `Σ_i −log softmax(h_i Wᵀ)[t_i]`
//! for a frozen head `W (vocab, hidden)`, with the gradient reaching `h` only.
//!
//! Why: SmolLM2's vocabulary is 49,152 wide, so the logits of 1,000 loss tokens are 197 MB in
//! f32, and the composed loss keeps several tensors that size alive until backward (logits,
//! shifted, exp, their gradients). Here rows go through the head [`CHUNK_ELEMS`] logits at a
//! time. Because the loss is the last op of the graph, the gradient with respect to the chunk's
//! logits, `softmax − onehot`, is known in the forward pass already (up to the incoming scalar
//! gradient), so the chunk's `dh = (softmax − onehot) · W` is computed right there and the
//! logits are dropped (the trick of Liger's fused linear cross-entropy). The backward pass only
//! scales the stored `dh`: no logits are ever recomputed or held. What stays alive is `dh`,
//! as large as `h` itself.
use crate::ops::kernels::{self, multiversion, Float};
use crate::quant::{with_f32_slice, QuantWeight};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Logits per chunk: 8 M f32 (32 MB), e.g. 170 rows of a 49k vocabulary.
const CHUNK_ELEMS: usize = 8 << 20;

/// A frozen LM head: a dense weight (any float dtype) or a quantized one.
#[derive(Clone)]
pub enum FrozenHead {
    Dense(Tensor),
    Quantized(Arc<QuantWeight>),
}

impl FrozenHead {
    fn vocab(&self) -> Result<usize> {
        match self {
            FrozenHead::Dense(w) => w.dim(0),
            FrozenHead::Quantized(q) => Ok(q.shape().0),
        }
    }
    fn hidden(&self) -> Result<usize> {
        match self {
            FrozenHead::Dense(w) => w.dim(1),
            FrozenHead::Quantized(q) => Ok(q.shape().1),
        }
    }
    /// `x (c, hidden)` -> logits `(c, vocab)` f32, no autograd.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FrozenHead::Dense(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32),
            FrozenHead::Quantized(q) => q.forward(x),
        }
    }
    /// [`Self::logits`] of the `c` rows of `x` as a vector: an f32 dense head runs gemm
    /// straight into it, a quantized one its kernels, so the chunk's logits (32 MB) are not
    /// copied out of a tensor on one thread.
    fn logits_vec(&self, x: &[f32], c: usize) -> Result<Vec<f32>> {
        match self {
            FrozenHead::Dense(w) if w.dtype() == DType::F32 && w.is_contiguous() => {
                let (vocab, h) = w.dims2()?;
                with_f32_slice(w, |wv| {
                    let mut res = Ok(());
                    // SAFETY: gemm without `accumulate` writes every one of the c × vocab
                    // values and reads none; on an error the vector is dropped unread.
                    let v = unsafe {
                        kernels::filled_vec(c * vocab, |dst| {
                            res = kernels::gemm_into(dst, false, x, wv, (c, vocab, h), (1, h), 1.0)
                        })
                    };
                    res.map(|()| v)
                })
            }
            FrozenHead::Quantized(q) => q.forward_slice(x, c),
            FrozenHead::Dense(_) => {
                let h = self.hidden()?;
                let xc = Tensor::from_slice(x, (c, h), &Device::Cpu)?;
                self.logits(&xc)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }
    /// `g (c, vocab)` -> `g · W (c, hidden)` f32.
    fn backward(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            FrozenHead::Dense(w) => g.to_dtype(w.dtype())?.matmul(w)?.to_dtype(DType::F32),
            FrozenHead::Quantized(q) => q.backward_input(g),
        }
    }
    fn dense_f32(&self) -> Result<Tensor> {
        match self {
            FrozenHead::Dense(w) => w.to_dtype(DType::F32),
            FrozenHead::Quantized(q) => q.dequantize(),
        }
    }
}

/// `Σ_i −log softmax(hidden_i Wᵀ)[targets_i]` as an f32 scalar; `hidden` is `(n, hidden)`. The
/// gradient reaches `hidden` (not `W`). Off the CPU it falls back to
/// [`linear_cross_entropy_sum_reference`].
pub fn linear_cross_entropy_sum(
    hidden: &Tensor,
    head: &FrozenHead,
    targets: &[u32],
) -> Result<Tensor> {
    if super::reference_ops() {
        return linear_cross_entropy_sum_reference(hidden, &head.dense_f32()?, targets);
    }
    let (n, h) = hidden.dims2()?;
    let vocab = head.vocab()?;
    if h != head.hidden()? {
        bail!(
            "linear cross-entropy: hidden size {h} does not match the head's {}",
            head.hidden()?
        )
    }
    if targets.len() != n {
        bail!(
            "linear cross-entropy: {n} rows but {} targets",
            targets.len()
        )
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("linear cross-entropy: target {t} is outside the vocabulary of {vocab}")
    }
    if !hidden.device().is_cpu() {
        return linear_cross_entropy_sum_reference(hidden, &head.dense_f32()?, targets);
    }
    let op = LinearCrossEntropy {
        head: head.clone(),
        targets: targets.to_vec(),
        keep_grad: hidden.track_op(),
        grad: Mutex::new(None),
    };
    hidden.to_dtype(DType::F32)?.contiguous()?.apply_op1(op)
}

/// The same sum composed from differentiable candle ops on a dense f32 head `(vocab, hidden)`:
/// the full logits, a max-shifted log-sum-exp and a gather.
pub fn linear_cross_entropy_sum_reference(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
) -> Result<Tensor> {
    let logits = hidden
        .to_dtype(DType::F32)?
        .matmul(&weight.to_dtype(DType::F32)?.t()?)?;
    let targets = Tensor::from_slice(targets, targets.len(), hidden.device())?;
    cross_entropy_sum(&logits, &targets)
}

/// Σ over rows of `−log softmax(logits)[target]`: logits (n, vocab), targets (n,) u32.
/// Composed of differentiable ops; the row max is detached (log-softmax does not depend on it).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.detach().max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.sum_all()
}

struct LinearCrossEntropy {
    head: FrozenHead,
    targets: Vec<u32>,
    /// Whether anyone will ask for the gradient (false during evaluation: skip `dh`).
    keep_grad: bool,
    /// `d loss / d hidden`, `(n, hidden)`, filled by the forward pass.
    grad: Mutex<Option<Tensor>>,
}

/// One row of logits: its loss `lse − row[t]`, and with `keep` the row becomes
/// `softmax − onehot(t)`. The exponentials run in f32 (vectorised, about 1 ulp), once per logit,
/// and are summed in f64 per 1,024 values; the softmax is `exp(v − max) / sum`. Two libm f64
/// exponentials per logit took 1.5% of a QLoRA step's CPU time on SmolLM2 (49k vocabulary), and
/// f32 is what PyTorch's cross-entropy computes in.
#[inline(always)]
fn row_loss_body<T: Float>(row: &mut [T], t: usize, keep: bool) -> f64 {
    let target = row[t].to_f64();
    let max = kernels::max(row);
    let sum: f64 = row
        .chunks_mut(1024)
        .map(|c| kernels::exp_shift_sum(c, max).to_f64())
        .sum();
    if keep {
        kernels::scale(row, T::from_f64(1.0 / sum));
        row[t] -= T::ONE;
    }
    max.to_f64() + sum.ln() - target
}

multiversion!(fn row_loss<T>(row: &mut [T], t: usize, keep: bool) -> f64 = row_loss_body;);

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "ferrotune-linear-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h) = layout.shape().dims2()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            bail!("linear cross-entropy: hidden states are not contiguous")
        };
        let x = &storage.as_slice::<f32>()?[a..b];
        let vocab = self.head.vocab()?;
        let rows = (CHUNK_ELEMS / vocab.max(1)).clamp(1, n.max(1));
        let mut loss = 0f64;
        let mut grad = if self.keep_grad {
            vec![0f32; n * h]
        } else {
            Vec::new()
        };
        for r0 in (0..n).step_by(rows) {
            let c = rows.min(n - r0);
            let mut logits = self.head.logits_vec(&x[r0 * h..(r0 + c) * h], c)?;
            let targets = &self.targets[r0..r0 + c];
            let keep = self.keep_grad;
            // per row: the loss, and (when training) softmax − onehot written over the logits
            loss += logits
                .par_chunks_mut(vocab)
                .zip(targets.par_iter())
                .map(|(row, &t)| row_loss(row, t as usize, keep))
                .sum::<f64>();
            if keep {
                let g = Tensor::from_vec(logits, (c, vocab), &Device::Cpu)?;
                let dh = self.head.backward(&g)?.flatten_all()?.to_vec1::<f32>()?;
                grad[r0 * h..(r0 + c) * h].copy_from_slice(&dh);
            }
        }
        if self.keep_grad {
            *self.grad.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Tensor::from_vec(grad, (n, h), &Device::Cpu)?);
        }
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let stored = self.grad.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(dh) = stored else {
            bail!("linear cross-entropy: backward ran twice, or the forward kept no gradient")
        };
        Ok(Some(dh.broadcast_mul(&grad_res.to_dtype(DType::F32)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, rand_tensor};
    use candle_core::quantized::GgmlDType;
    use candle_core::Var;

    fn loss_and_grad(h: &Var, f: impl Fn(&Tensor) -> Result<Tensor>) -> (f32, Tensor) {
        let loss = f(h.as_tensor()).unwrap();
        let g = loss.backward().unwrap();
        (
            loss.to_scalar::<f32>().unwrap(),
            g.get(h.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn matches_the_composed_loss_and_gradient_dense_and_quantized() {
        // vocab 3000 x hidden 64, 7 rows: several chunks would need more rows, so the chunk
        // size is exercised by `chunks_cover_many_rows` below
        let w = (rand_tensor(&[3000, 64], DType::F32, 1).unwrap() * 0.2).unwrap();
        let h = Var::from_tensor(&rand_tensor(&[7, 64], DType::F32, 2).unwrap()).unwrap();
        let targets = [0u32, 5, 2999, 17, 17, 1200, 3];
        let (want_l, want_g) =
            loss_and_grad(&h, |x| linear_cross_entropy_sum_reference(x, &w, &targets));
        let dense = FrozenHead::Dense(w.clone());
        let (l, g) = loss_and_grad(&h, |x| linear_cross_entropy_sum(x, &dense, &targets));
        assert!((l - want_l).abs() <= 1e-5 * want_l.abs(), "{l} vs {want_l}");
        assert_close(&g, &want_g, 1e-5, "dense grad").unwrap();

        // quantized: the reference runs on the dequantized weight; the kernels round the
        // activations to 16 bits (relative error ~3e-5)
        let q = Arc::new(QuantWeight::quantize(&w, GgmlDType::Q8_0).unwrap());
        let deq = q.dequantize().unwrap();
        let (want_l, want_g) = loss_and_grad(&h, |x| {
            linear_cross_entropy_sum_reference(x, &deq, &targets)
        });
        let quant = FrozenHead::Quantized(q);
        let (l, g) = loss_and_grad(&h, |x| linear_cross_entropy_sum(x, &quant, &targets));
        assert!((l - want_l).abs() <= 1e-4 * want_l.abs(), "{l} vs {want_l}");
        assert_close(&g, &want_g, 2e-2, "quantized grad").unwrap();

        // the heads that take the tensor path (not gemm into a vector): a bf16 weight, whose
        // product runs in bf16 (so the reference gets bf16 inputs too), and a strided f32 one
        let w16 = w.to_dtype(DType::BF16).unwrap();
        let (want_l, _) = loss_and_grad(&h, |x| {
            let x16 = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            linear_cross_entropy_sum_reference(&x16, &w16.to_dtype(DType::F32)?, &targets)
        });
        let bf16 = FrozenHead::Dense(w16);
        let (l, _) = loss_and_grad(&h, |x| linear_cross_entropy_sum(x, &bf16, &targets));
        assert!(
            (l - want_l).abs() <= 1e-2 * want_l.abs(),
            "bf16: {l} vs {want_l}"
        );
        let strided = FrozenHead::Dense(w.t().unwrap().contiguous().unwrap().t().unwrap());
        let (l, g) = loss_and_grad(&h, |x| linear_cross_entropy_sum(x, &strided, &targets));
        let (want_l, want_g) =
            loss_and_grad(&h, |x| linear_cross_entropy_sum_reference(x, &w, &targets));
        assert!(
            (l - want_l).abs() <= 1e-5 * want_l.abs(),
            "strided: {l} vs {want_l}"
        );
        assert_close(&g, &want_g, 1e-5, "strided grad").unwrap();
    }

    #[test]
    fn chunks_cover_many_rows() {
        // vocab 40000: 209 rows per chunk, so 500 rows take three chunks
        let w = (rand_tensor(&[40000, 8], DType::F32, 3).unwrap() * 0.3).unwrap();
        let h = Var::from_tensor(&rand_tensor(&[500, 8], DType::F32, 4).unwrap()).unwrap();
        let targets: Vec<u32> = (0..500).map(|i| (i * 7919 % 40000) as u32).collect();
        let (want_l, want_g) =
            loss_and_grad(&h, |x| linear_cross_entropy_sum_reference(x, &w, &targets));
        let head = FrozenHead::Dense(w);
        let (l, g) = loss_and_grad(&h, |x| linear_cross_entropy_sum(x, &head, &targets));
        assert!((l - want_l).abs() <= 1e-5 * want_l.abs(), "{l} vs {want_l}");
        assert_close(&g, &want_g, 1e-5, "grad").unwrap();
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let w = rand_tensor(&[50, 6], DType::F64, 5).unwrap();
        let x = rand_tensor(&[4, 6], DType::F64, 6).unwrap();
        let targets = [3u32, 49, 0, 3];
        let head = FrozenHead::Dense(w.to_dtype(DType::F32).unwrap());
        let h = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let (_, g) = loss_and_grad(&h, |t| linear_cross_entropy_sum(t, &head, &targets));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        // central differences of the f64 reference
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let f = |v: &[f64]| -> f64 {
            let t = Tensor::from_slice(v, (4, 6), &Device::Cpu).unwrap();
            let logits = t.matmul(&w.t().unwrap()).unwrap();
            let rows: Vec<Vec<f64>> = logits.to_vec2().unwrap();
            rows.iter()
                .zip(&targets)
                .map(|(r, &t)| {
                    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - r[t as usize]
                })
                .sum()
        };
        for i in 0..xs.len() {
            let (mut p, mut m) = (xs.clone(), xs.clone());
            p[i] += 1e-5;
            m[i] -= 1e-5;
            let fd = (f(&p) - f(&m)) / 2e-5;
            assert!((g[i] as f64 - fd).abs() < 1e-4, "[{i}]: {} vs {fd}", g[i]);
        }
    }

    #[test]
    fn no_gradient_is_kept_without_autograd_and_bad_targets_are_errors() {
        let w = rand_tensor(&[10, 4], DType::F32, 7).unwrap();
        let x = rand_tensor(&[3, 4], DType::F32, 8).unwrap();
        let head = FrozenHead::Dense(w.clone());
        let l = linear_cross_entropy_sum(&x, &head, &[1, 2, 3]).unwrap();
        let want = linear_cross_entropy_sum_reference(&x, &w, &[1, 2, 3]).unwrap();
        let (l, want) = (
            l.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap(),
        );
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
        let e = linear_cross_entropy_sum(&x, &head, &[1, 2, 10]).unwrap_err();
        assert!(e.to_string().contains("target 10"), "{e}");
        let e = linear_cross_entropy_sum(&x, &head, &[1, 2]).unwrap_err();
        assert!(e.to_string().contains("3 rows but 2 targets"), "{e}");
    }
}
