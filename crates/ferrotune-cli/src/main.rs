//! The `ferrotune` command: a thin layer over the library.
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use ferrotune::fsutil::{self, Input};
use ferrotune::generate::{decoder_for, generate, Engine, GenerationConfig};
use ferrotune::icl::{read_jsonl, FewShot, Template};
use ferrotune::model::{self, ArchitectureKind, LoadOptions, LoadedModel};
use ferrotune::progress::Bar;
use ferrotune::tokenizer::ChatMessage;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

mod launch;

/// `--quiet`: no progress bars and no informational lines on stderr.
static QUIET: AtomicBool = AtomicBool::new(false);

/// An informational line on stderr (silenced by `--quiet`).
macro_rules! info {
    ($($arg:tt)*) => {
        if !QUIET.load(Ordering::Relaxed) {
            eprintln!($($arg)*);
        }
    };
}

/// A warning about a valid but odd input, on stderr (printed even with `--quiet`).
macro_rules! warn {
    ($($arg:tt)*) => {
        eprintln!("warning: {}", format!($($arg)*));
    };
}

// After the macros above, which it uses.
mod serve;

/// The progress bar of a long command: shown on a terminal, never with `--quiet`.
fn bar() -> Bar {
    Bar::stderr(QUIET.load(Ordering::Relaxed))
}

/// Most worker threads `--threads` accepts: more is a typo, and each one is an OS thread.
pub(crate) const MAX_THREADS: usize = 1024;

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "Adapt pre-trained LLMs: prompt, fine-tune, evaluate, ship."
)]
struct Cli {
    /// No progress bars and no informational lines on stderr (warnings and errors still print).
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Command,
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Generate text (plain prompt, chat, or few-shot).
    Generate(GenerateArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (adapters per request, batching).
    Serve(serve::ServeArgs),
    /// Show a model's architecture, size, stored types and memory needs.
    Inspect(InspectArgs),
    /// Perplexity of a model on a text or JSONL file.
    Perplexity(PerplexityArgs),
    /// Write a model as a Hugging Face folder (safetensors; quantized weights are dequantized).
    Convert(ConvertArgs),
    /// Score predictions made elsewhere: ROUGE-1/2/L/Lsum (rouge-score), BLEU (sacrebleu), exact match.
    Score(ScoreArgs),
    /// Fine-tune (LoRA, full, selective; any task or pre-training objective) from a TOML config; --resume continues from the newest checkpoint.
    Train(TrainArgs),
    /// Start N ranks of a distributed run on this machine (Open MPI; the `mpi` feature):
    /// `ferrotune launch --nproc 2 -- train --config run.toml`.
    Launch(launch::LaunchArgs),
    /// Fold an adapter into its base model and write an HF folder (or, with --format gguf, a GGUF file).
    Merge(MergeArgs),
    /// Write a model (optionally with a LoRA / IA3 adapter merged) as a quantized file:
    /// `--to f32|f16|bf16|q8_0|q4_0|q4_1|q5_0|q5_1|q4_k_m|q5_k_m|q6_k --out FILE.gguf` (GGUF v3
    /// with llama.cpp's per-tensor type mix and its quantizers' bytes), or `--to nf4|fp4|int8
    /// --out DIR` (an HF folder in bitsandbytes' layout).
    Quantize(QuantizeArgs),
    /// Generate over a data file with the base model and each adapter; score them side by side.
    Eval(EvalArgs),
    /// Sentence embeddings from a BERT-family encoder: one JSON line {"embedding": [...]} per row.
    Embed(EmbedArgs),
    /// Classify a data file's rows with a sequence-classification model; accuracy and macro-F1.
    Classify(ClassifyArgs),
    /// Run several fine-tuning methods on one config (same data, steps, seed) and print the trade-off table.
    Compare(CompareArgs),
    /// Run lm-evaluation-harness task files (YAML) on a model, with lm-eval's prompts, metrics,
    /// standard errors and results layout; with --adapter, the forgetting table against the base.
    Bench(BenchArgs),
    /// Plan a training run before renting a GPU: memory per device (weights, gradients,
    /// optimizer, activations, buffers) and whether it fits, FLOPs, time, Chinchilla tokens.
    Plan(PlanArgs),
    /// Inspect training data.
    Data {
        #[command(subcommand)]
        cmd: DataCommand,
    },
    /// Work with PEFT adapters (soft-prompt readout).
    Peft {
        #[command(subcommand)]
        cmd: PeftCommand,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Adapter folders: each is benchmarked after the base, and a forgetting table compares
    /// them (paired bootstrap over the same documents).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Comma-separated: task YAML files, folders of them, or shipped task names (sst2,
    /// dialogsum, self_instruct, mmlu_abstract_algebra, hellaswag, arc_easy, arc_challenge,
    /// boolq, piqa, winogrande).
    #[arg(long)]
    tasks: String,
    /// Few-shot examples per prompt (default: each task's num_fewshot, else 0).
    #[arg(long)]
    num_fewshot: Option<usize>,
    /// Score the first N documents of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Sequences per scoring pass (recorded in the results); a batch's common prefix (few-shot
    /// examples, a question before its choices) runs once.
    #[arg(long, default_value_t = ferrotune::bench::DEFAULT_BATCH_SIZE, allow_negative_numbers = true)]
    batch_size: usize,
    /// Wrap each prompt in the model's chat template (recorded in the results).
    #[arg(long)]
    apply_chat_template: bool,
    /// Also write per-sample logs: samples_<task>.jsonl beside --output (needs --output).
    #[arg(long)]
    log_samples: bool,
    /// Results file (lm-eval's layout; with adapters: {"base", "adapters", "forgetting"}).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing --output file (never an input).
    #[arg(long, requires = "output")]
    overwrite: bool,
    /// Print lm-eval's `results` object on one line (one line per model with adapters).
    #[arg(long)]
    json: bool,
    /// The few-shot sampler's seed (lm-eval's --fewshot_random_seed).
    #[arg(long, default_value_t = ferrotune::bench::FEWSHOT_SEED)]
    fewshot_seed: u64,
}

#[derive(Args)]
struct ScoreArgs {
    /// JSONL rows {"prediction", "reference"} or {"prediction", "references": [...]}.
    #[arg(long)]
    predictions: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A .gguf file, an HF folder, or hf:org/name[@revision].
    #[arg(long)]
    model: String,
    /// Hold dense weights in this dtype (f32, bf16, f16); default: as stored.
    #[arg(long)]
    dtype: Option<String>,
    /// Dequantize quantized (GGUF) weights to dense at load.
    #[arg(long)]
    dequantize: bool,
    /// Re-quantize weights at load (q8_0, q4_0, q4_1, q4k, q6k, ...).
    #[arg(long)]
    requantize: Option<String>,
    /// Quantize the decoder's linear weights at load, as `train.base_quant` does: nf4, fp4
    /// (bitsandbytes' 4-bit, double quantization on), int8, q8_0, q4_0, q4_1.
    #[arg(long)]
    base_quant: Option<String>,
    /// Compute device: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Worker threads (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<usize>,
    /// Precision of the activations quantized weights (GGUF, --requantize, --base-quant) are
    /// multiplied with: 16 (default; within about 1e-4 of f32) or 8 (llama.cpp's: faster
    /// decoding, most of all batched in `serve`, at about +0.1% NLL).
    #[arg(long, allow_negative_numbers = true)]
    activation_bits: Option<i64>,
    /// Element type of the decode engine's KV cache (LLaMA family on CPU: `generate`,
    /// `serve`): f32 (default, exact) or f16 (llama.cpp's default: half the cache memory, and
    /// faster batched decoding in `serve`, where the caches are read from DRAM).
    #[arg(long)]
    kv_cache: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    /// Sample from the k most likely tokens (at least 1).
    #[arg(long, allow_negative_numbers = true)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Divide the logits of tokens already present by this (> 0; 1 = no penalty).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Stop when this string is generated (repeatable; not empty).
    #[arg(long, value_parser = non_empty_stop)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// JSONL file of examples for few-shot prompting.
    #[arg(long, requires = "template")]
    shots: Option<PathBuf>,
    /// Number of examples to put in the prompt (0 = zero-shot).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    k: usize,
    /// Example template with {field} placeholders (repeatable: one is picked per example).
    #[arg(long)]
    template: Vec<String>,
    /// Text between examples.
    #[arg(long, default_value = "\n\n")]
    shot_separator: String,
    /// Pick the k shots at random (seeded) instead of the first k.
    #[arg(long)]
    random_shots: bool,
    /// Print one JSON line instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Decoding engine: auto (the fast CPU engine when it supports the model) or model.
    #[arg(long, default_value = "auto", value_parser = ["auto", "model"])]
    engine: String,
    /// PEFT adapter folder to apply (repeatable: all are active).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Beam search with this many beams (encoder-decoder models such as T5; 1 = no beams).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    num_beams: usize,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(long)]
    json: bool,
    /// Batch size for the training-memory estimate.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    batch: usize,
    /// Sequence length for the training-memory estimate (default: 512, or the context length
    /// when that is shorter).
    #[arg(long, allow_negative_numbers = true)]
    seq_len: Option<usize>,
}

#[derive(Args)]
struct PlanArgs {
    /// A .gguf file, an HF folder, or hf:org/name[@revision] (only the config is read).
    #[arg(long)]
    model: Option<String>,
    /// Parameter count instead of a model: 7e9, 7B, 135M (a LLaMA-style shape is derived
    /// unless the shape flags give it).
    #[arg(long, allow_hyphen_values = true)]
    params: Option<String>,
    /// Shape with --params: transformer layers.
    #[arg(long, allow_negative_numbers = true)]
    layers: Option<usize>,
    /// Shape with --params: hidden size.
    #[arg(long, allow_negative_numbers = true)]
    hidden: Option<usize>,
    /// Shape with --params: attention heads.
    #[arg(long, allow_negative_numbers = true)]
    heads: Option<usize>,
    /// Shape with --params: key/value heads (GQA; default: --heads).
    #[arg(long, allow_negative_numbers = true)]
    kv_heads: Option<usize>,
    /// Shape with --params: vocabulary size (default 32000).
    #[arg(long, allow_negative_numbers = true)]
    vocab: Option<usize>,
    /// Shape with --params: MLP width.
    #[arg(long, allow_negative_numbers = true)]
    intermediate: Option<usize>,
    /// full, lora, qlora, dora or prompt-tuning.
    #[arg(long, default_value = "full")]
    method: String,
    /// Weights and compute: bf16, fp16, fp32, tf32, or int8 (a frozen LoRA base).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// adamw, adamw-8bit or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// LoRA rank (lora, qlora, dora; default 8).
    #[arg(long, allow_negative_numbers = true)]
    rank: Option<usize>,
    /// LoRA target modules, comma-separated, or all-linear (default: PEFT's, e.g. q_proj,v_proj).
    #[arg(long)]
    targets: Option<String>,
    /// Prompt tuning's virtual tokens (default 20).
    #[arg(long, allow_negative_numbers = true)]
    virtual_tokens: Option<usize>,
    /// Micro-batch per device (sequences).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    batch: usize,
    /// Tokens per sequence (default: 2048, or the model's context when shorter).
    #[arg(long, allow_negative_numbers = true)]
    seq_len: Option<usize>,
    /// Data-parallel devices.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    gpus: usize,
    /// a100, a100-40gb, h100, h100-pcie, h200 or l4.
    #[arg(long, default_value = "h100")]
    gpu: String,
    /// ddp, zero1, zero2, zero3 (fsdp).
    #[arg(long, default_value = "ddp")]
    strategy: String,
    /// Plan with gradient (activation) checkpointing.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// flash (flash attention / SDPA) or eager (keeps the s×s attention scores).
    #[arg(long, default_value = "flash")]
    attention: String,
    /// Training tokens, e.g. 1.4e12 or 2B (default: one step).
    #[arg(long, allow_hyphen_values = true)]
    tokens: Option<String>,
    /// A FLOP budget, e.g. 1e21: Chinchilla's compute-optimal parameters and tokens for it
    /// (alone, without a model, prints just that).
    #[arg(long, allow_hyphen_values = true)]
    flops_budget: Option<String>,
    /// Model FLOPs utilization assumed for the time estimate.
    #[arg(long, default_value_t = ferrotune::plan::DEFAULT_MFU, allow_negative_numbers = true)]
    mfu: f64,
    /// One JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Text file, or JSONL with a "text" field per line (decoders: every token given the ones
    /// before it).
    #[arg(long, required_unless_present = "data", conflicts_with = "data")]
    file: Option<PathBuf>,
    /// Data file (JSONL, JSON, CSV, Parquet): the completion of each row given its prompt
    /// (decoders and encoder-decoders), with --template and --completion.
    #[arg(long, requires_all = ["template", "completion"], conflicts_with_all = ["window", "stride"])]
    data: Option<PathBuf>,
    /// Prompt template with {field} placeholders (with --data).
    #[arg(long, requires = "data")]
    template: Option<String>,
    /// Completion template with {field} placeholders (with --data): the tokens scored, EOS
    /// included.
    #[arg(long, requires = "data")]
    completion: Option<String>,
    /// Tokens per window, at least 2 (default: the model's context length).
    #[arg(long, allow_negative_numbers = true)]
    window: Option<usize>,
    /// Tokens between window starts, at least 1 (default: half the window).
    #[arg(long, allow_negative_numbers = true)]
    stride: Option<usize>,
    #[arg(long)]
    json: bool,
    /// PEFT adapter folder to apply (repeatable: all are active).
    #[arg(long)]
    adapter: Vec<PathBuf>,
}

#[derive(Args)]
struct ConvertArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Output HF folder: written whole into a temporary sibling, then renamed into place.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out even if it holds files ferrotune did not write (never an input).
    #[arg(long)]
    overwrite: bool,
    /// Stored dtype of the written weights: f32, bf16 or f16.
    #[arg(long = "out-dtype", default_value = "f32")]
    out_dtype: String,
}

/// A dense dtype given to `flag` (`--dtype`, `--out-dtype`).
fn parse_dtype(flag: &str, s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "fp16" | "float16" => DType::F16,
        other => bail!("{flag} `{other}`: expected f32, bf16 or f16"),
    })
}

