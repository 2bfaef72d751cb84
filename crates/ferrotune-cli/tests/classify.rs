//! `ferrotune classify`: accuracy and macro-F1 of a sequence-classification model on a data
//! file, checked against predictions from transformers' logits (the committed fixture of
//! reference/bert_fixtures.py) and metrics computed here by hand; and its one-line errors.
use crate::support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use support::{arg, fails, json, repo, smollm2, succeeds, tmp};

const NAMES: [&str; 3] = ["negative", "neutral", "positive"];

fn tiny_bert() -> PathBuf {
    repo().join("tests/fixtures/bert/tiny-bert")
}

/// `dir/name`: the tiny BERT fixture saved as `BertForSequenceClassification` (its file holds
/// the pooler and a 3-class classifier, id2label negative/neutral/positive). With `classes` 2
/// the classifier keeps its first two rows (negative, positive).
fn seq_cls_model(dir: &Path, name: &str, classes: usize) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(tiny_bert()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    if classes == 2 {
        cfg["id2label"] = serde_json::json!({"0": "negative", "1": "positive"});
        cfg["label2id"] = serde_json::json!({"negative": 0, "positive": 1});
        let file = d.join("model.safetensors");
        let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
        for k in ["classifier.weight", "classifier.bias"] {
            let v = t[k].narrow(0, 0, 2).unwrap().contiguous().unwrap();
            t.insert(k.to_string(), v);
        }
        candle_core::safetensors::save(&t, &file).unwrap();
    }
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    d
}

/// The texts of the fixture's single-sentence case and transformers' predicted class of each
/// (arg-max of `BertForSequenceClassification`'s logits).
fn reference() -> (Vec<String>, Vec<usize>) {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_bert().join("expected.json")).unwrap())
            .unwrap();
    let case = &v["cases"][0];
    assert_eq!(case["name"], "single");
    let texts = case["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let preds = case["seq_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let row: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap()
        })
        .collect();
    (texts, preds)
}

/// Accuracy and macro-F1 (scikit-learn's: mean F1 over the classes in gold or predicted).
fn expected_scores(gold: &[usize], pred: &[usize]) -> (f64, f64) {
    let right = gold.iter().zip(pred).filter(|(g, p)| g == p).count();
    let classes: BTreeSet<usize> = gold.iter().chain(pred).copied().collect();
    let f1: f64 = classes
        .iter()
        .map(|&c| {
            let tp = gold.iter().zip(pred).filter(|&(&g, &p)| g == c && p == c);
            let tp = tp.count() as f64;
            let predicted = pred.iter().filter(|&&p| p == c).count() as f64;
            let actual = gold.iter().filter(|&&g| g == c).count() as f64;
            let (p, r) = (tp / predicted.max(1.0), tp / actual.max(1.0));
            if p + r == 0.0 {
                0.0
            } else {
                2.0 * p * r / (p + r)
            }
        })
        .sum::<f64>()
        / classes.len() as f64;
    (right as f64 / gold.len() as f64, f1)
}

/// Rows: text `k % 3` of the fixture with the given gold class.
fn rows(gold: &[usize]) -> Vec<usize> {
    (0..gold.len()).map(|k| k % 3).collect()
}

