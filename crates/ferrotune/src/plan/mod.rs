//! `plan`: memory and compute for a training run before anyone rents a GPU.
//!
//! **Memory per device** (bytes; Ψ parameters, Nd data-parallel devices):
//! - *model states* as the ZeRO paper counts them (Rajbhandari et al. 2020, §3.1): mixed-precision
//!   Adam keeps 16-bit weights (2Ψ) and gradients (2Ψ) and K = 12 bytes of optimizer state per
//!   parameter (fp32 master copy, momentum, variance). DDP holds all of it on every device,
//!   (2+2+K)Ψ; ZeRO-1 shards the optimizer state, 2Ψ+2Ψ+KΨ/Nd; ZeRO-2 the gradients too,
//!   2Ψ+(2+K)Ψ/Nd; ZeRO-3 (= FSDP full sharding) everything, (2+2+K)Ψ/Nd. In fp32 there is no
//!   master copy (4Ψ + 4Ψ + 8Ψ).
//! - *PEFT*: the base weights are frozen in `--dtype` (QLoRA: the block linears in NF4 with double
//!   quantization, 4.127 bits a weight; embeddings, norms and the LM head in 16 bits); only the
//!   trainable parameters (LoRA's A and B for each target module, DoRA's magnitudes, prompt
//!   tuning's virtual-token embeddings) have gradients and optimizer state, all in fp32 as PEFT
//!   keeps adapters (4 B weight + 4 B gradient + the optimizer's state).
//! - *activations*, per transformer layer (Korthikanti et al. 2022, "Reducing Activation
//!   Recomputation in Large Transformer Models", eq. 1, no tensor/sequence parallelism):
//!   s·b·h·(34 + 5·a·s/h) bytes at 16 bits; flash attention / SDPA keeps no s×s attention matrix,
//!   leaving 34·s·b·h; with gradient checkpointing each layer keeps only its input (2·s·b·h) and
//!   one layer at a time is recomputed with its full set. The formula is for a GPT layer (MLP 4h
//!   wide, dropout masks); fp32 doubles it. Plus the logits and their gradient in fp32
//!   (8·s·b·V, as `inspect` counts them) and each LoRA product x·Aᵀ (r values per token and
//!   adapted module). Activations are per device: `--batch` is the micro-batch on each device.
//! - *buffers*: 1 GiB for the CUDA context and the cuBLAS / NCCL workspaces (0.5–1 GB on current
//!   GPUs), 5% of the rest for the caching allocator's fragmentation, and under ZeRO-3 two
//!   layers of gathered 16-bit weights (the one running and the one prefetched).
//!
//! **Compute**: training FLOPs per token are 6·N plus the attention term 6·n_layer·n_ctx·d_attn
//! (Kaplan et al. 2020, Table 1, forward 2N + 2·n_layer·n_ctx·d_attn, backward twice that),
//! N counting the weights that multiply (the input embeddings are looked up; a tied head still
//! multiplies). PEFT methods compute no weight gradients for the frozen weights: forward 2N and
//! the backward's input gradients 2N, 4·N per token, plus 6 per trainable adapter weight.
//! Time = FLOPs / (devices × dense peak × MFU); petaflop/s-days = FLOPs / (1e15 · 86400).
//!
//! **Scaling**: Chinchilla's compute-optimal data is about 20 tokens per parameter (Hoffmann et
//! al. 2022); for a FLOP budget C the fitted law of their approach 3,
//! L(N, D) = E + A/N^α + B/D^β, gives N_opt = G·(C/6)^a and D_opt = G⁻¹·(C/6)^b.
pub mod gpus;
pub mod shape;

pub use gpus::{Gpu, Peaks, GPUS};
pub use shape::{LinearGroup, ModelShape, ShapeFlags};

use crate::{Error, Result};
use serde::Serialize;

