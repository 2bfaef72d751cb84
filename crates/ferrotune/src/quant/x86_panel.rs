//! x86-64 kernels on decode panels (layout and arithmetic: `panel.rs`).
//!
//! AVX-512 (F, BW, VNNI): one 512-bit vector of 16 i32 block sums per activation row covers a
//! whole panel, lane `i` weight row `i`. For every group of four values the panel's weights
//! are unpacked once (Q4 nibbles: one broadcast, shift and mask) and multiplied with the
//! group's four activation values broadcast (`vpdpbusd`), for up to 8 activation rows; at the
//! block's end each row's 16 sums are converted, scaled and added into its 16 f32
//! accumulators. 16-bit activations are split into their high and low bytes once per call, so
//! they take two `vpdpbusd` where 8-bit ones take one (see [`panel_tile512_split`]: this beat
//! widening the weights to i16 for `vpdpwssd`, whose sums need two `vpermt2d` per row and
//! block, by 1.2-1.35x). A block costs 8 multiply instructions (16 at 16 bits) plus 4-5 for
//! scaling per 16 weight rows and activation row, against about 7 per weight row in the
//! row-major `gemv`. Measured on an Intel Xeon (AVX-512 VNNI), one core, Q4_1 1536x576, 8 rows,
//! weights in cache: 93-98 GMAC/s at 16-bit activations (70-74 with `vpdpwssd`), 152 at 8
//! bits, against 29 and 41 for the row-major kernels
//! (`cargo run --release --example quant_bench -- decode-rows q4_1 1536 576 1`).
//!
//! AVX2, 8-bit activations: the same loop on the two 8-row halves of a panel, 256-bit vectors,
//! `vpmaddubsw` for the products. Lane order: four whole values per i32 lane, so a Q4 half's 16
//! bytes hold rows `4h..4h+4` (low nibbles) and `8+4h..8+4h+4` (high nibbles), in the order of
//! [`half_rows`]; the scales are fetched in the same order with one `vpermd`, and only the final
//! stores put rows in place.
//!
//! AVX2, 16-bit activations ([`panel_tile16`]): the whole panel, its bytes read as 16-bit words
//! (two values of one row each), unpacked with shifts and masks inside the word lanes and
//! multiplied with `vpmaddwd` against pairs of activation values, so that each row's sum stays
//! in one lane, in row order. (Without VNNI a byte split as on AVX-512 saves nothing:
//! `vpmaddubsw`'s i16 pair sums need a `vpmaddwd` to widen them.) Measured on a Zen 4 EPYC
//! capped at AVX2, one thread, against the half-panel kernel it replaced (which widened each
//! half's bytes to i16 and summed lane pairs with `vphaddd`): Q4_1 1536 x 576 at 8 rows 50-69
//! GMAC/s where it ran 49-55, one row 38-50 where it ran 32 (weights in cache); the Q8_0 head
//! 49152 x 576 one row 34 where it ran 18
//! (`cargo run --release --example quant_bench -- decode-rows q4_1 1536 576 1`).
#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]
use super::format::{Fmt, QK};
use super::x86::ActPtrs;
use std::arch::x86_64::*;

const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q8_0: u8 = 2;

/// Bytes of one panel block (16 GGML blocks).
const fn pbb(f: u8) -> usize {
    16 * match f {
        F_Q4_0 => 18,
        F_Q4_1 => 20,
        _ => 34,
    }
}

/// Bytes of quants per panel block (the 16 `d` follow as f16, then Q4_1's 16 `m`).
const fn qbytes(f: u8) -> usize {
    if f == F_Q8_0 {
        512
    } else {
        256
    }
}

/// The panel rows of half `h` in the order of the 8-bit kernel's lanes.
const fn half_rows(f: u8, h: usize) -> [usize; 8] {
    let (l, u) = if f == F_Q8_0 {
        (8 * h, 8 * h + 4)
    } else {
        (4 * h, 8 + 4 * h)
    };
    [l, l + 1, l + 2, l + 3, u, u + 1, u + 2, u + 3]
}

#[inline(always)]
unsafe fn load128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

