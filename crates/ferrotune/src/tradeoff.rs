//! `ferrotune compare`: several fine-tuning methods on one base config — same data, steps and
//! seed — and the trade-off table users choose from: trainable parameters, adapter size, peak
//! memory, speed, validation loss and the task metric (ROUGE for generation, accuracy for
//! classification), plus a LoRA rank sweep.
//!
//! Each method is one ordinary training run of the base config with `--set method=...` (and the
//! method's own overrides), in `OUT/runs/<name>/`. How a run is started is the caller's choice
//! ([`Runner`]): the CLI starts each in its own process, so each row's peak RSS is that run's
//! alone and a crash stays in its row. A finished run is not run again: a killed comparison
//! continues where it stopped. Then the generated outputs of every run are scored on the same
//! rows ([`crate::train::compare`]), and `compare.md`, `compare.json` and `compare.png` (metric
//! against trainable parameters) are written.
use crate::fsutil::write_atomic;
use crate::train::compare::{compare, CompareOptions, Metric};
use crate::train::config::{load_config, LoadedConfig};
use crate::train::Summary;
use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The methods `--methods` accepts: `base` (the model as it is, nothing trained), every
/// training method, and `dora` (LoRA with `use_dora = true`).
pub const METHODS: &[&str] = &[
    "base",
    "full",
    "selective",
    "lora",
    "dora",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "adapter",
];

/// The longest list of methods / ranks one comparison takes.
const MAX_RUNS: usize = 64;

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    /// The base training config (every run uses it with its own method).
    pub config: PathBuf,
    pub methods: Vec<String>,
    /// Extra LoRA runs, one per rank (the rank sweep).
    pub lora_ranks: Vec<usize>,
    /// Folder for `runs/`, `compare.md`, `compare.json`, `compare.png`.
    pub out: PathBuf,
    /// `--set` overrides applied to every run (e.g. `train.max_steps=200`).
    pub set: Vec<String>,
    /// `(run, KEY=VALUE)`: overrides for one run only (full fine-tuning wants a far lower
    /// learning rate than the adapters: `full:train.lr=5e-5`), after `set`. `run` is a method
    /// name or a rank-sweep row (`lora r=16`).
    pub method_set: Vec<(String, String)>,
    /// Rows the generation metric is computed on (default: the config's test file, else its
    /// validation file).
    pub eval_data: Option<PathBuf>,
    /// Score only the first N rows (default 200).
    pub eval_limit: Option<usize>,
    /// The reference of each scored row (default: the config's `data.completion`), for test
    /// files whose fields differ from the training file's (DialogSum's test split has
    /// `summary1..3` where train has `summary`).
    pub eval_completion: Option<String>,
    pub max_new_tokens: usize,
}

/// One training run of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// Row label: `lora`, `lora r=16`, `dora`, ...
    pub name: String,
    /// `--set` overrides for this run (after the spec's own).
    pub set: Vec<String>,
    /// The run's output_dir.
    pub dir: PathBuf,
    /// `base`: nothing to train.
    pub trains: bool,
}

/// Starts one training run of `config` with `set` overrides and waits for it. `resume`: the
/// run's folder holds an unfinished run to continue.
pub trait Runner {
    fn train(&self, config: &Path, set: &[String], start: Start) -> Result<()>;
}

/// How a run starts in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// An empty folder.
    Fresh,
    /// Continue the unfinished run there (`train --resume`), made with the same settings.
    Resume,
    /// The run there was made with other settings (the config file or a --set changed): start
    /// again (`train --overwrite`, which removes only that run's files).
    Restart,
}

/// What a run was made from: the config file's text and the overrides, in order. Kept beside
/// the run folder (`runs/<run>.settings`) so a rerun of `compare` keeps a finished run only when
/// nothing it was made from changed.
fn run_settings(config: &Path, set: &[String]) -> Result<String> {
    let text = std::fs::read_to_string(config).map_err(|e| Error::file(config, e))?;
    Ok(format!("{text}\n--- overrides ---\n{}\n", set.join("\n")))
}

