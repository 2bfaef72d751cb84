//! bitsandbytes' weight formats, bit for bit: NF4 / FP4 (4-bit codes in blocks of 64 with an
//! f32 absmax per block, optionally "double quantized": the absmaxes themselves stored as 8-bit
//! codes of bnb's dynamic map in blocks of 256 around their mean) and LLM.int8 (int8 rows with
//! a per-row absmax, `SCB`), in the safetensors layout transformers saves pre-quantized
//! checkpoints in ([`hf`]).
//!
//! Everything follows the code path bitsandbytes 0.50.2 runs on a CPU (`reference/bnb_fixtures.py`
//! checks it against fixtures; the Rust tests compare every byte and every bit):
//! - `quantize_4bit`: the default torch kernel (`backends/default/ops.py`): per flat block,
//!   `absmax = max|x|` (NaN propagates), `x * (1 / max(absmax, 1e-38))` on full blocks but
//!   `x / max(absmax, 1e-38)` on the last partial one (whose stored absmax is also clamped to
//!   1e-38), clamped to [-1, 1], then `torch.bucketize` against the midpoints of the sorted code
//!   (a value on a midpoint takes the lower code; NaN the last). FP4's code is not sorted: its
//!   bucket maps through the argsort order, so a small positive value gets code 8 ("-0").
//! - double quant: `offset = absmax.mean()` (torch's cascade sum, [`torch_sum_f32`]), then the
//!   C++ `quantize_blockwise` over `absmax - offset` with the dynamic map: a 65536-entry LUT of
//!   nearest codes indexed by `fma((v + 1) * 0.5, 65535, 0.5)`; its absmax skips NaN, and an
//!   all-zero block gets code 0.
//! - `dequantize_4bit`: `code[q] * absmax` in f32 (after `code2[qabsmax] * nested_absmax +
//!   offset` for double quant), rounded once to the weight's dtype (bf16 / f16 round to nearest
//!   even). bnb's scalar C++ kernel (last dimension not a multiple of 16, or a CPU without
//!   AVX-512) writes -0.0 for FP4 code 8 where its code map and its other kernels have +0.0; we
//!   follow the code map. Its AVX-512 kernel also indexes absmax per row, which is wrong when a
//!   row is not a whole number of blocks (no Linear of a real model); we use flat blocks.
//! - int8: `Int8Params` casts the weight to f16 first, then `int8_vectorwise_quant`:
//!   `round_half_even(w16 * ((1 / absmax) * 127))` per row, `SCB = absmax` (f32 of the f16);
//!   dequantization is `(q * SCB) * f32(1/127)`.
//!
//! The offset's summation order is torch's for one thread: above 32768 blocks torch splits the
//! mean across its threads, so bnb's own offset (and then a few nested codes) can differ in the
//! last bit from one machine to another; ours is fixed.
pub mod hf;
#[cfg(test)]
mod tests;

use crate::{Error, Result};

/// Which 4-bit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBitKind {
    Nf4,
    Fp4,
}

impl FourBitKind {
    /// bnb's name (`quant_type`).
    pub fn name(self) -> &'static str {
        match self {
            FourBitKind::Nf4 => "nf4",
            FourBitKind::Fp4 => "fp4",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(FourBitKind::Nf4),
            "fp4" => Some(FourBitKind::Fp4),
            _ => None,
        }
    }
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBitKind::Nf4 => &NF4_CODE,
            FourBitKind::Fp4 => &FP4_CODE,
        }
    }
}

const fn bits16(b: [u32; 16]) -> [f32; 16] {
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = f32::from_bits(b[i]);
        i += 1;
    }
    out
}

/// `get_4bit_type("nf4")`: the normal-quantile code (sorted).
pub const NF4_CODE: [f32; 16] = bits16([
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
]);

/// `get_4bit_type("fp4")`: sign, 2 exponent bits, 1 mantissa bit, divided by 12, in bit-pattern
/// order (code 8, "-0", is +0.0 as the list writes `-0`, an integer).
pub const FP4_CODE: [f32; 16] = bits16([
    0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000,
    0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000,
]);

