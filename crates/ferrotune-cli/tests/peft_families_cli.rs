//! `--adapter` and `merge` with the PEFT-made T5 LoRA (tests/fixtures/peft/t5-lora-peft, written
//! by reference/peft_families.py): the adapter applied on the fly and merged into the folder
//! `ferrotune merge` writes score and generate the same.
use crate::support;

use support::{arg, json, repo, succeeds, tmp};

#[test]
fn t5_adapter_on_the_fly_equals_the_merged_model() {
    let d = tmp("t5-adapter");
    let m = arg(&repo().join("tests/fixtures/t5/t5-v1_1"));
    let adapter = arg(&repo().join("tests/fixtures/peft/t5-lora-peft"));
    let merged = d.join("merged");
    succeeds(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        &adapter,
        "--out",
        &arg(&merged),
    ]);
    let merged = arg(&merged);
    let data = d.join("qa.jsonl");
    std::fs::write(
        &data,
        "{\"q\": \"cat dog\", \"a\": \"sun moon tree\"}\n{\"q\": \"red\", \"a\": \"blue\"}\n",
    )
    .unwrap();
    let data = arg(&data);
    let ppl = |extra: &[&str]| {
        let mut a = vec![
            "perplexity",
            "--data",
            &data,
            "--template",
            "{q}",
            "--completion",
            "{a}",
            "--json",
        ];
        a.extend(extra);
        json(&succeeds(&a))
    };
    let base = ppl(&["--model", &m]);
    let with = ppl(&["--model", &m, "--adapter", &adapter]);
    let folded = ppl(&["--model", &merged]);
    let nll = |v: &serde_json::Value| v["nll"].as_f64().unwrap();
    assert_eq!(with["tokens"], folded["tokens"]);
    assert!(
        (nll(&with) - nll(&base)).abs() > 0.01,
        "the adapter must matter: {with} vs {base}"
    );
    assert!(
        ((nll(&with) - nll(&folded)) / nll(&folded)).abs() < 1e-4,
        "{with} vs merged {folded}"
    );
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--prompt",
            "Translate English to German: the house is small",
            "--max-new-tokens",
            "8",
            "--json",
        ];
        a.extend(extra);
        json(&succeeds(&a))["text"].clone()
    };
    for beams in ["1", "3"] {
        assert_eq!(
            gen(&["--model", &m, "--adapter", &adapter, "--num-beams", beams]),
            gen(&["--model", &merged, "--num-beams", beams]),
            "--num-beams {beams}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `ferrotune merge` with the PEFT-made SEQ_CLS adapter (classifier in modules_to_save) writes
/// the adapter's trained head in place of the base's, and the LoRA-merged query / value.
#[test]
fn seq_cls_merge_writes_the_saved_classifier() {
    use candle_core::Device;
    let d = tmp("bert-merge");
    let src = repo().join("tests/fixtures/bert/tiny-bert");
    // The tiny folder was saved as BertForMaskedLM; as a classification model it loads with
    // its sequence-classification head.
    let base = d.join("tiny-bert-cls");
    std::fs::create_dir_all(&base).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), base.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    let adapter = repo().join("tests/fixtures/peft/bert-lora-peft");
    let out = d.join("merged");
    succeeds(&[
        "merge",
        "--model",
        &arg(&base),
        "--adapter",
        &arg(&adapter),
        "--out",
        &arg(&out),
    ]);
    let load = |p: &std::path::Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let merged = load(&out.join("model.safetensors"));
    let file = load(&adapter.join("adapter_model.safetensors"));
    let orig = load(&base.join("model.safetensors"));
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    for k in ["classifier.weight", "classifier.bias"] {
        let saved = &file[&format!("base_model.model.{k}")];
        assert_eq!(diff(&merged[k], saved), 0.0, "{k} is the adapter's");
        assert!(
            diff(&orig[k], saved) > 1e-3,
            "{k}: the saved head differs from the base"
        );
    }
    let q = "bert.encoder.layer.0.attention.self.query.weight";
    assert!(diff(&merged[q], &orig[q]) > 1e-4, "LoRA merged into {q}");
    let k = "bert.encoder.layer.0.attention.self.key.weight";
    assert_eq!(diff(&merged[k], &orig[k]), 0.0);
    let _ = std::fs::remove_dir_all(&d);
}
