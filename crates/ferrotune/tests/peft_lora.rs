//! LoRA end to end on the tiny HF fixtures: forward against a dense reference, gradients (also
//! through quantized bases), merge/unmerge, target matching and the parameter report against
//! PEFT (tests/fixtures/peft/matching.json), adapter files to and from PEFT
//! (fixtures written by reference/peft_check.py).
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use ferrotune::model::{self, LoadOptions};
use ferrotune::nn::LinearWeight;
use ferrotune::peft::lora::{self, LoraConfig, ModuleSpec};
use ferrotune::peft::{self, format};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

use crate::common;
use common::{
    finite_difference, flat, floats, max_abs_diff as tensor_diff, max_diff, read_json, repo,
    tiny_with,
};

const BASE: &str = "tiny-llama-gqa-untied";

fn tiny() -> model::Llama {
    tiny_with(BASE, &LoadOptions::default())
}

fn ids() -> Vec<u32> {
    (0..24u32).map(|i| (i * 37 + 11) % 256).collect()
}

fn logits(m: &model::Llama, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    flat(&m.forward(&t, None).unwrap())
}

fn nll_mean(m: &model::Llama, ids: &[u32]) -> f64 {
    let n = ferrotune::perplexity::sequence_nll(m, ids, usize::MAX, usize::MAX).unwrap();
    n.total / n.tokens as f64
}

/// Give every LoRA tensor of `adapter` random values (B non-zero, so the adapter matters).
fn randomize(m: &model::Llama, adapter: &str, seed: u64, amp: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, v) in peft::adapter_params(m, adapter) {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-amp..amp)).collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

fn lm_loss(m: &model::Llama, ids: &[u32]) -> Tensor {
    let input = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let target = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    let h = m.forward_hidden(&input, None, true).unwrap();
    let logits = m.lm_head.forward_t(&h, true).unwrap().squeeze(0).unwrap();
    candle_nn::loss::cross_entropy(&logits, &target).unwrap()
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-peft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn zero_b_adapter_leaves_the_output_unchanged() {
    let base = logits(&tiny(), &ids());
    let mut m = tiny();
    let cfg = LoraConfig::new(
        4,
        8.0,
        &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    );
    let info = lora::attach_lora(&mut m, &cfg, "default", 3).unwrap();
    assert_eq!(info.modules.len(), 10);
    // PEFT's default init: B = 0, so the adapter is exactly a no-op at the start.
    assert_eq!(logits(&m, &ids()), base);
}

/// The on-the-fly adapter equals a model whose weights are W + scale·B·A, built densely here.
#[test]
fn random_adapter_forward_equals_dense_merged_reference() {
    let mut m = tiny();
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "up_proj"]);
    cfg.rank_pattern.insert("up_proj".into(), 2);
    cfg.use_rslora = true;
    let info = lora::attach_lora(&mut m, &cfg, "default", 1).unwrap();
    randomize(&m, "default", 11, 0.3);
    let mut reference = tiny();
    for lin in reference.linears_mut() {
        let Some(mi) = info.modules.iter().find(|mi| mi.name == lin.name()) else {
            continue;
        };
        let params = peft::adapter_params(&m, "default");
        let get = |p: &str| {
            params
                .iter()
                .find(|(n, _)| n == &format!("{}.{p}", lin.name()))
                .unwrap()
                .1
                .as_tensor()
                .clone()
        };
        let (a, b) = (get("lora_A.weight"), get("lora_B.weight"));
        assert_eq!(a.dims(), &[mi.r, lin.in_features()]);
        let want_scale = mi.alpha / (mi.r as f64).sqrt();
        assert!((mi.scale - want_scale).abs() < 1e-12);
        let w = lin.weight().to_dense_f32().unwrap();
        let merged = (w + (b.matmul(&a).unwrap() * want_scale).unwrap()).unwrap();
        lin.set_weight(LinearWeight::Frozen(merged));
    }
    let d = max_diff(&logits(&m, &ids()), &logits(&reference, &ids()));
    assert!(d < 1e-4, "max |logit diff| {d}");
    assert!(
        max_diff(&logits(&m, &ids()), &logits(&tiny(), &ids())) > 1e-2,
        "the random adapter should change the logits"
    );
}

