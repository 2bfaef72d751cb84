//! Gradient communication overlapped with the backward pass (`train.overlap_comm`, DDP and
//! ZeRO-1 / ZeRO-2 on the LLaMA family), as PyTorch DDP's bucket hooks and DeepSpeed's
//! `overlap_comm` do.
//!
//! The step's last micro-batch runs its backward pass layer by layer (the layer walk of
//! `train::checkpointing`, with or without recomputation). When layer `i`'s backward pass is
//! done its parameters' gradients are final, so their buckets go to a thread of their own that
//! adds them across the ranks (all-reduce; ZeRO-2: reduce onto each tensor's owner) while the
//! training thread differentiates layer `i - 1`. At the end of the backward pass the rest (the
//! embeddings, the final norm, the head: a tied embedding is only final after the embedding
//! lookup's backward pass) is sent, and the training thread waits for the thread to finish.
//!
//! Every rank issues the same collectives in the same order whatever happened on it: the
//! buckets are a fixed plan ([`BucketPlan`]: layers last to first, then the parameters outside
//! the layers; each layer's tensors in buckets of at most `BUCKET_FLOATS`, of one owner under
//! ZeRO-2), and a rank that ran no layer walk (no micro-batch with a loss token) sends every
//! bucket at the end. Only the communication thread calls collectives while it runs, so the
//! watchdog still watches one collective at a time; the sums are the ones the non-overlapped
//! path computes (the same values added, in buckets of other sizes).
use super::zero::Partition;
use crate::dist::Dist;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// One collective of the plan: these tensors, summed onto every rank (`root` `None`) or onto
/// `root` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// The decoder layer whose backward pass makes these gradients final; `None`: the end of
    /// the backward pass.
    pub layer: Option<usize>,
    pub root: Option<usize>,
    pub params: Vec<usize>,
}

/// The step's gradient collectives, in the order every rank issues them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Bucket>,
    /// Each parameter's shape.
    shapes: Vec<candle_core::Shape>,
}

impl BucketPlan {
    /// The plan for parameters `names` of `shapes` in a model of `n_layers` decoder layers:
    /// all-reduce buckets, or with `owners` (ZeRO-2) reduce buckets of one owner each.
    pub fn new(
        names: &[String],
        shapes: &[candle_core::Shape],
        n_layers: usize,
        owners: Option<&Partition>,
        bucket_floats: usize,
    ) -> Self {
        let sizes: Vec<usize> = shapes.iter().map(|s| s.elem_count()).collect();
        let sizes = &sizes[..];
        let layer_of: Vec<Option<usize>> = names
            .iter()
            .map(|n| super::zero3::layer_index(n).filter(|&l| l < n_layers))
            .collect();
        let mut buckets = Vec::new();
        let groups = (0..n_layers).rev().map(Some).chain([None]);
        for layer in groups {
            let idx: Vec<usize> = (0..names.len()).filter(|&i| layer_of[i] == layer).collect();
            if idx.is_empty() {
                continue;
            }
            let split: Vec<(Option<usize>, Vec<usize>)> = match owners {
                Some(part) => part
                    .buckets_among(&idx, sizes, bucket_floats)
                    .into_iter()
                    .map(|(r, b)| (Some(r), b))
                    .collect(),
                None => chunk(&idx, sizes, bucket_floats)
                    .into_iter()
                    .map(|b| (None, b))
                    .collect(),
            };
            buckets.extend(split.into_iter().map(|(root, params)| Bucket {
                layer,
                root,
                params,
            }));
        }
        BucketPlan {
            buckets,
            shapes: shapes.to_vec(),
        }
    }
}

