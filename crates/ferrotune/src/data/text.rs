//! Tokenization for encoder and encoder-decoder inputs: the model's own special tokens around
//! the text (`[CLS] text [SEP]` for BERT, `text </s>` for T5), words to sub-word pieces, and the
//! token facts the pre-training objectives need (special ids, the mask id, word continuations).
//!
//! The special tokens come from the tokenizer's post-processor, found once by encoding a probe
//! text with and without them, so they are exactly what transformers' `tokenizer(text)` adds.
//! The post-processor is applied by hand (prefix + content + suffix) so that truncation cuts the
//! content and keeps the special tokens, as transformers' `truncation=True` does. A
//! `tokenizer.json` may carry its own truncation and padding settings (sentence-transformers
//! saves `max_length: 128` and fixed padding); they are not applied here.
use std::borrow::Cow;

use tokenizers::models::ModelWrapper;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A tokenizer seen as encoder input: content ids, the special tokens around them, which ids are
/// special, and which pieces continue a word.
pub struct TextEncoder {
    inner: tokenizers::Tokenizer,
    /// Ids the post-processor puts before / after a single sequence.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Special tokens around a seq2seq encoder input: the post-processor's, else BOS (if the
    /// model adds one) before it and EOS after it (T5's inputs end with `</s>`).
    seq2seq_prefix: Vec<u32>,
    seq2seq_suffix: Vec<u32>,
    /// `special[id]`: an added token marked special (`[CLS]`, `[PAD]`, `<extra_id_0>`, ...),
    /// never selected for masking.
    special: Vec<bool>,
    /// The WordPiece continuation prefix (`##`) when the model is WordPiece.
    continuation: Option<String>,
    vocab_size: usize,
    eos: Option<u32>,
    pad: Option<u32>,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("prefix", &self.prefix)
            .field("suffix", &self.suffix)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::msg(format!(
        "tokenizer: encoding failed: {}",
        crate::error::first_line(&e.to_string())
    ))
}

impl TextEncoder {
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let mut inner = tok.inner().clone();
        inner
            .with_truncation(None)
            .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
        inner.with_padding(None);
        let vocab_size = inner.get_vocab_size(true);
        let mut special = vec![false; vocab_size];
        for (id, t) in inner.get_added_tokens_decoder() {
            if t.special {
                if let Some(s) = special.get_mut(id as usize) {
                    *s = true;
                }
            }
        }
        let continuation = match inner.get_model() {
            ModelWrapper::WordPiece(wp) => Some(wp.continuing_subword_prefix.clone()),
            _ => None,
        };
        let mut enc = TextEncoder {
            inner,
            prefix: Vec::new(),
            suffix: Vec::new(),
            seq2seq_prefix: Vec::new(),
            seq2seq_suffix: Vec::new(),
            special,
            continuation,
            vocab_size,
            eos: tok.eos_ids().first().copied(),
            pad: tok.pad_id(),
        };
        if enc.inner.get_post_processor().is_some() {
            (enc.prefix, enc.suffix) = enc.probe_specials()?;
            enc.seq2seq_prefix = enc.prefix.clone();
            enc.seq2seq_suffix = enc.suffix.clone();
        } else {
            // No post-processor (GGUF tokenizers): the BOS the model file asks for, and EOS
            // after a seq2seq input (as `data::encode_seq2seq_pair`).
            if tok.add_bos() {
                enc.prefix.extend(tok.bos_id());
            }
            enc.seq2seq_prefix = enc.prefix.clone();
            enc.seq2seq_suffix.extend(enc.eos);
        }
        Ok(enc)
    }

    /// What the post-processor adds around a single sequence: encode a probe text with and
    /// without special tokens and take what is around the plain ids.
    fn probe_specials(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        for probe in ["a", "the", "0", "x", "hello"] {
            let plain = self.encode_raw(probe, false)?;
            let full = self.encode_raw(probe, true)?;
            if plain.is_empty() || full.len() < plain.len() {
                continue;
            }
            if let Some(at) =
                (0..=full.len() - plain.len()).find(|&i| full[i..].starts_with(&plain))
            {
                return Ok((full[..at].to_vec(), full[at + plain.len()..].to_vec()));
            }
        }
        Err(Error::msg(
            "tokenizer: cannot tell which special tokens its post-processor adds around a text",
        ))
    }

    fn encode_raw(&self, text: &str, specials: bool) -> Result<Vec<u32>> {
        let enc = crate::error::catch_panic(|| self.inner.encode_fast(text, specials))
            .map_err(tok_err)?
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids of `text` without special tokens.
    pub fn content(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_raw(text, false)
    }

    /// Special tokens the model puts before and after one text.
    pub fn prefix(&self) -> &[u32] {
        &self.prefix
    }

    pub fn suffix(&self) -> &[u32] {
        &self.suffix
    }

    /// Special tokens before and after a seq2seq encoder input.
    pub fn seq2seq_specials(&self) -> (&[u32], &[u32]) {
        (&self.seq2seq_prefix, &self.seq2seq_suffix)
    }

    /// Number of special tokens around one text.
    pub fn n_specials(&self) -> usize {
        self.prefix.len() + self.suffix.len()
    }

    /// `prefix + content + suffix`.
    pub fn wrap(&self, content: &[u32]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(content.len() + self.n_specials());
        ids.extend(&self.prefix);
        ids.extend(content);
        ids.extend(&self.suffix);
        ids
    }

    /// Pre-tokenized words to pieces, as transformers' `tokenizer(words,
    /// is_split_into_words=True)`: the ids (no special tokens) and the word each piece belongs to.
    pub fn words(&self, words: &[&str]) -> Result<(Vec<u32>, Vec<usize>)> {
        let input: Vec<Cow<str>> = words.iter().map(|w| Cow::Borrowed(*w)).collect();
        // `encode`, not `encode_fast`: the fast path leaves out the word ids.
        let enc = crate::error::catch_panic(|| self.inner.encode(input, false))
            .map_err(tok_err)?
            .map_err(tok_err)?;
        let mut word_of = Vec::with_capacity(enc.len());
        for (k, w) in enc.get_word_ids().iter().enumerate() {
            let w = w.ok_or_else(|| {
                Error::msg(format!(
                    "tokenizer: piece {k} of pre-tokenized words belongs to no word"
                ))
            })?;
            word_of.push(w as usize);
        }
        Ok((enc.get_ids().to_vec(), word_of))
    }

    /// Whether `id` is one of the tokenizer's special tokens (or outside the vocabulary).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    /// Ids, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The mask token's id: `[MASK]` (BERT) or `<mask>` (RoBERTa), a special token.
    pub fn mask_id(&self) -> Option<u32> {
        ["[MASK]", "<mask>"]
            .iter()
            .filter_map(|t| self.inner.token_to_id(t))
            .find(|&id| self.is_special(id))
    }

    /// Per id, whether the piece continues the word before it (WordPiece `##` pieces); `None`
    /// when the tokenizer is not WordPiece.
    pub fn continuation_table(&self) -> Option<Vec<bool>> {
        let prefix = self.continuation.as_deref()?;
        Some(
            (0..self.vocab_size as u32)
                .map(|id| {
                    !self.is_special(id)
                        && self
                            .inner
                            .id_to_token(id)
                            .is_some_and(|t| t.starts_with(prefix) && t.len() > prefix.len())
                })
                .collect(),
        )
    }
}