#[inline(always)]
unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Prefetch the same block of the next panel (`nb` blocks on): decode streams weights from
/// DRAM, and one sequential stream per thread leaves the memory system idle between misses.
/// (Past the last panel the addresses are only prefetched, never read: prefetches do not fault.)
#[inline(always)]
unsafe fn prefetch_next_panel<const F: u8>(blk: *const u8, nb: usize) {
    let ahead = blk.wrapping_add(nb * pbb(F));
    let mut off = 0;
    while off < pbb(F) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
        off += 64;
    }
}

/// Half `h` of the panel at `pp` (`nb` blocks) times `RA` rows of 8-bit activations: the eight
/// f32 sums per row, in the lane order of [`half_rows`].
#[inline(always)]
unsafe fn half_tile<const F: u8, const RA: usize>(
    pp: *const u8,
    nb: usize,
    h: usize,
    aq: [*const u8; RA],
    ads: [*const [f32; 2]; RA],
    prefetch: bool,
) -> [__m256; RA] {
    let ord = half_rows(F, h);
    // dword (= f16 pair) indices of this half's scales, in lane order
    let idx = _mm256_setr_epi32(
        (ord[0] / 2) as i32,
        (ord[2] / 2) as i32,
        (ord[4] / 2) as i32,
        (ord[6] / 2) as i32,
        0,
        0,
        0,
        0,
    );
    let nib = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let shifts = _mm256_setr_epi64x(0, 0, 4, 4);
    let mut facc = [_mm256_setzero_ps(); RA];
    for b in 0..nb {
        let blk = pp.add(b * pbb(F));
        if prefetch {
            prefetch_next_panel::<F>(blk, nb);
        }
        let mut iacc = [_mm256_setzero_si256(); RA];
        for g in 0..8 {
            let w = if F == F_Q8_0 {
                load256(blk.add(g * 64 + 32 * h))
            } else {
                // the 16 bytes in both lanes, the upper lane shifted by 4: low nibbles in
                // the lower lane, high nibbles in the upper one
                let x = _mm256_broadcastsi128_si256(load128(blk.add(g * 32 + 16 * h)));
                _mm256_and_si256(_mm256_srlv_epi64(x, shifts), nib)
            };
            // Q8_0 is signed x signed: the weight's sign moves onto the activation
            let wa = if F == F_Q8_0 { _mm256_abs_epi8(w) } else { w };
            for r in 0..RA {
                let a =
                    _mm256_set1_epi32((aq[r].add(b * QK + 4 * g) as *const i32).read_unaligned());
                iacc[r] = if F == F_Q8_0 {
                    let pairs = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(a, w));
                    _mm256_add_epi32(iacc[r], _mm256_madd_epi16(pairs, ones))
                } else {
                    // i16 lanes: 8 groups x 2 x 15 x 127 < 2^15, widened at the block's end
                    _mm256_add_epi16(iacc[r], _mm256_maddubs_epi16(w, a))
                };
            }
        }
        let dv = scales(blk.add(qbytes(F)), idx);
        let ov = match F {
            F_Q4_1 => scales(blk.add(qbytes(F) + 32), idx),
            F_Q4_0 => _mm256_mul_ps(dv, _mm256_set1_ps(-8.0)),
            _ => _mm256_setzero_ps(),
        };
        for r in 0..RA {
            let isum = if F != F_Q8_0 {
                _mm256_madd_epi16(iacc[r], ones)
            } else {
                iacc[r]
            };
            let [dx, sx] = *ads[r].add(b);
            let t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dx));
            facc[r] = _mm256_fmadd_ps(t, dv, facc[r]);
            if F != F_Q8_0 {
                facc[r] = _mm256_fmadd_ps(ov, _mm256_set1_ps(sx), facc[r]);
            }
        }
    }
    facc
}

/// The 16 f16 scales at `p`, the 8 of a half picked in lane order by `idx` (pairs), as f32.
/// (A function, not a closure: a closure would not inherit the caller's target features.)
#[inline(always)]
unsafe fn scales(p: *const u8, idx: __m256i) -> __m256 {
    let v = _mm256_permutevar8x32_epi32(load256(p), idx);
    _mm256_cvtph_ps(_mm256_castsi256_si128(v))
}