/// What the user asked, as given on the command line (counts as text: `7B`, `1.4e12`).
#[derive(Clone, Debug)]
pub struct Request {
    /// `--model`: an HF folder, a GGUF file or `hf:org/name`.
    pub model: Option<String>,
    /// `--params`: `7e9`, `7B`, `135M`.
    pub params: Option<String>,
    pub shape: ShapeFlags,
    pub method: String,
    pub dtype: String,
    pub optimizer: String,
    /// LoRA rank (LoRA, QLoRA, DoRA); `None`: 8, PEFT's default.
    pub rank: Option<usize>,
    /// Comma-separated LoRA target modules or `all-linear`; `None`: PEFT's default for the family.
    pub targets: Option<String>,
    /// Prompt tuning's virtual tokens; `None`: 20.
    pub virtual_tokens: Option<usize>,
    pub batch: usize,
    /// `None`: 2048, or the model's context when shorter.
    pub seq_len: Option<usize>,
    pub gpus: usize,
    pub gpu: String,
    pub strategy: String,
    pub gradient_checkpointing: bool,
    /// `flash` (flash attention / SDPA, the default) or `eager`.
    pub attention: String,
    /// `--tokens`: the training budget; `None`: one optimizer step.
    pub tokens: Option<String>,
    pub flops_budget: Option<String>,
    pub mfu: f64,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            model: None,
            params: None,
            shape: ShapeFlags::default(),
            method: "full".into(),
            dtype: "bf16".into(),
            optimizer: "adamw".into(),
            rank: None,
            targets: None,
            virtual_tokens: None,
            batch: 1,
            seq_len: None,
            gpus: 1,
            gpu: "h100".into(),
            strategy: "ddp".into(),
            gradient_checkpointing: false,
            attention: "flash".into(),
            tokens: None,
            flops_budget: None,
            mfu: DEFAULT_MFU,
        }
    }
}

pub const DEFAULT_MFU: f64 = 0.4;
const DEFAULT_RANK: usize = 8;
const DEFAULT_VIRTUAL_TOKENS: usize = 20;
const DEFAULT_SEQ_LEN: usize = 2048;
/// Largest values accepted: beyond them a number is a typo, and the products stay far from
/// overflowing.
const MAX_PARAMS: f64 = 1e15;
const MAX_TOKENS: f64 = 1e18;
const MAX_FLOPS_BUDGET: f64 = 1e32;
const MAX_BATCH: usize = 1 << 24;
const MAX_GPUS: usize = 1 << 20;
/// The smallest `--flops-budget`: 6·N·D for a 10k-parameter model on 200k tokens (Chinchilla's
/// fitted law was fit on models of 70M and up; below this its optimum is not a model at all).
const MIN_FLOPS_BUDGET: f64 = 1.2e10;
const MAX_VIRTUAL_TOKENS: usize = 1 << 20;

/// Bytes of CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers on each device.
pub const CONTEXT_BYTES: u64 = 1 << 30;
/// Share of the other memory allowed for the caching allocator's fragmentation.
pub const FRAGMENTATION: f64 = 0.05;
/// Chinchilla's rule: compute-optimal tokens per parameter.
pub const TOKENS_PER_PARAM: f64 = 20.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Full,
    Lora,
    Qlora,
    Dora,
    PromptTuning,
}

impl Method {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "full" => Method::Full,
            "lora" => Method::Lora,
            "qlora" => Method::Qlora,
            "dora" => Method::Dora,
            "prompt-tuning" | "prompt" => Method::PromptTuning,
            other => {
                return Err(flag(
                    "--method",
                    format!("unknown method `{other}`; expected full, lora, qlora, dora or prompt-tuning"),
                ))
            }
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora => "lora",
            Method::Qlora => "qlora",
            Method::Dora => "dora",
            Method::PromptTuning => "prompt-tuning",
        }
    }
    fn is_lora(self) -> bool {
        matches!(self, Method::Lora | Method::Qlora | Method::Dora)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Tf32,
    Bf16,
    Fp16,
    Int8,
}

impl Dtype {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Dtype::Fp32,
            "tf32" => Dtype::Tf32,
            "bf16" | "bfloat16" => Dtype::Bf16,
            "fp16" | "f16" | "float16" => Dtype::Fp16,
            "int8" | "8bit" => Dtype::Int8,
            "nf4" | "4bit" => {
                return Err(flag(
                    "--dtype",
                    "NF4 weights are `--method qlora` (with --dtype the compute type, bf16)",
                ))
            }
            other => {
                return Err(flag(
                    "--dtype",
                    format!("unknown dtype `{other}`; expected fp32, tf32, bf16, fp16 or int8"),
                ))
            }
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Tf32 => "tf32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
            Dtype::Int8 => "int8",
        }
    }
    /// Bytes of one weight held in this type (int8: with one fp32 scale per 128 values, as
    /// `inspect` counts it).
    fn weight_bytes(self) -> f64 {
        match self {
            Dtype::Fp32 | Dtype::Tf32 => 4.0,
            Dtype::Bf16 | Dtype::Fp16 => 2.0,
            Dtype::Int8 => crate::inspect::weight_bytes_per_param("int8"),
        }
    }
    /// 2 bytes for activations in 16-bit compute, 4 in fp32 / tf32 (int8 weights compute in 16).
    fn activation_scale(self) -> f64 {
        match self {
            Dtype::Fp32 | Dtype::Tf32 => 2.0,
            _ => 1.0,
        }
    }
    /// The peak the matmuls run at: int8 weights (LLM.int8) are trained through 16-bit
    /// matmuls in the backward pass, so they are planned at the 16-bit peak.
    fn peak(self, p: &Peaks) -> (f64, &'static str) {
        match self {
            Dtype::Fp32 => (p.fp32, "fp32"),
            Dtype::Tf32 => (p.tf32, "tf32"),
            Dtype::Bf16 => (p.bf16, "bf16"),
            Dtype::Fp16 => (p.fp16, "fp16"),
            Dtype::Int8 => (p.fp16, "fp16"),
        }
    }
    fn is_16bit(self) -> bool {
        matches!(self, Dtype::Bf16 | Dtype::Fp16)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Ddp,
    Zero1,
    Zero2,
    Zero3,
}

