//! `peft::lora::add_weighted_adapter` against PEFT's on the tiny LLaMA (fixtures from
//! reference/peft_combine.py): `linear` and `cat` give PEFT's tensors within 1e-5, `svd` the
//! same products B·A (singular vectors are defined up to sign), and the combined adapter is
//! saved in PEFT's files.
use candle_core::{Device, Tensor};
use ferrotune::model::Model;
use ferrotune::peft::format::{self, AdapterConfig, KEY_PREFIX};
use ferrotune::peft::lora::{add_weighted_adapter, Combination, LoraConfig, WeightedAdapter};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

use crate::common;
use common::{max_abs_diff, repo};

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/peft/combine").join(name)
}

fn model() -> Box<dyn Model> {
    // The tiny LLaMA fixture has no tokenizer: build the model alone.
    Box::new(common::tiny("tiny-llama-gqa-untied"))
}

fn peft_tensors(case: &str) -> HashMap<String, Tensor> {
    let p = fixture(case).join(format::WEIGHTS_FILE);
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (written by reference/peft_combine.py)",
            p.display()
        )
    })
}

/// Load the case's adapters, combine them as PEFT did, save the result; return ours (by PEFT
/// key) and the config written.
fn combine(case: &str, how: Combination) -> (HashMap<String, Tensor>, Value) {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cases.json")).unwrap()).unwrap();
    let c = &cases[case];
    let names: Vec<String> = c["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let weights: Vec<f64> = c["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut m = model();
    let mut configs: Vec<LoraConfig> = Vec::new();
    for n in &names {
        let loaded = format::load_adapter(&mut *m, &fixture(n), n).unwrap();
        let AdapterConfig::Lora(cfg) = loaded.config else {
            panic!("not LoRA")
        };
        configs.push(cfg);
    }
    let adapters: Vec<WeightedAdapter> = names
        .iter()
        .zip(&configs)
        .zip(&weights)
        .map(|((n, c), &w)| WeightedAdapter {
            name: n,
            config: c,
            weight: w,
        })
        .collect();
    let cfg = add_weighted_adapter(&mut *m, &adapters, "combined", how, None).unwrap();
    let dir = std::env::temp_dir().join(format!("ferrotune-combine-{case}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    format::save_adapter(&*m, "combined", &cfg, &dir).unwrap();
    let ours =
        candle_core::safetensors::load(dir.join(format::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format::CONFIG_FILE)).unwrap())
            .unwrap();
    // The folder loads back like any adapter.
    let mut fresh = model();
    format::load_adapter(&mut *fresh, &dir, "back").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (ours, config)
}

#[test]
fn linear_and_cat_equal_peft_add_weighted_adapter() {
    for (case, how) in [("linear", Combination::Linear), ("cat", Combination::Cat)] {
        let (ours, config) = combine(case, how);
        let peft = peft_tensors(case);
        let want: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(case).join(format::CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(config["r"], want["r"], "{case}");
        assert_eq!(config["lora_alpha"], want["lora_alpha"], "{case}");
        let mut keys: Vec<&String> = peft.keys().collect();
        keys.sort();
        let mut our_keys: Vec<&String> = ours.keys().collect();
        our_keys.sort();
        assert_eq!(our_keys, keys, "{case}: the same modules");
        for k in keys {
            let d = max_abs_diff(&ours[k], &peft[k]);
            assert!(d < 1e-5, "{case} {k}: {d}");
        }
    }
}

#[test]
fn svd_gives_peft_products() {
    let (ours, config) = combine("svd", Combination::Svd);
    let peft = peft_tensors("svd");
    assert_eq!(config["r"], 4);
    let mut n = 0;
    for k in peft.keys().filter(|k| k.ends_with("lora_A.weight")) {
        let kb = k.replace("lora_A", "lora_B");
        let prod = |t: &HashMap<String, Tensor>| t[&kb].matmul(&t[k]).unwrap();
        let (o, p) = (prod(&ours), prod(&peft));
        let scale: f32 = p.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let d = max_abs_diff(&o, &p);
        assert!(d < 1e-4 * scale.max(1.0), "{k}: {d} (scale {scale})");
        assert!(k.starts_with(KEY_PREFIX));
        n += 1;
    }
    assert!(n >= 4, "{n} modules");
}

#[test]
fn bad_combinations_are_one_line_errors() {
    let mut m = model();
    let mut configs = Vec::new();
    for n in ["a", "c"] {
        let AdapterConfig::Lora(cfg) = format::load_adapter(&mut *m, &fixture(n), n)
            .unwrap()
            .config
        else {
            panic!()
        };
        configs.push(cfg);
    }
    let w = |i: usize, name: &'static str, weight: f64| WeightedAdapter {
        name,
        config: &configs[i],
        weight,
    };
    let e = add_weighted_adapter(
        &mut *m,
        &[w(0, "a", 1.0), w(1, "c", 1.0)],
        "x",
        Combination::Linear,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("same r") && !e.contains('\n'), "{e}");
    let e = add_weighted_adapter(
        &mut *m,
        &[w(0, "a", 1.0), w(1, "zz", 1.0)],
        "x",
        Combination::Cat,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("zz"), "{e}");
    let e = add_weighted_adapter(&mut *m, &[w(0, "a", 1.0)], "c", Combination::Cat, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already attached"), "{e}");
    // A weight that is not a number, or one so large that the product overflows.
    for weight in [f64::NAN, f64::INFINITY] {
        let e = add_weighted_adapter(
            &mut *m,
            &[w(0, "a", weight), w(1, "c", 1.0)],
            "x",
            Combination::Cat,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight") && e.contains("`a`"), "{e}");
    }
    let e = add_weighted_adapter(
        &mut *m,
        &[w(0, "a", 1e200), w(1, "c", 1.0)],
        "x",
        Combination::Cat,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not finite") && !e.contains('\n'), "{e}");
    // An SVD rank no target module can hold (the tiny model's linears are at most 64 wide).
    let e = add_weighted_adapter(
        &mut *m,
        &[w(0, "a", 1.0), w(1, "c", 1.0)],
        "x",
        Combination::Svd,
        Some(4096),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("svd rank 4096") && !e.contains('\n'), "{e}");
    // A DoRA adapter: its magnitude vectors cannot be combined (PEFT refuses too).
    let mut dora = configs[0].clone();
    dora.use_dora = true;
    let e = add_weighted_adapter(
        &mut *m,
        &[
            WeightedAdapter {
                name: "a",
                config: &dora,
                weight: 1.0,
            },
            w(1, "c", 1.0),
        ],
        "x",
        Combination::Cat,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("DoRA") && e.contains("`a`"), "{e}");
    // Nothing was attached by the refused calls.
    assert!(!ferrotune::peft::adapter_names(&*m).iter().any(|n| n == "x"));
}