/// `argsort(FP4_CODE)` as torch returns it (the two zeros: code 0, then code 8).
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// `create_dynamic_map()` (signed, 7 exponent bits, 8 bits): the nested (double-quant) code.
pub const DYNAMIC_MAP: [f32; 256] = {
    let b: [u32; 256] = [
        0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a,
        0xbf650000, 0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666,
        0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334,
        0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000,
        0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc,
        0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333,
        0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc,
        0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
        0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
        0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8,
        0xbda75c2a, 0xbda1999a, 0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd,
        0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3,
        0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7,
        0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418,
        0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d,
        0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
        0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705,
        0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
        0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034,
        0x388aefb3, 0x38ba1f4b, 0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1,
        0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d, 0x3af1a9fc, 0x3b1db22d, 0x3b428f5c,
        0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b, 0x3be24dd3,
        0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3,
        0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
        0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f,
        0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b,
        0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
        0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333,
        0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000,
        0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000, 0x3eb13333, 0x3eb86666,
        0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a, 0x3eeacccc,
        0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
        0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd,
        0x3f2b6666, 0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000,
        0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333,
        0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
        0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
    ];
    let mut out = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        out[i] = f32::from_bits(b[i]);
        i += 1;
    }
    out
};

/// The dtype a quantized weight had (bnb's `QuantState.dtype`): dequantization rounds to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    BF16,
    F16,
}

impl WeightDtype {
    /// The name bnb writes (`str(torch.float32).strip("torch.")`).
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::BF16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" => Some(WeightDtype::F32),
            "bfloat16" => Some(WeightDtype::BF16),
            "float16" => Some(WeightDtype::F16),
            _ => None,
        }
    }
    /// `x` rounded to this dtype (nearest even) and widened back to f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            WeightDtype::F32 => x,
            WeightDtype::BF16 => half::bf16::from_f32(x).to_f32(),
            WeightDtype::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

/// The per-block absmax of a 4-bit weight: plain f32, or double quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested {
        /// One 8-bit code of `nested_code` per block, for `absmax - offset`.
        codes: Vec<u8>,
        /// The mean of the absmaxes, added back after dequantization.
        offset: f32,
        /// One f32 scale per `nested_blocksize` codes.
        nested_absmax: Vec<f32>,
        nested_blocksize: usize,
        /// 256 entries (bnb's dynamic map).
        nested_code: Vec<f32>,
    },
}

/// A weight in bnb's 4-bit format.
#[derive(Debug, Clone, PartialEq)]
pub struct FourBit {
    pub kind: FourBitKind,
    pub shape: Vec<usize>,
    /// The dtype the weight had; dequantization rounds to it.
    pub dtype: WeightDtype,
    pub blocksize: usize,
    /// Two codes per byte, the first element in the high nibble, row-major flat order (an odd
    /// element count ends with a zero nibble).
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// The block sizes bnb accepts for 4-bit weights.
pub const BLOCKSIZES_4BIT: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// bnb's block size for the absmaxes' own quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// `torch.clamp(x, min=1e-38)` in f32 (NaN stays NaN).
fn clamp_min_1e38(x: f32) -> f32 {
    let lo = 1e-38f32;
    if x.is_nan() || x >= lo {
        x
    } else {
        lo
    }
}

/// `torch.clamp(x, -1, 1)` (NaN stays NaN).
fn clamp_unit(x: f32) -> f32 {
    x.clamp(-1.0, 1.0)
}

/// `max |x|` as torch's `abs().max()`: NaN if any value is NaN.
fn torch_absmax(xs: &[f32]) -> f32 {
    let mut m = 0f32;
    for &x in xs {
        if x.is_nan() {
            return f32::NAN;
        }
        m = m.max(x.abs());
    }
    m
}

/// The bucket of `x` as `torch.bucketize(x, bounds)` (right=False): the first bound that is
/// `>= x`; NaN compares false everywhere and lands after the last.
fn bucketize(x: f32, bounds: &[f32; 15]) -> u8 {
    // torch's binary search: lower bound with `!(bound >= x)` moving right.
    let (mut lo, mut hi) = (0usize, bounds.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(bounds[mid] >= x) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo as u8
}

/// The midpoints of the sorted code and the map from sorted position to code
/// (`_get_4bit_quantize_bounds`).
fn quantize_bounds(kind: FourBitKind) -> ([f32; 15], [u8; 16]) {
    let code = kind.code();
    let order: [u8; 16] = match kind {
        FourBitKind::Nf4 => std::array::from_fn(|i| i as u8),
        FourBitKind::Fp4 => FP4_ORDER,
    };
    let bounds =
        std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
    (bounds, order)
}

fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES_4BIT.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "4-bit block size {blocksize}: bitsandbytes accepts 32, 64, 128, 256, 512, 1024, 2048 or 4096"
        )))
    }
}