/// Lane `l` of `v` to `o[ord[l]]`, for the rows below `lim`.
#[inline(always)]
unsafe fn store_rows(v: __m256, ord: &[usize; 8], o: *mut f32, lim: usize) {
    let mut t = [0f32; 8];
    _mm256_storeu_ps(t.as_mut_ptr(), v);
    for l in 0..8 {
        if ord[l] < lim {
            *o.add(ord[l]) = t[l];
        }
    }
}

/// `out[r * ldo + c] = W[c, :] . x_r` for the first `ncols` rows of the panels at `w` and every
/// 8-bit activation row of `act`, in tiles of up to `MA` activation rows.
#[inline(always)]
unsafe fn panels_impl<const F: u8, const MA: usize>(
    w: *const u8,
    ncols: usize,
    act: ActPtrs,
    out: *mut f32,
    ldo: usize,
) {
    let nb = act.k / QK;
    for p in 0..ncols.div_ceil(16) {
        let pp = w.add(p * nb * pbb(F));
        let lim = ncols - 16 * p;
        for h in 0..2 {
            let ord = half_rows(F, h);
            if ord.iter().all(|&c| c >= lim) {
                continue;
            }
            let mut r0 = 0;
            while r0 < act.rows {
                let g = (act.rows - r0).min(MA);
                macro_rules! tile {
                    ($ra:literal) => {{
                        let mut aq = [std::ptr::null(); $ra];
                        let mut ad = [std::ptr::null(); $ra];
                        for j in 0..$ra {
                            aq[j] = act.qs.add((r0 + j) * act.k);
                            ad[j] = act.ds.add((r0 + j) * nb);
                        }
                        let pf = h == 0 && r0 == 0;
                        let f = half_tile::<F, $ra>(pp, nb, h, aq, ad, pf);
                        for j in 0..$ra {
                            store_rows(f[j], &ord, out.add((r0 + j) * ldo + 16 * p), lim);
                        }
                    }};
                }
                match g {
                    1 => tile!(1),
                    2 => tile!(2),
                    3 => tile!(3),
                    _ if MA >= 4 => tile!(4),
                    _ => tile!(3),
                }
                r0 += g;
            }
        }
    }
}

// ---- AVX2, 16-bit activations: whole panels on 16-bit words ----

