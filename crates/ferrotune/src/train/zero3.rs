//! ZeRO-3 / FSDP full shard (`train.distributed = "zero3"`), for the LLaMA family: the
//! parameters themselves are sharded. Beyond ZeRO-2 ([`super::zero`]):
//!
//! - **Between steps** a rank holds only the model weights it owns ([`Partition`]: whole
//!   tensors); the model's slot of every other trainable weight holds an empty placeholder
//!   (`Llama::set_parameter`), and so do the run's parameter list and the tuner's.
//! - **In a micro-batch** ([`Zero3::loss_and_grads`]) the decoder layers are walked as
//!   activation checkpointing walks them (`super::checkpointing`), one layer's weights present
//!   at a time: before a layer runs (forward, then again for its recomputation and backward)
//!   its weights are broadcast from their owners and installed as fresh variables; after its
//!   backward its gradients are summed onto their owners (`reduce`) and the gathered copies are
//!   dropped. The outer weights (embeddings, final norm, an untied head) are gathered for the
//!   forward pass and dropped after the head's backward (the embeddings' gradient needs no
//!   weight).
//! - **The step**: each gradient now lives on its owner only, so clipping and the update are
//!   ZeRO-2's; only tensors that are not model weights (adapters: LoRA's A and B) are
//!   replicated and broadcast from their owners after the update.
//!
//! A micro-batch without loss tokens runs no forward pass, but its rank still takes part in
//! every gather and reduce (with zero gradients): all ranks call the same collectives in the
//! same order. In one process (one owner of everything) this is exactly the checkpointed run.
//!
//! A PEFT method's frozen base is sharded the same way (`Llama::set_frozen_weight`; no
//! gradient to reduce), a quantized one too (FSDP + QLoRA): its weights travel as their own
//! blocks (`QuantWeight::to_bytes`) and are installed as they are. Validation walks the layers
//! too ([`Zero3::eval_loss`]); classification accuracy gathers the whole model on every rank
//! ([`Zero3::gather_all`]), as DeepSpeed's `GatheredParameters` does, and the end of the run
//! onto rank 0 only, which writes the files ([`Zero3::gather_all_on_root`]); a mid-run
//! checkpoint gathers the trained weights onto rank 0 only, one bucket at a time
//! ([`Zero3::gather_to_root`]).
//!
//! Loading: where the plan can be made from the file headers (a safetensors folder or a GGUF;
//! full fine-tuning of a causal LM, or a PEFT method that reads no base weight to start), a
//! rank loads the weights the others will own as placeholders ([`frozen_placeholders`],
//! [`trained_placeholders`], [`gguf_placeholders`]), so no rank holds the whole model while
//! it loads or trains.
use super::zero::{flatten, Partition, BUCKET_FLOATS};
use crate::data::Batch;
use crate::dist::background::{Background, Collective};
use crate::dist::Dist;
use crate::model::Llama;
use crate::nn::EmbeddingWeight;
use crate::{Error, Result};
use candle_core::{DType, Shape, Tensor, Var};
use std::time::Instant;

/// How the run's trainable tensors are sharded and grouped.
pub struct Zero3 {
    part: Partition,
    /// Whether tensor `i` is a model weight (held by its owner only); else it is replicated.
    sharded: Vec<bool>,
    /// The tensors of each decoder layer, and those outside every layer, in index order.
    layers: Vec<Vec<usize>>,
    outer: Vec<usize>,
    shapes: Vec<Shape>,
    dtypes: Vec<DType>,
    /// The model's frozen dense weights (a PEFT method's base), sharded the same way.
    frozen: FrozenShards,
    /// Whether every rank holds the whole model now (evaluation, the end of the run).
    gathered: bool,
    /// `train.overlap_comm`: gathers one layer ahead and reduces on a thread of their own.
    overlap: bool,
}

/// The frozen weights of the model (not trained, so no gradient or optimizer state):
/// each owned by one rank, gathered and dropped with their layer like the trained ones. A
/// quantized weight (QLoRA's NF4 base, a GGUF's blocks) travels as its own bytes
/// (`QuantWeight::to_bytes`), so the copy computes exactly what the owner's does.
struct FrozenShards {
    names: Vec<String>,
    shapes: Vec<Shape>,
    dtypes: Vec<DType>,
    part: Partition,
    layers: Vec<Vec<usize>>,
    outer: Vec<usize>,
    /// Bytes this rank's model holds for the weight now (a placeholder counts its dense size,
    /// as the memory estimate does).
    held: Vec<u64>,
    /// `Some(bytes)`: the weight is quantized and sent as that many bytes. Every rank must agree
    /// ([`Zero3::agree_on_frozen`]): a rank that loaded another's weight as a placeholder sees
    /// a dense weight where its owner holds a quantized one.
    wire: Vec<Option<usize>>,
    /// Whether this rank's model held the weight quantized when the plan was made (not a
    /// placeholder): its transposed backward copy then counts in the memory estimate.
    held_quantized: Vec<bool>,
}

impl FrozenShards {
    /// Bytes of a gathered copy.
    fn bytes(&self, k: usize) -> u64 {
        match self.wire[k] {
            Some(b) => b as u64,
            None => (self.shapes[k].elem_count() * self.dtypes[k].size_in_bytes()) as u64,
        }
    }

    /// f32 words the weight takes in a gather's buffer.
    fn words(&self, k: usize) -> usize {
        match self.wire[k] {
            Some(b) => b.div_ceil(4),
            None => self.shapes[k].elem_count(),
        }
    }
}

/// Which weights a step of the walk needs.
#[derive(Clone, Copy)]
enum Group {
    /// The embeddings, the final norm, an untied head.
    Outer,
    Layer(usize),
}

/// One micro-batch's loss and times.
#[derive(Debug, Default, Clone, Copy)]
pub struct MicroStats {
    pub loss_sum: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    /// With overlap: seconds the queue's thread spent in collectives, and seconds the training
    /// thread waited for them.
    pub comm_background_s: f64,
    pub comm_waited_s: f64,
}