fn shape_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Quantize `w` (row-major, `shape`) as bnb's `quantize_4bit` does on a CPU. `w` holds the
/// weight's values in f32 (bnb quantizes `A.float()`, so bf16 / f16 weights widened exactly
/// give the same codes); [`FourBit::dtype`] is set to f32: set it to the weight's own dtype.
pub fn quantize_4bit(
    w: &[f32],
    shape: &[usize],
    kind: FourBitKind,
    blocksize: usize,
    double_quant: bool,
) -> Result<FourBit> {
    check_blocksize(blocksize)?;
    let n = shape_numel(shape)
        .filter(|&n| n == w.len())
        .ok_or_else(|| {
            Error::msg(format!(
                "4-bit quantization: shape {shape:?} does not hold the {} values given",
                w.len()
            ))
        })?;
    if n == 0 {
        return Err(Error::msg("4-bit quantization of an empty tensor"));
    }
    let (bounds, order) = quantize_bounds(kind);
    let blocks = n.div_ceil(blocksize);
    let mut absmax = Vec::with_capacity(blocks);
    let mut packed = vec![0u8; n.div_ceil(2)];
    for (b, block) in w.chunks(blocksize).enumerate() {
        let m = torch_absmax(block);
        // bnb scales full blocks by a reciprocal, the partial last block by a division.
        let full = block.len() == blocksize;
        let (stored, recip) = if full {
            (m, 1.0 / clamp_min_1e38(m))
        } else {
            (clamp_min_1e38(m), f32::NAN)
        };
        absmax.push(stored);
        for (j, &x) in block.iter().enumerate() {
            let scaled = clamp_unit(if full { x * recip } else { x / stored });
            let q = order[bucketize(scaled, &bounds) as usize];
            let i = b * blocksize + j;
            packed[i / 2] |= if i.is_multiple_of(2) { q << 4 } else { q };
        }
    }
    if n % 2 == 1 {
        // The padding value 0.0 gets the code of zero (bnb pads the scaled values with 0).
        packed[n / 2] |= order[bucketize(0.0, &bounds) as usize];
    }
    let absmax = if double_quant {
        nest_absmax(&absmax)
    } else {
        Absmax::Plain(absmax)
    };
    Ok(FourBit {
        kind,
        shape: shape.to_vec(),
        dtype: WeightDtype::F32,
        blocksize,
        packed,
        absmax,
    })
}

/// bnb's double quant of the absmaxes: `offset = mean`, then `quantize_blockwise(absmax -
/// offset, blocksize=256)` with the dynamic map.
pub fn nest_absmax(absmax: &[f32]) -> Absmax {
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_cpu(&centered, &DYNAMIC_MAP, NESTED_BLOCKSIZE);
    Absmax::Nested {
        codes,
        offset,
        nested_absmax,
        nested_blocksize: NESTED_BLOCKSIZE,
        nested_code: DYNAMIC_MAP.to_vec(),
    }
}

/// bnb's C++ `quantize_cpu` LUT: for each of 65536 evenly spaced values in [-1, 1], the index
/// of the first midpoint of `code` that is not below it.
fn quantize_lut(code: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = (0..255).map(|i| 0.5f32 * (code[i] + code[i + 1])).collect();
    let mut lut = vec![0u8; 65536];
    let mut idx = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let fi = i as f32;
        let val = (fi + fi) / 65535.0f32 - 1.0f32;
        while idx < 255 && mid[idx] < val {
            idx += 1;
        }
        *slot = idx as u8;
    }
    lut
}

/// bnb's C++ `quantize_cpu` (blockwise 8-bit, a sorted 256-entry code): per block, absmax
/// (NaN skipped, as `std::max` does), codes through [`quantize_lut`]; an all-zero block gets
/// code 0 everywhere.
pub fn quantize_blockwise_cpu(
    x: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let lut = quantize_lut(code);
    let mut out = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let mut m = 0f32;
        for &v in block {
            // std::max(m, v): keeps m unless m < v (false for NaN).
            if m < v.abs() {
                m = v.abs();
            }
        }
        absmax.push(m);
        if m == 0.0 {
            out.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0f32 / m;
        for &v in block {
            let c = v * inv;
            // std::clamp(c, -1, 1) keeps NaN.
            let c = c.clamp(-1.0, 1.0);
            // The compiled kernel: vaddss, vmulss 0.5, vfmadd (…, 65535, 0.5), vcvttss2si, low
            // 16 bits (NaN gives 0x80000000, whose low bits are 0, as `as i32` gives 0).
            let f = ((c + 1.0f32) * 0.5f32).mul_add(65535.0f32, 0.5f32);
            let i = (f as i32) as u16;
            out.push(lut[i as usize]);
        }
    }
    (out, absmax)
}

