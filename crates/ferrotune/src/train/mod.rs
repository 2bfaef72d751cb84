//! Fine-tuning recipes. [`run`] is the whole recipe and reads top to bottom: load the data,
//! the model and the method, then the loop (micro-batches, loss, gradient accumulation,
//! clipping, AdamW, schedule, evaluation, early stopping, checkpoints), then the final adapter
//! and `summary.json`.
//!
//! - [`config`]: the TOML run config (`--set` overrides, one-line errors).
//! - [`loss`]: the causal-LM loss over completion tokens, from hidden states.
//! - [`optim`]: AdamW, gradient clipping. [`schedule`]: learning-rate schedules.
//! - [`method`]: what the loop needs from a method (LoRA today).
//! - [`checkpoint`]: atomic checkpoints and exact resume. [`report`]: metrics, plot, progress.
//! - [`output`]: the run folder: created and marked by ferrotune, never a folder of the user's;
//!   a run in it needs `--resume` or `--overwrite`.
//! - [`compare`]: generate over a data file with the base model and adapters and score them.
//!
//! A resumed run continues exactly: the adapter, the optimizer state, the data cursor and the
//! dropout RNG are restored, so on CPU a run interrupted and resumed ends with the same adapter,
//! bit for bit, as one that was never interrupted. [`RunOptions::interrupt`] (Ctrl-C) stops a
//! run at the next step boundary with a checkpoint; `--resume` of a finished run does nothing.
pub mod checkpoint;
pub mod checkpointing;
pub mod compare;
pub mod config;
pub mod loss;
pub mod memory;
pub mod method;
pub mod optim;
pub mod output;
pub mod report;
pub mod schedule;

pub use config::{load_config, parse_config, LoadedConfig, LrSchedule, Method, TrainConfig};
pub use method::{Tuner, ADAPTER_NAME};
pub use optim::{AdamW, AdamWConfig};
pub use report::ProgressMode;
pub use schedule::Schedule;

use crate::data::{self, Batch, BatchConfig, Batcher, Prepared};
use crate::model::{self, LoadOptions, LoadedModel, ModelSource};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use checkpoint::{RngState, TrainerState};
use report::{MetricsLog, Progress, StepLine};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Where the final adapter goes, under `output_dir`.
pub const ADAPTER_DIR: &str = "adapter";
pub const SUMMARY_FILE: &str = "summary.json";
/// The effective config (after `--set`), saved with the run.
pub const CONFIG_FILE: &str = "config.toml";

/// How to run, besides the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint in `output_dir` (start fresh if there is none).
    pub resume: bool,
    /// Start again in an `output_dir` that holds a run, removing only the files a run writes.
    pub overwrite: bool,
    pub progress: ProgressMode,
    /// Set (e.g. by a Ctrl-C handler) to stop at the next step boundary: the run writes a
    /// checkpoint and returns with [`StopReason::Interrupted`]; `--resume` continues it.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxSteps,
    EarlyStopping,
    StopAfter,
    /// [`RunOptions::interrupt`] was set (Ctrl-C).
    Interrupted,
}

impl StopReason {
    /// The name `summary.json` uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::MaxSteps => "max_steps",
            StopReason::EarlyStopping => "early_stopping",
            StopReason::StopAfter => "stop_after",
            StopReason::Interrupted => "interrupted",
        }
    }
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub method: String,
    /// Optimizer steps done (over all sessions of a resumed run).
    pub steps: usize,
    pub max_steps: usize,
    pub epochs: f64,
    /// Non-padding tokens processed, prompt and completion (over all sessions).
    pub train_tokens: u64,
    /// Tokens the loss was computed on.
    pub loss_tokens: u64,
    /// `train_tokens / train_time_s`: training steps only, not evaluation or saving.
    pub train_tokens_per_s: f64,
    pub train_time_s: f64,
    pub peak_rss_bytes: u64,
    pub final_train_loss: Option<f64>,
    pub initial_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_perplexity: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<usize>,
    /// Wall time of this session (load, data, steps, evaluation, saving).
    pub wall_s: f64,
    pub stop_reason: StopReason,
    pub resumed_from_step: Option<usize>,
    pub trainable_params: usize,
    pub all_params: usize,
    /// The final adapter; None when the run stopped early on `stop_after` (not finished).
    pub adapter_dir: Option<PathBuf>,
    /// Set (not saved) when `--resume` found the run finished: this is its saved summary and
    /// nothing was done.
    #[serde(skip)]
    pub already_finished: bool,
}

