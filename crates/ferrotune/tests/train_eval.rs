//! `[eval] tasks` in a train config: the benchmarks run on the base and on the result, and the
//! forgetting report (forgetting.md / forgetting.json, eval/{before,after}.json) says what moved,
//! with a paired-bootstrap interval; a task that cannot be found fails before training.
use ferrotune::train::{self, ProgressMode, RunOptions};
use serde_json::Value;
use std::path::PathBuf;

use crate::common;
use common::{rev_model, reverse_rows, tmp};

fn setup(tag: &str, eval: &str) -> (PathBuf, PathBuf) {
    let dir = tmp(tag);
    rev_model(&dir);
    let rows = reverse_rows(6, 21);
    std::fs::write(dir.join("train.jsonl"), &rows).unwrap();
    std::fs::write(dir.join("dev.jsonl"), &rows).unwrap();
    // The reversal task as an lm-eval loglikelihood task over the same rows.
    std::fs::write(
        dir.join("rev_task.yaml"),
        "task: rev\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: dev.jsonl\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{q}} =\"\ndoc_to_target: \"{{' ' ~ a}}\"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n",
    )
    .unwrap();
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"model = "model"
method = "lora"
output_dir = "out"
[data]
train = "train.jsonl"
validation = "dev.jsonl"
template = "{{q}} ="
completion = " {{a}}"
[lora]
r = 4
alpha = 8
targets = "all-linear"
[train]
batch_size = 2
max_seq_len = 32
log_every = 1000
max_steps = 40
lr = 1e-2
eval_every = 40
eval_batches = 0
warmup_steps = 4
[eval]
{eval}
"#
        ),
    )
    .unwrap();
    (dir, config)
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: ProgressMode::Quiet,
        ..Default::default()
    }
}

#[test]
fn a_run_with_eval_tasks_writes_the_forgetting_report() {
    let (dir, config) = setup("eval-report", "tasks = [\"rev_task.yaml\"]");
    let c = train::load_config(&config, &[]).unwrap();
    train::run(&c, &quiet()).unwrap();
    let out = dir.join("out");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("forgetting.json")).unwrap())
            .unwrap();
    let rows = report["rows"].as_array().unwrap();
    let ppl = rows.iter().find(|r| r["metric"] == "perplexity").unwrap();
    let (before, after) = (
        ppl["before"].as_f64().unwrap(),
        ppl["after"].as_f64().unwrap(),
    );
    // The run memorises these rows: perplexity falls, significantly (lower is better).
    assert!(after < 0.5 * before, "perplexity {before} -> {after}");
    assert!(ppl["ci_high"].as_f64().unwrap() < 0.0, "{ppl}");
    assert_eq!(ppl["verdict"], "improved");
    let md = std::fs::read_to_string(out.join("forgetting.md")).unwrap();
    assert!(md.contains("| rev |") && md.contains("improved"), "{md}");
    for f in ["before.json", "after.json"] {
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval").join(f)).unwrap())
                .unwrap();
        assert!(
            r["results"]["rev"]["perplexity,none"].as_f64().is_some(),
            "{f}: {r}"
        );
        assert_eq!(r["n-samples"]["rev"]["effective"], 6);
    }
}

#[test]
fn an_eval_task_that_cannot_be_found_fails_before_training() {
    let (dir, config) = setup(
        "eval-missing",
        "tasks = [\"rev_task.yaml\", \"no_such_task:5\"]",
    );
    let c = train::load_config(&config, &[]).unwrap();
    let e = train::run(&c, &quiet()).unwrap_err().to_string();
    assert!(
        e.contains("eval.tasks[1]") && e.contains("no_such_task"),
        "{e}"
    );
    assert!(!dir.join("out").exists(), "the run wrote before failing");
    let (_, config) = setup("eval-limit", "limit = 0\ntasks = [\"rev_task.yaml\"]");
    let c = train::load_config(&config, &[]).unwrap();
    let e = train::run(&c, &quiet()).unwrap_err().to_string();
    assert!(
        e.contains("eval.limit") && e.contains("expected 1 to"),
        "{e}"
    );
}
