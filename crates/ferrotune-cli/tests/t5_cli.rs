//! `ferrotune generate` on T5 folders (the prompt is the encoder input), against the text that
//! transformers' `generate()` produced for the same tiny models (tests/fixtures/t5, written by
//! reference/t5_fixtures.py).
use crate::support;

use serde_json::Value;
use std::path::PathBuf;
use support::{arg, fails, json, repo, succeeds, tiny_model, tmp};

fn model(variant: &str) -> PathBuf {
    repo().join("tests/fixtures/t5").join(variant)
}

fn expected(variant: &str) -> Value {
    let p = model(variant).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn stop_reason(ids: &Value) -> &'static str {
    match ids.as_array().unwrap().last().and_then(Value::as_u64) {
        Some(1) => "eos",
        _ => "max_tokens",
    }
}

#[test]
fn greedy_and_beam_generation_match_transformers() {
    for variant in ["t5-v1_0", "t5-v1_1"] {
        let m = arg(&model(variant));
        for case in expected(variant)["generate"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let n_prompt = case["input_ids"].as_array().unwrap().len() as u64;
            let max_new = case["max_new_tokens"].to_string();
            let base = [
                "generate",
                "--model",
                &m,
                "--prompt",
                prompt,
                "--max-new-tokens",
                &max_new,
                "--json",
            ];
            let v = json(&succeeds(&base));
            assert_eq!(v["text"], case["greedy_text"], "{variant} greedy: {prompt}");
            assert_eq!(v["prompt_tokens"].as_u64(), Some(n_prompt));
            assert_eq!(v["stop_reason"], stop_reason(&case["greedy"]));
            // The CLI's beam search is transformers' default one (length penalty 1, no early
            // stopping): the first beam case of the fixture.
            let b = &case["beams"][0];
            assert_eq!(b["length_penalty"].as_f64(), Some(1.0));
            assert_eq!(b["early_stopping"], false);
            let beams = b["num_beams"].to_string();
            let mut args = base.to_vec();
            args.extend(["--num-beams", &beams]);
            let v = json(&succeeds(&args));
            assert_eq!(v["text"], b["text"], "{variant} beams: {prompt}");
            assert_eq!(v["stop_reason"], stop_reason(&b["ids"]));
        }
    }
}

#[test]
fn streamed_beam_output_is_the_text() {
    let case = &expected("t5-v1_1")["generate"][0];
    let out = succeeds(&[
        "generate",
        "--model",
        &arg(&model("t5-v1_1")),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--num-beams",
        "3",
        "--quiet",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        format!("{}\n", case["beams"][0]["text"].as_str().unwrap())
    );
}

#[test]
fn what_t5_generation_cannot_do_is_a_one_line_error() {
    let m = arg(&model("t5-v1_1"));
    let g = |extra: &[&str]| {
        let mut a = vec!["generate", "--model", &m, "--prompt", "hello"];
        a.extend(extra);
        fails(&a)
    };
    assert!(g(&["--chat"]).contains("--chat"));
    assert!(g(&["--num-beams", "0"]).contains("--num-beams 0"));
    assert!(g(&["--num-beams", "2", "--temperature", "0.7"]).contains("--num-beams"));
    assert!(
        g(&["--num-beams", "2", "--repetition-penalty", "1.2"]).contains("--repetition-penalty")
    );
    // Beam search is wired for encoder-decoders only.
    let dir = tmp("t5-beams-decoder");
    let llama = arg(&tiny_model(&dir, false));
    let e = fails(&[
        "generate",
        "--model",
        &llama,
        "--prompt",
        "cat",
        "--num-beams",
        "2",
    ]);
    assert!(e.contains("decoder"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// T5 through the general model interface: `inspect` names it, `perplexity --data` scores
/// completions given prompts, and `convert` writes a folder that scores the same.
#[test]
fn t5_inspect_perplexity_and_convert_through_the_model_interface() {
    let d = tmp("t5-iface");
    let m = arg(&model("t5-v1_1"));
    let v = json(&succeeds(&["inspect", "--model", &m, "--json"]));
    assert_eq!(v["family"], "t5");
    assert_eq!(v["kind"], "encoder-decoder");
    assert_eq!(v["pretraining_objective"], "span_corruption");
    assert_eq!(v["task_type"], "SEQ_2_SEQ_LM");
    let data = d.join("qa.jsonl");
    std::fs::write(
        &data,
        "{\"q\": \"cat dog\", \"a\": \"sun moon tree\"}\n{\"q\": \"red\", \"a\": \"blue\"}\n",
    )
    .unwrap();
    let data = arg(&data);
    let ppl = |model: &str| {
        json(&succeeds(&[
            "perplexity",
            "--model",
            model,
            "--data",
            &data,
            "--template",
            "{q}",
            "--completion",
            "{a}",
            "--json",
        ]))
    };
    let v = ppl(&m);
    let nll = v["nll"].as_f64().unwrap();
    assert!(v["tokens"].as_u64().unwrap() >= 4, "{v}");
    assert!(nll.is_finite() && nll > 0.0, "{v}");
    let out = d.join("converted");
    succeeds(&["convert", "--model", &m, "--out", &arg(&out)]);
    let c = ppl(&arg(&out));
    assert_eq!(c["tokens"], v["tokens"]);
    assert!(
        (c["nll"].as_f64().unwrap() - nll).abs() < 1e-5,
        "{c} vs {v}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
