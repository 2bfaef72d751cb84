//! Serving: one loaded model, many concurrent sequences, an adapter chosen per sequence.
//!
//! The HTTP layer (crate `ferrotune-serve`, OpenAI's API shape) tokenizes requests and turns
//! events back into text; everything here works on token ids and knows nothing of HTTP:
//!
//! ```text
//!   HTTP handler ──submit(GenRequest, EventSink)──▶ SchedulerHandle ──▶ scheduler thread
//!        ▲                                                               │ continuous batching:
//!        └──────────── SeqEvent (Token / Finished / Failed) ◀────────────┘ each iteration runs one
//!                                                                          batched decode step over
//!   BatchBackend: FastBatchBackend (LLaMA on CPU, LoRA per row)            the active sequences and
//!                 ModelBackend (any family that generates, any adapter)    a chunk of pending prefill
//! ```
//!
//! - [`backend`]: the [`BatchBackend`] trait and [`backend::ModelBackend`] (the differentiable
//!   model's own forward; works for every generating family and PEFT method).
//! - [`fast`]: [`fast::FastBatchBackend`], the allocation-free CPU engine of
//!   [`crate::engine`] extended to many sequences (one KV cache each) and LoRA per row.
//! - [`scheduler`]: admission (bounded queue), chunked prefill, batched decode, sampling per
//!   sequence (temperature, top-p/top-k, seed, presence/frequency penalties, logprobs,
//!   constraints), cancellation, timeouts, metrics, adapter load/unload between steps.
//! - [`json_mode`]: a [`TokenConstraint`] that keeps the output a valid JSON object
//!   (`response_format: {"type": "json_object"}`).
pub mod backend;
pub mod fast;
pub mod json_mode;
pub mod scheduler;

pub use backend::BatchBackend;
pub use scheduler::{start, SchedulerConfig, SchedulerHandle};

use std::time::Duration;

/// How the next token is picked for one sequence (OpenAI's request fields).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// `None`: drawn from the OS; the same seed and request give the same output.
    pub seed: Option<u64>,
    /// OpenAI: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: added to these tokens' logits before every pick (-100..=100;
    /// +-100 in effect forces or bans a token).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: None,
            top_k: None,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// One sequence to generate.
pub struct GenRequest {
    /// Token ids of the prompt (chat template already applied, BOS included where the model
    /// wants one).
    pub prompt: Vec<u32>,
    /// The adapter to run with (`None`: the base model).
    pub adapter: Option<String>,
    /// Most tokens to generate; generation also stops at the context length.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// `Some(k)`: report each generated token's log-probability and the `k` most likely
    /// alternatives (k may be 0).
    pub logprobs: Option<usize>,
    /// Token ids that end the sequence (finish reason `Stop`); they are reported as a token
    /// event but are not part of the text. Usually the tokenizer's EOS ids.
    pub stop_ids: Vec<u32>,
    /// Restricts the tokens that may come next (JSON mode).
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

/// A generated token's log-probability (natural log, of the distribution after penalties and
/// temperature, as OpenAI reports) and the most likely alternatives, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was generated, or the constraint completed.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The caller cancelled (client gone, stop string found) or the request timed out.
    Cancelled,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the scheduler reports about one sequence, in order: zero or more `Token`s, then one
/// `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// From submission to the first token.
        time_to_first_token: Option<Duration>,
    },
    Failed(String),
}

/// Receives a sequence's events on the scheduler thread; must not block. Returns false when
/// nobody listens any more (client disconnected): the sequence is then cancelled.
pub type EventSink = Box<dyn FnMut(SeqEvent) -> bool + Send>;

/// Restricts which token may come next (a grammar, JSON mode). Called on the scheduler thread.
pub trait TokenConstraint: Send {
    /// Set the logits of every token that may not come next to `f32::NEG_INFINITY` (at least
    /// one must stay finite).
    fn mask(&mut self, logits: &mut [f32]);
    /// The token picked.
    fn accept(&mut self, id: u32);
    /// The output is complete (the sequence then finishes with [`FinishReason::Stop`]).
    fn is_complete(&self) -> bool;
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitError {
    /// Every sequence slot is busy and the queue is full: retry after about this long.
    QueueFull { retry_after: Duration },
    /// The server is shutting down.
    ShuttingDown,
    /// The request cannot run (unknown adapter, prompt longer than the context, empty
    /// prompt): a one-line message naming the field.
    Invalid(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { retry_after } => write!(
                f,
                "the server is at capacity; retry after {} s",
                retry_after.as_secs().max(1)
            ),
            SubmitError::ShuttingDown => write!(f, "the server is shutting down"),
            SubmitError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

/// Counters and gauges for `/metrics` (Prometheus text is written by the HTTP layer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub requests_total: u64,
    pub requests_failed: u64,
    pub requests_cancelled: u64,
    /// Prompt tokens of ended sequences, and those of them taken from the prefix cache.
    pub prompt_tokens_total: u64,
    pub prompt_tokens_cached_total: u64,
    pub completion_tokens_total: u64,
    /// Requests waiting for a slot.
    pub queue_depth: usize,
    /// Sequences in prefill or decode.
    pub active_sequences: usize,
    /// Time to first token: sum and count, and cumulative counts per upper bound in seconds
    /// ([`TTFT_BUCKETS`]), as a Prometheus histogram.
    pub ttft_seconds_sum: f64,
    pub ttft_count: u64,
    pub ttft_buckets: Vec<u64>,
    /// Decode steps run and the sequences they carried (mean batch = rows / steps).
    pub decode_steps: u64,
    pub decode_rows: u64,
    /// Generated tokens per second over the last few seconds.
    pub recent_tokens_per_s: f64,
}

/// Upper bounds (seconds) of the time-to-first-token histogram.
pub const TTFT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