impl Strategy {
    fn parse(s: &str) -> Result<Self> {
        Ok(
            match s
                .trim()
                .to_ascii_lowercase()
                .replace(['_', '-'], "")
                .as_str()
            {
                "ddp" | "none" | "single" => Strategy::Ddp,
                "zero1" => Strategy::Zero1,
                "zero2" | "fsdpshardgradop" => Strategy::Zero2,
                "zero3" | "fsdp" | "fsdpfullshard" => Strategy::Zero3,
                _ => {
                    return Err(flag(
                        "--strategy",
                        format!(
                            "unknown strategy `{}`; expected ddp, zero1, zero2, zero3 or fsdp",
                            s.trim()
                        ),
                    ))
                }
            },
        )
    }
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Ddp => "DDP",
            Strategy::Zero1 => "ZeRO-1",
            Strategy::Zero2 => "ZeRO-2",
            Strategy::Zero3 => "ZeRO-3 / FSDP",
        }
    }
    fn shards(self) -> (bool, bool, bool) {
        // (weights, gradients, optimizer state)
        match self {
            Strategy::Ddp => (false, false, false),
            Strategy::Zero1 => (false, false, true),
            Strategy::Zero2 => (false, true, true),
            Strategy::Zero3 => (true, true, true),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    Adamw,
    Adamw8bit,
    Sgd,
}

impl Optimizer {
    fn parse(s: &str) -> Result<Self> {
        Ok(
            match s
                .trim()
                .to_ascii_lowercase()
                .replace(['_', '-'], "")
                .as_str()
            {
                "adamw" | "adam" => Optimizer::Adamw,
                "adamw8bit" | "adam8bit" => Optimizer::Adamw8bit,
                "sgd" => Optimizer::Sgd,
                _ => {
                    return Err(flag(
                        "--optimizer",
                        format!(
                            "unknown optimizer `{}`; expected adamw, adamw-8bit or sgd",
                            s.trim()
                        ),
                    ))
                }
            },
        )
    }
    /// Bytes of state per trained parameter, without a master copy: Adam's two fp32 moments;
    /// bitsandbytes' 8-bit Adam one byte each plus an fp32 absmax per 2048-value block; SGD's
    /// fp32 momentum.
    fn state_bytes(self) -> f64 {
        match self {
            Optimizer::Adamw => 8.0,
            Optimizer::Adamw8bit => 2.0 + 2.0 * 4.0 / 2048.0,
            Optimizer::Sgd => 4.0,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Optimizer::Adamw => "AdamW",
            Optimizer::Adamw8bit => "8-bit AdamW",
            Optimizer::Sgd => "SGD with momentum",
        }
    }
}

fn flag(name: &str, what: impl std::fmt::Display) -> Error {
    Error::msg(format!("{name}: {what}"))
}

/// A count as people write it: `7e9`, `7B`, `7b`, `135M`, `1.4T`, `70k`, `7_000_000_000`. It
/// must be finite, positive and at most `max`; errors name `flag_name`.
pub fn parse_count(flag_name: &str, s: &str, max: f64) -> Result<f64> {
    let t: String = s
        .trim()
        .chars()
        .filter(|c| *c != '_' && *c != ',')
        .collect();
    let (num, mult) = match t.chars().last() {
        Some(c @ ('k' | 'K' | 'm' | 'M' | 'b' | 'B' | 'g' | 'G' | 't' | 'T')) => (
            &t[..t.len() - 1],
            match c.to_ascii_lowercase() {
                'k' => 1e3,
                'm' => 1e6,
                'b' | 'g' => 1e9,
                _ => 1e12,
            },
        ),
        _ => (t.as_str(), 1.0),
    };
    let v: f64 = num.parse::<f64>().map_err(|_| {
        flag(
            flag_name,
            format!(
                "`{}` is not a number (expected e.g. 7e9, 7B, 135M)",
                s.trim()
            ),
        )
    })? * mult;
    if !v.is_finite() || v <= 0.0 {
        return Err(flag(
            flag_name,
            format!("`{}`: expected a positive number", s.trim()),
        ));
    }
    if v > max {
        return Err(flag(
            flag_name,
            format!(
                "`{}` is more than {max:e}, past what can be planned",
                s.trim()
            ),
        ));
    }
    Ok(v)
}

/// Memory per device, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PerDevice {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub buffers: u64,
    pub total: u64,
}

