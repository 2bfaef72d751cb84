//! The engine's KV cache and causal attention over it.
//!
//! Keys are stored transposed in blocks of 16 positions, `[kv_head][block][dim][16]`, values as
//! rows, `[kv_head][position][dim]`. Why: a query head's scores are then `Σ_d q[d] · K[d][..]`,
//! a sum of whole vectors of positions (no horizontal reduction per key, which cost as much as
//! the products with 64-wide heads), a block is read front to back, and the query heads that
//! share a kv head (grouped-query attention: 3 in SmolLM2, 4-8 in larger models) share every
//! key and value load. Writing a new position is a strided store of `head_dim` values, once per
//! token.
//!
//! The cache holds f32 values, or f16 ([`KvDtype::F16`], llama.cpp's default cache type): half
//! the memory, and half the bytes a batched decode step reads, where the weights streaming
//! through the caches between layers leave every row's keys and values in DRAM. An f16 head is
//! widened to f32 into the caller's scratch (exact) before the same kernels run on it, so the
//! arithmetic is that of an f32 cache holding the f16-rounded values.
//!
//! Each score and output value accumulates its products in a fixed order (dimensions in order
//! for a score, positions in order for an output), one fused multiply-add at a time, so the
//! AVX-512 and AVX2 kernels give the same bits; the portable loop rounds the product separately.
use crate::quant::Isa;

/// Positions per key block: a block holds `[dim][KEY_BLOCK]`, so one pass of the score kernel
/// over a block's dimensions reads 4 KiB (64-wide heads) front to back. (A plain
/// `[dim][position]` layout made each pass 64 separate streams, too many for the hardware
/// prefetchers: measured 1.6x slower on the same bytes.)
const KEY_BLOCK: usize = 16;

/// Query heads handled together per pass over a kv head's keys and values (accumulators held
/// in registers: 4 heads x 2 vectors of positions, 4 heads x 4 vectors of dimensions).
const HEADS_PER_PASS: usize = 4;

/// The element type of a [`KvCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    /// Exact: the keys and values the layers computed.
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest even (relative error at most 2^-11).
    F16,
}

impl KvDtype {
    /// `f32` or `f16`.
    pub fn parse(s: &str) -> Option<KvDtype> {
        match s {
            "f32" => Some(KvDtype::F32),
            "f16" => Some(KvDtype::F16),
            _ => None,
        }
    }

    /// Bytes per cached value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Per layer, one sequence's keys (`k`) and values (`v`) of one element type.
#[derive(Default)]
pub(super) struct Planes<T> {
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: Copy + Default> Planes<T> {
    fn new(layers: usize) -> Self {
        Planes {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
        }
    }

    /// Give every layer `len` values of `planes` (keys or values); copy `used` values of each
    /// of `heads` heads from stride `old` to stride `new`.
    fn regrow(
        planes: &mut [Vec<T>],
        heads: usize,
        len: usize,
        old: usize,
        new: usize,
        used: usize,
    ) {
        for cache in planes.iter_mut() {
            let mut grown = vec![T::default(); len];
            for h in 0..heads {
                grown[h * new..][..used].copy_from_slice(&cache[h * old..][..used]);
            }
            *cache = grown;
        }
    }

    fn values(&self) -> usize {
        self.k.iter().chain(&self.v).map(Vec::len).sum()
    }
}

/// A sequence's cache: f32 values, or f16 bits (keys and values always of one type).
pub(super) enum KvStore {
    F32(Planes<f32>),
    F16(Planes<u16>),
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore::F32(Planes::default())
    }
}

impl KvStore {
    fn new(dtype: KvDtype, layers: usize) -> KvStore {
        match dtype {
            KvDtype::F32 => KvStore::F32(Planes::new(layers)),
            KvDtype::F16 => KvStore::F16(Planes::new(layers)),
        }
    }

    fn dtype(&self) -> KvDtype {
        match self {
            KvStore::F32(_) => KvDtype::F32,
            KvStore::F16(_) => KvDtype::F16,
        }
    }