/// The decoder layer a tensor belongs to: the number after a `layers` component of its name
/// (`model.layers.3.mlp.up_proj.weight`, `base_model.model.model.layers.3....lora_A.weight`).
pub fn layer_index(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// The walk keeps one input per layer (the embeddings first): one missing is a bug here.
/// `n` values of a gathered or reduced bucket from `at`: a bucket that came back shorter than
/// it was sent is an error, not a panic.
fn bucket_slice(flat: &[f32], at: usize, n: usize) -> Result<&[f32]> {
    flat.get(at..at + n)
        .ok_or_else(|| Error::msg("zero3: a bucket came back shorter than it was sent"))
}

fn no_input() -> Error {
    Error::msg("zero3: internal error: a layer's input is missing")
}

fn placeholder(dtype: DType, dev: &candle_core::Device) -> Result<Var> {
    crate::model::llama::empty_var(dtype, dev)
}

/// The frozen weights another rank will own, computed before the model loads from the names
/// and shapes in a safetensors folder's headers, so that they load as placeholders holding no
/// data (`LoadOptions::placeholders`) and no rank reads the whole model. This is the ownership
/// [`Zero3::new`] gives the frozen weights when the method trains none of the model's own
/// weights and the base is dense (the caller's conditions); [`Zero3::check_placeholders`]
/// confirms it once the plan is made. `None` when a weight is missing from the headers (the
/// load then reports it).
pub fn frozen_placeholders(
    dir: &std::path::Path,
    cfg: &crate::model::LlamaConfig,
    world: usize,
    rank: usize,
) -> Result<Option<std::collections::HashSet<String>>> {
    let names = Llama::weight_names_for(cfg, cfg.num_hidden_layers);
    others_in_headers(dir, names, world, rank)
}

/// [`frozen_placeholders`] for full fine-tuning: every weight is trained, and the plan shares
/// them out in the order `Llama::make_all_trainable` lists them, which is the order given here.
pub fn trained_placeholders(
    dir: &std::path::Path,
    cfg: &crate::model::LlamaConfig,
    world: usize,
    rank: usize,
) -> Result<Option<std::collections::HashSet<String>>> {
    let names = Llama::trainable_names_for(cfg, cfg.num_hidden_layers);
    others_in_headers(dir, names, world, rank)
}

/// [`frozen_placeholders`] (or with `trained`, [`trained_placeholders`]) of a GGUF file, from
/// its header: the weights other ranks own are then never read from it.
pub fn gguf_placeholders(
    path: &std::path::Path,
    trained: bool,
    world: usize,
    rank: usize,
) -> Result<Option<std::collections::HashSet<String>>> {
    let content = crate::model::read_gguf(path)?;
    let cfg = crate::model::config_from_gguf(&content, path)?;
    let src = crate::model::GgufSource::open(
        path,
        content,
        None,
        &crate::model::LoadOptions::default(),
        &candle_core::Device::Cpu,
    )?;
    let names = if trained {
        Llama::trainable_names_for(&cfg, cfg.num_hidden_layers)
    } else {
        Llama::weight_names_for(&cfg, cfg.num_hidden_layers)
    };
    others_in_source(&src, names, world, rank)
}

/// The names of `names` (in plan order) that [`Partition`] gives to other ranks, sized from
/// the folder's headers; `None` when one is missing there.
fn others_in_headers(
    dir: &std::path::Path,
    names: Vec<String>,
    world: usize,
    rank: usize,
) -> Result<Option<std::collections::HashSet<String>>> {
    let src = crate::model::SafetensorsSource::open(
        dir,
        &crate::model::LoadOptions::default(),
        &candle_core::Device::Cpu,
    )?;
    others_in_source(&src, names, world, rank)
}

/// [`others_in_headers`] of any source: sizes from the stored shapes, no data read.
fn others_in_source(
    src: &dyn crate::model::WeightSource,
    names: Vec<String>,
    world: usize,
    rank: usize,
) -> Result<Option<std::collections::HashSet<String>>> {
    let mut sizes = Vec::with_capacity(names.len());
    for n in &names {
        match src.tensor_shape(n) {
            Some(shape) => sizes.push(shape.iter().product::<usize>()),
            None => return Ok(None),
        }
    }
    let part = Partition::new(&sizes, world, rank);
    Ok(Some(
        names
            .into_iter()
            .enumerate()
            .filter(|&(k, _)| !part.is_mine(k))
            .map(|(_, n)| n)
            .collect(),
    ))
}

/// The shape of parameter `name`: its variable's, or for the empty variable of a weight that
/// loaded as a placeholder (full fine-tuning under ZeRO-3, `Llama::make_all_trainable`), the
/// placeholder's in the model's slot.
pub fn param_shape(llama: &Llama, name: &str, var: &Var) -> Shape {
    if var.elem_count() == 0 {
        if let Some(t) = llama
            .dense_weight(name)
            .filter(crate::model::is_placeholder)
        {
            return t.shape().clone();
        }
    }
    var.shape().clone()
}

/// The value counts of `params` as [`param_shape`] gives them (what a ZeRO partition shares
/// out); a model other than LLaMA has no placeholders.
pub fn param_sizes(model: &dyn crate::model::Model, params: &[(String, Var)]) -> Vec<usize> {
    let llama = model.as_any().downcast_ref::<Llama>();
    params
        .iter()
        .map(|(n, v)| match llama {
            Some(l) => param_shape(l, n, v).elem_count(),
            None => v.elem_count(),
        })
        .collect()
}

impl Zero3 {
    /// Every weight loaded as a placeholder must be one another rank owns, frozen or trained
    /// (its owner gathers it before use), and every trained weight this rank owns must have
    /// its values; anything else would train or run on a weight with no data.
    pub fn check_placeholders(
        &self,
        placeholders: &std::collections::HashSet<String>,
        params: &[(String, Var)],
    ) -> Result<()> {
        let f = &self.frozen;
        let internal = |name: &str| {
            Error::msg(format!(
                "zero3: internal error: `{name}` was loaded without its data but this rank needs it; set train.distributed = \"zero2\" and report this"
            ))
        };
        for name in placeholders {
            let frozen_other = f
                .names
                .iter()
                .position(|n| n == name)
                .is_some_and(|k| !f.part.is_mine(k));
            let trained_other = params
                .iter()
                .position(|(n, _)| n == name)
                .is_some_and(|i| !self.part.is_mine(i));
            if !frozen_other && !trained_other {
                return Err(internal(name));
            }
        }
        for i in self.part.mine() {
            let (Some((name, var)), Some(shape)) = (params.get(i), self.shapes.get(i)) else {
                continue;
            };
            if var.elem_count() == 0 && shape.elem_count() > 0 {
                return Err(internal(name));
            }
        }
        Ok(())
    }

    /// The plan for `params` of `llama` (every rank computes the same one).
    pub fn new(llama: &Llama, params: &[(String, Var)], part: Partition) -> Result<Self> {
        let n_layers = llama.layers.len();
        let mut layers = vec![Vec::new(); n_layers];
        let mut outer = Vec::new();
        let mut sharded = Vec::with_capacity(params.len());
        for (i, (name, _)) in params.iter().enumerate() {
            match layer_index(name) {
                Some(l) if l < n_layers => layers[l].push(i),
                Some(l) => {
                    return Err(Error::msg(format!(
                        "zero3: parameter `{name}` names layer {l} of a {n_layers}-layer model"
                    )))
                }
                None => outer.push(i),
            }
            sharded.push(is_model_weight(name));
        }
        // The model's other weights: frozen (a PEFT method's base, dense or quantized),
        // sharded too.
        let trained: std::collections::HashSet<&str> =
            params.iter().map(|(n, _)| n.as_str()).collect();
        let mut frozen = FrozenShards {
            names: Vec::new(),
            shapes: Vec::new(),
            dtypes: Vec::new(),
            part: Partition::new(&[], 1, 0),
            layers: vec![Vec::new(); n_layers],
            outer: Vec::new(),
            held: Vec::new(),
            wire: Vec::new(),
            held_quantized: Vec::new(),
        };
        for name in llama.weight_names() {
            if trained.contains(name.as_str()) {
                continue;
            }
            let (shape, dtype, held, quant) = if let Some(t) = llama.dense_weight(&name) {
                let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
                (t.shape().clone(), t.dtype(), bytes, None)
            } else if let Some(q) = llama.quantized_weight(&name) {
                let bytes = q.storage_bytes() as u64;
                (Shape::from(q.shape()), DType::F32, bytes, Some(q))
            } else {
                continue;
            };
            let k = frozen.names.len();
            match layer_index(&name) {
                Some(l) => frozen.layers[l].push(k),
                None => frozen.outer.push(k),
            }
            frozen.shapes.push(shape);
            frozen.dtypes.push(dtype);
            frozen.held.push(held);
            frozen.held_quantized.push(quant.is_some());
            frozen
                .wire
                .push(quant.map(|q| q.to_bytes().map(|b| b.len())).transpose()?);
            frozen.names.push(name);
        }
        // Ownership by parameter count, as `frozen_placeholders` computes it from the headers.
        let sizes: Vec<usize> = frozen.shapes.iter().map(|s| s.elem_count()).collect();
        frozen.part = Partition::new(&sizes, part.world(), part.rank());
        Ok(Zero3 {
            frozen,
            part,
            sharded,
            layers,
            outer,
            shapes: params
                .iter()
                .map(|(n, v)| param_shape(llama, n, v))
                .collect(),
            dtypes: params.iter().map(|(_, v)| v.dtype()).collect(),
            gathered: true,
            overlap: false,
        })
    }

    /// Every rank learns from each frozen weight's owner whether it is quantized and how many
    /// bytes it is sent as (a rank that loaded the weight as a placeholder cannot know). All
    /// ranks call this once, after [`Self::new`].
    pub fn agree_on_frozen(&mut self, dist: &Dist) -> Result<()> {
        if dist.world_size() < 2 {
            return Ok(());
        }
        let f = &mut self.frozen;
        // The owner's word: -bytes for a quantized weight, the value count for a dense one.
        let mut said: Vec<f64> = (0..f.names.len())
            .map(|k| match (f.part.is_mine(k), f.wire[k]) {
                (false, _) => 0.0,
                (true, Some(b)) => -(b as f64),
                (true, None) => f.shapes[k].elem_count() as f64,
            })
            .collect();
        dist.all_reduce_sum_f64(&mut said)?;
        for (k, &v) in said.iter().enumerate() {
            // A quantized weight is never larger than its f32 values plus its statistics and
            // header: a size past that is a broken rank, refused before a buffer is made.
            let most = 4.0 * f.shapes[k].elem_count() as f64 + 65536.0;
            if v < 0.0 && -v <= most {
                f.wire[k] = Some(-v as usize);
            } else if v > 0.0 && v as usize == f.shapes[k].elem_count() {
                f.wire[k] = None;
            } else {
                return Err(Error::msg(format!(
                    "zero3: the ranks disagree on the frozen weight `{}` ({} values here, its owner says {v})",
                    f.names[k],
                    f.shapes[k].elem_count()
                )));
            }
        }
        Ok(())
    }

    /// The fraction of the frozen weights' values this rank owns (what it reads when the
    /// others' load as placeholders).
    pub fn frozen_share_read(&self) -> f64 {
        let f = &self.frozen;
        let (mut mine, mut all) = (0usize, 0usize);
        for (k, s) in f.shapes.iter().enumerate() {
            all += s.elem_count();
            if f.part.is_mine(k) {
                mine += s.elem_count();
            }
        }
        if all == 0 {
            1.0
        } else {
            mine as f64 / all as f64
        }
    }

    /// Bytes of the transposed Q8_0 copies a quantized backward pass builds
    /// (`BackwardWeights::Q8Transposed`): those of the other ranks' weights this rank's model
    /// held when the plan was made (dropped with them), and the most held at once for gathered
    /// weights (the outer group and the largest layer, dropped with their copy).
    pub fn backward_copy_bytes(&self) -> (u64, u64) {
        let f = &self.frozen;
        let copy = |k: usize| -> u64 {
            let (out, inp) = match f.shapes[k].dims() {
                [o, i] => (*o, *i),
                _ => return 0,
            };
            if f.wire[k].is_none() || !out.is_multiple_of(32) {
                return 0;
            }
            (inp * (out / 32) * 34) as u64
        };
        let released = (0..f.names.len())
            .filter(|&k| f.held_quantized[k] && !f.part.is_mine(k))
            .map(copy)
            .sum();
        let others = |idx: &[usize]| -> u64 {
            idx.iter()
                .filter(|&&k| !f.part.is_mine(k))
                .map(|&k| copy(k))
                .sum()
        };
        let layer = f.layers.iter().map(|l| others(l)).max().unwrap_or(0);
        (released, others(&f.outer) + layer * self.layers_in_flight())
    }

    /// How many frozen weights are quantized (sent as their blocks).
    pub fn frozen_quantized_count(&self) -> usize {
        self.frozen.wire.iter().filter(|w| w.is_some()).count()
    }

    /// With `on`, a multi-rank walk prefetches the next layer's weights while a layer computes
    /// and reduces a layer's gradients while the next is differentiated, on a thread of their
    /// own (`train.overlap_comm`); the arithmetic is the same either way.
    pub fn with_overlap(mut self, on: bool) -> Self {
        self.overlap = on;
        self
    }

    /// Whether the walk overlaps its collectives with the computation.
    pub fn overlaps(&self) -> bool {
        self.overlap
    }

    /// How many frozen weights the plan shards (a PEFT method's dense base).
    pub fn frozen_count(&self) -> usize {
        self.frozen.names.len()
    }

    pub fn partition(&self) -> &Partition {
        &self.part
    }

    /// Whether tensor `i` is sharded (a model weight), not replicated.
    pub fn is_sharded(&self, i: usize) -> bool {
        self.sharded[i]
    }

    /// Whether any tensor is a model weight (full or selective fine-tuning), not only adapters.
    pub fn has_sharded(&self) -> bool {
        self.sharded.iter().any(|&s| s)
    }

    /// Whether every rank holds the whole model now.
    pub fn is_gathered(&self) -> bool {
        self.gathered
    }

    /// Bytes of model weights this rank drops (other ranks' trained and frozen weights).
    pub fn released_bytes(&self) -> u64 {
        let trained: u64 = (0..self.sharded.len())
            .filter(|&i| self.sharded[i] && !self.part.is_mine(i))
            .map(|i| self.param_bytes(i))
            .sum();
        let frozen: u64 = (0..self.frozen.names.len())
            .filter(|&k| !self.frozen.part.is_mine(k))
            .map(|k| self.frozen.held[k])
            .sum();
        trained + frozen
    }

    /// The most bytes of other ranks' weights this rank holds at once in a micro-batch: the
    /// outer group and the largest layer (two with overlap: the next one arrives while one
    /// runs).
    pub fn gathered_bytes(&self) -> u64 {
        let group = |g: Group| -> u64 {
            let (idx, fidx) = self.group(g);
            let t: u64 = idx
                .iter()
                .filter(|&&i| self.sharded[i] && !self.part.is_mine(i))
                .map(|&i| self.param_bytes(i))
                .sum();
            let f: u64 = fidx
                .iter()
                .filter(|&&k| !self.frozen.part.is_mine(k))
                .map(|&k| self.frozen.bytes(k))
                .sum();
            t + f
        };
        let layer = (0..self.layers.len())
            .map(|i| group(Group::Layer(i)))
            .max()
            .unwrap_or(0);
        group(Group::Outer) + layer * self.layers_in_flight()
    }

    /// Layers whose weights (or gradients) are held at once.
    fn layers_in_flight(&self) -> u64 {
        if self.overlap {
            2
        } else {
            1
        }
    }

    /// The most values of other ranks' trained tensors whose gradients this rank holds at once
    /// (before their reduce): the outer group's and the largest layer's.
    pub fn gathered_grad_values(&self) -> usize {
        let others = |idx: &[usize]| -> usize {
            idx.iter()
                .filter(|&&i| !self.part.is_mine(i))
                .map(|&i| self.shapes[i].elem_count())
                .sum()
        };
        let layer = self.layers.iter().map(|l| others(l)).max().unwrap_or(0);
        others(&self.outer) + layer * self.layers_in_flight() as usize
    }

    fn param_bytes(&self, i: usize) -> u64 {
        (self.shapes[i].elem_count() * self.dtypes[i].size_in_bytes()) as u64
    }

    /// The trained and the frozen tensors of a group.
    fn group(&self, g: Group) -> (&[usize], &[usize]) {
        match g {
            Group::Outer => (&self.outer, &self.frozen.outer),
            Group::Layer(i) => (&self.layers[i], &self.frozen.layers[i]),
        }
    }

    /// Drop the tensors other ranks own: a placeholder in the model's slot and in `params`.
    /// Returns the names released (the caller also drops any other copy it holds).
    pub fn release_all(
        &mut self,
        llama: &mut Llama,
        params: &mut [(String, Var)],
    ) -> Result<Vec<String>> {
        let all: Vec<usize> = (0..params.len()).collect();
        let mut live: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let names = self.release(llama, params, &all, &mut live)?;
        let frozen: Vec<usize> = (0..self.frozen.names.len()).collect();
        self.release_frozen(llama, &frozen)?;
        for &i in &all {
            if self.sharded[i] && !self.part.is_mine(i) {
                params[i].1 = live[i].clone();
            }
        }
        self.gathered = false;
        return_free_memory();
        Ok(names)
    }

    /// Every rank gathers every tensor (evaluation, the end of the run): installed in the
    /// model and put in `params`. Returns the new variables by index.
    pub fn gather_all(
        &mut self,
        llama: &mut Llama,
        params: &mut [(String, Var)],
        dist: &Dist,
    ) -> Result<Vec<(usize, Var)>> {
        let all: Vec<usize> = (0..params.len()).collect();
        let mut live: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let frozen: Vec<usize> = (0..self.frozen.names.len()).collect();
        let plan = self.gather_plan(&all, &frozen);
        self.gather_now(plan, llama, params, &mut live, dist)?;
        let mut out = Vec::new();
        for &i in &all {
            if self.sharded[i] && !self.part.is_mine(i) {
                params[i].1 = live[i].clone();
                out.push((i, live[i].clone()));
            }
        }
        self.gathered = true;
        Ok(out)
    }

    /// [`Self::gather_all`] onto rank 0 only (the end of the run: rank 0 writes the files):
    /// every rank sends its share, the others drop what they receive and stay sharded, as
    /// FSDP's `FULL_STATE_DICT` with `rank0_only`. Returns the new variables on rank 0.
    pub fn gather_all_on_root(
        &mut self,
        llama: &mut Llama,
        params: &mut [(String, Var)],
        dist: &Dist,
    ) -> Result<Vec<(usize, Var)>> {
        if !dist.is_root() {
            let all: Vec<usize> = (0..params.len()).collect();
            let frozen: Vec<usize> = (0..self.frozen.names.len()).collect();
            for job in self.gather_plan(&all, &frozen) {
                let mut flat = self.gather_buffer(&job, llama, params, dist)?;
                job.collective().run(dist, &mut flat, false)?;
            }
            return Ok(Vec::new());
        }
        self.gather_all(llama, params, dist)
    }

    /// Every tensor's value on rank 0 (`Some` there, `None` elsewhere), one bucket of an
    /// owner's tensors at a time: what a checkpoint writes.
    pub fn gather_to_root(
        &self,
        params: &[(String, Var)],
        dist: &Dist,
    ) -> Result<Option<Vec<(String, Tensor)>>> {
        let root = dist.is_root();
        let mut out: Vec<Option<Tensor>> = vec![None; params.len()];
        let idx: Vec<usize> = (0..params.len()).filter(|&i| self.sharded[i]).collect();
        for (owner, bucket) in self.buckets(&idx) {
            let mut flat = self.owner_buffer(params, &bucket, owner, dist)?;
            dist.broadcast(&mut flat, owner)?;
            if root {
                let mut at = 0;
                for &i in &bucket {
                    let k = self.shapes[i].elem_count();
                    out[i] = Some(self.tensor_from(bucket_slice(&flat, at, k)?, i, params)?);
                    at += k;
                }
            }
        }
        if !root {
            return Ok(None);
        }
        Ok(Some(
            params
                .iter()
                .zip(out)
                .map(|((n, v), t)| (n.clone(), t.unwrap_or_else(|| v.as_tensor().clone())))
                .collect(),
        ))
    }

    /// One micro-batch (`None`: this rank's micro-batch has no loss token; it only takes part
    /// in the collectives): the loss of `batch` and the gradients of `loss · scale`, summed
    /// onto each tensor's owner and added to its `grads[i]` there (f32 values in the tensor's
    /// element order; other ranks' entries stay as they are). See the module docs for the walk.
    ///
    /// Gradients are held as flat f32 buffers and added in place, so a tensor's gradient costs
    /// its size once, not once per contribution. The outer weights are dropped as soon as the
    /// head's backward pass is done: the embeddings' gradient (a scatter-add of the first
    /// layer's input gradient into their rows) needs no weight, and is added in the order
    /// autograd adds it, so one process gets exactly the checkpointed run's values.
    pub fn loss_and_grads(
        &self,
        llama: &mut Llama,
        params: &[(String, Var)],
        batch: Option<&Batch>,
        scale: f64,
        dist: &Dist,
        grads: &mut [Option<Vec<f32>>],
    ) -> Result<MicroStats> {
        if self.gathered {
            return Err(Error::msg(
                "zero3: a training pass needs the sharded model (the whole model is gathered)",
            ));
        }
        let t0 = Instant::now();
        let mut stats = MicroStats::default();
        // The variables the model holds now, by parameter index (what gradients are read by).
        let mut live: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        // This micro-batch's gradients on this rank, before the reduce.
        let mut local: Vec<Option<Grad>> = vec![None; params.len()];
        let collect = |store: &candle_core::backprop::GradStore,
                       live: &[Var],
                       local: &mut Vec<Option<Grad>>|
         -> Result<()> {
            for (i, var) in live.iter().enumerate() {
                if let Some(g) = store.get(var.as_tensor()) {
                    local[i] = Some(match local[i].take() {
                        None => Grad::Tensor(g.clone()),
                        Some(acc) => Grad::Flat(acc.add(g)?),
                    });
                }
            }
            Ok(())
        };
        // The walk's collectives, in this order on every rank. With overlap they go to a queue
        // with a thread of its own: each layer's gather one layer ahead (the next layer's
        // weights travel while this one computes), each reduce as soon as its layer's backward
        // pass is done. Without, each runs on this thread where it is needed.
        let mut w = match self.overlap && dist.world_size() > 1 {
            true => Some(Walk::new(Background::start(dist)?)),
            false => None,
        };
        let n_layers = llama.layers.len();
        let layer = |i: usize| Group::Layer(i);

        let mut next = None;
        if let Some(w) = w.as_mut() {
            let outer = self.gather_ahead(w, Group::Outer, llama, params, dist)?;
            if n_layers > 0 {
                next = Some(self.gather_ahead(w, layer(0), llama, params, dist)?);
            }
            self.wait_for(w, outer, llama, params, &mut live, grads, dist)?;
        } else {
            self.gather_group(llama, params, Group::Outer, &mut live, dist)?;
        }
        // Forward: keep each layer's input (as `checkpointing` does).
        let mut prepared = match batch {
            Some(b) => {
                let packed = b.segment_ids.as_ref().map(|seg| (&b.position_ids, seg));
                let ctx = llama.layer_context(&b.input_ids, packed)?;
                let e = llama.embed_tokens.forward(&b.input_ids)?;
                Some((b, ctx, vec![e]))
            }
            None => None,
        };
        let mut rng_states = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            if let Some(w) = w.as_mut() {
                let this = next.take().ok_or_else(no_input)?;
                // The next layer's weights; after the last layer, the last layer's again for
                // the backward pass (it starts there).
                let ahead = if i + 1 < n_layers { i + 1 } else { i };
                next = Some(self.gather_ahead(w, layer(ahead), llama, params, dist)?);
                self.wait_for(w, this, llama, params, &mut live, grads, dist)?;
            } else {
                self.gather_group(llama, params, layer(i), &mut live, dist)?;
            }
            if let Some((_, ctx, inputs)) = prepared.as_mut() {
                let before = llama.layer_rng_states(i);
                let x = inputs.last().ok_or_else(no_input)?.detach();
                let y = llama.run_layer(i, &x, ctx, true)?.detach();
                inputs.push(y);
                rng_states.push((before, llama.layer_rng_states(i)));
            }
            self.release_group(llama, params, layer(i), &mut live)?;
        }

        // The head, then the layers from the last one back: recompute, backpropagate, reduce.
        let mut g = None;
        let t1 = Instant::now();
        if let Some((b, _, inputs)) = prepared.as_mut() {
            let last = Var::from_tensor(&inputs.pop().ok_or_else(no_input)?)?;
            let hidden = llama.norm.forward(last.as_tensor())?;
            let (sum, _) = super::loss::loss_from_hidden(&llama.lm_head, &hidden, b, true)?;
            stats.loss_sum = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let store = (sum * scale)?.backward()?;
            collect(&store, &live, &mut local)?;
            g = Some(
                store
                    .get(last.as_tensor())
                    .ok_or_else(|| {
                        Error::msg("zero3: the loss has no gradient for the last layer")
                    })?
                    .detach(),
            );
        }
        let embeddings_trained =
            matches!(llama.embed_tokens.weight(), EmbeddingWeight::Trainable(_));
        let embed_index = params
            .iter()
            .position(|(n, _)| n == "model.embed_tokens.weight");
        self.release_group(llama, params, Group::Outer, &mut live)?;
        stats.forward_s = (t1 - t0).as_secs_f64();
        for i in (0..n_layers).rev() {
            if let Some(w) = w.as_mut() {
                let this = next.take().ok_or_else(no_input)?;
                if i > 0 {
                    next = Some(self.gather_ahead(w, layer(i - 1), llama, params, dist)?);
                }
                self.wait_for(w, this, llama, params, &mut live, grads, dist)?;
            } else {
                self.gather_group(llama, params, layer(i), &mut live, dist)?;
            }
            if let (Some((_, ctx, inputs)), Some(gy)) = (prepared.as_mut(), g.as_ref()) {
                let x = Var::from_tensor(&inputs.pop().ok_or_else(no_input)?)?;
                let (before, after) = rng_states.get(i).ok_or_else(no_input)?;
                llama.set_layer_rng_states(i, before);
                let y = llama.run_layer(i, x.as_tensor(), ctx, true)?;
                llama.set_layer_rng_states(i, after);
                let store = (y * gy)?.sum_all()?.backward()?;
                collect(&store, &live, &mut local)?;
                g = Some(
                    store
                        .get(x.as_tensor())
                        .ok_or_else(|| Error::msg(format!("zero3: layer {i} passes no gradient")))?
                        .detach(),
                );
            }
            let reduces = self.reduce_jobs(&self.layers[i], &mut local)?;
            match w.as_mut() {
                Some(w) => {
                    w.submit(reduces)?;
                }
                None => self.reduce_now(reduces, grads, dist)?,
            }
            self.release_group(llama, params, layer(i), &mut live)?;
        }
        // The embeddings' rows, when they are trained (full fine-tuning).
        if let (Some((b, _, _)), Some(gy), Some(e), true) = (
            prepared.as_ref(),
            g.as_ref(),
            embed_index,
            embeddings_trained,
        ) {
            let rows = scatter_rows(&b.input_ids, gy, &self.shapes[e])?;
            // The head's gradient (tied embeddings) plus the rows, summed into the rows'
            // buffer: addition commutes exactly, so this is autograd's `head + rows`.
            local[e] = Some(Grad::Flat(match local[e].take() {
                Some(head) => head.add_to(rows)?,
                None => rows,
            }));
        }
        let reduces = self.reduce_jobs(&self.outer, &mut local)?;
        match w.as_mut() {
            Some(w) => {
                let all = w.submit(reduces)?;
                self.wait_for(w, all, llama, params, &mut live, grads, dist)?;
                (stats.comm_background_s, stats.comm_waited_s) = w.queue.times();
            }
            None => self.reduce_now(reduces, grads, dist)?,
        }
        stats.backward_s = t1.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// The summed loss and loss tokens of `batch` (validation: no dropout, no graph), the layers
    /// walked with their weights gathered one at a time, as in training; `None` only takes
    /// part in the collectives. Returns `(0, 0)` then.
    pub fn eval_loss(
        &self,
        llama: &mut Llama,
        params: &[(String, Var)],
        batch: Option<&Batch>,
        dist: &Dist,
    ) -> Result<(f64, usize)> {
        if self.gathered {
            return Err(Error::msg(
                "zero3: the layer walk needs the sharded model (the whole model is gathered)",
            ));
        }
        let mut live: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        self.gather_group(llama, params, Group::Outer, &mut live, dist)?;
        let mut state = match batch {
            Some(b) => {
                let packed = b.segment_ids.as_ref().map(|seg| (&b.position_ids, seg));
                let ctx = llama.layer_context(&b.input_ids, packed)?;
                let x = llama.embed_tokens.forward(&b.input_ids)?.detach();
                Some((b, ctx, x))
            }
            None => None,
        };
        for i in 0..llama.layers.len() {
            self.gather_group(llama, params, Group::Layer(i), &mut live, dist)?;
            if let Some((_, ctx, x)) = state.as_mut() {
                *x = llama.run_layer(i, x, ctx, false)?.detach();
            }
            self.release_group(llama, params, Group::Layer(i), &mut live)?;
        }
        let out = match &state {
            Some((b, _, x)) => {
                let hidden = llama.norm.forward(x)?;
                let (sum, n) = super::loss::loss_from_hidden(&llama.lm_head, &hidden, b, false)?;
                (sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, n)
            }
            None => (0.0, 0),
        };
        self.release_group(llama, params, Group::Outer, &mut live)?;
        Ok(out)
    }

    /// After the update: each replicated tensor (an adapter's) broadcast from its owner.
    pub fn sync_replicated(&self, params: &[(String, Var)], dist: &Dist) -> Result<()> {
        if dist.world_size() == 1 {
            return Ok(());
        }
        let idx: Vec<usize> = (0..params.len()).filter(|&i| !self.sharded[i]).collect();
        for (owner, bucket) in self.buckets(&idx) {
            let mut flat = self.owner_buffer(params, &bucket, owner, dist)?;
            dist.broadcast(&mut flat, owner)?;
            if owner == dist.rank() {
                continue;
            }
            let mut at = 0;
            for &i in &bucket {
                let k = self.shapes[i].elem_count();
                params[i]
                    .1
                    .set(&self.tensor_from(bucket_slice(&flat, at, k)?, i, params)?)?;
                at += k;
            }
        }
        Ok(())
    }

    // ---- the collectives of a group of tensors ------------------------------------------------

    /// Buckets of at most [`BUCKET_FLOATS`] of one owner's tensors among `idx`, owners in rank
    /// order, tensors in index order: the same sequence on every rank.
    fn buckets(&self, idx: &[usize]) -> Vec<(usize, Vec<usize>)> {
        let sizes: Vec<usize> = self.shapes.iter().map(|s| s.elem_count()).collect();
        self.part.buckets_among(idx, &sizes, BUCKET_FLOATS)
    }

    /// The owner's values of `bucket`, or zeros of the same length on the other ranks.
    fn owner_buffer(
        &self,
        params: &[(String, Var)],
        bucket: &[usize],
        owner: usize,
        dist: &Dist,
    ) -> Result<Vec<f32>> {
        if owner == dist.rank() {
            flatten(
                &bucket
                    .iter()
                    .map(|&i| params[i].1.as_tensor())
                    .collect::<Vec<_>>(),
            )
        } else {
            Ok(vec![
                0.0f32;
                bucket
                    .iter()
                    .map(|&i| self.shapes[i].elem_count())
                    .sum()
            ])
        }
    }

    fn tensor_from(&self, values: &[f32], i: usize, params: &[(String, Var)]) -> Result<Tensor> {
        Ok(
            Tensor::from_slice(values, self.shapes[i].clone(), params[i].1.device())?
                .to_dtype(self.dtypes[i])?,
        )
    }

    /// Gather group `g` now, on this thread, a bucket at a time.
    fn gather_group(
        &self,
        llama: &mut Llama,
        params: &[(String, Var)],
        g: Group,
        live: &mut [Var],
        dist: &Dist,
    ) -> Result<()> {
        let (idx, fidx) = self.group(g);
        let plan = self.gather_plan(idx, fidx);
        self.gather_now(plan, llama, params, live, dist)
    }

    fn release_group(
        &self,
        llama: &mut Llama,
        params: &[(String, Var)],
        g: Group,
        live: &mut [Var],
    ) -> Result<()> {
        let (idx, fidx) = self.group(g);
        self.release(llama, params, idx, live)?;
        self.release_frozen(llama, fidx)
    }

    /// Run the gathers of `plan` one after the other on this thread: one bucket's buffer at
    /// a time.
    fn gather_now(
        &self,
        plan: Vec<Job>,
        llama: &mut Llama,
        params: &[(String, Var)],
        live: &mut [Var],
        dist: &Dist,
    ) -> Result<()> {
        for job in plan {
            let mut flat = self.gather_buffer(&job, llama, params, dist)?;
            job.collective().run(dist, &mut flat, false)?;
            self.complete(job, flat, llama, params, live, &mut [], dist)?;
        }
        Ok(())
    }

    /// Run reduces on this thread, each added to the owner's `grads` at once.
    fn reduce_now(
        &self,
        jobs: Vec<(Job, Vec<f32>)>,
        grads: &mut [Option<Vec<f32>>],
        dist: &Dist,
    ) -> Result<()> {
        for (job, mut flat) in jobs {
            job.collective().run(dist, &mut flat, false)?;
            self.add_reduced(&job, flat, grads, dist)?;
        }
        Ok(())
    }

    /// Queue group `g`'s gathers (their buffers made now); returns the ticket to wait for.
    fn gather_ahead(
        &self,
        w: &mut Walk,
        g: Group,
        llama: &Llama,
        params: &[(String, Var)],
        dist: &Dist,
    ) -> Result<usize> {
        let (idx, fidx) = self.group(g);
        let jobs = self
            .gather_plan(idx, fidx)
            .into_iter()
            .map(|job| {
                let flat = self.gather_buffer(&job, llama, params, dist)?;
                Ok((job, flat))
            })
            .collect::<Result<Vec<_>>>()?;
        w.submit(jobs)
    }

    /// The broadcasts that gather the trained tensors `idx` and the frozen weights `fidx` onto
    /// every rank, one per bucket of one owner's tensors. Nothing while the whole model is
    /// gathered.
    fn gather_plan(&self, idx: &[usize], fidx: &[usize]) -> Vec<Job> {
        if self.gathered {
            return Vec::new();
        }
        let sharded: Vec<usize> = idx.iter().copied().filter(|&i| self.sharded[i]).collect();
        let mut plan: Vec<Job> = self
            .buckets(&sharded)
            .into_iter()
            .map(|(owner, bucket)| Job::Gather { owner, bucket })
            .collect();
        let f = &self.frozen;
        let sizes: Vec<usize> = (0..f.names.len()).map(|k| f.words(k)).collect();
        plan.extend(
            f.part
                .buckets_among(fidx, &sizes, BUCKET_FLOATS)
                .into_iter()
                .map(|(owner, bucket)| Job::GatherFrozen { owner, bucket }),
        );
        plan
    }

    /// A gather's buffer: the bucket's values on its owner, zeros of its length elsewhere.
    fn gather_buffer(
        &self,
        job: &Job,
        llama: &Llama,
        params: &[(String, Var)],
        dist: &Dist,
    ) -> Result<Vec<f32>> {
        match job {
            Job::Gather { owner, bucket } => self.owner_buffer(params, bucket, *owner, dist),
            Job::GatherFrozen { owner, bucket } => {
                let f = &self.frozen;
                let words = bucket.iter().map(|&k| f.words(k)).sum();
                if *owner != dist.rank() {
                    return Ok(vec![0.0f32; words]);
                }
                let mut flat = Vec::with_capacity(words);
                let missing =
                    |k: usize| Error::msg(format!("zero3: `{}` is not held here", f.names[k]));
                for &k in bucket {
                    let before = flat.len();
                    if f.wire[k].is_some() {
                        let q = llama
                            .quantized_weight(&f.names[k])
                            .ok_or_else(|| missing(k))?;
                        push_bytes(&mut flat, &q.to_bytes()?);
                    } else {
                        let t = llama.dense_weight(&f.names[k]).ok_or_else(|| missing(k))?;
                        // straight from the tensor: a second copy of the embeddings' size
                        // would sit on the owner beside the buffer
                        with_values(&t, |v| flat.extend_from_slice(v))?;
                    }
                    if flat.len() - before != f.words(k) {
                        return Err(Error::msg(format!(
                            "zero3: `{}` changed size since the plan was made",
                            f.names[k]
                        )));
                    }
                }
                Ok(flat)
            }
            Job::Reduce { .. } => Err(Error::msg("zero3: a reduce is not a gather")),
        }
    }

    /// The reduces that sum the gradients of `idx` onto their owners; every rank's `local`
    /// entries of `idx` are taken. A tensor alone in its bucket is sent from its own buffer
    /// (the embeddings: no second copy of their size).
    fn reduce_jobs(
        &self,
        idx: &[usize],
        local: &mut [Option<Grad>],
    ) -> Result<Vec<(Job, Vec<f32>)>> {
        let mut jobs = Vec::new();
        for (owner, bucket) in self.buckets(idx) {
            let size = |i: usize| self.shapes[i].elem_count();
            let flat = if let [i] = bucket[..] {
                match local[i].take() {
                    Some(g) => g.into_vec()?,
                    None => vec![0.0; size(i)],
                }
            } else {
                let mut flat = Vec::with_capacity(bucket.iter().map(|&i| size(i)).sum());
                for &i in &bucket {
                    match local[i].take() {
                        Some(g) => g.extend(&mut flat)?,
                        None => flat.resize(flat.len() + size(i), 0.0),
                    }
                }
                flat
            };
            jobs.push((Job::Reduce { owner, bucket }, flat));
        }
        Ok(jobs)
    }

    /// Take the walk's collectives back in order up to `ticket`, completing each: a gathered
    /// bucket installed in the model (trained tensors as fresh variables, also in `live`), a
    /// reduced one added to the owner's `grads`.
    #[allow(clippy::too_many_arguments)]
    fn wait_for(
        &self,
        w: &mut Walk,
        ticket: usize,
        llama: &mut Llama,
        params: &[(String, Var)],
        live: &mut [Var],
        grads: &mut [Option<Vec<f32>>],
        dist: &Dist,
    ) -> Result<()> {
        while w.completed < ticket {
            let flat = w.queue.take_next()?;
            let job = w
                .jobs
                .pop_front()
                .ok_or_else(|| Error::msg("zero3: a collective came back that was not sent"))?;
            w.completed += 1;
            self.complete(job, flat, llama, params, live, grads, dist)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        job: Job,
        flat: Vec<f32>,
        llama: &mut Llama,
        params: &[(String, Var)],
        live: &mut [Var],
        grads: &mut [Option<Vec<f32>>],
        dist: &Dist,
    ) -> Result<()> {
        match job {
            Job::Gather { owner, .. } | Job::GatherFrozen { owner, .. } if owner == dist.rank() => {
                Ok(())
            }
            Job::Gather { bucket, .. } => self.install_gathered(llama, params, &bucket, flat, live),
            Job::GatherFrozen { bucket, .. } => {
                let f = &self.frozen;
                let dev = llama.device().clone();
                if let [k] = bucket[..] {
                    if f.wire[k].is_none() && f.dtypes[k] == DType::F32 {
                        // One dense tensor (the embeddings): the received buffer becomes it.
                        let t = Tensor::from_vec(flat, f.shapes[k].clone(), &dev)?;
                        return install_frozen(llama, &f.names[k], &t);
                    }
                }
                let mut at = 0;
                for &k in &bucket {
                    let n = f.words(k);
                    let part = bucket_slice(&flat, at, n)?;
                    if let Some(b) = f.wire[k] {
                        let q = crate::quant::QuantWeight::from_bytes(&words_to_bytes(part, b))
                            .map_err(|e| {
                                Error::msg(format!("zero3: `{}` as gathered: {e}", f.names[k]))
                            })?;
                        install_frozen_quantized(llama, &f.names[k], &std::sync::Arc::new(q))?;
                    } else {
                        let t = Tensor::from_slice(part, f.shapes[k].clone(), &dev)?
                            .to_dtype(f.dtypes[k])?;
                        install_frozen(llama, &f.names[k], &t)?;
                    }
                    at += n;
                }
                Ok(())
            }
            Job::Reduce { .. } => self.add_reduced(&job, flat, grads, dist),
        }
    }

    /// A reduced bucket: on its owner, added to `grads`.
    fn add_reduced(
        &self,
        job: &Job,
        flat: Vec<f32>,
        grads: &mut [Option<Vec<f32>>],
        dist: &Dist,
    ) -> Result<()> {
        let Job::Reduce { owner, bucket } = job else {
            return Err(Error::msg("zero3: a gather is not a reduce"));
        };
        if *owner != dist.rank() {
            return Ok(());
        }
        if bucket.iter().any(|&i| i >= grads.len()) {
            return Err(Error::msg("zero3: a reduce without gradients to add to"));
        }
        if let [i] = bucket[..] {
            // One tensor (the embeddings): the received buffer becomes the sum.
            grads[i] = Some(match grads[i].take() {
                Some(mut acc) => {
                    acc.iter_mut().zip(&flat).for_each(|(a, g)| *a += g);
                    acc
                }
                None => flat,
            });
            return Ok(());
        }
        let mut at = 0;
        for &i in bucket {
            let part = bucket_slice(&flat, at, self.shapes[i].elem_count())?;
            match grads[i].as_mut() {
                Some(acc) => acc.iter_mut().zip(part).for_each(|(a, g)| *a += g),
                None => grads[i] = Some(part.to_vec()),
            }
            at += part.len();
        }
        Ok(())
    }

    /// Install the trained tensors of a gathered bucket as fresh variables.
    fn install_gathered(
        &self,
        llama: &mut Llama,
        params: &[(String, Var)],
        bucket: &[usize],
        flat: Vec<f32>,
        live: &mut [Var],
    ) -> Result<()> {
        if let [i] = bucket[..] {
            if self.dtypes[i] == DType::F32 {
                // One tensor (the embeddings): the received buffer becomes the variable.
                let var = Var::from_vec(flat, self.shapes[i].clone(), params[i].1.device())?;
                install(llama, &params[i].0, &var)?;
                live[i] = var;
                return Ok(());
            }
        }
        let mut at = 0;
        for &i in bucket {
            let k = self.shapes[i].elem_count();
            let var = if self.dtypes[i] == DType::F32 {
                Var::from_slice(
                    bucket_slice(&flat, at, k)?,
                    self.shapes[i].clone(),
                    params[i].1.device(),
                )?
            } else {
                Var::from_tensor(&self.tensor_from(bucket_slice(&flat, at, k)?, i, params)?)?
            };
            install(llama, &params[i].0, &var)?;
            live[i] = var;
            at += k;
        }
        Ok(())
    }

    /// Empty placeholders in place of the frozen weights of `idx` that other ranks own.
    fn release_frozen(&self, llama: &mut Llama, idx: &[usize]) -> Result<()> {
        let f = &self.frozen;
        for &k in idx {
            if !f.part.is_mine(k) {
                let p = Tensor::zeros(0, f.dtypes[k], llama.device())?;
                install_frozen(llama, &f.names[k], &p)?;
            }
        }
        Ok(())
    }

    /// Put placeholders back in place of the gathered tensors of `idx`; returns their names.
    fn release(
        &self,
        llama: &mut Llama,
        params: &[(String, Var)],
        idx: &[usize],
        live: &mut [Var],
    ) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for &i in idx {
            if self.sharded[i] && !self.part.is_mine(i) {
                let p = placeholder(self.dtypes[i], params[i].1.device())?;
                install(llama, &params[i].0, &p)?;
                live[i] = p;
                names.push(params[i].0.clone());
            }
        }
        Ok(names)
    }
}

/// A collective of the layer walk and what its result is for.
enum Job {
    /// Trained tensors broadcast from `owner`, installed on the other ranks.
    Gather { owner: usize, bucket: Vec<usize> },
    /// Frozen weights broadcast from `owner`, installed on the other ranks.
    GatherFrozen { owner: usize, bucket: Vec<usize> },
    /// Gradients summed onto `owner`, who adds them to its `grads`.
    Reduce { owner: usize, bucket: Vec<usize> },
}

impl Job {
    fn collective(&self) -> Collective {
        match *self {
            Job::Gather { owner, .. } | Job::GatherFrozen { owner, .. } => {
                Collective::Broadcast { root: owner }
            }
            Job::Reduce { owner, .. } => Collective::Reduce { root: owner },
        }
    }
}

/// The collectives of one walk in flight: submitted in the walk's order (the same on every
/// rank), taken back in that order by [`Zero3::wait_for`].
struct Walk {
    queue: Background,
    jobs: std::collections::VecDeque<Job>,
    submitted: usize,
    completed: usize,
}

impl Walk {
    fn new(queue: Background) -> Self {
        Walk {
            queue,
            jobs: Default::default(),
            submitted: 0,
            completed: 0,
        }
    }

    /// Queue `jobs`; returns the ticket to wait for them.
    fn submit(&mut self, jobs: Vec<(Job, Vec<f32>)>) -> Result<usize> {
        for (job, flat) in jobs {
            self.queue.submit(job.collective(), flat)?;
            self.jobs.push_back(job);
            self.submitted += 1;
        }
        Ok(self.submitted)
    }
}

/// A gradient before its reduce: autograd's tensor as it came (no copy while it is the only
/// contribution), or f32 values in element order once contributions were added.
#[derive(Clone)]
enum Grad {
    Tensor(Tensor),
    Flat(Vec<f32>),
}

/// `f` on the f32 values of `t` in element order: read in place where `t` is a contiguous f32
/// CPU tensor (autograd's gradients are), else from a copy.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        let v = crate::ops::kernels::cpu_contiguous::<f32>(&storage, layout, "zero3")?;
        return Ok(f(v));
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(f(&v))
}

