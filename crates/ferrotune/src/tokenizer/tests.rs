//! Golden tests against fixtures written by `reference/tokenizer_fixtures.py` (transformers and
//! sentencepiece), plus synthetic tests that need no model files.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use serde_json::json;

use super::*;

const SMOL_GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
);
const SMOL_HF_EXPORT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/smollm2/hf-export"
);
const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer"
);

fn fixture(name: &str) -> serde_json::Value {
    let path = Path::new(FIXTURES).join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (written by reference/tokenizer_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn read_gguf(path: &Path) -> Content {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/fetch-models.sh to fetch the test models (CI fetches them)",
            path.display()
        )
    });
    Content::read(&mut f).unwrap()
}

fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = Path::new(SMOL_GGUF);
        Tokenizer::from_gguf(&read_gguf(path), path).unwrap()
    })
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn smollm2_gguf_ids_match_transformers() {
    let tok = smollm2();
    let fx = fixture("smollm2.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&c["ids"]),
            "ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids_with_special"]),
            "ids (add_special_tokens) of {text:?}"
        );
        let got = tok.encode(text, false).unwrap();
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            text,
            "roundtrip of {text:?}"
        );
        assert_eq!(
            tok.decode(&got, true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "decode(skip_special_tokens) of {text:?}"
        );
    }
}

#[test]
fn smollm2_gguf_special_tokens() {
    let tok = smollm2();
    let fx = fixture("smollm2.json");
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.bos_token(), fx["bos_token"].as_str());
    assert_eq!(tok.eos_token(), fx["eos_token"].as_str());
    assert_eq!(
        tok.pad_id(),
        fx["pad_token"].as_str().and_then(|t| tok.token_to_id(t))
    );
    let eos = fx["eos_token_id"].as_u64().unwrap() as u32;
    assert_eq!(tok.eos_ids()[0], eos);
    // <|endoftext|> also ends generation; <|im_start|> must not.
    assert!(tok
        .eos_ids()
        .contains(&tok.token_to_id("<|endoftext|>").unwrap()));
    assert!(!tok
        .eos_ids()
        .contains(&tok.token_to_id("<|im_start|>").unwrap()));
    // SmolLM2's GGUF says add_bos_token = false, so add_special_tokens adds nothing.
    assert!(!tok.add_bos());
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let tok = smollm2();
    let fx = fixture("smollm2.json");
    let tmpl = tok
        .chat_template()
        .expect("SmolLM2's GGUF has a chat template");
    assert_eq!(tmpl.source(), fx["chat_template"].as_str().unwrap());
    for c in fx["chat"].as_array().unwrap() {
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let got = tmpl
            .render(&messages(&c["messages"]), gen, &serde_json::Value::Null)
            .unwrap();
        assert_eq!(
            got,
            c["rendered"].as_str().unwrap(),
            "{} gen={gen}",
            c["name"]
        );
    }
}

#[test]
fn stress_template_matches_transformers_jinja() {
    let fx = fixture("smollm2.json");
    let st = &fx["stress_template"];
    let tmpl = ChatTemplate::new(
        st["template"].as_str().unwrap(),
        fx["bos_token"].as_str(),
        fx["eos_token"].as_str(),
    )
    .unwrap();
    for r in st["renders"].as_array().unwrap() {
        let gen = r["add_generation_prompt"].as_bool().unwrap();
        let got = tmpl
            .render(&messages(&st["messages"]), gen, &st["extra"])
            .unwrap();
        assert_eq!(got, r["rendered"].as_str().unwrap(), "gen={gen}");
    }
}

#[test]
fn strftime_matches_python() {
    for c in fixture("smollm2.json")["strftime"].as_array().unwrap() {
        let got =
            chat::strftime(c["format"].as_str().unwrap(), c["unix"].as_i64().unwrap()).unwrap();
        assert_eq!(got, c["text"].as_str().unwrap());
    }
}

