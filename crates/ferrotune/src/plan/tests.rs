use super::*;

fn req(params: &str) -> Request {
    Request {
        params: Some(params.into()),
        ..Default::default()
    }
}

fn model_states(p: &Plan) -> u64 {
    p.per_device.weights + p.per_device.gradients + p.per_device.optimizer
}

/// The ZeRO paper's example (§3.1, Figure 1): 7.5B parameters on 64 GPUs, mixed-precision Adam
/// (K = 12): 120 GB per device with DDP, 31.4 / 16.6 / 1.9 GB with ZeRO-1 / 2 / 3.
#[test]
fn zero_model_states_match_the_zero_paper_example() {
    let mut want = vec![];
    for (strategy, paper_gb) in [
        ("ddp", 120.0),
        ("zero1", 31.4),
        ("zero2", 16.6),
        ("zero3", 1.9),
    ] {
        let p = plan(&Request {
            gpus: 64,
            strategy: strategy.into(),
            ..req("7.5B")
        })
        .unwrap();
        let gb = model_states(&p) as f64 / 1e9;
        assert!(
            (gb - paper_gb).abs() < 0.05,
            "{strategy}: {gb} GB vs {paper_gb}"
        );
        want.push(gb);
    }
    // The exact formulas: (2+2+12)Ψ, 4Ψ + 12Ψ/64, 2Ψ + 14Ψ/64, 16Ψ/64.
    let psi = 7.5e9;
    let exact = [
        16.0 * psi,
        4.0 * psi + 12.0 * psi / 64.0,
        2.0 * psi + 14.0 * psi / 64.0,
        16.0 * psi / 64.0,
    ];
    for (got, e) in want.iter().zip(exact) {
        assert!((got * 1e9 - e).abs() <= 3.0, "{got} vs {e}");
    }
}

#[test]
fn per_device_total_is_the_sum_and_sharding_orders_the_strategies() {
    let mut last = u64::MAX;
    for strategy in ["ddp", "zero1", "zero2", "zero3"] {
        let p = plan(&Request {
            gpus: 8,
            batch: 2,
            seq_len: Some(1024),
            strategy: strategy.into(),
            ..req("7B")
        })
        .unwrap();
        let d = &p.per_device;
        assert_eq!(
            d.total,
            d.weights + d.gradients + d.optimizer + d.activations + d.buffers
        );
        assert!(d.total < last, "{strategy}: {} !< {last}", d.total);
        last = d.total;
        assert_eq!(p.fits, d.total <= p.gpu_memory_bytes);
    }
}

#[test]
fn activations_follow_korthikanti() {
    let shape = ShapeFlags {
        layers: Some(4),
        hidden: Some(256),
        heads: Some(4),
        vocab: Some(1000),
        intermediate: Some(1024),
        ..Default::default()
    };
    let (b, s, h, a, l, v) = (3.0, 512.0, 256.0, 4.0, 4.0, 1000.0);
    let run = |attention: &str, ckpt: bool| {
        plan(&Request {
            shape: shape.clone(),
            batch: 3,
            seq_len: Some(512),
            attention: attention.into(),
            gradient_checkpointing: ckpt,
            ..Default::default()
        })
        .unwrap()
        .per_device
        .activations as f64
    };
    let logits = 8.0 * b * s * v;
    let eager_layer = s * b * h * (34.0 + 5.0 * a * s / h);
    assert_eq!(run("eager", false), l * eager_layer + logits);
    assert_eq!(run("flash", false), l * 34.0 * s * b * h + logits);
    assert_eq!(
        run("flash", true),
        l * 2.0 * s * b * h + 34.0 * s * b * h + logits
    );
    assert_eq!(
        run("eager", true),
        l * 2.0 * s * b * h + eager_layer + logits
    );
}

