//! LoRA adapter files to and from PEFT for the T5 (`SEQ_2_SEQ_LM`) and BERT / RoBERTa (`SEQ_CLS`,
//! classifier in `modules_to_save`) families, on the tiny fixtures of reference/t5_fixtures.py
//! and reference/bert_fixtures.py. The PEFT-made adapters and PEFT's numbers for the committed
//! ferrotune-made ones are written by reference/peft_families.py (see its docstring).
use candle_core::{DType, Device, Tensor};
use ferrotune::data::Batch;
use ferrotune::model::bert::{self, Bert, BertHead, BertInput};
use ferrotune::model::{LoadOptions, Model, SafetensorsSource};
use ferrotune::nn::LinearWeight;
use ferrotune::peft::lora::{self, LoraConfig};
use ferrotune::peft::{self, format};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::common;
use common::{
    adapter_keys, flat, floats, int_rows, load_fixture, matrix, max_abs_diff, read_json, repo,
    t5_batch,
};

fn peft_dir(name: &str) -> PathBuf {
    repo().join("tests/fixtures/peft").join(name)
}

/// max |got - want| / max |want|: the logits' difference relative to their scale.
fn rel_diff(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "different sizes");
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
    d as f64 / scale as f64
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ferrotune-peft-families-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

// ---- T5 ------------------------------------------------------------------------------------

fn t5() -> Box<dyn Model> {
    load_fixture("tests/fixtures/t5/t5-v1_1")
}

/// Mean NLL over the labelled tokens and the decoder logits, as transformers computes them.
fn t5_numbers(m: &dyn Model, batch: &Batch) -> (f64, Vec<f32>) {
    let (sum, n) = m.loss_sum(batch, false).unwrap();
    let nll = sum.to_scalar::<f32>().unwrap() as f64 / n as f64;
    (nll, flat(&m.logits(batch).unwrap()))
}

const T5_TARGETS: [&str; 7] = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"];

// ---- BERT ----------------------------------------------------------------------------------

fn cls_model(flavor: &str) -> Bert {
    let dir = repo().join(format!("tests/fixtures/bert/tiny-{flavor}"));
    let cfg = bert::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    Bert::load(&src, &cfg, BertHead::SequenceClassification).unwrap()
}

fn bert_input(exp: &Value) -> BertInput {
    BertInput {
        input_ids: matrix(&int_rows(&exp["input_ids"]), DType::U32),
        token_type_ids: matrix(&int_rows(&exp["token_type_ids"]), DType::U32),
        attention_mask: matrix(&int_rows(&exp["attention_mask"]), DType::U32),
    }
}

fn bert_logits(m: &Bert, input: &BertInput) -> Vec<f32> {
    flat(&m.sequence_logits(input).unwrap())
}

/// Every tensor of adapter `name` gets seeded random values: LoRA A and B uniform in
/// (-amp, amp), a `modules_to_save` copy (`classifier.*`) noise of that size added.
fn randomize(m: &dyn Model, name: &str, seed: u64, amp: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (p, v) in peft::adapter_params(m, name) {
        let n = v.elem_count();
        let noise: Vec<f32> = (0..n).map(|_| rng.random_range(-amp..amp)).collect();
        let noise = Tensor::from_vec(noise, v.shape(), &Device::Cpu).unwrap();
        let new = if p.contains("lora_") {
            noise
        } else {
            (v.as_tensor() + noise).unwrap()
        };
        v.set(&new).unwrap();
    }
}

// ---- (a) PEFT-made adapters load here -------------------------------------------------------

