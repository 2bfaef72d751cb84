//! Build a `tokenizers::Tokenizer` from the tokenizer a GGUF file describes in its metadata.
//!
//! A GGUF carries no `tokenizer.json`: it stores the vocabulary, merges, scores, token types and
//! special-token ids under llama.cpp's `tokenizer.ggml.*` keys, and names the pre-tokenizer only
//! by a short string (`tokenizer.ggml.pre`). We rebuild the pipeline ourselves instead of using
//! candle's `TokenizerFromGguf`, whose fallback for an unknown `pre` (e.g. SmolLM's `smollm`) is
//! GPT-2 byte-level with `add_prefix_space`, which silently mis-tokenizes every segment after a
//! special token. Here an unknown `pre` is an error.
use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{Error, Result};

/// llama.cpp's `llama_token_type` values stored in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What `from_gguf` extracts besides the `tokenizers` pipeline.
pub(crate) struct GgufTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` / `eom_token_id`: further end-of-generation ids.
    pub extra_eog_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

pub(crate) fn build(ct: &Content, path: &Path) -> Result<GgufTokenizer> {
    let md = Meta { ct, path };
    let model = md.req_str("tokenizer.ggml.model")?;
    let tokens = md.req_str_array("tokenizer.ggml.tokens")?;
    let types = md.opt_int_array("tokenizer.ggml.token_type", tokens.len())?;
    if md.get("tokenizer.ggml.scores").is_some() {
        // Often unused here (a byte-level vocabulary, or merges given), but llama.cpp reads a
        // score per token: a short array is a broken file there, so it is one here too.
        md.req_f32_array("tokenizer.ggml.scores", tokens.len())?;
    }
    let check_id = |key: &str| -> Result<Option<u32>> {
        match md.opt_u32(key)? {
            Some(id) if id as usize >= tokens.len() => Err(md.key_err(
                key,
                format!(
                    "id {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            )),
            other => Ok(other),
        }
    };
    let bos_id = check_id("tokenizer.ggml.bos_token_id")?;
    let eos_id = check_id("tokenizer.ggml.eos_token_id")?;
    let unk_id = check_id("tokenizer.ggml.unknown_token_id")?;
    let pad_id = check_id("tokenizer.ggml.padding_token_id")?;
    let mut extra_eog_ids = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        extra_eog_ids.extend(check_id(key)?);
    }

    let (mut inner, default_add_bos) = match model.as_str() {
        "gpt2" => byte_level_bpe(&md, &tokens)?,
        // llama.cpp and transformers both add BOS to a sentencepiece vocabulary unless told otherwise.
        "llama" => (sentencepiece_bpe(&md, &tokens, unk_id)?, true),
        other => {
            return Err(md.key_err(
                "tokenizer.ggml.model",
                format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
            ))
        }
    };
    let add_bos = md
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_add_bos);
    if add_bos && bos_id.is_none() {
        return Err(md.key_err(
            "tokenizer.ggml.add_bos_token",
            "is true but tokenizer.ggml.bos_token_id is not set",
        ));
    }

    // Control (and unknown) tokens become special added tokens so text like `<|im_start|>` is
    // matched whole before pre-tokenization; user-defined ones (e.g. `<think>`) are added tokens
    // that are matched whole but survive `skip_special_tokens`, as in transformers' GGUF loader.
    // Their text is already in the vocabulary, so adding them reuses the existing ids.
    let mut special = Vec::new();
    let mut user = Vec::new();
    if let Some(types) = &types {
        for (tok, &ty) in tokens.iter().zip(types) {
            match ty {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                    special.push(AddedToken::from(tok.clone(), true))
                }
                TOKEN_TYPE_USER_DEFINED => {
                    user.push(AddedToken::from(tok.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
    }
    // bos/eos/pad/unk ids are special even in files whose token_type array is missing or wrong.
    let mut seen: HashSet<String> = special.iter().map(|t| t.content.clone()).collect();
    for id in [bos_id, eos_id, unk_id, pad_id]
        .into_iter()
        .flatten()
        .chain(extra_eog_ids.iter().copied())
    {
        let tok = &tokens[id as usize];
        if seen.insert(tok.clone()) {
            special.push(AddedToken::from(tok.clone(), true));
        }
    }
    let add_err = |e| {
        md.key_err(
            "tokenizer.ggml.token_type",
            format!("adding special tokens: {e}"),
        )
    };
    inner.add_special_tokens(special).map_err(add_err)?;
    inner.add_tokens(user).map_err(add_err)?;

    let chat_template = md.opt_str("tokenizer.chat_template")?;
    Ok(GgufTokenizer {
        inner,
        bos_id,
        eos_id,
        extra_eog_ids,
        pad_id,
        unk_id,
        add_bos,
        chat_template,
    })
}

/// GPT-2 style byte-level BPE (`tokenizer.ggml.model = gpt2`). Also returns whether BOS is added
/// when the file has no `tokenizer.ggml.add_bos_token`.
/// A tokenizer build error, with the first token that appears twice in the vocabulary when
/// there is one: the usual cause, which the BPE's own message ("... out of vocabulary") hides.
fn with_duplicate_hint(e: impl std::fmt::Display, tokens: &[String]) -> String {
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        if let Some(j) = first.insert(t.as_str(), i) {
            return format!("{e} (tokenizer.ggml.tokens holds `{t}` twice, at ids {j} and {i})");
        }
    }
    e.to_string()
}

fn byte_level_bpe(md: &Meta, tokens: &[String]) -> Result<(tokenizers::Tokenizer, bool)> {
    let pre = match md.opt_str("tokenizer.ggml.pre")? {
        Some(p) => p,
        None => {
            // llama.cpp does the same (with a loud warning): files converted before the key existed.
            tracing::warn!(
                "{}: no tokenizer.ggml.pre; using llama.cpp's `default` pre-tokenizer (generation quality may degrade)",
                md.path.display()
            );
            "default".to_string()
        }
    };
    let spec = pre_spec(&pre).ok_or_else(|| {
        md.key_err(
            "tokenizer.ggml.pre",
            format!(
                "unknown pre-tokenizer `{pre}` (known: {})",
                KNOWN_PRE.join(", ")
            ),
        )
    })?;

    // Every token of a byte-level vocabulary is spelled in GPT-2's byte alphabet. A normal token that
    // is not (a converter that wrote raw text) is re-spelled so the BPE can produce it, as transformers does.
    let alphabet = ByteLevel::alphabet();
    let byte_map = bytes_char();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = if t.chars().all(|c| alphabet.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| byte_map[&b]).collect()
            };
            (t, i as u32)
        })
        .collect();
    let merges = md
        .req_str_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            split_merge(&m).ok_or_else(|| {
                md.key_err("tokenizer.ggml.merges", format!("malformed merge `{m}`"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| md.key_err("tokenizer.ggml.merges", with_duplicate_hint(e, tokens)))?;

    let mut tok = tokenizers::Tokenizer::new(bpe);
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in spec.splits {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| md.key_err("tokenizer.ggml.pre", format!("regex for `{pre}`: {e}")))?;
        steps.push(split.into());
    }
    // The regexes above did the splitting; ByteLevel only maps bytes to the GPT-2 alphabet.
    steps.push(ByteLevel::new(false, true, false).into());
    tok.with_pre_tokenizer(Some(PreSequence::new(steps)));
    if spec.nfc {
        tok.with_normalizer(Some(NFC)).map_err(|e| {
            md.key_err(
                "tokenizer.ggml.pre",
                format!("setting the NFC normalizer: {e}"),
            )
        })?;
    }
    tok.with_decoder(Some(ByteLevelDecoder::new(false, true, false)));
    Ok((tok, spec.add_bos))
}

/// SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model = llama`: Llama 2, TinyLlama,
/// Mistral): spaces become `▁`, unknown characters fall back to `<0xNN>` byte tokens, and (unless
/// `tokenizer.ggml.add_space_prefix` is false) a `▁` is prepended to every stretch of text between
/// special tokens. That is what sentencepiece, llama.cpp and these models' own `tokenizer.json`
/// (`Prepend` + `Replace` normalizers) do. transformers' GGUF loader differs: its `Metaspace(first)`
/// adds no `▁` to text that already starts with a space or follows a special token.
fn sentencepiece_bpe(
    md: &Meta,
    tokens: &[String],
    unk_id: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = match md.opt_str_array("tokenizer.ggml.merges")? {
        Some(ms) => ms
            .iter()
            .map(|m| {
                split_merge(m).ok_or_else(|| {
                    md.key_err("tokenizer.ggml.merges", format!("malformed merge `{m}`"))
                })
            })
            .collect::<Result<Vec<_>>>()?,
        None => {
            let scores = md.req_f32_array("tokenizer.ggml.scores", tokens.len())?;
            merges_from_scores(tokens, &scores)
        }
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(id) = unk_id.or(Some(0).filter(|_| tokens.first().is_some_and(|t| t == "<unk>"))) {
        builder = builder.unk_token(tokens[id as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| md.key_err("tokenizer.ggml.tokens", with_duplicate_hint(e, tokens)))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let prefix = md
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let build_err = |e| {
        Error::msg(format!(
            "{}: building the sentencepiece normalizer: {e}",
            md.path.display()
        ))
    };
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if prefix {
        norm.push(Prepend::new("▁".to_string()).into());
    }
    norm.push(Replace::new(" ", "▁").map_err(build_err)?.into());
    tok.with_normalizer(Some(NormalizerSequence::new(norm)))
        .map_err(build_err)?;
    let mut dec: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(build_err)?),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if prefix {
        dec.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(dec)));
    Ok(tok)
}

/// Merges implied by a sentencepiece vocabulary and its scores, in the order transformers'
/// `generate_merges` produces them: every split of a token into two vocabulary pieces, ranked by
/// the merged token's score (best first), then by the pieces' lengths (longer first); ties keep
/// vocabulary order. The BPE then merges exactly as sentencepiece's highest-score-first loop.
pub(crate) fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // A duplicate token keeps its last id (as a Python dict would).
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.insert(t.as_str(), i);
    }
    // Python iterates `dict(zip(tokens, scores))`: first-insertion order, last value.
    let mut order: Vec<usize> = Vec::with_capacity(tokens.len());
    let mut first_seen: HashSet<&str> = HashSet::with_capacity(tokens.len());
    for t in tokens {
        if first_seen.insert(t.as_str()) {
            order.push(ids[t.as_str()]);
        }
    }
    let mut merges: Vec<(usize, usize, f32)> = Vec::new(); // (left id, right id, score)
    for &i in &order {
        let merge = tokens[i].as_str();
        let score = scores[ids[merge]];
        let mut local: Vec<(usize, usize, f32)> = merge
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&merge[..at])?, *ids.get(&merge[at..])?, score)))
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    let clen = |id: usize| tokens[id].chars().count();
    // Python's `sorted(..., reverse=True)` is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| clen(b.0).cmp(&clen(a.0)))
            .then_with(|| clen(b.1).cmp(&clen(a.1)))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