/// Every LoRA tensor gets a non-zero gradient, with dense and quantized (Q8_0, Q4_1) bases,
/// and a quantized base stays quantized.
#[test]
fn every_lora_var_gets_a_nonzero_gradient() {
    for requantize in [None, Some(GgmlDType::Q8_0), Some(GgmlDType::Q4_1)] {
        let mut m = tiny_with(
            BASE,
            &LoadOptions {
                requantize,
                ..Default::default()
            },
        );
        let mut cfg = LoraConfig::new(4, 8.0, &[]);
        cfg.target_modules = Some(ModuleSpec::One("all-linear".into()));
        // Random B as well: with B = 0 the gradient of A is exactly zero at step 0.
        cfg.init_lora_weights = lora::InitLoraWeights::Bool(false);
        cfg.lora_dropout = 0.1;
        lora::attach_lora(&mut m, &cfg, "default", 5).unwrap();
        if requantize.is_some() {
            assert!(m
                .linears()
                .iter()
                .filter(|l| l.name() != "lm_head")
                .all(|l| matches!(l.weight(), LinearWeight::Quantized(_))));
        }
        let params = peft::adapter_params(&m, "default");
        assert_eq!(params.len(), 2 * 14);
        let grads = lm_loss(&m, &ids()).backward().unwrap();
        for (name, v) in &params {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{requantize:?}: no gradient for {name}"));
            let n: f32 = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                n > 0.0 && n.is_finite(),
                "{requantize:?}: |grad {name}| = {n}"
            );
        }
    }
}

#[test]
fn lora_gradient_matches_finite_differences() {
    let mut m = tiny();
    let cfg = LoraConfig::new(2, 4.0, &["v_proj", "gate_proj"]);
    lora::attach_lora(&mut m, &cfg, "default", 9).unwrap();
    randomize(&m, "default", 4, 0.2);
    let ids = ids();
    // Evaluate without dropout (p = 0) so the loss is deterministic.
    let grads = lm_loss(&m, &ids).backward().unwrap();
    let params = peft::adapter_params(&m, "default");
    for pname in [
        "model.layers.0.self_attn.v_proj.lora_A.weight",
        "model.layers.1.mlp.gate_proj.lora_B.weight",
    ] {
        let v = &params.iter().find(|(n, _)| n == pname).unwrap().1;
        let g: Vec<f32> = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for &i in &[0usize, 7, 50] {
            let fd = finite_difference(v, &base, i, 1e-2, || {
                lm_loss(&m, &ids).to_scalar::<f32>().unwrap()
            });
            assert!(
                (fd - g[i]).abs() < 2e-3 + 2e-2 * g[i].abs(),
                "{pname}[{i}]: autograd {} vs finite diff {fd}",
                g[i]
            );
        }
    }
}

