//! Byte layouts of the GGML blocks we run our own kernels on, the quantised activation formats the
//! kernels consume, and the portable (scalar) reference kernels.
//!
//! Block layouts (little-endian, as in GGUF files; `QK` = 32 values per block):
//! - Q4_0 (18 B): `d: f16`, `qs: [u8; 16]`; value j = d * (nibble_j - 8)
//! - Q4_1 (20 B): `d: f16`, `m: f16`, `qs: [u8; 16]`; value j = d * nibble_j + m
//! - Q8_0 (34 B): `d: f16`, `qs: [i8; 32]`; value j = d * qs[j]
//!
//! where nibble_j is the low nibble of `qs[j]` for j < 16 and the high nibble of `qs[j - 16]`.
use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per block for every format we implement.
pub(crate) const QK: usize = 32;

/// The GGML formats with our own kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fmt {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Fmt {
    pub(crate) fn from_ggml(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(Fmt::Q4_0),
            GgmlDType::Q4_1 => Some(Fmt::Q4_1),
            GgmlDType::Q8_0 => Some(Fmt::Q8_0),
            _ => None,
        }
    }

    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Fmt::Q4_0 => 18,
            Fmt::Q4_1 => 20,
            Fmt::Q8_0 => 34,
        }
    }
}

/// The f16 at byte `off`. `to_f32_const` is plain integer code that inlines: `to_f32` checks
/// for F16C at run time on every call, which made the portable kernels several times slower.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32_const()
}

/// How finely the kernels quantise activations: per block of 32 values, `q = round_even(x / d)`
/// with `d = max|x| / QMAX`, integers of 16 bits (`QMAX` = 32767, the default) or 8 bits
/// (`QMAX` = 127, like GGML's Q8_0/Q8_1 and llama.cpp). Each activation moves by at most `d / 2`,
/// so 16 bits cut the activation error 258x: enough for a quantized model to follow its f32
/// reference (8 bits flip SmolLM2-135M's greedy answer to "What is the capital of France?").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActPrecision {
    /// 16-bit activations (`vpdpwssd` / `vpmaddwd` on i16 weights): about 250x closer to the f32
    /// matmul than `I8` (relative L2 error 3e-5 vs 8e-3 on SmolLM2 weights). Decode is
    /// memory-bound and costs about 7% more on 2 threads; batched work (prefill, training) does
    /// twice the integer work and takes 1.5-1.6x as long as `I8` (measured on Zen 4).
    I16,
    /// 8-bit activations (`vpdpbusd` / `vpmaddubsw`): llama.cpp's choice, fastest batched.
    I8,
    /// 8-bit activations rounded exactly as llama.cpp's CPU back-end rounds them
    /// ([`quantize_block_llama`]): the block scale kept as f16, `q = round_even(x * 127 / max)`,
    /// and for Q4_1 weights Q8_1's f16 sum term; the same integer kernels as `I8`. Neither faster
    /// nor more precise: it reproduces llama.cpp's figures for a GGUF (perplexity of SmolLM2 Q8_0
    /// within 0.03% of llama.cpp's on the same file, against 0.14% for `I8`). It cannot promise
    /// llama.cpp's greedy text: at 8 bits a last-bit difference in any f32 sum flips roundings
    /// that grow to 0.1-0.3 in the log-probabilities, so even our own scalar and AVX2 kernels
    /// (identical rounding, other summation order) part after a few tokens; at 16 bits they agree.
    LlamaCpp,
}

/// An integer type activations are quantised to (`i8` or `i16`).
pub(crate) trait ActInt:
    Copy + Default + Send + Sync + PartialEq + std::fmt::Debug + 'static
{
    /// Which SIMD kernels take this type (only the x86 dispatch and the tests read it).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const PREC: ActPrecision;
    /// Largest magnitude of a quantised value. Symmetric, so the i8 minimum -128 never occurs
    /// (the AVX2 sign trick for Q8_0 weights could not negate it).
    const QMAX: f32;
    /// `v` is already rounded and within `-QMAX..=QMAX`.
    fn from_rounded(v: f32) -> Self;
    fn widen(self) -> i32;
}

impl ActInt for i8 {
    const PREC: ActPrecision = ActPrecision::I8;
    const QMAX: f32 = 127.0;
    #[inline(always)]
    fn from_rounded(v: f32) -> Self {
        v as i8
    }
    #[inline(always)]
    fn widen(self) -> i32 {
        self as i32
    }
}

