//! An inference-only decoder for CPU: the same LLaMA model as [`crate::model::Llama`], run on
//! plain f32 buffers with preallocated scratch space and KV cache, so a decode step makes no
//! allocations and no tensor-graph bookkeeping — only the quantized matrix-vector kernels and
//! a few short loops. It reads the weights of a loaded `Llama` (no copy of the big matrices)
//! and is checked against it in tests. Prefill runs batched through the same kernels.
//!
//! Plain LoRA adapters run here too (`scale * B (A x)` added to the adapted projections, per
//! row): [`FastDecoder`] applies every active LoRA adapter attached to the model (what
//! `generate --adapter` attaches), and the serving backend ([`crate::serve::fast`]) picks one
//! adapter per sequence, so one batched step serves several adapters.
//!
//! Arithmetic that must not depend on batching. The serving backend runs many sequences
//! through [`Weights::forward`], and a sequence's greedy output must be the same whatever
//! shares its steps and however its prompt is chunked, and the same as `generate`'s (which
//! runs [`FastDecoder`] over the same function). So each row's result is computed the same way
//! whatever the other rows:
//! - decode steps ([`Kernel::Decode`]) use the decode arithmetic for every row
//!   ([`QuantWeight::decode_rows_into`]: one pass over each weight for all rows; GGML
//!   Q4_0/Q4_1/Q8_0 on decode panels, whose block-exact arithmetic gives every row the same bits
//!   whatever the batch, see `quant/panel.rs`); q, k and v (and gate and up) share one pass
//!   ([`QuantWeight::decode_rows_many`]), bit-identical to three;
//! - prompt chunks ([`Kernel::Prefill`]) use the batched kernels' arithmetic even for a chunk
//!   of one token (GGML Q4_0/Q4_1/Q8_0: the packed-panel kernels, whose rows do not depend on
//!   the row count; dense and other formats: the matrix-vector arithmetic), so a prompt fed in
//!   chunks of any size leaves the same cache and gives the same logits as one feed; on
//!   AVX2 and AVX-512 they run the decode arithmetic instead (`prefill_on_panels`: faster
//!   for the short chunks a server sees), which has the same property;
//! - norms, RoPE, attention (over the row's own cache), SwiGLU and LoRA run per row.
//!
//! Scoring ([`FastDecoder::extend`], [`FastDecoder::score_batch`]) keeps the fastest kernels
//! ([`Kernel::Score`]): it needs logits to within rounding, not bit-identity across batches.
//!
//! Used by `generate` when every linear layer is quantized or dense f32 on the CPU and every
//! adapter is a plain LoRA; anything else decodes through the differentiable model.
use crate::generate::Decoder;
use crate::model::{Llama, Model};
use crate::nn::{EmbeddingWeight, Linear, LinearWeight};
use crate::quant::{Isa, QuantWeight};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

mod attend;
pub(crate) use attend::KvCache;
pub use attend::KvDtype;
use attend::{attend, AttnScratch, AttnShape};

enum Mat {
    Quant(Arc<QuantWeight>),
    /// Dense f32 (out, in), row-major.
    Dense(Vec<f32>, usize, usize),
}

/// How a forward pass multiplies activation rows by a weight (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The fastest: one row by the matrix-vector kernel, several by the batched kernels.
    Score,
    /// Prompt chunks: the batched kernels' per-row arithmetic whatever the row count.
    Prefill,
    /// Decode steps: the matrix-vector kernel's per-row arithmetic whatever the row count.
    Decode,
}

/// Dense rows per parallel block of [`Mat::rows`]: a decode step reads every weight once, and
/// one core alone cannot pull f32 weights as fast as memory delivers them.
const DENSE_BLOCK: usize = 256;

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

    /// out (m, out) = x (m, in) W^T, each row exactly as the single-row matrix-vector product
    /// computes it, each weight read once for all rows.
    fn rows(&self, x: &[f32], m: usize, out: &mut [f32]) {
        match self {
            Mat::Quant(q) => q.decode_rows_into(x, m, out),
            Mat::Dense(w, o, i) => {
                let (o, i) = (*o, *i);
                // Blocks of weight rows; within a block, every activation row against the block
                // (still in cache). Each output is `dot(weight row, x row)`, as for one row.
                let work = |b: usize, wc: &[f32], outp: &SyncOut| {
                    for (c, row) in wc.chunks_exact(i).enumerate() {
                        for r in 0..m {
                            let v = dot(row, &x[r * i..(r + 1) * i]);
                            // SAFETY: block `b` alone writes columns b*BLOCK.. of every row.
                            unsafe { *outp.0.add(r * o + b * DENSE_BLOCK + c) = v };
                        }
                    }
                };
                let outp = SyncOut(out.as_mut_ptr());
                assert!(out.len() == m * o && x.len() == m * i);
                if o * i * m >= 1 << 20 {
                    use rayon::prelude::*;
                    w.par_chunks(DENSE_BLOCK * i)
                        .enumerate()
                        .for_each(|(b, wc)| work(b, wc, &outp));
                } else {
                    w.chunks(DENSE_BLOCK * i)
                        .enumerate()
                        .for_each(|(b, wc)| work(b, wc, &outp));
                }
            }
        }
    }

    /// out (m, out) = x (m, in) W^T for `kernel` (see [`Kernel`]).
    fn apply(&self, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match (kernel, self) {
            (Kernel::Decode, _) => self.rows(x, m, out),
            (Kernel::Prefill, Mat::Quant(q)) if own_kernels(q) => q.matmul_with(
                Isa::best(),
                q.settings().activation,
                crate::quant::num_threads(),
                x,
                m,
                out,
            ),
            (Kernel::Prefill, _) => self.rows(x, m, out),
            (Kernel::Score, _) if m == 1 => self.rows(x, m, out),
            (Kernel::Score, Mat::Quant(q)) => {
                let k = q.shape().1;
                let y = q.forward(&Tensor::from_slice(x, (m, k), &Device::Cpu)?)?;
                out.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
            }
            (Kernel::Score, Mat::Dense(w, o, i)) => dense_matmul(x, m, w, *o, *i, out)?,
        }
        Ok(())
    }
}