/// Merging gives the on-the-fly output; unmerging gives back the base weights.
#[test]
fn merge_equals_on_the_fly_and_unmerge_restores_the_base() {
    // f32 base.
    let mut m = tiny();
    let before: Vec<Tensor> = m
        .linears()
        .iter()
        .map(|l| l.weight().to_dense_f32().unwrap())
        .collect();
    let cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    lora::attach_lora(&mut m, &cfg, "default", 2).unwrap();
    randomize(&m, "default", 8, 0.3);
    let on_the_fly = logits(&m, &ids());
    let report = lora::merge_adapter(&mut m, "default").unwrap();
    assert_eq!(report.modules.len(), 6);
    assert_eq!(report.message(), None);
    let merged = logits(&m, &ids());
    let d = max_diff(&merged, &on_the_fly);
    assert!(d < 1e-4, "merged vs on the fly: {d}");
    assert!(lora::merge_adapter(&mut m, "default")
        .unwrap_err()
        .to_string()
        .contains("already merged"));
    lora::unmerge_adapter(&mut m, "default").unwrap();
    for (w0, l) in before.iter().zip(m.linears()) {
        let d = tensor_diff(w0, &l.weight().to_dense_f32().unwrap());
        assert!(d < 1e-6, "{}: unmerged weight differs by {d}", l.name());
    }
    let d = max_diff(&logits(&m, &ids()), &on_the_fly);
    assert!(d < 1e-4, "after unmerge: {d}");

    // bf16 base: the merge is done in bf16, so unmerge is exact only up to bf16 rounding.
    let bf = LoadOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    let mut m = tiny_with(BASE, &bf);
    let base_logits = logits(&m, &ids());
    let q0 = m.layers[0]
        .self_attn
        .q_proj
        .weight()
        .to_dense_f32()
        .unwrap();
    lora::attach_lora(&mut m, &cfg, "default", 2).unwrap();
    randomize(&m, "default", 8, 0.3);
    let params = peft::adapter_params(&m, "default");
    let get = |n: &str| {
        params
            .iter()
            .find(|(p, _)| p == n)
            .unwrap()
            .1
            .as_tensor()
            .clone()
    };
    let (a, b) = (
        get("model.layers.0.self_attn.q_proj.lora_A.weight"),
        get("model.layers.0.self_attn.q_proj.lora_B.weight"),
    );
    let want = (&q0 + (b.matmul(&a).unwrap() * 2.0).unwrap())
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let on_the_fly = logits(&m, &ids());
    lora::merge_adapter(&mut m, "default").unwrap();
    let LinearWeight::Frozen(got) = m.layers[0].self_attn.q_proj.weight() else {
        panic!("bf16 base should stay a dense frozen weight");
    };
    assert_eq!(got.dtype(), DType::BF16);
    assert_eq!(
        tensor_diff(got, &want),
        0.0,
        "bf16 merge is not round(W + dW)"
    );
    // bf16 rounding of the merged weights moves the logits a little, far less than the adapter.
    let d = max_diff(&logits(&m, &ids()), &on_the_fly);
    let moved = max_diff(&base_logits, &on_the_fly);
    assert!(
        d < 0.2 * moved,
        "bf16 merged vs on the fly: {d} (adapter moved logits by {moved})"
    );
    lora::unmerge_adapter(&mut m, "default").unwrap();
    let d = tensor_diff(
        &q0,
        &m.layers[0]
            .self_attn
            .q_proj
            .weight()
            .to_dense_f32()
            .unwrap(),
    );
    assert!(d < 4e-3, "bf16 unmerge: {d}");

    // Quantized base: merged into the dequantized f32 weight; the reference runs the same
    // adapter on the fly over that dequantized weight.
    let q8 = LoadOptions {
        requantize: Some(GgmlDType::Q8_0),
        ..Default::default()
    };
    let mut m = tiny_with(BASE, &q8);
    let mut reference = tiny_with(BASE, &q8);
    // Only the targeted layers change type when merging; the others stay quantized in both.
    for lin in reference.linears_mut() {
        if cfg.matches(lin.name()).unwrap() {
            let w = lin.weight().to_dense_f32().unwrap();
            lin.set_weight(LinearWeight::Frozen(w));
        }
    }
    for mm in [&mut m, &mut reference] {
        lora::attach_lora(mm, &cfg, "default", 2).unwrap();
        randomize(mm, "default", 8, 0.3);
    }
    let report = lora::merge_and_unload(&mut m, "default").unwrap();
    assert_eq!(
        report.message().as_deref(),
        Some("dequantized Q8_0 base to f32 for merging")
    );
    assert!(peft::adapter_names(&m).is_empty());
    assert_eq!(m.layers[1].mlp.down_proj.weight().stored_type(), "f32");
    assert!(matches!(
        m.layers[1].mlp.up_proj.weight(),
        LinearWeight::Quantized(_)
    ));
    let d = max_diff(&logits(&m, &ids()), &logits(&reference, &ids()));
    // The layers still quantized see inputs that differ by float rounding (merged weight vs
    // on-the-fly adapter), which can move their 16-bit activation quantization by one step.
    assert!(d < 1e-3, "Q8_0 merged vs dequantized base + adapter: {d}");
}

