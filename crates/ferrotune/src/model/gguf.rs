//! Our GGUF header reader: metadata and tensor index, every count and size checked before
//! anything is allocated.
//!
//! candle's `gguf_file::Content::read` trusts the header's counts (a corrupt or hostile file can
//! make it allocate terabytes, divide by a zero alignment, or describe tensors that overflow the
//! file), so we parse the header ourselves and hand back candle's [`Content`] (its fields are
//! public): the rest of the code, and candle's tensor reading, are unchanged.
//!
//! What is checked (layout: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! - magic `GGUF`, version 1, 2 or 3 (version 1 has 32-bit counts and lengths);
//! - every count and length against the bytes left in the file (at the smallest size one entry
//!   can take) and against [`Limits`], before reserving memory for it;
//! - value types, booleans (0 or 1), nesting depth of arrays, duplicate metadata keys;
//! - `general.alignment`: an integer, a power of two;
//! - tensors: unique names, 1 to 4 dimensions each at least 1, a known type, a first dimension
//!   that is a whole number of blocks, an element count and byte size that do not overflow, an
//!   offset that is aligned, and a byte range that lies inside the file.
//!
//! Errors are one line: `file: corrupt GGUF at byte N: <key or tensor>: what is wrong` (a tensor
//! whose bytes lie past the end of the file says `truncated`).
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

/// Upper bounds on what a header may declare, beyond fitting in the file. Generous for real
/// models (Llama 3 405B has about 1,100 tensors; a 256k-token vocabulary is one 256k-element
/// array) and small enough that a hostile header cannot make us reserve much memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tensors: u64,
    pub max_metadata_entries: u64,
    pub max_array_len: u64,
    pub max_string_len: u64,
    /// Arrays of arrays, as GGUF allows (none of the llama.cpp keys nests).
    pub max_array_depth: usize,
    pub max_alignment: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tensors: 1 << 20,
            max_metadata_entries: 1 << 20,
            max_array_len: 1 << 30,
            max_string_len: 1 << 30,
            max_array_depth: 8,
            max_alignment: 1 << 20,
        }
    }
}

/// The most dimensions a ggml tensor has (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// Read the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<Content> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let len = file.metadata().map_err(|e| Error::file(path, e))?.len();
    parse_header(BufReader::new(file), len, path, &Limits::default())
}

/// Parse a GGUF header from `reader`, positioned at the start of a file of `file_len` bytes.
/// `path` only names the file in errors.
pub fn parse_header<R: Read>(
    reader: R,
    file_len: u64,
    path: &Path,
    limits: &Limits,
) -> Result<Content> {
    let mut r = HeaderReader {
        inner: reader,
        pos: 0,
        len: file_len,
        magic: VersionedMagic::GgufV3,
        limits: *limits,
    };
    r.read_content().map_err(|e| match e {
        Fault::Truncated { tensor, end } => Error::file(
            path,
            format!(
                "truncated: tensor `{tensor}` needs bytes up to {end} but the file has {file_len}"
            ),
        ),
        Fault::At { at, what } => Error::file(path, format!("corrupt GGUF at byte {at}: {what}")),
        Fault::Io(e) => Error::file(path, format!("reading the GGUF header: {e}")),
    })
}

/// Why a header was refused, before the file name is attached.
enum Fault {
    /// Malformed at byte `at`.
    At {
        at: u64,
        what: String,
    },
    /// A tensor's data runs past the end of the file (a cut download).
    Truncated {
        tensor: String,
        end: u64,
    },
    Io(std::io::Error),
}

type Parse<T> = std::result::Result<T, Fault>;

/// Adds the key or tensor a fault happened in to its message.
trait Within<T> {
    fn within(self, what: impl FnOnce() -> String) -> Parse<T>;
}

impl<T> Within<T> for Parse<T> {
    fn within(self, what: impl FnOnce() -> String) -> Parse<T> {
        self.map_err(|e| match e {
            Fault::At { at, what: w } => Fault::At {
                at,
                what: format!("{}: {w}", what()),
            },
            e => e,
        })
    }
}

struct HeaderReader<R> {
    inner: R,
    /// Bytes consumed so far, i.e. the file offset of the next byte.
    pos: u64,
    len: u64,
    magic: VersionedMagic,
    limits: Limits,
}

