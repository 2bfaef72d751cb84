//! T5 against transformers (fixtures from `reference/t5_fixtures.py`, see its docstring):
//! encoder outputs and logits within 1e-4, the loss within 1e-5 relative, greedy and beam ids
//! identical; gradients for every parameter; bad configs as one-line errors; and a tiny T5
//! that learns a synthetic task.
use super::*;
use crate::beam::EarlyStopping;
use crate::generate::{Decoder, GenerationConfig, StopReason};
use crate::model::{LoadOptions, SafetensorsSource};
use crate::ops::gradcheck;
use crate::peft::lora::{LoraAdapter, LoraInit};
use rand::SeedableRng;
use std::path::PathBuf;

const VARIANTS: [&str; 2] = ["t5-v1_0", "t5-v1_1"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5")
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (committed; .venv/bin/python reference/t5_fixtures.py writes it)",
            p.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn expected(variant: &str) -> Value {
    read_json(&fixtures().join(variant).join("expected.json"))
}

fn load(variant: &str) -> LoadedT5 {
    load_source(
        ModelSource::HfDir(fixtures().join(variant)),
        &LoadOptions::default(),
        &Device::Cpu,
        &crate::progress::NoProgress,
    )
    .unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    ints(v).into_iter().map(|x| x as u32).collect()
}

fn int_matrix(v: &Value, dtype: DType) -> Tensor {
    let rows: Vec<Vec<i64>> = v.as_array().unwrap().iter().map(ints).collect();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn floats(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| floats(x, out)),
        x => out.push(x.as_f64().unwrap() as f32),
    }
}

/// The logits the case keeps: all, or its `logits_columns` (the long case).
fn kept_logits(logits: &Tensor, case: &Value) -> Tensor {
    match case.get("logits_columns") {
        None => logits.clone(),
        Some(cols) => {
            let cols = Tensor::new(ids(cols).as_slice(), &Device::Cpu).unwrap();
            logits.index_select(&cols, 2).unwrap()
        }
    }
}

