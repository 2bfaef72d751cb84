//! Causal grouped-query attention with a KV cache, fused: softmax(scale·q·kᵀ + causal mask)·v.
//!
//! Forward, per (batch, kv head): query rows are processed in blocks of [`BLOCK_ROWS`], the
//! block's rows of every query head of the kv group stacked; a block only looks at the keys its
//! last row may see, computes its scores into a scratch buffer of `rows × keys`, applies the
//! causal softmax in place and multiplies by v. Nothing of size
//! `t × s` outlives the block, there is no mask tensor and no materialised `repeat_kv` (query head
//! h reads kv head h / (hq/hkv) through an index). Only the per-row log-sum-exp is kept for the
//! backward pass, which recomputes the probabilities block by block (flash-attention style).
//!
//! Backward, per (batch, kv head) too: the group's query heads add into the same dk/dv, so one
//! task does the whole group, its heads stacked through each product as forward (k and v packed
//! once per block, no per-head copies of dk/dv to sum). When there are few groups for the
//! threads (SmolLM2 at batch 1: 3 kv groups on 2 threads) each group's blocks are also split
//! into parts of equal cost ([`Plan`]), parts of the backward each with their own dk/dv, summed
//! at the end.
//!
//! Matrix products on blocks use the `gemm` crate directly (the same one candle uses), reading
//! q/k/v through their strides, so transposed q and a narrowed KV cache cost no copy. Calls
//! with fewer than [`DECODE_MAX_T`] query tokens (the per-token decode step) take a
//! flash-decoding path instead ([`forward_decode`]): dot/axpy loops over key chunks, each
//! query-head group sharing its kv rows.
//!
//! Packed rows ([`causal_attention_segments`]) hold several examples one after the other; a
//! query only sees keys of its own example. The row is cut into runs of equal segment id and
//! query blocks never straddle a run boundary, so a block's keys start at its run's first
//! position: the kernel computes no score across examples, and a packed row costs what its
//! examples cost one by one (plus nothing but the same partial last block per example).
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
    if super::reference_ops() {
        return causal_attention_reference(q, k, v, scale, q_offset);
    }
    let dims = Dims::new(q, k, v, q_offset)?;
    // Empty tensors (e.g. a zero-sized head dim) take the composed path; the kernels assume
    // non-empty rows.
    if kernels::cpu_kernel_dtype(&[q, k, v]).is_none()
        || [q, k, v].iter().any(|t| t.elem_count() == 0)
    {
        return causal_attention_reference(q, k, v, scale, q_offset);
    }
    attention_kernel(q, k, v, scale, q_offset, dims, None)
}

/// The fused op on CPU f32/f64 inputs, with `runs` from [`segment_runs`] for packed rows.
fn attention_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    q_offset: usize,
    dims: Dims,
    runs: Option<Vec<Vec<(usize, usize)>>>,
) -> Result<Tensor> {
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
        runs,
        keep_lse,
        lse: Mutex::new(None),
    };
    q.apply_op3(&k, &v, op)
}

/// Causal attention within segments, for packed rows: query `i` of batch row `r` attends key
/// `j` iff `j <= i` and `segments[r][i] == segments[r][j]`.
///
/// `q` is `(b, hq, t, d)`, `k`, `v` are `(b, hkv, t, d)` (no KV cache) and `segments` is
/// `(b, t)` of an integer dtype: the example index of each token (the data pipeline writes 1, 2,
/// ... and 0 on padding). Each id must occupy one contiguous run of its row, as packing
/// produces; padding is just another segment, so its rows stay finite. Gradients reach q, k, v.
pub fn causal_attention_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    segments: &Tensor,
) -> Result<Tensor> {
    if super::reference_ops() {
        return causal_attention_segments_reference(q, k, v, scale, segments);
    }
    let dims = Dims::new(q, k, v, 0)?;
    let runs = segment_runs(segments, dims.b, dims.t)?;
    if kernels::cpu_kernel_dtype(&[q, k, v]).is_none()
        || [q, k, v].iter().any(|t| t.elem_count() == 0)
    {
        return causal_attention_segments_reference(q, k, v, scale, segments);
    }
    attention_kernel(q, k, v, scale, 0, dims, Some(runs))
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
    // candle's matmul needs contiguous operands; the model passes strided head-major views
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
    let Dims { t, s, .. } = Dims::new(q, k, v, q_offset)?;
    let mask = if t > 1 {
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
        Some(Tensor::from_vec(mask, (t, s), q.device())?)
    } else {
        None
    };
    masked_attention(q, k, v, scale, mask.as_ref())
}

/// [`causal_attention_segments`] composed from ordinary differentiable candle ops: the mask is
/// a `(b, 1, 1, t, t)` tensor of 0/−inf, built from `segments` with candle ops too.
pub fn causal_attention_segments_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    segments: &Tensor,
) -> Result<Tensor> {
    // candle's matmul needs contiguous operands; the model passes strided head-major views
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
    let Dims { b, t, .. } = Dims::new(q, k, v, 0)?;
    segment_runs(segments, b, t)?;
    let seg = segments.to_dtype(DType::U32)?;
    let same = seg.unsqueeze(2)?.broadcast_eq(&seg.unsqueeze(1)?)?; // (b, t, t)
    let causal = Tensor::tril2(t, DType::U8, q.device())?;
    let allowed = same.broadcast_mul(&causal)?;
    let zero = Tensor::zeros((b, t, t), DType::F32, q.device())?;
    let minus_inf = Tensor::full(f32::NEG_INFINITY, (b, t, t), q.device())?;
    let mask = allowed
        .where_cond(&zero, &minus_inf)?
        .reshape((b, 1, 1, t, t))?;
    masked_attention(q, k, v, scale, Some(&mask))
}

