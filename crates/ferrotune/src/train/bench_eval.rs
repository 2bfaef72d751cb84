//! `[eval] tasks`: benchmarks run on the base model and on the run's result, and the
//! catastrophic-forgetting report between them (`forgetting.md`, `forgetting.json`, and both
//! runs' results in lm-eval's layout under `eval/`).
//!
//! The task files are read and their evaluation data located during setup, so a typo fails
//! before training, not after it. Both evaluations run when the run finishes, each on a model
//! loaded afresh: the base as the run loaded it (a GGUF base dequantized for full fine-tuning,
//! as the run trained it), the result from what the run wrote (the base with `adapter/`, or
//! `model/`) — the files a user ships, not the in-memory state.
use super::config::{self, LoadedConfig};
use crate::bench::{self, forgetting, task::TaskConfig, BenchOptions, BenchReport};
use crate::model::{self, LoadOptions};
use crate::progress::Progress;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Where the results go in the run folder.
pub const EVAL_DIR: &str = "eval";
pub const FORGETTING_MD: &str = "forgetting.md";
pub const FORGETTING_JSON: &str = "forgetting.json";

/// `[eval]` of a train config.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Benchmark tasks: shipped names (`sst2`) or task YAML files (relative to the config's
    /// folder), each optionally `:K` for K-shot prompts (`sst2:5`).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Score the first N documents of each task.
    pub limit: Option<usize>,
    /// Per-task limits by task name (`limits = { self_instruct = 50 }`), over `limit`.
    #[serde(default)]
    pub limits: std::collections::BTreeMap<String, usize>,
    /// Few-shot examples for tasks without `:K` (default: each task's own, else 0).
    pub num_fewshot: Option<usize>,
    /// Wrap prompts in the model's chat template.
    #[serde(default)]
    pub apply_chat_template: bool,
}

/// The checked `[eval]` section: each task with its shot count.
pub struct EvalPlan {
    pub tasks: Vec<(TaskConfig, Option<usize>)>,
    pub opts: BenchOptions,
    pub limits: std::collections::BTreeMap<String, usize>,
}

/// An error of the bench library inside an `[eval]` key's error: its own text, without the
/// `bench: key ...` frame when it has one (the config key is named instead).
fn inner_msg(e: &Error) -> String {
    match e {
        Error::Key {
            source_name,
            key,
            what,
        } if source_name == "bench" => format!("{key}: {what}"),
        e => crate::error::first_line(&e.to_string()),
    }
}

