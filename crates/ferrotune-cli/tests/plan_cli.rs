//! `ferrotune plan`: the JSON line's fields and how they relate, the model's count read from
//! its config against the loaded model's, the human table, and bad flags as one-line errors.
use crate::support;

use serde_json::Value;
use support::{arg, fails, json, succeeds, tiny_model, tmp};

fn plan_json(extra: &[&str]) -> Value {
    let mut args = vec!["plan", "--json"];
    args.extend_from_slice(extra);
    let out = succeeds(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim_end().lines().count(), 1, "one JSON line: {text}");
    json(&out)
}

fn u(v: &Value, k: &str) -> u64 {
    v["per_device"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("per_device.{k} is not an integer: {v}"))
}

#[test]
fn plan_json_parts_sum_and_sharding_and_qlora_order_them() {
    let mut last = u64::MAX;
    for strategy in ["ddp", "zero1", "zero2", "zero3"] {
        let v = plan_json(&[
            "--params",
            "7B",
            "--batch",
            "2",
            "--seq-len",
            "2048",
            "--gpus",
            "8",
            "--gpu",
            "h100",
            "--strategy",
            strategy,
            "--tokens",
            "1.4e12",
        ]);
        let parts = [
            "weights",
            "gradients",
            "optimizer",
            "activations",
            "buffers",
        ];
        let sum: u64 = parts.iter().map(|k| u(&v, k)).sum();
        assert_eq!(u(&v, "total"), sum, "{strategy}: {v}");
        assert!(
            u(&v, "total") < last,
            "{strategy} is not below the one before"
        );
        last = u(&v, "total");
        assert_eq!(
            v["fits"].as_bool(),
            Some(u(&v, "total") <= v["gpu_memory_bytes"].as_u64().unwrap())
        );
        let flops = v["flops"].as_f64().unwrap();
        assert!(
            (v["petaflop_s_days"].as_f64().unwrap() - flops / 8.64e19).abs()
                <= 1e-9 * flops / 8.64e19
        );
        assert_eq!(v["chinchilla_tokens"].as_f64(), Some(20.0 * 7e9));
        assert_eq!(v["params"].as_u64(), Some(7_000_000_000));
        // 6·N·D is the rule; the detailed count is within a few percent of it for full training.
        let rule = v["rules_of_thumb"]["flops_6nd"].as_f64().unwrap();
        assert_eq!(rule, 6.0 * 7e9 * 1.4e12);
        assert!((flops / rule - 1.0).abs() < 0.1, "{flops} vs {rule}");
    }
    let weights = |method: &str| {
        let v = plan_json(&["--params", "7B", "--method", method]);
        assert!(
            v["trainable_params"].as_u64().unwrap() < 10_000_000,
            "{method}: {v}"
        );
        u(&v, "weights")
    };
    assert!(weights("qlora") < weights("lora"));
}

#[test]
fn plan_reads_the_exact_count_from_the_config_and_prints_the_table() {
    let d = tmp("plan-model");
    let model = tiny_model(&d, true);
    let m = arg(&model);
    let v = plan_json(&["--model", &m, "--method", "lora", "--gpu", "l4"]);
    let loaded = json(&succeeds(&["inspect", "--model", &m, "--json"]));
    assert_eq!(v["params"], loaded["parameters"], "{v}");
    assert!(v["fits"].as_bool().unwrap());
    let out = succeeds(&["plan", "--model", &m, "--gpus", "2", "--strategy", "zero2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "memory per device",
        "weights",
        "optimizer",
        "activations",
        "total",
        "6·N·D",
        "ZeRO-2",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // A FLOP budget alone: the compute-optimal N and D, with N·D·6 = C.
    let v = plan_json(&["--flops-budget", "1e21"]);
    let (n, dd) = (
        v["compute_optimal"]["n"].as_f64().unwrap(),
        v["compute_optimal"]["d"].as_f64().unwrap(),
    );
    assert!((6.0 * n * dd / 1e21 - 1.0).abs() < 1e-9, "{v}");
}

#[test]
fn plan_bad_flags_are_one_line_errors_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--params", "7B", "--gpu", "v100"], "--gpu"),
        (&["--params", "7B", "--strategy", "zero9"], "--strategy"),
        (&["--params", "7B", "--method", "magic"], "--method"),
        (&["--params", "7B", "--dtype", "fp64"], "--dtype"),
        (&["--params", "7B", "--batch", "0"], "--batch"),
        (&["--params", "7B", "--batch", "-1"], "--batch"),
        (&["--params", "-7B"], "--params"),
        (&["--params", "1e40"], "--params"),
        (&["--params", "7B", "--tokens", "lots"], "--tokens"),
        (&["--params", "7B", "--mfu", "2"], "--mfu"),
        (&["--params", "7B", "--gpus", "0"], "--gpus"),
        (
            &["--params", "7B", "--method", "lora", "--targets", "nope"],
            "--targets",
        ),
        (&["--batch", "4"], "--params"),
        (&["--flops-budget", "1e-300"], "--flops-budget"),
        (&["--flops-budget", "1e9"], "--flops-budget"),
        (&["--model", "no-such-model-folder"], "no-such-model-folder"),
    ];
    for (extra, flag) in cases {
        let mut args = vec!["plan"];
        args.extend_from_slice(extra);
        let e = fails(&args);
        assert!(e.contains(flag), "{extra:?}: {e}");
    }
}