impl ActInt for i16 {
    const PREC: ActPrecision = ActPrecision::I16;
    const QMAX: f32 = 32767.0;
    #[inline(always)]
    fn from_rounded(v: f32) -> Self {
        v as i16
    }
    #[inline(always)]
    fn widen(self) -> i32 {
        self as i32
    }
}

/// Activation rows quantised in blocks of 32 (see [`ActPrecision`]). Per block we also keep
/// `d * sum(q)` for the offset terms of Q4_1 (`m * sum x`) and Q4_0 (`-8 d * sum x`), like GGML's
/// Q8_1. Using the quantised sum rather than the exact one matters: then the whole dot product
/// sees the same rounded activations and its error is `sum_j W_j (xq_j - x_j)`; with the exact
/// sum the offset would not cancel and the error would scale with `W_j - m` (up to 15 d) instead
/// of `W_j`.
pub(crate) struct QAct<T> {
    pub rows: usize,
    /// Values per row (a multiple of `QK`).
    pub k: usize,
    /// `rows * k` quantised values, row-major.
    pub qs: Vec<T>,
    /// `rows * k / QK` pairs `[d, d * sum(q)]`, one per block, row-major. Interleaved so a kernel
    /// fetches both with one 8-byte load.
    pub ds: Vec<[f32; 2]>,
}

impl<T: ActInt> QAct<T> {
    pub(crate) fn nb(&self) -> usize {
        self.k / QK
    }
    pub(crate) fn row_qs(&self, r: usize) -> &[T] {
        &self.qs[r * self.k..(r + 1) * self.k]
    }
    pub(crate) fn row_ds(&self, r: usize) -> &[[f32; 2]] {
        &self.ds[r * self.nb()..(r + 1) * self.nb()]
    }
    pub(crate) fn zeros(rows: usize, k: usize) -> Self {
        debug_assert_eq!(k % QK, 0);
        QAct {
            rows,
            k,
            qs: vec![T::default(); rows * k],
            ds: vec![[0.0; 2]; rows * k / QK],
        }
    }
}

/// The scale of one activation block and its inverse. The SIMD quantisers compute it with
/// exactly these scalar operations so every path produces bit-identical quantised activations.
/// A block so tiny that `1 / d` overflows (max|x| below about 1e-34 for 16 bits) is stored as
/// zeros: an infinite inverse would turn its values into NaN / saturated integers.
#[inline(always)]
pub(crate) fn act_scale(amax: f32, qmax: f32) -> (f32, f32) {
    let d = amax / qmax;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    if id.is_finite() {
        (d, id)
    } else {
        (0.0, 0.0)
    }
}

/// Portable activation quantiser for one block of 32 values.
pub(crate) fn quantize_block_scalar<T: ActInt>(x: &[f32], q: &mut [T]) -> [f32; 2] {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (d, id) = act_scale(amax, T::QMAX);
    let mut isum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // round-half-even, like the SIMD `cvtps2dq` under the default rounding mode
        *qi = T::from_rounded((xi * id).round_ties_even());
        isum += qi.widen();
    }
    // |isum| <= 32 * 32767 < 2^24: exact in f32
    [d, d * isum as f32]
}

/// llama.cpp's activation quantisation for a weight of format `fmt` (its `vec_dot_type`: Q8_0
/// for Q4_0 and Q8_0 weights, Q8_1 for Q4_1), as ggml's x86 `quantize_row_q8_0` /
/// `quantize_row_q8_1` compute it: `d = max|x| / 127` stored as f16, `q = round_even(x * (127 /
/// max|x|))`, and Q8_1's `s = f16(d * sum(q))` with the f32 `d`. Returns our block pair `[d, s]`
/// with those values, so the integer kernels compute llama.cpp's dot products (up to the order
/// of f32 additions): Q8_0 / Q4_0 `d_w d sum(q_w q)` (Q4_0's offset `-8 d_w (d sum q)` is the same
/// product), Q4_1 `d_w d sum(q_w q) + m_w s`.
pub(crate) fn quantize_block_llama<T: ActInt>(fmt: Fmt, x: &[f32], q: &mut [T]) -> [f32; 2] {
    debug_assert_eq!(T::QMAX, 127.0, "llama.cpp quantises activations to 8 bits");
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !amax.is_finite() {
        // an overflowed activation: zeros, as our own quantiser stores a block it cannot scale
        q.iter_mut().for_each(|v| *v = T::from_rounded(0.0));
        return [0.0, 0.0];
    }
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut isum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // `_mm256_round_ps(_MM_ROUND_NEAREST)` then a saturating pack: ties to even, +-127 at most
        let v = (xi * id).round_ties_even().clamp(-127.0, 127.0);
        *qi = T::from_rounded(if v.is_nan() { 0.0 } else { v });
        isum += qi.widen();
    }
    let d16 = f16::from_f32(d).to_f32();
    let s = match fmt {
        Fmt::Q4_1 => f16::from_f32(d * isum as f32).to_f32(),
        Fmt::Q4_0 | Fmt::Q8_0 => d16 * isum as f32,
    };
    [d16, s]
}

