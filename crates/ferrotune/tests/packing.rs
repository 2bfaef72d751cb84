//! Packed training rows on the tiny HF fixtures: a packed row computes for each of its examples
//! exactly what the example computes alone (hidden states, every architecture), and a packed
//! batch gives the same summed loss and LoRA gradients as the same examples one per row.
use candle_core::{Device, Tensor};
use ferrotune::data::{BatchConfig, Batcher};
use ferrotune::peft::{self, lora};
use ferrotune::train;

use crate::common;
use common::{examples, max_abs, tiny};

const MODELS: &[&str] = &[
    "tiny-llama-gqa-untied",
    "tiny-llama-mha-tied",
    "tiny-llama-head-dim",
    "tiny-llama3-rope-scaling",
    "tiny-mistral",
    "tiny-qwen2",
];

#[test]
fn packed_row_hidden_states_equal_each_example_alone() {
    let lens = [9usize, 14, 5];
    let t = 32; // 28 tokens and 4 of padding
    for name in MODELS {
        let m = tiny(name);
        let exs = examples(&lens, m.cfg.vocab_size as u32, 1);
        let cfg = BatchConfig {
            shuffle: false,
            ..BatchConfig::new(1, t, 0).with_packing()
        };
        let b = Batcher::new(exs.clone(), cfg, Device::Cpu).unwrap();
        let batch = b.build(&[vec![0, 1, 2]]).unwrap();
        let seg = batch.segment_ids.as_ref().unwrap();
        let packed = m
            .forward_hidden_packed(&batch.input_ids, &batch.position_ids, seg, false)
            .unwrap();
        assert!(
            packed
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|x| x.is_finite()),
            "{name}: padding made the output non-finite"
        );
        // Plain causal attention over the packed row: example 2 sees example 1.
        let leaky = m.forward_hidden(&batch.input_ids, None, false).unwrap();
        let mut at = 0;
        for (e, ex) in exs.iter().enumerate() {
            let ids = Tensor::new(ex.input_ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let alone = m.forward_hidden(&ids, None, false).unwrap();
            let part = packed.narrow(1, at, ex.len()).unwrap();
            let diff = max_abs(&(&part - &alone).unwrap());
            let scale = max_abs(&alone);
            assert!(
                diff <= 1e-5 * scale,
                "{name} example {e}: off by {diff} (scale {scale})"
            );
            if e > 0 {
                let wrong = max_abs(&(leaky.narrow(1, at, ex.len()).unwrap() - &alone).unwrap());
                assert!(
                    wrong > 1e-2 * scale,
                    "{name} example {e}: unmasked differs only by {wrong}"
                );
            }
            at += ex.len();
        }
    }
}

/// The loss summed over a packed batch and the LoRA gradients equal those of the same examples
/// batched one per row with padding.
#[test]
fn packed_batch_loss_and_lora_gradients_equal_unpacked() {
    for name in ["tiny-llama-gqa-untied", "tiny-qwen2"] {
        let mut m = tiny(name);
        let mut cfg = lora::LoraConfig::new(4, 8.0, &[]);
        cfg.target_modules = Some(lora::ModuleSpec::One("all-linear".into()));
        // Random B too: with B = 0 every gradient of A would be zero.
        cfg.init_lora_weights = lora::InitLoraWeights::Bool(false);
        lora::attach_lora(&mut m, &cfg, "default", 5).unwrap();
        let params = peft::adapter_params(&m, "default");
        let lens = [11usize, 4, 17, 8, 6, 13, 3, 9];
        let exs = examples(&lens, m.cfg.vocab_size as u32, 2);
        // Packed: rows of up to 24 tokens, 2 rows per micro-batch.
        let pc = BatchConfig {
            shuffle: false,
            ..BatchConfig::new(2, 24, 0).with_packing()
        };
        let pb = Batcher::new(exs.clone(), pc, Device::Cpu).unwrap();
        let packed: Vec<_> = pb
            .plan_for(0)
            .iter()
            .map(|r| pb.build(r).unwrap())
            .collect();
        assert!(
            packed
                .iter()
                .any(|b| b.sources.len() > b.input_ids.dim(0).unwrap()),
            "no row holds two examples"
        );
        // Unpacked: one example per row, 3 rows per micro-batch.
        let uc = BatchConfig {
            shuffle: false,
            ..BatchConfig::new(3, 24, 0)
        };
        let ub = Batcher::new(exs, uc, Device::Cpu).unwrap();
        let unpacked: Vec<_> = ub
            .plan_for(0)
            .iter()
            .map(|r| ub.build(r).unwrap())
            .collect();
        let p = train::accumulate_gradients(&m, &params, &packed).unwrap();
        let u = train::accumulate_gradients(&m, &params, &unpacked).unwrap();
        assert_eq!(p.loss_tokens, u.loss_tokens);
        let (ps, us) = (p.loss * p.loss_tokens as f64, u.loss * u.loss_tokens as f64);
        assert!(
            (ps - us).abs() <= 1e-5 * us.abs(),
            "{name}: summed loss {ps} vs {us}"
        );
        for ((pname, _), (gp, gu)) in params.iter().zip(p.grads.iter().zip(&u.grads)) {
            let scale = max_abs(gu);
            assert!(scale > 0.0, "{name}: {pname} has a zero gradient");
            let diff = max_abs(&(gp - gu).unwrap());
            assert!(
                diff <= 1e-4 * scale,
                "{name}: {pname} gradient off by {diff} (scale {scale})"
            );
        }
    }
}
