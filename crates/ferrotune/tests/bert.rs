//! The BERT family against transformers and sentence-transformers (fixtures written by
//! reference/bert_fixtures.py): tiny random BERT and RoBERTa encoders with every head, the real
//! all-MiniLM-L6-v2 sentence embeddings, gradients, bad configs, and a small training run.
use candle_core::{DType, Device, Tensor};
use ferrotune::model::bert::{self, Bert, BertConfig, BertHead, BertInput, Pooling};
use ferrotune::model::{LoadOptions, SafetensorsSource};
use ferrotune::nn::LinearAdapter;
use ferrotune::peft::LoraAdapter;
use ferrotune::tokenizer::{EncodedInput, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture_dir(name: &str) -> PathBuf {
    repo().join("tests/fixtures/bert").join(name)
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (written by .venv/bin/python reference/bert_fixtures.py)",
            p.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(a) => a.iter().flat_map(ints).collect(),
        x => vec![x.as_i64().unwrap()],
    }
}

fn rows_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| ints(r).into_iter().map(|x| x as u32).collect())
        .collect()
}

/// Largest |got - want|, with equal lengths.
fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "different sizes");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

struct Tiny {
    cfg: BertConfig,
    src: SafetensorsSource,
    tokenizer: Tokenizer,
    expected: Value,
}

fn tiny(flavor: &str) -> Tiny {
    let dir = fixture_dir(&format!("tiny-{flavor}"));
    let cfg = bert::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_hf_dir(&dir).unwrap();
    let expected = read_json(&dir.join("expected.json"));
    Tiny {
        cfg,
        src,
        tokenizer,
        expected,
    }
}

/// The case's rows encoded by our tokenizer; they must equal transformers' (unpadded) rows.
fn encode_case(t: &Tiny, case: &Value) -> Vec<EncodedInput> {
    let enc = t.tokenizer.input_encoder(40, false).unwrap();
    let texts = case["texts"].as_array().unwrap();
    let pairs = case["pairs"].as_array();
    let want_ids = rows_u32(&case["input_ids"]);
    let want_types = rows_u32(&case["token_type_ids"]);
    let mask = rows_u32(&case["attention_mask"]);
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let pair = pairs.map(|p| p[i].as_str().unwrap());
            let got = enc.encode(text.as_str().unwrap(), pair).unwrap();
            let n = mask[i].iter().filter(|&&m| m == 1).count();
            assert_eq!(
                got.ids,
                want_ids[i][..n],
                "{}: ids of row {i}",
                case["name"]
            );
            assert_eq!(
                got.type_ids,
                want_types[i][..n],
                "{}: type ids of row {i}",
                case["name"]
            );
            got
        })
        .collect()
}

