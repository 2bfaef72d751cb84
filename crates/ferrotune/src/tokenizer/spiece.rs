//! T5's tokenizer from a SentencePiece model (`spiece.model`), for folders that have no
//! `tokenizer.json`: the protobuf is read here (a small format: the pieces with their scores
//! and types, the trainer's special ids, the normalizer's precompiled character map) and turned
//! into the Unigram tokenizer transformers' `T5Tokenizer` builds from the same file:
//! - vocabulary: the pieces in order, then `<extra_id_{N-1}>` ... `<extra_id_0>` (T5's sentinel
//!   tokens, 100 unless tokenizer_config.json says otherwise);
//! - normalizer: the precompiled character map, when the model has one;
//! - pre-tokenizer: whitespace split, then Metaspace (`▁`, prepended to every word);
//! - decoder: Metaspace;
//! - special tokens: the control and unknown pieces and the sentinels.
//!
//! `</s>` is appended to encoded inputs by [`super::Tokenizer::set_add_eos`], as
//! `T5TokenizerFast`'s post-processor does.
use crate::{Error, Result};
use std::path::Path;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::AddedToken;

/// Largest spiece.model read (T5's is 0.8 MB, mT5's 4.3 MB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Most pieces accepted (mT5 has 250,100).
pub const MAX_PIECES: usize = 1 << 22;
/// Most sentinel tokens accepted (`extra_ids`; T5 uses 100).
pub const MAX_EXTRA_IDS: usize = 1 << 16;

/// SentencePiece's piece types (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// What ferrotune reads of a SentencePiece `ModelProto`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpModel {
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    pub unk_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    pub bos_id: i64,
    /// `NormalizerSpec.precompiled_charsmap` (empty: no normalization).
    pub precompiled_charsmap: Vec<u8>,
}

/// A protobuf reader over one message's bytes. Errors say where (byte offset) and what.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A field's value, by wire type.
enum Field<'a> {
    Varint(u64),
    /// Skipped: no field ferrotune reads is 64-bit.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!("truncated varint at byte {}", self.pos));
            };
            self.pos += 1;
            x |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "a field of {n} bytes at byte {} runs past the end ({} bytes)",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next (field number, value), or None at the end.
    fn next(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| format!("length {n} at byte {at}"))?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes")))
            }
            w => return Err(format!("unsupported wire type {w} at byte {at}")),
        };
        Ok(Some((field, value)))
    }
}

/// protobuf int32 fields are sign-extended varints.
fn int32(v: u64) -> i64 {
    v as i64 as i32 as i64
}

fn parse_piece(buf: &[u8]) -> std::result::Result<Piece, String> {
    let mut r = Reader::new(buf);
    let mut piece = None;
    let mut score = 0f32;
    let mut kind = PieceType::Normal;
    while let Some((field, v)) = r.next()? {
        match (field, v) {
            (1, Field::Bytes(b)) => {
                piece = Some(
                    std::str::from_utf8(b)
                        .map_err(|_| "a piece is not valid UTF-8".to_string())?
                        .to_string(),
                )
            }
            (2, Field::Fixed32(x)) => score = f32::from_bits(x),
            (3, Field::Varint(t)) => {
                kind = match t {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => return Err(format!("unknown piece type {other}")),
                }
            }
            (1..=3, _) => return Err(format!("piece field {field} has the wrong wire type")),
            _ => {}
        }
    }
    let piece = piece.ok_or_else(|| "a piece without its text".to_string())?;
    if !score.is_finite() {
        return Err(format!("piece `{piece}` has score {score}"));
    }
    Ok(Piece { piece, score, kind })
}