/// `softmax(scale · q kᵀ + mask) v` with query heads grouped by kv head; `mask` (f32) broadcasts
/// to `(b, hkv, n_rep, t, s)`.
fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let n_rep = hq / hkv;
    let qg = q.reshape((b, hkv, n_rep * t, d))?;
    let att = (qg.matmul(&k.t()?)? * scale)?.reshape((b, hkv, n_rep, t, s))?;
    let att = match mask {
        Some(m) => att.broadcast_add(&m.to_dtype(att.dtype())?)?,
        None => att,
    };
    let p = softmax_last_dim_reference(&att)?.reshape((b, hkv, n_rep * t, s))?;
    p.matmul(v)?.reshape((b, hq, t, d))
}

/// The runs `(start, end)` of equal id in each row of `segments` `(b, t)`. Errors if the shape
/// is wrong or an id comes back after another one (it would not be one example).
fn segment_runs(segments: &Tensor, b: usize, t: usize) -> Result<Vec<Vec<(usize, usize)>>> {
    if segments.dims() != [b, t] {
        bail!(
            "causal_attention: segments have shape {:?} but q needs ({b}, {t})",
            segments.dims()
        )
    }
    if !segments.dtype().is_int() {
        bail!(
            "causal_attention: segments must be integer ids, not {:?}",
            segments.dtype()
        )
    }
    let ids: Vec<Vec<u32>> = segments.to_dtype(DType::U32)?.to_vec2()?;
    let mut out = Vec::with_capacity(b);
    for (r, row) in ids.iter().enumerate() {
        let mut runs = Vec::new();
        let mut start = 0;
        for j in 1..=t {
            if j == t || row[j] != row[start] {
                runs.push((start, j));
                start = j;
            }
        }
        let mut seen: Vec<u32> = runs.iter().map(|&(a, _)| row[a]).collect();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            bail!(
                "causal_attention: segment id {} is not contiguous in row {r} of segments",
                w[0]
            )
        }
        out.push(runs);
    }
    Ok(out)
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
    /// Packed rows: the runs of each batch row (see [`segment_runs`]); `q_offset` is then 0.
    runs: Option<&'a [Vec<(usize, usize)>]>,
    /// The single run `(0, t)` of an unpacked row.
    whole: [(usize, usize); 1],
}