#[test]
fn classify_scores_match_the_reference_predictions() {
    let dir = tmp("classify-ok");
    let model = seq_cls_model(&dir, "model", 3);
    let (texts, preds) = reference();
    // Gold labels chosen so that some rows are right, some wrong, and one class is never
    // predicted (class 0: transformers predicts 2, 2, 1).
    for gold in [
        vec![2, 0, 1],
        vec![2, 0, 1, 0, 2, 1, 1],
        vec![0, 0, 0, 2, 2, 2, 1, 1],
    ] {
        let which = rows(&gold);
        let pred: Vec<usize> = which.iter().map(|&k| preds[k]).collect();
        let (acc, f1) = expected_scores(&gold, &pred);

        // TSV with integer labels; a bare field name as --text; batches of 2 (padding).
        let tsv = dir.join("rows.tsv");
        let mut t = String::from("id\tsentence\tlabel\n");
        for (i, (&k, g)) in which.iter().zip(&gold).enumerate() {
            t.push_str(&format!("{i}\t{}\t{g}\n", texts[k]));
        }
        std::fs::write(&tsv, t).unwrap();
        let out = succeeds(&[
            "classify",
            "--model",
            &arg(&model),
            "--data",
            &arg(&tsv),
            "--text",
            "sentence",
            "--label-field",
            "label",
            "--batch-size",
            "2",
            "--json",
        ]);
        let v = json(&out);
        assert_eq!(v["n"].as_u64(), Some(gold.len() as u64), "{v}");
        assert!(
            (v["accuracy"].as_f64().unwrap() - acc).abs() < 1e-12,
            "{v} vs {acc}"
        );
        assert!(
            (v["f1"].as_f64().unwrap() - f1).abs() < 1e-12,
            "{v} vs {f1}"
        );

        // JSONL with string labels through the model's id2label, a template as --text.
        let jsonl = dir.join("rows.jsonl");
        let lines: Vec<String> = which
            .iter()
            .zip(&gold)
            .map(|(&k, &g)| serde_json::json!({"s": texts[k], "y": NAMES[g]}).to_string())
            .collect();
        std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
        let out = succeeds(&[
            "classify",
            "--model",
            &arg(&model),
            "--data",
            &arg(&jsonl),
            "--text",
            "{s}",
            "--label-field",
            "y",
            "--json",
        ]);
        let w = json(&out);
        for k in ["accuracy", "f1", "n"] {
            assert_eq!(v[k], w[k], "{k}: TSV {v} vs JSONL {w}");
        }
        // The text report says the same.
        let out = succeeds(&[
            "classify",
            "--model",
            &arg(&model),
            "--data",
            &arg(&jsonl),
            "--text",
            "{s}",
            "--label-field",
            "y",
        ]);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(&format!("accuracy  {acc:.4}")), "{text}");
        assert!(text.contains(&format!("f1        {f1:.4}")), "{text}");
        assert!(
            text.contains(&format!("n         {}", gold.len())),
            "{text}"
        );
    }
}

#[test]
fn classify_names_what_a_model_without_a_classifier_is() {
    let dir = tmp("classify-models");
    let tsv = dir.join("rows.tsv");
    std::fs::write(&tsv, "sentence\tlabel\nhello\t1\n").unwrap();
    let run = |model: &Path| {
        fails(&[
            "classify",
            "--model",
            &arg(model),
            "--data",
            &arg(&tsv),
            "--text",
            "{sentence}",
            "--label-field",
            "label",
        ])
    };
    let minilm = repo().join(".cache/models/all-minilm-l6-v2");
    assert!(minilm.join("model.safetensors").is_file(), "{minilm:?}");
    let e = run(&minilm);
    assert!(
        e.contains("all-minilm-l6-v2")
            && e.contains(
                "(BertModel, encoder) is an encoder without a sequence-classification head"
            )
            && e.contains("classify needs a sequence-classification model"),
        "{e}"
    );
    // The tiny fixture as saved (BertForMaskedLM): another head.
    let e = run(&tiny_bert());
    assert!(
        e.contains("BertForMaskedLM") && e.contains("without a sequence-classification head"),
        "{e}"
    );
    let e = run(&repo().join("tests/fixtures/t5/t5-v1_0"));
    assert!(
        e.contains("is an encoder-decoder") && e.contains("classify needs"),
        "{e}"
    );
    let e = run(&smollm2());
    assert!(
        e.contains("(LlamaForCausalLM, decoder) is a decoder") && e.contains("classify needs"),
        "{e}"
    );
}