/// "a b" -> ("a", "b"). The split is at the first space after the first character, as llama.cpp
/// does, so a merge whose left side is itself a space stays intact.
fn split_merge(m: &str) -> Option<(String, String)> {
    let first = m.chars().next()?;
    let at = m[first.len_utf8()..].find(' ')? + first.len_utf8();
    Some((m[..at].to_string(), m[at + 1..].to_string()))
}

/// GPT-2's byte -> printable-char table (the inverse of what the ByteLevel decoder uses).
fn bytes_char() -> HashMap<u8, char> {
    let mut bs: Vec<u8> = Vec::new();
    bs.extend(b'!'..=b'~');
    bs.extend(b'\xA1'..=b'\xAC');
    bs.extend(b'\xAE'..=b'\xFF');
    let mut cs: Vec<u32> = bs.iter().map(|&b| b as u32).collect();
    let mut n = 0;
    for b in 0..=255u8 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b, char::from_u32(c).expect("valid code point")))
        .collect()
}

/// How one `tokenizer.ggml.pre` value splits text before the byte-level BPE.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PreSpec {
    /// Applied in order, each to every piece the previous ones produced; matches are isolated.
    pub splits: &'static [&'static str],
    /// The model's own tokenizer.json normalizes to NFC (Qwen2).
    pub nfc: bool,
    /// A word that is itself a vocabulary token is not run through the merges (Llama 3, Tekken).
    pub ignore_merges: bool,
    /// llama.cpp adds BOS for these when the file does not say (Llama 3, Tekken).
    pub add_bos: bool,
}

