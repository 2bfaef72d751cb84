//! The causal-LM loss over trained tokens only, computed without the full logits.
//!
//! Labels are aligned with the inputs (HF convention), so the logits at position `i` predict
//! `labels[i + 1]`. Only hidden states of positions whose next label is trained go through the
//! LM head: for a 49k vocabulary, the (batch, time, vocab) logits of a 4 × 512 batch would be
//! 400 MB (and as much again for their gradient), while the completions are usually a small part.
//!
//! The loss of a micro-batch is a *sum* over its tokens; the trainer divides by the number of
//! loss tokens of the whole optimizer step, so k micro-batches give the same gradient as one
//! batch k times larger.
use crate::data::{Batch, IGNORE};
use crate::model::Llama;
use crate::Result;
use candle_core::{DType, Tensor, D};

/// Rows of the flattened (b·t) hidden states that predict a trained label, and those labels.
pub fn loss_positions(labels: &Tensor) -> Result<(Vec<u32>, Vec<u32>)> {
    let (b, t) = labels.dims2()?;
    let labels: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate().take(b) {
        for j in 0..t.saturating_sub(1) {
            let l = row[j + 1];
            if l != IGNORE {
                rows.push((i * t + j) as u32);
                targets.push(l as u32);
            }
        }
    }
    Ok((rows, targets))
}

/// Σ over rows of `−log softmax(logits)[target]`: logits (n, vocab), targets (n,) u32.
/// Composed of differentiable ops; the row max is detached (log-softmax does not depend on it).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.detach().max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.sum_all()
}

/// The summed loss of one batch (a scalar f32 tensor, differentiable with respect to the
/// trainable parameters) and the number of tokens it sums over. `train` enables dropout.
pub fn batch_loss_sum(model: &Llama, batch: &Batch, train: bool) -> Result<(Tensor, usize)> {
    let (rows, targets) = loss_positions(&batch.labels)?;
    let dev = model.device();
    if rows.is_empty() {
        return Ok((Tensor::zeros((), DType::F32, dev)?, 0));
    }
    let hidden = model.forward_hidden(&batch.input_ids, None, train)?;
    let (b, t, h) = hidden.dims3()?;
    let n = rows.len();
    let picked = hidden
        .reshape((b * t, h))?
        .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    let logits = model
        .lm_head
        .forward_t(&picked.unsqueeze(0)?, train)?
        .squeeze(0)?;
    let loss = cross_entropy_sum(&logits, &Tensor::from_vec(targets, n, dev)?)?;
    Ok((loss, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_shifted_by_one() {
        let labels = Tensor::new(
            &[[IGNORE, IGNORE, 7, 8], [IGNORE, 5, IGNORE, IGNORE]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (rows, targets) = loss_positions(&labels).unwrap();
        // Row 0: positions 1 and 2 predict labels 7 and 8; row 1: position 0 predicts 5.
        assert_eq!(rows, vec![1, 2, 4]);
        assert_eq!(targets, vec![7, 8, 5]);
    }

    #[test]
    fn cross_entropy_matches_a_direct_computation_and_its_gradient() {
        let dev = candle_core::Device::Cpu;
        let vals: Vec<f32> = (0..12).map(|i| ((i * 5) % 7) as f32 * 0.7 - 2.0).collect();
        let logits = candle_core::Var::from_vec(vals.clone(), (3, 4), &dev).unwrap();
        let targets = Tensor::new(&[1u32, 3, 0], &dev).unwrap();
        let loss = cross_entropy_sum(logits.as_tensor(), &targets).unwrap();
        let mut want = 0.0f64;
        let mut want_grad = vec![0.0f64; 12];
        for (r, &tg) in [1usize, 3, 0].iter().enumerate() {
            let row: Vec<f64> = vals[r * 4..r * 4 + 4].iter().map(|&x| x as f64).collect();
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            want += z.ln() - row[tg];
            for k in 0..4 {
                want_grad[r * 4 + k] = row[k].exp() / z - if k == tg { 1.0 } else { 0.0 };
            }
        }
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let g = loss.backward().unwrap();
        let g: Vec<f32> = g
            .get(logits.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in g.iter().zip(&want_grad) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
