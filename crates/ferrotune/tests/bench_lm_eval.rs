//! `ferrotune bench` against lm-evaluation-harness: the fixtures of reference/lm_eval_fixtures.py
//! (lm_eval's HF backend on the SmolLM2 GGUF dequantized to f32 by transformers) give, per task
//! and shot count, lm-eval's prompts, token ids, per-sample answers and metrics. Here the same
//! task files run on the same GGUF dequantized by ferrotune: prompts and tokens must be equal,
//! per-sample log-likelihoods within 1e-3, generations identical, metrics equal.
//! Needs `scripts/fetch-models.sh` (CI runs it first).
use candle_core::Device;
use ferrotune::bench::{self, BenchOptions, Response, TaskResult};
use ferrotune::model::{self, LoadOptions, LoadedModel};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let p = repo().join(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.exists(),
            "{} is missing: run scripts/fetch-models.sh",
            p.display()
        );
        let opts = LoadOptions {
            dequantize: true,
            ..Default::default()
        };
        model::load(p.to_str().unwrap(), &opts, &Device::Cpu).unwrap()
    })
}

fn fixture(task: &str, k: usize) -> Value {
    let p = repo().join(format!("tests/fixtures/lm_eval/{task}_{k}shot.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn run(task: &str, k: usize, limit: usize) -> TaskResult {
    let file = repo().join(format!("tests/fixtures/lm_eval/tasks/{task}.yaml"));
    let (tasks, _) = bench::task::resolve_tasks(file.to_str().unwrap()).unwrap();
    let lm = smollm2();
    let opts = BenchOptions {
        num_fewshot: Some(k),
        limit: Some(limit),
        log_samples: true,
        ..Default::default()
    };
    bench::run_task(
        &*lm.model,
        &lm.tokenizer,
        &tasks[0],
        &opts,
        &ferrotune::progress::NoProgress,
    )
    .unwrap()
}

/// Compare one task run with its fixture; returns the worst per-sample |Δ log-likelihood|.
fn check(task: &str, k: usize) -> f64 {
    let fx = fixture(task, k);
    let limit = fx["limit"].as_u64().unwrap() as usize;
    let ours = run(task, k, limit);
    let samples = fx["samples"].as_array().unwrap();
    assert_eq!(
        ours.n_effective,
        samples.len(),
        "{task} {k}-shot: sample count"
    );
    let lm = smollm2();
    // Token ids of lm-eval's requests: our encoding of the same strings.
    for t in fx["tokens"].as_array().unwrap() {
        if t["context"].is_null() {
            continue; // a rolling window: token ids only
        }
        let r = ferrotune::bench::score::encode_pair(
            &lm.tokenizer,
            t["context"].as_str().unwrap(),
            t["continuation"].as_str().unwrap(),
            false,
        )
        .unwrap();
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        assert_eq!(
            r.context,
            ids(&t["context_enc"]),
            "{task}: context tokens of {:?}",
            t["context"]
        );
        assert_eq!(
            r.continuation,
            ids(&t["continuation_enc"]),
            "{task}: continuation tokens of {:?}",
            t["continuation"]
        );
    }
    let mut worst = 0f64;
    for (i, s) in samples.iter().enumerate() {
        let doc_id = s["doc_id"].as_u64().unwrap() as usize;
        assert_eq!(doc_id, i);
        // The prompts: lm-eval's arguments, pair by pair.
        let mine = ours.samples[i]["arguments"].as_array().unwrap();
        let theirs = s["arguments"].as_array().unwrap();
        assert_eq!(mine.len(), theirs.len(), "{task} sample {i}: request count");
        for (m, t) in mine.iter().zip(theirs) {
            assert_eq!(m["arg_0"], t[0], "{task} {k}-shot sample {i}: context");
            if let Some(cont) = t[1].as_str() {
                assert_eq!(
                    m["arg_1"].as_str(),
                    Some(cont),
                    "{task} sample {i}: continuation"
                );
            }
        }
        let resps = s["resps"].as_array().unwrap();
        match &ours.responses[i] {
            Response::Loglikelihoods(r) => {
                for (j, (ll, greedy)) in r.iter().enumerate() {
                    let want = &resps[j][0];
                    let d = (ll - want[0].as_f64().unwrap()).abs();
                    worst = worst.max(d);
                    assert!(
                        d < 1e-3,
                        "{task} sample {i} request {j}: ll {ll} vs lm-eval {}",
                        want[0]
                    );
                    assert_eq!(
                        *greedy,
                        want[1].as_bool().unwrap(),
                        "{task} sample {i} request {j}: is_greedy"
                    );
                }
            }
            Response::Rolling(ll) => {
                let want = resps[0][0].as_f64().unwrap();
                let d = (ll - want).abs();
                worst = worst.max(d / want.abs().max(1.0));
                assert!(
                    d < 1e-3 * want.abs().max(1.0),
                    "{task} sample {i}: ll {ll} vs lm-eval {want}"
                );
            }
            Response::Generated(text) => {
                assert_eq!(
                    text,
                    resps[0][0].as_str().unwrap(),
                    "{task} {k}-shot sample {i}: generation"
                );
            }
        }
    }
    // Metrics and their standard errors, as lm-eval reports them.
    let results = fx["results"].as_object().unwrap();
    for (key, want) in results {
        let Some((metric, filter)) = key.split_once(',') else {
            continue;
        };
        assert_eq!(filter, "none");
        let (name, is_se) = match metric.strip_suffix("_stderr") {
            Some(n) => (n, true),
            None => (metric, false),
        };
        let m = ours
            .metric(name)
            .unwrap_or_else(|| panic!("{task}: no metric {name}"));
        let got = if is_se { m.stderr } else { Some(m.value) };
        match (got, want.as_f64()) {
            (Some(g), Some(w)) => {
                let tol = if matches!(name, "acc" | "acc_norm" | "exact_match" | "f1" | "mcc") {
                    1e-9
                } else {
                    1e-4 * w.abs().max(1.0)
                };
                assert!(
                    (g - w).abs() <= tol,
                    "{task} {k}-shot {key}: {g} vs lm-eval {w}"
                );
            }
            (None, None) => {}
            (g, _) => panic!("{task} {k}-shot {key}: {g:?} vs lm-eval {want}"),
        }
    }
    eprintln!(
        "{task} {k}-shot: {} samples, worst |Δ ll| = {worst:.2e}",
        samples.len()
    );
    worst
}

#[test]
fn multiple_choice_zero_shot_matches_lm_eval() {
    check("ft_sst2_mc", 0);
}

#[test]
fn multiple_choice_five_shot_first_n_matches_lm_eval() {
    check("ft_sst2_mc", 5);
}

#[test]
fn multiple_choice_five_shot_seeded_sampler_matches_lm_eval() {
    check("ft_sst2_mc_seeded", 5);
}

#[test]
fn generate_until_zero_shot_matches_lm_eval() {
    check("ft_sst2_gen", 0);
}

#[test]
fn generate_until_five_shot_first_n_matches_lm_eval() {
    check("ft_sst2_gen", 5);
}

#[test]
fn loglikelihood_matches_lm_eval() {
    check("ft_sst2_ll", 0);
}

#[test]
fn loglikelihood_rolling_matches_lm_eval() {
    check("ft_dialogsum_rolling", 0);
}

#[test]
fn loglikelihood_rolling_over_empty_documents_is_an_error_not_nan() {
    let dir = std::env::temp_dir().join(format!("ferrotune-rolling-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("d.jsonl"), "{\"t\": \"\"}\n{\"t\": \"\"}\n").unwrap();
    let file = dir.join("empty.yaml");
    std::fs::write(
        &file,
        "task: empty\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\noutput_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: \"\"\ndoc_to_target: \"{{t}}\"\nmetric_list:\n  - metric: byte_perplexity\n",
    )
    .unwrap();
    let (tasks, _) = bench::task::resolve_tasks(file.to_str().unwrap()).unwrap();
    let lm = smollm2();
    let e = bench::run_task(
        &*lm.model,
        &lm.tokenizer,
        &tasks[0],
        &BenchOptions::default(),
        &ferrotune::progress::NoProgress,
    )
    .map(|_| ())
    .expect_err("NaN perplexities were reported as a result")
    .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        e.contains("empty.yaml") && e.contains("every document is empty"),
        "{e}"
    );
}