/// Library range errors name the field (`top_p`); on the command line it is the flag (`--top-p`).
fn flag_error(e: ferrotune::Error) -> anyhow::Error {
    match e {
        ferrotune::Error::Key { key, what, .. } => {
            anyhow!("--{}: {what}", key.replace('_', "-"))
        }
        e => e.into(),
    }
}

/// An input file of `flag`, checked before anything slow (loading the model) starts.
fn input_file(flag: &str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!("{flag} {}: is a folder, expected a file", path.display()),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{flag} {}: no such file", path.display())
        }
        Err(e) => bail!("{flag} {}: {e}", path.display()),
    }
}

/// An input folder of `flag` (a PEFT adapter), checked before the model is loaded.
fn input_dir(flag: &str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => bail!(
            "{flag} {}: is a file, expected a folder (a PEFT adapter folder)",
            path.display()
        ),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{flag} {}: no such folder", path.display())
        }
        Err(e) => bail!("{flag} {}: {e}", path.display()),
    }
}

fn parse_ggml(s: &str) -> Result<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as G;
    Ok(match s.to_ascii_lowercase().replace('_', "").as_str() {
        "q80" => G::Q8_0,
        "q40" => G::Q4_0,
        "q41" => G::Q4_1,
        "q50" => G::Q5_0,
        "q51" => G::Q5_1,
        "q4k" => G::Q4K,
        "q5k" => G::Q5K,
        "q6k" => G::Q6K,
        "q8k" => G::Q8K,
        other => bail!(
            "--requantize `{other}`: expected q8_0, q4_0, q4_1, q5_0, q5_1, q4k, q5k, q6k or q8k"
        ),
    })
}

fn device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ord = s
                .strip_prefix("cuda")
                .and_then(|r| r.strip_prefix(':'))
                .unwrap_or("0");
            let ord: usize = ord
                .parse()
                .map_err(|_| anyhow!("--device `{s}`: expected cuda or cuda:N"))?;
            Device::new_cuda(ord).map_err(|e| {
                anyhow!(
                    "--device {s}: {}",
                    ferrotune::error::first_line(&e.to_string())
                )
            })
        }
        other => bail!("--device `{other}`: expected cpu or cuda[:N]"),
    }
}

impl ModelArgs {
    /// The flags' values, checked before the model is loaded.
    fn load_options(&self) -> Result<LoadOptions> {
        if let Some(n) = self.threads {
            if n == 0 || n > MAX_THREADS {
                bail!("--threads {n}: expected 1 to {MAX_THREADS}");
            }
        }
        self.activation()?;
        self.kv_dtype()?;
        Ok(LoadOptions {
            dtype: self
                .dtype
                .as_deref()
                .map(|s| parse_dtype("--dtype", s))
                .transpose()?,
            dequantize: self.dequantize,
            requantize: self.requantize.as_deref().map(parse_ggml).transpose()?,
            base_quant: match self.base_quant.as_deref() {
                Some(_) if self.dequantize || self.requantize.is_some() => bail!(
                    "--base-quant and --dequantize / --requantize contradict each other: choose one"
                ),
                None => None,
                Some(s) => ferrotune::quant::BaseQuant::parse(s, true)
                    .map_err(|e| anyhow::anyhow!("--base-quant {e}"))?,
            },
            head: None,
            placeholders: None,
        })
    }
}

impl ModelArgs {
    /// `--activation-bits` as a kernel precision (None: the weights' default).
    fn activation(&self) -> Result<Option<ferrotune::quant::ActPrecision>> {
        use ferrotune::quant::ActPrecision;
        match self.activation_bits {
            None => Ok(None),
            Some(8) => Ok(Some(ActPrecision::I8)),
            Some(16) => Ok(Some(ActPrecision::I16)),
            Some(n) => bail!("--activation-bits {n}: expected 8 or 16"),
        }
    }

    /// `--kv-cache` (None: the engine's default, f32).
    fn kv_dtype(&self) -> Result<Option<ferrotune::engine::KvDtype>> {
        self.kv_cache
            .as_deref()
            .map(|s| {
                ferrotune::engine::KvDtype::parse(s)
                    .ok_or_else(|| anyhow!("--kv-cache `{s}`: expected f32 or f16"))
            })
            .transpose()
    }

    /// Apply the flags that set how a loaded model computes (`--activation-bits`,
    /// `--kv-cache`); a flag with nothing to act on (a model without quantized weights, a
    /// family the decode engine does not run) is a warning, not silence.
    fn configure(&self, model: &dyn model::Model) -> Result<()> {
        if let Some(dtype) = self.kv_dtype()? {
            match model.downcast_ref::<model::Llama>() {
                Some(llama) => llama.set_kv_cache_dtype(dtype),
                None => {
                    warn!(
                        "--kv-cache has no effect: {} is a {} model; the decode engine whose \
                         cache it sets runs the LLaMA family",
                        self.model,
                        model.family()
                    );
                }
            }
        }
        if let Some(activation) = self.activation()? {
            if !has_quantized_weights(model) {
                warn!(
                    "--activation-bits has no effect: {} has no quantized weights \
                     (a GGUF file, --requantize or --base-quant has)",
                    self.model
                );
            }
            model.set_quant_settings(ferrotune::quant::QuantSettings {
                activation,
                ..model.quant_settings()
            });
        }
        Ok(())
    }
}

/// Whether any linear or embedding of `model` is held quantized.
fn has_quantized_weights(model: &dyn model::Model) -> bool {
    use ferrotune::nn::{EmbeddingWeight, LinearWeight};
    model
        .linears()
        .iter()
        .any(|l| matches!(l.weight(), LinearWeight::Quantized(_)))
        || model
            .embeddings()
            .iter()
            .any(|e| matches!(e.weight(), EmbeddingWeight::Quantized(_)))
}

/// What a command that does not decode computes with the model it loads, for the flags that
/// only change how a model computes (`--kv-cache`, `--activation-bits`): naming one that the
/// command has no use for is a warning, not silence. (Decoding commands load with [`load`]:
/// every flag acts there.)
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runs {
    /// Runs whole sequences through the model's forward pass (perplexity, merge's check): no
    /// KV cache.
    Forward,
    /// Reads or writes weights only: nothing is computed with them.
    Nothing,
}

impl ModelArgs {
    fn warn_unused(&self, command: &str, runs: Runs) {
        let why = match runs {
            Runs::Forward => "it scores whole sequences in one forward pass, with no KV cache",
            Runs::Nothing => "it reads and writes weights without running the model",
        };
        if self.kv_cache.is_some() {
            warn!("--kv-cache has no effect on `{command}`: {why}");
        }
        if self.activation_bits.is_some() && runs == Runs::Nothing {
            warn!("--activation-bits has no effect on `{command}`: {why}");
        }
    }
}

/// [`load`] for a command that does not decode: warns about the flags it ignores.
fn load_for(m: &ModelArgs, command: &str, runs: Runs) -> Result<LoadedModel> {
    m.warn_unused(command, runs);
    load(m)
}

fn load(m: &ModelArgs) -> Result<LoadedModel> {
    let opts = m.load_options()?;
    set_threads(m);
    let lm = model::load_with_progress(&m.model, &opts, &device(&m.device)?, &bar())?;
    m.configure(&*lm.model)?;
    Ok(lm)
}

fn set_threads(m: &ModelArgs) {
    if let Some(n) = m.threads {
        // Read by rayon and by candle's matmul when their pools start.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        ferrotune::quant::set_num_threads(n);
    }
}

