//! The model's own dropout in training (T5's `dropout_rate`; BERT's `hidden_dropout_prob`,
//! `attention_probs_dropout_prob`, `classifier_dropout`), as transformers applies it in train
//! mode: inference is untouched, a training pass differs from it, the masks are reproducible
//! from (seed, pass count) so a resumed run can seek to them, switching dropout off gives the
//! inference loss, and the gradients are finite.
use candle_core::{DType, Device, Tensor, Var};
use ferrotune::model::bert::{self, Bert, BertHead, BertInput};
use ferrotune::model::family::Model;
use ferrotune::model::t5::{self, T5};
use ferrotune::model::{LoadOptions, SafetensorsSource};
use std::path::PathBuf;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(path)
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

/// What every family's dropout must do, on `loss(train)` (the summed loss of one fixed batch).
fn check_dropout(model: &dyn Model, loss: &dyn Fn(bool) -> Tensor, what: &str) {
    let eval = scalar(&loss(false));
    assert_eq!(
        model.dropout_calls(),
        Some(0),
        "{what}: inference is not counted"
    );
    model.configure_dropout(1234, true);
    model.set_dropout_calls(5);
    let a = scalar(&loss(true));
    assert_eq!(
        model.dropout_calls(),
        Some(6),
        "{what}: one training pass counted"
    );
    assert_ne!(a, eval, "{what}: a training pass has dropout");
    // The same seed and pass: bit for bit the same masks (what a resumed run relies on).
    model.set_dropout_calls(5);
    assert_eq!(scalar(&loss(true)).to_bits(), a.to_bits(), "{what}: replay");
    // The next pass, or another seed: other masks.
    let next = scalar(&loss(true));
    assert_ne!(next, a, "{what}: the next pass draws new masks");
    model.configure_dropout(99, true);
    model.set_dropout_calls(5);
    assert_ne!(scalar(&loss(true)), a, "{what}: another seed, other masks");
    // Inference after training passes is still the inference loss.
    assert_eq!(scalar(&loss(false)).to_bits(), eval.to_bits(), "{what}");
    // Switched off: a training pass computes the inference loss.
    model.configure_dropout(1234, false);
    assert_eq!(scalar(&loss(true)).to_bits(), eval.to_bits(), "{what}: off");
    model.configure_dropout(1234, true);
}

fn check_gradients(params: &[(String, Var)], loss: Tensor, what: &str) {
    let grads = loss.backward().unwrap();
    let mut nonzero = 0;
    for (name, v) in params {
        let Some(g) = grads.get(v.as_tensor()) else {
            continue;
        };
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{what}: non-finite gradient of {name}"
        );
        nonzero += usize::from(g.iter().any(|&x| x != 0.0));
    }
    assert!(
        nonzero > params.len() / 2,
        "{what}: {nonzero} of {} gradients nonzero",
        params.len()
    );
}

#[test]
fn t5_dropout_is_seeded_reproducible_and_off_at_inference() {
    for variant in ["t5-v1_0", "t5-v1_1"] {
        let dir = fixture("t5").join(variant);
        let mut cfg = t5::config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let input = Tensor::new(&[[5u32, 6, 7, 8, 1], [9, 10, 11, 1, 0]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 1, 0]], &dev).unwrap();
        let labels = Tensor::new(&[[12i64, 13, 1], [14, 1, -100]], &dev).unwrap();

        // The fixtures were made without dropout: with a rate set, inference is unchanged.
        let plain = T5::load(&src, &cfg).unwrap();
        let (want, _) = plain.loss_sum(&input, Some(&mask), &labels, false).unwrap();
        cfg.dropout_rate = 0.1;
        let mut m = T5::load(&src, &cfg).unwrap();
        let loss = |train: bool| m.loss_sum(&input, Some(&mask), &labels, train).unwrap().0;
        assert_eq!(scalar(&loss(false)), scalar(&want), "{variant}");
        check_dropout(&m, &loss, variant);

        let params = m.make_trainable(None).unwrap();
        let (l, n) = m.loss_sum(&input, Some(&mask), &labels, true).unwrap();
        assert_eq!(n, 5);
        check_gradients(&params, l, variant);
    }
}

