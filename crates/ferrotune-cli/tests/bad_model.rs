//! Models and adapters whose sizes or values are wrong (issue 9, "validate, then allocate"):
//! every one ends in exit code 1 and exactly one `error:` line that names the file and the key
//! (or tensor) at fault; no panic, no abort, no hang. The inputs are the committed tiny models,
//! edited here: a GGUF rewritten with one metadata value or tensor shape changed, an HF folder
//! with one config.json value changed, a PEFT adapter with one value or shape changed.
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh, empty folder for one case. Its name is a number, never the case's name: the error
/// lines name the folder, and a key in the folder name would satisfy the checks by itself.
fn tmp(_case: &str) -> PathBuf {
    static CASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("ferrotune-bad-model-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap()
}

/// Run the CLI, expect exit code 1 with a single `error:` line and no panic; return the line.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code for {args:?}: {:?}; stderr: {stderr}",
        out.status.code()
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line for {args:?}, got: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("backtrace")
            && !stderr.contains("internal error"),
        "{stderr}"
    );
    lines[0].to_string()
}

/// `fails`, and the line names every one of `names` (the file, the key, the tensor, ...).
fn fails_naming(args: &[&str], names: &[&str]) -> String {
    let line = fails(args);
    if std::env::var("SHOW_ERRORS").is_ok() {
        eprintln!("SHOW {line}");
    }
    for n in names {
        assert!(line.contains(n), "`{n}` is not named in: {line}");
    }
    line
}

// ---------------------------------------------------------------------------- GGUF

const GGUF_FIXTURE: &str = "tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf";

struct GgufTensor {
    name: String,
    /// candle order: (rows, cols); the file stores them reversed.
    dims: Vec<u64>,
    dtype: GgmlDType,
    data: Vec<u8>,
}

/// A GGUF file held as metadata and tensors, so that a test can change one thing and write it.
/// The writer is ours rather than candle's so that a tensor can claim any shape (0, 2^62).
struct Gguf {
    meta: Vec<(String, Value)>,
    tensors: Vec<GgufTensor>,
}

impl Gguf {
    /// The committed tiny GGUF without its `rope_freqs.weight`: a plain Llama GGUF, the base that
    /// the metadata and shape edits start from (so each edit is the only thing wrong with it).
    fn fixture() -> Self {
        let mut g = Self::with_rope_freqs();
        g.tensors.retain(|t| t.name != "rope_freqs.weight");
        g
    }

    /// The committed tiny Llama 3 GGUF (`reference/tiny_gguf_fixture.py` writes it), which
    /// carries Llama 3.1-style RoPE scaling as `rope_freqs.weight`.
    fn with_rope_freqs() -> Self {
        let path = repo().join(GGUF_FIXTURE);
        let mut f = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; it is committed, or run .venv/bin/python reference/tiny_gguf_fixture.py",
                path.display()
            )
        });
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let mut meta: Vec<(String, Value)> = ct.metadata.clone().into_iter().collect();
        meta.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors: Vec<GgufTensor> = ct
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let q = info
                    .read(&mut f, ct.tensor_data_offset, &Device::Cpu)
                    .unwrap();
                GgufTensor {
                    name: name.clone(),
                    dims: info.shape.dims().iter().map(|&d| d as u64).collect(),
                    dtype: info.ggml_dtype,
                    data: q.data().unwrap().into_owned(),
                }
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Gguf { meta, tensors }
    }

    fn set(mut self, key: &str, v: Value) -> Self {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), v));
        self
    }

    fn remove(mut self, key: &str) -> Self {
        self.meta.retain(|(k, _)| k != key);
        self
    }

    fn get(&self, key: &str) -> &Value {
        &self.meta.iter().find(|(k, _)| k == key).unwrap().1
    }

    fn tensor(&mut self, name: &str) -> &mut GgufTensor {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }

    /// Drop the last token from the token list (and its score and type), so the tokenizer has
    /// one token fewer than the embedding has rows.
    fn drop_last_token(mut self) -> Self {
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ] {
            let Value::Array(mut a) = self.get(key).clone() else {
                panic!("{key} is not an array")
            };
            a.pop();
            self = self.set(key, Value::Array(a));
        }
        self
    }

    fn write(&self, path: &Path) -> PathBuf {
        const ALIGN: u64 = 32;
        let mut b: Vec<u8> = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_str(&mut b, k);
            b.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in t.dims.iter().rev() {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(ALIGN) * ALIGN;
        }
        for t in &self.tensors {
            b.resize(
                (b.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
                0,
            );
            b.extend_from_slice(&t.data);
        }
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(&b).unwrap();
        path.to_path_buf()
    }
}

