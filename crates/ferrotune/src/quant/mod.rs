//! GGML-quantized weights with our own SIMD CPU kernels and an input-gradient path (QLoRA-style
//! training: the quantized base stays frozen, gradients flow through it to the input).
//!
//! [`QuantWeight`] holds an `(out, in)` matrix as GGML blocks, row-major, each row a whole number
//! of blocks. Q4_0, Q4_1 and Q8_0 run on our kernels: activation rows are quantised per 32-value
//! block (an f32 scale per block) to 16-bit integers by default, or to 8 bits like GGML's
//! Q8_0/Q8_1 (see [`ActPrecision`], [`QuantSettings`]), then integer block dot
//! products run with AVX2 (`vpmaddwd`, `vpmaddubsw`) or AVX-512 VNNI (`vpdpwssd`, `vpdpbusd`),
//! chosen at run time, or in portable Rust. One activation row (decode) streams each weight row
//! once; many rows (prefill, training) repack 16 weight rows at a time into 8-row panels and run
//! tiles of activation rows against them. Every other type candle reads (K-quants, Q5_x, F16,
//! BF16, F32, ...) runs forward through candle's `QMatMul`, and backward through our tiled
//! dequantisation.
//!
//! Accuracy: only the activation rounding differs from `x @ dequant(W)^T`: for output `i`,
//! `|error| <= sum over blocks b of max|x_b| / (2 QMAX) * sum_{j in b} |W_ij|` (half a
//! quantisation step per activation; `QMAX` = 32767 or 127). In relative L2 terms that is about
//! 3e-5 with 16 bits and 8e-3 with 8 bits (random activations against SmolLM2's weights). The
//! 8-bit error is enough to change a small model's greedy output (SmolLM2-135M answers "What is
//! the capital of France?" with "L'Étoile..." instead of the f32 model's "The capital of France
//! is Paris."), hence the 16-bit default.
//! `backward_input` is exact up to f32 rounding by default. With
//! [`BackwardWeights::Q8Transposed`] (what training selects for its model) it instead runs the 8-bit integer
//! kernels on a transposed copy of `W` requantised to Q8_0 along the output dimension, with the
//! incoming gradient quantised to 8 bits per 32-value block: both operands at about bf16's
//! precision (8 significant bits; bf16 autocast, the usual training precision, rounds every
//! operand by up to 0.4%), for a relative L2 error near 1% in the input gradient, and 2-3x the
//! multiply throughput of the f32 path on Zen 4. Block-scaled int8 gradients are what 8-bit
//! training methods use (SwitchBack, Jetfire); on SmolLM2 the LoRA loss curve stays within
//! 1e-4 of the exact path's. The copy costs 1.06 bytes per weight.
//!
//! Threads: a dedicated pool (see [`set_num_threads`]) splits output rows across cores; small
//! matrices run on the calling thread because waking a worker costs more than the work.
mod base;

/// Refuse weights that hold NaN or an infinity (a broken checkpoint): no format quantizes them
/// into anything but garbage scales. `values` is a row-major matrix of rows of `row` values; the
/// error names the first bad value's row and column.
pub fn check_finite(values: &[f32], row: usize) -> std::result::Result<(), String> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let row = row.max(1);
            Err(format!(
                "value {} at row {}, column {} is not finite; the weights are broken",
                values[i],
                i / row,
                i % row
            ))
        }
    }
}

/// Refuse GGML blocks whose scale (`d`, and Q4_1's `m`) is NaN or an infinity: such a
/// weight runs and gives meaningless numbers. `blocks_per_row` places the first bad block.
fn check_block_scales(fmt: Fmt, data: &[u8], blocks_per_row: usize) -> crate::Result<()> {
    let scales = if fmt == Fmt::Q4_1 { 2 } else { 1 };
    for (b, blk) in data.chunks_exact(fmt.block_bytes()).enumerate() {
        // the f16 scales lead each block: `d`, then Q4_1's `m`
        for pair in blk.chunks_exact(2).take(scales) {
            let &[lo, hi] = pair else { continue };
            let v = half::f16::from_le_bytes([lo, hi]);
            if !v.is_finite() {
                return Err(crate::Error::msg(format!(
                    "block {} of row {} has a scale of {v}; the weights are broken",
                    b % blocks_per_row.max(1),
                    b / blocks_per_row.max(1)
                )));
            }
        }
    }
    Ok(())
}

pub mod bnb;
mod format;
pub mod ggml_quants;
mod kernels;
mod lut4;
mod panel;
mod pool;
#[cfg(test)]
mod tests;
mod wire;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_panel;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Storage, Tensor};
use format::{ActInt, Fmt, QAct, QK};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

pub use base::{four_bit_weight, BaseQuant, BASE_QUANT_NAMES, FOUR_BIT_BLOCKSIZE};
pub use format::ActPrecision;
pub use kernels::Isa;
pub use lut4::{BlockScales, FourBitWeight, Int8RowsWeight};
pub use pool::{num_threads, set_num_threads};

/// `FERROTUNE_ACT_BITS`: "8" selects 8 bits, "llamacpp" llama.cpp's 8-bit rounding; unset,
/// "16" or anything else, 16 bits.
fn act_bits_from_env(v: Option<&str>) -> ActPrecision {
    match v {
        Some("8") => ActPrecision::I8,
        Some("llamacpp") => ActPrecision::LlamaCpp,
        _ => ActPrecision::I16,
    }
}

/// The arithmetic of decode steps ([`QuantWeight::decode_rows_into`], what `generate` and
/// `serve` run): both must use the same one, so a served sequence's greedy output equals
/// `generate`'s whatever shares its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeArith {
    /// Activations quantised to integers per block (the [`QuantSettings::activation`]
    /// precision) and integer block dot products, as llama.cpp does. Fastest for one sequence
    /// where integer multiplies are cheap (AVX-512 VNNI); a batched step still pays the
    /// per-row integer work and scaling for every row.
    Int,
    /// Weights dequantised to f32 in registers and multiplied with the f32 activations: exact
    /// activations, and a batched step dequantises each weight block once for up to 8 rows,
    /// then runs only FMAs per row. On AVX2-only CPUs (two 256-bit FMA pipes, one or two
    /// integer multiply pipes) this makes batched decode 2-3x cheaper per row.
    F32,
}

impl DecodeArith {
    /// `FERROTUNE_DECODE_ARITH=f32` selects `F32`; unset or anything else, `Int`.
    pub fn best() -> DecodeArith {
        static BEST: OnceLock<DecodeArith> = OnceLock::new();
        *BEST.get_or_init(
            || match std::env::var("FERROTUNE_DECODE_ARITH").as_deref() {
                Ok("f32") => DecodeArith::F32,
                _ => DecodeArith::Int,
            },
        )
    }
}

/// How [`QuantWeight::backward_input`] computes `grad_y @ W`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackwardWeights {
    /// Dequantise tiles of `W` to f32 and multiply in f32: exact up to f32 rounding.
    Exact,
    /// Multiply on a transposed Q8_0 copy of `W` (built once per weight, on first use) with the
    /// integer kernels, the gradient quantised to 16 bits: faster, about 1e-3 relative error.
    Q8Transposed,
}

/// How a quantized weight runs: the activation precision of its forward kernels and how its
/// backward pass computes input gradients. Each [`QuantWeight`] holds its own, so they are
/// settings of the model that owns the weights (`Model::set_quant_settings`), not of the
/// process: one process can serve a model at 16 bits while it trains another at 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSettings {
    pub activation: ActPrecision,
    pub backward: BackwardWeights,
}

impl Default for QuantSettings {
    /// 16-bit activations (`FERROTUNE_ACT_BITS=8` selects 8; another value of the variable is
    /// ignored, so a typo never makes inference less precise) and the exact backward pass.
    fn default() -> Self {
        QuantSettings {
            activation: act_bits_from_env(std::env::var("FERROTUNE_ACT_BITS").ok().as_deref()),
            backward: BackwardWeights::Exact,
        }
    }
}

