//! x86-64 SIMD kernels for Q4_0 / Q4_1 / Q8_0 weights against quantised activations (`QAct`),
//! 8 or 16 bits per value (see `format::ActPrecision`).
//!
//! Two instruction-set levels, chosen at run time (see `kernels::Isa`):
//! - AVX2 (+FMA, F16C): 8-bit activations with `vpmaddubsw` + `vpmaddwd` (u8 x i8 products);
//!   16-bit activations with `vpmaddwd` on weights widened to i16.
//! - AVX-512 (F, BW, VL, VNNI): the same loops with `vpdpbusd` / `vpdpwssd` (one instruction
//!   instead of two) and 32 vector registers, which the batched kernels use for larger register
//!   tiles. Vectors stay 256 bits wide: on Zen 4 (this project's machine) a 512-bit op costs two
//!   256-bit slots, and 512-bit loads of two 20-byte Q4_1 blocks would need extra shuffles.
//!
//! Matvec (decode): per weight row and 32-value block, one integer dot product scaled by
//! `d_w * d_x` into an f32 accumulator, like llama.cpp's `ggml_vec_dot_q4_1_q8_1`; the Q4 offset
//! terms use the per-block activation sums `d_x * sum(q_x)` kept in `QAct::ds` (see `format.rs`).
//! With 16-bit activations a block is two `vpdpwssd` (16 i16 pairs each) on weights widened with
//! one `vpmovzxbw`/`vpmovsxbw`; decode reads each weight byte once from DRAM either way, so the
//! extra instructions mostly hide behind memory.
//!
//! Batched (prefill, training): weights are repacked per call into 8-row panels so one
//! `vpdpbusd` of a panel against four broadcast activation bytes (or one `vpdpwssd` against two
//! broadcast i16 activations) produces 8 output columns, and scaling happens once per block and
//! 8 columns instead of once per block and column. 16-bit activations need 16 `vpdpwssd` per
//! block where 8 bits need 8 `vpdpbusd`; both share Zen 4's two multiply pipes with the 2-3
//! scaling FMAs per block, which bounds the 16-bit cost at about (16 + 3) / (8 + 3) = 1.7x
//! (measured 1.5-1.75x; one core runs about 87 GMAC/s, near that bound). 512-bit `vpdpwssd`
//! would issue fewer instructions but run on the same two 256-bit pipes.
//!
//! Integer overflow: per block, an i32 lane sums at most 32 products; with 16-bit activations
//! each is at most 128 x 32767 in magnitude (Q8_0; Q4 nibbles 15 x 32767), so a block's sum stays
//! below 2^28. Sums never span blocks: each is converted to f32 and scaled at the block's end.
//!
//! The kernels are written once as `#[inline(always)]` generic bodies; the `#[target_feature]`
//! entry points at the bottom instantiate them per format, activation width and level, so the
//! intrinsics inline. (Closures are avoided inside them: a closure does not inherit the enclosing
//! function's target features, and its intrinsics then compile to calls; that made the batched
//! kernel 100x slower.)
// Index loops over small const-size register arrays read better than iterator chains here.
#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]
use super::format::{act_scale, Fmt, QK};
use std::arch::x86_64::*;

const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q8_0: u8 = 2;

const fn bb(f: u8) -> usize {
    match f {
        F_Q4_0 => 18,
        F_Q4_1 => 20,
        _ => 34,
    }
}

/// Bytes per quantised activation value.
const fn act_bytes(a16: bool) -> usize {
    if a16 {
        2
    } else {
        1
    }
}

/// One matrix of quantised activations, as raw parts (`qs` holds `rows * k` values of 1 or 2
/// bytes each, `ds` one `[d, d * sum(q)]` per block).
#[derive(Clone, Copy)]
pub(crate) struct ActPtrs {
    pub qs: *const u8,
    pub ds: *const [f32; 2],
    pub rows: usize,
    pub k: usize,
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of `u[i] * s[i]` (u8 times i8) over groups of four bytes, as eight i32 lanes.
#[inline(always)]
unsafe fn dot_us<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    } else {
        // products are at most 15*127 (Q4) or 128*127 (Q8 via the sign trick), so the pairwise
        // i16 sums cannot saturate
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }
}

/// The 32 quantised weights of one block as bytes: nibbles 0..15 for Q4 (unsigned), raw i8 for Q8_0.
#[inline(always)]
unsafe fn wload<const F: u8>(blk: *const u8) -> __m256i {
    if F == F_Q8_0 {
        _mm256_loadu_si256(blk.add(2) as *const __m256i)
    } else {
        let off = if F == F_Q4_1 { 4 } else { 2 };
        // the 16 bytes in both lanes (a load-broadcast, no shuffle uop), then shift the upper lane
        // by 4 so low nibbles (values 0..15) land in the lower lane and high nibbles (16..31) in
        // the upper one; bits shifted across byte boundaries are masked off
        let x = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(off) as *const __m128i));
        let x = _mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 0, 4, 4));
        _mm256_and_si256(x, _mm256_set1_epi8(0x0F))
    }
}

/// Integer block dot product of weights `w` (from `wload`) with activations `a`.
#[inline(always)]
unsafe fn wdot<const F: u8, const VNNI: bool>(w: __m256i, a: __m256i) -> __m256i {
    if F == F_Q8_0 {
        // signed x signed: move the weight's sign onto the activation (llama.cpp's trick)
        dot_us::<VNNI>(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w))
    } else {
        dot_us::<VNNI>(w, a)
    }
}

