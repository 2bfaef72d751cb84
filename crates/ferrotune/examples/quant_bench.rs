//! Micro-benchmark of the quantized kernels against candle's `QMatMul` on SmolLM2-135M shapes.
//!
//! ```text
//! cargo run --release --example quant_bench -- [overhead|matvec|batch|all] [--quick]
//! cargo run --release --example quant_bench -- one q4_1|q8_0 OUT IN THREADS   # one matvec shape
//! cargo run --release --example quant_bench -- one-batch q4_1|q8_0 OUT IN ROWS THREADS
//! cargo run --release --example quant_bench -- decode [GGUF]   # every matvec of one token
//! cargo run --release --example quant_bench -- decode-rows q4_1|q8_0 OUT IN THREADS   # batched decode
//! cargo run --release --example quant_bench -- train [ROWS] [THREADS]   # QLoRA formats, batched
//! ```
//!
//! * `train`: the batched forward (`m` activation rows, default 1024) and input-gradient products
//!   of a training step on SmolLM2's layer shapes for Q4_1 (8-bit activations, as training runs
//!   it), NF4 (decoded tiles + f32 GEMM), and f32 (candle's matmul), at the best level allowed
//!   by `FERROTUNE_QUANT_ISA`.
//!
//! * `decode`, `one`, `one-batch` and `batch` time both activation precisions (16-bit, the
//!   default, and 8-bit); the `matvec` table uses the one `FERROTUNE_ACT_BITS` selects.
//! * "hot": the same matrix every call (it stays in cache). "cold": calls rotate over copies
//!   totalling more than 150 MB, so weights come from DRAM, as in decode, where a token touches
//!   every weight of the model once.
//! * candle's thread count is fixed when its pool starts: run with `CANDLE_NUM_THREADS=1` and
//!   `=2` to get both candle columns (and `RAYON_NUM_THREADS` for the f32 matmul). Our thread
//!   count is set per call.
//! * Each number is the best (minimum) per-call average over several short timing batches: the 2
//!   cores of the project machine are shared with other jobs, and the minimum is the estimate
//!   least moved by their bursts.
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use ferrotune::quant::{ActPrecision, Isa, QuantSettings, QuantWeight};
use std::time::{Duration, Instant};

const SHAPES: [(usize, usize, &str); 5] = [
    (576, 576, "q/o proj"),
    (192, 576, "k/v proj"),
    (1536, 576, "gate/up"),
    (576, 1536, "down"),
    (49152, 576, "lm_head"),
];

/// Bytes of weight copies the "cold" measurements rotate over (several times any L3).
const COLD_BYTES: usize = 150_000_000;

const PRECS: [ActPrecision; 2] = [ActPrecision::I16, ActPrecision::I8];