/// Print a generation as `generate` does: the text was streamed already (then a stats line on
/// stderr), or one JSON line.
fn print_generation(out: &ferrotune::generate::GenerationOutput, json: bool) {
    if json {
        let v = serde_json::json!({
            "text": out.text,
            "prompt_tokens": out.prompt_tokens,
            "generated_tokens": out.generated_tokens,
            "prompt_tokens_per_s": out.prompt_tokens_per_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
            "stop_reason": out.stop_reason.as_str(),
        });
        println!("{v}");
    } else {
        println!();
        info!(
            "[{} prompt tokens, {:.1} tok/s | {} generated, {:.1} tok/s | stop: {}]",
            out.prompt_tokens,
            out.prompt_tokens_per_s,
            out.generated_tokens,
            out.decode_tokens_per_s,
            out.stop_reason.as_str()
        );
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            input_file("--prompt-file", f)?;
            ferrotune::fsutil::read_input_text(f)?
        }
        (None, None) => bail!("give --prompt TEXT or --prompt-file FILE"),
    };
    if a.system.is_some() && !a.chat {
        bail!("--system needs --chat");
    }
    if a.shots.is_none() {
        // Few-shot flags without the examples would be ignored without a word.
        if a.k > 0 {
            bail!("--k needs --shots FILE");
        }
        if !a.template.is_empty() {
            bail!("--template needs --shots FILE (the examples it renders)");
        }
        if a.random_shots {
            bail!("--random-shots needs --shots FILE");
        }
    }
    let temperature = a
        .temperature
        .unwrap_or(if a.top_k.is_some() || a.top_p.is_some() {
            1.0
        } else {
            0.0
        });
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
        stop: a.stop.clone(),
        stop_on_eos: !a.ignore_eos,
    };
    cfg.validate().map_err(flag_error)?;
    if a.num_beams == 0 || a.num_beams > ferrotune::beam::MAX_BEAMS {
        bail!(
            "--num-beams {}: expected 1 to {} (1 decodes without beams)",
            a.num_beams,
            ferrotune::beam::MAX_BEAMS
        );
    }
    if a.num_beams > 1 {
        if cfg.temperature > 0.0 {
            bail!("--num-beams: beam search picks tokens by score; drop --temperature, --top-k and --top-p");
        }
        if cfg.repetition_penalty != 1.0 {
            bail!("--num-beams: --repetition-penalty is not supported with beam search");
        }
    }
    for d in &a.adapter {
        input_dir("--adapter", d)?;
    }
    // The few-shot prompt needs no model: a bad --shots file or --k fails before the load.
    let user_text = match &a.shots {
        None => prompt,
        Some(f) => {
            input_file("--shots", f)?;
            let templates = a
                .template
                .iter()
                .map(|t| Template::parse(t))
                .collect::<ferrotune::Result<Vec<_>>>()?;
            let fs = FewShot {
                templates,
                shots: read_jsonl(f)?,
                k: a.k,
                separator: a.shot_separator.clone(),
                random: a.random_shots,
                seed: a.seed,
            };
            fs.build(&prompt, f)?
        }
    };
    let opts = a.m.load_options()?;
    let dev = device(&a.m.device)?;
    let source = model::resolve(&a.m.model)?;
    set_threads(&a.m);
    let mut lm = model::load_source_with_progress(source, &opts, &dev, &bar())?;
    a.m.configure(&*lm.model)?;
    if lm.model.kind() == ArchitectureKind::Encoder {
        return Err(ferrotune::model::family::cannot_generate(&*lm.model).into());
    }
    if a.num_beams > 1 && lm.model.beam_decoder(&[]).is_none() {
        bail!(
            "--num-beams: beam search is available for encoder-decoder (T5) models; {} is a {}",
            a.m.model,
            lm.model.kind()
        );
    }
    attach_adapters(&mut lm, &a.adapter)?;
    let tok = &lm.tokenizer;
    let ids = if a.chat {
        let tmpl = tok.chat_template().ok_or_else(|| {
            anyhow!(
                "{}: the model has no chat template; drop --chat",
                lm.source.path().display()
            )
        })?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: user_text,
        });
        let extra =
            serde_json::json!({ "bos_token": tok.bos_token(), "eos_token": tok.eos_token() });
        let text = tmpl.render(&msgs, true, &extra)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&user_text, true)?
    };
    let ctx = lm.model.context_length().unwrap_or(usize::MAX);
    if ids.len() >= ctx && lm.model.kind() == ArchitectureKind::Decoder {
        let hint = if a.shots.is_some() {
            " (use fewer shots: lower --k)"
        } else {
            " (shorten the prompt)"
        };
        return Err(ferrotune::Error::ContextOverflow {
            tokens: ids.len(),
            context: ctx,
            hint: hint.into(),
        }
        .into());
    }
    if cfg.max_new_tokens > ctx {
        warn!(
            "--max-new-tokens {} is more than the model's context window ({ctx} tokens); generation stops at the context length",
            cfg.max_new_tokens
        );
    }
    // The allocation-free engine when it supports the model (LLaMA family, CPU, no adapters);
    // else the model's own decoder. `--engine model` forces the latter (e.g. to compare them).
    let engine = match a.engine.as_str() {
        "model" => Engine::Model,
        _ => Engine::Auto,
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let mut on_text = |t: &str| {
        if !json {
            let mut o = stdout.lock();
            let _ = o.write_all(t.as_bytes());
            let _ = o.flush();
        }
    };
    // Beam search (encoder-decoders): the best beam is known only at the end, so it is printed
    // whole rather than streamed.
    let beam_dec = if a.num_beams > 1 {
        lm.model.beam_decoder(&ids)
    } else {
        None
    };
    let out = match beam_dec {
        Some(mut dec) => {
            let beams = ferrotune::beam::BeamConfig {
                num_beams: a.num_beams,
                max_new_tokens: cfg.max_new_tokens,
                eos_ids: if cfg.stop_on_eos {
                    tok.eos_ids().to_vec()
                } else {
                    vec![]
                },
                ..Default::default()
            };
            let out = ferrotune::beam::generate(&mut *dec, tok, ids.len(), &beams, &cfg.stop)?;
            on_text(&out.text);
            out
        }
        None => {
            let mut dec = decoder_for(&*lm.model, engine)?;
            generate(&mut *dec, tok, &ids, &cfg, &mut on_text)?
        }
    };
    print_generation(&out, json);
    Ok(())
}

fn run_plan(a: PlanArgs) -> Result<()> {
    use ferrotune::plan;
    // A FLOP budget alone asks only for the compute-optimal model and data.
    let shape_given = a.layers.is_some() || a.hidden.is_some();
    if let (None, None, false, Some(budget)) = (&a.model, &a.params, shape_given, &a.flops_budget) {
        let c = plan::plan_budget_only(budget)?;
        if a.json {
            println!("{}", serde_json::json!({ "compute_optimal": c }));
        } else {
            print!("{}", plan::text::compute_optimal_text(&c));
        }
        return Ok(());
    }
    let req = plan::Request {
        model: a.model,
        params: a.params,
        shape: plan::ShapeFlags {
            layers: a.layers,
            hidden: a.hidden,
            heads: a.heads,
            kv_heads: a.kv_heads,
            vocab: a.vocab,
            intermediate: a.intermediate,
        },
        method: a.method,
        dtype: a.dtype,
        optimizer: a.optimizer,
        rank: a.rank,
        targets: a.targets,
        virtual_tokens: a.virtual_tokens,
        batch: a.batch,
        seq_len: a.seq_len,
        gpus: a.gpus,
        gpu: a.gpu,
        strategy: a.strategy,
        gradient_checkpointing: a.gradient_checkpointing,
        attention: a.attention,
        tokens: a.tokens,
        flops_budget: a.flops_budget,
        mfu: a.mfu,
    };
    let p = plan::plan(&req)?;
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        print!("{}", p.to_text());
    }
    Ok(())
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let lm = load_for(&a.m, "inspect", Runs::Nothing)?;
    let seq_len = a
        .seq_len
        .unwrap_or(512.min(lm.model.context_length().unwrap_or(512)));
    let r = ferrotune::inspect::inspect(&lm, &a.m.model, a.batch, seq_len).map_err(flag_error)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", r.to_text());
    }
    Ok(())
}

fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    use ferrotune::perplexity::{
        check_window, completion_perplexity, file_perplexity_with_progress,
    };
    let nll = if let Some(data) = &a.data {
        // Completions given prompts: any model that predicts tokens (decoders, encoder-decoders).
        input_file("--data", data)?;
        let (template, completion) = (
            a.template.as_deref().unwrap_or_default(),
            a.completion.as_deref().unwrap_or_default(),
        );
        for (flag, t) in [("--template", template), ("--completion", completion)] {
            ferrotune::icl::Template::parse(t).map_err(|e| anyhow!("{flag}: {e}"))?;
        }
        for d in &a.adapter {
            input_dir("--adapter", d)?;
        }
        let mut lm = load_for(&a.m, "perplexity", Runs::Forward)?;
        attach_adapters(&mut lm, &a.adapter)?;
        completion_perplexity(
            &*lm.model,
            &lm.tokenizer,
            data,
            template,
            completion,
            None,
            &bar(),
        )?
    } else {
        let file = a
            .file
            .as_ref()
            .expect("clap requires --file without --data");
        input_file("--file", file)?;
        let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ["json", "csv", "tsv", "parquet", "ndjson"].contains(&ext.to_ascii_lowercase().as_str())
        {
            warn!(
                "--file {}: scored as plain text (only .jsonl files are read as one \"text\" per line)",
                file.display()
            );
        }
        // The values given, before the load (the defaults depend on the model).
        check_window(a.window.unwrap_or(2), a.stride.unwrap_or(1)).map_err(flag_error)?;
        for d in &a.adapter {
            input_dir("--adapter", d)?;
        }
        let mut lm = load_for(&a.m, "perplexity", Runs::Forward)?;
        attach_adapters(&mut lm, &a.adapter)?;
        let ctx = lm.model.context_length().unwrap_or(usize::MAX);
        let mut window = a.window.unwrap_or(ctx);
        if window > ctx {
            warn!("--window {window} is longer than the model's context window; using {ctx}");
            window = ctx;
        }
        let mut stride = a.stride.unwrap_or((window / 2).max(1));
        if stride > window {
            warn!("--stride {stride} is longer than the window; using {window}");
            stride = window;
        }
        file_perplexity_with_progress(&*lm.model, &lm.tokenizer, file, window, stride, &bar())?
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tokens": nll.tokens, "nll": nll.mean(), "perplexity": nll.perplexity()})
        );
    } else {
        println!(
            "tokens {}  nll {:.5}  perplexity {:.4}",
            nll.tokens,
            nll.mean(),
            nll.perplexity()
        );
    }
    Ok(())
}