/// Lanes 0 and 1: `[d, m]` for Q4_1, `[d, d]` for Q4_0; lane 0 `d` for Q8_0 (lane 1 is junk
/// there: a 4-byte load that includes two quant bytes converts in one step without a shuffle).
#[inline(always)]
unsafe fn wscale<const F: u8>(blk: *const u8) -> __m128 {
    if F == F_Q4_0 {
        _mm_cvtph_ps(_mm_set1_epi16((blk as *const i16).read_unaligned()))
    } else {
        _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()))
    }
}

/// The 32 quantised weights of one block widened to i16: values 0..15 and 16..31 (Q4 nibbles
/// 0..15 unsigned, Q8_0 signed).
#[inline(always)]
unsafe fn wload16<const F: u8>(blk: *const u8) -> [__m256i; 2] {
    if F == F_Q8_0 {
        [
            _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(2) as *const __m128i)),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(18) as *const __m128i)),
        ]
    } else {
        let off = if F == F_Q4_1 { 4 } else { 2 };
        // byte j holds values j (low nibble) and j + 16 (high nibble); widened to i16 the high
        // nibble is a plain shift away
        let q = _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.add(off) as *const __m128i));
        [
            _mm256_and_si256(q, _mm256_set1_epi16(0x0F)),
            _mm256_srli_epi16(q, 4),
        ]
    }
}

/// `acc + sum of w[i] * a[i]` over pairs of i16, as eight i32 lanes.
#[inline(always)]
unsafe fn dot16<const VNNI: bool>(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpwssd_epi32(acc, w, a)
    } else {
        // a pair sum overflows only for (-32768)^2 * 2; activations stay within +-32767
        _mm256_add_epi32(acc, _mm256_madd_epi16(w, a))
    }
}

/// `R` weight rows (any addresses) times one activation row (`A16`: i16 values, else i8): each
/// activation block is loaded once for all `R` rows, and the `R` rows are `R` independent FMA
/// chains (one chain alone is latency-bound at about 4 cycles per block).
#[inline(always)]
unsafe fn gemv_rows<const F: u8, const R: usize, const VNNI: bool, const A16: bool>(
    w: [*const u8; R],
    nb: usize,
    aq: *const u8,
    ads: *const [f32; 2],
    out: [*mut f32; R],
) {
    let ab = QK * act_bytes(A16);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acco = [_mm_setzero_ps(); R];
    for b in 0..nb {
        let a0 = _mm256_loadu_si256(aq.add(b * ab) as *const __m256i);
        // the second half of a 16-bit block (unused, and not loaded, for 8 bits)
        let a1 = if A16 {
            _mm256_loadu_si256(aq.add(b * ab + 32) as *const __m256i)
        } else {
            a0
        };
        let a_ds = _mm_castpd_ps(_mm_load_sd(ads.add(b) as *const f64));
        for r in 0..R {
            let blk = w[r].add(b * bb(F));
            let sc = _mm_mul_ps(wscale::<F>(blk), a_ds);
            let dot = if A16 {
                let [w0, w1] = wload16::<F>(blk);
                dot16::<VNNI>(dot16::<VNNI>(_mm256_setzero_si256(), w0, a0), w1, a1)
            } else {
                wdot::<F, VNNI>(wload::<F>(blk), a0)
            };
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sc), _mm256_cvtepi32_ps(dot), acc[r]);
            if F != F_Q8_0 {
                acco[r] = _mm_add_ps(acco[r], sc);
            }
        }
    }
    for r in 0..R {
        let v = hsum(acc[r]);
        let o = _mm_cvtss_f32(_mm_movehdup_ps(acco[r]));
        *out[r] = match F {
            F_Q4_1 => v + o,
            F_Q4_0 => v - 8.0 * o,
            _ => v,
        };
    }
}

#[inline(always)]
unsafe fn gemv_impl<const F: u8, const VNNI: bool, const A16: bool>(
    w: *const u8,
    n: usize,
    nb: usize,
    aq: *const u8,
    ads: *const [f32; 2],
    out: *mut f32,
) {
    let row_bytes = nb * bb(F);
    let mut i = 0;
    if n >= 16 {
        // Four rows a quarter of the range apart: four sequential read streams in different
        // pages. Four *adjacent* rows (four streams interleaved within the same pages) measured
        // 20-70% slower once the weights come from DRAM rather than cache (Q8_0 576x1536: 7.5
        // vs 22.7 GB/s on one core), and in decode every weight comes from DRAM.
        let q = n / 4;
        for j in 0..q {
            let (r0, r1, r2, r3) = (j, j + q, j + 2 * q, j + 3 * q);
            let rows = [
                w.add(r0 * row_bytes),
                w.add(r1 * row_bytes),
                w.add(r2 * row_bytes),
                w.add(r3 * row_bytes),
            ];
            gemv_rows::<F, 4, VNNI, A16>(
                rows,
                nb,
                aq,
                ads,
                [out.add(r0), out.add(r1), out.add(r2), out.add(r3)],
            );
        }
        i = 4 * q;
    }
    // the same instruction sequence per row as above, so results do not depend on how rows
    // were split between threads
    while i < n {
        gemv_rows::<F, 1, VNNI, A16>([w.add(i * row_bytes)], nb, aq, ads, [out.add(i)]);
        i += 1;
    }
}

/// Rows of 8 dwords in, columns out: `out[g][j] = v[j][g]`.
#[inline(always)]
unsafe fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256(u0, u4, 0x20),
        _mm256_permute2x128_si256(u1, u5, 0x20),
        _mm256_permute2x128_si256(u2, u6, 0x20),
        _mm256_permute2x128_si256(u3, u7, 0x20),
        _mm256_permute2x128_si256(u0, u4, 0x31),
        _mm256_permute2x128_si256(u1, u5, 0x31),
        _mm256_permute2x128_si256(u2, u6, 0x31),
        _mm256_permute2x128_si256(u3, u7, 0x31),
    ]
}