/// bnb's C++ `dequantizeBlockwise8bitCpu`: `code[q] * absmax[block]` in f32.
pub fn dequantize_blockwise(
    codes: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| code[q as usize] * absmax[i / blocksize])
        .collect()
}

/// torch's `sum` of a contiguous f32 vector on a CPU, one thread (`cascade_sum` in
/// `aten/src/ATen/native/cpu/SumKernel.cpp`: 8-lane vectors, four interleaved accumulators,
/// multi-level partial sums, then the scalar tail and the lanes).
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const W: usize = 8;
    let n = x.len();
    if n < W {
        return 0.0 + row_sum::<1>(|i| [x[i]], n)[0];
    }
    let vec_size = n / W;
    let v = row_sum::<W>(|i| std::array::from_fn(|l| x[i * W + l]), vec_size);
    let mut acc = 0f32;
    for &t in &x[vec_size * W..] {
        acc += t;
    }
    for l in v {
        acc += l;
    }
    0.0 + acc
}

/// torch's `mean` of a contiguous f32 vector on a CPU: the sum, divided by the count in f32.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

fn add<const L: usize>(a: [f32; L], b: [f32; L]) -> [f32; L] {
    std::array::from_fn(|l| a[l] + b[l])
}

/// `row_sum` of SumKernel.cpp: the row as (-1, 4) for four accumulators, the leftover items
/// into the first, then the four summed in order.
fn row_sum<const L: usize>(load: impl Fn(usize) -> [f32; L], size: usize) -> [f32; L] {
    const ILP: usize = 4;
    let size_ilp = size / ILP;
    let mut p = multi_row_sum::<L, ILP>(|i, k| load(i * ILP + k), size_ilp);
    for i in size_ilp * ILP..size {
        p[0] = add(p[0], load(i));
    }
    for k in 1..ILP {
        p[0] = add(p[0], p[k]);
    }
    p[0]
}

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

#[allow(clippy::needless_range_loop)] // indexed as SumKernel.cpp indexes it
/// `multi_row_sum` of SumKernel.cpp: four levels of partial sums, each level flushed into the
/// next every `2^level_power` items.
fn multi_row_sum<const L: usize, const NR: usize>(
    load: impl Fn(usize, usize) -> [f32; L],
    size: usize,
) -> [[f32; L]; NR] {
    const LEVELS: usize = 4;
    let level_power = std::cmp::max(4, ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; NR]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..NR {
                acc[0][k] = add(acc[0][k], load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..NR {
                acc[j][k] = add(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = [0f32; L];
            }
            let mask = level_mask << (j * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..NR {
            acc[0][k] = add(acc[0][k], load(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..NR {
            acc[0][k] = add(acc[0][k], acc[j][k]);
        }
    }
    acc[0]
}

impl FourBit {
    pub fn numel(&self) -> usize {
        shape_numel(&self.shape).unwrap_or(0)
    }

    pub fn blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Checks that the pieces fit together (sizes, block counts, code lengths): what a file
    /// read must pass before anything indexes them.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !BLOCKSIZES_4BIT.contains(&self.blocksize) {
            return Err(format!(
                "block size {} is not one bitsandbytes uses",
                self.blocksize
            ));
        }
        let n = shape_numel(&self.shape).ok_or("the shape overflows")?;
        if n == 0 {
            return Err("the shape holds no values".into());
        }
        if self.packed.len() != n.div_ceil(2) {
            return Err(format!(
                "{} packed bytes for shape {:?} ({} values need {})",
                self.packed.len(),
                self.shape,
                n,
                n.div_ceil(2)
            ));
        }
        let blocks = n.div_ceil(self.blocksize);
        match &self.absmax {
            Absmax::Plain(a) if a.len() != blocks => Err(format!(
                "{} absmax values for {blocks} blocks of {}",
                a.len(),
                self.blocksize
            )),
            Absmax::Plain(_) => Ok(()),
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_blocksize,
                nested_code,
                ..
            } => {
                if codes.len() != blocks {
                    return Err(format!(
                        "{} absmax codes for {blocks} blocks of {}",
                        codes.len(),
                        self.blocksize
                    ));
                }
                if *nested_blocksize == 0 {
                    return Err("nested block size 0".into());
                }
                if nested_absmax.len() != blocks.div_ceil(*nested_blocksize) {
                    return Err(format!(
                        "{} nested absmax values for {blocks} codes in blocks of {nested_blocksize}",
                        nested_absmax.len()
                    ));
                }
                if nested_code.len() != 256 {
                    return Err(format!(
                        "the nested code map has {} entries, not 256",
                        nested_code.len()
                    ));
                }
                Ok(())
            }
        }
    }

    /// The per-block absmax as bnb's `dequantize_4bit` computes it: plain, or
    /// `nested_code[q] * nested_absmax + offset` in f32.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested {
                codes,
                offset,
                nested_absmax,
                nested_blocksize,
                nested_code,
            } => {
                let mut a =
                    dequantize_blockwise(codes, nested_absmax, nested_code, *nested_blocksize);
                for v in &mut a {
                    *v += *offset;
                }
                a
            }
        }
    }

    /// The code of element `i`.
    pub fn code_at(&self, i: usize) -> u8 {
        let b = self.packed[i / 2];
        if i.is_multiple_of(2) {
            b >> 4
        } else {
            b & 0x0f
        }
    }

    /// bnb's `dequantize_4bit`: `code[q] * absmax` in f32, rounded to [`FourBit::dtype`]
    /// (returned widened to f32).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax_f32();
        let code = self.kind.code();
        (0..self.numel())
            .map(|i| {
                self.dtype
                    .round(code[self.code_at(i) as usize] * absmax[i / self.blocksize])
            })
            .collect()
    }

    /// Bytes the quantized form takes (codes, absmaxes, nested statistics and maps).
    pub fn storage_bytes(&self) -> usize {
        let stats = match &self.absmax {
            Absmax::Plain(a) => 4 * a.len(),
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_code,
                ..
            } => codes.len() + 4 * nested_absmax.len() + 4 * nested_code.len() + 4,
        };
        self.packed.len() + stats + 4 * 16
    }
}