/// GGUF value type ids.
const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// ggml's type id -> the types candle can hold (same table as candle's private `from_u32`).
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// One tensor as the header describes it, before its byte range can be checked.
/// The kind of a metadata value, for messages.
fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::F32(_) | Value::F64(_) => "floating-point",
        Value::Array(_) => "array",
        _ => "negative integer",
    }
}

struct RawTensor {
    name: String,
    /// Where its entry starts, for messages.
    at: u64,
    dims: Vec<usize>,
    dtype: GgmlDType,
    offset: u64,
    bytes: u64,
}

impl<R: Read> HeaderReader<R> {
    fn fault<T>(&self, at: u64, what: impl Into<String>) -> Parse<T> {
        Err(Fault::At {
            at,
            what: what.into(),
        })
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Exactly `N` bytes, or a fault naming how many were left.
    fn array<const N: usize>(&mut self) -> Parse<[u8; N]> {
        if (N as u64) > self.left() {
            return self.fault(
                self.pos,
                format!(
                    "needs {N} more bytes but the file ends after {}",
                    self.left()
                ),
            );
        }
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(Fault::Io)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u8(&mut self) -> Parse<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Parse<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count or length: 32 bits in version 1, 64 bits after.
    fn length(&mut self) -> Parse<u64> {
        match self.magic {
            VersionedMagic::GgufV1 => Ok(self.u32()? as u64),
            _ => self.u64(),
        }
    }

    fn length_size(&self) -> u64 {
        match self.magic {
            VersionedMagic::GgufV1 => 4,
            _ => 8,
        }
    }

    /// Check that `count` entries of at least `min_size` bytes each fit in what is left of the
    /// file and under `limit`, before anything is reserved for them. `at` is where the count was.
    fn check_count(&self, at: u64, count: u64, min_size: u64, limit: u64, what: &str) -> Parse<()> {
        if count > limit {
            return self.fault(at, format!("{count} {what} is over the limit of {limit}"));
        }
        let needed = count.saturating_mul(min_size);
        if needed > self.left() {
            return self.fault(
                at,
                format!(
                    "{count} {what} need at least {needed} bytes but only {} are left in the file",
                    self.left()
                ),
            );
        }
        Ok(())
    }

    /// A length-prefixed string. Trailing NULs are dropped and invalid UTF-8 is replaced, as
    /// candle's reader does (some converters write both).
    fn string(&mut self, limit: u64) -> Parse<String> {
        let at = self.pos;
        let len = self.length()?;
        self.check_count(at, len, 1, limit, "string bytes")?;
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).map_err(Fault::Io)?;
        self.pos += len;
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The smallest number of bytes a value of this type takes in the file.
    fn min_size(&self, value_type: u32) -> u64 {
        match value_type {
            TYPE_U8 | TYPE_I8 | TYPE_BOOL => 1,
            TYPE_U16 | TYPE_I16 => 2,
            TYPE_U32 | TYPE_I32 | TYPE_F32 => 4,
            TYPE_U64 | TYPE_I64 | TYPE_F64 => 8,
            TYPE_STRING => self.length_size(),
            _ => 4 + self.length_size(), // an array: element type and length
        }
    }

    fn value_type(&mut self) -> Parse<u32> {
        let at = self.pos;
        let t = self.u32()?;
        if t > TYPE_F64 {
            return self.fault(at, format!("unknown value type {t}"));
        }
        Ok(t)
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Parse<Value> {
        Ok(match value_type {
            TYPE_U8 => Value::U8(self.u8()?),
            TYPE_I8 => Value::I8(self.u8()? as i8),
            TYPE_U16 => Value::U16(self.u16()?),
            TYPE_I16 => Value::I16(self.u16()? as i16),
            TYPE_U32 => Value::U32(self.u32()?),
            TYPE_I32 => Value::I32(self.u32()? as i32),
            TYPE_U64 => Value::U64(self.u64()?),
            TYPE_I64 => Value::I64(self.u64()? as i64),
            TYPE_F32 => Value::F32(f32::from_bits(self.u32()?)),
            TYPE_F64 => Value::F64(f64::from_bits(self.u64()?)),
            TYPE_BOOL => {
                let at = self.pos;
                match self.u8()? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return self.fault(at, format!("a bool is {b} (must be 0 or 1)")),
                }
            }
            TYPE_STRING => Value::String(self.string(self.limits.max_string_len)?),
            _ => {
                let at = self.pos;
                if depth >= self.limits.max_array_depth {
                    return self.fault(
                        at,
                        format!(
                            "arrays nested more than {} deep",
                            self.limits.max_array_depth
                        ),
                    );
                }
                let elem_type = self.value_type()?;
                let len_at = self.pos;
                let len = self.length()?;
                self.check_count(
                    len_at,
                    len,
                    self.min_size(elem_type),
                    self.limits.max_array_len,
                    "array elements",
                )?;
                let mut items = Vec::with_capacity(len as usize);
                for i in 0..len {
                    items.push(
                        self.value(elem_type, depth + 1)
                            .within(|| format!("element {i}"))?,
                    );
                }
                Value::Array(items)
            }
        })
    }

    fn read_content(&mut self) -> Parse<Content> {
        let magic = self.array::<4>()?;
        if &magic != b"GGUF" {
            return self.fault(0, format!("bad magic {magic:02x?} (expected `GGUF`)"));
        }
        let version = self.u32()?;
        self.magic = match version {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            v => return self.fault(4, format!("unsupported version {v} (1, 2 or 3)")),
        };
        let prefix = self.length_size();
        let tensor_count_at = self.pos;
        let tensor_count = self.length()?;
        let kv_count_at = self.pos;
        let kv_count = self.length()?;
        // The smallest entries: a key, a value type and a one-byte value; a name, n_dims, one
        // dimension, a type and an offset.
        let min_kv = prefix + 4 + 1;
        let min_tensor = prefix + 4 + prefix + 4 + 8;
        self.check_count(
            tensor_count_at,
            tensor_count,
            min_tensor,
            self.limits.max_tensors,
            "tensors",
        )?;
        self.check_count(
            kv_count_at,
            kv_count,
            min_kv,
            self.limits.max_metadata_entries,
            "metadata entries",
        )?;
        if tensor_count
            .saturating_mul(min_tensor)
            .saturating_add(kv_count.saturating_mul(min_kv))
            > self.left()
        {
            return self.fault(
                tensor_count_at,
                format!(
                    "{tensor_count} tensors and {kv_count} metadata entries do not fit in the {} bytes left",
                    self.left()
                ),
            );
        }

        let mut metadata = HashMap::with_capacity(kv_count as usize);
        let mut alignment_at = self.pos;
        for i in 0..kv_count {
            let at = self.pos;
            let key = self
                .string(u16::MAX as u64)
                .within(|| format!("metadata entry {i}: key"))?;
            if key.chars().any(char::is_control) {
                return self.fault(
                    at,
                    format!(
                        "metadata entry {i}: key `{}` holds a control character",
                        key.escape_debug()
                    ),
                );
            }
            if key == "general.alignment" {
                alignment_at = at;
            }
            let value = self
                .value_type()
                .and_then(|t| self.value(t, 0))
                .within(|| format!("metadata key `{key}`"))?;
            if metadata.contains_key(&key) {
                return self.fault(at, format!("metadata key `{key}` appears twice"));
            }
            metadata.insert(key, value);
        }
        let alignment = self.alignment(&metadata, alignment_at)?;

        let mut raw = Vec::with_capacity(tensor_count as usize);
        let mut seen = std::collections::HashSet::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let at = self.pos;
            let name = self
                .string(u16::MAX as u64)
                .within(|| format!("tensor {i}: name"))?;
            if name.chars().any(char::is_control) {
                return self.fault(
                    at,
                    format!(
                        "tensor {i}: name `{}` holds a control character",
                        name.escape_debug()
                    ),
                );
            }
            let t = self
                .tensor_info(name.clone(), at, alignment)
                .within(|| format!("tensor `{name}`"))?;
            if !seen.insert(name.clone()) {
                return self.fault(at, format!("tensor `{name}` appears twice"));
            }
            raw.push(t);
        }

        let header_end = self.pos;
        let tensor_data_offset = match header_end.checked_next_multiple_of(alignment) {
            Some(o) => o,
            None => return self.fault(header_end, "tensor data offset overflows"),
        };
        // Tensor data may not overlap (llama.cpp lays tensors out back to back and checks each
        // offset): a retyped or hand-edited entry would otherwise read its neighbour's bytes.
        let mut by_offset: Vec<&RawTensor> = raw.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            let (a, b) = (w[0], w[1]);
            if a.offset.saturating_add(a.bytes) > b.offset {
                return self.fault(
                    b.at,
                    format!(
                        "tensor `{}` ({} bytes of {:?} from data offset {}) overlaps tensor `{}` at data offset {}",
                        a.name, a.bytes, a.dtype, a.offset, b.name, b.offset
                    ),
                );
            }
        }
        let mut tensor_infos = HashMap::with_capacity(raw.len());
        for t in raw {
            let end = tensor_data_offset
                .checked_add(t.offset)
                .and_then(|start| start.checked_add(t.bytes));
            match end {
                Some(end) if end <= self.len => {}
                Some(end) => {
                    return Err(Fault::Truncated {
                        tensor: t.name,
                        end,
                    })
                }
                None => {
                    return self.fault(
                        t.at,
                        format!(
                            "tensor `{}`: offset {} overflows the file's address space",
                            t.name, t.offset
                        ),
                    )
                }
            }
            tensor_infos.insert(
                t.name,
                TensorInfo {
                    ggml_dtype: t.dtype,
                    shape: candle_core::Shape::from(t.dims),
                    offset: t.offset,
                },
            );
        }
        Ok(Content {
            magic: self.magic,
            metadata,
            tensor_infos,
            tensor_data_offset,
        })
    }

