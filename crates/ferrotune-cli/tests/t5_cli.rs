//! `ferrotune generate` on T5 folders (the prompt is the encoder input), against the text that
//! transformers' `generate()` produced for the same tiny models (tests/fixtures/t5, written by
//! reference/t5_fixtures.py).
mod support;

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
