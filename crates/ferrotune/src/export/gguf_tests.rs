use super::*;
use crate::model::weights::LoadOptions;
use candle_core::{Device, Tensor};

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ferrotune-gguf-export-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tensors of a LLaMA model as `convert_hf_to_gguf.py` names them, in llama.cpp's order.
fn llama_tensors(
    n_layer: usize,
    n_embd: usize,
    n_ff: usize,
    n_kv: usize,
    vocab: usize,
    tied: bool,
) -> Vec<(String, Vec<usize>)> {
    let mut names = vec![
        ("token_embd.weight".to_string(), vec![n_embd, vocab]),
        ("output_norm.weight".to_string(), vec![n_embd]),
    ];
    if !tied {
        names.push(("output.weight".to_string(), vec![n_embd, vocab]));
    }
    for i in 0..n_layer {
        for (m, d) in [
            ("attn_norm", vec![n_embd]),
            ("ffn_norm", vec![n_embd]),
            ("attn_q", vec![n_embd, n_embd]),
            ("attn_k", vec![n_embd, n_kv]),
            ("attn_v", vec![n_embd, n_kv]),
            ("attn_output", vec![n_embd, n_embd]),
            ("ffn_gate", vec![n_embd, n_ff]),
            ("ffn_up", vec![n_embd, n_ff]),
            ("ffn_down", vec![n_ff, n_embd]),
        ] {
            names.push((format!("blk.{i}.{m}.weight"), d));
        }
    }
    let mut order: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
    llama_cpp_order(&mut order);
    order
        .into_iter()
        .map(|n| {
            let d = names.iter().find(|(m, _)| *m == n).unwrap().1.clone();
            (n, d)
        })
        .collect()
}

fn types_of(t: &[(String, Vec<usize>)], preset: Preset, p: MixParams) -> HashMap<String, GgmlType> {
    let types = tensor_types(t, preset, p).unwrap();
    t.iter().map(|(n, _)| n.clone()).zip(types).collect()
}

#[test]
fn llama_cpp_order_sorts_by_layer_number_then_name() {
    let mut v: Vec<String> = [
        "blk.10.attn_v.weight",
        "blk.2.ffn_down.weight",
        "token_embd.weight",
        "blk.2.attn_k.weight",
        "output_norm.weight",
    ]
    .map(String::from)
    .to_vec();
    llama_cpp_order(&mut v);
    assert_eq!(
        v,
        [
            "output_norm.weight",
            "token_embd.weight",
            "blk.2.attn_k.weight",
            "blk.2.ffn_down.weight",
            "blk.10.attn_v.weight"
        ]
    );
}