#[test]
fn lora_counts_adapters_and_qlora_weights_are_smaller() {
    // LLaMA 7B's shape, r = 8 on q_proj, v_proj: PEFT reports 4,194,304 trainable parameters.
    let base = Request {
        shape: ShapeFlags {
            layers: Some(32),
            hidden: Some(4096),
            intermediate: Some(11008),
            ..Default::default()
        },
        ..Default::default()
    };
    let lora = plan(&Request {
        method: "lora".into(),
        ..base.clone()
    })
    .unwrap();
    assert_eq!(lora.params, 6_738_415_616);
    assert_eq!(lora.trainable_params, 4_194_304);
    assert_eq!(lora.per_device.gradients, 4 * 4_194_304);
    assert_eq!(lora.per_device.optimizer, 8 * 4_194_304);
    let qlora = plan(&Request {
        method: "qlora".into(),
        ..base.clone()
    })
    .unwrap();
    let full = plan(&base).unwrap();
    assert_eq!(qlora.trainable_params, lora.trainable_params);
    assert!(qlora.per_device.weights < lora.per_device.weights);
    assert!(lora.per_device.total < full.per_device.total);
    // QLoRA: NF4 + double quant is 4.127 bits for the block linears, 16 bits for the rest.
    let linear = lora.model.linear_params() as f64;
    let rest = lora.params as f64 - linear;
    let want = linear * 4.127 / 8.0 + rest * 2.0 + 4.0 * 4_194_304.0;
    let got = qlora.per_device.weights as f64;
    assert!((got / want - 1.0).abs() < 1e-3, "{got} vs {want}");
    // all-linear: r·(in + out) for every block linear.
    let all = plan(&Request {
        method: "lora".into(),
        targets: Some("all-linear".into()),
        ..base.clone()
    })
    .unwrap();
    let (h, i) = (4096u64, 11008u64);
    assert_eq!(all.trainable_params, 8 * 32 * (4 * 2 * h + 3 * (h + i)));
    // DoRA adds a magnitude per output row of each target.
    let dora = plan(&Request {
        method: "dora".into(),
        ..base.clone()
    })
    .unwrap();
    assert_eq!(dora.trainable_params, 4_194_304 + 2 * 32 * 4096);
    // Prompt tuning: virtual tokens × hidden.
    let pt = plan(&Request {
        method: "prompt-tuning".into(),
        virtual_tokens: Some(30),
        ..base
    })
    .unwrap();
    assert_eq!(pt.trainable_params, 30 * 4096);
    assert_eq!(pt.positions, pt.seq_len + 30);
}

#[test]
fn flops_are_6nd_plus_attention_and_4nd_for_peft() {
    let base = Request {
        shape: ShapeFlags {
            layers: Some(32),
            hidden: Some(4096),
            intermediate: Some(11008),
            ..Default::default()
        },
        tokens: Some("1e9".into()),
        seq_len: Some(2048),
        gpus: 8,
        gpu: "a100".into(),
        mfu: 0.5,
        ..Default::default()
    };
    let full = plan(&base).unwrap();
    let n_c = (6_738_415_616u64 - 32000 * 4096) as f64;
    let attn = 6.0 * 32.0 * 2048.0 * 4096.0;
    let want = (6.0 * n_c + attn) * 1e9;
    assert!(
        (full.flops / want - 1.0).abs() < 1e-12,
        "{} vs {want}",
        full.flops
    );
    assert!((full.time_s - want / (8.0 * 312e12 * 0.5)).abs() < 1e-6 * full.time_s);
    assert!((full.petaflop_s_days - want / 8.64e19).abs() < 1e-9 * full.petaflop_s_days);
    assert_eq!(full.rules_of_thumb.flops_6nd, 6.0 * 6_738_415_616.0 * 1e9);
    let lora = plan(&Request {
        method: "lora".into(),
        ..base
    })
    .unwrap();
    let want = (4.0 * n_c + 6.0 * 4_194_304.0 + attn) * 1e9;
    assert!((lora.flops / want - 1.0).abs() < 1e-12);
    assert!(full.chinchilla_tokens == 20.0 * 6_738_415_616.0);
}

