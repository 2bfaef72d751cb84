//! Fine-tuning recipes. [`run`] runs the recipe (`recipe.rs`), a few named steps that read top
//! to bottom: setup (the data, the model, its task and objective, the method, the optimizer,
//! the memory check), then the loop of step / evaluate / save (micro-batches, loss, gradient
//! accumulation, clipping, AdamW, schedule, early stopping, checkpoints), then finish (the
//! final adapter and `summary.json`). Any model family trains through `model::Model`.
//!
//! - [`config`]: the TOML run config (`--set` overrides, one-line errors).
//! - [`loss`]: LM-head losses over the trained positions only, from hidden states.
//! - [`optim`]: the optimizers (AdamW, SGD, Adafactor, 8-bit AdamW), gradient clipping. [`schedule`]: learning-rate schedules.
//! - [`method`]: what the loop needs from a method (LoRA today).
//! - [`checkpoint`]: atomic checkpoints and exact resume. [`report`]: metrics, plot, progress.
//! - [`output`]: the run folder: created and marked by ferrotune, never a folder of the user's;
//!   a run in it needs `--resume` or `--overwrite`.
//! - [`compare`]: generate over a data file with the base model and adapters and score them.
//! - [`distributed`]: DDP across ranks (`train.distributed = "ddp"`, collectives from
//!   [`crate::dist`]): each rank's share of a step, token counts, gradient all-reduce.
//!
//! A resumed run continues exactly: the adapter, the optimizer state, the data cursor and the
//! dropout RNG are restored, so on CPU a run interrupted and resumed ends with the same adapter,
//! bit for bit, as one that was never interrupted. [`RunOptions::interrupt`] (Ctrl-C) stops a
//! run at the next step boundary with a checkpoint; `--resume` of a finished run does nothing.
pub mod bench_eval;
pub mod checkpoint;
pub mod checkpointing;
pub mod compare;
pub mod config;
pub mod distributed;
pub mod loss;
pub mod memory;
pub mod method;
pub mod optim;
pub mod output;
pub mod overlap;
mod recipe;
pub mod report;
pub mod schedule;
pub mod zero;
pub mod zero3;

pub use config::{
    load_config, parse_config, Distributed, LoadedConfig, LrSchedule, Method, TrainConfig,
};
pub use method::{Tuner, ADAPTER_NAME};
pub use optim::{AdamW, AdamWConfig, Optimizer, OptimizerKind};
pub use report::ProgressMode;
pub use schedule::Schedule;

use crate::data::{self, Batch, Batcher, Prepared};
use crate::model::{self, Model, ModelSource, Task};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Where the final adapter goes, under `output_dir`.
pub const ADAPTER_DIR: &str = "adapter";
/// Where a full or selective run's model goes (an HF folder), under `output_dir`.
pub const MODEL_DIR: &str = "model";
/// A classification adapter's class names (`{"id2label", "label2id"}`), beside the adapter.
pub const LABELS_FILE: &str = "labels.json";
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
    /// The ranks of a distributed run (default: this process alone). Rank 0 writes the run's
    /// files; every rank trains its share ([`distributed`]).
    pub dist: crate::dist::Dist,
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
    /// The final model of a full or selective run (an HF folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
    /// Classification: accuracy on the validation data at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_val_accuracy: Option<f64>,
    /// Training examples drawn (over all sessions), by task name with `[[tasks]]`, else by the
    /// file they came from: the mix the run actually saw (a mixture's realised shares).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub task_mix: std::collections::BTreeMap<String, u64>,
    /// `[[tasks]]`: each task's validation loss at the last evaluation (`None`: no tokens).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub final_val_loss_by_task: std::collections::BTreeMap<String, Option<f64>>,
    /// Ranks that trained (the last session's; 1 for a single process).
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// Seconds rank 0 spent in collectives (waiting for the other ranks included), over all
    /// sessions: part of `train_time_s`.
    #[serde(default)]
    pub comm_time_s: f64,
    /// Seconds rank 0's training waited for collectives, over all sessions: `comm_time_s`
    /// less the gradient collectives that ran during the backward pass (`train.overlap_comm`).
    #[serde(default)]
    pub comm_wait_time_s: f64,
    /// Set (not saved) when `--resume` found the run finished: this is its saved summary and
    /// nothing was done.
    #[serde(skip)]
    pub already_finished: bool,
}