#[test]
fn smollm2_stream_matches_full_decode() {
    let tok = smollm2();
    for c in fixture("smollm2.json")["cases"].as_array().unwrap() {
        let ids = ids(&c["ids"]);
        let mut stream = tok.stream();
        let mut out = String::new();
        for &id in &ids {
            if let Some(delta) = stream.push(id).unwrap() {
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "broken char streamed for {:?}",
                    c["text"]
                );
                out.push_str(&delta);
            }
        }
        out.extend(stream.finish().unwrap());
        assert_eq!(out, tok.decode(&ids, false).unwrap());
    }
}

/// The tokenizer files transformers' `save_pretrained` wrote for SmolLM2 (committed by
/// `reference/make_fixtures.py hf-export`; tokenizer.json is stored gzip-compressed), unpacked
/// into a fresh folder after checking each file's size and CRC-32 against the fixture manifest.
fn transformers_tokenizer_dir() -> PathBuf {
    use std::io::Read;
    let fixture_dir = Path::new(SMOL_HF_EXPORT);
    let manifest_path = fixture_dir.join("manifest.json");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (written by reference/make_fixtures.py hf-export)",
                manifest_path.display()
            )
        }),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "ferrotune-test-hf-tokenizer-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        let entry = &manifest["files"][name];
        let stored = fixture_dir.join(entry["stored_as"].as_str().unwrap());
        let raw = std::fs::read(&stored).unwrap_or_else(|e| panic!("{}: {e}", stored.display()));
        let bytes = if stored.extension().is_some_and(|e| e == "gz") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .unwrap_or_else(|e| panic!("{}: {e}", stored.display()));
            out
        } else {
            raw
        };
        assert_eq!(
            (bytes.len() as u64, crc32fast::hash(&bytes) as u64),
            (
                entry["bytes"].as_u64().unwrap(),
                entry["crc32"].as_u64().unwrap()
            ),
            "{}: size and CRC-32 differ from what transformers wrote (manifest.json)",
            stored.display()
        );
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    dir
}

