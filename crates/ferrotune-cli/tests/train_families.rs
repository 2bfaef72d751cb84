//! Training every family and objective through `ferrotune train`, end to end on the tiny
//! fixtures (tests/fixtures/t5, tests/fixtures/bert): span-corruption pre-training of a T5 with
//! full fine-tuning, then LoRA `seq2seq_lm` on a task it reaches; a bare BERT encoder given a
//! fresh classifier that learns a separable task; masked-LM continued pre-training.
use crate::support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::Path;
use support::{arg, fails, repo, succeeds, tmp};

/// Whole pieces of the tiny T5 tokenizer, so each word is one token.
const T5_WORDS: &[&str] = &[
    "the", "token", "span", "bucket", "sent", "what", "who", "in", "on", "to",
];

fn t5_target(w: &str) -> &'static str {
    let i = T5_WORDS.iter().position(|x| *x == w).unwrap();
    T5_WORDS[(i + 3) % T5_WORDS.len()]
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn t5_span_corruption_then_lora_seq2seq_reaches_the_task() {
    let d = tmp("t5-span-lora");
    let mut rng = StdRng::seed_from_u64(1);
    let mut text = String::new();
    for _ in 0..400 {
        let n = rng.random_range(8..=20);
        let ws: Vec<&str> = (0..n)
            .map(|_| T5_WORDS[rng.random_range(0..T5_WORDS.len())])
            .collect();
        text.push_str(&serde_json::json!({ "text": ws.join(" ") }).to_string());
        text.push('\n');
    }
    write(&d, "text.jsonl", &text);
    let mut pairs = String::new();
    for _ in 0..300 {
        let k = rng.random_range(1..=2);
        let ws: Vec<&str> = (0..k)
            .map(|_| T5_WORDS[rng.random_range(0..T5_WORDS.len())])
            .collect();
        let a: Vec<&str> = ws.iter().map(|w| t5_target(w)).collect();
        pairs.push_str(&serde_json::json!({ "q": ws.join(" "), "a": a.join(" ") }).to_string());
        pairs.push('\n');
    }
    write(&d, "pairs.jsonl", &pairs);
    let base = repo().join("tests/fixtures/t5/t5-v1_1");
    write(
        &d,
        "span.toml",
        &format!(
            r#"model = "{}"
method = "full"
objective = "span_corruption"
output_dir = "out-span"
[data]
train = "text.jsonl"
text = "{{text}}"
split = [0.9, 0.1]
[train]
batch_size = 8
max_seq_len = 32
max_steps = 60
lr = 1e-2
"#,
            base.display().to_string().replace('\\', "/")
        ),
    );
    succeeds(&["train", "-q", "--config", &arg(&d.join("span.toml"))]);
    let s = summary(&d.join("out-span"));
    assert_eq!(s["method"], "full");
    let (v0, v1) = (
        s["initial_val_loss"].as_f64().unwrap(),
        s["final_val_loss"].as_f64().unwrap(),
    );
    assert!(v1 < 0.5 * v0, "span corruption val loss {v0} -> {v1}");
    let pretrained = d.join("out-span/model");
    assert!(pretrained.join("model.safetensors").is_file());

    write(
        &d,
        "lora.toml",
        r#"model = "out-span/model"
method = "lora"
task = "seq2seq_lm"
output_dir = "out-lora"
[data]
train = "pairs.jsonl"
template = "{q}"
completion = "{a}"
split = [0.9, 0.1]
[lora]
r = 8
alpha = 16
targets = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
[train]
batch_size = 8
max_seq_len = 16
max_steps = 400
lr = 1e-2
"#,
    );
    succeeds(&["train", "-q", "--config", &arg(&d.join("lora.toml"))]);
    let s = summary(&d.join("out-lora"));
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out-lora/adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM");
    assert!(s["final_val_loss"].as_f64().unwrap() < 0.5 * s["initial_val_loss"].as_f64().unwrap());
    let generate = |adapter: bool, w: &str| -> String {
        let mut args = vec![
            "generate".to_string(),
            "-q".into(),
            "--model".into(),
            arg(&pretrained),
            "--prompt".into(),
            w.into(),
            "--max-new-tokens".into(),
            "6".into(),
            "--json".into(),
        ];
        if adapter {
            args.extend(["--adapter".into(), arg(&d.join("out-lora/adapter"))]);
        }
        let v = support::json(&succeeds(&args));
        v["text"].as_str().unwrap().trim().to_string()
    };
    let mut reached = 0;
    let mut before = 0;
    for w in T5_WORDS {
        reached += usize::from(generate(true, w) == t5_target(w));
        before += usize::from(generate(false, w) == t5_target(w));
    }
    assert_eq!(
        reached,
        T5_WORDS.len(),
        "LoRA-tuned T5: {reached} of 10 words"
    );
    assert!(
        before < 3,
        "the pre-trained model already knew the task ({before} of 10)"
    );
}

