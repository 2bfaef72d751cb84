//! Inputs for encoder models (BERT, RoBERTa): a text or a text pair with the special tokens of
//! the folder's post-processor (`[CLS] a [SEP] b [SEP]`, `<s> a </s></s> b </s>`), token-type
//! ids, and longest-first truncation to a length limit, as transformers' tokenizer computes
//! them for `tokenizer(text, text_pair, truncation=True, max_length=N)`.
//!
//! [`Tokenizer::encode`] is for decoder prompts (its own BOS rule, no post-processor); this one
//! runs the post-processor. Truncation and padding written in `tokenizer.json` (all-MiniLM-L6-v2
//! pads every row to 128) are replaced: the limit is the caller's, and batches are padded to
//! their longest row by the model's input builder.
use super::Tokenizer;
use crate::{Error, Result};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::PostProcessor;

/// One encoded row: token ids and token-type ids (0 for the first text, 1 for the second where
/// the model's post-processor says so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedInput {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// Encodes texts for an encoder model (see the module docs). Built once per model by
/// [`Tokenizer::input_encoder`]; encoding does not clone the vocabulary.
pub struct InputEncoder {
    inner: tokenizers::Tokenizer,
    max_len: usize,
    lowercase: bool,
    /// The tokenizer's file, for messages.
    origin: String,
}

/// Fewest tokens a row may be limited to: room for the special tokens of a pair and one token
/// of each text.
pub const MIN_INPUT_LEN: usize = 6;

impl Tokenizer {
    /// An [`InputEncoder`] that keeps at most `max_len` tokens per row (special tokens
    /// included). `lowercase` lowercases texts first (sentence-transformers' `do_lower_case`).
    pub fn input_encoder(&self, max_len: usize, lowercase: bool) -> Result<InputEncoder> {
        if max_len < MIN_INPUT_LEN {
            return Err(Error::key(
                "tokenizer",
                "max_length",
                format!("{max_len}: expected at least {MIN_INPUT_LEN} tokens"),
            ));
        }
        // The post-processor's special tokens count against the limit; tokenizers subtracts
        // them without checking, so a limit below them must be refused here.
        let specials = self
            .inner
            .get_post_processor()
            .map(|p| p.added_tokens(true))
            .unwrap_or(0);
        if max_len <= specials {
            return Err(Error::key(
                "tokenizer",
                "max_length",
                format!("{max_len}: the special tokens of a text pair alone take {specials}"),
            ));
        }
        let mut inner = self.inner.clone();
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
        Ok(InputEncoder {
            inner,
            max_len,
            lowercase,
            origin: self.origin.clone(),
        })
    }
}

impl InputEncoder {
    /// Most tokens per row.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `text` (and `pair`) with special tokens and type ids, truncated longest-first.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<EncodedInput> {
        let lower = |s: &str| {
            if self.lowercase {
                s.to_lowercase()
            } else {
                s.to_string()
            }
        };
        let (a, b) = (lower(text), pair.map(lower));
        // Under catch_panic: a malformed tokenizer.json can make the tokenizers crate panic.
        let enc = crate::error::catch_panic(|| match &b {
            None => self.inner.encode_fast(a.as_str(), true),
            Some(b) => self.inner.encode_fast((a.as_str(), b.as_str()), true),
        })
        .map_err(|p| super::failed(&self.origin, "encoding", p))?
        .map_err(|e| super::failed(&self.origin, "encoding", e))?;
        Ok(EncodedInput {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WordPiece tokenizer with BERT's normalizer, pre-tokenizer and post-processor, and a
    /// tokenizer.json that pads to 16 and truncates to 8 (which the encoder must ignore).
    fn bert_like() -> Tokenizer {
        // one folder per call: tests run in parallel threads of one process
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ferrotune-encin-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a",
            "dog", "##s", "ran",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), (i as u64).into()))
            .collect();
        let special = |id: usize| {
            serde_json::json!({"id": id, "content": words[id], "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let tok = serde_json::json!({
            "version": "1.0",
            "truncation": {"max_length": 8, "strategy": "LongestFirst", "stride": 0, "direction": "Right"},
            "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                        "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
            "added_tokens": [special(0), special(1), special(2), special(3), special(4)],
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                           "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
                "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                                   "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let t = Tokenizer::from_hf_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        t
    }

    #[test]
    fn single_texts_and_pairs_get_special_tokens_and_type_ids() {
        let enc = bert_like().input_encoder(32, false).unwrap();
        let one = enc.encode("The cats sat", None).unwrap();
        assert_eq!(one.ids, [2, 5, 6, 12, 7, 3]);
        assert_eq!(one.type_ids, [0; 6]);
        let two = enc.encode("a dog", Some("ran on the mat")).unwrap();
        assert_eq!(two.ids, [2, 10, 11, 3, 13, 8, 5, 9, 3]);
        assert_eq!(two.type_ids, [0, 0, 0, 0, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn truncation_is_longest_first_and_counts_special_tokens() {
        let enc = bert_like().input_encoder(7, false).unwrap();
        let one = enc.encode("the cat sat on the mat", None).unwrap();
        assert_eq!(one.ids, [2, 5, 6, 7, 8, 5, 3]);
        // 4 + 2 words and 3 special tokens: the longer text loses its tail first.
        let two = enc.encode("the cat sat on", Some("a dog")).unwrap();
        assert_eq!(two.ids, [2, 5, 6, 3, 10, 11, 3]);
        assert!(bert_like().input_encoder(3, false).is_err());
    }

    #[test]
    fn lowercasing_is_optional() {
        // The tokenizer lowercases anyway; the flag must not break anything that is already lower.
        let enc = bert_like().input_encoder(16, true).unwrap();
        assert_eq!(enc.encode("THE MAT", None).unwrap().ids, [2, 5, 9, 3]);
    }
}