/// Best seconds per call of `f`, over `batches` batches each lasting about `per_batch`.
fn time(mut f: impl FnMut(), per_batch: Duration, batches: usize) -> f64 {
    let t0 = Instant::now();
    let mut n = 0usize;
    while t0.elapsed() < per_batch / 4 || n < 3 {
        f();
        n += 1;
    }
    let per_call = t0.elapsed().as_secs_f64() / n as f64;
    let reps = ((per_batch.as_secs_f64() / per_call) as usize).max(1);
    (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn dtype_arg(s: Option<&String>) -> GgmlDType {
    match s.map(String::as_str) {
        Some("q4_0") => GgmlDType::Q4_0,
        Some("q8_0") => GgmlDType::Q8_0,
        _ => GgmlDType::Q4_1,
    }
}

fn random_weight(n: usize, k: usize) -> Tensor {
    Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap()
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
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "default".into());
    println!(
        "best kernel level: {:?}; CANDLE_NUM_THREADS={}, RAYON_NUM_THREADS={}",
        Isa::best(),
        env("CANDLE_NUM_THREADS"),
        env("RAYON_NUM_THREADS")
    );
    match what {
        "train" => {
            let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
            train_shapes(arg(2, 1024), arg(3, 2), per_batch, batches);
        }
        "one" => {
            let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
            let dtype = dtype_arg(args.get(2));
            let (n, k, threads) = (arg(3, 576), arg(4, 576), arg(5, 1));
            one(dtype, n, k, threads, per_batch, batches);
        }
        "one-batch" => {
            let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
            let dtype = dtype_arg(args.get(2));
            let (n, k, m, threads) = (arg(3, 1536), arg(4, 576), arg(5, 512), arg(6, 1));
            one_batch(dtype, n, k, m, threads, per_batch, batches);
        }
        "decode-rows" => {
            let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
            let dtype = dtype_arg(args.get(2));
            let (n, k, threads) = (arg(3, 1536), arg(4, 576), arg(5, 1));
            decode_rows(dtype, n, k, threads, per_batch, batches);
        }
        "decode" => {
            let path = args
                .get(2)
                .filter(|a| !a.starts_with("--"))
                .cloned()
                .unwrap_or_else(|| {
                    // The model scripts/fetch-models.sh fetches, relative to the repository.
                    concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../../.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
                    )
                    .into()
                });
            decode(&path, per_batch, batches);
        }
        "overhead" => overhead(per_batch, batches),
        "matvec" => matvec(per_batch, batches),
        "batch" => batch(per_batch, batches),
        _ => {
            overhead(per_batch, batches);
            matvec(per_batch, batches);
            batch(per_batch, batches);
        }
    }
}