/// Parse a SentencePiece `ModelProto`.
pub fn parse_model(buf: &[u8]) -> std::result::Result<SpModel, String> {
    let mut m = SpModel {
        pieces: Vec::new(),
        model_type: 1,
        unk_id: 0,
        eos_id: 2,
        pad_id: -1,
        bos_id: 1,
        precompiled_charsmap: Vec::new(),
    };
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next()? {
        match (field, v) {
            (1, Field::Bytes(b)) => {
                if m.pieces.len() >= MAX_PIECES {
                    return Err(format!("more than {MAX_PIECES} pieces"));
                }
                let i = m.pieces.len();
                m.pieces
                    .push(parse_piece(b).map_err(|e| format!("piece {i}: {e}"))?);
            }
            (2, Field::Bytes(b)) => {
                let mut t = Reader::new(b);
                while let Some((f, v)) = t.next().map_err(|e| format!("trainer_spec: {e}"))? {
                    match (f, v) {
                        (3, Field::Varint(x)) => m.model_type = x,
                        (40, Field::Varint(x)) => m.unk_id = int32(x),
                        (41, Field::Varint(x)) => m.bos_id = int32(x),
                        (42, Field::Varint(x)) => m.eos_id = int32(x),
                        (43, Field::Varint(x)) => m.pad_id = int32(x),
                        _ => {}
                    }
                }
            }
            (3, Field::Bytes(b)) => {
                let mut n = Reader::new(b);
                while let Some((f, v)) = n.next().map_err(|e| format!("normalizer_spec: {e}"))? {
                    if let (2, Field::Bytes(map)) = (f, v) {
                        m.precompiled_charsmap = map.to_vec();
                    }
                }
            }
            (1..=3, _) => return Err(format!("field {field} has the wrong wire type")),
            // self_test_data, denormalizer_spec, ...: not needed
            _ => {}
        }
    }
    if m.pieces.is_empty() {
        return Err("no pieces (not a SentencePiece model?)".into());
    }
    Ok(m)
}

/// The text of piece `id` when `id` names one (the trainer's -1 means none).
fn piece_at(m: &SpModel, id: i64) -> Option<&str> {
    usize::try_from(id)
        .ok()
        .and_then(|i| m.pieces.get(i))
        .map(|p| p.piece.as_str())
}

/// The character map starts with the byte size of its trie; the tokenizers crate reserves
/// that much before reading it, so a size past the end must be refused first.
fn check_charsmap(map: &[u8]) -> std::result::Result<(), String> {
    let Some(head) = map.get(..4) else {
        return Err(format!("{} bytes is too short", map.len()));
    };
    let trie = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
    if trie > map.len() - 4 {
        return Err(format!(
            "its trie of {trie} bytes is longer than the map ({} bytes)",
            map.len()
        ));
    }
    Ok(())
}

/// The special tokens a SentencePiece model names: (unk, eos, pad, bos) texts.
pub struct SpSpecials {
    pub unk: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub bos: Option<String>,
}