/// Hoffmann et al.'s compute-optimal model and data for a FLOP budget (approach 3).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ComputeOptimal {
    pub flops_budget: f64,
    /// Parameters.
    pub n: f64,
    /// Training tokens.
    pub d: f64,
    /// The fitted loss at (n, d).
    pub loss: f64,
    pub tokens_per_param: f64,
}

/// Hoffmann et al. 2022, approach 3 (their eq. 10 fit, Table A3 / §D.2): E, A, B, α, β.
pub const CHINCHILLA_E: f64 = 1.69;
pub const CHINCHILLA_A: f64 = 406.4;
pub const CHINCHILLA_B: f64 = 410.7;
pub const CHINCHILLA_ALPHA: f64 = 0.34;
pub const CHINCHILLA_BETA: f64 = 0.28;

/// N_opt = G·(C/6)^a, D_opt = G⁻¹·(C/6)^b, a = β/(α+β), b = α/(α+β), G = (αA/(βB))^(1/(α+β)):
/// the minimum of L(N, D) = E + A/N^α + B/D^β on the line C = 6·N·D.
pub fn compute_optimal(c: f64) -> ComputeOptimal {
    let (alpha, beta) = (CHINCHILLA_ALPHA, CHINCHILLA_BETA);
    let a = beta / (alpha + beta);
    let b = alpha / (alpha + beta);
    let g = ((alpha * CHINCHILLA_A) / (beta * CHINCHILLA_B)).powf(1.0 / (alpha + beta));
    let n = g * (c / 6.0).powf(a);
    let d = (c / 6.0).powf(b) / g;
    ComputeOptimal {
        flops_budget: c,
        n,
        d,
        loss: CHINCHILLA_E + CHINCHILLA_A / n.powf(alpha) + CHINCHILLA_B / d.powf(beta),
        tokens_per_param: d / n,
    }
}

/// The rules of thumb next to the detailed figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RulesOfThumb {
    /// "~16–20 bytes/param for full fine-tuning with Adam in mixed precision", applied to this
    /// model on one device (no sharding, no method, no activations).
    pub full_ft_bytes_per_param: [f64; 2],
    pub full_ft_bytes: [u64; 2],
    /// The detailed per-device total over the parameters.
    pub detailed_bytes_per_param: f64,
    /// 6·N·D with N all the parameters.
    pub flops_6nd: f64,
    /// 20 tokens per parameter.
    pub chinchilla_tokens: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuInfo {
    pub name: String,
    pub label: String,
    pub memory_bytes: u64,
    pub peak_tflops: Peaks,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub model: ModelShape,
    pub method: Method,
    pub dtype: Dtype,
    pub optimizer: Optimizer,
    pub strategy: Strategy,
    pub gpu: GpuInfo,
    pub gpus: u64,
    pub batch: u64,
    pub seq_len: u64,
    /// Positions per sequence in the model: `seq_len` plus prompt tuning's virtual tokens.
    pub positions: u64,
    pub gradient_checkpointing: bool,
    /// `flash` or `eager`.
    pub attention: String,
    /// LoRA rank and target modules (LoRA, QLoRA, DoRA).
    pub rank: Option<u64>,
    pub targets: Option<Vec<String>>,
    pub virtual_tokens: Option<u64>,
    pub params: u64,
    pub trainable_params: u64,
    pub per_device: PerDevice,
    /// Which activation estimate was used, in words.
    pub activations_formula: String,
    pub gpu_memory_bytes: u64,
    pub fits: bool,
    /// GPU memory minus the total (negative: short by that much).
    pub headroom_bytes: i64,
    pub tokens: f64,
    /// `--tokens`, or `one step` (batch × seq-len × gpus).
    pub tokens_source: String,
    pub flops_per_token: f64,
    pub flops: f64,
    pub flops_formula: String,
    pub petaflop_s_days: f64,
    pub mfu: f64,
    /// The dense peak of each device at the compute precision, FLOP/s.
    pub peak_flops_per_gpu: f64,
    pub peak_precision: String,
    pub time_s: f64,
    pub steps: f64,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    pub chinchilla_tokens: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_optimal: Option<ComputeOptimal>,
    pub rules_of_thumb: RulesOfThumb,
    pub notes: Vec<String>,
}