impl QuantSettings {
    /// One byte, for an atomic: bit 0 = 8-bit activations, bit 1 = Q8 transposed backward,
    /// bit 2 = llama.cpp's 8-bit rounding.
    fn encode(self) -> u8 {
        u8::from(self.activation == ActPrecision::I8)
            | (u8::from(self.backward == BackwardWeights::Q8Transposed) << 1)
            | (u8::from(self.activation == ActPrecision::LlamaCpp) << 2)
    }
    fn decode(b: u8) -> Self {
        QuantSettings {
            activation: if b & 4 != 0 {
                ActPrecision::LlamaCpp
            } else if b & 1 != 0 {
                ActPrecision::I8
            } else {
                ActPrecision::I16
            },
            backward: if b & 2 != 0 {
                BackwardWeights::Q8Transposed
            } else {
                BackwardWeights::Exact
            },
        }
    }
}

/// The pool's fork/join entry point, exposed for the overhead benchmark only.
#[doc(hidden)]
pub fn parallel_chunks<F: Fn(std::ops::Range<usize>) + Sync>(
    n_items: usize,
    min_chunk: usize,
    threads: usize,
    f: F,
) {
    pool::for_each_chunk(n_items, min_chunk, threads, f)
}

/// How a [`QuantWeight`] stores its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// GGML blocks (GGUF's types).
    Ggml(GgmlDType),
    /// bitsandbytes' 4-bit NormalFloat, one absmax per block (see [`FourBitWeight`]).
    Nf4,
    /// bitsandbytes' 4-bit float.
    Fp4,
    /// LLM.int8's row-wise int8 (weight only; see [`Int8RowsWeight`]).
    Int8,
}

impl WeightFormat {
    /// Lower-case name, as config files and reports write it (`q4_1`, `nf4`, ...).
    pub fn name(self) -> String {
        match self {
            WeightFormat::Ggml(d) => format!("{d:?}").to_lowercase(),
            WeightFormat::Nf4 => "nf4".into(),
            WeightFormat::Fp4 => "fp4".into(),
            WeightFormat::Int8 => "int8".into(),
        }
    }
}

/// An `(out, in)` weight matrix stored quantized: GGML blocks (row-major, rows are whole
/// blocks), or a bitsandbytes format (4-bit blocks that lie within rows, or int8 rows).
pub struct QuantWeight {
    out_dim: usize,
    in_dim: usize,
    format: WeightFormat,
    repr: Repr,
    /// `W^T` as Q8_0 `(in, out)` for [`BackwardWeights::Q8Transposed`]; `None` inside when the
    /// output dimension is not a whole number of blocks.
    transposed: OnceLock<Option<Box<QuantWeight>>>,
    /// The decode layout of an `Own` weight (see `panel.rs`), built on the first decode step.
    panels: OnceLock<panel::Panels>,
    /// [`QuantSettings::encode`]d: how this weight runs (see [`QuantWeight::set_settings`]).
    settings: AtomicU8,
}

enum Repr {
    /// Q4_0 / Q4_1 / Q8_0: raw block bytes, run by our kernels.
    Own { fmt: Fmt, data: Vec<u8> },
    /// Any other type: candle's tensor (CPU); forward through `QMatMul`, built on first use
    /// (for F16/BF16/F32 it holds a dequantised f32 copy, so only build it when asked).
    Candle {
        q: Arc<QTensor>,
        mm: OnceLock<QMatMul>,
    },
    /// NF4 / FP4: decoded to f32 per row (decode) or per tile of rows (batched, then gemm).
    FourBit(FourBitWeight),
    /// Row-wise int8, computed like `FourBit`.
    Int8(Int8RowsWeight),
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantWeight({}x{}, {:?})",
            self.out_dim,
            self.in_dim,
            self.format.name()
        )
    }
}

/// A vector of `n` values that `fill` writes, all of them, through the pointer it is given.
/// The batched kernels overwrite their whole output: zero-filling it first would be a serial
/// pass over megabytes per call on the thread that allocates it (3% of a QLoRA step on a
/// 2-core AVX2 CPU went to such fills).
///
/// # Safety
/// `fill` must write every one of the `n` values before it returns.
unsafe fn written_vec(n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(n);
    fill(v.as_mut_ptr());
    v.set_len(n);
    v
}

/// A raw pointer that may be shared by worker threads writing disjoint ranges.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// A method (not field access) so closures capture the whole `Sync` wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}

/// Weight blocks per thread below which a matvec does not split further: about a microsecond
/// of kernel time. Handing a chunk to a spinning worker costs a few hundred nanoseconds (the
/// pool's no-work fork/join measured 0.1 us, against 13 us for `rayon::join`), so a 192x576
/// matvec (3456 blocks, ~3 us) still splits in two.
const MIN_BLOCKS_PER_CHUNK: usize = 1024;

fn qerr(m: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(m.to_string())
}