/// The whole panel at `pp` (`nb` blocks) times `RA` rows of 16-bit activations, AVX2: per
/// activation row two vectors of eight i32 block sums, lane `i` weight row `i` and `8 + i`.
///
/// The panel's bytes are read as 16-bit words, two bytes of one weight row each (values `v`
/// and `v + 1`, `v` = 0 or 2 of the group), so shifts and masks in the word lanes give four
/// vectors of weights whose adjacent words are one row's values 0 and 2, or 1 and 3 (Q4: low
/// nibbles rows 0-7, high nibbles rows 8-15; Q8_0: low bytes and high bytes, sign-extended,
/// of each 32-byte half). `vpmaddwd` against the pairs (`x_0`, `x_2`) and (`x_1`, `x_3`)
/// broadcast from [`perm_act`]'s copy then leaves every row's sum in one lane: no unpacking
/// to i16 (the shuffle port), no horizontal adds, and each group's weights are unpacked once
/// for all 16 rows. The integer sums are exact, and the float steps per lane are
/// `panel.rs`'s, so the outputs equal every other kernel's bit for bit.
#[inline(always)]
unsafe fn panel_tile16<const F: u8, const RA: usize>(
    pp: *const u8,
    nb: usize,
    aq: [*const i16; RA],
    ads: [*const [f32; 2]; RA],
    prefetch: bool,
) -> [[__m256; 2]; RA] {
    let nib = _mm256_set1_epi16(0x0F);
    let mut facc = [[_mm256_setzero_ps(); 2]; RA];
    for b in 0..nb {
        let blk = pp.add(b * pbb(F));
        if prefetch {
            prefetch_next_panel::<F>(blk, nb);
        }
        let mut iacc = [[_mm256_setzero_si256(); 2]; RA];
        for g in 0..8 {
            // [rows 0-7 values (0, 2), rows 0-7 (1, 3), rows 8-15 (0, 2), rows 8-15 (1, 3)]
            let w = if F == F_Q8_0 {
                let x0 = load256(blk.add(g * 64));
                let x1 = load256(blk.add(g * 64 + 32));
                [
                    _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(x0)),
                    _mm256_srai_epi16::<8>(x0),
                    _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(x1)),
                    _mm256_srai_epi16::<8>(x1),
                ]
            } else {
                let x = load256(blk.add(g * 32));
                [
                    _mm256_and_si256(x, nib),
                    _mm256_and_si256(_mm256_srli_epi16::<8>(x), nib),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(x), nib),
                    _mm256_srli_epi16::<12>(x),
                ]
            };
            for r in 0..RA {
                let at = aq[r].add(b * QK + 4 * g) as *const i32;
                let a02 = _mm256_set1_epi32(at.read_unaligned());
                let a13 = _mm256_set1_epi32(at.add(1).read_unaligned());
                let lo =
                    _mm256_add_epi32(_mm256_madd_epi16(w[0], a02), _mm256_madd_epi16(w[1], a13));
                let hi =
                    _mm256_add_epi32(_mm256_madd_epi16(w[2], a02), _mm256_madd_epi16(w[3], a13));
                iacc[r][0] = _mm256_add_epi32(iacc[r][0], lo);
                iacc[r][1] = _mm256_add_epi32(iacc[r][1], hi);
            }
        }
        let sc = blk.add(qbytes(F));
        let dv = [0, 1].map(|h| _mm256_cvtph_ps(load128(sc.add(16 * h))));
        let ov = [0, 1].map(|h| match F {
            F_Q4_1 => _mm256_cvtph_ps(load128(sc.add(32 + 16 * h))),
            F_Q4_0 => _mm256_mul_ps(dv[h], _mm256_set1_ps(-8.0)),
            _ => _mm256_setzero_ps(),
        });
        for r in 0..RA {
            let [dx, sx] = *ads[r].add(b);
            for h in 0..2 {
                let t = _mm256_mul_ps(_mm256_cvtepi32_ps(iacc[r][h]), _mm256_set1_ps(dx));
                facc[r][h] = _mm256_fmadd_ps(t, dv[h], facc[r][h]);
                if F != F_Q8_0 {
                    facc[r][h] = _mm256_fmadd_ps(ov[h], _mm256_set1_ps(sx), facc[r][h]);
                }
            }
        }
    }
    facc
}

/// Each group of four 16-bit activations `x_0 x_1 x_2 x_3` of `act` as `x_0 x_2 x_1 x_3`, the
/// pairs [`panel_tile16`] broadcasts, into `dst` (resized to `act.rows * act.k`).
#[inline(always)]
unsafe fn perm_act(act: &ActPtrs, dst: &mut Vec<i16>) {
    let n = act.rows * act.k;
    dst.resize(n, 0);
    let src = act.qs as *const i16;
    let shuf = _mm256_setr_epi8(
        0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13,
        10, 11, 14, 15,
    );
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm256_loadu_si256(src.add(i) as *const __m256i);
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(i) as *mut __m256i,
            _mm256_shuffle_epi8(v, shuf),
        );
        i += 16;
    }
    // never reached (`k` is a multiple of 32); it keeps the function right for any length
    while i + 4 <= n {
        let g = [
            *src.add(i),
            *src.add(i + 2),
            *src.add(i + 1),
            *src.add(i + 3),
        ];
        dst[i..i + 4].copy_from_slice(&g);
        i += 4;
    }
}

