//! Decode panels: Q4_0 / Q4_1 / Q8_0 weights rearranged for decode steps, one sequence or many
//! (continuous batching), and the decode kernels that read them.
//!
//! Why a second layout: GGML's row-major blocks give one integer dot product per (weight row,
//! activation row, block) that must be scaled and summed across SIMD lanes on its own, about
//! seven instructions per 32 multiply-adds whatever the batch. In a panel, 16 weight rows are
//! interleaved four values at a time, so one `vpdpbusd` against four broadcast activation
//! values (16-bit ones: two, on their high and low bytes; `vpmaddwd` on AVX2) advances eight
//! or sixteen rows at once and the block's scaling is one multiply and
//! one or two FMAs per eight rows: a batched step does 2-5x fewer instructions per row, and a
//! single row does fewer too. The layout holds the same bytes as the blocks it came from (16
//! blocks' quants, scales and minima per panel block), so it costs one more copy of the
//! quantized weight, built on the first decode step (`QuantWeight::decode_rows_into`).
//!
//! Arithmetic ("block-exact"), for weight row `c`, activation row `r` and block `b`, in this
//! order, starting from `acc = 0.0`:
//! ```text
//! isum = sum_j q_w[c,b,j] * q_x[r,b,j]       (exact, i32; q_w: Q4 nibble 0..15 or Q8_0 i8)
//! acc  = fma(f32(isum) * d_x[r,b], d_w[c,b], acc)
//! acc  = fma(m_w[c,b], s_x[r,b], acc)        (Q4_1; Q4_0 with -8 d_w[c,b]; none for Q8_0)
//! ```
//! with `s_x = d_x * sum(q_x)` (see `format::QAct`). Integer sums are exact whatever the order
//! of their products, so every kernel here (portable, AVX2, AVX-512, any register tile, any
//! number of activation rows, any thread split) gives bit-identical outputs: a sequence decodes
//! the same tokens alone or batched with any others, on any CPU. (The row-major `gemv` sums its
//! per-block products in eight f32 lanes, as llama.cpp does, and is kept for the other callers
//! and for llama.cpp's own rounding, `ActPrecision::LlamaCpp`.)
//!
//! Layout of panel `p` (weight rows `16p..16p+16`, rows past the matrix zero), block `b`, at
//! byte `(p * nb + b) * 16 * block_bytes`:
//! - Q4_0 / Q4_1: 8 chunks of 32 bytes; chunk `g`, byte `j`: low nibble = value `4g + j % 4` of
//!   row `j / 4`, high nibble = the same value of row `8 + j / 4`. Then the 16 rows' `d` (f16),
//!   and for Q4_1 their `m` (f16).
//! - Q8_0: 8 chunks of 64 bytes; chunk `g`, byte `j`: value `4g + j % 4` of row `j / 4` (i8).
//!   Then the 16 rows' `d` (f16).
use super::format::{ActInt, Fmt, QAct, QK};
use super::kernels::Isa;

/// Weight rows per panel.
pub(crate) const PANEL: usize = 16;

/// Bytes of quants in one panel block (before the scales).
pub(crate) const fn quant_bytes(fmt: Fmt) -> usize {
    match fmt {
        Fmt::Q4_0 | Fmt::Q4_1 => 256,
        Fmt::Q8_0 => 512,
    }
}

/// Bytes of one panel block: the 16 blocks it was built from.
pub(crate) const fn panel_block_bytes(fmt: Fmt) -> usize {
    PANEL * fmt.block_bytes()
}

/// A weight matrix (`n` rows of `k` values) as decode panels.
pub(crate) struct Panels {
    pub fmt: Fmt,
    pub n: usize,
    pub k: usize,
    pub data: Vec<u8>,
}