impl QuantWeight {
    /// From a 2-D GGUF tensor of shape `(out, in)`. Any device; the weight is kept on the CPU.
    pub fn from_qtensor(q: QTensor) -> crate::Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2().map_err(|_| {
            crate::Error::msg(format!(
                "quantized weight must be 2-D, got shape {:?}",
                q.shape()
            ))
        })?;
        let dtype = q.dtype();
        let bs = dtype.block_size();
        if in_dim % bs != 0 {
            return Err(crate::Error::msg(format!(
                "quantized weight {out_dim}x{in_dim} ({dtype:?}): row length {in_dim} is not a multiple of the block size {bs}"
            )));
        }
        let repr = match Fmt::from_ggml(dtype) {
            Some(fmt) => {
                let data = q.data()?.into_owned();
                check_block_scales(fmt, &data, in_dim / bs)?;
                Repr::Own { fmt, data }
            }
            None => {
                let q = if q.device().is_cpu() {
                    q
                } else {
                    let bytes = aligned_copy(&q.data()?);
                    QTensor::new(
                        QStorage::from_data(Cow::Borrowed(bytes.as_bytes()), &Device::Cpu, dtype)?,
                        (out_dim, in_dim),
                    )?
                };
                Repr::Candle {
                    q: Arc::new(q),
                    mm: OnceLock::new(),
                }
            }
        };
        let w = QuantWeight {
            out_dim,
            in_dim,
            format: WeightFormat::Ggml(dtype),
            repr,
            transposed: OnceLock::new(),
            panels: OnceLock::new(),
            settings: AtomicU8::new(QuantSettings::default().encode()),
        };
        let expect = out_dim * (in_dim / bs) * dtype.type_size();
        if w.storage_bytes() != expect {
            return Err(crate::Error::msg(format!(
                "quantized weight {out_dim}x{in_dim} ({dtype:?}): {} bytes of data, expected {expect}",
                w.storage_bytes()
            )));
        }
        Ok(w)
    }

    /// Quantise a 2-D float tensor `(out, in)` to `dtype` (e.g. f32 -> Q8_0 / Q4_1).
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> crate::Result<Self> {
        let (out_dim, in_dim) = w.dims2().map_err(|_| {
            crate::Error::msg(format!(
                "quantize: weight must be 2-D, got shape {:?}",
                w.shape()
            ))
        })?;
        let bs = dtype.block_size();
        if in_dim % bs != 0 {
            return Err(crate::Error::msg(format!(
                "quantize: row length {in_dim} of a {out_dim}x{in_dim} weight is not a multiple of the {dtype:?} block size {bs}"
            )));
        }
        let w = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        Self::from_qtensor(QTensor::quantize(&w, dtype)?)
    }

    /// A copy with output rows permuted: row `i` of the result is row `perm[i]` of `self`.
    /// Exact (blocks are copied, not requantised). Used to undo GGUF's q/k RoPE permutation.
    pub fn permute_rows(&self, perm: &[usize]) -> crate::Result<Self> {
        let n = self.out_dim;
        let mut seen = vec![false; n];
        if perm.len() != n
            || !perm
                .iter()
                .all(|&p| p < n && !std::mem::replace(&mut seen[p], true))
        {
            return Err(crate::Error::msg(format!(
                "permute_rows: expected a permutation of 0..{n}, got {} indices",
                perm.len()
            )));
        }
        let rb = self.row_bytes();
        let permute = |src: &[u8], dst: &mut [u8]| {
            for (d, &p) in dst.chunks_exact_mut(rb).zip(perm) {
                d.copy_from_slice(&src[p * rb..(p + 1) * rb]);
            }
        };
        let repr = match &self.repr {
            Repr::Own { fmt, data } => {
                let mut out = vec![0u8; data.len()];
                permute(data, &mut out);
                Repr::Own {
                    fmt: *fmt,
                    data: out,
                }
            }
            Repr::Candle { q, .. } => {
                let src = q.data()?;
                let mut out = AlignedBytes::zeroed(src.len());
                permute(&src, out.as_bytes_mut());
                let st =
                    QStorage::from_data(Cow::Borrowed(out.as_bytes()), &Device::Cpu, q.dtype())?;
                Repr::Candle {
                    q: Arc::new(QTensor::new(st, (self.out_dim, self.in_dim))?),
                    mm: OnceLock::new(),
                }
            }
            Repr::FourBit(_) | Repr::Int8(_) => {
                // Only GGUF's q/k RoPE order needs this, and GGUF has no bitsandbytes formats
                // (a nested absmax block spans rows, so a row permutation would not be exact).
                return Err(crate::Error::msg(format!(
                    "permute_rows: not supported for {} weights",
                    self.format.name()
                )));
            }
        };
        Ok(QuantWeight {
            out_dim: self.out_dim,
            in_dim: self.in_dim,
            format: self.format,
            repr,
            transposed: OnceLock::new(),
            panels: OnceLock::new(),
            settings: AtomicU8::new(self.settings.load(Ordering::Relaxed)),
        })
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// How the values are stored.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// The GGML type, for GGML-format weights.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match self.format {
            WeightFormat::Ggml(d) => Some(d),
            _ => None,
        }
    }

    /// The [`BaseQuant`] that reproduces this weight's format (what re-quantizing a merged
    /// weight to the same format means); `None` for GGML types `BaseQuant` does not write.
    pub fn base_quant(&self) -> Option<BaseQuant> {
        match (&self.format, &self.repr) {
            (WeightFormat::Nf4 | WeightFormat::Fp4, Repr::FourBit(w)) => Some(BaseQuant::FourBit {
                kind: if self.format == WeightFormat::Nf4 {
                    bnb::FourBitKind::Nf4
                } else {
                    bnb::FourBitKind::Fp4
                },
                double_quant: matches!(w.scales, BlockScales::Nested { .. }),
            }),
            (WeightFormat::Int8, _) => Some(BaseQuant::Int8),
            (WeightFormat::Ggml(d), _) => {
                matches!(d, GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1)
                    .then_some(BaseQuant::Ggml(*d))
            }
            _ => None,
        }
    }

    /// Values per block along a row (the unit of `dequant_row_blocks`; int8 rows: 1).
    fn block_size(&self) -> usize {
        match (&self.format, &self.repr) {
            (WeightFormat::Ggml(d), _) => d.block_size(),
            (_, Repr::FourBit(w)) => w.blocksize,
            _ => 1,
        }
    }

    /// A 4-bit weight in bitsandbytes' layout (see [`FourBitWeight`]); `nf4` picks the format
    /// name only (the table is in `w`). The row length must be a multiple of the block size.
    pub fn from_four_bit(
        out_dim: usize,
        in_dim: usize,
        nf4: bool,
        w: FourBitWeight,
    ) -> crate::Result<Self> {
        w.check(out_dim, in_dim).map_err(crate::Error::msg)?;
        Ok(Self::with_repr(
            out_dim,
            in_dim,
            if nf4 {
                WeightFormat::Nf4
            } else {
                WeightFormat::Fp4
            },
            Repr::FourBit(w),
        ))
    }

    /// An LLM.int8 row-wise weight (see [`Int8RowsWeight`]).
    pub fn from_int8_rows(out_dim: usize, in_dim: usize, w: Int8RowsWeight) -> crate::Result<Self> {
        w.check(out_dim, in_dim).map_err(crate::Error::msg)?;
        Ok(Self::with_repr(
            out_dim,
            in_dim,
            WeightFormat::Int8,
            Repr::Int8(w),
        ))
    }

    fn with_repr(out_dim: usize, in_dim: usize, format: WeightFormat, repr: Repr) -> Self {
        QuantWeight {
            out_dim,
            in_dim,
            format,
            repr,
            transposed: OnceLock::new(),
            panels: OnceLock::new(),
            settings: AtomicU8::new(QuantSettings::default().encode()),
        }
    }

    /// How this weight runs (see [`QuantSettings`]).
    pub fn settings(&self) -> QuantSettings {
        QuantSettings::decode(self.settings.load(Ordering::Relaxed))
    }

    /// Change how this weight runs, from its next call on (all threads).
    pub fn set_settings(&self, s: QuantSettings) {
        self.settings.store(s.encode(), Ordering::Relaxed);
    }

    /// Bytes of block data held (what the weight costs in memory).
    pub fn storage_bytes(&self) -> usize {
        match &self.repr {
            Repr::Own { data, .. } => data.len() + self.panels.get().map_or(0, |p| p.data.len()),
            Repr::Candle { q, .. } => q.storage_size_in_bytes(),
            Repr::FourBit(w) => w.storage_bytes(),
            Repr::Int8(w) => w.storage_bytes(),
        }
    }

    /// Bytes per row of a GGML-format weight.
    fn row_bytes(&self) -> usize {
        match self.format {
            WeightFormat::Ggml(d) => self.in_dim / d.block_size() * d.type_size(),
            _ => 0,
        }
    }

    /// `y = x @ W^T`: `x (..., in)` -> `(..., out)`. No autograd (see [`linear`] for that).
    /// f16/bf16 inputs are computed in f32 and converted back. Non-CPU inputs fall back to a
    /// dequantised matmul on their device.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        if dims.last() != Some(&self.in_dim) {
            candle_core::bail!(
                "quantized linear: input shape {:?} does not end in {} ({self:?})",
                x.shape(),
                self.in_dim
            )
        }
        if !x.device().is_cpu() {
            let w = self
                .dequantize()?
                .to_device(x.device())?
                .to_dtype(x.dtype())?;
            return x.broadcast_matmul(&w.t()?);
        }
        let in_dtype = x.dtype();
        let xf = x.detach().to_dtype(DType::F32)?.contiguous()?;
        let m = xf.elem_count() / self.in_dim;
        let y = with_f32_slice(&xf, |s| self.forward_slice(s, m))?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty dims") = self.out_dim;
        Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(in_dtype)
    }

    /// `m` rows of `in` values -> `m` rows of `out` values.
    pub(crate) fn forward_slice(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        debug_assert_eq!(x.len(), m * self.in_dim);
        match &self.repr {
            Repr::Own { .. } => {
                let p = self.settings().activation;
                if m == 1 {
                    let mut y = vec![0f32; self.out_dim];
                    self.matvec_with(Isa::best(), p, num_threads(), x, &mut y);
                    return Ok(y);
                }
                // SAFETY: the batched kernels write every one of the m x out values.
                Ok(unsafe {
                    written_vec(m * self.out_dim, |y| {
                        self.matmul_act_dispatch(Isa::best(), p, num_threads(), x, m, y)
                    })
                })
            }
            Repr::FourBit(_) | Repr::Int8(_) => {
                let n = m * self.out_dim;
                // SAFETY: `decoded_forward_into` writes every one of the m x out values and
                // reads none of them (its GEMM runs with `read_dst` off).
                Ok(unsafe {
                    written_vec(n, |y| {
                        let y = std::slice::from_raw_parts_mut(y, n);
                        self.decoded_forward_into(Isa::best(), num_threads(), x, m, y)
                    })
                })
            }
            Repr::Candle { q, mm } => {
                let mm = match mm.get() {
                    Some(mm) => mm,
                    None => {
                        let built = QMatMul::from_arc(q.clone())?;
                        mm.get_or_init(|| built)
                    }
                };
                let xt = Tensor::from_slice(x, (m, self.in_dim), &Device::Cpu)?;
                mm.forward(&xt)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }

    /// Decode fast path: one activation row, `out = W x`. Panics if `x.len() != in` or
    /// `out.len() != out_dim` (a programming error, not a user input).
    pub fn matvec_into(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(
            x.len(),
            self.in_dim,
            "matvec_into: x has {} values, the weight has {} columns",
            x.len(),
            self.in_dim
        );
        assert_eq!(
            out.len(),
            self.out_dim,
            "matvec_into: out has {} values, the weight has {} rows",
            out.len(),
            self.out_dim
        );
        match &self.repr {
            Repr::Own { .. } => self.matvec_with(
                Isa::best(),
                self.settings().activation,
                num_threads(),
                x,
                out,
            ),
            Repr::FourBit(_) | Repr::Int8(_) => {
                self.decoded_forward_into(Isa::best(), num_threads(), x, 1, out)
            }
            Repr::Candle { .. } => {
                let y = self
                    .forward_slice(x, 1)
                    .expect("candle quantized matvec on CPU tensors");
                out.copy_from_slice(&y);
            }
        }
    }

    /// [`Self::matvec_into`] with an explicit kernel level, activation precision and thread
    /// count (tests, benchmarks).
    #[doc(hidden)]
    pub fn matvec_with(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        thread_local! {
            // decode calls this hundreds of times per token: reuse the quantised activation
            static ACT8: std::cell::RefCell<QAct<i8>> = std::cell::RefCell::new(QAct::zeros(0, 0));
            static ACT16: std::cell::RefCell<QAct<i16>> =
                std::cell::RefCell::new(QAct::zeros(0, 0));
        }
        match prec {
            ActPrecision::I8 | ActPrecision::LlamaCpp => ACT8
                .with(|cell| self.matvec_act(isa, prec, threads, x, out, &mut cell.borrow_mut())),
            ActPrecision::I16 => ACT16
                .with(|cell| self.matvec_act(isa, prec, threads, x, out, &mut cell.borrow_mut())),
        }
    }

    fn matvec_act<T: ActInt>(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        out: &mut [f32],
        act: &mut QAct<T>,
    ) {
        let Repr::Own { fmt, data } = &self.repr else {
            panic!("matvec_with: {} has no own kernel", self.format.name())
        };
        let (fmt, k, n) = (*fmt, self.in_dim, self.out_dim);
        assert!(x.len() == k && out.len() == n);
        if act.k != k || act.rows != 1 {
            *act = QAct::zeros(1, k);
        }
        quantize_blocks(isa, prec, fmt, x, &mut act.qs, &mut act.ds);
        let act = &*act;
        let nb = k / QK;
        let rb = nb * fmt.block_bytes();
        let min_rows = MIN_BLOCKS_PER_CHUNK.div_ceil(nb).max(16);
        let outp = SyncPtr(out.as_mut_ptr());
        pool::for_each_chunk(n, min_rows, threads, |rows| {
            let (r0, r1) = (rows.start, rows.end);
            // SAFETY: chunks are disjoint row ranges of `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(outp.get().add(r0), r1 - r0) };
            kernels::gemv(isa, fmt, &data[r0 * rb..r1 * rb], act, 0, o);
        });
    }

    /// Batched forward with an explicit kernel level, activation precision and thread count
    /// (tests, benchmarks): `x` is `m x in`, `out` is `m x out`. Quantises `x` once, then runs
    /// tiles of activation rows x weight rows, each thread owning a range of weight rows.
    #[doc(hidden)]
    pub fn matmul_with(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        assert!(out.len() == m * self.out_dim);
        // SAFETY: `out` holds the m x out values the kernels write.
        unsafe { self.matmul_act_dispatch(isa, prec, threads, x, m, out.as_mut_ptr()) }
    }

    /// [`Self::matmul_with`] into `m x out` values at `out`, every one of them written (the
    /// callers that allocate the output skip zero-filling it).
    ///
    /// # Safety
    /// `out` must be valid for writes of `m * out_dim` values.
    unsafe fn matmul_act_dispatch(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        m: usize,
        out: *mut f32,
    ) {
        match prec {
            ActPrecision::I8 | ActPrecision::LlamaCpp => {
                self.matmul_act::<i8>(isa, prec, false, threads, x, m, out)
            }
            ActPrecision::I16 => self.matmul_act::<i16>(isa, prec, false, threads, x, m, out),
        }
    }

    /// `narrow`: this is a Q8_0 weight with values in -63..=63 (a narrow backward copy) and the
    /// activations are 8-bit: [`kernels::gemm_q8_narrow`] runs.
    ///
    /// # Safety
    /// `out` must be valid for writes of `m * out_dim` values; all of them are written.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul_act<T: ActInt>(
        &self,
        isa: Isa,
        prec: ActPrecision,
        narrow: bool,
        threads: usize,
        x: &[f32],
        m: usize,
        out: *mut f32,
    ) {
        let Repr::Own { fmt, data } = &self.repr else {
            panic!("matmul_with: {} has no own kernel", self.format.name())
        };
        let (fmt, k, n) = (*fmt, self.in_dim, self.out_dim);
        assert!(x.len() == m * k);
        let act = quantize_act_rows::<T>(isa, prec, fmt, threads, x, m, k);
        let rb = act.nb() * fmt.block_bytes();
        let outp = SyncPtr(out);
        // 16 weight rows = two 8-row panels per kernel call; small units so every thread gets work
        pool::for_each_chunk_rows(m, n.div_ceil(16), 1, threads, |units| {
            let (c0, c1) = (units.start * 16, (units.end * 16).min(n));
            // SAFETY: `out` is m x n; this chunk alone writes its columns c0..c1; with
            // `narrow` the caller vouches for the weights' -63..=63 range.
            let (w, out) = (&data[c0 * rb..c1 * rb], outp.get().add(c0));
            if narrow && fmt == Fmt::Q8_0 {
                kernels::gemm_q8_narrow(isa, w, c1 - c0, &act, out, n)
            } else {
                kernels::gemm(isa, fmt, w, c1 - c0, &act, out, n)
            }
        });
    }

    /// Decode columns of row `row` of a bitsandbytes-format weight: blocks `b0..b1`.
    fn decode_bnb(&self, isa: Isa, row: usize, b0: usize, b1: usize, out: &mut [f32]) {
        match &self.repr {
            Repr::FourBit(w) => w.decode(isa, self.in_dim, row, b0, b1, out),
            Repr::Int8(w) => w.decode(self.in_dim, row, b0, b1, out),
            _ => unreachable!("decode_bnb on a GGML weight"),
        }
    }

    /// `y = x @ W^T` for the bitsandbytes formats (`x`: `m x in`, `y`: `m x out`). One row:
    /// each weight row decoded into L1 and dotted with `x`. More: tiles of weight rows decoded
    /// to f32 and multiplied with gemm, each thread owning a range of output columns.
    #[doc(hidden)]
    pub fn decoded_forward_into(
        &self,
        isa: Isa,
        threads: usize,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) {
        let (n, k) = (self.out_dim, self.in_dim);
        assert!(x.len() == m * k && y.len() == m * n);
        if m == 0 || n == 0 {
            return;
        }
        let nbk = k / self.block_size();
        let yp = SyncPtr(y.as_mut_ptr());
        if m > 1
            && self.settings().activation == ActPrecision::I8
            && k.is_multiple_of(QK)
            && matches!(&self.repr, Repr::FourBit(w) if w.blocksize.is_multiple_of(QK))
        {
            return self.four_bit_q8_forward(isa, threads, x, m, y);
        }
        if m == 1 {
            thread_local! {
                static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            // about 32K weights per chunk: a few microseconds of decoding
            let min_rows = (32 * 1024 / k.max(1)).max(4);
            pool::for_each_chunk(n, min_rows, threads, |rows| {
                ROW.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    buf.resize(k, 0.0);
                    for r in rows {
                        self.decode_bnb(isa, r, 0, nbk, &mut buf);
                        // SAFETY: each chunk writes its own rows of `y`.
                        unsafe { *yp.get().add(r) = lut4::dot(isa, &buf, x) };
                    }
                });
            });
            return;
        }
        // rows per tile: ~256 KiB of f32 (L2), a multiple of 16, and enough tiles for every thread
        let by_cache = (64 * 1024 / k.max(1)).clamp(16, 256);
        let t_rows = by_cache
            .min(n.div_ceil(threads.max(1)))
            .next_multiple_of(16);
        pool::for_each_chunk_rows(m, n.div_ceil(t_rows), 1, threads, |tiles| {
            let mut tile = vec![0f32; t_rows * k];
            for ti in tiles {
                let n0 = ti * t_rows;
                let t = t_rows.min(n - n0);
                for i in 0..t {
                    self.decode_bnb(isa, n0 + i, 0, nbk, &mut tile[i * k..(i + 1) * k]);
                }
                // SAFETY: dst is y[:, n0..n0+t] (row stride n), written by this chunk only; lhs
                // is x (m x k, row stride k); rhs is the tile transposed (k x t: element
                // (kk, j) at tile[j * k + kk]).
                unsafe {
                    gemm::gemm(
                        m,
                        t,
                        k,
                        yp.get().add(n0),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        k as isize,
                        1,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            }
        });
    }

    /// The training forward of a 4-bit weight with 8-bit activations: each thread converts its
    /// weight rows to Q8_0 (see [`FourBitWeight::row_to_q8_0`]) and runs the integer Q8_0
    /// kernels against the activations, quantized once; on AVX2 the integer products run at
    /// about twice the f32 GEMM's rate.
    ///
    /// On AVX2 without AVX-512 the activations are quantized to 16 bits instead: full-range
    /// Q8_0 weights against 8-bit activations need the sign trick (`vpsignb`, `vpmaddubsw`,
    /// `vpmaddwd` per 32 products) where weights widened to i16 need one `vpmaddwd` per 16, and
    /// the 16-bit kernel is the faster one there (`quant_bench one-batch q8_0 1536 576 1024 1`,
    /// Zen 4 capped at AVX2: 67.7 against 58.3 GMAC/s; `quant_bench train 1024 1`, NF4's
    /// forward over SmolLM2's four layer shapes: 38.2-39.1 ms → 32.6-32.8 with the 4 x 2
    /// register tile its 16-bit Q8_0 kernel has for this), besides being the more exact (the
    /// DialogSum validation loss of the NF4 base before training: 2.9030 → 2.8987; exact f32
    /// 2.8904).
    fn four_bit_q8_forward(&self, isa: Isa, threads: usize, x: &[f32], m: usize, y: &mut [f32]) {
        if isa == Isa::Avx2 {
            self.four_bit_q8_forward_with::<i16>(isa, ActPrecision::I16, threads, x, m, y)
        } else {
            self.four_bit_q8_forward_with::<i8>(isa, ActPrecision::I8, threads, x, m, y)
        }
    }

    fn four_bit_q8_forward_with<T: ActInt>(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) {
        let Repr::FourBit(w) = &self.repr else {
            unreachable!("four_bit_q8_forward on a {} weight", self.format.name())
        };
        let (n, k) = (self.out_dim, self.in_dim);
        let act = quantize_act_rows::<T>(isa, prec, Fmt::Q8_0, threads, x, m, k);
        let rb = k / QK * Fmt::Q8_0.block_bytes();
        let outp = SyncPtr(y.as_mut_ptr());
        // Full-range rows even where the backward copies are narrow: narrowed rows ran this
        // product a fifth faster on AVX2, but moved NF4's validation loss on DialogSum from
        // 2.9033 to 2.9113 before training (the forward is the loss; the backward's narrowing
        // left the loss curve as close to the exact one as the full copy does).
        pool::for_each_chunk_rows(m, n.div_ceil(16), 1, threads, |units| {
            let (c0, c1) = (units.start * 16, (units.end * 16).min(n));
            let mut rows = vec![0u8; (c1 - c0) * rb];
            for (i, r) in (c0..c1).enumerate() {
                w.row_to_q8_0(k, r, &mut rows[i * rb..(i + 1) * rb]);
            }
            // SAFETY: `out` is m x n; this chunk alone writes its columns c0..c1.
            unsafe { kernels::gemm(isa, Fmt::Q8_0, &rows, c1 - c0, &act, outp.get().add(c0), n) };
        });
    }

    /// Dequantise blocks `b0..b1` of row `row` into `out` (`(b1 - b0) * block_size` values).
    fn dequant_row_blocks(
        &self,
        row: usize,
        b0: usize,
        b1: usize,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let ts = self.ggml_dtype().map_or(0, |d| d.type_size());
        let start = row * self.row_bytes();
        let (lo, hi) = (start + b0 * ts, start + b1 * ts);
        match &self.repr {
            Repr::Own { fmt, data } => kernels::dequant(Isa::best(), *fmt, &data[lo..hi], out),
            Repr::Candle { q, .. } => {
                let data = q.data()?;
                // `data` is candle's typed block vector, so every block boundary is aligned
                let st = q.dtype().from_data(Cow::Borrowed(&data[lo..hi]));
                match st.dequantize(out.len())? {
                    CpuStorage::F32(v) => out.copy_from_slice(&v),
                    _ => candle_core::bail!("dequantize of {:?} did not give f32", q.dtype()),
                }
            }
            Repr::FourBit(w) => w.decode(Isa::best(), self.in_dim, row, b0, b1, out),
            Repr::Int8(w) => w.decode(self.in_dim, row, b0, b1, out),
        }
        Ok(())
    }

    /// `grad_x = grad_y @ dequant(W)`: `grad_y (..., out)` -> `(..., in)`. W is dequantised a
    /// tile of rows at a time inside the kernel, never as a whole matrix; each thread owns a
    /// range of input columns.
    /// How: the weight's [`QuantSettings::backward`].
    pub fn backward_input(&self, grad_y: &Tensor) -> candle_core::Result<Tensor> {
        self.backward_input_with(grad_y, self.settings().backward)
    }

    /// [`Self::backward_input`] with an explicit method instead of the weight's setting.
    pub fn backward_input_with(
        &self,
        grad_y: &Tensor,
        method: BackwardWeights,
    ) -> candle_core::Result<Tensor> {
        let dims = grad_y.dims();
        if dims.last() != Some(&self.out_dim) {
            candle_core::bail!(
                "quantized linear backward: grad shape {:?} does not end in {} ({self:?})",
                grad_y.shape(),
                self.out_dim
            )
        }
        if !grad_y.device().is_cpu() {
            let w = self
                .dequantize()?
                .to_device(grad_y.device())?
                .to_dtype(grad_y.dtype())?;
            return grad_y.broadcast_matmul(&w);
        }
        let in_dtype = grad_y.dtype();
        let g = grad_y.detach().to_dtype(DType::F32)?.contiguous()?;
        let m = g.elem_count() / self.out_dim;
        let gx = with_f32_slice(&g, |s| self.backward_input_slice(s, m, method))?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty dims") = self.in_dim;
        Tensor::from_vec(gx, out_dims, &Device::Cpu)?.to_dtype(in_dtype)
    }

    /// [`Self::backward_input_with`] on `m` rows of `out` f32 values: `m` rows of `in` values.
    pub(crate) fn backward_input_slice(
        &self,
        gy: &[f32],
        m: usize,
        method: BackwardWeights,
    ) -> candle_core::Result<Vec<f32>> {
        debug_assert_eq!(gy.len(), m * self.out_dim);
        let transposed = match method {
            BackwardWeights::Exact => None,
            BackwardWeights::Q8Transposed => self.transposed_q8()?,
        };
        match transposed {
            // 8-bit gradient blocks whatever the forward's activation setting (see
            // `BackwardWeights::Q8Transposed`)
            // SAFETY: the batched kernels write every one of the m x in values.
            Some(t) => Ok(unsafe {
                written_vec(m * self.in_dim, |gx| {
                    t.matmul_act::<i8>(
                        Isa::best(),
                        ActPrecision::I8,
                        kernels::narrow_q8_backward(),
                        num_threads(),
                        gy,
                        m,
                        gx,
                    )
                })
            }),
            None => self.backward_slice(gy, m, num_threads()),
        }
    }

    fn backward_slice(
        &self,
        gy: &[f32],
        m: usize,
        threads: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let (n, k) = (self.out_dim, self.in_dim);
        let bs = self.block_size();
        let nbk = k / bs;
        let mut gx = vec![0f32; m * k];
        if m == 0 || n == 0 || k == 0 {
            return Ok(gx);
        }
        let gxp = SyncPtr(gx.as_mut_ptr());
        let err = std::sync::Mutex::new(None);
        // at least 64 columns per thread so each tile product has some width
        let min_blocks = 64usize.div_ceil(bs);
        pool::for_each_chunk_rows(m, nbk, min_blocks, threads, |blocks| {
            let (c0, width) = (blocks.start * bs, blocks.len() * bs);
            // rows per tile: at least 128 (fewer made the tile products short in their inner
            // dimension and 25% slower than one f32 matmul; 128+ matches it), about 512 KiB of f32
            let t_rows = (128 * 1024 / width).clamp(128, 512).min(n);
            let mut tile = vec![0f32; t_rows * width];
            for n0 in (0..n).step_by(t_rows) {
                let t = t_rows.min(n - n0);
                for i in 0..t {
                    if let Err(e) = self.dequant_row_blocks(
                        n0 + i,
                        blocks.start,
                        blocks.end,
                        &mut tile[i * width..(i + 1) * width],
                    ) {
                        *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
                // SAFETY: dst is the m x width column block c0.. of gx (row stride k), which only
                // this chunk writes; lhs is gy[:, n0..n0+t] (row stride n); rhs is the tile.
                unsafe {
                    gemm::gemm(
                        m,
                        width,
                        t,
                        gxp.get().add(c0),
                        1,
                        k as isize,
                        n0 > 0,
                        gy.as_ptr().add(n0),
                        1,
                        n as isize,
                        tile.as_ptr(),
                        1,
                        width as isize,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            }
        });
        if let Some(e) = err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        Ok(gx)
    }

    /// `W^T` requantised to Q8_0, built on first call (in parallel, one 32-column block of `W`
    /// at a time, so the f32 scratch stays at `out x 32` per thread). `None` when `out` is not
    /// a multiple of 32 (the Q8_0 block runs along it).
    /// Its values are narrowed to -63..=63 where [`kernels::narrow_q8_backward`] says so.
    fn transposed_q8(&self) -> candle_core::Result<Option<&QuantWeight>> {
        if let Some(t) = self.transposed.get() {
            return Ok(t.as_deref());
        }
        let qmax = if kernels::narrow_q8_backward() {
            63.0
        } else {
            127.0
        };
        let built = self.build_transposed_q8(qmax)?.map(Box::new);
        Ok(self.transposed.get_or_init(|| built).as_deref())
    }

    fn build_transposed_q8(&self, qmax: f32) -> candle_core::Result<Option<QuantWeight>> {
        let (n, k) = (self.out_dim, self.in_dim);
        let bs = self.block_size();
        if n % QK != 0 || n == 0 || k == 0 || bs == 0 {
            return Ok(None);
        }
        // Work in units of whole weight blocks along `in`: every row of W^T in a unit comes
        // from the same dequantised columns.
        let unit = bs.max(QK).next_multiple_of(bs);
        let units = k.div_ceil(unit);
        let row_bytes = n / QK * 34;
        let mut data = vec![0u8; k * row_bytes];
        let dp = SyncPtr(data.as_mut_ptr());
        let err = std::sync::Mutex::new(None);
        pool::for_each_chunk(units, 1, num_threads(), |chunk| {
            let mut cols = vec![0f32; n * unit];
            let mut row = vec![0f32; n];
            for u in chunk {
                let c0 = u * unit;
                let width = unit.min(k - c0);
                for r in 0..n {
                    if let Err(e) = self.dequant_row_blocks(
                        r,
                        c0 / bs,
                        (c0 + width) / bs,
                        &mut cols[r * width..(r + 1) * width],
                    ) {
                        *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
                for c in 0..width {
                    for (r, v) in row.iter_mut().enumerate() {
                        *v = cols[r * width + c];
                    }
                    // SAFETY: row c0 + c of the output is written by this unit only.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            dp.get().add((c0 + c) * row_bytes),
                            row_bytes,
                        )
                    };
                    format::quantize_row_q8_0_to(&row, out, qmax);
                }
            }
        });
        if let Some(e) = err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        Ok(Some(QuantWeight {
            out_dim: k,
            in_dim: n,
            format: WeightFormat::Ggml(GgmlDType::Q8_0),
            repr: Repr::Own {
                fmt: Fmt::Q8_0,
                data,
            },
            transposed: OnceLock::new(),
            panels: OnceLock::new(),
            settings: AtomicU8::new(QuantSettings::default().encode()),
        }))
    }

    /// The whole matrix as f32 `(out, in)`.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        match &self.repr {
            Repr::Own { fmt, data } => {
                let mut out = vec![0f32; self.out_dim * self.in_dim];
                kernels::dequant(Isa::best(), *fmt, data, &mut out);
                Tensor::from_vec(out, (self.out_dim, self.in_dim), &Device::Cpu)
            }
            Repr::Candle { q, .. } => q.dequantize(&Device::Cpu),
            Repr::FourBit(_) | Repr::Int8(_) => {
                let (n, k) = (self.out_dim, self.in_dim);
                let nbk = k / self.block_size();
                let mut out = vec![0f32; n * k];
                for (r, o) in out.chunks_exact_mut(k.max(1)).enumerate() {
                    self.dequant_row_blocks(r, 0, nbk, o)?;
                }
                Tensor::from_vec(out, (n, k), &Device::Cpu)
            }
        }
    }

    /// Rows `ids` as f32 `(ids.len(), in)` (quantized token embeddings).
    pub fn embedding(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let k = self.in_dim;
        let nbk = k / self.block_size();
        let mut out = vec![0f32; ids.len() * k];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            if id as usize >= self.out_dim {
                candle_core::bail!(
                    "embedding: token id {id} is out of range for {} rows",
                    self.out_dim
                )
            }
            self.dequant_row_blocks(id as usize, 0, nbk, o)?;
        }
        Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)
    }
}

/// Whole blocks of `x` quantised into `q` / `ds` for a weight of format `fmt`: our quantiser at
/// `prec`, or llama.cpp's (scalar: its cost is per activation, not per weight).
fn quantize_blocks<T: ActInt>(
    isa: Isa,
    prec: ActPrecision,
    fmt: Fmt,
    x: &[f32],
    q: &mut [T],
    ds: &mut [[f32; 2]],
) {
    if prec != ActPrecision::LlamaCpp {
        return kernels::quantize_into(isa, x, q, ds);
    }
    for ((xb, qb), d) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(ds) {
        *d = format::quantize_block_llama(fmt, xb, qb);
    }
}

/// `m` rows of `k` activations quantized per 32-value block, rows split across threads.
fn quantize_act_rows<T: ActInt>(
    isa: Isa,
    prec: ActPrecision,
    fmt: Fmt,
    threads: usize,
    x: &[f32],
    m: usize,
    k: usize,
) -> QAct<T> {
    let nb = k / QK;
    // Not zero-filled first: every value is written below (zeroing a training step's
    // activation buffers was 1% of its time, on the thread the others wait for).
    let (mut qs, mut ds) = (
        Vec::<T>::with_capacity(m * k),
        Vec::<[f32; 2]>::with_capacity(m * nb),
    );
    let (qp, dp) = (SyncPtr(qs.as_mut_ptr()), SyncPtr(ds.as_mut_ptr()));
    pool::for_each_chunk_rows(m, m, 16, threads, |rows| {
        let len = rows.len();
        // SAFETY: disjoint row ranges inside the buffers' capacity; `quantize_blocks` only
        // writes them (integers and floats, for which any written bits are valid).
        let (q, d) = unsafe {
            (
                std::slice::from_raw_parts_mut(qp.get().add(rows.start * k), len * k),
                std::slice::from_raw_parts_mut(dp.get().add(rows.start * nb), len * nb),
            )
        };
        quantize_blocks(isa, prec, fmt, &x[rows.start * k..rows.end * k], q, d);
    });
    // SAFETY: the chunks covered rows 0..m, so every value of both buffers is written.
    unsafe {
        qs.set_len(m * k);
        ds.set_len(m * nb);
    }
    QAct { rows: m, k, qs, ds }
}

impl QuantWeight {
    /// Batched decode: `m` activation rows (`x`: `m x in`, `out`: `m x out`), each row's output
    /// bit-identical to [`Self::matvec_into`] on that row alone, whatever `m` and whatever the
    /// other rows, while each weight block is read once for all rows (GGML Q4_0/Q4_1/Q8_0; other
    /// formats run row by row). Continuous batching needs both: a sequence's greedy output must
    /// not depend on which other requests share its decode steps, and a step of 8 sequences
    /// must not cost 8 passes over the weights. (The batched [`Self::forward`] kernels
    /// accumulate in another order, so their rows differ from `matvec_into`'s in the last bits.)
    pub fn matvec_rows_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matvec_rows_with(
            Isa::best(),
            self.settings().activation,
            num_threads(),
            x,
            m,
            out,
        )
    }

    /// [`Self::matvec_rows_into`] with an explicit kernel level, activation precision and thread
    /// count (tests, benchmarks).
    #[doc(hidden)]
    pub fn matvec_rows_with(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let (k, n) = (self.in_dim, self.out_dim);
        assert!(
            x.len() == m * k && out.len() == m * n,
            "matvec_rows: x has {} values and out {} for {m} rows of a {n}x{k} weight",
            x.len(),
            out.len()
        );
        if m == 1 || !matches!(self.repr, Repr::Own { .. }) {
            for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
                match &self.repr {
                    Repr::Own { .. } => self.matvec_with(isa, prec, threads, xr, or),
                    _ => self.matvec_into(xr, or),
                }
            }
            return;
        }
        match prec {
            ActPrecision::I8 | ActPrecision::LlamaCpp => {
                self.matvec_rows_act::<i8>(isa, prec, threads, x, m, out)
            }
            ActPrecision::I16 => self.matvec_rows_act::<i16>(isa, prec, threads, x, m, out),
        }
    }

    fn matvec_rows_act<T: ActInt>(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let Repr::Own { fmt, data } = &self.repr else {
            unreachable!("checked by the caller")
        };
        let (fmt, k, n) = (*fmt, self.in_dim, self.out_dim);
        // Each row is quantised by the same `quantize_blocks` as `matvec_with`'s single row.
        let act = quantize_act_rows::<T>(isa, prec, fmt, threads, x, m, k);
        let nb = k / QK;
        let rb = nb * fmt.block_bytes();
        // The work per weight row grows with m: split into chunks of about the matvec's size.
        let min_rows = MIN_BLOCKS_PER_CHUNK.div_ceil(nb * m).max(4);
        for_column_chunks(n, min_rows, threads, out, |r0, r1, o| {
            // SAFETY: `o` is column r0 of the m x n `out`, which this chunk alone writes.
            unsafe { kernels::gemv_multi(isa, fmt, &data[r0 * rb..r1 * rb], r1 - r0, &act, o, n) }
        });
    }
}

