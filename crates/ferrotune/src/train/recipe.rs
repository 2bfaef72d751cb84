//! The fine-tuning recipe, in named steps that read top to bottom (as torchtune's recipes do):
//!
//! ```text
//! setup      data → batches → output folder (decided, nothing written) → model → task and
//!            objective → method → optimizer and schedule → memory check
//! open       the output folder, resume state, metrics log      (from here on the run writes)
//! loop       step (micro-batches, loss, backward, clip, optimizer) → evaluate → save, on their
//!            schedules, until max_steps, early stopping, stop_after or Ctrl-C
//! finish     last evaluation and checkpoint, the adapter, summary.json
//! ```
//!
//! Everything model-specific goes through [`Model`]: any family trains here. A distributed
//! run (DDP, [`super::distributed`]) runs this same recipe on every rank: each trains its share
//! of a step and evaluates its share of the validation batches, the ranks add their sums, and
//! rank 0 alone writes (checkpoints, metrics, the adapter, `summary.json`).
use super::checkpoint::{self, RngState, TrainerState};
use super::config::{self, Distributed, LoadedConfig, Method, TrainSection};
use super::distributed::{self, StepCounts};
use super::report::{self, MetricsLog, Progress, StepLine};
use super::{
    accumulate_gradients_over, evaluate_on, evaluate_tasks_on, finished_summary, interrupted,
    memory, optim, output, prepare_data, set_threads, tokenizer_and_context, DryRun, EvalResult,
    Outcome, RunOptions, Schedule, StepGrads, StopReason, Summary, Tuner, ADAPTER_DIR, CONFIG_FILE,
    SUMMARY_FILE,
};
use crate::data::{BatchConfig, Batcher, DataTask};
use crate::model::{self, LoadOptions, LoadedModel, Model, ModelSource, Task};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Run the recipe. `dry`: stop after setup, having checked everything and written nothing.
pub(super) fn execute(c: &LoadedConfig, opts: &RunOptions, dry: bool) -> Result<Outcome> {
    let mut run = match Recipe::setup(c, opts, dry)? {
        Setup::Ready(run) => run,
        Setup::AlreadyFinished(s) => return Ok(Outcome::AlreadyFinished(*s)),
    };
    if dry {
        return Ok(Outcome::DryRun(run.dry_run()));
    }
    if interrupted(opts) {
        return Err(Error::msg(
            "interrupted before training started; nothing was written",
        ));
    }
    let mut session = run.open()?;
    // ZeRO-3: from here on each rank holds only its own weights (resumed values included).
    run.zero3_release()?;
    if session.resumed_from_step.is_none() {
        run.evaluate(&mut session)?;
    }
    let mut stop_reason = StopReason::MaxSteps;
    while session.state.step < run.max_steps {
        if let Some(reason) = run.stop_before_step(&session)? {
            stop_reason = reason;
            break;
        }
        let step = run.step(&mut session)?;
        if run.t().eval_every.is_some_and(|e| step.is_multiple_of(e)) {
            run.evaluate(&mut session)?;
            session.last_eval = Some(step);
            if run.early_stopping(&session) {
                stop_reason = StopReason::EarlyStopping;
            }
        }
        let stopping = stop_reason != StopReason::MaxSteps
            || run.t().stop_after.is_some_and(|s| step >= s)
            || step == run.max_steps;
        if run.t().save_every.is_some_and(|e| step.is_multiple_of(e)) || stopping {
            run.save(&mut session)?;
        }
        if stop_reason != StopReason::MaxSteps {
            break;
        }
    }
    run.finish(session, stop_reason)
}

/// What [`Recipe::setup`] found.
enum Setup<'a> {
    Ready(Box<Recipe<'a>>),
    /// `--resume` of a run that had finished: its saved summary.
    AlreadyFinished(Box<Summary>),
}

/// Everything a run holds once set up.
struct Recipe<'a> {
    c: &'a LoadedConfig,
    opts: &'a RunOptions,
    wall: Instant,
    out: PathBuf,
    model: Box<dyn Model>,
    tokenizer: crate::tokenizer::Tokenizer,
    /// Classification: the class names by id, saved with the trained model.
    labels: Option<crate::data::LabelMap>,
    tuner: Tuner,
    params: Vec<(String, Var)>,
    /// ZeRO-1/2/3: which rank owns (updates, keeps optimizer state for) each parameter.
    zero: Option<super::zero::Partition>,
    /// ZeRO-3: the parameters themselves sharded, and how they are gathered.
    zero3: Option<super::zero3::Zero3>,
    /// `train.overlap_comm`: the gradient collectives sent during the backward pass.
    overlap: Option<Arc<super::overlap::BucketPlan>>,
    /// This rank's optimizer: every parameter, or under ZeRO the ones it owns.
    opt: optim::Optimizer,
    schedule: Schedule,
    batcher: Batcher,
    validation: Validation,
    data_summary: String,
    n_train: usize,
    batches_per_epoch: usize,
    max_steps: usize,
    folder: output::RunFolder,
    resume_from: Option<(usize, PathBuf, TrainerState)>,
    memory: memory::MemoryEstimate,
    available: Option<u64>,
    model_line: String,
    /// `[eval]`: the benchmarks run on the base and on the result when the run finishes.
    eval_plan: Option<super::bench_eval::EvalPlan>,
}

/// The state of this session of a run (a resumed run is a new session).
struct Session {
    state: TrainerState,
    /// Rank 0's (the other ranks of a distributed run write nothing).
    metrics: Option<MetricsLog>,
    progress: Progress,
    resumed_from_step: Option<usize>,
    last_saved: Option<usize>,
    last_eval: Option<usize>,
    /// Classification: accuracy at the last evaluation.
    last_val_accuracy: Option<f64>,
    session_tokens: u64,
    session_time: f64,
}