/// The runs `spec` asks for, in order (methods, then the rank sweep). Unknown methods, repeats
/// and absurd lists are one-line errors naming the flag.
pub fn plan(spec: &CompareSpec) -> Result<Vec<RunSpec>> {
    if spec.methods.is_empty() && spec.lora_ranks.is_empty() {
        return Err(Error::msg(
            "--methods: name at least one method (e.g. lora,ia3,full)",
        ));
    }
    if spec.methods.len() + spec.lora_ranks.len() > MAX_RUNS {
        return Err(Error::msg(format!(
            "--methods / --lora-ranks: at most {MAX_RUNS} runs in one comparison"
        )));
    }
    let mut runs: Vec<RunSpec> = Vec::new();
    let mut push = |name: String, set: Vec<String>, trains: bool| -> Result<()> {
        if runs.iter().any(|r| r.name == name) {
            return Err(Error::msg(format!("`{name}` is listed twice")));
        }
        let slug: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .replace("-r-", "-r");
        let dir = spec.out.join("runs").join(slug);
        let mut set = set;
        set.extend(
            spec.method_set
                .iter()
                .filter(|(run, _)| *run == name)
                .map(|(_, kv)| kv.clone()),
        );
        set.push(format!(
            "output_dir={}",
            toml_string(&dir.display().to_string())
        ));
        runs.push(RunSpec {
            name,
            set,
            dir,
            trains,
        });
        Ok(())
    };
    for (run, kv) in &spec.method_set {
        if kv
            .split_once('=')
            .is_some_and(|(k, _)| k.trim() == "method")
        {
            return Err(Error::msg(format!(
                "--method-set `{run}:{kv}`: a run's method is its name in --methods; set other keys here"
            )));
        }
        if run == "base" {
            return Err(Error::msg(format!(
                "--method-set `{run}:{kv}`: the base run does not train, so its settings would be unused"
            )));
        }
        let known = spec.methods.iter().any(|m| m.trim() == run)
            || spec
                .lora_ranks
                .iter()
                .any(|r| *run == format!("lora r={r}"));
        if !known {
            return Err(Error::msg(format!(
                "--method-set: `{run}` is not one of the runs (--methods / --lora-ranks)"
            )));
        }
    }
    for m in &spec.methods {
        let m = m.trim();
        if !METHODS.contains(&m) {
            return Err(Error::msg(format!(
                "--methods: unknown method `{m}` (known: {})",
                METHODS.join(", ")
            )));
        }
        let set = match m {
            "base" => vec![],
            "dora" => vec![
                "method=\"lora\"".to_string(),
                "lora.use_dora=true".to_string(),
            ],
            other => vec![format!("method=\"{other}\"")],
        };
        push(m.to_string(), set, m != "base").map_err(|e| Error::msg(format!("--methods: {e}")))?;
    }
    for &r in &spec.lora_ranks {
        let max = crate::peft::lora::config::MAX_RANK;
        if r == 0 || r > max {
            return Err(Error::msg(format!(
                "--lora-ranks: {r} is not a rank; a rank must be in 1..={max}"
            )));
        }
        push(
            format!("lora r={r}"),
            vec!["method=\"lora\"".to_string(), format!("lora.r={r}")],
            true,
        )
        .map_err(|e| Error::msg(format!("--lora-ranks: {e}")))?;
    }
    Ok(runs)
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// One row of the table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub name: String,
    /// `ok`, `failed` (training or scoring failed: see `error`) or `skipped`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub trainable_params: Option<usize>,
    pub all_params: Option<usize>,
    pub trainable_percent: Option<f64>,
    /// Bytes of what the run ships: the adapter folder, or the model folder for full
    /// fine-tuning.
    pub adapter_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    pub s_per_step: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub steps: Option<usize>,
    pub final_val_loss: Option<f64>,
    /// Classification: validation accuracy.
    pub accuracy: Option<f64>,
    /// Generation: ROUGE F-measures on the scored rows.
    pub rouge1: Option<f64>,
    #[serde(rename = "rougeL")]
    pub rouge_l: Option<f64>,
    /// Rows the generation metric was computed on.
    pub scored_rows: Option<usize>,
    /// Where the run's adapter or model is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
}