impl<T> Ctx<'_, T> {
    /// The query runs of batch row `b`: a query of run `(a, e)` sees keys
    /// `a ..= q_offset + i` (and `a` is 0 without segments).
    #[inline(always)]
    fn runs(&self, b: usize) -> &[(usize, usize)] {
        match self.runs {
            Some(r) => &r[b],
            None => &self.whole,
        }
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

/// `scores (m × nk) = scale · q kᵀ` for the stacked query rows `q` (`m × d`, contiguous) of a
/// block against its `nk` keys: the first product of both passes.
#[inline(always)]
fn stacked_scores<T: Float>(c: &Ctx<'_, T>, q: &[T], k: &[T], nk: usize, scores: &mut [T]) {
    let d = c.dims.d;
    block_gemm(
        (q.len() / d, nk, d),
        scores,
        (nk, 1),
        false,
        q,
        (d, 1),
        k,
        (1, c.kr.rs),
        c.scale,
    );
}

/// Per-task buffers of the forward pass, reused from block to block: the block's rows of every
/// query head of the group stacked (`n_rep · rows × d`), their output, and the scores
/// (`n_rep · rows × nk`).
struct ForwardScratch<T> {
    q: Vec<T>,
    out: Vec<T>,
    scores: Vec<T>,
}

impl<T> Default for ForwardScratch<T> {
    fn default() -> Self {
        Self {
            q: Vec::new(),
            out: Vec::new(),
            scores: Vec::new(),
        }
    }
}

/// Forward for one (batch, kv head) and a run of its query blocks (a [`Part`]): fills `outs[r]`
/// and `lses[r]` for the group's query head `r`, which hold the part's query rows from `row0`
/// on. As in the backward pass, a block's rows of the group's query heads are stacked and go
/// through each product once (k and v packed once per block).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn group_forward_body<T: Float>(
    c: &Ctx<'_, T>,
    bg: usize,
    blocks: &[Block],
    row0: usize,
    outs: &mut [&mut [T]],
    lses: &mut [&mut [T]],
    sc: &mut ForwardScratch<T>,
) {
    let Dims { d, hq, hkv, .. } = c.dims;
    let n_rep = hq / hkv;
    let (b, g) = (bg / hkv, bg % hkv);
    for &Block { a, r0, rows } in blocks {
        // Keys a.. only: the run's first key (0 without segments).
        let k = &c.k[c.kr.head(b, g) + a * c.kr.rs..];
        let v = &c.v[c.vr.head(b, g) + a * c.vr.rs..];
        let nk = c.q_offset + r0 + rows - a; // keys visible to the block's last row
        let m = n_rep * rows;
        sc.q.clear();
        for r in 0..n_rep {
            let q = c.qr.head(b, g * n_rep + r);
            for i in r0..r0 + rows {
                let at = q + i * c.qr.rs;
                sc.q.extend_from_slice(&c.q[at..at + d]);
            }
        }
        sc.scores.clear();
        sc.scores.resize(m * nk, T::ZERO);
        sc.out.clear();
        sc.out.resize(m * d, T::ZERO);
        stacked_scores(c, &sc.q, k, nk, &mut sc.scores);
        for (row, srow) in sc.scores.chunks_exact_mut(nk).enumerate() {
            let (r, i) = (row / rows, row % rows);
            lses[r][r0 - row0 + i] = softmax_row(srow, c.q_offset + r0 + i + 1 - a);
        }
        block_gemm(
            (m, d, nk),
            &mut sc.out,
            (d, 1),
            false,
            &sc.scores,
            (nk, 1),
            v,
            (c.vr.rs, 1),
            T::ONE,
        );
        for (r, out) in outs.iter_mut().enumerate() {
            let at = (r0 - row0) * d;
            out[at..at + rows * d].copy_from_slice(&sc.out[r * rows * d..(r + 1) * rows * d]);
        }
    }
}
multiversion!(fn group_forward<T>(c: &Ctx<'_, T>, bg: usize, blocks: &[Block], row0: usize, outs: &mut [&mut [T]], lses: &mut [&mut [T]], sc: &mut ForwardScratch<T>) = group_forward_body;);

/// (kv group, part, its query heads' rows of `out`, of `lse`).
type ForwardTask<'a, T> = (usize, &'a Part, Vec<&'a mut [T]>, Vec<&'a mut [T]>);

fn forward<T: Float>(c: &Ctx<'_, T>) -> (Vec<T>, Vec<T>) {
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    } = c.dims;
    // The decode path knows no segments; packed rows are long anyway.
    if t < DECODE_MAX_T && c.runs.is_none() {
        return forward_decode(c);
    }
    let n_rep = hq / hkv;
    let mut out = vec![T::ZERO; b * hq * t * d];
    let mut lse = vec![T::ZERO; b * hq * t];
    let parallel = b * hq * t * s * d >= PARALLEL_MIN_WORK;
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let plan = Plan::new(c, b * hkv, threads);
    // The rows of `out` and `lse` of every (query head, part), then gathered per (kv group,
    // part): each task owns its pieces.
    let mut pieces = Vec::with_capacity(b * hq);
    for (bh, (o, l)) in out
        .chunks_exact_mut(t * d)
        .zip(lse.chunks_exact_mut(t))
        .enumerate()
    {
        let (mut o, mut l) = (o, l);
        let mut per_part = Vec::with_capacity(plan.parts);
        for part in plan.parts(bh / hq) {
            let (po, rest) = std::mem::take(&mut o).split_at_mut(part.rows.len() * d);
            let (pl, lrest) = std::mem::take(&mut l).split_at_mut(part.rows.len());
            (o, l) = (rest, lrest);
            per_part.push((po, pl));
        }
        pieces.push(per_part.into_iter());
    }
    let mut tasks: Vec<ForwardTask<'_, T>> = Vec::with_capacity(b * hkv * plan.parts);
    for bg in 0..b * hkv {
        let first = (bg / hkv) * hq + (bg % hkv) * n_rep;
        for part in plan.parts(bg / hkv) {
            let (outs, lses): (Vec<&mut [T]>, Vec<&mut [T]>) = (first..first + n_rep)
                .map(|bh| pieces[bh].next().expect("one piece per head and part"))
                .unzip();
            tasks.push((bg, part, outs, lses));
        }
    }
    let run = |sc: &mut ForwardScratch<T>, (bg, part, mut outs, mut lses): ForwardTask<'_, T>| {
        let blocks = &plan.blocks[bg / hkv][part.blocks.clone()];
        group_forward(c, bg, blocks, part.rows.start, &mut outs, &mut lses, sc)
    };
    if parallel {
        tasks
            .into_par_iter()
            .for_each_init(ForwardScratch::default, run);
    } else {
        let mut sc = ForwardScratch::default();
        tasks.into_iter().for_each(|task| run(&mut sc, task));
    }
    (out, lse)
}

/// A block of query rows `r0..r0 + rows` of the run that starts at `a`: the unit of work that
/// shares one pass over its keys.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Block {
    a: usize,
    r0: usize,
    rows: usize,
}

/// Consecutive query blocks of one head done by one task: `blocks` indexes the batch row's
/// block list, `rows` the query rows they cover (the parts of a head tile `0..t`).
#[derive(Clone, Debug, PartialEq)]
struct Part {
    blocks: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
}