/// Whether prompt chunks run the decode arithmetic ([`Kernel::Decode`], decode panels) rather
/// than the batched GEMM: on AVX2 and AVX-512, where the panels are faster for the short
/// chunks a server sees (a request's suffix after its cached prefix) and let them join the
/// decode steps of the other sequences (`mixed_steps`: one pass over the weights for both).
/// Measured on a Zen 4 capped at AVX2, 2 threads, 16-bit activations, SmolLM2's Q4_1 shapes:
/// 1.1-1.4x the GEMM at 8-30 rows, 0.83-0.97x at 64-512 rows (a long prompt's prefill); on
/// AVX-512 as fast for long prompts. (The panels' products are bit-identical on every level,
/// so a prompt's projections no longer differ between AVX2 and AVX-512 CPUs; attention's sums
/// still may.) Fixed per process, so every chunk of every prompt uses the same arithmetic. (The portable level keeps the
/// GEMM's matrix-vector arithmetic: its panel kernel is the slow reference.)
pub(crate) fn prefill_on_panels() -> bool {
    matches!(Isa::best(), Isa::Avx2 | Isa::Avx512)
}

/// Whether `q` runs on our GGML block kernels (Q4_0, Q4_1, Q8_0), whose batched rows do not
/// depend on the row count.
fn own_kernels(q: &QuantWeight) -> bool {
    use candle_core::quantized::GgmlDType as G;
    matches!(q.ggml_dtype(), Some(G::Q4_0 | G::Q4_1 | G::Q8_0))
}

/// A raw output pointer shared by workers writing disjoint elements.
struct SyncOut(*mut f32);
// SAFETY: only used for disjoint writes (see `Mat::rows`).
unsafe impl Sync for SyncOut {}

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

/// Which adapters a row runs with: an index into [`Weights`]' adapter sets (`None`: the base).
pub(crate) type AdapterSet = Option<u32>;

/// One plain LoRA adapter on one projection: `out += B (scale · A x)` (PEFT's LoRA at inference,
/// dropout off; the scale is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, as attached).
pub(crate) struct LoraDelta {
    /// The adapter set it belongs to.
    pub set: u32,
    pub r: usize,
    /// (r, in), row-major.
    pub a: Vec<f32>,
    /// (out, r), row-major.
    pub b: Vec<f32>,
    pub scale: f32,
}

impl LoraDelta {
    /// From a plain LoRA layer of a `(out, in)` linear; `None` for what the engine cannot run
    /// (DoRA, a shape that does not fit).
    pub(crate) fn from_lora(
        l: &crate::peft::LoraAdapter,
        set: u32,
        out: usize,
        inp: usize,
    ) -> Option<Self> {
        if l.magnitude().is_some() {
            return None;
        }
        let a = vec_f32(l.a().as_tensor())?;
        let b = vec_f32(l.b().as_tensor())?;
        let r = l.r();
        (a.len() == r * inp && b.len() == out * r && r > 0).then(|| LoraDelta {
            set,
            r,
            a,
            b,
            scale: l.scale() as f32,
        })
    }

    /// `out += B (scale · A x)` for one row; `h` is scratch of `r` values.
    fn add_row(&self, x: &[f32], out: &mut [f32], h: &mut Vec<f32>) {
        let inp = x.len();
        h.clear();
        h.extend(
            self.a
                .chunks_exact(inp)
                .map(|a_row| dot(a_row, x) * self.scale),
        );
        for (o, b_row) in out.iter_mut().zip(self.b.chunks_exact(self.r)) {
            *o += dot(b_row, h);
        }
    }
}

struct Lin {
    w: Mat,
    bias: Option<Vec<f32>>,
    /// Applied in order after the base projection and its bias, each to the rows of its set.
    loras: Vec<LoraDelta>,
}

