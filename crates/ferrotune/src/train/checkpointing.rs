//! Activation checkpointing per decoder layer (`[train] gradient_checkpointing = true`), for the
//! LLaMA family (`Model::loss_and_grads_checkpointed` of `Llama`).
//!
//! Without it, autograd keeps every intermediate tensor of every layer alive until the backward
//! pass: about 57 KB per token and layer for SmolLM2 with LoRA on q/v, 1.7 MB per token in all.
//! With it, the forward pass keeps only each layer's input (the residual stream, 2.3 KB per
//! token and layer) and drops the layer's graph; the backward pass then walks the layers from
//! the last to the first, recomputes one layer's forward pass with its graph, backpropagates
//! the incoming gradient through it, and frees it. The price is one more forward pass per
//! layer (about a third more compute).
//!
//! The walk is explicit rather than a custom autograd op: each layer's backward is
//! `(layer(x) · g).sum().backward()` with `x` a fresh variable, which yields both `∂/∂x` (the
//! next `g`) and the trainable parameters' gradients of that layer. Dropout masks are replayed
//! exactly: the adapters' random streams are saved before each layer's first pass and restored
//! before the recomputation.
//!
//! The same walk without the recomputation ([`Activations::Keep`]: each layer's graph kept, as
//! one autograd pass keeps it) is how data parallel training overlaps communication with the
//! backward pass: a layer's gradients are final as soon as its backward pass has run, and
//! `train::overlap` sends them while the layers before it are still being differentiated.
use super::loss;
use crate::data::Batch;
use crate::model::Llama;
use crate::nn::EmbeddingWeight;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use std::time::Instant;

pub use crate::model::MicroBatchGrads;

/// The loss of one micro-batch and the gradients of `params`, layer by layer (see the module
/// docs).
pub fn loss_and_grads(
    model: &Llama,
    params: &[(String, Var)],
    batch: &Batch,
    scale: f64,
) -> Result<MicroBatchGrads> {
    walk(
        model,
        params,
        batch,
        scale,
        Activations::Recompute,
        &mut |_, _| Ok(()),
    )
}

/// What the layer walk does with a layer's activations between its forward and its backward
/// pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Keep only the layer's input and recompute its graph in the backward pass
    /// (activation checkpointing).
    Recompute,
    /// Keep the layer's graph, as one autograd pass does: the same memory and arithmetic as
    /// the model's own backward pass, but the layers' gradients arrive one layer at a time,
    /// so data parallel training can send a layer's gradients while the next layer's backward
    /// pass runs (`train::overlap`).
    Keep,
}

/// Called right after layer `i`'s backward pass with the micro-batch's gradients so far:
/// those of layer `i`'s parameters are final for this micro-batch (the callee may take them,
/// leaving a marker).
pub type LayerDone<'a> = dyn FnMut(usize, &mut [Option<Tensor>]) -> Result<()> + 'a;

/// The loss of one micro-batch and the gradients of `params`, walking the decoder layers from
/// the last to the first in the backward pass; `layer_done` is called after each layer's.
pub fn walk(
    model: &Llama,
    params: &[(String, Var)],
    batch: &Batch,
    scale: f64,
    activations: Activations,
    layer_done: &mut LayerDone<'_>,
) -> Result<MicroBatchGrads> {
    model.check_layer_walk(batch)?;
    let t0 = Instant::now();
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let collect =
        |store: &candle_core::backprop::GradStore, grads: &mut Vec<Option<Tensor>>| -> Result<()> {
            for (i, (_, var)) in params.iter().enumerate() {
                if let Some(g) = store.get(var.as_tensor()) {
                    grads[i] = Some(match grads[i].take() {
                        None => g.clone(),
                        Some(acc) => (acc + g)?,
                    });
                }
            }
            Ok(())
        };

    // Forward: keep each layer's input, and its graph unless it is recomputed.
    let packed = batch
        .segment_ids
        .as_ref()
        .map(|seg| (&batch.position_ids, seg));
    let ctx = model.layer_context(&batch.input_ids, packed)?;
    let n_layers = model.layers.len();
    let mut inputs: Vec<Tensor> = Vec::with_capacity(n_layers + 1);
    // Keep: each layer's input variable and output, graph attached.
    let mut kept: Vec<(Var, Tensor)> = Vec::new();
    // Recompute: (before, after) each layer's first pass: the recomputation replays from
    // `before`, then the streams are left at `after`, so they advance once per forward pass
    // as without checkpointing (which keeps `--resume`'s replay and the masks themselves
    // identical).
    let mut rng_states = Vec::with_capacity(n_layers);
    let mut h = model.embed_tokens.forward(&batch.input_ids)?;
    for i in 0..n_layers {
        match activations {
            Activations::Recompute => {
                let before = model.layer_rng_states(i);
                let y = model.run_layer(i, &h.detach(), &ctx, true)?.detach();
                inputs.push(std::mem::replace(&mut h, y));
                rng_states.push((before, model.layer_rng_states(i)));
            }
            Activations::Keep => {
                let x = Var::from_tensor(&h.detach())?;
                let y = model.run_layer(i, x.as_tensor(), &ctx, true)?;
                h = y.clone();
                kept.push((x, y));
            }
        }
    }

    // The head: final norm, LM head on the loss rows, the loss (counted as forward time).
    let last = Var::from_tensor(&h.detach())?;
    drop(h);
    let hidden = model.norm.forward(last.as_tensor())?;
    let (sum, n) = loss::loss_from_hidden(&model.lm_head, &hidden, batch, true)?;
    let loss_sum = sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let t1 = Instant::now();
    let store = (sum * scale)?.backward()?;
    collect(&store, &mut grads)?;
    let mut g = store
        .get(last.as_tensor())
        .ok_or_else(|| Error::msg("layer walk: the loss has no gradient for the last layer"))?
        .detach();
    drop(store);

    // Backward, last layer first: (recompute,) backpropagate, free.
    for i in (0..n_layers).rev() {
        let (x, y) = match activations {
            Activations::Recompute => {
                let x = Var::from_tensor(&inputs.pop().ok_or_else(no_input)?)?;
                let (before, after) = rng_states.get(i).ok_or_else(no_input)?;
                model.set_layer_rng_states(i, before);
                let y = model.run_layer(i, x.as_tensor(), &ctx, true)?;
                model.set_layer_rng_states(i, after);
                (x, y)
            }
            Activations::Keep => kept.pop().ok_or_else(no_input)?,
        };
        let store = (y * &g)?.sum_all()?.backward()?;
        collect(&store, &mut grads)?;
        g = store
            .get(x.as_tensor())
            .ok_or_else(|| Error::msg(format!("layer walk: layer {i} passes no gradient")))?
            .detach();
        drop(store);
        layer_done(i, &mut grads)?;
    }
    // The embeddings: only when they are trained (full fine-tuning).
    if let EmbeddingWeight::Trainable(_) = model.embed_tokens.weight() {
        let e = model.embed_tokens.forward(&batch.input_ids)?;
        let store = (e * &g)?.sum_all()?.backward()?;
        collect(&store, &mut grads)?;
    }
    Ok(MicroBatchGrads {
        loss_sum,
        loss_tokens: n,
        grads,
        forward_s: (t1 - t0).as_secs_f64(),
        backward_s: t1.elapsed().as_secs_f64(),
    })
}

/// The walk keeps one input per layer: one missing is a bug here.
fn no_input() -> Error {
    Error::msg("layer walk: a layer's kept input is missing")
}
