//! JSON mode: `response_format: {"type": "json_object"}` constrained so the output parses.
//!
//! [`JsonConstraint`] is a [`TokenConstraint`] that allows only tokens keeping the generated
//! text a prefix of a JSON object (RFC 8259, top level `{...}`), and reports completion as soon
//! as that object closes. It works on bytes, not strings: byte-level BPE tokens can be pieces of
//! a UTF-8 character, so UTF-8 is validated inside strings by the automaton itself.
//!
//! How to use it:
//! - once per model: [`JsonVocab::new`] (spells every token id as bytes, builds the token
//!   tries; ~0.1 s for a 49k vocabulary);
//! - per request: [`JsonConstraint::with_vocab`] (cheap: an `Arc` clone and a few small
//!   buffers). [`JsonConstraint::new`] does both and is meant for tests and one-off use.
//!
//! Per decode step, [`TokenConstraint::mask`] walks a prefix tree of the token spellings with
//! the byte automaton ([`JsonState`], 16 bytes, `Copy`), so a prefix shared by many tokens is
//! checked once and a refused byte prunes its whole subtree. Inside a string, where almost every
//! token is allowed, a precomputed set of "plain" tokens (no `"`, `\`, control byte, complete
//! UTF-8) is taken as is and only the other tokens are walked.
//!
//! Beyond RFC 8259, the automaton refuses what would let a model loop or what `serde_json`
//! refuses, so that every output it completes parses there:
//! - runs of whitespace longer than [`MAX_WS_RUN`] bytes, nesting deeper than [`MAX_DEPTH`];
//! - numbers with more than [`MAX_NUM_DIGITS`] digits in the integer or fraction part or more
//!   than [`MAX_EXP_DIGITS`] exponent digits (so no number overflows an `f64`: serde_json
//!   refuses `1e400`);
//! - `\uXXXX` escapes that are lone surrogates (serde_json refuses them too).
//!
//! Every state the automaton can reach can still be completed with single-byte tokens (it is
//! "live"); [`JsonVocab::new`] checks that the vocabulary has those, so a step never ends with
//! every token masked. Special tokens (EOS, chat markers) are never allowed inside the object;
//! when it closes, [`TokenConstraint::is_complete`] turns true and the scheduler ends the
//! sequence. If `max_tokens` cuts the output first, it is incomplete (OpenAI documents the same).
use std::sync::Arc;

use super::TokenConstraint;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Most containers open at once (the top-level object counts). At most 64 (a `u64` stack).
pub const MAX_DEPTH: u8 = 32;
/// Most consecutive whitespace bytes outside strings: enough for pretty-printed output a few
/// levels deep, but a model cannot loop on spaces or newlines.
pub const MAX_WS_RUN: u8 = 20;
/// Most digits in a number's integer part, and in its fraction part.
pub const MAX_NUM_DIGITS: u8 = 24;
/// Most exponent digits: with [`MAX_NUM_DIGITS`] this keeps every number below 1e124.
pub const MAX_EXP_DIGITS: u8 = 2;

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Where the automaton is. The `JsonState` fields `n` and `aux` hold the counter and detail
/// the mode needs (see each variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the top-level `{`.
    Start,
    /// After `{`: a key or `}`.
    ObjFirst,
    /// After `,` in an object: a key.
    ObjKey,
    /// After a key: `:`.
    Colon,
    /// After `:`, or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    ArrFirst,
    /// After a value: `,` or the closing bracket of the open container.
    After,
    /// Inside a string, at a character boundary (`key`: it is an object key).
    Str,
    /// Inside a multi-byte UTF-8 character: `n` continuation bytes left, the next one in the
    /// range `aux` names (see [`utf8_cont_ok`]).
    Utf8,
    /// After `\` in a string.
    Escape,
    /// In `\uXXXX`: `n` hex digits read; `aux` 1: the first was `D`, 2: a high surrogate
    /// (`D800`-`DBFF`) that a `\uDC00`-`\uDFFF` must follow.
    Hex,
    /// After a high surrogate escape: `\` of the low one.
    LowBackslash,
    /// After a high surrogate escape and `\`: `u`.
    LowU,
    /// In the low surrogate's hex digits: `n` read (`D`, then `C`-`F`, then two more).
    HexLow,
    /// After `-`.
    NumMinus,
    /// Integer part `0` (no more digits may follow).
    NumZero,
    /// Integer part of `n` digits, the first not `0`.
    NumInt,
    /// After `.`.
    NumDot,
    /// Fraction of `n` digits.
    NumFrac,
    /// After `e` / `E`.
    NumE,
    /// After the exponent's sign.
    NumESign,
    /// Exponent of `n` digits.
    NumExp,
    /// In `true` / `false` / `null` (`aux` indexes [`LITERALS`]), `n` bytes matched.
    Lit,
    /// The top-level object closed; only whitespace may follow.
    Done,
}

/// The byte-level JSON-object automaton: small and `Copy`, so the token-trie walk keeps one per
/// trie depth. [`JsonState::step`] returns `None` for a byte no valid JSON object can continue
/// with at this point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonState {
    mode: Mode,
    /// The current string is an object key (it is followed by `:`, not by a value's successor).
    key: bool,
    /// Containers open.
    depth: u8,
    /// Consecutive whitespace bytes just read outside strings.
    ws: u8,
    n: u8,
    aux: u8,
    /// Bit `i`: the container at depth `i + 1` is an array (else an object).
    stack: u64,
}

impl Default for JsonState {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonState {
    /// Before any byte.
    pub const fn new() -> Self {
        JsonState {
            mode: Mode::Start,
            key: false,
            depth: 0,
            ws: 0,
            n: 0,
            aux: 0,
            stack: 0,
        }
    }

    /// The top-level object has closed.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Inside a string at a character boundary: every "plain" token is allowed here.
    fn in_plain_string(&self) -> bool {
        self.mode == Mode::Str
    }

    /// The state after all of `bytes`, or `None` if one is refused.
    pub fn feed(self, bytes: &[u8]) -> Option<Self> {
        bytes.iter().try_fold(self, |s, &b| s.step(b))
    }