impl Lin {
    /// The base projection of `l` with its active plain LoRA adapters as set 0 (what
    /// [`FastDecoder`] runs); `None` when another kind of adapter is active or a mixed batch
    /// is set on the layer.
    fn new(l: &Linear) -> Option<Self> {
        let bias = match l.bias() {
            Some(b) => Some(b.to_dtype(DType::F32).ok()?.to_vec1::<f32>().ok()?),
            None => None,
        };
        let mut lin = Self {
            w: Mat::from_linear(l)?,
            bias,
            loras: Vec::new(),
        };
        if l.has_active_adapters() {
            if l.row_adapters().is_some() {
                return None;
            }
            let (out, inp) = lin.w.shape();
            for (_, a) in l.adapters() {
                let lora = crate::peft::lora::as_lora(a)?;
                // The model path skips these too (a merged one is in the base weight).
                if !lora.is_active() || lora.is_merged() {
                    continue;
                }
                lin.loras.push(LoraDelta::from_lora(lora, 0, out, inp)?);
            }
        }
        Some(lin)
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
    /// out (m, out) = x (m, in) W^T + bias, plus each row's LoRA adapters (`sets[r]`; empty:
    /// the base for every row).
    fn apply(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        sets: &[AdapterSet],
        h: &mut Vec<f32>,
    ) -> Result<()> {
        self.w.apply(kernel, x, m, out)?;
        self.add_bias(out);
        self.add_loras(x, m, out, sets, h);
        Ok(())
    }

    /// Each row's LoRA adapters (`sets[r]`) onto the base projection `out` of `x`.
    fn add_loras(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        sets: &[AdapterSet],
        h: &mut Vec<f32>,
    ) {
        if self.loras.is_empty() || sets.is_empty() {
            return;
        }
        let (o, i) = self.w.shape();
        for lora in &self.loras {
            for (r, set) in sets.iter().enumerate().take(m) {
                if *set == Some(lora.set) {
                    lora.add_row(&x[r * i..(r + 1) * i], &mut out[r * o..(r + 1) * o], h);
                }
            }
        }
    }

    /// [`Self::apply`] of several projections of the same rows `x` (q, k and v; gate and up),
    /// `outs[j]` for `lins[j]`. In decode steps of panel weights the base products run as one
    /// fused pass ([`QuantWeight::decode_rows_many`]: the rows quantised once, one fork/join),
    /// bit-identical to running them one by one, which is what happens otherwise.
    fn apply_many(
        kernel: Kernel,
        lins: &[&Lin],
        x: &[f32],
        m: usize,
        outs: &mut [&mut [f32]],
        sets: &[AdapterSet],
        h: &mut Vec<f32>,
    ) -> Result<()> {
        let quants: Option<Vec<&QuantWeight>> = lins
            .iter()
            .map(|l| match &l.w {
                Mat::Quant(q) => Some(&**q),
                Mat::Dense(..) => None,
            })
            .collect();
        let fused = kernel == Kernel::Decode
            && quants.is_some_and(|qs| QuantWeight::decode_rows_many(&qs, x, m, outs));
        for (lin, out) in lins.iter().zip(outs.iter_mut()) {
            if fused {
                lin.add_bias(out);
                lin.add_loras(x, m, out, sets, h);
            } else {
                lin.apply(kernel, x, m, out, sets, h)?;
            }
        }
        Ok(())
    }
}

/// Attention for each of `t` rows of `att` (`width` values a row): `attend_row(r, out,
/// scratch)`, rows in parallel from 2 rows on (prefill chunks, batched steps). On the quantized
/// kernels' pool, whose workers are already spinning between the step's matmuls: rayon's would
/// be a second set of busy threads on the same cores (measured: 11% of a batched step's time
/// in yields between the two pools).
fn attend_all(
    att: &mut [f32],
    width: usize,
    t: usize,
    attend_row: impl Fn(usize, &mut [f32], &mut AttnScratch) + Sync,
) {
    assert_eq!(att.len(), t * width, "attention rows");
    let threads = crate::quant::num_threads();
    if t >= 2 && threads > 1 {
        let outp = SyncOut(att.as_mut_ptr());
        let outp = &outp;
        crate::quant::parallel_chunks(t, 1, threads, |rows| {
            let mut scratch = AttnScratch::default();
            for r in rows {
                // SAFETY: row r of `att` (t * width values, asserted above); chunks are
                // disjoint row ranges, so no other thread touches it.
                let out = unsafe { std::slice::from_raw_parts_mut(outp.0.add(r * width), width) };
                attend_row(r, out, &mut scratch);
            }
        });
    } else {
        let mut scratch = AttnScratch::default();
        for (r, out) in att.chunks_exact_mut(width).enumerate() {
            attend_row(r, out, &mut scratch);
        }
    }
}

/// The working rows a layer's second half writes: the residual stream `x` and scratch.
struct LayerBufs<'a> {
    x: &'a mut [f32],
    xn: &'a mut [f32],
    o: &'a mut [f32],
    g: &'a mut [f32],
    u: &'a mut [f32],
    h: &'a mut Vec<f32>,
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
}

