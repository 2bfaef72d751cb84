//! Causal grouped-query attention with a KV cache, fused: softmax(scale·q·kᵀ + causal mask)·v.
//!
//! Forward, per (batch, query head): query rows are processed in blocks of [`BLOCK_ROWS`]; a block
//! only looks at the keys its last row may see, computes its scores into a scratch buffer of
//! `rows × keys`, applies the causal softmax in place and multiplies by v. Nothing of size
//! `t × s` outlives the block, there is no mask tensor and no materialised `repeat_kv` (query head
//! h reads kv head h / (hq/hkv) through an index). Only the per-row log-sum-exp is kept for the
//! backward pass, which recomputes the probabilities block by block (flash-attention style).
//!
//! Matrix products on blocks use the `gemm` crate directly (the same one candle uses), reading
//! q/k/v through their strides, so transposed q and a narrowed KV cache cost no copy. Calls
//! with fewer than [`DECODE_MAX_T`] query tokens (the per-token decode step) take a
//! flash-decoding path instead ([`forward_decode`]): dot/axpy loops over key chunks, each
//! query-head group sharing its kv rows.
use super::kernels::{self, multiversion, Float};
use super::softmax::softmax_last_dim_reference;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Query rows per block: bounds the scratch to `BLOCK_ROWS × s` per task and keeps the causal
/// waste (scores above the diagonal inside a block) to half a block.
const BLOCK_ROWS: usize = 64;
/// Calls with fewer query tokens than this take the decode path ([`forward_decode`]).
const DECODE_MAX_T: usize = 4;
/// Keys per task on the decode path: K and V of a chunk (2 × 256 × d floats) stay in L2.
const KEY_CHUNK: usize = 256;
/// Below this many multiply-adds in total, run on the calling thread (rayon costs microseconds).
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Causal attention `softmax(scale · q kᵀ + mask) v` with grouped-query heads and a KV cache.
///
/// `q` is `(b, hq, t, d)`; `k`, `v` are `(b, hkv, s, d)` with `s = q_offset + t` (the first
/// `q_offset` keys come from the cache); `hq % hkv == 0` and query head `h` uses kv head
/// `h / (hq / hkv)`. Query `i` attends key `j` iff `j <= q_offset + i`. Gradients reach q, k, v.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    q_offset: usize,
) -> Result<Tensor> {
    let dims = Dims::new(q, k, v, q_offset)?;
    // Empty tensors (e.g. a zero-sized head dim) take the composed path; the kernels assume
    // non-empty rows.
    if kernels::cpu_kernel_dtype(&[q, k, v]).is_none()
        || [q, k, v].iter().any(|t| t.elem_count() == 0)
    {
        return causal_attention_reference(q, k, v, scale, q_offset);
    }
    // The kernels read rows through strides; only the head dim must be contiguous.
    let rows_ok = |x: &Tensor| -> Result<Tensor> {
        if x.stride()[3] == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    let (q, k, v) = (rows_ok(q)?, rows_ok(k)?, rows_ok(v)?);
    let keep_lse = q.track_op() || k.track_op() || v.track_op();
    let op = Attention {
        dims,
        scale,
        q_offset,
        keep_lse,
        lse: Mutex::new(None),
    };
    q.apply_op3(&k, &v, op)
}

/// The same function composed from ordinary differentiable candle ops (used off-CPU, for
/// f16/bf16, and by tests). Query heads are grouped by kv head with a reshape, so k/v are still
/// not repeated; the causal mask is a `(t, s)` tensor of 0/−inf broadcast over batch and heads.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    q_offset: usize,
) -> Result<Tensor> {
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    } = Dims::new(q, k, v, q_offset)?;
    let n_rep = hq / hkv;
    let qg = q.reshape((b, hkv, n_rep * t, d))?;
    let att = (qg.matmul(&k.t()?)? * scale)?.reshape((b, hkv, n_rep, t, s))?;
    let att = if t > 1 {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if j <= q_offset + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), q.device())?.to_dtype(att.dtype())?;
        att.broadcast_add(&mask)?
    } else {
        att
    };
    let p = softmax_last_dim_reference(&att)?.reshape((b, hkv, n_rep * t, s))?;
    p.matmul(v)?.reshape((b, hq, t, d))
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
}