/// `--model` as an input that no output may touch: its file or folder, as given; once loaded,
/// also where it was found (for `hf:` specs, in the hub cache).
fn model_inputs(spec: &str, loaded: Option<&LoadedModel>) -> Vec<Input> {
    let given = (!spec.starts_with("hf:")).then(|| Input::new("the --model", spec));
    let found = loaded.map(|lm| Input::new("the --model", lm.source.path()));
    given.into_iter().chain(found).collect()
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    on_interrupt_remove_partial_outputs();
    let out_dtype = parse_dtype("--out-dtype", &a.out_dtype)?;
    fsutil::check_output_dir(
        &a.out,
        "--out",
        a.overwrite,
        &model_inputs(&a.m.model, None),
    )?;
    let lm = load_for(&a.m, "convert", Runs::Nothing)?;
    let inputs = model_inputs(&a.m.model, Some(&lm));
    fsutil::check_output_dir(&a.out, "--out", a.overwrite, &inputs)?;
    let quantized = lm
        .model
        .linears()
        .iter()
        .any(|l| matches!(l.weight(), ferrotune::nn::LinearWeight::Quantized(_)));
    if quantized {
        info!(
            "note: quantized weights are dequantized to {} for the HF folder",
            a.out_dtype
        );
    }
    fsutil::replace_dir(&a.out, |dir| {
        ferrotune::model::convert::write_hf_folder_dtype(&lm, dir, out_dtype)
    })?;
    info!("wrote {}", a.out.display());
    Ok(())
}

fn run_score(a: ScoreArgs) -> Result<()> {
    use ferrotune::eval::metrics::{read_predictions, score_rows_with_progress};
    input_file("--predictions", &a.predictions)?;
    let rows = read_predictions(&a.predictions)?;
    let s = score_rows_with_progress(&rows, &bar());
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("n          {}", s.n);
        println!("rouge1     {:.4}", s.rouge1);
        println!("rouge2     {:.4}", s.rouge2);
        println!("rougeL     {:.4}", s.rouge_l);
        println!("rougeLsum  {:.4}", s.rouge_lsum);
        println!("bleu       {:.2}", s.bleu);
        println!("exact      {:.4}", s.exact_match);
    }
    Ok(())
}

/// glibc's allocator hands every block above its mmap threshold (128 KiB, growing to at most
/// 32 MiB) back to the kernel when freed, and trims the heap top above 128 KiB: a training step
/// allocates and frees hundreds of activation tensors of a few MiB, so each step page-faulted
/// them in again and the kernel zeroed every page (`clear_page_erms` was a fifth of the CPU time
/// of a QLoRA step on AVX2). Keeping blocks up to 32 MiB in the heap and never trimming it
/// makes freed activations reusable: 10-15% faster steps and no higher peak RSS (measured with
/// bench/lora_train_vs_peft.py). Users' own MALLOC_* settings win.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
        unsafe {
            if !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
            if !set("MALLOC_TOP_PAD_") {
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        }
    }
}

fn main() {
    tune_allocator();
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(|s| s.as_str())
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        // `ferrotune ... | head` closes stdout early: end quietly, like a tool killed by SIGPIPE.
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error{loc}: {}",
            ferrotune::error::first_line(msg)
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and the help shown for a bare `ferrotune`.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("error: {}", usage_error_line(&e));
            std::process::exit(1);
        }
    };
    QUIET.store(cli.quiet, Ordering::Relaxed);
    if !matches!(cli.cmd, Command::Serve(_)) {
        // The library reports what it did not do as asked (e.g. a linear kept unquantized) as
        // tracing warnings; `serve` installs its own request log instead.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_target(false)
            .without_time()
            .with_ansi(false)
            .try_init();
    }
    let res = match cli.cmd {
        Command::Generate(a) => run_generate(a),
        Command::Serve(a) => serve::run_serve(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Perplexity(a) => run_perplexity(a),
        Command::Convert(a) => run_convert(a),
        Command::Score(a) => run_score(a),
        Command::Train(a) => run_train(a),
        Command::Launch(a) => launch::run(a).map(|code| {
            if code != 0 {
                std::process::exit(code)
            }
        }),
        Command::Merge(a) => run_merge(a),
        Command::Quantize(a) => run_quantize(a),
        Command::Eval(a) => run_eval(a),
        Command::Bench(a) => run_bench(a),
        Command::Embed(a) => run_embed(a),
        Command::Classify(a) => run_classify(a),
        Command::Compare(a) => run_compare(a),
        Command::Plan(a) => run_plan(a),
        Command::Data {
            cmd: DataCommand::Preview(a),
        } => run_data_preview(a),
        Command::Peft { cmd } => match cmd {
            PeftCommand::Readout(a) => run_peft_readout(a),
            PeftCommand::Combine(a) => run_peft_combine(a),
        },
    };
    if let Err(e) = res {
        print_error(&e);
        std::process::exit(1);
    }
}

/// `error: ...` on one line.
fn print_error(e: &anyhow::Error) {
    eprintln!("error: {}", error_line(e));
}

/// An error and its causes on one line.
fn error_line(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e
        .chain()
        .map(|c| ferrotune::error::first_line(&c.to_string()))
        .collect();
    chain.join(": ")
}

/// clap's message for a bad command line as one line: its text up to the usage block, e.g.
/// "invalid value 'abc' for '--temperature <TEMPERATURE>': invalid float literal".
fn usage_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_start().strip_prefix("error:").unwrap_or(&text);
    text.lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- peft: adapter tools ----

#[derive(Args)]
struct CombineArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// An adapter folder and its weight, DIR:WEIGHT (repeatable; the weight may be negative).
    #[arg(long, value_name = "DIR:WEIGHT", allow_hyphen_values = true)]
    adapter: Vec<String>,
    /// linear (same ranks; cheap, approximate), cat (exact, rank = sum of ranks) or svd (best
    /// rank-k approximation of the weighted sum).
    #[arg(long, default_value = "svd")]
    how: String,
    /// Rank of the svd result (default: the largest rank of the adapters).
    #[arg(long)]
    svd_rank: Option<usize>,
    /// Output adapter folder (PEFT's files).
    #[arg(long)]
    out: PathBuf,
    /// Replace --out even if it holds files ferrotune did not write (never an input).
    #[arg(long)]
    overwrite: bool,
}

/// `DIR:WEIGHT` (the last `:` splits, so a path may hold colons).
fn parse_weighted_adapter(s: &str) -> Result<(PathBuf, f64)> {
    let (dir, w) = s.rsplit_once(':').ok_or_else(|| {
        anyhow::anyhow!("--adapter `{s}`: expected DIR:WEIGHT, e.g. runs/a/adapter:0.5")
    })?;
    let w: f64 = w
        .trim()
        .parse()
        .ok()
        .filter(|w: &f64| w.is_finite())
        .ok_or_else(|| anyhow::anyhow!("--adapter `{s}`: the weight `{w}` is not a number"))?;
    Ok((PathBuf::from(dir), w))
}

fn run_peft_combine(a: CombineArgs) -> Result<()> {
    use ferrotune::peft::lora::{add_weighted_adapter, Combination, WeightedAdapter};
    let how: Combination = a.how.parse().map_err(|e| anyhow::anyhow!("--how: {e}"))?;
    if a.adapter.is_empty() {
        anyhow::bail!("--adapter: name at least one adapter as DIR:WEIGHT");
    }
    if a.svd_rank.is_some() && how != Combination::Svd {
        anyhow::bail!(
            "--svd-rank: only --how svd takes a rank (linear keeps r, cat sums the ranks)"
        );
    }
    let max = ferrotune::peft::lora::config::MAX_RANK;
    if let Some(k) = a.svd_rank.filter(|k| !(1..=max).contains(k)) {
        anyhow::bail!("--svd-rank {k}: expected 1 to {max}");
    }
    let parsed: Vec<(PathBuf, f64)> = a
        .adapter
        .iter()
        .map(|s| parse_weighted_adapter(s))
        .collect::<Result<_>>()?;
    let mut inputs = model_inputs(&a.m.model, None);
    for (d, _) in &parsed {
        input_dir("--adapter", d)?;
        inputs.push(Input::new("an --adapter folder", d));
    }
    fsutil::check_output_dir(&a.out, "--out", a.overwrite, &inputs)?;
    let mut lm = load_for(&a.m, "peft combine", Runs::Nothing)?;
    let mut configs = Vec::new();
    for (i, (d, _)) in parsed.iter().enumerate() {
        let loaded = ferrotune::peft::load_adapter(&mut *lm.model, d, &format!("adapter{i}"))?;
        match loaded.config {
            ferrotune::peft::AdapterConfig::Lora(c) => configs.push(c),
            other => anyhow::bail!(
                "--adapter {}: a {} adapter; only LoRA adapters can be combined",
                d.display(),
                other.peft_type()
            ),
        }
    }
    let names: Vec<String> = (0..parsed.len()).map(|i| format!("adapter{i}")).collect();
    let weighted: Vec<WeightedAdapter> = names
        .iter()
        .zip(&configs)
        .zip(&parsed)
        .map(|((n, c), (_, w))| WeightedAdapter {
            name: n,
            config: c,
            weight: *w,
        })
        .collect();
    let cfg = add_weighted_adapter(&mut *lm.model, &weighted, "combined", how, a.svd_rank)?;
    fsutil::replace_dir(&a.out, |dir| {
        ferrotune::peft::save_adapter(&*lm.model, "combined", &cfg, dir)
    })?;
    info!(
        "combined {} adapters ({}, r = {}); wrote {}",
        parsed.len(),
        a.how,
        cfg.r,
        a.out.display()
    );
    Ok(())
}

// ---- compare: the trade-off table ----

#[derive(Args)]
struct CompareArgs {
    /// The base training config; each method runs it with `--set method=...`.
    #[arg(long)]
    config: PathBuf,
    /// Comma-separated: base, full, selective, lora, dora, ia3, prompt_tuning, prefix_tuning,
    /// p_tuning, adapter.
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// A LoRA run per rank (the rank sweep), e.g. 4,8,16.
    #[arg(long, value_delimiter = ',')]
    lora_ranks: Vec<usize>,
    /// Folder for runs/, compare.md, compare.json and compare.png.
    #[arg(long)]
    out: PathBuf,
    /// Override a config key in every run: --set train.max_steps=200 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Override a config key in one run only: --method-set full:train.lr=5e-5 (RUN:KEY=VALUE;
    /// RUN is a method or a rank-sweep row such as "lora r=16"; repeatable).
    #[arg(long = "method-set", value_name = "RUN:KEY=VALUE")]
    method_set: Vec<String>,
    /// Rows to score generations on (default: the config's test data, else its validation data).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Score the first N rows.
    #[arg(long, default_value_t = 200)]
    eval_limit: usize,
    /// The reference of each scored row, a template over its fields (default: the config's
    /// data.completion), e.g. " {summary1}" for DialogSum's test split.
    #[arg(long)]
    eval_completion: Option<String>,
    /// Greedy tokens generated per scored row.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
}

/// Each run is a `ferrotune train` child process: its peak RSS is its own, and a crash or an
/// abort stays in its row. Its stderr passes through; the last `error:` line is the row's error.
struct ProcessRunner {
    quiet: bool,
}