impl QuantWeight {
    /// Decode steps of `m` sequences (`x`: `m x in`, `out`: `m x out`) with the process's
    /// [`DecodeArith::best`]: each row bit-identical to the same call with that row alone,
    /// whatever `m` and the other rows, each weight read once for all rows. `generate` and
    /// `serve` both decode through this.
    pub fn decode_rows_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.decode_rows_with(Isa::best(), DecodeArith::best(), num_threads(), x, m, out)
    }

    /// [`Self::decode_rows_into`] with an explicit kernel level, arithmetic and thread count
    /// (tests, benchmarks). `Int` at 8 or 16 bits runs GGML Q4_0/Q4_1/Q8_0 weights on their
    /// decode panels (`panel.rs`, built on first use), and at llama.cpp's rounding
    /// (`ActPrecision::LlamaCpp`) [`Self::matvec_rows_with`], llama.cpp's summation; formats
    /// without our kernels (NF4, int8, candle's) run as `Int` does.
    #[doc(hidden)]
    pub fn decode_rows_with(
        &self,
        isa: Isa,
        arith: DecodeArith,
        threads: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let (k, n) = (self.in_dim, self.out_dim);
        assert!(
            x.len() == m * k && out.len() == m * n,
            "decode_rows: x has {} values and out {} for {m} rows of a {n}x{k} weight",
            x.len(),
            out.len()
        );
        let prec = self.settings().activation;
        let (Repr::Own { fmt, data }, DecodeArith::F32) = (&self.repr, arith) else {
            return match (&self.repr, prec) {
                (Repr::Own { .. }, ActPrecision::I8) => {
                    self.decode_panels::<i8>(isa, prec, threads, x, m, out)
                }
                (Repr::Own { .. }, ActPrecision::I16) => {
                    self.decode_panels::<i16>(isa, prec, threads, x, m, out)
                }
                // llama.cpp's rounding keeps llama.cpp's summation (`gemv`); others have no panels
                _ => self.matvec_rows_with(isa, prec, threads, x, m, out),
            };
        };
        let fmt = *fmt;
        let nb = k / QK;
        let rb = nb * fmt.block_bytes();
        // chunks of about a matvec's work, and at least 16 weight rows (four per FMA stream)
        let min_rows = MIN_BLOCKS_PER_CHUNK.div_ceil(nb * m).max(16);
        for_column_chunks(n, min_rows, threads, out, |r0, r1, o| {
            // SAFETY: `o` is column r0 of the m x n `out`, which this chunk alone writes.
            unsafe { kernels::gemv_f32(isa, fmt, &data[r0 * rb..r1 * rb], r1 - r0, x, m, k, o, n) }
        });
    }
}