/// `idx` in order, cut into runs of at most `bucket` elements (a larger tensor alone).
fn chunk(idx: &[usize], sizes: &[usize], bucket: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut n = 0;
    for &i in idx {
        if !cur.is_empty() && n + sizes[i] > bucket {
            out.push(std::mem::take(&mut cur));
            n = 0;
        }
        cur.push(i);
        n += sizes[i];
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A bucket's gradients on their way to the communication thread: the accumulated
/// micro-batches' and this micro-batch's, added there.
struct Job {
    bucket: usize,
    tensors: Vec<(Option<Tensor>, Option<Tensor>)>,
}

/// What the communication thread did.
struct Reduced {
    /// Each bucket's summed values, by bucket index.
    sums: Vec<Option<Vec<f32>>>,
    /// Seconds inside its collectives.
    comm_s: f64,
}

/// The communication thread of one step (see the module docs). Dropping it without
/// [`Self::finish`] (the step failed) leaves the thread to end on its own: the caller ends the
/// job, and a rank must not wait for a collective the others will never join.
///
/// The gradients a bucket sends are moved out of the caller's lists (an empty tensor marks
/// them), so the thread's flat copy replaces them instead of doubling them: the step holds
/// one copy of the gradients plus the buckets in flight, as without overlap.
pub struct Reducer {
    plan: Arc<BucketPlan>,
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<Result<Reduced>>>,
    sent: Vec<bool>,
}

/// What the step's communication cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct OverlapTimes {
    /// Seconds the communication thread spent in collectives (overlapped or not).
    pub comm_s: f64,
    /// Seconds the training thread waited for it after the backward pass.
    pub wait_s: f64,
}

/// Marks a gradient that went to the communication thread.
fn sent_marker(g: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros(0, g.dtype(), g.device())?)
}