    fn layers(&self) -> usize {
        match self {
            KvStore::F32(p) => p.k.len(),
            KvStore::F16(p) => p.k.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvStore::F32(p) => 4 * p.values(),
            KvStore::F16(p) => 2 * p.values(),
        }
    }
}

/// One layer of a cache, as [`attend`] reads it.
#[derive(Clone, Copy)]
pub(super) enum KvLayer<'a> {
    F32 { k: &'a [f32], v: &'a [f32] },
    F16 { k: &'a [u16], v: &'a [u16] },
}

impl KvLayer<'_> {
    fn k_len(&self) -> usize {
        match self {
            KvLayer::F32 { k, .. } => k.len(),
            KvLayer::F16 { k, .. } => k.len(),
        }
    }
    fn v_len(&self) -> usize {
        match self {
            KvLayer::F32 { v, .. } => v.len(),
            KvLayer::F16 { v, .. } => v.len(),
        }
    }
}

/// Per-thread working memory of [`attend`]: the scores, and an f16 head widened to f32.
#[derive(Default)]
pub(super) struct AttnScratch {
    scores: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// One sequence's keys and values per layer, with room for `cap` positions per kv head (grown
/// by doubling, up to the context length). Layout in the module docs.
#[derive(Default)]
pub(crate) struct KvCache {
    kv: KvStore,
    pub(super) cap: usize,
    /// Values per kv head in `k` (whole key blocks).
    pub(super) k_head: usize,
    /// Positions held.
    pub len: usize,
}

impl KvCache {
    /// Make room for `n` positions in each of `layers` layers of `n_kv` heads of `hd` values
    /// (keeps the first `len` positions); at most `ctx` positions unless `n` asks for more.
    /// A cache of `dtype` values is made on first use (or when the layer count or type
    /// changes: a slot reused by an engine of another setting starts over).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reserve(
        &mut self,
        layers: usize,
        n_kv: usize,
        hd: usize,
        ctx: usize,
        n: usize,
        dtype: KvDtype,
    ) {
        if self.kv.layers() != layers || self.kv.dtype() != dtype {
            self.kv = KvStore::new(dtype, layers);
            self.cap = 0;
            self.k_head = 0;
            self.len = 0;
        }
        if n <= self.cap {
            return;
        }
        let new_cap = n.max(self.cap * 2).max(256).min(ctx.max(n));
        let new_k_head = new_cap.div_ceil(KEY_BLOCK) * hd * KEY_BLOCK;
        let (old, used) = (self.cap, self.len.min(self.cap));
        let used_k = used.div_ceil(KEY_BLOCK) * hd * KEY_BLOCK;
        let (k_len, v_len) = (n_kv * new_k_head, n_kv * new_cap * hd);
        let (k_old, k_new, v_old, v_new) = (self.k_head, new_k_head, old * hd, new_cap * hd);
        match &mut self.kv {
            KvStore::F32(p) => {
                Planes::regrow(&mut p.k, n_kv, k_len, k_old, k_new, used_k);
                Planes::regrow(&mut p.v, n_kv, v_len, v_old, v_new, used * hd);
            }
            KvStore::F16(p) => {
                Planes::regrow(&mut p.k, n_kv, k_len, k_old, k_new, used_k);
                Planes::regrow(&mut p.v, n_kv, v_len, v_old, v_new, used * hd);
            }
        }
        self.cap = new_cap;
        self.k_head = new_k_head;
    }