impl<'a> Recipe<'a> {
    fn t(&self) -> &'a TrainSection {
        &self.c.config.train
    }

    fn dist(&self) -> &'a crate::dist::Dist {
        &self.opts.dist
    }

    // ---- setup ------------------------------------------------------------------------------

    /// Everything checked before the run writes: the config, the data (read and tokenized;
    /// first, so its errors do not wait for the weights), the output folder and the checkpoint
    /// to resume from, the model with its task, objective and method, the optimizer, the memory
    /// estimate. `dry`: LoftQ is checked with one round (see [`setup_model`]).
    fn setup(c: &'a LoadedConfig, opts: &'a RunOptions, dry: bool) -> Result<Setup<'a>> {
        let wall = Instant::now();
        super::inline_candle_elementwise();
        let cfg = &c.config;
        if opts.resume && opts.overwrite {
            return Err(Error::msg(
                "--resume continues the run in output_dir and --overwrite starts it again: give one of them",
            ));
        }
        check_distributed(c, &opts.dist)?;
        if let Some(n) = cfg.train.threads {
            set_threads(n);
        }
        let mut device_spec =
            config::parse_device(&cfg.train.device).map_err(|e| c.key_error("train.device", e))?;
        if let (Some(gpu), "cuda") = (opts.dist.gpu(), cfg.train.device.as_str()) {
            // One GPU per rank: `cuda` is the one this rank's collectives run on.
            device_spec = config::DeviceSpec::Cuda(gpu);
        }
        let device = device_spec.device()?;
        let source = model::resolve(&cfg.model)?;
        let data = setup_data(c, &source, &device)?;
        // `[eval]` tasks are read and their data found now, not after training.
        let eval_plan = super::bench_eval::plan(c)?;
        let (folder, resume_from) = match decide_output(c, opts, &source, &data)? {
            OutputPlan::AlreadyFinished(s) => return Ok(Setup::AlreadyFinished(Box::new(s))),
            OutputPlan::Run { folder, resume } => (folder, resume),
        };
        let placeholders = zero3_placeholders(c, &source, &data, &opts.dist)?;
        let RunModel {
            model,
            source,
            tokenizer,
            tuner,
            params,
        } = setup_model(c, source, &device, &data, placeholders.clone(), dry)?;
        let zero = matches!(
            cfg.train.distributed,
            Distributed::Zero1 | Distributed::Zero2 | Distributed::Zero3
        )
        .then(|| {
            // (A weight another rank owns may have loaded without its values: its size is
            // the placeholder's.)
            let sizes = super::zero3::param_sizes(&*model, &params);
            super::zero::Partition::new(&sizes, opts.dist.world_size(), opts.dist.rank())
        });
        let (overlap_on, overlap_why) = resolve_overlap(c, &opts.dist)?;
        let zero3 = match &zero {
            Some(part) if cfg.train.distributed == Distributed::Zero3 => {
                let z = setup_zero3(c, &*model, &params, part.clone(), overlap_on, &opts.dist)?;
                if let Some(p) = &placeholders {
                    z.check_placeholders(p, &params)?;
                }
                Some(z)
            }
            _ => None,
        };
        let overlap = setup_overlap(c, &*model, &params, zero.as_ref(), &opts.dist, overlap_on);
        let (schedule, opt) = setup_optimizer(c, &tuner, &params, zero.as_ref(), data.max_steps)?;
        let (memory, available) = setup_memory(
            c,
            &source,
            &*model,
            &data,
            &params,
            zero.as_ref(),
            zero3.as_ref().map(|z| (z, placeholders.is_some())),
        )?;
        let mut model_line = format!(
            "model {} ({}, {} layers); method {}",
            cfg.model,
            source.format(),
            model.dims().layers,
            tuner.method()
        );
        if cfg.method != Method::Lora && matches!(source, ModelSource::Gguf(_)) {
            model_line.push_str(&format!(
                "; the quantized GGUF base is dequantized to f32 for {} fine-tuning",
                tuner.method()
            ));
        }
        let why = overlap_why.map(|w| format!(", {w}")).unwrap_or_default();
        if overlap.is_some() {
            model_line.push_str(&format!(
                "; gradients sent during the backward pass (train.overlap_comm{why})"
            ));
        } else if zero3.as_ref().is_some_and(|z| z.overlaps()) {
            model_line.push_str(&format!(
                "; ZeRO-3's collectives on a thread of their own (train.overlap_comm{why})"
            ));
        } else if !overlap_on && opts.dist.world_size() > 1 && !why.is_empty() {
            model_line.push_str(&format!(
                "; collectives not overlapped with computing (train.overlap_comm{why})"
            ));
        }
        if let (Some(p), Some(z)) = (&placeholders, &zero3) {
            let (all, what) = match z.frozen_count() {
                0 => (params.len(), "weights"),
                n => (n, "frozen weights"),
            };
            model_line.push_str(&format!(
                "; ZeRO-3: this rank read its own {} of the {all} {what}, not the others' {}",
                all.saturating_sub(p.len()),
                p.len()
            ));
        }
        if let Some(z) = zero3
            .as_ref()
            .filter(|z| z.frozen_quantized_count() > 0 && opts.dist.world_size() > 1)
        {
            model_line.push_str(&format!(
                "; ZeRO-3 shards the quantized base too ({} weights sent as their blocks)",
                z.frozen_quantized_count()
            ));
        }
        Ok(Setup::Ready(Box::new(Recipe {
            c,
            opts,
            wall,
            out: cfg.output_dir.clone(),
            model,
            tokenizer,
            labels: data.prepared.labels.clone(),
            tuner,
            params,
            zero,
            zero3,
            overlap,
            opt,
            schedule,
            data_summary: data.prepared.summary(),
            batcher: data.batcher,
            validation: data.validation,
            n_train: data.n_train,
            batches_per_epoch: data.batches_per_epoch,
            max_steps: data.max_steps,
            folder,
            resume_from,
            memory,
            available,
            model_line,
            eval_plan,
        })))
    }

    /// What the run would do (`train --dry-run`).
    fn dry_run(&self) -> DryRun {
        let out = &self.out;
        let output = match (&self.resume_from, &self.folder) {
            (Some((step, _, _)), _) => format!(
                "output_dir {}: would resume the run from step {step} of {}",
                out.display(),
                self.max_steps
            ),
            (None, output::RunFolder::Run { .. }) if self.opts.overwrite => format!(
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
        DryRun {
            model: self.model_line.clone(),
            params: self.tuner.params_report(),
            memory: self.memory.clone(),
            available_bytes: self.available,
            data: self.data_summary.clone(),
            max_steps: self.max_steps,
            output,
        }
    }

    // ---- open -------------------------------------------------------------------------------

    /// The output folder, the state to resume from, the metrics log and the progress display:
    /// from here on the run writes.
    fn open(&mut self) -> Result<Session> {
        let (out, t, dist) = (&self.out, self.t(), self.dist());
        // Every rank has looked at output_dir (setup); only now may rank 0 change it.
        dist.barrier()?;
        let root = dist.is_root();
        if root {
            if self.opts.overwrite && self.folder != output::RunFolder::Fresh {
                output::remove_run_files(out)?;
            }
            output::create(out)?;
            checkpoint::remove_partial(out)?;
        }
        let mut state = TrainerState {
            step: 0,
            max_steps: self.max_steps,
            method: self.tuner.method().to_string(),
            data_cursor: self.batcher.cursor(),
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
            last_val_loss_by_task: Default::default(),
            best_val_loss: None,
            best_step: None,
            evals_since_best: 0,
            train_examples: self.n_train,
            batches_per_epoch: self.batches_per_epoch,
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            world_size: dist.world_size(),
            comm_time_s: 0.0,
            comm_wait_time_s: 0.0,
        };
        let progress_total = self.max_steps.min(t.stop_after.unwrap_or(usize::MAX));
        let mut resumed_from_step = None;
        let resume_from = self.resume_from.take();
        if let Some((step, dir, saved)) = resume_from {
            self.tuner.restore_mut(&mut *self.model, &dir)?;
            self.opt.load(&dir.join(checkpoint::OPTIMIZER_FILE))?;
            self.batcher
                .seek(saved.data_cursor)
                .map_err(|e| Error::file(dir.join(checkpoint::STATE_FILE), e))?;
            self.tuner
                .replay_rng(&*self.model, saved.rng.dropout_calls)?;
            self.model.set_dropout_calls(saved.rng.dropout_calls);
            state = TrainerState {
                max_steps: self.max_steps,
                grad_accum: t.grad_accum,
                world_size: dist.world_size(),
                ..saved
            };
            resumed_from_step = Some(step);
        }
        let metrics = if root {
            let effective = toml::to_string(&self.c.effective).unwrap_or_default();
            crate::fsutil::write_atomic(&out.join(CONFIG_FILE), effective.as_bytes())?;
            Some(MetricsLog::open(out, resumed_from_step)?)
        } else {
            None
        };

        let mode = if root {
            self.opts.progress
        } else {
            report::ProgressMode::Quiet
        };
        let progress = Progress::new(mode, progress_total, state.step, t.log_every);
        progress.println(&self.model_line);
        if dist.world_size() > 1 {
            progress.println(&format!(
                "distributed: {} on {} ranks ({}); a step takes grad_accum {} x {} ranks = {} micro-batches of {}",
                t.distributed.as_str(),
                dist.world_size(),
                dist.backend(),
                t.grad_accum,
                dist.world_size(),
                t.grad_accum * dist.world_size(),
                t.batch_size
            ));
            if t.threads.is_none() {
                progress.println(
                    "note: train.threads is not set, so every rank uses all cores (ferrotune launch sets it; with mpirun pass --threads)",
                );
            }
        }
        progress.println(&self.tuner.params_report());
        progress.println(&self.memory.table());
        if self.zero.is_some() && !root {
            // Under ZeRO each rank's share differs (the rank owning the largest tensor holds
            // its update temporaries): every rank says its own estimate.
            eprintln!("{}{}", self.dist().label(), self.memory.table());
        }
        progress.println(&self.data_summary);
        match resumed_from_step {
            Some(s) => progress.println(&format!("resuming from step {s} of {}", self.max_steps)),
            None if self.opts.resume => progress.println(&format!(
                "--resume: no checkpoint in {}; starting from step 0",
                checkpoint::checkpoints_dir(out).display()
            )),
            None => {}
        }
        Ok(Session {
            state,
            metrics,
            progress,
            resumed_from_step,
            last_saved: resumed_from_step,
            last_eval: None,
            last_val_accuracy: None,
            session_tokens: 0,
            session_time: 0.0,
        })
    }

    // ---- the loop ---------------------------------------------------------------------------

    /// Why the run stops before the next step, if it does: `stop_after` reached, or Ctrl-C
    /// (then the checkpoint is written by [`Self::finish`]).
    fn stop_before_step(&self, s: &Session) -> Result<Option<StopReason>> {
        if self.t().stop_after.is_some_and(|a| s.state.step >= a) {
            return Ok(Some(StopReason::StopAfter));
        }
        // Every rank stops at the same step, whichever saw the Ctrl-C.
        let mut stop = [f64::from(u8::from(interrupted(self.opts)))];
        self.dist().all_reduce_sum_f64(&mut stop)?;
        Ok((stop[0] > 0.0).then_some(StopReason::Interrupted))
    }

    /// One optimizer step: `grad_accum` micro-batches, their loss and gradients, clipping, the
    /// optimizer update; metrics and progress. Returns the step number.
    fn step(&mut self, s: &mut Session) -> Result<usize> {
        let (t, dist) = (self.t(), self.dist());
        let t0 = Instant::now();
        let comm0 = dist.comm_seconds();
        let step = s.state.step + 1;
        // This rank's micro-batches of the step (all of them in one process), then every
        // micro-batch's counts: the losses are divided by the step's loss tokens on all ranks.
        let per_step = t.grad_accum * dist.world_size();
        let drawn = distributed::draw_step(&mut self.batcher, t.grad_accum, dist)?;
        let counts = StepCounts::exchange(&drawn, per_step, dist)?;
        let n_loss = counts.loss_tokens_total();
        let (index, batches): (Vec<usize>, Vec<_>) =
            drawn.into_iter().map(|d| (d.index, d.batch)).unzip();
        let passes = s.state.rng.dropout_calls;
        let mut overlapped: Option<super::overlap::OverlapTimes> = None;
        let StepGrads {
            loss_sum,
            mut grads,
            forward_s,
            backward_s,
            ..
        } = if self.zero3.is_some() {
            // ZeRO-3: the gradients arrive summed on their owners, layer by layer.
            let (sg, times) = self.zero3_gradients(&batches, &index, &counts, passes, n_loss)?;
            overlapped = times;
            sg
        } else {
            let (model, tuner) = (&*self.model, &self.tuner);
            let before_forward = |i: usize| {
                // Dropout masks of the micro-batch's pass number in the whole step, as one
                // process would draw them (one process counts them itself).
                if dist.world_size() > 1 {
                    let calls = passes + counts.forwards_before(index[i]) as u64;
                    tuner.replay_rng(model, calls)?;
                    model.set_dropout_calls(calls);
                }
                Ok(())
            };
            // With overlap each layer's gradients leave while the layers before it are
            // differentiated, the rest after the backward pass.
            let mut reducer = match &self.overlap {
                Some(plan) => Some(super::overlap::Reducer::start(dist, plan.clone())?),
                None => None,
            };
            let overlap = reducer.is_some();
            let mut layer_done =
                |l: usize, acc: &mut [Option<Tensor>], mb: &mut [Option<Tensor>]| match reducer
                    .as_mut()
                {
                    Some(r) => r.layer_done(l, acc, mb),
                    None => Ok(()),
                };
            let mut sg = accumulate_gradients_over(
                model,
                &self.params,
                &batches,
                t.gradient_checkpointing,
                n_loss,
                before_forward,
                overlap.then_some(&mut layer_done as &mut super::LastLayerDone),
            )?;
            if let Some(r) = reducer {
                overlapped = Some(r.finish(&mut sg.grads, dist.rank())?);
            }
            sg
        };
        // The ranks' gradients (each already over the step's tokens) and losses, added: on
        // every rank (DDP, ZeRO-1), or on each gradient's owner (ZeRO-2; ZeRO-3 did it).
        let zero2 =
            matches!(t.distributed, Distributed::Zero2 | Distributed::Zero3) && self.zero.is_some();
        match &self.zero {
            _ if overlapped.is_some() => {}
            Some(_) if self.zero3.is_some() => {}
            Some(part) if zero2 => super::zero::reduce_grads(&mut grads, part, dist)?,
            _ => distributed::all_reduce_grads(&mut grads, dist, distributed::BUCKET_FLOATS)?,
        }
        let mut loss_sum = [loss_sum];
        dist.all_reduce_sum_f64(&mut loss_sum)?;
        let loss = if n_loss == 0 {
            0.0
        } else {
            loss_sum[0] / n_loss as f64
        };
        let t_opt = Instant::now();
        s.state.rng.dropout_calls += counts.forwards() as u64;
        let lr = self.schedule.lr_at(step);
        let norm = match &self.zero {
            Some(part) if zero2 => {
                super::zero::clip_grad_norm_sharded(&mut grads, part, dist, t.max_grad_norm)?
            }
            _ => optim::clip_grad_norm(&mut grads, t.max_grad_norm)?,
        };
        if !loss.is_finite() || !norm.is_finite() {
            s.progress.finish();
            let what = if loss.is_finite() {
                format!("the gradient norm is {norm}")
            } else {
                format!("the training loss is {loss}")
            };
            let kept = match s.last_saved {
                Some(at) => format!(
                    "the last good checkpoint is {}",
                    checkpoint::checkpoints_dir(&self.out)
                        .join(format!("step-{at}"))
                        .display()
                ),
                None => "no checkpoint was written".to_string(),
            };
            return Err(Error::msg(format!(
                "step {step}: {what} (lr {lr:.3e}); training stopped without saving, {kept} (lower train.lr or check the data)"
            )));
        }
        if n_loss > 0 {
            match &self.zero {
                Some(part) => {
                    // this rank's parameters, then every parameter from its owner
                    let mine: Vec<Tensor> =
                        part.mine().into_iter().map(|i| grads[i].clone()).collect();
                    drop(grads);
                    self.opt.step(&mine, lr)?;
                    drop(mine);
                    match &self.zero3 {
                        // The weights stay with their owners; adapters are replicated.
                        Some(z) => z.sync_replicated(&self.params, dist)?,
                        None => super::zero::sync_params(&self.params, part, dist)?,
                    }
                }
                None => self.opt.step(&grads, lr)?,
            }
            // A finite gradient can still overflow the weights (a huge lr or LoRA+ ratio):
            // stop before such weights are saved as the run's result.
            if let Some(name) = optim::first_non_finite(&self.params)? {
                s.progress.finish();
                return Err(Error::msg(format!(
                    "step {step}: the update made `{name}` non-finite (lr {lr:.3e}); training stopped without saving (lower train.lr or the method's lr settings)"
                )));
            }
        }
        if self.zero3.is_some() {
            super::zero3::return_free_memory();
        }
        let optimizer_s = t_opt.elapsed().as_secs_f64();
        let comm_s = dist.comm_seconds() - comm0;
        // What communication cost the step: the collectives of the training thread and its
        // wait for the overlapped ones, not their time under the backward pass.
        let comm_wait_s = match overlapped {
            Some(o) => (comm_s - o.comm_s).max(0.0) + o.wait_s,
            None => comm_s,
        };
        let tokens = counts.tokens_total();
        let dt = t0.elapsed().as_secs_f64();
        s.session_time += dt;
        s.session_tokens += tokens as u64;
        let st = &mut s.state;
        st.step = step;
        st.train_tokens += tokens as u64;
        st.loss_tokens += n_loss as u64;
        st.train_time_s += dt;
        st.comm_time_s += comm_s;
        st.comm_wait_time_s += comm_wait_s;
        st.last_train_loss = Some(loss);
        st.data_cursor = self.batcher.cursor();
        st.epoch = st.data_cursor.epoch as f64
            + st.data_cursor.index as f64 / self.batches_per_epoch as f64;
        let tps = s.session_tokens as f64 / s.session_time.max(1e-9);
        if let Some(m) = &mut s.metrics {
            let mut line = json!({
                "type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens": tokens, "loss_tokens": n_loss, "tokens_per_s": tokens as f64 / dt.max(1e-9),
                "epoch": st.epoch, "elapsed_s": self.wall.elapsed().as_secs_f64(),
                "step_s": dt, "forward_s": forward_s, "backward_s": backward_s,
                "optimizer_s": optimizer_s,
            });
            if dist.world_size() > 1 {
                // Rank 0's own forward and backward; its time in collectives.
                line["world_size"] = dist.world_size().into();
                line["comm_s"] = comm_s.into();
                line["comm_wait_s"] = comm_wait_s.into();
            }
            m.write(&line)?;
        }
        s.progress.step(&StepLine {
            step,
            loss,
            lr,
            tokens_per_s: tps,
            world_size: dist.world_size(),
            comm_share: st.comm_time_s / st.train_time_s.max(1e-9),
            comm_wait_share: self
                .overlap
                .as_ref()
                .map(|_| st.comm_wait_time_s / st.train_time_s.max(1e-9)),
        });
        Ok(step)
    }

    /// Validation loss (if there is validation data), overall and, with `[[tasks]]`, per task:
    /// metrics, progress, best-so-far (on the overall loss), plot.
    fn evaluate(&mut self, s: &mut Session) -> Result<Option<EvalResult>> {
        if matches!(self.validation, Validation::None) {
            return Ok(None);
        }
        if self.zero3.as_ref().is_some_and(|z| !z.is_gathered()) {
            if self.model.task_type() == model::TaskType::CausalLm {
                // ZeRO-3: the validation loss through the layer walk, one layer's weights at a
                // time, as in training.
                let e = self.zero3_evaluate()?;
                return self.record_evaluation(s, e.overall, e.by_task);
            }
            // Accuracy needs the model's own logits: the whole model on every rank for the
            // evaluation, then sharded again.
            self.zero3_gather()?;
            let r = self.evaluate_gathered(s);
            self.zero3_release()?;
            return r;
        }
        self.evaluate_gathered(s)
    }

    /// ZeRO-3's validation losses, overall and per task.
    fn zero3_evaluate(&mut self) -> Result<super::TaskEval> {
        let dist = self.dist();
        let max = self.t().eval_batches;
        let tasks: Vec<(String, &crate::data::Batcher)> = match &self.validation {
            Validation::None => Vec::new(),
            Validation::Single(vb) => vec![(String::new(), &**vb)],
            Validation::Tasks(tasks) => tasks.iter().map(|(n, b)| (n.clone(), b)).collect(),
        };
        let Some(z) = self.zero3.as_ref() else {
            return Err(Error::msg(
                "internal error: a ZeRO-3 pass without the ZeRO-3 plan",
            ));
        };
        let llama = Self::llama_mut(&mut *self.model)?;
        let params = &self.params;
        let mut e = super::evaluate_tasks_lockstep(&tasks, max, dist, &mut |b| {
            z.eval_loss(llama, params, b, dist)
        })?;
        if matches!(self.validation, Validation::Single(_)) {
            e.by_task.clear();
        }
        Ok(e)
    }

    fn evaluate_gathered(&self, s: &mut Session) -> Result<Option<EvalResult>> {
        let (r, by_task) = match &self.validation {
            Validation::None => return Ok(None),
            Validation::Single(vb) => (
                evaluate_on(&*self.model, vb, self.t().eval_batches, self.dist())?,
                Vec::new(),
            ),
            Validation::Tasks(tasks) => {
                let e = evaluate_tasks_on(&*self.model, tasks, self.t().eval_batches, self.dist())?;
                (e.overall, e.by_task)
            }
        };
        self.record_evaluation(s, r, by_task)
    }

    /// Metrics, progress, best-so-far (on the overall loss) and plot of one evaluation.
    fn record_evaluation(
        &self,
        s: &mut Session,
        r: EvalResult,
        by_task: Vec<(String, EvalResult)>,
    ) -> Result<Option<EvalResult>> {
        let st = &mut s.state;
        let mut line = json!({
            "type": "eval", "step": st.step, "val_loss": r.loss,
            "val_perplexity": r.perplexity, "val_tokens": r.tokens,
        });
        if let Some(a) = r.accuracy {
            line["val_accuracy"] = a.into();
        }
        if !by_task.is_empty() {
            // The tokens too, so the overall loss can be checked as the tasks' token-weighted
            // mean. A NaN loss (no tokens) is written as null, as serde_json writes NaN.
            let losses: serde_json::Map<String, serde_json::Value> = by_task
                .iter()
                .map(|(n, e)| (n.clone(), json!(e.loss)))
                .collect();
            let tokens: serde_json::Map<String, serde_json::Value> = by_task
                .iter()
                .map(|(n, e)| (n.clone(), json!(e.tokens)))
                .collect();
            line["val_loss_by_task"] = losses.into();
            line["val_tokens_by_task"] = tokens.into();
        }
        if let Some(m) = &mut s.metrics {
            m.write(&line)?;
        }
        s.last_val_accuracy = r.accuracy;
        let accuracy = r
            .accuracy
            .map(|a| format!(", accuracy {a:.4}"))
            .unwrap_or_default();
        s.progress.println(&format!(
            "step {}: val loss {:.4} perplexity {:.3} ({} tokens{accuracy}){}",
            st.step,
            r.loss,
            r.perplexity,
            r.tokens,
            report::task_losses(&by_task)
        ));
        st.last_val_loss_by_task = by_task
            .iter()
            .map(|(n, e)| (n.clone(), e.loss.is_finite().then_some(e.loss)))
            .collect();
        if st.initial_val_loss.is_none() {
            st.initial_val_loss = Some(r.loss);
        }
        st.last_val_loss = Some(r.loss);
        if st.best_val_loss.is_none_or(|b| r.loss < b) {
            st.best_val_loss = Some(r.loss);
            st.best_step = Some(st.step);
            st.evals_since_best = 0;
        } else {
            st.evals_since_best += 1;
        }
        if let Some(m) = &s.metrics {
            let (train_curve, val_curve) = m.curves();
            report::plot_loss(&self.out.join(report::PLOT_FILE), &train_curve, &val_curve)?;
        }
        Ok(Some(r))
    }

    /// Whether the last evaluations call for early stopping (printed when they do).
    fn early_stopping(&self, s: &Session) -> bool {
        let Some(p) = self.t().early_stopping_patience else {
            return false;
        };
        if s.state.evals_since_best < p {
            return false;
        }
        s.progress.println(&format!(
            "early stopping: no better val loss in {p} evaluations (best {:.4} at step {})",
            s.state.best_val_loss.unwrap_or(f64::NAN),
            s.state.best_step.unwrap_or(0)
        ));
        true
    }

    /// A checkpoint of the current step (the method's weights, the optimizer, the state),
    /// written by rank 0 (the replicas are equal).
    fn save(&self, s: &mut Session) -> Result<()> {
        let dist = self.dist();
        if self.zero.is_some() {
            // Every rank writes its optimizer shard into rank 0's unfinished checkpoint folder
            // (a file system all ranks share, as for any sharded checkpoint); rank 0 then adds
            // the weights and the state and makes it final.
            let step = s.state.step;
            let tmp = checkpoint::pending_dir(&self.out, step);
            if dist.is_root() {
                checkpoint::begin(&self.out, step)?;
            }
            dist.barrier()?;
            let shard = optim::shard_path(
                &tmp.join(checkpoint::OPTIMIZER_FILE),
                dist.rank(),
                dist.world_size(),
            );
            self.opt.save(&shard)?;
            dist.barrier()?;
            // ZeRO-3 between steps: the weights from their owners onto rank 0, a bucket at a
            // time, written as the tuner writes them.
            let gathered = match &self.zero3 {
                Some(z) if !z.is_gathered() && z.has_sharded() => {
                    Some(z.gather_to_root(&self.params, dist)?)
                }
                _ => None,
            };
            if dist.is_root() {
                checkpoint::commit(&self.out, step, &s.state, |tmp| match &gathered {
                    Some(Some(tensors)) => {
                        let map = tensors.iter().cloned().collect();
                        crate::fsutil::write_safetensors(
                            &tmp.join(super::method::WEIGHTS_CHECKPOINT_FILE),
                            &map,
                        )
                    }
                    _ => self.tuner.save(&*self.model, tmp),
                })?;
            }
        } else if dist.is_root() {
            checkpoint::save(&self.out, s.state.step, &s.state, |tmp| {
                self.tuner.save(&*self.model, tmp)?;
                self.opt.save(&tmp.join(checkpoint::OPTIMIZER_FILE))
            })?;
        }
        if dist.is_root() {
            if let Some(k) = self.t().keep_checkpoints {
                checkpoint::prune(&self.out, k)?;
            }
        }
        s.last_saved = Some(s.state.step);
        Ok(())
    }

    // ---- ZeRO-3 -----------------------------------------------------------------------------

    /// The LLaMA model under the run's `Box<dyn Model>` (ZeRO-3 checked the family at setup).
    fn llama_mut(model: &mut dyn Model) -> Result<&mut crate::model::Llama> {
        model
            .as_any_mut()
            .downcast_mut::<crate::model::Llama>()
            .ok_or_else(|| Error::msg("zero3 needs a LLaMA-family model"))
    }

    /// ZeRO-3: drop the weights other ranks own (from the model, the parameter list and the
    /// tuner). Nothing to do otherwise.
    fn zero3_release(&mut self) -> Result<()> {
        let Some(z) = self.zero3.as_mut() else {
            return Ok(());
        };
        let llama = Self::llama_mut(&mut *self.model)?;
        let names = z.release_all(llama, &mut self.params)?;
        let released: Vec<(&str, Var)> = self
            .params
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        self.tuner.replace_vars(released);
        Ok(())
    }

    /// ZeRO-3: every rank gathers the whole model (evaluation, the end of the run). Returns
    /// whether it did (it was sharded).
    fn zero3_gather(&mut self) -> Result<bool> {
        self.zero3_gather_onto(false)
    }

    /// [`Self::zero3_gather`], with `root_only` onto rank 0 alone (the end of the run: the
    /// other ranks send their shares and never hold the whole model).
    fn zero3_gather_onto(&mut self, root_only: bool) -> Result<bool> {
        let dist = self.dist();
        let Some(z) = self.zero3.as_mut().filter(|z| !z.is_gathered()) else {
            return Ok(false);
        };
        let llama = Self::llama_mut(&mut *self.model)?;
        let vars = if root_only {
            z.gather_all_on_root(llama, &mut self.params, dist)?
        } else {
            z.gather_all(llama, &mut self.params, dist)?
        };
        let named: Vec<(String, Var)> = vars
            .into_iter()
            .map(|(i, v)| (self.params[i].0.clone(), v))
            .collect();
        self.tuner
            .replace_vars(named.iter().map(|(n, v)| (n.as_str(), v.clone())));
        Ok(true)
    }

    /// ZeRO-3's step: each of this rank's micro-batches walked layer by layer with the weights
    /// gathered as needed (an empty one only takes part in the collectives); the gradients
    /// come back summed on their owners.
    fn zero3_gradients(
        &mut self,
        batches: &[crate::data::Batch],
        index: &[usize],
        counts: &StepCounts,
        passes: u64,
        n_loss: usize,
    ) -> Result<(StepGrads, Option<super::overlap::OverlapTimes>)> {
        let dist = self.dist();
        let Some(z) = self.zero3.as_ref() else {
            return Err(Error::msg(
                "internal error: a ZeRO-3 pass without the ZeRO-3 plan",
            ));
        };
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; self.params.len()];
        let mut out = StepGrads {
            loss: 0.0,
            loss_tokens: n_loss,
            loss_sum: 0.0,
            grads: Vec::new(),
            forward_s: 0.0,
            backward_s: 0.0,
            forwards: 0,
        };
        let mut times = super::overlap::OverlapTimes::default();
        for (i, batch) in batches.iter().enumerate() {
            let batch = (batch.n_loss_tokens > 0).then_some(batch);
            if batch.is_some() {
                out.forwards += 1;
                // Dropout masks of the micro-batch's pass number in the whole step.
                let calls = passes + counts.forwards_before(index[i]) as u64;
                self.tuner.replay_rng(&*self.model, calls)?;
                self.model.set_dropout_calls(calls);
            }
            let scale = 1.0 / n_loss.max(1) as f64;
            let llama = Self::llama_mut(&mut *self.model)?;
            let m = z.loss_and_grads(llama, &self.params, batch, scale, dist, &mut grads)?;
            out.loss_sum += m.loss_sum;
            out.forward_s += m.forward_s;
            out.backward_s += m.backward_s;
            times.comm_s += m.comm_background_s;
            times.wait_s += m.comm_waited_s;
        }
        out.loss = out.loss_sum / n_loss.max(1) as f64;
        // This rank's tensors: their summed gradients (zeros where no micro-batch reached
        // them); the others' are empty placeholders the update never reads.
        out.grads = grads
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let v = &self.params[i].1;
                match g {
                    Some(g) => Ok(Tensor::from_vec(g, v.shape(), v.device())?.to_dtype(v.dtype())?),
                    None if z.partition().is_mine(i) => {
                        Ok(Tensor::zeros(v.shape(), v.dtype(), v.device())?)
                    }
                    None => Ok(Tensor::zeros(0, v.dtype(), v.device())?),
                }
            })
            .collect::<Result<_>>()?;
        Ok((out, z.overlaps().then_some(times)))
    }

    // ---- finish -----------------------------------------------------------------------------

    /// The end of the session: the last evaluation and checkpoint, the plot, the adapter (when
    /// the run finished) and `summary.json`.
    fn finish(mut self, mut s: Session, mut stop_reason: StopReason) -> Result<Outcome> {
        let t = self.t();
        if stop_reason != StopReason::Interrupted
            && t.stop_after.is_some_and(|a| s.state.step >= a)
            && s.state.step < self.max_steps
        {
            stop_reason = StopReason::StopAfter;
        }
        s.progress.finish();
        let finished = !matches!(stop_reason, StopReason::StopAfter | StopReason::Interrupted);
        if finished && s.last_eval != Some(s.state.step) {
            self.evaluate(&mut s)?;
        }
        if s.last_saved != Some(s.state.step) {
            self.save(&mut s)?;
        }
        if self.zero3.is_some() {
            // ZeRO-3: the checkpoint holds the optimizer state, so it can go; then the whole
            // model on rank 0 for the files it writes (every rank takes part in the
            // gathering; the others go on holding their share only).
            self.opt = optim::Optimizer::new(&t.optimizer_config(), Vec::new(), Vec::new())?;
            self.zero3_gather_onto(true)?;
        }
        let Some(metrics) = &s.metrics else {
            // Not rank 0: rank 0 writes the result and summary.json; this rank's summary is
            // returned only.
            return Ok(Outcome::Trained(self.summary(&s, stop_reason, None, None)));
        };
        let (train_curve, val_curve) = metrics.curves();
        report::plot_loss(&self.out.join(report::PLOT_FILE), &train_curve, &val_curve)?;
        let (adapter_dir, model_dir) = match (finished, &self.tuner) {
            (false, _) => (None, None),
            (
                true,
                Tuner::Lora { .. }
                | Tuner::Ia3 { .. }
                | Tuner::Adapter { .. }
                | Tuner::Prompt { .. },
            ) => {
                let dir = self.out.join(ADAPTER_DIR);
                self.tuner.save_adapter(&*self.model, &dir)?;
                if let Some(l) = &self.labels {
                    // PEFT keeps no class names; `classify --adapter` and users read them here.
                    let text = serde_json::to_string_pretty(&l.hf_config())
                        .expect("a label map always serializes");
                    crate::fsutil::write_atomic(&dir.join(super::LABELS_FILE), text.as_bytes())?;
                }
                (Some(dir), None)
            }
            // Full and selective runs change base weights: the whole model, as an HF folder
            // that transformers and `--model` load (its config has the classes as id2label).
            (true, Tuner::Weights { vars, method, .. }) => {
                let dir = self.out.join(super::MODEL_DIR);
                let max_shard = match &t.max_shard_size {
                    Some(m) => crate::model::convert::parse_size(m)
                        .map_err(|e| self.c.key_error("train.max_shard_size", e))?,
                    None => crate::model::convert::DEFAULT_MAX_SHARD_BYTES,
                };
                crate::model::convert::write_model_folder_sharded(
                    &*self.model,
                    &self.tokenizer,
                    &dir,
                    candle_core::DType::F32,
                    max_shard,
                )?;
                // A selective run also keeps only what changed, to put onto the base
                // (`peft::selective::apply`).
                let adapter = match (method, &self.c.config.selective) {
                    (Method::Selective, Some(sel)) => {
                        let a = self.out.join(ADAPTER_DIR);
                        crate::peft::selective::save(
                            &*self.model,
                            vars,
                            sel,
                            &self.c.config.model,
                            &a,
                        )?;
                        Some(a)
                    }
                    _ => None,
                };
                (adapter, Some(dir))
            }
        };
        // Benchmarks on the base and on what the run wrote: the forgetting report.
        if finished {
            if let Some(plan) = &self.eval_plan {
                let report = super::bench_eval::run(
                    self.c,
                    plan,
                    &self.out,
                    adapter_dir.as_deref(),
                    model_dir.as_deref(),
                    &crate::progress::NoProgress,
                )?;
                for r in &report.rows {
                    s.progress.println(&format!(
                        "eval {} {}: {:.4} -> {:.4} ({:+.4}, 95% CI [{:+.4}, {:+.4}]): {}",
                        r.task,
                        r.metric,
                        r.before,
                        r.after,
                        r.delta,
                        r.ci_low,
                        r.ci_high,
                        r.verdict
                    ));
                }
            }
        }
        let summary = self.summary(&s, stop_reason, adapter_dir, model_dir);
        let text = serde_json::to_string_pretty(&summary).expect("the summary always serializes");
        crate::fsutil::write_atomic(&self.out.join(SUMMARY_FILE), text.as_bytes())?;
        Ok(Outcome::Trained(summary))
    }

    /// `summary.json` of the session.
    fn summary(
        &self,
        s: &Session,
        stop_reason: StopReason,
        adapter_dir: Option<PathBuf>,
        model_dir: Option<PathBuf>,
    ) -> Summary {
        let st = &s.state;
        Summary {
            method: self.tuner.method().to_string(),
            steps: st.step,
            max_steps: self.max_steps,
            epochs: st.epoch,
            train_tokens: st.train_tokens,
            loss_tokens: st.loss_tokens,
            train_tokens_per_s: if s.session_time > 0.0 {
                s.session_tokens as f64 / s.session_time
            } else {
                0.0
            },
            train_time_s: st.train_time_s,
            peak_rss_bytes: report::peak_rss_bytes(),
            final_train_loss: st.last_train_loss,
            initial_val_loss: st.initial_val_loss,
            final_val_loss: st.last_val_loss,
            final_val_perplexity: st.last_val_loss.map(f64::exp),
            best_val_loss: st.best_val_loss,
            best_step: st.best_step,
            wall_s: self.wall.elapsed().as_secs_f64(),
            stop_reason,
            resumed_from_step: s.resumed_from_step,
            trainable_params: self.tuner.param_count().trainable,
            all_params: self.tuner.param_count().all,
            adapter_dir,
            model_dir,
            final_val_accuracy: s.last_val_accuracy,
            task_mix: self.batcher.seen_per_source(),
            final_val_loss_by_task: st.last_val_loss_by_task.clone(),
            world_size: self.dist().world_size(),
            comm_time_s: st.comm_time_s,
            comm_wait_time_s: st.comm_wait_time_s,
            already_finished: false,
        }
    }
}