/// The T5 LoRA PEFT made (SEQ_2_SEQ_LM on q, k, v, o, wi_0, wi_1, wo) loads here and gives PEFT's
/// NLL and logits; the parameter report is PEFT's; merging keeps the NLL.
#[test]
fn peft_t5_adapter_matches_peft() {
    let dir = peft_dir("t5-lora-peft");
    let exp = read_json(&dir.join("expected.json"));
    let batch = t5_batch(&exp);
    let mut m = t5();
    let (base_nll, _) = t5_numbers(&*m, &batch);
    let loaded = format::load_adapter(&mut *m, &dir, "default").unwrap();
    // 2 encoder layers x 7 targeted linears + 3 decoder layers x 11 (with cross-attention).
    assert_eq!(loaded.modules.len(), 2 * 7 + 3 * 11);
    assert!(loaded
        .modules
        .iter()
        .all(|n| T5_TARGETS.iter().any(|t| n.ends_with(&format!(".{t}")))));
    assert_eq!(loaded.params.to_string(), exp["report"].as_str().unwrap());
    let (nll, logits) = t5_numbers(&*m, &batch);
    let want = exp["nll_mean"].as_f64().unwrap();
    let rel = ((nll - want) / want).abs();
    let lrel = rel_diff(&logits, &floats(&exp["logits"]));
    eprintln!(
        "PEFT T5 adapter: nll {nll:.8} vs PEFT {want:.8} (rel {rel:.2e}; base {base_nll:.4}); \
         logits rel diff {lrel:.2e}"
    );
    assert!((base_nll - want).abs() > 0.1, "the adapter must matter");
    assert!(rel < 1e-4, "nll {nll} vs PEFT {want}");
    assert!(
        lrel < 1e-4,
        "logits differ from PEFT's by {lrel:e} relative"
    );

    lora::merge_and_unload(&mut *m, "default").unwrap();
    let (merged, _) = t5_numbers(&*m, &batch);
    assert!(((merged - want) / want).abs() < 1e-4, "merged nll {merged}");
}

/// The SEQ_CLS LoRAs PEFT made (query, value; PEFT put the classifier in modules_to_save and
/// saved its trained copy) load here and give PEFT's logits, with the saved head replacing the
/// base's; disabling the adapter gives the base logits back; merge_and_unload writes the saved
/// head into the model.
#[test]
fn peft_seq_cls_adapters_match_peft() {
    for flavor in ["bert", "roberta"] {
        let dir = peft_dir(&format!("{flavor}-lora-peft"));
        let exp = read_json(&dir.join("expected.json"));
        let cfg = read_json(&dir.join("adapter_config.json"));
        assert_eq!(
            cfg["modules_to_save"],
            serde_json::json!(["classifier", "score"])
        );
        let input = bert_input(&exp);
        let mut m = cls_model(flavor);
        let base = bert_logits(&m, &input);
        assert!(rel_diff(&base, &floats(&exp["base_logits"])) < 1e-4);
        let loaded = format::load_adapter(&mut m, &dir, "default").unwrap();
        let heads: Vec<String> = match flavor {
            "bert" => vec!["classifier".into()],
            _ => vec!["classifier.dense".into(), "classifier.out_proj".into()],
        };
        assert_eq!(
            peft::modules_to_save::saved_modules(&m, "default"),
            heads,
            "{flavor}"
        );
        assert_eq!(loaded.params.to_string(), exp["report"].as_str().unwrap());
        let got = bert_logits(&m, &input);
        let want = floats(&exp["logits"]);
        let rel = rel_diff(&got, &want);
        eprintln!("PEFT {flavor} SEQ_CLS adapter: logits rel diff {rel:.2e}");
        assert!(rel_diff(&base, &want) > 0.05, "the adapter must matter");
        assert!(rel < 1e-4, "{flavor}: logits differ from PEFT's by {rel:e}");

        peft::set_adapters_enabled(&mut m, false);
        assert!(rel_diff(&bert_logits(&m, &input), &base) < 1e-6);
        peft::set_adapters_enabled(&mut m, true);

        let file =
            candle_core::safetensors::load(dir.join(format::WEIGHTS_FILE), &Device::Cpu).unwrap();
        lora::merge_and_unload(&mut m, "default").unwrap();
        assert!(peft::adapter_names(&m).is_empty());
        let merged = bert_logits(&m, &input);
        assert!(rel_diff(&merged, &floats(&exp["merged_logits"])) < 1e-4);
        for lin in m.linears() {
            if heads.iter().any(|h| h == lin.name()) {
                let key = format!("base_model.model.{}.weight", lin.name());
                let d = max_abs_diff(&lin.weight().to_dense_f32().unwrap(), &file[&key]);
                assert_eq!(d, 0.0, "{key}");
                assert!(matches!(lin.weight(), LinearWeight::Frozen(_)));
            }
        }
    }
}

