//! Incremental detokenization for streaming output.
//!
//! Decoding token by token and concatenating is wrong in two ways: a character split across
//! byte-fallback tokens (`<0xF0>` `<0x9F>` ...) or byte-level tokens decodes to U+FFFD until its
//! last byte arrives, and decoders that depend on context (SentencePiece's leading-space strip)
//! give a different text for a token alone than inside a sequence. So we decode a small window
//! twice — without and with the new tokens — and emit the difference once it no longer ends in
//! an incomplete character (the approach of text-generation-inference).
use super::Tokenizer;
use crate::Result;

/// Created by [`Tokenizer::stream`]. Push ids as they are generated; each push returns the new
/// text, if any is complete. Call [`TokenStream::finish`] at the end for anything held back.
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window both decodes begin at (so context-dependent decoders agree).
    prefix_offset: usize,
    /// End of the text already emitted.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl<'a> TokenStream<'a> {
    pub(crate) fn new(tok: &'a Tokenizer) -> Self {
        TokenStream {
            tok,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens: false,
        }
    }

    /// Leave special tokens (e.g. `<|im_start|>`) out of the streamed text. Default: kept.
    pub fn skip_special_tokens(mut self, skip: bool) -> Self {
        self.skip_special_tokens = skip;
        self
    }

    /// Add one generated id. Returns the text it completes, or `None` while a character is still
    /// incomplete (or the token decodes to nothing).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let delta = match full.strip_prefix(prefix.as_str()) {
            Some(d) => d.to_string(),
            // A decoder rewrote the earlier text (should not happen with the decoders we build);
            // emit from the first char boundary past the old text so nothing is lost or broken.
            None => {
                let mut at = prefix.len();
                while !full.is_char_boundary(at) {
                    at += 1;
                }
                full[at..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Keep the buffer from growing with the whole generation.
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(Some(delta))
    }

    /// Text of tokens pushed but not yet emitted (an incomplete character at the very end is
    /// emitted as U+FFFD, as a full decode would).
    pub fn finish(self) -> Result<Option<String>> {
        let prefix = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok(full
            .strip_prefix(prefix.as_str())
            .filter(|d| !d.is_empty())
            .map(str::to_string))
    }
}