/// How the per-group work is cut into tasks. A task per (batch, kv head) leaves threads idle
/// when there are few groups: SmolLM2's 3 kv heads at batch 1 keep 2 threads busy for 3 of 4
/// task lengths and use only 3 of 16 threads. So each group's blocks are split into `parts`
/// runs of about equal cost (a block's cost grows with its keys), `parts` the smallest count
/// that gives the threads equal shares of tasks.
struct Plan {
    /// Per batch row: its query blocks in row order.
    blocks: Vec<Vec<Block>>,
    /// Per batch row: `parts` consecutive ranges of its blocks.
    split: Vec<Vec<Part>>,
    parts: usize,
}

impl Plan {
    /// `heads`: the tasks before splitting (query heads forward, kv groups backward).
    fn new<T>(c: &Ctx<'_, T>, heads: usize, threads: usize) -> Self {
        let Dims { b, t, .. } = c.dims;
        let blocks: Vec<Vec<Block>> = (0..b)
            .map(|row| {
                let mut v = Vec::new();
                for &(a, e) in c.runs(row) {
                    for r0 in (a..e).step_by(BLOCK_ROWS) {
                        v.push(Block {
                            a,
                            r0,
                            rows: BLOCK_ROWS.min(e - r0),
                        });
                    }
                }
                v
            })
            .collect();
        let min_blocks = blocks.iter().map(Vec::len).min().unwrap_or(0);
        let parts = parts_per_head(heads, min_blocks, threads);
        let split = blocks
            .iter()
            .map(|bl| {
                let cost = |x: &Block| x.rows * (c.q_offset + x.r0 + x.rows - x.a);
                split_blocks(bl, parts, t, cost)
            })
            .collect();
        Self {
            blocks,
            split,
            parts,
        }
    }

    fn parts(&self, row: usize) -> &[Part] {
        &self.split[row]
    }
}

/// Parts per head for `heads` tasks (batch × kv heads) of at least `blocks` blocks each on
/// `threads` threads: the fewest (up to 8, and no more than the blocks) whose task count
/// splits evenly enough (at least 95% of the threads' time busy, with equal tasks).
fn parts_per_head(heads: usize, blocks: usize, threads: usize) -> usize {
    let busy = |tasks: usize| tasks as f64 / (threads * tasks.div_ceil(threads)) as f64;
    let max_parts = blocks.clamp(1, 8);
    if threads <= 1 || heads == 0 {
        return 1;
    }
    let mut best = 1;
    for p in 1..=max_parts {
        if busy(heads * p) >= 0.95 {
            return p;
        }
        if busy(heads * p) > busy(heads * best) + 1e-9 {
            best = p;
        }
    }
    best
}