impl Reducer {
    /// Start the thread for one step.
    pub fn start(dist: &Dist, plan: Arc<BucketPlan>) -> Result<Self> {
        let (tx, rx) = channel::<Job>();
        let (dist, thread_plan) = (dist.clone(), plan.clone());
        let thread = std::thread::Builder::new()
            .name("ferrotune-grad-comm".into())
            .spawn(move || communicate(&dist, &thread_plan, rx))
            .map_err(|e| {
                Error::msg(format!(
                    "cannot start the gradient communication thread: {e}"
                ))
            })?;
        Ok(Reducer {
            sent: vec![false; plan.buckets.len()],
            plan,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Layer `layer`'s backward pass of the step's last micro-batch is done: send its buckets.
    /// `acc`: the earlier micro-batches' summed gradients; `mb`: this micro-batch's so far. The
    /// sent gradients are taken: `acc` left `None`, `mb` an empty marker (a gradient that is
    /// missing stays missing, for the caller's check).
    pub fn layer_done(
        &mut self,
        layer: usize,
        acc: &mut [Option<Tensor>],
        mb: &mut [Option<Tensor>],
    ) -> Result<()> {
        self.check_len(acc.len())?;
        self.check_len(mb.len())?;
        self.send_where(
            |b| b.layer == Some(layer),
            |i| {
                let m = match &mb[i] {
                    Some(g) => mb[i].replace(sent_marker(g)?),
                    None => None,
                };
                Ok((acc[i].take(), m))
            },
        )
    }

    /// The backward pass is over: send what is left of `grads`, wait for every sum and put
    /// them in `grads` (ZeRO-2: the summed gradient where this rank owns the tensor, an empty
    /// placeholder elsewhere, as `zero::reduce_grads` leaves them).
    pub fn finish(mut self, grads: &mut [Tensor], rank: usize) -> Result<OverlapTimes> {
        self.check_len(grads.len())?;
        let shapes: Vec<candle_core::Shape> = self.plan.shapes.clone();
        let kinds: Vec<(DType, candle_core::Device)> = grads
            .iter()
            .map(|g| (g.dtype(), g.device().clone()))
            .collect();
        self.send_where(
            |_| true,
            |i| {
                let marker = sent_marker(&grads[i])?;
                Ok((Some(std::mem::replace(&mut grads[i], marker)), None))
            },
        )?;
        drop(self.tx.take());
        let t0 = Instant::now();
        let reduced = self
            .thread
            .take()
            .ok_or_else(ended_early)?
            .join()
            .map_err(|_| Error::msg("the gradient communication thread panicked"))??;
        for (b, sums) in self.plan.buckets.iter().zip(reduced.sums) {
            let flat = sums.ok_or_else(|| Error::msg("a gradient bucket was not reduced"))?;
            let mut at = 0;
            for &i in &b.params {
                let (dtype, device) = &kinds[i];
                let k = shapes[i].elem_count();
                grads[i] = if b.root.is_none_or(|r| r == rank) {
                    let part = flat
                        .get(at..at + k)
                        .ok_or_else(|| Error::msg("a reduced gradient bucket came back short"))?;
                    Tensor::from_slice(part, &shapes[i], device)?.to_dtype(*dtype)?
                } else {
                    Tensor::zeros(0, *dtype, device)?
                };
                at += k;
            }
        }
        Ok(OverlapTimes {
            comm_s: reduced.comm_s,
            wait_s: t0.elapsed().as_secs_f64(),
        })
    }

    /// Send the not yet sent buckets that `pick` selects, in plan order, each parameter's
    /// tensors from `take`.
    fn send_where(
        &mut self,
        pick: impl Fn(&Bucket) -> bool,
        mut take: impl FnMut(usize) -> Result<(Option<Tensor>, Option<Tensor>)>,
    ) -> Result<()> {
        for (k, b) in self.plan.buckets.iter().enumerate() {
            if self.sent[k] || !pick(b) {
                continue;
            }
            let tensors = b
                .params
                .iter()
                .map(|&i| take(i))
                .collect::<Result<Vec<_>>>()?;
            let sent = self
                .tx
                .as_ref()
                .is_some_and(|tx| tx.send(Job { bucket: k, tensors }).is_ok());
            if !sent {
                // The thread ended early: its error comes out of the join.
                return self.thread_error();
            }
            self.sent[k] = true;
        }
        Ok(())
    }

    fn thread_error(&mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => Err(e),
            _ => Err(ended_early()),
        }
    }

    /// The gradients handed in are one per parameter of the plan.
    fn check_len(&self, n: usize) -> Result<()> {
        if n == self.plan.shapes.len() {
            return Ok(());
        }
        Err(Error::msg(format!(
            "overlap: {n} gradients for a plan of {} parameters",
            self.plan.shapes.len()
        )))
    }
}

fn ended_early() -> Error {
    Error::msg("the gradient communication thread ended early")
}

/// The communication thread: every bucket in plan order, each as it arrives.
fn communicate(dist: &Dist, plan: &BucketPlan, rx: Receiver<Job>) -> Result<Reduced> {
    dist.prepare_thread()?;
    let mut sums: Vec<Option<Vec<f32>>> = vec![None; plan.buckets.len()];
    let mut comm_s = 0.0;
    for (next, job) in rx.iter().enumerate() {
        if job.bucket != next {
            return Err(Error::msg(format!(
                "gradient bucket {} sent out of order (expected {next})",
                job.bucket
            )));
        }
        let b = &plan.buckets[job.bucket];
        let n: usize = b.params.iter().map(|&i| plan.shapes[i].elem_count()).sum();
        let mut flat = Vec::with_capacity(n);
        for (&i, (acc, mb)) in b.params.iter().zip(job.tensors) {
            let g = match (acc, mb) {
                (Some(a), Some(m)) => Some((a + m)?),
                (a, m) => a.or(m),
            };
            match g {
                Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                // No micro-batch of this rank touched it: it adds nothing.
                None => flat.resize(flat.len() + plan.shapes[i].elem_count(), 0.0),
            }
        }
        if flat.len() != n {
            return Err(Error::msg(format!(
                "gradient bucket {}: {} values for {n} elements",
                job.bucket,
                flat.len()
            )));
        }
        let t0 = Instant::now();
        match b.root {
            None => dist.all_reduce_sum_background(&mut flat)?,
            Some(root) => dist.reduce_sum_background(&mut flat, root)?,
        }
        comm_s += t0.elapsed().as_secs_f64();
        // ZeRO-2: only the owner keeps the sum.
        if b.root.is_some_and(|r| r != dist.rank()) {
            flat = Vec::new();
        }
        sums[job.bucket] = Some(flat);
    }
    Ok(Reduced { sums, comm_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(sizes: &[usize]) -> Vec<candle_core::Shape> {
        sizes.iter().map(|&n| candle_core::Shape::from(n)).collect()
    }

    fn names() -> Vec<String> {
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.norm.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn the_plan_goes_from_the_last_layer_to_the_first_then_the_rest() {
        let sizes = [100, 10, 20, 10, 20, 4];
        let p = BucketPlan::new(&names(), &shapes(&sizes), 2, None, 1000);
        let got: Vec<(Option<usize>, Vec<usize>)> = p
            .buckets
            .iter()
            .map(|b| (b.layer, b.params.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (Some(1), vec![3, 4]),
                (Some(0), vec![1, 2]),
                (None, vec![0, 5])
            ]
        );
        assert!(p.buckets.iter().all(|b| b.root.is_none()));
        // Small buckets split a layer; every parameter is in exactly one bucket.
        let p = BucketPlan::new(&names(), &shapes(&sizes), 2, None, 15);
        let mut all: Vec<usize> = p.buckets.iter().flat_map(|b| b.params.clone()).collect();
        assert_eq!(p.buckets.len(), 6);
        all.sort();
        assert_eq!(all, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn zero2_buckets_hold_one_owner_each() {
        let sizes = [100, 10, 20, 10, 20, 4];
        let part = Partition::new(&sizes, 2, 0);
        let p = BucketPlan::new(&names(), &shapes(&sizes), 2, Some(&part), 1000);
        for b in &p.buckets {
            let r = b.root.expect("a reduce root");
            assert!(b.params.iter().all(|&i| part.owner(i) == r), "{b:?}");
        }
        let mut all: Vec<usize> = p.buckets.iter().flat_map(|b| b.params.clone()).collect();
        all.sort();
        assert_eq!(all, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn gradients_of_another_length_than_the_plan_are_an_error() {
        let dev = candle_core::Device::Cpu;
        let plan = Arc::new(BucketPlan::new(
            &names(),
            &shapes(&[3, 2, 2, 2, 2, 1]),
            2,
            None,
            1000,
        ));
        let dist = Dist::default();
        let mut r = Reducer::start(&dist, plan.clone()).unwrap();
        let (mut acc, mut mb) = (vec![None; 5], vec![None; 6]);
        let e = r.layer_done(1, &mut acc, &mut mb).unwrap_err();
        assert!(e.to_string().contains("5 gradients for a plan of 6"), "{e}");
        let r = Reducer::start(&dist, plan).unwrap();
        let mut short = vec![Tensor::zeros(3, DType::F32, &dev).unwrap()];
        let e = r.finish(&mut short, 0).unwrap_err();
        assert!(e.to_string().contains("1 gradients for a plan of 6"), "{e}");
    }

    #[test]
    fn one_rank_gets_its_own_gradients_back_whenever_they_were_sent() {
        // One process: the collectives are the identity, so what comes back is what was
        // sent, accumulated and this micro-batch's added, whether a layer sent it early or
        // the end did.
        let dev = candle_core::Device::Cpu;
        let sizes = [3, 2, 2, 2, 2, 1];
        let plan = Arc::new(BucketPlan::new(&names(), &shapes(&sizes), 2, None, 1000));
        let dist = Dist::default();
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
        let mut acc = vec![
            Some(t(&[1.0, 2.0, 3.0])),
            None,
            Some(t(&[1.0, 1.0])),
            None,
            None,
            None,
        ];
        let mut mb = vec![
            None,
            Some(t(&[0.5, 0.5])),
            Some(t(&[2.0, 2.0])),
            Some(t(&[4.0, 5.0])),
            None,
            None,
        ];
        let mut r = Reducer::start(&dist, plan).unwrap();
        r.layer_done(1, &mut acc, &mut mb).unwrap();
        r.layer_done(0, &mut acc, &mut mb).unwrap();
        // What was sent was taken: the accumulated ones dropped, this micro-batch's marked.
        for i in 1..5 {
            assert!(acc[i].is_none(), "{i}");
            assert!(mb[i].as_ref().is_none_or(|m| m.elem_count() == 0), "{i}");
        }
        assert!(mb[4].is_none(), "a missing gradient stays missing");
        assert!(acc[0].is_some());
        // The layers' buckets were sent by the walk: what `finish` is given for them is not
        // sent again (here deliberately wrong); the rest is.
        let mut grads = vec![
            t(&[1.0, 2.0, 3.0]),
            t(&[-1.0, -1.0]),
            t(&[-1.0, -1.0]),
            t(&[-1.0, -1.0]),
            t(&[-1.0, -1.0]),
            t(&[7.0]),
        ];
        let times = r.finish(&mut grads, 0).unwrap();
        let got: Vec<Vec<f32>> = grads.iter().map(|g| g.to_vec1().unwrap()).collect();
        assert_eq!(
            got,
            [
                vec![1.0, 2.0, 3.0],
                vec![0.5, 0.5],
                vec![3.0, 3.0],
                vec![4.0, 5.0],
                vec![0.0, 0.0],
                vec![7.0]
            ]
        );
        assert!(times.comm_s >= 0.0 && times.wait_s >= 0.0);
    }
}