/// How a packed tile forms its integer block sums.
/// 8-bit activations: VNNI: `vpdpbusd` on u8 weights. UBS: `vpmaddubsw` on u8 weights, summed in
/// i16 lanes over the 8 groups of a block (no overflow for Q4 nibbles: 8 x 2 x 15 x 127 < 2^15).
/// SIGN: Q8_0 kept signed, `vpsignb` moves each weight's sign onto the activation and
/// `vpmaddubsw` multiplies by `|w|` (u8 + 128 would overflow `vpmaddubsw`'s i16 pairs), widened
/// to i32 every group.
/// U7: Q8_0 blocks whose values lie in -63..=63 (the AVX2 backward copy, see
/// [`gemm_q8_narrow_avx2`]) packed unsigned as `q + 64` (1..=127), so `vpmaddubsw` needs no sign
/// step (`127 * 127 * 2` fits its i16 pairs), widened to i32 every group: 3 vector ops per 32
/// products instead of SIGN's 4.
/// 16-bit activations: W16_VNNI: `vpdpwssd` on i16 weights; W16: `vpmaddwd` + `vpaddd`. Q8_0
/// and Q4_0 (as nibble - 8) are packed signed, with no offset term: the products are signed x
/// signed.
const MODE_VNNI: u8 = 0;
const MODE_UBS: u8 = 1;
const MODE_SIGN: u8 = 2;
const MODE_W16_VNNI: u8 = 3;
const MODE_W16: u8 = 4;
const MODE_U7: u8 = 5;

const fn is_w16(mode: u8) -> bool {
    mode == MODE_W16_VNNI || mode == MODE_W16
}

/// Groups of 32 bytes per block of an 8-row panel: 4 values of 8 rows as u8, or 2 as i16.
const fn groups(mode: u8) -> usize {
    if is_w16(mode) {
        16
    } else {
        8
    }
}

/// One block (32 values) of 8 weight rows, repacked for the batched kernel, as `panel_units(MODE)`
/// aligned 32-byte units: `groups(MODE)` units of weights, then `d` and `o` for the 8 rows.
/// Unit `g` holds values `4g..4g+4` of rows 0..7 as unsigned bytes (Q4 nibbles; Q8_0 values +
/// 128, or signed for `MODE_SIGN`), or for the 16-bit modes values `2g, 2g+1` of rows 0..7 as
/// i16, so one `vpdpbusd` / `vpdpwssd` against broadcast activations yields 8 output columns at
/// once and no horizontal sums are needed. Per row: the scale `d` and the offset `o` such that a
/// weight is `d * u + o` (`o` = m for Q4_1; -8d for Q4_0 and -128d for Q8_0 where they are packed
/// unsigned; else 0).
const fn panel_units(mode: u8) -> usize {
    groups(mode) + 2
}

/// Repack `rows` (<= 8) weight rows of `nb` blocks into `nb` panel blocks at `dst`; missing
/// rows are zero.
#[inline(always)]
unsafe fn pack_panel<const F: u8, const MODE: u8>(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    nb: usize,
    dst: *mut __m256i,
) {
    let units = panel_units(MODE);
    for b in 0..nb {
        let mut v = [_mm256_setzero_si256(); 8];
        let mut v2 = [_mm256_setzero_si256(); 8];
        let mut d = [0f32; 8];
        let mut o = [0f32; 8];
        for j in 0..rows {
            let blk = w.add(j * row_bytes + b * bb(F));
            if is_w16(MODE) {
                [v[j], v2[j]] = wload16::<F>(blk);
                if F == F_Q4_0 {
                    // signed i16 weights need no offset term (one FMA less per block)
                    let eight = _mm256_set1_epi16(8);
                    v[j] = _mm256_sub_epi16(v[j], eight);
                    v2[j] = _mm256_sub_epi16(v2[j], eight);
                }
            } else {
                v[j] = wload::<F>(blk);
            }
            let sc = wscale::<F>(blk);
            d[j] = _mm_cvtss_f32(sc);
            o[j] = match F {
                F_Q4_1 => _mm_cvtss_f32(_mm_movehdup_ps(sc)),
                F_Q4_0 if is_w16(MODE) => 0.0,
                F_Q4_0 => -8.0 * d[j],
                _ if MODE == MODE_U7 => {
                    v[j] = _mm256_add_epi8(v[j], _mm256_set1_epi8(64));
                    -64.0 * d[j]
                }
                _ if MODE != MODE_VNNI => 0.0,
                _ => {
                    v[j] = _mm256_xor_si256(v[j], _mm256_set1_epi8(-128));
                    -128.0 * d[j]
                }
            };
        }
        let pb = dst.add(b * units);
        // a dword of a weight vector is 4 u8 values or 2 i16 values: either way the transpose
        // gathers dword g of the 8 rows
        let t = transpose8(v);
        for g in 0..8 {
            _mm256_store_si256(pb.add(g), t[g]);
        }
        if is_w16(MODE) {
            let t = transpose8(v2);
            for g in 0..8 {
                _mm256_store_si256(pb.add(8 + g), t[g]);
            }
        }
        let ng = groups(MODE);
        _mm256_store_ps(pb.add(ng) as *mut f32, _mm256_loadu_ps(d.as_ptr()));
        _mm256_store_ps(pb.add(ng + 1) as *mut f32, _mm256_loadu_ps(o.as_ptr()));
    }
}