impl Dims {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, q_offset: usize) -> Result<Self> {
        let (b, hq, t, d) = q.dims4()?;
        let (bk, hkv, s, dk) = k.dims4()?;
        if v.dims() != k.dims() {
            bail!(
                "causal_attention: v {:?} must have the shape of k {:?}",
                v.dims(),
                k.dims()
            )
        }
        if bk != b || dk != d {
            bail!(
                "causal_attention: q {:?} and k {:?} disagree on batch or head dim",
                q.dims(),
                k.dims()
            )
        }
        if hkv == 0 || hq % hkv != 0 {
            bail!("causal_attention: {hq} query heads are not a multiple of {hkv} kv heads")
        }
        if t == 0 || s != q_offset + t {
            bail!("causal_attention: k/v have {s} positions but q_offset {q_offset} + {t} query tokens = {}", q_offset + t)
        }
        Ok(Self {
            b,
            hq,
            hkv,
            t,
            s,
            d,
        })
    }
}

/// Row geometry of a `(b, h, rows, d)` tensor whose last dim is contiguous.
#[derive(Clone, Copy)]
struct Rows {
    start: usize,
    sb: usize,
    sh: usize,
    /// Stride between consecutive rows (positions) of one head.
    rs: usize,
}

impl Rows {
    fn new(l: &Layout) -> Result<Self> {
        let st = l.stride();
        if st.len() != 4 || st[3] != 1 {
            bail!("causal_attention: internal error: head dim must be contiguous")
        }
        Ok(Self {
            start: l.start_offset(),
            sb: st[0],
            sh: st[1],
            rs: st[2],
        })
    }

    #[inline(always)]
    fn head(&self, b: usize, h: usize) -> usize {
        self.start + b * self.sb + h * self.sh
    }
}

/// `dst (m×n) = [dst +] beta · lhs (m×k) · rhs (k×n)`, matrices given as slices starting at
/// element (0, 0) with (row, column) strides. The extents are checked, so this is safe.
#[allow(clippy::too_many_arguments)]
fn block_gemm<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: T,
) {
    let extent = |r: usize, c: usize, rs: usize, cs: usize| {
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * rs + (c - 1) * cs + 1
        }
    };
    assert!(
        extent(m, n, dst_rs, dst_cs) <= dst.len(),
        "block_gemm: dst out of bounds"
    );
    assert!(
        extent(m, k, lhs_rs, lhs_cs) <= lhs.len(),
        "gemm: lhs out of bounds"
    );
    assert!(
        extent(k, n, rhs_rs, rhs_cs) <= rhs.len(),
        "gemm: rhs out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element gemm touches lies inside the slices (checked above); dst does not
    // alias lhs/rhs (it is a &mut borrow); T is f32 or f64, which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { T::ONE } else { T::ZERO },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Everything a per-head task needs; the slices are the whole buffers, indexed through `Rows`.
struct Ctx<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    qr: Rows,
    kr: Rows,
    vr: Rows,
    dims: Dims,
    scale: T,
    q_offset: usize,
}

impl<T> Ctx<'_, T> {
    /// (batch, query head, kv head) of task `bh`.
    #[inline(always)]
    fn head(&self, bh: usize) -> (usize, usize, usize) {
        let (b, h) = (bh / self.dims.hq, bh % self.dims.hq);
        (b, h, h / (self.dims.hq / self.dims.hkv))
    }
}

/// Causal softmax of one score row in place: entries `..n_valid` become probabilities, the
/// rest (up to the row's end) zero. Returns the log-sum-exp of the valid scores.
#[inline(always)]
fn softmax_row<T: Float>(row: &mut [T], n_valid: usize) -> T {
    let (valid, masked) = row.split_at_mut(n_valid);
    let m = kernels::max(valid);
    let sum = kernels::exp_shift_sum(valid, m);
    kernels::scale(valid, T::ONE / sum);
    masked.fill(T::ZERO);
    m + sum.ln()
}