fn one_rank() -> usize {
    1
}

/// Validation loss of some batches: mean NLL per loss token and its perplexity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    /// Classification (sequence or token targets of a classifier): the share of labelled rows
    /// (tokens) whose highest logit is the label.
    pub accuracy: Option<f64>,
}

/// What an evaluation adds up; [`EvalResult`]s of several batchers combine exactly from these.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct EvalSums {
    /// Summed NLL over the loss tokens.
    nll: f64,
    tokens: usize,
    correct: usize,
    labelled: usize,
}

impl EvalSums {
    fn add(&mut self, o: &EvalSums) {
        self.nll += o.nll;
        self.tokens += o.tokens;
        self.correct += o.correct;
        self.labelled += o.labelled;
    }

    /// Add every rank's sums (counts are exact in f64).
    fn all_reduce(&mut self, dist: &crate::dist::Dist) -> Result<()> {
        if dist.world_size() == 1 {
            return Ok(());
        }
        let mut v = [
            self.nll,
            self.tokens as f64,
            self.correct as f64,
            self.labelled as f64,
        ];
        dist.all_reduce_sum_f64(&mut v)?;
        *self = EvalSums {
            nll: v[0],
            tokens: v[1] as usize,
            correct: v[2] as usize,
            labelled: v[3] as usize,
        };
        Ok(())
    }

    fn result(&self) -> EvalResult {
        let loss = if self.tokens == 0 {
            f64::NAN
        } else {
            self.nll / self.tokens as f64
        };
        EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens: self.tokens,
            accuracy: (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64),
        }
    }
}

/// The validation of a multi-task run: the overall result and each task's, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEval {
    /// Over every task's tokens: the token-weighted mean of the tasks' losses.
    pub overall: EvalResult,
    pub by_task: Vec<(String, EvalResult)>,
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
        ModelSource::HfDir(d) => match model::peek_task(source).0 {
            model::ArchitectureKind::Encoder => {
                let ctx = model::bert::config_from_hf_dir(d)?.max_tokens();
                Ok((Tokenizer::from_hf_dir(d)?, ctx))
            }
            model::ArchitectureKind::EncoderDecoder => {
                model::t5::config_from_hf_dir(d)?;
                let mut tok = Tokenizer::from_hf_dir(d)?;
                tok.set_add_eos(true);
                // Relative positions: no hard limit (the default length stays 512).
                Ok((tok, usize::MAX))
            }
            model::ArchitectureKind::Decoder => {
                let ctx = model::config_from_hf_dir(d)?.max_position_embeddings;
                Ok((Tokenizer::from_hf_dir(d)?, ctx))
            }
        },
    }
}