/// The HF tokenizer folder transformers saved for SmolLM2 tokenizes, decodes and renders chats
/// like transformers (smollm2.json) and like the GGUF tokenizer.
#[test]
fn hf_dir_matches_gguf() {
    let dir = transformers_tokenizer_dir();
    let hf = Tokenizer::from_hf_dir(&dir).unwrap();
    let gg = smollm2();
    let fx = fixture("smollm2.json");
    for c in fx["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let got = hf.encode(text, false).unwrap();
        assert_eq!(got, ids(&c["ids"]), "ids of {text:?} (transformers)");
        assert_eq!(
            hf.encode(text, true).unwrap(),
            ids(&c["ids_with_special"]),
            "ids (add_special_tokens) of {text:?} (transformers)"
        );
        assert_eq!(got, gg.encode(text, false).unwrap(), "{text:?} (GGUF)");
        assert_eq!(
            hf.encode(text, true).unwrap(),
            gg.encode(text, true).unwrap(),
            "{text:?} (GGUF)"
        );
        assert_eq!(
            hf.decode(&got, false).unwrap(),
            text,
            "roundtrip of {text:?}"
        );
        assert_eq!(
            hf.decode(&got, true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "decode(skip_special_tokens) of {text:?}"
        );
    }
    assert_eq!(hf.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(hf.vocab_size(), gg.vocab_size());
    assert_eq!(hf.bos_token(), fx["bos_token"].as_str());
    assert_eq!(hf.eos_token(), fx["eos_token"].as_str());
    assert_eq!(
        hf.pad_id(),
        fx["pad_token"].as_str().and_then(|t| hf.token_to_id(t))
    );
    assert_eq!(
        (hf.bos_id(), hf.eos_token(), hf.pad_id()),
        (gg.bos_id(), gg.eos_token(), gg.pad_id())
    );
    assert_eq!(hf.eos_ids()[0], fx["eos_token_id"].as_u64().unwrap() as u32);
    assert_eq!(hf.eos_ids(), gg.eos_ids());
    let (ht, gt) = (hf.chat_template().unwrap(), gg.chat_template().unwrap());
    assert_eq!(ht.source(), fx["chat_template"].as_str().unwrap());
    for c in fx["chat"].as_array().unwrap() {
        let (m, gen) = (
            messages(&c["messages"]),
            c["add_generation_prompt"].as_bool().unwrap(),
        );
        let null = serde_json::Value::Null;
        let rendered = ht.render(&m, gen, &null).unwrap();
        assert_eq!(
            rendered,
            c["rendered"].as_str().unwrap(),
            "{} gen={gen} (transformers)",
            c["name"]
        );
        assert_eq!(rendered, gt.render(&m, gen, &null).unwrap(), "(GGUF)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tiny_spm_gguf_matches_sentencepiece() {
    let path = Path::new(FIXTURES).join("tiny-spm.gguf");
    let tok = Tokenizer::from_gguf(&read_gguf(&path), &path).unwrap();
    let fx = fixture("tiny-spm.json");
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(
        (tok.bos_token(), tok.eos_token()),
        (Some("<s>"), Some("</s>"))
    );
    assert!(tok.add_bos());
    for c in fx["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&c["ids"]),
            "ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids_with_special"]),
            "ids (BOS) of {text:?}"
        );
        if let Some(decoded) = c["decoded"].as_str() {
            assert_eq!(
                tok.decode(&ids(&c["ids"]), false).unwrap(),
                decoded,
                "decode of {text:?}"
            );
        }
    }
}

#[test]
fn pre_tokenizer_table_splits_like_llama_cpp() {
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let fx = fixture("pre_tokenizers.json");
    let cases = fx["cases"].as_array().unwrap();
    for pre in gguf::KNOWN_PRE {
        assert!(
            cases.iter().any(|c| c["pre"] == *pre),
            "no fixture for `{pre}`"
        );
    }
    for c in cases {
        let (pre, text) = (c["pre"].as_str().unwrap(), c["text"].as_str().unwrap());
        let spec = gguf::pre_spec(pre)
            .unwrap_or_else(|| panic!("`{pre}` is in the fixture but not mapped"));
        let mut pts = PreTokenizedString::from(text);
        for re in spec.splits {
            Split::new(
                SplitPattern::Regex(re.to_string()),
                tokenizers::SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap()
            .pre_tokenize(&mut pts)
            .unwrap();
        }
        let got: Vec<&str> = pts
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s)
            .collect();
        let want: Vec<String> = serde_json::from_value(c["pieces"].clone()).unwrap();
        assert_eq!(got, want, "pre `{pre}` on {text:?}");
    }
}

/// A GGUF `Content` with only tokenizer metadata: a byte-level vocabulary of the 256 byte
/// symbols, "ab", and two special tokens.
fn tiny_gpt2_content(pre: Option<&str>) -> Content {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
    let mut chars: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    chars.sort_unstable();
    tokens.extend(chars.iter().map(|c| c.to_string()));
    tokens.push("ab".into());
    let mut types = vec![Value::I32(3), Value::I32(3)];
    types.resize(tokens.len(), Value::I32(1));
    let s = |x: &str| Value::String(x.to_string());
    let mut md = HashMap::from([
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(vec![s("a b")]),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1)),
    ]);
    if let Some(p) = pre {
        md.insert("tokenizer.ggml.pre".to_string(), s(p));
    }
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