impl Grad {
    /// This gradient plus `g` (`self + g`, element by element).
    fn add(self, g: &Tensor) -> Result<Vec<f32>> {
        let mut v = self.into_vec()?;
        with_values(g, |x| v.iter_mut().zip(x).for_each(|(a, b)| *a += b))?;
        Ok(v)
    }

    /// `self + other` computed in `other`'s buffer (f32 addition commutes exactly).
    fn add_to(self, mut other: Vec<f32>) -> Result<Vec<f32>> {
        match self {
            Grad::Tensor(t) => {
                with_values(&t, |x| other.iter_mut().zip(x).for_each(|(o, a)| *o += a))?
            }
            Grad::Flat(v) => other.iter_mut().zip(&v).for_each(|(o, a)| *o += a),
        }
        Ok(other)
    }

    fn into_vec(self) -> Result<Vec<f32>> {
        match self {
            Grad::Flat(v) => Ok(v),
            Grad::Tensor(t) => with_values(&t, |x| x.to_vec()),
        }
    }

    fn extend(self, out: &mut Vec<f32>) -> Result<()> {
        match self {
            Grad::Flat(v) => out.extend_from_slice(&v),
            Grad::Tensor(t) => with_values(&t, |x| out.extend_from_slice(x))?,
        }
        Ok(())
    }
}