impl QuantWeight {
    /// Decode steps of several weights that read the same input rows (a layer's q, k and v
    /// projections; gate and up) as one parallel pass: `x` (`m x in`) quantised once, and the
    /// threads take panels of any of the weights, so a step pays one fork/join instead of one
    /// per weight. Each `outs[i]` (`m x out_i`) is bit-identical to `ws[i].decode_rows_into`.
    /// Returns false, computing nothing, unless every weight decodes through panels (Q4_0,
    /// Q4_1, Q8_0 with integer arithmetic at 8 or 16 bits, the same for all) with `in` columns;
    /// callers then run each weight on its own.
    pub fn decode_rows_many(
        ws: &[&QuantWeight],
        x: &[f32],
        m: usize,
        outs: &mut [&mut [f32]],
    ) -> bool {
        let Some(first) = ws.first() else {
            return true;
        };
        let (k, prec) = (first.in_dim, first.settings().activation);
        let paneled = |w: &QuantWeight| {
            matches!(w.repr, Repr::Own { .. }) && w.in_dim == k && w.settings().activation == prec
        };
        if DecodeArith::best() != DecodeArith::Int
            || !matches!(prec, ActPrecision::I8 | ActPrecision::I16)
            || !ws.iter().all(|w| paneled(w))
        {
            return false;
        }
        assert!(
            outs.len() == ws.len()
                && x.len() == m * k
                && ws
                    .iter()
                    .zip(outs.iter())
                    .all(|(w, o)| o.len() == m * w.out_dim),
            "decode_rows_many: shapes disagree"
        );
        match prec {
            ActPrecision::I8 => {
                Self::decode_many::<i8>(ws, Isa::best(), prec, num_threads(), x, m, outs)
            }
            _ => Self::decode_many::<i16>(ws, Isa::best(), prec, num_threads(), x, m, outs),
        }
    }