/// `RA` activation rows times `NP` packed panels (8 output columns each). Integer sums per block
/// stay in registers, then one scale-and-offset step per block and 8 columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_tile<const F: u8, const RA: usize, const NP: usize, const MODE: u8>(
    panels: *const __m256i,
    nb: usize,
    aq: *const u8,
    k: usize,
    ads: *const [f32; 2],
    out: *mut f32,
    ldo: usize,
    ncols: usize,
) {
    let units = panel_units(MODE);
    let ng = groups(MODE);
    let ab = act_bytes(is_w16(MODE));
    // Q4_1 always has an offset term (its `m`); Q4_0 and Q8_0 only where their weights were
    // packed unsigned (see `pack_panel`)
    let offset = match F {
        F_Q4_1 => true,
        F_Q4_0 => !is_w16(MODE),
        _ => MODE == MODE_VNNI || MODE == MODE_U7,
    };
    let ones = _mm256_set1_epi16(1);
    let mut facc = [[_mm256_setzero_ps(); NP]; RA];
    for b in 0..nb {
        let mut iacc = [[_mm256_setzero_si256(); NP]; RA];
        for g in 0..ng {
            let mut wv = [_mm256_setzero_si256(); NP];
            let mut wa = [_mm256_setzero_si256(); NP];
            for p in 0..NP {
                wv[p] = _mm256_load_si256(panels.add((p * nb + b) * units + g));
                if MODE == MODE_SIGN {
                    wa[p] = _mm256_abs_epi8(wv[p]);
                }
            }
            for r in 0..RA {
                // 4 bytes: four 8-bit activations or two 16-bit ones
                let xb = _mm256_set1_epi32(
                    (aq.add((r * k + b * QK) * ab + 4 * g) as *const i32).read_unaligned(),
                );
                for p in 0..NP {
                    iacc[r][p] = match MODE {
                        MODE_VNNI => _mm256_dpbusd_epi32(iacc[r][p], wv[p], xb),
                        MODE_UBS => _mm256_add_epi16(iacc[r][p], _mm256_maddubs_epi16(wv[p], xb)),
                        MODE_W16_VNNI => _mm256_dpwssd_epi32(iacc[r][p], wv[p], xb),
                        MODE_W16 => _mm256_add_epi32(iacc[r][p], _mm256_madd_epi16(wv[p], xb)),
                        MODE_U7 => _mm256_add_epi32(
                            iacc[r][p],
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wv[p], xb), ones),
                        ),
                        _ => {
                            let xs = _mm256_sign_epi8(xb, wv[p]);
                            let pairs = _mm256_maddubs_epi16(wa[p], xs);
                            _mm256_add_epi32(iacc[r][p], _mm256_madd_epi16(pairs, ones))
                        }
                    };
                }
            }
        }
        for r in 0..RA {
            let [dx, sx] = *ads.add(r * nb + b);
            let (dxv, sxv) = (_mm256_set1_ps(dx), _mm256_set1_ps(sx));
            for p in 0..NP {
                let pb = panels.add((p * nb + b) * units);
                let isum = if MODE == MODE_UBS {
                    _mm256_madd_epi16(iacc[r][p], ones)
                } else {
                    iacc[r][p]
                };
                let t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), dxv);
                let d = _mm256_load_ps(pb.add(ng) as *const f32);
                facc[r][p] = _mm256_fmadd_ps(t, d, facc[r][p]);
                if offset {
                    let o = _mm256_load_ps(pb.add(ng + 1) as *const f32);
                    facc[r][p] = _mm256_fmadd_ps(o, sxv, facc[r][p]);
                }
            }
        }
    }
    for r in 0..RA {
        for p in 0..NP {
            let o = out.add(r * ldo + p * 8);
            if ncols >= (p + 1) * 8 {
                _mm256_storeu_ps(o, facc[r][p]);
            } else if ncols > p * 8 {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), facc[r][p]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, ncols - p * 8);
            }
        }
    }
}

/// Batched product on packed panels: weight rows in groups of `8 * NP` (`NP` panels) are
/// repacked once per call into a per-thread buffer, then every tile of up to `RA` activation
/// rows runs against them, so the packed weights (12-110 KB for SmolLM2 shapes) stay in L1/L2.
/// `RA` x `NP` is the register tile: its integer accumulators must stay in registers (the float
/// ones are touched once per block and may live on the stack).
#[inline(always)]
unsafe fn gemm_packed<const F: u8, const RA: usize, const NP: usize, const MODE: u8>(
    w: *const u8,
    n_w: usize,
    act: ActPtrs,
    out: *mut f32,
    ldo: usize,
) {
    let (k, m) = (act.k, act.rows);
    let nb = k / QK;
    let row_bytes = nb * bb(F);
    let ab = act_bytes(is_w16(MODE));
    let (aq, ads) = (act.qs, act.ds);
    let units = panel_units(MODE);
    // A fresh buffer per call (one call is one 16-row chunk, tens of microseconds of work).
    // Not a thread-local: code inside its `with` closure would lose this function's target
    // features and the intrinsics would stop inlining.
    let mut buf = vec![_mm256_setzero_si256(); NP * nb * units];
    let panels = buf.as_mut_ptr();
    let mut c0 = 0;
    while c0 < n_w {
        let cols = (n_w - c0).min(8 * NP);
        let np = cols.div_ceil(8);
        for p in 0..np {
            let rows = (cols - 8 * p).min(8);
            pack_panel::<F, MODE>(
                w.add((c0 + 8 * p) * row_bytes),
                row_bytes,
                rows,
                nb,
                panels.add(p * nb * units),
            );
        }
        let mut r0 = 0;
        while r0 < m {
            let ra = (m - r0).min(RA);
            let (a, d, o) = (
                aq.add(r0 * k * ab),
                ads.add(r0 * nb),
                out.add(r0 * ldo + c0),
            );
            // the full tile, or a narrower one at the right edge (fewer panels) and the bottom
            // (fewer rows); every shape is instantiated only up to the chosen RA x NP
            macro_rules! tile {
                ($ra:literal) => {
                    match np {
                        1 => packed_tile::<F, $ra, 1, MODE>(panels, nb, a, k, d, o, ldo, cols),
                        2 if NP >= 2 => {
                            packed_tile::<F, $ra, 2, MODE>(panels, nb, a, k, d, o, ldo, cols)
                        }
                        3 if NP >= 3 => {
                            packed_tile::<F, $ra, 3, MODE>(panels, nb, a, k, d, o, ldo, cols)
                        }
                        _ => packed_tile::<F, $ra, NP, MODE>(panels, nb, a, k, d, o, ldo, cols),
                    }
                };
            }
            match ra {
                1 => tile!(1),
                2 if RA >= 2 => tile!(2),
                3 if RA >= 3 => tile!(3),
                _ if RA >= 4 => tile!(4),
                _ => tile!(1),
            }
            r0 += ra;
        }
        c0 += cols;
    }
}