/// The gradient of an embedding lookup: `grad`'s row for each token added into that token's
/// row of a zero table of `shape` (vocab, hidden), tokens in order, as autograd's `index_add`
/// adds them.
fn scatter_rows(ids: &Tensor, grad: &Tensor, shape: &Shape) -> Result<Vec<f32>> {
    let (vocab, hidden) = shape.dims2()?;
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    let g = grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if g.len() != ids.len() * hidden {
        return Err(Error::msg(format!(
            "zero3: {} embedding gradient values for {} tokens of width {hidden}",
            g.len(),
            ids.len()
        )));
    }
    let mut rows = vec![0.0f32; vocab * hidden];
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::msg(format!(
                "zero3: token id {id} is outside the {vocab}-row embeddings"
            )));
        }
        let dst = &mut rows[id * hidden..(id + 1) * hidden];
        dst.iter_mut()
            .zip(&g[t * hidden..(t + 1) * hidden])
            .for_each(|(d, s)| *d += s);
    }
    Ok(rows)
}

/// Give the pages of freed memory back to the kernel (glibc's `malloc_trim`). The CLI keeps
/// freed blocks up to 32 MiB in the heap and never trims it, which makes activation buffers
/// cheap to reuse; under ZeRO-3, where memory is the point, the per-layer gathers and
/// gradient buffers of different sizes fragment that heap, and without a trim its resident
/// size grew by 0.1-0.2 GB a step on SmolLM2. Called once after each step (milliseconds).
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether `name` is a weight of the LLaMA model itself (what `Llama::set_parameter` takes),
/// decided from the name alone so every rank decides alike.
fn is_model_weight(name: &str) -> bool {
    matches!(
        name,
        "model.embed_tokens.weight" | "lm_head.weight" | "model.norm.weight"
    ) || crate::model::llama::layer_of_parameter(name)
        .is_some_and(|(_, rest)| crate::model::llama::LAYER_WEIGHTS.contains(&rest))
}