/// The plan for `req`, or only the compute-optimal N and D when `req` names no model and has a
/// FLOP budget ([`plan_budget_only`]).
pub fn plan(req: &Request) -> Result<Plan> {
    let method = Method::parse(&req.method)?;
    let dtype = Dtype::parse(&req.dtype)?;
    let optimizer = Optimizer::parse(&req.optimizer)?;
    let strategy = Strategy::parse(&req.strategy)?;
    let gpu = gpus::find(&req.gpu).ok_or_else(|| {
        flag(
            "--gpu",
            format!(
                "unknown GPU `{}`; expected one of {}",
                req.gpu.trim(),
                gpus::names()
            ),
        )
    })?;
    let attention_eager = match req.attention.trim().to_ascii_lowercase().as_str() {
        "flash" | "sdpa" | "flash-attention" | "flash_attention_2" => false,
        "eager" => true,
        other => {
            return Err(flag(
                "--attention",
                format!(
                    "unknown attention `{other}`; expected flash (flash attention / SDPA) or eager"
                ),
            ))
        }
    };
    if req.batch == 0 || req.batch > MAX_BATCH {
        return Err(flag(
            "--batch",
            format!("got {}, expected 1 to {MAX_BATCH}", req.batch),
        ));
    }
    if req.gpus == 0 || req.gpus > MAX_GPUS {
        return Err(flag(
            "--gpus",
            format!("got {}, expected 1 to {MAX_GPUS}", req.gpus),
        ));
    }
    if let Some(s) = req.seq_len {
        if s == 0 || s > crate::model::config::limits::MAX_CONTEXT {
            return Err(flag(
                "--seq-len",
                format!(
                    "got {s}, expected 1 to {}",
                    crate::model::config::limits::MAX_CONTEXT
                ),
            ));
        }
    }
    // Below 0.1% no GPU plan makes sense, and the times would run to hundreds of digits.
    if !(req.mfu >= 1e-3 && req.mfu <= 1.0) {
        return Err(flag(
            "--mfu",
            format!(
                "got {}, expected a fraction in [0.001, 1], e.g. 0.4",
                crate::error::shown(req.mfu)
            ),
        ));
    }
    if dtype == Dtype::Int8 && matches!(method, Method::Full) {
        return Err(flag(
            "--dtype",
            "int8 weights cannot be trained in full fine-tuning; use --method lora (frozen int8 base) or a floating-point dtype",
        ));
    }
    if method == Method::Qlora && !matches!(dtype, Dtype::Bf16 | Dtype::Fp16 | Dtype::Fp32) {
        return Err(flag(
            "--dtype",
            format!(
                "QLoRA stores its weights in NF4 and computes in bf16, fp16 or fp32; got {}",
                dtype.as_str()
            ),
        ));
    }
    if !method.is_lora() {
        if req.rank.is_some() {
            return Err(flag("--rank", "only for --method lora, qlora or dora"));
        }
        if req.targets.is_some() {
            return Err(flag("--targets", "only for --method lora, qlora or dora"));
        }
    }
    if method != Method::PromptTuning && req.virtual_tokens.is_some() {
        return Err(flag("--virtual-tokens", "only for --method prompt-tuning"));
    }
    let tokens_given = req
        .tokens
        .as_deref()
        .map(|t| parse_count("--tokens", t, MAX_TOKENS))
        .transpose()?;
    let budget = req
        .flops_budget
        .as_deref()
        .map(|c| parse_count("--flops-budget", c, MAX_FLOPS_BUDGET))
        .transpose()?;
    if tokens_given.is_some_and(|t| t < 1.0) {
        return Err(flag("--tokens", "expected at least 1 token"));
    }
    if let Some(c) = budget {
        check_flops_budget(c)?;
    }
    let params_given = req
        .params
        .as_deref()
        .map(|p| parse_count("--params", p, MAX_PARAMS))
        .transpose()?;
    if params_given.is_some_and(|p| p < 1.0) {
        return Err(flag("--params", "expected at least 1 parameter"));
    }

    let mut notes = Vec::new();
    let shape = match (&req.model, params_given) {
        (Some(_), Some(_)) => {
            return Err(flag(
                "--params",
                "give --model or --params, not both (the model's config has the count)",
            ))
        }
        (Some(_), None) if req.shape.any() => {
            return Err(flag(
                "--layers",
                "the shape flags (--layers, --hidden, --heads, --kv-heads, --vocab, --intermediate) go with --params, not --model",
            ))
        }
        (Some(m), None) => shape::from_model(m)?,
        (None, p) => shape::derived(p.map(|p| p.round() as u64), &req.shape)?,
    };
    if shape.family == "llama-like" {
        notes.push(format!(
            "shape {}: {} layers, hidden {}, {} heads ({} kv) of {}, MLP {}, vocabulary {} (a LLaMA-style decoder; pass --layers/--hidden/--heads/--kv-heads/--intermediate/--vocab to change it)",
            shape.source, shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.vocab
        ));
    }
    let seq_len = req.seq_len.map(|s| s as u64).unwrap_or_else(|| {
        shape
            .context
            .map_or(DEFAULT_SEQ_LEN as u64, |c| c.min(DEFAULT_SEQ_LEN as u64))
    });
    if let Some(ctx) = shape.context.filter(|&c| seq_len > c) {
        notes.push(format!(
            "--seq-len {seq_len} is longer than the model's context window ({ctx}): planned as asked, as for context extension"
        ));
    }

    // Trainable parameters.
    let psi = shape.params as f64;
    let mut targets_used = None;
    let mut adapted_modules = 0u64; // module instances carrying an adapter
    let mut rank_used = None;
    let mut virt = None;
    let trainable: u64 = match method {
        Method::Full => shape.params,
        Method::Lora | Method::Qlora | Method::Dora => {
            let r = req.rank.unwrap_or(DEFAULT_RANK);
            if r == 0 || r > crate::model::config::limits::MAX_WIDTH {
                return Err(flag("--rank", format!("got {r}, expected at least 1")));
            }
            let groups = select_targets(&shape, req.targets.as_deref())?;
            let mut t = 0u64;
            for g in &groups {
                if r as u64 > g.in_features.min(g.out_features) {
                    notes.push(format!(
                        "rank {r} is more than `{}`'s smaller side ({}): the adapter is not low-rank there",
                        g.name,
                        g.in_features.min(g.out_features)
                    ));
                }
                let per = r as u64 * (g.in_features + g.out_features)
                    + if method == Method::Dora {
                        g.out_features
                    } else {
                        0
                    };
                t += per * g.count;
                adapted_modules += g.count;
            }
            rank_used = Some(r as u64);
            targets_used = Some(groups.iter().map(|g| g.name.clone()).collect());
            t
        }
        Method::PromptTuning => {
            let v = req.virtual_tokens.unwrap_or(DEFAULT_VIRTUAL_TOKENS);
            if v == 0 || v > MAX_VIRTUAL_TOKENS {
                return Err(flag(
                    "--virtual-tokens",
                    format!("got {v}, expected 1 to {MAX_VIRTUAL_TOKENS}"),
                ));
            }
            virt = Some(v as u64);
            // PEFT gives an encoder-decoder a prompt for each stack (num_transformer_submodules 2).
            let stacks = if shape.family == "t5" { 2 } else { 1 };
            stacks * v as u64 * shape.hidden
        }
    };
    let t = trainable as f64;
    let positions = seq_len + virt.unwrap_or(0);

    // Model states, unsharded.
    let states = optimizer.state_bytes();
    let linear = (shape.linear_params() as f64).min(psi);
    let (weights, grads, opt) = match method {
        Method::Full => {
            let wb = dtype.weight_bytes();
            let master = if dtype.is_16bit() { 4.0 } else { 0.0 };
            (psi * wb, psi * wb, psi * (states + master))
        }
        _ => {
            // Frozen base: the block linears in the storage type, the rest (embeddings, norms,
            // head) in the compute type (16 bits for int8 and NF4 bases).
            let other_bytes = if dtype == Dtype::Int8 {
                2.0
            } else {
                dtype.weight_bytes()
            };
            let linear_bytes = match method {
                Method::Qlora => crate::inspect::weight_bytes_per_param("nf4"),
                _ => dtype.weight_bytes(),
            };
            let frozen = linear * linear_bytes + (psi - linear) * other_bytes;
            // Adapters are fp32 (PEFT's autocast_adapter_dtype): their own master copy.
            (frozen + t * 4.0, t * 4.0, t * states)
        }
    };
    let (shard_w, shard_g, shard_o) = strategy.shards();
    let nd = req.gpus as f64;
    let per = |x: f64, sharded: bool| if sharded { x / nd } else { x };
    let (weights, grads, opt) = (
        per(weights, shard_w),
        per(grads, shard_g),
        per(opt, shard_o),
    );
    if req.gpus == 1 && strategy != Strategy::Ddp {
        notes.push(format!(
            "{} with one GPU shards nothing: give --gpus",
            strategy.label()
        ));
    }

    // Activations for one micro-batch on one device.
    let (b, s) = (req.batch as f64, positions as f64);
    let (h, a, l) = (shape.hidden as f64, shape.heads as f64, shape.layers as f64);
    let attn_matrix = if attention_eager {
        5.0 * a * s * s * b
    } else {
        0.0
    };
    let one_layer = 34.0 * s * b * h + attn_matrix;
    let layers_bytes = if req.gradient_checkpointing {
        l * 2.0 * s * b * h + one_layer
    } else {
        l * one_layer
    };
    let act_scale = dtype.activation_scale();
    let logits = if shape.head_matmul_params > 0 {
        8.0 * b * s * shape.vocab as f64
    } else {
        0.0
    };
    let lora_products = match rank_used {
        Some(r) => 2.0 * act_scale * b * s * r as f64 * adapted_modules as f64,
        None => 0.0,
    };
    let activations = (layers_bytes * act_scale) + logits + lora_products;
    let activations_formula = format!(
        "Korthikanti et al.: per layer {} bytes at 16 bits{}{}{}; {} logits and their gradient in fp32 (8·s·b·V)",
        if attention_eager {
            "s·b·h·(34 + 5·a·s/h) (eager attention keeps the s×s scores)"
        } else {
            "34·s·b·h (flash attention / SDPA: no 5·a·s/h term)"
        },
        if req.gradient_checkpointing {
            "; gradient checkpointing: each layer's input (2·s·b·h) plus one layer recomputed"
        } else {
            ", every layer kept (no recomputation)"
        },
        if act_scale > 1.0 { "; ×2 for fp32" } else { "" },
        if lora_products > 0.0 {
            "; plus each LoRA product x·Aᵀ"
        } else {
            ""
        },
        if logits > 0.0 { "plus the" } else { "no LM head, no" },
    );
    // Buffers: context, fragmentation, ZeRO-3's gathered layers.
    let states_and_act = weights + grads + opt + activations;
    let gathered = if strategy == Strategy::Zero3 && req.gpus > 1 {
        let linear_bytes = match method {
            Method::Qlora => crate::inspect::weight_bytes_per_param("nf4"),
            _ => dtype.weight_bytes(),
        };
        2.0 * (linear / l.max(1.0)) * linear_bytes
    } else {
        0.0
    };
    let buffers = CONTEXT_BYTES as f64 + FRAGMENTATION * states_and_act + gathered;

    let to_bytes = |x: f64, what: &str| -> Result<u64> {
        let v = x.ceil();
        if !v.is_finite() || v >= 9.0e18 {
            return Err(flag(
                what,
                "the memory estimate is past 9 exabytes: the numbers are absurd",
            ));
        }
        Ok(v as u64)
    };
    let weights = to_bytes(weights, "--params")?;
    let gradients = to_bytes(grads, "--params")?;
    let optimizer_b = to_bytes(opt, "--params")?;
    let activations = to_bytes(activations, "--batch")?;
    let buffers = to_bytes(buffers, "--params")?;
    let total = [gradients, optimizer_b, activations, buffers]
        .iter()
        .try_fold(weights, |acc, &x| acc.checked_add(x))
        .filter(|&t| t < 9_000_000_000_000_000_000)
        .ok_or_else(|| {
            flag(
                "--batch",
                "the memory estimate overflows: the numbers are absurd",
            )
        })?;
    let per_device = PerDevice {
        weights,
        gradients,
        optimizer: optimizer_b,
        activations,
        buffers,
        total,
    };
    let fits = total <= gpu.memory_bytes;

    // Compute.
    let step_tokens = b * seq_len as f64 * nd;
    let (tokens, tokens_source) = match tokens_given {
        Some(d) => (d, "--tokens".to_string()),
        None => (step_tokens, "one step (batch × seq-len × gpus)".to_string()),
    };
    let n_c = shape.compute_params() as f64;
    // Positions per data token: prompt tuning's virtual tokens ride along with every sequence.
    let pos_per_token = positions as f64 / seq_len as f64;
    let attn_term = 6.0 * l * positions as f64 * shape.attn_width() as f64;
    let (per_token, flops_formula) = match method {
        Method::Full => (
            (6.0 * n_c + attn_term) * pos_per_token,
            "6·N·D + 6·n_layer·n_ctx·d_attn·D (N: the weights that multiply; full fine-tuning)".to_string(),
        ),
        Method::PromptTuning => (
            (4.0 * n_c + attn_term) * pos_per_token,
            "(4·N·D + 6·n_layer·n_ctx·d_attn·D) × (seq + virtual)/seq: frozen weights get no weight gradients (forward 2N, input gradients 2N)".to_string(),
        ),
        _ => (
            (4.0 * n_c + 6.0 * t + attn_term) * pos_per_token,
            "4·N·D + 6·N_adapter·D + 6·n_layer·n_ctx·d_attn·D: frozen weights get no weight gradients (forward 2N, input gradients 2N)".to_string(),
        ),
    };
    let flops = per_token * tokens;
    let (peak_tflops, peak_precision) = dtype.peak(&gpu.peak_tflops);
    let peak = peak_tflops * 1e12;
    let throughput = nd * peak * req.mfu;
    let time_s = flops / throughput;
    let step_time_s = per_token * step_tokens / throughput;
    if req.gradient_checkpointing {
        notes.push(
            "gradient checkpointing runs each forward twice (+2·N per token): at the same MFU of model FLOPs the time grows about a third; lower --mfu to plan for it".into(),
        );
    }
    if dtype == Dtype::Int8 {
        notes.push(
            "int8 weights are planned at the 16-bit peak: bitsandbytes' backward runs in 16 bits"
                .into(),
        );
    }

    let compute_optimal = budget.map(compute_optimal);
    let rules = RulesOfThumb {
        full_ft_bytes_per_param: [16.0, 20.0],
        full_ft_bytes: [(16.0 * psi) as u64, (20.0 * psi) as u64],
        detailed_bytes_per_param: total as f64 / psi.max(1.0),
        flops_6nd: 6.0 * psi * tokens,
        chinchilla_tokens: TOKENS_PER_PARAM * psi,
    };
    Ok(Plan {
        method,
        dtype,
        optimizer,
        strategy,
        gpu: GpuInfo {
            name: gpu.name.into(),
            label: gpu.label.into(),
            memory_bytes: gpu.memory_bytes,
            peak_tflops: gpu.peak_tflops,
        },
        gpus: req.gpus as u64,
        batch: req.batch as u64,
        seq_len,
        positions,
        gradient_checkpointing: req.gradient_checkpointing,
        attention: if attention_eager { "eager" } else { "flash" }.into(),
        rank: rank_used,
        targets: targets_used,
        virtual_tokens: virt,
        params: shape.params,
        trainable_params: trainable,
        per_device,
        activations_formula,
        gpu_memory_bytes: gpu.memory_bytes,
        fits,
        headroom_bytes: gpu.memory_bytes as i64 - total as i64,
        tokens,
        tokens_source,
        flops_per_token: per_token,
        flops,
        flops_formula,
        petaflop_s_days: flops / (1e15 * 86400.0),
        mfu: req.mfu,
        peak_flops_per_gpu: peak,
        peak_precision: peak_precision.into(),
        time_s,
        steps: (tokens / step_tokens).ceil(),
        step_time_s,
        tokens_per_s: step_tokens / step_time_s,
        chinchilla_tokens: TOKENS_PER_PARAM * psi,
        compute_optimal,
        rules_of_thumb: rules,
        notes,
        model: shape,
    })
}