/// GGML's type ids (ggml.h) for the types these tests write.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 8,
        GgmlDType::BF16 => 30,
        other => panic!("no type id here for {other:?}"),
    }
}

// GGUF's value encoding: the library's own writer (export::gguf), so hostile files differ from
// real ones only where a test makes them differ.
use ferrotune::export::gguf::{put_str, put_value, value_type};

/// Write `g` into a fresh folder and run `inspect` on it (inspect loads the whole model).
fn inspect_gguf(test: &str, g: &Gguf) -> (PathBuf, Vec<String>) {
    let path = g.write(&tmp(test).join("model.gguf"));
    let args = vec![
        "inspect".to_string(),
        "--model".to_string(),
        path.display().to_string(),
    ];
    (path, args)
}

/// The edited GGUF fails to load with one line naming the file and each of `names`.
fn gguf_fails(test: &str, g: &Gguf, names: &[&str]) -> String {
    let (path, args) = inspect_gguf(test, g);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut all = vec![path.to_str().unwrap()];
    all.extend_from_slice(names);
    fails_naming(&args, &all)
}

#[test]
fn the_unedited_gguf_fixtures_load() {
    // The baselines the edits below start from: they must load, or the failures prove nothing.
    for g in [Gguf::fixture(), Gguf::with_rope_freqs()] {
        let (_, args) = inspect_gguf("gguf-ok", &g);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("hidden 64"));
    }
}

#[test]
fn gguf_embedding_length_one_wider_than_the_tensors() {
    // The issue's crash: a copy_from_slice panic in the engine; now the shape check names both.
    let g = Gguf::fixture().set("llama.embedding_length", Value::U32(65));
    gguf_fails(
        "emb577",
        &g,
        &[
            "llama.embedding_length 65",
            "token_embd.weight",
            "[256, 64]",
        ],
    );
}

#[test]
fn gguf_zero_sizes() {
    for key in [
        "llama.feed_forward_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.context_length",
        "llama.vocab_size",
    ] {
        let g = Gguf::fixture().set(key, Value::U32(0));
        gguf_fails(&format!("zero-{key}"), &g, &[key]);
    }
}

#[test]
fn gguf_vocab_size_off_by_one() {
    // vocab_size against the token list (the embedding has 256 rows, the tokenizer 256 tokens)
    for v in [255u32, 257] {
        let g = Gguf::fixture().set("llama.vocab_size", Value::U32(v));
        gguf_fails(&format!("vocab{v}"), &g, &["llama.vocab_size", "256"]);
    }
    // the tokenizer one token short of the embedding: the vocabulary size comes from the tokens
    let g = Gguf::fixture().remove("llama.vocab_size").drop_last_token();
    gguf_fails(
        "tokens255",
        &g,
        &["token_embd.weight", "tokenizer.ggml.tokens 255"],
    );
}

#[test]
fn gguf_rope_dimension_count_63() {
    let g = Gguf::fixture().set("llama.rope.dimension_count", Value::U32(63));
    gguf_fails("rope63", &g, &["llama.rope.dimension_count"]);
    // Without an explicit head size the odd rope size is the head size: RoPE needs pairs.
    let g = Gguf::fixture()
        .remove("llama.attention.key_length")
        .remove("llama.attention.value_length")
        .remove("llama.rope.dimension_count")
        .set("llama.embedding_length", Value::U32(63 * 4));
    gguf_fails("rope63-implied", &g, &["llama.attention.key_length"]);
}