/// Forward for one (batch, query head): fills `out` (t × d) and `lse` (t).
#[inline(always)]
fn head_forward_body<T: Float>(
    c: &Ctx<'_, T>,
    bh: usize,
    out: &mut [T],
    lse: &mut [T],
    scratch: &mut Vec<T>,
) {
    let Dims { t, d, .. } = c.dims;
    let (b, h, g) = c.head(bh);
    let q = &c.q[c.qr.head(b, h)..];
    let k = &c.k[c.kr.head(b, g)..];
    let v = &c.v[c.vr.head(b, g)..];
    for r0 in (0..t).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(t - r0);
        let nk = c.q_offset + r0 + rows; // keys visible to the block's last row
        scratch.clear();
        scratch.resize(rows * nk, T::ZERO);
        let q_blk = &q[r0 * c.qr.rs..];
        let out_blk = &mut out[r0 * d..(r0 + rows) * d];
        block_gemm(
            (rows, nk, d),
            scratch,
            (nk, 1),
            false,
            q_blk,
            (c.qr.rs, 1),
            k,
            (1, c.kr.rs),
            c.scale,
        );
        for (i, srow) in scratch.chunks_exact_mut(nk).enumerate() {
            lse[r0 + i] = softmax_row(srow, c.q_offset + r0 + i + 1);
        }
        block_gemm(
            (rows, d, nk),
            out_blk,
            (d, 1),
            false,
            scratch,
            (nk, 1),
            v,
            (c.vr.rs, 1),
            T::ONE,
        );
    }
}
multiversion!(fn head_forward<T>(c: &Ctx<'_, T>, bh: usize, out: &mut [T], lse: &mut [T], scratch: &mut Vec<T>) = head_forward_body;);

fn forward<T: Float>(c: &Ctx<'_, T>) -> (Vec<T>, Vec<T>) {
    let Dims { b, hq, t, s, d, .. } = c.dims;
    if t < DECODE_MAX_T {
        return forward_decode(c);
    }
    let mut out = vec![T::ZERO; b * hq * t * d];
    let mut lse = vec![T::ZERO; b * hq * t];
    let work = b * hq * t * s * d;
    if work < PARALLEL_MIN_WORK {
        let mut scratch = Vec::new();
        for (bh, (o, l)) in out
            .chunks_exact_mut(t * d)
            .zip(lse.chunks_exact_mut(t))
            .enumerate()
        {
            head_forward(c, bh, o, l, &mut scratch);
        }
    } else {
        out.par_chunks_exact_mut(t * d)
            .zip(lse.par_chunks_exact_mut(t))
            .enumerate()
            .for_each_init(Vec::new, |scratch, (bh, (o, l))| {
                head_forward(c, bh, o, l, scratch)
            });
    }
    (out, lse)
}

/// Decode path (t < [`DECODE_MAX_T`]): flash-decoding. Work is split into tasks of
/// (batch, kv head, chunk of [`KEY_CHUNK`] keys). A task handles all `n_rep · t` query rows of
/// its kv group, so the chunk's K and V come from memory once and are reread from L2 by the
/// group's other heads, and the chunking gives the threads enough tasks even with 3 kv heads.
/// Each task leaves an unnormalised partial output with its max and sum of exponentials; a
/// cheap merge combines the chunks. All buffers are allocated once per call, whatever the
/// cache length.
fn forward_decode<T: Float>(c: &Ctx<'_, T>) -> (Vec<T>, Vec<T>) {
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    } = c.dims;
    let n_rep = hq / hkv;
    let rows = n_rep * t; // per kv group: row r is (rep, i) = (r / t, r % t)
    let n_chunks = s.div_ceil(KEY_CHUNK);
    let part_len = rows * (d + 2); // per row: o (d), max, sum
    let mut partial = vec![T::ZERO; b * hkv * n_chunks * part_len];
    let mut scores = vec![T::ZERO; b * hkv * n_chunks * KEY_CHUNK];
    let task = |ti: usize, part: &mut [T], sc: &mut [T]| {
        decode_chunk(c, ti / n_chunks, ti % n_chunks, part, sc)
    };
    if b * hq * t * s * d < PARALLEL_MIN_WORK {
        for (ti, (part, sc)) in partial
            .chunks_exact_mut(part_len)
            .zip(scores.chunks_exact_mut(KEY_CHUNK))
            .enumerate()
        {
            task(ti, part, sc);
        }
    } else {
        partial
            .par_chunks_exact_mut(part_len)
            .zip(scores.par_chunks_exact_mut(KEY_CHUNK))
            .enumerate()
            .for_each(|(ti, (part, sc))| task(ti, part, sc));
    }
    drop(scores);
    // Merge the chunks of each (batch, kv group, row): rescale to the common max.
    let mut out = vec![T::ZERO; b * hq * t * d];
    let mut lse = vec![T::ZERO; b * hq * t];
    for bg in 0..b * hkv {
        let (bi, g) = (bg / hkv, bg % hkv);
        let parts = &partial[bg * n_chunks * part_len..(bg + 1) * n_chunks * part_len];
        for r in 0..rows {
            let (rep, i) = (r / t, r % t);
            let row = (bi * hq + g * n_rep + rep) * t + i;
            let stat = |ch: usize| {
                let p = &parts[ch * part_len + r * (d + 2)..ch * part_len + (r + 1) * (d + 2)];
                (p[d], p[d + 1])
            };
            // A chunk with no visible key has sum 0 and only a placeholder max: skip it. Chunk 0
            // holds key 0, which every row sees, so m ends up finite.
            let m = (1..n_chunks).fold(stat(0).0, |m, ch| {
                let (mc, lc) = stat(ch);
                if lc != T::ZERO && mc > m {
                    mc
                } else {
                    m
                }
            });
            let orow = &mut out[row * d..(row + 1) * d];
            let mut l = T::ZERO;
            for ch in 0..n_chunks {
                let (mc, lc) = stat(ch);
                if lc == T::ZERO {
                    continue;
                }
                let w = (mc - m).exp();
                l += w * lc;
                let p = &parts[ch * part_len + r * (d + 2)..ch * part_len + r * (d + 2) + d];
                kernels::axpy(orow, w, p);
            }
            kernels::scale(orow, T::ONE / l);
            lse[row] = m + l.ln();
        }
    }
    (out, lse)
}

/// One decode task: kv group `bg` (batch · hkv + g), keys `chunk · KEY_CHUNK ..`. Writes, per
/// row, Σ_j e^(s_j − m) v_j, m and Σ_j e^(s_j − m) over the row's visible keys in the chunk.
#[inline(always)]
fn decode_chunk_body<T: Float>(
    c: &Ctx<'_, T>,
    bg: usize,
    chunk: usize,
    part: &mut [T],
    scores: &mut [T],
) {
    let Dims {
        hkv, t, s, d, hq, ..
    } = c.dims;
    let n_rep = hq / hkv;
    let (bi, g) = (bg / hkv, bg % hkv);
    let j0 = chunk * KEY_CHUNK;
    let nk = KEY_CHUNK.min(s - j0);
    let k = &c.k[c.kr.head(bi, g) + j0 * c.kr.rs..];
    let v = &c.v[c.vr.head(bi, g) + j0 * c.vr.rs..];
    let rows = n_rep * t;
    // Keys of this chunk that row r may see: the causal limit q_offset + i, clipped to the chunk.
    let visible = |r: usize| (c.q_offset + r % t + 1).saturating_sub(j0).min(nk);
    let q_row = |r: usize| {
        let off = c.qr.head(bi, g * n_rep + r / t) + (r % t) * c.qr.rs;
        &c.q[off..off + d]
    };
    // Row-major loops: the chunk's K and V (2 · KEY_CHUNK · d floats) stay in L2 across rows.
    for r in 0..rows {
        let n = visible(r);
        let stat = &mut part[r * (d + 2)..(r + 1) * (d + 2)];
        let (o, stat) = stat.split_at_mut(d);
        o.fill(T::ZERO);
        if n == 0 {
            stat[0] = T::ZERO;
            stat[1] = T::ZERO;
            continue;
        }
        let row = &mut scores[..n];
        kernels::dot_rows(q_row(r), k, c.kr.rs, c.scale, row);
        let m = kernels::max(row);
        stat[1] = kernels::exp_shift_sum(row, m);
        stat[0] = m;
        kernels::axpy_rows(o, row, v, c.vr.rs);
    }
}
multiversion!(fn decode_chunk<T>(c: &Ctx<'_, T>, bg: usize, chunk: usize, part: &mut [T], scores: &mut [T]) = decode_chunk_body;);

/// Gradient inputs besides q/k/v: the forward output, its gradient (both contiguous) and lse.
struct Grads<'a, T> {
    o: &'a [T],
    dout: &'a [T],
    lse: &'a [T],
}

/// Backward for one (batch, query head): writes dq (t × d) and this head's contributions to
/// dk, dv (s × d each; summed over the kv group afterwards).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_backward_body<T: Float>(
    c: &Ctx<'_, T>,
    gr: &Grads<'_, T>,
    bh: usize,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    scratch: &mut (Vec<T>, Vec<T>),
) {
    let Dims { t, d, .. } = c.dims;
    let (b, h, g) = c.head(bh);
    let q = &c.q[c.qr.head(b, h)..];
    let k = &c.k[c.kr.head(b, g)..];
    let v = &c.v[c.vr.head(b, g)..];
    let o = &gr.o[bh * t * d..(bh + 1) * t * d];
    let dout = &gr.dout[bh * t * d..(bh + 1) * t * d];
    let lse = &gr.lse[bh * t..(bh + 1) * t];
    let (p, ds) = scratch;
    for r0 in (0..t).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(t - r0);
        let nk = c.q_offset + r0 + rows;
        p.clear();
        p.resize(rows * nk, T::ZERO);
        ds.clear();
        ds.resize(rows * nk, T::ZERO);
        let q_blk = &q[r0 * c.qr.rs..];
        let do_blk = &dout[r0 * d..(r0 + rows) * d];
        // P = exp(scale·Q Kᵀ − lse), zero above the diagonal.
        block_gemm(
            (rows, nk, d),
            p,
            (nk, 1),
            false,
            q_blk,
            (c.qr.rs, 1),
            k,
            (1, c.kr.rs),
            c.scale,
        );
        for (i, prow) in p.chunks_exact_mut(nk).enumerate() {
            let n_valid = c.q_offset + r0 + i + 1;
            let l = lse[r0 + i];
            let (valid, masked) = prow.split_at_mut(n_valid);
            for x in valid.iter_mut() {
                *x = (*x - l).exp();
            }
            masked.fill(T::ZERO);
        }
        // dV += Pᵀ dO;  dP = dO Vᵀ
        block_gemm(
            (nk, d, rows),
            dv,
            (d, 1),
            true,
            p,
            (1, nk),
            do_blk,
            (d, 1),
            T::ONE,
        );
        block_gemm(
            (rows, nk, d),
            ds,
            (nk, 1),
            false,
            do_blk,
            (d, 1),
            v,
            (1, c.vr.rs),
            T::ONE,
        );
        // dS = P ∘ (dP − ⟨dO, O⟩) · scale  (the row sum of P ∘ dP equals ⟨dO_i, O_i⟩)
        for (i, (prow, dsrow)) in p.chunks_exact(nk).zip(ds.chunks_exact_mut(nk)).enumerate() {
            let oi = &o[(r0 + i) * d..(r0 + i + 1) * d];
            let di = kernels::dot(&do_blk[i * d..(i + 1) * d], oi);
            for (x, pv) in dsrow.iter_mut().zip(prow) {
                *x = *pv * (*x - di) * c.scale;
            }
        }
        // dQ = dS K;  dK += dSᵀ Q
        block_gemm(
            (rows, d, nk),
            &mut dq[r0 * d..(r0 + rows) * d],
            (d, 1),
            false,
            ds,
            (nk, 1),
            k,
            (c.kr.rs, 1),
            T::ONE,
        );
        block_gemm(
            (nk, d, rows),
            dk,
            (d, 1),
            true,
            ds,
            (1, nk),
            q_blk,
            (c.qr.rs, 1),
            T::ONE,
        );
    }
}
multiversion!(fn head_backward<T>(c: &Ctx<'_, T>, gr: &Grads<'_, T>, bh: usize, dq: &mut [T], dk: &mut [T], dv: &mut [T], scratch: &mut (Vec<T>, Vec<T>)) = head_backward_body;);