impl Row {
    fn failed(name: &str, e: impl std::fmt::Display) -> Row {
        Row {
            name: name.to_string(),
            status: "failed".to_string(),
            error: Some(crate::error::first_line(&e.to_string())),
            ..Row::default()
        }
    }
    /// The task metric the chart plots: accuracy, else ROUGE-1.
    pub fn metric(&self) -> Option<f64> {
        self.accuracy.or(self.rouge1)
    }
}

/// What `compare.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: PathBuf,
    pub model: String,
    pub cpu: String,
    /// `accuracy` or `rouge`.
    pub metric: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<PathBuf>,
    pub rows: Vec<Row>,
}

pub const MARKDOWN_FILE: &str = "compare.md";
pub const JSON_FILE: &str = "compare.json";
pub const CHART_FILE: &str = "compare.png";

/// Run the comparison: every run of [`plan`] through `runner` (a failed run is a failed row),
/// then the scores, then the three files in `spec.out`. `log` gets one line per step.
pub fn run(spec: &CompareSpec, runner: &dyn Runner, log: &dyn Fn(&str)) -> Result<Report> {
    let runs = plan(spec)?;
    // The base config must be valid before anything runs. It may hold several methods'
    // sections, which is allowed when `method` is set from outside, as each run does.
    let text = std::fs::read_to_string(&spec.config).map_err(|e| Error::file(&spec.config, e))?;
    let own_method = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| t.get("method").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| "lora".to_string());
    let mut set = vec![format!("method={}", toml_string(&own_method))];
    set.extend(spec.set.iter().cloned());
    let base = load_config(&spec.config, &set)?;
    // Read problems of the scoring data surface now, not after every method has trained.
    if let Some(p) = &spec.eval_data {
        // a folder or a device is refused here too, not after every method has trained
        crate::fsutil::input_size_limit(p).map_err(|e| Error::msg(format!("--eval-data: {e}")))?;
        std::fs::File::open(p).map_err(|e| Error::file(p, format!("--eval-data: {e}")))?;
    }
    // --out is compare's own folder: a new one, or one an earlier compare wrote (it resumes
    // there); never a folder of something else (a model, a training run, the repository).
    if let Ok(mut entries) = std::fs::read_dir(&spec.out) {
        let ours = spec.out.join("runs").is_dir() || spec.out.join(JSON_FILE).is_file();
        if !ours && entries.next().is_some() {
            return Err(Error::file(
                &spec.out,
                "--out: the folder holds files that no comparison wrote; choose a new or empty folder",
            ));
        }
    }
    std::fs::create_dir_all(spec.out.join("runs")).map_err(|e| Error::file(&spec.out, e))?;
    let mut rows: Vec<Row> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        if !r.trains {
            rows.push(Row {
                name: r.name.clone(),
                status: "ok".to_string(),
                trainable_params: Some(0),
                trainable_percent: Some(0.0),
                ..Row::default()
            });
            continue;
        }
        let mut set = spec.set.clone();
        set.extend(r.set.iter().cloned());
        let settings = run_settings(&spec.config, &set)?;
        let settings_file = r.dir.with_extension("settings");
        let same = std::fs::read_to_string(&settings_file).is_ok_and(|s| s == settings);
        let done = same && read_summary(&r.dir).is_some_and(|s| is_finished(&s));
        if done {
            log(&format!(
                "[{}/{}] {}: finished earlier, kept",
                i + 1,
                runs.len(),
                r.name
            ));
        } else {
            let start = if !r.dir.exists() {
                Start::Fresh
            } else if same && r.dir.join("checkpoints").exists() {
                Start::Resume
            } else {
                Start::Restart
            };
            let what = match start {
                Start::Restart => "training (its settings changed: starting again)",
                _ => "training",
            };
            log(&format!("[{}/{}] {}: {what}", i + 1, runs.len(), r.name));
            crate::fsutil::write_atomic(&settings_file, settings.as_bytes())?;
            if let Err(e) = runner.train(&spec.config, &set, start) {
                log(&format!("{}: failed: {e}", r.name));
                rows.push(Row::failed(&r.name, e));
                continue;
            }
        }
        rows.push(match read_summary(&r.dir) {
            Some(s) => row_from_summary(&r.name, &s),
            None => Row::failed(
                &r.name,
                format!("{} was not written", r.dir.join("summary.json").display()),
            ),
        });
    }
    let classification = rows.iter().any(|r| r.accuracy.is_some());
    let eval_data = if classification {
        None
    } else {
        score_generation(spec, &base, &runs, &mut rows, log)
    };
    let report = Report {
        config: spec.config.clone(),
        model: base.config.model.clone(),
        cpu: cpu_description(),
        metric: if classification { "accuracy" } else { "rouge" }.to_string(),
        eval_data,
        rows,
    };
    write_report(&report, &spec.out)?;
    Ok(report)
}

