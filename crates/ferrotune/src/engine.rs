//! An inference-only decoder for CPU: the same LLaMA model as [`crate::model::Llama`], run on
//! plain f32 buffers with preallocated scratch space and KV cache, so a decode step makes no
//! allocations and no tensor-graph bookkeeping — only the quantized matrix-vector kernels and
//! a few short loops. It reads the weights of a loaded `Llama` (no copy of the big matrices)
//! and is checked against it in tests. Prefill runs batched through the same kernels.
//!
//! Used by `generate` when every linear layer is quantized or dense f32 on the CPU and no
//! adapter is attached; anything else decodes through the differentiable model.
use crate::generate::Decoder;
use crate::model::{Llama, Model};
use crate::nn::{EmbeddingWeight, Linear, LinearWeight};
use crate::quant::QuantWeight;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

enum Mat {
    Quant(Arc<QuantWeight>),
    /// Dense f32 (out, in), row-major.
    Dense(Vec<f32>, usize, usize),
}

impl Mat {
    fn from_linear(l: &Linear) -> Option<Self> {
        match l.weight() {
            LinearWeight::Quantized(q) => Some(Mat::Quant(q.clone())),
            LinearWeight::Frozen(w) if w.device().is_cpu() => {
                let (o, i) = w.dims2().ok()?;
                let v = w
                    .to_dtype(DType::F32)
                    .ok()?
                    .flatten_all()
                    .ok()?
                    .to_vec1::<f32>()
                    .ok()?;
                Some(Mat::Dense(v, o, i))
            }
            _ => None,
        }
    }

    /// (out, in).
    fn shape(&self) -> (usize, usize) {
        match self {
            Mat::Quant(q) => q.shape(),
            Mat::Dense(_, o, i) => (*o, *i),
        }
    }

    /// out = W x for one row.
    fn matvec(&self, x: &[f32], out: &mut [f32]) {
        match self {
            Mat::Quant(q) => q.matvec_into(x, out),
            Mat::Dense(w, _, i) => {
                // Rows in blocks across the cores: a decode step reads every weight once, and
                // one core alone cannot pull f32 weights as fast as memory delivers them.
                const BLOCK: usize = 256;
                let work = |(oc, wc): (&mut [f32], &[f32])| {
                    for (o, row) in oc.iter_mut().zip(wc.chunks_exact(*i)) {
                        *o = dot(row, x);
                    }
                };
                if out.len() * *i >= 1 << 20 {
                    use rayon::prelude::*;
                    out.par_chunks_mut(BLOCK)
                        .zip(w.par_chunks(BLOCK * *i))
                        .for_each(work);
                } else {
                    out.chunks_mut(BLOCK)
                        .zip(w.chunks(BLOCK * *i))
                        .for_each(work);
                }
            }
        }
    }

    /// out (m, out) = x (m, in) W^T.
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Mat::Quant(q) => {
                let k = q.shape().1;
                let y = q.forward(&Tensor::from_slice(x, (m, k), &Device::Cpu)?)?;
                out.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
            }
            Mat::Dense(w, o, i) => dense_matmul(x, m, w, *o, *i, out)?,
        }
        Ok(())
    }
}

