//! Packed vs unpacked training rows: attention alone, and a LoRA forward+backward on SmolLM2.
//!
//! ```text
//! cargo run --release --example packing_bench -- attention
//! cargo run --release --example packing_bench -- model [GGUF]
//! ```
//!
//! Each number is the best of several rounds (the project machine's 2 cores are shared).
use candle_core::{Device, Tensor, Var};
use ferrotune::data::{BatchConfig, Batcher, Example, Loc, Source, IGNORE};
use ferrotune::model::{self, LoadOptions};
use ferrotune::ops;
use ferrotune::peft::{self, lora};
use ferrotune::train;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn best(rounds: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Forward + backward of attention on (b, 9, t, 64) with 3 kv heads.
fn fwd_bwd(b: usize, t: usize, seg: Option<&Tensor>) -> impl FnMut() {
    let q = Var::from_tensor(&rand(&[b, 9, t, 64], 1)).unwrap();
    let k = Var::from_tensor(&rand(&[b, 3, t, 64], 2)).unwrap();
    let v = Var::from_tensor(&rand(&[b, 3, t, 64], 3)).unwrap();
    let seg = seg.cloned();
    move || {
        let y = match &seg {
            Some(s) => ops::causal_attention_segments(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                0.125,
                s,
            ),
            None => ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.125, 0),
        }
        .unwrap();
        y.sum_all().unwrap().backward().unwrap();
    }
}

fn attention() {
    let lens = [200usize, 150, 100, 62];
    let t: usize = lens.iter().sum();
    let mut ids = Vec::new();
    for (s, &n) in lens.iter().enumerate() {
        ids.extend(std::iter::repeat_n(s as u32 + 1, n));
    }
    let seg = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let rounds = 15;
    let packed = best(rounds, fwd_bwd(1, t, Some(&seg)));
    let causal = best(rounds, fwd_bwd(1, t, None));
    let mut alone: Vec<_> = lens.iter().map(|&n| fwd_bwd(1, n, None)).collect();
    let separate = best(rounds, || alone.iter_mut().for_each(|f| f()));
    let padded = best(rounds, fwd_bwd(lens.len(), lens[0], None));
    println!("attention fwd+bwd, 9 q heads / 3 kv heads, d 64, examples {lens:?}:");
    println!(
        "  packed row of {t} with segments   {:8.2} ms",
        packed * 1e3
    );
    println!(
        "  the examples one by one           {:8.2} ms",
        separate * 1e3
    );
    println!(
        "  row of {t}, plain causal (no mask) {:8.2} ms",
        causal * 1e3
    );
    println!(
        "  {} rows padded to {}                {:8.2} ms",
        lens.len(),
        lens[0],
        padded * 1e3
    );
}

fn model_bench(path: &str) {
    let opts = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    let mut lm = model::load(path, &opts, &Device::Cpu).unwrap();
    let cfg = lora::LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    lora::attach_lora(&mut lm.model, &cfg, "default", 0).unwrap();
    let params = peft::adapter_params(&lm.model, "default");
    // Lengths in the range of DialogSum prompts + summaries, half of each trained.
    let lens = [310usize, 120, 250, 180, 400, 90, 220, 150];
    let mut rng = StdRng::seed_from_u64(7);
    let exs: Vec<Example> = lens
        .iter()
        .enumerate()
        .map(|(e, &n)| {
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..49152)).collect();
            Example {
                labels: ids
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| if k >= n / 2 { i as i64 } else { IGNORE })
                    .collect(),
                input_ids: ids,
                source: Source {
                    file: Arc::from(Path::new("bench")),
                    loc: Loc::Line(e + 1),
                    task: None,
                },
            }
        })
        .collect();
    let n_tokens: usize = lens.iter().sum();
    let batches = |bc: BatchConfig| {
        let b = Batcher::new(exs.clone(), bc, Device::Cpu).unwrap();
        b.plan_for(0)
            .iter()
            .map(|r| b.build(r).unwrap())
            .collect::<Vec<_>>()
    };
    let plain = batches(BatchConfig {
        shuffle: false,
        ..BatchConfig::new(4, 512, 0)
    });
    let packed = batches(BatchConfig {
        shuffle: false,
        ..BatchConfig::new(2, 512, 0).with_packing()
    });
    let cells = |bs: &[ferrotune::data::Batch]| -> usize {
        bs.iter().map(|b| b.input_ids.elem_count()).sum()
    };
    println!(
        "SmolLM2-135M f32 + LoRA r8 q/v, {} examples, {n_tokens} tokens",
        lens.len()
    );
    for (name, bs) in [
        ("unpacked (4/batch)", &plain),
        ("packed (rows of 512)", &packed),
    ] {
        let mut loss = 0.0;
        let s = best(3, || {
            loss = train::accumulate_gradients(&lm.model, &params, bs)
                .unwrap()
                .loss;
        });
        println!(
            "  {name:22} {} batches, {:5} cells: {:6.2} s, {:6.1} tokens/s, loss {loss:.5}",
            bs.len(),
            cells(bs),
            s,
            n_tokens as f64 / s
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(|s| s.as_str()) {
        Some("attention") => attention(),
        Some("model") => model_bench(
            args.get(2)
                .map(|s| s.as_str())
                .unwrap_or(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        _ => eprintln!("usage: packing_bench attention | model [GGUF]"),
    }
}