impl ferrotune::tradeoff::Runner for ProcessRunner {
    fn train(
        &self,
        config: &Path,
        set: &[String],
        start: ferrotune::tradeoff::Start,
    ) -> ferrotune::Result<()> {
        use std::io::{Read, Write};
        // Every run of a comparison uses this very binary, even when the file is rebuilt or
        // replaced while the comparison runs (hours): on Linux /proc/self/exe still opens the
        // running program's file; current_exe() would name the replacement, or nothing.
        let proc_exe = Path::new("/proc/self/exe");
        let exe = if proc_exe.exists() {
            proc_exe.to_path_buf()
        } else {
            std::env::current_exe().map_err(|e| {
                ferrotune::Error::msg(format!("cannot find the ferrotune binary: {e}"))
            })?
        };
        let mut cmd = std::process::Command::new(exe);
        if self.quiet {
            cmd.arg("--quiet");
        }
        cmd.arg("train").arg("--config").arg(config);
        for s in set {
            cmd.arg("--set").arg(s);
        }
        match start {
            ferrotune::tradeoff::Start::Fresh => {}
            ferrotune::tradeoff::Start::Resume => {
                cmd.arg("--resume");
            }
            ferrotune::tradeoff::Start::Restart => {
                cmd.arg("--overwrite");
            }
        }
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| ferrotune::Error::msg(format!("cannot start `ferrotune train`: {e}")))?;
        let mut tail: Vec<u8> = Vec::new();
        if let Some(mut err) = child.stderr.take() {
            let mut buf = [0u8; 4096];
            let mut out = std::io::stderr();
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = out.write_all(&buf[..n]);
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 16384 {
                    tail.drain(..tail.len() - 8192);
                }
            }
        }
        let status = child
            .wait()
            .map_err(|e| ferrotune::Error::msg(format!("`ferrotune train`: {e}")))?;
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&tail);
        let line = text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .map(str::to_string)
            .unwrap_or_else(|| format!("`ferrotune train` ended with {status}"));
        Err(ferrotune::Error::msg(line))
    }
}

fn run_compare(a: CompareArgs) -> Result<()> {
    let method_set = a
        .method_set
        .iter()
        .map(|s| {
            s.split_once(':')
                .filter(|(run, kv)| {
                    !run.is_empty()
                        && kv
                            .split_once('=')
                            .is_some_and(|(k, _)| !k.trim().is_empty())
                })
                .map(|(run, kv)| (run.trim().to_string(), kv.to_string()))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--method-set `{s}`: expected RUN:KEY=VALUE, e.g. full:train.lr=5e-5"
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = ferrotune::tradeoff::CompareSpec {
        config: a.config,
        method_set,
        methods: a.methods,
        lora_ranks: a.lora_ranks,
        out: a.out,
        set: a.set,
        eval_data: a.eval_data,
        eval_limit: Some(a.eval_limit),
        eval_completion: a.eval_completion,
        max_new_tokens: a.max_new_tokens,
    };
    if a.eval_limit == 0 {
        anyhow::bail!("--eval-limit: got 0, expected at least 1 row");
    }
    if a.max_new_tokens == 0 {
        anyhow::bail!("--max-new-tokens: got 0, expected at least 1 token to score");
    }
    // Checked before any method trains (they were checked when scoring, after all of them).
    if spec.max_new_tokens > ferrotune::generate::MAX_NEW_TOKENS_LIMIT {
        anyhow::bail!(
            "--max-new-tokens: got {}, expected at most {} (longer than any context window)",
            spec.max_new_tokens,
            ferrotune::generate::MAX_NEW_TOKENS_LIMIT
        );
    }
    if let Some(c) = &spec.eval_completion {
        ferrotune::data::template::PromptTemplate::parse(c)
            .map_err(|e| anyhow::anyhow!("--eval-completion: {e}"))?;
    }
    let runner = ProcessRunner {
        quiet: QUIET.load(Ordering::Relaxed),
    };
    let report = ferrotune::tradeoff::run(&spec, &runner, &|l| info!("{l}"))?;
    print!("{}", ferrotune::tradeoff::markdown(&report));
    info!(
        "wrote {}, {} and {}",
        spec.out.join(ferrotune::tradeoff::MARKDOWN_FILE).display(),
        spec.out.join(ferrotune::tradeoff::JSON_FILE).display(),
        spec.out.join(ferrotune::tradeoff::CHART_FILE).display()
    );
    // A failed method is its row; a comparison in which every method failed is a failure.
    if !report.rows.is_empty() && report.rows.iter().all(|r| r.status != "ok") {
        anyhow::bail!(
            "compare: every run failed (see the error column of {})",
            spec.out.join(ferrotune::tradeoff::MARKDOWN_FILE).display()
        );
    }
    Ok(())
}

// ---- Training: train, merge, eval, data preview, and --adapter for generate/perplexity ----

#[derive(Args)]
struct TrainArgs {
    /// The run's TOML config (see docs/training.md).
    #[arg(long)]
    config: PathBuf,
    /// Override a config key: --set train.lr=1e-4 (dotted key, TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the newest checkpoint in output_dir.
    #[arg(long)]
    resume: bool,
    /// Start again in an output_dir that holds a run, removing only the files the run wrote.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Check everything (config, data, model, targets, memory, output_dir) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Worker threads (train.threads; `launch` sets it per rank).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum PeftCommand {
    /// For each virtual token of a soft prompt (prompt tuning, P-tuning), its nearest
    /// vocabulary tokens by cosine similarity to the input embeddings.
    Readout(PeftReadoutArgs),
    /// Combine LoRA adapters into a new one (PEFT's add_weighted_adapter: linear, cat, svd).
    Combine(CombineArgs),
}

#[derive(Args)]
struct PeftReadoutArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// PEFT adapter folder (PROMPT_TUNING or P_TUNING).
    #[arg(long)]
    adapter: PathBuf,
    /// Nearest tokens per virtual token.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Print {"tokens": [{"index", "nearest": [{"token", "id", "cosine"}]}]}.
    #[arg(long)]
    json: bool,
}

fn run_peft_readout(a: PeftReadoutArgs) -> Result<()> {
    input_dir("--adapter", &a.adapter)?;
    if a.k == 0 {
        anyhow::bail!("--k must be at least 1");
    }
    let lm = load_for(&a.m, "peft readout", Runs::Nothing)?;
    let tokens = ferrotune::peft::prompt_learning::model::readout_adapter(
        &*lm.model,
        &lm.tokenizer,
        &a.adapter,
        a.k,
    )?;
    if a.json {
        println!("{}", serde_json::json!({ "tokens": tokens }));
    } else {
        for t in &tokens {
            let near: Vec<String> = t
                .nearest
                .iter()
                .map(|n| format!("{:?} ({}, {:.4})", n.token, n.id, n.cosine))
                .collect();
            println!("{:>3}: {}", t.index, near.join("  "));
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum DataCommand {
    /// Show the split sizes and the first examples as the model sees them, trained span marked.
    Preview(DataPreviewArgs),
}

#[derive(Args)]
struct DataPreviewArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Number of examples to show.
    #[arg(long, default_value_t = 3)]
    n: usize,
}

#[derive(Args)]
struct MergeArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output: an HF folder (written whole into a temporary sibling, then renamed into place),
    /// or with --format gguf one GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out even if it holds files ferrotune did not write (never an input; a GGUF
    /// --out only if ferrotune wrote it).
    #[arg(long)]
    overwrite: bool,
    /// Stored dtype of the written weights of an HF folder: f32 (default), bf16 or f16.
    #[arg(long = "out-dtype")]
    out_dtype: Option<String>,
    /// What --out is: `hf` (a Hugging Face folder) or `gguf` (one GGUF file, see `quantize`).
    #[arg(long, default_value = "hf")]
    format: String,
    /// With --format gguf: the GGUF type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m,
    /// q5_k_m, q6_k); default f16.
    #[arg(long)]
    quant: Option<String>,
    /// Text file for the merge check of an adapter on a quantized base (default: a built-in
    /// sample): the outputs of the adapter on the fly, of the merged model and of the merged
    /// model quantized back to the base's format are compared and reported.
    #[arg(long)]
    check_text: Option<PathBuf>,
}

#[derive(Args)]
struct QuantizeArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// PEFT adapter folder (LoRA, IA3, selective) merged into the weights first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Target: a GGUF type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k),
    /// or a bitsandbytes format for an HF folder (nf4, fp4, int8).
    #[arg(long)]
    to: String,
    /// Output file (GGUF); written through a temporary sibling and renamed into place.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out: a GGUF only if ferrotune wrote it; a folder (nf4/fp4/int8) even if it holds
    /// files ferrotune did not write (never subfolders), as `merge --overwrite` does. Never an
    /// input.
    #[arg(long)]
    overwrite: bool,
    /// `general.name` in the file (default: the source's name).
    #[arg(long)]
    name: Option<String>,
    /// nf4 / fp4: store the block absmaxes double-quantized (8-bit codes around their mean),
    /// transformers' `bnb_4bit_use_double_quant`.
    #[arg(long = "double-quant", action = clap::ArgAction::Set, value_name = "true|false")]
    double_quant: Option<bool>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// PEFT adapter folder to compare with the base model (repeatable).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Rows to evaluate (JSONL, JSON, CSV or Parquet).
    #[arg(long)]
    data: PathBuf,
    /// Prompt template with {field} placeholders.
    #[arg(long)]
    template: String,
    /// Completion template; its text is the reference (e.g. " {summary}").
    #[arg(long)]
    completion: String,
    /// Render the prompt as a user turn of the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Evaluate only the first N rows.
    #[arg(long, allow_negative_numbers = true)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    max_new_tokens: usize,
    /// Stop generating at this string (repeatable; not empty).
    #[arg(long, value_parser = non_empty_stop)]
    stop: Vec<String>,
    /// Comma-separated: rouge, bleu, accuracy, perplexity.
    #[arg(long, default_value = "rouge,bleu")]
    metrics: String,
    /// One JSON line instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write every generation to this JSONL file ({model, row, prediction, reference}).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing --output file (never an input: --data, an adapter, the model).
    #[arg(long, requires = "output")]
    overwrite: bool,
}

/// Load each `--adapter` folder onto the model (named adapter0, adapter1, ...; all active).
fn attach_adapters(lm: &mut LoadedModel, dirs: &[PathBuf]) -> Result<()> {
    for (i, d) in dirs.iter().enumerate() {
        // A selective run's `adapter/` holds changed base tensors: they replace the base's.
        if ferrotune::peft::selective::is_selective_dir(d) {
            let n = ferrotune::peft::selective::apply(&mut *lm.model, d)?;
            info!(
                "adapter {} (SELECTIVE, {n} tensors put onto the base)",
                d.display()
            );
            continue;
        }
        let a = ferrotune::peft::load_adapter(&mut *lm.model, d, &format!("adapter{i}"))?;
        info!(
            "adapter {} ({}, {} modules)",
            d.display(),
            a.config.peft_type(),
            a.modules.len()
        );
    }
    Ok(())
}

/// The first Ctrl-C (SIGINT) or SIGTERM during `train` asks the run to stop at the next step
/// boundary with a checkpoint; a second one quits at once. Returns the flag the run polls and
/// where the signal that set it is recorded.
fn on_interrupt_stop_at_step_boundary() -> Result<(Arc<AtomicBool>, Arc<AtomicI32>)> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicI32::new(0));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install the Ctrl-C handler")?;
    let (flag, first) = (Arc::clone(&stop), Arc::clone(&signal));
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let name = if sig == SIGINT { "Ctrl-C" } else { "SIGTERM" };
            if flag.swap(true, Ordering::SeqCst) {
                fsutil::remove_in_flight();
                eprintln!("\n{name} again: quitting at once, without a checkpoint");
                std::process::exit(128 + sig);
            }
            first.store(sig, Ordering::SeqCst);
            eprintln!(
                "\n{name}: stopping after this step and writing a checkpoint (press Ctrl-C again to quit at once)"
            );
        }
    });
    Ok((stop, signal))
}