/// Cuts `blocks` (in row order, covering rows `0..t`) into `parts` consecutive ranges of about
/// equal total `cost`; ranges may be empty. Their row ranges tile `0..t`.
fn split_blocks(
    blocks: &[Block],
    parts: usize,
    t: usize,
    cost: impl Fn(&Block) -> usize,
) -> Vec<Part> {
    let total: usize = blocks.iter().map(&cost).sum();
    let mut out = Vec::with_capacity(parts);
    let (mut first, mut done, mut row) = (0, 0usize, 0);
    for j in 0..parts {
        let mut last = first;
        if j + 1 == parts {
            last = blocks.len();
        } else {
            // Take blocks while the part's middle stays below its share's end.
            let share_end = total * (j + 1);
            while last < blocks.len() && (2 * done + cost(&blocks[last])) * parts < 2 * share_end {
                done += cost(&blocks[last]);
                last += 1;
            }
        }
        let end = if j + 1 == parts {
            t
        } else if last > first {
            blocks[last - 1].r0 + blocks[last - 1].rows
        } else {
            row
        };
        out.push(Part {
            blocks: first..last,
            rows: row..end,
        });
        (first, row) = (last, end);
    }
    out
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

/// Per-task buffers of the backward pass, reused from block to block.
struct BackwardScratch<T> {
    /// The block's rows of every query head of the group, stacked: q, dO and (after the
    /// products) dQ, `n_rep · rows × d` each; ⟨dO, O⟩ and lse per stacked row.
    q: Vec<T>,
    dout: Vec<T>,
    dq: Vec<T>,
    di: Vec<T>,
    lse: Vec<T>,
    /// P and dP / dS, `n_rep · rows × nk`.
    p: Vec<T>,
    ds: Vec<T>,
}

impl<T> Default for BackwardScratch<T> {
    fn default() -> Self {
        Self {
            q: Vec::new(),
            dout: Vec::new(),
            dq: Vec::new(),
            di: Vec::new(),
            lse: Vec::new(),
            p: Vec::new(),
            ds: Vec::new(),
        }
    }
}

/// Backward for one (batch, kv head) and one [`Part`] of its query blocks: writes dq of the
/// part's rows (`dqs[r]` for the group's query head `r`, starting at row `row0`) and adds the
/// part's contributions to the group's dk, dv (s × d each), which no other task writes.
///
/// The group's query heads see the same keys through the same causal mask, so a block's rows
/// of all of them are stacked (`n_rep · rows` rows) and go through each product once: k and v
/// are packed once per block instead of once per head, and dk, dv take one product with an
/// inner dimension of `n_rep · rows` instead of `n_rep` accumulations.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn group_backward_body<T: Float>(
    c: &Ctx<'_, T>,
    gr: &Grads<'_, T>,
    bg: usize,
    blocks: &[Block],
    row0: usize,
    dqs: &mut [&mut [T]],
    dk: &mut [T],
    dv: &mut [T],
    sc: &mut BackwardScratch<T>,
) {
    let Dims { t, d, hq, hkv, .. } = c.dims;
    let n_rep = hq / hkv;
    let (b, g) = (bg / hkv, bg % hkv);
    let heads: Vec<(usize, usize)> = (0..n_rep)
        .map(|r| (c.qr.head(b, g * n_rep + r), b * hq + g * n_rep + r))
        .collect();
    for &Block { a, r0, rows } in blocks {
        // Keys a.. only (see group_forward_body); dk/dv rows a.. receive this run's gradient.
        let k = &c.k[c.kr.head(b, g) + a * c.kr.rs..];
        let v = &c.v[c.vr.head(b, g) + a * c.vr.rs..];
        let nk = c.q_offset + r0 + rows - a;
        let m = n_rep * rows;
        for buf in [&mut sc.q, &mut sc.dout, &mut sc.dq] {
            buf.clear();
            buf.resize(m * d, T::ZERO);
        }
        sc.di.clear();
        sc.lse.clear();
        for (r, &(q_at, bh)) in heads.iter().enumerate() {
            for i in 0..rows {
                let row = r * rows + i;
                let qi = q_at + (r0 + i) * c.qr.rs;
                sc.q[row * d..(row + 1) * d].copy_from_slice(&c.q[qi..qi + d]);
                let oi = (bh * t + r0 + i) * d;
                let doi = &gr.dout[oi..oi + d];
                sc.dout[row * d..(row + 1) * d].copy_from_slice(doi);
                sc.di.push(kernels::dot(doi, &gr.o[oi..oi + d]));
                sc.lse.push(gr.lse[bh * t + r0 + i]);
            }
        }
        let (p, ds) = (&mut sc.p, &mut sc.ds);
        p.clear();
        p.resize(m * nk, T::ZERO);
        ds.clear();
        ds.resize(m * nk, T::ZERO);
        // P = exp(scale·Q Kᵀ − lse), zero above the diagonal.
        stacked_scores(c, &sc.q, k, nk, p);
        for (row, prow) in p.chunks_exact_mut(nk).enumerate() {
            let n_valid = c.q_offset + r0 + row % rows + 1 - a;
            let l = sc.lse[row];
            let (valid, masked) = prow.split_at_mut(n_valid);
            for x in valid.iter_mut() {
                *x = (*x - l).exp();
            }
            masked.fill(T::ZERO);
        }
        // dV += Pᵀ dO;  dP = dO Vᵀ
        block_gemm(
            (nk, d, m),
            &mut dv[a * d..],
            (d, 1),
            true,
            p,
            (1, nk),
            &sc.dout,
            (d, 1),
            T::ONE,
        );
        block_gemm(
            (m, nk, d),
            ds,
            (nk, 1),
            false,
            &sc.dout,
            (d, 1),
            v,
            (1, c.vr.rs),
            T::ONE,
        );
        // dS = P ∘ (dP − ⟨dO, O⟩) · scale  (the row sum of P ∘ dP equals ⟨dO_i, O_i⟩)
        for ((prow, dsrow), &di) in p.chunks_exact(nk).zip(ds.chunks_exact_mut(nk)).zip(&sc.di) {
            for (x, pv) in dsrow.iter_mut().zip(prow) {
                *x = *pv * (*x - di) * c.scale;
            }
        }
        // dQ = dS K;  dK += dSᵀ Q
        block_gemm(
            (m, d, nk),
            &mut sc.dq,
            (d, 1),
            false,
            ds,
            (nk, 1),
            k,
            (c.kr.rs, 1),
            T::ONE,
        );
        block_gemm(
            (nk, d, m),
            &mut dk[a * d..],
            (d, 1),
            true,
            ds,
            (1, nk),
            &sc.q,
            (d, 1),
            T::ONE,
        );
        for (r, dq) in dqs.iter_mut().enumerate() {
            let at = (r0 - row0) * d;
            dq[at..at + rows * d].copy_from_slice(&sc.dq[r * rows * d..(r + 1) * rows * d]);
        }
    }
}
multiversion!(fn group_backward<T>(c: &Ctx<'_, T>, gr: &Grads<'_, T>, bg: usize, blocks: &[Block], row0: usize, dqs: &mut [&mut [T]], dk: &mut [T], dv: &mut [T], sc: &mut BackwardScratch<T>) = group_backward_body;);