/// Returns (dq, dk, dv), contiguous in the shapes of q, k, v.
fn backward<T: Float>(c: &Ctx<'_, T>, gr: &Grads<'_, T>) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    } = c.dims;
    let n_rep = hq / hkv;
    let mut dq = vec![T::ZERO; b * hq * t * d];
    // One dk/dv slab per *query* head so tasks never share an output; the group sum follows.
    let mut dk_h = vec![T::ZERO; b * hq * s * d];
    let mut dv_h = vec![T::ZERO; b * hq * s * d];
    dq.par_chunks_exact_mut(t * d)
        .zip(dk_h.par_chunks_exact_mut(s * d))
        .zip(dv_h.par_chunks_exact_mut(s * d))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |scratch, (bh, ((dq, dk), dv))| head_backward(c, gr, bh, dq, dk, dv, scratch),
        );
    if n_rep == 1 {
        return (dq, dk_h, dv_h);
    }
    let group_sum = |per_head: &[T]| {
        let mut out = vec![T::ZERO; b * hkv * s * d];
        out.par_chunks_exact_mut(s * d)
            .enumerate()
            .for_each(|(bg, o)| {
                let first = bg * n_rep; // (b, g) ↦ query heads b·hq + g·n_rep + r
                for r in 0..n_rep {
                    kernels::axpy(
                        o,
                        T::ONE,
                        &per_head[(first + r) * s * d..(first + r + 1) * s * d],
                    );
                }
            });
        out
    };
    let dk = group_sum(&dk_h);
    drop(dk_h);
    let dv = group_sum(&dv_h);
    (dq, dk, dv)
}

