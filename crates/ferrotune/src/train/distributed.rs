//! Data parallel training (`train.distributed = "ddp"`): what one rank of a DDP run does in a
//! step, beyond what one process does.
//!
//! - **The sampler.** Every rank walks the same seeded sequence of micro-batches a single
//!   process would (the global order), and a step takes `grad_accum × world_size` of them: rank
//!   r trains micro-batches `r·grad_accum .. (r+1)·grad_accum` of the step and only moves its
//!   cursor past the others. So DDP with batch b on 2 ranks sees exactly the batches of one
//!   process with `grad_accum` 2 × batch b, and the data cursor is global: a checkpoint resumes
//!   at another world size with `grad_accum` scaled to keep the micro-batches per step.
//! - **The counts.** Each micro-batch's loss and real tokens are exchanged first (one small f64
//!   all-reduce), so every rank divides its losses by the step's *global* loss-token count, as
//!   gradient accumulation does, and seeds dropout with each micro-batch's global pass number.
//! - **The gradients.** Each rank's summed gradients are added across ranks in buckets of f32
//!   (one all-reduce per bucket): every rank then holds the gradient of the mean over the
//!   step's tokens and takes the same optimizer step, so the replicas stay equal.
use crate::data::{Batch, Batcher};
use crate::dist::Dist;
use crate::Result;
use candle_core::Tensor;

/// Floats per gradient all-reduce (PyTorch DDP's default bucket is 25 MB).
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// The rank that trains micro-batch `g` (0-based, within its step).
pub fn owner(g: usize, grad_accum: usize) -> usize {
    g / grad_accum
}

/// One step's micro-batches of this rank, with their index in the step; the cursor moves past
/// all `grad_accum × world_size` of the step.
pub fn draw_step(batcher: &mut Batcher, grad_accum: usize, dist: &Dist) -> Result<Vec<Drawn>> {
    let mut mine = Vec::with_capacity(grad_accum);
    for g in 0..grad_accum * dist.world_size() {
        if owner(g, grad_accum) == dist.rank() {
            mine.push(Drawn {
                index: g,
                batch: batcher.next_batch()?,
            });
        } else {
            batcher.skip_batch();
        }
    }
    Ok(mine)
}

/// A micro-batch of this rank and its place in the step.
pub struct Drawn {
    pub index: usize,
    pub batch: Batch,
}

/// Every micro-batch's counts, over all ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCounts {
    /// Loss tokens of each micro-batch of the step, in step order.
    pub loss_tokens: Vec<usize>,
    /// Non-padding tokens of each.
    pub tokens: Vec<usize>,
}

impl StepCounts {
    /// Exchange the counts of this rank's micro-batches (`per_step` in the step in all).
    pub fn exchange(mine: &[Drawn], per_step: usize, dist: &Dist) -> Result<Self> {
        let mut v = vec![0.0f64; 2 * per_step];
        for d in mine {
            v[2 * d.index] = d.batch.n_loss_tokens as f64;
            v[2 * d.index + 1] = d.batch.n_tokens as f64;
        }
        dist.all_reduce_sum_f64(&mut v)?;
        Ok(StepCounts {
            loss_tokens: v.iter().step_by(2).map(|&x| x as usize).collect(),
            tokens: v.iter().skip(1).step_by(2).map(|&x| x as usize).collect(),
        })
    }

    pub fn loss_tokens_total(&self) -> usize {
        self.loss_tokens.iter().sum()
    }

    pub fn tokens_total(&self) -> usize {
        self.tokens.iter().sum()
    }

    /// Training forward passes of the step (micro-batches with a loss token).
    pub fn forwards(&self) -> usize {
        self.loss_tokens.iter().filter(|&&n| n > 0).count()
    }

    /// Forward passes before micro-batch `g`: its dropout pass number within the step.
    pub fn forwards_before(&self, g: usize) -> usize {
        self.loss_tokens[..g].iter().filter(|&&n| n > 0).count()
    }
}

/// Add the ranks' gradients, in place, a bucket of at most `bucket` floats per all-reduce
/// (one tensor larger than a bucket goes alone). Tensors keep their shape and dtype.
pub fn all_reduce_grads(grads: &mut [Tensor], dist: &Dist, bucket: usize) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let mut start = 0;
    while start < grads.len() {
        let mut end = start;
        let mut n = 0;
        while end < grads.len() && (end == start || n + grads[end].elem_count() <= bucket) {
            n += grads[end].elem_count();
            end += 1;
        }
        let mut flat = Vec::with_capacity(n);
        for g in &grads[start..end] {
            flat.extend(
                g.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        dist.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for g in &mut grads[start..end] {
            let k = g.elem_count();
            let summed = Tensor::from_slice(&flat[at..at + k], g.shape(), g.device())?
                .to_dtype(g.dtype())?;
            *g = summed;
            at += k;
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_owns_a_contiguous_share_of_the_step() {
        // 2 ranks x grad_accum 3: micro-batches 0-2 on rank 0, 3-5 on rank 1.
        let owners: Vec<usize> = (0..6).map(|g| owner(g, 3)).collect();
        assert_eq!(owners, [0, 0, 0, 1, 1, 1]);
        // grad_accum 1: one each, in rank order.
        assert_eq!(
            (0..4).map(|g| owner(g, 1)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn counts_give_totals_and_dropout_pass_numbers() {
        let c = StepCounts {
            loss_tokens: vec![5, 0, 7, 2],
            tokens: vec![9, 4, 8, 3],
        };
        assert_eq!(c.loss_tokens_total(), 14);
        assert_eq!(c.tokens_total(), 24);
        // The empty micro-batch runs no forward pass, as in one process.
        assert_eq!(c.forwards(), 3);
        assert_eq!(
            (0..4).map(|g| c.forwards_before(g)).collect::<Vec<_>>(),
            [0, 1, 1, 2]
        );
    }

    #[test]
    fn one_rank_needs_no_exchange() {
        let d = Dist::default();
        let dev = candle_core::Device::Cpu;
        let mut g = vec![Tensor::new(&[1.0f32, 2.0], &dev).unwrap()];
        all_reduce_grads(&mut g, &d, 1).unwrap();
        assert_eq!(g[0].to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        let c = StepCounts::exchange(&[], 2, &d).unwrap();
        assert_eq!(c.loss_tokens, [0, 0]);
    }
}