// ---- (b) ferrotune-made adapters load in PEFT -----------------------------------------------

fn t5_config() -> LoraConfig {
    let mut cfg = LoraConfig::new(4, 8.0, &T5_TARGETS);
    cfg.task_type = Some("SEQ_2_SEQ_LM".into());
    cfg.base_model_name_or_path = Some("tests/fixtures/t5/t5-v1_1".into());
    cfg
}

/// SEQ_CLS with modules_to_save left unset: attaching adds the classifier, as PEFT does.
fn bert_config() -> LoraConfig {
    let mut cfg = LoraConfig::new(2, 6.0, &["query", "key", "value"]);
    cfg.task_type = Some("SEQ_CLS".into());
    cfg.base_model_name_or_path = Some("tests/fixtures/bert/tiny-bert".into());
    cfg
}

/// Write the T5 and BERT adapters ferrotune makes (seeded attach, random non-zero weights) into
/// `dir/t5` and `dir/bert`, each with expected.json: the inputs and our NLL / logits and
/// parameter report. Returns our (T5 NLL, BERT logits).
fn write_ferrotune_adapters(dir: &Path) -> (f64, Vec<f32>) {
    let t5_exp = read_json(&peft_dir("t5-lora-peft/expected.json"));
    let batch = t5_batch(&t5_exp);
    let mut m = t5();
    let cfg = t5_config();
    let info = lora::attach_lora(&mut *m, &cfg, "default", 7).unwrap();
    assert!(info.modules_to_save.is_empty());
    randomize(&*m, "default", 11, 0.3);
    let d = dir.join("t5");
    format::save_adapter(&*m, "default", &cfg, &d).unwrap();
    let (nll, logits) = t5_numbers(&*m, &batch);
    let mut exp = serde_json::json!({
        "input_ids": t5_exp["input_ids"],
        "attention_mask": t5_exp["attention_mask"],
        "labels": t5_exp["labels"],
        "nll_mean": nll,
        "logits": logits,
        "report": info.params.to_string(),
    });
    std::fs::write(d.join("expected.json"), exp.to_string()).unwrap();

    let bert_exp = read_json(&peft_dir("bert-lora-peft/expected.json"));
    let input = bert_input(&bert_exp);
    let mut b = cls_model("bert");
    let cfg = bert_config();
    let info = lora::attach_lora(&mut b, &cfg, "default", 8).unwrap();
    assert_eq!(info.modules_to_save, ["classifier"]);
    randomize(&b, "default", 12, 0.3);
    let d = dir.join("bert");
    format::save_adapter(&b, "default", &cfg, &d).unwrap();
    let logits = bert_logits(&b, &input);
    exp = serde_json::json!({
        "input_ids": bert_exp["input_ids"],
        "token_type_ids": bert_exp["token_type_ids"],
        "attention_mask": bert_exp["attention_mask"],
        "logits": logits,
        "report": info.params.to_string(),
    });
    std::fs::write(d.join("expected.json"), exp.to_string()).unwrap();
    (nll, logits)
}