/// How a run's rows become examples: its `task` (given, or the model's obvious one, read from
/// its config without loading weights) and `objective`. A bare encoder has no obvious task: a
/// one-line error asks for one.
pub fn data_task(c: &LoadedConfig, source: &ModelSource) -> Result<data::DataTask> {
    let cfg = &c.config;
    let objective = cfg.objective.as_str();
    if let Some(pre) = cfg.objective.pretraining() {
        // Checked from the model's config, before the data (read as raw text) is.
        let kind = model::peek_task(source).0;
        let fits = match pre {
            model::Objective::Clm => model::ArchitectureKind::Decoder,
            model::Objective::Mlm => model::ArchitectureKind::Encoder,
            model::Objective::SpanCorruption => model::ArchitectureKind::EncoderDecoder,
        };
        if kind != fits {
            return Err(c.key_error(
                "objective",
                format!(
                    "`{}` is for {fits} models, but the model ({}) is a {kind}",
                    cfg.objective.as_str(),
                    source.path().display()
                ),
            ));
        }
    }
    let task = match (cfg.task, cfg.objective.pretraining()) {
        (Some(t), _) => {
            // Checked from the model's config before any data is read: data made for a task
            // the model cannot do would fail in the tokenizer with a less helpful message.
            let kind = model::peek_task(source).0;
            let fits: &[Task] = match kind {
                model::ArchitectureKind::Decoder => &[Task::CausalLm],
                model::ArchitectureKind::EncoderDecoder => &[Task::Seq2SeqLm],
                model::ArchitectureKind::Encoder => {
                    &[Task::SequenceClassification, Task::TokenClassification]
                }
            };
            if !fits.contains(&t) {
                let names: Vec<String> = fits.iter().map(|t| format!("`{t}`")).collect();
                return Err(c.key_error(
                    "task",
                    format!(
                        "`{t}` does not fit the model, a {kind} ({}): it supports {}",
                        source.path().display(),
                        names.join(", ")
                    ),
                ));
            }
            Some(t)
        }
        // A pre-training objective decides the examples on its own.
        (None, Some(_)) => None,
        (None, None) => match model::peek_task(source) {
            (_, Some(t)) => Some(t),
            (kind, None) => {
                return Err(c.key_error(
                    "task",
                    format!(
                        "missing: the model is a bare {kind} with no head to train; set task = \"sequence_classification\" or \"token_classification\" (a new head is initialised), or objective = \"mlm\""
                    ),
                ))
            }
        },
    };
    data::DataTask::for_run(task, objective).map_err(|e| match e {
        Error::Key { key, what, .. } => c.key_error(&key, what),
        other => other,
    })
}

/// The examples the config describes, tokenized with `tok` (what training sees), made for
/// `kind` ([`data_task`]).
pub fn prepare_data(
    c: &LoadedConfig,
    tok: &Tokenizer,
    context: Option<usize>,
    kind: data::DataTask,
) -> Result<Prepared> {
    let t = &c.config.train;
    let default_len = t.max_seq_len.unwrap_or(context.unwrap_or(512).min(512));
    data::load_task(&c.config.data, &c.base_dir, tok, default_len, kind).map_err(|e| match e {
        // A `[data]` key's error names the config file and the key's line.
        Error::Key {
            source_name,
            key,
            what,
        } if source_name == "[data]" => c.key_error(&format!("data.{key}"), what),
        // A task's key: the file, the line of the key in that `[[tasks]]` entry, the task.
        Error::Key {
            source_name,
            key,
            what,
        } if source_name.starts_with(data::config::TASKS) => {
            let index = (0..c.config.tasks.len())
                .find(|&i| data::config::task_label(&c.config.tasks, i) == source_name);
            let at = index
                .and_then(|i| config::task_key_line(&c.text, i, &key))
                .map_or_else(|| c.source(), |l| format!("{}: line {l}", c.source()));
            Error::key(format!("{at}: {source_name}"), key, what)
        }
        other => other,
    })
}