thread_local! {
    /// Each thread's permuted 16-bit activations, kept between calls.
    static PERM16: std::cell::Cell<Vec<i16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `out[r * ldo + c] = W[c, :] . x_r` for the first `ncols` rows of the panels at `w` and every
/// 16-bit activation row of `act`, with [`panel_tile16`] in tiles of up to `MA` rows.
#[inline(always)]
unsafe fn panels16_impl<const F: u8, const MA: usize>(
    w: *const u8,
    ncols: usize,
    act: ActPtrs,
    out: *mut f32,
    ldo: usize,
) {
    let nb = act.k / QK;
    // out of the thread-local for the loop (a closure would lose the target features)
    let mut perm = PERM16.take();
    perm_act(&act, &mut perm);
    for p in 0..ncols.div_ceil(16) {
        let pp = w.add(p * nb * pbb(F));
        let lim = (ncols - 16 * p).min(16);
        let mut r0 = 0;
        while r0 < act.rows {
            let g = (act.rows - r0).min(MA);
            macro_rules! tile {
                ($ra:literal) => {{
                    let mut aq = [std::ptr::null(); $ra];
                    let mut ad = [std::ptr::null(); $ra];
                    for j in 0..$ra {
                        aq[j] = perm.as_ptr().add((r0 + j) * act.k);
                        ad[j] = act.ds.add((r0 + j) * nb);
                    }
                    let f = panel_tile16::<F, $ra>(pp, nb, aq, ad, r0 == 0);
                    for j in 0..$ra {
                        let o = out.add((r0 + j) * ldo + 16 * p);
                        if lim == 16 {
                            _mm256_storeu_ps(o, f[j][0]);
                            _mm256_storeu_ps(o.add(8), f[j][1]);
                        } else {
                            let mut t = [0f32; 16];
                            _mm256_storeu_ps(t.as_mut_ptr(), f[j][0]);
                            _mm256_storeu_ps(t.as_mut_ptr().add(8), f[j][1]);
                            std::ptr::copy_nonoverlapping(t.as_ptr(), o, lim);
                        }
                    }
                }};
            }
            match g {
                1 => tile!(1),
                2 => tile!(2),
                3 => tile!(3),
                _ if MA >= 4 => tile!(4),
                _ => tile!(3),
            }
            r0 += g;
        }
    }
    PERM16.set(perm);
}

/// The AVX2 entry points: 8-bit activations with [`panels_impl`], 16-bit ones with
/// [`panels16_impl`]; 4 activation rows per tile (16 vector registers: 8 accumulators at 16
/// bits, plus the group's four weight vectors; on a Zen 4 capped at AVX2, 8 rows of Q4_1
/// 1536 x 576 and of the Q8_0 head 49152 x 576 ran at or above 3-row tiles, whose extra tile
/// per 8 rows costs another unpack of every group).
macro_rules! panel_entry {
    ($impl:ident, $name:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) unsafe fn $name(
            fmt: Fmt,
            w: *const u8,
            ncols: usize,
            act: ActPtrs,
            out: *mut f32,
            ldo: usize,
        ) {
            match fmt {
                Fmt::Q4_0 => $impl::<F_Q4_0, 4>(w, ncols, act, out, ldo),
                Fmt::Q4_1 => $impl::<F_Q4_1, 4>(w, ncols, act, out, ldo),
                Fmt::Q8_0 => $impl::<F_Q8_0, 4>(w, ncols, act, out, ldo),
            }
        }
    };
}

panel_entry!(panels_impl, panels_avx2);
panel_entry!(panels16_impl, panels16_avx2);

// ---- AVX-512: a whole panel per 512-bit vector ----