impl Layer {
    /// The projections in the order of `Llama::linears`.
    fn lins_mut(&mut self) -> [&mut Lin; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// The layer after attention, for `t` rows: output projection and residual, then the
    /// SwiGLU MLP and its residual (each row on its own, whatever `t`).
    fn finish(
        &self,
        kernel: Kernel,
        eps: f32,
        att: &[f32],
        t: usize,
        sets: &[AdapterSet],
        b: &mut LayerBufs,
    ) -> Result<()> {
        self.o.apply(kernel, att, t, b.o, sets, b.h)?;
        b.x.iter_mut().zip(&*b.o).for_each(|(a, o)| *a += o);
        rms_norm_rows(b.x, &self.ffn_norm, eps, b.xn);
        Lin::apply_many(
            kernel,
            &[&self.gate, &self.up],
            b.xn,
            t,
            &mut [&mut *b.g, &mut *b.u],
            sets,
            b.h,
        )?;
        swiglu(b.g, b.u);
        self.down.apply(kernel, b.g, t, b.o, sets, b.h)?;
        b.x.iter_mut().zip(&*b.o).for_each(|(a, o)| *a += o);
        Ok(())
    }
}

/// The model as the engine runs it: weights (quantized ones shared with the `Llama`, not
/// copied), RoPE tables, shapes, and the LoRA adapters attached to the projections.
pub(crate) struct Weights {
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
    /// The element type of the KV caches this engine makes (the model's setting).
    kv_dtype: KvDtype,
}

/// Activation buffers kept between calls: freshly allocated ones of this size cost a page
/// fault per 4 KiB on first touch, every call.
#[derive(Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    /// LoRA's rank-sized intermediate.
    h: Vec<f32>,
}

/// One token of [`Weights::forward`]: sequence `seq` (an index into the caches) at position
/// `pos`, run with adapter set `set`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Row {
    pub seq: usize,
    pub pos: usize,
    pub id: u32,
    pub set: AdapterSet,
}

fn vec_f32(t: &Tensor) -> Option<Vec<f32>> {
    t.to_dtype(DType::F32)
        .ok()?
        .flatten_all()
        .ok()?
        .to_vec1::<f32>()
        .ok()
}

impl Weights {
    /// Build every quantized weight's decode layout now (see [`QuantWeight::prepare_decode`]).
    pub(crate) fn prepare_decode(&self) {
        for lin in self.all_lins() {
            if let Mat::Quant(q) = &lin.w {
                q.prepare_decode();
            }
        }
    }

