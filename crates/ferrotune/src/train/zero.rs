//! ZeRO stages 1 and 2 (`train.distributed = "zero1" | "zero2"`): what a rank does beyond DDP.
//!
//! Every trainable tensor has one owner rank ([`Partition`]: whole tensors, largest first to
//! the least-loaded rank, as PyTorch's `ZeroRedundancyOptimizer` partitions parameters). A
//! rank's optimizer holds state for its own tensors only, so optimizer memory per rank falls
//! with the number of ranks (AdamW: 8 bytes per parameter, divided by the world size).
//!
//! - **ZeRO-1**: gradients are all-reduced as in DDP (every rank holds them all), clipped by
//!   the same global norm, each rank updates its own tensors, then each tensor is broadcast
//!   from its owner ([`sync_params`]). The arithmetic is DDP's, element for element: the
//!   weights equal DDP's bit for bit.
//! - **ZeRO-2**: each gradient is summed onto its owner only ([`reduce_grads`]: one `reduce`
//!   per bucket of an owner's tensors), and the other ranks drop theirs before the update; the
//!   global norm is the sum of the per-tensor squared norms, added in the same order as one
//!   process adds them ([`global_norm_sharded`]), so clipping is exact too.
//!
//! Whole tensors (not equal slices of one flat buffer, as DeepSpeed does) keep every optimizer
//! unchanged, Adafactor's factored moments included, and keep checkpoint shards readable by
//! name: a run resumes from them at any world size (`optim::StateReader`).
//!
//! Gradients still exist in full at the end of a backward pass (candle's backward returns them
//! all at once), so ZeRO-2 lowers the memory of the update and of gradient accumulation, not
//! the peak of the backward pass itself. ZeRO-3 (parameters sharded) is not implemented.
use crate::dist::Dist;
use crate::Result;
use candle_core::{DType, Tensor, Var};

/// Floats per reduce or broadcast (as DDP's buckets).
pub const BUCKET_FLOATS: usize = super::distributed::BUCKET_FLOATS;

/// Which rank owns each trainable tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    owner: Vec<usize>,
    rank: usize,
    world: usize,
}

impl Partition {
    /// Tensors of `sizes` elements over `world` ranks: largest first, each to the rank with
    /// the fewest elements so far (ties: the lower rank; equal sizes: the lower index first),
    /// so every rank computes the same partition.
    pub fn new(sizes: &[usize], world: usize, rank: usize) -> Self {
        let world = world.max(1);
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
        let mut load = vec![0usize; world];
        let mut owner = vec![0; sizes.len()];
        for i in order {
            let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            owner[i] = r;
            load[r] += sizes[i];
        }
        Partition { owner, rank, world }
    }