fn check_tiny(flavor: &str) {
    let t = tiny(flavor);
    let load = |head| Bert::load(&t.src, &t.cfg, head).unwrap();
    let (base, seq, tok, mlm) = (
        load(BertHead::None),
        load(BertHead::SequenceClassification),
        load(BertHead::TokenClassification),
        load(BertHead::MaskedLm),
    );
    let mut worst = 0f32;
    for case in t.expected["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let rows = encode_case(&t, case);
        let input = BertInput::from_rows(&rows, t.cfg.pad_token_id, &Device::Cpu).unwrap();
        // Padding as transformers pads.
        let ids: Vec<Vec<u32>> = input.input_ids.to_vec2().unwrap();
        assert_eq!(ids, rows_u32(&case["input_ids"]), "{name}: padded ids");
        let mask: Vec<Vec<u32>> = input.attention_mask.to_vec2().unwrap();
        assert_eq!(mask, rows_u32(&case["attention_mask"]), "{name}: mask");

        let mut check = |what: &str, got: &Tensor, want: &Value| {
            let d = max_diff(&flat(got), &floats(want));
            assert!(d < 1e-4, "{flavor} {name}: {what} differs by {d}");
            worst = worst.max(d);
        };
        let hidden = base.forward_hidden(&input, false).unwrap();
        check("last_hidden_state", &hidden, &case["last_hidden_state"]);
        if flavor == "bert" {
            check(
                "pooler_output",
                &base.pooled(&hidden).unwrap(),
                &case["pooler_output"],
            );
        }
        check(
            "seq_logits",
            &seq.sequence_logits(&input).unwrap(),
            &case["seq_logits"],
        );
        check(
            "token_logits",
            &tok.token_logits(&input).unwrap(),
            &case["token_logits"],
        );
        let mut mlm_logits = mlm.mlm_logits(&input).unwrap();
        if let Some(cols) = case.get("mlm_vocab_sample") {
            // tiny-roberta keeps sampled vocabulary columns only.
            let cols: Vec<u32> = ints(cols).into_iter().map(|x| x as u32).collect();
            let n = cols.len();
            let cols = Tensor::from_vec(cols, n, &Device::Cpu).unwrap();
            mlm_logits = mlm_logits.index_select(&cols, 2).unwrap();
        }
        check("mlm_logits", &mlm_logits, &case["mlm_logits"]);

        let (b, tl) = input.input_ids.dims2().unwrap();
        let labels = |key: &str, shape: &[usize]| {
            Tensor::from_vec(ints(&case[key]), shape, &Device::Cpu).unwrap()
        };
        for (what, model, labels) in [
            ("seq_loss", &seq, labels("seq_labels", &[b])),
            ("token_loss", &tok, labels("token_labels", &[b, tl])),
            ("mlm_loss", &mlm, labels("mlm_labels", &[b, tl])),
        ] {
            let (sum, n) = model.loss_sum(&input, &labels, false).unwrap();
            // an evaluation's loss, without the autograd graph: the same to the bit
            let (again, _) =
                ferrotune::nn::without_graph(|| model.loss_sum(&input, &labels, false)).unwrap();
            assert_eq!(
                sum.to_scalar::<f32>().unwrap().to_bits(),
                again.to_scalar::<f32>().unwrap().to_bits()
            );
            let mean = sum.to_scalar::<f32>().unwrap() / n as f32;
            let want = case[what].as_f64().unwrap() as f32;
            assert!(
                (mean - want).abs() < 1e-4 * want.abs().max(1.0),
                "{flavor} {name}: {what} {mean} vs transformers {want}"
            );
        }
    }
    for tr in t.expected["truncation"].as_array().unwrap() {
        let n = tr["max_length"].as_u64().unwrap() as usize;
        let enc = t.tokenizer.input_encoder(n, false).unwrap();
        let got = enc
            .encode(tr["text"].as_str().unwrap(), tr["pair"].as_str())
            .unwrap();
        let want: Vec<u32> = ints(&tr["input_ids"])
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(got.ids, want, "{flavor}: truncation to {n}: {tr}");
        let want: Vec<u32> = ints(&tr["token_type_ids"])
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(got.type_ids, want, "{flavor}: type ids truncated to {n}");
    }
    eprintln!("tiny-{flavor}: max |diff| vs transformers {worst:.2e}");
}

#[test]
fn tiny_bert_matches_transformers() {
    check_tiny("bert");
}

#[test]
fn tiny_roberta_matches_transformers() {
    check_tiny("roberta");
}