#[test]
fn t5_config_dropout_rate_is_read_and_checked() {
    let dir = fixture("t5/t5-v1_1");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("dropout_rate");
    // transformers' default.
    assert_eq!(
        t5::T5Config::from_hf_json(&v, "c.json")
            .unwrap()
            .dropout_rate,
        0.1
    );
    for bad in [
        serde_json::json!(1.0),
        serde_json::json!(-0.5),
        serde_json::json!("x"),
    ] {
        v["dropout_rate"] = bad.clone();
        let e = t5::T5Config::from_hf_json(&v, "c.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dropout_rate") && !e.contains('\n'),
            "{bad}: {e}"
        );
    }
}

#[test]
fn bert_dropout_is_seeded_reproducible_and_off_at_inference() {
    for flavor in ["bert", "roberta"] {
        let dir = fixture("bert").join(format!("tiny-{flavor}"));
        let mut cfg = bert::config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let pad = cfg.pad_token_id;
        let rows = vec![vec![5u32, 6, 7, 8, 9], vec![10, 11, 12]];
        let input = BertInput::from_ids(&rows, pad, &dev).unwrap();
        for head in [
            BertHead::SequenceClassification,
            BertHead::TokenClassification,
            BertHead::MaskedLm,
        ] {
            let what = format!("{flavor} {head:?}");
            let labels = match head {
                BertHead::SequenceClassification => Tensor::new(&[1i64, 0], &dev),
                _ => Tensor::new(&[[1i64, -100, 2, 0, 1], [2, 1, 0, -100, -100]], &dev),
            }
            .unwrap();
            cfg.hidden_dropout_prob = 0.0;
            cfg.attention_probs_dropout_prob = 0.0;
            let plain = Bert::load(&src, &cfg, head).unwrap();
            let (want, _) = plain.loss_sum(&input, &labels, false).unwrap();
            cfg.hidden_dropout_prob = 0.1;
            cfg.attention_probs_dropout_prob = 0.1;
            let mut m = Bert::load(&src, &cfg, head).unwrap();
            let loss = |train: bool| m.loss_sum(&input, &labels, train).unwrap().0;
            assert_eq!(scalar(&loss(false)), scalar(&want), "{what}");
            check_dropout(&m, &loss, &what);
            let params = m.make_all_trainable().unwrap();
            let (l, _) = m.loss_sum(&input, &labels, true).unwrap();
            check_gradients(&params, l, &what);
        }
    }
}

/// The classifier's own rate: with only `classifier_dropout` set, a training pass differs
/// from inference (the encoder runs without dropout), and only through the head.
#[test]
fn bert_classifier_dropout_applies_before_the_classifier() {
    let dir = fixture("bert/tiny-bert");
    let mut cfg = bert::config_from_hf_dir(&dir).unwrap();
    cfg.hidden_dropout_prob = 0.0;
    cfg.attention_probs_dropout_prob = 0.0;
    cfg.classifier_dropout = Some(0.5);
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let input = BertInput::from_ids(&[vec![5u32, 6, 7, 8, 9], vec![10, 11, 12]], 0, &dev).unwrap();
    let labels = Tensor::new(&[1i64, 0], &dev).unwrap();
    let m = Bert::load(&src, &cfg, BertHead::SequenceClassification).unwrap();
    m.configure_dropout(7, true);
    let eval = scalar(&m.loss_sum(&input, &labels, false).unwrap().0);
    let train = scalar(&m.loss_sum(&input, &labels, true).unwrap().0);
    assert_ne!(eval, train);
    // The encoder output itself is untouched by a training pass at rate 0.
    let h0 = m.forward_hidden(&input, false).unwrap();
    let h1 = m.forward_hidden(&input, true).unwrap();
    let d: f32 = (h0 - h1)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0);
}