    pub fn owner(&self, i: usize) -> usize {
        self.owner[i]
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn is_mine(&self, i: usize) -> bool {
        self.owner[i] == self.rank
    }

    /// This rank's tensors, in index order.
    pub fn mine(&self) -> Vec<usize> {
        (0..self.owner.len()).filter(|&i| self.is_mine(i)).collect()
    }

    /// Buckets of at most `bucket` floats (a larger tensor alone), each of one owner's tensors
    /// in index order, owners in rank order: the same sequence of collectives on every rank.
    fn buckets(&self, sizes: &[usize], bucket: usize) -> Vec<(usize, Vec<usize>)> {
        let all: Vec<usize> = (0..self.owner.len()).collect();
        self.buckets_among(&all, sizes, bucket)
    }

    /// [`Self::buckets`] of the tensors in `idx` only (ZeRO-3 gathers and reduces one layer's).
    pub(super) fn buckets_among(
        &self,
        idx: &[usize],
        sizes: &[usize],
        bucket: usize,
    ) -> Vec<(usize, Vec<usize>)> {
        let mut out = Vec::new();
        for r in 0..self.world {
            let mut cur: Vec<usize> = Vec::new();
            let mut n = 0;
            for &i in idx.iter().filter(|&&i| self.owner[i] == r) {
                if !cur.is_empty() && n + sizes[i] > bucket {
                    out.push((r, std::mem::take(&mut cur)));
                    n = 0;
                }
                cur.push(i);
                n += sizes[i];
            }
            if !cur.is_empty() {
                out.push((r, cur));
            }
        }
        out
    }
}

/// The tensors' values as f32, one after the other.
pub(super) fn flatten(ts: &[&Tensor]) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(ts.iter().map(|t| t.elem_count()).sum());
    for t in ts {
        flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// ZeRO-2: sum each gradient over the ranks onto its owner. Afterwards `grads[i]` holds the
/// summed gradient where this rank owns tensor `i`, and an empty placeholder elsewhere (the
/// rank's own copy is dropped).
pub fn reduce_grads(grads: &mut [Tensor], part: &Partition, dist: &Dist) -> Result<()> {
    let sizes: Vec<usize> = grads.iter().map(|g| g.elem_count()).collect();
    for (root, idx) in part.buckets(&sizes, BUCKET_FLOATS) {
        let mut flat = flatten(&idx.iter().map(|&i| &grads[i]).collect::<Vec<_>>())?;
        dist.reduce_sum(&mut flat, root)?;
        let mut at = 0;
        for &i in &idx {
            let g = &grads[i];
            let k = g.elem_count();
            grads[i] = if root == dist.rank() {
                Tensor::from_slice(&flat[at..at + k], g.shape(), g.device())?.to_dtype(g.dtype())?
            } else {
                Tensor::zeros(0, g.dtype(), g.device())?
            };
            at += k;
        }
    }
    Ok(())
}

/// The global gradient norm from the gradients this rank owns: each tensor's squared norm is
/// computed by its owner exactly as [`super::optim::global_norm`] computes it, the per-tensor
/// values are exchanged (adding zeros is exact), and they are summed in index order, so the
/// norm is the one a single process gets, bit for bit.
pub fn global_norm_sharded(grads: &[Tensor], part: &Partition, dist: &Dist) -> Result<f64> {
    let mut sq = vec![0.0f64; grads.len()];
    for (i, g) in grads.iter().enumerate() {
        if part.is_mine(i) {
            sq[i] = g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    dist.all_reduce_sum_f64(&mut sq)?;
    let mut sum = 0.0f64;
    for v in sq {
        sum += v;
    }
    Ok(sum.sqrt())
}

/// [`super::optim::clip_grad_norm`] for ZeRO-2: the norm over all ranks' gradients, and this
/// rank's own gradients scaled by torch's factor when it is below 1.
pub fn clip_grad_norm_sharded(
    grads: &mut [Tensor],
    part: &Partition,
    dist: &Dist,
    max_norm: f64,
) -> Result<f64> {
    let norm = global_norm_sharded(grads, part, dist)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for (i, g) in grads.iter_mut().enumerate() {
                if part.is_mine(i) {
                    *g = (&*g * coef)?;
                }
            }
        }
    }
    Ok(norm)
}

/// After each rank updated its own tensors: every tensor broadcast from its owner, so every
/// rank again holds the whole model.
pub fn sync_params(params: &[(String, Var)], part: &Partition, dist: &Dist) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
    for (root, idx) in part.buckets(&sizes, BUCKET_FLOATS) {
        let mut flat = if root == dist.rank() {
            flatten(
                &idx.iter()
                    .map(|&i| params[i].1.as_tensor())
                    .collect::<Vec<_>>(),
            )?
        } else {
            vec![0.0f32; idx.iter().map(|&i| sizes[i]).sum()]
        };
        dist.broadcast(&mut flat, root)?;
        if root == dist.rank() {
            continue;
        }
        let mut at = 0;
        for &i in &idx {
            let v = &params[i].1;
            let k = sizes[i];
            let t = Tensor::from_slice(&flat[at..at + k], v.shape(), v.device())?
                .to_dtype(v.dtype())?;
            v.set(&t)?;
            at += k;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_balances_whole_tensors_the_same_way_on_every_rank() {
        let sizes = [100, 10, 60, 50, 10, 5];
        let p0 = Partition::new(&sizes, 2, 0);
        let p1 = Partition::new(&sizes, 2, 1);
        // largest first to the least loaded: 100 -> 0, 60 -> 1, 50 -> 1, 10 (index 1) -> 0,
        // 10 (index 4) -> 0 (110 vs 110: the lower rank), 5 -> 1
        let owners: Vec<usize> = (0..sizes.len()).map(|i| p0.owner(i)).collect();
        assert_eq!(owners, [0, 0, 1, 1, 0, 1]);
        assert_eq!(
            owners,
            (0..sizes.len()).map(|i| p1.owner(i)).collect::<Vec<_>>()
        );
        assert_eq!(p0.mine(), [0, 1, 4]);
        assert_eq!(p1.mine(), [2, 3, 5]);
        // One rank owns everything.
        assert_eq!(Partition::new(&sizes, 1, 0).mine(), [0, 1, 2, 3, 4, 5]);
        // Buckets: one owner's tensors in index order, split at the bucket size.
        assert_eq!(
            p0.buckets(&sizes, 105),
            [(0, vec![0]), (0, vec![1, 4]), (1, vec![2]), (1, vec![3, 5])]
        );
    }

    #[test]
    fn one_rank_changes_nothing_and_the_sharded_norm_is_the_global_norm() {
        let d = Dist::default();
        let dev = candle_core::Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32, 4.0], &dev).unwrap(),
            Tensor::new(&[[1.0f32, 2.0], [2.0, 0.5]], &dev).unwrap(),
        ];
        let part = Partition::new(&[2, 4], 1, 0);
        reduce_grads(&mut g, &part, &d).unwrap();
        assert_eq!(g[0].to_vec1::<f32>().unwrap(), [3.0, 4.0]);
        let n = global_norm_sharded(&g, &part, &d).unwrap();
        assert_eq!(n, super::super::optim::global_norm(&g).unwrap());
        let mut c = g.clone();
        let mut c2 = g.clone();
        clip_grad_norm_sharded(&mut c, &part, &d, 1.0).unwrap();
        super::super::optim::clip_grad_norm(&mut c2, 1.0).unwrap();
        for (a, b) in c.iter().zip(&c2) {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b);
        }
    }
}