#[test]
fn linears_carry_transformers_module_names() {
    let t = tiny("bert");
    let seq = Bert::load(&t.src, &t.cfg, BertHead::SequenceClassification).unwrap();
    let names: Vec<&str> = seq.linears().iter().map(|l| l.name()).collect();
    assert_eq!(names[0], "bert.encoder.layer.0.attention.self.query");
    assert_eq!(names[5], "bert.encoder.layer.0.output.dense");
    assert!(
        names.ends_with(&["bert.pooler.dense", "classifier"]),
        "{names:?}"
    );
    assert_eq!(seq.modules_to_save(), ["classifier"]);
    assert_eq!(seq.output_layer(), Some("classifier"));
    let mlm = Bert::load(&t.src, &t.cfg, BertHead::MaskedLm).unwrap();
    let names: Vec<&str> = mlm.linears().iter().map(|l| l.name()).collect();
    assert!(
        names.ends_with(&["cls.predictions.transform.dense", "cls.predictions.decoder"]),
        "{names:?}"
    );
    assert_eq!(mlm.tied_linear(), Some("cls.predictions.decoder"));
    let norms: Vec<String> = mlm.norms().into_iter().map(|(n, _)| n).collect();
    assert_eq!(norms.len(), 1 + 2 * 2 + 1);
    assert_eq!(norms[0], "bert.embeddings.LayerNorm");
    assert_eq!(norms[5], "cls.predictions.transform.LayerNorm");
    let mut mlm = mlm;
    let e = mlm
        .make_modules_trainable(&["classifier".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no layer of this model is called `classifier`"),
        "{e}"
    );
    // The tied decoder's weight is the embedding table: only its bias becomes a parameter here.
    let p = mlm
        .make_modules_trainable(&["cls.predictions".to_string()])
        .unwrap();
    let names: Vec<&str> = p.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.bias"
        ]
    );
    // The bare encoder is named as transformers' BertModel names it: no prefix.
    let base = Bert::load(&t.src, &t.cfg, BertHead::None).unwrap();
    assert_eq!(
        base.linears()[0].name(),
        "encoder.layer.0.attention.self.query"
    );
    let r = tiny("roberta");
    let seq = Bert::load(&r.src, &r.cfg, BertHead::SequenceClassification).unwrap();
    let names: Vec<&str> = seq.linears().iter().map(|l| l.name()).collect();
    assert_eq!(names[0], "roberta.encoder.layer.0.attention.self.query");
    assert!(
        names.ends_with(&["classifier.dense", "classifier.out_proj"]),
        "{names:?}"
    );
}

/// One batch of the tiny fixture with labels for `head`.
fn tiny_batch(t: &Tiny, head: BertHead) -> (BertInput, Tensor) {
    let case = &t.expected["cases"][1];
    let rows = encode_case(t, case);
    let input = BertInput::from_rows(&rows, t.cfg.pad_token_id, &Device::Cpu).unwrap();
    let (b, tl) = input.input_ids.dims2().unwrap();
    let labels = match head {
        BertHead::SequenceClassification => {
            Tensor::from_vec(ints(&case["seq_labels"]), b, &Device::Cpu)
        }
        BertHead::TokenClassification => {
            Tensor::from_vec(ints(&case["token_labels"]), (b, tl), &Device::Cpu)
        }
        _ => Tensor::from_vec(ints(&case["mlm_labels"]), (b, tl), &Device::Cpu),
    }
    .unwrap();
    (input, labels)
}

#[test]
fn gradients_reach_every_trainable_tensor() {
    for flavor in ["bert", "roberta"] {
        let t = tiny(flavor);
        for head in [
            BertHead::SequenceClassification,
            BertHead::TokenClassification,
            BertHead::MaskedLm,
        ] {
            let mut model = Bert::load(&t.src, &t.cfg, head).unwrap();
            let params = model.make_all_trainable().unwrap();
            let (input, labels) = tiny_batch(&t, head);
            let (loss, n) = model.loss_sum(&input, &labels, true).unwrap();
            assert!(n > 0);
            let grads = loss.backward().unwrap();
            let mut names = Vec::new();
            for (name, var) in &params {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{flavor} {head:?}: no gradient for {name}"));
                let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert!(norm > 0.0, "{flavor} {head:?}: zero gradient for {name}");
                names.push(name.clone());
            }
            // Every tensor of the file the head uses is a parameter, named as in the file.
            let word = format!("{}embeddings.word_embeddings.weight", t.cfg.flavor.prefix());
            assert!(names.contains(&word), "{names:?}");
            let layers = names
                .iter()
                .filter(|n| n.contains("encoder.layer."))
                .count();
            assert_eq!(layers, 2 * 16, "{flavor} {head:?}: {names:?}");
        }
    }
}

