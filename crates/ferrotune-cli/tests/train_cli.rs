//! `ferrotune train`, `merge` and `generate --adapter` through the real binary, on the tiny test
//! model (tests/fixtures/models, 2 layers, vocab 256) with a word-level tokenizer:
//! - every bad input is one `error:` line naming the file and the line, field or key, exit code
//!   1, and no output folder left behind;
//! - a run killed with SIGKILL right after its first checkpoint and continued with `--resume`
//!   ends with the adapter bytes of an uninterrupted run, and its metrics continue without
//!   repeating steps;
//! - a merged model generates what the base model with the adapter attached generates;
//! - a run leaves summary.json (with its fields), the adapter, metrics.jsonl and loss.png.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support;
use support::{
    checkpoint_steps, fails, logged_steps, merge, rev_model as tiny_model, succeeds, tmp, REV_WORDS,
};

/// `n` rows {"q": "rev a b c", "a": "c b a"} of 1 to 6 words, seeded.
fn reverse_rows(n: usize, seed: u64) -> String {
    support::reverse_rows(&REV_WORDS[7..], 6, n, seed)
}

/// A run folder: `model/`, `train.jsonl`, `dev.jsonl` and `run.toml` (output_dir `out`), with
/// `data_extra`, `lora_extra` and `train_extra` appended to their sections.
struct Setup {
    dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(tag: &str, data_extra: &str, lora_extra: &str, train_extra: &str) -> Setup {
        let dir = tmp(tag);
        tiny_model(&dir);
        std::fs::write(dir.join("train.jsonl"), reverse_rows(10, 1)).unwrap();
        std::fs::write(dir.join("dev.jsonl"), reverse_rows(4, 2)).unwrap();
        let text = format!(
            r#"model = "model"
output_dir = "out"

[data]
train = "train.jsonl"
validation = "dev.jsonl"
template = "{{q}} ="
completion = " {{a}}"
{data_extra}

[lora]
r = 4
alpha = 8
targets = "all-linear"
{lora_extra}

[train]
batch_size = 2
max_seq_len = 32
log_every = 1000
{train_extra}
"#
        );
        let config = dir.join("run.toml");
        std::fs::write(&config, text).unwrap();
        Setup { dir, config }
    }

    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// `train --config run.toml` plus `args`.
    fn train_args(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec![
            "train".to_string(),
            "--config".to_string(),
            self.config.display().to_string(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// `ferrotune train` that must fail: its error line, after checking that nothing was
    /// written (the output folder was never created).
    fn train_fails(&self, args: &[&str]) -> String {
        let e = fails(&self.train_args(args));
        assert!(
            !self.out().exists(),
            "a failed run left {} behind: {e}",
            self.out().display()
        );
        e
    }

    fn train_ok(&self, args: &[&str]) -> Output {
        succeeds(&self.train_args(args))
    }
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, loss) of the train lines, and (step, val_loss) of the eval lines.
type Points = Vec<(u64, f64)>;
fn curves(out: &Path) -> (Points, Points) {
    let m = metrics(out);
    let pick = |kind: &str, field: &str| -> Points {
        m.iter()
            .filter(|v| v["type"] == kind)
            .map(|v| (v["step"].as_u64().unwrap(), v[field].as_f64().unwrap()))
            .collect()
    };
    (pick("train", "loss"), pick("eval", "val_loss"))
}

// ---- Bad input ---------------------------------------------------------------------------------

#[test]
fn malformed_jsonl_line_names_the_file_and_line() {
    let s = Setup::new("badjson", "", "", "max_steps = 2");
    let rows = reverse_rows(6, 3);
    let mut lines: Vec<&str> = rows.lines().collect();
    lines.insert(4, "{\"q\": \"rev red\", \"a\": ");
    std::fs::write(s.dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    let e = s.train_fails(&[]);
    assert!(e.contains("train.jsonl: line 5:"), "{e}");
    assert!(e.contains("invalid JSON"), "{e}");
    // The same in the validation file.
    std::fs::write(s.dir.join("train.jsonl"), reverse_rows(6, 3)).unwrap();
    std::fs::write(
        s.dir.join("dev.jsonl"),
        "{\"q\": \"rev red\", \"a\": \"red\"}\nnot json\n",
    )
    .unwrap();
    let e = s.train_fails(&[]);
    assert!(e.contains("dev.jsonl: line 2:"), "{e}");
}

#[test]
fn row_missing_a_template_field_names_the_file_line_and_field() {
    let s = Setup::new("missingfield", "", "", "max_steps = 2");
    let mut rows = reverse_rows(5, 4);
    rows.push_str("{\"q\": \"rev red cat\"}\n");
    rows.push_str(&reverse_rows(2, 5));
    std::fs::write(s.dir.join("train.jsonl"), rows).unwrap();
    let e = s.train_fails(&[]);
    assert!(e.contains("train.jsonl: line 6"), "{e}");
    assert!(e.contains("`a`"), "the field is named: {e}");
}

#[test]
fn template_placeholder_absent_from_the_data_is_named() {
    let s = Setup::new("placeholder", "", "", "max_steps = 2");
    let e = s.train_fails(&["--set", "data.template=Question: {question} ="]);
    assert!(e.contains("train.jsonl: line 1"), "{e}");
    assert!(e.contains("`question`"), "the placeholder is named: {e}");
}

#[test]
fn empty_dataset_names_the_file() {
    let s = Setup::new("empty", "", "", "max_steps = 2");
    std::fs::write(s.dir.join("train.jsonl"), "").unwrap();
    let e = s.train_fails(&[]);
    assert!(e.contains("train.jsonl") && e.contains("empty"), "{e}");
    // Blank lines only are no rows either.
    std::fs::write(s.dir.join("train.jsonl"), "\n\n  \n").unwrap();
    let e = s.train_fails(&[]);
    assert!(e.contains("train.jsonl") && e.contains("empty"), "{e}");
}

#[test]
fn example_too_long_with_length_policy_error_names_the_example() {
    let s = Setup::new("toolong", "length_policy = \"error\"", "", "max_steps = 2");
    let mut rows = reverse_rows(3, 6);
    // BOS + rev + 12 words + "=" prompt, 12 words + EOS completion: 28 tokens.
    let long = ["red"; 12].join(" ");
    rows.push_str(&serde_json::json!({"q": format!("rev {long}"), "a": long}).to_string());
    rows.push('\n');
    std::fs::write(s.dir.join("train.jsonl"), rows).unwrap();
    let e = s.train_fails(&["--set", "train.max_seq_len=20"]);
    assert!(e.contains("train.jsonl: line 4"), "{e}");
    assert!(
        e.contains("max_seq_len 20") && e.contains("28 tokens"),
        "{e}"
    );
    // The same rows fit once the limit allows them: the error is about that one example.
    let out = s.dir.join("fits");
    s.train_ok(&[
        "--set",
        "train.max_seq_len=28",
        "--set",
        &format!("output_dir={}", out.display()),
    ]);
    assert!(out.join("adapter/adapter_model.safetensors").exists());
}

#[test]
fn unknown_lora_target_module_is_named_with_the_config_key() {
    let s = Setup::new("target", "", "", "max_steps = 2");
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replace(
        "targets = \"all-linear\"",
        "targets = [\"q_proj\", \"qkv_proj\"]",
    );
    std::fs::write(&s.config, text).unwrap();
    let e = s.train_fails(&[]);
    assert!(e.contains("`qkv_proj`"), "{e}");
    assert!(e.contains("run.toml") && e.contains("lora.targets"), "{e}");
    // It says which names exist.
    assert!(e.contains("q_proj") && e.contains("down_proj"), "{e}");
}

#[test]
fn bf16_base_with_checkpointing_trains() {
    // bf16 frozen weights, f32 LoRA master copies, activation checkpointing: the loss falls
    let s = Setup::new("bf16", "", "", "max_steps = 8\nlr = 1e-2");
    s.train_ok(&[
        "--set",
        "train.dtype=bf16",
        "--set",
        "train.gradient_checkpointing=true",
    ]);
    let (train, _) = curves(&s.out());
    assert!(train.len() >= 2, "{train:?}");
    assert!(
        train.last().unwrap().1 < train[0].1,
        "loss did not fall: {train:?}"
    );
}

#[test]
fn double_quant_with_a_format_it_does_not_apply_to_is_named() {
    // A QLoRA config rerun with another base_quant: its double_quant is reported as unused
    // (a warning, not an error: the documented `--set train.base_quant=...` comparisons work).
    let s = Setup::new("dq", "", "", "max_steps = 1");
    let r = s.train_ok(&[
        "--dry-run",
        "--set",
        "train.base_quant=int8",
        "--set",
        "train.double_quant=true",
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("train.double_quant = true has no effect") && stderr.contains("\"int8\""),
        "{stderr}"
    );
    let r = s.train_ok(&["--dry-run", "--set", "train.base_quant=nf4"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!stderr.contains("no effect"), "{stderr}");
}

#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_before_it_starts() {
    // Ten million rows per micro-batch: the activations alone would need terabytes.
    let s = Setup::new("oom", "", "", "max_steps = 2");
    let e = s.train_fails(&["--set", "train.batch_size=10000000"]);
    assert!(e.contains("train.batch_size"), "{e}");
    assert!(e.contains("needs about") && e.contains("available"), "{e}");
    assert!(e.contains("gradient_checkpointing"), "{e}");
    assert!(e.contains("memory estimate: weights"), "{e}");
    // An unsupported activation width or dtype is refused the same way, before anything is
    // written.
    let e = s.train_fails(&["--set", "train.activation_bits=12"]);
    assert!(e.contains("train.activation_bits"), "{e}");
    let e = s.train_fails(&["--set", "train.dtype=f8"]);
    assert!(e.contains("train.dtype") && e.contains("`f8`"), "{e}");
}

#[test]
fn unknown_config_key_names_the_file_line_and_key() {
    let s = Setup::new("cfgkey", "", "", "max_steps = 2\nlr_sheduler = \"cosine\"");
    let e = s.train_fails(&[]);
    let line = std::fs::read_to_string(&s.config)
        .unwrap()
        .lines()
        .position(|l| l.starts_with("lr_sheduler"))
        .unwrap()
        + 1;
    assert!(
        e.contains(&format!("run.toml: line {line},")),
        "line {line}: {e}"
    );
    assert!(e.contains("unknown key `lr_sheduler`"), "{e}");
    // An unrelated --set does not lose the line number.
    let e = s.train_fails(&["--set", "train.lr=1e-3"]);
    assert!(
        e.contains(&format!("run.toml: line {line},")) && e.contains("`lr_sheduler`"),
        "line {line} with --set: {e}"
    );
    // A bad value in the file: line and key.
    let s = Setup::new("cfgval", "", "", "max_steps = \"many\"");
    let e = s.train_fails(&["--set", "train.lr=1e-3"]);
    assert!(
        e.contains("run.toml: line") && e.contains("\"many\""),
        "{e}"
    );
}

#[test]
fn bad_set_key_names_the_override() {
    let s = Setup::new("setkey", "", "", "max_steps = 2");
    let e = s.train_fails(&["--set", "train.lr_shedule=linear"]);
    assert!(e.contains("--set `train.lr_shedule=linear`"), "{e}");
    assert!(e.contains("unknown key `lr_shedule`"), "{e}");
    assert!(!e.contains("run.toml"), "the file is not at fault: {e}");
    // A misspelt section.
    let e = s.train_fails(&["--set", "trian.lr=1e-3"]);
    assert!(
        e.contains("--set `trian.lr=1e-3`") && e.contains("unknown key `trian`"),
        "{e}"
    );
    // A bad value for a real key.
    let e = s.train_fails(&["--set", "train.max_steps=-3"]);
    assert!(e.contains("--set `train.max_steps=-3`"), "{e}");
    // A value of the right type that the checks refuse.
    let e = s.train_fails(&["--set", "train.lr=-1"]);
    assert!(
        e.contains("--set `train.lr=-1`") && e.contains("train.lr"),
        "{e}"
    );
    // Not key=value at all.
    let e = s.train_fails(&["--set", "train.lr"]);
    assert!(
        e.contains("--set `train.lr`") && e.contains("key=value"),
        "{e}"
    );
}

// ---- Kill and resume ---------------------------------------------------------------------------

#[test]
fn kill_9_then_resume_equals_an_uninterrupted_run() {
    // Dropout, gradient accumulation, evaluations and several epochs: everything a resume has
    // to restore. 120 steps take about a second; the kill comes right after step 11 is logged.
    let max_steps = 120;
    let s = Setup::new(
        "resume",
        "",
        "dropout = 0.1",
        &format!(
            "max_steps = {max_steps}\ngrad_accum = 2\nsave_every = 10\neval_every = 15\nlr = 5e-3\nwarmup_steps = 5\nseed = 9"
        ),
    );
    let out_a = s.dir.join("a");
    let set_a = format!("output_dir={}", out_a.display());
    s.train_ok(&["--set", &set_a]);

    let out_b = s.dir.join("b");
    let set_b = format!("output_dir={}", out_b.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(s.train_args(&["--set", &set_b]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let first = loop {
        if let Some(&k) = checkpoint_steps(&out_b).first() {
            break k;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(1));
    };
    // Kill as soon as a step after the checkpoint is logged, so that the resume has lines to
    // drop (a step the checkpoint does not include).
    while logged_steps(&out_b)
        .last()
        .is_none_or(|&s| s <= first as u64)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before the kill: make it longer"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL on unix
    let status = child.wait().unwrap();
    assert!(!status.success());
    // The kill landed mid-training: no final adapter or summary, some checkpoints, and logged
    // steps past the last of them.
    assert!(!out_b.join("adapter").exists() && !out_b.join("summary.json").exists());
    let kept = checkpoint_steps(&out_b);
    let last = *kept.last().unwrap();
    assert!(first == 10 && last < max_steps, "checkpoints {kept:?}");
    let logged = logged_steps(&out_b);
    assert!(
        *logged.last().unwrap() > last as u64,
        "steps logged {logged:?}, checkpoints {kept:?}"
    );

    // Without --resume the folder is refused, and left as it was.
    let e = fails(&s.train_args(&["--set", &set_b]));
    assert!(e.contains("--resume") && e.contains("/b"), "{e}");
    assert_eq!(checkpoint_steps(&out_b), kept);

    let r = s.train_ok(&["--set", &set_b, "--resume"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains(&format!("resuming from step {last} of {max_steps}")),
        "{stderr}"
    );
    let a = std::fs::read(out_a.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(out_b.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed adapter differs from the uninterrupted one"
    );
    assert_eq!(
        std::fs::read(out_a.join("adapter/adapter_config.json")).unwrap(),
        std::fs::read(out_b.join("adapter/adapter_config.json")).unwrap()
    );

    // metrics.jsonl continues: each step once, in order, with the uninterrupted run's losses
    // (steps the kill cut off after the checkpoint were dropped and done again).
    let (train_a, val_a) = curves(&out_a);
    let (train_b, val_b) = curves(&out_b);
    let steps: Vec<u64> = train_b.iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=max_steps as u64).collect::<Vec<_>>());
    assert_eq!(train_a, train_b);
    assert_eq!(val_a, val_b);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out_b.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], max_steps);
    assert_eq!(summary["resumed_from_step"], last);
    let summary_a: Value =
        serde_json::from_str(&std::fs::read_to_string(out_a.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["train_tokens"], summary_a["train_tokens"]);
    assert_eq!(summary["final_val_loss"], summary_a["final_val_loss"]);
    // The examples the resumed run drew include its first session's.
    assert!(summary["task_mix"]
        .as_object()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(summary["task_mix"], summary_a["task_mix"]);
}

// ---- Multi-task ----------------------------------------------------------------------------------

/// `[[tasks]]` instead of `[data] train`: two tasks on one file. The progress line after each
/// evaluation ends with each task's validation loss; a repeated task name is one error line
/// naming the file, the line, the task and the key, with nothing written.
#[test]
fn tasks_run_prints_each_tasks_val_loss_and_refuses_a_repeated_name() {
    let s = Setup::new("tasks", "", "", "max_steps = 4\neval_every = 2");
    let text = std::fs::read_to_string(&s.config).unwrap();
    let (head, rest) = text.split_once("[data]").unwrap();
    let (_, tail) = rest.split_once("[lora]").unwrap();
    let tasks = r#"[data]
split = [0.75, 0.25]

[[tasks]]
name = "rev"
train = "train.jsonl"
validation = "dev.jsonl"
template = "{q} ="
completion = " {a}"

[[tasks]]
name = "say"
train = "train.jsonl"
template = "say {q} ="
completion = " {q}"

"#;
    std::fs::write(&s.config, format!("{head}{tasks}[lora]{tail}")).unwrap();
    let r = s.train_ok(&[]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    let evals: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(": val loss"))
        .collect();
    assert_eq!(evals.len(), 3, "steps 0, 2, 4: {stderr}");
    for l in &evals {
        let (_, tasks) = l.split_once(" [").unwrap_or_else(|| panic!("{l}"));
        let parts: Vec<&str> = tasks.trim_end_matches(']').split(" · ").collect();
        assert_eq!(parts.len(), 2, "{l}");
        assert!(
            parts[0].starts_with("rev ") && parts[1].starts_with("say "),
            "{l}"
        );
        for p in parts {
            let loss: f64 = p.split_once(' ').unwrap().1.parse().unwrap();
            assert!(loss.is_finite() && loss > 0.0, "{l}");
        }
    }
    assert!(
        stderr.contains("tasks (train / validation examples): rev"),
        "{stderr}"
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(s.out().join("summary.json")).unwrap())
            .unwrap();
    let mix = v["task_mix"].as_object().expect("task_mix");
    assert_eq!(mix.keys().collect::<Vec<_>>(), ["rev", "say"], "{v}");

    let dup = format!("{head}{}[lora]{tail}", tasks.replace("\"say\"", "\"rev\""));
    std::fs::write(&s.config, dup).unwrap();
    std::fs::remove_dir_all(s.out()).unwrap();
    let e = s.train_fails(&[]);
    assert!(
        e.contains("run.toml: line 15: [[tasks]] #2 (\"rev\"): key `name`:")
            && e.contains("unique"),
        "{e}"
    );
}

// ---- Merge, generate -----------------------------------------------------------------------------

/// `generate --json` greedily, 16 tokens past any EOS: (text, prompt tokens, generated tokens).
fn generate(model: &Path, adapter: Option<&Path>) -> (String, u64, u64) {
    let mut args: Vec<String> = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "rev red cat fish =",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), a.display().to_string()]);
    }
    let out = succeeds(&args);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["text"].as_str().unwrap().to_string(),
        v["prompt_tokens"].as_u64().unwrap(),
        v["generated_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn merged_model_generates_what_the_adapter_on_the_fly_generates() {
    let s = Setup::new(
        "merge",
        "",
        "",
        "max_steps = 30\nlr = 1e-2\nwarmup_steps = 3",
    );
    s.train_ok(&[]);
    let model = s.dir.join("model");
    let adapter = s.out().join("adapter");
    let merged = s.dir.join("merged");
    let m = merge(&model, &adapter, &merged);
    let stderr = String::from_utf8_lossy(&m.stderr);
    assert!(stderr.contains("merged 14 modules"), "{stderr}");

    let base = generate(&model, None);
    let on_the_fly = generate(&model, Some(&adapter));
    let from_merged = generate(&merged, None);
    // Same prompt tokens: the merged folder keeps the tokenizer's BOS behaviour.
    assert_eq!(from_merged.1, base.1);
    assert_eq!(on_the_fly.1, base.1);
    assert_eq!((on_the_fly.2, from_merged.2), (16, 16));
    assert_eq!(
        from_merged.0, on_the_fly.0,
        "merged vs on-the-fly (base: {:?})",
        base.0
    );
    // Special tokens (BOS, EOS, padding) decode to nothing; the others to one word each.
    assert!(
        on_the_fly.0.split_whitespace().count() >= 8,
        "{on_the_fly:?}"
    );
    assert_ne!(on_the_fly.0, base.0, "the adapter changes nothing");
}

// ---- What a run leaves -----------------------------------------------------------------------

#[test]
fn train_writes_summary_adapter_metrics_and_plot() {
    let s = Setup::new("outputs", "", "", "max_steps = 6\neval_every = 3");
    let r = s.train_ok(&[]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    let out = s.out();
    assert!(
        stderr.contains(&format!("adapter: {}", out.join("adapter").display())),
        "{stderr}"
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for k in [
        "steps",
        "train_tokens",
        "train_tokens_per_s",
        "peak_rss_bytes",
        "final_train_loss",
        "final_val_loss",
        "wall_s",
    ] {
        assert!(
            v.get(k).is_some_and(Value::is_number),
            "summary.json: {k} is not a number: {v}"
        );
    }
    assert_eq!(v["steps"], 6);
    // 6 steps of 2 examples, all from the one train file.
    let mix = v["task_mix"].as_object().expect("task_mix");
    assert_eq!(mix.len(), 1, "{mix:?}");
    let (file, n) = mix.iter().next().unwrap();
    assert!(file.ends_with("train.jsonl") && n == 12, "{mix:?}");
    assert!(v["train_tokens"].as_u64().unwrap() > 0);
    assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(v["wall_s"].as_f64().unwrap() > 0.0);
    // The summary's losses are the last ones logged.
    let (train, val) = curves(&out);
    assert_eq!(
        train.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(v["final_train_loss"].as_f64(), Some(train[5].1));
    assert_eq!(val.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 3, 6]);
    assert_eq!(v["final_val_loss"].as_f64(), Some(val[2].1));

    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let st = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    // safetensors: an 8-byte header length, then the JSON header naming LoRA tensors.
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&st[8..8 + n]).unwrap();
    assert!(
        header.contains("lora_A") && header.contains("lora_B"),
        "{header}"
    );
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

// ---- PEFT variants: IA3 and DoRA ---------------------------------------------------------------

/// `method = "ia3"` (an `[ia3]` table of PEFT's keys) and `[lora] use_dora = true` train on the
/// tiny model: the validation loss falls, `adapter/` holds PEFT's files for the method, and the
/// adapter loads back: `generate --adapter` differs from the base and equals the merged model.
#[test]
fn ia3_and_dora_train_and_their_adapters_load_back() {
    for (tag, peft_type, key) in [
        ("ia3", "IA3", "ia3_l"),
        ("dora", "LORA", "lora_magnitude_vector"),
    ] {
        let s = Setup::new(
            tag,
            "",
            if tag == "dora" { "use_dora = true" } else { "" },
            "max_steps = 16\nlr = 1e-2\neval_every = 8\neval_batches = 0",
        );
        if tag == "ia3" {
            let text = std::fs::read_to_string(&s.config).unwrap().replace(
                "[lora]\nr = 4\nalpha = 8\ntargets = \"all-linear\"\n",
                "[ia3]\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]\n",
            );
            std::fs::write(&s.config, format!("method = \"ia3\"\n{text}")).unwrap();
        }
        s.train_ok(&[]);
        let (_, val) = curves(&s.out());
        assert!(
            val.last().unwrap().1 < val[0].1,
            "{tag}: validation loss did not fall: {val:?}"
        );
        let adapter = s.out().join("adapter");
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], peft_type, "{tag}");
        let st = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
        let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&st[8..8 + n]).unwrap();
        assert!(header.contains(key), "{tag}: {header}");
        let model = s.dir.join("model");
        let merged = s.dir.join("merged");
        merge(&model, &adapter, &merged);
        let base = generate(&model, None);
        let on_the_fly = generate(&model, Some(&adapter));
        let from_merged = generate(&merged, None);
        assert_ne!(on_the_fly.0, base.0, "{tag}: the adapter changes nothing");
        assert_eq!(from_merged.0, on_the_fly.0, "{tag}: merged vs on-the-fly");
    }
}

/// PEFT's `[lora]` key names work beside ours; a key and its alias together are a one-line
/// error naming the key.
#[test]
fn lora_table_takes_peft_key_names_and_refuses_a_key_with_its_alias() {
    let s = Setup::new("lora-alias", "", "lora_alpha = 16", "max_steps = 1");
    let e = s.train_fails(&["--dry-run"]);
    assert!(
        e.contains("lora.lora_alpha") && e.contains("`alpha`"),
        "{e}"
    );
    let s = Setup::new(
        "lora-peft-names",
        "",
        "use_rslora = true\nrank_pattern = { v_proj = 2 }\nalpha_pattern = { v_proj = 3 }\nloraplus_lr_ratio = 16.0",
        "max_steps = 2",
    );
    s.train_ok(&[]);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(s.out().join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(cfg["rank_pattern"]["v_proj"], 2);
    assert_eq!(cfg["alpha_pattern"]["v_proj"], 3);
    // LoRA+ is an optimizer setting: PEFT keeps it out of adapter_config.json.
    assert!(cfg.get("loraplus_lr_ratio").is_none(), "{cfg}");
    // `[ia3]` takes PEFT's IA3Config keys only.
    let s = Setup::new("ia3-bad-key", "", "", "max_steps = 1");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        format!("method = \"ia3\"\n{text}\n[ia3]\nr = 4\n"),
    )
    .unwrap();
    let e = s.train_fails(&[]);
    assert!(e.contains("unknown key `r`") && e.contains("[ia3]"), "{e}");
}

/// Files anywhere under `dir` named `name`.
fn find_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_named(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

/// `method = "prompt_tuning" | "prefix_tuning" | "p_tuning"` train (val loss falls), leave
/// PEFT's adapter (one tensor, `prompt_embeddings`) and checkpoints with the whole prompt
/// encoder, and the adapter loads in `generate --adapter`.
#[test]
fn soft_prompt_methods_train_and_generate_with_their_adapter() {
    for (method, peft_type, section) in [
        (
            "prompt_tuning",
            "PROMPT_TUNING",
            "[prompt_tuning]\nnum_virtual_tokens = 4\nprompt_tuning_init = \"TEXT\"\nprompt_tuning_init_text = \"rev red cat\"\n",
        ),
        (
            "prefix_tuning",
            "PREFIX_TUNING",
            "[prefix_tuning]\nnum_virtual_tokens = 4\nprefix_projection = true\nencoder_hidden_size = 16\n",
        ),
        (
            "p_tuning",
            "P_TUNING",
            "[p_tuning]\nnum_virtual_tokens = 4\nencoder_hidden_size = 16\n",
        ),
    ] {
        let s = Setup::new(
            &format!("soft-{method}"),
            "",
            "",
            &format!("max_steps = 20\nlr = 3e-2\neval_every = 10\n\n{section}"),
        );
        let text = std::fs::read_to_string(&s.config).unwrap();
        std::fs::write(&s.config, format!("method = \"{method}\"\n{text}")).unwrap();
        s.train_ok(&[]);
        let out = s.out();
        let (_, val) = curves(&out);
        assert!(
            val.last().unwrap().1 < val[0].1,
            "{method}: val loss did not fall: {val:?}"
        );
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], peft_type);
        assert_eq!(cfg["num_virtual_tokens"], 4);
        let st = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
        let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
        let names: Vec<&String> = header
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .collect();
        assert_eq!(names, ["prompt_embeddings"], "{method}");
        assert!(!out.join("adapter/prompt_encoder.safetensors").exists());
        assert!(
            !find_named(&out, "prompt_encoder.safetensors").is_empty(),
            "{method}: no checkpoint holds the prompt encoder"
        );
        let model = s.dir.join("model");
        let (with, prompt_tokens, generated) = generate(&model, Some(&out.join("adapter")));
        assert!(prompt_tokens > 0 && generated == 16, "{with}");
        let (base, _, _) = generate(&model, None);
        eprintln!("{method}: with the prompt {with:?}; base {base:?}");
        let adapter = out.join("adapter");
        let readout = |extra: &[&str]| {
            let mut args = vec![
                "peft",
                "readout",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
            ];
            args.extend(extra);
            args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        if method == "prefix_tuning" {
            let e = fails(&readout(&[]));
            assert!(e.contains("PREFIX_TUNING"), "{e}");
            continue;
        }
        let r = succeeds(&readout(&["--k", "2", "--json"]));
        let v: Value = serde_json::from_slice(&r.stdout).unwrap();
        let tokens = v["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 4, "{v}");
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(t["index"], i);
            let near = t["nearest"].as_array().unwrap();
            assert_eq!(near.len(), 2);
            assert!(near[0]["token"].is_string() && near[0]["id"].is_u64());
            assert!(near[0]["cosine"].as_f64().unwrap() >= near[1]["cosine"].as_f64().unwrap());
        }
        let text = succeeds(&readout(&[]));
        eprintln!("{method} readout:\n{}", String::from_utf8_lossy(&text.stdout));
    }
}

/// A P-tuning run stopped at step 10 and resumed ends with the adapter of an uninterrupted
/// run: checkpoints keep the whole prompt encoder (the MLP is not in PEFT's file).
#[test]
fn p_tuning_stop_and_resume_equals_an_uninterrupted_run() {
    let s = Setup::new(
        "soft-resume",
        "",
        "",
        "max_steps = 20\nsave_every = 5\nlr = 3e-2\nseed = 3\n\n[p_tuning]\nnum_virtual_tokens = 3\nencoder_hidden_size = 8\n",
    );
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, format!("method = \"p_tuning\"\n{text}")).unwrap();
    let set_a = format!("output_dir={}", s.dir.join("a").display());
    s.train_ok(&["--set", &set_a]);
    let set_b = format!("output_dir={}", s.dir.join("b").display());
    s.train_ok(&["--set", &set_b, "--set", "train.stop_after=10"]);
    assert!(!s.dir.join("b/adapter").exists());
    s.train_ok(&["--set", &set_b, "--resume"]);
    let a = std::fs::read(s.dir.join("a/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(s.dir.join("b/adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed prompt differs from the uninterrupted one"
    );
}

/// Soft prompt sections: a missing section, an unknown key, a section for another method and
/// LSTM are one-line errors naming the key.
#[test]
fn soft_prompt_config_errors_name_the_key() {
    for (method, section, want) in [
        ("prompt_tuning", "", "prompt_tuning"),
        (
            "prompt_tuning",
            "[prompt_tuning]\nnum_virtual_tokens = 4\nnum_tokens = 3\n",
            "num_tokens",
        ),
        (
            "prompt_tuning",
            "[prompt_tuning]\nnum_virtual_tokens = 0\n",
            "num_virtual_tokens",
        ),
        (
            "prompt_tuning",
            "[prompt_tuning]\nnum_virtual_tokens = 4\nprompt_tuning_init = \"TEXT\"\n",
            "prompt_tuning_init_text",
        ),
        (
            "lora",
            "[prefix_tuning]\nnum_virtual_tokens = 4\n",
            "prefix_tuning",
        ),
        (
            "p_tuning",
            "[p_tuning]\nnum_virtual_tokens = 4\nencoder_reparameterization_type = \"LSTM\"\n",
            "LSTM is not supported",
        ),
    ] {
        let s = Setup::new("soft-bad", "", "", &format!("max_steps = 2\n\n{section}"));
        let text = std::fs::read_to_string(&s.config).unwrap();
        std::fs::write(&s.config, format!("method = \"{method}\"\n{text}")).unwrap();
        let e = s.train_fails(&[]);
        assert!(
            e.contains(want) && e.contains("run.toml"),
            "{method} {section:?}: {e}"
        );
    }
}

/// What a soft prompt cannot run with is found by `--dry-run` and before a real run writes
/// anything: gradient checkpointing, packed rows, and virtual tokens that push the longest
/// row past the context window (the tiny model's is 256).
#[test]
fn soft_prompt_limits_are_found_before_the_run_writes() {
    for (data, train, section, want) in [
        (
            "",
            "gradient_checkpointing = true",
            "num_virtual_tokens = 4",
            "train.gradient_checkpointing",
        ),
        (
            "packing = true",
            "",
            "num_virtual_tokens = 4",
            "data.packing",
        ),
        (
            "",
            "",
            "num_virtual_tokens = 250",
            "prompt_tuning.num_virtual_tokens",
        ),
    ] {
        let s = Setup::new("soft-limits", data, "", &format!("max_steps = 2\n{train}"));
        let text = std::fs::read_to_string(&s.config).unwrap();
        std::fs::write(
            &s.config,
            format!("method = \"prompt_tuning\"\n{text}\n[prompt_tuning]\n{section}\n"),
        )
        .unwrap();
        for args in [&["--dry-run"][..], &[]] {
            let e = s.train_fails(args);
            assert!(
                e.contains(want) && e.contains("run.toml"),
                "{want} {args:?}: {e}"
            );
        }
    }
}

#[test]
fn an_update_that_overflows_the_weights_stops_without_saving() {
    // A finite loss and gradient, but lr 1e39 turns the weights into infinities: the run must
    // not write them as its adapter.
    let s = Setup::new("overflow", "", "", "max_steps = 1\nwarmup_steps = 0");
    // (the run had started: its folder holds its log, as after a NaN loss)
    let e = fails(&s.train_args(&["--quiet", "--set", "train.lr=1e39"]));
    assert!(e.contains("non-finite") && e.contains("step 1"), "{e}");
    assert!(!s.out().join("adapter").exists(), "no adapter is written");
    assert!(
        !s.out().join("summary.json").exists(),
        "no summary is written"
    );
}

/// A selective run's `adapter/` (the changed tensors) works as `--adapter` on the base: the
/// same perplexity as the run's `model/`, and `merge` writes that model; `eval`, which scores
/// the base and each adapter in turn, refuses it with a one-line error.
#[test]
fn a_selective_adapter_loads_onto_the_base_and_merges_into_the_run_model() {
    let s = Setup::new("selective-adapter", "", "", "max_steps = 6\nlr = 1e-2");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        format!("method = \"selective\"\n{text}\n[selective]\nregex = 'self_attn'\n"),
    )
    .unwrap();
    s.train_ok(&["--quiet"]);
    let file = s.dir.join("text.txt");
    std::fs::write(&file, "rev red blue = blue red rev green = green").unwrap();
    let ppl = |model: &Path, adapter: Option<&Path>| -> f64 {
        let mut args = vec![
            "perplexity".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--file".into(),
            file.display().to_string(),
            "--json".into(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".to_string(), a.display().to_string()]);
        }
        support::json(&succeeds(&args))["perplexity"]
            .as_f64()
            .unwrap()
    };
    let base = s.dir.join("model");
    let adapter = s.out().join("adapter");
    let trained = ppl(&s.out().join("model"), None);
    let before = ppl(&base, None);
    let with_adapter = ppl(&base, Some(&adapter));
    assert!(
        (with_adapter - trained).abs() < 1e-5 * trained,
        "{with_adapter} vs {trained}"
    );
    assert!(
        (before - trained).abs() > 1e-3 * trained,
        "training changed nothing"
    );
    let merged = s.dir.join("merged");
    succeeds(&[
        "merge",
        "--model",
        &base.display().to_string(),
        "--adapter",
        &adapter.display().to_string(),
        "--out",
        &merged.display().to_string(),
    ]);
    let m = ppl(&merged, None);
    assert!(
        (m - trained).abs() < 1e-5 * trained,
        "merged {m} vs {trained}"
    );
    let e = fails(&[
        "eval",
        "--model",
        &base.display().to_string(),
        "--adapter",
        &adapter.display().to_string(),
        "--data",
        &s.dir.join("dev.jsonl").display().to_string(),
        "--template",
        "{q} =",
        "--completion",
        " {a}",
    ]);
    assert!(e.contains("selective") && e.contains("model/"), "{e}");
}