#[test]
fn unknown_pre_is_a_one_line_error_naming_file_and_value() {
    let e = Tokenizer::from_gguf(
        &tiny_gpt2_content(Some("not-a-real-pre")),
        Path::new("m.gguf"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("m.gguf: key `tokenizer.ggml.pre`"), "{e}");
    assert!(e.contains("`not-a-real-pre`") && !e.contains('\n'), "{e}");
}

#[test]
fn gguf_special_tokens_are_never_split() {
    // With llama.cpp's `default` pre-tokenizer (punctuation runs split off), `<|im_end|>` would be
    // cut into pieces if it were not an added special token.
    let tok =
        Tokenizer::from_gguf(&tiny_gpt2_content(Some("default")), Path::new("m.gguf")).unwrap();
    let got = tok.encode("ab<|im_end|>ab<|endoftext|>", false).unwrap();
    let ab = tok.token_to_id("ab").unwrap();
    assert_eq!(got, vec![ab, 1, ab, 0]);
    assert_eq!(tok.decode(&got, true).unwrap(), "abab");
    assert_eq!(tok.eos_ids(), &[1, 0]);
}

/// A tiny sentencepiece-style tokenizer.json (byte fallback, `▁` for spaces) in a temp folder.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferrotune-tok-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny_hf_dir(tag: &str) -> TempDir {
    use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence};
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::replace::Replace;
    let mut vocab: Vec<String> = vec![
        "<unk>".into(),
        "<s>".into(),
        "</s>".into(),
        "<|im_end|>".into(),
    ];
    vocab.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
    vocab.extend(["▁", "h", "i", "hi", "▁hi"].map(String::from));
    let map: tokenizers::models::bpe::Vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = vec![
        ("h".to_string(), "i".to_string()),
        ("▁".to_string(), "hi".to_string()),
    ];
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .byte_fallback(true)
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(Replace::new(" ", "▁").unwrap()))
        .unwrap();
    tok.with_decoder(Some(Sequence::new(vec![
        Replace::new("▁", " ").unwrap().into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    tok.add_special_tokens(
        ["<s>", "</s>", "<|im_end|>"].map(|t| tokenizers::AddedToken::from(t, true)),
    )
    .unwrap();
    let dir = TempDir::new(tag);
    tok.save(dir.0.join("tokenizer.json"), false).unwrap();
    dir
}

#[test]
fn missing_tokenizer_json_is_one_line_error_naming_folder() {
    let dir = TempDir::new("missing");
    let e = Tokenizer::from_hf_dir(&dir.0).unwrap_err().to_string();
    assert!(e.starts_with(&dir.0.display().to_string()), "{e}");
    assert!(e.contains("tokenizer.json") && !e.contains('\n'), "{e}");
}

#[test]
fn eos_ids_from_generation_config_list() {
    let dir = tiny_hf_dir("eos");
    dir.write(
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true}"#,
    );
    dir.write(
        "generation_config.json",
        r#"{"eos_token_id": [2, 3], "bos_token_id": 1}"#,
    );
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert_eq!(tok.eos_ids(), &[2, 3]);
    assert_eq!(tok.eos_token(), Some("</s>"));
    assert_eq!((tok.bos_id(), tok.bos_token()), (Some(1), Some("<s>")));
    // add_bos_token: BOS only with add_special_tokens.
    let hi = tok.token_to_id("▁hi").unwrap();
    assert_eq!(tok.encode(" hi", true).unwrap(), vec![1, hi]);
    assert_eq!(tok.encode(" hi", false).unwrap(), vec![hi]);

    // A single int works too, and a malformed entry is a one-line error naming file and key.
    dir.write("generation_config.json", r#"{"eos_token_id": 3}"#);
    assert_eq!(Tokenizer::from_hf_dir(&dir.0).unwrap().eos_ids(), &[2, 3]);
    dir.write("generation_config.json", r#"{"eos_token_id": "x"}"#);
    let e = Tokenizer::from_hf_dir(&dir.0).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("eos_token_id") && !e.contains('\n'),
        "{e}"
    );
}

#[test]
fn hf_chat_template_unknown_variable_is_an_error() {
    let dir = tiny_hf_dir("chat");
    let cfg = json!({
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "unused"},
            {"name": "default", "template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{{ eos_tokn }}"},
        ],
    });
    dir.write("tokenizer_config.json", &cfg.to_string());
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    let tmpl = tok.chat_template().unwrap();
    assert!(tmpl.source().contains("eos_tokn"));
    let e = tmpl
        .render(
            &[ChatMessage::new("user", "hi")],
            false,
            &serde_json::Value::Null,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Template(_)), "{msg}");
    assert!(
        msg.contains("eos_tokn") && msg.contains("line 2") && !msg.contains('\n'),
        "{msg}"
    );

    // An empty template is none (transformers: "" is falsy), not one that renders nothing.
    dir.write(
        "tokenizer_config.json",
        &json!({"chat_template": " \n"}).to_string(),
    );
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert!(tok.chat_template().is_none());

    // A template that does not compile still lets the tokenizer load; rendering reports the line.
    let cfg = json!({"chat_template": "{% for m in messages %}\n{{ m.content }\n{% endfor %}"});
    dir.write("tokenizer_config.json", &cfg.to_string());
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert_eq!(tok.encode(" hi", false).unwrap().len(), 1);
    let tmpl = tok.chat_template().unwrap();
    let msg = tmpl
        .render(
            &[ChatMessage::new("user", "hi")],
            false,
            &serde_json::Value::Null,
        )
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("chat template: ")
            && msg.contains("tokenizer_config.json: chat_template: syntax error")
            && msg.contains("line 2")
            && !msg.contains('\n'),
        "{msg}"
    );
    assert_eq!(
        tmpl.compile_error().map(|e| format!("chat template: {e}")),
        Some(msg)
    );
}

