//! `[[tasks]]` (multi-task instruction tuning) through [`load`]: task names on every example,
//! per-task validation from a file or from `split`, the refusals that name their key, and the
//! realised mix of tasks under each mixing rule.
use std::collections::BTreeMap;

use serde_json::json;

use super::config::{task_label, TaskProblem};
use super::testutil::{tiny_tokenizer, words, TempDir};
use super::{
    load, load_task, BatchConfig, Batcher, DataConfig, DataTask, Example, Mixing, TaskConfig,
};

fn task(v: serde_json::Value) -> TaskConfig {
    serde_json::from_value(v).unwrap()
}

fn data(v: serde_json::Value, tasks: Vec<TaskConfig>) -> DataConfig {
    DataConfig {
        tasks,
        ..serde_json::from_value(v).unwrap()
    }
}

fn lines(n: usize, f: impl Fn(usize) -> serde_json::Value) -> String {
    (0..n)
        .map(|i| f(i).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn task_of(e: &Example) -> &str {
    e.source.task.as_deref().unwrap_or("<none>")
}

fn count_by_task(exs: &[Example]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in exs {
        *m.entry(task_of(e).to_string()).or_default() += 1;
    }
    m
}

/// Two tasks read the same file with different templates: each example carries its task's
/// name and template, the weights set the mix, and each task's validation comes from its own
/// file or else from its share of `split` (the same cut for both, so no row validated by one
/// task is trained on by the other).
#[test]
fn tasks_keep_their_names_templates_and_validation_apart() {
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("tasks-names");
    d.write("qa.jsonl", &lines(20, |i| json!({"q": i, "a": i + 1})));
    d.write(
        "dev.jsonl",
        &lines(3, |i| json!({"q": 50 + i, "a": 60 + i})),
    );
    let cfg = data(
        json!({"split": [0.8, 0.2], "seed": 3, "mixture_size": 40}),
        vec![
            task(
                json!({"name": "answer", "train": "qa.jsonl", "template": "question {q} answer :",
                        "completion": " {a}", "weight": 3.0}),
            ),
            task(
                json!({"name": "copy", "train": "qa.jsonl", "templates": ["q {q} :", "x {q} :"],
                        "completion": " {q}", "validation": "dev.jsonl"}),
            ),
        ],
    );
    let p = load(&cfg, d.dir(), &tok, 64).unwrap();
    // Weights 3 : 1 of 40 drawn (interleaved: exact to one example).
    let mix = count_by_task(&p.train);
    assert_eq!(mix["answer"], 30, "{mix:?}");
    assert_eq!(mix["copy"], 10, "{mix:?}");
    let n = |e: &Example, k: usize| e.input_ids[k] - words(&tok, "0")[0];
    for e in &p.train {
        match task_of(e) {
            "answer" => {
                let q = n(e, 2);
                assert_eq!(
                    e.input_ids,
                    words(&tok, &format!("<s> question {q} answer : {} </s>", q + 1))
                );
            }
            "copy" => {
                let q = n(e, 2);
                let a = words(&tok, &format!("<s> q {q} : {q} </s>"));
                let b = words(&tok, &format!("<s> x {q} : {q} </s>"));
                assert!(e.input_ids == a || e.input_ids == b, "{:?}", e.source);
            }
            other => panic!("{other}"),
        }
    }
    // "copy" was trained on all 20 rows (its validation is its own file), "answer" on its
    // 16-row share of the split.
    let by_task = p.validation_by_task();
    let names: Vec<&str> = by_task.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["answer", "copy"]);
    assert_eq!(by_task[0].1.len(), 4);
    assert_eq!(by_task[1].1.len(), 3);
    assert!(by_task[1]
        .1
        .iter()
        .all(|e| e.source.file.ends_with("dev.jsonl")));
    let answer_val: Vec<_> = by_task[0].1.iter().map(|e| e.source.loc).collect();
    assert!(p
        .train
        .iter()
        .filter(|e| task_of(e) == "answer")
        .all(|e| !answer_val.contains(&e.source.loc)));
    // The split summary says the tasks' counts, and the validation stats cover both tasks.
    let summary = p.summary();
    assert!(
        summary.contains("tasks (train / validation examples): answer 30 / 4, copy 10 / 3"),
        "{summary}"
    );
    assert!(
        summary.contains("validation: 7 rows -> 7 examples"),
        "{summary}"
    );
    // The batch plan counts by task name, though both tasks read one file.
    let mut b = Batcher::new(
        p.train.clone(),
        BatchConfig::new(4, p.max_seq_len, 3),
        candle_core::Device::Cpu,
    )
    .unwrap();
    for _ in 0..b.batches_per_epoch() {
        b.next_batch().unwrap();
    }
    let seen = b.seen_per_source();
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["answer", "copy"]);
    assert_eq!((seen["answer"], seen["copy"]), (30, 10));
    // An example's place names its task in messages.
    let e = p.train.iter().find(|e| task_of(e) == "copy").unwrap();
    assert!(
        e.source.to_string().ends_with("(task \"copy\")"),
        "{}",
        e.source
    );
}