#[test]
fn a_label_outside_the_label_list_names_the_file_line_and_field() {
    let dir = tmp("classify-labels");
    let model = seq_cls_model(&dir, "model", 2);
    let tsv = dir.join("rows.tsv");
    std::fs::write(
        &tsv,
        "sentence\tlabel\na good film\tpositive\nnot sure\tneutral\nbad\tnegative\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "classify".to_string(),
            "--model".into(),
            arg(&model),
            "--data".into(),
            arg(&tsv),
            "--text".into(),
            "{sentence}".into(),
            "--label-field".into(),
            "label".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        fails(&args)
    };
    let want = format!(
        "error: {}: line 3: field `label`: label \"neutral\" is not one of the labels (negative, positive)",
        tsv.display()
    );
    let e = run(&["--labels", "negative,positive"]);
    assert_eq!(e, want);
    // Without --labels the model's id2label is the list; the message says how to name others.
    let e = run(&[]);
    assert!(
        e.starts_with(&want) && e.contains("the model's id2label") && e.contains("--labels"),
        "{e}"
    );
    // An id past the classifier.
    std::fs::write(&tsv, "sentence\tlabel\nfine\t1\nodd\t2\n").unwrap();
    let e = run(&[]);
    assert!(
        e.contains("rows.tsv: line 3: field `label`: label 2 is out of range: there are 2 classes"),
        "{e}"
    );
    // --labels must name as many classes as the classifier has.
    let e = run(&["--labels", "a,b,c"]);
    assert!(
        e.contains(
            "--labels names 3 classes but the model's classifier has 2 (negative, positive)"
        ),
        "{e}"
    );
    let e = run(&["--labels", "a,a"]);
    assert!(e.contains("--labels: `a` appears twice"), "{e}");
    // A row without the label field.
    std::fs::write(&tsv, "sentence\tgold\nfine\t1\n").unwrap();
    let e = run(&[]);
    assert!(
        e.contains("rows.tsv: line 2: no label field `label` (the row has: "),
        "{e}"
    );
    // A null label is named as null; a huge label value is shown cut short.
    let jsonl = dir.join("rows.jsonl");
    let huge = "b ".repeat(100_000);
    std::fs::write(
        &jsonl,
        format!(
            "{}\n{}\n",
            serde_json::json!({"sentence": "fine", "label": null}),
            serde_json::json!({"sentence": "fine", "label": huge})
        ),
    )
    .unwrap();
    let args = |limit: &str| {
        vec![
            "classify".to_string(),
            "--model".into(),
            arg(&model),
            "--data".into(),
            arg(&jsonl),
            "--text".into(),
            "{sentence}".into(),
            "--label-field".into(),
            "label".into(),
            "--limit".into(),
            limit.into(),
        ]
    };
    let e = fails(&args("1"));
    assert!(
        e.contains("rows.jsonl: line 1: label field `label` is null"),
        "{e}"
    );
    std::fs::write(
        &jsonl,
        format!(
            "{}\n",
            serde_json::json!({"sentence": "fine", "label": huge})
        ),
    )
    .unwrap();
    let e = fails(&args("1"));
    assert!(
        e.contains("line 1: field `label`: label \"b b")
            && e.contains("(200000 characters)")
            && e.len() < 400,
        "{}",
        &e[..e.len().min(400)]
    );
}

#[test]
fn classify_adapters_must_be_sequence_classification_ones() {
    let dir = tmp("classify-adapter");
    let model = seq_cls_model(&dir, "model", 3);
    let tsv = dir.join("rows.tsv");
    std::fs::write(&tsv, "sentence\tlabel\nhello\t1\n").unwrap();
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
            "lora_alpha": 4, "target_modules": ["query"]})
        .to_string(),
    )
    .unwrap();
    let args = |a: &Path| {
        vec![
            "classify".to_string(),
            "--model".into(),
            arg(&model),
            "--adapter".into(),
            arg(a),
            "--data".into(),
            arg(&tsv),
            "--text".into(),
            "sentence".into(),
            "--label-field".into(),
            "label".into(),
            "--json".into(),
        ]
    };
    let e = fails(&args(&adapter));
    assert!(
        e.contains("adapter_config.json: key `task_type`: \"CAUSAL_LM\": classify needs a sequence-classification adapter (SEQ_CLS)"),
        "{e}"
    );

    // A SEQ_CLS LoRA adapter on the query layers with B = 0 changes nothing: the scores are
    // the base model's, through the adapter path.
    let lora = dir.join("lora");
    std::fs::create_dir_all(&lora).unwrap();
    std::fs::write(
        lora.join("adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2,
            "lora_alpha": 4, "lora_dropout": 0.0, "bias": "none", "target_modules": ["query"]})
        .to_string(),
    )
    .unwrap();
    let dev = candle_core::Device::Cpu;
    let mut t = std::collections::HashMap::new();
    for i in 0..2 {
        let m = format!("base_model.model.bert.encoder.layer.{i}.attention.self.query");
        t.insert(
            format!("{m}.lora_A.weight"),
            candle_core::Tensor::ones((2, 32), candle_core::DType::F32, &dev).unwrap(),
        );
        t.insert(
            format!("{m}.lora_B.weight"),
            candle_core::Tensor::zeros((32, 2), candle_core::DType::F32, &dev).unwrap(),
        );
    }
    candle_core::safetensors::save(&t, lora.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        &tsv,
        "sentence\tlabel\nThe cat sat on the mat.\t2\na [MASK] ran home\t0\n",
    )
    .unwrap();
    let mut base = args(&lora);
    base.drain(3..5);
    let base = json(&succeeds(&base));
    let with = json(&succeeds(&args(&lora)));
    assert_eq!(base["n"].as_u64(), Some(2), "{base}");
    for k in ["accuracy", "f1", "n"] {
        assert_eq!(base[k], with[k], "{k}: {base} vs {with}");
    }
}