#[test]
fn lora_and_the_head_get_gradients_and_the_base_does_not() {
    let t = tiny("bert");
    let mut model = Bert::load(&t.src, &t.cfg, BertHead::SequenceClassification).unwrap();
    let mut lora = Vec::new();
    for lin in model.linears_mut() {
        if lin.name().ends_with("query") || lin.name().ends_with("value") {
            let (o, i) = (lin.out_features(), lin.in_features());
            let a = ferrotune::ops::gradcheck::rand_tensor(&[4, i], DType::F32, 1).unwrap();
            let b = ferrotune::ops::gradcheck::rand_tensor(&[o, 4], DType::F32, 2).unwrap();
            let adapter = LoraAdapter::from_weights(a, b, 8.0, 2.0, 0.0, 0).unwrap();
            lora.extend(adapter.trainable_params());
            lin.add_adapter("default", Box::new(adapter));
        }
    }
    assert_eq!(lora.len(), 2 * 2 * 2);
    let head = model.make_head_trainable().unwrap();
    let head_names: Vec<&str> = head.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(head_names, ["classifier.weight", "classifier.bias"]);
    let (input, labels) = tiny_batch(&t, BertHead::SequenceClassification);
    let (loss, _) = model.loss_sum(&input, &labels, true).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in lora.iter().chain(&head) {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
    }
    // Frozen base weights get none (the graph would carry weight-sized gradients for nothing).
    let q = &model.layers[0].attention.query;
    if let ferrotune::nn::LinearWeight::Frozen(w) = q.weight() {
        assert!(grads.get(w).is_none());
    } else {
        panic!("the base weight should be frozen");
    }
}

