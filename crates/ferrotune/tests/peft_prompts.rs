//! Soft prompts (PEFT's PROMPT_TUNING, PREFIX_TUNING, P_TUNING) against PEFT, both directions,
//! on SmolLM2 (fixtures from reference/peft_prompts.py), plus gradients against finite
//! differences, cached generation against the full forward pass, and the readout.
use candle_core::{DType, Device, Tensor, Var};
use ferrotune::data::{Batch, Loc, Source, Targets};
use ferrotune::model::{self, LoadOptions, LoadedModel, Model, VirtualTokens};
use ferrotune::peft::format::{self, AdapterConfig};
use ferrotune::peft::prompt_learning::{
    self, attach_prompt, PromptEncoder, PromptLearningConfig, PromptMethod, PromptTuningInit,
};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

use crate::common;
use common::{dequantized, finite_difference, max_abs_diff, read_json, repo, smollm2_gguf};

/// SmolLM2 as the reference scripts load it: the fetched GGUF dequantized to f32, whose weights
/// are bit-identical to the f32 HF folder `scripts/convert-smollm2-hf.sh` writes for PEFT
/// (proven by `smollm2.rs`), so CI needs no Python environment.
fn smollm2() -> LoadedModel {
    model::load(
        smollm2_gguf().to_str().unwrap(),
        &dequantized(),
        &Device::Cpu,
    )
    .unwrap()
}

fn tiny() -> model::Llama {
    common::tiny("tiny-llama-gqa-untied")
}

