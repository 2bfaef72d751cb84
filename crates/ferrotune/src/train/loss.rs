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
//!
//! Packed batches (with `segment_ids`) run the model's packed forward pass: attention stays
//! within each example and positions restart at 0 for each. No loss position crosses an example
//! boundary either, because the batcher ignores the first label of every example (nothing in
//! that example predicts it), so the loss of a packed batch is the sum of its examples' losses.
use crate::data::{Batch, IGNORE};
use crate::model::Model;
use crate::nn::{Linear, LinearWeight};
use crate::ops;
use crate::Result;
use candle_core::{DType, Tensor};

/// Rows of the flattened (b·t) hidden states whose own label is trained (labels not shifted:
/// a decoder's targets, masked LM, token classification), and those labels.
pub fn token_positions(labels: &Tensor) -> Result<(Vec<u32>, Vec<u32>)> {
    let (b, t) = labels.dims2()?;
    let labels: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate().take(b) {
        for (j, &l) in row.iter().enumerate().take(t) {
            if l != IGNORE {
                rows.push((i * t + j) as u32);
                targets.push(l as u32);
            }
        }
    }
    Ok((rows, targets))
}

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

pub use crate::ops::cross_entropy_sum;

/// The summed loss of one batch (a scalar f32 tensor, differentiable with respect to the
/// trainable parameters) and the number of tokens it sums over. `train` enables dropout.
/// Whatever the family: this is [`Model::loss_sum`].
pub fn batch_loss_sum(model: &dyn Model, batch: &Batch, train: bool) -> Result<(Tensor, usize)> {
    model.loss_sum(batch, train)
}

/// The summed next-token loss of `batch` given the final hidden states `(b, t, hidden)` (after
/// the last norm) and the LM head, and the number of tokens it sums over (see
/// [`head_loss_sum`]).
pub fn loss_from_hidden(
    head: &Linear,
    hidden: &Tensor,
    batch: &Batch,
    train: bool,
) -> Result<(Tensor, usize)> {
    let (rows, targets) = loss_positions(&batch.labels)?;
    head_loss_sum(head, hidden, rows, targets, train)
}

/// The summed cross-entropy of `head(hidden)` at the flattened positions `rows` of `hidden`
/// `(b, t, h)` against `targets`, and their number. Only those rows go through the head; a
/// frozen head (the usual case) runs fused with the loss, chunk by chunk, so the full logits
/// never exist ([`ops::linear_cross_entropy_sum`]). Any family's LM-style head can use it.
pub fn head_loss_sum(
    head: &Linear,
    hidden: &Tensor,
    rows: Vec<u32>,
    targets: Vec<u32>,
    train: bool,
) -> Result<(Tensor, usize)> {
    let dev = hidden.device();
    if rows.is_empty() {
        return Ok((Tensor::zeros((), DType::F32, dev)?, 0));
    }
    let (b, t, h) = hidden.dims3()?;
    let n = rows.len();
    let picked = hidden
        .reshape((b * t, h))?
        .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    let frozen = match head.weight() {
        _ if head.has_active_adapters() || head.bias().is_some() => None,
        LinearWeight::Frozen(w) => Some(ops::FrozenHead::Dense(w.clone())),
        LinearWeight::Quantized(q) => Some(ops::FrozenHead::Quantized(q.clone())),
        LinearWeight::Trainable(_) => None,
    };
    let loss = match frozen {
        Some(fh) => ops::linear_cross_entropy_sum(&picked, &fh, &targets)?,
        None => {
            let logits = head.forward_t(&picked.unsqueeze(0)?, train)?.squeeze(0)?;
            cross_entropy_sum(&logits, &Tensor::from_vec(targets, n, dev)?)?
        }
    };
    Ok((loss, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_positions_are_not_shifted() {
        let labels = Tensor::new(
            &[[IGNORE, IGNORE, 7, 8], [IGNORE, 5, IGNORE, IGNORE]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (rows, targets) = token_positions(&labels).unwrap();
        assert_eq!(rows, vec![2, 3, 5]);
        assert_eq!(targets, vec![7, 8, 5]);
    }

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

    /// In packed rows every loss position predicts a token of its own example: the label at
    /// an example's start is never a target of the previous example's last token.
    #[test]
    fn packed_loss_positions_stay_within_examples() {
        use crate::data::{BatchConfig, Batcher, Example, Loc, Source};
        let lens = [5usize, 3, 7, 2, 6, 4];
        let examples: Vec<Example> = lens
            .iter()
            .enumerate()
            .map(|(e, &n)| {
                let ids: Vec<u32> = (0..n as u32).map(|k| 100 * (e as u32 + 1) + k).collect();
                Example {
                    // Every token trained: the harshest case for a boundary.
                    labels: ids.iter().map(|&i| i as i64).collect(),
                    input_ids: ids,
                    source: Source {
                        file: std::sync::Arc::from(std::path::Path::new("t.jsonl")),
                        loc: Loc::Line(e + 1),
                        task: None,
                    },
                }
            })
            .collect();
        let cfg = BatchConfig {
            shuffle: false,
            ..BatchConfig::new(3, 12, 0).with_packing()
        };
        let b = Batcher::new(examples, cfg, candle_core::Device::Cpu).unwrap();
        let plan = b.plan_for(0);
        let mut n_targets = 0;
        for rows in &plan {
            let batch = b.build(rows).unwrap();
            let seg: Vec<Vec<u32>> = batch.segment_ids.as_ref().unwrap().to_vec2().unwrap();
            let ids: Vec<Vec<u32>> = batch.input_ids.to_vec2().unwrap();
            let t = seg[0].len();
            assert!(seg.iter().flatten().any(|&s| s == 2), "no packed row");
            let (pos, targets) = loss_positions(&batch.labels).unwrap();
            assert_eq!(pos.len(), batch.n_loss_tokens);
            for (&p, &target) in pos.iter().zip(&targets) {
                let (r, j) = (p as usize / t, p as usize % t);
                assert!(seg[r][j] != 0, "padding predicts {target}");
                assert_eq!(
                    seg[r][j],
                    seg[r][j + 1],
                    "position {j} of row {r} crosses examples"
                );
                assert_eq!(ids[r][j + 1], target);
            }
            n_targets += pos.len();
        }
        // Each example of n tokens contributes its n − 1 next-token predictions.
        assert_eq!(n_targets, lens.iter().map(|n| n - 1).sum::<usize>());
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