    /// Layer `li` for [`attend`].
    pub(super) fn layer(&self, li: usize) -> KvLayer<'_> {
        match &self.kv {
            KvStore::F32(p) => KvLayer::F32 {
                k: &p.k[li],
                v: &p.v[li],
            },
            KvStore::F16(p) => KvLayer::F16 {
                k: &p.k[li],
                v: &p.v[li],
            },
        }
    }

    /// Store the key and value of kv head `kh` at position `p` of layer `li` (`p < cap`).
    #[inline]
    pub(super) fn put(&mut self, li: usize, kh: usize, p: usize, key: &[f32], value: &[f32]) {
        let (hd, cap) = (key.len(), self.cap);
        assert!(p < cap && value.len() == hd, "KV cache write out of range");
        let blk = kh * self.k_head + (p / KEY_BLOCK) * hd * KEY_BLOCK + p % KEY_BLOCK;
        let at = (kh * cap + p) * hd;
        match &mut self.kv {
            KvStore::F32(Planes { k: kc, v: vc }) => {
                let k = &mut kc[li][blk..blk + (hd - 1) * KEY_BLOCK + 1];
                for (d, &x) in key.iter().enumerate() {
                    k[d * KEY_BLOCK] = x;
                }
                vc[li][at..][..hd].copy_from_slice(value);
            }
            KvStore::F16(Planes { k: kc, v: vc }) => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                // the slice conversions run F16C where the CPU has it (round to nearest even,
                // as `f16::from_f32`)
                let k = &mut kc[li][blk..blk + (hd - 1) * KEY_BLOCK + 1];
                let mut bits = [half::f16::ZERO; 128];
                for (c, part) in key.chunks(bits.len()).enumerate() {
                    let kb = &mut bits[..part.len()];
                    kb.convert_from_f32_slice(part);
                    for (d, b) in kb.iter().enumerate() {
                        k[(c * 128 + d) * KEY_BLOCK] = b.to_bits();
                    }
                }
                vc[li][at..][..hd]
                    .reinterpret_cast_mut::<half::f16>()
                    .convert_from_f32_slice(value);
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.kv.bytes()
    }
}

/// What one attention row needs to know about the cache layout.
pub(super) struct AttnShape {
    /// Cached prefix positions every row attends to.
    pub base: usize,
    /// Positions per kv head in the cache.
    pub cap: usize,
    /// Values per kv head of the keys ([`KvCache::k_head`]).
    pub k_head: usize,
    pub hd: usize,
    pub nh: usize,
    /// Query heads per kv head.
    pub group: usize,
}

/// Causal attention of one row (all its query heads, `q`: `nh * hd`) at index `i` of a
/// sequence whose keys start at cache position `base + off`: keys `[0, base)` and
/// `[base + off, base + off + i]`. `k_cache` / `v_cache` are one layer of a [`KvCache`].
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    s: &AttnShape,
    q: &[f32],
    kv: KvLayer<'_>,
    off: usize,
    i: usize,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let (hd, cap, kh_len) = (s.hd, s.cap, s.k_head);
    let n_keys = s.base + i + 1;
    // the key ranges: (first cache position, count, first score index)
    let ranges = [(0, s.base, 0), (s.base + off, i + 1, s.base)];
    assert!(
        s.base + off + i < cap && q.len() == s.nh * hd && out.len() == s.nh * hd,
        "attention row out of range"
    );
    let n_kv = s.nh / s.group;
    assert!(kh_len >= cap.div_ceil(KEY_BLOCK) * hd * KEY_BLOCK);
    assert!(kv.k_len() >= n_kv * kh_len && kv.v_len() >= n_kv * cap * hd);
    let isa = level();
    let scale = 1.0 / (hd as f32).sqrt();
    let AttnScratch {
        scores,
        k: k_wide,
        v: v_wide,
    } = scratch;
    scores.resize(HEADS_PER_PASS * n_keys, 0.0);
    // positions 0..used of a head are read (both ranges lie inside)
    let used = s.base + off + i + 1;
    let used_k = used.div_ceil(KEY_BLOCK) * hd * KEY_BLOCK;
    for kh in 0..n_kv {
        let (kt, vc): (&[f32], &[f32]) = match kv {
            KvLayer::F32 { k, v } => (
                &k[kh * kh_len..(kh + 1) * kh_len],
                &v[kh * cap * hd..(kh + 1) * cap * hd],
            ),
            KvLayer::F16 { k, v } => {
                widen_f16(isa, &k[kh * kh_len..][..used_k], k_wide);
                widen_f16(isa, &v[kh * cap * hd..][..used * hd], v_wide);
                (&k_wide[..], &v_wide[..])
            }
        };
        let mut h0 = kh * s.group;
        while h0 < (kh + 1) * s.group {
            let g = ((kh + 1) * s.group - h0).min(HEADS_PER_PASS);
            let qs = &q[h0 * hd..(h0 + g) * hd];
            let sc = &mut scores[..g * n_keys];
            for &(start, n, at) in &ranges {
                if n > 0 {
                    scores_t(isa, qs, g, kt, start, n, scale, sc, n_keys, at);
                }
            }
            for row in sc.chunks_exact_mut(n_keys) {
                let max = crate::ops::kernels::max(row);
                let sum = crate::ops::kernels::exp_shift_sum(row, max);
                crate::ops::kernels::scale(row, 1.0 / sum);
            }
            let o = &mut out[h0 * hd..(h0 + g) * hd];
            o.fill(0.0);
            for &(start, n, at) in &ranges {
                if n > 0 {
                    values(isa, sc, n_keys, at, g, vc, hd, start, n, o);
                }
            }
            h0 += g;
        }
    }
}