#[test]
fn compute_optimal_is_the_minimum_of_the_fitted_loss_at_fixed_compute() {
    let c = 5.76e23; // Chinchilla's own budget
    let o = compute_optimal(c);
    assert!((6.0 * o.n * o.d / c - 1.0).abs() < 1e-9);
    let loss = |n: f64| {
        let d = c / (6.0 * n);
        CHINCHILLA_E
            + CHINCHILLA_A / n.powf(CHINCHILLA_ALPHA)
            + CHINCHILLA_B / d.powf(CHINCHILLA_BETA)
    };
    assert!((loss(o.n) - o.loss).abs() < 1e-9);
    for f in [0.9, 0.99, 1.01, 1.1] {
        assert!(loss(o.n * f) > o.loss, "factor {f}");
    }
    // The exponents: N grows as C^0.4516, D as C^0.5484.
    let o10 = compute_optimal(10.0 * c);
    assert!(((o10.n / o.n).log10() - 0.28 / 0.62).abs() < 1e-9);
    assert!(((o10.d / o.d).log10() - 0.34 / 0.62).abs() < 1e-9);
}

#[test]
fn counts_parse_with_suffixes_and_bad_ones_name_the_flag() {
    assert_eq!(parse_count("--params", "7B", 1e15).unwrap(), 7e9);
    assert_eq!(parse_count("--params", "135M", 1e15).unwrap(), 135e6);
    assert_eq!(parse_count("--params", "7e9", 1e15).unwrap(), 7e9);
    assert_eq!(parse_count("--tokens", "1.4T", 1e18).unwrap(), 1.4e12);
    assert_eq!(parse_count("--params", "7_000_000_000", 1e15).unwrap(), 7e9);
    for bad in ["-1", "0", "NaN", "inf", "abc", "7X", "", "1e30"] {
        let e = parse_count("--params", bad, 1e15).unwrap_err().to_string();
        assert!(e.starts_with("--params: "), "{bad}: {e}");
        assert_eq!(e.lines().count(), 1);
    }
}