#[test]
fn gguf_tensor_dimension_zero_or_2_pow_62() {
    for (test, rows) in [("dim0", 0u64), ("dim2e62", 1 << 62)] {
        let mut g = Gguf::fixture();
        g.tensor("blk.0.ffn_up.weight").dims[0] = rows;
        if rows == 0 {
            g.tensor("blk.0.ffn_up.weight").data.clear();
        }
        gguf_fails(test, &g, &["blk.0.ffn_up.weight"]);
    }
}

#[test]
fn gguf_sizes_of_2_pow_32_and_2_pow_40_are_refused_before_allocation() {
    for key in [
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.attention.key_length",
        "llama.context_length",
        "llama.vocab_size",
    ] {
        for (test, v) in [("2e32", 1u64 << 32), ("2e40", 1u64 << 40)] {
            let g = Gguf::fixture().set(key, Value::U64(v));
            gguf_fails(&format!("{key}-{test}"), &g, &[key]);
        }
    }
}

#[test]
fn gguf_block_count_against_the_blocks_present() {
    for v in [1u32, 3, 100] {
        let g = Gguf::fixture().set("llama.block_count", Value::U32(v));
        gguf_fails(
            &format!("blocks{v}"),
            &g,
            &["llama.block_count", "tensors for 2 layers"],
        );
    }
}

#[test]
fn gguf_head_counts_that_do_not_divide() {
    let g = Gguf::fixture().set("llama.attention.head_count_kv", Value::U32(3));
    gguf_fails("kv3", &g, &["llama.attention.head_count_kv", "must divide"]);
    // 5 heads of 16 do not make the 64 rows of q_proj
    let g = Gguf::fixture().set("llama.attention.head_count", Value::U32(5));
    gguf_fails(
        "heads5",
        &g,
        &["llama.attention.head_count", "head_count_kv"],
    );
    let g = Gguf::fixture()
        .set("llama.attention.head_count", Value::U32(8))
        .set("llama.attention.head_count_kv", Value::U32(8));
    gguf_fails(
        "heads8",
        &g,
        &["blk.0.attn_q.weight", "llama.attention.head_count 8"],
    );
    // no explicit head size: the width must split into the heads
    let g = Gguf::fixture()
        .remove("llama.attention.key_length")
        .remove("llama.attention.value_length")
        .remove("llama.rope.dimension_count")
        .set("llama.attention.head_count", Value::U32(3))
        .set("llama.attention.head_count_kv", Value::U32(3));
    gguf_fails("heads3", &g, &["llama.embedding_length", "not a multiple"]);
}

#[test]
fn gguf_absurd_context_length() {
    for v in [1u64 << 25, 1 << 40, u64::MAX] {
        let g = Gguf::fixture().set("llama.context_length", Value::U64(v));
        gguf_fails(&format!("ctx{v}"), &g, &["llama.context_length"]);
    }
}

#[test]
fn gguf_nan_negative_or_zero_rope_base_and_norm_epsilon() {
    for (key, values) in [
        (
            "llama.rope.freq_base",
            vec![f32::NAN, -1.0, 0.0, f32::INFINITY],
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            vec![f32::NAN, -1e-5, f32::INFINITY],
        ),
    ] {
        for v in values {
            let g = Gguf::fixture().set(key, Value::F32(v));
            gguf_fails(&format!("{key}-{v}"), &g, &[key]);
        }
    }
    // A value of the wrong type is named too, instead of silently taking the default.
    let g = Gguf::fixture().set("llama.rope.freq_base", Value::String("1e4".into()));
    gguf_fails(
        "base-string",
        &g,
        &["llama.rope.freq_base", "expected a number"],
    );
}