    /// The panel decode of `ws` (`in` columns each) on `x`, one fork/join. False, computing
    /// nothing, when a weight has no panels (not `Own`).
    fn decode_many<T: ActInt>(
        ws: &[&QuantWeight],
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        m: usize,
        outs: &mut [&mut [f32]],
    ) -> bool {
        let Some(first) = ws.first() else {
            return true;
        };
        let k = first.in_dim;
        let Some(panels) = ws
            .iter()
            .map(|w| w.panels_built(threads))
            .collect::<Option<Vec<&panel::Panels>>>()
        else {
            return false;
        };
        // quantisation does not depend on the weight's format at 8 or 16 bits
        let act = quantize_act_rows::<T>(isa, prec, panels[0].fmt, threads, x, m, k);
        let mut starts = vec![0usize];
        for p in &panels {
            starts.push(starts[starts.len() - 1] + p.panels());
        }
        let total = starts[panels.len()];
        let outps: Vec<SyncPtr<f32>> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
        let min_panels = MIN_BLOCKS_PER_CHUNK
            .div_ceil((k / QK) * m * panel::PANEL)
            .max(1);
        pool::for_each_chunk_rows(m, total, min_panels, threads, |range| {
            for (i, p) in panels.iter().enumerate() {
                let (p0, p1) = (
                    range.start.max(starts[i]) - starts[i],
                    range.end.min(starts[i + 1]).max(starts[i]) - starts[i],
                );
                if p0 < p1 {
                    // SAFETY: outs[i] is m x out_i; this chunk alone writes its panels p0..p1.
                    unsafe {
                        panel::decode(
                            isa,
                            p,
                            p0,
                            p1,
                            &act,
                            outps[i].get().add(p0 * panel::PANEL),
                            ws[i].out_dim,
                        )
                    }
                }
            }
        });
        true
    }