/// One row whose labels are its ids, as `model(input_ids, labels=input_ids)` in PEFT (the
/// first label kept: with prompt tuning the last virtual token predicts it). Built by hand:
/// the batcher ignores every example's first label.
fn batch(ids: &[u32]) -> Batch {
    let t = ids.len();
    let dev = Device::Cpu;
    Batch {
        input_ids: Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap(),
        labels: Tensor::new(
            ids.iter().map(|&i| i as i64).collect::<Vec<_>>().as_slice(),
            &dev,
        )
        .unwrap()
        .unsqueeze(0)
        .unwrap(),
        targets: Targets::NextToken,
        attention_mask: Tensor::ones((1, t), DType::U8, &dev).unwrap(),
        position_ids: Tensor::arange(0u32, t as u32, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        segment_ids: None,
        n_loss_tokens: t - 1,
        n_tokens: t,
        sources: vec![Source {
            file: Arc::from(Path::new("test")),
            loc: Loc::Line(1),
            task: None,
        }],
    }
}

/// PEFT's `loss`: the mean NLL over the scored labels.
fn nll_mean(m: &dyn Model, ids: &[u32]) -> f64 {
    let (sum, n) = m.loss_sum(&batch(ids), false).unwrap();
    sum.to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        / n as f64
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn assert_rel(got: f64, want: f64, what: &str) {
    let rel = ((got - want) / want).abs();
    eprintln!("{what}: nll {got:.8} vs PEFT {want:.8} (rel {rel:.2e})");
    assert!(rel < 1e-4, "{what}: nll {got} vs PEFT {want} (rel {rel:e})");
}

const PEFT_CASES: [&str; 6] = [
    "prompt-random",
    "prompt-sample-vocab",
    "prompt-text",
    "prefix",
    "prefix-projection",
    "p-tuning",
];

/// Adapters made by PEFT load here with PEFT's NLL. Prompts made of SmolLM2's embedding rows
/// (TEXT, SAMPLE_VOCAB init) are rebuilt from the ids PEFT chose; TEXT through our own init.
#[test]
fn peft_made_prompt_adapters_match_peft() {
    let mut lm = smollm2();
    let base = nll_mean(
        &lm.model,
        &ids_of(
            &read_json(&repo().join("tests/fixtures/peft/prompts/prompt-random/expected.json"))
                ["input_ids"],
        ),
    );
    for case in PEFT_CASES {
        let dir = repo().join("tests/fixtures/peft/prompts").join(case);
        let exp = read_json(&dir.join("expected.json"));
        let ids = ids_of(&exp["input_ids"]);
        assert_rel(base, exp["base_nll_mean"].as_f64().unwrap(), "base");
        match exp.get("token_ids") {
            None => {
                let loaded = format::load_adapter(&mut *lm.model, &dir, "default").unwrap();
                assert!(matches!(loaded.config, AdapterConfig::Prompt(_)));
            }
            Some(tok) => {
                let want_ids = ids_of(tok);
                let AdapterConfig::Prompt(cfg) = format::read_adapter_config(&dir).unwrap() else {
                    panic!("{case}: not a prompt config")
                };
                if cfg.prompt_tuning_init == Some(PromptTuningInit::Text) {
                    // Our TEXT init picks PEFT's tokens.
                    let mut cfg = cfg.clone();
                    cfg.inference_mode = false;
                    let a =
                        attach_prompt(&mut *lm.model, &cfg, Some(&lm.tokenizer), 0, case).unwrap();
                    let emb = prompt_learning::model::input_embeddings(&lm.model).unwrap();
                    let want = emb
                        .index_select(&Tensor::new(want_ids.as_slice(), &Device::Cpu).unwrap(), 0)
                        .unwrap();
                    let diff = max_abs_diff(&a.encoder.output().unwrap(), &want);
                    assert_eq!(diff, 0.0, "{case}: TEXT init differs from PEFT's tokens");
                    let text = cfg.prompt_tuning_init_text.as_deref().unwrap();
                    assert_eq!(
                        prompt_learning::model::init_text_ids(&lm.tokenizer, text, want_ids.len())
                            .unwrap(),
                        want_ids
                    );
                } else {
                    let emb = prompt_learning::model::input_embeddings(&lm.model).unwrap();
                    let rows = emb
                        .index_select(&Tensor::new(want_ids.as_slice(), &Device::Cpu).unwrap(), 0)
                        .unwrap();
                    let enc = PromptEncoder::plain(
                        VirtualTokens::Embeddings,
                        want_ids.len(),
                        Var::from_tensor(&rows).unwrap(),
                    );
                    lm.model.set_virtual_prompt(Some(Arc::new(enc))).unwrap();
                }
            }
        }
        assert_rel(
            nll_mean(&lm.model, &ids),
            exp["nll_mean"].as_f64().unwrap(),
            case,
        );
        lm.model.set_virtual_prompt(None).unwrap();
    }
}

/// Our adapters for PEFT: fresh (seeded) ones of each method, their saved files loaded back
/// here give the in-memory NLL, and PEFT's NLL on the committed folders (peft_expected.json,
/// from `reference/peft_prompts.py --check ... --write`) equals ours.
/// FERROTUNE_WRITE_PROMPT_FIXTURES=1 rewrites the committed folders.
#[test]
fn ferrotune_prompt_adapters_match_peft() {
    let mut lm = smollm2();
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 1237 + 101) % 49152).collect();
    let fixtures = repo().join("tests/fixtures/peft/prompts-ferrotune");
    let write = std::env::var_os("FERROTUNE_WRITE_PROMPT_FIXTURES").is_some();
    let out = if write {
        fixtures.clone()
    } else {
        std::env::temp_dir().join(format!("ferrotune-prompts-{}", std::process::id()))
    };
    let cases: [(&str, PromptLearningConfig); 4] = [
        (
            "prompt-random",
            PromptLearningConfig::new(PromptMethod::PromptTuning, 3),
        ),
        (
            "prefix",
            PromptLearningConfig::new(PromptMethod::PrefixTuning, 2),
        ),
        ("prefix-projection", {
            let mut c = PromptLearningConfig::new(PromptMethod::PrefixTuning, 2);
            c.prefix_projection = Some(true);
            c.encoder_hidden_size = Some(24);
            c
        }),
        ("p-tuning", {
            let mut c = PromptLearningConfig::new(PromptMethod::PTuning, 3);
            c.encoder_hidden_size = Some(24);
            c
        }),
    ];
    for (i, (case, cfg)) in cases.into_iter().enumerate() {
        let mut cfg = cfg;
        cfg.base_model_name_or_path = Some(".cache/models/smollm2-hf".into());
        let a = attach_prompt(&mut *lm.model, &cfg, None, 40 + i as u64, case).unwrap();
        let ours = nll_mean(&lm.model, &ids);
        let dir = out.join(case);
        prompt_learning::save_prompt_adapter(&a.config, &a.encoder, &dir).unwrap();
        lm.model.set_virtual_prompt(None).unwrap();
        let exp = serde_json::json!({ "input_ids": ids, "nll_mean": ours });
        std::fs::write(
            dir.join("expected.json"),
            serde_json::to_string_pretty(&exp).unwrap(),
        )
        .unwrap();
        // The saved prompt (the MLP's output, as PEFT saves it) reads back to the same NLL.
        format::load_adapter(&mut *lm.model, &dir, "default").unwrap();
        let reloaded = nll_mean(&lm.model, &ids);
        assert!(
            ((reloaded - ours) / ours).abs() < 1e-6,
            "{case}: reloaded {reloaded} vs {ours}"
        );
        lm.model.set_virtual_prompt(None).unwrap();
        if write {
            continue; // PEFT's numbers come next: reference/peft_prompts.py --check ... --write
        }
        // PEFT's numbers on the committed folder (made by the same seeded code).
        let committed = fixtures.join(case);
        format::load_adapter(&mut *lm.model, &committed, "default").unwrap();
        let got = nll_mean(&lm.model, &ids);
        lm.model.set_virtual_prompt(None).unwrap();
        let peft = read_json(&committed.join("peft_expected.json"));
        assert_rel(
            got,
            peft["nll_mean"].as_f64().unwrap(),
            &format!("ours {case} in PEFT"),
        );
    }
    if !write {
        let _ = std::fs::remove_dir_all(&out);
    }
}

