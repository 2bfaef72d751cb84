//! Flags out of range and misleading messages: every case is one `error:` line that names the
//! flag (or the file), exit code 1, no panic and no hang; a valid but odd value is a warning.
use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{arg, check_error, fails, json, succeeds, tiny_model, tmp};

/// A tiny model folder and a small text file to score.
fn setup(tag: &str) -> (PathBuf, PathBuf) {
    let d = tmp(&format!("flags-{tag}"));
    let model = tiny_model(&d, true);
    let text = d.join("text.txt");
    std::fs::write(
        &text,
        "red green blue cat dog sun moon tree rock fish ".repeat(30),
    )
    .unwrap();
    (model, text)
}

fn generate_with(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["generate", "--model", &arg(model), "--prompt", "red cat"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn sampling_flags_out_of_range_name_the_flag() {
    let (model, _) = setup("sampling");
    let cases: &[(&[&str], &str)] = &[
        (&["--temperature", "NaN"], "--temperature"),
        (&["--temperature", "-1"], "--temperature"),
        (&["--temperature", "inf"], "--temperature"),
        (&["--top-p", "NaN"], "--top-p"),
        (&["--top-p", "0"], "--top-p"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--top-p", "-0.2"], "--top-p"),
        (&["--top-k", "0"], "--top-k"),
        (&["--repetition-penalty", "NaN"], "--repetition-penalty"),
        (&["--repetition-penalty", "0"], "--repetition-penalty"),
        (&["--repetition-penalty", "-1.5"], "--repetition-penalty"),
        (&["--max-new-tokens", "100000000000"], "--max-new-tokens"),
        (&["--threads", "0"], "--threads"),
        (&["--threads", "1000000"], "--threads"),
        (&["--stop", ""], "--stop"),
        (&["--activation-bits", "4"], "--activation-bits"),
        (&["--activation-bits", "-8"], "--activation-bits"),
        (&["--kv-cache", "f8"], "--kv-cache"),
        (&["--kv-cache", "F16 "], "--kv-cache"),
    ];
    for (extra, flag) in cases {
        let e = fails(&generate_with(&model, extra));
        assert!(e.contains(flag), "{extra:?}: {e}");
    }
}

/// `--activation-bits` and `--kv-cache` change the arithmetic of a quantized model's decode
/// (greedy text stays well formed); `--activation-bits` on a model without quantized weights
/// says it has no effect.
#[test]
fn decode_precision_flags_apply_or_warn() {
    let (model, _) = setup("precision");
    let run = |extra: &[&str]| -> (serde_json::Value, String) {
        let mut args = generate_with(&model, extra);
        args.extend(["--max-new-tokens", "4", "--json"].map(String::from));
        let out = succeeds(&args);
        (json(&out), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (dense, warn) = run(&["--activation-bits", "8"]);
    assert!(warn.contains("--activation-bits has no effect"), "{warn}");
    assert!(dense["generated_tokens"].as_u64().unwrap() <= 4, "{dense}");
    for extra in [
        &["--requantize", "q4_1", "--activation-bits", "8"][..],
        &[
            "--requantize",
            "q4_1",
            "--activation-bits",
            "16",
            "--kv-cache",
            "f16",
        ],
        &["--kv-cache", "f32"],
    ] {
        let (v, warn) = run(extra);
        assert!(!warn.contains("no effect"), "{extra:?}: {warn}");
        assert!(
            v["generated_tokens"].as_u64().unwrap() <= 4,
            "{extra:?}: {v}"
        );
    }
}

/// A command that never decodes says which of the compute flags it ignores, and still runs:
/// `perplexity` scores in one forward pass (no KV cache), `inspect` computes nothing.
#[test]
fn compute_flags_a_command_does_not_use_are_named() {
    let (model, text) = setup("unused");
    let m = arg(&model);
    let both = ["--kv-cache", "f16", "--activation-bits", "8"];
    let mut ppl = vec!["perplexity", "--model", &m, "--file"];
    let t = arg(&text);
    ppl.push(&t);
    ppl.extend(["--requantize", "q4_1", "--json"]);
    ppl.extend(both);
    let out = succeeds(&ppl.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kv-cache has no effect on `perplexity`"),
        "{err}"
    );
    assert!(!err.contains("--activation-bits has no effect"), "{err}");
    assert!(json(&out)["perplexity"].as_f64().unwrap().is_finite());

    let mut insp = vec!["inspect", "--model", &m];
    insp.extend(both);
    let out = succeeds(&insp.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    for flag in ["--kv-cache", "--activation-bits"] {
        assert!(
            err.contains(&format!("{flag} has no effect on `inspect`")),
            "{flag}: {err}"
        );
    }
}

#[test]
fn valid_edge_values_are_accepted() {
    let (model, _) = setup("edges");
    for extra in [
        &["--temperature", "0"][..],
        &["--temperature", "1e-30", "--top-p", "1"],
        &["--top-k", "1", "--temperature", "0.8"],
        &["--repetition-penalty", "1.2"],
    ] {
        let mut args = generate_with(&model, extra);
        args.extend(["--max-new-tokens", "3", "--json"].map(String::from));
        let v = json(&succeeds(&args));
        assert!(v["generated_tokens"].as_u64().unwrap() <= 3, "{v}");
    }
}

#[test]
fn max_new_tokens_past_the_context_is_a_warning() {
    let (model, _) = setup("budget");
    let mut args = generate_with(
        &model,
        &["--max-new-tokens", "1000", "--ignore-eos", "--json"],
    );
    args.push("--quiet".into());
    let out = succeeds(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("warning: --max-new-tokens 1000") && stderr.contains("256"),
        "{stderr}"
    );
    assert_eq!(json(&out)["stop_reason"], "context_length");
}

/// Run and wait at most `secs`: a command that hangs is killed and the test fails.
fn fails_within(args: &[String], secs: u64) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check_error(&format!("{args:?}"), &child.wait_with_output().unwrap())
}

fn perplexity_args(model: &Path, file: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "perplexity".into(),
        "--model".into(),
        arg(model),
        "--file".into(),
        arg(file),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn perplexity_stride_zero_and_window_under_two_are_errors() {
    let (model, text) = setup("ppl");
    let e = fails_within(&perplexity_args(&model, &text, &["--stride", "0"]), 60);
    assert!(e.contains("--stride") && e.contains("got 0"), "{e}");
    for w in ["0", "1"] {
        let e = fails_within(&perplexity_args(&model, &text, &["--window", w]), 60);
        assert!(
            e.contains("--window") && e.contains(&format!("got {w}")),
            "{e}"
        );
    }
}

#[test]
fn perplexity_window_longer_than_the_context_is_clamped_with_a_warning() {
    let (model, text) = setup("ppl-window");
    let at_context = json(&succeeds(&perplexity_args(
        &model,
        &text,
        &["--window", "256", "--stride", "128", "--json"],
    )));
    let out = succeeds(&perplexity_args(
        &model,
        &text,
        &["--window", "1000", "--stride", "128", "--json"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: --window 1000") && stderr.contains("using 256"),
        "{stderr}"
    );
    assert_eq!(json(&out), at_context);
    // A stride longer than the window is the window, said so.
    let out = succeeds(&perplexity_args(
        &model,
        &text,
        &["--window", "256", "--stride", "300", "--json"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: --stride 300"), "{stderr}");
    assert_eq!(
        json(&out),
        json(&succeeds(&perplexity_args(
            &model,
            &text,
            &["--window", "256", "--stride", "256", "--json"],
        )))
    );
}

#[test]
fn inspect_zero_long_and_huge_shapes_are_errors() {
    let (model, _) = setup("inspect");
    let m = arg(&model);
    let cases: &[(&[&str], &[&str])] = &[
        (&["--batch", "0"], &["--batch", "got 0"]),
        (&["--seq-len", "0"], &["--seq-len", "got 0"]),
        (
            &["--seq-len", "257"],
            &["--seq-len", "context window (256 tokens)"],
        ),
        // Once wrapped around (f64 saturating to u64::MAX) into "18446744073.71 GB".
        (
            &["--batch", "18446744073709551615", "--seq-len", "256"],
            &["--batch", "overflows"],
        ),
        (
            &["--batch", "17592186044416", "--seq-len", "256"],
            &["overflows"],
        ),
    ];
    for (extra, wants) in cases {
        let mut args = vec!["inspect", "--model", &m];
        args.extend_from_slice(extra);
        let e = fails(&args);
        for w in *wants {
            assert!(e.contains(w), "{extra:?}: {e}");
        }
    }
}

#[test]
fn k_larger_than_the_shots_file_fails_before_the_model_loads() {
    let d = tmp("flags-k");
    let shots = d.join("shots.jsonl");
    std::fs::write(
        &shots,
        "{\"q\": \"red\", \"a\": \"cat\"}\n{\"q\": \"sun\", \"a\": \"moon\"}\n",
    )
    .unwrap();
    // No model at this path: the --k error comes first, without the (slow) load.
    let e = fails(&[
        "generate",
        "--model",
        &arg(&d.join("absent.gguf")),
        "--prompt",
        "tree",
        "--shots",
        &arg(&shots),
        "--k",
        "3",
        "--template",
        "{q} = {a}",
    ]);
    assert!(
        e.contains("shots.jsonl") && e.contains("--k 3") && e.contains("only 2"),
        "{e}"
    );
}

#[test]
fn out_dtype_errors_name_out_dtype() {
    let (model, _) = setup("out-dtype");
    let d = tmp("flags-out-dtype-dirs");
    let e = fails(&[
        "convert",
        "--model",
        &arg(&model),
        "--out",
        &arg(&d.join("conv")),
        "--out-dtype",
        "q4",
    ]);
    assert!(e.contains("--out-dtype `q4`"), "{e}");
    assert!(!d.join("conv").exists());
    let e = fails(&[
        "merge",
        "--model",
        &arg(&model),
        "--adapter",
        &arg(&d),
        "--out",
        &arg(&d.join("merged")),
        "--out-dtype",
        "int8",
    ]);
    assert!(e.contains("--out-dtype `int8`"), "{e}");
    // --dtype keeps its own name.
    let e = fails(&["inspect", "--model", &arg(&model), "--dtype", "q4"]);
    assert!(e.contains("--dtype `q4`"), "{e}");
}

#[test]
fn missing_inputs_say_they_do_not_exist() {
    let (model, text) = setup("missing");
    let m = arg(&model);
    let d = tmp("flags-missing-files");
    // No extension: these once read "cannot tell the format from the extension".
    let nothing = arg(&d.join("absent"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "eval",
                "--model",
                &m,
                "--data",
                &nothing,
                "--template",
                "{q}",
                "--completion",
                "{a}",
            ],
            "--data",
        ),
        (vec!["score", "--predictions", &nothing], "--predictions"),
        (
            vec!["perplexity", "--model", &m, "--file", &nothing],
            "--file",
        ),
        (
            vec!["generate", "--model", &m, "--prompt-file", &nothing],
            "--prompt-file",
        ),
        (
            vec![
                "generate",
                "--model",
                &m,
                "--prompt",
                "x",
                "--shots",
                &nothing,
                "--k",
                "1",
                "--template",
                "{q}",
            ],
            "--shots",
        ),
    ];
    for (args, flag) in cases {
        let e = fails(&args);
        assert!(
            e.contains(&format!("{flag} {nothing}: no such file")),
            "{args:?}: {e}"
        );
    }
    // An adapter folder that is not there is named as missing (not as lacking adapter_config.json).
    let t = arg(&text);
    for args in [
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--adapter",
            &nothing,
        ],
        vec![
            "perplexity",
            "--model",
            &m,
            "--file",
            &t,
            "--adapter",
            &nothing,
        ],
        vec![
            "merge",
            "--model",
            &m,
            "--adapter",
            &nothing,
            "--out",
            "unused",
        ],
        vec![
            "eval",
            "--model",
            &m,
            "--data",
            &t,
            "--template",
            "{q}",
            "--completion",
            "{a}",
            "--adapter",
            &nothing,
        ],
    ] {
        let e = fails(&args);
        assert!(
            e.contains(&format!("--adapter {nothing}: no such folder")),
            "{args:?}: {e}"
        );
    }
    // A folder given as a file.
    let e = fails(&["score", "--predictions", &arg(&d)]);
    assert!(e.contains("is a folder"), "{e}");
}

#[test]
fn a_missing_data_file_in_a_config_says_it_does_not_exist() {
    let d = tmp("flags-missing-config-data");
    tiny_model(&d, true);
    std::fs::write(
        d.join("run.toml"),
        "model = \"model\"\noutput_dir = \"out\"\n[data]\ntrain = \"train_rows\"\ntemplate = \"{q}\"\ncompletion = \" {a}\"\n",
    )
    .unwrap();
    let e = fails(&["data", "preview", "--config", &arg(&d.join("run.toml"))]);
    assert!(e.contains("train_rows: no such file"), "{e}");
    assert!(!e.contains("extension"), "{e}");
}

#[test]
fn eval_flags_out_of_range_name_the_flag() {
    let (model, _) = setup("eval");
    let d = tmp("flags-eval-data");
    let data = d.join("rows.jsonl");
    std::fs::write(&data, "{\"q\": \"red\", \"a\": \"cat\"}\n").unwrap();
    let base = [
        "eval",
        "--model",
        &arg(&model),
        "--data",
        &arg(&data),
        "--template",
        "{q} =",
        "--completion",
        " {a}",
    ];
    for (extra, flag) in [
        (&["--limit", "0"][..], "--limit"),
        (&["--max-new-tokens", "99999999999"], "--max-new-tokens"),
        (&["--metrics", ","], "--metrics"),
        (&["--metrics", "rouge,meteor"], "--metrics"),
        (&["--threads", "0"], "--threads"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let e = fails(&args);
        assert!(e.contains(flag), "{extra:?}: {e}");
    }
}

#[test]
fn command_line_errors_are_one_line_with_exit_code_1() {
    let (model, _) = setup("usage");
    let m = arg(&model);
    let e = fails(&["generate", "--model", &m, "--temperature", "abc"]);
    assert!(
        e.contains("'--temperature <TEMPERATURE>'") && e.contains("abc"),
        "{e}"
    );
    let e = fails(&["generate", "--prompt", "x"]);
    assert!(e.contains("--model"), "{e}");
    let e = fails(&["inspect", "--model", &m, "--batch", "-1"]);
    assert!(e.contains("--batch"), "{e}");
    let e = fails(&["generate", "--model", &m, "--no-such-flag"]);
    assert!(e.contains("--no-such-flag"), "{e}");
    // --help still prints the help, on stdout, with success.
    let out = succeeds(&["generate", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--temperature"));
}

#[test]
fn few_shot_flags_without_shots_are_errors_not_ignored() {
    let (model, _) = setup("no-shots");
    for (extra, flag) in [
        (&["--template", "{q} = {a}"][..], "--template"),
        (&["--random-shots"], "--random-shots"),
        (&["--k", "2"], "--k"),
    ] {
        let e = fails(&generate_with(&model, extra));
        assert!(e.contains(flag) && e.contains("--shots"), "{extra:?}: {e}");
    }
}

#[test]
fn perplexity_of_a_json_file_warns_that_it_is_plain_text() {
    let (model, _) = setup("ppl-json");
    let d = tmp("flags-ppl-json-file");
    let file = d.join("rows.json");
    std::fs::write(&file, "[{\"text\": \"red cat sun moon\"}]").unwrap();
    let out = succeeds(&perplexity_args(&model, &file, &["--json"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: --file") && stderr.contains("plain text"),
        "{stderr}"
    );
}

#[test]
fn bench_reads_each_adapter_config_before_benchmarking_the_base() {
    let (model, _) = setup("bench-adapter");
    let d = tmp("flags-bench-adapter-data");
    std::fs::write(d.join("d.jsonl"), "{\"q\": \"a\", \"a\": \"b\"}\n").unwrap();
    let task = d.join("t.yaml");
    std::fs::write(
        &task,
        "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\ngeneration_kwargs:\n  max_gen_toks: 2\nmetric_list:\n  - metric: exact_match\n",
    )
    .unwrap();
    let adapter = d.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\", \"r\": -1}",
    )
    .unwrap();
    let e = fails_within(
        &[
            "bench".to_string(),
            "--model".into(),
            arg(&model),
            "--tasks".into(),
            arg(&task),
            "--adapter".into(),
            arg(&adapter),
            "-q".into(),
        ],
        60,
    );
    assert!(
        e.contains("--adapter") && e.contains("adapter_config.json"),
        "{e}"
    );
}