    /// The state after byte `b`, or `None` if no JSON object can continue with it here.
    #[inline]
    pub fn step(mut self, b: u8) -> Option<Self> {
        use Mode::*;
        match self.mode {
            Str => self.string_byte(b),
            Utf8 => {
                if !utf8_cont_ok(self.aux, b) {
                    return None;
                }
                self.aux = 0;
                self.n -= 1;
                if self.n == 0 {
                    self.mode = Str;
                }
                Some(self)
            }
            Escape => {
                match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.mode = Str,
                    b'u' => self.set(Hex, 0, 0),
                    _ => return None,
                }
                Some(self)
            }
            Hex => {
                let v = hex_value(b)?;
                match self.n {
                    0 => self.aux = u8::from(v == 0xD),
                    // D8-DB: a high surrogate, a low one must follow; DC-DF: a lone low
                    // surrogate, which serde_json refuses.
                    1 if self.aux == 1 => {
                        if v >= 0xC {
                            return None;
                        }
                        self.aux = if v >= 8 { 2 } else { 0 };
                    }
                    _ => {}
                }
                self.n += 1;
                if self.n == 4 {
                    self.mode = if self.aux == 2 { LowBackslash } else { Str };
                }
                Some(self)
            }
            LowBackslash => (b == b'\\').then(|| {
                self.mode = LowU;
                self
            }),
            LowU => (b == b'u').then(|| {
                self.set(HexLow, 0, 0);
                self
            }),
            HexLow => {
                let v = hex_value(b)?;
                let ok = match self.n {
                    0 => v == 0xD,
                    1 => v >= 0xC,
                    _ => true,
                };
                if !ok {
                    return None;
                }
                self.n += 1;
                if self.n == 4 {
                    self.mode = Str;
                }
                Some(self)
            }
            NumMinus => match b {
                b'0' => Some(self.with(NumZero, 0)),
                b'1'..=b'9' => Some(self.with(NumInt, 1)),
                _ => None,
            },
            NumZero => match b {
                b'.' => Some(self.with(NumDot, 0)),
                b'e' | b'E' => Some(self.with(NumE, 0)),
                _ => self.end_value(b),
            },
            NumInt => match b {
                b'0'..=b'9' => self.more_digits(MAX_NUM_DIGITS),
                b'.' => Some(self.with(NumDot, 0)),
                b'e' | b'E' => Some(self.with(NumE, 0)),
                _ => self.end_value(b),
            },
            NumDot => b.is_ascii_digit().then(|| self.with(NumFrac, 1)),
            NumFrac => match b {
                b'0'..=b'9' => self.more_digits(MAX_NUM_DIGITS),
                b'e' | b'E' => Some(self.with(NumE, 0)),
                _ => self.end_value(b),
            },
            NumE => match b {
                b'+' | b'-' => Some(self.with(NumESign, 0)),
                b'0'..=b'9' => Some(self.with(NumExp, 1)),
                _ => None,
            },
            NumESign => b.is_ascii_digit().then(|| self.with(NumExp, 1)),
            NumExp => match b {
                b'0'..=b'9' => self.more_digits(MAX_EXP_DIGITS),
                _ => self.end_value(b),
            },
            Lit => {
                let word = LITERALS[self.aux as usize];
                if word[self.n as usize] != b {
                    return None;
                }
                self.n += 1;
                if self.n as usize == word.len() {
                    self.mode = After;
                }
                Some(self)
            }
            Start | ObjFirst | ObjKey | Colon | Value | ArrFirst | After | Done => {
                self.structural(b)
            }
        }
    }

    fn set(&mut self, mode: Mode, n: u8, aux: u8) {
        self.mode = mode;
        self.n = n;
        self.aux = aux;
    }

    fn with(mut self, mode: Mode, n: u8) -> Self {
        self.mode = mode;
        self.n = n;
        self
    }

    fn more_digits(mut self, max: u8) -> Option<Self> {
        (self.n < max).then(|| {
            self.n += 1;
            self
        })
    }

    /// A byte that cannot continue the number ends it (numbers have no delimiter of their own);
    /// it is then read as what follows a value.
    fn end_value(mut self, b: u8) -> Option<Self> {
        self.mode = Mode::After;
        self.structural(b)
    }

    fn top_is_array(&self) -> bool {
        self.depth > 0 && (self.stack >> (self.depth - 1)) & 1 == 1
    }

    /// Bytes between tokens of the JSON grammar (not in a string, number or literal).
    fn structural(mut self, b: u8) -> Option<Self> {
        use Mode::*;
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if self.ws >= MAX_WS_RUN {
                return None;
            }
            self.ws += 1;
            return Some(self);
        }
        self.ws = 0;
        match (self.mode, b) {
            (Start, b'{') => self.open(false),
            (ObjFirst | After, b'}') => self.close(false),
            (ArrFirst | After, b']') => self.close(true),
            (ObjFirst | ObjKey, b'"') => {
                self.mode = Str;
                self.key = true;
                Some(self)
            }
            (Colon, b':') => Some(self.with(Value, 0)),
            (After, b',') => {
                let next = if self.top_is_array() { Value } else { ObjKey };
                Some(self.with(next, 0))
            }
            (Value | ArrFirst, _) => self.value_start(b),
            _ => None,
        }
    }

    fn value_start(mut self, b: u8) -> Option<Self> {
        use Mode::*;
        match b {
            b'"' => {
                self.mode = Str;
                self.key = false;
                Some(self)
            }
            b'{' => self.open(false),
            b'[' => self.open(true),
            b'-' => Some(self.with(NumMinus, 0)),
            b'0' => Some(self.with(NumZero, 0)),
            b'1'..=b'9' => Some(self.with(NumInt, 1)),
            b't' | b'f' | b'n' => {
                let which = match b {
                    b't' => 0,
                    b'f' => 1,
                    _ => 2,
                };
                self.set(Lit, 1, which);
                Some(self)
            }
            _ => None,
        }
    }

    fn open(mut self, array: bool) -> Option<Self> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        let bit = 1u64 << self.depth;
        if array {
            self.stack |= bit;
        } else {
            self.stack &= !bit;
        }
        self.depth += 1;
        Some(self.with(
            if array {
                Mode::ArrFirst
            } else {
                Mode::ObjFirst
            },
            0,
        ))
    }

    fn close(mut self, array: bool) -> Option<Self> {
        if self.depth == 0 || self.top_is_array() != array {
            return None;
        }
        self.depth -= 1;
        let next = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::After
        };
        Some(self.with(next, 0))
    }

    /// A byte inside a string at a character boundary: JSON forbids raw control bytes there,
    /// and the text must stay valid UTF-8 (RFC 3629's table: no overlong forms, no surrogates,
    /// nothing above U+10FFFF).
    fn string_byte(mut self, b: u8) -> Option<Self> {
        use Mode::*;
        let (n, aux) = match b {
            0x00..=0x1F => return None,
            b'"' => {
                self.mode = if self.key { Colon } else { After };
                return Some(self);
            }
            b'\\' => {
                self.mode = Escape;
                return Some(self);
            }
            0x20..=0x7F => return Some(self),
            0xC2..=0xDF => (1, 0),
            0xE0 => (2, 1),
            0xE1..=0xEC | 0xEE | 0xEF => (2, 0),
            0xED => (2, 2),
            0xF0 => (3, 3),
            0xF1..=0xF3 => (3, 0),
            0xF4 => (3, 4),
            _ => return None,
        };
        self.set(Utf8, n, aux);
        Some(self)
    }
}