/// Ctrl-C (SIGINT) or SIGTERM while a command writes its output (`quantize`, `merge`,
/// `convert`): the half-written temporary file or folder is removed before the process exits
/// (the output itself is only ever renamed into place whole).
fn on_interrupt_remove_partial_outputs() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Without the handler an interrupt still never damages the output; only the temporary file
    // stays until the next run to the same path clears it.
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let n = fsutil::remove_in_flight();
            let name = if sig == SIGINT { "Ctrl-C" } else { "SIGTERM" };
            let what = if n > 0 {
                "; the partial output was removed"
            } else {
                ""
            };
            eprintln!("\n{name}: stopped, nothing written{what}");
            std::process::exit(128 + sig);
        }
    });
}

/// A `--stop` string: an empty one would match before the first token and stop every output
/// empty (OpenAI's API and `serve` refuse it too).
fn non_empty_stop(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() {
        return Err("an empty stop string would end every output before its first token".into());
    }
    Ok(s.to_string())
}

/// `s` as one shell word.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn run_train(a: TrainArgs) -> Result<()> {
    use ferrotune::train::{self, Outcome, StopReason};
    // First of all, so that a Ctrl-C at any point takes the graceful path: while the config,
    // data or model load, the run stops before writing anything; later, at a step boundary.
    let (stop, signal) = if a.dry_run {
        (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicI32::new(0)),
        )
    } else {
        on_interrupt_stop_at_step_boundary()?
    };
    let exit_code_if_interrupted = || {
        stop.load(Ordering::SeqCst)
            .then(|| 128 + signal.load(Ordering::SeqCst))
    };
    // The ranks of a distributed run (mpirun, srun, launch), once the config is read.
    let mut ranks: Option<ferrotune::dist::Dist> = None;
    let result = (|| -> Result<(PathBuf, Outcome)> {
        let mut set = a.set.clone();
        if let Some(n) = a.threads {
            if n == 0 || n > MAX_THREADS {
                bail!("--threads {n}: expected 1 to {MAX_THREADS}");
            }
            set.push(format!("train.threads={n}"));
        }
        let c = train::load_config(&a.config, &set)?;
        let out = c.config.output_dir.clone();
        let dist = ferrotune::dist::Dist::from_environment(
            std::time::Duration::from_secs(c.config.train.dist_timeout_s),
            c.config.train.dist_backend,
            c.config.train.device.starts_with("cuda"),
        )?;
        ranks = Some(dist.clone());
        let opts = train::RunOptions {
            resume: a.resume,
            overwrite: a.overwrite,
            progress: if QUIET.load(Ordering::Relaxed) {
                train::ProgressMode::Quiet
            } else {
                train::ProgressMode::Auto
            },
            interrupt: Some(Arc::clone(&stop)),
            dist,
        };
        if a.dry_run {
            return Ok((out, train::dry_run(&c, &opts)?));
        }
        let s = train::run(&c, &opts)?;
        let outcome = if s.already_finished {
            Outcome::AlreadyFinished(s)
        } else {
            Outcome::Trained(s)
        };
        Ok((out, outcome))
    })();
    let multi_rank = ranks.as_ref().filter(|d| d.world_size() > 1);
    let (output_dir, outcome) = match result {
        Ok(_) if multi_rank.is_some_and(|d| !d.is_root()) => return Ok(()),
        Ok(o) => o,
        Err(e) => {
            if let Some(d) = multi_rank {
                // The other ranks may be waiting for this one in a collective: end the job
                // (MPI's normal exit would wait for them), naming this rank.
                eprintln!("error: {}{}", d.label(), error_line(&e));
                d.abort(1);
            }
            if let Some(code) = exit_code_if_interrupted() {
                print_error(&e);
                std::process::exit(code);
            }
            return Err(e);
        }
    };
    let resume_command = || {
        let mut words = vec![
            "ferrotune".to_string(),
            "train".into(),
            "--config".into(),
            shell_word(&a.config.display().to_string()),
        ];
        for o in &a.set {
            words.push("--set".into());
            words.push(shell_word(o));
        }
        if let Some(n) = a.threads {
            words.push(format!("--threads {n}"));
        }
        words.push("--resume".into());
        words.join(" ")
    };
    let s = match outcome {
        Outcome::DryRun(d) => {
            println!("{d}");
            return Ok(());
        }
        Outcome::AlreadyFinished(s) => {
            let dir = match (&s.adapter_dir, &s.model_dir) {
                (Some(d), _) => format!("; its adapter is {}", d.display()),
                (None, Some(d)) => format!("; its model is {}", d.display()),
                (None, None) => String::new(),
            };
            eprintln!(
                "the run is already finished: step {} of {} (stop reason: {}){dir}. Nothing was changed (to train again, pass --overwrite; to train further, raise train.max_steps and --resume)",
                s.steps,
                s.max_steps,
                s.stop_reason.as_str()
            );
            return Ok(());
        }
        Outcome::Trained(s) => s,
    };
    let val = match (s.initial_val_loss, s.final_val_loss) {
        (Some(a), Some(b)) => format!(", val loss {a:.4} -> {b:.4}"),
        (None, Some(b)) => format!(", val loss {b:.4}"),
        _ => String::new(),
    };
    info!(
        "{} steps ({:?}), train loss {}{val}, {:.0} tok/s, peak RSS {:.2} GB, {:.1} s",
        s.steps,
        s.stop_reason,
        s.final_train_loss
            .map_or("-".to_string(), |l| format!("{l:.4}")),
        s.train_tokens_per_s,
        s.peak_rss_bytes as f64 / 1e9,
        s.wall_s
    );
    match (
        s.adapter_dir.as_ref().or(s.model_dir.as_ref()),
        s.stop_reason,
    ) {
        (Some(d), _) if s.adapter_dir.is_some() => info!("adapter: {}", d.display()),
        (Some(d), _) => info!("model: {}", d.display()),
        (None, StopReason::Interrupted) => {
            let ckpt =
                train::checkpoint::checkpoints_dir(&output_dir).join(format!("step-{}", s.steps));
            eprintln!(
                "interrupted at step {} of {}: checkpoint {}; continue with: {}",
                s.steps,
                s.max_steps,
                ckpt.display(),
                resume_command()
            );
            std::process::exit(exit_code_if_interrupted().unwrap_or(130));
        }
        (None, _) => info!(
            "stopped at step {} of {}: continue with: {}",
            s.steps,
            s.max_steps,
            resume_command()
        ),
    }
    Ok(())
}

fn run_data_preview(a: DataPreviewArgs) -> Result<()> {
    use std::io::IsTerminal;
    let c = ferrotune::train::load_config(&a.config, &a.set)?;
    let text = ferrotune::train::preview(&c, a.n, std::io::stdout().is_terminal())?;
    print!("{text}");
    Ok(())
}

fn run_merge(a: MergeArgs) -> Result<()> {
    on_interrupt_remove_partial_outputs();
    let out_dtype_name = a.out_dtype.clone().unwrap_or_else(|| "f32".into());
    let out_dtype = parse_dtype("--out-dtype", &out_dtype_name)?;
    let gguf = match a.format.to_ascii_lowercase().as_str() {
        "hf" => {
            if a.quant.is_some() {
                bail!("--quant: only with --format gguf (an HF folder's dtype is --out-dtype)");
            }
            if a.out
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                bail!(
                    "--out {}: --format hf writes a folder; for a GGUF file pass --format gguf",
                    a.out.display()
                );
            }
            None
        }
        "gguf" => {
            if a.out_dtype.is_some() {
                bail!("--out-dtype: only with --format hf (a GGUF file's type is --quant)");
            }
            Some(
                ferrotune::export::gguf::Preset::parse(a.quant.as_deref().unwrap_or("f16"))
                    .map_err(|e| anyhow!("--quant: {e}"))?,
            )
        }
        other => bail!("--format: `{other}` is not a format (expected hf or gguf)"),
    };
    input_dir("--adapter", &a.adapter)?;
    // Read now, whether or not the merge check runs: a wrong path is an error, not ignored.
    // The check reads at most 1024 tokens: 1 MiB of text is plenty.
    let check_text = match &a.check_text {
        Some(p) => {
            Some(fsutil::read_text_limited(p, 1 << 20).map_err(|e| anyhow!("--check-text: {e}"))?)
        }
        None => None,
    };
    let mut inputs = model_inputs(&a.m.model, None);
    inputs.push(Input::new("the --adapter folder", &a.adapter));
    if let Some(p) = &a.check_text {
        inputs.push(Input::new("the --check-text file", p));
    }
    let check_out = |inputs: &[Input]| -> Result<()> {
        match gguf {
            Some(_) => ferrotune::export::gguf::check_output(&a.out, a.overwrite, inputs)?,
            None => fsutil::check_output_dir(&a.out, "--out", a.overwrite, inputs)?,
        }
        Ok(())
    };
    check_out(&inputs)?;
    let mut lm = load_for(&a.m, "merge", Runs::Forward)?;
    inputs.push(Input::new("the --model", lm.source.path()));
    check_out(&inputs)?;
    if let Some(preset) = gguf {
        if a.check_text.is_some() {
            info!("note: --check-text is not used with --format gguf (the merge check runs for an HF folder from a quantized base)");
        }
        fold_adapter(&mut lm, &a.adapter, "merge")?;
        let opts = ferrotune::export::gguf::GgufExportOptions {
            preset,
            name: None,
            overwrite: a.overwrite,
        };
        let report = ferrotune::export::gguf::write_gguf(&lm, &a.out, &opts)?;
        println!("{}", report.summary());
        return Ok(());
    }
    if ferrotune::peft::selective::is_selective_dir(&a.adapter) {
        // The changed tensors become the base's own: the merged model (equal to the run's
        // `model/`).
        let n = ferrotune::peft::selective::apply(&mut *lm.model, &a.adapter)?;
        info!("SELECTIVE: {n} tensors put onto the base");
        fsutil::replace_dir(&a.out, |dir| {
            ferrotune::model::convert::write_hf_folder_dtype(&lm, dir, out_dtype)
        })?;
        info!("wrote {}", a.out.display());
        return Ok(());
    }
    let loaded = ferrotune::peft::load_adapter(&mut *lm.model, &a.adapter, "merge")?;
    if let ferrotune::peft::AdapterConfig::Bottleneck(_) = &loaded.config {
        anyhow::bail!(
            "--adapter {}: bottleneck adapters are non-linear in their module's output and cannot be merged into the weights; use the folder with --adapter",
            a.adapter.display()
        );
    }
    if let ferrotune::peft::AdapterConfig::Prompt(c) = &loaded.config {
        anyhow::bail!(
            "{}: a {} adapter is a soft prompt, not a weight change: there is nothing to merge (use it with --adapter in generate, perplexity or eval)",
            a.adapter.display(),
            c.peft_type.peft_type()
        );
    }
    let on_quantized = lm.model.linears().iter().any(|l| {
        matches!(l.weight(), ferrotune::nn::LinearWeight::Quantized(_))
            && l.adapters().any(|(n, _)| n == "merge")
    });
    let (report, check) = if on_quantized {
        let text = check_text
            .clone()
            .unwrap_or_else(|| ferrotune::peft::merge_check::SAMPLE_TEXT.to_string());
        let mut ids = lm.tokenizer.encode(&text, true)?;
        ids.truncate(lm.model.context_length().unwrap_or(usize::MAX).min(1024));
        if ids.len() < 2 {
            bail!("--check-text: the merge check needs a text of at least 2 tokens");
        }
        let (report, check) =
            ferrotune::peft::merge_check::merge_and_check(&mut *lm.model, "merge", &ids)?;
        info!("{}", check.summary());
        (report, Some(check))
    } else {
        if a.check_text.is_some() {
            info!("note: --check-text is not used: the base is not quantized, so merging is exact and there is nothing to check");
        }
        (
            ferrotune::peft::merge_and_unload(&mut *lm.model, "merge")?,
            None,
        )
    };
    if let Some(msg) = report.message() {
        info!("note: {msg}");
    }
    let still_quantized = lm
        .model
        .linears()
        .iter()
        .any(|l| matches!(l.weight(), ferrotune::nn::LinearWeight::Quantized(_)));
    if still_quantized {
        info!("note: the other quantized weights are dequantized to {out_dtype_name} for the HF folder");
    }
    fsutil::replace_dir(&a.out, |dir| {
        ferrotune::model::convert::write_hf_folder_dtype(&lm, dir, out_dtype)?;
        if let Some(c) = &check {
            // beside the weights, so the merged folder says what merging cost
            let json = serde_json::to_string_pretty(c).map_err(ferrotune::Error::msg)?;
            std::fs::write(dir.join("merge_check.json"), json + "\n")
                .map_err(|e| ferrotune::Error::file(dir.join("merge_check.json"), e))?;
        }
        Ok(())
    })?;
    info!(
        "merged {} modules; wrote {}",
        report.modules.len(),
        a.out.display()
    );
    Ok(())
}