/// Validation loss of some batches: mean NLL per loss token and its perplexity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Set the worker threads for rayon, candle's matmul and our quantized kernels. Only the first
/// call in a process can size rayon's global pool.
pub fn set_threads(n: usize) {
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    crate::quant::set_num_threads(n);
}

/// candle runs element-wise ops on large tensors through a spin-barrier pool of its own. Next
/// to our kernel pool and rayon that oversubscribes the cores, and a waiting thread spins while
/// the one it waits for is descheduled: on the 2-core dev machine a LoRA backward pass took
/// 2.2-4.4 s with it and 1.4 s with those ops inline (SmolLM2, batch 8 x 53). So training runs
/// them inline unless `CANDLE_NUM_THREADS` is set. Must run before candle's pool first starts.
fn inline_candle_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Only the tokenizer of a model spec (for `data preview`), without loading the weights.
pub fn load_tokenizer(spec: &str) -> Result<Tokenizer> {
    Ok(tokenizer_and_context(&model::resolve(spec)?)?.0)
}

/// The tokenizer and context length of a model, from its metadata only (no weights read).
fn tokenizer_and_context(source: &ModelSource) -> Result<(Tokenizer, usize)> {
    match source {
        ModelSource::Gguf(p) => {
            let content = model::read_gguf(p)?;
            let ctx = model::config_from_gguf(&content, p)?.max_position_embeddings;
            Ok((Tokenizer::from_gguf(&content, p)?, ctx))
        }
        ModelSource::HfDir(d) => {
            let ctx = model::config_from_hf_dir(d)?.max_position_embeddings;
            Ok((Tokenizer::from_hf_dir(d)?, ctx))
        }
    }
}

/// The examples the config describes, tokenized with `tok` (what training sees).
pub fn prepare_data(c: &LoadedConfig, tok: &Tokenizer, context: Option<usize>) -> Result<Prepared> {
    let t = &c.config.train;
    let default_len = t.max_seq_len.unwrap_or(context.unwrap_or(512).min(512));
    data::load(&c.config.data, &c.base_dir, tok, default_len)
}

/// `data preview`: the split summary, then the first `n` training examples with the trained
/// span marked (`ansi`: in green, else in `[[ ]]`).
pub fn preview(c: &LoadedConfig, n: usize, ansi: bool) -> Result<String> {
    let tok = load_tokenizer(&c.config.model)?;
    let prepared = prepare_data(c, &tok, None)?;
    let style = if ansi {
        data::PreviewStyle::Ansi
    } else {
        data::PreviewStyle::Brackets
    };
    Ok(format!(
        "{}\n\n{}",
        prepared.summary(),
        data::preview_with(&prepared.train, &tok, n, style)
    ))
}