/// A weight in LLM.int8 form (what `Linear8bitLt` stores: `CB` and `SCB`).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    pub rows: usize,
    pub cols: usize,
    /// Row-major int8 codes.
    pub data: Vec<i8>,
    /// Per-row absmax (of the weight rounded to f16).
    pub scb: Vec<f32>,
}

/// `Int8Params._quantize` on a CPU: the weight cast to f16, then `int8_vectorwise_quant`.
pub fn quantize_int8(w: &[f32], rows: usize, cols: usize) -> Result<Int8Rows> {
    if rows.checked_mul(cols) != Some(w.len()) || w.is_empty() {
        return Err(Error::msg(format!(
            "int8 quantization: {rows}x{cols} does not hold the {} values given",
            w.len()
        )));
    }
    let mut data = Vec::with_capacity(w.len());
    let mut scb = Vec::with_capacity(rows);
    for row in w.chunks(cols) {
        let r16: Vec<f32> = row
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        let m = torch_absmax(&r16);
        scb.push(m);
        // `127.0 / stats` is `stats.reciprocal() * 127.0` in torch.
        let scale = (1.0f32 / m) * 127.0f32;
        for &x in &r16 {
            let v = (x * scale).round_ties_even();
            // A NaN (an all-zero row: 0 * inf) or infinite product converts to 0, as the x86
            // conversion torch's `.to(int8)` compiles to gives.
            data.push(if v.is_finite() { v as i8 } else { 0 });
        }
    }
    Ok(Int8Rows {
        rows,
        cols,
        data,
        scb,
    })
}

impl Int8Rows {
    /// `int8_vectorwise_dequant`: `(q * SCB) * f32(1/127)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let inv = 7.874015718698502e-3f64 as f32;
        self.data
            .iter()
            .enumerate()
            .map(|(i, &q)| (q as f32 * self.scb[i / self.cols.max(1)]) * inv)
            .collect()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rows.checked_mul(self.cols) != Some(self.data.len()) {
            return Err(format!(
                "{} int8 values for a {}x{} weight",
                self.data.len(),
                self.rows,
                self.cols
            ));
        }
        if self.scb.len() != self.rows {
            return Err(format!(
                "{} SCB values for {} rows",
                self.scb.len(),
                self.rows
            ));
        }
        Ok(())
    }

    pub fn storage_bytes(&self) -> usize {
        self.data.len() + 4 * self.scb.len()
    }
}