/// Build T5's Unigram tokenizer from `spiece.model` at `path` with `extra_ids` sentinels.
pub fn t5_tokenizer(path: &Path, extra_ids: usize) -> Result<(tokenizers::Tokenizer, SpSpecials)> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::file(path, e))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(Error::file(
            path,
            format!(
                "{size} bytes is larger than the limit {MAX_FILE_BYTES} for a SentencePiece model"
            ),
        ));
    }
    if extra_ids > MAX_EXTRA_IDS {
        return Err(Error::file(
            path,
            format!(
                "{extra_ids} sentinel tokens (extra_ids) is more than the limit {MAX_EXTRA_IDS}"
            ),
        ));
    }
    let buf = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let m = parse_model(&buf)
        .map_err(|e| Error::file(path, format!("not a valid SentencePiece model: {e}")))?;
    if m.model_type != 1 {
        return Err(Error::file(
            path,
            format!(
                "SentencePiece model type {} is not supported (T5 uses unigram, type 1)",
                m.model_type
            ),
        ));
    }
    let unk = usize::try_from(m.unk_id)
        .ok()
        .filter(|&i| i < m.pieces.len())
        .ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "trainer_spec.unk_id {} is not a piece (the model has {})",
                    m.unk_id,
                    m.pieces.len()
                ),
            )
        })?;
    let mut vocab: Vec<(String, f64)> = m
        .pieces
        .iter()
        .map(|p| (p.piece.clone(), p.score as f64))
        .collect();
    let sentinels: Vec<String> = (0..extra_ids)
        .rev()
        .map(|i| format!("<extra_id_{i}>"))
        .collect();
    vocab.extend(sentinels.iter().map(|s| (s.clone(), 0.0)));
    let model = Unigram::from(vocab, Some(unk), false)
        .map_err(|e| Error::file(path, format!("cannot build the Unigram model: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    if !m.precompiled_charsmap.is_empty() {
        check_charsmap(&m.precompiled_charsmap)
            .map_err(|e| Error::file(path, format!("normalizer_spec.precompiled_charsmap: {e}")))?;
        let pc = Precompiled::from(&m.precompiled_charsmap)
            .map_err(|e| Error::file(path, format!("normalizer_spec.precompiled_charsmap: {e}")))?;
        tok.with_normalizer(Some(pc))
            .map_err(|e| Error::file(path, format!("normalizer: {e}")))?;
    }
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    tok.with_decoder(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    let specials: Vec<AddedToken> = m
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, PieceType::Control | PieceType::Unknown))
        .map(|p| p.piece.clone())
        .chain(sentinels)
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| Error::file(path, format!("special tokens: {e}")))?;
    let named = |id: i64| piece_at(&m, id).map(str::to_string);
    Ok((
        tok,
        SpSpecials {
            unk: named(m.unk_id),
            eos: named(m.eos_id),
            pad: named(m.pad_id),
            bos: named(m.bos_id),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut x: u64, out: &mut Vec<u8>) {
        loop {
            let b = (x & 0x7f) as u8;
            x >>= 7;
            if x == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(field: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        bytes_field(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        varint(3 << 3, &mut p);
        varint(kind, &mut p);
        p
    }

    #[test]
    fn reads_pieces_trainer_ids_and_negative_ids() {
        let mut m = Vec::new();
        bytes_field(1, &piece("<pad>", 0.0, 3), &mut m);
        bytes_field(1, &piece("</s>", 0.0, 3), &mut m);
        bytes_field(1, &piece("<unk>", 0.0, 2), &mut m);
        bytes_field(1, &piece("▁a", -1.5, 1), &mut m);
        let mut t = Vec::new();
        for (f, v) in [(40u64, 2i64), (41, -1), (42, 1), (43, 0)] {
            varint(f << 3, &mut t);
            varint(v as u64, &mut t);
        }
        bytes_field(2, &t, &mut m);
        let sp = parse_model(&m).unwrap();
        assert_eq!(sp.pieces.len(), 4);
        assert_eq!(sp.pieces[3].piece, "▁a");
        assert_eq!(sp.pieces[3].score, -1.5);
        assert_eq!(sp.pieces[2].kind, PieceType::Unknown);
        assert_eq!((sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id), (2, -1, 1, 0));
        assert!(sp.precompiled_charsmap.is_empty());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = {
            let mut m = Vec::new();
            bytes_field(1, &piece("▁a", -1.0, 1), &mut m);
            m
        };
        assert!(parse_model(&good).is_ok());
        // Every truncation of a valid model fails cleanly or parses.
        for n in 0..good.len() {
            let _ = parse_model(&good[..n]);
        }
        assert!(parse_model(&[]).unwrap_err().contains("no pieces"));
        assert!(parse_model(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f])
            .unwrap_err()
            .contains("runs past the end"));
        assert!(parse_model(&[0x0b]).unwrap_err().contains("wire type 3"));
        let mut nan = Vec::new();
        bytes_field(1, &piece("x", f32::NAN, 1), &mut nan);
        assert!(parse_model(&nan).unwrap_err().contains("score"));
        assert!(check_charsmap(&[0xff, 0xff, 0xff, 0xff, 0, 0])
            .unwrap_err()
            .contains("longer than the map"));
        assert!(check_charsmap(&[1, 0]).is_err());
        assert!(check_charsmap(&[4, 0, 0, 0, 1, 2, 3, 4]).is_ok());
    }

    /// Random byte changes to T5's fixture model: parsing and building the tokenizer end in
    /// a tokenizer or an error, never a panic or an abort.
    #[test]
    fn mutated_models_never_panic() {
        use rand::{Rng, SeedableRng};
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/t5/tokenizer/spiece.model");
        let good = std::fs::read(&path).unwrap();
        assert!(parse_model(&good).is_ok());
        let dir = std::env::temp_dir().join(format!("ferrotune-spm-mut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("spiece.model");
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut built = 0;
        for i in 0..300 {
            let mut b = good.clone();
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
            }
            if i % 3 == 0 {
                b.truncate(rng.random_range(0..b.len()));
            }
            std::fs::write(&file, &b).unwrap();
            if let Ok((tok, _)) = t5_tokenizer(&file, 4) {
                built += 1;
                // Encoding may fail (a broken character map); Tokenizer::encode catches panics.
                let _ = crate::error::catch_panic(|| tok.encode_fast("a b", false));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            built > 0,
            "every mutation was refused: the test exercises nothing past parsing"
        );
    }
}