/// Quantise whole blocks of `x` to `QK`-value blocks of i8 (`A16` false) or i16 at `q`.
#[inline(always)]
unsafe fn quantize_impl<const A16: bool>(x: &[f32], q: *mut u8, ds: &mut [[f32; 2]]) {
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let qmax = if A16 { 32767.0 } else { 127.0 };
    for (i, (xb, dsb)) in x.chunks_exact(QK).zip(ds.iter_mut()).enumerate() {
        let p = xb.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let m = _mm256_max_ps(m01, m23);
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let (d, id) = act_scale(_mm_cvtss_f32(m), qmax);
        let idv = _mm256_set1_ps(id);
        // cvtps2dq rounds half to even, matching `quantize_block_scalar` (no closure: see top)
        let q32 = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], idv)),
        ];
        // packs work within 128-bit lanes; the permutes restore value order
        let p01 = _mm256_packs_epi32(q32[0], q32[1]);
        let p23 = _mm256_packs_epi32(q32[2], q32[3]);
        if A16 {
            let dst = q.add(i * QK * 2) as *mut __m256i;
            _mm256_storeu_si256(dst, _mm256_permute4x64_epi64(p01, 0b11_01_10_00));
            _mm256_storeu_si256(dst.add(1), _mm256_permute4x64_epi64(p23, 0b11_01_10_00));
        } else {
            let packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
            _mm256_storeu_si256(q.add(i * QK) as *mut __m256i, packed);
        }
        // the integer sum is exact, so `d * isum` is bit-identical to the scalar quantiser
        let s = _mm256_add_epi32(
            _mm256_add_epi32(q32[0], q32[1]),
            _mm256_add_epi32(q32[2], q32[3]),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        *dsb = [d, d * _mm_cvtsi128_si32(s) as f32];
    }
}

#[inline(always)]
unsafe fn dequant_impl<const F: u8>(bytes: &[u8], out: &mut [f32]) {
    for (blk, o) in bytes.chunks_exact(bb(F)).zip(out.chunks_exact_mut(QK)) {
        let p = blk.as_ptr();
        let v = wload::<F>(p);
        let sc = wscale::<F>(p);
        let d = _mm256_broadcastss_ps(sc);
        let m = match F {
            F_Q4_1 => _mm256_broadcastss_ps(_mm_movehdup_ps(sc)),
            F_Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
            _ => _mm256_setzero_ps(),
        };
        let halves = [_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)];
        for (h, half) in halves.into_iter().enumerate() {
            for q in 0..2 {
                let part = if q == 0 {
                    half
                } else {
                    _mm_unpackhi_epi64(half, half)
                };
                let ints = if F == F_Q8_0 {
                    _mm256_cvtepi8_epi32(part)
                } else {
                    _mm256_cvtepu8_epi32(part)
                };
                let vals = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), d, m);
                _mm256_storeu_ps(o.as_mut_ptr().add(16 * h + 8 * q), vals);
            }
        }
    }
}

/// Dequantise whole blocks (`out.len() == QK * bytes.len() / block_bytes`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequant_avx2(fmt: Fmt, bytes: &[u8], out: &mut [f32]) {
    match fmt {
        Fmt::Q4_0 => dequant_impl::<F_Q4_0>(bytes, out),
        Fmt::Q4_1 => dequant_impl::<F_Q4_1>(bytes, out),
        Fmt::Q8_0 => dequant_impl::<F_Q8_0>(bytes, out),
    }
}