impl Panels {
    /// Rearrange `n` row-major rows of GGML blocks (`k` values each, `k` a multiple of 32),
    /// panels in parallel on up to `threads` threads (about 20 ms for SmolLM2-135M on one).
    pub(crate) fn pack(fmt: Fmt, rows: &[u8], n: usize, k: usize, threads: usize) -> Panels {
        assert!(k.is_multiple_of(QK));
        let nb = k / QK;
        let pbb = panel_block_bytes(fmt);
        assert_eq!(
            rows.len(),
            n * nb * fmt.block_bytes(),
            "decode panels: {n} rows of {nb} blocks"
        );
        let np = n.div_ceil(PANEL);
        let mut data = vec![0u8; np * nb * pbb];
        let dp = super::SyncPtr(data.as_mut_ptr());
        super::pool::for_each_chunk(np, 8, threads, |ps| {
            for p in ps {
                // SAFETY: panel p's bytes, written by this chunk alone
                let panel =
                    unsafe { std::slice::from_raw_parts_mut(dp.get().add(p * nb * pbb), nb * pbb) };
                pack_panel(fmt, rows, n, nb, p, panel);
            }
        });
        Panels { fmt, n, k, data }
    }

    pub(crate) fn nb(&self) -> usize {
        self.k / QK
    }

    pub(crate) fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// The bytes of panels `p0..p1`.
    fn range(&self, p0: usize, p1: usize) -> &[u8] {
        let pb = self.nb() * panel_block_bytes(self.fmt);
        &self.data[p0 * pb..p1 * pb]
    }
}

/// Panel `p` of the `n` rows of `nb` blocks at `rows` into `dst` (zeroed).
fn pack_panel(fmt: Fmt, rows: &[u8], n: usize, nb: usize, p: usize, dst: &mut [u8]) {
    let (bb, pbb, qb) = (fmt.block_bytes(), panel_block_bytes(fmt), quant_bytes(fmt));
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    for (b, dst) in dst.chunks_exact_mut(pbb).enumerate() {
        for c in 0..PANEL.min(n - p * PANEL) {
            let blk = &rows[((p * PANEL + c) * nb + b) * bb..][..bb];
            // scales: d (f16) first in every format, then m for Q4_1
            dst[qb + 2 * c..qb + 2 * c + 2].copy_from_slice(&blk[..2]);
            if fmt == Fmt::Q4_1 {
                dst[qb + 32 + 2 * c..qb + 34 + 2 * c].copy_from_slice(&blk[2..4]);
            }
            match fmt {
                // values 4g..4g+4 of row c to bytes 4c.. of chunk g
                Fmt::Q8_0 => {
                    for g in 0..8 {
                        dst[g * 64 + 4 * c..][..4].copy_from_slice(&blk[2 + 4 * g..][..4]);
                    }
                }
                _ => {
                    // GGML: byte j holds value j (low nibble) and value j + 16 (high nibble),
                    // so bytes 4g..4g+4 give values 4g.. (group g) and 16+4g.. (group g + 4)
                    let qs = &blk[bb - 16..];
                    let shift = 4 * (c / 8);
                    for g in 0..4 {
                        let w = word(qs, 4 * g);
                        for (grp, v) in [(g, w & 0x0F0F_0F0F), (g + 4, (w >> 4) & 0x0F0F_0F0F)] {
                            let at = grp * 32 + 4 * (c % 8);
                            let cur = word(dst, at);
                            dst[at..at + 4].copy_from_slice(&(cur | (v << shift)).to_le_bytes());
                        }
                    }
                }
            }
        }
    }
}