/// The whole panel at `pp` (`nb` blocks) times `RA` rows of 8-bit activations with 512-bit
/// vectors: one vector of 16 i32 block sums per activation row, rows in natural order (Q4:
/// low nibbles are rows 0-7, high nibbles rows 8-15).
#[inline(always)]
unsafe fn panel_tile512<const F: u8, const RA: usize>(
    pp: *const u8,
    nb: usize,
    aq: [*const u8; RA],
    ads: [*const [f32; 2]; RA],
    prefetch: bool,
) -> [__m512; RA] {
    let nib = _mm512_set1_epi8(0x0F);
    let shifts = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); RA];
    for b in 0..nb {
        let blk = pp.add(b * pbb(F));
        if prefetch {
            prefetch_next_panel::<F>(blk, nb);
        }
        let mut iacc = [zero; RA];
        for g in 0..8 {
            let w = if F == F_Q8_0 {
                _mm512_loadu_si512(blk.add(g * 64) as *const _)
            } else {
                let x = _mm512_broadcast_i64x4(load256(blk.add(g * 32)));
                _mm512_and_si512(_mm512_srlv_epi64(x, shifts), nib)
            };
            // Q8_0: |w| times the activation negated where w < 0 (no 512-bit `vpsignb`)
            let (wa, neg) = if F == F_Q8_0 {
                (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
            } else {
                (w, 0)
            };
            for r in 0..RA {
                let a =
                    _mm512_set1_epi32((aq[r].add(b * QK + 4 * g) as *const i32).read_unaligned());
                let a = if F == F_Q8_0 {
                    _mm512_mask_sub_epi8(a, neg, zero, a)
                } else {
                    a
                };
                iacc[r] = _mm512_dpbusd_epi32(iacc[r], wa, a);
            }
        }
        let dv = _mm512_cvtph_ps(load256(blk.add(qbytes(F))));
        let ov = match F {
            F_Q4_1 => _mm512_cvtph_ps(load256(blk.add(qbytes(F) + 32))),
            F_Q4_0 => _mm512_mul_ps(dv, _mm512_set1_ps(-8.0)),
            _ => _mm512_setzero_ps(),
        };
        for r in 0..RA {
            let [dx, sx] = *ads[r].add(b);
            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_set1_ps(dx));
            facc[r] = _mm512_fmadd_ps(t, dv, facc[r]);
            if F != F_Q8_0 {
                facc[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(sx), facc[r]);
            }
        }
    }
    facc
}

/// The whole panel at `pp` (`nb` blocks) times `RA` rows of 16-bit activations, each split
/// into bytes (`x = 256 hi + lo`, `hi` signed, `lo` unsigned) so that the products are
/// `vpdpbusd`'s: the same number of multiply instructions as `vpdpwssd`, but one 8-bit unpack
/// per group instead of a widening to i16, and lane `i` is weight row `i` in both halves, so a
/// block's sums need a shift and an add instead of two `vpermt2d` and an add: fewer shuffles
/// on the one port that runs them (measured 1.2-1.35x at 1-16 rows). Q4 nibbles (0..15) are
/// the unsigned operand against `hi`
/// and the signed one against `lo`; Q8_0 weights are signed, so against `hi` they enter as
/// `w + 128` (unsigned) and each row's block correction `128 sum(hi)` is taken back (`corr`
/// holds `32768 sum(hi)` per row and block, the correction already shifted). The sums are
/// exact in i32 (|hi . (w + 128)| <= 32 * 255 * 128), so the block sums, and everything after
/// them, equal [`panel_tile512`]'s bit for bit.
#[inline(always)]
unsafe fn panel_tile512_split<const F: u8, const RA: usize>(
    pp: *const u8,
    nb: usize,
    hi: [*const u8; RA],
    lo: [*const u8; RA],
    corr: [*const i32; RA],
    ads: [*const [f32; 2]; RA],
    prefetch: bool,
) -> [__m512; RA] {
    let nib = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(-128);
    let shifts = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); RA];
    for b in 0..nb {
        let blk = pp.add(b * pbb(F));
        if prefetch {
            prefetch_next_panel::<F>(blk, nb);
        }
        let mut ah = [zero; RA];
        let mut al = [zero; RA];
        for g in 0..8 {
            // `wh` against the signed high bytes (unsigned operand), `wl` against the unsigned
            // low bytes (signed operand)
            let (wh, wl) = if F == F_Q8_0 {
                let w = _mm512_loadu_si512(blk.add(g * 64) as *const _);
                (_mm512_xor_si512(w, flip), w)
            } else {
                let x = _mm512_broadcast_i64x4(load256(blk.add(g * 32)));
                let w = _mm512_and_si512(_mm512_srlv_epi64(x, shifts), nib);
                (w, w)
            };
            let at = b * QK + 4 * g;
            for r in 0..RA {
                let h = _mm512_set1_epi32((hi[r].add(at) as *const i32).read_unaligned());
                let l = _mm512_set1_epi32((lo[r].add(at) as *const i32).read_unaligned());
                ah[r] = _mm512_dpbusd_epi32(ah[r], wh, h);
                al[r] = _mm512_dpbusd_epi32(al[r], l, wl);
            }
        }
        let dv = _mm512_cvtph_ps(load256(blk.add(qbytes(F))));
        let ov = match F {
            F_Q4_1 => _mm512_cvtph_ps(load256(blk.add(qbytes(F) + 32))),
            F_Q4_0 => _mm512_mul_ps(dv, _mm512_set1_ps(-8.0)),
            _ => _mm512_setzero_ps(),
        };
        for r in 0..RA {
            let h = if F == F_Q8_0 {
                _mm512_sub_epi32(
                    _mm512_slli_epi32::<8>(ah[r]),
                    _mm512_set1_epi32(*corr[r].add(b)),
                )
            } else {
                _mm512_slli_epi32::<8>(ah[r])
            };
            let isum = _mm512_add_epi32(h, al[r]);
            let [dx, sx] = *ads[r].add(b);
            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dx));
            facc[r] = _mm512_fmadd_ps(t, dv, facc[r]);
            if F != F_Q8_0 {
                facc[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(sx), facc[r]);
            }
        }
    }
    facc
}