/// The `#[target_feature]` entry points of one level and activation width. Per format: the
/// batched kernel's mode and register tile (activation rows x 8-column panels). With AVX-512VL
/// there are 32 vector registers, so 4 x 2 tiles of int and float accumulators fit. AVX2 has 16:
/// the 8-bit tiles keep their int accumulators in registers and let the compiler spill the
/// float ones (touched once per block). Measured on a Zen 3 EPYC (AVX2), one thread, 1024 x
/// 1536 activations against 576 rows, interleaved runs: Q4_0 4 x 2 and Q4_1 3 x 2 run 89-96
/// GMAC/s where 2 x 2 ran 82-84 (4 x 2 for Q4_1 and 2 x 4 measured lower), Q8_0 4 x 2 53 where
/// 2 x 2 ran 48-49. Zen 3 issues integer multiplies on the two pipes its FMAs use, so
/// `MODE_SIGN` (sign, multiply, widen, add: 4 vector ops per 32 products, 2 of them multiplies)
/// stays near the f32 GEMM's rate there (~47 GMAC/s a core).
macro_rules! entry_points {
    ($feat:literal, $vnni:literal, $a16:literal,
     [($m40:ident, $r40:literal, $p40:literal), ($m41:ident, $r41:literal, $p41:literal),
      ($m80:ident, $r80:literal, $p80:literal)],
     $gemv:ident, $gemm:ident, $quant:ident) => {
        /// `out[i] = W[i, :] . x` for `n` rows of `nb` blocks at `w`, `x` at `aq` / `ads`.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn $gemv(
            fmt: Fmt,
            w: *const u8,
            n: usize,
            nb: usize,
            aq: *const u8,
            ads: *const [f32; 2],
            out: *mut f32,
        ) {
            match fmt {
                Fmt::Q4_0 => gemv_impl::<F_Q4_0, $vnni, $a16>(w, n, nb, aq, ads, out),
                Fmt::Q4_1 => gemv_impl::<F_Q4_1, $vnni, $a16>(w, n, nb, aq, ads, out),
                Fmt::Q8_0 => gemv_impl::<F_Q8_0, $vnni, $a16>(w, n, nb, aq, ads, out),
            }
        }

        /// `out[r * ldo + c] = W[c, :] . x_r` for `n_w` weight rows at `w`.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn $gemm(
            fmt: Fmt,
            w: *const u8,
            n_w: usize,
            act: ActPtrs,
            out: *mut f32,
            ldo: usize,
        ) {
            match fmt {
                Fmt::Q4_0 => gemm_packed::<F_Q4_0, $r40, $p40, $m40>(w, n_w, act, out, ldo),
                Fmt::Q4_1 => gemm_packed::<F_Q4_1, $r41, $p41, $m41>(w, n_w, act, out, ldo),
                Fmt::Q8_0 => gemm_packed::<F_Q8_0, $r80, $p80, $m80>(w, n_w, act, out, ldo),
            }
        }

        /// Quantise whole blocks of `x` into `q` (`x.len()` values) and `ds`.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn $quant(x: &[f32], q: *mut u8, ds: &mut [[f32; 2]]) {
            quantize_impl::<$a16>(x, q, ds)
        }
    };
}

entry_points!(
    "avx2,fma,f16c",
    false,
    false,
    [(MODE_UBS, 4, 2), (MODE_UBS, 3, 2), (MODE_SIGN, 4, 2)],
    gemv_avx2,
    gemm_avx2,
    quantize_avx2
);
entry_points!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    false,
    [(MODE_VNNI, 4, 2), (MODE_VNNI, 4, 2), (MODE_VNNI, 4, 2)],
    gemv_avx512,
    gemm_avx512,
    quantize_avx512
);
// Q8_0 at 16 bits takes 4 activation rows a tile: it is a 4-bit base's training forward on
// AVX2 (`QuantWeight::four_bit_q8_forward`), 1024 rows at a time, where 4 x 2 ran 3% faster
// than 2 x 2 (11 of the 16 ymm registers).
entry_points!(
    "avx2,fma,f16c",
    false,
    true,
    [(MODE_W16, 2, 2), (MODE_W16, 2, 2), (MODE_W16, 4, 2)],
    gemv16_avx2,
    gemm16_avx2,
    quantize16_avx2
);
entry_points!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    true,
    [
        (MODE_W16_VNNI, 4, 2),
        (MODE_W16_VNNI, 4, 2),
        (MODE_W16_VNNI, 4, 2)
    ],
    gemv16_avx512,
    gemm16_avx512,
    quantize16_avx512
);

/// `out[r * ldo + c] = W[c, :] . x_r` for Q8_0 weight rows whose values all lie in -63..=63
/// (8-bit activations). On a Zen 3 EPYC, one thread, 1024 x 1536 against 576 rows: 68-69
/// GMAC/s where the full-range Q8_0 kernel (`MODE_SIGN`) runs 57-58.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_q8_narrow_avx2(
    w: *const u8,
    n_w: usize,
    act: ActPtrs,
    out: *mut f32,
    ldo: usize,
) {
    gemm_packed::<F_Q8_0, 4, 2, MODE_U7>(w, n_w, act, out, ldo)
}

pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub(crate) fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

// ---- Decode of several sequences at once (continuous batching) ----

/// One weight row times `M` activation rows: for each (row, activation) pair exactly the
/// instruction sequence [`gemv_rows`] runs for one row (the same integer block sums, the same
/// FMA into the same eight f32 lanes, the same horizontal sum), so every output is
/// bit-identical to what `gemv` gives for that activation row alone, whatever `M` and whatever
/// the other rows. The weight block is loaded (and widened) once for all `M` rows: a batched
/// decode step reads each weight once instead of once per sequence.
#[inline(always)]
unsafe fn gemv_acts<const F: u8, const M: usize, const VNNI: bool, const A16: bool>(
    w: *const u8,
    nb: usize,
    aq: [*const u8; M],
    ads: [*const [f32; 2]; M],
    out: [*mut f32; M],
) {
    let ab = QK * act_bytes(A16);
    let mut acc = [_mm256_setzero_ps(); M];
    let mut acco = [_mm_setzero_ps(); M];
    for b in 0..nb {
        let blk = w.add(b * bb(F));
        let ws = wscale::<F>(blk);
        let [w0, w1] = if A16 {
            wload16::<F>(blk)
        } else {
            let w = wload::<F>(blk);
            [w, w]
        };
        for r in 0..M {
            let a0 = _mm256_loadu_si256(aq[r].add(b * ab) as *const __m256i);
            let a1 = if A16 {
                _mm256_loadu_si256(aq[r].add(b * ab + 32) as *const __m256i)
            } else {
                a0
            };
            let a_ds = _mm_castpd_ps(_mm_load_sd(ads[r].add(b) as *const f64));
            let sc = _mm_mul_ps(ws, a_ds);
            let dot = if A16 {
                dot16::<VNNI>(dot16::<VNNI>(_mm256_setzero_si256(), w0, a0), w1, a1)
            } else {
                wdot::<F, VNNI>(w0, a0)
            };
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sc), _mm256_cvtepi32_ps(dot), acc[r]);
            if F != F_Q8_0 {
                acco[r] = _mm_add_ps(acco[r], sc);
            }
        }
    }
    for r in 0..M {
        let v = hsum(acc[r]);
        let o = _mm_cvtss_f32(_mm_movehdup_ps(acco[r]));
        *out[r] = match F {
            F_Q4_1 => v + o,
            F_Q4_0 => v - 8.0 * o,
            _ => v,
        };
    }
}