/// out (m, o) = x (m, i) W^T for a dense row-major W (o, i), through gemm on every core (a
/// prompt of many tokens is a matrix product, not m matrix-vector products).
fn dense_matmul(x: &[f32], m: usize, w: &[f32], o: usize, i: usize, out: &mut [f32]) -> Result<()> {
    let fits = |len: usize, a: usize, b: usize| a.checked_mul(b) == Some(len);
    if !(fits(x.len(), m, i) && fits(w.len(), o, i) && fits(out.len(), m, o)) {
        return Err(crate::Error::msg(format!(
            "dense matmul: shapes disagree (x {} for {m}x{i}, w {} for {o}x{i}, out {})",
            x.len(),
            w.len(),
            out.len()
        )));
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three slices hold exactly m*i, o*i and m*o elements (checked above), which
    // is every element gemm reads or writes with these strides; `out` is a distinct &mut.
    unsafe {
        gemm::gemm(
            m,
            o,
            i,
            out.as_mut_ptr(),
            1,
            o as isize,
            false,
            x.as_ptr(),
            1,
            i as isize,
            w.as_ptr(),
            i as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
    Ok(())
}

struct Lin {
    w: Mat,
    bias: Option<Vec<f32>>,
}

impl Lin {
    fn new(l: &Linear) -> Option<Self> {
        if l.has_active_adapters() {
            return None;
        }
        let bias = match l.bias() {
            Some(b) => Some(b.to_dtype(DType::F32).ok()?.to_vec1::<f32>().ok()?),
            None => None,
        };
        Some(Self {
            w: Mat::from_linear(l)?,
            bias,
        })
    }
    /// Whether this is an (out, in) matrix with a bias of `out` values, if any.
    fn has_shape(&self, out: usize, inp: usize) -> bool {
        self.w.shape() == (out, inp) && self.bias.as_ref().is_none_or(|b| b.len() == out)
    }
    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            let n = b.len();
            for row in out.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
    }
    fn matvec(&self, x: &[f32], out: &mut [f32]) {
        self.w.matvec(x, out);
        self.add_bias(out);
    }
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.w.matmul(x, m, out)?;
        self.add_bias(out);
        Ok(())
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    gate: Lin,
    up: Lin,
    down: Lin,
    /// Keys and values, [kv_head][position][head_dim], capacity `cap` positions.
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

pub struct FastDecoder {
    layers: Vec<Layer>,
    embed: EmbeddingWeight,
    norm: Vec<f32>,
    lm_head: Lin,
    cos: Vec<f32>,
    sin: Vec<f32>,
    eps: f32,
    hidden: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    inter: usize,
    vocab: usize,
    ctx: usize,
    /// Positions the caches can hold before growing.
    cap: usize,
    pos: usize,
    /// Activation buffers kept between calls: freshly allocated ones of this size cost a page
    /// fault per 4 KiB on first touch, every call.
    scratch: Scratch,
}

#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
}

fn vec_f32(t: &Tensor) -> Option<Vec<f32>> {
    t.to_dtype(DType::F32)
        .ok()?
        .flatten_all()
        .ok()?
        .to_vec1::<f32>()
        .ok()
}

impl FastDecoder {
    /// None when the model cannot run here (not a LLaMA-family model, not on CPU, adapters
    /// attached, unsupported weights).
    pub fn new(model: &dyn Model) -> Option<Self> {
        let model: &Llama = model.downcast_ref::<Llama>()?;
        // The engine has no soft prompt (virtual tokens, key/value prefixes).
        if !model.device().is_cpu() || Model::virtual_prompt(model).is_some() {
            return None;
        }
        let cfg = &model.cfg;
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let a = &l.self_attn;
            let m = &l.mlp;
            layers.push(Layer {
                attn_norm: vec_f32(l.input_layernorm.weight())?,
                ffn_norm: vec_f32(l.post_attention_layernorm.weight())?,
                q: Lin::new(&a.q_proj)?,
                k: Lin::new(&a.k_proj)?,
                v: Lin::new(&a.v_proj)?,
                o: Lin::new(&a.o_proj)?,
                gate: Lin::new(&m.gate_proj)?,
                up: Lin::new(&m.up_proj)?,
                down: Lin::new(&m.down_proj)?,
                k_cache: Vec::new(),
                v_cache: Vec::new(),
            });
        }
        if matches!(model.embed_tokens.weight(), EmbeddingWeight::Trainable(_)) {
            return None;
        }
        let decoder = Self {
            layers,
            embed: model.embed_tokens.weight().clone(),
            norm: vec_f32(model.norm.weight())?,
            lm_head: Lin::new(&model.lm_head)?,
            cos: vec_f32(&model.cos)?,
            sin: vec_f32(&model.sin)?,
            eps: cfg.rms_norm_eps as f32,
            hidden: cfg.hidden_size,
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            ctx: cfg.max_position_embeddings,
            cap: 0,
            pos: 0,
            scratch: Scratch::default(),
        };
        decoder.shapes_fit().then_some(decoder)
    }

    /// Every buffer below is sized from the config and sliced without bounds checks of its own:
    /// each weight must have the shape the config implies. `Llama::load` guarantees it for a
    /// loaded model; anything else decodes through the differentiable model, which reports a
    /// mismatch as an error.
    fn shapes_fit(&self) -> bool {
        let (h, hd, nh, nkv) = (self.hidden, self.head_dim, self.n_heads, self.n_kv);
        let (q_rows, kv_rows) = match (nh.checked_mul(hd), nkv.checked_mul(hd)) {
            (Some(q), Some(kv)) => (q, kv),
            _ => return false,
        };
        let embed_shape = match &self.embed {
            EmbeddingWeight::Quantized(q) => q.shape(),
            EmbeddingWeight::Frozen(w) => w.dims2().unwrap_or((0, 0)),
            EmbeddingWeight::Trainable(_) => return false,
        };
        let tables = self.ctx.checked_mul(hd / 2);
        hd.is_multiple_of(2)
            && nkv > 0
            && nh.is_multiple_of(nkv)
            && embed_shape == (self.vocab, h)
            && self.norm.len() == h
            && self.lm_head.has_shape(self.vocab, h)
            && tables.is_some_and(|n| self.cos.len() >= n && self.sin.len() >= n)
            && self.layers.iter().all(|l| {
                l.attn_norm.len() == h
                    && l.ffn_norm.len() == h
                    && l.q.has_shape(q_rows, h)
                    && l.k.has_shape(kv_rows, h)
                    && l.v.has_shape(kv_rows, h)
                    && l.o.has_shape(h, q_rows)
                    && l.gate.has_shape(self.inter, h)
                    && l.up.has_shape(self.inter, h)
                    && l.down.has_shape(h, self.inter)
            })
    }

    /// Make room for `n` positions in every layer's cache (grows by doubling, copying heads).
    fn reserve(&mut self, n: usize) {
        if n <= self.cap {
            return;
        }
        let new_cap = n.max(self.cap * 2).max(256).min(self.ctx.max(n));
        let (hd, old) = (self.head_dim, self.cap);
        for l in &mut self.layers {
            for cache in [&mut l.k_cache, &mut l.v_cache] {
                let mut grown = vec![0f32; self.n_kv * new_cap * hd];
                for h in 0..self.n_kv {
                    let used = self.pos.min(old) * hd;
                    grown[h * new_cap * hd..h * new_cap * hd + used]
                        .copy_from_slice(&cache[h * old * hd..h * old * hd + used]);
                }
                *cache = grown;
            }
        }
        self.cap = new_cap;
    }

    fn embed_rows(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let t = match &self.embed {
            EmbeddingWeight::Quantized(q) => q.embedding(ids)?,
            EmbeddingWeight::Frozen(w) => w
                .index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?
                .to_dtype(DType::F32)?,
            EmbeddingWeight::Trainable(_) => unreachable!("rejected in new()"),
        };
        let rows = t.flatten_all()?.to_vec1::<f32>()?;
        if rows.len() != out.len() {
            return Err(crate::Error::msg(format!(
                "embedding rows hold {} values, expected {} ({} ids x hidden {})",
                rows.len(),
                out.len(),
                ids.len(),
                self.hidden
            )));
        }
        out.copy_from_slice(&rows);
        Ok(())
    }

    /// Run `ids` (new positions after the cached ones); return the last position's logits.
    fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.forward_rows(ids, ids.len().saturating_sub(1))
    }

    /// Positions in the cache.
    pub fn cached(&self) -> usize {
        self.pos
    }

    /// Scoring with a shared prefix: keep the first `keep` cached positions (drop the rest),
    /// run `ids` after them, and return the logits of `ids[from..]` ((len - from) x vocab,
    /// row-major; none when `from == ids.len()`, which only fills the cache). The cache then
    /// holds `keep + ids.len()` positions.
    pub fn extend(&mut self, keep: usize, ids: &[u32], from: usize) -> Result<Vec<f32>> {
        if ids.is_empty() || from > ids.len() {
            return Err(crate::Error::msg(format!(
                "engine: no positions to run ({} tokens, logits from {from})",
                ids.len()
            )));
        }
        self.pos = keep.min(self.pos);
        self.forward_batch(&[(ids, from)], true)
    }

    /// Several sequences at once, each after the first `keep` cached positions (a shared
    /// prefix, e.g. few-shot examples): one pass of every weight for all their tokens, each
    /// attending to the prefix and to its own earlier tokens only. Returns the logits of each
    /// `ids[from..]`, one sequence after the other. The cache keeps only the `keep` prefix.
    pub fn score_batch(&mut self, keep: usize, seqs: &[(&[u32], usize)]) -> Result<Vec<f32>> {
        if let Some((ids, from)) = seqs
            .iter()
            .find(|(ids, from)| ids.is_empty() || *from > ids.len())
        {
            return Err(crate::Error::msg(format!(
                "engine: no positions to run ({} tokens, logits from {from})",
                ids.len()
            )));
        }
        self.pos = keep.min(self.pos);
        self.forward_batch(seqs, seqs.len() == 1)
    }

    /// The vocabulary size (the length of one row of logits).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn forward_rows(&mut self, ids: &[u32], from: usize) -> Result<Vec<f32>> {
        if ids.is_empty() || from >= ids.len() {
            return Err(crate::Error::msg("engine: empty forward"));
        }
        self.forward_batch(&[(ids, from)], true)
    }

    /// The forward pass of `seqs` placed after the `pos` cached positions. Sequence `s` writes
    /// its keys and values at cache positions `pos + off_s ..` (`off_s`: the tokens of the
    /// sequences before it) and takes RoPE positions `pos ..`; `advance` (one sequence only)
    /// keeps it in the cache.
    fn forward_batch(&mut self, seqs: &[(&[u32], usize)], advance: bool) -> Result<Vec<f32>> {
        let base = self.pos;
        let t: usize = seqs.iter().map(|(ids, _)| ids.len()).sum();
        if t == 0 {
            return Err(crate::Error::msg("engine: empty forward"));
        }
        if let Some(longest) = seqs.iter().map(|(ids, _)| ids.len()).max() {
            if base + longest > self.ctx {
                return Err(crate::Error::ContextOverflow {
                    tokens: base + longest,
                    context: self.ctx,
                    hint: String::new(),
                });
            }
        }
        // Each row: (cache offset of its sequence's first token, its index in the sequence).
        let mut row_seq: Vec<(usize, usize)> = Vec::with_capacity(t);
        let mut ids_all: Vec<u32> = Vec::with_capacity(t);
        let mut scored: Vec<usize> = Vec::new();
        for (ids, from) in seqs {
            let off = row_seq.len();
            for i in 0..ids.len() {
                if i >= *from {
                    scored.push(off + i);
                }
                row_seq.push((off, i));
            }
            ids_all.extend_from_slice(ids);
        }
        self.reserve(base + t);
        let (h, hd, nh, nkv, inter) = (
            self.hidden,
            self.head_dim,
            self.n_heads,
            self.n_kv,
            self.inter,
        );
        // Every buffer is overwritten before it is read: resizing only sets the length.
        let mut sc = std::mem::take(&mut self.scratch);
        let sized = |b: &mut Vec<f32>, n: usize| -> Vec<f32> {
            let mut b = std::mem::take(b);
            b.resize(n, 0.0);
            b
        };
        let mut x = sized(&mut sc.x, t * h);
        self.embed_rows(&ids_all, &mut x)?;
        let mut xn = sized(&mut sc.xn, t * h);
        let mut q = sized(&mut sc.q, t * nh * hd);
        let mut k = sized(&mut sc.k, t * nkv * hd);
        let mut v = sized(&mut sc.v, t * nkv * hd);
        let mut att = sized(&mut sc.att, t * nh * hd);
        let mut o = sized(&mut sc.o, t * h);
        let mut g = sized(&mut sc.g, t * inter);
        let mut u = sized(&mut sc.u, t * inter);
        let cap = self.cap;
        for li in 0..self.layers.len() {
            let layer = &self.layers[li];
            rms_norm_rows(&x, &layer.attn_norm, self.eps, &mut xn);
            if t == 1 {
                layer.q.matvec(&xn, &mut q);
                layer.k.matvec(&xn, &mut k);
                layer.v.matvec(&xn, &mut v);
            } else {
                layer.q.matmul(&xn, t, &mut q)?;
                layer.k.matmul(&xn, t, &mut k)?;
                layer.v.matmul(&xn, t, &mut v)?;
            }
            for (r, &(_, i)) in row_seq.iter().enumerate() {
                let p = base + i;
                let (cos, sin) = (
                    &self.cos[p * hd / 2..(p + 1) * hd / 2],
                    &self.sin[p * hd / 2..(p + 1) * hd / 2],
                );
                for hq in q[r * nh * hd..(r + 1) * nh * hd].chunks_exact_mut(hd) {
                    rope(hq, cos, sin);
                }
                for hk in k[r * nkv * hd..(r + 1) * nkv * hd].chunks_exact_mut(hd) {
                    rope(hk, cos, sin);
                }
            }
            let layer = &mut self.layers[li];
            for r in 0..t {
                let p = base + r;
                for kh in 0..nkv {
                    let dst = (kh * cap + p) * hd;
                    let src = (r * nkv + kh) * hd;
                    layer.k_cache[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                    layer.v_cache[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
            let layer = &self.layers[li];
            let shape = AttnShape {
                base,
                cap,
                hd,
                nh,
                group: nh / nkv,
            };
            let attend_row = |r: usize, out: &mut [f32], scores: &mut Vec<f32>| {
                let (off, i) = row_seq[r];
                attend(
                    &shape,
                    &q[r * nh * hd..(r + 1) * nh * hd],
                    &layer.k_cache,
                    &layer.v_cache,
                    off,
                    i,
                    out,
                    scores,
                );
            };
            if t >= 4 {
                use rayon::prelude::*;
                att.par_chunks_mut(nh * hd)
                    .enumerate()
                    .for_each_init(Vec::new, |scores, (r, out)| attend_row(r, out, scores));
            } else {
                let mut scores = Vec::new();
                for (r, out) in att.chunks_exact_mut(nh * hd).enumerate() {
                    attend_row(r, out, &mut scores);
                }
            }
            if t == 1 {
                layer.o.matvec(&att, &mut o);
            } else {
                layer.o.matmul(&att, t, &mut o)?;
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            rms_norm_rows(&x, &layer.ffn_norm, self.eps, &mut xn);
            if t == 1 {
                layer.gate.matvec(&xn, &mut g);
                layer.up.matvec(&xn, &mut u);
            } else {
                layer.gate.matmul(&xn, t, &mut g)?;
                layer.up.matmul(&xn, t, &mut u)?;
            }
            let swiglu = |g: &mut [f32], u: &[f32]| {
                for (gi, ui) in g.iter_mut().zip(u) {
                    *gi = *gi / (1.0 + (-*gi).exp()) * ui;
                }
            };
            swiglu(&mut g, &u);
            if t == 1 {
                layer.down.matvec(&g, &mut o);
            } else {
                layer.down.matmul(&g, t, &mut o)?;
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        if advance && seqs.len() == 1 {
            self.pos += t;
        }
        let rows = scored.len();
        let mut last = vec![0f32; rows * h];
        for (dst, &r) in last.chunks_exact_mut(h).zip(&scored) {
            dst.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        self.scratch = Scratch {
            x,
            xn,
            q,
            k,
            v,
            att,
            o,
            g,
            u,
        };
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut ln = vec![0f32; rows * h];
        rms_norm_rows(&last, &self.norm, self.eps, &mut ln);
        let mut logits = vec![0f32; rows * self.vocab];
        if rows == 1 {
            self.lm_head.matvec(&ln, &mut logits);
        } else {
            self.lm_head.matmul(&ln, rows, &mut logits)?;
        }
        Ok(logits)
    }
}

/// What one attention row needs to know about the cache layout.
struct AttnShape {
    /// Cached prefix positions every row attends to.
    base: usize,
    /// Positions per kv head in the cache.
    cap: usize,
    hd: usize,
    nh: usize,
    /// Query heads per kv head.
    group: usize,
}

/// Causal attention of one row (all its query heads) at index `i` of a sequence whose keys
/// start at cache position `base + off`: keys `[0, base)` and `[base + off, base + off + i]`.
#[allow(clippy::too_many_arguments)]
fn attend(
    s: &AttnShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    off: usize,
    i: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let hd = s.hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_keys = s.base + i + 1;
    scores.resize(n_keys, 0.0);
    // Key j of this row sits at cache position j (prefix) or j + off (its own tokens).
    let key_pos = |j: usize| if j < s.base { j } else { j + off };
    for head in 0..s.nh {
        let kh = head / s.group;
        let qv = &q[head * hd..(head + 1) * hd];
        let kc = &k_cache[kh * s.cap * hd..];
        let vc = &v_cache[kh * s.cap * hd..];
        let mut max = f32::NEG_INFINITY;
        for (j, sj) in scores.iter_mut().enumerate() {
            let p = key_pos(j);
            *sj = dot(qv, &kc[p * hd..(p + 1) * hd]) * scale;
            max = max.max(*sj);
        }
        let mut sum = 0f32;
        for sj in scores.iter_mut() {
            *sj = (*sj - max).exp();
            sum += *sj;
        }
        let o = &mut out[head * hd..(head + 1) * hd];
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, &w) in scores.iter().enumerate() {
            let p = key_pos(j);
            axpy(w / sum, &vc[p * hd..(p + 1) * hd], o);
        }
    }
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = dot(xr, xr) / n as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &xi), &wi) in or.iter_mut().zip(xr).zip(w) {
            *o = xi * r * wi;
        }
    }
}

/// HF rotate-half RoPE on one head.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Dot product with 8 independent accumulators so the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

impl Decoder for FastDecoder {
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.pos = 0;
        self.forward(ids)
    }
    fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        self.forward(&[id])
    }
    fn context_length(&self) -> usize {
        self.ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{config_from_hf_dir, LoadOptions, SafetensorsSource};

    fn tiny() -> Llama {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-llama-gqa-untied");
        let cfg = config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        Llama::load(&src, &cfg).unwrap()
    }

    /// The engine slices buffers sized from the config; a config that disagrees with the weights
    /// (possible only for a model not built by `Llama::load`) must not reach those slices.
    #[test]
    fn engine_refuses_a_config_that_disagrees_with_the_weights() {
        assert!(FastDecoder::new(&tiny()).is_some());
        let edits: [fn(&mut crate::model::LlamaConfig); 5] = [
            |c| c.hidden_size += 1,
            |c| c.intermediate_size -= 1,
            |c| c.vocab_size += 1,
            |c| c.num_attention_heads *= 2,
            |c| c.max_position_embeddings *= 2,
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut m = tiny();
            edit(&mut m.cfg);
            assert!(FastDecoder::new(&m).is_none(), "edit {i} was accepted");
        }
    }
}
