//! Micro-benchmark of the quantized kernels against candle's `QMatMul` on SmolLM2-135M shapes.
//!
//! `cargo run --release --example quant_bench [-- matvec|batch|all] [--quick]`
//!
//! candle's thread count is fixed when its pool starts: run with `CANDLE_NUM_THREADS=1` and `=2`
//! to get both candle columns. Our thread count is set per call. Each number is the best (minimum)
//! per-call average over several short timing batches: the 2 cores of the project machine are
//! shared with other jobs, and the minimum is the estimate least moved by their bursts.
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use ferrotune::quant::{Isa, QuantWeight};
use std::time::{Duration, Instant};

const SHAPES: [(usize, usize, &str); 5] = [
    (576, 576, "q/o proj"),
    (192, 576, "k/v proj"),
    (1536, 576, "gate/up"),
    (576, 1536, "down"),
    (49152, 576, "lm_head"),
];

/// Best seconds per call of `f`, over `batches` batches each lasting about `per_batch`.
fn time(mut f: impl FnMut(), per_batch: Duration, batches: usize) -> f64 {
    let t0 = Instant::now();
    let mut n = 0usize;
    while t0.elapsed() < per_batch / 4 || n < 3 {
        f();
        n += 1;
    }
    let reps =
        ((per_batch.as_secs_f64() / (t0.elapsed().as_secs_f64() / n as f64)) as usize).max(1);
    let mut v: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[0]
}

fn weights(n: usize, k: usize, dtype: GgmlDType) -> (QuantWeight, QMatMul, Tensor) {
    let w = (Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap())
        .contiguous()
        .unwrap();
    let ours = QuantWeight::quantize(&w, dtype).unwrap();
    let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
    (ours, candle, w)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map(String::as_str).unwrap_or("all");
    let quick = args.iter().any(|a| a == "--quick");
    let (per_batch, batches) = if quick {
        (Duration::from_millis(10), 10)
    } else {
        (Duration::from_millis(20), 25)
    };
    let candle_threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!(
        "best kernel level: {:?}; candle threads: {candle_threads}",
        Isa::best()
    );
    if what == "expb" {
        let dt = match args.get(2).map(String::as_str) {
            Some("q4_1") => GgmlDType::Q4_1,
            _ => GgmlDType::Q8_0,
        };
        let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1536);
        let th: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
        let k: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(576);
        let m = 512;
        let (ours, _, wf) = weights(n, k, dt);
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut y = vec![0f32; m * n];
        let wt = wf.t().unwrap();
        for _ in 0..3 {
            let t = time(
                || ours.matmul_with(Isa::best(), th, &xv, m, &mut y),
                per_batch,
                batches,
            );
            let tf = time(|| drop(x.matmul(&wt).unwrap()), per_batch, batches);
            let gmac = (m * n * k) as f64 / 1e9;
            println!("{dt:?} {m}x{k} @ {n}x{k}^T {th}T: ours {:.2} ms {:.1} GMAC/s | f32 {:.2} ms {:.1} GMAC/s", t * 1e3, gmac / t, tf * 1e3, gmac / tf);
        }
        return;
    }
    if what == "exp" {
        let dt = match args.get(2).map(String::as_str) {
            Some("q4_1") => GgmlDType::Q4_1,
            _ => GgmlDType::Q8_0,
        };
        let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(49152);
        let th: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
        let k: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(576);
        let (ours, _, _) = weights(n, k, dt);
        let copies = (256_000_000 / ours.storage_bytes()).max(1);
        let all: Vec<QuantWeight> = (0..copies).map(|_| weights(n, k, dt).0).collect();
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, k, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut y = vec![0f32; n];
        for _ in 0..3 {
            let t = time(
                || ours.matvec_with(Isa::best(), th, &x, &mut y),
                per_batch,
                batches,
            );
            let mut i = 0;
            let tc = time(
                || {
                    i = (i + 1) % copies;
                    all[i].matvec_with(Isa::best(), th, &x, &mut y)
                },
                per_batch,
                batches,
            );
            let gb = ours.storage_bytes() as f64 / 1e9;
            println!(
                "{dt:?} {n}x{k} {th}T: hot {:.1} us {:.1} GB/s | cold {:.1} us {:.1} GB/s",
                t * 1e6,
                gb / t,
                tc * 1e6,
                gb / tc
            );
        }
        return;
    }
    if what == "overhead" || what == "all" {
        overhead(per_batch, batches);
    }
    if what == "matvec" || what == "all" {
        matvec(per_batch, batches);
    }
    if what == "batch" || what == "all" {
        batch(per_batch, batches);
    }
}