/// `out[r * ldo + i] = W[i, :] . x_r` for `n` weight rows at `w` and the `m` activation rows of
/// `act`, in groups of up to `MA` activation rows per pass over a weight row (the row's blocks
/// stay in L1 between groups).
#[inline(always)]
unsafe fn gemv_multi_impl<const F: u8, const MA: usize, const VNNI: bool, const A16: bool>(
    w: *const u8,
    n: usize,
    act: ActPtrs,
    out: *mut f32,
    ldo: usize,
) {
    let nb = act.k / QK;
    let row_bytes = nb * bb(F);
    let abytes = act.k * act_bytes(A16);
    for i in 0..n {
        let wr = w.add(i * row_bytes);
        let mut r0 = 0;
        while r0 < act.rows {
            let g = (act.rows - r0).min(MA);
            macro_rules! group {
                ($m:literal) => {{
                    let mut aq = [std::ptr::null(); $m];
                    let mut ad = [std::ptr::null(); $m];
                    let mut o = [std::ptr::null_mut(); $m];
                    for j in 0..$m {
                        aq[j] = act.qs.add((r0 + j) * abytes);
                        ad[j] = act.ds.add((r0 + j) * nb);
                        o[j] = out.add((r0 + j) * ldo + i);
                    }
                    gemv_acts::<F, $m, VNNI, A16>(wr, nb, aq, ad, o)
                }};
            }
            match g {
                1 => group!(1),
                2 => group!(2),
                3 => group!(3),
                4 => group!(4),
                5 if MA > 4 => group!(5),
                6 if MA > 4 => group!(6),
                7 if MA > 4 => group!(7),
                _ if MA > 4 => group!(8),
                _ => group!(4),
            }
            r0 += g;
        }
    }
}

/// The `#[target_feature]` entry points of [`gemv_multi_impl`]; `$ma` activation rows per pass
/// (AVX-512VL's 32 vector registers hold 8 rows of accumulators, AVX2's 16 hold 4).
macro_rules! gemv_multi_entry {
    ($feat:literal, $vnni:literal, $a16:literal, $ma:literal, $name:ident) => {
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn $name(
            fmt: Fmt,
            w: *const u8,
            n: usize,
            act: ActPtrs,
            out: *mut f32,
            ldo: usize,
        ) {
            match fmt {
                Fmt::Q4_0 => gemv_multi_impl::<F_Q4_0, $ma, $vnni, $a16>(w, n, act, out, ldo),
                Fmt::Q4_1 => gemv_multi_impl::<F_Q4_1, $ma, $vnni, $a16>(w, n, act, out, ldo),
                Fmt::Q8_0 => gemv_multi_impl::<F_Q8_0, $ma, $vnni, $a16>(w, n, act, out, ldo),
            }
        }
    };
}

gemv_multi_entry!("avx2,fma,f16c", false, false, 4, gemv_multi_avx2);
gemv_multi_entry!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    false,
    8,
    gemv_multi_avx512
);
gemv_multi_entry!("avx2,fma,f16c", false, true, 4, gemv16_multi_avx2);
gemv_multi_entry!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    true,
    8,
    gemv16_multi_avx512
);

// ---- Decode with f32 activations (`DecodeArith::F32`) ----

/// The low 8 bytes of `q` as signed weights, times `d`. (A function, not a closure: a closure
/// would not inherit the caller's target features.)
#[inline(always)]
unsafe fn deq8_i8(q: __m128i, d: __m256) -> __m256 {
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
}

/// The low 8 bytes of `q` (nibble values 0..15) as `fma(q, d, m)`.
#[inline(always)]
unsafe fn deq8_u4(q: __m128i, d: __m256, m: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), d, m)
}

/// The 32 weights of one block as f32, values 0..7, 8..15, 16..23, 24..31: Q4_1
/// `fma(q, d, m)`, Q4_0 `fma(q, d, -8d)` (= `d (q - 8)` rounded once), Q8_0 `q * d`, exactly
/// as `format::dequant_block_f32` computes them.
#[inline(always)]
unsafe fn wdeq<const F: u8>(blk: *const u8) -> [__m256; 4] {
    let sc = wscale::<F>(blk);
    let d = _mm256_broadcastss_ps(sc);
    if F == F_Q8_0 {
        let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
        let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
        [
            deq8_i8(q0, d),
            deq8_i8(_mm_srli_si128(q0, 8), d),
            deq8_i8(q1, d),
            deq8_i8(_mm_srli_si128(q1, 8), d),
        ]
    } else {
        let m = if F == F_Q4_1 {
            _mm256_broadcastss_ps(_mm_movehdup_ps(sc))
        } else {
            _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
        };
        let off = if F == F_Q4_1 { 4 } else { 2 };
        let q = _mm_loadu_si128(blk.add(off) as *const __m128i);
        let lo = _mm_and_si128(q, _mm_set1_epi8(0x0F));
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F));
        [
            deq8_u4(lo, d, m),
            deq8_u4(_mm_srli_si128(lo, 8), d, m),
            deq8_u4(hi, d, m),
            deq8_u4(_mm_srli_si128(hi, 8), d, m),
        ]
    }
}