// Regexes from llama.cpp's `llama-vocab.cpp` (`llm_tokenizer_bpe`) and transformers'
// `integrations/gguf/gguf_tokenizer_mapping.py`. Where llama.cpp rewrote `(?i:'s|...)` as
// `(?:'[sS]|...)` because its engine lacks inline flags, we keep the original tokenizer.json form:
// fancy-regex supports it and the two match the same strings.

/// GPT-2's pattern, as used by the `ByteLevel` pre-tokenizer. llama.cpp's copy lacks the final
/// `|\s+`; a whitespace run that alternative would match is kept as an unmatched piece there, with
/// the same result.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const GPT4O: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT`: what it uses for `default` and for files without a `pre`.
const DEFAULT_SPLITS: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];
const FALCON_SPLITS: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"];
/// StarCoder family (and SmolLM): single digits, then GPT-2. Same as their tokenizer.json's
/// `Digits(individual_digits=true)` + `ByteLevel`.
const STARCODER_SPLITS: &[&str] = &[r"\p{N}", GPT2];
/// CJK ideographs U+4E00..U+9FA5, U+0800..U+4E00 and Hangul U+AC00..U+D7FF, spelled as escapes.
const DEEPSEEK_CODER_SPLITS: &[&str] = &[
    "[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    r"\p{N}",
];