/// Mean loss over the first `max_batches` batches of `batcher` (0 = all), without dropout.
pub fn evaluate(model: &model::Llama, batcher: &Batcher, max_batches: usize) -> Result<EvalResult> {
    let plan = batcher.plan_for(0);
    let n = if max_batches == 0 {
        plan.len()
    } else {
        max_batches.min(plan.len())
    };
    let mut total = 0.0f64;
    let mut tokens = 0usize;
    for rows in &plan[..n] {
        let batch = batcher.build(rows)?;
        let (sum, k) = loss::batch_loss_sum(model, &batch, false)?;
        total += sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        tokens += k;
    }
    let loss = if tokens == 0 {
        f64::NAN
    } else {
        total / tokens as f64
    };
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

/// What [`accumulate_gradients`] computed for one optimizer step.
pub struct StepGrads {
    /// Mean loss per loss token over the step's micro-batches.
    pub loss: f64,
    /// Gradients of the parameters, in order.
    pub grads: Vec<candle_core::Tensor>,
    /// Loss tokens over the step.
    pub loss_tokens: usize,
    /// Training forward passes run (micro-batches with at least one loss token).
    pub forwards: usize,
    /// Seconds in forward passes (with checkpointing: the first, graph-free pass).
    pub forward_s: f64,
    /// Seconds in backward passes (with checkpointing: including the recomputation).
    pub backward_s: f64,
}

/// One optimizer step's worth of micro-batches: the loss of each is its token sum divided by
/// the loss tokens of *all* of them, so the accumulated gradient is that of the mean over the
/// step's tokens (k micro-batches equal one batch k times larger).
pub fn accumulate_gradients(
    model: &model::Llama,
    params: &[(String, candle_core::Var)],
    batches: &[Batch],
) -> Result<StepGrads> {
    accumulate_gradients_with(model, params, batches, false)
}

/// [`accumulate_gradients`], with activation checkpointing per decoder layer when
/// `checkpointing` is set (the same gradients up to float rounding; see [`checkpointing`]).
pub fn accumulate_gradients_with(
    model: &model::Llama,
    params: &[(String, candle_core::Var)],
    batches: &[Batch],
    checkpointing: bool,
) -> Result<StepGrads> {
    let n_total: usize = batches.iter().map(|b| b.n_loss_tokens).sum();
    let mut grads: Vec<Option<candle_core::Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0.0f64;
    let mut forwards = 0;
    let (mut forward_s, mut backward_s) = (0.0, 0.0);
    let mut add = |i: usize, g: &candle_core::Tensor| -> Result<()> {
        grads[i] = Some(match grads[i].take() {
            None => g.clone(),
            Some(acc) => (acc + g)?,
        });
        Ok(())
    };
    for batch in batches {
        if batch.n_loss_tokens == 0 {
            continue;
        }
        forwards += 1;
        if checkpointing {
            let mb = checkpointing::loss_and_grads(model, params, batch, 1.0 / n_total as f64)?;
            loss_sum += mb.loss_sum;
            forward_s += mb.forward_s;
            backward_s += mb.backward_s;
            for (i, ((name, _), g)) in params.iter().zip(mb.grads).enumerate() {
                let g = g.ok_or_else(|| no_gradient(name))?;
                add(i, &g)?;
            }
            continue;
        }
        let t0 = Instant::now();
        let (sum, _) = loss::batch_loss_sum(model, batch, true)?;
        loss_sum += sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let t1 = Instant::now();
        forward_s += (t1 - t0).as_secs_f64();
        let scaled = (sum / n_total as f64)?;
        let store = scaled.backward()?;
        for (i, (name, var)) in params.iter().enumerate() {
            let g = store
                .get(var.as_tensor())
                .ok_or_else(|| no_gradient(name))?;
            add(i, g)?;
        }
        backward_s += t1.elapsed().as_secs_f64();
    }
    let grads = grads
        .into_iter()
        .zip(params)
        .map(|(g, (_, v))| match g {
            Some(g) => Ok(g),
            None => Ok(candle_core::Tensor::zeros(
                v.shape(),
                v.dtype(),
                v.device(),
            )?),
        })
        .collect::<Result<Vec<_>>>()?;
    let mean = if n_total == 0 {
        0.0
    } else {
        loss_sum / n_total as f64
    };
    Ok(StepGrads {
        loss: mean,
        grads,
        loss_tokens: n_total,
        forwards,
        forward_s,
        backward_s,
    })
}

fn no_gradient(name: &str) -> Error {
    Error::msg(format!(
        "parameter {name} got no gradient (an op without a backward pass cut the graph)"
    ))
}

/// What [`execute`] did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The run trained (to the end, or until it stopped early or was interrupted).
    Trained(Summary),
    /// `--resume` of a run that had finished: nothing was done or written; its summary.
    AlreadyFinished(Summary),
    /// `dry_run`: everything was checked and nothing was written.
    DryRun(DryRun),
}

/// What a dry run found: what the run would train, on what, and where.
#[derive(Debug, Clone)]
pub struct DryRun {
    /// `model M (gguf, 30 layers); method lora`.
    pub model: String,
    /// PEFT's trainable-parameters line.
    pub params: String,
    pub memory: memory::MemoryEstimate,
    /// The memory available to the run, where it can be read.
    pub available_bytes: Option<u64>,
    /// The split summary of the data.
    pub data: String,
    pub max_steps: usize,
    /// What the run would do with `output_dir`.
    pub output: String,
}

impl std::fmt::Display for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.model)?;
        writeln!(f, "{}", self.params)?;
        writeln!(f, "{}", self.memory.table())?;
        if let Some(a) = self.available_bytes {
            writeln!(f, "memory available: {}", crate::inspect::human_bytes(a))?;
        }
        writeln!(f, "{}", self.data)?;
        writeln!(f, "max_steps: {}", self.max_steps)?;
        writeln!(f, "{}", self.output)?;
        write!(f, "dry run: nothing was written")
    }
}