    /// Build the decode panels now if this weight decodes through them (else nothing): a
    /// server does it at start, so its first request does not pay for it (about 85 ms for
    /// SmolLM2-135M on 2 threads). Decode steps build them on first use otherwise.
    pub fn prepare_decode(&self) {
        let prec = self.settings().activation;
        if matches!(self.repr, Repr::Own { .. })
            && DecodeArith::best() == DecodeArith::Int
            && matches!(prec, ActPrecision::I8 | ActPrecision::I16)
        {
            self.panels_built(num_threads());
        }
    }

    /// The decode panels of an `Own` weight, built on first use.
    /// (None for other representations: only `Own` weights have panels.)
    fn panels_built(&self, threads: usize) -> Option<&panel::Panels> {
        let Repr::Own { fmt, data } = &self.repr else {
            return None;
        };
        Some(
            self.panels.get_or_init(|| {
                panel::Panels::pack(*fmt, data, self.out_dim, self.in_dim, threads)
            }),
        )
    }

    /// Decode through the panel layout (built here on first use): block-exact, so each output
    /// row is bit-identical whatever `m`, the other rows, the thread count and the kernel level.
    fn decode_panels<T: ActInt>(
        &self,
        isa: Isa,
        prec: ActPrecision,
        threads: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        if !Self::decode_many::<T>(&[self], isa, prec, threads, x, m, &mut [&mut *out]) {
            self.matvec_rows_with(isa, prec, threads, x, m, out);
        }
    }
}

