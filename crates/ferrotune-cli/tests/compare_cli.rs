//! `ferrotune compare`, `train` with `method = "adapter"` and `peft combine` through the real
//! binary, on the tiny LLaMA with a word-level tokenizer (tests/support):
//! - compare trains each method in its own process, keeps going past a method that fails
//!   (its row says why), scores generations with ROUGE and writes compare.md / .json / .png;
//!   run again, it keeps the finished runs;
//! - bottleneck adapters train (validation loss falls) and their folder works with --adapter;
//! - `peft combine` writes PEFT's add_weighted_adapter result.
use crate::support;

use serde_json::Value;
use std::path::Path;
use support::{arg, fails, ferrotune, json, repo, succeeds, tiny_model, tmp};

/// `n` rows {"q": "rev a b c", "a": "c b a"} of 1 to 4 words, seeded.
fn reverse_rows(n: usize, seed: u64) -> String {
    support::reverse_rows(&support::WORDS[7..], 4, n, seed)
}

/// A run folder with the tiny model, data and `base.toml` (extra TOML appended).
fn setup(tag: &str, extra: &str) -> std::path::PathBuf {
    let dir = tmp(tag);
    tiny_model(&dir, true);
    std::fs::write(dir.join("train.jsonl"), reverse_rows(16, 1)).unwrap();
    std::fs::write(dir.join("dev.jsonl"), reverse_rows(6, 2)).unwrap();
    std::fs::write(
        dir.join("base.toml"),
        format!(
            r#"model = "model"
output_dir = "out"

[data]
train = "train.jsonl"
validation = "dev.jsonl"
template = "{{q}} ="
completion = " {{a}}"

[lora]
r = 4
targets = "all-linear"

[adapter]
adapter_type = "houlsby"
reduction_factor = 8

[train]
batch_size = 4
max_seq_len = 32
max_steps = 12
lr = 1e-2
log_every = 1000
{extra}
"#
        ),
    )
    .unwrap();
    dir
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn compare_runs_each_method_reports_failures_in_their_row_and_resumes() {
    let dir = setup("compare", "");
    let out = dir.join("cmp");
    let run = || {
        succeeds(&[
            "compare",
            "--config",
            &arg(&dir.join("base.toml")),
            "--methods",
            "base,lora,adapter,selective",
            "--lora-ranks",
            "2",
            "--out",
            &arg(&out),
            "--eval-limit",
            "4",
            "--max-new-tokens",
            "6",
        ])
    };
    let r = run();
    let table = String::from_utf8_lossy(&r.stdout).to_string();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "lora", "adapter", "selective", "lora r=2"]);
    let row = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap();
    // `selective` without a [selective] section fails; the others carry on.
    assert_eq!(row("selective")["status"], "failed");
    assert!(
        row("selective")["error"]
            .as_str()
            .unwrap()
            .contains("selective"),
        "{}",
        row("selective")
    );
    for n in ["base", "lora", "adapter", "lora r=2"] {
        assert_eq!(row(n)["status"], "ok", "{n}: {}", row(n));
        assert!(row(n)["rouge1"].is_number(), "{n}: {}", row(n));
        assert_eq!(row(n)["scored_rows"], 4, "{n}");
    }
    for n in ["lora", "adapter", "lora r=2"] {
        let r = row(n);
        assert!(r["trainable_params"].as_u64().unwrap() > 0, "{r}");
        assert!(r["adapter_bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
        assert!(r["s_per_step"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["final_val_loss"].is_number(), "{r}");
    }
    // The rank sweep: rank 2 trains fewer parameters than rank 4.
    assert!(
        row("lora r=2")["trainable_params"].as_u64() < row("lora")["trainable_params"].as_u64()
    );
    // Each run is an ordinary training run in runs/<name>, with its own method.
    assert_eq!(summary(&out.join("runs/adapter"))["method"], "adapter");
    assert_eq!(summary(&out.join("runs/lora-r2"))["method"], "lora");
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert_eq!(md, table, "stdout is compare.md");
    assert!(md.contains("| adapter |") && md.contains("ROUGE-1"), "{md}");
    let png = std::fs::read(out.join("compare.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Again: the finished runs are kept, not trained again.
    let before = std::fs::metadata(out.join("runs/lora/summary.json"))
        .unwrap()
        .modified()
        .unwrap();
    let r = run();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("lora: finished earlier, kept"), "{stderr}");
    let after = std::fs::metadata(out.join("runs/lora/summary.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);

    // With a setting changed, a kept run would report the old settings: lora is trained again
    // (and only the runs the change reaches are: here every one, through --set).
    let r = succeeds(&[
        "compare",
        "--config",
        &arg(&dir.join("base.toml")),
        "--methods",
        "lora",
        "--out",
        &arg(&out),
        "--eval-limit",
        "4",
        "--max-new-tokens",
        "6",
        "--set",
        "lora.r=2",
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("lora: training (its settings changed"),
        "{stderr}"
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(
        report["rows"][0]["trainable_params"],
        row("lora r=2")["trainable_params"],
        "the rerun has r = 2"
    );

    // A run's method is its name; every run failing is a failed comparison.
    let base = arg(&dir.join("base.toml"));
    let e = fails(&[
        "compare",
        "--config",
        &base,
        "--methods",
        "lora",
        "--method-set",
        "lora:method=\"full\"",
        "--out",
        &arg(&dir.join("cmp2")),
    ]);
    assert!(
        e.contains("--method-set") && !e.trim().contains('\n'),
        "{e}"
    );
    // Settings for the base run (which does not train) are refused.
    let e = fails(&[
        "compare",
        "--config",
        &base,
        "--methods",
        "base,lora",
        "--method-set",
        "base:train.lr=1e-3",
        "--out",
        &arg(&dir.join("cmp7")),
    ]);
    assert!(e.contains("the base run does not train"), "{e}");
    // (the failed run's own error is on stderr before the comparison's last line)
    let out3 = ferrotune(&[
        "compare",
        "--config",
        &base,
        "--methods",
        "selective",
        "--out",
        &arg(&dir.join("cmp3")),
        "--eval-limit",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out3.stderr);
    assert_eq!(out3.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(
        last.starts_with("error: compare: every run failed"),
        "{stderr}"
    );
    let e = fails(&[
        "compare",
        "--config",
        &base,
        "--methods",
        "base",
        "--out",
        &arg(&dir.join("cmp4")),
        "--max-new-tokens",
        "0",
    ]);
    assert!(e.contains("--max-new-tokens"), "{e}");
    // --out must be compare's own folder; --eval-data is read before anything trains.
    let e = fails(&[
        "compare",
        "--config",
        &base,
        "--methods",
        "base",
        "--out",
        &arg(&dir.join("model")),
    ]);
    assert!(
        e.contains("--out") && e.contains("no comparison wrote"),
        "{e}"
    );
    let e = fails(&[
        "compare",
        "--config",
        &base,
        "--methods",
        "lora",
        "--out",
        &arg(&dir.join("cmp5")),
        "--eval-data",
        &arg(&dir.join("nope.jsonl")),
    ]);
    assert!(e.contains("--eval-data") && e.contains("nope.jsonl"), "{e}");
    assert!(!dir.join("cmp5/runs/lora").exists(), "nothing trained");
    // so are a device as --eval-data, a budget past any context and a broken completion
    for (flag, value, want) in [
        ("--eval-data", "/dev/zero", "device"),
        ("--max-new-tokens", "999999999999", "expected at most"),
        ("--eval-completion", "{{ x", "--eval-completion"),
    ] {
        let e = fails(&[
            "compare",
            "--config",
            &base,
            "--methods",
            "lora",
            "--out",
            &arg(&dir.join("cmp6")),
            flag,
            value,
        ]);
        assert!(e.contains(flag) && e.contains(want), "{flag}: {e}");
        assert!(
            !dir.join("cmp6/runs/lora").exists(),
            "{flag}: nothing trained"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bottleneck_adapters_train_and_load_back() {
    let dir = setup("adapter-train", "eval_every = 40");
    let cfg = arg(&dir.join("base.toml"));
    succeeds(&[
        "train",
        "--config",
        &cfg,
        "--set",
        "method=\"adapter\"",
        "--set",
        "train.max_steps=40",
    ]);
    let out = dir.join("out");
    let s = summary(&out);
    assert_eq!(s["method"], "adapter");
    let (first, last) = (
        s["initial_val_loss"].as_f64().unwrap(),
        s["final_val_loss"].as_f64().unwrap(),
    );
    assert!(last < 0.8 * first, "validation loss {first} -> {last}");
    let cfg_json: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg_json["peft_type"], "BOTTLENECK");
    assert_eq!(cfg_json["adapter_type"], "houlsby");
    // The adapter scores the validation rows as training last saw them.
    let ppl = |extra: &[&str]| {
        let mut a = vec![
            "perplexity",
            "--model",
            &dir.join("model").display().to_string(),
            "--data",
            &dir.join("dev.jsonl").display().to_string(),
            "--template",
            "{q} =",
            "--completion",
            " {a}",
            "--json",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.extend(extra.iter().map(|s| s.to_string()));
        json(&succeeds(&a))["nll"].as_f64().unwrap()
    };
    let base = ppl(&[]);
    let adapter = arg(&out.join("adapter"));
    let tuned = ppl(&["--adapter", &adapter]);
    assert!(tuned < 0.8 * base, "{tuned} vs base {base}");
    // A bottleneck adapter cannot be folded into the weights: one line saying so.
    let e = support::fails(&[
        "merge",
        "--model",
        &arg(&dir.join("model")),
        "--adapter",
        &arg(&out.join("adapter")),
        "--out",
        &arg(&dir.join("merged")),
    ]);
    assert!(e.contains("cannot be merged"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn peft_combine_writes_peft_linear_combination() {
    let dir = tmp("combine");
    let model = repo().join("tests/fixtures/models/tiny-llama-gqa-untied");
    let fx = repo().join("tests/fixtures/peft/combine");
    // The tiny fixture has no tokenizer; give it the word-level one.
    let m = tiny_model(&dir, true);
    assert!(model.exists());
    let out = dir.join("combined");
    succeeds(&[
        "peft",
        "combine",
        "--model",
        &arg(&m),
        "--adapter",
        &format!("{}:0.7", arg(&fx.join("a"))),
        "--adapter",
        &format!("{}:-0.4", arg(&fx.join("b"))),
        "--how",
        "linear",
        "--out",
        &arg(&out),
    ]);
    let ours = safetensors_f32(&out.join("adapter_model.safetensors"));
    let peft = safetensors_f32(&fx.join("linear/adapter_model.safetensors"));
    assert_eq!(
        ours.keys().collect::<std::collections::BTreeSet<_>>(),
        peft.keys().collect()
    );
    for (k, v) in &peft {
        let d = ours[k]
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{k}: {d}");
    }
    let e = support::fails(&[
        "peft",
        "combine",
        "--model",
        &arg(&m),
        "--adapter",
        &arg(&fx.join("a")),
        "--out",
        &arg(&dir.join("x")),
    ]);
    assert!(e.contains("DIR:WEIGHT"), "{e}");
    // `peft combine` with two adapters (or one) and `extra` flags: its one error line
    let combine_fails = |adapters: &[&str], extra: &[&str]| {
        let mut args = vec![
            "peft".to_string(),
            "combine".into(),
            "--model".into(),
            arg(&m),
        ];
        for a in adapters {
            args.extend(["--adapter".into(), format!("{}:1", arg(&fx.join(a)))]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--out".into(), arg(&dir.join("x"))]);
        support::fails(&args)
    };
    // --svd-rank belongs to --how svd (PEFT ignores it otherwise; a user who gives it meant svd).
    let e = combine_fails(&["a", "b"], &["--how", "cat", "--svd-rank", "4"]);
    assert!(e.contains("--svd-rank") && e.contains("svd"), "{e}");
    // a rank of 0 is named as the flag's value, before any adapter is read
    let e = combine_fails(&["a"], &["--how", "svd", "--svd-rank", "0"]);
    assert!(e.contains("--svd-rank 0: expected 1 to"), "{e}");
    assert!(!dir.join("x").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every tensor of a safetensors file as f32 values.
fn safetensors_f32(p: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, vals)
        })
        .collect()
}