    /// `general.alignment` (default 32): candle accepts any integer type there, so do we, but it
    /// must be a power of two (0 would divide by zero, 3 would misplace every tensor).
    fn alignment(&self, metadata: &HashMap<String, Value>, at: u64) -> Parse<u64> {
        const KEY: &str = "general.alignment";
        let Some(v) = metadata.get(KEY) else {
            return Ok(candle_core::quantized::gguf_file::DEFAULT_ALIGNMENT);
        };
        let n: Option<u64> = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        match n {
            Some(n) if n.is_power_of_two() && n <= self.limits.max_alignment => Ok(n),
            _ => self.fault(
                at,
                format!(
                    "metadata key `{KEY}`: {} is not a power of two up to {}",
                    match n {
                        Some(n) => n.to_string(),
                        None => format!("a {} value", value_kind(v)),
                    },
                    self.limits.max_alignment
                ),
            ),
        }
    }

    fn tensor_info(&mut self, name: String, at: u64, alignment: u64) -> Parse<RawTensor> {
        let dims_at = self.pos;
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return self.fault(
                dims_at,
                format!("{n_dims} dimensions (must be 1 to {MAX_DIMS})"),
            );
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elems: u64 = 1;
        for d in 0..n_dims {
            let dim_at = self.pos;
            let dim = self.length()?;
            if dim == 0 {
                return self.fault(dim_at, format!("dimension {d} is 0"));
            }
            elems = match elems.checked_mul(dim) {
                Some(e) if e <= self.len.saturating_mul(8) => e,
                // No type stores more than 8 elements per byte (Q2_K is 2.625 bits), so more
                // elements than that cannot be in the file.
                _ => {
                    return self.fault(
                        dim_at,
                        format!("dimension {d} ({dim}) makes more elements than the file can hold"),
                    )
                }
            };
            dims.push(usize::try_from(dim).map_err(|_| Fault::At {
                at: dim_at,
                what: format!("dimension {d} ({dim}) does not fit in memory"),
            })?);
        }
        let type_at = self.pos;
        let type_id = self.u32()?;
        let Some(dtype) = ggml_dtype(type_id) else {
            return self.fault(
                type_at,
                format!("unknown or unsupported tensor type {type_id}"),
            );
        };
        let block = dtype.block_size() as u64;
        if !(dims[0] as u64).is_multiple_of(block) {
            return self.fault(
                dims_at,
                format!(
                    "first dimension {} is not a multiple of {dtype:?}'s block size {block}",
                    dims[0]
                ),
            );
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| Fault::At {
                at: dims_at,
                what: format!("{elems} elements of {dtype:?} overflow a byte count"),
            })?;
        let offset_at = self.pos;
        let offset = self.u64()?;
        if !offset.is_multiple_of(alignment) {
            return self.fault(
                offset_at,
                format!("data offset {offset} is not a multiple of the alignment {alignment}"),
            );
        }
        // GGUF lists dimensions innermost first; candle's shapes are outermost first.
        dims.reverse();
        Ok(RawTensor {
            name,
            at,
            dims,
            dtype,
            offset,
            bytes,
        })
    }
}

