//! HF folders of the T5 and BERT families through the generic loader: a T5 folder whose
//! tokenizer is only `spiece.model` (no tokenizer.json) loads and generates what transformers
//! generates, and `convert` of an encoder writes no generation_config.json.
use candle_core::Device;
use ferrotune::generate::{generate, GenerationConfig};
use ferrotune::model::{self, ArchitectureKind, LoadOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-hf-folders-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy(from: &Path, to: &Path, names: &[&str]) {
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The fixture T5 with spiece.model in place of tokenizer.json (the same vocabulary: the
/// fixture script made tokenizer.json from that SentencePiece model): encoding, greedy and
/// beam generation through the model interface give transformers' ids.
#[test]
fn a_t5_folder_with_only_spiece_model_loads_and_generates() {
    let t5 = fixtures().join("t5");
    let dir = tmp("spiece");
    copy(
        &t5.join("t5-v1_1"),
        &dir,
        &["config.json", "generation_config.json", "model.safetensors"],
    );
    copy(&t5.join("tokenizer"), &dir, &["spiece.model"]);
    assert!(!dir.join("tokenizer.json").exists());
    let lm = model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(lm.model.kind(), ArchitectureKind::EncoderDecoder);
    let text = std::fs::read_to_string(t5.join("t5-v1_1/expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    for case in expected["generate"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let input = lm.tokenizer.encode(prompt, true).unwrap();
        assert_eq!(input, ids(&case["input_ids"]), "{prompt}");
        let max_new = case["max_new_tokens"].as_u64().unwrap() as usize;
        let cfg = GenerationConfig {
            max_new_tokens: max_new,
            ..Default::default()
        };
        let mut dec = lm.model.decoder().unwrap();
        let out = generate(&mut *dec, &lm.tokenizer, &input, &cfg, &mut |_| {}).unwrap();
        // transformers' ids start with the decoder start token and keep the EOS.
        let mut want = ids(&case["greedy"]);
        want.remove(0);
        if want.last() == Some(&1) {
            want.pop();
        }
        assert_eq!(out.token_ids, want, "greedy: {prompt}");

        let b = &case["beams"][0];
        let beams = ferrotune::beam::BeamConfig {
            num_beams: b["num_beams"].as_u64().unwrap() as usize,
            max_new_tokens: max_new,
            eos_ids: lm.tokenizer.eos_ids().to_vec(),
            ..Default::default()
        };
        let mut bd = lm.model.beam_decoder(&input).expect("T5 has beam search");
        let got = ferrotune::beam::beam_search(&mut *bd, &beams).unwrap();
        let mut want = ids(&b["ids"]);
        want.remove(0);
        assert_eq!(got.best.tokens, want, "beams: {prompt}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn converting_an_encoder_writes_no_generation_config() {
    let lm = model::load(
        fixtures().join("bert/tiny-bert").to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(lm.model.kind(), ArchitectureKind::Encoder);
    assert!(lm.model.beam_decoder(&[1, 2]).is_none());
    let out = tmp("encoder-convert");
    model::convert::write_hf_folder(&lm, &out).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert!(!out.join("generation_config.json").exists());
    // The folder loads back as the same encoder.
    let back = model::load(out.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(back.model.architecture(), lm.model.architecture());
    // A decoder-side family still gets one.
    let t5 = model::load(
        fixtures().join("t5/t5-v1_0").to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let out5 = tmp("t5-convert");
    model::convert::write_hf_folder(&t5, &out5).unwrap();
    assert!(out5.join("generation_config.json").is_file());
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&out5);
}
