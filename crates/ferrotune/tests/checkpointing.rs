//! Activation checkpointing gives the gradients of the plain backward pass: on the tiny HF
//! fixtures, with LoRA dropout (the recomputation must replay the same masks), padded and packed
//! batches, and gradient accumulation.
use candle_core::Device;
use ferrotune::data::{BatchConfig, Batcher};
use ferrotune::peft::{self, lora};
use ferrotune::train;

use crate::common;
use common::{examples, max_abs, tiny};

/// The tiny fixture `name` with a seeded LoRA on every linear (non-zero B, dropout 0.3), and its
/// trainable parameters: two calls give identical models.
fn lora_model(name: &str) -> (ferrotune::model::Llama, Vec<(String, candle_core::Var)>) {
    let mut m = tiny(name);
    let mut cfg = lora::LoraConfig::new(4, 8.0, &[]);
    cfg.target_modules = Some(lora::ModuleSpec::One("all-linear".into()));
    cfg.init_lora_weights = lora::InitLoraWeights::Bool(false);
    cfg.lora_dropout = 0.3;
    lora::attach_lora(&mut m, &cfg, "default", 5).unwrap();
    let params = peft::adapter_params(&m, "default");
    (m, params)
}

#[test]
fn checkpointed_gradients_equal_plain_gradients() {
    for (name, packing) in [
        ("tiny-llama-gqa-untied", false),
        ("tiny-llama-mha-tied", true),
        ("tiny-qwen2", false),
    ] {
        // Two identical models with identical adapters (same seeds, dropout 0.3): one runs the
        // plain backward pass, the other the checkpointed one, over the same batches.
        let build = || lora_model(name);
        let (plain, plain_params) = build();
        let (ckpt, ckpt_params) = build();
        let exs = examples(&[11, 4, 17, 8, 6, 13], plain.cfg.vocab_size as u32, 3);
        let bc = BatchConfig {
            shuffle: false,
            ..if packing {
                BatchConfig::new(2, 24, 0).with_packing()
            } else {
                BatchConfig::new(3, 24, 0)
            }
        };
        let batcher = Batcher::new(exs, bc, Device::Cpu).unwrap();
        let batches: Vec<_> = batcher
            .plan_for(0)
            .iter()
            .map(|r| batcher.build(r).unwrap())
            .collect();
        assert!(batches.len() >= 2, "want several micro-batches");
        // two optimizer-step-sized calls, so the dropout streams must also stay in step
        for round in 0..2 {
            let p =
                train::accumulate_gradients_with(&plain, &plain_params, &batches, false).unwrap();
            let c = train::accumulate_gradients_with(&ckpt, &ckpt_params, &batches, true).unwrap();
            assert_eq!(p.loss_tokens, c.loss_tokens);
            assert!(
                (p.loss - c.loss).abs() <= 1e-6 * p.loss.abs(),
                "{name} round {round}: loss {} vs {}",
                p.loss,
                c.loss
            );
            for ((pname, _), (gp, gc)) in plain_params.iter().zip(p.grads.iter().zip(&c.grads)) {
                let scale = max_abs(gp);
                assert!(scale > 0.0, "{name}: {pname} has a zero gradient");
                let diff = max_abs(&(gp - gc).unwrap());
                assert!(
                    diff <= 1e-5 * scale,
                    "{name} round {round}: {pname} gradient off by {diff} (scale {scale})"
                );
            }
        }
    }
}

/// The layer walk that overlapped gradient communication uses (`train::overlap`): the step's
/// last micro-batch reports each decoder layer once, last to first, right after its backward
/// pass, and what a layer's parameters hold at that moment (earlier micro-batches plus this
/// one's) is their final gradient; the gradients equal the plain backward pass's, with the
/// graph kept (no recomputation) and with it recomputed.
#[test]
fn the_layer_walk_reports_each_layer_with_its_final_gradients() {
    for (name, checkpointing) in [
        ("tiny-llama-gqa-untied", false),
        ("tiny-llama-mha-tied", false),
        ("tiny-llama-mha-tied", true),
    ] {
        let build = || lora_model(name);
        let (plain, plain_params) = build();
        let (walked, walked_params) = build();
        let n_layers = walked.layers.len();
        let exs = examples(&[11, 4, 17, 8, 6, 13], plain.cfg.vocab_size as u32, 3);
        let batcher = Batcher::new(
            exs,
            BatchConfig {
                shuffle: false,
                ..BatchConfig::new(2, 24, 0)
            },
            Device::Cpu,
        )
        .unwrap();
        let batches: Vec<_> = batcher
            .plan_for(0)
            .iter()
            .map(|r| batcher.build(r).unwrap())
            .collect();
        assert!(batches.len() >= 2, "want gradient accumulation");
        let n_total: usize = batches.iter().map(|b| b.n_loss_tokens).sum();
        let p = train::accumulate_gradients_with(&plain, &plain_params, &batches, false).unwrap();
        // (layer, (parameter index, its gradient's values) when the layer was reported)
        type Reported = (usize, Vec<(usize, Vec<f32>)>);
        let mut reported: Vec<Reported> = Vec::new();
        let mut hook = |l: usize,
                        acc: &mut [Option<candle_core::Tensor>],
                        mb: &mut [Option<candle_core::Tensor>]|
         -> ferrotune::Result<()> {
            let mut vals = Vec::new();
            for (i, (pname, _)) in walked_params.iter().enumerate() {
                if train::zero3::layer_index(pname) != Some(l) {
                    continue;
                }
                let g = match (&acc[i], &mb[i]) {
                    (Some(a), Some(m)) => (a + m).unwrap(),
                    (Some(g), None) | (None, Some(g)) => g.clone(),
                    (None, None) => panic!("{name}: {pname} has no gradient at layer {l}"),
                };
                vals.push((i, g.flatten_all()?.to_vec1::<f32>()?));
            }
            reported.push((l, vals));
            Ok(())
        };
        let w = train::accumulate_gradients_over(
            &walked,
            &walked_params,
            &batches,
            checkpointing,
            n_total,
            |_| Ok(()),
            Some(&mut hook),
        )
        .unwrap();
        let order: Vec<usize> = reported.iter().map(|r| r.0).collect();
        assert_eq!(order, (0..n_layers).rev().collect::<Vec<_>>(), "{name}");
        for (l, vals) in &reported {
            assert!(!vals.is_empty(), "{name}: layer {l} has no parameters");
            for (i, v) in vals {
                let fin = w.grads[*i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(
                    v, &fin,
                    "{name}: {} changed after layer {l}",
                    walked_params[*i].0
                );
            }
        }
        assert!((p.loss - w.loss).abs() <= 1e-6 * p.loss.abs(), "{name}");
        for ((pname, _), (gp, gw)) in plain_params.iter().zip(p.grads.iter().zip(&w.grads)) {
            let scale = max_abs(gp);
            assert!(scale > 0.0, "{name}: {pname} has a zero gradient");
            let diff = max_abs(&(gp - gw).unwrap());
            assert!(
                diff <= 1e-5 * scale,
                "{name} (checkpointing {checkpointing}): {pname} off by {diff} (scale {scale})"
            );
        }
    }
}