#[test]
fn tiny_bert_learns_a_synthetic_classification() {
    use ferrotune::train::{AdamW, AdamWConfig};
    use rand::{Rng, SeedableRng};
    // negative (0) if the text says bad/awful, positive (2) if good/great, neutral (1) otherwise;
    // the rest of each text is random filler words.
    let t = tiny("bert");
    let filler = [
        "the", "a", "cat", "dog", "movie", "film", "story", "plot", "it", "was", "very",
    ];
    let cues = [
        ("bad", 0i64),
        ("awful", 0),
        ("good", 2),
        ("great", 2),
        ("", 1),
        ("", 1),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut make = |n: usize| -> Vec<(String, i64)> {
        (0..n)
            .map(|_| {
                let (cue, label) = cues[rng.random_range(0..cues.len())];
                let mut words: Vec<&str> = (0..rng.random_range(3..7))
                    .map(|_| filler[rng.random_range(0..filler.len())])
                    .collect();
                if !cue.is_empty() {
                    let at = rng.random_range(0..=words.len());
                    words.insert(at, cue);
                }
                (words.join(" "), label)
            })
            .collect()
    };
    let (train, test) = (make(240), make(60));
    let enc = t.tokenizer.input_encoder(40, false).unwrap();
    let batch = |rows: &[(String, i64)]| {
        let e: Vec<EncodedInput> = rows
            .iter()
            .map(|(s, _)| enc.encode(s, None).unwrap())
            .collect();
        let input = BertInput::from_rows(&e, 0, &Device::Cpu).unwrap();
        let labels: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let n = labels.len();
        (input, Tensor::from_vec(labels, n, &Device::Cpu).unwrap())
    };
    let mut model = Bert::load(&t.src, &t.cfg, BertHead::SequenceClassification).unwrap();
    let params = model.make_all_trainable().unwrap();
    let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
    let accuracy = |model: &Bert, rows: &[(String, i64)]| {
        let (input, labels) = batch(rows);
        let pred = model
            .sequence_logits(&input)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        let want = labels.to_vec1::<i64>().unwrap();
        pred.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / want.len() as f64
    };
    let before = accuracy(&model, &test);
    for epoch in 0..10 {
        for chunk in train.chunks(16) {
            let (input, labels) = batch(chunk);
            let (loss, n) = model.loss_sum(&input, &labels, true).unwrap();
            let grads = (loss / n as f64).unwrap().backward().unwrap();
            let g: Vec<Tensor> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            opt.step(&g, 1e-3).unwrap();
        }
        let _ = epoch;
    }
    let (train_acc, test_acc) = (accuracy(&model, &train), accuracy(&model, &test));
    eprintln!("accuracy before {before:.3}, after: train {train_acc:.3}, held out {test_acc:.3}");
    assert!(train_acc >= 0.95, "train accuracy {train_acc}");
    assert!(
        test_acc >= 0.9,
        "held-out accuracy {test_acc} (before training {before})"
    );
}

/// A copy of tiny-bert whose config.json is edited by `edit`; loading it must fail with one line
/// that contains `needle`.
fn bad_folder(tag: &str, edit: impl Fn(&mut Value), needle: &str) {
    let src = fixture_dir("tiny-bert");
    let dir = std::env::temp_dir().join(format!("ferrotune-bert-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg = read_json(&dir.join("config.json"));
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = match bert::load_bert(
        dir.to_str().unwrap(),
        &LoadOptions::default(),
        None,
        &Device::Cpu,
        &ferrotune::progress::NoProgress,
    ) {
        Ok(_) => panic!("{tag}: loaded"),
        Err(e) => e.to_string(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!e.contains('\n'), "{tag}: {e}");
    assert!(e.contains(needle), "{tag}: expected `{needle}` in: {e}");
}

#[test]
fn bad_configs_are_one_line_errors() {
    bad_folder("hidden", |c| c["hidden_size"] = 48.into(), "implies [");
    bad_folder(
        "hidden-heads",
        |c| c["hidden_size"] = 30.into(),
        "key `hidden_size`",
    );
    bad_folder(
        "layers-more",
        |c| c["num_hidden_layers"] = 3.into(),
        "bert.encoder.layer.2.attention.self.query.weight` is missing",
    );
    bad_folder(
        "layers-fewer",
        |c| c["num_hidden_layers"] = 1.into(),
        "key `num_hidden_layers`: 1 but",
    );
    bad_folder("vocab", |c| c["vocab_size"] = 20.into(), "key `vocab_size`");
    bad_folder(
        "labels",
        |c| {
            c["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
            c["id2label"] = serde_json::json!({"0": "a", "1": "b"});
        },
        "`classifier.weight` is [3, 32] but",
    );
    bad_folder(
        "positions",
        |c| c["max_position_embeddings"] = 1u64.into(),
        "is [40, 32] but",
    );
    bad_folder(
        "huge",
        |c| c["intermediate_size"] = (1u64 << 50).into(),
        "key `intermediate_size`: 1125899906842624 is larger than the limit",
    );
    bad_folder(
        "llama",
        |c| c["model_type"] = "llama".into(),
        "key `model_type`: `llama`",
    );
}

#[test]
fn inputs_past_the_tables_are_one_line_errors() {
    let t = tiny("bert");
    let model = Bert::load(&t.src, &t.cfg, BertHead::None).unwrap();
    let run = |ids: Vec<u32>, types: Vec<u32>| {
        let n = ids.len();
        let rows = [EncodedInput {
            ids,
            type_ids: types,
        }];
        let input = BertInput::from_rows(&rows, 0, &Device::Cpu).unwrap();
        assert_eq!(input.input_ids.dims(), [1, n]);
        let e = model.forward_hidden(&input, false).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    };
    let e = run(vec![5; 41], vec![0; 41]);
    assert!(
        e.contains("41 tokens is longer than the model's 40 positions"),
        "{e}"
    );
    let e = run(vec![5, 118], vec![0, 0]);
    assert!(
        e.contains("token id 118 is past the model's table") && e.contains("vocab_size 118"),
        "{e}"
    );
    let e = run(vec![5, 6], vec![0, 2]);
    assert!(
        e.contains("token type id 2") && e.contains("type_vocab_size 2"),
        "{e}"
    );
}

#[test]
fn a_decoder_or_gguf_is_refused_by_the_encoder_loader() {
    let gguf = repo().join("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf");
    let opts = LoadOptions::default();
    let e = bert::load_bert_quiet(gguf.to_str().unwrap(), &opts, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("GGUF") && e.contains("BERT"), "{e}");
    let llama = repo().join("tests/fixtures/models/tiny-qwen2");
    let e = bert::load_bert_quiet(llama.to_str().unwrap(), &opts, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("key `model_type`: `qwen2` is not a BERT-family encoder"),
        "{e}"
    );
    // ...and the generic loader now loads the encoder, which refuses to generate in one line.
    let lm = ferrotune::model::load(
        fixture_dir("tiny-bert").to_str().unwrap(),
        &opts,
        &Device::Cpu,
    )
    .unwrap();
    let e = lm.model.decoder().err().unwrap().to_string();
    assert!(e.contains("is an encoder") && !e.contains('\n'), "{e}");
}

// ---- all-MiniLM-L6-v2 --------------------------------------------------------------------------

fn minilm_dir() -> PathBuf {
    let d = repo().join(".cache/models/all-minilm-l6-v2");
    assert!(
        d.join("model.safetensors").is_file(),
        "{} is missing: run ./scripts/fetch-models.sh",
        d.display()
    );
    d
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    use ferrotune::embed::{embed_texts, EmbedOptions};
    let want = read_json(&fixture_dir("minilm.json"));
    let lm = bert::load_bert_quiet(
        minilm_dir().to_str().unwrap(),
        &LoadOptions::default(),
        None,
        &Device::Cpu,
    )
    .unwrap();
    // The folder's sentence-transformers settings.
    assert_eq!(lm.sentence.pooling, Pooling::Mean);
    assert!(lm.sentence.normalize);
    assert_eq!(
        lm.sentence.max_seq_length,
        want["max_seq_length"].as_u64().map(|n| n as usize)
    );
    let sentences: Vec<String> = want["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let enc = lm.input_encoder(None).unwrap();
    // a length past the model's positions is an error, not quietly capped
    assert!(lm.input_encoder(Some(512)).is_ok());
    let e = lm.input_encoder(Some(100_000)).err().unwrap().to_string();
    assert!(e.contains("100000") && e.contains("512"), "{e}");
    for (s, ids) in sentences.iter().zip(rows_u32(&want["input_ids"])) {
        assert_eq!(enc.encode(s, None).unwrap().ids, ids, "token ids of {s:?}");
    }
    let check = |what: &str, got: Vec<Vec<f32>>, want: &Value| {
        let want = want.as_array().unwrap();
        assert_eq!(got.len(), want.len());
        let mut worst = 0f32;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let d = max_diff(g, &floats(w));
            assert!(
                d < 1e-5,
                "{what}: sentence {i} ({:?}) differs by {d}",
                sentences[i]
            );
            worst = worst.max(d);
        }
        eprintln!("{what}: max |diff| vs sentence-transformers {worst:.2e}");
    };
    let opts = EmbedOptions {
        batch_size: 8,
        ..Default::default()
    };
    check(
        "embeddings",
        embed_texts(&lm, &sentences, &opts).unwrap(),
        &want["embeddings"],
    );
    for (mode, pooling) in [("cls", Pooling::Cls), ("mean", Pooling::Mean)] {
        let opts = EmbedOptions {
            pooling: Some(pooling),
            normalize: Some(false),
            batch_size: 4,
            ..Default::default()
        };
        check(
            mode,
            embed_texts(&lm, &sentences[..6], &opts).unwrap(),
            &want[format!("{mode}_embeddings").as_str()],
        );
    }
}

#[test]
fn minilm_gets_a_fresh_classification_head() {
    let dir = minilm_dir();
    let cfg = bert::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let head = BertHead::SequenceClassification;
    // The bare encoder has a pooler but no classifier: loading it with the head needs a new one.
    assert_eq!(
        Bert::missing_head_tensors(&src, &cfg, head).unwrap(),
        ["classifier"]
    );
    let e = Bert::load(&src, &cfg, head).err().unwrap().to_string();
    assert!(e.contains("tensor `classifier.weight` is missing"), "{e}");
    let model = Bert::load_with_new_head(&src, &cfg, head, 1).unwrap();
    assert_eq!(
        model.linears()[0].name(),
        "bert.encoder.layer.0.attention.self.query"
    );
    let input =
        BertInput::from_ids(&[vec![101, 7592, 102], vec![101, 102]], 0, &Device::Cpu).unwrap();
    let logits = model.sequence_logits(&input).unwrap();
    assert_eq!(logits.dims(), [2, 2]);
    // transformers' initialisation: N(0, 0.02²) weights, zero bias, so small logits.
    let w = model
        .heads
        .classifier
        .as_ref()
        .unwrap()
        .weight()
        .to_dense_f32()
        .unwrap();
    let std: f32 = w
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!((0.015..0.025).contains(&std), "classifier std {std}");
    let again = Bert::load_with_new_head(&src, &cfg, head, 1).unwrap();
    let w2 = again
        .heads
        .classifier
        .as_ref()
        .unwrap()
        .weight()
        .to_dense_f32()
        .unwrap();
    assert_eq!(flat(&w), flat(&w2), "the seed fixes the new head");
}

#[test]
fn one_label_is_regression_with_squared_error() {
    let dir = minilm_dir();
    let mut cfg = bert::config_from_hf_dir(&dir).unwrap();
    cfg.labels = vec!["score".into()];
    cfg.problem_type = bert::ProblemType::Regression;
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let head = BertHead::SequenceClassification;
    let mut model = Bert::load_with_new_head(&src, &cfg, head, 3).unwrap();
    let rows = [vec![101, 7592, 102], vec![101, 2088, 2003, 2204, 102]];
    let input = BertInput::from_ids(&rows, 0, &Device::Cpu).unwrap();
    let logits: Vec<f32> = model
        .sequence_logits(&input)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let y = [0.5f32, -1.25];
    let want: f32 = logits.iter().zip(&y).map(|(l, y)| (l - y) * (l - y)).sum();
    let labels = Tensor::new(&y, &Device::Cpu).unwrap();
    let (sum, n) = model.loss_sum(&input, &labels, false).unwrap();
    assert_eq!(n, 2);
    let got = sum.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-5 * want.max(1.0), "{got} vs {want}");
    // The head trains: both classifier tensors get gradients through the squared error.
    let params = model.make_head_trainable().unwrap();
    let (sum, _) = model.loss_sum(&input, &labels, true).unwrap();
    let grads = sum.backward().unwrap();
    for (name, v) in &params {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
    }
}

// ---- The model interface (`impl Model for Bert`, `model::load`) ------------------------------

/// A [`Batch`] over `input` (token types dropped: the interface reads one segment).
fn interface_batch(
    input: &BertInput,
    labels: &Tensor,
    targets: ferrotune::data::Targets,
) -> ferrotune::data::Batch {
    let n_tokens = flat(&input.attention_mask.to_dtype(DType::F32).unwrap())
        .iter()
        .filter(|&&m| m > 0.0)
        .count();
    ferrotune::data::Batch {
        input_ids: input.input_ids.clone(),
        labels: labels.to_dtype(DType::I64).unwrap(),
        targets,
        attention_mask: input.attention_mask.to_dtype(DType::U8).unwrap(),
        position_ids: input.input_ids.zeros_like().unwrap(),
        segment_ids: None,
        n_loss_tokens: labels.dims()[0],
        n_tokens,
        sources: Vec::new(),
    }
}

#[test]
fn the_generic_loader_gives_bert_through_the_model_interface() {
    use ferrotune::model::family::{ArchitectureKind, Model, TaskType};
    let dir = fixture_dir("tiny-bert");
    let lm = ferrotune::model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu)
        .unwrap();
    let m = &lm.model;
    assert_eq!(m.family(), "bert");
    assert_eq!(m.architecture(), "BertForMaskedLM");
    assert_eq!(m.kind(), ArchitectureKind::Encoder);
    assert_eq!(m.task_type(), TaskType::FeatureExtraction);
    assert_eq!(m.dims().encoder_layers, 2);
    assert!(m.tied("cls.predictions.decoder"));
    let err = m
        .decoder()
        .err()
        .expect("an encoder cannot generate")
        .to_string();
    assert!(
        err.contains("is an encoder") && !err.contains('\n'),
        "{err}"
    );

    // Every weight under the file's own name and value; the tied decoder once (as the table).
    let sd = m.state_dict(DType::F32).unwrap();
    let file = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    assert!(sd.contains_key("cls.predictions.bias"));
    assert!(!sd.contains_key("cls.predictions.decoder.weight"));
    assert_eq!(
        sd.len(),
        5 + 16 * 2 + 5,
        "{:?}",
        sd.keys().collect::<Vec<_>>()
    );
    use ferrotune::model::WeightSource;
    for (name, t) in &sd {
        let want = file
            .dense(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_diff(&flat(t), &flat(&want)), 0.0, "{name}");
    }

    // config.json written back parses to the same config.
    let v = m.hf_config().unwrap();
    let back = BertConfig::from_hf_json(&v, "written").unwrap();
    let cfg = bert::config_from_hf_dir(&dir).unwrap();
    assert_eq!(back.labels, cfg.labels);
    assert_eq!(
        (back.hidden_size, back.num_hidden_layers, back.vocab_size),
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size)
    );
    assert_eq!(back.hidden_act, cfg.hidden_act);
    assert_eq!(v["architectures"][0], "BertForMaskedLM");
}

#[test]
fn classification_through_the_interface_matches_the_heads() {
    use ferrotune::data::Targets;
    use ferrotune::model::family::{Model, TaskType};
    let t = tiny("bert");
    for (head, targets, task_type) in [
        (
            BertHead::SequenceClassification,
            Targets::Sequence,
            TaskType::SeqCls,
        ),
        (
            BertHead::TokenClassification,
            Targets::Token,
            TaskType::TokenCls,
        ),
    ] {
        let model = Bert::load(&t.src, &t.cfg, head).unwrap();
        assert_eq!(Model::task_type(&model), task_type);
        assert_eq!(
            Model::modules_to_save(&model),
            vec!["classifier".to_string()]
        );
        let (mut input, labels) = tiny_batch(&t, head);
        input.token_type_ids = input.token_type_ids.zeros_like().unwrap();
        let batch = interface_batch(&input, &labels, targets);
        let got = Model::logits(&model, &batch).unwrap();
        let want = match head {
            BertHead::SequenceClassification => model.sequence_logits(&input),
            _ => model.token_logits(&input),
        }
        .unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&flat(&got), &flat(&want)) < 1e-6);
        let (loss, n) = Model::loss_sum(&model, &batch, false).unwrap();
        let (want_loss, want_n) = Bert::loss_sum(&model, &input, &labels, false).unwrap();
        assert_eq!(n, want_n);
        assert!(n > 0);
        let (a, b) = (
            loss.to_scalar::<f32>().unwrap(),
            want_loss.to_scalar::<f32>().unwrap(),
        );
        assert!(a > 0.0 && (a - b).abs() < 1e-5, "{a} vs {b}");

        // Targets of another task are a one-line error naming both.
        let wrong = interface_batch(&input, &labels, Targets::NextToken);
        let err = Model::loss_sum(&model, &wrong, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NextToken") && !err.contains('\n'), "{err}");
    }
}