fn read_summary(dir: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn is_finished(s: &Summary) -> bool {
    use crate::train::StopReason;
    !matches!(
        s.stop_reason,
        StopReason::Interrupted | StopReason::StopAfter
    )
}

/// Total bytes of the files under `dir`.
fn folder_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0u64;
    for e in std::fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        let md = e.metadata().ok()?;
        total += if md.is_dir() {
            folder_bytes(&e.path())?
        } else {
            md.len()
        };
    }
    Some(total)
}

fn row_from_summary(name: &str, s: &Summary) -> Row {
    let output = s.adapter_dir.clone().or_else(|| s.model_dir.clone());
    Row {
        name: name.to_string(),
        status: "ok".to_string(),
        error: None,
        trainable_params: Some(s.trainable_params),
        all_params: Some(s.all_params),
        trainable_percent: (s.all_params > 0)
            .then(|| 100.0 * s.trainable_params as f64 / s.all_params as f64),
        adapter_bytes: output.as_deref().and_then(folder_bytes),
        peak_rss_bytes: Some(s.peak_rss_bytes),
        s_per_step: (s.steps > 0).then(|| s.train_time_s / s.steps as f64),
        tokens_per_s: Some(s.train_tokens_per_s),
        steps: Some(s.steps),
        final_val_loss: s.final_val_loss,
        accuracy: s.final_val_accuracy,
        output,
        ..Row::default()
    }
}