/// Returns (dq, dk, dv), contiguous in the shapes of q, k, v.
///
/// A task is one (batch, kv head) and one part of the query blocks: the group's query heads
/// all add into the same dk/dv, so a task per group needs no per-query-head copies of them and
/// no sum over the group afterwards; with more than one part, each part has its own dk/dv
/// slab and the parts are summed.
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
    let plan = Plan::new(c, b * hkv, rayon::current_num_threads());
    let parts = plan.parts;
    let mut dq = vec![T::ZERO; b * hq * t * d];
    let mut dk_p = vec![T::ZERO; b * hkv * parts * s * d];
    let mut dv_p = vec![T::ZERO; b * hkv * parts * s * d];
    // dq rows of every (query head, part), then gathered per (kv group, part).
    let mut pieces: Vec<Vec<&mut [T]>> = Vec::with_capacity(b * hq);
    for (bh, dq) in dq.chunks_exact_mut(t * d).enumerate() {
        let mut dq = dq;
        let mut per_part = Vec::with_capacity(parts);
        for part in plan.parts(bh / hq) {
            let (pq, rest) = std::mem::take(&mut dq).split_at_mut(part.rows.len() * d);
            dq = rest;
            per_part.push(pq);
        }
        pieces.push(per_part);
    }
    let mut pieces = pieces.into_iter().map(Vec::into_iter).collect::<Vec<_>>();
    let mut slabs = dk_p
        .chunks_exact_mut(s * d)
        .zip(dv_p.chunks_exact_mut(s * d));
    let mut tasks = Vec::with_capacity(b * hkv * parts);
    for bg in 0..b * hkv {
        let first = (bg / hkv) * hq + (bg % hkv) * n_rep;
        for part in plan.parts(bg / hkv) {
            let dqs: Vec<&mut [T]> = (first..first + n_rep)
                .map(|bh| pieces[bh].next().expect("one dq piece per head and part"))
                .collect();
            let (dk, dv) = slabs.next().expect("one slab per group and part");
            tasks.push((bg, part, dqs, dk, dv));
        }
    }
    tasks.into_par_iter().for_each_init(
        BackwardScratch::default,
        |scratch, (bg, part, mut dqs, dk, dv)| {
            let blocks = &plan.blocks[bg / hkv][part.blocks.clone()];
            group_backward(
                c,
                gr,
                bg,
                blocks,
                part.rows.start,
                &mut dqs,
                dk,
                dv,
                scratch,
            )
        },
    );
    if parts == 1 {
        return (dq, dk_p, dv_p);
    }
    // Sum the parts' slabs, in row chunks so every thread gets a share.
    let sum_parts = |slabs: &[T]| {
        let mut out = vec![T::ZERO; b * hkv * s * d];
        out.par_chunks_exact_mut(s * d)
            .enumerate()
            .for_each(|(bg, o)| {
                o.par_chunks_mut(64 * d).enumerate().for_each(|(i, o)| {
                    for j in 0..parts {
                        let at = (bg * parts + j) * s * d + i * 64 * d;
                        kernels::axpy(o, T::ONE, &slabs[at..at + o.len()]);
                    }
                })
            });
        out
    };
    let dk = sum_parts(&dk_p);
    drop(dk_p);
    let dv = sum_parts(&dv_p);
    (dq, dk, dv)
}

struct Attention {
    dims: Dims,
    scale: f64,
    q_offset: usize,
    /// Packed rows: runs of equal segment id per batch row (see [`segment_runs`]).
    runs: Option<Vec<Vec<(usize, usize)>>>,
    /// Whether a backward pass may follow (any input tracked); otherwise lse is not kept.
    keep_lse: bool,
    /// Per-row log-sum-exp `(b, hq, t)`, written by the forward pass for the backward pass.
    lse: Mutex<Option<CpuStorage>>,
}

impl Attention {
    fn ctx<'a, T: Float>(
        &'a self,
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
            runs: self.runs.as_deref(),
            whole: [(0, self.dims.t)],
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

    /// The per-head work split into parts (more tasks than heads when heads are few): rows
    /// tiled, blocks each in one part, and parts of about equal cost.
    #[test]
    fn split_blocks_tiles_rows_with_balanced_costs() {
        let plain: Vec<Block> = (0..1024)
            .step_by(BLOCK_ROWS)
            .map(|r0| Block { a: 0, r0, rows: 64 })
            .collect();
        let runs = [(0usize, 50usize), (50, 200), (200, 203), (203, 330)];
        let packed: Vec<Block> = runs
            .iter()
            .flat_map(|&(a, e)| {
                (a..e).step_by(BLOCK_ROWS).map(move |r0| Block {
                    a,
                    r0,
                    rows: BLOCK_ROWS.min(e - r0),
                })
            })
            .collect();
        for (blocks, t, q_offset) in [(&plain, 1024, 0), (&plain, 1024, 300), (&packed, 330, 0)] {
            let cost = |x: &Block| x.rows * (q_offset + x.r0 + x.rows - x.a);
            let total: usize = blocks.iter().map(cost).sum();
            let biggest = blocks.iter().map(cost).max().unwrap();
            for parts in 1..=8 {
                let split = split_blocks(blocks, parts, t, cost);
                assert_eq!(split.len(), parts);
                let (mut block, mut row) = (0, 0);
                for part in &split {
                    assert_eq!(
                        (part.blocks.start, part.rows.start),
                        (block, row),
                        "{split:?}"
                    );
                    for x in &blocks[part.blocks.clone()] {
                        assert!(part.rows.contains(&x.r0) && x.r0 + x.rows <= part.rows.end);
                    }
                    let c: usize = blocks[part.blocks.clone()].iter().map(cost).sum();
                    assert!(
                        c * parts <= total + parts * biggest,
                        "part cost {c} of {total} in {parts} parts: {split:?}"
                    );
                    (block, row) = (part.blocks.end, part.rows.end);
                }
                assert_eq!((block, row), (blocks.len(), t));
            }
        }
    }