/// Dot products of `out.len()` consecutive weight rows (starting at `w`) with activation row
/// `ar` of `act`. `w` rows are `nb` blocks of `fmt` each.
pub(crate) fn gemv_scalar<T: ActInt>(
    fmt: Fmt,
    w: &[u8],
    act: &QAct<T>,
    ar: usize,
    out: &mut [f32],
) {
    let row_bytes = act.nb() * fmt.block_bytes();
    let (aq, ads) = (act.row_qs(ar), act.row_ds(ar));
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot_row_scalar(fmt, &w[i * row_bytes..(i + 1) * row_bytes], aq, ads);
    }
}

/// One weight row (whole blocks) times one quantised activation row.
pub(crate) fn dot_row_scalar<T: ActInt>(fmt: Fmt, row: &[u8], aq: &[T], ads: &[[f32; 2]]) -> f32 {
    match fmt {
        Fmt::Q4_0 => dot_row::<T, 18, 2>(row, aq, ads),
        Fmt::Q4_1 => dot_row::<T, 20, 4>(row, aq, ads),
        Fmt::Q8_0 => dot_row::<T, 34, 2>(row, aq, ads),
    }
}

/// Monomorphised per activation type and format (block bytes `BB`, quants at byte `OFF`) with
/// fixed-size array views, so the compiler sees constant trip counts without bounds checks and
/// vectorises the integer dot products (this is the path on targets without our SIMD kernels,
/// e.g. aarch64 NEON). Integer sums are i32: a block's products are at most 32 x 128 x 32767
/// in magnitude (< 2^28), so they cannot overflow.
#[inline(always)]
fn dot_row<T: ActInt, const BB: usize, const OFF: usize>(
    row: &[u8],
    aq: &[T],
    ads: &[[f32; 2]],
) -> f32 {
    let mut acc = 0f32;
    for ((blk, qx), &[dx, sx]) in row.chunks_exact(BB).zip(aq.chunks_exact(QK)).zip(ads) {
        let qx: &[T; QK] = qx.try_into().expect("32-value block");
        let d = f16_at(blk, 0);
        acc += if BB == 34 {
            let w: &[u8; QK] = blk[2..2 + QK].try_into().expect("Q8_0 block");
            let mut isum = 0i32;
            for j in 0..QK {
                isum += w[j] as i8 as i32 * qx[j].widen();
            }
            d * dx * isum as f32
        } else {
            let qs: &[u8; 16] = blk[OFF..OFF + 16].try_into().expect("Q4 block");
            // two separate loops: one loop doing both nibbles did not vectorise (3x slower)
            let (mut lo, mut hi) = (0i32, 0i32);
            for j in 0..16 {
                lo += (qs[j] & 0x0F) as i32 * qx[j].widen();
            }
            for j in 0..16 {
                hi += (qs[j] >> 4) as i32 * qx[j + 16].widen();
            }
            let m = if BB == 20 { f16_at(blk, 2) } else { -8.0 * d };
            d * dx * (lo + hi) as f32 + m * sx
        };
    }
    acc
}