/// SmolLM2-135M (n_embd 576: not whole 256-value super-blocks), hand-checked against
/// `llama_tensor_get_type`: use_more_bits(i, 30) holds for layers 0-2, 5, 8, ..., 23, 26-29.
#[test]
fn type_mix_for_a_smollm2_shaped_model() {
    let t = llama_tensors(30, 576, 1536, 192, 49152, true);
    let p = MixParams {
        n_layer: 30,
        n_head: 9,
        n_head_kv: 3,
    };
    let more_bits = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29];
    let m = types_of(&t, Preset::Q4KM, p);
    // The tied embedding is the output: 576 % 256 != 0 -> Q8_0.
    assert_eq!(m["token_embd.weight"], GgmlType::Q8_0);
    assert_eq!(m["output_norm.weight"], GgmlType::F32);
    for i in 0..30 {
        let mb = more_bits.contains(&i);
        let g = |s: &str| m[&format!("blk.{i}.{s}.weight")];
        // Q6_K -> Q8_0 and Q4_K -> Q5_0 by the fallback (576 columns).
        assert_eq!(
            g("attn_v"),
            if mb { GgmlType::Q8_0 } else { GgmlType::Q5_0 },
            "layer {i}"
        );
        // ffn_down has 1536 columns (6 super-blocks): no fallback.
        assert_eq!(
            g("ffn_down"),
            if mb { GgmlType::Q6K } else { GgmlType::Q4K },
            "layer {i}"
        );
        for s in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(g(s), GgmlType::Q5_0, "layer {i} {s}");
        }
        assert_eq!(g("attn_norm"), GgmlType::F32);
    }
    // Every fallback is reported: 14 attn_v Q6_K -> Q8_0, the other 16 attn_v and the five
    // 576-column classes Q4_K -> Q5_0 (30 x 5 + 16 = 166); the tied output's Q8_0 is llama.cpp's
    // own choice for it, not a fallback; ffn_down needs none.
    let (_, fallbacks) = tensor_types_and_fallbacks(&t, Preset::Q4KM, p).unwrap();
    let count = |w: GgmlType, g: GgmlType| {
        fallbacks
            .iter()
            .filter(|f| f.wanted == w && f.got == g && f.row == 576)
            .count()
    };
    assert_eq!(count(GgmlType::Q6K, GgmlType::Q8_0), 14);
    assert_eq!(count(GgmlType::Q4K, GgmlType::Q5_0), 166);
    assert_eq!(fallbacks.len(), 180);
    assert!(!fallbacks.iter().any(|f| f.name.contains("ffn_down")));
    let m = types_of(&t, Preset::Q8_0, p);
    assert!(t.iter().all(|(n, d)| m[n]
        == if d.len() == 1 {
            GgmlType::F32
        } else {
            GgmlType::Q8_0
        }));
    // Q4_0: the tied embedding would be Q6_K (576 % 32 == 0), which falls back to Q8_0.
    let m = types_of(&t, Preset::Q4_0, p);
    assert_eq!(m["token_embd.weight"], GgmlType::Q8_0);
    assert_eq!(m["blk.3.attn_q.weight"], GgmlType::Q4_0);
    let m = types_of(&t, Preset::Q6K, p);
    assert_eq!(m["token_embd.weight"], GgmlType::Q8_0);
    assert_eq!(m["blk.0.attn_q.weight"], GgmlType::Q8_0);
    assert_eq!(m["blk.0.ffn_down.weight"], GgmlType::Q6K);
    let m = types_of(&t, Preset::Q5KM, p);
    assert_eq!(m["blk.4.attn_q.weight"], GgmlType::Q5_1);
    assert_eq!(m["blk.4.ffn_down.weight"], GgmlType::Q5K);
    assert_eq!(m["blk.5.ffn_down.weight"], GgmlType::Q6K);
    let m = types_of(&t, Preset::F16, p);
    assert_eq!(m["token_embd.weight"], GgmlType::F16);
    assert_eq!(m["blk.0.attn_norm.weight"], GgmlType::F32);
}

/// A Llama-2-7B-shaped model (4096 wide, untied output): no fallbacks; use_more_bits(i, 32)
/// holds for layers 0-3, 6, 9, ..., 27, 28-31.
#[test]
fn type_mix_for_a_4096_shaped_model() {
    let t = llama_tensors(32, 4096, 11008, 4096, 32000, false);
    let p = MixParams {
        n_layer: 32,
        n_head: 32,
        n_head_kv: 32,
    };
    let more_bits = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31];
    let m = types_of(&t, Preset::Q4KM, p);
    assert_eq!(m["token_embd.weight"], GgmlType::Q4K);
    assert_eq!(m["output.weight"], GgmlType::Q6K);
    for i in 0..32 {
        let mb = more_bits.contains(&i);
        let g = |s: &str| m[&format!("blk.{i}.{s}.weight")];
        let want = if mb { GgmlType::Q6K } else { GgmlType::Q4K };
        assert_eq!(g("attn_v"), want, "layer {i}");
        assert_eq!(g("ffn_down"), want, "layer {i}");
        for s in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(g(s), GgmlType::Q4K, "layer {i} {s}");
        }
    }
    let m = types_of(&t, Preset::Q5KM, p);
    assert_eq!(m["blk.4.attn_v.weight"], GgmlType::Q5K);
    assert_eq!(m["blk.6.attn_v.weight"], GgmlType::Q6K);
    assert_eq!(m["output.weight"], GgmlType::Q6K);
    let m = types_of(&t, Preset::Q8_0, p);
    assert_eq!(m["output.weight"], GgmlType::Q8_0);
    // 70B: attn_v Q4_K -> Q5_K.
    let t80 = llama_tensors(80, 8192, 28672, 1024, 32000, false);
    let m = types_of(
        &t80,
        Preset::Q4KM,
        MixParams {
            n_layer: 80,
            n_head: 64,
            n_head_kv: 8,
        },
    );
    assert_eq!(m["blk.20.attn_v.weight"], GgmlType::Q5K);
    assert_eq!(m["blk.10.attn_v.weight"], GgmlType::Q5K);
    assert_eq!(m["blk.12.attn_v.weight"], GgmlType::Q6K);
}