    #[test]
    fn parts_per_head_fills_the_threads() {
        assert_eq!(parts_per_head(9, 16, 2), 2); // 9 tasks on 2 threads would idle 10%
        assert_eq!(parts_per_head(3, 16, 2), 2); // SmolLM2 at batch 1: 3 kv groups
        assert_eq!(parts_per_head(36, 4, 2), 1);
        assert_eq!(parts_per_head(9, 16, 16), 7); // 63 tasks on 16 threads
        assert_eq!(parts_per_head(9, 1, 2), 1); // one block: nothing to split
        assert_eq!(parts_per_head(9, 16, 1), 1);
        assert_eq!(parts_per_head(1, 3, 4), 3); // at most one part per block
    }

    /// Forward and gradients are right however the heads are split into tasks: the same
    /// inputs on pools of 1, 2, 3, 5 and 16 threads (1 to 5 parts per head), plain and packed,
    /// each against the composed reference; the forward is identical on every pool.
    #[test]
    fn every_split_of_the_heads_matches_the_reference() -> Result<()> {
        let [q, k, v] = qkv((1, 3, 1, 300, 20, 16), DType::F32, 7100)?;
        let ([sq, sk, sv], seg) =
            seg_inputs((1, 2, 1, 290, 8, &[&[150, 3, 137]]), DType::F32, 7200)?;
        let (scale, sscale) = (0.25, 1.0 / 8f64.sqrt());
        let first = causal_attention(&q, &k, &v, scale, 20)?;
        for threads in [1, 2, 3, 5, 16] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| -> Result<()> {
                let what = format!("{threads} threads");
                let y = causal_attention(&q, &k, &v, scale, 20)?;
                let d = (y - &first)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(d, 0.0, "{what}: forward differs from 1 thread's");
                compare_grads(
                    |x| causal_attention(&x[0], &x[1], &x[2], scale, 20),
                    |x| causal_attention_reference(&x[0], &x[1], &x[2], scale, 20),
                    &[q.clone(), k.clone(), v.clone()],
                    1e-5,
                    &what,
                )?;
                compare_grads(
                    |x| causal_attention_segments(&x[0], &x[1], &x[2], sscale, &seg),
                    |x| causal_attention_segments_reference(&x[0], &x[1], &x[2], sscale, &seg),
                    &[sq.clone(), sk.clone(), sv.clone()],
                    1e-5,
                    &format!("segments, {what}"),
                )
            })?;
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

    /// Segment ids `(b, t)` for rows of example lengths: 1, 2, ... per example, 0 after them.
    fn segments(rows: &[&[usize]], t: usize) -> Result<Tensor> {
        let mut ids = vec![0u32; rows.len() * t];
        for (r, lens) in rows.iter().enumerate() {
            let mut at = r * t;
            for (s, &n) in lens.iter().enumerate() {
                ids[at..at + n].fill(s as u32 + 1);
                at += n;
            }
            assert!(at <= (r + 1) * t, "row {r} is longer than {t}");
        }
        Tensor::from_vec(ids, (rows.len(), t), &candle_core::Device::Cpu)
    }