/// DeepSeek LLM: newlines, runs of (mostly cased) letters, ASCII/full-width punctuation, trailing
/// whitespace, CJK/Hangul runs, digit runs. Spelled as escapes so look-alike code points (U+212A
/// KELVIN SIGN, U+2126 OHM SIGN...) cannot be normalized away in an edit.
const DEEPSEEK_LLM_SPLITS: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-z\u{00B5}\u{00C0}-\u{00D6}\u{00D8}-\u{00F6}\u{00F8}-\u{01BA}\u{01BC}-\u{01BF}\u{01C4}-\u{0293}\u{0295}-\u{02AF}\u{0370}-\u{0373}\u{0376}\u{0377}\u{037B}-\u{037D}\u{037F}\u{0386}\u{0388}-\u{038A}\u{038C}\u{038E}-\u{03A1}\u{03A3}-\u{03F5}\u{03F7}-\u{0481}\u{048A}-\u{052F}\u{0531}-\u{0556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+",
    "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    "\\p{N}+",
];

/// Every `pre` value we accept, for the error message.
pub(crate) const KNOWN_PRE: &[&str] = &[
    "default",
    "gpt-2",
    "phi-2",
    "mpt",
    "olmo",
    "jais",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "lfm2",
    "pixtral",
    "dbrx",
    "smaug-bpe",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "qwen2",
    "deepseek-r1-qwen",
    "stablelm2",
    "megrez",
    "tekken",
    "gpt-4o",
    "llama4",
];

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value; `None` if we have no faithful mapping.
pub(crate) fn pre_spec(pre: &str) -> Option<PreSpec> {
    let s = |splits, nfc, ignore_merges| {
        Some(PreSpec {
            splits,
            nfc,
            ignore_merges,
            add_bos: false,
        })
    };
    // The Llama 3 and Tekken groups: no merges for whole-token words, BOS by default.
    let bos = |splits| {
        Some(PreSpec {
            splits,
            nfc: false,
            ignore_merges: true,
            add_bos: true,
        })
    };
    match pre {
        "default" => s(DEFAULT_SPLITS, false, false),
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => s(&[GPT2], false, false),
        // llama.cpp sets ignore_merges for the Llama 3 group (as their tokenizer.json does), not for dbrx/smaug.
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "lfm2" => {
            bos(&[LLAMA3])
        }
        "dbrx" | "smaug-bpe" => s(&[LLAMA3], false, false),
        "deepseek-llm" => s(DEEPSEEK_LLM_SPLITS, false, false),
        "deepseek-coder" => s(DEEPSEEK_CODER_SPLITS, false, false),
        "falcon" => s(FALCON_SPLITS, false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            s(STARCODER_SPLITS, false, false)
        }
        // Qwen2's tokenizer.json normalizes to NFC; llama.cpp skips that, which only matters for non-NFC input.
        "qwen2" | "deepseek-r1-qwen" => s(&[QWEN2], true, false),
        "stablelm2" | "megrez" => s(&[QWEN2], false, false),
        "tekken" => bos(&[TEKKEN]),
        "gpt-4o" | "llama4" => s(&[GPT4O], false, false),
        _ => None,
    }
}