struct Attention {
    dims: Dims,
    scale: f64,
    q_offset: usize,
    /// Whether a backward pass may follow (any input tracked); otherwise lse is not kept.
    keep_lse: bool,
    /// Per-row log-sum-exp `(b, hq, t)`, written by the forward pass for the backward pass.
    lse: Mutex<Option<CpuStorage>>,
}

impl Attention {
    fn ctx<'a, T: Float>(
        &self,
        q: (&'a [T], Rows),
        k: (&'a [T], Rows),
        v: (&'a [T], Rows),
    ) -> Ctx<'a, T> {
        Ctx {
            q: q.0,
            k: k.0,
            v: v.0,
            qr: q.1,
            kr: k.1,
            vr: v.1,
            dims: self.dims,
            scale: T::from_f64(self.scale),
            q_offset: self.q_offset,
        }
    }

    fn fwd<T: Float>(&self, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
        let [(qs, ql), (ks, kl), (vs, vl)] = s;
        let c = self.ctx(
            (qs.as_slice::<T>()?, Rows::new(ql)?),
            (ks.as_slice::<T>()?, Rows::new(kl)?),
            (vs.as_slice::<T>()?, Rows::new(vl)?),
        );
        let (out, lse) = forward(&c);
        if self.keep_lse {
            *self.lse.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(T::to_cpu_storage_owned(lse));
        }
        Ok((T::to_cpu_storage_owned(out), ql.shape().clone()))
    }

    fn bwd_t<T: Float>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let dout = dout.contiguous()?;
        let lse_guard = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lse) = lse_guard.as_ref() else {
            bail!("causal_attention: internal error: backward without saved log-sum-exp")
        };
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = dout.storage_and_layout();
        let c = self.ctx(
            (
                kernels::cpu_data::<T>(&qs, "causal_attention")?,
                Rows::new(ql)?,
            ),
            (
                kernels::cpu_data::<T>(&ks, "causal_attention")?,
                Rows::new(kl)?,
            ),
            (
                kernels::cpu_data::<T>(&vs, "causal_attention")?,
                Rows::new(vl)?,
            ),
        );
        let gr = Grads {
            o: kernels::cpu_contiguous::<T>(&os, ol, "causal_attention")?,
            dout: kernels::cpu_contiguous::<T>(&gs, gl, "causal_attention")?,
            lse: lse.as_slice::<T>()?,
        };
        let (dq, dk, dv) = backward(&c, &gr);
        Ok([
            kernels::tensor_from_vec(dq, q.shape())?,
            kernels::tensor_from_vec(dk, k.shape())?,
            kernels::tensor_from_vec(dv, v.shape())?,
        ])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "ferrotune-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        match s1.dtype() {
            DType::F32 => self.fwd::<f32>(s),
            DType::F64 => self.fwd::<f64>(s),
            dt => bail!("causal_attention: no CPU kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] = match q.dtype() {
            DType::F32 => self.bwd_t::<f32>(q, k, v, o, dout)?,
            DType::F64 => self.bwd_t::<f64>(q, k, v, o, dout)?,
            dt => bail!("causal_attention: no CPU kernel for {dt:?}"),
        };
        let keep = |t: &Tensor, g: Tensor| t.track_op().then_some(g);
        Ok((keep(q, dq), keep(k, dk), keep(v, dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, check_gradients, compare_grads, rand_tensor};
    use candle_core::Var;

    /// (b, hq, hkv, t, q_offset, d)
    const CASES: &[(usize, usize, usize, usize, usize, usize)] = &[
        (1, 1, 1, 1, 0, 4),    // a single token, no cache
        (2, 4, 2, 5, 0, 8),    // GQA prefill
        (1, 4, 2, 3, 300, 8),  // decode path, 3 tokens over 2 key chunks
        (1, 4, 2, 2, 255, 8),  // decode path: row 0 sees nothing of the last chunk
        (1, 9, 3, 1, 37, 64),  // SmolLM2 decode step
        (2, 6, 2, 7, 5, 16),   // GQA with a cache, gemm blocks
        (1, 2, 1, 3, 2, 5),    // odd head dim, hkv = 1 (MQA)
        (1, 3, 3, 70, 10, 12), // crosses a block boundary (64 + 6 rows), no grouping
    ];

    fn qkv(
        case: (usize, usize, usize, usize, usize, usize),
        dt: DType,
        seed: u64,
    ) -> Result<[Tensor; 3]> {
        let (b, hq, hkv, t, off, d) = case;
        Ok([
            rand_tensor(&[b, hq, t, d], dt, seed)?,
            rand_tensor(&[b, hkv, off + t, d], dt, seed + 1)?,
            rand_tensor(&[b, hkv, off + t, d], dt, seed + 2)?,
        ])
    }

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &case) in CASES.iter().enumerate() {
                let [q, k, v] = qkv(case, dt, 1000 + 10 * i as u64)?;
                let (off, d) = (case.4, case.5);
                let scale = 1.0 / (d as f64).sqrt() * 2.0; // sharper than usual
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-13 };
                assert_close(
                    &causal_attention(&q, &k, &v, scale, off)?,
                    &causal_attention_reference(&q, &k, &v, scale, off)?,
                    tol,
                    &format!("attention {dt:?} {case:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn decode_with_long_cache_matches_reference() -> Result<()> {
        let case = (1, 9, 3, 1, 2047, 64);
        let [q, k, v] = qkv(case, DType::F32, 77)?;
        assert_close(
            &causal_attention(&q, &k, &v, 0.125, 2047)?,
            &causal_attention_reference(&q, &k, &v, 0.125, 2047)?,
            1e-5,
            "decode s=2048",
        )
    }

    /// All scores far below zero, with a key chunk that some rows cannot see: the chunk merge
    /// must not let an invisible chunk's placeholder take part in the running max.
    #[test]
    fn decode_merge_with_very_negative_scores() -> Result<()> {
        let (hq, hkv, t, off, d) = (4, 2, 2, 255, 8);
        let q = (rand_tensor(&[1, hq, t, d], DType::F32, 21)?.abs()? + 0.5)?.neg()?;
        let k = (rand_tensor(&[1, hkv, off + t, d], DType::F32, 22)?.abs()? + 0.5)?;
        let v = rand_tensor(&[1, hkv, off + t, d], DType::F32, 23)?;
        assert_close(
            &causal_attention(&q, &k, &v, 20.0, off)?,
            &causal_attention_reference(&q, &k, &v, 20.0, off)?,
            1e-5,
            "negative scores",
        )
    }

    #[test]
    fn strided_inputs_match_reference() -> Result<()> {
        // q as it comes from a projection: (b, t, h, d) transposed; k/v narrowed from a
        // preallocated cache of 20 positions.
        let (b, hq, hkv, t, off, d) = (2, 4, 2, 3, 6, 8);
        let q = rand_tensor(&[b, t, hq, d], DType::F64, 5)?.transpose(1, 2)?;
        let k = rand_tensor(&[b, hkv, 20, d], DType::F64, 6)?.narrow(2, 0, off + t)?;
        let v = rand_tensor(&[b, hkv, 20, d], DType::F64, 7)?.narrow(2, 0, off + t)?;
        assert!(!q.is_contiguous() && !k.is_contiguous());
        assert_close(
            &causal_attention(&q, &k, &v, 0.3, off)?,
            &causal_attention_reference(&q, &k, &v, 0.3, off)?,
            1e-13,
            "strided",
        )?;
        compare_grads(
            |x| {
                causal_attention(
                    &x[0].transpose(1, 2)?,
                    &x[1].narrow(2, 0, off + t)?,
                    &x[2].narrow(2, 0, off + t)?,
                    0.3,
                    off,
                )
            },
            |x| {
                causal_attention_reference(
                    &x[0].transpose(1, 2)?,
                    &x[1].narrow(2, 0, off + t)?,
                    &x[2].narrow(2, 0, off + t)?,
                    0.3,
                    off,
                )
            },
            &[
                rand_tensor(&[b, t, hq, d], DType::F64, 5)?,
                rand_tensor(&[b, hkv, 20, d], DType::F64, 6)?,
                rand_tensor(&[b, hkv, 20, d], DType::F64, 7)?,
            ],
            1e-12,
            "strided grads",
        )
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        for (i, &case) in [(1, 4, 2, 3, 2, 4), (1, 2, 2, 5, 0, 3)].iter().enumerate() {
            let [q, k, v] = qkv(case, DType::F64, 2000 + 10 * i as u64)?;
            let off = case.4;
            check_gradients(
                |x| causal_attention(&x[0], &x[1], &x[2], 0.7, off),
                &[q, k, v],
                1e-6,
                1e-7,
            )?;
        }
        Ok(())
    }

    #[test]
    fn backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &case) in CASES.iter().enumerate() {
                let [q, k, v] = qkv(case, dt, 3000 + 10 * i as u64)?;
                let (off, d) = (case.4, case.5);
                let scale = 1.0 / (d as f64).sqrt();
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-12 };
                compare_grads(
                    |x| causal_attention(&x[0], &x[1], &x[2], scale, off),
                    |x| causal_attention_reference(&x[0], &x[1], &x[2], scale, off),
                    &[q, k, v],
                    tol,
                    &format!("attention {dt:?} {case:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn only_tracked_inputs_get_gradients() -> Result<()> {
        let [q, k, v] = qkv((1, 4, 2, 6, 3, 8), DType::F32, 9)?;
        let q = Var::from_tensor(&q)?;
        let grads = causal_attention(q.as_tensor(), &k, &v, 0.35, 3)?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert!(grads.get(&k).is_none() && grads.get(&v).is_none());
        let want = causal_attention_reference(q.as_tensor(), &k, &v, 0.35, 3)?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert_close(
            grads.get(q.as_tensor()).unwrap(),
            want.get(q.as_tensor()).unwrap(),
            1e-5,
            "dq",
        )
    }

    #[test]
    fn rejects_inconsistent_shapes() -> Result<()> {
        let [q, k, v] = qkv((1, 4, 2, 3, 2, 8), DType::F32, 4)?;
        let err = causal_attention(&q, &k, &v, 1.0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("q_offset 1 + 3"), "{err}");
        let k3 = rand_tensor(&[1, 3, 5, 8], DType::F32, 1)?;
        let err = causal_attention(&q, &k3, &k3, 1.0, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a multiple"), "{err}");
        Ok(())
    }

    /// Counts heap allocations made by threads that opted in (see `decode_does_not_allocate_per_key`).
    mod alloc_count {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;
        use std::sync::atomic::{AtomicUsize, Ordering};

        pub struct Counting;
        pub static COUNT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            pub static ENABLED: Cell<bool> = const { Cell::new(false) };
        }

        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                if ENABLED.try_with(|e| e.get()).unwrap_or(false) {
                    COUNT.fetch_add(1, Ordering::Relaxed);
                }
                unsafe { System.alloc(l) }
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                unsafe { System.dealloc(p, l) }
            }
        }

        #[global_allocator]
        static GLOBAL: Counting = Counting;
    }