    /// None when the model cannot run here (not a LLaMA-family model, not on CPU, an adapter
    /// other than plain LoRA active, unsupported weights). Active plain LoRA adapters become
    /// adapter set 0.
    pub(crate) fn new(model: &dyn Model) -> Option<Self> {
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
            });
        }
        if matches!(model.embed_tokens.weight(), EmbeddingWeight::Trainable(_)) {
            return None;
        }
        let w = Self {
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
            kv_dtype: model.kv_cache_dtype(),
        };
        w.shapes_fit().then_some(w)
    }

    /// RoPE at position `p` on one row's query heads `q` and key heads `k`.
    fn rope_row(&self, q: &mut [f32], k: &mut [f32], p: usize) {
        let half = self.head_dim / 2;
        let (cos, sin) = (
            &self.cos[p * half..(p + 1) * half],
            &self.sin[p * half..(p + 1) * half],
        );
        for head in q
            .chunks_exact_mut(self.head_dim)
            .chain(k.chunks_exact_mut(self.head_dim))
        {
            rope(head, cos, sin);
        }
    }

    /// Make room in `c` for `n` positions of this model.
    fn reserve_cache(&self, c: &mut KvCache, n: usize) {
        c.reserve(
            self.layers.len(),
            self.n_kv,
            self.head_dim,
            self.ctx,
            n,
            self.kv_dtype,
        );
    }

    /// The most positions a sequence may hold.
    pub(crate) fn context_length(&self) -> usize {
        self.ctx
    }

    /// The vocabulary size (the length of one row of logits).
    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Whether any projection carries a LoRA adapter.
    pub(crate) fn has_loras(&self) -> bool {
        self.all_lins().any(|l| !l.loras.is_empty())
    }

    fn all_lins(&self) -> impl Iterator<Item = &Lin> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .chain(std::iter::once(&self.lm_head))
    }

    /// The projections in the order of `Llama::linears` (layer by layer q, k, v, o, gate, up,
    /// down; then the LM head), with their (out, in) shapes.
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        let mut v: Vec<&mut Lin> = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &mut self.layers {
            v.extend(l.lins_mut());
        }
        v.push(&mut self.lm_head);
        v
    }

    /// Attach `deltas[i]` (a LoRA of set `set`) to projection `i` in the order of
    /// `Llama::linears`; `None` leaves it. Errors (before changing anything) when a delta's
    /// shape does not fit its projection.
    pub(crate) fn add_loras(&mut self, deltas: Vec<Option<LoraDelta>>) -> Result<()> {
        let mut lins = self.lins_mut();
        if deltas.len() != lins.len() {
            return Err(crate::Error::msg(format!(
                "engine: {} LoRA slots given for {} projections",
                deltas.len(),
                lins.len()
            )));
        }
        for (i, (lin, d)) in lins.iter().zip(&deltas).enumerate() {
            if let Some(d) = d {
                let (o, inp) = lin.w.shape();
                if d.a.len() != d.r * inp || d.b.len() != o * d.r {
                    return Err(crate::Error::msg(format!(
                        "engine: LoRA of rank {} does not fit projection {i} ({o}x{inp})",
                        d.r
                    )));
                }
            }
        }
        for (lin, d) in lins.iter_mut().zip(deltas) {
            if let Some(d) = d {
                lin.loras.push(d);
            }
        }
        Ok(())
    }

    /// Drop every LoRA of adapter set `set`.
    pub(crate) fn remove_loras(&mut self, set: u32) {
        for lin in self.lins_mut() {
            lin.loras.retain(|d| d.set != set);
        }
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

    fn embed_rows(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(crate::Error::msg(format!(
                "engine: token id {bad} is out of range for a vocabulary of {}",
                self.vocab
            )));
        }
        let t = match &self.embed {
            EmbeddingWeight::Quantized(q) => q.embedding(ids)?,
            EmbeddingWeight::Frozen(w) => w
                .index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?
                .to_dtype(DType::F32)?,
            EmbeddingWeight::Trainable(_) => {
                return Err(crate::Error::msg("engine: a trainable embedding"))
            }
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

    /// Run `rows` (each after the positions its sequence's cache holds; a sequence's rows at
    /// consecutive positions from `caches[seq].len`) and return the logits of the rows listed
    /// in `want`, in that order (`want.len() x vocab`). Every row writes its key and value to
    /// its cache at its position and attends to positions `0..=pos` of its own cache; each
    /// cache's `len` then counts its new rows. Nothing is changed on an error.
    pub(crate) fn forward(
        &self,
        caches: &mut [&mut KvCache],
        rows: &[Row],
        want: &[usize],
        kernel: Kernel,
        sc: &mut Scratch,
    ) -> Result<Vec<f32>> {
        let t = rows.len();
        if t == 0 {
            return Err(crate::Error::msg("engine: empty forward"));
        }
        // Each cache's new rows, checked before anything is written.
        let mut added = vec![0usize; caches.len()];
        for r in rows {
            let Some(n) = added.get_mut(r.seq) else {
                return Err(crate::Error::msg(format!(
                    "engine: row of sequence {} but {} caches",
                    r.seq,
                    caches.len()
                )));
            };
            if r.pos != caches[r.seq].len + *n {
                return Err(crate::Error::msg(format!(
                    "engine: row at position {} of a sequence holding {} (+{} in this pass)",
                    r.pos, caches[r.seq].len, n
                )));
            }
            *n += 1;
        }
        if let Some(r) = rows.iter().find(|r| r.pos >= self.ctx) {
            return Err(crate::Error::ContextOverflow {
                tokens: r.pos + 1,
                context: self.ctx,
                hint: String::new(),
            });
        }
        if want.iter().any(|&w| w >= t) {
            return Err(crate::Error::msg("engine: logits asked of a row not run"));
        }
        let kernel = match kernel {
            Kernel::Prefill if prefill_on_panels() => Kernel::Decode,
            k => k,
        };
        let ids: Vec<u32> = rows.iter().map(|r| r.id).collect();
        let sets: Vec<AdapterSet> = rows.iter().map(|r| r.set).collect();
        let (h, hd, nh, nkv, inter) = (
            self.hidden,
            self.head_dim,
            self.n_heads,
            self.n_kv,
            self.inter,
        );
        // Every buffer is overwritten before it is read: resizing only sets the length.
        let sized = |b: &mut Vec<f32>, n: usize| -> Vec<f32> {
            let mut b = std::mem::take(b);
            b.resize(n, 0.0);
            b
        };
        let mut x = sized(&mut sc.x, t * h);
        if let Err(e) = self.embed_rows(&ids, &mut x) {
            sc.x = x;
            return Err(e);
        }
        for (c, n) in caches.iter_mut().zip(&added) {
            if *n > 0 {
                self.reserve_cache(c, c.len + n);
            }
        }
        let mut xn = sized(&mut sc.xn, t * h);
        let mut q = sized(&mut sc.q, t * nh * hd);
        let mut k = sized(&mut sc.k, t * nkv * hd);
        let mut v = sized(&mut sc.v, t * nkv * hd);
        let mut att = sized(&mut sc.att, t * nh * hd);
        let mut o = sized(&mut sc.o, t * h);
        let mut g = sized(&mut sc.g, t * inter);
        let mut u = sized(&mut sc.u, t * inter);
        let mut hbuf = std::mem::take(&mut sc.h);
        let result = (|| -> Result<()> {
            for (li, layer) in self.layers.iter().enumerate() {
                rms_norm_rows(&x, &layer.attn_norm, self.eps, &mut xn);
                Lin::apply_many(
                    kernel,
                    &[&layer.q, &layer.k, &layer.v],
                    &xn,
                    t,
                    &mut [&mut q[..], &mut k[..], &mut v[..]],
                    &sets,
                    &mut hbuf,
                )?;
                for (r, row) in rows.iter().enumerate() {
                    let p = row.pos;
                    self.rope_row(
                        &mut q[r * nh * hd..(r + 1) * nh * hd],
                        &mut k[r * nkv * hd..(r + 1) * nkv * hd],
                        p,
                    );
                    let c = &mut *caches[row.seq];
                    for kh in 0..nkv {
                        let src = (r * nkv + kh) * hd;
                        c.put(li, kh, p, &k[src..src + hd], &v[src..src + hd]);
                    }
                }
                let group = nh / nkv;
                let caches_ro: &[&mut KvCache] = caches;
                let attend_row = |r: usize, out: &mut [f32], scratch: &mut AttnScratch| {
                    let row = rows[r];
                    let c = &*caches_ro[row.seq];
                    let shape = AttnShape {
                        base: 0,
                        cap: c.cap,
                        k_head: c.k_head,
                        hd,
                        nh,
                        group,
                    };
                    attend(
                        &shape,
                        &q[r * nh * hd..(r + 1) * nh * hd],
                        c.layer(li),
                        0,
                        row.pos,
                        out,
                        scratch,
                    );
                };
                attend_all(&mut att, nh * hd, t, attend_row);
                let mut bufs = LayerBufs {
                    x: &mut x,
                    xn: &mut xn,
                    o: &mut o,
                    g: &mut g,
                    u: &mut u,
                    h: &mut hbuf,
                };
                layer.finish(kernel, self.eps, &att, t, &sets, &mut bufs)?;
            }
            Ok(())
        })();
        let logits = result.and_then(|()| {
            let n = want.len();
            if n == 0 {
                return Ok(Vec::new());
            }
            let mut last = vec![0f32; n * h];
            for (dst, &r) in last.chunks_exact_mut(h).zip(want) {
                dst.copy_from_slice(&x[r * h..(r + 1) * h]);
            }
            let mut ln = vec![0f32; n * h];
            rms_norm_rows(&last, &self.norm, self.eps, &mut ln);
            let mut logits = vec![0f32; n * self.vocab];
            let want_sets: Vec<AdapterSet> = want.iter().map(|&r| sets[r]).collect();
            // The LM head runs on the wanted rows only; a prompt chunk wants one row, so the
            // matrix-vector arithmetic serves both kernels.
            let head_kernel = match kernel {
                Kernel::Score => Kernel::Score,
                _ => Kernel::Decode,
            };
            self.lm_head
                .apply(head_kernel, &ln, n, &mut logits, &want_sets, &mut hbuf)?;
            Ok(logits)
        });
        // The rows' keys and values are in the caches; count them only on success (a later
        // run overwrites the positions of a failed one).
        if logits.is_ok() {
            for (c, n) in caches.iter_mut().zip(&added) {
                c.len += n;
            }
        }
        *sc = Scratch {
            x,
            xn,
            q,
            k,
            v,
            att,
            o,
            g,
            u,
            h: hbuf,
        };
        logits
    }
}

/// `g <- silu(g) * u`, with the vectorising polynomial `exp` of `ops::kernels` in an AVX2 frame
/// where the CPU has it (libm's `expf`, one value at a time, was 1.4% of a batched decode step).
/// Batched rows (8 decode rows of SmolLM2: 12k values) split across the kernels' pool: done on
/// one thread, the other core waited for it at every layer.
fn swiglu(g: &mut [f32], u: &[f32]) {
    const MIN_PER_THREAD: usize = 4096;
    assert_eq!(g.len(), u.len(), "swiglu operands");
    let threads = crate::quant::num_threads();
    if g.len() < 2 * MIN_PER_THREAD || threads < 2 {
        return swiglu_rows(g, u);
    }
    let gp = SyncOut(g.as_mut_ptr());
    let gp = &gp;
    crate::quant::parallel_chunks(g.len(), MIN_PER_THREAD, threads, |r| {
        // SAFETY: `r` lies inside `g` (parallel_chunks covers 0..g.len() with disjoint ranges).
        let gs = unsafe { std::slice::from_raw_parts_mut(gp.0.add(r.start), r.len()) };
        swiglu_rows(gs, &u[r]);
    });
}

crate::ops::kernels::multiversion!(fn swiglu_rows<T>(g: &mut [T], u: &[T]) = swiglu_body;);

#[inline(always)]
fn swiglu_body<T: crate::ops::kernels::Float>(g: &mut [T], u: &[T]) {
    for (gi, ui) in g.iter_mut().zip(u) {
        *gi = *gi / (T::ONE + (-*gi).exp()) * *ui;
    }
}

pub struct FastDecoder {
    w: Weights,
    cache: KvCache,
    /// The adapter set every row runs with: set 0 when LoRA adapters are attached.
    set: AdapterSet,
    scratch: Scratch,
}

impl FastDecoder {
    /// None when the model cannot run here (not a LLaMA-family model, not on CPU, an adapter
    /// other than plain LoRA active, unsupported weights).
    pub fn new(model: &dyn Model) -> Option<Self> {
        let w = Weights::new(model)?;
        Some(Self {
            set: w.has_loras().then_some(0),
            w,
            cache: KvCache::default(),
            scratch: Scratch::default(),
        })
    }

    /// Build the quantized weights' decode panels now (else the first forward builds them).
    pub fn prepare_decode(&self) {
        self.w.prepare_decode();
    }

    /// Whether LoRA adapters run with the base.
    pub fn has_adapters(&self) -> bool {
        self.set.is_some()
    }

    /// Positions in the cache.
    pub fn cached(&self) -> usize {
        self.cache.len
    }

    /// The vocabulary size (the length of one row of logits).
    pub fn vocab_size(&self) -> usize {
        self.w.vocab
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
        self.cache.len = keep.min(self.cache.len);
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
        self.cache.len = keep.min(self.cache.len);
        self.forward_batch(seqs, seqs.len() == 1)
    }

    /// The forward pass of `seqs` placed after the `len` cached positions. Sequence `s` writes
    /// its keys and values at cache positions `len + off_s ..` (`off_s`: the tokens of the
    /// sequences before it) and takes RoPE positions `len ..`; `advance` (one sequence only)
    /// keeps it in the cache.
    fn forward_batch(&mut self, seqs: &[(&[u32], usize)], advance: bool) -> Result<Vec<f32>> {
        let w = &self.w;
        let base = self.cache.len;
        let t: usize = seqs.iter().map(|(ids, _)| ids.len()).sum();
        if t == 0 {
            return Err(crate::Error::msg("engine: empty forward"));
        }
        if let Some(longest) = seqs.iter().map(|(ids, _)| ids.len()).max() {
            if base + longest > w.ctx {
                return Err(crate::Error::ContextOverflow {
                    tokens: base + longest,
                    context: w.ctx,
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
        let sets = vec![self.set; t];
        let mut x = std::mem::take(&mut self.scratch.x);
        x.resize(t * w.hidden, 0.0);
        if let Err(e) = w.embed_rows(&ids_all, &mut x) {
            self.scratch.x = x;
            return Err(e);
        }
        // The shared-prefix layout packs all sequences after the prefix (base + t positions,
        // which may exceed the context length in total though no sequence does).
        w.reserve_cache(&mut self.cache, base + t);
        let (h, hd, nh, nkv, inter) = (w.hidden, w.head_dim, w.n_heads, w.n_kv, w.inter);
        let sc = &mut self.scratch;
        let sized = |b: &mut Vec<f32>, n: usize| -> Vec<f32> {
            let mut b = std::mem::take(b);
            b.resize(n, 0.0);
            b
        };
        let mut xn = sized(&mut sc.xn, t * h);
        let mut q = sized(&mut sc.q, t * nh * hd);
        let mut k = sized(&mut sc.k, t * nkv * hd);
        let mut v = sized(&mut sc.v, t * nkv * hd);
        let mut att = sized(&mut sc.att, t * nh * hd);
        let mut o = sized(&mut sc.o, t * h);
        let mut g = sized(&mut sc.g, t * inter);
        let mut u = sized(&mut sc.u, t * inter);
        let mut hbuf = std::mem::take(&mut sc.h);
        let kernel = Kernel::Score;
        let cache = &mut self.cache;
        let cap = cache.cap;
        for (li, layer) in w.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, w.eps, &mut xn);
            Lin::apply_many(
                kernel,
                &[&layer.q, &layer.k, &layer.v],
                &xn,
                t,
                &mut [&mut q[..], &mut k[..], &mut v[..]],
                &sets,
                &mut hbuf,
            )?;
            for (r, &(_, i)) in row_seq.iter().enumerate() {
                w.rope_row(
                    &mut q[r * nh * hd..(r + 1) * nh * hd],
                    &mut k[r * nkv * hd..(r + 1) * nkv * hd],
                    base + i,
                );
            }
            for r in 0..t {
                let p = base + r;
                for kh in 0..nkv {
                    let src = (r * nkv + kh) * hd;
                    cache.put(li, kh, p, &k[src..src + hd], &v[src..src + hd]);
                }
            }
            let shape = AttnShape {
                base,
                cap,
                k_head: cache.k_head,
                hd,
                nh,
                group: nh / nkv,
            };
            let kv = cache.layer(li);
            let attend_row = |r: usize, out: &mut [f32], scratch: &mut AttnScratch| {
                let (off, i) = row_seq[r];
                attend(
                    &shape,
                    &q[r * nh * hd..(r + 1) * nh * hd],
                    kv,
                    off,
                    i,
                    out,
                    scratch,
                );
            };
            attend_all(&mut att, nh * hd, t, attend_row);
            let mut bufs = LayerBufs {
                x: &mut x,
                xn: &mut xn,
                o: &mut o,
                g: &mut g,
                u: &mut u,
                h: &mut hbuf,
            };
            layer.finish(kernel, w.eps, &att, t, &sets, &mut bufs)?;
        }
        if advance && seqs.len() == 1 {
            cache.len += t;
        }
        let rows = scored.len();
        let mut last = vec![0f32; rows * h];
        for (dst, &r) in last.chunks_exact_mut(h).zip(&scored) {
            dst.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        *sc = Scratch {
            x,
            xn,
            q,
            k,
            v,
            att,
            o,
            g,
            u,
            h: hbuf,
        };
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut ln = vec![0f32; rows * h];
        rms_norm_rows(&last, &w.norm, w.eps, &mut ln);
        let mut logits = vec![0f32; rows * w.vocab];
        let head_sets = vec![self.set; rows];
        w.lm_head
            .apply(kernel, &ln, rows, &mut logits, &head_sets, &mut sc.h)?;
        Ok(logits)
    }

    /// `ids` after the cached positions through [`Weights::forward`] with `kernel`; the last
    /// row's logits.
    fn run(&mut self, ids: &[u32], kernel: Kernel) -> Result<Vec<f32>> {
        let base = self.cache.len;
        let rows: Vec<Row> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| Row {
                seq: 0,
                pos: base + i,
                id,
                set: self.set,
            })
            .collect();
        let want = [ids.len().saturating_sub(1)];
        self.w.forward(
            &mut [&mut self.cache],
            &rows,
            &want,
            kernel,
            &mut self.scratch,
        )
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

impl Decoder for FastDecoder {
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.cache.len = 0;
        self.run(ids, Kernel::Prefill)
    }
    fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        self.run(&[id], Kernel::Decode)
    }
    fn context_length(&self) -> usize {
        self.w.ctx
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

    /// The batched decode kernel gives each row exactly what the single-row kernel gives it,
    /// for every kernel level this CPU has, both activation widths, any row count and thread
    /// count: a sequence's logits must not depend on what shares its decode step.
    #[test]
    fn matvec_rows_equal_matvec_bit_for_bit() {
        use crate::quant::ActPrecision;
        use candle_core::quantized::GgmlDType;
        let (n, k) = (70, 96);
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let wt = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QuantWeight::quantize(&wt, dt).unwrap();
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                if !isa.available() {
                    continue;
                }
                for prec in [ActPrecision::I8, ActPrecision::I16] {
                    for m in [1, 2, 3, 5, 8, 9, 13] {
                        let x: Vec<f32> = (0..m * k)
                            .map(|i| {
                                ((i * 104729 % 997) as f32 / 498.0 - 1.0) * (1.0 + (i / k) as f32)
                            })
                            .collect();
                        for threads in [1, 2] {
                            let mut rows = vec![0f32; m * n];
                            q.matvec_rows_with(isa, prec, threads, &x, m, &mut rows);
                            for r in 0..m {
                                let mut one = vec![0f32; n];
                                q.matvec_with(isa, prec, 1, &x[r * k..(r + 1) * k], &mut one);
                                let got = &rows[r * n..(r + 1) * n];
                                assert!(
                                    got.iter()
                                        .zip(&one)
                                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "{dt:?} {isa:?} {prec:?} m={m} threads={threads} row {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    /// The f32 decode arithmetic: each row bit-identical to that row alone for any row count
    /// (tiles of 1-8 rows, 1-4 weight rows per pass, remainders) and thread count, identical
    /// across kernel levels (the portable path reproduces the SIMD lane order), and equal to
    /// the f32 product with the dequantised weights to within rounding.
    #[test]
    fn decode_rows_f32_is_batch_independent_and_exact() {
        use crate::quant::DecodeArith;
        use candle_core::quantized::GgmlDType;
        let (n, k) = (70, 96);
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let wt = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QuantWeight::quantize(&wt, dt).unwrap();
            let deq = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
            for m in [1, 2, 3, 4, 5, 7, 8, 9, 13, 17] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 104729 % 997) as f32 / 498.0 - 1.0) * (1.0 + (i / k) as f32))
                    .collect();
                let mut scalar = vec![0f32; m * n];
                q.decode_rows_with(Isa::Scalar, DecodeArith::F32, 1, &x, m, &mut scalar);
                for (r, row) in scalar.chunks_exact(n).enumerate() {
                    let xr = &x[r * k..(r + 1) * k];
                    for (c, &v) in row.iter().enumerate() {
                        let exact: f64 = deq[c]
                            .iter()
                            .zip(xr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        let scale: f64 = deq[c]
                            .iter()
                            .zip(xr)
                            .map(|(&a, &b)| (a * b).abs() as f64)
                            .sum();
                        assert!(
                            (v as f64 - exact).abs() <= 1e-5 * scale,
                            "{dt:?} m={m} ({r},{c}): {v} vs f64 {exact}"
                        );
                    }
                }
                for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                    if !isa.available() {
                        continue;
                    }
                    for threads in [1, 2] {
                        let mut rows = vec![0f32; m * n];
                        q.decode_rows_with(isa, DecodeArith::F32, threads, &x, m, &mut rows);
                        for r in 0..m {
                            let mut one = vec![0f32; n];
                            let xr = &x[r * k..(r + 1) * k];
                            q.decode_rows_with(isa, DecodeArith::F32, 1, xr, 1, &mut one);
                            let got = &rows[r * n..(r + 1) * n];
                            let same = |a: &[f32], b: &[f32]| {
                                a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
                            };
                            assert!(same(got, &one), "{dt:?} {isa:?} m={m} t={threads} row {r}");
                            assert!(
                                same(got, &scalar[r * n..(r + 1) * n]),
                                "{dt:?} {isa:?} m={m} t={threads} row {r} differs from the portable path"
                            );
                        }
                    }
                }
            }
        }
    }
}
