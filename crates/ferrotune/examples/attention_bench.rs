//! Training attention (the fused causal op) on SmolLM2's shapes: forward and forward +
//! backward per layer, at the thread count of the rayon pool (`RAYON_NUM_THREADS`).
//!
//! ```text
//! cargo run --release --example attention_bench -- [BATCHxSEQ]...   # default 1x1024 4x256
//! ```
//!
//! Each figure is the fastest of several timing rounds (the machine is shared; the minimum is
//! the estimate least moved by other jobs' bursts), with the multiply-adds of the products the
//! kernels run (causal blocks of 64 query rows, 2 products forward, 5 backward).
use candle_core::{Device, Tensor, Var};
use ferrotune::ops::causal_attention;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let shapes: Vec<String> = std::env::args().skip(1).collect();
    let shapes = if shapes.is_empty() {
        vec!["1x1024".to_string(), "4x256".to_string()]
    } else {
        shapes
    };
    let (hq, hkv, d) = (9, 3, 64);
    println!(
        "SmolLM2 attention: {hq} query heads, {hkv} kv heads, head dim {d}; {} threads",
        rayon::current_num_threads()
    );
    for shape in shapes {
        let Some((b, t)) = shape
            .split_once('x')
            .and_then(|(b, t)| Some((b.parse::<usize>().ok()?, t.parse::<usize>().ok()?)))
        else {
            eprintln!("error: shape {shape:?} is not BATCHxSEQ");
            std::process::exit(2);
        };
        // q, its gradient and the outputs take ~3 KB a token: keep it to a few hundred MB
        if b == 0 || t == 0 || b.saturating_mul(t) > 1 << 16 {
            eprintln!("error: shape {shape:?}: batch and length must be at least 1, batch x length at most 65536 tokens");
            std::process::exit(2);
        }
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hq, t, d), &Device::Cpu)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), &Device::Cpu)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), &Device::Cpu)?)?;
        let g = Tensor::randn(0f32, 1.0, (b, hq, t, d), &Device::Cpu)?;
        let scale = 1.0 / (d as f64).sqrt();
        // multiply-adds of the block products: block i of 64 rows sees (i + 1) * 64 keys
        let blocks = t.div_ceil(64);
        let keys: usize = (0..blocks)
            .map(|i| 64.min(t - i * 64) * ((i + 1) * 64).min(t))
            .sum();
        let fwd_mac = (b * hq * keys * d * 2) as f64;
        let (mut best_f, mut best_fb) = (f64::MAX, f64::MAX);
        for _ in 0..7 {
            let t0 = Instant::now();
            let y = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, 0)?;
            let f = t0.elapsed().as_secs_f64();
            let grads = (y * &g)?.sum_all()?.backward()?;
            let fb = t0.elapsed().as_secs_f64();
            assert!(grads.get(q.as_tensor()).is_some());
            drop(grads);
            best_f = best_f.min(f);
            best_fb = best_fb.min(fb);
        }
        println!(
            "{b}x{t}: forward {:.2} ms ({:.1} GMAC/s), forward + backward {:.2} ms ({:.1} GMAC/s)",
            best_f * 1e3,
            fwd_mac / best_f / 1e9,
            best_fb * 1e3,
            // 7 products in all; the loss's product and sum are negligible beside them
            fwd_mac * 3.5 / best_fb / 1e9
        );
    }
    Ok(())
}