#[test]
fn gguf_norm_epsilon_zero_is_a_warning() {
    // transformers accepts 0; it is odd (an all-zero state normalizes to NaN), not invalid.
    let g = Gguf::fixture().set("llama.attention.layer_norm_rms_epsilon", Value::F32(0.0));
    let (_, args) = inspect_gguf("eps0", &g);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("llama.attention.layer_norm_rms_epsilon"),
        "{stderr}"
    );
}

#[test]
fn gguf_bad_rope_freqs_tensor() {
    let mut g = Gguf::with_rope_freqs();
    let t = g.tensor("rope_freqs.weight");
    t.dims = vec![7];
    t.data.truncate(7 * 4);
    gguf_fails("freqs7", &g, &["rope_freqs.weight", "[7]", "[8]"]);
    for (test, v) in [("nan", f32::NAN), ("neg", -8.0), ("zero", 0.0)] {
        let mut g = Gguf::with_rope_freqs();
        g.tensor("rope_freqs.weight").data[4..8].copy_from_slice(&v.to_le_bytes());
        gguf_fails(
            &format!("freqs-{test}"),
            &g,
            &["rope_freqs.weight", "value 1"],
        );
    }
}

#[test]
fn gguf_nan_weights_block_scales_and_a_numeric_architecture() {
    // A NaN in an f32 weight: refused at load naming the tensor and the place (it used to run
    // and print a perplexity of 1e42 with exit status 0).
    let mut g = Gguf::fixture();
    let t = g.tensor("blk.0.attn_norm.weight");
    assert_eq!(t.dtype, GgmlDType::F32);
    t.data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    gguf_fails(
        "nan-norm",
        &g,
        &[
            "blk.0.attn_norm.weight",
            "row 0, column 2",
            "NaN or infinite",
        ],
    );
    // A GGML block whose scale is infinite (the weight is quantized here for the test).
    let mut g = Gguf::fixture();
    let t = g.tensor("blk.0.ffn_down.weight");
    let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
    let values: Vec<f32> = t
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(t.dtype, GgmlDType::F32);
    let w = candle_core::Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    t.data = q.data().unwrap().into_owned();
    t.dtype = GgmlDType::Q8_0;
    let block = 34 * (cols / 32); // the first block of row 1
    t.data[block..block + 2].copy_from_slice(&0x7c00u16.to_le_bytes());
    gguf_fails(
        "inf-scale",
        &g,
        &["blk.0.ffn_down.weight", "block 0 of row 1", "scale of inf"],
    );
    // general.architecture of the wrong type is named as such, not as missing
    let g = Gguf::fixture().set("general.architecture", Value::U32(7));
    gguf_fails(
        "arch-u32",
        &g,
        &["general.architecture", "expected a string"],
    );
}

#[test]
fn qwen2_gguf_without_its_qkv_biases() {
    // The Llama fixture relabelled as Qwen2: every Qwen2 has q/k/v biases (llama.cpp requires
    // them), so a file without them is an error naming the first, not a model that runs
    // without them.
    let mut g = Gguf::fixture();
    for (k, _) in g.meta.iter_mut() {
        if let Some(rest) = k.strip_prefix("llama.") {
            *k = format!("qwen2.{rest}");
        }
    }
    let g = g.set("general.architecture", Value::String("qwen2".into()));
    gguf_fails("qwen2-no-bias", &g, &["blk.0.attn_q.bias", "missing"]);
}

#[test]
fn gguf_special_token_ids_outside_the_vocabulary_name_the_gguf_key() {
    // named as the file names it, not as config.json's `bos_token_id`
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
        let g = Gguf::fixture().set(key, Value::U32(1 << 30));
        let e = gguf_fails("bos-far", &g, &[key, "outside the vocabulary"]);
        assert!(!e.contains("key `bos_token_id`"), "{e}");
    }
}

#[test]
fn gguf_truncated_tensor_data() {
    let mut g = Gguf::fixture();
    // The last tensor in the file claims more rows than the file holds.
    let last = g.tensors.last_mut().unwrap();
    let name = last.name.clone();
    last.dims[0] += 1;
    gguf_fails("truncated", &g, &[&name]);
}