/// Fork/join cost with (almost) no work: what a tiny decode matvec pays to use a second thread.
fn overhead(per_batch: Duration, batches: usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sink = AtomicUsize::new(0);
    let work = |r: std::ops::Range<usize>| {
        sink.fetch_add(r.len(), Ordering::Relaxed);
    };
    println!("\n## fork/join overhead, 2 items of no work: us per call");
    let ours = time(
        || ferrotune::quant::parallel_chunks(2, 1, 2, work),
        per_batch,
        batches,
    );
    let join = time(
        || {
            rayon::join(|| work(0..1), || work(1..2));
        },
        per_batch,
        batches,
    );
    let scope = time(
        || {
            use rayon::prelude::*;
            (0..2usize).into_par_iter().for_each(|i| work(i..i + 1))
        },
        per_batch,
        batches,
    );
    println!("| ferrotune pool (2 threads) | rayon::join | rayon par_iter |");
    println!("|---|---|---|");
    println!(
        "| {:.2} | {:.2} | {:.2} |",
        ours * 1e6,
        join * 1e6,
        scope * 1e6
    );
}

fn matvec(per_batch: Duration, batches: usize) {
    println!("\n## matvec (one activation row): us per call, (GB/s of weight data)");
    println!(
        "| dtype | shape (out x in) | MB | ours 1T | ours 2T | ours AVX2 1T | candle QMatMul |"
    );
    println!("|---|---|---|---|---|---|---|");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
        for &(n, k, name) in &SHAPES {
            let (ours, candle, _) = weights(n, k, dtype);
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, k, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
            let mut y = vec![0f32; n];
            let mb = ours.storage_bytes() as f64 / 1e6;
            let cell = |s: f64| format!("{:.2} ({:.1})", s * 1e6, mb / 1e3 / s);
            let t1 = time(
                || ours.matvec_with(Isa::best(), 1, &x, &mut y),
                per_batch,
                batches,
            );
            let t2 = time(
                || ours.matvec_with(Isa::best(), 2, &x, &mut y),
                per_batch,
                batches,
            );
            let ta = if Isa::Avx2.available() {
                cell(time(
                    || ours.matvec_with(Isa::Avx2, 1, &x, &mut y),
                    per_batch,
                    batches,
                ))
            } else {
                "-".into()
            };
            let tc = time(
                || {
                    candle.forward(&xt).unwrap();
                },
                per_batch,
                batches,
            );
            println!(
                "| {dtype:?} | {n}x{k} {name} | {mb:.2} | {} | {} | {ta} | {} |",
                cell(t1),
                cell(t2),
                cell(tc)
            );
        }
    }
}

fn batch(per_batch: Duration, batches: usize) {
    println!("\n## batched (training / prefill): ms per call, 2 threads");
    println!("| dtype | shape | rows | ours fwd | candle QMatMul fwd | f32 matmul fwd | ours backward_input | f32 matmul bwd (g @ W) |");
    println!("|---|---|---|---|---|---|---|---|");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for &(n, k, name) in &SHAPES[..4] {
            for m in [128usize, 512] {
                let (ours, candle, wf) = weights(n, k, dtype);
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
                let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut y = vec![0f32; m * n];
                let wt = wf.t().unwrap();
                let ms = |s: f64| format!("{:.2}", s * 1e3);
                let to = time(
                    || ours.matmul_with(Isa::best(), 2, &xv, m, &mut y),
                    per_batch,
                    batches,
                );
                let tc = time(
                    || {
                        candle.forward(&x).unwrap();
                    },
                    per_batch,
                    batches,
                );
                let tf = time(
                    || {
                        x.matmul(&wt).unwrap();
                    },
                    per_batch,
                    batches,
                );
                let tb = time(
                    || {
                        ours.backward_input(&g).unwrap();
                    },
                    per_batch,
                    batches,
                );
                let tfb = time(
                    || {
                        g.matmul(&wf).unwrap();
                    },
                    per_batch,
                    batches,
                );
                println!(
                    "| {dtype:?} | {n}x{k} {name} | {m} | {} | {} | {} | {} | {} |",
                    ms(to),
                    ms(tc),
                    ms(tf),
                    ms(tb),
                    ms(tfb)
                );
            }
        }
    }
}
