//! The training recipe end to end on a tiny model (tests/fixtures/models, 2 layers, vocab 256)
//! with a small word-level tokenizer: gradient accumulation equals one big batch, an
//! interrupted and resumed run ends bit for bit where an uninterrupted one does, a NaN loss
//! stops the run and keeps the last good checkpoint, the loss goes down on a task the model can
//! overfit, early stopping, and what a run leaves behind (summary.json, metrics, plot, adapter).
use candle_core::{Device, Tensor};
use ferrotune::data::{self, BatchConfig, Batcher, Example, IGNORE};
use ferrotune::model::{self, LoadOptions};
use ferrotune::peft;
use ferrotune::train::{self, checkpoint, LoadedConfig, ProgressMode, RunOptions, StopReason};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::common;
use common::{max_abs_diff, rev_model as tiny_model, reverse_rows, tmp};

/// A run folder: model, train.jsonl / dev.jsonl, and a config with `extra` appended to
/// [train] (and `lora_extra` to [lora]).
struct Setup {
    dir: PathBuf,
    config: PathBuf,
}

fn setup(
    tag: &str,
    train_rows: &str,
    dev_rows: &str,
    train_extra: &str,
    lora_extra: &str,
) -> Setup {
    let dir = tmp(tag);
    tiny_model(&dir);
    std::fs::write(dir.join("train.jsonl"), train_rows).unwrap();
    std::fs::write(dir.join("dev.jsonl"), dev_rows).unwrap();
    let text = format!(
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

fn load(s: &Setup, set: &[&str]) -> LoadedConfig {
    let set: Vec<String> = set.iter().map(|x| x.to_string()).collect();
    train::load_config(&s.config, &set).unwrap()
}

fn quiet(resume: bool) -> RunOptions {
    RunOptions {
        resume,
        progress: ProgressMode::Quiet,
        ..Default::default()
    }
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter(|v| v["type"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn grad_accum_equals_one_k_times_larger_batch() {
    let s = setup("accum", &reverse_rows(4, 1), &reverse_rows(2, 2), "", "");
    let c = load(&s, &[]);
    let lm = model::load(&c.config.model, &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut llama = lm.model;
    let tuner = train::Tuner::attach(&c.config, &mut llama, "tiny").unwrap();
    let params = tuner.trainable(&llama);
    // B starts at zero, which would make every gradient of A zero: give all LoRA weights values.
    let mut rng = StdRng::seed_from_u64(3);
    for (_, v) in &params {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-0.3..0.3))
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let prepared = train::prepare_data(
        &c,
        &lm.tokenizer,
        None,
        ferrotune::data::DataTask::CausalSft,
    )
    .unwrap();
    let exs: Vec<Example> = prepared.train.clone();
    let lens: Vec<usize> = exs.iter().map(|e| e.n_trained()).collect();
    assert!(
        lens.windows(2).any(|w| w[0] != w[1]),
        "examples must differ in loss tokens for the test to mean anything: {lens:?}"
    );
    let mut bc = BatchConfig::new(4, 32, data::pad_id(&lm.tokenizer));
    bc.shuffle = false;
    let b = Batcher::new(exs, bc, Device::Cpu).unwrap();
    let big = b.build(&[vec![0], vec![1], vec![2], vec![3]]).unwrap();
    // Two micro-batches of two examples with different numbers of loss tokens.
    let n = |i: usize| b.examples()[i].n_trained();
    let (p, q) = [([0, 1], [2, 3]), ([0, 2], [1, 3]), ([0, 3], [1, 2])]
        .into_iter()
        .find(|(p, q)| n(p[0]) + n(p[1]) != n(q[0]) + n(q[1]))
        .expect("a split with unequal loss tokens");
    let micro = [
        b.build(&[vec![p[0]], vec![p[1]]]).unwrap(),
        b.build(&[vec![q[0]], vec![q[1]]]).unwrap(),
    ];
    let one = train::accumulate_gradients(&llama, &params, std::slice::from_ref(&big)).unwrap();
    let acc = train::accumulate_gradients(&llama, &params, &micro).unwrap();
    assert_eq!(one.loss_tokens, acc.loss_tokens);
    assert!(
        (one.loss - acc.loss).abs() < 1e-5 * one.loss.abs(),
        "{} vs {}",
        one.loss,
        acc.loss
    );
    let mut max_rel = 0.0f64;
    for (g1, g2) in one.grads.iter().zip(&acc.grads) {
        let d = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap();
        let scale = g1.abs().unwrap().max_all().unwrap();
        let (d, scale) = (
            d.to_scalar::<f32>().unwrap() as f64,
            scale.to_scalar::<f32>().unwrap() as f64,
        );
        assert!(scale > 0.0, "a gradient is all zero");
        max_rel = max_rel.max(d / scale);
    }
    assert!(max_rel < 1e-4, "accumulated gradients differ by {max_rel}");
    // Averaging each micro-batch on its own (the common bug) weights the tokens of the smaller
    // micro-batch more: its gradient is far from the reference, so this test would catch it.
    assert_ne!(micro[0].n_loss_tokens, micro[1].n_loss_tokens);
    let per_batch: Vec<train::StepGrads> = micro
        .iter()
        .map(|m| train::accumulate_gradients(&llama, &params, std::slice::from_ref(m)).unwrap())
        .collect();
    let mut naive_rel = 0.0f64;
    for (i, g1) in one.grads.iter().enumerate() {
        let naive = ((&per_batch[0].grads[i] + &per_batch[1].grads[i]).unwrap() * 0.5).unwrap();
        let d = (g1 - naive).unwrap().abs().unwrap().max_all().unwrap();
        let scale = g1.abs().unwrap().max_all().unwrap();
        naive_rel = naive_rel
            .max(d.to_scalar::<f32>().unwrap() as f64 / scale.to_scalar::<f32>().unwrap() as f64);
    }
    assert!(
        naive_rel > 1e-2,
        "per-micro-batch averaging differs by only {naive_rel}"
    );
}

#[test]
fn loss_positions_skip_padding_and_prompt() {
    // The batch's first label is always ignored and padding carries IGNORE: the loss counts
    // exactly n_loss_tokens positions.
    let s = setup(
        "positions",
        &reverse_rows(3, 5),
        &reverse_rows(1, 6),
        "",
        "",
    );
    let c = load(&s, &[]);
    let tok = train::load_tokenizer(&c.config.model).unwrap();
    let prepared =
        train::prepare_data(&c, &tok, None, ferrotune::data::DataTask::CausalSft).unwrap();
    let bc = BatchConfig::new(3, 32, data::pad_id(&tok));
    let mut b = Batcher::new(prepared.train, bc, Device::Cpu).unwrap();
    let batch = b.next_batch().unwrap();
    let (rows, targets) = train::loss::loss_positions(&batch.labels).unwrap();
    assert_eq!(rows.len(), batch.n_loss_tokens);
    let labels: Vec<Vec<i64>> = batch.labels.to_vec2().unwrap();
    let t = labels[0].len();
    for (r, tg) in rows.iter().zip(&targets) {
        let (i, j) = (*r as usize / t, *r as usize % t);
        assert_eq!(labels[i][j + 1], *tg as i64);
        assert_ne!(labels[i][j + 1], IGNORE);
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run_bit_for_bit() {
    // Dropout on, gradient accumulation, several epochs (the data cursor wraps), evaluations
    // and checkpoints: everything a resume has to restore.
    let extra = "lr = 5e-3\ngrad_accum = 2\nmax_steps = 8\nsave_every = 2\neval_every = 3\neval_batches = 1\nwarmup_steps = 2\nweight_decay = 0.01\nseed = 7";
    let s = setup(
        "resume",
        &reverse_rows(10, 11),
        &reverse_rows(4, 12),
        extra,
        "dropout = 0.1",
    );
    let set_a = format!("output_dir={}", s.dir.join("a").display());
    let straight = load(&s, &[set_a.as_str()]);
    let sa = train::run(&straight, &quiet(false)).unwrap();
    assert_eq!(sa.steps, 8);
    assert!(sa.epochs > 2.0, "the run must cross epochs: {}", sa.epochs);

    let out_b = s.dir.join("b");
    let set_b = format!("output_dir={}", out_b.display());
    let first = load(&s, &[set_b.as_str(), "train.stop_after=3"]);
    let s1 = train::run(&first, &quiet(false)).unwrap();
    assert_eq!(s1.stop_reason, StopReason::StopAfter);
    assert_eq!(s1.steps, 3);
    assert!(s1.adapter_dir.is_none() && !out_b.join("adapter").exists());
    assert_eq!(checkpoint::latest(&out_b).unwrap().unwrap().0, 3);
    // What a kill during the next steps leaves: a half-written checkpoint folder and metrics
    // lines of steps that the checkpoint does not include.
    std::fs::create_dir_all(out_b.join("checkpoints/.tmp-step-4")).unwrap();
    std::fs::write(out_b.join("checkpoints/.tmp-step-4/junk"), "x").unwrap();
    let mut m = std::fs::read_to_string(out_b.join("metrics.jsonl")).unwrap();
    m.push_str("{\"type\":\"train\",\"step\":4,\"loss\":99.0}\n");
    std::fs::write(out_b.join("metrics.jsonl"), m).unwrap();

    // Starting again without --resume refuses to overwrite the run.
    let e = train::run(&load(&s, &[set_b.as_str()]), &quiet(false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    // Resuming with other batch settings is refused.
    let e = train::run(
        &load(&s, &[set_b.as_str(), "train.batch_size=3"]),
        &quiet(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot resume"), "{e}");

    let s2 = train::run(&load(&s, &[set_b.as_str()]), &quiet(true)).unwrap();
    assert_eq!(s2.resumed_from_step, Some(3));
    assert_eq!(s2.steps, 8);
    assert!(!out_b.join("checkpoints/.tmp-step-4").exists());

    let a = std::fs::read(s.dir.join("a/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(out_b.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed adapter differs from the uninterrupted one"
    );
    let opt_a = std::fs::read(s.dir.join("a/checkpoints/step-8/optimizer.safetensors")).unwrap();
    let opt_b = std::fs::read(out_b.join("checkpoints/step-8/optimizer.safetensors")).unwrap();
    assert!(opt_a == opt_b, "optimizer state differs");
    // The logged losses match step for step, and the stale step-4 line is gone.
    assert_eq!(train_losses(&s.dir.join("a")), train_losses(&out_b));
    assert_eq!(sa.final_val_loss, s2.final_val_loss);
    assert_eq!(sa.train_tokens, s2.train_tokens);
}

#[test]
fn nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint() {
    let extra =
        "max_steps = 6\nsave_every = 1\nlr = 1e30\nlr_schedule = \"constant\"\nmax_grad_norm = 0";
    let s = setup("nan", &reverse_rows(8, 3), &reverse_rows(2, 4), extra, "");
    let c = load(&s, &[]);
    let e = train::run(&c, &quiet(false)).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.contains("training loss is NaN")
            || e.contains("training loss is inf")
            || e.contains("gradient norm is"),
        "{e}"
    );
    let out = s.dir.join("out");
    let (step, dir) = checkpoint::latest(&out)
        .unwrap()
        .expect("a checkpoint before the NaN");
    assert!(e.contains(&format!("step {}:", step + 1)), "{e}");
    assert!(e.contains(&format!("step-{step}")), "{e}");
    assert!(
        !out.join("adapter").exists(),
        "no final adapter after a failed run"
    );
    // The kept checkpoint is complete: its adapter loads.
    let mut m = model::load(
        s.dir.join("model").to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    peft::load_adapter(&mut m.model, &dir, "kept").unwrap();
}

#[test]
fn loss_decreases_on_a_task_the_model_can_overfit() {
    let rows = reverse_rows(6, 21);
    // Validation on the same rows: the model memorises them.
    let extra = "max_steps = 40\nlr = 1e-2\neval_every = 20\neval_batches = 0\nwarmup_steps = 4";
    let s = setup("overfit", &rows, &rows, extra, "");
    let summary = train::run(&load(&s, &[]), &quiet(false)).unwrap();
    let first = summary.initial_val_loss.unwrap();
    let last = summary.final_val_loss.unwrap();
    assert!(last < 0.3 * first, "val loss {first} -> {last}");
    let losses = train_losses(&s.dir.join("out"));
    let head: f64 = losses[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let tail: f64 = losses[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(tail < 0.3 * head, "train loss {head} -> {tail}");
}

/// `data.packing = true` end to end: the config is accepted, validation (packed too) scores
/// the untrained model exactly as an unpacked run does, and the packed run learns the task.
#[test]
fn packed_run_scores_validation_like_an_unpacked_run_and_learns() {
    let rows = reverse_rows(12, 31);
    let extra = "max_steps = 30\nlr = 1e-2\neval_every = 30\neval_batches = 0\nwarmup_steps = 3";
    let s = setup("packed", &rows, &rows, extra, "");
    let out = |d: &str| format!("output_dir={}", s.dir.join(d).display());
    let plain = train::run(&load(&s, &[out("plain").as_str()]), &quiet(false)).unwrap();
    let packed = train::run(
        &load(&s, &[out("packed").as_str(), "data.packing=true"]),
        &quiet(false),
    )
    .unwrap();
    let (p0, u0) = (
        packed.initial_val_loss.unwrap(),
        plain.initial_val_loss.unwrap(),
    );
    assert!((p0 - u0).abs() < 1e-5 * u0, "initial val loss {p0} vs {u0}");
    // Rows hold several examples, so the same steps cover more epochs.
    assert!(
        packed.epochs > 1.5 * plain.epochs,
        "epochs {} vs {}",
        packed.epochs,
        plain.epochs
    );
    let last = packed.final_val_loss.unwrap();
    assert!(last < 0.3 * p0, "packed val loss {p0} -> {last}");
}

#[test]
fn run_outputs_summary_metrics_plot_and_a_loadable_adapter() {
    // 10 examples in batches of 2: 5 batches per epoch; 10 steps are exactly 2 epochs, so every
    // token of the split is processed twice.
    let extra = "lr = 5e-3\nmax_steps = 10\neval_every = 5\nsave_every = 4\nkeep_checkpoints = 2";
    let s = setup(
        "outputs",
        &reverse_rows(10, 31),
        &reverse_rows(3, 32),
        extra,
        "",
    );
    let c = load(&s, &[]);
    let summary = train::run(&c, &quiet(false)).unwrap();
    let out = s.dir.join("out");
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
            v.get(k).is_some_and(|x| !x.is_null()),
            "summary.json lacks {k}: {v}"
        );
    }
    assert_eq!(v["steps"], 10);
    let tok = train::load_tokenizer(&c.config.model).unwrap();
    let prepared =
        train::prepare_data(&c, &tok, None, ferrotune::data::DataTask::CausalSft).unwrap();
    let split_tokens: usize = prepared.train.iter().map(Example::len).sum();
    assert_eq!(v["train_tokens"].as_u64().unwrap(), 2 * split_tokens as u64);
    let trained: usize = prepared.train.iter().map(|e| e.n_trained()).sum();
    // Each example's first label is never predicted (nothing precedes it).
    assert!(v["loss_tokens"].as_u64().unwrap() <= 2 * trained as u64);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["wall_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["epochs"].as_f64().unwrap(), 2.0);
    assert!((summary.epochs - 2.0).abs() < 1e-12);

    let m = metrics(&out);
    let steps: Vec<u64> = m
        .iter()
        .filter(|x| x["type"] == "train")
        .map(|x| x["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>());
    let evals: Vec<u64> = m
        .iter()
        .filter(|x| x["type"] == "eval")
        .map(|x| x["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 5, 10]);
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let kept: Vec<usize> = checkpoint::list(&out)
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(kept, vec![8, 10]);
    assert!(out.join("config.toml").exists());

    // The adapter is a PEFT folder that reproduces the trained model's outputs.
    let mut fresh = model::load(&c.config.model, &LoadOptions::default(), &Device::Cpu).unwrap();
    let a = peft::load_adapter(&mut fresh.model, &out.join("adapter"), "t").unwrap();
    assert_eq!(
        a.modules.len(),
        14,
        "all-linear on 2 layers: 7 linears each"
    );
    let ids = Tensor::new(&[[1u32, 6, 7, 8, 4]], &Device::Cpu).unwrap();
    let base = model::load(&c.config.model, &LoadOptions::default(), &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &fresh.llama().unwrap().forward(&ids, None).unwrap(),
        &base.llama().unwrap().forward(&ids, None).unwrap(),
    );
    assert!(d > 1e-4, "the trained adapter changes nothing");
    // The final checkpoint holds the same adapter.
    assert_eq!(
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoints/step-10/adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn early_stopping_when_validation_gets_worse() {
    // Train teaches "say X =" -> " one"; validation wants " two" for the same prompts, so its
    // loss rises while training goes on.
    let mut train_rows = String::new();
    let mut dev_rows = String::new();
    for w in ["red", "green", "blue", "cat"] {
        train_rows.push_str(&format!("{{\"q\": \"say {w}\", \"a\": \"one\"}}\n"));
        dev_rows.push_str(&format!("{{\"q\": \"say {w}\", \"a\": \"two\"}}\n"));
    }
    let extra = "max_steps = 50\nlr = 1e-2\neval_every = 1\nearly_stopping_patience = 2\nlr_schedule = \"constant\"";
    let s = setup("early", &train_rows, &dev_rows, extra, "");
    let summary = train::run(&load(&s, &[]), &quiet(false)).unwrap();
    assert_eq!(summary.stop_reason, StopReason::EarlyStopping);
    assert!(summary.steps < 50, "{}", summary.steps);
    assert_eq!(summary.steps, summary.best_step.unwrap() + 2);
    assert!(s.dir.join("out/adapter/adapter_model.safetensors").exists());
}

#[test]
fn config_errors_name_the_file_and_key() {
    let s = setup(
        "cfg",
        &reverse_rows(2, 1),
        &reverse_rows(1, 1),
        "lr_schedul = \"cosine\"",
        "",
    );
    let e = train::load_config(&s.config, &[]).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.contains("run.toml") && e.contains("unknown key `lr_schedul`"),
        "{e}"
    );
    assert!(e.contains("[train]"), "{e}");
    std::fs::write(&s.config, "model = \"x\"\n[data\n").unwrap();
    let e = train::load_config(&s.config, &[]).unwrap_err().to_string();
    assert!(e.contains("run.toml: line 2") && !e.contains('\n'), "{e}");
    std::fs::write(&s.config, "model = \"x\"\n[data]\ntrain = \"t.jsonl\"\n").unwrap();
    let e = train::load_config(&s.config, &[]).unwrap_err().to_string();
    assert!(e.contains("missing key `output_dir`"), "{e}");
    let e = train::load_config(&s.dir.join("nope.toml"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.toml"), "{e}");
    // A data file that does not exist is named when the run starts.
    let s = setup(
        "cfg2",
        &reverse_rows(2, 1),
        &reverse_rows(1, 1),
        "max_steps = 1",
        "",
    );
    let c = load(&s, &["data.train=/nonexistent/train.jsonl"]);
    let e = train::run(&c, &quiet(false)).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/train.jsonl"), "{e}");
}

#[test]
fn compare_scores_the_base_model_and_a_trained_adapter() {
    use train::compare::{compare, table, CompareOptions, Metric};
    let rows = reverse_rows(6, 41);
    let extra = "max_steps = 40\nlr = 1e-2\nwarmup_steps = 4";
    let s = setup("compare", &rows, &rows, extra, "");
    let c = load(&s, &[]);
    train::run(&c, &quiet(false)).unwrap();
    let adapter = s.dir.join("out/adapter");
    let mut lm = model::load(&c.config.model, &LoadOptions::default(), &Device::Cpu).unwrap();
    let opts = CompareOptions {
        template: "{q} =".into(),
        completion: " {a}".into(),
        chat: false,
        limit: Some(5),
        max_new_tokens: 8,
        stop: Vec::new(),
        metrics: Metric::parse_list("rouge,accuracy,perplexity").unwrap(),
        progress: false,
    };
    let out = compare(
        &mut lm,
        std::slice::from_ref(&adapter),
        &s.dir.join("train.jsonl"),
        &opts,
    )
    .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].name, "base");
    assert_eq!(out[1].name, adapter.display().to_string());
    assert!(out.iter().all(|r| r.n == 5 && r.predictions.len() == 5));
    assert!(out[0].bleu.is_none(), "only the metrics asked for");
    // The adapter memorised these rows: lower loss, and its greedy answers match more often.
    let (base, tuned) = (&out[0], &out[1]);
    assert!(tuned.loss.unwrap() < 0.5 * base.loss.unwrap());
    assert!(tuned.rouge1.unwrap() > base.rouge1.unwrap());
    assert!(tuned.accuracy.unwrap() >= base.accuracy.unwrap());
    // The adapter's loss is the training recipe's evaluation of the same rows.
    peft::load_adapter(&mut lm.model, &adapter, "check").unwrap();
    let prepared = train::prepare_data(
        &c,
        &lm.tokenizer,
        None,
        ferrotune::data::DataTask::CausalSft,
    )
    .unwrap();
    let mut bc = BatchConfig::new(1, 32, data::pad_id(&lm.tokenizer));
    bc.shuffle = false;
    let exs: Vec<Example> = prepared.train[..5].to_vec();
    let want = train::evaluate(&lm.model, &Batcher::new(exs, bc, Device::Cpu).unwrap(), 0).unwrap();
    assert!((want.loss - tuned.loss.unwrap()).abs() < 1e-9);
    peft::remove_adapter(&mut lm.model, "check").unwrap();
    // compare leaves no adapter behind, and refuses a model that has one.
    assert!(peft::adapter_names(&lm.model).is_empty());
    peft::load_adapter(&mut lm.model, &adapter, "x").unwrap();
    assert!(compare(&mut lm, &[], &s.dir.join("train.jsonl"), &opts).is_err());
    let t = table(&out);
    assert!(t.starts_with("metric") && t.contains("accuracy") && t.contains("perplexity"));
    assert!(Metric::parse_list("rouge,meteor").is_err());
}

/// Mean next-token NLL of `ids` (one row) under `m`.
fn row_nll(m: &dyn model::Model, ids: &[u32]) -> f64 {
    let (sum, n) = m.loss_sum(&row_batch(ids), false).unwrap();
    sum.to_scalar::<f32>().unwrap() as f64 / n as f64
}

/// `ids` as a one-row batch that scores every token after the first.
fn row_batch(ids: &[u32]) -> data::Batch {
    let t = ids.len();
    let input = Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap();
    let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    labels[0] = IGNORE;
    data::Batch {
        input_ids: input,
        labels: Tensor::from_vec(labels, (1, t), &Device::Cpu).unwrap(),
        targets: data::Targets::NextToken,
        position_ids: Tensor::arange(0u32, t as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        attention_mask: Tensor::ones((1, t), candle_core::DType::U8, &Device::Cpu).unwrap(),
        segment_ids: None,
        n_loss_tokens: t - 1,
        n_tokens: t,
        sources: Vec::new(),
    }
}

/// `init_lora_weights = "pissa"` / `"olora"` train through the normal loop: the run's
/// `adapter/` is converted for the original base (PEFT's rank-2r file with
/// `init_lora_weights: true`), and on the original base it is the model the run trained (the
/// checkpoint's unconverted adapter re-run on a fresh base); an interrupted and resumed run
/// ends bit for bit where an uninterrupted one does.
#[test]
fn pissa_and_olora_runs_save_a_converted_adapter_and_resume_exactly() {
    for init in ["pissa", "olora"] {
        let extra = "lr = 5e-3\nmax_steps = 4\nsave_every = 2\neval_every = 100\nseed = 3";
        let s = setup(
            &format!("init-{init}"),
            &reverse_rows(8, 21),
            &reverse_rows(2, 22),
            extra,
            &format!("init_lora_weights = \"{init}\"\ndropout = 0.1"),
        );
        let out_a = s.dir.join("a");
        let set_a = format!("output_dir={}", out_a.display());
        let sa = train::run(&load(&s, &[set_a.as_str()]), &quiet(false)).unwrap();
        assert_eq!(sa.steps, 4);
        let adapter = out_a.join("adapter");
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["r"], 8, "{init}: rank 2r");
        assert_eq!(cfg["lora_alpha"], 16, "{init}: alpha doubled");
        assert_eq!(cfg["init_lora_weights"], true);
        let ckpt = out_a.join("checkpoints/step-4");
        assert!(ckpt.join(train::method::LORA_INIT_CHECKPOINT_FILE).exists());

        // The converted adapter on the original base = the trained (residual) model, which the
        // checkpoint's unconverted adapter rebuilds by re-running the init on a fresh base.
        let fresh = || {
            model::load_source(
                model::ModelSource::HfDir(s.dir.join("model")),
                &LoadOptions::default(),
                &Device::Cpu,
            )
            .unwrap()
            .model
        };
        let ids: Vec<u32> = vec![1, 5, 7, 8, 9, 4, 9, 8, 7, 2];
        let base = row_nll(&*fresh(), &ids);
        let mut conv = fresh();
        peft::load_adapter(&mut *conv, &adapter, "default").unwrap();
        let mut trained = fresh();
        peft::load_adapter(&mut *trained, &ckpt, "default").unwrap();
        let (c, t) = (row_nll(&*conv, &ids), row_nll(&*trained, &ids));
        assert!(
            (c - t).abs() < 1e-5 * t.abs(),
            "{init}: converted {c} vs trained {t}"
        );
        assert!((c - base).abs() > 1e-4, "{init}: training changed nothing");
        // Merging the converted adapter into the original base gives the same model.
        peft::merge_and_unload(&mut *conv, "default").unwrap();
        assert!((row_nll(&*conv, &ids) - t).abs() < 1e-5 * t.abs());

        let out_b = s.dir.join("b");
        let set_b = format!("output_dir={}", out_b.display());
        train::run(
            &load(&s, &[set_b.as_str(), "train.stop_after=2"]),
            &quiet(false),
        )
        .unwrap();
        let sb = train::run(&load(&s, &[set_b.as_str()]), &quiet(true)).unwrap();
        assert_eq!(sb.resumed_from_step, Some(2));
        let a = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
        let b = std::fs::read(out_b.join("adapter/adapter_model.safetensors")).unwrap();
        assert!(a == b, "{init}: the resumed adapter differs");
        assert_eq!(train_losses(&out_a), train_losses(&out_b));
    }
}

/// `init_lora_weights = "loftq"` on a base quantized at load (`train.base_quant = "nf4"`): the
/// run starts closer to the f32 model than plain QLoRA does, its `adapter/` is converted for
/// the original base (rank 2r, `init_lora_weights: true`, no `loftq_config`) and loads there,
/// and an interrupted run resumes to the same adapter. `loftq_bits` that disagree with the
/// base's format are refused naming the key.
#[test]
fn loftq_on_a_quantized_base_starts_closer_to_the_f32_model() {
    let rows = reverse_rows(6, 21);
    let extra =
        "max_steps = 4\nlr = 5e-3\neval_every = 4\neval_batches = 0\nsave_every = 2\nseed = 3";
    let lora = "init_lora_weights = \"loftq\"\nloftq_config = { loftq_iter = 5 }";
    let s = setup("loftq", &rows, &rows, extra, lora);
    let out = |name: &str| format!("output_dir={}", s.dir.join(name).display());

    // Before training: logits of the NF4 base with its LoftQ adapter against the f32 model's,
    // and the plain NF4 base's.
    let dir = s.dir.join("model");
    let nf4 = LoadOptions {
        base_quant: ferrotune::quant::BaseQuant::parse("nf4", true).unwrap(),
        ..Default::default()
    };
    let load_with = |o: &LoadOptions| {
        model::load(dir.to_str().unwrap(), o, &Device::Cpu)
            .unwrap()
            .model
    };
    let batch = row_batch(&[1, 5, 7, 8, 9, 4, 9, 8, 7, 2]);
    let logits = |m: &dyn model::Model| common::flat(&m.logits(&batch).unwrap());
    let reference = logits(&*load_with(&LoadOptions::default()));
    let rms = |x: Vec<f32>| {
        let n = x.len() as f64;
        (x.iter()
            .zip(&reference)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / n)
            .sqrt()
    };
    let plain = rms(logits(&*load_with(&nf4)));
    let mut m = load_with(&nf4);
    let st = model::weights::SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu)
        .unwrap();
    let read = |n: &str| st.stored_f32(&format!("{n}.weight"));
    let mut cfg = load(&s, &[]).config.lora.to_peft("m");
    cfg.target_modules = Some(peft::lora::ModuleSpec::One("all-linear".into()));
    peft::lora::attach_lora_with(&mut *m, &cfg, "default", 3, Some(&read)).unwrap();
    let fixed = rms(logits(&*m));

    assert!(
        fixed < 0.9 * plain,
        "logits vs f32: nf4 {plain}, nf4 + LoftQ {fixed}"
    );
    // without the file's weights there is nothing to measure the quantized base against
    let mut m = load_with(&nf4);
    let e = peft::lora::attach_lora(&mut *m, &cfg, "default", 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unquantized weights") && !e.contains('\n'),
        "{e}"
    );

    // a dry run checks LoftQ (with one round) and writes nothing
    let dry = train::dry_run(
        &load(
            &s,
            &[
                &out("dry"),
                "train.base_quant=nf4",
                "lora.loftq_config={loftq_iter=100}",
            ],
        ),
        &quiet(false),
    )
    .unwrap();
    assert!(matches!(dry, train::Outcome::DryRun(_)));
    assert!(!s.dir.join("dry").exists());

    train::run(
        &load(&s, &[&out("a"), "train.base_quant=nf4"]),
        &quiet(false),
    )
    .unwrap();
    let adapter = s.dir.join("a/adapter");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["r"].clone(), cfg["init_lora_weights"].clone()),
        (8.into(), true.into())
    );
    assert!(cfg.get("loftq_config").is_none(), "{cfg}");
    let mut m = model::load(
        s.dir.join("model").to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    peft::load_adapter(&mut m.model, &adapter, "loftq").unwrap();

    train::run(
        &load(
            &s,
            &[&out("b"), "train.base_quant=nf4", "train.stop_after=2"],
        ),
        &quiet(false),
    )
    .unwrap();
    let b = train::run(
        &load(&s, &[&out("b"), "train.base_quant=nf4"]),
        &quiet(true),
    )
    .unwrap();
    assert_eq!(b.resumed_from_step, Some(2));
    let read =
        |d: &str| std::fs::read(s.dir.join(d).join("adapter/adapter_model.safetensors")).unwrap();
    assert!(read("a") == read("b"), "the resumed adapter differs");

    // refused when the config is read, naming the key
    let set = [
        out("c"),
        "train.base_quant=nf4".into(),
        "lora.loftq_config={loftq_bits=8}".into(),
    ];
    let e = train::load_config(&s.config, &set).unwrap_err().to_string();
    assert!(
        e.contains("lora.loftq_config") && e.contains("loftq_bits = 8") && !e.contains('\n'),
        "{e}"
    );
}

/// `train.base_quant` (QLoRA and relatives): the frozen base's linears are quantized at load,
/// so the untrained model scores differently from the f32 one (but close), the adapter still
/// learns the task, and it loads on the f32 base as a plain PEFT LoRA. Bad values and methods
/// that train the base itself are refused naming the key.
#[test]
fn base_quant_runs_train_lora_on_a_quantized_base() {
    let rows = reverse_rows(6, 21);
    let extra = "max_steps = 30\nlr = 1e-2\neval_every = 30\neval_batches = 0\nwarmup_steps = 3";
    let s = setup("bq-none", &rows, &rows, extra, "");
    let f32_run = train::run(&load(&s, &[]), &quiet(false)).unwrap();
    let f32_initial = f32_run.initial_val_loss.unwrap();
    for bq in ["nf4", "fp4", "int8", "q4_0"] {
        let s = setup(&format!("bq-{bq}"), &rows, &rows, extra, "");
        let summary = train::run(
            &load(&s, &[&format!("train.base_quant={bq}")]),
            &quiet(false),
        )
        .unwrap();
        let (first, last) = (
            summary.initial_val_loss.unwrap(),
            summary.final_val_loss.unwrap(),
        );
        assert!(
            first != f32_initial && (first - f32_initial).abs() < 0.1 * f32_initial,
            "{bq}: the quantized base scores {first}, the f32 one {f32_initial}"
        );
        assert!(last < 0.3 * first, "{bq}: val loss {first} -> {last}");
        let mut m = model::load(
            s.dir.join("model").to_str().unwrap(),
            &LoadOptions::default(),
            &Device::Cpu,
        )
        .unwrap();
        peft::load_adapter(&mut m.model, &s.dir.join("out/adapter"), "qlora").unwrap();
    }
    for (set, want) in [
        (vec!["train.base_quant=nf3"], "train.base_quant"),
        (
            vec!["train.base_quant=nf4", "method=full"],
            "train.base_quant",
        ),
    ] {
        let s = setup("bq-bad", &rows, &rows, extra, "");
        let set: Vec<String> = set.iter().map(|x| x.to_string()).collect();
        let e = train::load_config(&s.config, &set)
            .and_then(|c| train::run(&c, &quiet(false)).map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{set:?}: {e}");
    }
}