/// Run the recipe. See the module docs; `c` comes from [`load_config`]. `--resume` of a run
/// that had finished returns its saved summary (with `already_finished` set) and writes
/// nothing.
pub fn run(c: &LoadedConfig, opts: &RunOptions) -> Result<Summary> {
    match execute(c, opts, false)? {
        Outcome::Trained(s) | Outcome::AlreadyFinished(s) => Ok(s),
        Outcome::DryRun(_) => Err(Error::msg("a dry run trains nothing")),
    }
}

/// Everything [`run`] checks before it writes: the config, the data (read and tokenized), the
/// model (loaded), the targets, the memory estimate, the output folder and the checkpoint to
/// resume from. Writes nothing.
pub fn dry_run(c: &LoadedConfig, opts: &RunOptions) -> Result<Outcome> {
    execute(c, opts, true)
}

/// Whether the run was asked to stop (Ctrl-C).
fn interrupted(opts: &RunOptions) -> bool {
    opts.interrupt
        .as_ref()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
}

/// The summary of the run in `out` if it finished (its max_steps reached, or early stopping)
/// with its adapter written and no checkpoint after it: then `--resume` has nothing to do.
fn finished_summary(out: &std::path::Path, max_steps: usize) -> Option<Summary> {
    let text = std::fs::read_to_string(out.join(SUMMARY_FILE)).ok()?;
    let s: Summary = serde_json::from_str(&text).ok()?;
    let done = match s.stop_reason {
        StopReason::MaxSteps => s.steps >= max_steps,
        StopReason::EarlyStopping => true,
        StopReason::StopAfter | StopReason::Interrupted => false,
    };
    let adapter = out
        .join(ADAPTER_DIR)
        .join(crate::peft::format::WEIGHTS_FILE)
        .is_file();
    let newer_checkpoint = checkpoint::latest(out)
        .ok()
        .flatten()
        .is_some_and(|(step, _)| step > s.steps);
    (done && s.adapter_dir.is_some() && adapter && !newer_checkpoint).then_some(Summary {
        already_finished: true,
        ..s
    })
}