/// Whether `b` may be the next continuation byte; `range` is 0 for any (80-BF), else the
/// narrower range the lead byte allows for the first one (E0: A0-BF, ED: 80-9F, F0: 90-BF,
/// F4: 80-8F).
fn utf8_cont_ok(range: u8, b: u8) -> bool {
    match range {
        0 => (0x80..=0xBF).contains(&b),
        1 => (0xA0..=0xBF).contains(&b),
        2 => (0x80..=0x9F).contains(&b),
        3 => (0x90..=0xBF).contains(&b),
        _ => (0x80..=0x8F).contains(&b),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Bytes that must each be a whole token: with them every automaton state can be completed
/// (close a string with `"`, a container with `}` / `]`, a number with a digit, a literal with
/// its next letter, a `\u` escape with `0`, a surrogate pair with `\`, `u`, `d`, `c`), so a
/// mask never refuses every token.
const REQUIRED_BYTES: &[u8] = b"{}[]\":,\\0123456789-+.etruefalsnabcd";

/// One node of a token prefix tree, stored in preorder: a node's subtree is the nodes after it
/// up to `end`, so a refused byte skips it with one jump and the walk reads memory in order.
#[derive(Clone, Copy, Debug)]
struct Node {
    byte: u8,
    /// Length of the prefix this node spells (1 for the root's children).
    depth: u16,
    /// One past the last node of this subtree.
    end: u32,
    /// The tokens spelled exactly by this node are `tokens[tok_start..next node's tok_start]`.
    tok_start: u32,
}

#[derive(Debug, Default)]
struct Trie {
    /// Preorder, plus a sentinel whose `tok_start` is `tokens.len()`.
    nodes: Vec<Node>,
    tokens: Vec<u32>,
    /// The longest token, in bytes (the walk keeps one state per depth).
    max_len: usize,
}

impl Trie {
    /// `items`: (token bytes, id), non-empty bytes.
    fn build(mut items: Vec<(&[u8], u32)>) -> Trie {
        items.sort_unstable();
        let mut nodes: Vec<Node> = Vec::new();
        let mut tokens = Vec::with_capacity(items.len());
        // Nodes on the path to the previous token, by depth - 1.
        let mut path: Vec<usize> = Vec::new();
        let mut prev: &[u8] = &[];
        let mut max_len = 0;
        for (bytes, id) in items {
            let common = bytes.iter().zip(prev).take_while(|(a, b)| a == b).count();
            while path.len() > common {
                let done = path.pop().expect("path is longer than `common`");
                nodes[done].end = nodes.len() as u32;
            }
            for (k, &b) in bytes.iter().enumerate().skip(common) {
                path.push(nodes.len());
                nodes.push(Node {
                    byte: b,
                    depth: (k + 1) as u16,
                    end: 0,
                    tok_start: tokens.len() as u32,
                });
            }
            // Sorted order: each token ends at the newest node, so the tokens of a node are
            // contiguous and in node order.
            tokens.push(id);
            max_len = max_len.max(bytes.len());
            prev = bytes;
        }
        for done in path {
            nodes[done].end = nodes.len() as u32;
        }
        nodes.push(Node {
            byte: 0,
            depth: 0,
            end: 0,
            tok_start: tokens.len() as u32,
        });
        Trie {
            nodes,
            tokens,
            max_len,
        }
    }

    /// Set the bit of every token whose bytes `start` accepts. `states` is scratch space.
    fn walk(&self, start: JsonState, states: &mut Vec<JsonState>, allowed: &mut [u64]) {
        states.clear();
        states.resize(self.max_len + 1, start);
        let real = self.nodes.len() - 1;
        let mut i = 0;
        while i < real {
            let node = self.nodes[i];
            let d = node.depth as usize;
            match states[d - 1].step(node.byte) {
                Some(s) => {
                    states[d] = s;
                    let to = self.nodes[i + 1].tok_start as usize;
                    for &t in &self.tokens[node.tok_start as usize..to] {
                        allowed[t as usize / 64] |= 1 << (t % 64);
                    }
                    i += 1;
                }
                None => i = node.end as usize,
            }
        }
    }
}

/// Every token id's bytes and the tries the mask walks: built once per model by
/// [`JsonVocab::new`], shared by all requests' [`JsonConstraint`]s.
#[derive(Debug)]
pub struct JsonVocab {
    /// Token `i`'s bytes are `bytes[offsets[i]..offsets[i + 1]]`; empty for a token that is
    /// never allowed inside the object (special, added, empty, or not spelled the same alone).
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// All allowed tokens.
    all: Trie,
    /// Tokens that are not plain string content (see [`JsonVocab::plain`]).
    rest: Trie,
    /// Bitset of tokens whose bytes contain no `"`, `\` or control byte and are complete UTF-8:
    /// inside a string at a character boundary each is allowed and leaves it there.
    plain: Vec<u64>,
    /// Ids that end generation: allowed only once the object is complete.
    eos: Vec<u32>,
}

impl JsonVocab {
    /// Spell every token of `tok` as bytes and build the tries (once per model; ~0.1 s for
    /// SmolLM2's 49k tokens). Fails for a tokenizer whose tokens do not map to bytes one by
    /// one (WordPiece, no decoder) or that lacks a token for a byte JSON needs (T5 has no `{`).
    pub fn new(tok: &Tokenizer) -> Result<Arc<JsonVocab>> {
        let spelling = Spelling::of(tok)?;
        let vocab = tok.vocab_size();
        let mut never: Vec<bool> = vec![false; vocab];
        for id in tok
            .inner()
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .chain(tok.eos_ids().iter().copied())
            .chain(tok.bos_id())
            .chain(tok.pad_id())
        {
            if let Some(slot) = never.get_mut(id as usize) {
                *slot = true;
            }
        }
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(vocab + 1);
        offsets.push(0u32);
        let mut mismatched = 0usize;
        let mut spelled = 0usize;
        for id in 0..vocab as u32 {
            if !never[id as usize] {
                if let Some(piece) = tok.id_to_token(id) {
                    let b = spelling.bytes(&piece);
                    // The spelling must be what decoding gives (up to the one leading space a
                    // SentencePiece decoder strips from the start of the text); a token that
                    // decodes otherwise is left out rather than risk text the automaton did
                    // not check.
                    let decoded = tok.decode(&[id], false)?;
                    let expect = String::from_utf8_lossy(&b);
                    if !b.is_empty()
                        && (decoded == expect || expect.strip_prefix(' ') == Some(&decoded))
                    {
                        bytes.extend_from_slice(&b);
                        spelled += 1;
                    } else if !b.is_empty() {
                        mismatched += 1;
                    }
                }
            }
            if bytes.len() > u32::MAX as usize {
                return Err(Error::msg("JSON mode: the vocabulary spells over 4 GiB"));
            }
            offsets.push(bytes.len() as u32);
        }
        // A few odd tokens may be left out; many means we read the decoder wrongly.
        if mismatched > spelled / 100 {
            return Err(Error::msg(format!(
                "JSON mode: {mismatched} of {} tokens do not decode to the bytes expected from the tokenizer's decoder ({}); this tokenizer is not supported",
                mismatched + spelled,
                spelling.name()
            )));
        }
        let token = |id: usize| &bytes[offsets[id] as usize..offsets[id + 1] as usize];
        for &b in REQUIRED_BYTES {
            if !(0..vocab).any(|id| token(id) == [b]) {
                return Err(Error::msg(format!(
                    "JSON mode: the tokenizer has no token for `{}`, so it cannot always complete a JSON object",
                    b as char
                )));
            }
        }
        let mut plain = vec![0u64; vocab.div_ceil(64)];
        let mut all_items = Vec::new();
        let mut rest_items = Vec::new();
        for id in 0..vocab {
            let b = token(id);
            if b.is_empty() {
                continue;
            }
            all_items.push((b, id as u32));
            let is_plain = std::str::from_utf8(b).is_ok()
                && b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\');
            if is_plain {
                plain[id / 64] |= 1 << (id % 64);
            } else {
                rest_items.push((b, id as u32));
            }
        }
        let all = Trie::build(all_items);
        let rest = Trie::build(rest_items);
        Ok(Arc::new(JsonVocab {
            all,
            rest,
            plain,
            eos: tok.eos_ids().to_vec(),
            bytes,
            offsets,
        }))
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The bytes token `id` adds to the text; empty if it is never allowed inside the object.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.vocab_size() {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// How a token's vocabulary string becomes bytes, read from the tokenizer's decoder.
enum Spelling {
    /// GPT-2 byte-level BPE: each char stands for one byte.
    ByteLevel(std::collections::HashMap<char, u8>),
    /// SentencePiece-style: string replacements (`▁` -> space) and, with byte fallback,
    /// `<0xNN>` tokens for single bytes.
    Pieces {
        replace: Vec<(String, String)>,
        byte_fallback: bool,
    },
}

impl Spelling {
    fn of(tok: &Tokenizer) -> Result<Spelling> {
        let unsupported = |what: &str| {
            Error::msg(format!(
                "JSON mode: unsupported tokenizer decoder ({what}); byte-level BPE and SentencePiece-style tokenizers are supported"
            ))
        };
        let Some(decoder) = tok.inner().get_decoder() else {
            return Err(unsupported("none: tokens would be joined with spaces"));
        };
        // The decoder's own fields are private; its serialized form (tokenizer.json's
        // `decoder`) names every step.
        let json = serde_json::to_value(decoder)
            .map_err(|e| Error::msg(format!("JSON mode: reading the decoder: {e}")))?;
        let steps: Vec<&serde_json::Value> = match json.get("decoders") {
            Some(serde_json::Value::Array(list)) => list.iter().collect(),
            _ => vec![&json],
        };
        fn kind(v: &serde_json::Value) -> &str {
            v.get("type").and_then(|t| t.as_str()).unwrap_or("")
        }
        if steps.iter().any(|s| kind(s) == "ByteLevel") {
            return Ok(Spelling::ByteLevel(gpt2_char_bytes()));
        }
        let mut replace = Vec::new();
        let mut byte_fallback = false;
        for s in steps {
            match kind(s) {
                "Replace" => {
                    let pattern = s.pointer("/pattern/String").and_then(|p| p.as_str());
                    let content = s.get("content").and_then(|c| c.as_str());
                    match (pattern, content) {
                        (Some(p), Some(c)) if !p.is_empty() => {
                            replace.push((p.to_string(), c.to_string()))
                        }
                        _ => return Err(unsupported("a Replace that is not a plain string")),
                    }
                }
                "Metaspace" => {
                    let r = s.get("replacement").and_then(|r| r.as_str()).unwrap_or("▁");
                    replace.push((r.to_string(), " ".to_string()));
                }
                "ByteFallback" => byte_fallback = true,
                // Fuse joins the tokens; Strip trims the ends of the whole text (checked per
                // token against the decoder in `JsonVocab::new`).
                "Fuse" | "Strip" => {}
                other => return Err(unsupported(other)),
            }
        }
        Ok(Spelling::Pieces {
            replace,
            byte_fallback,
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Spelling::ByteLevel(_) => "byte-level",
            Spelling::Pieces { .. } => "SentencePiece-style",
        }
    }

    fn bytes(&self, piece: &str) -> Vec<u8> {
        match self {
            // As the tokenizers crate's ByteLevel decoder: a token with a char outside the
            // alphabet (an added token's text) stands for its own UTF-8.
            Spelling::ByteLevel(map) => piece
                .chars()
                .map(|c| map.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| piece.as_bytes().to_vec()),
            Spelling::Pieces {
                replace,
                byte_fallback,
            } => {
                if *byte_fallback {
                    if let Some(b) = byte_token(piece) {
                        return vec![b];
                    }
                }
                let mut s = piece.to_string();
                for (from, to) in replace {
                    s = s.replace(from.as_str(), to);
                }
                s.into_bytes()
            }
        }
    }
}

/// `<0xNN>` -> NN, as the ByteFallback decoder reads it.
fn byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's printable-char -> byte table (`bytes_to_unicode` inverted): printable Latin-1 bytes
/// stand for themselves, the other 68 bytes for U+0100 onwards, in byte order.
fn gpt2_char_bytes() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).expect("U+0000..U+0143 are chars"), b)
        })
        .collect()
}

/// `response_format: {"type": "json_object"}`: allows only tokens that keep the output a prefix
/// of a JSON object; complete once the object closes. Build the [`JsonVocab`] once per model and
/// call [`JsonConstraint::with_vocab`] per request.
pub struct JsonConstraint {
    vocab: Arc<JsonVocab>,
    state: JsonState,
    /// A token the mask refused was accepted (the scheduler did not apply the mask): the text
    /// can no longer become JSON, so the sequence is reported complete to end it.
    broken: bool,
    /// Scratch for [`TokenConstraint::mask`]: the allowed-token bitset and one automaton
    /// state per trie depth (kept to avoid allocating per step).
    allowed: Vec<u64>,
    states: Vec<JsonState>,
}

impl JsonConstraint {
    /// Build the vocabulary and a constraint on it: costly (every token is spelled); a server
    /// builds [`JsonVocab::new`] once per model and calls [`JsonConstraint::with_vocab`].
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        Ok(Self::with_vocab(JsonVocab::new(tok)?))
    }

    /// A fresh constraint (nothing generated yet) on a shared vocabulary: cheap, per request.
    pub fn with_vocab(vocab: Arc<JsonVocab>) -> Self {
        let words = vocab.plain.len();
        JsonConstraint {
            vocab,
            state: JsonState::new(),
            broken: false,
            allowed: vec![0; words],
            states: Vec::new(),
        }
    }

    /// The automaton's state after the tokens accepted so far.
    pub fn state(&self) -> &JsonState {
        &self.state
    }

    /// Fill `self.allowed` with the tokens that may come next.
    fn compute_allowed(&mut self) {
        let vocab = &*self.vocab;
        if self.broken {
            self.allowed.fill(0);
        } else if self.state.in_plain_string() {
            self.allowed.copy_from_slice(&vocab.plain);
            vocab
                .rest
                .walk(self.state, &mut self.states, &mut self.allowed);
        } else {
            self.allowed.fill(0);
            vocab
                .all
                .walk(self.state, &mut self.states, &mut self.allowed);
        }
        if self.broken || self.state.is_complete() {
            for &id in &vocab.eos {
                if (id as usize) < vocab.vocab_size() {
                    self.allowed[id as usize / 64] |= 1 << (id % 64);
                }
            }
        }
    }
}