/// `bytes` as f32 words (little-endian, the last padded with zeros): a broadcast copies them
/// bit for bit.
fn push_bytes(flat: &mut Vec<f32>, bytes: &[u8]) {
    flat.reserve(bytes.len().div_ceil(4));
    for c in bytes.chunks(4) {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        flat.push(f32::from_bits(u32::from_le_bytes(w)));
    }
}

/// The first `len` bytes of words [`push_bytes`] wrote.
fn words_to_bytes(words: &[f32], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 4);
    for w in words {
        out.extend_from_slice(&w.to_bits().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn install_frozen_quantized(
    llama: &mut Llama,
    name: &str,
    q: &std::sync::Arc<crate::quant::QuantWeight>,
) -> Result<()> {
    if llama.set_frozen_quantized(name, q)? {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "zero3: `{name}` is not a weight of the model"
        )))
    }
}

fn install_frozen(llama: &mut Llama, name: &str, t: &Tensor) -> Result<()> {
    if llama.set_frozen_weight(name, t)? {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "zero3: `{name}` is not a weight of the model"
        )))
    }
}

fn install(llama: &mut Llama, name: &str, var: &Var) -> Result<()> {
    if llama.set_parameter(name, var)? {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "zero3: `{name}` is not a weight of the model"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{config_from_hf_dir, LoadOptions, SafetensorsSource};
    use std::path::Path;

    fn tiny_llama(fixture: &str) -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(fixture);
        let cfg = config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &candle_core::Device::Cpu)
            .unwrap();
        Llama::load(&src, &cfg).unwrap()
    }

    #[test]
    fn a_quantized_base_is_sharded_as_its_blocks() {
        // QLoRA's NF4 base: every linear of the layers is a frozen quantized weight; a rank
        // keeps the ones it owns, and the bytes a gathered copy costs are its blocks'.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-llama-gqa-untied");
        let cfg = config_from_hf_dir(&dir).unwrap();
        let opts = LoadOptions {
            base_quant: crate::quant::BaseQuant::parse("nf4", true).unwrap(),
            ..Default::default()
        };
        let src = SafetensorsSource::open(&dir, &opts, &candle_core::Device::Cpu).unwrap();
        let mut m = Llama::load(&src, &cfg).unwrap();
        let quantized: Vec<String> = m
            .weight_names()
            .into_iter()
            .filter(|n| m.quantized_weight(n).is_some())
            .collect();
        assert_eq!(quantized.len(), 14);
        let mut params: Vec<(String, Var)> = Vec::new();
        let mut z = Zero3::new(&m, &params, Partition::new(&[], 2, 1)).unwrap();
        assert_eq!(z.frozen_quantized_count(), 14);
        let storage: u64 = quantized
            .iter()
            .map(|n| m.quantized_weight(n).unwrap().storage_bytes() as u64)
            .sum();
        let released = z.released_bytes();
        // The others' transposed backward copies go with their weights; one layer's come back.
        let (copies_released, copies_gathered) = z.backward_copy_bytes();
        assert!(copies_released > copies_gathered && copies_gathered > 0);
        z.release_all(&mut m, &mut params).unwrap();
        let kept: Vec<&String> = quantized
            .iter()
            .filter(|n| m.quantized_weight(n).is_some())
            .collect();
        assert!(!kept.is_empty() && kept.len() < 14, "{kept:?}");
        let kept_bytes: u64 = kept
            .iter()
            .map(|n| m.quantized_weight(n).unwrap().storage_bytes() as u64)
            .sum();
        // What was released: the others' quantized weights and their dense weights (norms,
        // embeddings, head).
        assert!(
            released >= storage - kept_bytes,
            "{released} {storage} {kept_bytes}"
        );
        // A gathered layer costs its blocks' bytes, not f32's: the same plan on the f32 model
        // (the same owners: ownership goes by parameter count) gathers more.
        let dense = tiny_llama("tiny-llama-gqa-untied");
        let zd = Zero3::new(&dense, &[], Partition::new(&[], 2, 1)).unwrap();
        assert_eq!(zd.frozen_quantized_count(), 0);
        assert!(
            z.gathered_bytes() > 0 && z.gathered_bytes() < zd.gathered_bytes(),
            "{} vs {}",
            z.gathered_bytes(),
            zd.gathered_bytes()
        );
    }

    #[test]
    fn a_frozen_base_is_sharded_too() {
        // No trained model weight (a PEFT method's run): the frozen dense weights are shared
        // out instead, each rank keeping about half of them.
        let mut m = tiny_llama("tiny-llama-gqa-untied");
        let held_bytes = |m: &Llama| -> u64 {
            m.weight_names()
                .iter()
                .map(|n| {
                    let t = m.dense_weight(n).unwrap();
                    (t.elem_count() * t.dtype().size_in_bytes()) as u64
                })
                .sum()
        };
        let total = held_bytes(&m);
        let mut params: Vec<(String, Var)> = Vec::new();
        let mut z = Zero3::new(&m, &params, Partition::new(&[], 2, 0)).unwrap();
        assert!(!z.has_sharded());
        let released = z.released_bytes();
        assert!(
            released > total / 4 && released < total * 3 / 4,
            "{released} of {total}"
        );
        z.release_all(&mut m, &mut params).unwrap();
        assert_eq!(held_bytes(&m), total - released);
        let empty = m
            .weight_names()
            .iter()
            .filter(|n| m.dense_weight(n).unwrap().elem_count() == 0)
            .count();
        assert!(empty > 0);
    }

    #[test]
    fn the_others_frozen_weights_load_as_placeholders_matching_the_plan() {
        // The ownership computed from the headers before loading is the plan's: each rank's
        // placeholders are exactly the frozen weights the other rank owns, they hold no data
        // (one broadcast element), and the weights a rank owns load whole and equal the file.
        let fixture = "tiny-llama-gqa-untied";
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(fixture);
        let cfg = config_from_hf_dir(&dir).unwrap();
        let full = tiny_llama(fixture);
        let mut seen = std::collections::HashSet::new();
        for rank in 0..2 {
            let ph = frozen_placeholders(&dir, &cfg, 2, rank).unwrap().unwrap();
            assert!(!ph.is_empty());
            let opts = LoadOptions {
                placeholders: Some(std::sync::Arc::new(ph.clone())),
                ..Default::default()
            };
            let src = SafetensorsSource::open(&dir, &opts, &candle_core::Device::Cpu).unwrap();
            let m = Llama::load(&src, &cfg).unwrap();
            let z = Zero3::new(&m, &[], Partition::new(&[], 2, rank)).unwrap();
            z.check_placeholders(&ph, &[]).unwrap();
            for name in m.weight_names() {
                let t = m.dense_weight(&name).unwrap();
                let want = full.dense_weight(&name).unwrap();
                assert_eq!(t.dims(), want.dims(), "{name}");
                if ph.contains(&name) {
                    assert!(t.stride().iter().all(|&s| s == 0), "{name} holds data");
                    assert!(seen.insert(name.clone()), "{name} missing on both ranks");
                } else {
                    let diff = (t - &want).unwrap().abs().unwrap().max_all().unwrap();
                    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
                }
            }
        }
        // Every weight is real on exactly one rank.
        assert_eq!(seen.len(), full.weight_names().len());
        // A placeholder this rank needs is refused.
        let z = Zero3::new(&full, &[], Partition::new(&[], 2, 0)).unwrap();
        let mine: std::collections::HashSet<String> = full
            .weight_names()
            .into_iter()
            .filter(|n| {
                !frozen_placeholders(&dir, &cfg, 2, 0)
                    .unwrap()
                    .unwrap()
                    .contains(n)
            })
            .take(1)
            .collect();
        let e = z.check_placeholders(&mine, &[]).unwrap_err().to_string();
        assert!(e.contains("loaded without its data"), "{e}");
    }

    #[test]
    fn full_fine_tuning_loads_only_its_own_weights_and_plans_as_the_whole_model() {
        // Full fine-tuning under ZeRO-3: the weights another rank will own load as placeholders
        // and become empty variables; the plan made from them (sizes, ownership, shapes) is the
        // plan made from the whole model, each rank's own weights hold the file's values, and
        // every weight has its values on exactly one rank.
        for fixture in ["tiny-llama-gqa-untied", "tiny-llama-mha-tied"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/models")
                .join(fixture);
            let cfg = config_from_hf_dir(&dir).unwrap();
            let mut full = tiny_llama(fixture);
            let full_params = full.make_all_trainable().unwrap();
            let names: Vec<String> = full_params.iter().map(|(n, _)| n.clone()).collect();
            assert_eq!(
                names,
                Llama::trainable_names_for(&cfg, cfg.num_hidden_layers),
                "{fixture}"
            );
            let full_sizes: Vec<usize> = full_params.iter().map(|(_, v)| v.elem_count()).collect();
            let mut seen = std::collections::HashSet::new();
            for rank in 0..2 {
                let ph = trained_placeholders(&dir, &cfg, 2, rank).unwrap().unwrap();
                assert!(!ph.is_empty(), "{fixture}");
                let opts = LoadOptions {
                    placeholders: Some(std::sync::Arc::new(ph.clone())),
                    ..Default::default()
                };
                let src = SafetensorsSource::open(&dir, &opts, &candle_core::Device::Cpu).unwrap();
                let mut m = Llama::load(&src, &cfg).unwrap();
                let params = m.make_all_trainable().unwrap();
                let sizes = param_sizes(&m, &params);
                assert_eq!(sizes, full_sizes, "{fixture}");
                let part = Partition::new(&sizes, 2, rank);
                let z = Zero3::new(&m, &params, part.clone()).unwrap();
                z.check_placeholders(&ph, &params).unwrap();
                let whole =
                    Zero3::new(&full, &full_params, Partition::new(&full_sizes, 2, rank)).unwrap();
                assert_eq!(z.shapes, whole.shapes, "{fixture}");
                assert_eq!(z.released_bytes(), whole.released_bytes(), "{fixture}");
                for (i, (name, v)) in params.iter().enumerate() {
                    if part.is_mine(i) {
                        assert!(!ph.contains(name), "{fixture}: {name}");
                        let want = full_params[i].1.as_tensor();
                        let diff = (v.as_tensor() - want).unwrap().abs().unwrap();
                        let diff = diff.flatten_all().unwrap().max(0).unwrap();
                        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
                        assert!(seen.insert(name.clone()), "{name} on both ranks");
                    } else {
                        assert!(ph.contains(name), "{fixture}: {name}");
                        assert_eq!(v.elem_count(), 0, "{fixture}: {name} holds data");
                    }
                }
                // A weight this rank owns loaded without its data is refused.
                let own = names[part.mine()[0]].clone();
                let mut more = ph.clone();
                more.insert(own);
                let opts = LoadOptions {
                    placeholders: Some(std::sync::Arc::new(more.clone())),
                    ..Default::default()
                };
                let src = SafetensorsSource::open(&dir, &opts, &candle_core::Device::Cpu).unwrap();
                let mut broken = Llama::load(&src, &cfg).unwrap();
                let bp = broken.make_all_trainable().unwrap();
                let zb = Zero3::new(&broken, &bp, part.clone()).unwrap();
                let e = zb.check_placeholders(&more, &bp).unwrap_err().to_string();
                assert!(e.contains("loaded without its data"), "{e}");
            }
            assert_eq!(seen.len(), names.len(), "{fixture}");
        }
    }

    #[test]
    fn layer_index_reads_the_number_after_layers() {
        assert_eq!(layer_index("model.layers.3.mlp.up_proj.weight"), Some(3));
        assert_eq!(
            layer_index("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"),
            Some(12)
        );
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
        assert_eq!(layer_index("model.layers.x.mlp"), None);
        assert!(is_model_weight("model.layers.0.mlp.down_proj.weight"));
        assert!(!is_model_weight(
            "model.layers.0.mlp.down_proj.lora_A.weight"
        ));
    }

    #[test]
    fn a_rank_keeps_only_its_own_weights_and_gathering_needs_the_sharded_model() {
        for fixture in ["tiny-llama-gqa-untied", "tiny-llama-mha-tied"] {
            let mut m = tiny_llama(fixture);
            let mut params = m.make_all_trainable().unwrap();
            let total: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
            let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
            let part = Partition::new(&sizes, 2, 1);
            let mut z = Zero3::new(&m, &params, part.clone()).unwrap();
            assert!(z.has_sharded());
            let before: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
            let names = z.release_all(&mut m, &mut params).unwrap();
            assert!(!z.is_gathered());
            let held = (total * 4) as u64 - z.released_bytes();
            let gathered = z.gathered_bytes();
            assert!(gathered > 0 && gathered < z.released_bytes(), "{fixture}");
            assert!(z.gathered_grad_values() as u64 * 4 == gathered, "{fixture}");
            for (i, (name, v)) in params.iter().enumerate() {
                if part.is_mine(i) {
                    // the very same variable (the optimizer's) is still in place
                    assert_eq!(v.as_tensor().id(), before[i].as_tensor().id(), "{name}");
                    assert!(!names.contains(name));
                } else {
                    assert_eq!(v.elem_count(), 0, "{name}");
                    assert!(names.contains(name));
                }
            }
            // The model's own slots hold the placeholders: what it holds adds up to `held`.
            let in_model: usize = m
                .linears()
                .iter()
                .filter(|l| !(m.cfg.tie_word_embeddings && l.name() == "lm_head"))
                .map(|l| l.weight().shape().0 * l.weight().shape().1)
                .sum::<usize>()
                + match m.embed_tokens.weight() {
                    EmbeddingWeight::Trainable(v) => v.elem_count(),
                    _ => unreachable!(),
                }
                + m.norm.weight().elem_count()
                + m.layers
                    .iter()
                    .map(|l| {
                        l.input_layernorm.weight().elem_count()
                            + l.post_attention_layernorm.weight().elem_count()
                    })
                    .sum::<usize>();
            assert_eq!(in_model as u64 * 4, held, "{fixture}");
            // A training pass on the gathered model is refused, not silently unsharded.
            z.gathered = true;
            let e = z
                .loss_and_grads(&mut m, &params, None, 1.0, &Dist::default(), &mut [])
                .unwrap_err()
                .to_string();
            assert!(e.contains("sharded model"), "{e}");
        }
    }
}
