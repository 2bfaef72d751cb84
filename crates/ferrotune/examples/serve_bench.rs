//! The serving scheduler and engine without HTTP or a client: aggregate decode tokens/s at
//! 1 and N concurrent greedy sequences on a GGUF / HF model, so a change to the batched step
//! can be measured without the noise of the Python clients sharing the cores
//! (`bench/serve_load.py` is the end-to-end figure).
//!
//! `cargo run --release --example serve_bench -- [MODEL] [--streams 1,8] [--requests 3]
//! [--tokens 64] [--threads T] [--activation-bits 8|16] [--kv-cache f32|f16]`
//!
//! Each stream runs `--requests` requests one after another (closed loop, like a client);
//! each prompt is a shared 30-token prefix plus its own 15 tokens (the bench's chat prompts:
//! a system prompt the prefix cache keeps, then the question) and generates exactly
//! `--tokens` tokens (no stop ids).
use ferrotune::model::{self, LoadOptions};
use ferrotune::serve::fast::FastBatchBackend;
use ferrotune::serve::{GenRequest, SamplingParams, SchedulerConfig, SeqEvent};
use std::sync::mpsc;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let path = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
            .into()
        });
    // a count from a flag, 1 to `max`; anything else is a one-line error
    let count = |name: &str, v: &str, max: usize| -> usize {
        match v.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => fail(&format!(
                "{name} {v:?}: expected a whole number from 1 to {max}"
            )),
        }
    };
    let streams: Vec<usize> = flag("--streams")
        .unwrap_or_else(|| "1,8".into())
        .split(',')
        .map(|s| count("--streams", s, 256))
        .collect();
    let requests = flag("--requests").map_or(3, |s| count("--requests", &s, 10_000));
    let tokens = flag("--tokens").map_or(64, |s| count("--tokens", &s, 100_000));
    if let Some(t) = flag("--threads") {
        ferrotune::quant::set_num_threads(count("--threads", &t, 1024));
    }
    let lm = model::load(&path, &LoadOptions::default(), &candle_core::Device::Cpu).unwrap_or_else(
        |e| {
            fail(&format!(
                "{e} (run scripts/fetch-models.sh, or pass a model)"
            ))
        },
    );
    if let Some(b) = flag("--activation-bits") {
        use ferrotune::quant::{ActPrecision, QuantSettings};
        let activation = match b.as_str() {
            "8" => ActPrecision::I8,
            "16" => ActPrecision::I16,
            _ => fail(&format!("--activation-bits {b:?}: expected 8 or 16")),
        };
        lm.model.set_quant_settings(QuantSettings {
            activation,
            ..lm.model.quant_settings()
        });
    }
    if let Some(c) = flag("--kv-cache") {
        let dtype = ferrotune::engine::KvDtype::parse(&c)
            .unwrap_or_else(|| fail(&format!("--kv-cache {c:?}: expected f32 or f16")));
        match lm.model.downcast_ref::<ferrotune::model::Llama>() {
            Some(l) => l.set_kv_cache_dtype(dtype),
            None => fail("--kv-cache: the fast engine runs LLaMA-family models"),
        }
    }
    let backend = FastBatchBackend::new(lm.model)
        .unwrap_or_else(|e| fail(&format!("{path}: the fast engine cannot run it: {e}")));
    let max = streams.iter().copied().max().unwrap_or(1);
    let handle = ferrotune::serve::start(
        Box::new(backend),
        SchedulerConfig {
            max_concurrent: max,
            ..Default::default()
        },
    );
    let vocab = handle.vocab_size() as u32;
    // Deterministic pseudo-random ids away from the special tokens at the start of the vocab.
    let ids = |seed: u32, n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| 1000 + (seed.wrapping_mul(7919) + i * 104_729) % (vocab - 1000))
            .collect()
    };
    let prefix = ids(1, 30);
    let mut base = None;
    println!(
        "{path}: {} threads, {requests} requests x {tokens} tokens a stream",
        ferrotune::quant::num_threads()
    );
    for &n in &streams {
        let (tx, rx) = mpsc::channel::<Result<usize, String>>();
        let submit = |k: usize, tx: mpsc::Sender<Result<usize, String>>| {
            let mut prompt = prefix.clone();
            prompt.extend(ids(100 + k as u32, 15));
            let req = GenRequest {
                prompt,
                adapter: None,
                max_tokens: tokens,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                logprobs: None,
                stop_ids: Vec::new(),
                constraint: None,
            };
            let mut count = 0usize;
            let sink = Box::new(move |e: SeqEvent| {
                match e {
                    SeqEvent::Token { .. } => count += 1,
                    SeqEvent::Finished { .. } => {
                        let _ = tx.send(Ok(count));
                    }
                    SeqEvent::Failed(m) => {
                        let _ = tx.send(Err(m));
                    }
                }
                true
            });
            if let Err(e) = handle.submit(req, sink) {
                fail(&format!("a request was refused: {e:?}"));
            }
        };
        // warm-up: one request (panels built, prefix cached)
        submit(0, tx.clone());
        finished(&rx);
        let t0 = Instant::now();
        let mut next = 0;
        for _ in 0..n {
            submit(next, tx.clone());
            next += 1;
        }
        let (mut done, mut total) = (0, 0);
        while done < n * requests {
            total += finished(&rx);
            done += 1;
            if next < n * requests {
                submit(next, tx.clone());
                next += 1;
            }
        }
        let rate = total as f64 / t0.elapsed().as_secs_f64();
        let b = *base.get_or_insert(rate);
        println!(
            "{n:>3} stream(s): {total} tokens in {:.2} s = {rate:.1} tok/s ({:.2}x 1 stream)",
            t0.elapsed().as_secs_f64(),
            rate / b
        );
    }
    handle.shutdown();
    handle.join();
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

/// The next finished request's token count; a failed request ends the run.
fn finished(rx: &mpsc::Receiver<Result<usize, String>>) -> usize {
    match rx.recv() {
        Ok(Ok(n)) => n,
        Ok(Err(m)) => fail(&format!("a request failed: {m}")),
        Err(_) => fail("the scheduler stopped"),
    }
}