/// Every refusal is one line naming `[data]` and its key, or the task and its key.
#[test]
fn bad_tasks_are_refused_naming_the_key() {
    let ok = || {
        vec![
            task(json!({"name": "a", "train": "a.jsonl", "template": "{x}", "completion": "y"})),
            task(json!({"name": "b", "train": "b.jsonl", "template": "{x}", "completion": "y"})),
        ]
    };
    assert_eq!(data(json!({}), ok()).task_problem(), None);
    assert_eq!(data(json!({}), vec![]).task_problem(), None);
    // `[data]` keys that tasks replace, or leave unused.
    for (v, key) in [
        (json!({"train": "t.jsonl"}), "train"),
        (json!({"mixture": [{"path": "m.jsonl"}]}), "mixture"),
        (json!({"validation": "v.jsonl"}), "validation"),
        (json!({"test": "t.jsonl"}), "test"),
    ] {
        let cfg = data(v, ok());
        let p = cfg.task_problem().unwrap();
        assert_eq!((p.task, p.key), (None, key), "{p:?}");
        let e = cfg.check_tasks().unwrap_err().to_string();
        assert!(e.starts_with(&format!("[data]: key `{key}`")), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
    let mut all_val = ok();
    for t in &mut all_val {
        t.validation = Some("v.jsonl".into());
    }
    let p = data(json!({"split": [0.9, 0.1]}), all_val).task_problem();
    assert!(p.is_some_and(|p| p.key == "split" && p.what.contains("split nothing")));
    // Entries: an empty, unprintable or repeated name; a weight that is not positive and finite.
    let bad = |f: &dyn Fn(&mut TaskConfig)| {
        let mut ts = ok();
        f(&mut ts[1]);
        let cfg = data(json!({}), ts);
        let e = cfg.check_tasks().unwrap_err().to_string();
        (cfg.task_problem().unwrap(), e)
    };
    for name in ["", "  ", "a"] {
        let (p, e) = bad(&|t| t.name = name.into());
        assert_eq!((p.task, p.key), (Some(1), "name"), "{name:?}: {p:?}");
        assert!(
            e.starts_with("[[tasks]] #2") && e.contains("key `name`"),
            "{e}"
        );
        if name == "a" {
            assert!(e.contains("task #1") && e.contains("unique"), "{e}");
        }
    }
    let (p, _) = bad(&|t| t.name = "a\nb".into());
    assert_eq!(p.key, "name");
    for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let (p, e) = bad(&|t| t.weight = w);
        assert_eq!(
            p,
            TaskProblem {
                task: Some(1),
                key: "weight",
                what: format!("must be a positive finite number, got {w}")
            }
        );
        assert!(e.starts_with("[[tasks]] #2 (\"b\"): key `weight`"), "{e}");
    }
    // Keys of an entry are checked as written (serde): unknown ones and a missing name.
    let e = serde_json::from_value::<TaskConfig>(json!({"name": "a", "train": "a", "wieght": 2}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `wieght`"), "{e}");
    let e = serde_json::from_value::<TaskConfig>(json!({"train": "a.jsonl"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing field `name`"), "{e}");
    assert_eq!(task_label(&ok(), 0), "[[tasks]] #1 (\"a\")");
    // The checks run in `load`, before any file is read; so does the refusal of tasks for
    // other kinds of data.
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("tasks-bad");
    let e = load(&data(json!({"train": "t.jsonl"}), ok()), d.dir(), &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("[data]: key `train`"), "{e}");
    let e = load_task(&data(json!({}), ok()), d.dir(), &tok, 64, DataTask::Seq2Seq)
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `tasks`") && e.contains("causal LM"), "{e}");
    // A template error of a task names the task.
    let mut ts = ok();
    ts[0].templates = Some(vec!["{x}".into()]);
    let e = load(&data(json!({}), ts), d.dir(), &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("[[tasks]] #1 (\"a\"): key `templates`"),
        "{e}"
    );
}

/// The share each task ends up with over 10k drawn examples, through the whole loader with
/// `[[tasks]]` (as the mixture test does for `mix` alone), for every rule and both ways of
/// drawing: within 2% (absolute) of the configured rate. The counts are by task name: two of
/// the tasks read the same file.
#[test]
fn realised_task_mix_matches_the_configured_rates() {
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("tasks-rates");
    d.write("small.jsonl", &lines(50, |i| json!({"x": i % 100})));
    d.write("mid.jsonl", &lines(400, |i| json!({"x": i % 100})));
    d.write("big.jsonl", &lines(3000, |i| json!({"x": i % 100})));
    let tasks = |files: [&str; 3]| -> Vec<TaskConfig> {
        files
            .iter()
            .zip(["s", "m", "b"])
            .zip([1.0, 1.0, 2.0])
            .map(|((f, name), w)| {
                task(json!({"name": name, "train": f, "template": "{x}",
                            "completion": " a", "weight": w}))
            })
            .collect()
    };
    let sqrt_total = 50f64.sqrt() + 20.0 + 2.0 * 3000f64.sqrt();
    let cases = [
        (json!({"mixing_rates": "weights"}), vec![0.25, 0.25, 0.5]),
        // min(n, 1000) = 50, 400, 1000, times the weights: 50 : 400 : 2000
        (
            json!({"mixing_rates": "examples_proportional", "mixing_cap": 1000}),
            vec![50.0 / 2450.0, 400.0 / 2450.0, 2000.0 / 2450.0],
        ),
        // sqrt(50), sqrt(400) = 20, 2 sqrt(3000)
        (
            json!({"mixing_rates": "temperature", "mixing_temperature": 2.0}),
            vec![
                50f64.sqrt() / sqrt_total,
                20.0 / sqrt_total,
                2.0 * 3000f64.sqrt() / sqrt_total,
            ],
        ),
    ];
    for (keys, want) in cases {
        for mixing in [Mixing::Interleave, Mixing::Sample] {
            let mut v = keys.clone();
            v["mixture_size"] = json!(10_000);
            v["seed"] = json!(7);
            v["mixing"] = json!(match mixing {
                Mixing::Interleave => "interleave",
                Mixing::Sample => "sample",
            });
            let cfg = data(v, tasks(["small.jsonl", "mid.jsonl", "big.jsonl"]));
            let p = load(&cfg, d.dir(), &tok, 64).unwrap();
            assert_eq!(p.train.len(), 10_000);
            let got = count_by_task(&p.train);
            for (name, w) in ["s", "m", "b"].iter().zip(&want) {
                let share = got.get(*name).copied().unwrap_or(0) as f64 / 10_000.0;
                assert!(
                    (share - w).abs() < 0.02,
                    "{keys} {mixing:?} task {name}: {share} vs {w}"
                );
            }
        }
    }
    // Two tasks on one file are counted apart, by name.
    let cfg = data(
        json!({"mixture_size": 1000, "seed": 1}),
        vec![
            task(
                json!({"name": "one", "train": "mid.jsonl", "template": "{x}", "completion": " a"}),
            ),
            task(
                json!({"name": "two", "train": "mid.jsonl", "template": "{x} a", "completion": " b",
                        "weight": 3.0}),
            ),
        ],
    );
    let p = load(&cfg, d.dir(), &tok, 64).unwrap();
    let got = count_by_task(&p.train);
    assert_eq!((got["one"], got["two"]), (250, 750));
}
