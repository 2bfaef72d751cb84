//! The LoRA loss curve of a fixed seed with our fused ops equals the one with every op replaced
//! by its composed candle twin (`ops::set_reference_ops`), within float noise: the end-to-end
//! check of the fused forward and backward passes (RMSNorm, RoPE, attention with and without
//! packed segments, SwiGLU, frozen linears, the fused LoRA linear, the fused LM-head loss).
//! One test in its own binary, because the switch is process-wide.
use candle_core::Device;
use ferrotune::data::{BatchConfig, Batcher};
use ferrotune::peft::{self, lora};
use ferrotune::train::{self, AdamW, AdamWConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;
use common::{examples, tiny};

/// `n` examples of random lengths (6..20 tokens).
fn random_examples(n: usize, vocab: u32, seed: u64) -> Vec<ferrotune::data::Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    let lens: Vec<usize> = (0..n).map(|_| rng.random_range(6..20)).collect();
    examples(&lens, vocab, seed)
}

/// Eight AdamW steps of LoRA (all linears, dropout 0.1) on a fixed seed; the loss per step.
fn loss_curve(name: &str, packing: bool) -> Vec<f64> {
    let mut m = tiny(name);
    let mut cfg = lora::LoraConfig::new(4, 8.0, &[]);
    cfg.target_modules = Some(lora::ModuleSpec::One("all-linear".into()));
    cfg.lora_dropout = 0.1;
    lora::attach_lora(&mut m, &cfg, "default", 7).unwrap();
    let params = peft::adapter_params(&m, "default");
    let bc = BatchConfig {
        shuffle: false,
        ..if packing {
            BatchConfig::new(2, 32, 0).with_packing()
        } else {
            BatchConfig::new(4, 32, 0)
        }
    };
    let batcher = Batcher::new(
        random_examples(24, m.cfg.vocab_size as u32, 1),
        bc,
        Device::Cpu,
    )
    .unwrap();
    let batches: Vec<_> = batcher
        .plan_for(0)
        .iter()
        .map(|r| batcher.build(r).unwrap())
        .collect();
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    (0..8)
        .map(|step| {
            let b = &batches[step % batches.len()..step % batches.len() + 1];
            let g = train::accumulate_gradients(&m, &params, b).unwrap();
            opt.step(&g.grads, 5e-3).unwrap();
            g.loss
        })
        .collect()
}

#[test]
fn lora_loss_curve_with_fused_ops_equals_the_unfused_one() {
    for (name, packing) in [("tiny-llama-gqa-untied", false), ("tiny-qwen2", true)] {
        ferrotune::ops::set_reference_ops(false);
        let fused = loss_curve(name, packing);
        ferrotune::ops::set_reference_ops(true);
        let reference = loss_curve(name, packing);
        ferrotune::ops::set_reference_ops(false);
        // the curve moves (the run trains), and the two runs agree to float noise
        assert!(
            (fused[0] - fused[7]).abs() > 1e-3,
            "{name}: the loss did not move: {fused:?}"
        );
        // ...and the switch did switch: the kernels round differently from candle's ops
        assert!(
            fused.iter().zip(&reference).any(|(f, r)| f != r),
            "{name}: the reference run is bit-identical; were the fused ops bypassed?"
        );
        for (i, (f, r)) in fused.iter().zip(&reference).enumerate() {
            assert!(
                (f - r).abs() <= 1e-5 * r.abs(),
                "{name} step {i}: fused {f} vs reference {r}\n{fused:?}\n{reference:?}"
            );
        }
    }
}
