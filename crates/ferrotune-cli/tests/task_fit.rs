//! Issue 10's bad inputs, each one clear line: a train config whose `task` the model cannot do
//! at all, a classification label outside `[data] labels`, and an encoder asked to generate.
use crate::support;

use std::path::{Path, PathBuf};
use support::{arg, fails, repo, smollm2, tmp};

fn minilm() -> PathBuf {
    let d = repo().join(".cache/models/all-minilm-l6-v2");
    assert!(
        d.join("model.safetensors").is_file(),
        "{} is missing: run ./scripts/fetch-models.sh",
        d.display()
    );
    d
}

fn tiny_bert() -> PathBuf {
    repo().join("tests/fixtures/bert/tiny-bert")
}

/// `dir/train.toml` for `model` with `body` (the task and `[data]`) and a one-step `[train]`,
/// beside a small TSV `d.tsv` whose third line has the label `neutral`.
fn config(dir: &Path, model: &Path, body: &str) -> PathBuf {
    std::fs::write(
        dir.join("d.tsv"),
        "sentence\tlabel\na good film\tpositive\nnot sure\tneutral\nbad\tnegative\n",
    )
    .unwrap();
    let p = dir.join("train.toml");
    std::fs::write(
        &p,
        format!(
            "model = {:?}\nmethod = \"lora\"\noutput_dir = {:?}\n{body}\n[train]\nmax_steps = 1\nbatch_size = 2\n",
            arg(model),
            arg(&dir.join("run"))
        ),
    )
    .unwrap();
    p
}

fn dry_run(config: &Path) -> String {
    fails(&["train", "--config", &arg(config), "--dry-run"])
}

/// (a) A decoder asked for sequence classification: the config file, the key and the task.
#[test]
fn a_task_a_decoder_cannot_do_names_the_config_and_key() {
    let dir = tmp("task-fit-decoder");
    let cfg = config(
        &dir,
        &smollm2(),
        "task = \"sequence_classification\"\n[data]\ntrain = \"d.tsv\"\ntemplate = \"{sentence}\"\nlabel_field = \"label\"\nlabels = [\"negative\", \"neutral\", \"positive\"]\n",
    );
    let e = dry_run(&cfg);
    assert!(
        e.contains(&format!("{}: line 4: key `task`", cfg.display()))
            && e.contains("sequence_classification")
            && e.contains("decoder"),
        "{e}"
    );
}

/// (a) An encoder asked for seq2seq LM.
#[test]
fn a_task_an_encoder_cannot_do_names_the_config_and_key() {
    let dir = tmp("task-fit-encoder");
    let cfg = config(
        &dir,
        &tiny_bert(),
        "task = \"seq2seq_lm\"\n[data]\ntrain = \"d.tsv\"\ntemplate = \"{sentence}\"\ncompletion = \" {label}\"\n",
    );
    let e = dry_run(&cfg);
    assert!(
        e.contains(&format!("{}: line 4: key `task`", cfg.display()))
            && e.contains("seq2seq_lm")
            && e.contains("encoder"),
        "{e}"
    );
}

/// (b) A label outside `[data] labels`: the data file, its line and the field.
#[test]
fn b_a_label_outside_the_list_names_file_line_and_field() {
    let dir = tmp("task-fit-labels");
    let cfg = config(
        &dir,
        &tiny_bert(),
        "task = \"sequence_classification\"\n[data]\ntrain = \"d.tsv\"\ntemplate = \"{sentence}\"\nlabel_field = \"label\"\nlabels = [\"negative\", \"positive\"]\n",
    );
    let e = dry_run(&cfg);
    assert!(
        e.ends_with(&format!(
            "{}: line 3: field `label`: label \"neutral\" is not one of the labels (negative, positive)",
            dir.join("d.tsv").display()
        )),
        "{e}"
    );
}

/// (c) An encoder asked to generate.
#[test]
fn c_an_encoder_cannot_generate() {
    for model in [minilm(), tiny_bert()] {
        let e = fails(&["generate", "--model", &arg(&model), "--prompt", "hi"]);
        assert!(
            e.contains("(BertModel, encoder) is an encoder: it cannot generate text")
                || e.contains("(BertForMaskedLM, encoder) is an encoder: it cannot generate text"),
            "{e}"
        );
    }
}
