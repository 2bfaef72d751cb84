//! Multi-task runs (`[[tasks]]`) end to end on the tiny model (tests/fixtures/models, 2 layers)
//! with a word-level tokenizer: two tasks read the same file with different templates, and the
//! run reports each task's validation loss (consistent with the overall one, and equal to the
//! task's loss computed on its own) and the mix of tasks it drew, by name.
use candle_core::Device;
use ferrotune::data::{BatchConfig, Batcher, DataTask};
use ferrotune::model::{self, LoadOptions};
use ferrotune::train::{self, ProgressMode, RunOptions};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::common::{rev_model, reverse_rows, tmp};

/// "rev" reverses the words (validated on dev.jsonl); "say" repeats the prompt (validated on
/// its quarter of train.jsonl by `split`). 16 examples drawn 3 : 1, in batches of 2: 8 steps
/// are one epoch.
const CONFIG: &str = r#"model = "model"
method = "lora"
output_dir = "out"

[data]
split = [0.75, 0.25]
mixture_size = 16

[[tasks]]
name = "rev"
train = "train.jsonl"
validation = "dev.jsonl"
template = "{q} ="
completion = " {a}"
weight = 3.0

[[tasks]]
name = "say"
train = "train.jsonl"
template = "say {q} ="
completion = " {q}"

[lora]
r = 4
alpha = 8
targets = "all-linear"

[train]
batch_size = 2
max_seq_len = 32
max_steps = 8
eval_every = 4
eval_batches = 0
lr = 5e-3
log_every = 1000
"#;

#[test]
fn tasks_run_reports_per_task_validation_and_the_task_mix_by_name() {
    let dir = tmp("tasks");
    rev_model(&dir);
    std::fs::write(dir.join("train.jsonl"), reverse_rows(12, 1)).unwrap();
    std::fs::write(dir.join("dev.jsonl"), reverse_rows(4, 2)).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let c = train::load_config(&config, &[]).unwrap();
    let opts = RunOptions {
        progress: ProgressMode::Quiet,
        ..Default::default()
    };
    let summary = train::run(&c, &opts).unwrap();
    let out = dir.join("out");

    let evals: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "eval")
        .collect();
    assert_eq!(
        evals.iter().map(|v| v["step"].as_u64()).collect::<Vec<_>>(),
        [Some(0), Some(4), Some(8)]
    );
    for v in &evals {
        let losses = v["val_loss_by_task"].as_object().expect("val_loss_by_task");
        let tokens = v["val_tokens_by_task"]
            .as_object()
            .expect("val_tokens_by_task");
        assert_eq!(losses.keys().collect::<Vec<_>>(), ["rev", "say"], "{v}");
        assert_eq!(tokens.keys().collect::<Vec<_>>(), ["rev", "say"], "{v}");
        // The overall loss is the token-weighted mean of the tasks' losses.
        let (mut weighted, mut n) = (0.0, 0u64);
        for (name, loss) in losses {
            let k = tokens[name].as_u64().unwrap();
            assert!(k > 0, "{v}");
            weighted += loss.as_f64().unwrap() * k as f64;
            n += k;
        }
        assert_eq!(v["val_tokens"].as_u64(), Some(n), "{v}");
        let overall = v["val_loss"].as_f64().unwrap();
        assert!(
            (weighted / n as f64 - overall).abs() < 1e-9,
            "{} vs {overall}: {v}",
            weighted / n as f64
        );
        // The tasks differ (one reverses, one repeats): the losses are not one number twice.
        assert_ne!(losses["rev"], losses["say"], "{v}");
    }

    // Before training the adapter is the identity (LoRA B = 0): each task's loss at step 0 is
    // the base model's loss on that task's validation examples alone.
    let base = model::load(&c.config.model, &LoadOptions::default(), &Device::Cpu).unwrap();
    let prepared = train::prepare_data(&c, &base.tokenizer, None, DataTask::CausalSft).unwrap();
    for (name, want_n) in [("rev", 4), ("say", 3)] {
        let exs: Vec<_> = prepared
            .validation
            .iter()
            .filter(|e| e.source.task.as_deref() == Some(name))
            .cloned()
            .collect();
        assert_eq!(exs.len(), want_n, "{name}");
        let bc = BatchConfig {
            shuffle: false,
            ..BatchConfig::new(2, prepared.max_seq_len, 3)
        };
        let b = Batcher::new(exs, bc, Device::Cpu).unwrap();
        let alone = train::evaluate(&*base.model, &b, 0).unwrap();
        let logged = evals[0]["val_loss_by_task"][name].as_f64().unwrap();
        assert!(
            (alone.loss - logged).abs() < 1e-5,
            "{name}: {} alone, {logged} in the run",
            alone.loss
        );
        assert_eq!(
            evals[0]["val_tokens_by_task"][name].as_u64(),
            Some(alone.tokens as u64)
        );
    }

    // summary.json: the tasks drawn over the one epoch, by name (both read train.jsonl), and
    // the last evaluation's per-task losses.
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let mix: BTreeMap<String, u64> = serde_json::from_value(v["task_mix"].clone()).unwrap();
    assert_eq!(
        mix,
        BTreeMap::from([("rev".to_string(), 12), ("say".to_string(), 4)])
    );
    assert_eq!(v["final_val_loss_by_task"], evals[2]["val_loss_by_task"]);
    assert_eq!(v["final_val_loss"], evals[2]["val_loss"]);
    assert_eq!(summary.final_val_loss_by_task.len(), 2);
}