#[test]
fn stream_holds_back_multibyte_chars_split_across_byte_tokens() {
    let dir = tiny_hf_dir("stream");
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    let text = " hi é😀hi";
    let ids = tok.encode(text, false).unwrap();
    let byte = |b: u8| tok.token_to_id(&format!("<0x{b:02X}>")).unwrap();
    // é and 😀 are not in the vocabulary: they must come out as their UTF-8 bytes.
    let emoji: Vec<u32> = "😀".bytes().map(byte).collect();
    assert!(ids.windows(4).any(|w| w == emoji.as_slice()), "{ids:?}");

    let mut stream = tok.stream();
    let mut pieces = Vec::new();
    for &id in &ids {
        let out = stream.push(id).unwrap();
        if id == emoji[0] || id == emoji[1] || id == emoji[2] || id == byte(0xC3) {
            assert_eq!(out, None, "emitted an incomplete character at id {id}");
        }
        pieces.extend(out);
    }
    pieces.extend(stream.finish().unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(pieces.contains(&"😀".to_string()), "{pieces:?}");
    assert_eq!(pieces.concat(), text);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    // A truncated character at the very end is flushed by finish() as U+FFFD, like a full decode.
    let mut stream = tok.stream();
    assert_eq!(stream.push(emoji[0]).unwrap(), None);
    assert_eq!(stream.finish().unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn gguf_scores_of_the_wrong_length_and_duplicate_tokens_are_named() {
    let mut ct = tiny_gpt2_content(Some("default"));
    let n = match &ct.metadata["tokenizer.ggml.tokens"] {
        Value::Array(v) => v.len(),
        _ => unreachable!(),
    };
    ct.metadata.insert(
        "tokenizer.ggml.scores".to_string(),
        Value::Array(vec![Value::F32(0.0); n - 1]),
    );
    let e = Tokenizer::from_gguf(&ct, Path::new("m.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.ggml.scores") && e.contains(&format!("for {n} tokens")),
        "{e}"
    );
    // the right length loads
    ct.metadata.insert(
        "tokenizer.ggml.scores".to_string(),
        Value::Array(vec![Value::F32(0.0); n]),
    );
    Tokenizer::from_gguf(&ct, Path::new("m.gguf")).unwrap();

    // "ab" replaced by a second "a": the merge `a b` has no result; the error names the twin
    let mut ct = tiny_gpt2_content(Some("default"));
    if let Some(Value::Array(v)) = ct.metadata.get_mut("tokenizer.ggml.tokens") {
        *v.last_mut().unwrap() = Value::String("a".into());
    }
    let e = Tokenizer::from_gguf(&ct, Path::new("m.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`a` twice, at ids") && !e.contains('\n'), "{e}");
}