/// One block's 32 weights as f32 the way the f32-activation decode kernels compute them:
/// Q4_1 `fma(q, d, m)`, Q4_0 `fma(q, d, -8d)` (= `d (q - 8)` with one rounding), Q8_0 `q * d`.
#[inline(always)]
pub(crate) fn dequant_block_f32(fmt: Fmt, blk: &[u8], w: &mut [f32; QK]) {
    let d = f16_at(blk, 0);
    match fmt {
        Fmt::Q8_0 => {
            for j in 0..QK {
                w[j] = blk[2 + j] as i8 as f32 * d;
            }
        }
        Fmt::Q4_0 | Fmt::Q4_1 => {
            let (off, m) = if fmt == Fmt::Q4_1 {
                (4, f16_at(blk, 2))
            } else {
                (2, -8.0 * d)
            };
            for j in 0..16 {
                w[j] = ((blk[off + j] & 0x0F) as f32).mul_add(d, m);
                w[j + 16] = ((blk[off + j] >> 4) as f32).mul_add(d, m);
            }
        }
    }
}

/// One weight row (whole blocks) times one f32 activation row, bit-identical to the SIMD
/// f32-activation kernels: eight lanes, `lane[l] = fma(w[8j + l], x[8j + l], lane[l])` for
/// j = 0..3 in each block, then the lanes summed in the order of their horizontal sum
/// (`((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`).
pub(crate) fn dot_row_f32_scalar(fmt: Fmt, row: &[u8], x: &[f32]) -> f32 {
    let mut lane = [0f32; 8];
    let mut w = [0f32; QK];
    for (blk, xb) in row.chunks_exact(fmt.block_bytes()).zip(x.chunks_exact(QK)) {
        dequant_block_f32(fmt, blk, &mut w);
        for j in 0..4 {
            for l in 0..8 {
                lane[l] = w[8 * j + l].mul_add(xb[8 * j + l], lane[l]);
            }
        }
    }
    ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]))
}

/// Dequantise whole blocks: `out.len()` must be `QK * bytes.len() / block_bytes`.
pub(crate) fn dequant_blocks(fmt: Fmt, bytes: &[u8], out: &mut [f32]) {
    let bb = fmt.block_bytes();
    debug_assert_eq!(out.len() * bb, bytes.len() * QK);
    for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        match fmt {
            Fmt::Q4_0 | Fmt::Q4_1 => {
                let (off, m) = if fmt == Fmt::Q4_1 {
                    (4, f16_at(blk, 2))
                } else {
                    (2, -8.0 * d)
                };
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let b = blk[off + j];
                    lo[j] = (b & 0x0F) as f32 * d + m;
                    hi[j] = (b >> 4) as f32 * d + m;
                }
            }
            Fmt::Q8_0 => {
                for j in 0..QK {
                    o[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
        }
    }
}

/// Portable batched kernel: `out[r * ldo + c] = dot(weight row c, activation row r)` for all
/// activation rows and `n_w` weight rows starting at `w`.
///
/// # Safety
/// `out` must be valid for writes at `r * ldo + c` for `r < act.rows`, `c < n_w`.
pub(crate) unsafe fn gemm_scalar<T: ActInt>(
    fmt: Fmt,
    w: &[u8],
    n_w: usize,
    act: &QAct<T>,
    out: *mut f32,
    ldo: usize,
) {
    let row_bytes = act.nb() * fmt.block_bytes();
    for r in 0..act.rows {
        let (aq, ads) = (act.row_qs(r), act.row_ds(r));
        for c in 0..n_w {
            *out.add(r * ldo + c) =
                dot_row_scalar(fmt, &w[c * row_bytes..(c + 1) * row_bytes], aq, ads);
        }
    }
}

/// Quantise `x` (a multiple of 32 values) to Q8_0 blocks in `out` (34 bytes per block) the way
/// GGML's `quantize_row_q8_0_ref` does for `qmax = 127`: `d = max|x| / qmax`, `q = round(x /
/// d)`, `d` stored as f16. `qmax = 63` gives the narrow copies of
/// [`super::kernels::gemm_q8_narrow`] (clamped, so even a subnormal block stays in range).
pub(crate) fn quantize_row_q8_0_to(x: &[f32], out: &mut [u8], qmax: f32) {
    debug_assert_eq!(x.len() % QK, 0);
    debug_assert_eq!(out.len(), x.len() / QK * 34);
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / qmax;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (o, v) in ob[2..].iter_mut().zip(xb) {
            let q = (v * id).round();
            // a subnormal block's inverse scale overflows; the narrow kernels rely on the range
            let q = if qmax < 127.0 {
                q.clamp(-qmax, qmax)
            } else {
                q
            };
            *o = q as i8 as u8;
        }
    }
}