/// Only the compute-optimal N and D for `--flops-budget` (no model given).
pub fn plan_budget_only(budget: &str) -> Result<ComputeOptimal> {
    let c = parse_count("--flops-budget", budget, MAX_FLOPS_BUDGET)?;
    check_flops_budget(c)?;
    Ok(compute_optimal(c))
}

/// The same floor with or without a model: below it the fitted law's optimum is not a model.
fn check_flops_budget(c: f64) -> Result<()> {
    if c < MIN_FLOPS_BUDGET {
        return Err(flag(
            "--flops-budget",
            format!("expected at least {MIN_FLOPS_BUDGET:e} FLOPs (the fitted scaling law says nothing about smaller budgets)"),
        ));
    }
    Ok(())
}

/// The linear groups `targets` names (comma-separated, PEFT's suffix match, or `all-linear`);
/// `None`: the family's PEFT default. A name that matches no module is an error listing them.
fn select_targets(shape: &ModelShape, targets: Option<&str>) -> Result<Vec<LinearGroup>> {
    let names: Vec<String> = match targets {
        None => shape
            .default_targets
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Some(t) => t
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    if names.is_empty() {
        return Err(flag(
            "--targets",
            "empty; give module names such as q_proj,v_proj or all-linear",
        ));
    }
    if names.iter().any(|n| n == "all-linear") {
        return Ok(shape.linears.clone());
    }
    let matches = |g: &LinearGroup, t: &str| {
        g.name == t || g.name.ends_with(&format!(".{t}")) || t.ends_with(&format!(".{}", g.name))
    };
    for t in &names {
        if !shape.linears.iter().any(|g| matches(g, t)) {
            return Err(flag(
                "--targets",
                format!(
                    "`{t}` matches no linear module of this model (its linears: {}, or all-linear)",
                    shape
                        .linears
                        .iter()
                        .map(|g| g.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(shape
        .linears
        .iter()
        .filter(|g| names.iter().any(|t| matches(g, t)))
        .cloned()
        .collect())
}

pub mod text;

#[cfg(test)]
mod tests;