/// ROUGE-1 / ROUGE-L of every successful row on the same rows, greedy decoding: the base model
/// with each adapter attached in turn, and each fully fine-tuned model on its own. Returns the
/// data file scored. A row whose scoring fails is marked failed; the others keep their scores.
fn score_generation(
    spec: &CompareSpec,
    base: &LoadedConfig,
    runs: &[RunSpec],
    rows: &mut [Row],
    log: &dyn Fn(&str),
) -> Option<PathBuf> {
    let d = &base.config.data;
    let data = spec.eval_data.clone().or_else(|| {
        d.test.clone().or_else(|| d.validation.clone()).map(|p| {
            if p.is_relative() {
                base.base_dir.join(p)
            } else {
                p
            }
        })
    });
    let template = d
        .template
        .clone()
        .or_else(|| d.templates.as_ref().and_then(|t| t.first().cloned()));
    let completion = spec
        .eval_completion
        .clone()
        .or_else(|| d.completion.clone());
    let (Some(data), Some(template), Some(completion)) = (data, template, completion) else {
        log("scores: no generation metric (the config has no template + completion, or no test / validation data; pass --eval-data)");
        return None;
    };
    let opts = CompareOptions {
        template,
        completion,
        chat: d.chat,
        limit: Some(spec.eval_limit.unwrap_or(200)),
        max_new_tokens: spec.max_new_tokens,
        stop: Vec::new(),
        metrics: vec![Metric::Rouge],
        progress: false,
    };
    let dev = match crate::train::config::parse_device(&base.config.train.device)
        .map_err(Error::msg)
        .and_then(|d| d.device())
    {
        Ok(d) => d,
        Err(e) => {
            log(&format!("scores: {e}"));
            return None;
        }
    };
    let load = |spec: &str| crate::model::load(spec, &crate::model::LoadOptions::default(), &dev);
    // Adapters on the one base model: the base is loaded once.
    let mut adapters: Vec<(usize, PathBuf)> = Vec::new();
    let mut models: Vec<(usize, PathBuf)> = Vec::new();
    for (i, (row, run)) in rows.iter().zip(runs).enumerate() {
        if row.status != "ok" || !run.trains {
            continue;
        }
        match (
            &row.output,
            row.output
                .as_ref()
                .is_some_and(|o| o.join("config.json").exists()),
        ) {
            (Some(o), true) => models.push((i, o.clone())),
            (Some(o), false) => adapters.push((i, o.clone())),
            (None, _) => {}
        }
    }
    let base_row = runs.iter().position(|r| !r.trains);
    log(&format!(
        "scores: ROUGE on {} rows of {}",
        opts.limit.unwrap_or(0),
        data.display()
    ));
    let set_scores = |row: &mut Row, r: &crate::train::compare::CompareRow| {
        row.rouge1 = r.rouge1;
        row.rouge_l = r.rouge_l;
        row.scored_rows = Some(r.n);
    };
    if base_row.is_some() || !adapters.is_empty() {
        let dirs: Vec<PathBuf> = adapters.iter().map(|(_, d)| d.clone()).collect();
        let result =
            load(&base.config.model).and_then(|mut lm| compare(&mut lm, &dirs, &data, &opts));
        match result {
            Ok(scored) => {
                // compare() scores the base first, then each adapter in order.
                if let (Some(b), Some(r)) = (base_row, scored.first()) {
                    set_scores(&mut rows[b], r);
                }
                for ((i, _), r) in adapters.iter().zip(scored.iter().skip(1)) {
                    set_scores(&mut rows[*i], r);
                }
            }
            Err(e) => {
                for i in adapters.iter().map(|(i, _)| *i).chain(base_row) {
                    rows[i] = Row {
                        status: "failed".to_string(),
                        error: Some(format!(
                            "scoring: {}",
                            crate::error::first_line(&e.to_string())
                        )),
                        ..rows[i].clone()
                    };
                }
            }
        }
    }
    for (i, dir) in models {
        match load(&dir.display().to_string())
            .and_then(|mut lm| compare(&mut lm, &[], &data, &opts))
        {
            Ok(scored) => {
                if let Some(r) = scored.first() {
                    set_scores(&mut rows[i], r);
                }
            }
            Err(e) => {
                rows[i].status = "failed".to_string();
                rows[i].error = Some(format!(
                    "scoring: {}",
                    crate::error::first_line(&e.to_string())
                ));
            }
        }
    }
    Some(data)
}

/// `AMD EPYC 7B13, 2 cores, AVX2+FMA`: what every figure must name.
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[allow(unused_mut)]
    let mut simd: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            simd.push("AVX-512");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            simd.push("AVX2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            simd.push("FMA");
        }
    }
    format!(
        "{model}, {cores} cores{}",
        if simd.is_empty() {
            String::new()
        } else {
            format!(", {}", simd.join("+"))
        }
    )
}

fn fmt_opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".to_string())
}

/// Decimal units, as `train` prints its peak RSS and the memory estimate (the table's 1.84 GB is
/// the 1.84 GB the run printed).
fn bytes(b: u64) -> String {
    crate::inspect::human_bytes(b)
}

/// The table as Markdown (what `compare.md` holds and the CLI prints).
pub fn markdown(report: &Report) -> String {
    let classification = report.metric == "accuracy";
    let mut s = format!(
        "Model `{}`, config `{}`; {}.\n\n",
        report.model,
        report.config.display(),
        report.cpu
    );
    s.push_str("| method | trainable params | trainable % | adapter size | peak RSS | s/step | tokens/s | final val loss |");
    s.push_str(if classification {
        " accuracy |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    } else {
        " ROUGE-1 | ROUGE-L |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    });
    for r in &report.rows {
        if r.status != "ok" {
            let cols = if classification { 8 } else { 9 };
            s.push_str(&format!(
                "| {} | {}: {}{} |\n",
                r.name,
                r.status,
                r.error.as_deref().unwrap_or("").replace('|', "\\|"),
                " |".repeat(cols - 1)
            ));
            continue;
        }
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            fmt_opt(r.trainable_params, crate::peft::thousands),
            fmt_opt(r.trainable_percent, |p| format!("{p:.4}")),
            fmt_opt(r.adapter_bytes, bytes),
            fmt_opt(r.peak_rss_bytes, bytes),
            fmt_opt(r.s_per_step, |x| format!("{x:.2}")),
            fmt_opt(r.tokens_per_s, |x| format!("{x:.0}")),
            fmt_opt(r.final_val_loss, |x| format!("{x:.4}")),
        ));
        if classification {
            s.push_str(&format!(
                " {} |\n",
                fmt_opt(r.accuracy, |x| format!("{x:.4}"))
            ));
        } else {
            s.push_str(&format!(
                " {} | {} |\n",
                fmt_opt(r.rouge1, |x| format!("{x:.4}")),
                fmt_opt(r.rouge_l, |x| format!("{x:.4}"))
            ));
        }
    }
    if let Some(d) = &report.eval_data {
        let n = report.rows.iter().find_map(|r| r.scored_rows).unwrap_or(0);
        s.push_str(&format!(
            "\nROUGE F-measures (rouge-score's, stemmed) of greedy generations on the first {n} rows of `{}`.\n",
            d.display()
        ));
    }
    s
}