    /// The decode hot path (t = 1) must not allocate per key: the allocation count of a step
    /// with 2048 cached positions is a small constant, the same as with 16.
    #[test]
    fn decode_does_not_allocate_per_key() -> Result<()> {
        use std::sync::atomic::Ordering;
        // A private pool whose threads count their allocations; other tests' threads do not.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(|_| alloc_count::ENABLED.with(|e| e.set(true)))
            .build()
            .map_err(candle_core::Error::wrap)?;
        let mut counts = Vec::new();
        for s in [16usize, 2048] {
            let [q, k, v] = qkv((1, 9, 3, 1, s - 1, 64), DType::F32, 11)?;
            let n = pool.install(|| -> Result<usize> {
                causal_attention(&q, &k, &v, 0.125, s - 1)?; // warm-up (pool threads start lazily)
                let before = alloc_count::COUNT.load(Ordering::SeqCst);
                let out = causal_attention(&q, &k, &v, 0.125, s - 1)?;
                let after = alloc_count::COUNT.load(Ordering::SeqCst);
                drop(out);
                Ok(after - before)
            })?;
            counts.push(n);
        }
        // Output, lse, partials, scores and tensor bookkeeping: 10 here, for either length.
        assert!(
            counts.iter().all(|&n| n <= 32),
            "allocations per decode step: {counts:?}"
        );
        assert!(
            counts[1] <= counts[0] + 9,
            "allocations grow with the cache: {counts:?}"
        );
        Ok(())
    }
}
