//! Every optimizer against its reference implementation (torch.optim.SGD, transformers'
//! Adafactor, bitsandbytes' AdamW8bit): the same parameters after a few updates on fixed
//! gradients (`tests/fixtures/optim/optimizers.json`, from `reference/optimizer_fixtures.py`),
//! and each optimizer's state saved mid-way and restored continues bit for bit.
use candle_core::{Device, Tensor, Var};
use ferrotune::train::optim::{
    adamw_8bit::dynamic_map, Optimizer, OptimizerConfig, OptimizerKind, ParamSettings,
};
use serde_json::Value;

use crate::common;
use common::floats;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/optim/optimizers.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("the optimizer fixture")).unwrap()
}

const NAMES: [&str; 2] = ["w", "b"];

fn params(fx: &Value) -> Vec<(String, Var)> {
    NAMES
        .iter()
        .map(|n| {
            let p = &fx["params"][n];
            let shape: Vec<usize> = p["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let t = Tensor::from_vec(floats(&p["data"]), shape, &Device::Cpu).unwrap();
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn grads(fx: &Value, step: usize, params: &[(String, Var)]) -> Vec<Tensor> {
    params
        .iter()
        .map(|(n, v)| {
            Tensor::from_vec(floats(&fx["grads"][step][n]), v.shape(), &Device::Cpu).unwrap()
        })
        .collect()
}

/// The case's config as ferrotune's `[train]` table would set it.
fn config(case: &Value) -> OptimizerConfig {
    let c = &case["config"];
    let mut toml = String::new();
    toml.push_str(&format!(
        "optimizer = \"{}\"\n",
        case["optimizer"].as_str().unwrap()
    ));
    for k in ["weight_decay", "eps"] {
        if let Some(v) = c.get(k) {
            toml.push_str(&format!("{k} = {v}\n"));
        }
    }
    if let Some(b) = c.get("betas") {
        toml.push_str(&format!("betas = {b}\n"));
    }
    let table = case["optimizer"].as_str().unwrap();
    toml.push_str(&format!("[{table}]\n"));
    for (k, v) in c.as_object().unwrap() {
        if !["weight_decay", "eps", "betas"].contains(&k.as_str()) {
            toml.push_str(&format!("{k} = {v}\n"));
        }
    }
    let t: ferrotune::train::config::TrainSection = toml::from_str(&toml).unwrap();
    t.optimizer_config()
}

fn values(params: &[(String, Var)]) -> Vec<Vec<f32>> {
    params
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn each_optimizer_matches_its_reference_implementation() {
    let fx = fixture();
    let steps = fx["grads"].as_array().unwrap().len();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = config(case);
        let ps = params(&fx);
        let settings = vec![ParamSettings::default(); ps.len()];
        let mut opt = Optimizer::new(&cfg, ps.clone(), settings).unwrap();
        let lr = case["lr"].as_f64().unwrap();
        for s in 0..steps {
            opt.step(&grads(&fx, s, &ps), lr).unwrap();
        }
        // f32 rounding (an ulp or two of the values); 8-bit states are rounded to the nearest
        // of 256 codes, where bnb's CPU kernel and ours can pick neighbouring codes for values
        // within an f32 rounding of a midpoint.
        // bnb's shipped CPU kernel picks a code that is not the nearest for some small values
        // (see reference/optimizer_fixtures.py): within 3% of the change there.
        let bnb_cpu = name == "adamw_8bit_bnb_cpu";
        let rel = if bnb_cpu { 3e-2 } else { 1e-4 };
        let tol = |v: f32| {
            if cfg.kind == OptimizerKind::AdamW8bit {
                1e-6
            } else {
                4.0 * f32::EPSILON * v.abs().max(1e-3)
            }
        };
        let got = values(&ps);
        let mut worst = 0f32;
        for (i, n) in NAMES.iter().enumerate() {
            let want = floats(&case["expected"][n]);
            let init = floats(&fx["params"][n]["data"]);
            let mut moved = 0f32;
            let mut max_tol = 0f32;
            for ((a, b), p0) in got[i].iter().zip(&want).zip(&init) {
                worst = worst.max((a - b).abs());
                moved = moved.max((b - p0).abs());
                max_tol = max_tol.max(tol(*b));
                assert!(
                    (a - b).abs() <= tol(*b) + rel * (b - p0).abs(),
                    "{name} {n}: {a} vs {b} (from {p0})"
                );
            }
            // The updates moved the parameters by far more than the tolerance: a no-op fails.
            assert!(
                moved > 8.0 * max_tol,
                "{name} {n}: the reference moved by only {moved}"
            );
        }
        eprintln!("{name}: max abs difference {worst:e}");
    }
}

#[test]
fn the_8bit_quantization_maps_are_bitsandbytes() {
    let fx = fixture();
    for (signed, key) in [(true, "qmap_signed"), (false, "qmap_unsigned")] {
        let want = floats(&fx[key]);
        let got = dynamic_map(signed);
        for (a, b) in got.iter().zip(&want) {
            // torch.linspace rounds a few of its f32 points differently (vectorized): 2 ulp
            assert!(
                (a - b).abs() <= 2.5e-7 * b.abs().max(1e-6),
                "{key}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn every_optimizer_resumes_bit_exactly_from_its_saved_state() {
    let fx = fixture();
    let dir = std::env::temp_dir().join(format!("ferrotune-optim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg = config(case);
        let lr = case["lr"].as_f64().unwrap().max(1e-3);
        let ps = params(&fx);
        let settings = vec![ParamSettings::default(); ps.len()];
        let mut a = Optimizer::new(&cfg, ps.clone(), settings.clone()).unwrap();
        for s in 0..2 {
            a.step(&grads(&fx, s, &ps), lr).unwrap();
        }
        let path = dir.join(format!("{name}.safetensors"));
        a.save(&path).unwrap();
        let ps2: Vec<(String, Var)> = ps
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut b = Optimizer::new(&cfg, ps2.clone(), settings).unwrap();
        b.load(&path).unwrap();
        assert_eq!(b.step_count(), 2, "{name}");
        for s in 2..4 {
            a.step(&grads(&fx, s, &ps), lr).unwrap();
            b.step(&grads(&fx, s, &ps2), lr).unwrap();
        }
        assert_eq!(values(&ps), values(&ps2), "{name}: resumed run differs");
        // Another optimizer's state is refused with the key it misses.
        let other = OptimizerConfig {
            kind: if cfg.kind == OptimizerKind::Adamw {
                OptimizerKind::Sgd
            } else {
                OptimizerKind::Adamw
            },
            ..Default::default()
        };
        if other.kind == OptimizerKind::Adamw {
            let mut c =
                Optimizer::new(&other, ps.clone(), vec![ParamSettings::default(); 2]).unwrap();
            let e = c.load(&path).unwrap_err().to_string();
            assert!(e.contains("`m.w` is missing"), "{name}: {e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lr_scale_and_the_decay_switch_apply_per_parameter() {
    let fx = fixture();
    for kind in [
        OptimizerKind::Adamw,
        OptimizerKind::Sgd,
        OptimizerKind::Adafactor,
        OptimizerKind::AdamW8bit,
    ] {
        let mut cfg = OptimizerConfig {
            kind,
            ..Default::default()
        };
        cfg.adamw.weight_decay = 0.5;
        cfg.sgd.weight_decay = 0.5;
        cfg.adafactor.weight_decay = 0.5;
        cfg.adamw_8bit.weight_decay = 0.5;
        // Zero gradients: only weight decay moves a parameter (Adafactor and Adam divide 0
        // by a positive number).
        let run = |settings: Vec<ParamSettings>| {
            let ps = params(&fx);
            let mut o = Optimizer::new(&cfg, ps.clone(), settings).unwrap();
            let zeros: Vec<Tensor> = ps
                .iter()
                .map(|(_, v)| v.as_tensor().zeros_like().unwrap())
                .collect();
            o.step(&zeros, 0.1).unwrap();
            values(&ps)
        };
        let init = values(&params(&fx));
        let decayed = run(vec![ParamSettings::default(); 2]);
        let kept = run(vec![
            ParamSettings::default(),
            ParamSettings {
                lr_scale: 1.0,
                decay: false,
            },
        ]);
        assert_ne!(decayed[1], init[1], "{kind:?}: decay moves b");
        assert_eq!(
            kept[1], init[1],
            "{kind:?}: no decay, zero gradient: b unchanged"
        );
        assert_eq!(kept[0], decayed[0], "{kind:?}: w decays either way");
        // lr scale 2 on a real gradient: the same as lr 2x for that parameter alone.
        let ps_a = params(&fx);
        let ps_b = params(&fx);
        cfg.adamw.weight_decay = 0.0;
        cfg.sgd.weight_decay = 0.0;
        cfg.adafactor.weight_decay = 0.0;
        cfg.adamw_8bit.weight_decay = 0.0;
        let scaled = vec![
            ParamSettings {
                lr_scale: 2.0,
                decay: true,
            },
            ParamSettings::default(),
        ];
        let mut a = Optimizer::new(&cfg, ps_a.clone(), scaled).unwrap();
        let mut b = Optimizer::new(&cfg, ps_b.clone(), vec![ParamSettings::default(); 2]).unwrap();
        a.step(&grads(&fx, 0, &ps_a), 0.01).unwrap();
        b.step(&grads(&fx, 0, &ps_b), 0.02).unwrap();
        let (va, vb) = (values(&ps_a), values(&ps_b));
        for (x, y) in va[0].iter().zip(&vb[0]) {
            assert!((x - y).abs() < 1e-6, "{kind:?}: lr scale: {x} vs {y}");
        }
        assert_ne!(
            va[1], vb[1],
            "{kind:?}: the unscaled parameter took the base lr"
        );
    }
}
