//! `ferrotune quantize --to nf4|fp4|int8 --out DIR`: an HF folder in bitsandbytes' layout that
//! ferrotune loads back (dequantized) for generate and perplexity.
use crate::support::{fails, json, succeeds, tiny_model, tmp};
use std::path::Path;

fn quantize(model: &Path, to: &str, extra: &[&str], out: &Path) {
    let mut args = vec![
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--to",
        to,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    succeeds(&args);
}

fn tensor_names(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
}

#[test]
fn quantize_to_nf4_writes_a_bnb_folder_that_generates() {
    let dir = tmp("bnb-nf4");
    let model = tiny_model(&dir, true);
    let out = dir.join("nf4");
    quantize(&model, "nf4", &["--double-quant", "true"], &out);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization_config"];
    assert_eq!(q["quant_method"], "bitsandbytes", "{cfg}");
    assert_eq!(q["load_in_4bit"], true);
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
    assert_eq!(q["bnb_4bit_use_double_quant"], true);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let names = tensor_names(&out);
    let w = "model.layers.0.self_attn.q_proj.weight";
    for suffix in [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    ] {
        assert!(
            names.contains(&format!("{w}{suffix}")),
            "{w}{suffix}: {names:?}"
        );
    }
    // transformers leaves the LM head and the embeddings alone.
    assert!(names.contains(&"lm_head.weight".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("lm_head.weight.")));
    let o = succeeds(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "cat",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(json(&o)["generated_tokens"], 4);
    let text = dir.join("text.txt");
    std::fs::write(&text, "cat dog sun moon tree rock fish bird cat dog").unwrap();
    let ppl = |m: &Path| {
        json(&succeeds(&[
            "perplexity",
            "--model",
            m.to_str().unwrap(),
            "--file",
            text.to_str().unwrap(),
            "--json",
        ]))["perplexity"]
            .as_f64()
            .unwrap()
    };
    let (base, quantized) = (ppl(&model), ppl(&out));
    assert!(
        quantized.is_finite() && quantized != base,
        "{base} {quantized}"
    );
    assert!((quantized / base - 1.0).abs() < 0.5, "{base} {quantized}");
}

#[test]
fn quantize_to_fp4_and_int8_loads_back() {
    let dir = tmp("bnb-fp4-int8");
    let model = tiny_model(&dir, true);
    for (to, key) in [
        (
            "fp4",
            "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__fp4",
        ),
        ("int8", "model.layers.1.mlp.down_proj.SCB"),
    ] {
        let out = dir.join(to);
        quantize(&model, to, &[], &out);
        assert!(tensor_names(&out).contains(&key.to_string()), "{to}");
        let o = succeeds(&[
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "cat",
            "--max-new-tokens",
            "2",
            "--ignore-eos",
            "--json",
        ]);
        assert_eq!(json(&o)["generated_tokens"], 2, "{to}");
    }
}

#[test]
fn quantize_bnb_refuses_bad_flags() {
    let dir = tmp("bnb-bad");
    let model = tiny_model(&dir, true);
    let m = model.to_str().unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let e = fails(&[
        "quantize",
        "--model",
        m,
        "--to",
        "int8",
        "--double-quant",
        "true",
        "--out",
        o,
    ]);
    assert!(e.contains("--double-quant"), "{e}");
    let e = fails(&[
        "quantize",
        "--model",
        m,
        "--to",
        "q8_0",
        "--double-quant",
        "true",
        "--out",
        "x.gguf",
    ]);
    assert!(e.contains("--double-quant"), "{e}");
    let e = fails(&["quantize", "--model", m, "--to", "nf4", "--out", "x.gguf"]);
    assert!(e.contains("--to nf4") && e.contains("folder"), "{e}");
    let e = fails(&[
        "quantize",
        "--model",
        m,
        "--to",
        "nf4",
        "--double-quant",
        "maybe",
        "--out",
        o,
    ]);
    assert!(e.contains("--double-quant"), "{e}");
    assert!(!out.exists());
}

/// A LoRA adapter on both layers' q_proj of the tiny model, in PEFT's file layout.
fn lora_adapter(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("adapter");
    std::fs::create_dir_all(&d).unwrap();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj"], "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": false, "modules_to_save": null, "base_model_name_or_path": null
    });
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut tensors = Vec::new();
    for layer in 0..2 {
        let p = format!("base_model.model.model.layers.{layer}.self_attn.q_proj");
        let a: Vec<f32> = (0..2 * 64)
            .map(|i| ((i * 7 + layer) % 13) as f32 * 0.01 - 0.06)
            .collect();
        let b: Vec<f32> = (0..64 * 2)
            .map(|i| ((i * 5 + layer) % 11) as f32 * 0.02 - 0.1)
            .collect();
        tensors.push((format!("{p}.lora_A.weight"), vec![2usize, 64], a));
        tensors.push((format!("{p}.lora_B.weight"), vec![64usize, 2], b));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("adapter_model.safetensors")).unwrap();
    d
}

/// `quantize --adapter A` is `merge` then `quantize`: the same bytes.
#[test]
fn quantize_with_an_adapter_merges_it_first() {
    let dir = tmp("bnb-adapter");
    let model = tiny_model(&dir, true);
    let adapter = lora_adapter(&dir);
    let with = dir.join("with");
    quantize(
        &model,
        "nf4",
        &["--adapter", adapter.to_str().unwrap()],
        &with,
    );
    let merged = dir.join("merged");
    succeeds(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let after = dir.join("after");
    quantize(&merged, "nf4", &[], &after);
    let without = dir.join("without");
    quantize(&model, "nf4", &[], &without);
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        read(&with) == read(&after),
        "quantize --adapter differs from merge + quantize"
    );
    assert!(read(&with) != read(&without), "the adapter changed nothing");
}

/// `--base-quant` with flags that ask for something else, an endless `--file` and a
/// `--check-text` too short or endless: one-line errors naming the flag, nothing read forever.
#[test]
fn base_quant_and_check_text_refuse_contradictions_and_endless_input() {
    let dir = tmp("bnb-hostile");
    let model = tiny_model(&dir, true);
    let m = model.display().to_string();
    let e = fails(&[
        "generate",
        "--model",
        &m,
        "--base-quant",
        "nf4",
        "--dequantize",
        "--prompt",
        "a",
    ]);
    assert!(
        e.contains("--base-quant") && e.contains("--dequantize"),
        "{e}"
    );
    let e = fails(&[
        "perplexity",
        "--model",
        &m,
        "--base-quant",
        "nf4",
        "--file",
        "/dev/zero",
    ]);
    assert!(e.contains("/dev/zero") && e.contains("device"), "{e}");
    let adapter = lora_adapter(&dir);
    let a = adapter.display().to_string();
    let out = dir.join("merged").display().to_string();
    for (text, want) in [("/dev/zero", "device"), ("", "at least 2 tokens")] {
        let path = if text.is_empty() {
            let p = dir.join("empty.txt");
            std::fs::write(&p, "").unwrap();
            p.display().to_string()
        } else {
            text.to_string()
        };
        let e = fails(&[
            "merge",
            "--model",
            &m,
            "--base-quant",
            "nf4",
            "--adapter",
            &a,
            "--check-text",
            &path,
            "--out",
            &out,
        ]);
        assert!(
            e.contains("--check-text") && e.contains(want),
            "{path}: {e}"
        );
    }
}