#[test]
fn presets_parse_with_llama_cpp_file_types() {
    assert_eq!(Preset::parse("Q4_K_M").unwrap(), Preset::Q4KM);
    assert_eq!(Preset::parse("q8_0").unwrap().file_type(), 7);
    assert_eq!(Preset::Q4KM.file_type(), 15);
    assert_eq!(Preset::Q6K.file_type(), 18);
    assert_eq!(Preset::BF16.file_type(), 32);
    let e = Preset::parse("q3_k").unwrap_err();
    assert!(e.contains("`q3_k`") && e.contains("q4_k_m"), "{e}");
}

#[test]
fn qk_permutation_is_the_inverse_of_the_reader() {
    let (cols, rows, heads) = (3, 8, 2);
    let v: Vec<f32> = (0..cols * rows).map(|i| i as f32).collect();
    let g = permute_qk(&v, &[cols, rows], heads).unwrap();
    // The reader's un-permutation: HF row r is GGUF row perm[r].
    let perm = unpermute_rows(rows, heads);
    for (r, &p) in perm.iter().enumerate() {
        assert_eq!(&g[p * cols..(p + 1) * cols], &v[r * cols..(r + 1) * cols]);
    }
    assert_ne!(g, v);
    assert!(permute_qk(&v, &[cols, rows], 3).is_err());
}