/// `method = "prompt_tuning" | "prefix_tuning" | "p_tuning"` on a T5 (`seq2seq_lm`): the
/// validation loss falls, the adapter is PEFT's SEQ_2_SEQ_LM prompt (prompt tuning's table has a
/// prompt per stack, 2n rows; prefix tuning one (key, value) pair per decoder layer), and
/// `generate` / `perplexity` take it with `--adapter`.
#[test]
fn t5_soft_prompt_methods_train_and_load() {
    let d = tmp("t5-soft-prompts");
    let mut rng = StdRng::seed_from_u64(2);
    let mut pairs = String::new();
    for _ in 0..200 {
        let k = rng.random_range(1..=2);
        let ws: Vec<&str> = (0..k)
            .map(|_| T5_WORDS[rng.random_range(0..T5_WORDS.len())])
            .collect();
        let a: Vec<&str> = ws.iter().map(|w| t5_target(w)).collect();
        pairs.push_str(&serde_json::json!({ "q": ws.join(" "), "a": a.join(" ") }).to_string());
        pairs.push('\n');
    }
    write(&d, "pairs.jsonl", &pairs);
    let base = repo().join("tests/fixtures/t5/t5-v1_1");
    // (method, section, prompt_embeddings shape): d_model 16; 3 decoder layers × 2 × 3 heads ×
    // d_kv 8 = 144.
    for (method, section, shape) in [
        (
            "prompt_tuning",
            "num_virtual_tokens = 4\nprompt_tuning_init = \"TEXT\"\nprompt_tuning_init_text = \"what token\"\n",
            [8, 16],
        ),
        (
            "prefix_tuning",
            "num_virtual_tokens = 4\nprefix_projection = true\nencoder_hidden_size = 16\n",
            [4, 144],
        ),
        (
            "p_tuning",
            "num_virtual_tokens = 4\nencoder_hidden_size = 16\n",
            [8, 16],
        ),
    ] {
        let out = format!("out-{method}");
        write(
            &d,
            &format!("{method}.toml"),
            &format!(
                r#"model = "{}"
method = "{method}"
task = "seq2seq_lm"
output_dir = "{out}"
[data]
train = "pairs.jsonl"
template = "{{q}}"
completion = "{{a}}"
split = [0.9, 0.1]
[{method}]
{section}
[train]
batch_size = 8
max_seq_len = 16
max_steps = 30
lr = 3e-2
eval_every = 10
"#,
                base.display().to_string().replace('\\', "/")
            ),
        );
        succeeds(&["train", "-q", "--config", &arg(&d.join(format!("{method}.toml")))]);
        let s = summary(&d.join(&out));
        let (v0, v1) = (
            s["initial_val_loss"].as_f64().unwrap(),
            s["final_val_loss"].as_f64().unwrap(),
        );
        assert!(v1 < 0.9 * v0, "{method}: val loss {v0} -> {v1}");
        let adapter = d.join(&out).join("adapter");
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM", "{method}");
        assert_eq!(cfg["num_transformer_submodules"], 2, "{method}");
        let st = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
        let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
        assert_eq!(
            header["prompt_embeddings"]["shape"],
            serde_json::json!(shape),
            "{method}"
        );
        let v = support::json(&succeeds(&[
            "generate",
            "-q",
            "--model",
            &arg(&base),
            "--adapter",
            &arg(&adapter),
            "--prompt",
            "the token",
            "--max-new-tokens",
            "4",
            "--json",
        ]));
        assert!(v["text"].is_string(), "{v}");
        let with = support::json(&succeeds(&[
            "perplexity",
            "-q",
            "--model",
            &arg(&base),
            "--adapter",
            &arg(&adapter),
            "--data",
            &arg(&d.join("pairs.jsonl")),
            "--template",
            "{q}",
            "--completion",
            "{a}",
            "--json",
        ]));
        let without = support::json(&succeeds(&[
            "perplexity",
            "-q",
            "--model",
            &arg(&base),
            "--data",
            &arg(&d.join("pairs.jsonl")),
            "--template",
            "{q}",
            "--completion",
            "{a}",
            "--json",
        ]));
        eprintln!("{method}: perplexity with the adapter {with}, without {without}");
        assert!(
            with["perplexity"].as_f64().unwrap() < without["perplexity"].as_f64().unwrap(),
            "{method}: the trained prompt does not lower the perplexity"
        );
    }
}