/// All weight matvecs of one decode step of a real GGUF model (every 2-D tensor once, the tied
/// embedding as the lm_head), in file order: the matmul budget of a token, weights from DRAM.
fn decode(path: &str, per_batch: Duration, batches: usize) {
    use candle_core::quantized::gguf_file;
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| {
        eprintln!("error: {path}: {e} (run scripts/fetch-models.sh, or pass a GGUF path)");
        std::process::exit(1)
    });
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut ours = Vec::new();
    let mut candle = Vec::new();
    let mut bytes = 0usize;
    for (name, info) in &ct.tensor_infos {
        if info.shape.rank() != 2 || name == "output.weight" {
            continue;
        }
        let q = ct.tensor(&mut f, name, &Device::Cpu).unwrap();
        bytes += q.storage_size_in_bytes();
        candle.push(QMatMul::from_qtensor(ct.tensor(&mut f, name, &Device::Cpu).unwrap()).unwrap());
        ours.push(QuantWeight::from_qtensor(q).unwrap());
    }
    let xs: Vec<Vec<f32>> = ours
        .iter()
        .map(|w| {
            Tensor::randn(0f32, 1.0, w.shape().1, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let xts: Vec<Tensor> = xs
        .iter()
        .map(|x| Tensor::from_vec(x.clone(), (1, x.len()), &Device::Cpu).unwrap())
        .collect();
    let mut ys: Vec<Vec<f32>> = ours.iter().map(|w| vec![0f32; w.shape().0]).collect();
    println!(
        "\n## decode: all {} weight matvecs of one token ({:.1} MB), ms per token",
        ours.len(),
        bytes as f64 / 1e6
    );
    println!("| ours I16 1T | ours I16 2T | ours I8 1T | ours I8 2T | candle QMatMul |");
    println!("|---|---|---|---|---|");
    let mut run = |prec: ActPrecision, threads: usize| {
        time(
            || {
                for ((w, x), y) in ours.iter().zip(&xs).zip(ys.iter_mut()) {
                    w.matvec_with(Isa::best(), prec, threads, x, y);
                }
            },
            per_batch,
            batches,
        )
    };
    // interleaved, so a burst of load from other jobs hits both precisions alike
    let (mut t16, mut t8) = ([f64::INFINITY; 2], [f64::INFINITY; 2]);
    for _ in 0..2 {
        for (i, threads) in [1, 2].into_iter().enumerate() {
            t16[i] = t16[i].min(run(ActPrecision::I16, threads));
            t8[i] = t8[i].min(run(ActPrecision::I8, threads));
        }
    }
    let tc = time(
        || {
            for (w, x) in candle.iter().zip(&xts) {
                w.forward(x).unwrap();
            }
        },
        per_batch,
        batches,
    );
    println!(
        "| {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        t16[0] * 1e3,
        t16[1] * 1e3,
        t8[0] * 1e3,
        t8[1] * 1e3,
        tc * 1e3
    );
}

/// Fork/join cost: 2 items of no work (the caller's fixed cost), and 2 items of 2 us of busy
/// work each (ideal: 2 us on two threads, 4 us on one).
fn overhead(per_batch: Duration, batches: usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sink = AtomicUsize::new(0);
    println!("\n## fork/join: us per call");
    println!("| work per item | ferrotune pool (2 threads) | rayon::join | rayon par_iter |");
    println!("|---|---|---|---|");
    for busy_us in [0u64, 2] {
        let work = |r: std::ops::Range<usize>| {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(busy_us) {
                std::hint::spin_loop();
            }
            sink.fetch_add(r.len(), Ordering::Relaxed);
        };
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
        let par_iter = time(
            || {
                use rayon::prelude::*;
                (0..2usize).into_par_iter().for_each(|i| work(i..i + 1))
            },
            per_batch,
            batches,
        );
        println!(
            "| {busy_us} us | {:.2} | {:.2} | {:.2} |",
            ours * 1e6,
            join * 1e6,
            par_iter * 1e6
        );
    }
}

/// One matvec shape, hot and cold, a few repetitions (for quick kernel experiments).
fn one(dtype: GgmlDType, n: usize, k: usize, threads: usize, per_batch: Duration, batches: usize) {
    let w = QuantWeight::quantize(&random_weight(n, k), dtype).unwrap();
    let copies = (COLD_BYTES / w.storage_bytes()).max(2);
    let all: Vec<QuantWeight> = (0..copies)
        .map(|_| QuantWeight::quantize(&random_weight(n, k), dtype).unwrap())
        .collect();
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, k, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut y = vec![0f32; n];
    let gb = w.storage_bytes() as f64 / 1e9;
    let deq = time(|| drop(w.dequantize().unwrap()), per_batch, batches);
    println!(
        "dequantize: {:.1} us ({:.2} ns per value)",
        deq * 1e6,
        deq * 1e9 / (n * k) as f64
    );
    for _ in 0..3 {
        for prec in PRECS {
            let hot = time(
                || w.matvec_with(Isa::best(), prec, threads, &x, &mut y),
                per_batch,
                batches,
            );
            let mut i = 0;
            let cold = time(
                || {
                    i = (i + 1) % copies;
                    all[i].matvec_with(Isa::best(), prec, threads, &x, &mut y)
                },
                per_batch,
                batches,
            );
            println!(
                "{dtype:?} {n}x{k} {threads}T {prec:?}: hot {:.1} us {:.1} GB/s | cold {:.1} us {:.1} GB/s",
                hot * 1e6,
                gb / hot,
                cold * 1e6,
                gb / cold
            );
        }
    }
}

/// One batched shape: ours (every kernel level) against candle's f32 matmul, in GMAC/s.
/// Forward and input-gradient products of one training step's layer shapes, per format.
fn train_shapes(m: usize, threads: usize, per_batch: Duration, batches: usize) {
    use ferrotune::quant::{BackwardWeights, BaseQuant};
    ferrotune::quant::set_num_threads(threads);
    let isa = Isa::best();
    println!("rows {m}, {threads} threads, {isa:?}");
    let nf4 = BaseQuant::parse("nf4", true).unwrap().unwrap();
    let mut totals = [0f64; 6];
    for (n, k, what) in &SHAPES[..4] {
        let (n, k) = (*n, *k);
        let wf = random_weight(n, k);
        let q41 = QuantWeight::quantize(&wf, GgmlDType::Q4_1).unwrap();
        q41.set_settings(QuantSettings {
            activation: ActPrecision::I8,
            backward: BackwardWeights::Q8Transposed,
        });
        let q4n = nf4.quantize(&wf).unwrap().unwrap();
        q4n.set_settings(QuantSettings {
            activation: ActPrecision::I8,
            backward: BackwardWeights::Q8Transposed,
        });
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
        let wt = wf.t().unwrap().contiguous().unwrap();
        let gmac = (m * n * k) as f64 / 1e9;
        let t = [
            time(|| drop(q41.forward(&x).unwrap()), per_batch, batches),
            time(|| drop(q4n.forward(&x).unwrap()), per_batch, batches),
            time(|| drop(x.matmul(&wt).unwrap()), per_batch, batches),
            time(|| drop(q41.backward_input(&g).unwrap()), per_batch, batches),
            time(|| drop(q4n.backward_input(&g).unwrap()), per_batch, batches),
            time(|| drop(g.matmul(&wf).unwrap()), per_batch, batches),
        ];
        for (tot, v) in totals.iter_mut().zip(&t) {
            *tot += v;
        }
        println!(
            "{what:<9} {n}x{k}: forward q4_1 {:.2} ms ({:.0} GMAC/s), nf4 {:.2} ms ({:.0}), f32 {:.2} ms ({:.0}); backward q4_1 {:.2} ms ({:.0}), nf4 {:.2} ms ({:.0}), f32 {:.2} ms ({:.0})",
            t[0] * 1e3, gmac / t[0], t[1] * 1e3, gmac / t[1], t[2] * 1e3, gmac / t[2],
            t[3] * 1e3, gmac / t[3], t[4] * 1e3, gmac / t[4], t[5] * 1e3, gmac / t[5],
        );
    }
    println!(
        "sum over the 4 shapes (ms): forward q4_1 {:.1}, nf4 {:.1}, f32 {:.1}; backward q4_1 {:.1}, nf4 {:.1}, f32 {:.1}",
        totals[0] * 1e3, totals[1] * 1e3, totals[2] * 1e3, totals[3] * 1e3, totals[4] * 1e3, totals[5] * 1e3
    );
}

fn one_batch(
    dtype: GgmlDType,
    n: usize,
    k: usize,
    m: usize,
    threads: usize,
    per_batch: Duration,
    batches: usize,
) {
    let wf = random_weight(n, k);
    let w = QuantWeight::quantize(&wf, dtype).unwrap();
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let mut y = vec![0f32; m * n];
    let wt = wf.t().unwrap();
    let gmac = (m * n * k) as f64 / 1e9;
    for isa in [Isa::Avx512, Isa::Avx2, Isa::Scalar]
        .into_iter()
        .filter(|i| i.available())
    {
        for prec in PRECS {
            let t = time(
                || w.matmul_with(isa, prec, threads, &xv, m, &mut y),
                per_batch,
                batches,
            );
            println!(
                "{dtype:?} ({m}x{k}) @ ({n}x{k})^T, {threads}T, {isa:?} {prec:?}: {:.2} ms, {:.1} GMAC/s",
                t * 1e3,
                gmac / t
            );
        }
    }
    // The same product as the training backward runs it: through the transposed Q8_0 copy of a
    // (k x n) weight (narrowed to -63..=63 where the backward narrows it), 8-bit activations.
    let wk = QuantWeight::quantize(&random_weight(k, n), dtype).unwrap();
    ferrotune::quant::set_num_threads(threads);
    let t = time(
        || {
            drop(
                wk.backward_input_with(&x, ferrotune::quant::BackwardWeights::Q8Transposed)
                    .unwrap(),
            )
        },
        per_batch,
        batches,
    );
    println!(
        "transposed Q8_0 copy (as the backward), {threads}T: {:.2} ms, {:.1} GMAC/s",
        t * 1e3,
        gmac / t
    );
    let t = time(|| drop(x.matmul(&wt).unwrap()), per_batch, batches);
    println!(
        "f32 matmul (RAYON_NUM_THREADS threads): {:.2} ms, {:.1} GMAC/s",
        t * 1e3,
        gmac / t
    );
    let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
    ferrotune::quant::set_num_threads(threads);
    let t = time(|| drop(w.backward_input(&g).unwrap()), per_batch, batches);
    println!(
        "backward_input, {threads}T: {:.2} ms, {:.1} GMAC/s",
        t * 1e3,
        gmac / t
    );
    let t = time(|| drop(g.matmul(&wf).unwrap()), per_batch, batches);
    println!(
        "f32 g @ W (RAYON_NUM_THREADS threads): {:.2} ms, {:.1} GMAC/s",
        t * 1e3,
        gmac / t
    );
}

fn matvec(per_batch: Duration, batches: usize) {
    let prec = QuantSettings::default().activation;
    println!(
        "\n## matvec (one activation row), {prec:?} activations: us per call (GB/s of weight data)"
    );
    println!("| dtype | shape (out x in) | MB | ours 1T hot | ours 1T cold | ours 2T hot | ours 2T cold | ours AVX2 1T hot | candle hot | candle cold |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
        for &(n, k, name) in &SHAPES {
            let make = || {
                let w = random_weight(n, k);
                let ours = QuantWeight::quantize(&w, dtype).unwrap();
                let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
                (ours, candle)
            };
            let (ours, candle) = make();
            let copies = (COLD_BYTES / ours.storage_bytes()).max(2);
            let all: Vec<_> = (0..copies).map(|_| make()).collect();
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, k, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
            let mut y = vec![0f32; n];
            let mb = ours.storage_bytes() as f64 / 1e6;
            let cell = |s: f64| format!("{:.2} ({:.1})", s * 1e6, mb / 1e3 / s);
            let mut i = 0;
            let mut next = || {
                i = (i + 1) % copies;
                &all[i]
            };
            let mut ours_at = |isa: Isa, threads: usize, cold: bool| {
                if cold {
                    time(
                        || next().0.matvec_with(isa, prec, threads, &x, &mut y),
                        per_batch,
                        batches,
                    )
                } else {
                    time(
                        || ours.matvec_with(isa, prec, threads, &x, &mut y),
                        per_batch,
                        batches,
                    )
                }
            };
            let o1h = cell(ours_at(Isa::best(), 1, false));
            let o1c = cell(ours_at(Isa::best(), 1, true));
            let o2h = cell(ours_at(Isa::best(), 2, false));
            let o2c = cell(ours_at(Isa::best(), 2, true));
            let avx2 = if Isa::Avx2.available() {
                cell(ours_at(Isa::Avx2, 1, false))
            } else {
                "-".into()
            };
            let ch = cell(time(
                || {
                    candle.forward(&xt).unwrap();
                },
                per_batch,
                batches,
            ));
            let mut j = 0;
            let cc = cell(time(
                || {
                    j = (j + 1) % copies;
                    all[j].1.forward(&xt).unwrap();
                },
                per_batch,
                batches,
            ));
            println!("| {dtype:?} | {n}x{k} {name} | {mb:.2} | {o1h} | {o1c} | {o2h} | {o2c} | {avx2} | {ch} | {cc} |");
        }
    }
}

fn batch(per_batch: Duration, batches: usize) {
    let threads = ferrotune::quant::num_threads();
    println!("\n## batched (training / prefill): ms per call; ours on {threads} threads, candle/f32 per the env vars above");
    println!("| dtype | shape | rows | ours fwd I16 | ours fwd I8 | ours fwd AVX2 I16 | ours fwd AVX2 I8 | candle QMatMul fwd | f32 matmul fwd | ours backward_input | f32 matmul bwd (g @ W) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for &(n, k, name) in &SHAPES[..4] {
            let wf = random_weight(n, k);
            let ours = QuantWeight::quantize(&wf, dtype).unwrap();
            let candle = QMatMul::from_qtensor(QTensor::quantize(&wf, dtype).unwrap()).unwrap();
            let wt = wf.t().unwrap();
            for m in [128usize, 512] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
                let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut y = vec![0f32; m * n];
                let ms = |s: f64| format!("{:.2}", s * 1e3);
                let mut ours_at = |isa: Isa, prec: ActPrecision| {
                    ms(time(
                        || ours.matmul_with(isa, prec, threads, &xv, m, &mut y),
                        per_batch,
                        batches,
                    ))
                };
                let (fwd, fwd8) = (
                    ours_at(Isa::best(), ActPrecision::I16),
                    ours_at(Isa::best(), ActPrecision::I8),
                );
                let (fwd2, fwd28) = (
                    ours_at(Isa::Avx2, ActPrecision::I16),
                    ours_at(Isa::Avx2, ActPrecision::I8),
                );
                let t = |f: &dyn Fn()| ms(time(f, per_batch, batches));
                let tc = t(&|| drop(candle.forward(&x).unwrap()));
                let tf = t(&|| drop(x.matmul(&wt).unwrap()));
                let tb = t(&|| drop(ours.backward_input(&g).unwrap()));
                let tfb = t(&|| drop(g.matmul(&wf).unwrap()));
                println!("| {dtype:?} | {n}x{k} {name} | {m} | {fwd} | {fwd8} | {fwd2} | {fwd28} | {tc} | {tf} | {tb} | {tfb} |");
            }
        }
    }
}

