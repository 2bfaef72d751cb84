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

    // Forward: keep each layer's input, drop its graph.
    let packed = batch
        .segment_ids
        .as_ref()
        .map(|seg| (&batch.position_ids, seg));
    let ctx = model.layer_context(&batch.input_ids, packed)?;
    let mut inputs: Vec<Tensor> = Vec::with_capacity(model.layers.len() + 1);
    inputs.push(model.embed_tokens.forward(&batch.input_ids)?);
    // (before, after) each layer's first pass: the recomputation replays from `before`, then
    // the streams are left at `after`, so they advance once per forward pass as without
    // checkpointing (which keeps `--resume`'s replay and the masks themselves identical).
    let mut rng_states = Vec::with_capacity(model.layers.len());
    for i in 0..model.layers.len() {
        let before = model.layer_rng_states(i);
        let x = inputs.last().expect("the embeddings are pushed first");
        let y = model.run_layer(i, &x.detach(), &ctx, true)?.detach();
        inputs.push(y);
        rng_states.push((before, model.layer_rng_states(i)));
    }

    // The head: final norm, LM head on the loss rows, the loss (counted as forward time).
    let last = Var::from_tensor(&inputs.pop().expect("one input per layer"))?;
    let hidden = model.norm.forward(last.as_tensor())?;
    let (sum, n) = loss::loss_from_hidden(&model.lm_head, &hidden, batch, true)?;
    let loss_sum = sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let t1 = Instant::now();
    let store = (sum * scale)?.backward()?;
    collect(&store, &mut grads)?;
    let mut g = store
        .get(last.as_tensor())
        .ok_or_else(|| Error::msg("checkpointing: the loss has no gradient for the last layer"))?
        .detach();
    drop(store);

    // Backward, last layer first: recompute, backpropagate, free.
    for i in (0..model.layers.len()).rev() {
        let x = Var::from_tensor(&inputs.pop().expect("one input per layer"))?;
        model.set_layer_rng_states(i, &rng_states[i].0);
        let y = model.run_layer(i, x.as_tensor(), &ctx, true)?;
        model.set_layer_rng_states(i, &rng_states[i].1);
        let store = (y * &g)?.sum_all()?.backward()?;
        collect(&store, &mut grads)?;
        g = store
            .get(x.as_tensor())
            .ok_or_else(|| Error::msg(format!("checkpointing: layer {i} passes no gradient")))?
            .detach();
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
