//! The model interface seen from the command line, on the tiny LLaMA test model: `inspect` names
//! the family, the architecture kind and the pre-training objective; `perplexity --data`
//! scores completions given prompts; the train config's `task` and `objective` are checked
//! against the model with one-line errors naming the key.
use crate::support;
use support::*;

fn data_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("qa.jsonl");
    std::fs::write(
        &p,
        "{\"q\": \"cat dog\", \"a\": \"sun moon tree\"}\n{\"q\": \"red\", \"a\": \"blue\"}\n",
    )
    .unwrap();
    p
}

#[test]
fn inspect_names_family_kind_and_pretraining_objective() {
    let d = tmp("iface-inspect");
    let m = arg(&tiny_model(&d, true));
    let v = json(&succeeds(&["inspect", "--model", &m, "--json"]));
    assert_eq!(v["family"], "llama");
    assert_eq!(v["kind"], "decoder");
    assert_eq!(v["pretraining_objective"], "clm");
    assert_eq!(v["task_type"], "CAUSAL_LM");
    assert_eq!(v["architecture"], "LlamaForCausalLM");
    let text = String::from_utf8(succeeds(&["inspect", "--model", &m]).stdout).unwrap();
    for line in [
        "architecture     LlamaForCausalLM (decoder)",
        "family           llama",
        "kind             decoder",
        "pre-training     clm",
        "task type        CAUSAL_LM",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
}

#[test]
fn perplexity_of_completions_given_prompts() {
    let d = tmp("iface-ppl");
    let m = arg(&tiny_model(&d, true));
    let data = arg(&data_file(&d));
    let args = [
        "perplexity",
        "--model",
        &m,
        "--data",
        &data,
        "--template",
        "{q} =",
        "--completion",
        " {a}",
    ];
    let v = json(&succeeds(&[&args[..], &["--json"]].concat()));
    // "sun moon tree" + EOS and "blue" + EOS
    assert_eq!(v["tokens"], 6);
    let nll = v["nll"].as_f64().unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(nll.is_finite() && nll > 0.0, "{v}");
    assert!((ppl - nll.exp()).abs() < 1e-9 * ppl, "{v}");
    // The mean over all scored tokens: each row scored alone adds up to the whole.
    let mut total = 0.0;
    for (i, row) in std::fs::read_to_string(&data).unwrap().lines().enumerate() {
        let one = d.join(format!("row{i}.jsonl"));
        std::fs::write(&one, format!("{row}\n")).unwrap();
        let one = arg(&one);
        let mut a = args.to_vec();
        a[4] = &one;
        let r = json(&succeeds(&[&a[..], &["--json"]].concat()));
        total += r["nll"].as_f64().unwrap() * r["tokens"].as_f64().unwrap();
    }
    assert!(
        (total - 6.0 * nll).abs() < 1e-6 * total,
        "{total} vs 6 x {nll}"
    );
    let text = String::from_utf8(succeeds(&args).stdout).unwrap();
    assert!(text.starts_with("tokens 6  nll "), "{text}");

    // The completion template is required with --data; --data and --file exclude each other.
    let e = fails(&[
        "perplexity",
        "--model",
        &m,
        "--data",
        &data,
        "--template",
        "{q}",
    ]);
    assert!(e.contains("--completion"), "{e}");
    let e = fails(&[&args[..], &["--file", &data]].concat());
    assert!(e.contains("--file") || e.contains("--data"), "{e}");
    // A row without the field: the file, the line and the field.
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"q\": \"cat\", \"a\": \"dog\"}\n{\"q\": \"cat\"}\n",
    )
    .unwrap();
    let bad = arg(&d.join("bad.jsonl"));
    let e = fails(&[
        "perplexity",
        "--model",
        &m,
        "--data",
        &bad,
        "--template",
        "{q} =",
        "--completion",
        " {a}",
    ]);
    assert!(
        e.contains("bad.jsonl") && e.contains("line 2") && e.contains("a"),
        "{e}"
    );
}

/// `task` and `objective` in a train config: parsed, then checked against the model; each bad
/// value is one line naming the key.
#[test]
fn train_task_and_objective_must_fit_the_model() {
    let d = tmp("iface-train");
    tiny_model(&d, true);
    data_file(&d);
    let config = |extra: &str| {
        let p = d.join("run.toml");
        std::fs::write(
            &p,
            format!(
                "model = \"model\"\noutput_dir = \"out\"\n{extra}\n[data]\ntrain = \"qa.jsonl\"\ntemplate = \"{{q}} =\"\ncompletion = \" {{a}}\"\n\n[train]\nmax_steps = 1\nbatch_size = 1\n"
            ),
        )
        .unwrap();
        arg(&p)
    };
    // The model's own task and the default objective: a dry run is fine.
    let c = config("task = \"causal_lm\"\nobjective = \"sft\"");
    succeeds(&["train", "--config", &c, "--dry-run"]);
    let c = config("");
    succeeds(&["train", "--config", &c, "--dry-run"]);

    let c = config("task = \"seq2seq_lm\"");
    let e = fails(&["train", "--config", &c, "--dry-run"]);
    assert!(
        e.contains("run.toml")
            && e.contains("`task`")
            && e.contains("`seq2seq_lm`")
            && e.contains("causal_lm"),
        "{e}"
    );
    let c = config("task = \"summarize\"");
    let e = fails(&["train", "--config", &c, "--dry-run"]);
    assert!(e.contains("task") && e.contains("summarize"), "{e}");
    let c = config("objective = \"mlm\"");
    let e = fails(&["train", "--config", &c, "--dry-run"]);
    assert!(e.contains("`objective`") && e.contains("encoder"), "{e}");
    // `clm` fits a decoder, but reads raw text: the template is the config's error.
    let c = config("objective = \"clm\"");
    let e = fails(&["train", "--config", &c, "--dry-run"]);
    assert!(
        e.contains("run.toml") && e.contains("`data.template`") && e.contains("raw text"),
        "{e}"
    );
    // --set reaches them too
    let c = config("");
    let e = fails(&[
        "train",
        "--config",
        &c,
        "--dry-run",
        "--set",
        "task=token_classification",
    ]);
    assert!(
        e.contains("task") && e.contains("token_classification"),
        "{e}"
    );
    assert!(!d.join("out").exists(), "nothing was written");
}