fn tiny_prompt(m: &mut model::Llama, method: PromptMethod, projection: bool) -> Arc<PromptEncoder> {
    let mut cfg = PromptLearningConfig::new(method, 3);
    if projection {
        cfg.prefix_projection = Some(true);
        cfg.encoder_hidden_size = Some(8);
    }
    if method == PromptMethod::PTuning {
        cfg.encoder_hidden_size = Some(8);
    }
    attach_prompt(m, &cfg, None, 5, "test").unwrap().encoder
}

/// Autograd's gradients of every prompt parameter (embedding and MLP) equal finite
/// differences of the loss, for each method.
#[test]
fn prompt_gradients_match_finite_differences() {
    let ids: Vec<u32> = (0..10u32).map(|i| (i * 37 + 11) % 256).collect();
    for (method, projection) in [
        (PromptMethod::PromptTuning, false),
        (PromptMethod::PrefixTuning, false),
        (PromptMethod::PrefixTuning, true),
        (PromptMethod::PTuning, false),
    ] {
        let mut m = tiny();
        let enc = tiny_prompt(&mut m, method, projection);
        let loss = |m: &model::Llama| m.loss_sum(&batch(&ids), true).unwrap().0;
        let grads = loss(&m).backward().unwrap();
        let params = enc.trainable_params();
        assert!(params.len() > 1 || !projection);
        for (name, v) in &params {
            let g: Vec<f32> = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{method:?} {name}: no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let n = base.len();
            for i in [0, n / 3, n - 1] {
                let fd =
                    finite_difference(v, &base, i, 1e-2, || loss(&m).to_scalar::<f32>().unwrap());
                assert!(
                    (fd - g[i]).abs() < 3e-3 + 3e-2 * g[i].abs(),
                    "{method:?} projection={projection} {name}[{i}]: autograd {} vs finite diff {fd}",
                    g[i]
                );
            }
        }
    }
}