    /// (b, hq, hkv, t, d, example lengths per row): one segment, several, padding, segments
    /// across and inside 64-row blocks, a run ending exactly on a block edge, t below the
    /// decode threshold, single-token segments.
    type SegCase = (
        usize,
        usize,
        usize,
        usize,
        usize,
        &'static [&'static [usize]],
    );
    const SEG_CASES: &[SegCase] = &[
        (1, 2, 1, 3, 4, &[&[1, 2]]),
        (2, 4, 2, 9, 8, &[&[4, 3], &[2, 2, 2, 1, 1]]),
        (2, 3, 3, 7, 5, &[&[7], &[3]]),
        (1, 6, 2, 150, 16, &[&[50, 30, 64, 3]]),
        (2, 9, 3, 140, 12, &[&[64, 64, 12], &[1, 70, 60]]),
    ];

    fn seg_inputs(case: SegCase, dt: DType, seed: u64) -> Result<([Tensor; 3], Tensor)> {
        let (b, hq, hkv, t, d, rows) = case;
        assert_eq!(rows.len(), b);
        let [q, k, v] = qkv((b, hq, hkv, t, 0, d), dt, seed)?;
        Ok(([q, k, v], segments(rows, t)?))
    }

    #[test]
    fn segments_forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &case) in SEG_CASES.iter().enumerate() {
                let ([q, k, v], seg) = seg_inputs(case, dt, 4000 + 10 * i as u64)?;
                let scale = 2.0 / (case.4 as f64).sqrt();
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-13 };
                let got = causal_attention_segments(&q, &k, &v, scale, &seg)?;
                let want = causal_attention_segments_reference(&q, &k, &v, scale, &seg)?;
                let finite = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                assert!(finite.iter().all(|x| x.is_finite()), "{case:?}: not finite");
                assert_close(&got, &want, tol, &format!("segments {dt:?} {case:?}"))?;
            }
        }
        Ok(())
    }

    /// With a single segment per row (no padding) the mask is plain causal: both the kernel and
    /// the reference must agree with the unpacked function.
    #[test]
    fn one_segment_per_row_equals_plain_causal_attention() -> Result<()> {
        let [q, k, v] = qkv((2, 4, 2, 70, 0, 8), DType::F64, 31)?;
        let seg = Tensor::ones((2, 70), DType::U32, &candle_core::Device::Cpu)?;
        let want = causal_attention_reference(&q, &k, &v, 0.4, 0)?;
        for got in [
            causal_attention_segments(&q, &k, &v, 0.4, &seg)?,
            causal_attention_segments_reference(&q, &k, &v, 0.4, &seg)?,
        ] {
            assert_close(&got, &want, 1e-13, "single segment")?;
        }
        Ok(())
    }

    #[test]
    fn segments_backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &case) in SEG_CASES.iter().enumerate() {
                let ([q, k, v], seg) = seg_inputs(case, dt, 5000 + 10 * i as u64)?;
                let scale = 1.0 / (case.4 as f64).sqrt();
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-12 };
                compare_grads(
                    |x| causal_attention_segments(&x[0], &x[1], &x[2], scale, &seg),
                    |x| causal_attention_segments_reference(&x[0], &x[1], &x[2], scale, &seg),
                    &[q, k, v],
                    tol,
                    &format!("segments {dt:?} {case:?}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn segments_backward_matches_finite_differences() -> Result<()> {
        let case: SegCase = (2, 4, 2, 6, 3, &[&[2, 3], &[1, 4, 1]]);
        let ([q, k, v], seg) = seg_inputs(case, DType::F64, 6000)?;
        check_gradients(
            |x| causal_attention_segments(&x[0], &x[1], &x[2], 0.7, &seg),
            &[q, k, v],
            1e-6,
            1e-7,
        )
    }

    /// A packed row (two examples and padding) gives each example exactly what attention over
    /// that example alone gives, forward and backward; padding gets no gradient from a loss
    /// that ignores it.
    #[test]
    fn packed_row_equals_examples_run_separately() -> Result<()> {
        let (hq, hkv, d, t) = (4, 2, 8, 100);
        let lens = [67usize, 29];
        let dev = candle_core::Device::Cpu;
        let [q, k, v] = qkv((1, hq, hkv, t, 0, d), DType::F64, 7000)?;
        let seg = segments(&[&lens], t)?;
        // A loss over the examples' outputs only, with fixed random weights.
        let w = rand_tensor(&[1, hq, t, d], DType::F64, 7001)?;
        let used = lens.iter().sum::<usize>();
        let keep = Tensor::from_vec(
            (0..t).map(|i| (i < used) as u8 as f64).collect::<Vec<_>>(),
            (1, 1, t, 1),
            &dev,
        )?;
        let w = w.broadcast_mul(&keep)?;
        let (qv, kv, vv) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        let packed =
            causal_attention_segments(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), 0.35, &seg)?;
        let g = (&packed * &w)?.sum_all()?.backward()?;
        let grad = |x: &Var| g.get(x.as_tensor()).unwrap().clone();
        let (gq, gk, gv) = (grad(&qv), grad(&kv), grad(&vv));
        let mut at = 0;
        for &n in &lens {
            let part = |x: &Tensor| x.narrow(2, at, n);
            let (qe, ke, ve) = (
                Var::from_tensor(&part(&q)?)?,
                Var::from_tensor(&part(&k)?)?,
                Var::from_tensor(&part(&v)?)?,
            );
            let alone = causal_attention(qe.as_tensor(), ke.as_tensor(), ve.as_tensor(), 0.35, 0)?;
            let what = format!("example at {at}");
            assert_close(&part(&packed)?, &alone, 1e-13, &what)?;
            let ge = (&alone * part(&w)?)?.sum_all()?.backward()?;
            for (x, gx) in [(&qe, &gq), (&ke, &gk), (&ve, &gv)] {
                assert_close(&part(gx)?, ge.get(x.as_tensor()).unwrap(), 1e-12, &what)?;
            }
            at += n;
        }
        for gx in [&gq, &gk, &gv] {
            let pad = gx
                .narrow(2, used, t - used)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert_eq!(pad, 0.0, "padding got a gradient");
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_segments() -> Result<()> {
        let [q, k, v] = qkv((1, 2, 1, 4, 0, 8), DType::F32, 8)?;
        let dev = candle_core::Device::Cpu;
        let split = Tensor::new(&[[1u32, 2, 1, 0]], &dev)?;
        for f in [
            causal_attention_segments,
            causal_attention_segments_reference,
        ] {
            let err = f(&q, &k, &v, 1.0, &split).unwrap_err().to_string();
            assert!(err.contains("segment id 1 is not contiguous"), "{err}");
            let short = Tensor::new(&[[1u32, 1, 1]], &dev)?;
            let err = f(&q, &k, &v, 1.0, &short).unwrap_err().to_string();
            assert!(err.contains("segments have shape [1, 3]"), "{err}");
            let float = Tensor::ones((1, 4), DType::F32, &dev)?;
            let err = f(&q, &k, &v, 1.0, &float).unwrap_err().to_string();
            assert!(err.contains("integer"), "{err}");
        }
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