/// (b) Writes ferrotune's T5 and BERT adapters with our own numbers to a temp folder for
/// `reference/peft_families.py --check DIR` (printed). With FERROTUNE_WRITE_PEFT_FIXTURE=1 it
/// (re)writes tests/fixtures/peft/{t5,bert}-lora-ferrotune instead, whose PEFT numbers
/// `reference/peft_families.py --ferrotune-fixture-only` then rewrites. The files hold PEFT's key
/// names and config, and reloading them here reproduces our numbers exactly.
#[test]
fn ferrotune_family_adapters_for_peft() {
    let write_fixture = std::env::var_os("FERROTUNE_WRITE_PEFT_FIXTURE").is_some();
    let dir = if write_fixture {
        peft_dir("")
    } else {
        temp_dir("ours")
    };
    let (nll, logits) = if write_fixture {
        let tmp = temp_dir("fixture");
        let r = write_ferrotune_adapters(&tmp);
        for f in ["t5", "bert"] {
            let to = dir.join(format!("{f}-lora-ferrotune"));
            std::fs::create_dir_all(&to).unwrap();
            for name in [format::CONFIG_FILE, format::WEIGHTS_FILE] {
                std::fs::copy(tmp.join(f).join(name), to.join(name)).unwrap();
            }
            // The committed copy keeps the inputs and our NLL / report; PEFT's own numbers,
            // logits included, go to peft_expected.json.
            let mut exp = read_json(&tmp.join(f).join("expected.json"));
            if f == "t5" {
                exp.as_object_mut().unwrap().remove("logits");
            }
            std::fs::write(to.join("expected.json"), exp.to_string()).unwrap();
        }
        eprintln!(
            "wrote {0}/t5-lora-ferrotune and {0}/bert-lora-ferrotune; now write PEFT's numbers: \
             .venv/bin/python reference/peft_families.py --ferrotune-fixture-only",
            dir.display()
        );
        r
    } else {
        let r = write_ferrotune_adapters(&dir);
        eprintln!(
            "ferrotune adapters in {0}: T5 nll {1:.8}\n  check: .venv/bin/python \
             reference/peft_families.py --check {0}",
            dir.display(),
            r.0
        );
        r
    };
    let (t5_dir, bert_dir) = if write_fixture {
        (
            peft_dir("t5-lora-ferrotune"),
            peft_dir("bert-lora-ferrotune"),
        )
    } else {
        (dir.join("t5"), dir.join("bert"))
    };

    // PEFT's key names and config.
    let bert_keys = adapter_keys(&bert_dir);
    let head: Vec<&String> = bert_keys.iter().filter(|k| !k.contains("lora_")).collect();
    assert_eq!(
        head,
        [
            "base_model.model.classifier.bias",
            "base_model.model.classifier.weight"
        ]
    );
    assert_eq!(bert_keys.len(), 2 + 2 * 3 * 2);
    assert!(bert_keys.contains(
        &"base_model.model.bert.encoder.layer.1.attention.self.key.lora_B.weight".to_string()
    ));
    let cfg = read_json(&bert_dir.join(format::CONFIG_FILE));
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let t5_keys = adapter_keys(&t5_dir);
    assert_eq!(t5_keys.len(), 2 * (2 * 7 + 3 * 11));
    assert!(t5_keys.contains(
        &"base_model.model.decoder.block.2.layer.1.EncDecAttention.o.lora_A.weight".to_string()
    ));
    assert_eq!(
        read_json(&t5_dir.join(format::CONFIG_FILE))["task_type"],
        "SEQ_2_SEQ_LM"
    );

    let exp = read_json(&t5_dir.join("expected.json"));
    let mut m = t5();
    format::load_adapter(&mut *m, &t5_dir, "default").unwrap();
    assert_eq!(t5_numbers(&*m, &t5_batch(&exp)).0, nll);
    let exp = read_json(&bert_dir.join("expected.json"));
    let mut b = cls_model("bert");
    format::load_adapter(&mut b, &bert_dir, "default").unwrap();
    assert_eq!(bert_logits(&b, &bert_input(&exp)), logits);
}