/// Batched decode (`decode_rows_with`) at 1-16 rows, both arithmetics, weights hot (one
/// matrix) and cold (rotating over copies larger than any cache, as in a real decode step).
fn decode_rows(
    dtype: GgmlDType,
    n: usize,
    k: usize,
    threads: usize,
    per_batch: Duration,
    batches: usize,
) {
    use ferrotune::quant::DecodeArith;
    let wf = random_weight(n, k);
    let w = QuantWeight::quantize(&wf, dtype).unwrap();
    let copies = (COLD_BYTES / w.storage_bytes()).max(2);
    let cold: Vec<QuantWeight> = (0..copies)
        .map(|_| QuantWeight::quantize(&wf, dtype).unwrap())
        .collect();
    let isa = Isa::best();
    // build every copy's decode panels before timing (a real decode step finds them built)
    for wi in cold.iter().chain([&w]) {
        let x1 = vec![0.5f32; k];
        wi.decode_rows_with(isa, DecodeArith::Int, threads, &x1, 1, &mut vec![0f32; n]);
    }
    println!(
        "{dtype:?} {n}x{k}, {threads}T, {isa:?}, activations {:?} (Int); GMAC/s and per-row cost vs 1 row",
        w.settings().activation
    );
    // Int: the decode panels; row-major: the `gemv` kernels on GGML's blocks (before panels)
    println!("| rows | Int hot | row-major hot | F32 hot | Int cold | row-major cold | F32 cold |");
    println!("|---|---|---|---|---|---|---|");
    let prec = w.settings().activation;
    let mut base = [0f64; 6];
    for m in [1usize, 2, 4, 6, 8, 12, 16] {
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m * k,), &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut y = vec![0f32; m * n];
        let gmac = (m * n * k) as f64 / 1e9;
        let mut cells = Vec::new();
        for (j, (arith, hot)) in [
            (Some(DecodeArith::Int), true),
            (None, true),
            (Some(DecodeArith::F32), true),
            (Some(DecodeArith::Int), false),
            (None, false),
            (Some(DecodeArith::F32), false),
        ]
        .into_iter()
        .enumerate()
        {
            let mut i = 0;
            let t = time(
                || {
                    let wi = if hot { &w } else { &cold[i % copies] };
                    i += 1;
                    match arith {
                        Some(a) => wi.decode_rows_with(isa, a, threads, &x, m, &mut y),
                        None => wi.matvec_rows_with(isa, prec, threads, &x, m, &mut y),
                    }
                },
                per_batch,
                batches,
            );
            let rate = gmac / t;
            if m == 1 {
                base[j] = rate;
            }
            cells.push(format!("{rate:.1} ({:.2}x)", rate / base[j]));
        }
        println!("| {m} | {} |", cells.join(" | "));
    }
}