fn logits(lm: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let llama = lm.model.as_any().downcast_ref::<Llama>().unwrap();
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    llama
        .forward(&t, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn load(p: &Path) -> LoadedModel {
    load_with(p, &LoadOptions::default())
}

fn load_with(p: &Path, opts: &LoadOptions) -> LoadedModel {
    crate::model::load(p.to_str().unwrap(), opts, &Device::Cpu).unwrap()
}

/// The tiny Llama 3 GGUF (SentencePiece tokenizer, `rope_freqs`) exported in several presets and
/// read back by our reader gives the same logits: f32 exactly, the others within their precision;
/// the tokenizer keys and the RoPE factors come through unchanged.
#[test]
fn tiny_model_exported_and_loaded_back_gives_the_same_logits() {
    let src = repo("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf");
    let lm = load(&src);
    let ids: Vec<u32> = vec![1, 17, 42, 99, 3, 250, 128, 7, 64, 200];
    let base = logits(&lm, &ids);
    let scale = base.iter().fold(0f32, |m, v| m.max(v.abs()));
    let dir = tmp("roundtrip");
    for (preset, tol) in [
        (Preset::F32, 1e-6),
        (Preset::F16, 2e-3),
        (Preset::BF16, 2e-2),
        (Preset::Q8_0, 6e-2),
        (Preset::Q6K, 0.15),
        (Preset::Q4KM, 0.5),
    ] {
        let out = dir.join(format!("tiny-{}.gguf", preset.name()));
        let opts = GgufExportOptions {
            preset,
            name: None,
            overwrite: false,
        };
        let rep = write_gguf(&lm, &out, &opts).unwrap();
        assert_eq!(rep.file_bytes, std::fs::metadata(&out).unwrap().len());
        // Weights dequantized at load: the error is the format's alone (the quantized kernels
        // also round the activations to 8 bits).
        let back = load_with(
            &out,
            &LoadOptions {
                dequantize: true,
                ..Default::default()
            },
        );
        let got = logits(&back, &ids);
        let err = base
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{preset:?}: max |diff| {err} (logit scale {scale})");
        assert!(
            err <= tol * scale,
            "{preset:?}: max |diff| {err} (logit scale {scale})"
        );
        let kernels = logits(&load(&out), &ids);
        let err_k = base
            .iter()
            .zip(&kernels)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{preset:?} on the quantized kernels: max |diff| {err_k}");
        assert!(
            err_k <= 3.0 * tol * scale,
            "{preset:?} kernels: max |diff| {err_k} (logit scale {scale})"
        );
        let ct = crate::model::gguf::read_header(&out).unwrap();
        assert_eq!(
            ct.metadata["general.file_type"].to_u32().unwrap(),
            preset.file_type()
        );
        assert_eq!(
            ct.metadata["general.name"].to_string().unwrap(),
            "tiny-llama3-rope-scaling"
        );
        assert!(ct.tensor_infos.contains_key("rope_freqs.weight"));
        let orig = crate::model::gguf::read_header(&src).unwrap();
        for k in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.add_bos_token",
        ] {
            assert_eq!(
                format!("{:?}", ct.metadata[k]),
                format!("{:?}", orig.metadata[k]),
                "{k}"
            );
        }
    }
    // f32 is bit-exact: the same weights.
    let f32_back = logits(&load(&dir.join("tiny-f32.gguf")), &ids);
    assert_eq!(f32_back, base);
}

#[test]
fn existing_files_are_replaced_only_when_ours_and_asked() {
    let src = repo("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf");
    let lm = load(&src);
    let dir = tmp("overwrite");
    let out = dir.join("m.gguf");
    std::fs::write(&out, b"precious").unwrap();
    let mut opts = GgufExportOptions {
        preset: Preset::Q8_0,
        name: None,
        overwrite: false,
    };
    let e = write_gguf(&lm, &out, &opts).unwrap_err().to_string();
    assert!(e.contains("--overwrite"), "{e}");
    opts.overwrite = true;
    let e = write_gguf(&lm, &out, &opts).unwrap_err().to_string();
    assert!(e.contains("not a GGUF ferrotune wrote"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // A GGUF we wrote may be replaced with --overwrite.
    std::fs::remove_file(&out).unwrap();
    write_gguf(&lm, &out, &opts).unwrap();
    write_gguf(&lm, &out, &opts).unwrap();
    // ...but never the input itself.
    let e = write_gguf(&lm, &src, &opts).unwrap_err().to_string();
    assert!(!e.is_empty());
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

const SMOLLM2_TOKENIZER_KEYS: [&str; 10] = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
];

fn assert_tokenizer_keys_match(dir: &Path, shipped: &Path) {
    let (keys, _) = tokenizer_from_hf(dir, 49152, false).unwrap();
    let ours: HashMap<String, Value> = keys.into_iter().collect();
    let theirs = crate::model::gguf::read_header(shipped).unwrap().metadata;
    for k in SMOLLM2_TOKENIZER_KEYS {
        assert!(theirs.contains_key(k), "the shipped GGUF has no {k}");
        let ours = ours
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from the export of {}", dir.display()));
        assert_eq!(format!("{ours:?}"), format!("{:?}", theirs[k]), "{k}");
    }
}

/// The HF folder ferrotune writes from the shipped GGUF exports back to the shipped GGUF's
/// tokenizer keys (tokens, token types, merges, special ids, chat template) and its
/// pre-tokenizer name: GGUF -> HF folder -> GGUF loses nothing of the tokenizer.
#[test]
fn smollm2_tokenizer_survives_gguf_to_hf_folder_to_gguf() {
    let shipped = repo(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let lm = load(&shipped);
    let dir = tmp("smollm2-tokenizer-roundtrip");
    let cfg = lm.model.hf_config().unwrap();
    crate::model::convert::write_folder_extras(lm.model.as_ref(), &lm.tokenizer, &dir, &cfg)
        .unwrap();
    let (_, pre) = tokenizer_from_hf(&dir, 49152, false).unwrap();
    // Our tokenizer.json keeps the digit split the shipped file names "smollm".
    let shipped_pre =
        crate::model::gguf::read_header(&shipped).unwrap().metadata["tokenizer.ggml.pre"].clone();
    assert_eq!(
        format!("{:?}", Value::String(pre.unwrap())),
        format!("{shipped_pre:?}")
    );
    assert_tokenizer_keys_match(&dir, &shipped);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same from the folder transformers writes from the shipped GGUF. That folder needs the
/// reference environment (scripts/setup-reference.sh, then scripts/convert-smollm2-hf.sh), which
/// CI does not have; the test above covers the export without it.
#[test]
#[ignore = "needs .cache/models/smollm2-hf from scripts/convert-smollm2-hf.sh (reference environment)"]
fn smollm2_hf_tokenizer_keys_match_the_shipped_gguf() {
    let dir = repo(".cache/models/smollm2-hf");
    let shipped = repo(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: run scripts/convert-smollm2-hf.sh",
        dir.display()
    );
    let (_, pre) = tokenizer_from_hf(&dir, 49152, false).unwrap();
    // transformers' tokenizer.json keeps only GPT-2's byte-level split: "gpt-2" (the shipped
    // file, converted from the original folder, says "smollm": digits split one by one).
    assert_eq!(pre.as_deref(), Some("gpt-2"));
    assert_tokenizer_keys_match(&dir, &shipped);
}

/// Each pre-tokenizer our GGUF tokenizer can write (isolated regex splits + a regex-free
/// byte-level step) is named back by its llama.cpp name; a changed regex or flag is not named.
#[test]
fn our_gguf_pre_tokenizers_are_named_back() {
    let json = |splits: &[&str], ignore_merges: bool, nfc: bool| {
        let mut steps: Vec<serde_json::Value> = splits
            .iter()
            .map(|re| serde_json::json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}))
            .collect();
        steps.push(serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
        let mut tj = serde_json::json!({
            "model": {"type": "BPE", "ignore_merges": ignore_merges},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        });
        if nfc {
            tj["normalizer"] = serde_json::json!({"type": "NFC"});
        }
        tj
    };
    for name in [
        "gpt-2",
        "llama-bpe",
        "smollm",
        "qwen2",
        "stablelm2",
        "dbrx",
        "tekken",
        "gpt-4o",
        "default",
        "falcon",
        "deepseek-llm",
        "deepseek-coder",
    ] {
        let spec = crate::tokenizer::gguf::pre_spec(name).unwrap();
        let tj = json(spec.splits, spec.ignore_merges, spec.nfc);
        assert_eq!(detect_llama_cpp_splits(&tj), Some(name));
        // A changed regex names nothing.
        let mut changed = spec.splits.to_vec();
        let last = format!("{}x", changed.last().unwrap());
        *changed.last_mut().unwrap() = &last;
        assert_eq!(
            detect_llama_cpp_splits(&json(&changed, spec.ignore_merges, spec.nfc)),
            None
        );
    }
    let starcoder = crate::tokenizer::gguf::pre_spec("starcoder").unwrap();
    assert_eq!(
        detect_llama_cpp_splits(&json(starcoder.splits, false, false)),
        Some("smollm")
    );
    let mut tj = json(&[], false, false);
    assert_eq!(detect_llama_cpp_splits(&tj), None, "no split at all");
    tj["pre_tokenizer"]["pretokenizers"][0]["use_regex"] = true.into();
    assert_eq!(detect_llama_cpp_splits(&tj), None);
}

#[test]
fn pre_tokenizers_are_told_apart_or_refused() {
    let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(
        detect_pre(&j(
            r#"{"type":"ByteLevel","add_prefix_space":false,"use_regex":true}"#
        )),
        Some("gpt-2")
    );
    assert_eq!(
        detect_pre(&j(
            r#"{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},{"type":"ByteLevel","add_prefix_space":false,"use_regex":true}]}"#
        )),
        Some("smollm")
    );
    assert_eq!(detect_pre(&j(r#"{"type":"Metaspace"}"#)), None);
    assert_eq!(
        detect_pre(&j(
            r#"{"type":"ByteLevel","add_prefix_space":true,"use_regex":true}"#
        )),
        None
    );
}

/// PEFT's LoRA adapter for the tiny GQA model, merged and exported: the GGUF read back gives the
/// logits of the base with the adapter attached (f32: to rounding; q8_0: within its precision).
/// The tiny folder has no tokenizer, so the tiny GGUF's (same 256-token vocabulary) is written.
#[test]
fn merged_lora_exported_to_gguf_gives_the_adapter_logits() {
    let dir = repo("tests/fixtures/models/tiny-llama-gqa-untied");
    let donor = load(&repo("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf"));
    let cfg = crate::model::config_from_hf_dir(&dir).unwrap();
    let src =
        crate::model::weights::SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu)
            .unwrap();
    let mut lm = LoadedModel {
        model: Box::new(Llama::load(&src, &cfg).unwrap()),
        tokenizer: donor.tokenizer,
        source: ModelSource::HfDir(dir.clone()),
        file_bytes: 0,
    };
    let ids: Vec<u32> = vec![1, 17, 42, 99, 3, 250, 128, 7];
    let base = logits(&lm, &ids);
    crate::peft::load_adapter(
        &mut *lm.model,
        &repo("tests/fixtures/peft/tiny-lora-peft"),
        "default",
    )
    .unwrap();
    let with_adapter = logits(&lm, &ids);
    let moved = base
        .iter()
        .zip(&with_adapter)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 1e-3, "the adapter changes the logits ({moved})");
    crate::peft::merge_and_unload(&mut *lm.model, "default").unwrap();
    let scale = with_adapter.iter().fold(0f32, |m, v| m.max(v.abs()));
    let out_dir = tmp("lora");
    for (preset, tol) in [(Preset::F32, 1e-5), (Preset::Q8_0, 6e-2)] {
        let out = out_dir.join(format!("merged-{}.gguf", preset.name()));
        let tok =
            tokenizer_from_gguf(&repo("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf")).unwrap();
        let opts = GgufExportOptions {
            preset,
            name: Some("tiny-lora".into()),
            overwrite: false,
        };
        write_gguf_with_tokenizer(&lm, &out, &opts, tok).unwrap();
        let back = load_with(
            &out,
            &LoadOptions {
                dequantize: true,
                ..Default::default()
            },
        );
        let got = logits(&back, &ids);
        let err = with_adapter
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= tol * scale,
            "{preset:?}: max |diff| {err} vs the adapter's logits (scale {scale})"
        );
    }
}