/// Batched decode's threading: the `n` weight rows (output columns) split into chunks of at
/// least `min_rows` over `threads`; `f(r0, r1, o)` computes columns `r0..r1` of every output
/// row, `o` pointing at column `r0` of the first (`out` is rows of `n`).
fn for_column_chunks(
    n: usize,
    min_rows: usize,
    threads: usize,
    out: &mut [f32],
    f: impl Fn(usize, usize, *mut f32) + Sync,
) {
    let outp = SyncPtr(out.as_mut_ptr());
    pool::for_each_chunk(n, min_rows, threads, |rows| {
        // SAFETY: `rows.start < n <= out.len()`: an in-bounds column of the first row.
        f(rows.start, rows.end, unsafe { outp.get().add(rows.start) })
    });
}

/// Calls `f` with the contiguous f32 data of a CPU tensor.
pub(crate) fn with_f32_slice<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*st else {
        candle_core::bail!("quantized kernels need a CPU tensor")
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| qerr("quantized kernels need a contiguous tensor"))?;
    f(&cpu.as_slice::<f32>()?[a..b])
}

/// Bytes in an 8-byte aligned buffer: candle reinterprets block bytes as its block structs and
/// asserts their alignment, which a plain `Vec<u8>` does not promise.
struct AlignedBytes {
    buf: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        AlignedBytes {
            buf: vec![0u64; len.div_ceil(8)],
            len,
        }
    }
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `buf` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const u8, self.len) }
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut u8, self.len) }
    }
}

fn aligned_copy(b: &[u8]) -> AlignedBytes {
    let mut a = AlignedBytes::zeroed(b.len());
    a.as_bytes_mut().copy_from_slice(b);
    a
}

/// The custom op behind [`linear`]: forward runs the quantized kernels, backward gives the input
/// gradient only (the weight is frozen, so nothing is computed for it).
struct QLinear(Arc<QuantWeight>);

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "ferrotune-quant-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| qerr("quantized linear: input is not contiguous"))?;
        let x = &storage.as_slice::<f32>()?[a..b];
        let mut dims = layout.shape().dims().to_vec();
        let m = x.len() / w.in_dim.max(1);
        let y = w.forward_slice(x, m)?;
        *dims
            .last_mut()
            .ok_or_else(|| qerr("quantized linear: scalar input"))? = w.out_dim;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.backward_input(grad_res)?))
    }
}

/// `y = x @ W^T` with autograd to `x` only (`grad_x = grad_y @ dequant(W)`); `W` gets no
/// gradient and none is computed for it. `x (..., in)` -> `(..., out)`, any float dtype.
pub fn linear(x: &Tensor, w: &Arc<QuantWeight>) -> candle_core::Result<Tensor> {
    if x.dims().last() != Some(&w.in_dim) {
        candle_core::bail!(
            "quantized linear: input shape {:?} does not end in {} ({w:?})",
            x.shape(),
            w.in_dim
        )
    }
    if !x.device().is_cpu() {
        // our kernels are CPU-only: dequantise onto the device (the weight is a constant there,
        // so autograd reaches x only)
        let wd = w.dequantize()?.to_device(x.device())?.to_dtype(x.dtype())?;
        return x.broadcast_matmul(&wd.t()?);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    xf.apply_op1(QLinear(w.clone()))?.to_dtype(dtype)
}