/// Typed access to GGUF metadata with one-line errors naming the file and key.
struct Meta<'a> {
    ct: &'a Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn key_err(&self, key: &str, what: impl std::fmt::Display) -> Error {
        Error::key(self.path.display().to_string(), key, what)
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.ct.metadata.get(key)
    }
    fn req(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.key_err(key, "missing"))
    }
    fn req_str(&self, key: &str) -> Result<String> {
        match self.req(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(self.key_err(
                key,
                format!("expected a string, found {:?}", v.value_type()),
            )),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        self.get(key).map(|_| self.req_str(key)).transpose()
    }
    fn req_str_array(&self, key: &str) -> Result<Vec<String>> {
        match self.req(key)? {
            Value::Array(vs) => {
                vs.iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        v => Err(self
                            .key_err(key, format!("expected strings, found {:?}", v.value_type()))),
                    })
                    .collect()
            }
            v => Err(self.key_err(
                key,
                format!("expected an array, found {:?}", v.value_type()),
            )),
        }
    }
    fn opt_str_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.get(key).map(|_| self.req_str_array(key)).transpose()
    }
    fn opt_int_array(&self, key: &str, len: usize) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(vs) = v else {
            return Err(self.key_err(
                key,
                format!("expected an array, found {:?}", v.value_type()),
            ));
        };
        if vs.len() != len {
            return Err(self.key_err(key, format!("has {} entries for {len} tokens", vs.len())));
        }
        vs.iter()
            .map(|v| {
                as_i64(v).ok_or_else(|| {
                    self.key_err(
                        key,
                        format!("expected integers, found {:?}", v.value_type()),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    fn req_f32_array(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let v = self.req(key)?;
        let Value::Array(vs) = v else {
            return Err(self.key_err(
                key,
                format!("expected an array, found {:?}", v.value_type()),
            ));
        };
        if vs.len() != len {
            return Err(self.key_err(key, format!("has {} entries for {len} tokens", vs.len())));
        }
        vs.iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => as_i64(v).map(|x| x as f32).ok_or_else(|| {
                    self.key_err(key, format!("expected numbers, found {:?}", v.value_type()))
                }),
            })
            .collect()
    }
    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = as_i64(v).ok_or_else(|| {
            self.key_err(
                key,
                format!("expected an integer, found {:?}", v.value_type()),
            )
        })?;
        u32::try_from(n)
            .map(Some)
            .map_err(|_| self.key_err(key, format!("{n} is not a valid token id")))
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => {
                Err(self.key_err(key, format!("expected a bool, found {:?}", v.value_type())))
            }
        }
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}