/// `data preview`: the split summary, then the first `n` training examples with the trained
/// span marked (`ansi`: in green, else in `[[ ]]`).
pub fn preview(c: &LoadedConfig, n: usize, ansi: bool) -> Result<String> {
    let source = model::resolve(&c.config.model)?;
    let (tok, _) = tokenizer_and_context(&source)?;
    let prepared = prepare_data(c, &tok, None, data_task(c, &source)?)?;
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
pub fn evaluate(model: &dyn Model, batcher: &Batcher, max_batches: usize) -> Result<EvalResult> {
    evaluate_on(model, batcher, max_batches, &crate::dist::Dist::default())
}

/// [`evaluate`] with the batches shared among the ranks of `dist` (batch i on rank i mod N)
/// and the sums added across them: every rank gets the result of the whole evaluation.
pub fn evaluate_on(
    model: &dyn Model,
    batcher: &Batcher,
    max_batches: usize,
    dist: &crate::dist::Dist,
) -> Result<EvalResult> {
    let mut sums = eval_sums(model, batcher, max_batches, dist)?;
    sums.all_reduce(dist)?;
    Ok(sums.result())
}

/// [`evaluate`] of each task's batcher (the first `max_batches` batches of each, so every task
/// gets the same budget however large its validation set), and over all of them: the overall
/// loss is the NLL summed over every task's tokens divided by their number, i.e. the
/// token-weighted mean of the tasks' losses.
pub fn evaluate_tasks(
    model: &dyn Model,
    tasks: &[(String, Batcher)],
    max_batches: usize,
) -> Result<TaskEval> {
    evaluate_tasks_on(model, tasks, max_batches, &crate::dist::Dist::default())
}

/// [`evaluate_tasks`] shared among the ranks of `dist`, as [`evaluate_on`].
pub fn evaluate_tasks_on(
    model: &dyn Model,
    tasks: &[(String, Batcher)],
    max_batches: usize,
    dist: &crate::dist::Dist,
) -> Result<TaskEval> {
    let tasks = tasks.iter().map(|(n, b)| (n.as_str(), b));
    combine_tasks(tasks, dist, |b| eval_sums(model, b, max_batches, dist))
}

/// Each task's sums from `sums_of` (this rank's share), added over the ranks, and over all
/// tasks: the overall loss is the token-weighted mean of the tasks'.
fn combine_tasks<'b>(
    tasks: impl Iterator<Item = (&'b str, &'b Batcher)>,
    dist: &crate::dist::Dist,
    mut sums_of: impl FnMut(&Batcher) -> Result<EvalSums>,
) -> Result<TaskEval> {
    let mut all = EvalSums::default();
    let mut by_task = Vec::new();
    for (name, batcher) in tasks {
        let mut sums = sums_of(batcher)?;
        sums.all_reduce(dist)?;
        all.add(&sums);
        by_task.push((name.to_string(), sums.result()));
    }
    Ok(TaskEval {
        overall: all.result(),
        by_task,
    })
}

/// How many of a validation set's `planned` batches an evaluation takes (`max_batches` 0: all).
fn eval_batch_count(planned: usize, max_batches: usize) -> usize {
    if max_batches == 0 {
        planned
    } else {
        max_batches.min(planned)
    }
}

/// A batch's summed loss and loss tokens (`None`: no batch, only the collectives).
pub type BatchLoss<'a> = dyn FnMut(Option<&Batch>) -> Result<(f64, usize)> + 'a;

/// [`evaluate_tasks_on`] with each batch's summed loss and loss tokens computed by `loss`, which
/// takes part in collectives (ZeRO-3's layer walk gathers each layer's weights): every rank
/// calls it the same number of times, with `None` once its share of a task's batches has run
/// out. Loss only (no classification accuracy).
pub fn evaluate_tasks_lockstep(
    tasks: &[(String, &Batcher)],
    max_batches: usize,
    dist: &crate::dist::Dist,
    loss: &mut BatchLoss<'_>,
) -> Result<TaskEval> {
    let (rank, world) = (dist.rank(), dist.world_size());
    let tasks = tasks.iter().map(|(n, b)| (n.as_str(), *b));
    combine_tasks(tasks, dist, |batcher| {
        let plan = batcher.plan_for(0);
        let n = eval_batch_count(plan.len(), max_batches);
        let mut sums = EvalSums::default();
        for round in 0..n.div_ceil(world) {
            let i = round * world + rank;
            let batch = if i < n {
                Some(batcher.build(&plan[i])?)
            } else {
                None
            };
            let (sum, k) = loss(batch.as_ref())?;
            sums.nll += sum;
            sums.tokens += k;
        }
        Ok(sums)
    })
}