/// `out` = the f16 values `x` as f32 (exact).
fn widen_f16(isa: Isa, x: &[u16], out: &mut Vec<f32>) {
    out.resize(x.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: F16C is available (checked above); `out` holds x.len() values.
        unsafe { x86::widen_f16c(x, out) };
        return;
    }
    let _ = isa;
    for (o, &b) in out.iter_mut().zip(x) {
        *o = half::f16::from_bits(b).to_f32();
    }
}

/// `sc[h * ns + at + j] = scale · Σ_d qs[h·hd + d] · K(start + j, d)` for `h < g`, `j < n`,
/// with `K(p, d)` at `kt[(p / KEY_BLOCK)·hd·KEY_BLOCK + d·KEY_BLOCK + p % KEY_BLOCK]`
/// (`hd = qs.len() / g`).
#[allow(clippy::too_many_arguments)]
fn scores_t(
    isa: Isa,
    qs: &[f32],
    g: usize,
    kt: &[f32],
    start: usize,
    n: usize,
    scale: f32,
    sc: &mut [f32],
    ns: usize,
    at: usize,
) {
    let hd = qs.len() / g;
    assert!(g <= HEADS_PER_PASS && qs.len() == g * hd && n > 0);
    assert!(kt.len() >= (start + n).div_ceil(KEY_BLOCK) * hd * KEY_BLOCK);
    assert!(sc.len() >= g * ns && at + n <= ns);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is available (Isa::best checks) and the bounds are asserted above.
        Isa::Avx512 => unsafe { x86::scores_avx512(qs, g, kt, start, n, scale, sc, ns, at) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::scores_avx2(qs, g, kt, start, n, scale, sc, ns, at) },
        _ => {
            for h in 0..g {
                for j in 0..n {
                    let p = start + j;
                    let blk = &kt[(p / KEY_BLOCK) * hd * KEY_BLOCK + p % KEY_BLOCK..];
                    let mut acc = 0f32;
                    for d in 0..hd {
                        acc += qs[h * hd + d] * blk[d * KEY_BLOCK];
                    }
                    sc[h * ns + at + j] = acc * scale;
                }
            }
        }
    }
}