fn max_diff(got: &Tensor, want: &Value) -> f32 {
    let mut w = Vec::new();
    floats(want, &mut w);
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(g.len(), w.len(), "sizes differ");
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn relative_position_buckets_match_transformers() {
    let fixture = read_json(&fixtures().join("buckets.json"));
    let positions = ints(&fixture["relative_positions"]);
    let mut checked = 0;
    for c in fixture["cases"].as_array().unwrap() {
        let nb = c["num_buckets"].as_u64().unwrap() as usize;
        let md = c["max_distance"].as_u64().unwrap() as usize;
        let bidir = c["bidirectional"].as_bool().unwrap();
        let buckets = ints(&c["buckets"]);
        assert_eq!(buckets.len(), positions.len());
        for (&rel, want) in positions.iter().zip(buckets) {
            let got = relative_position_bucket(rel, bidir, nb, md);
            assert_eq!(
                got as i64, want,
                "buckets {nb}, max distance {md}, bidirectional {bidir}, relative position {rel}"
            );
            checked += 1;
        }
    }
    assert!(checked > 4000, "{checked}");
}

#[test]
fn configs_are_read_as_transformers_reads_them() {
    let v10 = load("t5-v1_0").model.cfg;
    assert_eq!(v10.activation, Activation::Relu);
    assert!(!v10.gated && v10.tie_word_embeddings && v10.scale_decoder_outputs);
    assert_eq!((v10.num_layers, v10.num_decoder_layers), (2, 3));
    assert_eq!(v10.inner_dim(), 24);
    let m11 = load("t5-v1_1").model;
    let v11 = &m11.cfg;
    assert_eq!(v11.activation, Activation::GeluNew);
    assert!(v11.gated && !v11.tie_word_embeddings && !v11.scale_decoder_outputs);
    assert!(!m11.lm_head_tied());
    assert!(load("t5-v1_0").model.lm_head_tied());
    // transformers >= 5's own key wins over the tie.
    let mut raw = v10.raw.clone();
    raw["scale_decoder_outputs"] = false.into();
    assert!(
        !T5Config::from_hf_json(&raw, "config.json")
            .unwrap()
            .scale_decoder_outputs
    );
}

#[test]
fn linears_are_named_as_in_transformers_state_dict() {
    let m = load("t5-v1_1").model;
    let names: Vec<&str> = m.linears().iter().map(|l| l.name()).collect();
    for want in [
        "encoder.block.0.layer.0.SelfAttention.q",
        "encoder.block.1.layer.0.SelfAttention.o",
        "encoder.block.1.layer.1.DenseReluDense.wi_0",
        "encoder.block.1.layer.1.DenseReluDense.wi_1",
        "decoder.block.2.layer.1.EncDecAttention.k",
        "decoder.block.2.layer.2.DenseReluDense.wo",
        "lm_head",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    // 2 encoder blocks x (4 + 3), 3 decoder blocks x (8 + 3), the head.
    assert_eq!(names.len(), 2 * 7 + 3 * 11 + 1);
    let v10 = load("t5-v1_0").model;
    assert!(v10
        .linears()
        .iter()
        .any(|l| l.name() == "decoder.block.0.layer.2.DenseReluDense.wi"));
}

#[test]
fn encoder_outputs_and_logits_match_transformers() {
    for variant in VARIANTS {
        let m = load(variant).model;
        for (i, case) in expected(variant)["forward"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let input = int_matrix(&case["input_ids"], DType::U32);
            let mask = int_matrix(&case["attention_mask"], DType::U32);
            let dec = int_matrix(&case["decoder_input_ids"], DType::U32);
            let enc = m.encode(&input, Some(&mask), false).unwrap();
            let d = max_diff(&enc, &case["encoder_out"]);
            assert!(
                d < 1e-4,
                "{variant} case {i}: encoder output differs by {d}"
            );
            let logits = m.forward(&input, Some(&mask), &dec).unwrap();
            let dl = max_diff(&kept_logits(&logits, case), &case["logits"]);
            assert!(dl < 1e-4, "{variant} case {i}: logits differ by {dl}");
            eprintln!("{variant} case {i}: max |diff| encoder output {d:.2e}, logits {dl:.2e}");
        }
    }
}

#[test]
fn incremental_decoding_matches_the_whole_sequence() {
    for variant in VARIANTS {
        let m = load(variant).model;
        let case = &expected(variant)["forward"][1];
        let input = int_matrix(&case["input_ids"], DType::U32);
        let dec_ids = ids(&case["decoder_input_ids"][0]);
        let enc = m.encode(&input, None, false).unwrap();
        let mut cache = m.start_cache(&enc, None).unwrap();
        // The first two tokens at once (a causal prefill), then one at a time.
        let mut rows = Vec::new();
        let first = Tensor::new(&dec_ids[..2], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        rows.push(m.decode_step(&first, &mut cache).unwrap());
        for &id in &dec_ids[2..] {
            let t = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            rows.push(m.decode_step(&t, &mut cache).unwrap());
        }
        assert_eq!(cache.len(), dec_ids.len());
        let inc = Tensor::cat(&rows, 1).unwrap();
        let d = max_diff(&kept_logits(&inc, case), &case["logits"]);
        assert!(d < 1e-4, "{variant}: incremental logits differ by {d}");
        eprintln!("{variant}: incremental logits max |diff| {d:.2e}");
    }
}

#[test]
fn loss_matches_transformers() {
    for variant in VARIANTS {
        let m = load(variant).model;
        for case in expected(variant)["loss"].as_array().unwrap() {
            let input = int_matrix(&case["input_ids"], DType::U32);
            let mask = int_matrix(&case["attention_mask"], DType::U32);
            let labels = int_matrix(&case["labels"], DType::I64);
            let want = case["loss"].as_f64().unwrap();
            let got = m
                .loss(&input, Some(&mask), &labels, false)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let rel = (got - want).abs() / want.abs();
            assert!(rel < 1e-5, "{variant}: loss {got} vs {want} (rel {rel})");
            eprintln!("{variant}: loss {got} vs {want} (rel {rel:.2e})");
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for variant in VARIANTS {
        let lm = load(variant);
        for case in expected(variant)["generate"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let prompt_ids = lm.tokenizer.encode(prompt, true).unwrap();
            assert_eq!(prompt_ids, ids(&case["input_ids"]), "tokenizer: {prompt}");
            let cfg = GenerationConfig {
                max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                ..Default::default()
            };
            let mut dec = lm.model.decoder();
            let out =
                crate::generate::generate(&mut dec, &lm.tokenizer, &prompt_ids, &cfg, &mut |_| {})
                    .unwrap();
            // transformers: the start token, the generated ids, the EOS when reached.
            let mut got = vec![lm.model.cfg.decoder_start_token_id];
            got.extend(&out.token_ids);
            if out.stop_reason == StopReason::Eos {
                got.push(1);
            }
            assert_eq!(got, ids(&case["greedy"]), "{variant}: {prompt}");
            assert_eq!(out.text, case["greedy_text"].as_str().unwrap());
        }
    }
}

/// Sampling reuses the decoders' sampler: the same seed gives the same tokens, another seed
/// other ones.
#[test]
fn sampled_generation_follows_the_seed() {
    let lm = load("t5-v1_1");
    let prompt = ids(&expected("t5-v1_1")["generate"][0]["input_ids"]);
    let sample = |seed| {
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            temperature: 1.5,
            seed,
            stop_on_eos: false,
            ..Default::default()
        };
        crate::generate::generate(
            &mut lm.model.decoder(),
            &lm.tokenizer,
            &prompt,
            &cfg,
            &mut |_| {},
        )
        .unwrap()
        .token_ids
    };
    let a = sample(1);
    assert_eq!(a.len(), 12);
    assert_eq!(a, sample(1));
    assert!((2..6).any(|s| sample(s) != a), "every seed sampled {a:?}");
}

#[test]
fn beam_search_matches_transformers() {
    let mut ended_by_eos = 0;
    for variant in VARIANTS {
        let lm = load(variant);
        for case in expected(variant)["generate"].as_array().unwrap() {
            let prompt_ids = ids(&case["input_ids"]);
            for b in case["beams"].as_array().unwrap() {
                let early_stopping = match &b["early_stopping"] {
                    Value::Bool(false) => EarlyStopping::Heuristic,
                    Value::Bool(true) => EarlyStopping::Eager,
                    Value::String(s) if s == "never" => EarlyStopping::Never,
                    other => panic!("early_stopping {other}"),
                };
                let cfg = BeamConfig {
                    num_beams: b["num_beams"].as_u64().unwrap() as usize,
                    max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                    length_penalty: b["length_penalty"].as_f64().unwrap(),
                    early_stopping,
                    eos_ids: lm.eos_ids(),
                };
                let out = lm.model.generate_beam(&prompt_ids, &cfg).unwrap();
                let mut got = vec![lm.model.cfg.decoder_start_token_id];
                got.extend(&out.best.tokens);
                let want = ids(&b["ids"]);
                ended_by_eos += usize::from(want.last() == Some(&1));
                assert_eq!(got, want, "{variant}: {:?} {b}", case["prompt"]);
                let text = crate::beam::generate(
                    &mut lm.model.beam_decoder(&prompt_ids),
                    &lm.tokenizer,
                    prompt_ids.len(),
                    &cfg,
                    &[],
                )
                .unwrap()
                .text;
                assert_eq!(text, b["text"].as_str().unwrap());
            }
        }
    }
    assert!(
        ended_by_eos > 0,
        "no beam case reaches EOS: the EOS path is untested"
    );
}

#[test]
fn tokenizers_match_transformers() {
    let exp = read_json(&fixtures().join("tokenizer/expected.json"));
    // The folder with only spiece.model, and a model folder with transformers' tokenizer.json.
    let mut from_spm = Tokenizer::from_hf_dir(&fixtures().join("tokenizer")).unwrap();
    from_spm.set_add_eos(true);
    let from_json = load("t5-v1_0").tokenizer;
    assert_eq!(
        from_spm.vocab_size() as u64,
        exp["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(from_spm.eos_ids(), &[1]);
    assert_eq!(from_spm.pad_id(), Some(0));
    for case in exp["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            from_spm.encode(text, true).unwrap(),
            ids(&case["ids_spiece"]),
            "spiece.model: {text:?}"
        );
        let json_ids = ids(&case["ids_json"]);
        assert_eq!(
            from_json.encode(text, true).unwrap(),
            json_ids,
            "tokenizer.json: {text:?}"
        );
        assert_eq!(
            from_json.decode(&json_ids, true).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode: {text:?}"
        );
    }
}

#[test]
fn activations_backward_matches_finite_differences() {
    let x = gradcheck::rand_tensor(&[3, 7], DType::F64, 11).unwrap();
    // Away from ReLU's kink at 0.
    let x = (x.clone() + x.sign().unwrap().affine(0.05, 0.0).unwrap()).unwrap();
    for act in [
        Activation::Relu,
        Activation::GeluNew,
        Activation::Gelu,
        Activation::Silu,
    ] {
        gradcheck::check_gradients(|t| act.apply(&t[0]), std::slice::from_ref(&x), 1e-6, 1e-4)
            .unwrap_or_else(|e| panic!("{act:?}: {e}"));
    }
}

fn grad_norm(g: &Tensor) -> f32 {
    g.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn loss_case(variant: &str) -> (Tensor, Tensor, Tensor) {
    let case = &expected(variant)["loss"][0];
    (
        int_matrix(&case["input_ids"], DType::U32),
        int_matrix(&case["attention_mask"], DType::U32),
        int_matrix(&case["labels"], DType::I64),
    )
}

#[test]
fn every_parameter_gets_a_gradient_in_full_fine_tuning() {
    for variant in VARIANTS {
        let mut m = load(variant).model;
        let params = m.make_trainable(None).unwrap();
        let n_norms = 2 * 2 + 1 + 3 * 3 + 1;
        let n_linears = m.linears().len() - usize::from(m.lm_head_tied());
        assert_eq!(params.len(), 1 + n_linears + n_norms + 2, "{variant}");
        let (input, mask, labels) = loss_case(variant);
        let loss = m.loss(&input, Some(&mask), &labels, true).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &params {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{variant}: no gradient for {name}"));
            let n = grad_norm(g);
            assert!(n > 0.0 && n.is_finite(), "{variant}: {name} has norm {n}");
        }
    }
}

#[test]
fn lora_adapters_on_every_linear_get_gradients() {
    for variant in VARIANTS {
        let mut m = load(variant).model;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for lin in m.linears_mut() {
            let a = LoraAdapter::new(
                lin.in_features(),
                lin.out_features(),
                2,
                4.0,
                2.0,
                0.0,
                LoraInit::Random,
                &mut rng,
                0,
                &Device::Cpu,
            )
            .unwrap();
            lin.add_adapter("default", Box::new(a));
        }
        let (input, mask, labels) = loss_case(variant);
        let loss = m.loss(&input, Some(&mask), &labels, true).unwrap();
        let grads = loss.backward().unwrap();
        let mut n = 0;
        for lin in m.linears() {
            for (_, a) in lin.adapters() {
                for (p, v) in a.trainable_params() {
                    let g = grads
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{variant}: no gradient for {}.{p}", lin.name()));
                    let norm = grad_norm(g);
                    assert!(norm > 0.0 && norm.is_finite(), "{}.{p}: {norm}", lin.name());
                    n += 1;
                }
            }
        }
        assert_eq!(n, 2 * m.linears().len());
    }
}

/// An edit of a config.json value.
type Edit = Box<dyn Fn(&mut Value)>;

/// A one-line error from `T5Config::from_hf_json` on the v1.1 config with `edit` applied.
fn config_error(edit: impl Fn(&mut Value)) -> String {
    let mut v = read_json(&fixtures().join("t5-v1_1/config.json"));
    edit(&mut v);
    let e = T5Config::from_hf_json(&v, "config.json")
        .expect_err("a bad config must be refused")
        .to_string();
    assert!(!e.contains('\n') && e.starts_with("config.json"), "{e}");
    e
}

#[test]
fn bad_configs_are_one_line_errors_naming_the_key() {
    let cases: Vec<(&str, Edit)> = vec![
        ("d_model", Box::new(|v| v["d_model"] = 0.into())),
        ("d_model", Box::new(|v| v["d_model"] = (-3).into())),
        ("d_kv", Box::new(|v| v["d_kv"] = "8".into())),
        (
            "num_heads",
            Box::new(|v| v["num_heads"] = (1u64 << 40).into()),
        ),
        (
            "vocab_size",
            Box::new(|v| v["vocab_size"] = (1u64 << 30).into()),
        ),
        ("num_layers", Box::new(|v| v["num_layers"] = 100_000.into())),
        (
            "feed_forward_proj",
            Box::new(|v| v["feed_forward_proj"] = "gated-tanh".into()),
        ),
        (
            "feed_forward_proj",
            Box::new(|v| v["feed_forward_proj"] = "a-b-c".into()),
        ),
        (
            "relative_attention_num_buckets",
            Box::new(|v| v["relative_attention_num_buckets"] = 2.into()),
        ),
        (
            "relative_attention_max_distance",
            Box::new(|v| v["relative_attention_max_distance"] = 4.into()),
        ),
        (
            "layer_norm_epsilon",
            Box::new(|v| v["layer_norm_epsilon"] = (-1.0).into()),
        ),
        ("eos_token_id", Box::new(|v| v["eos_token_id"] = 256.into())),
        (
            "decoder_start_token_id",
            Box::new(|v| v["decoder_start_token_id"] = 9999.into()),
        ),
        (
            "tie_word_embeddings",
            Box::new(|v| v["tie_word_embeddings"] = "no".into()),
        ),
        (
            "model_type",
            Box::new(|v| {
                v["model_type"] = "bert".into();
                v["architectures"] = serde_json::json!(["BertModel"]);
            }),
        ),
    ];
    for (key, edit) in cases {
        let e = config_error(edit);
        assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
    }
}

/// A copy of a fixture folder with its config.json edited.
fn edited_folder(variant: &str, tag: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-t5-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join(variant)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let mut v = read_json(&dir.join("config.json"));
    edit(&mut v);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    dir
}

#[test]
fn configs_that_do_not_fit_the_weights_are_refused_before_loading() {
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("ff", Box::new(|v| v["d_ff"] = 31.into()), "d_ff 31"),
        (
            "layers",
            Box::new(|v| v["num_layers"] = 1.into()),
            "num_layers",
        ),
        (
            "declayers",
            Box::new(|v| v["num_decoder_layers"] = 4.into()),
            "decoder.block.3",
        ),
        (
            "gated",
            Box::new(|v| v["feed_forward_proj"] = "relu".into()),
            "DenseReluDense.wi.weight",
        ),
        (
            "heads",
            Box::new(|v| v["num_heads"] = 4.into()),
            "num_heads 4",
        ),
        (
            "vocab",
            Box::new(|v| v["vocab_size"] = 200.into()),
            "vocab_size",
        ),
    ];
    for (tag, edit, want) in cases {
        let dir = edited_folder("t5-v1_1", tag, edit);
        let e = match load_source(
            ModelSource::HfDir(dir.clone()),
            &LoadOptions::default(),
            &Device::Cpu,
            &crate::progress::NoProgress,
        ) {
            Ok(_) => panic!("{tag}: loaded"),
            Err(e) => e.to_string(),
        };
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!e.contains('\n') && e.contains(want), "{tag}: {e}");
    }
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let m = load("t5-v1_1").model;
    let dev = Device::Cpu;
    let ok = Tensor::new(&[[5u32, 6, 1]], &dev).unwrap();
    let cases: Vec<(Result<Tensor>, &str)> = vec![
        (
            m.loss(&ok, None, &Tensor::new(&[[5i64, -3]], &dev).unwrap(), false),
            "-3 is neither",
        ),
        (
            m.loss(
                &ok,
                None,
                &Tensor::new(&[[5i64, 256]], &dev).unwrap(),
                false,
            ),
            "256 is neither",
        ),
        (
            m.loss(
                &ok,
                None,
                &Tensor::new(&[[-100i64, -100]], &dev).unwrap(),
                false,
            ),
            "nothing to score",
        ),
        (
            m.encode(&Tensor::new(&[[5u32, 300]], &dev).unwrap(), None, false),
            "token id 300",
        ),
        (
            m.encode(&ok, Some(&Tensor::new(&[[1u32, 1]], &dev).unwrap()), false),
            "attention mask",
        ),
    ];
    for (r, want) in cases {
        let e = r.expect_err(want).to_string();
        assert!(!e.contains('\n') && e.contains(want), "{e}");
    }
}

// ---------------------------------------------------------------- learning a task

/// Random weights for a small gated T5, as a folder `T5::load` reads.
fn random_t5_folder(tag: &str, vocab: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-t5-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": vocab, "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64,
        "num_layers": 2, "num_decoder_layers": 2, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 32, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": false, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
        // The backward pass is what these runs check: no dropout (transformers' default is 0.1).
        "dropout_rate": 0.0,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg = T5Config::from_hf_json(&config, "config.json").unwrap();
    let mut seed = 0u64;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], std: f64| {
        seed += 1;
        let t = if name.ends_with("layer_norm.weight") {
            Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
        } else {
            (gradcheck::rand_tensor(shape, DType::F32, seed).unwrap() * (std * 3f64.sqrt()))
                .unwrap()
        };
        tensors.push((name, t));
    };
    struct Probe(std::collections::HashSet<String>);
    impl WeightSource for Probe {
        fn device(&self) -> &Device {
            &Device::Cpu
        }
        fn source_name(&self) -> String {
            "probe".into()
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains(name)
        }
        fn tensor_shape(&self, _: &str) -> Option<Vec<usize>> {
            None
        }
        fn layers_present(&self) -> usize {
            0
        }
        fn dense(&self, _: &str) -> Result<Tensor> {
            unreachable!()
        }
        fn linear_weight(&self, _: &str) -> Result<LinearWeight> {
            unreachable!()
        }
        fn embedding_weight(&self, _: &str) -> Result<EmbeddingWeight> {
            unreachable!()
        }
    }
    let probe = Probe(["shared.weight".to_string()].into_iter().collect());
    for t in expected_tensors(&cfg, &probe, "shared.weight") {
        let std = if t.name.contains("relative_attention_bias") {
            0.5
        } else if t.shape.len() == 2 {
            1.0 / (t.shape[1] as f64).sqrt()
        } else {
            1.0
        };
        add(t.name, &t.shape, std);
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    dir
}

/// Reverse a sequence: inputs `w1 .. wn </s>`, targets `wn .. w1 </s>`, words from 3..vocab.
fn reverse_batch(
    rng: &mut rand::rngs::StdRng,
    n: usize,
    len: usize,
    vocab: u32,
) -> (Tensor, Tensor) {
    use rand::Rng;
    let mut input = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let words: Vec<u32> = (0..len).map(|_| rng.random_range(3..vocab)).collect();
        input.extend(words.iter().copied().chain([1]));
        labels.extend(words.iter().rev().map(|&w| w as i64).chain([1]));
    }
    let dev = &Device::Cpu;
    (
        Tensor::from_vec(input, (n, len + 1), dev).unwrap(),
        Tensor::from_vec(labels, (n, len + 1), dev).unwrap(),
    )
}

/// The backward pass end to end: a small random T5 trained from scratch with AdamW on every
/// parameter learns to reverse 4-token sequences (300 steps of 32, ~10 s), then reverses
/// sequences it has not seen by greedy decoding.
#[test]
fn a_tiny_t5_learns_to_reverse_sequences() {
    use crate::train::optim::{AdamW, AdamWConfig};
    let (vocab, len, steps) = (16u32, 4, 300);
    let dir = random_t5_folder("reverse", vocab as usize);
    let cfg = config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut m = T5::load(&src, &cfg).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let params = m.make_trainable(None).unwrap();
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut first = None;
    let mut last = Vec::new();
    for step in 0..steps {
        let (input, labels) = reverse_batch(&mut rng, 32, len, vocab);
        let loss = m.loss(&input, None, &labels, true).unwrap();
        let value = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(value);
        if step + 20 >= steps {
            last.push(value);
        }
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().clone())
            .collect();
        opt.step(&g, 3e-3).unwrap();
    }
    let first = first.unwrap();
    let end = last.iter().sum::<f32>() / last.len() as f32;
    assert!(
        end < 0.1 * first,
        "the loss fell from {first} only to {end}"
    );
    let mut right = 0;
    let tests = 20;
    for _ in 0..tests {
        let (input, labels) = reverse_batch(&mut rng, 1, len, vocab);
        let prompt: Vec<u32> = input.squeeze(0).unwrap().to_vec1().unwrap();
        let want: Vec<u32> = labels
            .squeeze(0)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|l| l as u32)
            .collect();
        let mut dec = m.decoder();
        let mut logits = dec.prefill(&prompt).unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() + 2 {
            let next = crate::generate::argmax(&logits);
            got.push(next);
            if next == 1 {
                break;
            }
            logits = dec.step(next).unwrap();
        }
        right += usize::from(got == want);
    }
    assert!(
        right * 10 >= tests * 9,
        "{right} of {tests} sequences reversed (loss {first} -> {end})"
    );
}

/// The incremental decoder refuses use before its prompt; bad beam settings are errors.
#[test]
fn decoder_edge_cases() {
    let lm = load("t5-v1_1");
    let mut dec = lm.model.decoder();
    let e = dec.step(3).unwrap_err().to_string();
    assert!(e.contains("before prefill"), "{e}");
    assert!(dec.prefill(&[]).unwrap_err().to_string().contains("empty"));
    let e = lm
        .model
        .generate_beam(
            &[5, 1],
            &BeamConfig {
                num_beams: 0,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("`num_beams`"), "{e}");
}

/// The general loader (`model::load_source`) gives a T5 behind the `Model` interface, and its
/// `loss_sum` over a decoder-target batch is transformers' loss times the label count.
#[test]
fn t5_through_the_model_interface_matches_transformers_loss() {
    use crate::model::family::{ArchitectureKind, Model, Objective, TaskType};
    for variant in VARIANTS {
        let lm = crate::model::load_source(
            ModelSource::HfDir(fixtures().join(variant)),
            &LoadOptions::default(),
            &Device::Cpu,
        )
        .unwrap();
        let m: &dyn Model = &lm.model;
        assert_eq!(m.family(), "t5");
        assert_eq!(m.kind(), ArchitectureKind::EncoderDecoder);
        assert_eq!(m.pretraining_objective(), Objective::SpanCorruption);
        assert_eq!(m.task_type(), TaskType::Seq2SeqLm);
        assert_eq!(m.architecture(), "T5ForConditionalGeneration");
        let case = &expected(variant)["loss"][0];
        let labels = int_matrix(&case["labels"], DType::I64);
        let n_labels = ints(&case["labels"][0]).len();
        let mut batch = Batch {
            input_ids: int_matrix(&case["input_ids"], DType::U32),
            labels: labels.clone(),
            targets: Targets::Decoder,
            attention_mask: int_matrix(&case["attention_mask"], DType::U8),
            position_ids: int_matrix(&case["attention_mask"], DType::U32),
            segment_ids: None,
            n_loss_tokens: 0,
            n_tokens: 0,
            sources: Vec::new(),
        };
        let (sum, n) = m.loss_sum(&batch, false).unwrap();
        assert!(n > 0 && n <= labels.elem_count() && n_labels > 0);
        // An evaluation's loss, computed without the autograd graph: the same to the bit.
        let (again, _) = crate::nn::without_graph(|| m.loss_sum(&batch, false)).unwrap();
        assert_eq!(
            sum.to_scalar::<f32>().unwrap().to_bits(),
            again.to_scalar::<f32>().unwrap().to_bits()
        );
        let got = sum.to_scalar::<f32>().unwrap() as f64 / n as f64;
        let want = case["loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() / want.abs() < 1e-5,
            "{variant}: {got} vs {want}"
        );
        let logits = m.logits(&batch).unwrap();
        assert_eq!(logits.dim(2).unwrap(), m.dims().vocab_size);
        batch.targets = Targets::NextToken;
        let e = m.loss_sum(&batch, false).unwrap_err().to_string();
        assert!(e.contains("encoder-decoder") && !e.contains('\n'), "{e}");
    }
}