impl TokenConstraint for JsonConstraint {
    fn mask(&mut self, logits: &mut [f32]) {
        self.compute_allowed();
        // Only after completion (or a broken sequence) in a vocabulary with no EOS can nothing
        // be allowed; the scheduler has ended the sequence by then. Leave the logits alone
        // rather than hand it a row with no finite entry.
        if self.allowed.iter().all(|&w| w == 0) {
            return;
        }
        // Ids past the tokenizer's vocabulary (a model's padded embedding rows) are never
        // allowed.
        for (chunk, i) in logits.chunks_mut(64).zip(0..) {
            let word = self.allowed.get(i).copied().unwrap_or(0);
            if word == u64::MAX {
                continue;
            }
            for (j, l) in chunk.iter_mut().enumerate() {
                if word >> j & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    fn accept(&mut self, id: u32) {
        if self.broken || (self.state.is_complete() && self.vocab.eos.contains(&id)) {
            return;
        }
        match self.state.feed(self.vocab.token_bytes(id)) {
            Some(s) if !self.vocab.token_bytes(id).is_empty() => self.state = s,
            _ => {
                tracing::warn!(
                    "JSON mode: token {id} was generated although the mask refused it; ending the sequence"
                );
                self.broken = true;
            }
        }
    }

    fn is_complete(&self) -> bool {
        self.broken || self.state.is_complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// The state after `text`, or the byte offset where it was refused.
    fn run(text: &[u8]) -> std::result::Result<JsonState, usize> {
        let mut s = JsonState::new();
        for (i, &b) in text.iter().enumerate() {
            s = s.step(b).ok_or(i)?;
        }
        Ok(s)
    }

    fn complete(text: &str) -> bool {
        run(text.as_bytes()).is_ok_and(|s| s.is_complete())
    }

    #[test]
    fn accepts_complete_objects() {
        let cases = [
            "{}",
            " \n{ }",
            r#"{"a":1}"#,
            r#"{"a": -0.5e+10, "b": 0, "c": -0, "d": 1E5, "e": 12.25e-3, "f": 0.0}"#,
            r#"{"s": "esc \" \\ \/ \b \f \n \r \t \u00e9 \uD83D\uDE00 \u20AC"}"#,
            r#"{"t": true, "f": false, "n": null, "arr": [true, [false, [null, []]], {}]}"#,
            "{\"é\": \"ünïcødé — 𝄞 中文 😀\"}",
            "{\"k\" : [ 1 , 2 ,\n\t3 ] }",
            "{\"\":\"\"}\n",
        ];
        for c in cases {
            assert!(
                complete(c),
                "{c:?} refused at {:?}",
                run(c.as_bytes()).err()
            );
            let v: serde_json::Value = serde_json::from_str(c).unwrap();
            assert!(v.is_object());
        }
    }

    #[test]
    fn accepts_prefixes_without_completing() {
        for p in [
            "",
            "{",
            "{\"a",
            "{\"a\\",
            "{\"a\\u00",
            "{\"a\\uD83D",
            "{\"a\\uD83D\\",
            "{\"a\\uD83D\\uDE",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":-",
            "{\"a\":-0",
            "{\"a\":-0.",
            "{\"a\":-0.5e",
            "{\"a\":-0.5e+",
            "{\"a\":-0.5e+1",
            "{\"a\":tr",
            "{\"a\":[",
            "{\"a\":[1,",
            "{\"a\":{\"b\":{}",
        ] {
            let s = run(p.as_bytes()).unwrap_or_else(|at| panic!("{p:?} refused at {at}"));
            assert!(!s.is_complete(), "{p:?}");
        }
        // A prefix ending inside a multi-byte character.
        let e = "{\"😀".as_bytes();
        assert!(run(&e[..e.len() - 2]).is_ok());
    }

    #[test]
    fn refuses_invalid_prefixes() {
        let cases: &[&[u8]] = &[
            b"[]",                   // top level must be an object
            b"\"a\"",                // ... not a string
            b"1",                    // ... nor a number
            b"{a",                   // unquoted key
            b"{1:2}",                // non-string key
            b"{\"a\" 1",             // missing colon
            b"{\"a\":1 \"b\"",       // missing comma
            b"{\"a\":1,}",           // trailing comma
            b"{\"a\":[1,]",          // trailing comma in an array
            b"{\"a\":]",             // mismatched bracket
            b"{\"a\":[}",            // mismatched bracket
            b"{}}",                  // after completion
            b"{} x",                 // after completion
            b"{\"a\":01",            // leading zero
            b"{\"a\":-a",            // minus without digit
            b"{\"a\":1.}",           // dot without digit
            b"{\"a\":1.e5",          // dot without digit
            b"{\"a\":1e}",           // exponent without digit
            b"{\"a\":1e+}",          // exponent sign without digit
            b"{\"a\":+1",            // plus sign
            b"{\"a\":.5",            // no integer part
            b"{\"a\":tru}",          // broken literal
            b"{\"a\":nul1",          // broken literal
            b"{\"a\":True",          // case
            b"{\"a\":\"\\x\"",       // bad escape
            b"{\"a\":\"\\u12G",      // bad hex
            b"{\"a\":\"\\uDC00",     // lone low surrogate (serde_json refuses it)
            b"{\"a\":\"\\uD800x",    // high surrogate without a low one
            b"{\"a\":\"\\uD800\\n",  // ... followed by another escape
            b"{\"a\":\"\\uD800\\u0", // ... followed by a non-surrogate
            b"{\"a\":\"\\uD800\\uDB",
            b"{\"a\":\"\x01",     // control byte in a string
            b"{\"a\":\"\n",       // raw newline in a string
            b"{\"a\":\"\t",       // raw tab in a string
            b"{\"a\":\"\x80",     // continuation byte without a lead
            b"{\"a\":\"\xC0\x80", // overlong
            b"{\"a\":\"\xC1",     // overlong lead
            b"{\"a\":\"\xE0\x80", // overlong 3-byte
            b"{\"a\":\"\xED\xA0", // UTF-16 surrogate in UTF-8
            b"{\"a\":\"\xF4\x90", // above U+10FFFF
            b"{\"a\":\"\xF5",     // invalid lead
            b"{\"a\":\"\xC3a",    // truncated character
            b"{\"a\":\"\xFF",
            b"\x00",
            b"{'a':1}", // single quotes
            b"{\"a\":NaN",
        ];
        for c in cases {
            assert!(run(c).is_err(), "{:?} accepted", String::from_utf8_lossy(c));
            // Whatever part is accepted is not a complete object.
            if let Ok(s) = std::str::from_utf8(c) {
                assert!(!complete(s) || serde_json::from_str::<serde_json::Value>(s).is_ok());
            }
        }
        // serde_json agrees about lone surrogates (why they are refused).
        assert!(serde_json::from_str::<serde_json::Value>(r#"{"a":"\uDC00"}"#).is_err());
        assert!(serde_json::from_str::<serde_json::Value>(r#"{"a":"\uD800"}"#).is_err());
    }

    #[test]
    fn bounds_whitespace_depth_and_numbers() {
        let ws = " ".repeat(MAX_WS_RUN as usize);
        assert!(run(format!("{{{ws}").as_bytes()).is_ok());
        assert!(run(format!("{{{ws} ").as_bytes()).is_err());
        assert!(run(format!("{ws}{{").as_bytes()).is_ok());
        assert!(run(format!("{{{ws}\"a\"{ws}:{ws}1{ws},{ws}\"b\":2}}").as_bytes()).is_ok());
        // Spaces inside strings are content, not bounded.
        assert!(run(format!("{{\"{ws}{ws}{ws}\"").as_bytes()).is_ok());

        let deep = |n: usize| format!("{{\"a\":{}", "[".repeat(n));
        assert!(run(deep(MAX_DEPTH as usize - 1).as_bytes()).is_ok());
        assert!(run(deep(MAX_DEPTH as usize).as_bytes()).is_err());

        let digits = |n: usize| "7".repeat(n);
        let d = MAX_NUM_DIGITS as usize;
        let e = MAX_EXP_DIGITS as usize;
        let max = format!("{{\"a\":-{}.{}e-{}}}", digits(d), digits(d), digits(e));
        assert!(complete(&max), "{max}");
        let biggest = format!("{{\"a\":{}e+{}}}", "9".repeat(d), "9".repeat(e));
        assert!(complete(&biggest));
        assert!(serde_json::from_str::<serde_json::Value>(&biggest).is_ok());
        assert!(run(format!("{{\"a\":{}", digits(d + 1)).as_bytes()).is_err());
        assert!(run(format!("{{\"a\":1.{}", digits(d + 1)).as_bytes()).is_err());
        assert!(run(format!("{{\"a\":1e{}", digits(e + 1)).as_bytes()).is_err());
        // What the exponent bound prevents.
        assert!(serde_json::from_str::<serde_json::Value>("{\"a\":1e400}").is_err());
    }

    /// Valid objects from serde_json itself (escapes, unicode, nesting) are all accepted.
    #[test]
    fn accepts_what_serde_json_writes() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..300 {
            let v =
                json!({ "k": random_value(&mut rng, 0), "é\u{1}\"": random_value(&mut rng, 0) });
            for text in [v.to_string(), serde_json::to_string_pretty(&v).unwrap()] {
                assert!(
                    complete(&text),
                    "{text:?} refused at {:?}",
                    run(text.as_bytes()).err()
                );
            }
        }
    }

    fn random_value(rng: &mut StdRng, depth: usize) -> serde_json::Value {
        let chars = [
            'a', 'é', '"', '\\', '\n', '\u{7}', '😀', '中', '\u{7f}', ' ', '/',
        ];
        match rng.random_range(0..if depth > 3 { 5 } else { 7 }) {
            0 => json!(null),
            1 => json!(rng.random_bool(0.5)),
            2 => json!(rng.random_range(-1_000_000i64..1_000_000)),
            3 => json!(rng.random_range(-1e6..1e6) * 10f64.powi(rng.random_range(-30..30))),
            4 => {
                let n = rng.random_range(0..8);
                json!((0..n)
                    .map(|_| chars[rng.random_range(0..chars.len())])
                    .collect::<String>())
            }
            5 => json!((0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect::<Vec<_>>()),
            _ => {
                let mut m = serde_json::Map::new();
                for i in 0..rng.random_range(0..4) {
                    m.insert(format!("k{i}"), random_value(rng, depth + 1));
                }
                serde_json::Value::Object(m)
            }
        }
    }

    /// Mutated objects: whenever the automaton completes one, serde_json parses it as an
    /// object; whenever serde_json parses a compact object within the bounds, the automaton
    /// completes it.
    #[test]
    fn agrees_with_serde_json_on_mutations() {
        let mut rng = StdRng::seed_from_u64(11);
        let alphabet = b"{}[]\":,\\ 0-1.eE+tfnul\"\xC3\xA9\xED\xA0\x01";
        let mut completed = 0;
        for _ in 0..3000 {
            let v = json!({ "a": random_value(&mut rng, 1) });
            let mut text = v.to_string().into_bytes();
            for _ in 0..rng.random_range(1..3) {
                let at = rng.random_range(0..=text.len());
                match rng.random_range(0..3) {
                    0 if at < text.len() => {
                        text.remove(at);
                    }
                    1 if at < text.len() => {
                        text[at] = alphabet[rng.random_range(0..alphabet.len())]
                    }
                    _ => text.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                }
            }
            let ours = run(&text).is_ok_and(|s| s.is_complete());
            let theirs = serde_json::from_slice::<serde_json::Value>(&text);
            if ours {
                completed += 1;
                assert!(
                    theirs.as_ref().is_ok_and(|v| v.is_object()),
                    "completed but serde_json says {theirs:?}: {:?}",
                    String::from_utf8_lossy(&text)
                );
            } else if let Ok(v) = theirs {
                // serde_json allows what our bounds refuse (surrounding whitespace runs, long
                // numbers) and non-objects; nothing else.
                assert!(
                    !v.is_object() || !within_bounds(&text),
                    "serde_json parses but refused: {:?}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
        assert!(
            completed > 300,
            "too few mutations stayed valid: {completed}"
        );
    }

    /// No whitespace run over [`MAX_WS_RUN`] and no digit run over the number bounds (a digit
    /// run after `e`, `e+`, `e-` counts as an exponent). Digits in strings count too: fine for
    /// the mutation test, whose strings have none but `k0`-style keys.
    fn within_bounds(text: &[u8]) -> bool {
        let ws = text
            .windows(MAX_WS_RUN as usize + 1)
            .any(|w| w.iter().all(|b| b" \t\n\r".contains(b)));
        let mut i = 0;
        while i < text.len() {
            if !text[i].is_ascii_digit() {
                i += 1;
                continue;
            }
            let start = i;
            while i < text.len() && text[i].is_ascii_digit() {
                i += 1;
            }
            let before = |k: usize| start.checked_sub(k).map(|j| text[j]);
            let exponent = matches!(before(1), Some(b'e' | b'E'))
                || (matches!(before(1), Some(b'+' | b'-'))
                    && matches!(before(2), Some(b'e' | b'E')));
            let max = if exponent {
                MAX_EXP_DIGITS
            } else {
                MAX_NUM_DIGITS
            };
            if i - start > max as usize {
                return false;
            }
        }
        !ws
    }

    // ----- with tokenizers -----

    use crate::data::testutil::TempDir;

    /// GPT-2 byte-level BPE with every byte as a token, some multi-byte pieces (JSON-ish and a
    /// two-byte character), and `<s>` / `</s>` special.
    fn byte_level_tokenizer() -> Tokenizer {
        let to_char: std::collections::HashMap<u8, char> =
            gpt2_char_bytes().into_iter().map(|(c, b)| (b, c)).collect();
        let spell = |s: &[u8]| s.iter().map(|b| to_char[b]).collect::<String>();
        let mut vocab = serde_json::Map::new();
        vocab.insert("<s>".into(), json!(0));
        vocab.insert("</s>".into(), json!(1));
        let mut next = 2;
        for b in 0..=255u8 {
            vocab.insert(spell(&[b]), json!(next));
            next += 1;
        }
        let pieces: &[&[u8]] = &[
            b"{\"",
            b" \"",
            b"\":",
            b"\": \"",
            b"\",",
            b"},",
            b"}}",
            b"}\n",
            b"true",
            b" null",
            b"false",
            b"\\u",
            b"\\n",
            b"\\\"",
            b"D83D",
            b"DE00",
            b"\\uD83D",
            b"-0.5e+10",
            b"12",
            b"e-",
            b"  ",
            b"\n  ",
            b"name",
            b" hello",
            "é".as_bytes(),
            "😀".as_bytes(),
            b"\xF0\x9F",
            b"\x98\x80",
            b"[{",
            b"]}",
            b"\"}",
            b"\"]",
            b"\"\"",
            b"0,",
            b"1]",
            b"\xC3",
        ];
        for p in pieces {
            vocab.insert(spell(p), json!(next));
            next += 1;
        }
        let special = |id: usize, s: &str| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<s>"), special(1, "</s>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        });
        load_tokenizer("bytelevel", &tj)
    }

    /// SentencePiece-style BPE as Llama's (▁ for space, `<0xNN>` byte fallback, the decoder
    /// strips the text's leading space), with pieces sharing bytes with byte tokens.
    fn sentencepiece_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, s) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(s.to_string(), json!(i));
        }
        let mut next = 3;
        for b in 0..=255u8 {
            vocab.insert(format!("<0x{b:02X}>"), json!(next));
            next += 1;
        }
        for p in [
            "{", "}", "[", "]", "\"", ":", ",", "\\", "▁", "▁{", "▁\"", "\":", "\":▁", "\",",
            "▁true", "false", "null", "▁1", "0", "1", "2", "-", ".", "e", "+", "E", "t", "r", "u",
            "f", "a", "l", "s", "n", "b", "c", "d", "▁▁", "é", "中", "😀", "hello", "▁world",
            "\"}", "u00", "D83D", "DE00", "\\u",
        ] {
            vocab.insert(p.to_string(), json!(next));
            next += 1;
        }
        let special = |id: usize, s: &str| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        });
        load_tokenizer("spiece", &tj)
    }

    fn load_tokenizer(tag: &str, tj: &serde_json::Value) -> Tokenizer {
        let d = TempDir::new(&format!("json-mode-{tag}"));
        d.write("tokenizer.json", &tj.to_string());
        let has = |t: &str| tj["model"]["vocab"].get(t).is_some();
        let config = if has("<s>") && has("</s>") {
            json!({"bos_token": "<s>", "eos_token": "</s>"})
        } else {
            json!({})
        };
        d.write("tokenizer_config.json", &config.to_string());
        Tokenizer::from_hf_dir(d.dir()).unwrap()
    }

    /// The tokens a state allows, found by feeding every token's bytes (no trie, no fast path).
    fn brute_force(vocab: &JsonVocab, state: JsonState) -> Vec<bool> {
        (0..vocab.vocab_size() as u32)
            .map(|id| {
                let b = vocab.token_bytes(id);
                (!b.is_empty() && state.feed(b).is_some())
                    || (state.is_complete() && vocab.eos.contains(&id))
            })
            .collect()
    }

    /// Bytes of the single-byte tokens that finish any state soonest (see [`REQUIRED_BYTES`]),
    /// in order of preference; plus continuation bytes for a character begun.
    /// `"` first: inside a string, `}` would be content.
    const FINISH: &[u8] = b"\"}]:0\\udcruelsa{\x80\x90\xA0";

    struct Walk {
        ids: Vec<u32>,
        bytes: Vec<u8>,
        /// Time of each mask call, with whether the state was inside a string.
        mask_times: Vec<(bool, std::time::Duration)>,
    }

    /// Generate under the mask from random logits: for `random_steps` steps a token drawn
    /// among the allowed ones (half the time among those that are not plain string content,
    /// so quotes, escapes and brackets come up often), then the allowed single-byte token that
    /// closes soonest, until the object completes. Checks on the way that some token is always
    /// allowed, EOS never before completion, and (every `check_every` steps) that the mask
    /// equals a brute-force check of every token.
    fn random_walk(
        vocab: &Arc<JsonVocab>,
        seed: u64,
        random_steps: usize,
        check_every: usize,
    ) -> Walk {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut c = JsonConstraint::with_vocab(vocab.clone());
        let n = vocab.vocab_size();
        // A few padded rows past the vocabulary, as a model's embedding may have.
        let mut logits = vec![0f32; n + 3];
        let single: std::collections::HashMap<u8, u32> = (0..n as u32)
            .filter_map(|id| match vocab.token_bytes(id) {
                [b] => Some((*b, id)),
                _ => None,
            })
            .collect();
        let mut walk = Walk {
            ids: Vec::new(),
            bytes: Vec::new(),
            mask_times: Vec::new(),
        };
        for step in 0.. {
            assert!(step < random_steps + 2000, "seed {seed}: no completion");
            for l in logits.iter_mut() {
                *l = rng.random_range(-5.0..5.0);
            }
            let state = *c.state();
            let t0 = std::time::Instant::now();
            c.mask(&mut logits);
            walk.mask_times
                .push((state.in_plain_string(), t0.elapsed()));
            let allowed: Vec<u32> = (0..logits.len() as u32)
                .filter(|&i| logits[i as usize].is_finite())
                .collect();
            assert!(
                !allowed.is_empty(),
                "seed {seed}: nothing allowed in {state:?}"
            );
            assert!(allowed.iter().all(|&i| (i as usize) < n));
            for &e in &vocab.eos {
                assert!(!logits[e as usize].is_finite(), "EOS allowed in {state:?}");
            }
            if step % check_every == 0 {
                let want = brute_force(vocab, state);
                let got: Vec<bool> = (0..n).map(|i| logits[i].is_finite()).collect();
                let diff = (0..n).find(|&i| want[i] != got[i]);
                assert!(
                    diff.is_none(),
                    "seed {seed} {state:?}: token {diff:?} {:?}: mask {} brute force {}",
                    diff.map(|i| String::from_utf8_lossy(vocab.token_bytes(i as u32))),
                    got[diff.unwrap()],
                    want[diff.unwrap()]
                );
            }
            let id = if step < random_steps {
                // Not yet closing the top-level object (unless nothing else is allowed), so the
                // walks run their random steps and nest.
                let open: Vec<u32> = allowed
                    .iter()
                    .copied()
                    .filter(|&i| {
                        !state
                            .feed(vocab.token_bytes(i))
                            .is_some_and(|s| s.is_complete())
                    })
                    .collect();
                let allowed = if open.is_empty() { &allowed } else { &open };
                let special: Vec<u32> = allowed
                    .iter()
                    .copied()
                    .filter(|&i| vocab.plain[i as usize / 64] >> (i % 64) & 1 == 0)
                    .collect();
                // Inside strings, half the draws among the tokens that leave or escape; elsewhere
                // uniform (so containers open and close at realistic rates).
                let pool = if state.in_plain_string() && !special.is_empty() && rng.random_bool(0.5)
                {
                    &special
                } else {
                    allowed
                };
                pool[rng.random_range(0..pool.len())]
            } else {
                *FINISH
                    .iter()
                    .filter_map(|b| single.get(b))
                    .find(|&&i| logits[i as usize].is_finite())
                    .unwrap_or_else(|| panic!("seed {seed}: cannot finish from {state:?}"))
            };
            c.accept(id);
            walk.ids.push(id);
            walk.bytes.extend_from_slice(vocab.token_bytes(id));
            if c.is_complete() {
                break;
            }
        }
        assert!(!c.broken);
        walk
    }

    /// The decoded output parses as an object and is the bytes the automaton checked (up to a
    /// leading space a SentencePiece decoder strips).
    fn check_output(tok: &Tokenizer, walk: &Walk) -> serde_json::Value {
        let text = tok.decode(&walk.ids, false).unwrap();
        let bytes = String::from_utf8(walk.bytes.clone()).expect("valid UTF-8");
        assert!(
            text == bytes || bytes.strip_prefix(' ') == Some(&text),
            "decoded {text:?} != checked {bytes:?}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?} does not parse"));
        assert!(v.is_object(), "{text}");
        v
    }

    #[test]
    fn random_sampling_on_tiny_tokenizers_yields_objects() {
        for tok in [byte_level_tokenizer(), sentencepiece_tokenizer()] {
            let vocab = JsonVocab::new(&tok).unwrap();
            // The special tokens are never spelled.
            for id in [0, 1] {
                assert!(vocab.token_bytes(id).is_empty());
            }
            // How many outputs nest containers two and three deep: the walks must reach
            // beyond flat objects for the test to mean much.
            let (mut nested, mut deep) = (0, 0);
            for seed in 0..150 {
                let walk = random_walk(&vocab, seed, 10 + seed as usize % 90, 1);
                let d = depth(&check_output(&tok, &walk));
                nested += usize::from(d >= 2);
                deep += usize::from(d >= 3);
            }
            println!("{nested} of 150 walks nest, {deep} three deep");
            // Seeded, so the counts are fixed for a tokenizer: 15-16 of 150 nest here, a few
            // three deep.
            assert!(
                nested >= 10 && deep >= 1,
                "the walks rarely nest: {nested} two deep, {deep} three deep"
            );
        }
    }

    fn depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            serde_json::Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn spells_sentencepiece_pieces() {
        let tok = sentencepiece_tokenizer();
        let vocab = JsonVocab::new(&tok).unwrap();
        let bytes = |s: &str| vocab.token_bytes(tok.token_to_id(s).unwrap()).to_vec();
        assert_eq!(bytes("▁{"), b" {");
        assert_eq!(bytes("<0x7B>"), b"{");
        assert_eq!(bytes("<0xF0>"), b"\xF0");
        assert_eq!(bytes("中"), "中".as_bytes());
        // <unk> is a special token.
        assert!(bytes("<unk>").is_empty());
    }

    #[test]
    fn refuses_tokenizers_it_cannot_spell_with() {
        // The data tests' word-level tokenizer has no decoder (decoding joins with spaces).
        let e = JsonVocab::new(&crate::data::testutil::tiny_tokenizer(None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported tokenizer decoder"), "{e}");
        // A vocabulary without `{`.
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"a": 0, "b": 1}, "merges": []}
        });
        let e = JsonVocab::new(&load_tokenizer("nobrace", &tj))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no token for `{`"), "{e}");
    }

    #[test]
    fn after_completion_only_eos_or_whitespace() {
        let tok = byte_level_tokenizer();
        let mut c = JsonConstraint::new(&tok).unwrap();
        for b in b"{}" {
            let id = (0..c.vocab.vocab_size() as u32)
                .find(|&i| c.vocab.token_bytes(i) == [*b])
                .unwrap();
            let mut l = vec![0f32; c.vocab.vocab_size()];
            c.mask(&mut l);
            assert!(l[id as usize].is_finite());
            assert!(!l[1].is_finite(), "EOS allowed before completion");
            c.accept(id);
        }
        assert!(c.is_complete());
        let mut l = vec![0f32; c.vocab.vocab_size()];
        c.mask(&mut l);
        for (id, x) in l.iter().enumerate() {
            let b = c.vocab.token_bytes(id as u32);
            let ok = id == 1 || (!b.is_empty() && b.iter().all(|b| b" \t\n\r".contains(b)));
            assert_eq!(x.is_finite(), ok, "token {id} {b:?}");
        }
        c.accept(1);
        assert!(c.is_complete() && !c.broken);
        // A refused token (the scheduler ignoring the mask) ends the sequence.
        let mut c = JsonConstraint::new(&tok).unwrap();
        let x = tok.token_to_id("x").unwrap();
        c.accept(x);
        assert!(c.is_complete() && c.broken);
    }

    #[test]
    fn smollm2_random_walks_yield_objects() {
        let tok = crate::data::testutil::smollm2();
        let t0 = std::time::Instant::now();
        let vocab = JsonVocab::new(tok).unwrap();
        let build = t0.elapsed();
        let t1 = std::time::Instant::now();
        let _again = JsonConstraint::with_vocab(vocab.clone());
        let per_request = t1.elapsed();
        assert_eq!(vocab.vocab_size(), tok.vocab_size());
        assert!(tok
            .eos_ids()
            .iter()
            .all(|&e| vocab.token_bytes(e).is_empty()));
        let spelled = (0..vocab.vocab_size() as u32)
            .filter(|&i| !vocab.token_bytes(i).is_empty())
            .count();
        // Every regular token (all but a few dozen specials) is usable.
        assert!(spelled + 100 > vocab.vocab_size(), "{spelled} spelled");
        let mut times: Vec<(bool, std::time::Duration)> = Vec::new();
        for seed in 0..16 {
            let walk = random_walk(&vocab, seed, 40 + seed as usize * 10, 37);
            check_output(tok, &walk);
            times.extend(walk.mask_times);
        }
        let summary = |in_string: bool| {
            let mut t: Vec<f64> = times
                .iter()
                .filter(|(s, _)| *s == in_string)
                .map(|(_, d)| d.as_secs_f64() * 1e6)
                .collect();
            t.sort_by(f64::total_cmp);
            let mean = t.iter().sum::<f64>() / t.len().max(1) as f64;
            format!(
                "{} steps, mean {mean:.0} us, p50 {:.0} us, p99 {:.0} us, max {:.0} us",
                t.len(),
                t.get(t.len() / 2).unwrap_or(&0.0),
                t.get(t.len() * 99 / 100).unwrap_or(&0.0),
                t.last().unwrap_or(&0.0)
            )
        };
        println!(
            "json_mode SmolLM2 ({} tokens, {} trie nodes, {} outside the plain set): vocab build {:.0} ms, per-request constraint {:.1} us",
            vocab.vocab_size(),
            vocab.all.nodes.len() - 1,
            vocab.rest.tokens.len(),
            build.as_secs_f64() * 1e3,
            per_request.as_secs_f64() * 1e6
        );
        println!("json_mode mask, in a string: {}", summary(true));
        println!("json_mode mask, elsewhere:   {}", summary(false));
    }
}