/// The lanes of key block `b` that hold positions `[start, start + n)`, as a bit mask.
#[inline(always)]
fn block_lanes(b: usize, start: usize, n: usize) -> u16 {
    let lo = start.max(b * KEY_BLOCK) - b * KEY_BLOCK;
    let hi = (start + n).min((b + 1) * KEY_BLOCK) - b * KEY_BLOCK;
    (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
}

/// `o[h·hd + x] += Σ_j p[h·ns + at + j] · vc[(start + j)·hd + x]` for `h < g`, `j < n`.
#[allow(clippy::too_many_arguments)]
fn values(
    isa: Isa,
    p: &[f32],
    ns: usize,
    at: usize,
    g: usize,
    vc: &[f32],
    hd: usize,
    start: usize,
    n: usize,
    o: &mut [f32],
) {
    assert!(g <= HEADS_PER_PASS && o.len() == g * hd && p.len() >= g * ns && at + n <= ns);
    assert!(vc.len() >= (start + n) * hd);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is available and the bounds are asserted above.
        Isa::Avx512 => unsafe { x86::values_avx512(p, ns, at, g, vc, hd, start, n, o) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::values_avx2(p, ns, at, g, vc, hd, start, n, o) },
        _ => {
            for h in 0..g {
                let oh = &mut o[h * hd..(h + 1) * hd];
                for j in 0..n {
                    let pj = p[h * ns + at + j];
                    let v = &vc[(start + j) * hd..(start + j + 1) * hd];
                    for (a, &x) in oh.iter_mut().zip(v) {
                        *a += pj * x;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_lanes, KEY_BLOCK};
    use std::arch::x86_64::*;

    /// Lane mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        if n >= 16 {
            !0
        } else {
            (1u16 << n) - 1
        }
    }

    /// See `scores_t`: two key blocks (32 positions) by up to 4 heads per pass over the dims.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_avx512(
        qs: &[f32],
        g: usize,
        kt: &[f32],
        start: usize,
        n: usize,
        scale: f32,
        sc: &mut [f32],
        ns: usize,
        at: usize,
    ) {
        let hd = qs.len() / g;
        let bl = hd * KEY_BLOCK;
        let (pq, pk, ps) = (qs.as_ptr(), kt.as_ptr(), sc.as_mut_ptr().add(at));
        let sv = _mm512_set1_ps(scale);
        let last = (start + n - 1) / KEY_BLOCK;
        let mut b = start / KEY_BLOCK;
        while b <= last {
            // Whole blocks are loaded (they lie inside `kt`); only the stores are masked.
            let two = b < last;
            let m0 = block_lanes(b, start, n);
            let m1 = if two { block_lanes(b + 1, start, n) } else { 0 };
            let (b0, b1) = (pk.add(b * bl), pk.add((b + two as usize) * bl));
            let mut acc = [[_mm512_setzero_ps(); 2]; 4];
            for d in 0..hd {
                let k0 = _mm512_loadu_ps(b0.add(d * KEY_BLOCK));
                let k1 = _mm512_loadu_ps(b1.add(d * KEY_BLOCK));
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    let qd = _mm512_set1_ps(*pq.add(h * hd + d));
                    a[0] = _mm512_fmadd_ps(qd, k0, a[0]);
                    a[1] = _mm512_fmadd_ps(qd, k1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                // lane l of block b is score index b·KEY_BLOCK + l − start (masked lanes unused)
                let dst = ps.wrapping_add(h * ns + b * KEY_BLOCK).wrapping_sub(start);
                _mm512_mask_storeu_ps(dst, m0, _mm512_mul_ps(a[0], sv));
                _mm512_mask_storeu_ps(dst.wrapping_add(KEY_BLOCK), m1, _mm512_mul_ps(a[1], sv));
            }
            b += 2;
        }
    }

    /// See `values`: 64 dims (four vectors) by up to 4 heads per pass over the positions.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn values_avx512(
        p: &[f32],
        ns: usize,
        at: usize,
        g: usize,
        vc: &[f32],
        hd: usize,
        start: usize,
        n: usize,
        o: &mut [f32],
    ) {
        let (pp, pv, po) = (
            p.as_ptr().add(at),
            vc.as_ptr().add(start * hd),
            o.as_mut_ptr(),
        );
        let mut x = 0;
        while x < hd {
            let m = [0, 16, 32, 48].map(|u| mask16(hd.saturating_sub(x + u)));
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for (h, a) in acc.iter_mut().enumerate().take(g) {
                for u in 0..4 {
                    a[u] = _mm512_maskz_loadu_ps(m[u], po.wrapping_add(h * hd + x + 16 * u));
                }
            }
            for j in 0..n {
                let row = pv.wrapping_add(j * hd + x);
                let v = [0, 1, 2, 3].map(|u| _mm512_maskz_loadu_ps(m[u], row.wrapping_add(16 * u)));
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    let pj = _mm512_set1_ps(*pp.add(h * ns + j));
                    for u in 0..4 {
                        a[u] = _mm512_fmadd_ps(pj, v[u], a[u]);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                for u in 0..4 {
                    _mm512_mask_storeu_ps(po.wrapping_add(h * hd + x + 16 * u), m[u], a[u]);
                }
            }
            x += 64;
        }
    }

    /// `out[i] = f32(x[i])` for the f16 bits `x` (`out.len() == x.len()`).
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen_f16c(x: &[u16], out: &mut [f32]) {
        assert_eq!(x.len(), out.len());
        let n8 = x.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let h = _mm_loadu_si128(x.as_ptr().add(i).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        for i in n8..x.len() {
            out[i] = half::f16::from_bits(x[i]).to_f32();
        }
    }

    /// `_mm256_maskload_ps` mask of the first `n` (≤ 8) lanes.
    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        let n = n.min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// `_mm256_maskstore_ps` mask of the lanes whose bits are set in `bits` (8 low bits).
    #[inline(always)]
    unsafe fn mask_bits8(bits: u16) -> __m256i {
        let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits as i32), sel), sel)
    }

    /// `scores_avx512` with 8-lane vectors: one key block (two vectors) by up to 4 heads.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_avx2(
        qs: &[f32],
        g: usize,
        kt: &[f32],
        start: usize,
        n: usize,
        scale: f32,
        sc: &mut [f32],
        ns: usize,
        at: usize,
    ) {
        let hd = qs.len() / g;
        let bl = hd * KEY_BLOCK;
        let (pq, pk, ps) = (qs.as_ptr(), kt.as_ptr(), sc.as_mut_ptr().add(at));
        let sv = _mm256_set1_ps(scale);
        let last = (start + n - 1) / KEY_BLOCK;
        for b in start / KEY_BLOCK..=last {
            let lanes = block_lanes(b, start, n);
            let (m0, m1) = (mask_bits8(lanes & 0xFF), mask_bits8(lanes >> 8));
            let b0 = pk.add(b * bl);
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for d in 0..hd {
                let k0 = _mm256_loadu_ps(b0.add(d * KEY_BLOCK));
                let k1 = _mm256_loadu_ps(b0.add(d * KEY_BLOCK + 8));
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    let qd = _mm256_set1_ps(*pq.add(h * hd + d));
                    a[0] = _mm256_fmadd_ps(qd, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(qd, k1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                let dst = ps.wrapping_add(h * ns + b * KEY_BLOCK).wrapping_sub(start);
                _mm256_maskstore_ps(dst, m0, _mm256_mul_ps(a[0], sv));
                _mm256_maskstore_ps(dst.wrapping_add(8), m1, _mm256_mul_ps(a[1], sv));
            }
        }
    }

    /// `values_avx512` with 8-lane vectors: 16 dims (two vectors) by up to 4 heads.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn values_avx2(
        p: &[f32],
        ns: usize,
        at: usize,
        g: usize,
        vc: &[f32],
        hd: usize,
        start: usize,
        n: usize,
        o: &mut [f32],
    ) {
        let (pp, pv, po) = (
            p.as_ptr().add(at),
            vc.as_ptr().add(start * hd),
            o.as_mut_ptr(),
        );
        let mut x = 0;
        while x < hd {
            let m = [mask8(hd - x), mask8(hd.saturating_sub(x + 8))];
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for (h, a) in acc.iter_mut().enumerate().take(g) {
                for u in 0..2 {
                    a[u] = _mm256_maskload_ps(po.wrapping_add(h * hd + x + 8 * u), m[u]);
                }
            }
            for j in 0..n {
                let row = pv.wrapping_add(j * hd + x);
                let v = [0, 1].map(|u| _mm256_maskload_ps(row.wrapping_add(8 * u), m[u]));
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    let pj = _mm256_set1_ps(*pp.add(h * ns + j));
                    for u in 0..2 {
                        a[u] = _mm256_fmadd_ps(pj, v[u], a[u]);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                for u in 0..2 {
                    _mm256_maskstore_ps(po.wrapping_add(h * hd + x + 8 * u), m[u], a[u]);
                }
            }
            x += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Causal attention of one row computed in f64 from plain `[position][dim]` keys.
    fn naive(q: &[f32], keys: &[Vec<f32>], vals: &[Vec<f32>], nh: usize, group: usize) -> Vec<f64> {
        let hd = q.len() / nh;
        let mut out = vec![0f64; nh * hd];
        for h in 0..nh {
            let kh = h / group;
            let s: Vec<f64> = keys
                .iter()
                .map(|k| {
                    (0..hd)
                        .map(|d| q[h * hd + d] as f64 * k[kh * hd + d] as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, ej) in e.iter().enumerate() {
                for d in 0..hd {
                    out[h * hd + d] += ej / z * vals[j][kh * hd + d] as f64;
                }
            }
        }
        out
    }

    fn val(i: usize) -> f32 {
        ((i * 2654435761usize % 1000) as f32 - 500.0) / 250.0
    }

    /// Every kernel level against an f64 reference, over head dims and key counts that hit
    /// the vector tails, 1-8 query heads per kv head, a shared prefix and a packed own range;
    /// the two SIMD levels must agree bit for bit. An f16 cache gives, on every level, the
    /// bits an f32 cache holding the f16-rounded keys and values gives.
    #[test]
    fn attention_matches_a_plain_reference_on_every_isa() {
        let levels: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.available())
            .collect();
        let round16 = |x: f32| half::f16::from_f32(x).to_f32();
        for (dtype, (hd, nh, group)) in [KvDtype::F32, KvDtype::F16].into_iter().flat_map(|d| {
            [
                (64usize, 9usize, 3usize),
                (8, 2, 1),
                (20, 8, 8),
                (72, 5, 5),
                (16, 4, 2),
                (136, 2, 2),
            ]
            .map(|shape| (d, shape))
        }) {
            let n_kv = nh / group;
            for (base, off, i) in [
                (0usize, 0usize, 0usize),
                (0, 0, 40),
                (17, 5, 3),
                (33, 0, 0),
                (5, 11, 16),
            ] {
                let used = base + off + i + 1;
                let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..used)
                    .map(|p| {
                        let k = (0..n_kv * hd).map(|x| val(p * 977 + x)).collect();
                        let v = (0..n_kv * hd).map(|x| val(p * 131 + x + 7)).collect();
                        (k, v)
                    })
                    .collect();
                let fill = |dtype: KvDtype| {
                    let mut c = KvCache::default();
                    c.reserve(1, n_kv, hd, 4096, used, dtype);
                    for (p, (k, v)) in rows.iter().enumerate().take(used / 2) {
                        for kh in 0..n_kv {
                            c.put(0, kh, p, &k[kh * hd..][..hd], &v[kh * hd..][..hd]);
                        }
                    }
                    c.len = used / 2;
                    // grow once more so the re-layout is exercised
                    c.reserve(1, n_kv, hd, 4096, c.cap + 1, dtype);
                    for (p, (k, v)) in rows.iter().enumerate().skip(used / 2) {
                        for kh in 0..n_kv {
                            c.put(0, kh, p, &k[kh * hd..][..hd], &v[kh * hd..][..hd]);
                        }
                    }
                    c
                };
                let c = fill(dtype);
                assert_eq!(c.bytes(), (c.k_head + c.cap * hd) * n_kv * dtype.bytes());
                let q: Vec<f32> = (0..nh * hd).map(|x| val(x * 31 + 3)).collect();
                let seen: Vec<usize> = (0..base).chain(base + off..base + off + i + 1).collect();
                let held = |x: &Vec<f32>| -> Vec<f32> {
                    match dtype {
                        KvDtype::F32 => x.clone(),
                        KvDtype::F16 => x.iter().map(|&v| round16(v)).collect(),
                    }
                };
                let keys: Vec<Vec<f32>> = seen.iter().map(|&p| held(&rows[p].0)).collect();
                let vals: Vec<Vec<f32>> = seen.iter().map(|&p| held(&rows[p].1)).collect();
                let want = naive(&q, &keys, &vals, nh, group);
                let shape = AttnShape {
                    base,
                    cap: c.cap,
                    k_head: c.k_head,
                    hd,
                    nh,
                    group,
                };
                // the f32 cache of the rounded values, for the f16 cache's bits
                let rounded = (dtype == KvDtype::F16).then(|| {
                    let mut r = KvCache::default();
                    r.reserve(1, n_kv, hd, 4096, c.cap, KvDtype::F32);
                    for (p, (k, v)) in rows.iter().enumerate() {
                        for kh in 0..n_kv {
                            r.put(
                                0,
                                kh,
                                p,
                                &held(k)[kh * hd..][..hd],
                                &held(v)[kh * hd..][..hd],
                            );
                        }
                    }
                    r
                });
                let mut simd: Option<Vec<f32>> = None;
                for &isa in &levels {
                    let mut out = vec![0f32; nh * hd];
                    let mut sc = AttnScratch::default();
                    with_isa(isa, || {
                        attend(&shape, &q, c.layer(0), off, i, &mut out, &mut sc)
                    });
                    for (x, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
                            "{dtype:?} {isa:?} hd {hd} nh {nh} group {group} ({base},{off},{i}) [{x}]: {a} vs {b}"
                        );
                    }
                    if let Some(r) = &rounded {
                        let mut same = vec![0f32; nh * hd];
                        with_isa(isa, || {
                            attend(&shape, &q, r.layer(0), off, i, &mut same, &mut sc)
                        });
                        assert!(
                            same.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?}: the f16 cache differs from an f32 cache of its values (hd {hd})"
                        );
                    }
                    if isa != Isa::Scalar {
                        match &simd {
                            None => simd = Some(out),
                            Some(s) => assert!(
                                s.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "AVX2 and AVX-512 attention differ ({dtype:?}, hd {hd}, group {group})"
                            ),
                        }
                    }
                }
            }
        }
    }

    /// Runs `f` with the attention kernels of `isa` (test hook: `attend` asks `Isa::best`).
    pub(super) fn with_isa(isa: Isa, f: impl FnOnce()) {
        ISA_OVERRIDE.with(|o| o.set(Some(isa)));
        f();
        ISA_OVERRIDE.with(|o| o.set(None));
    }
}

#[cfg(test)]
thread_local! {
    static ISA_OVERRIDE: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// The kernel level `attend` runs: `Isa::best()`, or a test's choice.
#[inline]
fn level() -> Isa {
    #[cfg(test)]
    if let Some(i) = ISA_OVERRIDE.with(|o| o.get()) {
        return i;
    }
    Isa::best()
}

/// Timing, not a check (`cargo test --release -p ferrotune --lib attention_timing --
/// --ignored --nocapture`): one decode step's attention for 8 sequences x 30 layers of SmolLM2's
/// shape, one thread, and the cache bytes it reads per second (the kernels are bound by them).
#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore]
    fn attention_timing() {
        let (hd, nh, group, n_kv, layers, seqs) = (64, 9, 3, 3, 30, 8);
        for n in [100usize, 470] {
            let mut caches: Vec<KvCache> = (0..seqs).map(|_| KvCache::default()).collect();
            for c in caches.iter_mut() {
                c.reserve(layers, n_kv, hd, 8192, n, KvDtype::F32);
                for li in 0..layers {
                    for p in 0..n {
                        for kh in 0..n_kv {
                            let kv: Vec<f32> =
                                (0..hd).map(|x| ((x + p + li) % 7) as f32 / 7.0).collect();
                            c.put(li, kh, p, &kv, &kv);
                        }
                    }
                }
                c.len = n;
            }
            let q: Vec<f32> = (0..nh * hd).map(|x| (x % 5) as f32 / 5.0).collect();
            let (mut out, mut sc) = (vec![0f32; nh * hd], AttnScratch::default());
            let bytes = (seqs * layers * 2 * n_kv * n * hd * 4) as f64;
            for isa in [Isa::Avx512, Isa::Avx2, Isa::Scalar]
                .into_iter()
                .filter(|i| i.available())
            {
                let reps = 20;
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    for c in &caches {
                        for li in 0..layers {
                            let shape = AttnShape {
                                base: 0,
                                cap: c.cap,
                                k_head: c.k_head,
                                hd,
                                nh,
                                group,
                            };
                            tests::with_isa(isa, || {
                                attend(&shape, &q, c.layer(li), 0, n - 1, &mut out, &mut sc)
                            });
                        }
                    }
                }
                let s = t0.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{n} keys, {seqs} sequences x {layers} layers, {isa:?}: {:.2} ms, {:.1} GB/s of cache",
                    s * 1e3,
                    bytes / s / 1e9
                );
            }
        }
    }
}