/// Read the tasks named by `[eval]` and locate their data; None without `[eval] tasks`.
pub fn plan(c: &LoadedConfig) -> Result<Option<EvalPlan>> {
    let Some(e) = &c.config.eval else {
        return Ok(None);
    };
    if e.tasks.is_empty() {
        if e.limit.is_some() || e.num_fewshot.is_some() {
            return Err(c.key_error(
                "eval.tasks",
                "missing: name the benchmark tasks ([\"sst2\", ...])",
            ));
        }
        return Ok(None);
    }
    let opts = BenchOptions {
        limit: e.limit,
        num_fewshot: e.num_fewshot,
        apply_chat_template: e.apply_chat_template,
        ..Default::default()
    };
    if e.limit == Some(0) || e.limit.is_some_and(|l| l > bench::MAX_LIMIT) {
        return Err(c.key_error("eval.limit", format!("expected 1 to {}", bench::MAX_LIMIT)));
    }
    for (name, &l) in &e.limits {
        if l == 0 || l > bench::MAX_LIMIT {
            return Err(c.key_error(
                &format!("eval.limits.{name}"),
                format!("expected 1 to {}", bench::MAX_LIMIT),
            ));
        }
    }
    if e.num_fewshot.is_some_and(|k| k > bench::MAX_FEWSHOT) {
        return Err(c.key_error(
            "eval.num_fewshot",
            format!("expected 0 to {}", bench::MAX_FEWSHOT),
        ));
    }
    let mut tasks = Vec::new();
    for (i, spec) in e.tasks.iter().enumerate() {
        let key = format!("eval.tasks[{i}]");
        let (name, shots) = match spec.rsplit_once(':') {
            Some((n, k)) if !k.is_empty() && k.chars().all(|ch| ch.is_ascii_digit()) => {
                let k: usize = k
                    .parse()
                    .map_err(|_| c.key_error(&key, format!("`{spec}`: bad shot count")))?;
                if k > bench::MAX_FEWSHOT {
                    return Err(c.key_error(
                        &key,
                        format!("`{spec}`: at most {} shots", bench::MAX_FEWSHOT),
                    ));
                }
                (n, Some(k))
            }
            _ => (spec.as_str(), None),
        };
        // A file next to the config, else a shipped task name (or a path from the cwd).
        let beside = c.base_dir.join(name);
        let what = if beside.exists() {
            beside.display().to_string()
        } else {
            name.to_string()
        };
        let (found, groups) =
            bench::task::resolve_tasks(&what).map_err(|err| c.key_error(&key, inner_msg(&err)))?;
        if !groups.is_empty() {
            return Err(c.key_error(&key, format!("`{spec}` is a group: list its tasks instead")));
        }
        for t in found {
            if tasks
                .iter()
                .any(|(x, s): &(TaskConfig, Option<usize>)| x.task == t.task && *s == shots)
            {
                return Err(c.key_error(&key, format!("`{spec}` is listed twice")));
            }
            // The data, the first prompt and its answer must build now, not after training
            // (a hub task is fetched only when it runs).
            if matches!(t.dataset_path.as_str(), "json" | "csv" | "parquet") {
                let mut o = opts.clone();
                if shots.is_some() {
                    o.num_fewshot = shots;
                }
                bench::check_task(&t, &o).map_err(|err| c.key_error(&key, inner_msg(&err)))?;
            }
            // The evaluation split must be there now, not after training.
            let split = bench::docs::eval_split_name(&t)
                .map_err(|err| c.key_error(&key, crate::error::first_line(&err.to_string())))?;
            if t.dataset_path == "json" || t.dataset_path == "csv" || t.dataset_path == "parquet" {
                bench::docs::load_split(&t, split)
                    .map_err(|err| c.key_error(&key, crate::error::first_line(&err.to_string())))?;
            }
            tasks.push((t, shots));
        }
    }
    for name in e.limits.keys() {
        if !tasks.iter().any(|(t, _)| &t.task == name) {
            return Err(c.key_error(
                &format!("eval.limits.{name}"),
                "not one of the [eval] tasks",
            ));
        }
    }
    Ok(Some(EvalPlan {
        tasks,
        opts,
        limits: e.limits.clone(),
    }))
}

fn load_opts(c: &LoadedConfig) -> Result<LoadOptions> {
    let t = &c.config.train;
    let dtype = match t.dtype.as_deref() {
        Some("bf16") => Some(candle_core::DType::BF16),
        Some("f16") => Some(candle_core::DType::F16),
        _ => None,
    };
    Ok(LoadOptions {
        dtype,
        // Both sides in f32 (a GGUF base dequantized): what full fine-tuning trains, and what a
        // merged LoRA or IA3 adapter folds into, so before and after differ by the run alone
        // and both score on the fast inference engine.
        dequantize: true,
        ..Default::default()
    })
}