#[test]
fn bad_requests_are_one_line_errors_naming_the_flag() {
    let cases: Vec<(Request, &str)> = vec![
        (
            Request {
                gpu: "v100".into(),
                ..req("7B")
            },
            "--gpu",
        ),
        (
            Request {
                strategy: "zero4".into(),
                ..req("7B")
            },
            "--strategy",
        ),
        (
            Request {
                method: "ia4".into(),
                ..req("7B")
            },
            "--method",
        ),
        (
            Request {
                dtype: "fp64".into(),
                ..req("7B")
            },
            "--dtype",
        ),
        (
            Request {
                dtype: "int8".into(),
                ..req("7B")
            },
            "--dtype",
        ),
        (
            Request {
                batch: 0,
                ..req("7B")
            },
            "--batch",
        ),
        (
            Request {
                gpus: 0,
                ..req("7B")
            },
            "--gpus",
        ),
        (
            Request {
                seq_len: Some(0),
                ..req("7B")
            },
            "--seq-len",
        ),
        (
            Request {
                mfu: 0.0,
                ..req("7B")
            },
            // "0", not Rust's "0e0"
            "got 0, expected a fraction",
        ),
        (
            Request {
                mfu: 1.5,
                ..req("7B")
            },
            "--mfu",
        ),
        (
            Request {
                mfu: f64::NAN,
                ..req("7B")
            },
            "--mfu",
        ),
        (
            Request {
                tokens: Some("-5".into()),
                ..req("7B")
            },
            "--tokens",
        ),
        (
            Request {
                flops_budget: Some("1e99".into()),
                ..req("7B")
            },
            "--flops-budget",
        ),
        (
            Request {
                flops_budget: Some("1".into()),
                ..req("7B")
            },
            "--flops-budget",
        ),
        (
            Request {
                tokens: Some("0.5".into()),
                ..req("7B")
            },
            "--tokens",
        ),
        (
            Request {
                mfu: 1e-300,
                ..req("7B")
            },
            "--mfu",
        ),
        (
            Request {
                params: Some("1e20".into()),
                ..Default::default()
            },
            "--params",
        ),
        (Request::default(), "--params"),
        (
            Request {
                rank: Some(8),
                ..req("7B")
            },
            "--rank",
        ),
        (
            Request {
                method: "lora".into(),
                rank: Some(0),
                ..req("7B")
            },
            "--rank",
        ),
        (
            Request {
                method: "lora".into(),
                targets: Some("nope".into()),
                ..req("7B")
            },
            "--targets",
        ),
        (
            Request {
                virtual_tokens: Some(4),
                ..req("7B")
            },
            "--virtual-tokens",
        ),
        (
            Request {
                attention: "fast".into(),
                ..req("7B")
            },
            "--attention",
        ),
        (
            Request {
                model: Some("no/such/folder".into()),
                ..Default::default()
            },
            "no/such/folder",
        ),
        (
            Request {
                model: Some("x".into()),
                ..req("7B")
            },
            "--params",
        ),
        (
            Request {
                batch: MAX_BATCH,
                seq_len: Some(1 << 24),
                ..req("1T")
            },
            "--batch",
        ),
    ];
    for (r, want) in cases {
        let e = plan(&r).unwrap_err().to_string();
        assert!(e.contains(want), "{r:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn a_config_folder_plans_with_its_exact_count_and_the_text_shows_both_figures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/tiny-llama-gqa-untied");
    let cfg = crate::model::config_from_hf_dir(&dir).unwrap();
    let p = plan(&Request {
        model: Some(dir.display().to_string()),
        method: "qlora".into(),
        gpu: "l4".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(p.params, cfg.num_params());
    assert_eq!(p.seq_len, (cfg.max_position_embeddings as u64).min(2048));
    assert!(p.fits);
    let t = p.to_text();
    for want in [
        "memory per device",
        "total",
        "6·N·D",
        "16–20 bytes/param",
        "Korthikanti",
        "fits",
    ] {
        assert!(t.contains(want), "{want}: {t}");
    }
    let j = serde_json::to_value(&p).unwrap();
    for k in [
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "buffers",
        "total",
    ] {
        assert!(j["per_device"][k].is_u64(), "{k}");
    }
    assert!(j["fits"].is_boolean() && j["flops"].is_f64() && j["chinchilla_tokens"].is_f64());
}

/// Parameter counts against transformers + PEFT on the same configs
/// (`reference/plan_counts.py`): the model's parameters, LoRA's trainable count for PEFT's
/// default targets and all-linear at two ranks, DoRA's, and prompt tuning's.
#[test]
fn counts_match_transformers_and_peft() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let text = std::fs::read_to_string(root.join("plan/counts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let models = v["models"].as_array().unwrap();
    assert!(models.len() >= 9);
    for m in models {
        let dir = root.join(m["dir"].as_str().unwrap());
        let base = Request {
            model: Some(dir.display().to_string()),
            ..Default::default()
        };
        let name = m["dir"].as_str().unwrap();
        let p = plan(&base).unwrap();
        assert_eq!(p.params, m["params"].as_u64().unwrap(), "{name}: params");
        for c in m["lora"].as_array().unwrap() {
            let dora = c["dora"].as_bool().unwrap();
            let r = Request {
                method: if dora { "dora" } else { "lora" }.into(),
                rank: Some(c["r"].as_u64().unwrap() as usize),
                targets: c["targets"].as_str().map(String::from),
                ..base.clone()
            };
            assert_eq!(
                plan(&r).unwrap().trainable_params,
                c["trainable"].as_u64().unwrap(),
                "{name}: {c}"
            );
        }
        let pt = &m["prompt_tuning"];
        let r = Request {
            method: "prompt-tuning".into(),
            virtual_tokens: Some(pt["virtual_tokens"].as_u64().unwrap() as usize),
            ..base.clone()
        };
        assert_eq!(
            plan(&r).unwrap().trainable_params,
            pt["trainable"].as_u64().unwrap(),
            "{name}: prompt tuning"
        );
    }
}