fn write_report(report: &Report, out: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report).expect("the report always serializes");
    write_atomic(&out.join(JSON_FILE), json.as_bytes())?;
    write_atomic(&out.join(MARKDOWN_FILE), markdown(report).as_bytes())?;
    let png = render_chart(report)?;
    write_atomic(&out.join(CHART_FILE), &png)
}

/// The task metric against trainable parameters (log scale), one labelled point per method.
pub fn render_chart(report: &Report) -> Result<Vec<u8>> {
    use crate::train::report::{
        draw_text, encode_png_rgb, fmt_tick, framed_chart, padded_range, ticks,
    };
    use plotters::prelude::*;
    const W: u32 = 800;
    const H: u32 = 500;
    let err = |e: &dyn std::fmt::Display| Error::msg(format!("drawing the comparison chart: {e}"));
    // log10 of the trainable parameters (the base model's 0 sits at 1).
    let pts: Vec<(String, f64, f64)> = report
        .rows
        .iter()
        .filter_map(|r| {
            let m = r.metric()?;
            let p = r.trainable_params? as f64;
            Some((r.name.clone(), p.max(1.0).log10(), m))
        })
        .filter(|p| p.1.is_finite() && p.2.is_finite())
        .collect();
    let mut buf = vec![255u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let xmax = pts.iter().map(|p| p.1).fold(1.0, f64::max).ceil() + 0.5;
        let xmin = pts.iter().map(|p| p.1).fold(xmax, f64::min).floor() - 0.5;
        let ymax = pts.iter().map(|p| p.2).fold(f64::MIN, f64::max);
        let ymin = pts.iter().map(|p| p.2).fold(f64::MAX, f64::min);
        let (ymin, ymax) = padded_range(ymin, ymax, 0.1, 1e-2);
        let black = RGBColor(20, 20, 20);
        let xt: Vec<f64> = (xmin.ceil() as i64..=xmax.floor() as i64)
            .map(|x| x as f64)
            .collect();
        let yt = ticks(ymin, ymax, 6);
        let mut chart = framed_chart(&root, 40, (xmin, xmax), (ymin, ymax), (&xt, &yt), &err)?;
        let dot = RGBColor(31, 119, 180);
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.1, p.2), 5, dot.filled())))
            .map_err(|e| err(&e))?;
        for p in &pts {
            let (px, py) = chart.backend_coord(&(p.1, p.2));
            draw_text(&root, px + 8, py - 12, &p.0, black).map_err(|e| err(&e))?;
        }
        for &x in &xt {
            let (px, py) = chart.backend_coord(&(x, ymin));
            let s = format!("1e{}", x as i64);
            draw_text(&root, px - 4 * s.len() as i32, py + 8, &s, black).map_err(|e| err(&e))?;
        }
        let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
        for &y in &yt {
            let (px, py) = chart.backend_coord(&(xmin, y));
            let s = fmt_tick(y, ystep);
            draw_text(&root, px - 8 * s.len() as i32 - 8, py - 4, &s, black)
                .map_err(|e| err(&e))?;
        }
        draw_text(
            &root,
            W as i32 / 2 - 100,
            H as i32 - 20,
            "trainable parameters (log)",
            black,
        )
        .map_err(|e| err(&e))?;
        let label = if report.metric == "accuracy" {
            "accuracy"
        } else {
            "ROUGE-1"
        };
        draw_text(&root, 8, 20, label, black).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(encode_png_rgb(&buf, W, H))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(methods: &[&str], ranks: &[usize]) -> CompareSpec {
        CompareSpec {
            config: PathBuf::from("base.toml"),
            methods: methods.iter().map(|s| s.to_string()).collect(),
            lora_ranks: ranks.to_vec(),
            out: PathBuf::from("cmp"),
            set: vec![],
            method_set: vec![],
            eval_data: None,
            eval_limit: None,
            eval_completion: None,
            max_new_tokens: 32,
        }
    }

    #[test]
    fn plan_names_each_run_and_its_overrides() {
        let mut s = spec(&["base", "lora", "dora", "ia3"], &[4, 16]);
        s.method_set = vec![("lora r=16".into(), "train.lr=1e-4".into())];
        let runs = plan(&s).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["base", "lora", "dora", "ia3", "lora r=4", "lora r=16"]
        );
        assert!(!runs[0].trains && runs[1].trains);
        assert_eq!(runs[2].set[..2], ["method=\"lora\"", "lora.use_dora=true"]);
        assert_eq!(runs[5].set[..2], ["method=\"lora\"", "lora.r=16"]);
        assert_eq!(runs[5].dir, Path::new("cmp/runs/lora-r16"));
        assert_eq!(runs[5].set[2], "train.lr=1e-4");
        assert!(
            runs[5].set[3].starts_with("output_dir="),
            "{:?}",
            runs[5].set
        );
        assert_eq!(runs[4].set.len(), 3, "only its run gets a --method-set");
        let mut bad = spec(&["lora"], &[]);
        bad.method_set = vec![("ia3".into(), "train.lr=1".into())];
        let e = plan(&bad).unwrap_err().to_string();
        assert!(e.starts_with("--method-set") && e.contains("ia3"), "{e}");
        for bad in [&["lora", "qlora"][..], &["lora", "lora"][..], &[][..]] {
            let e = plan(&spec(bad, &[])).unwrap_err().to_string();
            assert!(e.starts_with("--methods"), "{e}");
        }
        for r in [0, 99_999_999_999] {
            let e = plan(&spec(&["lora"], &[r])).unwrap_err().to_string();
            assert!(e.starts_with("--lora-ranks") && e.contains("1..="), "{e}");
        }
    }

    #[test]
    fn table_and_chart_show_every_row_failed_ones_with_their_error() {
        let ok = Row {
            name: "lora".into(),
            status: "ok".into(),
            trainable_params: Some(1234),
            all_params: Some(100_000),
            trainable_percent: Some(1.234),
            adapter_bytes: Some(5000),
            peak_rss_bytes: Some(3_000_000_000),
            s_per_step: Some(0.5),
            tokens_per_s: Some(900.0),
            steps: Some(10),
            final_val_loss: Some(1.5),
            rouge1: Some(0.31),
            rouge_l: Some(0.25),
            scored_rows: Some(20),
            ..Row::default()
        };
        let failed = Row::failed("ia3", "error: boom | bang\nsecond line");
        let report = Report {
            config: "base.toml".into(),
            model: "m".into(),
            cpu: cpu_description(),
            metric: "rouge".into(),
            eval_data: Some("test.jsonl".into()),
            rows: vec![ok, failed],
        };
        let md = markdown(&report);
        assert!(md.contains("| lora | 1,234 | 1.2340 | 5.0 kB | 3.00 GB | 0.50 | 900 | 1.5000 | 0.3100 | 0.2500 |"), "{md}");
        let failed_line = md.lines().find(|l| l.starts_with("| ia3")).unwrap();
        assert!(
            failed_line.contains("boom \\| bang") && !failed_line.contains("second"),
            "{md}"
        );
        // Every row of the table has the header's number of columns.
        let cols = |l: &str| l.matches(" |").count() + l.matches("|-").count();
        let header = md.lines().find(|l| l.starts_with("| method")).unwrap();
        assert_eq!(cols(failed_line), cols(header), "{md}");
        let png = render_chart(&report).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