// ---- setup steps ------------------------------------------------------------------------------

/// The validation batches of a run.
enum Validation {
    None,
    /// One list of validation examples (a single dataset, or a `[[data.mixture]]`). Boxed: a
    /// batcher holds its device, which is large in a CUDA build.
    Single(Box<Batcher>),
    /// `[[tasks]]`: each task's validation examples, by task name, in the config's order.
    Tasks(Vec<(String, Batcher)>),
}

/// The data of a run, tokenized and batched, and the number of steps it makes.
struct RunData {
    /// What the examples are (the run's task and objective).
    kind: DataTask,
    prepared: crate::data::Prepared,
    train_bc: BatchConfig,
    batcher: Batcher,
    validation: Validation,
    n_train: usize,
    batches_per_epoch: usize,
    max_steps: usize,
    /// The run's seed (a new head's initialisation).
    seed: u64,
}

/// Read and tokenize the data with the model's tokenizer (no weights read yet), check it
/// against the context window, batch it, and count the steps.
fn setup_data(
    c: &LoadedConfig,
    source: &ModelSource,
    device: &candle_core::Device,
) -> Result<RunData> {
    let t = &c.config.train;
    let (tok, ctx) = tokenizer_and_context(source)?;
    let kind = super::data_task(c, source)?;
    let prepared = prepare_data(c, &tok, Some(ctx), kind)?;
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
    let mut train_bc = prepared.configure(c.config.data.batch_config(
        t.batch_size,
        prepared.max_seq_len,
        &tok,
    ));
    train_bc.shuffle = true;
    let batcher = Batcher::new(prepared.train.clone(), train_bc.clone(), device.clone())?;
    let vc = BatchConfig {
        shuffle: false,
        ..train_bc.clone()
    };
    let by_task = prepared.validation_by_task();
    let validation = if !by_task.is_empty() {
        // One batcher per task: its batches hold only its examples, so each batch's loss is
        // that task's.
        Validation::Tasks(
            by_task
                .into_iter()
                .map(|(name, exs)| Ok((name, Batcher::new(exs, vc.clone(), device.clone())?)))
                .collect::<Result<Vec<_>>>()?,
        )
    } else if prepared.validation.is_empty() {
        Validation::None
    } else {
        Validation::Single(Box::new(Batcher::new(
            prepared.validation.clone(),
            vc,
            device.clone(),
        )?))
    };
    let bpe = batcher.batches_per_epoch();
    let max_steps = match t.max_steps {
        Some(n) => n,
        None => ((t.epochs.unwrap_or(1.0) * bpe as f64) / t.grad_accum as f64)
            .ceil()
            .max(1.0) as usize,
    };
    Ok(RunData {
        kind,
        n_train: prepared.train.len(),
        prepared,
        train_bc,
        batcher,
        validation,
        batches_per_epoch: bpe,
        max_steps,
        seed: t.seed,
    })
}