/// Fold the adapter in `dir` into `lm`'s weights: a selective adapter's tensors become the
/// base's, a LoRA / IA3 adapter is merged; adapters that are not weight changes are refused.
fn fold_adapter(lm: &mut LoadedModel, dir: &Path, what: &str) -> Result<()> {
    if ferrotune::peft::selective::is_selective_dir(dir) {
        let n = ferrotune::peft::selective::apply(&mut *lm.model, dir)?;
        info!("SELECTIVE: {n} tensors put onto the base");
        return Ok(());
    }
    let loaded = ferrotune::peft::load_adapter(&mut *lm.model, dir, what)?;
    match &loaded.config {
        ferrotune::peft::AdapterConfig::Bottleneck(_) => bail!(
            "--adapter {}: bottleneck adapters are non-linear in their module's output and cannot be merged into the weights",
            dir.display()
        ),
        ferrotune::peft::AdapterConfig::Prompt(c) => bail!(
            "{}: a {} adapter is a soft prompt, not a weight change: there is nothing to merge",
            dir.display(),
            c.peft_type.peft_type()
        ),
        _ => {}
    }
    let report = ferrotune::peft::merge_and_unload(&mut *lm.model, what)?;
    if let Some(msg) = report.message() {
        info!("note: {msg}");
    }
    info!(
        "merged {} modules of {}",
        report.modules.len(),
        dir.display()
    );
    Ok(())
}

fn run_quantize(a: QuantizeArgs) -> Result<()> {
    on_interrupt_remove_partial_outputs();
    use ferrotune::export::gguf::{self, GgufExportOptions, Preset};
    let to = a.to.trim().to_ascii_lowercase();
    if matches!(to.as_str(), "nf4" | "fp4" | "int8") {
        return run_quantize_bnb(&a, &to);
    }
    if a.double_quant.is_some() {
        bail!("--double-quant: only for the bitsandbytes targets nf4 and fp4 (--to {to})");
    }
    let preset = Preset::parse(&a.to).map_err(|e| anyhow!("--to: {e}"))?;
    if let Some(d) = &a.adapter {
        input_dir("--adapter", d)?;
    }
    let mut inputs = model_inputs(&a.m.model, None);
    if let Some(d) = &a.adapter {
        inputs.push(Input::new("the --adapter folder", d));
    }
    gguf::check_output(&a.out, a.overwrite, &inputs)?;
    let mut lm = load_for(&a.m, "quantize", Runs::Nothing)?;
    inputs.push(Input::new("the --model", lm.source.path()));
    gguf::check_output(&a.out, a.overwrite, &inputs)?;
    if let Some(d) = &a.adapter {
        fold_adapter(&mut lm, d, "quantize")?;
    }
    let opts = GgufExportOptions {
        preset,
        name: a.name.clone(),
        overwrite: a.overwrite,
    };
    let report = gguf::write_gguf(&lm, &a.out, &opts)?;
    println!("{}", report.summary());
    Ok(())
}