/// (b) The committed ferrotune-made adapters give PEFT's own numbers (peft_expected.json,
/// written by `reference/peft_families.py` with PEFT): T5 NLL and logits, BERT logits, within
/// 1e-4 relative, PEFT's parameter report, and PEFT's merged model's numbers after our merge.
#[test]
fn committed_ferrotune_adapters_match_peft() {
    let t5_dir = peft_dir("t5-lora-ferrotune");
    let exp = read_json(&t5_dir.join("peft_expected.json"));
    let batch = t5_batch(&exp);
    let mut m = t5();
    let loaded = format::load_adapter(&mut *m, &t5_dir, "default").unwrap();
    assert_eq!(loaded.params.to_string(), exp["report"].as_str().unwrap());
    let (nll, logits) = t5_numbers(&*m, &batch);
    let want = exp["nll_mean"].as_f64().unwrap();
    let rel = ((nll - want) / want).abs();
    let lrel = rel_diff(&logits, &floats(&exp["logits"]));
    eprintln!("ferrotune T5 adapter in PEFT: nll {nll:.8} vs PEFT {want:.8} (rel {rel:.2e}); logits rel diff {lrel:.2e}");
    assert!(
        rel < 1e-4 && lrel < 1e-4,
        "nll rel {rel:e}, logits rel {lrel:e}"
    );
    lora::merge_and_unload(&mut *m, "default").unwrap();
    let merged = t5_numbers(&*m, &batch).0;
    let want = exp["merged_nll_mean"].as_f64().unwrap();
    assert!(
        ((merged - want) / want).abs() < 1e-4,
        "merged {merged} vs {want}"
    );

    let bert_dir = peft_dir("bert-lora-ferrotune");
    let exp = read_json(&bert_dir.join("peft_expected.json"));
    let input = bert_input(&exp);
    let mut b = cls_model("bert");
    let loaded = format::load_adapter(&mut b, &bert_dir, "default").unwrap();
    assert_eq!(loaded.params.to_string(), exp["report"].as_str().unwrap());
    let rel = rel_diff(&bert_logits(&b, &input), &floats(&exp["logits"]));
    eprintln!("ferrotune BERT SEQ_CLS adapter in PEFT: logits rel diff {rel:.2e}");
    assert!(rel < 1e-4, "logits rel {rel:e}");
    lora::merge_and_unload(&mut b, "default").unwrap();
    let rel = rel_diff(&bert_logits(&b, &input), &floats(&exp["merged_logits"]));
    assert!(rel < 1e-4, "merged logits rel {rel:e}");
}

// ---- modules_to_save behaviour and errors ---------------------------------------------------

/// The classifier copy trains (gradients reach it, not the base), is counted as trainable as
/// PEFT counts it, and removing the adapter gives the base head back.
#[test]
fn modules_to_save_copy_trains_and_is_counted_like_peft() {
    let exp = read_json(&peft_dir("bert-lora-peft/expected.json"));
    let input = bert_input(&exp);
    let mut m = cls_model("bert");
    let base = bert_logits(&m, &input);
    let mut cfg = LoraConfig::new(4, 8.0, &["query", "value"]);
    cfg.task_type = Some("SEQ_CLS".into());
    let info = lora::attach_lora(&mut m, &cfg, "default", 1).unwrap();
    assert_eq!(info.modules_to_save, ["classifier"]);
    // Same shapes as PEFT's fixture: its report line.
    assert_eq!(info.report(), exp["report"].as_str().unwrap());
    // A fresh copy with B = 0: the output is the base's.
    assert!(rel_diff(&bert_logits(&m, &input), &base) < 1e-6);
    let params = peft::adapter_params(&m, "default");
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"classifier.weight") && names.contains(&"classifier.bias"));
    let labels = Tensor::new(&[0i64, 2, 1, 2], &Device::Cpu).unwrap();
    let (loss, _) = m.loss_sum(&input, &labels, true).unwrap();
    let grads = loss.backward().unwrap();
    for (n, v) in &params {
        if n.starts_with("classifier") {
            let g = grads.get(v.as_tensor()).expect("gradient for the copy");
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{n}");
        }
    }
    let head = m
        .linears()
        .into_iter()
        .find(|l| l.name() == "classifier")
        .unwrap();
    assert!(matches!(head.weight(), LinearWeight::Frozen(_)));
    randomize(&m, "default", 3, 0.3);
    assert!(rel_diff(&bert_logits(&m, &input), &base) > 1e-3);
    peft::remove_adapter(&mut m, "default").unwrap();
    assert_eq!(bert_logits(&m, &input), base);
}