/// What the run will do with `output_dir`.
enum OutputPlan {
    /// `--resume` of a finished run: its saved summary; nothing to do.
    AlreadyFinished(Summary),
    /// Train there, from the checkpoint `resume` (step, folder, state) or from step 0.
    Run {
        folder: output::RunFolder,
        resume: Option<(usize, PathBuf, TrainerState)>,
    },
}

/// Decide what happens to `output_dir` (a fresh run, a resumed one, one started again, or a
/// refusal) and check that no output lands on an input, writing nothing yet.
fn decide_output(
    c: &LoadedConfig,
    opts: &RunOptions,
    source: &ModelSource,
    data: &RunData,
) -> Result<OutputPlan> {
    let (cfg, t) = (&c.config, &c.config.train);
    let out = &cfg.output_dir;
    let folder = output::inspect(out, |what| c.key_error("output_dir", what))?;
    check_inputs(c, source)?;
    let resume = match folder {
        output::RunFolder::Fresh => None,
        output::RunFolder::Run { .. } if opts.resume => {
            if let Some(s) = finished_summary(out, data.max_steps) {
                return Ok(OutputPlan::AlreadyFinished(s));
            }
            match checkpoint::latest(out)? {
                Some((step, dir)) => {
                    let saved = checkpoint::read_state(&dir)?;
                    checkpoint::validate_state(
                        &dir,
                        &saved,
                        &checkpoint::RunShape {
                            max_steps: data.max_steps,
                            method: cfg.method.as_str(),
                            seed: t.seed,
                            train_examples: data.n_train,
                            batches_per_epoch: data.batches_per_epoch,
                            batch_size: t.batch_size,
                            grad_accum: t.grad_accum,
                            world_size: opts.dist.world_size(),
                            packing: data.train_bc.packing,
                        },
                    )?;
                    Some((step, dir, saved))
                }
                None => None,
            }
        }
        output::RunFolder::Run { .. } if opts.overwrite => None,
        output::RunFolder::Run { .. } => {
            let at = match checkpoint::latest(out)? {
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
    Ok(OutputPlan::Run { folder, resume })
}

/// Whether the run's LoRA starts from LoftQ on a base quantized at load (`train.base_quant`).
fn loftq_reads_originals(cfg: &config::TrainConfig) -> bool {
    cfg.method == Method::Lora
        && cfg.lora.is_loftq()
        && cfg
            .train
            .base_quant
            .as_deref()
            .is_some_and(|b| !b.eq_ignore_ascii_case("none"))
}

/// The model of a run with its method attached.
struct RunModel {
    model: Box<dyn Model>,
    /// Where it was found.
    source: ModelSource,
    tokenizer: crate::tokenizer::Tokenizer,
    tuner: Tuner,
    /// The method's trainable parameters.
    params: Vec<(String, Var)>,
}

/// Load the model, check the config's `task` and `objective` against it, and attach the
/// method. `dry` (a dry run): LoftQ runs one round instead of `loftq_iter`, which checks all it
/// needs (the file's weights, their shapes, the format's blocks) at a fraction of the cost
/// (each round quantizes every target and takes its randomized SVD: about 10 s a round for
/// SmolLM2-135M on 2 cores); nothing of it is kept.
fn setup_model(
    c: &LoadedConfig,
    source: ModelSource,
    device: &candle_core::Device,
    data: &RunData,
    placeholders: Option<std::sync::Arc<std::collections::HashSet<String>>>,
    dry: bool,
) -> Result<RunModel> {
    let dry_cfg;
    let cfg = match &c.config.lora.loftq_config {
        Some(l) if dry && l.loftq_iter > 1 && c.config.lora.is_loftq() => {
            let mut one_round = c.config.clone();
            one_round.lora.loftq_config = Some(config::LoftqSection {
                loftq_iter: 1,
                ..*l
            });
            dry_cfg = one_round;
            &dry_cfg
        }
        _ => &c.config,
    };
    let mut opts = load_options(c)?;
    opts.head = head_for(data);
    opts.placeholders = placeholders;
    // Full and selective runs train the base's own weights: a quantized (GGUF) base is
    // dequantized to f32 first (said in the run's model line).
    if cfg.method != Method::Lora && matches!(source, ModelSource::Gguf(_)) {
        opts.dequantize = true;
    }
    let LoadedModel {
        model: mut m,
        source,
        tokenizer,
        ..
    } = model::load_source(source, &opts, device)?;
    match cfg.objective.pretraining() {
        // A pre-training objective must be the model kind's (mlm: encoders, ...).
        Some(_) => cfg
            .objective
            .check_fits(&*m)
            .map_err(|e| c.key_error("objective", e))?,
        None => {
            let task = data_task_of(data.kind);
            model::family::resolve_task(&*m, task).map_err(|e| c.key_error("task", e))?;
        }
    }
    // The module names are only known once the model is loaded; a target that matches none is
    // the config's error, so name the file and the key.
    if cfg.method == Method::Lora {
        let defaults = m.default_lora_targets();
        crate::peft::lora::model::resolve_targets(
            &*m,
            &cfg.lora.to_peft_for(&cfg.model, &defaults),
        )
        .map_err(|e| c.key_error("lora.targets", e))?;
    }
    if cfg.method == Method::Ia3 {
        crate::peft::ia3::resolve_targets(&*m, &cfg.ia3.to_peft(&cfg.model))
            .map_err(|e| c.key_error("ia3.target_modules", e))?;
    }
    // LoftQ on a base quantized at load measures it against the file's own weights, read one
    // at a time (never the whole f32 model beside the quantized one).
    let stored = match (&source, loftq_reads_originals(cfg)) {
        (ModelSource::HfDir(dir), true) => Some(model::weights::SafetensorsSource::open(
            dir,
            &LoadOptions::default(),
            &candle_core::Device::Cpu,
        )?),
        _ => None,
    };
    let read_stored = |module: &str| match &stored {
        Some(st) => st.stored_f32(&format!("{module}.weight")),
        None => Ok(None),
    };
    let originals: Option<crate::peft::lora::OriginalWeights> =
        stored.as_ref().map(|_| &read_stored as _);
    let tuner = Tuner::attach_with(cfg, &mut *m, &cfg.model, Some(&tokenizer), originals)?;
    drop(stored);
    check_soft_prompt(c, &*m, data)?;
    // The model's own dropout (T5 dropout_rate, BERT hidden / attention dropout), seeded like
    // the adapters' so a resumed run draws the same masks.
    m.configure_dropout(cfg.train.seed, cfg.train.model_dropout);
    let params = tuner.trainable(&*m);
    Ok(RunModel {
        model: m,
        source,
        tokenizer,
        tuner,
        params,
    })
}

/// What a soft prompt cannot run with, found before the run writes anything (the forward pass
/// would refuse it at the first step): packed rows, gradient checkpointing, and virtual tokens
/// that push the longest row past the model's context window.
fn check_soft_prompt(c: &LoadedConfig, m: &dyn Model, data: &RunData) -> Result<()> {
    let Some(prompt) = m.virtual_prompt() else {
        return Ok(());
    };
    let method = c.config.method.as_str();
    if data.train_bc.packing {
        return Err(c.key_error(
            "data.packing",
            format!("{method} cannot run on packed rows (each row reads the virtual tokens first): set data.packing = false"),
        ));
    }
    if c.config.train.gradient_checkpointing {
        return Err(c.key_error(
            "train.gradient_checkpointing",
            format!("not supported with a soft prompt ({method}) yet: set it to false"),
        ));
    }
    // Prompt tuning and P-tuning add positions in front of the input; prefix tuning shifts
    // the real tokens' positions by the prefix length: either way, n more positions.
    let n = prompt.num_virtual_tokens();
    let p = &data.prepared;
    let longest = p
        .train
        .iter()
        .chain(&p.validation)
        .map(crate::data::Example::len)
        .max()
        .unwrap_or(0);
    if m.kind() != model::ArchitectureKind::EncoderDecoder {
        if let Some(ctx) = m.context_length() {
            if n + longest > ctx {
                return Err(c.key_error(
                    &format!("{method}.num_virtual_tokens"),
                    format!(
                        "{n} virtual tokens + the longest row's {longest} tokens = {} positions, more than the model's context window of {ctx}; lower it or the max_seq_len",
                        n + longest
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The head a run's examples need on a family with several (BERT): a classifier with the
/// data's classes, or the masked-LM head; layers the model lacks are initialised from the
/// run's seed, as transformers does when fine-tuning a bare encoder.
fn head_for(data: &RunData) -> Option<model::HeadSpec> {
    let labels = data.prepared.labels.as_ref().map(|l| l.names.clone());
    let head = match data.kind {
        DataTask::SequenceClassification => model::HeadKind::SequenceClassification,
        DataTask::TokenClassification => model::HeadKind::TokenClassification,
        DataTask::Mlm => model::HeadKind::MaskedLm,
        _ => return None,
    };
    Some(model::HeadSpec {
        head,
        labels,
        init_seed: Some(data.seed),
    })
}

/// The task a supervised run's examples are for.
fn data_task_of(kind: DataTask) -> Option<Task> {
    match kind {
        DataTask::CausalSft => Some(Task::CausalLm),
        DataTask::Seq2Seq => Some(Task::Seq2SeqLm),
        DataTask::SequenceClassification => Some(Task::SequenceClassification),
        DataTask::TokenClassification => Some(Task::TokenClassification),
        DataTask::Clm | DataTask::Mlm | DataTask::SpanCorruption => None,
    }
}

/// The learning-rate schedule and the optimizer over the trainable parameters, each with the
/// method's lr scale and the weight-decay rule ([`optim::decays`]).
/// `train.overlap_comm`: the plan of the gradient collectives sent during the backward pass,
/// for a multi-rank DDP / ZeRO-1 / ZeRO-2 run of a LLaMA-family model without a soft prompt
/// (the models whose layers the trainer can walk one at a time); `None` sends them after the
/// backward pass. Every rank decides the same from the same config and model.
fn setup_overlap(
    c: &LoadedConfig,
    model: &dyn Model,
    params: &[(String, Var)],
    zero: Option<&super::zero::Partition>,
    dist: &crate::dist::Dist,
    overlap_on: bool,
) -> Option<Arc<super::overlap::BucketPlan>> {
    let t = &c.config.train;
    let walkable = model
        .as_any()
        .downcast_ref::<crate::model::Llama>()
        .is_some_and(|_| model.virtual_prompt().is_none());
    let mode = match t.distributed {
        Distributed::Ddp | Distributed::Zero1 => Some(None),
        Distributed::Zero2 => Some(zero),
        Distributed::None | Distributed::Zero3 => None,
    };
    let owners = mode.filter(|_| overlap_on && walkable && dist.world_size() > 1)?;
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    let shapes: Vec<candle_core::Shape> = params.iter().map(|(_, v)| v.shape().clone()).collect();
    Some(Arc::new(super::overlap::BucketPlan::new(
        &names,
        &shapes,
        model.dims().layers,
        owners,
        super::distributed::BUCKET_FLOATS,
    )))
}

fn setup_optimizer(
    c: &LoadedConfig,
    tuner: &Tuner,
    params: &[(String, Var)],
    zero: Option<&super::zero::Partition>,
    max_steps: usize,
) -> Result<(Schedule, optim::Optimizer)> {
    let t = &c.config.train;
    let schedule = Schedule {
        kind: t.lr_schedule,
        lr: t.lr,
        warmup: t.warmup_steps,
        total: max_steps,
        min_lr_ratio: t.min_lr_ratio,
    };
    // Under ZeRO this rank's optimizer sees only the parameters it owns.
    let mine: Vec<(String, Var)> = match zero {
        Some(part) => part.mine().into_iter().map(|i| params[i].clone()).collect(),
        None => params.to_vec(),
    };
    let settings = mine
        .iter()
        .map(|(name, _)| optim::ParamSettings {
            lr_scale: tuner.lr_scale(name),
            decay: optim::decays(name),
        })
        .collect();
    let mut opt = optim::Optimizer::new(&t.optimizer_config(), mine, settings)
        .map_err(|e| c.key_error("train.optimizer", e))?;
    if zero.is_some() {
        opt.mark_shard();
    }
    Ok((schedule, opt))
}

/// ZeRO-3 of a PEFT method whose set-up reads no base weight, or of full fine-tuning of a
/// causal LM, on a dense LLaMA safetensors folder (quantized at load by `train.base_quant` or
/// not) or a GGUF file: the weights other ranks own, which this rank then loads as
/// placeholders ([`super::zero3::frozen_placeholders`], [`super::zero3::trained_placeholders`],
/// [`super::zero3::gguf_placeholders`]; nor does it read, quantize or make variables of them),
/// so no rank holds the whole model while it loads. `None`, and every weight loads: one rank,
/// another mode, a pre-quantized folder, a method that trains some base weights (selective,
/// `modules_to_save`) or reads them to start (DoRA's magnitudes, PiSSA / OLoRA / LoftQ / EVA
/// inits), a new head, other families.
fn zero3_placeholders(
    c: &LoadedConfig,
    source: &ModelSource,
    data: &RunData,
    dist: &crate::dist::Dist,
) -> Result<Option<std::sync::Arc<std::collections::HashSet<String>>>> {
    use crate::peft::lora::config::InitKind;
    let (cfg, t) = (&c.config, &c.config.train);
    if t.distributed != Distributed::Zero3 || dist.world_size() < 2 {
        return Ok(None);
    }
    let reads_base = match cfg.method {
        Method::Lora => {
            let l = &cfg.lora;
            let plain_init = match &l.init_lora_weights {
                None => true,
                Some(w) => matches!(
                    w.kind(),
                    Ok(InitKind::Default | InitKind::Random | InitKind::Gaussian)
                ),
            };
            l.use_dora || l.modules_to_save.is_some() || !plain_init
        }
        Method::Ia3 => cfg.ia3.modules_to_save.is_some(),
        // Every weight is trained and none is read to start; a head the file lacks would be
        // made on every rank.
        Method::Full => head_for(data).is_some(),
        _ => true,
    };
    if reads_base {
        return Ok(None);
    }
    let dir = match source {
        ModelSource::HfDir(dir) => dir,
        ModelSource::Gguf(path) => {
            let plan = super::zero3::gguf_placeholders(
                path,
                cfg.method == Method::Full,
                dist.world_size(),
                dist.rank(),
            )?;
            return Ok(plan.map(std::sync::Arc::new));
        }
    };
    if model::peek_task(source).0 != model::ArchitectureKind::Decoder
        || crate::quant::bnb::hf::bnb_quantization_config(dir)?.is_some()
    {
        return Ok(None);
    }
    let Ok(lc) = model::config_from_hf_dir(dir) else {
        return Ok(None);
    };
    let plan = if cfg.method == Method::Full {
        super::zero3::trained_placeholders(dir, &lc, dist.world_size(), dist.rank())?
    } else {
        super::zero3::frozen_placeholders(dir, &lc, dist.world_size(), dist.rank())?
    };
    Ok(plan.map(std::sync::Arc::new))
}

/// `train.overlap_comm` for this job: whether its collectives overlap computing, and why when
/// `auto` decided. The cores a rank's communication thread could use are this machine's, or
/// those the launcher bound the ranks to (`mpirun` binds each of 2 ranks to one core).
fn resolve_overlap(c: &LoadedConfig, dist: &crate::dist::Dist) -> Result<(bool, Option<String>)> {
    let own = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf reads a system constant.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let all = usize::try_from(online).unwrap_or(own).max(own);
    let ranks_here = dist.local_size().max(1);
    let (mut on, mut why) = c.config.train.overlap_comm.resolve(
        dist.backend(),
        dist.world_size(),
        ranks_here,
        rayon::current_num_threads(),
        all.min(own * ranks_here),
    );
    // The ranks must agree (their collectives pair up in one order): `auto` can see other
    // cores on another machine or under another binding, so it overlaps only if every rank
    // would.
    if dist.world_size() > 1 {
        let mut votes = [if on { 1.0f32 } else { 0.0 }];
        dist.all_reduce_sum(&mut votes)?;
        if on && (votes[0] as usize) < dist.world_size() {
            on = false;
            why = Some("auto: another rank has no core to spare".into());
        }
    }
    Ok((on, why))
}

/// ZeRO-3's plan: a LLaMA-family model without a soft prompt (the layer walk of activation
/// checkpointing is what gathers and frees each layer's weights).
fn setup_zero3(
    c: &LoadedConfig,
    model: &dyn Model,
    params: &[(String, Var)],
    part: super::zero::Partition,
    overlap_on: bool,
    dist: &crate::dist::Dist,
) -> Result<super::zero3::Zero3> {
    let Some(llama) = model.as_any().downcast_ref::<crate::model::Llama>() else {
        return Err(c.key_error(
            "train.distributed",
            format!(
                "`zero3` shards the layers of LLaMA-family models; this model is {}: use \"zero2\"",
                model.family()
            ),
        ));
    };
    if model.virtual_prompt().is_some() {
        return Err(c.key_error(
            "train.distributed",
            format!(
                "`zero3` does not run with a soft prompt ({}) yet: use \"zero2\"",
                c.config.method.as_str()
            ),
        ));
    }
    let mut z = super::zero3::Zero3::new(llama, params, part)?.with_overlap(overlap_on);
    z.agree_on_frozen(dist)?;
    Ok(z)
}

/// The run's quantization settings on its model, the memory estimate, and the refusal of a
/// run that cannot fit; returns the estimate and the memory available.
fn setup_memory(
    c: &LoadedConfig,
    source: &ModelSource,
    model: &dyn Model,
    data: &RunData,
    params: &[(String, Var)],
    zero: Option<&super::zero::Partition>,
    zero3: Option<(&super::zero3::Zero3, bool)>,
) -> Result<(memory::MemoryEstimate, Option<u64>)> {
    let (cfg, t) = (&c.config, &c.config.train);
    model.set_quant_settings(quant_settings(c)?);
    let mut shape = memory::TrainShape::for_run(&data.prepared, &data.train_bc, params, cfg, t);
    if let Some(part) = zero {
        // ZeRO: this rank keeps optimizer state for, and updates, its own parameters only.
        let mine: Vec<_> = part.mine().into_iter().map(|i| &params[i].1).collect();
        shape.optimizer_state_bytes = Some(optim::state_bytes(
            &t.optimizer_config(),
            &mine.iter().map(|v| v.dims().to_vec()).collect::<Vec<_>>(),
        ));
        shape.largest_param = mine.iter().map(|v| v.elem_count()).max().unwrap_or(0);
    }
    if let Some((z, _)) = zero3 {
        // ZeRO-3 walks the layers as activation checkpointing does. A rank keeps the
        // gradients of its own tensors, and for a while those of the gathered outer group and
        // one layer (until their reduce).
        shape.checkpointing = true;
        if shape.params_in_weights {
            let mine: usize = zero
                .map(|p| p.mine().into_iter().map(|i| params[i].1.elem_count()).sum())
                .unwrap_or(0);
            shape.trainable_params = mine + z.gathered_grad_values();
        }
    }
    let mut mem = memory::estimate(model, &shape);
    if let Some((z, sharded_load)) = zero3 {
        // Unless the others' frozen weights loaded as placeholders, every rank first loads the
        // whole model (a file mapping plus the tensors read from it), then drops the others'
        // share: with a small trained part (LoRA) that load is the peak (SmolLM2 f32: 1.10 GB
        // at load, 0.5 GB training). With placeholders it reads its own share only.
        let loaded = if sharded_load {
            mem.weights.saturating_sub(z.released_bytes())
        } else {
            mem.weights
        };
        mem.load_floor = loaded
            .saturating_mul(2)
            .saturating_add(mem.runtime)
            .saturating_add(mem.data);
        // Weights: the others' tensors are dropped, the outer group and one layer gathered.
        mem.weights = mem
            .weights
            .saturating_sub(z.released_bytes())
            .saturating_add(z.gathered_bytes());
        if shape.q8_backward {
            // and so are the transposed copies of the others' quantized weights
            let (released, gathered) = z.backward_copy_bytes();
            mem.backward_copies = mem
                .backward_copies
                .saturating_sub(released)
                .saturating_add(gathered);
        }
    }
    if let Some(read) = quantized_at_load_read_bytes(c, source, zero3)? {
        // `train.base_quant` on a dense folder: each weight is read (through a file mapping
        // whose pages stay resident until the load ends) before it is quantized, so the load
        // holds the stored weights beside the quantized ones (SmolLM2's f32 folder: 0.81-0.85
        // GB per rank at load, 0.5-0.7 GB training with checkpointing).
        let held = match zero3 {
            Some((z, true)) => {
                let all = memory::estimate(model, &shape).weights;
                all.saturating_sub(z.released_bytes())
            }
            _ => memory::estimate(model, &shape).weights,
        };
        mem.load_floor = mem.load_floor.max(
            read.saturating_add(held)
                .saturating_add(mem.runtime)
                .saturating_add(mem.data),
        );
    }
    let available = memory::available_bytes();
    check_memory(c, &mem, available)?;
    Ok((mem, available))
}

// ---- setup helpers ----------------------------------------------------------------------------

/// Bytes of stored weights a run that quantizes its base at load (`train.base_quant`) reads
/// from a dense safetensors folder: the files' size, or under ZeRO-3 with placeholders this
/// rank's share of them. `None` for other runs.
fn quantized_at_load_read_bytes(
    c: &LoadedConfig,
    source: &ModelSource,
    zero3: Option<(&super::zero3::Zero3, bool)>,
) -> Result<Option<u64>> {
    let quantizes = c
        .config
        .train
        .base_quant
        .as_deref()
        .is_some_and(|q| q != "none");
    let ModelSource::HfDir(dir) = source else {
        return Ok(None);
    };
    if !quantizes || crate::quant::bnb::hf::bnb_quantization_config(dir)?.is_some() {
        return Ok(None);
    }
    let src = model::SafetensorsSource::open(
        dir,
        &model::LoadOptions::default(),
        &candle_core::Device::Cpu,
    )?;
    let bytes = src.file_bytes();
    Ok(Some(match zero3 {
        Some((z, true)) => (bytes as f64 * z.frozen_share_read()) as u64,
        _ => bytes,
    }))
}

/// A job of several ranks needs `train.distributed` (else N copies of one run would write one
/// output_dir); `ddp` in one process is simply a single-process run.
fn check_distributed(c: &LoadedConfig, dist: &crate::dist::Dist) -> Result<()> {
    let t = &c.config.train;
    if dist.world_size() > 1 && t.distributed == Distributed::None {
        return Err(c.key_error(
            "train.distributed",
            format!(
                "is \"none\", but this process is one of {} ranks: set it to \"ddp\" (or start one process)",
                dist.world_size()
            ),
        ));
    }
    Ok(())
}

/// No output of the run may land on one of its inputs (the config, the data, the model).
fn check_inputs(c: &LoadedConfig, source: &ModelSource) -> Result<()> {
    let cfg = &c.config;
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
    for t in &cfg.data.tasks {
        for (what, p) in [
            ("train", Some(&t.train)),
            ("validation", t.validation.as_ref()),
        ] {
            if let Some(p) = p {
                inputs.push(crate::fsutil::Input::new(
                    format!("the {what} file of task {:?}", t.name),
                    c.base_dir.join(p),
                ));
            }
        }
    }
    inputs.push(crate::fsutil::Input::new("the model", source.path()));
    output::check_inputs(&cfg.output_dir, &inputs)
}

/// How the run loads its model (`train.dtype`, `train.dequantize`).
fn load_options(c: &LoadedConfig) -> Result<LoadOptions> {
    let t = &c.config.train;
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
    let base_quant = match t.base_quant.as_deref() {
        None => None,
        Some(name) => crate::quant::BaseQuant::parse(name, t.double_quant)
            .map_err(|e| c.key_error("train.base_quant", e))?,
    };
    Ok(LoadOptions {
        dtype,
        dequantize: t.dequantize,
        base_quant,
        ..Default::default()
    })
}

/// How the run's quantized base computes (`train.activation_bits`, `train.quantized_backward`):
/// settings of the run's model, not of the process.
fn quant_settings(c: &LoadedConfig) -> Result<crate::quant::QuantSettings> {
    use crate::quant::{ActPrecision, BackwardWeights, QuantSettings};
    let t = &c.config.train;
    Ok(QuantSettings {
        activation: match t.activation_bits {
            8 => ActPrecision::I8,
            16 => ActPrecision::I16,
            n => {
                return Err(c.key_error(
                    "train.activation_bits",
                    format!("{n} is not supported: use 8 or 16"),
                ))
            }
        },
        backward: match t.quantized_backward {
            config::QuantizedBackward::Q8_0 => BackwardWeights::Q8Transposed,
            config::QuantizedBackward::Exact => BackwardWeights::Exact,
        },
    })
}

/// Refuse a run whose estimate exceeds the memory available (unless `train.memory_check` is
/// off).
fn check_memory(
    c: &LoadedConfig,
    mem: &memory::MemoryEstimate,
    available: Option<u64>,
) -> Result<()> {
    let t = &c.config.train;
    let Some(avail) = available.filter(|_| t.memory_check) else {
        return Ok(());
    };
    if mem.total() <= avail {
        return Ok(());
    }
    let h = crate::inspect::human_bytes;
    let hint = if t.gradient_checkpointing {
        "lower train.batch_size or train.max_seq_len"
    } else {
        "set train.gradient_checkpointing = true, or lower train.batch_size or train.max_seq_len"
    };
    Err(c.key_error(
        "train.batch_size",
        format!(
            "this run needs about {} of memory but {} is available ({}); {hint} (train.memory_check = false skips this check)",
            h(mem.total()),
            h(avail),
            mem.table()
        ),
    ))
}