/// `out[r * ldo + c - 16 p0] = W[c, :] . x_r` for every activation row `r` of `act` and the
/// weight rows `c` of panels `p0..p1` (those below `n`), block-exact (see the module docs).
///
/// # Safety
/// `out` must be valid for writes at `r * ldo + j` for all `r < act.rows` and
/// `j < min(n, 16 p1) - 16 p0`, and no other thread may access those elements during the call.
pub(crate) unsafe fn decode<T: ActInt>(
    isa: Isa,
    w: &Panels,
    p0: usize,
    p1: usize,
    act: &QAct<T>,
    out: *mut f32,
    ldo: usize,
) {
    assert!(p0 <= p1 && p1 <= w.panels() && act.k == w.k);
    assert!(act.qs.len() == act.rows * act.k && act.ds.len() == act.rows * w.nb());
    assert!(
        isa.available(),
        "{isa:?} kernels are not supported on this CPU"
    );
    let ncols = w.n.min(p1 * PANEL) - p0 * PANEL;
    if ncols == 0 || act.rows == 0 {
        return;
    }
    let data = w.range(p0, p1);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            use super::format::ActPrecision;
            use super::x86::ActPtrs;
            use super::x86_panel::*;
            let a = ActPtrs {
                qs: act.qs.as_ptr() as *const u8,
                ds: act.ds.as_ptr(),
                rows: act.rows,
                k: act.k,
            };
            let a16 = T::PREC == ActPrecision::I16;
            // SAFETY: `data` holds panels p0..p1 of `w` (nb blocks each); `act` bounds asserted
            // above; `out` per the contract; the CPU supports the level; `T` is the type
            // `T::PREC` names.
            match (a16, isa) {
                (false, Isa::Avx2) => panels_avx2(w.fmt, data.as_ptr(), ncols, a, out, ldo),
                (false, _) => panels_avx512(w.fmt, data.as_ptr(), ncols, a, out, ldo),
                (true, Isa::Avx2) => panels16_avx2(w.fmt, data.as_ptr(), ncols, a, out, ldo),
                (true, _) => panels16_avx512(w.fmt, data.as_ptr(), ncols, a, out, ldo),
            }
        }
        _ => decode_scalar(w.fmt, data, w.nb(), ncols, act, out, ldo),
    }
}

/// The portable kernel (aarch64 and other targets), and the reference the SIMD kernels must
/// equal bit for bit. Per panel block the 16 rows' quants are unpacked once into fixed-size
/// arrays, so the per-row integer dot products are plain loops the compiler vectorises.
///
/// # Safety
/// As [`decode`], for `ncols` columns.
unsafe fn decode_scalar<T: ActInt>(
    fmt: Fmt,
    data: &[u8],
    nb: usize,
    ncols: usize,
    act: &QAct<T>,
    out: *mut f32,
    ldo: usize,
) {
    let pbb = panel_block_bytes(fmt);
    let qb = quant_bytes(fmt);
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let rows = act.rows;
    let mut acc = vec![0f32; rows * PANEL];
    let mut w = [[0i32; QK]; PANEL];
    let mut a = [0i32; QK];
    for p in 0..ncols.div_ceil(PANEL) {
        let cols = (ncols - p * PANEL).min(PANEL);
        acc.fill(0.0);
        for b in 0..nb {
            let blk = &data[(p * nb + b) * pbb..][..pbb];
            for (c, wc) in w.iter_mut().enumerate().take(cols) {
                for (v, q) in wc.iter_mut().enumerate() {
                    let (g, i) = (v / 4, v % 4);
                    *q = match fmt {
                        Fmt::Q8_0 => blk[g * 64 + 4 * c + i] as i8 as i32,
                        _ => ((blk[g * 32 + 4 * (c % 8) + i] >> (4 * (c / 8))) & 0x0F) as i32,
                    };
                }
            }
            // each row's scale d and offset o (m for Q4_1, -8 d for Q4_0, none for Q8_0)
            let mut d = [0f32; PANEL];
            let mut o = [0f32; PANEL];
            for c in 0..cols {
                d[c] = f16_at(blk, qb + 2 * c);
                o[c] = match fmt {
                    Fmt::Q4_1 => f16_at(blk, qb + 32 + 2 * c),
                    Fmt::Q4_0 => -8.0 * d[c],
                    Fmt::Q8_0 => 0.0,
                };
            }
            for r in 0..rows {
                for (av, q) in a.iter_mut().zip(&act.row_qs(r)[b * QK..(b + 1) * QK]) {
                    *av = q.widen();
                }
                let [dx, sx] = act.row_ds(r)[b];
                for (c, wc) in w.iter().enumerate().take(cols) {
                    let isum: i32 = wc.iter().zip(&a).map(|(x, y)| x * y).sum();
                    let acc = &mut acc[r * PANEL + c];
                    *acc = (isum as f32 * dx).mul_add(d[c], *acc);
                    if fmt != Fmt::Q8_0 {
                        *acc = o[c].mul_add(sx, *acc);
                    }
                }
            }
        }
        for r in 0..rows {
            for c in 0..cols {
                *out.add(r * ldo + p * PANEL + c) = acc[r * PANEL + c];
            }
        }
    }
}