/// Where the length and size fields of a GGUF header are, for structure-aware fuzzing: each
/// entry is (byte offset, field width in bytes): the version, counts, value types, string and
/// array lengths, integer metadata values (sizes such as `llama.embedding_length`), and each
/// tensor's n_dims, dimensions, type and offset. Stops quietly at the first malformed byte.
#[doc(hidden)]
pub fn size_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut walker = FieldWalker {
        b: bytes,
        at: 0,
        w: 8,
        out: Vec::new(),
    };
    let _ = walker.header();
    walker.out
}

struct FieldWalker<'a> {
    b: &'a [u8],
    at: usize,
    /// Width of counts and lengths: 4 in version 1, else 8.
    w: usize,
    out: Vec<(usize, usize)>,
}

impl FieldWalker<'_> {
    /// Read an `n`-byte little-endian field; `record` keeps its position.
    fn field(&mut self, n: usize, record: bool) -> Option<u64> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        let mut buf = [0u8; 8];
        buf[..n].copy_from_slice(s);
        if record {
            self.out.push((self.at, n));
        }
        self.at += n;
        Some(u64::from_le_bytes(buf))
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        self.at = self.at.checked_add(usize::try_from(n).ok()?)?;
        (self.at <= self.b.len()).then_some(())
    }

    fn string(&mut self, record: bool) -> Option<()> {
        let len = self.field(self.w, record)?;
        self.skip(len)
    }

    fn value(&mut self, t: u64, depth: usize, record: bool) -> Option<()> {
        let size = match t as u32 {
            TYPE_U8 | TYPE_I8 | TYPE_BOOL => 1,
            TYPE_U16 | TYPE_I16 => 2,
            TYPE_U32 | TYPE_I32 | TYPE_F32 => 4,
            TYPE_U64 | TYPE_I64 | TYPE_F64 => 8,
            TYPE_STRING => return self.string(record),
            TYPE_ARRAY if depth < 4 => {
                let elem_type = self.field(4, record)?;
                let len = self.field(self.w, record)?;
                // Every element is walked (each takes at least a byte, so this ends), but only
                // the first few are recorded: a vocabulary has thousands.
                for i in 0..len {
                    self.value(elem_type, depth + 1, record && i < 4)?;
                }
                return Some(());
            }
            _ => return None,
        };
        // Integer values at the top level are sizes and ids (embedding_length, block_count...).
        let is_int = matches!(t as u32, TYPE_U32 | TYPE_I32 | TYPE_U64 | TYPE_I64);
        self.field(size, record && is_int && depth == 0)?;
        Some(())
    }

    fn header(&mut self) -> Option<()> {
        if self.b.get(..4)? != b"GGUF" {
            return None;
        }
        self.at = 4;
        let version = self.field(4, true)?;
        self.w = if version == 1 { 4 } else { 8 };
        let n_tensors = self.field(self.w, true)?;
        let n_kv = self.field(self.w, true)?;
        for _ in 0..n_kv {
            self.string(true)?;
            let t = self.field(4, true)?;
            self.value(t, 0, true)?;
        }
        for _ in 0..n_tensors {
            self.string(true)?;
            let n_dims = self.field(4, true)?;
            for _ in 0..n_dims.min(8) {
                self.field(self.w, true)?;
            }
            self.field(4, true)?; // type
            self.field(8, true)?; // offset
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn repo_file(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    }

    /// Our reader and candle's agree on a valid file: same metadata (compared through `Debug`,
    /// `Value` has no `PartialEq`), tensors, data offset and version.
    fn assert_same_as_candle(path: &Path) {
        let ours = read_header(path).unwrap();
        let mut f = std::fs::File::open(path).unwrap();
        let theirs = Content::read(&mut f).unwrap();
        assert!(matches!(
            (ours.magic, theirs.magic),
            (VersionedMagic::GgufV1, VersionedMagic::GgufV1)
                | (VersionedMagic::GgufV2, VersionedMagic::GgufV2)
                | (VersionedMagic::GgufV3, VersionedMagic::GgufV3)
        ));
        assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
        assert_eq!(ours.metadata.len(), theirs.metadata.len());
        for (k, v) in &theirs.metadata {
            let o = ours
                .metadata
                .get(k)
                .unwrap_or_else(|| panic!("key {k} missing"));
            assert_eq!(format!("{o:?}"), format!("{v:?}"), "key {k}");
        }
        assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len());
        for (name, t) in &theirs.tensor_infos {
            let o = &ours.tensor_infos[name];
            assert_eq!(o.ggml_dtype, t.ggml_dtype, "{name}");
            assert_eq!(o.shape, t.shape, "{name}");
            assert_eq!(o.offset, t.offset, "{name}");
        }
    }

    #[test]
    fn smollm2_header_matches_candle() {
        let p = repo_file(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.is_file(),
            "{} is missing: run scripts/fetch-models.sh",
            p.display()
        );
        assert_same_as_candle(&p);
        let ct = read_header(&p).unwrap();
        assert_eq!(ct.tensor_infos.len(), 272);
        assert!(ct.metadata.contains_key("tokenizer.ggml.tokens"));
    }

    #[test]
    fn tiny_tokenizer_gguf_matches_candle() {
        assert_same_as_candle(&repo_file("tests/fixtures/tokenizer/tiny-spm.gguf"));
    }

    /// A GGUF v3 header written field by field, so a test can put any value anywhere.
    #[derive(Default)]
    struct Raw {
        kv: Vec<u8>,
        n_kv: u64,
        tensors: Vec<u8>,
        n_tensors: u64,
        /// Bytes after the header (tensor data), aligned to 32.
        data: Vec<u8>,
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Raw {
        fn kv_u32(mut self, key: &str, v: u32) -> Self {
            string(&mut self.kv, key);
            self.kv.extend(TYPE_U32.to_le_bytes());
            self.kv.extend(v.to_le_bytes());
            self.n_kv += 1;
            self
        }
        fn kv_raw(mut self, key: &str, value_type: u32, value: &[u8]) -> Self {
            string(&mut self.kv, key);
            self.kv.extend(value_type.to_le_bytes());
            self.kv.extend(value);
            self.n_kv += 1;
            self
        }
        fn tensor(mut self, name: &str, dims: &[u64], dtype: u32, offset: u64) -> Self {
            string(&mut self.tensors, name);
            self.tensors.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.tensors.extend(d.to_le_bytes());
            }
            self.tensors.extend(dtype.to_le_bytes());
            self.tensors.extend(offset.to_le_bytes());
            self.n_tensors += 1;
            self
        }
        fn data(mut self, n: usize) -> Self {
            self.data = vec![0u8; n];
            self
        }
        fn bytes(&self) -> Vec<u8> {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend(self.n_tensors.to_le_bytes());
            b.extend(self.n_kv.to_le_bytes());
            b.extend(&self.kv);
            b.extend(&self.tensors);
            if !self.data.is_empty() {
                b.resize(b.len().next_multiple_of(32), 0);
                b.extend(&self.data);
            }
            b
        }
    }

    fn parse(bytes: &[u8]) -> Result<Content> {
        parse_header(
            bytes,
            bytes.len() as u64,
            Path::new("bad.gguf"),
            &Limits::default(),
        )
    }

    /// The error is one line naming the file and containing every `needle`.
    fn refused(bytes: &[u8], needles: &[&str]) -> String {
        let e = parse(bytes)
            .expect_err("a bad header must be refused")
            .to_string();
        assert!(!e.contains('\n'), "not one line: {e}");
        assert!(e.starts_with("bad.gguf: "), "{e}");
        for n in needles {
            assert!(e.contains(n), "{e:?} lacks {n:?}");
        }
        e
    }

    #[test]
    fn a_valid_crafted_header_parses() {
        let b = Raw::default()
            .kv_u32("llama.block_count", 2)
            .tensor("w", &[32, 2], 0, 0)
            .tensor("q", &[32], 8, 256)
            .data(256 + 34)
            .bytes();
        let ct = parse(&b).unwrap();
        assert_eq!(ct.tensor_infos["w"].shape.dims(), &[2, 32]);
        assert_eq!(ct.tensor_infos["q"].ggml_dtype, GgmlDType::Q8_0);
        assert_eq!(ct.tensor_data_offset % 32, 0);
        assert_eq!(ct.metadata["llama.block_count"].to_u32().unwrap(), 2);
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = Raw::default().bytes();
        b[..4].copy_from_slice(b"FUGG");
        refused(&b, &["byte 0", "bad magic"]);
        let mut b = Raw::default().bytes();
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        refused(&b, &["byte 4", "unsupported version 7"]);
        refused(b"GGU", &["byte 0", "needs 4 more bytes"]);
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        for (at, what) in [(8, "tensors"), (16, "metadata entries")] {
            for n in [1u64 << 32, 1 << 40, 1 << 62, u64::MAX] {
                let mut b = Raw::default().kv_u32("a", 1).bytes();
                b[at..at + 8].copy_from_slice(&n.to_le_bytes());
                refused(&b, &[&format!("byte {at}"), what]);
            }
        }
    }

    #[test]
    fn huge_string_and_array_lengths_are_refused() {
        // A key whose length is 2^40.
        let mut b = Raw::default().kv_u32("key", 1).bytes();
        b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        refused(&b, &["byte 24", "metadata entry 0: key", "string bytes"]);
        // A string value of 2^40 bytes.
        let mut v = (1u64 << 40).to_le_bytes().to_vec();
        v.extend(b"abc");
        let b = Raw::default()
            .kv_raw("general.name", TYPE_STRING, &v)
            .bytes();
        refused(&b, &["metadata key `general.name`", "string bytes"]);
        // An array of 2^40 u32s, and of 2^62 strings.
        for (t, n) in [(TYPE_U32, 1u64 << 40), (TYPE_STRING, 1 << 62)] {
            let mut v = t.to_le_bytes().to_vec();
            v.extend(n.to_le_bytes());
            v.extend([0u8; 16]);
            let b = Raw::default()
                .kv_raw("tokenizer.ggml.tokens", TYPE_ARRAY, &v)
                .bytes();
            refused(&b, &["`tokenizer.ggml.tokens`", "array elements"]);
        }
    }

    #[test]
    fn bad_values_and_duplicate_keys() {
        let b = Raw::default().kv_raw("k", 13, &[0; 8]).bytes();
        refused(&b, &["`k`", "unknown value type 13"]);
        let b = Raw::default().kv_raw("flag", TYPE_BOOL, &[2]).bytes();
        refused(&b, &["`flag`", "bool is 2"]);
        let b = Raw::default().kv_u32("k", 1).kv_u32("k", 2).bytes();
        refused(&b, &["byte 41", "`k` appears twice"]);
        // Arrays of arrays of ... deeper than the limit.
        let mut v = Vec::new();
        for _ in 0..20 {
            v.extend(TYPE_ARRAY.to_le_bytes());
            v.extend(1u64.to_le_bytes());
        }
        v.extend(TYPE_U8.to_le_bytes());
        v.extend(1u64.to_le_bytes());
        v.push(0);
        let b = Raw::default().kv_raw("deep", TYPE_ARRAY, &v).bytes();
        refused(&b, &["`deep`", "nested more than"]);
    }

    #[test]
    fn overlapping_tensor_data_and_control_characters_in_names_are_refused() {
        // `w` is 32 f32 = 128 bytes from offset 0, `v` starts at 64: inside `w`'s bytes.
        let b = Raw::default()
            .tensor("w", &[32], 0, 0)
            .tensor("v", &[8], 0, 64)
            .data(256)
            .bytes();
        refused(&b, &["tensor `w`", "overlaps tensor `v`"]);
        // back to back is fine
        let b = Raw::default()
            .tensor("w", &[32], 0, 0)
            .tensor("v", &[8], 0, 128)
            .data(256)
            .bytes();
        parse(&b).unwrap();
        let b = Raw::default()
            .tensor("blk.0\nattn_k.weight", &[8], 0, 0)
            .data(64)
            .bytes();
        let e = refused(&b, &["tensor 0: name", "control character"]);
        assert!(e.contains(r"blk.0\nattn_k"), "{e}");
        let b = Raw::default().kv_u32("a\u{7}b", 1).bytes();
        refused(&b, &["metadata entry 0", "control character"]);
        let b = Raw::default().kv_u32("general.alignment", 0).bytes();
        refused(
            &b,
            &["byte 24", "`general.alignment`: 0 is not a power of two"],
        );
    }

    #[test]
    fn bad_alignment() {
        for a in [0u32, 3, 48, 1 << 31] {
            let b = Raw::default()
                .kv_u32("general.alignment", a)
                .tensor("w", &[4], 0, 0)
                .data(64)
                .bytes();
            refused(&b, &["general.alignment", "power of two"]);
        }
        let b = Raw::default()
            .kv_raw(
                "general.alignment",
                TYPE_STRING,
                &[1, 0, 0, 0, 0, 0, 0, 0, b'x'],
            )
            .bytes();
        refused(&b, &["general.alignment"]);
    }

    #[test]
    fn bad_tensor_entries() {
        let t = |name: &str, dims: &[u64], dtype: u32, offset: u64| {
            Raw::default()
                .tensor(name, dims, dtype, offset)
                .data(64)
                .bytes()
        };
        refused(
            &t("a", &[1, 1, 1, 1, 1], 0, 0),
            &["tensor `a`", "5 dimensions"],
        );
        refused(&t("a", &[], 0, 0), &["tensor `a`", "0 dimensions"]);
        refused(&t("a", &[4, 0], 0, 0), &["tensor `a`", "dimension 1 is 0"]);
        refused(
            &t("a", &[1 << 40, 1 << 40], 0, 0),
            &["tensor `a`", "more elements than the file can hold"],
        );
        refused(&t("a", &[1 << 62], 0, 0), &["tensor `a`", "more elements"]);
        refused(
            &t("a", &[u64::MAX, 2], 0, 0),
            &["tensor `a`", "more elements"],
        );
        refused(&t("a", &[4], 99, 0), &["tensor `a`", "tensor type 99"]);
        refused(&t("a", &[33], 2, 0), &["tensor `a`", "block size 32"]);
        refused(
            &t("a", &[4], 0, 7),
            &["tensor `a`", "not a multiple of the alignment 32"],
        );
        refused(&t("a", &[4], 0, 64), &["truncated", "tensor `a`"]);
        refused(&t("a", &[400], 0, 0), &["truncated", "tensor `a`"]);
        refused(
            &t("a", &[4], 0, u64::MAX - 31),
            &["tensor `a`", "overflows"],
        );
        let b = Raw::default()
            .tensor("w", &[4], 0, 0)
            .tensor("w", &[4], 0, 32)
            .data(64)
            .bytes();
        refused(&b, &["`w` appears twice"]);
    }

    #[test]
    fn every_prefix_of_a_real_header_is_refused_cleanly() {
        let b = std::fs::read(repo_file("tests/fixtures/tokenizer/tiny-spm.gguf")).unwrap();
        // Header only (tiny-spm.gguf has no tensors); every cut must be an error, never a panic.
        for cut in (0..b.len() - 64).step_by(7) {
            let e = parse(&b[..cut]).expect_err("a cut header must be refused");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn size_fields_finds_counts_lengths_and_dims() {
        let b = Raw::default()
            .kv_u32("llama.block_count", 2)
            .tensor("w", &[32, 2], 0, 0)
            .data(256)
            .bytes();
        let f = size_fields(&b);
        // version, 2 counts, key length, value type, the u32 value, name length, n_dims, 2 dims,
        // type, offset.
        assert_eq!(f.len(), 12, "{f:?}");
        assert!(f.contains(&(4, 4)) && f.contains(&(8, 8)) && f.contains(&(16, 8)));
        let value_at = 24 + 8 + "llama.block_count".len() + 4;
        assert!(f.contains(&(value_at, 4)), "{f:?}");
    }
}