/// 16-bit activations as [`panel_tile512_split`] reads them: per row, the `k` high bytes, the
/// `k` low bytes, and (Q8_0) `32768 sum(hi)` per block.
#[derive(Default)]
struct SplitAct {
    hi: Vec<u8>,
    lo: Vec<u8>,
    corr: Vec<i32>,
}

impl SplitAct {
    /// Split `act` (i16 values) into `self`, reusing its buffers.
    #[inline(always)]
    unsafe fn fill(&mut self, act: &ActPtrs, q8: bool) {
        let n = act.rows * act.k;
        let nb = act.k / QK;
        self.hi.resize(n, 0);
        self.lo.resize(n, 0);
        let src = act.qs as *const i16;
        let mut i = 0;
        while i + 32 <= n {
            let v = _mm512_loadu_si512(src.add(i) as *const _);
            _mm256_storeu_si256(
                self.lo.as_mut_ptr().add(i) as *mut __m256i,
                _mm512_cvtepi16_epi8(v),
            );
            _mm256_storeu_si256(
                self.hi.as_mut_ptr().add(i) as *mut __m256i,
                _mm512_cvtepi16_epi8(_mm512_srai_epi16::<8>(v)),
            );
            i += 32;
        }
        while i < n {
            let v = *src.add(i);
            self.lo[i] = v as u8;
            self.hi[i] = (v >> 8) as u8;
            i += 1;
        }
        if q8 {
            self.corr.resize(act.rows * nb, 0);
            for (c, blk) in self.corr.iter_mut().zip(self.hi.chunks_exact(QK)) {
                *c = 32768 * blk.iter().map(|&h| h as i8 as i32).sum::<i32>();
            }
        }
    }
}

thread_local! {
    /// Each thread's split activations, kept between calls (a decode step makes hundreds).
    static SPLIT: std::cell::Cell<SplitAct> = const {
        std::cell::Cell::new(SplitAct { hi: Vec::new(), lo: Vec::new(), corr: Vec::new() })
    };
}