/// Bad modules_to_save settings and adapter files are one-line errors naming the key / tensor;
/// a failed load leaves nothing attached.
#[test]
fn modules_to_save_errors_are_one_line() {
    let one_line = |e: String, needles: &[&str]| {
        assert!(!e.contains('\n'), "{e}");
        for n in needles {
            assert!(e.contains(n), "`{n}` not in: {e}");
        }
    };
    let mut m = cls_model("bert");
    let mut cfg = LoraConfig::new(2, 4.0, &["query"]);
    cfg.modules_to_save = Some(vec!["no_such_head".into()]);
    let e = lora::attach_lora(&mut m, &cfg, "default", 0).unwrap_err();
    one_line(e.to_string(), &["modules_to_save", "no_such_head"]);
    cfg.modules_to_save = Some(vec!["attention.output".into()]);
    let e = lora::attach_lora(&mut m, &cfg, "default", 0).unwrap_err();
    one_line(e.to_string(), &["modules_to_save", "LayerNorm"]);
    cfg.modules_to_save = Some(vec!["(".into()]);
    let e = lora::attach_lora(&mut m, &cfg, "default", 0).unwrap_err();
    one_line(e.to_string(), &["modules_to_save"]);
    assert!(peft::adapter_names(&m).is_empty());

    // An adapter whose saved head has another number of labels.
    let src = peft_dir("bert-lora-peft");
    let bad = temp_dir("bad-head");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(src.join(format::CONFIG_FILE), bad.join(format::CONFIG_FILE)).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join(format::WEIGHTS_FILE), &Device::Cpu).unwrap();
    t.insert(
        "base_model.model.classifier.weight".into(),
        Tensor::zeros((5, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, bad.join(format::WEIGHTS_FILE)).unwrap();
    let e = format::load_adapter(&mut m, &bad, "default").unwrap_err();
    one_line(
        e.to_string(),
        &[
            "base_model.model.classifier.weight",
            "[5, 32]",
            "adapter_model.safetensors",
        ],
    );
    // ... and one without the head.
    t.remove("base_model.model.classifier.weight");
    candle_core::safetensors::save(&t, bad.join(format::WEIGHTS_FILE)).unwrap();
    let e = format::load_adapter(&mut m, &bad, "default").unwrap_err();
    one_line(
        e.to_string(),
        &[
            "base_model.model.classifier.weight",
            "missing",
            "modules_to_save",
        ],
    );
    assert!(peft::adapter_names(&m).is_empty());

    // Two adapters cannot both run their own copy of the classifier.
    format::load_adapter(&mut m, &src, "first").unwrap();
    let e = format::load_adapter(&mut m, &src, "second").unwrap_err();
    one_line(e.to_string(), &["classifier", "first", "modules_to_save"]);
    assert_eq!(peft::adapter_names(&m), ["first"]);
    lora::set_adapter_active(&m, "first", false).unwrap();
    format::load_adapter(&mut m, &src, "second").unwrap();
    peft::remove_adapter(&mut m, "first").unwrap();
    peft::remove_adapter(&mut m, "second").unwrap();

    // LoRA never targets a saved module: naming the classifier as a target matches nothing.
    let mut cfg = LoraConfig::new(2, 4.0, &["classifier"]);
    cfg.task_type = Some("SEQ_CLS".into());
    let e = lora::attach_lora(&mut m, &cfg, "default", 0).unwrap_err();
    one_line(e.to_string(), &["LoRA"]);
    let _ = std::fs::remove_dir_all(&bad);
}

/// `[lora] modules_to_save` in the train config reaches the adapter, and a SEQ_CLS model's
/// classifier is always added, as PEFT adds it; the tuner trains and restores the copies.
#[test]
fn train_config_modules_to_save_reaches_the_tuner() {
    let text = |extra: &str| {
        format!(
            "model = \"m\"\noutput_dir = \"out\"\n[data]\ntrain = \"t.jsonl\"\n\
             template = \"Q: {{q}}\"\ncompletion = \" {{a}}\"\n\
             [lora]\nr = 2\ntargets = [\"query\", \"value\"]\n{extra}"
        )
    };
    let parse =
        |t: &str| ferrotune::train::parse_config(t, Path::new("train.toml"), Path::new("."), &[]);
    let cfg = match parse(&text("modules_to_save = [\"pooler\"]\n")) {
        Ok(c) => c.config,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(cfg.lora.modules_to_save, Some(vec!["pooler".to_string()]));
    let mut m = cls_model("bert");
    let tuner = ferrotune::train::Tuner::attach(&cfg, &mut m, "tiny-bert").unwrap();
    let names: Vec<String> = tuner.trainable(&m).into_iter().map(|(n, _)| n).collect();
    for n in [
        "bert.pooler.dense.weight",
        "classifier.weight",
        "classifier.bias",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    // 2 layers x 2 targets x (A + B) + pooler (2) + classifier (2).
    assert_eq!(names.len(), 8 + 4);
    let dir = temp_dir("tuner");
    tuner.save(&m, &dir).unwrap();
    let saved = read_json(&dir.join(format::CONFIG_FILE));
    assert_eq!(
        saved["modules_to_save"],
        serde_json::json!(["pooler", "classifier", "score"])
    );
    // Restore puts the saved values back after a change.
    let before: Vec<Vec<f32>> = tuner
        .trainable(&m)
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect();
    randomize(&m, ferrotune::train::ADAPTER_NAME, 5, 0.5);
    tuner.restore(&m, &dir).unwrap();
    let after: Vec<Vec<f32>> = tuner
        .trainable(&m)
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect();
    assert_eq!(before, after);

    let e = parse(&text("modules_to_save = \"classifier\"\n")).unwrap_err();
    assert!(
        e.to_string().contains("modules_to_save") && !e.to_string().contains('\n'),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// TOKEN_CLS gets the classifier added as SEQ_CLS does (PEFT's
/// `PeftModelForTokenClassification`), and the adapter round-trips here bit for bit.
#[test]
fn token_classification_saves_its_classifier_too() {
    let dir = repo().join("tests/fixtures/bert/tiny-bert");
    let cfg = bert::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let load = || Bert::load(&src, &cfg, BertHead::TokenClassification).unwrap();
    let exp = read_json(&peft_dir("bert-lora-peft/expected.json"));
    let input = bert_input(&exp);
    let mut m = load();
    let lcfg = LoraConfig::new(2, 4.0, &["value"]);
    let info = lora::attach_lora(&mut m, &lcfg, "default", 3).unwrap();
    assert_eq!(info.modules_to_save, ["classifier"]);
    randomize(&m, "default", 4, 0.3);
    let want = flat(&m.token_logits(&input).unwrap());
    let out = temp_dir("token-cls");
    format::save_adapter(&m, "default", &lcfg, &out).unwrap();
    let saved = read_json(&out.join(format::CONFIG_FILE));
    assert_eq!(saved["task_type"], "TOKEN_CLS");
    assert_eq!(
        saved["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let mut fresh = load();
    format::load_adapter(&mut fresh, &out, "default").unwrap();
    assert_eq!(flat(&fresh.token_logits(&input).unwrap()), want);
    let _ = std::fs::remove_dir_all(&out);
}