/// `prompt` and `n` ids picked greedily by the full forward pass (no cache) at each step.
fn greedy_without_cache(m: &model::Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m
            .forward_last(&t, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        ids.push(argmax(&logits));
    }
    ids
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

/// Greedy decoding with the KV cache (the prompt's virtual tokens cached first) gives the ids
/// the full forward pass (no cache) picks at each step.
#[test]
fn cached_generation_with_a_prompt_equals_the_full_forward() {
    for (method, projection) in [
        (PromptMethod::PromptTuning, false),
        (PromptMethod::PrefixTuning, true),
        (PromptMethod::PTuning, false),
    ] {
        let mut m = tiny();
        tiny_prompt(&mut m, method, projection);
        let prompt: Vec<u32> = vec![5, 17, 42, 99];
        let mut dec =
            ferrotune::generate::decoder_for(&m, ferrotune::generate::Engine::Auto).unwrap();
        let mut cached = prompt.clone();
        let mut next = argmax(&dec.prefill(&prompt).unwrap());
        for _ in 0..6 {
            cached.push(next);
            next = argmax(&dec.step(next).unwrap());
        }
        cached.push(next);
        let full = greedy_without_cache(&m, &prompt, 7);
        drop(dec);
        assert_eq!(cached, full, "{method:?}: cached vs full forward");
        // The prompt changes what is generated (it is really read).
        m.set_virtual_prompt(None).unwrap();
        let plain = greedy_without_cache(&m, &prompt, 7);
        eprintln!("{method:?}: with prompt {full:?}, without {plain:?}");
    }
}

/// A prompt initialised from text reads back, before training, exactly that text's tokens
/// (k = 1, cosine 1).
#[test]
fn readout_of_a_text_initialised_prompt_is_the_text() {
    let mut lm = smollm2();
    let text = "Classify the sentiment of this review:";
    let mut cfg = PromptLearningConfig::new(PromptMethod::PromptTuning, 8);
    cfg.prompt_tuning_init = Some(PromptTuningInit::Text);
    cfg.prompt_tuning_init_text = Some(text.into());
    let a = attach_prompt(&mut *lm.model, &cfg, Some(&lm.tokenizer), 0, "test").unwrap();
    let dir = std::env::temp_dir().join(format!("ferrotune-readout-{}", std::process::id()));
    prompt_learning::save_prompt_adapter(&a.config, &a.encoder, &dir).unwrap();
    let want = prompt_learning::model::init_text_ids(&lm.tokenizer, text, 8).unwrap();
    let r = prompt_learning::model::readout_adapter(&lm.model, &lm.tokenizer, &dir, 1).unwrap();
    assert_eq!(r.len(), 8);
    for (t, id) in r.iter().zip(&want) {
        assert_eq!(t.nearest.len(), 1);
        assert_eq!(t.nearest[0].id, *id, "virtual token {}", t.index);
        assert!(
            (t.nearest[0].cosine - 1.0).abs() < 1e-5,
            "{:?}",
            t.nearest[0]
        );
    }
    let back: String = r.iter().map(|t| t.nearest[0].token.clone()).collect();
    assert!(back.starts_with(text), "{back:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad prompt adapters are one-line errors that attach nothing.
#[test]
fn bad_prompt_adapters_are_one_line_errors() {
    let mut m = tiny();
    let dir = std::env::temp_dir().join(format!("ferrotune-bad-prompt-{}", std::process::id()));
    let cfg = PromptLearningConfig::new(PromptMethod::PromptTuning, 3);
    let a = attach_prompt(&mut m, &cfg, None, 1, "test").unwrap();
    prompt_learning::save_prompt_adapter(&a.config, &a.encoder, &dir).unwrap();
    m.set_virtual_prompt(None).unwrap();
    let cfg_path = dir.join("adapter_config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    for (from, to, want) in [
        (
            "\"num_virtual_tokens\": 3",
            "\"num_virtual_tokens\": 4",
            "prompt_embeddings",
        ),
        (
            "\"num_virtual_tokens\": 3",
            "\"num_virtual_tokens\": 0",
            "num_virtual_tokens",
        ),
        ("\"token_dim\": 64", "\"token_dim\": 65", "token_dim"),
    ] {
        assert!(good.contains(from), "{good}");
        std::fs::write(&cfg_path, good.replace(from, to)).unwrap();
        let e = format::load_adapter(&mut m, &dir, "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && !e.contains('\n'), "{e}");
        assert!(m.virtual_prompt().is_none());
    }
    // One soft prompt at a time: a second is refused, the first stays.
    std::fs::write(&cfg_path, &good).unwrap();
    format::load_adapter(&mut m, &dir, "a").unwrap();
    let e = format::load_adapter(&mut m, &dir, "b")
        .unwrap_err()
        .to_string();
    assert!(e.contains("one prompt learning adapter at a time"), "{e}");
    assert!(m.virtual_prompt().is_some());
    m.set_virtual_prompt(None).unwrap();
    std::fs::write(
        &cfg_path,
        good.replace(
            "\"PROMPT_TUNING\"",
            "\"P_TUNING\",\n  \"encoder_reparameterization_type\": \"LSTM\"",
        ),
    )
    .unwrap();
    let e = format::load_adapter(&mut m, &dir, "default")
        .unwrap_err()
        .to_string();
    assert!(e.contains("LSTM is not supported"), "{e}");
    // A prompt holding NaN (a diverged run, a damaged file) would make every output NaN.
    std::fs::write(&cfg_path, &good).unwrap();
    let weights = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let p = t.remove("prompt_embeddings").unwrap();
    let mut v = p.to_vec2::<f32>().unwrap();
    v[1][5] = f32::NAN;
    let bad = candle_core::Tensor::new(v, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("prompt_embeddings".to_string(), bad)]
            .into_iter()
            .collect(),
        &weights,
    )
    .unwrap();
    let e = format::load_adapter(&mut m, &dir, "default")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("virtual token 1") && e.contains("non-finite") && !e.contains('\n'),
        "{e}"
    );
    assert!(m.virtual_prompt().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- T5 (SEQ_2_SEQ_LM)

/// The tiny T5 of `tests/fixtures/t5` (committed, f32), as the reference script loads it.
fn t5() -> LoadedModel {
    let dir = repo().join("tests/fixtures/t5/t5-v1_0");
    model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap()
}

fn rows_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids_of).collect()
}

/// The encoder-decoder batch of an expected.json (`input_ids`, `attention_mask`, `labels` with
/// -100), as `model(input_ids, attention_mask, labels)` reads it in PEFT.
fn t5_batch(exp: &Value) -> Batch {
    let dev = Device::Cpu;
    let ids = rows_u32(&exp["input_ids"]);
    let mask: Vec<Vec<u8>> = rows_u32(&exp["attention_mask"])
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u8).collect())
        .collect();
    let labels: Vec<Vec<i64>> = exp["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect();
    let (b, s) = (ids.len(), ids[0].len());
    let t = labels[0].len();
    let n_tokens = mask.iter().flatten().filter(|&&m| m != 0).count();
    let n_loss_tokens = labels.iter().flatten().filter(|&&l| l != -100).count();
    Batch {
        input_ids: Tensor::from_vec(ids.concat(), (b, s), &dev).unwrap(),
        labels: Tensor::from_vec(labels.concat(), (b, t), &dev).unwrap(),
        targets: Targets::Decoder,
        attention_mask: Tensor::from_vec(mask.concat(), (b, s), &dev).unwrap(),
        position_ids: Tensor::arange(0u32, s as u32, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((b, 1))
            .unwrap(),
        segment_ids: None,
        n_loss_tokens,
        n_tokens,
        sources: (0..b)
            .map(|i| Source {
                file: Arc::from(Path::new("test")),
                loc: Loc::Line(i + 1),
                task: None,
            })
            .collect(),
    }
}

fn t5_nll(m: &dyn Model, batch: &Batch) -> f64 {
    let (sum, n) = m.loss_sum(batch, false).unwrap();
    assert!(n > 0);
    sum.to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        / n as f64
}

const T5_PEFT_CASES: [&str; 6] = [
    "t5-prompt-random",
    "t5-prompt-sample-vocab",
    "t5-prompt-text",
    "t5-prefix",
    "t5-prefix-projection",
    "t5-p-tuning",
];

/// Adapters PEFT made on the tiny T5 load here with PEFT's NLL (prompt tuning with each init,
/// prefix tuning with and without projection, P-tuning); a TEXT init here picks PEFT's tokens.
#[test]
fn peft_made_t5_prompt_adapters_match_peft() {
    let mut lm = t5();
    for case in T5_PEFT_CASES {
        let dir = repo().join("tests/fixtures/peft/prompts/t5").join(case);
        let exp = read_json(&dir.join("expected.json"));
        let batch = t5_batch(&exp);
        assert_rel(
            t5_nll(&lm.model, &batch),
            exp["base_nll_mean"].as_f64().unwrap(),
            &format!("{case} base"),
        );
        let loaded = format::load_adapter(&mut *lm.model, &dir, "default").unwrap();
        let AdapterConfig::Prompt(cfg) = &loaded.config else {
            panic!("{case}: not a prompt config")
        };
        let with = t5_nll(&lm.model, &batch);
        assert_rel(with, exp["nll_mean"].as_f64().unwrap(), case);
        assert!(
            (with - exp["base_nll_mean"].as_f64().unwrap()).abs() > 1e-3,
            "{case}: the prompt changes nothing"
        );
        lm.model.set_virtual_prompt(None).unwrap();
        if let Some(tok) = exp.get("token_ids") {
            let want_ids = ids_of(tok);
            let emb = prompt_learning::model::input_embeddings(&lm.model).unwrap();
            let rows = emb
                .index_select(&Tensor::new(want_ids.as_slice(), &Device::Cpu).unwrap(), 0)
                .unwrap();
            if cfg.prompt_tuning_init == Some(PromptTuningInit::Text) {
                // Our TEXT init gives PEFT's prompt: the text's ids (with </s>) over 2n rows.
                let mut cfg = cfg.clone();
                cfg.inference_mode = false;
                let a = attach_prompt(&mut *lm.model, &cfg, Some(&lm.tokenizer), 0, case).unwrap();
                let diff = (a.encoder.output().unwrap() - &rows)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{case}: TEXT init differs from PEFT's tokens");
                assert_rel(
                    t5_nll(&lm.model, &batch),
                    exp["nll_mean"].as_f64().unwrap(),
                    &format!("{case} (our TEXT init)"),
                );
                lm.model.set_virtual_prompt(None).unwrap();
            }
        }
    }
}

/// Our adapters on the tiny T5 for PEFT: fresh (seeded) ones of each method and init; the
/// saved files load back here to the in-memory NLL, and PEFT's NLL on the committed folders
/// (peft_expected.json, from `reference/peft_prompts.py --check
/// tests/fixtures/peft/prompts-ferrotune/t5 --write`) equals ours.
/// FERROTUNE_WRITE_PROMPT_FIXTURES=1 rewrites the committed folders.
#[test]
fn ferrotune_t5_prompt_adapters_match_peft() {
    let mut lm = t5();
    let exp = read_json(&repo().join("tests/fixtures/peft/prompts/t5/t5-prefix/expected.json"));
    let batch = t5_batch(&exp);
    let fixtures = repo().join("tests/fixtures/peft/prompts-ferrotune/t5");
    let write = std::env::var_os("FERROTUNE_WRITE_PROMPT_FIXTURES").is_some();
    let out = if write {
        fixtures.clone()
    } else {
        std::env::temp_dir().join(format!("ferrotune-t5-prompts-{}", std::process::id()))
    };
    let prompt = |init: PromptTuningInit| {
        let mut c = PromptLearningConfig::new(PromptMethod::PromptTuning, 3);
        c.prompt_tuning_init = Some(init);
        if init == PromptTuningInit::Text {
            c.prompt_tuning_init_text = Some("the token span".into());
            c.tokenizer_name_or_path = Some("tests/fixtures/t5/t5-v1_0".into());
        }
        c
    };
    let cases: [(&str, PromptLearningConfig); 6] = [
        ("t5-prompt-random", prompt(PromptTuningInit::Random)),
        (
            "t5-prompt-sample-vocab",
            prompt(PromptTuningInit::SampleVocab),
        ),
        ("t5-prompt-text", prompt(PromptTuningInit::Text)),
        (
            "t5-prefix",
            PromptLearningConfig::new(PromptMethod::PrefixTuning, 2),
        ),
        ("t5-prefix-projection", {
            let mut c = PromptLearningConfig::new(PromptMethod::PrefixTuning, 3);
            c.prefix_projection = Some(true);
            c.encoder_hidden_size = Some(10);
            c
        }),
        ("t5-p-tuning", {
            let mut c = PromptLearningConfig::new(PromptMethod::PTuning, 3);
            c.encoder_hidden_size = Some(10);
            c
        }),
    ];
    let base = t5_nll(&lm.model, &batch);
    for (i, (case, cfg)) in cases.into_iter().enumerate() {
        let mut cfg = cfg;
        cfg.base_model_name_or_path = Some("tests/fixtures/t5/t5-v1_0".into());
        let a = attach_prompt(
            &mut *lm.model,
            &cfg,
            Some(&lm.tokenizer),
            60 + i as u64,
            case,
        )
        .unwrap();
        assert_eq!(a.config.task_type.as_deref(), Some("SEQ_2_SEQ_LM"));
        assert_eq!(a.config.num_transformer_submodules, Some(2));
        let ours = t5_nll(&lm.model, &batch);
        assert!(
            (ours - base).abs() > 1e-3,
            "{case}: the prompt changes nothing"
        );
        let dir = out.join(case);
        prompt_learning::save_prompt_adapter(&a.config, &a.encoder, &dir).unwrap();
        lm.model.set_virtual_prompt(None).unwrap();
        let mut exp = serde_json::json!({ "nll_mean": ours });
        for k in ["input_ids", "attention_mask", "labels"] {
            exp[k] = batch_json(&batch, k);
        }
        std::fs::write(
            dir.join("expected.json"),
            serde_json::to_string_pretty(&exp).unwrap(),
        )
        .unwrap();
        format::load_adapter(&mut *lm.model, &dir, "default").unwrap();
        let reloaded = t5_nll(&lm.model, &batch);
        assert!(
            ((reloaded - ours) / ours).abs() < 1e-6,
            "{case}: reloaded {reloaded} vs {ours}"
        );
        lm.model.set_virtual_prompt(None).unwrap();
        if write {
            continue;
        }
        let committed = fixtures.join(case);
        format::load_adapter(&mut *lm.model, &committed, "default").unwrap();
        let got = t5_nll(&lm.model, &batch);
        lm.model.set_virtual_prompt(None).unwrap();
        let peft = read_json(&committed.join("peft_expected.json"));
        assert_eq!(peft["labels"], batch_json(&batch, "labels"));
        assert_rel(
            got,
            peft["nll_mean"].as_f64().unwrap(),
            &format!("ours {case} in PEFT"),
        );
    }
    if !write {
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// One of the batch's tensors as the JSON rows expected.json holds.
fn batch_json(batch: &Batch, key: &str) -> Value {
    let t = match key {
        "input_ids" => &batch.input_ids,
        "attention_mask" => &batch.attention_mask,
        _ => &batch.labels,
    };
    serde_json::json!(t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap())
}

fn t5_prompt(lm: &mut LoadedModel, method: PromptMethod, projection: bool) -> Arc<PromptEncoder> {
    let mut cfg = PromptLearningConfig::new(method, 3);
    if projection {
        cfg.prefix_projection = Some(true);
        cfg.encoder_hidden_size = Some(8);
    }
    if method == PromptMethod::PTuning {
        cfg.encoder_hidden_size = Some(8);
    }
    attach_prompt(&mut *lm.model, &cfg, None, 5, "test")
        .unwrap()
        .encoder
}

/// On T5, autograd's gradients of every prompt parameter (embedding and MLP) equal finite
/// differences of the loss, for each method. On the gated-GELU T5 v1.1 fixture: v1.0's ReLU
/// feed-forward has kinks close enough to this padded batch's point that f32 central
/// differences miss the slope there (torch's f64 autograd agrees with ours on v1.0 too).
#[test]
fn t5_prompt_gradients_match_finite_differences() {
    let exp = read_json(&repo().join("tests/fixtures/peft/prompts/t5/t5-prefix/expected.json"));
    let batch = t5_batch(&exp);
    for (method, projection) in [
        (PromptMethod::PromptTuning, false),
        (PromptMethod::PrefixTuning, false),
        (PromptMethod::PrefixTuning, true),
        (PromptMethod::PTuning, false),
    ] {
        let dir = repo().join("tests/fixtures/t5/t5-v1_1");
        let mut lm =
            model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
        let enc = t5_prompt(&mut lm, method, projection);
        let loss = |m: &dyn Model| m.loss_sum(&batch, true).unwrap().0;
        let grads = loss(&lm.model).backward().unwrap();
        let params = enc.trainable_params();
        assert!(params.len() > 1 || !projection);
        for (name, v) in &params {
            let g: Vec<f32> = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{method:?} {name}: no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let n = base.len();
            let (mut nonzero, mut checked) = (0, 0);
            let close = |a: f32, b: f32| (a - b).abs() < 3e-3 + 3e-2 * b.abs();
            let picks = [0, n / 5, n / 3, n / 2, 2 * n / 3, n - 1];
            for i in picks {
                let fd = |eps: f32| {
                    let bump = |delta: f32| {
                        let mut w = base.clone();
                        w[i] += delta;
                        v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                            .unwrap();
                        loss(&lm.model).to_scalar::<f32>().unwrap()
                    };
                    (bump(eps) - bump(-eps)) / (2.0 * eps)
                };
                let (fd, fd_half) = (fd(1e-2), fd(5e-3));
                v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                // P-tuning's MLP is ReLU: where a step crosses a kink the two differences
                // disagree, and neither is the slope here.
                if !close(fd_half, fd) {
                    continue;
                }
                checked += 1;
                nonzero += usize::from(fd.abs() > 1e-4);
                assert!(
                    close(fd, g[i]),
                    "T5 {method:?} projection={projection} {name}[{i}]: autograd {} vs finite diff {fd}",
                    g[i]
                );
            }
            assert!(
                checked * 2 >= picks.len(),
                "T5 {method:?} {name}: only {checked} smooth points"
            );
            assert!(nonzero > 0, "T5 {method:?} {name}: the loss ignores it");
        }
    }
}

/// On T5, greedy decoding with the cache (a prefix cached first; prompt tuning's virtual
/// tokens in the encoder) gives the ids the full forward pass picks at each step, and the
/// prompt changes the logits.
#[test]
fn t5_cached_generation_with_a_prompt_equals_the_full_forward() {
    for (method, projection) in [
        (PromptMethod::PromptTuning, false),
        (PromptMethod::PrefixTuning, false),
        (PromptMethod::PrefixTuning, true),
        (PromptMethod::PTuning, false),
    ] {
        let mut lm = t5();
        let prompt: Vec<u32> = vec![5, 17, 42, 99, 1];
        let full_logits = |m: &dyn Model, dec: &[u32]| -> Vec<f32> {
            let exp = serde_json::json!({
                "input_ids": [prompt.clone()],
                "attention_mask": [vec![1; prompt.len()]],
                "labels": [dec.iter().skip(1).copied().chain([1]).collect::<Vec<_>>()],
            });
            // The labels shifted right are `dec` (start token first).
            let logits = m.logits(&t5_batch(&exp)).unwrap();
            assert_eq!(logits.dim(1).unwrap(), dec.len());
            logits
                .narrow(1, dec.len() - 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let base0 = full_logits(&lm.model, &[0]);
        t5_prompt(&mut lm, method, projection);
        let argmax = |l: &[f32]| {
            l.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32
        };
        let mut dec = lm.model.decoder().unwrap();
        let first = dec.prefill(&prompt).unwrap();
        let full0 = full_logits(&lm.model, &[0]);
        let diff = first
            .iter()
            .zip(&full0)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{method:?}: prefill vs full forward {diff}");
        let changed = full0
            .iter()
            .zip(&base0)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(changed > 1e-3, "{method:?}: the prompt changes nothing");
        let mut cached = vec![0u32];
        let mut next = argmax(&first);
        for _ in 0..5 {
            cached.push(next);
            next = argmax(&dec.step(next).unwrap());
        }
        cached.push(next);
        drop(dec);
        let mut full = vec![0u32];
        for _ in 0..6 {
            let l = full_logits(&lm.model, &full);
            full.push(argmax(&l));
        }
        assert_eq!(cached, full, "{method:?}: cached vs full forward");
    }
}

/// On T5 the readout lists the n virtual tokens the encoder reads (not the 2n rows of PEFT's
/// table), and a TEXT-initialised prompt reads back the text's tokens (with `</s>`, repeated).
#[test]
fn t5_readout_of_a_text_initialised_prompt_is_the_text() {
    let mut lm = t5();
    let text = "the token span";
    let mut cfg = PromptLearningConfig::new(PromptMethod::PromptTuning, 6);
    cfg.prompt_tuning_init = Some(PromptTuningInit::Text);
    cfg.prompt_tuning_init_text = Some(text.into());
    let a = attach_prompt(&mut *lm.model, &cfg, Some(&lm.tokenizer), 0, "test").unwrap();
    assert_eq!(a.encoder.output().unwrap().dims(), [12, 16]);
    let dir = std::env::temp_dir().join(format!("ferrotune-t5-readout-{}", std::process::id()));
    prompt_learning::save_prompt_adapter(&a.config, &a.encoder, &dir).unwrap();
    let want = prompt_learning::model::init_text_ids(&lm.tokenizer, text, 6).unwrap();
    assert!(want.contains(&1), "the text's ids end with </s>: {want:?}");
    let r = prompt_learning::model::readout_adapter(&lm.model, &lm.tokenizer, &dir, 1).unwrap();
    assert_eq!(r.len(), 6);
    for (t, id) in r.iter().zip(&want) {
        assert_eq!(t.nearest[0].id, *id, "virtual token {}", t.index);
        assert!((t.nearest[0].cosine - 1.0).abs() < 1e-5);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A T5 prefix whose sizes do not fit the decoder's self-attention (PEFT's defaults on this
/// T5: d_model 16 instead of heads × d_kv = 24, the encoder's 2 layers instead of the
/// decoder's 3) is a one-line error naming the key, and nothing is attached.
#[test]
fn t5_prefix_with_sizes_that_do_not_fit_is_a_one_line_error() {
    let mut lm = t5();
    let src = repo().join("tests/fixtures/peft/prompts/t5/t5-prefix");
    let dir = std::env::temp_dir().join(format!("ferrotune-t5-bad-prefix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let good = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    for (from, to, key) in [
        ("\"token_dim\": 24", "\"token_dim\": 16", "token_dim"),
        ("\"num_layers\": 3", "\"num_layers\": 2", "num_layers"),
    ] {
        assert!(good.contains(from), "{good}");
        std::fs::write(dir.join("adapter_config.json"), good.replace(from, to)).unwrap();
        let e = format::load_adapter(&mut *lm.model, &dir, "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && !e.contains('\n'), "{e}");
        assert!(lm.model.virtual_prompt().is_none());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