/// Target matching, per-module rank/scale and the trainable-parameter line equal PEFT's for
/// every case in tests/fixtures/peft/matching.json.
#[test]
fn target_matching_and_report_agree_with_peft() {
    let exp = read_json(&repo().join("tests/fixtures/peft/matching.json"));
    for case in exp["cases"].as_array().unwrap() {
        let cfg: LoraConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let mut m = tiny();
        let info = lora::attach_lora(&mut m, &cfg, "default", 0).unwrap();
        let want: Vec<&str> = case["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let got: Vec<&str> = info.modules.iter().map(|mi| mi.name.as_str()).collect();
        assert_eq!(got, want, "{}", case["config"]);
        for (k, mi) in info.modules.iter().enumerate() {
            assert_eq!(
                mi.r as u64,
                case["ranks"][k].as_u64().unwrap(),
                "{}",
                mi.name
            );
            let s = case["scales"][k].as_f64().unwrap();
            assert!(
                (mi.scale - s).abs() < 1e-12,
                "{}: {} vs {s}",
                mi.name,
                mi.scale
            );
        }
        assert_eq!(
            info.report(),
            case["report"].as_str().unwrap(),
            "{}",
            case["config"]
        );
    }
}

#[test]
fn unknown_targets_and_names_are_one_line_errors() {
    let mut m = tiny();
    let e = lora::attach_lora(
        &mut m,
        &LoraConfig::new(4, 8.0, &["q_proj", "qproj"]),
        "a",
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`qproj`") && e.contains("q_proj, k_proj") && !e.contains('\n'),
        "{e}"
    );
    let mut cfg = LoraConfig::new(4, 8.0, &[]);
    cfg.target_modules = Some(ModuleSpec::One(r".*attn\.x_proj".into()));
    let e = lora::attach_lora(&mut m, &cfg, "a", 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains(r"`.*attn\.x_proj`") && !e.contains('\n'), "{e}");
    // Nothing was attached by the failed calls.
    assert!(peft::adapter_names(&m).is_empty());
    lora::attach_lora(&mut m, &LoraConfig::new(4, 8.0, &["q_proj"]), "a", 0).unwrap();
    let e = lora::attach_lora(&mut m, &LoraConfig::new(4, 8.0, &["v_proj"]), "a", 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already attached"), "{e}");
    let e = lora::merge_adapter(&mut m, "b").unwrap_err().to_string();
    assert_eq!(e, "no adapter named `b` is attached (attached: a)");
}

#[test]
fn save_then_load_roundtrip_is_bit_exact() {
    let mut m = tiny();
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    cfg.rank_pattern.insert("down_proj".into(), 2);
    cfg.base_model_name_or_path = Some("tests/fixtures/models/tiny-llama-gqa-untied".into());
    lora::attach_lora(&mut m, &cfg, "default", 4).unwrap();
    randomize(&m, "default", 21, 0.5);
    let dir = temp_dir("roundtrip");
    format::save_adapter(&m, "default", &cfg, &dir).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    // PEFT's key layout.
    let st = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(st.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert_eq!(
        st["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].dims(),
        &[64, 2]
    );

    let mut fresh = tiny();
    let loaded = format::load_adapter(&mut fresh, &dir, "reloaded").unwrap();
    match &loaded.config {
        format::AdapterConfig::Lora(c) => assert_eq!(c, &cfg),
        other => panic!("a LoRA adapter read back as {}", other.peft_type()),
    }
    assert_eq!(loaded.modules.len(), 6);
    let a = peft::adapter_params(&m, "default");
    let b = peft::adapter_params(&fresh, "reloaded");
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let x: Vec<f32> = va.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = vb.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{na} not bit-exact"
        );
    }
    assert_eq!(logits(&m, &ids()), logits(&fresh, &ids()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_adapter_folders_are_one_line_errors_and_attach_nothing() {
    let mut m = tiny();
    let cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    lora::attach_lora(&mut m, &cfg, "default", 4).unwrap();
    let dir = temp_dir("bad");
    format::save_adapter(&m, "default", &cfg, &dir).unwrap();
    let st_path = dir.join("adapter_model.safetensors");
    let mut st = candle_core::safetensors::load(&st_path, &Device::Cpu).unwrap();
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";

    // Wrong shape.
    let good = st[key].clone();
    st.insert(
        key.into(),
        Tensor::zeros((32, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&st, &st_path).unwrap();
    let mut fresh = tiny();
    let e = format::load_adapter(&mut fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains(key) && e.contains("[32, 3]"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    assert!(peft::adapter_names(&fresh).is_empty());

    // Missing tensor.
    st.remove(key);
    candle_core::safetensors::save(&st, &st_path).unwrap();
    let e = format::load_adapter(&mut fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains(key) && e.contains("missing"), "{e}");

    // Extra tensor.
    st.insert(key.into(), good);
    st.insert(
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
        Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&st, &st_path).unwrap();
    let e = format::load_adapter(&mut fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("up_proj.lora_A.weight"), "{e}");
    assert!(peft::adapter_names(&fresh).is_empty());

    // Unsupported method and r mismatch in the config.
    let cfg_path = dir.join("adapter_config.json");
    let mut v = read_json(&cfg_path);
    v["peft_type"] = "ADALORA".into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = format::load_adapter(&mut fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json: key `peft_type`: `ADALORA` is not supported"),
        "{e}"
    );
    v["peft_type"] = "LORA".into();
    v["target_modules"] = serde_json::json!(["q_proj", "w_proj"]);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = format::load_adapter(&mut fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("`w_proj`"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two adapters on one base: each can be selected alone, both run together, and all adapters
/// can be switched off to get the base back.
#[test]
fn several_adapters_can_be_selected_enabled_and_disabled() {
    let base = logits(&tiny(), &ids());
    let only = |targets: &[&str], seed: u64| {
        let mut m = tiny();
        lora::attach_lora(&mut m, &LoraConfig::new(4, 8.0, targets), "x", seed).unwrap();
        randomize(&m, "x", seed, 0.3);
        logits(&m, &ids())
    };
    let only_a = only(&["q_proj", "v_proj"], 1);
    let only_b = only(&["v_proj", "o_proj"], 2);

    let mut m = tiny();
    lora::attach_lora(
        &mut m,
        &LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]),
        "a",
        1,
    )
    .unwrap();
    randomize(&m, "a", 1, 0.3);
    lora::attach_lora(
        &mut m,
        &LoraConfig::new(4, 8.0, &["v_proj", "o_proj"]),
        "b",
        2,
    )
    .unwrap();
    randomize(&m, "b", 2, 0.3);
    assert_eq!(peft::adapter_names(&m), ["a", "b"]);
    let both = logits(&m, &ids());
    assert!(max_diff(&both, &only_a) > 1e-2 && max_diff(&both, &only_b) > 1e-2);

    lora::set_active_adapters(&m, &["a"]).unwrap();
    assert!(max_diff(&logits(&m, &ids()), &only_a) < 1e-5);
    lora::set_active_adapters(&m, &["b"]).unwrap();
    assert!(max_diff(&logits(&m, &ids()), &only_b) < 1e-5);
    lora::set_adapter_active(&m, "a", true).unwrap();
    assert!(max_diff(&logits(&m, &ids()), &both) < 1e-5);
    peft::set_adapters_enabled(&mut m, false);
    assert_eq!(logits(&m, &ids()), base);
    peft::set_adapters_enabled(&mut m, true);
    // Params are reported per adapter; "all" counts both.
    let pa = peft::param_count(&m, "a");
    let pb = peft::param_count(&m, "b");
    assert_eq!(pa.all, pb.all);
    assert_eq!(
        pa.trainable,
        peft::adapter_params(&m, "a")
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
    );
    peft::remove_adapter(&mut m, "b").unwrap();
    assert!(max_diff(&logits(&m, &ids()), &only_a) < 1e-5);
}

/// (a) The adapter PEFT wrote (reference/peft_check.py) loads here and gives PEFT's logits and
/// NLL; merging it gives PEFT's merge_and_unload() weights.
#[test]
fn peft_written_adapter_matches_peft() {
    let dir = repo().join("tests/fixtures/peft/tiny-lora-peft");
    let exp = read_json(&dir.join("expected.json"));
    let ids: Vec<u32> = exp["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let mut m = tiny();
    let loaded = format::load_adapter(&mut m, &dir, "default").unwrap();
    assert_eq!(loaded.modules.len(), 4);
    assert_eq!(loaded.params.to_string(), exp["report"].as_str().unwrap());
    let d = max_diff(&logits(&m, &ids), &floats(&exp["logits"]));
    let nll = nll_mean(&m, &ids);
    let want = exp["nll_mean"].as_f64().unwrap();
    let rel = ((nll - want) / want).abs();
    eprintln!("PEFT adapter: max |logit diff| {d:e}; nll {nll:.8} vs PEFT {want:.8} (rel {rel:e})");
    assert!(d < 1e-4, "max |logit diff| {d}");
    assert!(rel < 1e-4, "nll {nll} vs {want}");

    let report = lora::merge_adapter(&mut m, "default").unwrap();
    let merged =
        candle_core::safetensors::load(dir.join("merged_targets.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(merged.len(), report.modules.len());
    let mut worst = 0f32;
    for lin in m.linears() {
        if let Some(w) = merged.get(&format!("{}.weight", lin.name())) {
            worst = worst.max(tensor_diff(w, &lin.weight().to_dense_f32().unwrap()));
        }
    }
    eprintln!("PEFT adapter: max |merged weight diff| {worst:e}");
    assert!(worst < 1e-5, "merged weights differ from PEFT's by {worst}");
    let rel = ((nll_mean(&m, &ids) - want) / want).abs();
    assert!(rel < 1e-4, "merged nll rel diff {rel}");
}

/// The adapter ferrotune writes for PEFT to check (reference/peft_check.py --check-ours DIR):
/// r=8, alpha=16, rsLoRA, all-linear with rank/alpha patterns, random A and B.
fn ferrotune_adapter_config() -> LoraConfig {
    let mut cfg = LoraConfig::new(8, 16.0, &[]);
    cfg.target_modules = Some(ModuleSpec::One("all-linear".into()));
    cfg.use_rslora = true;
    cfg.rank_pattern.insert("o_proj".into(), 2);
    cfg.alpha_pattern.insert("down_proj".into(), 4.0);
    cfg.lora_dropout = 0.05;
    cfg.init_lora_weights = lora::InitLoraWeights::Bool(false);
    cfg.base_model_name_or_path = Some("tests/fixtures/models/tiny-llama-gqa-untied".into());
    cfg
}

/// Write our adapter into `dir`; returns our NLL. With `own_numbers`, also expected.json (our
/// logits and NLL) and merged_targets.safetensors (our merged weights), which
/// `reference/peft_check.py --check-ours DIR` compares with PEFT's.
fn write_ferrotune_adapter(dir: &Path, own_numbers: bool) -> f64 {
    let mut m = tiny();
    let cfg = ferrotune_adapter_config();
    lora::attach_lora(&mut m, &cfg, "default", 2024).unwrap();
    // Keep the change moderate: Kaiming-uniform B with rsLoRA scale would swamp the base.
    for (_, v) in peft::adapter_params(&m, "default") {
        v.set(&(v.as_tensor() * 0.25).unwrap()).unwrap();
    }
    format::save_adapter(&m, "default", &cfg, dir).unwrap();
    let ids = ids();
    let nll = nll_mean(&m, &ids);
    if !own_numbers {
        return nll;
    }
    let lg = logits(&m, &ids);
    let vocab = m.cfg.vocab_size;
    let rows: Vec<Vec<f32>> = lg.chunks(vocab).map(|c| c.to_vec()).collect();
    let exp = serde_json::json!({ "input_ids": ids, "nll_mean": nll, "logits": rows });
    std::fs::write(dir.join("expected.json"), exp.to_string()).unwrap();
    lora::merge_adapter(&mut m, "default").unwrap();
    let mut merged = std::collections::HashMap::new();
    for lin in m.linears() {
        if lin.adapters().any(|(n, _)| n == "default") {
            merged.insert(
                format!("{}.weight", lin.name()),
                lin.weight().to_dense_f32().unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&merged, dir.join("merged_targets.safetensors")).unwrap();
    nll
}

/// (b) Writes a ferrotune adapter with our own numbers to a temp folder for
/// `reference/peft_check.py --check-ours`. With FERROTUNE_WRITE_PEFT_FIXTURE=1 it (re)writes the
/// adapter of tests/fixtures/peft/tiny-lora-ferrotune instead, whose PEFT numbers
/// `reference/peft_check.py --ferrotune-fixture-only` then rewrites. Reloading the folder must
/// reproduce the NLL exactly.
#[test]
fn ferrotune_adapter_for_peft() {
    let write_fixture = std::env::var_os("FERROTUNE_WRITE_PEFT_FIXTURE").is_some();
    let dir = if write_fixture {
        repo().join("tests/fixtures/peft/tiny-lora-ferrotune")
    } else {
        temp_dir("ours")
    };
    let nll = write_ferrotune_adapter(&dir, !write_fixture);
    if write_fixture {
        eprintln!(
            "ferrotune adapter in {}: nll_mean {nll:.8}\n  now write PEFT's numbers for it: \
             .venv/bin/python reference/peft_check.py --ferrotune-fixture-only",
            dir.display()
        );
    } else {
        eprintln!(
            "ferrotune adapter in {}: nll_mean {nll:.8}\n  check: .venv/bin/python \
             reference/peft_check.py --check-ours {}",
            dir.display(),
            dir.display()
        );
    }
    let mut m = tiny();
    format::load_adapter(&mut m, &dir, "default").unwrap();
    assert_eq!(nll_mean(&m, &ids()), nll);
}

/// (c) The committed adapter ferrotune wrote (rsLoRA, all-linear, rank and alpha patterns) gives
/// PEFT's own logits, NLL, parameter report and merged weights (peft_expected.json and
/// peft_merged_targets.safetensors, written by `reference/peft_check.py` with PEFT).
#[test]
fn committed_ferrotune_adapter_matches_peft() {
    let dir = repo().join("tests/fixtures/peft/tiny-lora-ferrotune");
    let exp = read_json(&dir.join("peft_expected.json"));
    let ids: Vec<u32> = exp["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let mut m = tiny();
    let loaded = format::load_adapter(&mut m, &dir, "default").unwrap();
    assert_eq!(loaded.modules.len(), 14);
    assert_eq!(loaded.params.to_string(), exp["report"].as_str().unwrap());
    let d = max_diff(&logits(&m, &ids), &floats(&exp["logits"]));
    let nll = nll_mean(&m, &ids);
    let want = exp["nll_mean"].as_f64().unwrap();
    let rel = ((nll - want) / want).abs();
    eprintln!(
        "ferrotune adapter vs PEFT: max |logit diff| {d:e}; nll {nll:.8} vs PEFT {want:.8} \
         (rel {rel:e})"
    );
    assert!(d < 1e-4, "max |logit diff| vs PEFT {d}");
    assert!(rel < 1e-6, "nll {nll} vs PEFT {want} (rel {rel:e})");

    let report = lora::merge_adapter(&mut m, "default").unwrap();
    let merged =
        candle_core::safetensors::load(dir.join("peft_merged_targets.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(merged.len(), report.modules.len());
    let mut worst = 0f32;
    let mut compared = 0;
    for lin in m.linears() {
        if let Some(w) = merged.get(&format!("{}.weight", lin.name())) {
            worst = worst.max(tensor_diff(w, &lin.weight().to_dense_f32().unwrap()));
            compared += 1;
        }
    }
    assert_eq!(
        compared,
        merged.len(),
        "every PEFT-merged weight has a module here"
    );
    eprintln!("ferrotune adapter: max |merged weight diff| vs PEFT {worst:e}");
    assert!(worst < 1e-5, "merged weights differ from PEFT's by {worst}");
    let want = exp["merged_nll_mean"].as_f64().unwrap();
    let rel = ((nll_mean(&m, &ids) - want) / want).abs();
    assert!(
        rel < 1e-6,
        "merged nll rel diff to PEFT's merged model {rel:e}"
    );
}