/// `C` weight rows times `M` f32 activation rows: per (weight row, activation row) pair one
/// eight-lane accumulator that takes, block after block, the four fused products of the
/// block's dequantised weights with the activations, then the horizontal sum. That sequence is
/// the same for a pair whatever `C` and `M` (and whatever the other rows), so each output is
/// bit-identical to a lone matrix-vector product; `C` and `M` only decide how many independent
/// FMA chains run and how often a block is dequantised (once per `M` rows).
#[inline(always)]
unsafe fn f32_tile<const F: u8, const C: usize, const M: usize>(
    w: [*const u8; C],
    nb: usize,
    x: [*const f32; M],
    out: [[*mut f32; M]; C],
) {
    let mut acc = [[_mm256_setzero_ps(); M]; C];
    for b in 0..nb {
        for c in 0..C {
            let wv = wdeq::<F>(w[c].add(b * bb(F)));
            for r in 0..M {
                let xp = x[r].add(b * QK);
                let mut a = acc[c][r];
                a = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xp), a);
                a = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xp.add(8)), a);
                a = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xp.add(16)), a);
                a = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xp.add(24)), a);
                acc[c][r] = a;
            }
        }
    }
    for c in 0..C {
        for r in 0..M {
            *out[c][r] = hsum(acc[c][r]);
        }
    }
}

/// `n` weight rows at `w` times `M` activation rows (`x` rows `ldx` apart) into `out` (rows
/// `ldo` apart): `C` weight rows per pass, a quarter (or half) of the range apart as in
/// [`gemv_impl`] (separate DRAM streams), the rest one by one.
#[inline(always)]
unsafe fn f32_rows<const F: u8, const C: usize, const M: usize>(
    w: *const u8,
    n: usize,
    nb: usize,
    x: *const f32,
    ldx: usize,
    out: *mut f32,
    ldo: usize,
) {
    let row_bytes = nb * bb(F);
    let xs: [*const f32; M] = std::array::from_fn(|r| x.add(r * ldx));
    let outs = |i: usize| -> [*mut f32; M] { std::array::from_fn(|r| out.add(r * ldo + i)) };
    let mut i = 0;
    if C > 1 && n >= 4 * C {
        let q = n / C;
        for j in 0..q {
            let cols: [usize; C] = std::array::from_fn(|c| j + c * q);
            f32_tile::<F, C, M>(cols.map(|c| w.add(c * row_bytes)), nb, xs, cols.map(&outs));
        }
        i = C * q;
    }
    while i < n {
        f32_tile::<F, 1, M>([w.add(i * row_bytes)], nb, xs, [outs(i)]);
        i += 1;
    }
}

/// `out[r * ldo + i] = W[i, :] . x_r` for `n` weight rows at `w` and `m` f32 activation rows
/// at `x` (`ldx` apart), in groups of up to 8 activation rows per pass over the weights.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_f32_impl<const F: u8>(
    w: *const u8,
    n: usize,
    nb: usize,
    x: *const f32,
    m: usize,
    ldx: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut r0 = 0;
    while r0 < m {
        // balanced groups of at most 8 (10 rows: 5 + 5, not 8 + 2)
        let groups = (m - r0).div_ceil(8);
        let g = (m - r0).div_ceil(groups);
        let (xg, og) = (x.add(r0 * ldx), out.add(r0 * ldo));
        match g {
            1 => f32_rows::<F, 4, 1>(w, n, nb, xg, ldx, og, ldo),
            2 => f32_rows::<F, 4, 2>(w, n, nb, xg, ldx, og, ldo),
            3 => f32_rows::<F, 2, 3>(w, n, nb, xg, ldx, og, ldo),
            4 => f32_rows::<F, 2, 4>(w, n, nb, xg, ldx, og, ldo),
            5 => f32_rows::<F, 1, 5>(w, n, nb, xg, ldx, og, ldo),
            6 => f32_rows::<F, 1, 6>(w, n, nb, xg, ldx, og, ldo),
            7 => f32_rows::<F, 1, 7>(w, n, nb, xg, ldx, og, ldo),
            _ => f32_rows::<F, 1, 8>(w, n, nb, xg, ldx, og, ldo),
        }
        r0 += g;
    }
}

/// The `#[target_feature]` entry point of [`gemv_f32_impl`] (AVX2 + FMA + F16C; AVX-512
/// machines run it too: 256-bit FMAs are what the decode loop needs).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_f32_avx2(
    fmt: Fmt,
    w: *const u8,
    n: usize,
    nb: usize,
    x: *const f32,
    m: usize,
    ldx: usize,
    out: *mut f32,
    ldo: usize,
) {
    match fmt {
        Fmt::Q4_0 => gemv_f32_impl::<F_Q4_0>(w, n, nb, x, m, ldx, out, ldo),
        Fmt::Q4_1 => gemv_f32_impl::<F_Q4_1>(w, n, nb, x, m, ldx, out, ldo),
        Fmt::Q8_0 => gemv_f32_impl::<F_Q8_0>(w, n, nb, x, m, ldx, out, ldo),
    }
}