fn run_plan(
    plan: &EvalPlan,
    lm: &model::LoadedModel,
    name: &str,
    progress: &dyn Progress,
) -> Result<BenchReport> {
    let t0 = std::time::Instant::now();
    let mut results = Vec::new();
    let repeated = |t: &TaskConfig| plan.tasks.iter().filter(|(x, _)| x.task == t.task).count() > 1;
    for (t, shots) in &plan.tasks {
        let mut opts = plan.opts.clone();
        if shots.is_some() {
            opts.num_fewshot = *shots;
        }
        if let Some(&l) = plan.limits.get(&t.task) {
            opts.limit = Some(l);
        }
        progress.println(&format!(
            "eval ({name}): {} {}-shot",
            t.task,
            opts.num_fewshot.or(t.num_fewshot).unwrap_or(0)
        ));
        let mut r = bench::run_task(&*lm.model, &lm.tokenizer, t, &opts, progress)?;
        if repeated(t) {
            // The same task at several shot counts: one results entry each.
            r.task = format!("{}_{}shot", r.task, r.num_fewshot);
            r.alias = r.task.clone();
        }
        results.push(r);
    }
    Ok(BenchReport {
        model: lm.source.path().display().to_string(),
        adapter: None,
        tasks: results,
        groups: Vec::new(),
        options: plan.opts.clone(),
        chat_template: None,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Evaluate the base and the result, write `eval/{before,after}.json`, `forgetting.md` and
/// `forgetting.json` in `out`; returns the report.
pub fn run(
    c: &LoadedConfig,
    plan: &EvalPlan,
    out: &Path,
    adapter_dir: Option<&Path>,
    model_dir: Option<&Path>,
    progress: &dyn Progress,
) -> Result<forgetting::Report> {
    let device = config::parse_device(&c.config.train.device)
        .map_err(|e| c.key_error("train.device", e))?
        .device()?;
    let source = model::resolve(&c.config.model)?;
    let opts = load_opts(c)?;
    let base = model::load_source(source, &opts, &device)?;
    let before = run_plan(plan, &base, "base", progress)?;
    drop(base);
    let (after_lm, after_name): (model::LoadedModel, PathBuf) = match (model_dir, adapter_dir) {
        (Some(dir), _) => (
            model::load(&dir.display().to_string(), &LoadOptions::default(), &device)?,
            dir.to_path_buf(),
        ),
        (None, Some(dir)) => {
            let source = model::resolve(&c.config.model)?;
            let mut lm = model::load_source(source, &opts, &device)?;
            let loaded = crate::peft::load_adapter(&mut *lm.model, dir, "default")?;
            // Weight-space adapters fold into the f32 base (exactly, up to rounding) so the
            // result scores on the fast engine; the others stay attached.
            if matches!(
                loaded.config,
                crate::peft::AdapterConfig::Lora(_) | crate::peft::AdapterConfig::Ia3(_)
            ) {
                crate::peft::merge_and_unload(&mut *lm.model, "default")?;
            }
            (lm, dir.to_path_buf())
        }
        (None, None) => {
            return Err(Error::msg(
                "[eval]: the run wrote neither an adapter nor a model to evaluate",
            ))
        }
    };
    let mut after = run_plan(plan, &after_lm, "result", progress)?;
    after.adapter = adapter_dir.map(|d| d.display().to_string());
    let report = forgetting::compare(
        &before,
        &after,
        &c.config.model,
        &after_name.display().to_string(),
    );
    let eval_dir = out.join(EVAL_DIR);
    std::fs::create_dir_all(&eval_dir).map_err(|e| Error::file(&eval_dir, e))?;
    let pretty = |v: &serde_json::Value| {
        format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
    };
    crate::fsutil::write_atomic(
        &eval_dir.join("before.json"),
        pretty(&before.to_lm_eval_json()).as_bytes(),
    )?;
    crate::fsutil::write_atomic(
        &eval_dir.join("after.json"),
        pretty(&after.to_lm_eval_json()).as_bytes(),
    )?;
    let json =
        serde_json::to_value(&report).map_err(|e| Error::msg(format!("forgetting report: {e}")))?;
    crate::fsutil::write_atomic(&out.join(FORGETTING_JSON), pretty(&json).as_bytes())?;
    crate::fsutil::write_atomic(&out.join(FORGETTING_MD), report.markdown().as_bytes())?;
    Ok(report)
}