/// [`panels_impl`] at 16-bit activations with [`panel_tile512_split`].
#[inline(always)]
unsafe fn panels512_split_impl<const F: u8, const MA: usize>(
    w: *const u8,
    ncols: usize,
    act: ActPtrs,
    out: *mut f32,
    ldo: usize,
) {
    let nb = act.k / QK;
    // Out of the thread-local for the loop: a closure body would not be compiled with this
    // function's target features (every intrinsic a call).
    let mut sp = SPLIT.take();
    sp.fill(&act, F == F_Q8_0);
    let corr0 = if F == F_Q8_0 {
        sp.corr.as_ptr()
    } else {
        std::ptr::null()
    };
    for p in 0..ncols.div_ceil(16) {
        let pp = w.add(p * nb * pbb(F));
        let lim = (ncols - 16 * p).min(16);
        let mask: __mmask16 = if lim == 16 { !0 } else { (1u16 << lim) - 1 };
        let mut r0 = 0;
        while r0 < act.rows {
            let g = (act.rows - r0).min(MA);
            macro_rules! tile {
                ($ra:literal) => {{
                    let mut hi = [std::ptr::null(); $ra];
                    let mut lo = [std::ptr::null(); $ra];
                    let mut corr = [std::ptr::null(); $ra];
                    let mut ad = [std::ptr::null(); $ra];
                    for j in 0..$ra {
                        hi[j] = sp.hi.as_ptr().add((r0 + j) * act.k);
                        lo[j] = sp.lo.as_ptr().add((r0 + j) * act.k);
                        corr[j] = corr0.wrapping_add((r0 + j) * nb);
                        ad[j] = act.ds.add((r0 + j) * nb);
                    }
                    let f = panel_tile512_split::<F, $ra>(pp, nb, hi, lo, corr, ad, r0 == 0);
                    for j in 0..$ra {
                        _mm512_mask_storeu_ps(out.add((r0 + j) * ldo + 16 * p), mask, f[j]);
                    }
                }};
            }
            match g {
                1 => tile!(1),
                2 => tile!(2),
                3 => tile!(3),
                4 => tile!(4),
                5 => tile!(5),
                6 => tile!(6),
                7 => tile!(7),
                _ => tile!(8),
            }
            r0 += g;
        }
    }
    SPLIT.set(sp);
}

/// [`panels_impl`] with [`panel_tile512`].
#[inline(always)]
unsafe fn panels512_impl<const F: u8, const MA: usize>(
    w: *const u8,
    ncols: usize,
    act: ActPtrs,
    out: *mut f32,
    ldo: usize,
) {
    let nb = act.k / QK;
    for p in 0..ncols.div_ceil(16) {
        let pp = w.add(p * nb * pbb(F));
        let lim = (ncols - 16 * p).min(16);
        let mask: __mmask16 = if lim == 16 { !0 } else { (1u16 << lim) - 1 };
        let mut r0 = 0;
        while r0 < act.rows {
            let g = (act.rows - r0).min(MA);
            macro_rules! tile {
                ($ra:literal) => {{
                    let mut aq = [std::ptr::null(); $ra];
                    let mut ad = [std::ptr::null(); $ra];
                    for j in 0..$ra {
                        aq[j] = act.qs.add((r0 + j) * act.k);
                        ad[j] = act.ds.add((r0 + j) * nb);
                    }
                    let f = panel_tile512::<F, $ra>(pp, nb, aq, ad, r0 == 0);
                    for j in 0..$ra {
                        _mm512_mask_storeu_ps(out.add((r0 + j) * ldo + 16 * p), mask, f[j]);
                    }
                }};
            }
            match g {
                1 => tile!(1),
                2 => tile!(2),
                3 => tile!(3),
                4 => tile!(4),
                5 => tile!(5),
                6 => tile!(6),
                7 => tile!(7),
                _ => tile!(8),
            }
            r0 += g;
        }
    }
}

/// The AVX-512 entry points (8 activation rows per tile: 32 vector registers): 8-bit
/// activations with [`panels512_impl`], 16-bit ones split into bytes with
/// [`panels512_split_impl`].
macro_rules! panel512_entry {
    ($impl:ident, $name:ident) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub(crate) unsafe fn $name(
            fmt: Fmt,
            w: *const u8,
            ncols: usize,
            act: ActPtrs,
            out: *mut f32,
            ldo: usize,
        ) {
            match fmt {
                Fmt::Q4_0 => $impl::<F_Q4_0, 8>(w, ncols, act, out, ldo),
                Fmt::Q4_1 => $impl::<F_Q4_1, 8>(w, ncols, act, out, ldo),
                Fmt::Q8_0 => $impl::<F_Q8_0, 8>(w, ncols, act, out, ldo),
            }
        }
    };
}

panel512_entry!(panels512_impl, panels_avx512);
panel512_entry!(panels512_split_impl, panels16_avx512);