/// This rank's sums over its share of the first `max_batches` batches.
fn eval_sums(
    model: &dyn Model,
    batcher: &Batcher,
    max_batches: usize,
    dist: &crate::dist::Dist,
) -> Result<EvalSums> {
    let plan = batcher.plan_for(0);
    let n = eval_batch_count(plan.len(), max_batches);
    let classifier = matches!(
        model.task_type(),
        model::TaskType::SeqCls | model::TaskType::TokenCls
    );
    let mut sums = EvalSums::default();
    let (rank, world) = (dist.rank(), dist.world_size());
    for rows in plan.iter().take(n).skip(rank).step_by(world) {
        let batch = batcher.build(rows)?;
        let (sum, k) = crate::nn::without_graph(|| model.loss_sum(&batch, false))?;
        sums.nll += sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        sums.tokens += k;
        if classifier {
            let (c, l) = count_correct(model, &batch)?;
            sums.correct += c;
            sums.labelled += l;
        }
    }
    Ok(sums)
}

/// Rows (tokens) of a classification batch whose highest logit is their label, and how many
/// carry a label.
fn count_correct(model: &dyn Model, batch: &data::Batch) -> Result<(usize, usize)> {
    let logits = crate::nn::without_graph(|| model.logits(batch))?;
    let pred = logits.argmax(candle_core::D::Minus1)?.flatten_all()?;
    let pred = pred.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?;
    let gold = batch
        .labels
        .flatten_all()?
        .to_dtype(candle_core::DType::I64)?;
    let gold = gold.to_vec1::<i64>()?;
    if pred.len() != gold.len() {
        // A regression head (one score) has no classes to count.
        return Ok((0, 0));
    }
    let mut correct = 0;
    let mut labelled = 0;
    for (p, g) in pred.iter().zip(&gold) {
        if *g != data::IGNORE {
            labelled += 1;
            correct += usize::from(p == g);
        }
    }
    Ok((correct, labelled))
}

/// What [`accumulate_gradients`] computed for one optimizer step.
pub struct StepGrads {
    /// Mean loss per loss token over the step's micro-batches.
    pub loss: f64,
    /// The summed loss over the micro-batches' loss tokens (`loss` times the normaliser).
    pub loss_sum: f64,
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
    model: &dyn Model,
    params: &[(String, candle_core::Var)],
    batches: &[Batch],
) -> Result<StepGrads> {
    accumulate_gradients_with(model, params, batches, false)
}

/// [`accumulate_gradients`], with activation checkpointing per decoder layer when
/// `checkpointing` is set (the same gradients up to float rounding; see [`checkpointing`]).
pub fn accumulate_gradients_with(
    model: &dyn Model,
    params: &[(String, candle_core::Var)],
    batches: &[Batch],
    checkpointing: bool,
) -> Result<StepGrads> {
    let n_total: usize = batches.iter().map(|b| b.n_loss_tokens).sum();
    accumulate_gradients_over(
        model,
        params,
        batches,
        checkpointing,
        n_total,
        |_| Ok(()),
        None,
    )
}

/// Called during the backward pass of a step's last micro-batch, right after decoder layer
/// `i`'s, with the earlier micro-batches' summed gradients and this one's so far (see
/// [`overlap`]).
pub type LastLayerDone<'a> = dyn FnMut(
        usize,
        &mut [Option<candle_core::Tensor>],
        &mut [Option<candle_core::Tensor>],
    ) -> Result<()>
    + 'a;