/// `quantize --to nf4|fp4|int8`: an HF folder in bitsandbytes' layout, as transformers saves a
/// model loaded with `BitsAndBytesConfig` (every linear but the LM head quantized).
fn run_quantize_bnb(a: &QuantizeArgs, to: &str) -> Result<()> {
    use ferrotune::quant::bnb::{
        hf::{BnbFormat, BnbSpec},
        FourBitKind,
    };
    let format = match FourBitKind::parse(to) {
        Some(k) => BnbFormat::FourBit(k),
        None => BnbFormat::Int8,
    };
    if format == BnbFormat::Int8 && a.double_quant == Some(true) {
        bail!("--double-quant true: only for nf4 and fp4 (int8 has one scale per row)");
    }
    if a.name.is_some() {
        bail!("--name: only for GGUF outputs (--to {to} writes an HF folder)");
    }
    if a.out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        bail!(
            "--out {}: --to {to} writes a Hugging Face folder (bitsandbytes layout), not a GGUF file",
            a.out.display()
        );
    }
    if let Some(d) = &a.adapter {
        input_dir("--adapter", d)?;
    }
    let mut inputs = model_inputs(&a.m.model, None);
    if let Some(d) = &a.adapter {
        inputs.push(Input::new("the --adapter folder", d));
    }
    fsutil::check_output_dir(&a.out, "--out", a.overwrite, &inputs)?;
    let mut lm = load_for(&a.m, "quantize", Runs::Nothing)?;
    inputs.push(Input::new("the --model", lm.source.path()));
    fsutil::check_output_dir(&a.out, "--out", a.overwrite, &inputs)?;
    if let Some(d) = &a.adapter {
        fold_adapter(&mut lm, d, "quantize")?;
    }
    let spec = BnbSpec {
        format,
        double_quant: a.double_quant.unwrap_or(false),
        blocksize: 64,
    };
    let n = ferrotune::quant::bnb::hf::quantize_targets(&*lm.model).len();
    fsutil::replace_dir(&a.out, |dir| {
        ferrotune::quant::bnb::hf::write_hf_folder(&lm, dir, &spec)
    })?;
    info!(
        "quantized {n} linear weights to {to}{}; wrote {}",
        if spec.double_quant {
            " (double quant)"
        } else {
            ""
        },
        a.out.display()
    );
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    use ferrotune::bench::{self, forgetting, BenchOptions};
    let opts = BenchOptions {
        num_fewshot: a.num_fewshot,
        limit: a.limit,
        batch_size: a.batch_size,
        apply_chat_template: a.apply_chat_template,
        fewshot_seed: a.fewshot_seed,
        log_samples: a.log_samples,
    };
    opts.validate().map_err(flag_error)?;
    if a.log_samples && a.output.is_none() {
        anyhow::bail!("--log-samples writes samples_<task>.jsonl beside --output: pass --output");
    }
    let (tasks, groups) = bench::task::resolve_tasks(&a.tasks)?;
    // Every task's data and first prompt, before any model loads.
    for t in &tasks {
        if matches!(t.dataset_path.as_str(), "json" | "csv" | "parquet") {
            bench::check_task(t, &opts)?;
        }
    }
    let mut inputs = model_inputs(&a.m.model, None);
    for t in &tasks {
        for f in bench::docs::input_files(t) {
            inputs.push(Input::new("a task or data file", f));
        }
    }
    for d in &a.adapter {
        input_dir("--adapter", d)?;
        inputs.push(Input::new("an --adapter folder", d));
    }
    // Every file the run will write, checked before the minutes of scoring.
    let mut sample_files = Vec::new();
    if let Some(path) = &a.output {
        fsutil::check_output_file(path, "--output", a.overwrite, &inputs)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            anyhow::bail!(
                "--output {}: the folder {} does not exist",
                path.display(),
                dir.display()
            );
        }
        if a.log_samples {
            for ri in 0..=a.adapter.len() {
                for t in &tasks {
                    let suffix = if ri == 0 {
                        String::new()
                    } else {
                        format!("_adapter{ri}")
                    };
                    let f = dir.join(format!(
                        "samples_{}{suffix}.jsonl",
                        bench::docs::file_stem(&t.task)
                    ));
                    fsutil::check_output_file(&f, "--log-samples", a.overwrite, &inputs)?;
                    sample_files.push((ri, t.task.clone(), f));
                }
            }
        }
    }
    let quiet = a.json || QUIET.load(Ordering::Relaxed);
    let progress: Box<dyn ferrotune::progress::Progress> = if quiet {
        Box::new(ferrotune::progress::NoProgress)
    } else {
        Box::new(bar())
    };
    // Each adapter's config is read now: a broken one used to surface only after the base
    // had been benchmarked (hours on a real task).
    for d in &a.adapter {
        if !ferrotune::peft::selective::is_selective_dir(d) {
            ferrotune::peft::read_adapter_config(d)
                .map_err(|e| anyhow::anyhow!("--adapter {}: {e}", d.display()))?;
        }
    }
    let mut runs = Vec::new();
    let names: Vec<Option<&PathBuf>> = std::iter::once(None)
        .chain(a.adapter.iter().map(Some))
        .collect();
    for adapter in names {
        let mut lm = load(&a.m)?;
        if let Some(d) = adapter {
            attach_adapters(&mut lm, std::slice::from_ref(d))?;
            // A LoRA or IA3 adapter on dense weights folds into them (exactly, up to rounding),
            // so the result scores on the fast engine; on quantized weights it stays attached.
            let dense = lm
                .model
                .linears()
                .iter()
                .all(|l| !matches!(l.weight(), ferrotune::nn::LinearWeight::Quantized(_)));
            let weight_space = matches!(
                ferrotune::peft::read_adapter_config(d),
                Ok(ferrotune::peft::AdapterConfig::Lora(_)
                    | ferrotune::peft::AdapterConfig::Ia3(_))
            );
            if dense && weight_space && !ferrotune::peft::selective::is_selective_dir(d) {
                ferrotune::peft::merge_and_unload(&mut *lm.model, "adapter0")?;
            }
        }
        let mut report = bench::run(
            &*lm.model,
            &lm.tokenizer,
            &tasks,
            &groups,
            &opts,
            progress.as_ref(),
        )?;
        report.model = a.m.model.clone();
        report.adapter = adapter.map(|d| d.display().to_string());
        if a.json {
            println!("{}", report.results_object());
        } else {
            let who = adapter.map_or("base".to_string(), |d| format!("adapter {}", d.display()));
            println!("{who}:\n{}", report.table());
        }
        runs.push(report);
    }
    let forgetting: Vec<forgetting::Report> = runs
        .iter()
        .skip(1)
        .map(|r| {
            let after = r.adapter.clone().unwrap_or_default();
            forgetting::compare(&runs[0], r, "base", &after)
        })
        .collect();
    if !a.json {
        for f in &forgetting {
            println!("{}", f.markdown());
        }
    }
    if let Some(path) = &a.output {
        let doc = if runs.len() == 1 {
            runs[0].to_lm_eval_json()
        } else {
            let adapters: serde_json::Map<String, serde_json::Value> = runs
                .iter()
                .skip(1)
                .map(|r| (r.adapter.clone().unwrap_or_default(), r.to_lm_eval_json()))
                .collect();
            serde_json::json!({"base": runs[0].to_lm_eval_json(), "adapters": adapters, "forgetting": forgetting})
        };
        fsutil::check_output_file(path, "--output", a.overwrite, &inputs)?;
        fsutil::write_atomic(
            path,
            format!("{}\n", serde_json::to_string_pretty(&doc)?).as_bytes(),
        )?;
        for (ri, task, f) in &sample_files {
            let Some(t) = runs
                .get(*ri)
                .and_then(|r| r.tasks.iter().find(|t| &t.task == task))
            else {
                continue;
            };
            let mut text = String::new();
            for s in &t.samples {
                text.push_str(&format!("{s}\n"));
            }
            fsutil::check_output_file(f, "--log-samples", a.overwrite, &inputs)?;
            fsutil::write_atomic(f, text.as_bytes())?;
        }
    }
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    use ferrotune::train::compare::{compare_with_progress, table, CompareOptions, Metric};
    let metrics = Metric::parse_list(&a.metrics)?;
    // The output is checked before the minutes of generation, and again before it is written.
    let mut inputs = model_inputs(&a.m.model, None);
    inputs.push(Input::new("the --data file", &a.data));
    for d in &a.adapter {
        inputs.push(Input::new("an --adapter folder", d));
    }
    if let Some(path) = &a.output {
        fsutil::check_output_file(path, "--output", a.overwrite, &inputs)?;
    }
    let opts = CompareOptions {
        template: a.template.clone(),
        completion: a.completion.clone(),
        chat: a.chat,
        limit: a.limit,
        max_new_tokens: a.max_new_tokens,
        stop: a.stop.clone(),
        metrics,
        progress: !a.json && !QUIET.load(Ordering::Relaxed),
    };
    opts.validate().map_err(flag_error)?;
    input_file("--data", &a.data)?;
    for d in &a.adapter {
        input_dir("--adapter", d)?;
        if ferrotune::peft::selective::is_selective_dir(d) {
            anyhow::bail!(
                "--adapter {}: a selective run's changed tensors replace the base's own, and eval scores the base and each adapter in turn; evaluate the run's model/ folder with --model",
                d.display()
            );
        }
    }
    let mut lm = load(&a.m)?;
    inputs.push(Input::new("the --model", lm.source.path()));
    let rows = compare_with_progress(&mut lm, &a.adapter, &a.data, &opts, &bar())?;
    if let Some(path) = &a.output {
        let mut text = String::new();
        for r in &rows {
            for (i, (p, refs)) in r.predictions.iter().zip(&r.references).enumerate() {
                let line = serde_json::json!({"model": r.name, "row": i + 1,
                    "prediction": p, "reference": refs.first()});
                text.push_str(&format!("{line}\n"));
            }
        }
        fsutil::check_output_file(path, "--output", a.overwrite, &inputs)?;
        fsutil::write_atomic(path, text.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::json!({ "rows": rows }));
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Rows to embed: JSONL, JSON, CSV, TSV or Parquet.
    #[arg(long)]
    data: PathBuf,
    /// The field holding each row's text.
    #[arg(long, default_value = "text")]
    field: String,
    /// mean, cls, max or mean_sqrt_len (default: the model folder's sentence-transformers
    /// pooling, else mean).
    #[arg(long)]
    pooling: Option<String>,
    /// L2-normalise (the default when the folder's modules.json has a Normalize module).
    #[arg(long, conflicts_with = "no_normalize")]
    normalize: bool,
    /// Do not L2-normalise, whatever the folder says.
    #[arg(long)]
    no_normalize: bool,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    batch_size: usize,
    /// Most tokens per row (default: the folder's max_seq_length, else the model's limit).
    #[arg(long, allow_negative_numbers = true)]
    max_length: Option<usize>,
}

fn run_embed(a: EmbedArgs) -> Result<()> {
    use ferrotune::embed::{embed_texts_with_progress, read_texts, EmbedOptions};
    use ferrotune::model::Pooling;
    input_file("--data", &a.data)?;
    let pooling = a
        .pooling
        .as_deref()
        .map(|p| {
            Pooling::parse(p)
                .ok_or_else(|| anyhow!("--pooling `{p}`: expected mean, cls, max or mean_sqrt_len"))
        })
        .transpose()?;
    let normalize = match (a.normalize, a.no_normalize) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let opts = EmbedOptions {
        field: a.field.clone(),
        pooling,
        normalize,
        batch_size: a.batch_size,
        max_length: a.max_length,
    };
    opts.validate().map_err(flag_error)?;
    if let Some(n) = a.max_length {
        if n < ferrotune::tokenizer::MIN_INPUT_LEN {
            bail!(
                "--max-length {n}: expected at least {} tokens",
                ferrotune::tokenizer::MIN_INPUT_LEN
            );
        }
    }
    // The rows first: a missing field is found before the model is loaded.
    let texts = read_texts(&a.data, &a.field, None)?;
    let load_opts = a.m.load_options()?;
    if let Some(n) = a.m.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // The bare encoder: whatever head the folder was saved with is not needed for embeddings.
    let head = Some(model::BertHead::None);
    let lm = model::load_bert(&a.m.model, &load_opts, head, &device(&a.m.device)?, &bar())?;
    let embeddings = embed_texts_with_progress(&lm, &texts, &opts, &bar())?;
    let mut out = std::io::stdout().lock();
    for e in embeddings {
        writeln!(out, "{}", serde_json::json!({ "embedding": e }))?;
    }
    out.flush()?;
    Ok(())
}

#[derive(Args)]
struct ClassifyArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// PEFT adapter folder (task_type SEQ_CLS) to apply (repeatable: all are active).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Rows to classify: JSONL, JSON, CSV, TSV or Parquet.
    #[arg(long)]
    data: PathBuf,
    /// The text of each row: a template with {field} placeholders, or a field name.
    #[arg(long)]
    text: String,
    /// The field holding each row's gold label: a class id, or a name from the model's
    /// id2label (or --labels).
    #[arg(long)]
    label_field: String,
    /// Class names in id order, comma-separated (when the model's id2label does not name the
    /// data's labels).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    batch_size: usize,
    /// Most tokens per row, special tokens included (default: the model's limit); longer texts
    /// are cut at the end.
    #[arg(long, allow_negative_numbers = true)]
    max_seq_len: Option<usize>,
    /// The data's format: jsonl, json, csv, tsv or parquet (default: from the extension).
    #[arg(long)]
    format: Option<String>,
    /// Classify the first N rows only.
    #[arg(long, allow_negative_numbers = true)]
    limit: Option<usize>,
    /// One JSON line: {"accuracy", "f1", "n", ...}.
    #[arg(long)]
    json: bool,
}

fn run_classify(a: ClassifyArgs) -> Result<()> {
    use ferrotune::classify::{
        check_adapter_task, check_model, classify, parse_format, ClassifyOptions,
    };
    input_file("--data", &a.data)?;
    for d in &a.adapter {
        input_dir("--adapter", d)?;
    }
    let format = a
        .format
        .as_deref()
        .map(|f| {
            parse_format(f)
                .ok_or_else(|| anyhow!("--format `{f}`: expected jsonl, json, csv, tsv or parquet"))
        })
        .transpose()?;
    let opts = ClassifyOptions {
        text: a.text.clone(),
        label_field: a.label_field.clone(),
        labels: a.labels.clone(),
        batch_size: a.batch_size,
        max_seq_len: a.max_seq_len,
        format,
        limit: a.limit,
    };
    opts.validate().map_err(flag_error)?;
    for d in &a.adapter {
        check_adapter_task(d)?;
    }
    // A classifier trained with the adapter (on a bare encoder) sets the head the base needs.
    let mut load_opts = a.m.load_options()?;
    load_opts.head = ferrotune::classify::head_for_adapters(&a.adapter, a.labels.as_deref())?;
    set_threads(&a.m);
    let mut lm = model::load_with_progress(&a.m.model, &load_opts, &device(&a.m.device)?, &bar())?;
    a.m.configure(&*lm.model)?;
    check_model(&*lm.model).map_err(|e| anyhow!("--model {}: {e}", a.m.model))?;
    attach_adapters(&mut lm, &a.adapter)?;
    let r = classify(&*lm.model, &lm.tokenizer, &a.data, &opts, &bar())?;
    if r.truncated > 0 {
        warn!(
            "{} of {} rows were longer than {} tokens and were cut at the end",
            r.truncated,
            r.n,
            a.max_seq_len
                .or(lm.model.context_length())
                .map_or("the limit".to_string(), |n| n.to_string())
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("n         {}", r.n);
        println!("accuracy  {:.4}", r.accuracy);
        println!("f1        {:.4}  (macro)", r.f1);
    }
    Ok(())
}