// ---------------------------------------------------------------------------- HF folders

const HF_FIXTURE: &str = "tests/fixtures/models/tiny-llama-gqa-untied";

/// A copy of the tiny HF model with a small word-level tokenizer (so the CLI can load it) and
/// `edit` applied to its config.json.
fn hf_model(test: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = tmp(test).join("model");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(repo().join(HF_FIXTURE).join(f), d.join(f)).unwrap();
    }
    let words = ["<unk>", "<s>", "</s>", "hello", "world"];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), (i as u64).into()))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg_path = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    d
}

fn set(key: &str, v: serde_json::Value) -> impl FnOnce(&mut serde_json::Value) {
    let key = key.to_string();
    move |cfg: &mut serde_json::Value| {
        cfg[key] = v;
    }
}

/// The edited HF folder fails to load with one line naming config.json and each of `names`.
fn hf_fails(dir: &Path, names: &[&str]) -> String {
    let mut all = vec!["config.json"];
    all.extend_from_slice(names);
    fails_naming(&["inspect", "--model", dir.to_str().unwrap()], &all)
}

#[test]
fn the_unedited_hf_fixture_loads() {
    let d = hf_model("hf-ok", |_| {});
    let out = run(&["inspect", "--model", d.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hf_untied_model_without_its_lm_head() {
    // tie_word_embeddings false and no lm_head.weight: transformers starts the head from random
    // values; ferrotune used to tie it to the embeddings without a word. Now: an error.
    let d = hf_model("hf-no-head", |_| {});
    let path = d.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(
        t.remove("lm_head.weight").is_some(),
        "the fixture is untied"
    );
    candle_core::safetensors::save(&t, &path).unwrap();
    fails_naming(
        &["inspect", "--model", d.to_str().unwrap()],
        &["lm_head.weight", "missing", "tie_word_embeddings"],
    );
    // told that the head is the embedding table, it loads
    let d2 = hf_model("hf-no-head-tied", set("tie_word_embeddings", true.into()));
    std::fs::copy(&path, d2.join("model.safetensors")).unwrap();
    let out = run(&["inspect", "--model", d2.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hf_hidden_size_65_and_head_dim_0() {
    // with head_dim given, the width no longer fits the tensors
    let d = hf_model("hidden65", set("hidden_size", 65.into()));
    hf_fails(
        &d,
        &["hidden_size 65", "model.embed_tokens.weight", "[256, 64]"],
    );
    // without it, 65 does not split into 4 heads
    let d = hf_model("hidden65-nohd", |c| {
        c["hidden_size"] = 65.into();
        c.as_object_mut().unwrap().remove("head_dim");
    });
    hf_fails(
        &d,
        &["hidden_size", "not a multiple of num_attention_heads 4"],
    );
    let d = hf_model("headdim0", set("head_dim", 0.into()));
    hf_fails(&d, &["head_dim"]);
    let d = hf_model("headdim15", set("head_dim", 15.into()));
    hf_fails(&d, &["head_dim", "even"]);
}

#[test]
fn hf_huge_sizes() {
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
    ] {
        for v in [1u64 << 32, 1 << 40, u64::MAX] {
            let d = hf_model(&format!("{key}-{v}"), set(key, v.into()));
            hf_fails(&d, &[key]);
        }
    }
    // negative and fractional sizes are not sizes
    let d = hf_model("neg-hidden", set("hidden_size", (-64).into()));
    hf_fails(&d, &["hidden_size", "not a non-negative integer"]);
    let d = hf_model("frac-inter", set("intermediate_size", 128.5.into()));
    hf_fails(&d, &["intermediate_size"]);
}

#[test]
fn hf_vocab_size_against_the_embedding() {
    for v in [255u64, 257] {
        let d = hf_model(&format!("vocab{v}"), set("vocab_size", v.into()));
        hf_fails(
            &d,
            &[
                &format!("vocab_size {v}"),
                "model.embed_tokens.weight",
                "[256, 64]",
            ],
        );
    }
    // a tokenizer with more ids than the embedding has rows
    let d = hf_model("vocab4", set("vocab_size", 4.into()));
    hf_fails(&d, &["vocab_size", "tokenizer.json", "id 4"]);
}

#[test]
fn hf_intermediate_size_against_the_mlp_tensors() {
    let d = hf_model("inter129", set("intermediate_size", 129.into()));
    hf_fails(
        &d,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "intermediate_size 129, hidden_size 64",
            "[129, 64]",
        ],
    );
}

#[test]
fn hf_num_hidden_layers_against_the_tensors_present() {
    for v in [1u64, 3, 4096] {
        let d = hf_model(&format!("layers{v}"), set("num_hidden_layers", v.into()));
        hf_fails(&d, &["num_hidden_layers", "tensors for 2 layers"]);
    }
}

#[test]
fn hf_rope_theta_and_rms_norm_eps() {
    for v in [-1.0f64, 0.0, 1e39] {
        let d = hf_model(&format!("theta{v}"), set("rope_theta", v.into()));
        hf_fails(&d, &["rope_theta"]);
    }
    let d = hf_model("eps-neg", set("rms_norm_eps", (-1e-6).into()));
    hf_fails(&d, &["rms_norm_eps"]);
    let d = hf_model("theta-str", set("rope_theta", "big".into()));
    hf_fails(&d, &["rope_theta", "expected a number"]);
    // JSON has no NaN: Python's json writes the bare word, which is not JSON.
    let d = hf_model("theta-nan", |_| {});
    let p = d.join("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let with_nan = text.replacen("\"rope_theta\": 10000.0", "\"rope_theta\": NaN", 1);
    assert_ne!(text, with_nan, "the fixture's rope_theta line changed");
    std::fs::write(&p, with_nan).unwrap();
    hf_fails(&d, &["invalid JSON"]);
    // the transformers >= 5 layout
    let d = hf_model("theta-params", |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": -5.0});
    });
    hf_fails(&d, &["rope_parameters.rope_theta"]);
}

#[test]
fn hf_rms_norm_eps_zero_is_a_warning() {
    let d = hf_model("eps0", set("rms_norm_eps", 0.0.into()));
    let out = run(&["inspect", "--model", d.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("rms_norm_eps"),
        "{stderr}"
    );
}

#[test]
fn hf_rope_scaling_factors() {
    let llama3 = |field: &str, v: f64| {
        let mut s = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        s[field] = v.into();
        s
    };
    let cases = [
        (
            "linear0",
            serde_json::json!({"rope_type": "linear", "factor": 0.0}),
            "rope_scaling.factor",
        ),
        (
            "linear-neg",
            serde_json::json!({"rope_type": "linear", "factor": -2.0}),
            "rope_scaling.factor",
        ),
        ("l3-factor", llama3("factor", -8.0), "rope_scaling.factor"),
        (
            "l3-low",
            llama3("low_freq_factor", 0.0),
            "rope_scaling.low_freq_factor",
        ),
        (
            "l3-high",
            llama3("high_freq_factor", -4.0),
            "rope_scaling.high_freq_factor",
        ),
        (
            "l3-orig",
            llama3("original_max_position_embeddings", 0.0),
            "rope_scaling.original_max_position_embeddings",
        ),
        (
            "l3-orig-huge",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 1u64 << 40}),
            "rope_scaling.original_max_position_embeddings",
        ),
    ];
    for (test, scaling, key) in cases {
        let d = hf_model(test, set("rope_scaling", scaling));
        hf_fails(&d, &[key]);
    }
}

#[test]
fn hf_max_position_embeddings_zero_or_absurd() {
    for v in [0u64, 1 << 25, 1 << 40] {
        let d = hf_model(&format!("ctx{v}"), set("max_position_embeddings", v.into()));
        hf_fails(&d, &["max_position_embeddings"]);
    }
}

/// The folder's weights split into a shard whose name the index gives: `shard_name` relative to
/// the folder. The single model.safetensors is moved to `shard_path`.
fn indexed(test: &str, shard_name: &str, shard_path: impl FnOnce(&Path) -> PathBuf) -> PathBuf {
    let d = hf_model(test, |_| {});
    let target = shard_path(&d);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::rename(d.join("model.safetensors"), &target).unwrap();
    let names = candle_core::safetensors::load(&target, &Device::Cpu).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = names
        .keys()
        .map(|k| (k.clone(), shard_name.into()))
        .collect();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    d
}

#[test]
fn safetensors_index_naming_a_shard_outside_the_folder_is_refused() {
    // sanity: a shard inside the folder loads
    let d = indexed("shard-ok", "model-00001-of-00001.safetensors", |d| {
        d.join("model-00001-of-00001.safetensors")
    });
    let out = run(&["inspect", "--model", d.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let d = indexed("shard-dotdot", "../outside.safetensors", |d| {
        d.parent().unwrap().join("outside.safetensors")
    });
    fails_naming(
        &["inspect", "--model", d.to_str().unwrap()],
        &["model.safetensors.index.json", "../outside.safetensors"],
    );

    let outside = tmp("shard-abs-target").join("outside.safetensors");
    let abs = outside.display().to_string();
    let d = indexed("shard-abs", &abs, |_| outside.clone());
    fails_naming(
        &["inspect", "--model", d.to_str().unwrap()],
        &["model.safetensors.index.json", &abs],
    );

    // a name inside the folder that is a link to a file outside it
    let target = tmp("shard-link-target").join("outside.safetensors");
    let d = indexed("shard-link", "model-00001-of-00001.safetensors", |_| {
        target.clone()
    });
    std::os::unix::fs::symlink(&target, d.join("model-00001-of-00001.safetensors")).unwrap();
    fails_naming(
        &["inspect", "--model", d.to_str().unwrap()],
        &[
            "model.safetensors.index.json",
            "model-00001-of-00001.safetensors",
            "outside the model folder",
        ],
    );
}

// ---------------------------------------------------------------------------- LoRA adapters

const ADAPTER_FIXTURE: &str = "tests/fixtures/peft/tiny-lora-peft";

/// A copy of the PEFT-written tiny adapter with `edit` applied to adapter_config.json.
fn adapter(test: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = tmp(test).join("adapter");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(repo().join(ADAPTER_FIXTURE).join(f), d.join(f)).unwrap();
    }
    let p = d.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    d
}

/// Generating one token with the adapter fails with one line naming each of `names`.
fn adapter_fails(test: &str, dir: &Path, names: &[&str]) -> String {
    let model = hf_model(&format!("{test}-base"), |_| {});
    fails_naming(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            dir.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "1",
        ],
        names,
    )
}

#[test]
fn the_unedited_adapter_loads() {
    let model = hf_model("adapter-ok-base", |_| {});
    let a = adapter("adapter-ok", |_| {});
    let out = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn adapter_rank_zero_huge_or_not_matching_the_tensors() {
    let a = adapter("r2e40", |c| c["r"] = (1u64 << 40).into());
    adapter_fails("r2e40", &a, &["adapter_config.json", "`r`", "limit"]);
    let a = adapter("r0", |c| c["r"] = 0.into());
    adapter_fails("r0", &a, &["adapter_config.json", "`r`"]);
    // the file's tensors are rank 4
    let a = adapter("r8", |c| c["r"] = 8.into());
    adapter_fails(
        "r8",
        &a,
        &[
            "adapter_model.safetensors",
            "lora_A.weight",
            "[4, 64]",
            "`r` 8",
            "[8, 64]",
        ],
    );
    let a = adapter("rank-pattern", |c| {
        c["rank_pattern"] = serde_json::json!({"q_proj": 1u64 << 40})
    });
    adapter_fails("rank-pattern", &a, &["adapter_config.json", "rank_pattern"]);
}

#[test]
fn adapter_alpha_nan_or_infinite() {
    // PEFT writes Python's json, where NaN is a bare word that JSON does not allow.
    let a = adapter("alpha-nan", |_| {});
    let p = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let with_nan = text.replacen("\"lora_alpha\": 8", "\"lora_alpha\": NaN", 1);
    assert_ne!(text, with_nan);
    std::fs::write(&p, with_nan).unwrap();
    adapter_fails("alpha-nan", &a, &["adapter_config.json", "invalid JSON"]);
    // A number beyond f64 (an infinite alpha) is not JSON either.
    let a = adapter("alpha-inf", |_| {});
    let p = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        text.replacen("\"lora_alpha\": 8", "\"lora_alpha\": 1e999", 1),
    )
    .unwrap();
    adapter_fails("alpha-inf", &a, &["adapter_config.json", "invalid JSON"]);
    // Finite but past the limit: the value as written, not as 309 digits.
    let a = adapter("alpha-huge", |c| c["lora_alpha"] = 1e308.into());
    let e = adapter_fails(
        "alpha-huge",
        &a,
        &["adapter_config.json", "lora_alpha", "1e308 is not"],
    );
    assert!(e.len() < 300, "{e}");
}

/// Replace the adapter's weights with `tensors`.
fn write_weights(dir: &Path, tensors: HashMap<String, Tensor>) {
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn adapter_tensors_that_do_not_fit_the_base_module() {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let a = adapter("a-wide", |_| {});
    let mut t =
        candle_core::safetensors::load(a.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    t.insert(
        key.into(),
        Tensor::zeros((4, 65), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    write_weights(&a, t);
    adapter_fails(
        "a-wide",
        &a,
        &[
            key,
            "[4, 65]",
            "model.layers.0.self_attn.q_proj",
            "64 in",
            "[4, 64]",
        ],
    );
    // B with the wrong rank
    let key_b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    let a = adapter("b-rank", |_| {});
    let mut t =
        candle_core::safetensors::load(a.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    t.insert(
        key_b.into(),
        Tensor::zeros((32, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    write_weights(&a, t);
    adapter_fails("b-rank", &a, &[key_b, "[32, 5]", "[32, 4]"]);
    // a module's tensors missing
    let a = adapter("missing", |_| {});
    let mut t =
        candle_core::safetensors::load(a.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    t.remove(key);
    write_weights(&a, t);
    adapter_fails("missing", &a, &[key, "missing"]);
}

// ---------------------------------------------------------------------------- [lora] of a run

/// A run config with `lora` as its `[lora]` section; the data and model need not exist, the
/// config is refused before either is read.
fn lora_section_fails(test: &str, lora: &str, names: &[&str]) -> String {
    let d = tmp(test);
    let cfg = d.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"model.gguf\"\noutput_dir = \"out\"\n[data]\ntrain = \"train.jsonl\"\ntemplate = \"Q: {{q}}\\nA:\"\ncompletion = \" {{a}}\"\n[lora]\n{lora}\n"
        ),
    )
    .unwrap();
    let mut all = vec!["run.toml"];
    all.extend_from_slice(names);
    fails_naming(&["train", "--config", cfg.to_str().unwrap()], &all)
}

#[test]
fn lora_section_of_a_train_config() {
    lora_section_fails("lora-r0", "r = 0", &["lora.r"]);
    lora_section_fails(
        "lora-r2e40",
        "r = 1099511627776",
        &["lora.r", "1099511627776", "at most"],
    );
    lora_section_fails("lora-alpha-nan", "alpha = nan", &["lora.alpha"]);
    lora_section_fails("lora-alpha-inf", "alpha = inf", &["lora.alpha"]);
    lora_section_fails("lora-dropout-1", "dropout = 1.0", &["lora.dropout"]);
    lora_section_fails("lora-dropout-neg", "dropout = -0.1", &["lora.dropout"]);
    lora_section_fails("lora-dropout-nan", "dropout = nan", &["lora.dropout"]);
}