/// [`accumulate_gradients_with`] dividing by `n_total` loss tokens (a distributed step's, over
/// every rank's micro-batches), calling `before_forward(i)` before micro-batch i's forward pass.
/// With `last_layer_done` (LLaMA family) the last micro-batch with a loss token walks its
/// layers in the backward pass and reports each ([`checkpointing::walk`]).
pub fn accumulate_gradients_over(
    model: &dyn Model,
    params: &[(String, candle_core::Var)],
    batches: &[Batch],
    checkpointing: bool,
    n_total: usize,
    mut before_forward: impl FnMut(usize) -> Result<()>,
    mut last_layer_done: Option<&mut LastLayerDone<'_>>,
) -> Result<StepGrads> {
    let mut grads: Vec<Option<candle_core::Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0.0f64;
    let mut forwards = 0;
    let (mut forward_s, mut backward_s) = (0.0, 0.0);
    fn add(
        grads: &mut [Option<candle_core::Tensor>],
        i: usize,
        g: &candle_core::Tensor,
    ) -> Result<()> {
        grads[i] = Some(match grads[i].take() {
            None => g.clone(),
            Some(acc) => (acc + g)?,
        });
        Ok(())
    }
    let last = batches.iter().rposition(|b| b.n_loss_tokens > 0);
    for (i, batch) in batches.iter().enumerate() {
        if batch.n_loss_tokens == 0 {
            continue;
        }
        forwards += 1;
        before_forward(i)?;
        let walk_hook = last_layer_done.as_deref_mut().filter(|_| Some(i) == last);
        if checkpointing || walk_hook.is_some() {
            let scale = 1.0 / n_total as f64;
            let mb = match walk_hook {
                Some(hook) => {
                    let llama = model
                        .as_any()
                        .downcast_ref::<crate::model::Llama>()
                        .ok_or_else(|| {
                            Error::msg("overlapped gradient communication needs the LLaMA family")
                        })?;
                    let activations = if checkpointing {
                        checkpointing::Activations::Recompute
                    } else {
                        checkpointing::Activations::Keep
                    };
                    let acc = &mut grads;
                    checkpointing::walk(llama, params, batch, scale, activations, &mut |l, mb| {
                        hook(l, acc, mb)
                    })?
                }
                None => model.loss_and_grads_checkpointed(params, batch, scale)?,
            };
            loss_sum += mb.loss_sum;
            forward_s += mb.forward_s;
            backward_s += mb.backward_s;
            for (i, ((name, _), g)) in params.iter().zip(mb.grads).enumerate() {
                let g = g.ok_or_else(|| no_gradient(name))?;
                add(&mut grads, i, &g)?;
            }
            continue;
        }
        let t0 = Instant::now();
        let (sum, _) = model.loss_sum(batch, true)?;
        loss_sum += sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let t1 = Instant::now();
        forward_s += (t1 - t0).as_secs_f64();
        let scaled = (sum / n_total as f64)?;
        let store = scaled.backward()?;
        for (i, (name, var)) in params.iter().enumerate() {
            let g = store
                .get(var.as_tensor())
                .ok_or_else(|| no_gradient(name))?;
            add(&mut grads, i, g)?;
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
        loss_sum,
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
    // The run's result is on disk: its adapter, or the model of a full / selective run.
    let result = match (&s.adapter_dir, &s.model_dir) {
        (Some(_), _) => {
            let a = out.join(ADAPTER_DIR);
            a.join(crate::peft::format::WEIGHTS_FILE).is_file()
                || a.join(crate::peft::selective::WEIGHTS_FILE).is_file()
        }
        (None, Some(_)) => {
            let m = out.join(MODEL_DIR);
            m.join("model.safetensors").is_file()
                || m.join("model.safetensors.index.json").is_file()
        }
        (None, None) => false,
    };
    let newer_checkpoint = checkpoint::latest(out)
        .ok()
        .flatten()
        .is_some_and(|(step, _)| step > s.steps);
    (done && result && !newer_checkpoint).then_some(Summary {
        already_finished: true,
        ..s
    })
}

fn execute(c: &LoadedConfig, opts: &RunOptions, dry: bool) -> Result<Outcome> {
    recipe::execute(c, opts, dry)
}