fn execute(c: &LoadedConfig, opts: &RunOptions, dry: bool) -> Result<Outcome> {
    let wall = Instant::now();
    inline_candle_elementwise();
    let cfg = &c.config;
    let t = &cfg.train;
    let out = cfg.output_dir.clone();
    if opts.resume && opts.overwrite {
        return Err(Error::msg(
            "--resume continues the run in output_dir and --overwrite starts it again: give one of them",
        ));
    }

    // ---- Data (first: its errors should not wait for the weights to load) -----------------
    if let Some(n) = t.threads {
        set_threads(n);
    }
    let device = config::parse_device(&t.device)
        .map_err(|e| c.key_error("train.device", e))?
        .device()?;
    let source = model::resolve(&cfg.model)?;
    let (tok, ctx) = tokenizer_and_context(&source)?;
    let prepared = prepare_data(c, &tok, Some(ctx))?;
    if prepared.max_seq_len > ctx {
        let key = if t.max_seq_len.is_some() {
            "train.max_seq_len"
        } else {
            "data.max_seq_len"
        };
        return Err(c.key_error(
            key,
            format!(
                "{} is more than the model's context window of {ctx}",
                prepared.max_seq_len
            ),
        ));
    }

    // ---- Batches and the number of steps ---------------------------------------------------
    let mut train_bc = cfg
        .data
        .batch_config(t.batch_size, prepared.max_seq_len, &tok);
    train_bc.shuffle = true;
    let n_train = prepared.train.len();
    let mut batcher = Batcher::new(prepared.train.clone(), train_bc.clone(), device.clone())?;
    let val_batcher = if prepared.validation.is_empty() {
        None
    } else {
        let vc = BatchConfig {
            shuffle: false,
            ..train_bc.clone()
        };
        Some(Batcher::new(
            prepared.validation.clone(),
            vc,
            device.clone(),
        )?)
    };
    let bpe = batcher.batches_per_epoch();
    let max_steps = match t.max_steps {
        Some(n) => n,
        None => ((t.epochs.unwrap_or(1.0) * bpe as f64) / t.grad_accum as f64)
            .ceil()
            .max(1.0) as usize,
    };

    // ---- Output folder: decide, writing nothing yet -----------------------------------------
    let folder = output::inspect(&out, |what| c.key_error("output_dir", what))?;
    let mut inputs = vec![crate::fsutil::Input::new("the config", &c.path)];
    for (key, p) in [
        ("data.train", &cfg.data.train),
        ("data.validation", &cfg.data.validation),
        ("data.test", &cfg.data.test),
    ] {
        if let Some(p) = p {
            inputs.push(crate::fsutil::Input::new(
                format!("the {key} file"),
                c.base_dir.join(p),
            ));
        }
    }
    for m in &cfg.data.mixture {
        inputs.push(crate::fsutil::Input::new(
            "a data.mixture file",
            c.base_dir.join(&m.path),
        ));
    }
    inputs.push(crate::fsutil::Input::new("the model", source.path()));
    output::check_inputs(&out, &inputs)?;
    let resume_from = match folder {
        output::RunFolder::Fresh => None,
        output::RunFolder::Run { .. } if opts.resume => {
            if let Some(s) = finished_summary(&out, max_steps) {
                return Ok(Outcome::AlreadyFinished(s));
            }
            match checkpoint::latest(&out)? {
                Some((step, dir)) => {
                    let saved = checkpoint::read_state(&dir)?;
                    checkpoint::validate_state(
                        &dir,
                        &saved,
                        &checkpoint::RunShape {
                            max_steps,
                            method: cfg.method.as_str(),
                            seed: t.seed,
                            train_examples: n_train,
                            batches_per_epoch: bpe,
                            batch_size: t.batch_size,
                            grad_accum: t.grad_accum,
                            packing: train_bc.packing,
                        },
                    )?;
                    Some((step, dir, saved))
                }
                None => None,
            }
        }
        output::RunFolder::Run { .. } if opts.overwrite => None,
        output::RunFolder::Run { .. } => {
            let at = match checkpoint::latest(&out)? {
                Some((step, _)) => format!("checkpoints up to step {step}"),
                None => "no checkpoint yet".to_string(),
            };
            return Err(c.key_error(
                "output_dir",
                format!(
                    "{} already holds a run ({at}); continue it with --resume, start it again with --overwrite (removes only the run's files), or choose another output_dir",
                    out.display()
                ),
            ));
        }
    };

    // ---- Model and method ----------------------------------------------------------------
    let dtype = match t.dtype.as_deref() {
        None => None,
        Some("f32") => Some(candle_core::DType::F32),
        Some("bf16") => Some(candle_core::DType::BF16),
        Some("f16") => Some(candle_core::DType::F16),
        Some(other) => {
            return Err(c.key_error(
                "train.dtype",
                format!("`{other}` is not one of f32, bf16, f16"),
            ))
        }
    };
    let load_opts = LoadOptions {
        dtype,
        dequantize: t.dequantize,
        ..Default::default()
    };
    let LoadedModel {
        model: mut llama,
        source,
        ..
    } = model::load_source(source, &load_opts, &device)?;
    // The module names are only known once the model is loaded; a target that matches none is
    // the config's error, so name the file and the key.
    if cfg.method == Method::Lora {
        crate::peft::lora::model::resolve_targets(&llama, &cfg.lora.to_peft(&cfg.model))
            .map_err(|e| c.key_error("lora.targets", e))?;
    }
    let tuner = Tuner::attach(cfg, &mut llama, &cfg.model)?;
    let params = tuner.trainable(&llama);

    // ---- Schedule, optimizer ---------------------------------------------------------------
    let schedule = Schedule {
        kind: t.lr_schedule,
        lr: t.lr,
        warmup: t.warmup_steps,
        total: max_steps,
        min_lr_ratio: t.min_lr_ratio,
    };
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            betas: t.betas,
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
    )?;

    // ---- Memory: estimate, and refuse what cannot fit (before anything is written) ----------
    crate::quant::set_activation_precision(match t.activation_bits {
        8 => crate::quant::ActPrecision::I8,
        16 => crate::quant::ActPrecision::I16,
        n => {
            return Err(c.key_error(
                "train.activation_bits",
                format!("{n} is not supported: use 8 or 16"),
            ))
        }
    });
    crate::quant::set_backward_weights(match t.quantized_backward {
        config::QuantizedBackward::Q8_0 => crate::quant::BackwardWeights::Q8Transposed,
        config::QuantizedBackward::Exact => crate::quant::BackwardWeights::Exact,
    });
    let mem = memory::estimate(
        &llama,
        &memory::TrainShape::for_run(&prepared, &train_bc, &params, cfg, t),
    );
    let mem_line = mem.table();
    let available = memory::available_bytes();
    if t.memory_check {
        if let Some(avail) = available {
            if mem.total() > avail {
                let h = crate::inspect::human_bytes;
                let hint = if t.gradient_checkpointing {
                    "lower train.batch_size or train.max_seq_len"
                } else {
                    "set train.gradient_checkpointing = true, or lower train.batch_size or train.max_seq_len"
                };
                return Err(c.key_error(
                    "train.batch_size",
                    format!(
                        "this run needs about {} of memory but {} is available ({}); {hint} (train.memory_check = false skips this check)",
                        h(mem.total()),
                        h(avail),
                        mem_line
                    ),
                ));
            }
        }
    }
    let model_line = format!(
        "model {} ({}, {} layers); method {}",
        cfg.model,
        source.format(),
        llama.cfg.num_hidden_layers,
        tuner.method()
    );
    if dry {
        let output = match (&resume_from, folder) {
            (Some((step, _, _)), _) => format!(
                "output_dir {}: would resume the run from step {step} of {max_steps}",
                out.display()
            ),
            (None, output::RunFolder::Run { .. }) if opts.overwrite => format!(
                "output_dir {}: would remove the run's files and start again",
                out.display()
            ),
            (None, output::RunFolder::Run { .. }) => format!(
                "output_dir {}: holds a run without a checkpoint; would start it from step 0",
                out.display()
            ),
            (None, output::RunFolder::Fresh) if out.exists() => format!(
                "output_dir {}: empty; the run would start there",
                out.display()
            ),
            (None, output::RunFolder::Fresh) => {
                format!("output_dir {}: would be created", out.display())
            }
        };
        return Ok(Outcome::DryRun(DryRun {
            model: model_line,
            params: tuner.params_report(),
            memory: mem,
            available_bytes: available,
            data: prepared.summary(),
            max_steps,
            output,
        }));
    }
    if interrupted(opts) {
        return Err(Error::msg(
            "interrupted before training started; nothing was written",
        ));
    }

    // ---- Output folder, resume: from here on the run writes --------------------------------
    if opts.overwrite && folder != output::RunFolder::Fresh {
        output::remove_run_files(&out)?;
    }
    output::create(&out)?;
    checkpoint::remove_partial(&out)?;
    let mut state = TrainerState {
        step: 0,
        max_steps,
        method: tuner.method().to_string(),
        data_cursor: batcher.cursor(),
        epoch: 0.0,
        rng: RngState {
            seed: t.seed,
            dropout_calls: 0,
        },
        train_tokens: 0,
        loss_tokens: 0,
        train_time_s: 0.0,
        last_train_loss: None,
        initial_val_loss: None,
        last_val_loss: None,
        best_val_loss: None,
        best_step: None,
        evals_since_best: 0,
        train_examples: n_train,
        batches_per_epoch: bpe,
        batch_size: t.batch_size,
        grad_accum: t.grad_accum,
    };
    let progress_total = max_steps.min(t.stop_after.unwrap_or(usize::MAX));
    let mut resumed_from_step = None;
    if let Some((step, dir, saved)) = resume_from {
        tuner.restore(&llama, &dir)?;
        opt.load(&dir.join(checkpoint::OPTIMIZER_FILE))?;
        batcher
            .seek(saved.data_cursor)
            .map_err(|e| Error::file(dir.join(checkpoint::STATE_FILE), e))?;
        tuner.replay_rng(&llama, saved.rng.dropout_calls)?;
        state = TrainerState { max_steps, ..saved };
        resumed_from_step = Some(step);
    }
    let mut metrics = MetricsLog::open(&out, resumed_from_step)?;
    let effective = toml::to_string(&c.effective).unwrap_or_default();
    crate::fsutil::write_atomic(&out.join(CONFIG_FILE), effective.as_bytes())?;

    let progress = Progress::new(opts.progress, progress_total, state.step, t.log_every);
    progress.println(&model_line);
    progress.println(&tuner.params_report());
    progress.println(&mem_line);
    progress.println(&prepared.summary());
    match resumed_from_step {
        Some(s) => progress.println(&format!("resuming from step {s} of {max_steps}")),
        None if opts.resume => progress.println(&format!(
            "--resume: no checkpoint in {}; starting from step 0",
            checkpoint::checkpoints_dir(&out).display()
        )),
        None => {}
    }

    // ---- Helpers of the loop --------------------------------------------------------------
    let run_eval = |state: &mut TrainerState,
                    metrics: &mut MetricsLog,
                    progress: &Progress|
     -> Result<Option<EvalResult>> {
        let Some(vb) = &val_batcher else {
            return Ok(None);
        };
        let r = evaluate(&llama, vb, t.eval_batches)?;
        metrics.write(&json!({
            "type": "eval", "step": state.step, "val_loss": r.loss,
            "val_perplexity": r.perplexity, "val_tokens": r.tokens,
        }))?;
        progress.println(&format!(
            "step {}: val loss {:.4} perplexity {:.3} ({} tokens)",
            state.step, r.loss, r.perplexity, r.tokens
        ));
        if state.initial_val_loss.is_none() {
            state.initial_val_loss = Some(r.loss);
        }
        state.last_val_loss = Some(r.loss);
        if state.best_val_loss.is_none_or(|b| r.loss < b) {
            state.best_val_loss = Some(r.loss);
            state.best_step = Some(state.step);
            state.evals_since_best = 0;
        } else {
            state.evals_since_best += 1;
        }
        let (train_curve, val_curve) = metrics.curves();
        report::plot_loss(&out.join(report::PLOT_FILE), &train_curve, &val_curve)?;
        Ok(Some(r))
    };
    let save = |state: &TrainerState, opt: &AdamW| -> Result<PathBuf> {
        let dir = checkpoint::save(&out, state.step, state, |tmp| {
            tuner.save(&llama, tmp)?;
            opt.save(&tmp.join(checkpoint::OPTIMIZER_FILE))
        })?;
        if let Some(k) = t.keep_checkpoints {
            checkpoint::prune(&out, k)?;
        }
        Ok(dir)
    };

    // ---- The loop --------------------------------------------------------------------------
    if resumed_from_step.is_none() {
        run_eval(&mut state, &mut metrics, &progress)?;
    }
    let mut last_saved: Option<usize> = resumed_from_step;
    let mut last_eval: Option<usize> = None;
    let mut session_tokens = 0u64;
    let mut session_time = 0.0f64;
    let mut stop_reason = StopReason::MaxSteps;
    while state.step < max_steps {
        if t.stop_after.is_some_and(|s| state.step >= s) {
            stop_reason = StopReason::StopAfter;
            break;
        }
        // Ctrl-C: stop here, between two steps; the checkpoint is written below.
        if interrupted(opts) {
            stop_reason = StopReason::Interrupted;
            break;
        }
        let t0 = Instant::now();
        let step = state.step + 1;
        let batches = (0..t.grad_accum)
            .map(|_| batcher.next_batch())
            .collect::<Result<Vec<_>>>()?;
        let StepGrads {
            loss,
            mut grads,
            loss_tokens: n_loss,
            forwards,
            forward_s,
            backward_s,
        } = accumulate_gradients_with(&llama, &params, &batches, t.gradient_checkpointing)?;
        let t_opt = Instant::now();
        state.rng.dropout_calls += forwards as u64;
        let lr = schedule.lr_at(step);
        let norm = optim::clip_grad_norm(&mut grads, t.max_grad_norm)?;
        if !loss.is_finite() || !norm.is_finite() {
            progress.finish();
            let what = if loss.is_finite() {
                format!("the gradient norm is {norm}")
            } else {
                format!("the training loss is {loss}")
            };
            let kept = match last_saved {
                Some(s) => format!(
                    "the last good checkpoint is {}",
                    checkpoint::checkpoints_dir(&out)
                        .join(format!("step-{s}"))
                        .display()
                ),
                None => "no checkpoint was written".to_string(),
            };
            return Err(Error::msg(format!(
                "step {step}: {what} (lr {lr:.3e}); training stopped without saving, {kept} (lower train.lr or check the data)"
            )));
        }
        if n_loss > 0 {
            opt.step(&grads, lr)?;
        }
        let optimizer_s = t_opt.elapsed().as_secs_f64();
        let tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
        let dt = t0.elapsed().as_secs_f64();
        session_time += dt;
        session_tokens += tokens as u64;
        state.step = step;
        state.train_tokens += tokens as u64;
        state.loss_tokens += n_loss as u64;
        state.train_time_s += dt;
        state.last_train_loss = Some(loss);
        state.data_cursor = batcher.cursor();
        state.epoch = state.data_cursor.epoch as f64 + state.data_cursor.index as f64 / bpe as f64;
        let tps = session_tokens as f64 / session_time.max(1e-9);
        metrics.write(&json!({
            "type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": norm,
            "tokens": tokens, "loss_tokens": n_loss, "tokens_per_s": tokens as f64 / dt.max(1e-9),
            "epoch": state.epoch, "elapsed_s": wall.elapsed().as_secs_f64(),
            "step_s": dt, "forward_s": forward_s, "backward_s": backward_s,
            "optimizer_s": optimizer_s,
        }))?;
        progress.step(&StepLine {
            step,
            loss,
            lr,
            tokens_per_s: tps,
        });
        if t.eval_every.is_some_and(|e| step.is_multiple_of(e)) {
            run_eval(&mut state, &mut metrics, &progress)?;
            last_eval = Some(step);
            if let Some(p) = t.early_stopping_patience {
                if state.evals_since_best >= p {
                    progress.println(&format!(
                        "early stopping: no better val loss in {p} evaluations (best {:.4} at step {})",
                        state.best_val_loss.unwrap_or(f64::NAN),
                        state.best_step.unwrap_or(0)
                    ));
                    stop_reason = StopReason::EarlyStopping;
                }
            }
        }
        let stopping = stop_reason != StopReason::MaxSteps
            || t.stop_after.is_some_and(|s| step >= s)
            || step == max_steps;
        if t.save_every.is_some_and(|e| step.is_multiple_of(e)) || stopping {
            save(&state, &opt)?;
            last_saved = Some(step);
        }
        if stop_reason != StopReason::MaxSteps {
            break;
        }
    }
    if stop_reason != StopReason::Interrupted
        && t.stop_after.is_some_and(|s| state.step >= s)
        && state.step < max_steps
    {
        stop_reason = StopReason::StopAfter;
    }
    progress.finish();

    // ---- The end ---------------------------------------------------------------------------
    let finished = !matches!(stop_reason, StopReason::StopAfter | StopReason::Interrupted);
    if finished && last_eval != Some(state.step) {
        run_eval(&mut state, &mut metrics, &progress)?;
    }
    if last_saved != Some(state.step) {
        save(&state, &opt)?;
    }
    let (train_curve, val_curve) = metrics.curves();
    report::plot_loss(&out.join(report::PLOT_FILE), &train_curve, &val_curve)?;
    let adapter_dir = if finished {
        let dir = out.join(ADAPTER_DIR);
        tuner.save(&llama, &dir)?;
        Some(dir)
    } else {
        None
    };
    let summary = Summary {
        method: tuner.method().to_string(),
        steps: state.step,
        max_steps,
        epochs: state.epoch,
        train_tokens: state.train_tokens,
        loss_tokens: state.loss_tokens,
        train_tokens_per_s: if session_time > 0.0 {
            session_tokens as f64 / session_time
        } else {
            0.0
        },
        train_time_s: state.train_time_s,
        peak_rss_bytes: report::peak_rss_bytes(),
        final_train_loss: state.last_train_loss,
        initial_val_loss: state.initial_val_loss,
        final_val_loss: state.last_val_loss,
        final_val_perplexity: state.last_val_loss.map(f64::exp),
        best_val_loss: state.best_val_loss,
        best_step: state.best_step,
        wall_s: wall.elapsed().as_secs_f64(),
        stop_reason,
        resumed_from_step,
        trainable_params: tuner.param_count().trainable,
        all_params: tuner.param_count().all,
        adapter_dir,
        already_finished: false,
    };
    let text = serde_json::to_string_pretty(&summary).expect("the summary always serializes");
    crate::fsutil::write_atomic(&out.join(SUMMARY_FILE), text.as_bytes())?;
    Ok(Outcome::Trained(summary))
}