/// Rows whose label is whether the sentence has the word "good" (the tiny BERT's vocabulary is
/// whatever its WordPiece tokenizer splits into; the signal is one token).
fn cls_rows(n: usize, seed: u64) -> String {
    let words = [
        "the", "film", "was", "a", "movie", "plot", "and", "it", "is", "this",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = String::from("sentence\tlabel\n");
    for _ in 0..n {
        let k = rng.random_range(3..=8);
        let mut ws: Vec<&str> = (0..k)
            .map(|_| words[rng.random_range(0..words.len())])
            .collect();
        let positive = rng.random_bool(0.5);
        let at = rng.random_range(0..=ws.len());
        ws.insert(at, if positive { "good" } else { "bad" });
        let label = if positive { "positive" } else { "negative" };
        out.push_str(&format!("{}\t{label}\n", ws.join(" ")));
    }
    out
}

#[test]
fn bare_encoder_gets_a_fresh_classifier_that_learns() {
    let d = tmp("bert-cls");
    write(&d, "train.tsv", &cls_rows(400, 1));
    write(&d, "dev.tsv", &cls_rows(100, 2));
    // The tiny BERT fixture, saved as a masked LM, holds a 3-class classifier too (the
    // reference script saves every head); asked for sequence classification it loads it, with
    // string labels from the class list.
    let base = repo().join("tests/fixtures/bert/tiny-bert");
    for (method, extra) in [
        (
            "lora",
            "[lora]\nr = 8\nalpha = 16\ntargets = [\"query\", \"key\", \"value\", \"dense\"]\n",
        ),
        ("full", ""),
    ] {
        let out = format!("out-{method}");
        write(
            &d,
            &format!("{method}.toml"),
            &format!(
                r#"model = "{}"
method = "{method}"
task = "sequence_classification"
output_dir = "{out}"
[data]
train = "train.tsv"
validation = "dev.tsv"
template = "{{sentence}}"
label_field = "label"
labels = ["negative", "neutral", "positive"]
{extra}
[train]
batch_size = 16
max_steps = 150
lr = 5e-3
eval_batches = 0
"#,
                base.display().to_string().replace('\\', "/")
            ),
        );
        succeeds(&[
            "train",
            "-q",
            "--config",
            &arg(&d.join(format!("{method}.toml"))),
        ]);
        let s = summary(&d.join(&out));
        let acc = s["final_val_accuracy"].as_f64().unwrap();
        assert!(acc >= 0.9, "{method}: dev accuracy {acc}");
        match method {
            "lora" => {
                let labels: Value = serde_json::from_str(
                    &std::fs::read_to_string(d.join(&out).join("adapter/labels.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(labels["id2label"]["2"], "positive");
                let cfg: Value = serde_json::from_str(
                    &std::fs::read_to_string(d.join(&out).join("adapter/adapter_config.json"))
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(cfg["task_type"], "SEQ_CLS");
                // `classify` with the adapter (its classifier in modules_to_save) scores the
                // dev set as the run's last evaluation did.
                let v = support::json(&succeeds(&[
                    "classify",
                    "-q",
                    "--model",
                    &arg(&base),
                    "--adapter",
                    &arg(&d.join(&out).join("adapter")),
                    "--data",
                    &arg(&d.join("dev.tsv")),
                    "--text",
                    "{sentence}",
                    "--label-field",
                    "label",
                    "--json",
                ]));
                assert_eq!(v["n"], 100);
                assert!(
                    (v["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9,
                    "classify {} vs the run's {acc}",
                    v["accuracy"]
                );
            }
            _ => {
                let cfg: Value = serde_json::from_str(
                    &std::fs::read_to_string(d.join(&out).join("model/config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
                assert_eq!(cfg["id2label"]["0"], "negative");
            }
        }
    }
}

#[test]
fn masked_lm_continued_pretraining_lowers_the_loss() {
    let d = tmp("bert-mlm");
    let mut rng = StdRng::seed_from_u64(5);
    let words = ["the", "film", "was", "good", "and", "it", "is", "bad"];
    let mut text = String::new();
    for _ in 0..300 {
        let n = rng.random_range(6..=16);
        let ws: Vec<&str> = (0..n)
            .map(|_| words[rng.random_range(0..words.len())])
            .collect();
        text.push_str(&serde_json::json!({ "text": ws.join(" ") }).to_string());
        text.push('\n');
    }
    write(&d, "text.jsonl", &text);
    let base = repo().join("tests/fixtures/bert/tiny-bert");
    write(
        &d,
        "mlm.toml",
        &format!(
            r#"model = "{}"
method = "full"
objective = "mlm"
output_dir = "out"
[data]
train = "text.jsonl"
text = "{{text}}"
split = [0.9, 0.1]
[train]
batch_size = 8
max_seq_len = 32
max_steps = 80
lr = 5e-3
eval_batches = 0
"#,
            base.display().to_string().replace('\\', "/")
        ),
    );
    succeeds(&["train", "-q", "--config", &arg(&d.join("mlm.toml"))]);
    let s = summary(&d.join("out"));
    let (v0, v1) = (
        s["initial_val_loss"].as_f64().unwrap(),
        s["final_val_loss"].as_f64().unwrap(),
    );
    assert!(v1 < 0.6 * v0, "mlm val loss {v0} -> {v1}");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/model/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "BertForMaskedLM");
}

#[test]
fn a_bare_encoder_without_a_task_is_a_one_line_error() {
    let d = tmp("bert-notask");
    write(&d, "train.tsv", &cls_rows(10, 1));
    let base = repo().join("tests/fixtures/bert/tiny-bert");
    write(
        &d,
        "run.toml",
        &format!(
            r#"model = "{}"
output_dir = "out"
[data]
train = "train.tsv"
template = "{{sentence}}"
label_field = "label"
"#,
            base.display().to_string().replace('\\', "/")
        ),
    );
    let e = fails(&["train", "--dry-run", "--config", &arg(&d.join("run.toml"))]);
    assert!(e.contains("run.toml") && e.contains("task"), "{e}");
}

#[test]
fn a_full_fine_tuning_run_resumes_bit_exact() {
    let d = tmp("bert-full-resume");
    write(&d, "train.tsv", &cls_rows(64, 3));
    write(&d, "dev.tsv", &cls_rows(16, 4));
    // The tiny BERT with dropout on, so the resumed run must also replay the model's masks.
    let src = repo().join("tests/fixtures/bert/tiny-bert");
    let base = d.join("bert");
    std::fs::create_dir_all(&base).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), base.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["hidden_dropout_prob"] = 0.1.into();
    cfg["attention_probs_dropout_prob"] = 0.1.into();
    write(&base, "config.json", &cfg.to_string());
    for out in ["out-a", "out-b"] {
        write(
            &d,
            &format!("{out}.toml"),
            &format!(
                r#"model = "{}"
method = "full"
task = "sequence_classification"
output_dir = "{out}"
[data]
train = "train.tsv"
validation = "dev.tsv"
template = "{{sentence}}"
label_field = "label"
labels = ["negative", "neutral", "positive"]
[train]
batch_size = 8
max_steps = 12
lr = 1e-3
save_every = 4
"#,
                base.display().to_string().replace('\\', "/")
            ),
        );
    }
    succeeds(&["train", "-q", "--config", &arg(&d.join("out-a.toml"))]);
    let cfg_b = arg(&d.join("out-b.toml"));
    succeeds(&[
        "train",
        "-q",
        "--config",
        &cfg_b,
        "--set",
        "train.stop_after=6",
    ]);
    assert!(
        !d.join("out-b/model").exists(),
        "a stopped run has no final model"
    );
    succeeds(&["train", "-q", "--config", &cfg_b, "--resume"]);
    let a = std::fs::read(d.join("out-a/model/model.safetensors")).unwrap();
    let b = std::fs::read(d.join("out-b/model/model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed run's model differs from the uninterrupted one's"
    );
    // A finished run is not trained again.
    let out = succeeds(&["train", "--config", &cfg_b, "--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already finished") && err.contains("its model is"),
        "{err}"
    );
}
