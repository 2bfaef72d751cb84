//! The scheduler thread: continuous batching over one [`BatchBackend`].
//!
//! One OS thread owns the backend. Callers talk to it through a [`SchedulerHandle`] (cheap to
//! clone, usable from any thread): [`SchedulerHandle::submit`] validates a request and puts it in
//! a bounded queue; the thread loops over iterations, each of which
//!
//! 1. takes commands (adapter load/unload), cancellations and new sequences (up to
//!    `max_concurrent` open slots) under one short lock;
//! 2. closes cancelled and timed-out sequences;
//! 3. prefills pending prompts, at most `prefill_chunk` tokens in all per iteration, so a
//!    long prompt is spread over several iterations and never stalls the decoding sequences for
//!    long; the shortest prompts go first (a short request is not queued behind a long prompt)
//!    while the oldest always gets a quarter of the budget (a backend without chunked prefill
//!    gets each prompt whole, FIFO, one or more per iteration while the budget lasts);
//! 4. runs ONE batched [`BatchBackend::step`] over every decoding sequence;
//! 5. samples each sequence's next token with its own sampler and sends its events.
//!
//! Events go to each sequence's [`EventSink`], called on this thread and outside every lock.
//! Backend calls and sinks run under `catch_unwind`: a panic fails the sequences concerned (or
//! cancels, for a sink) and the thread carries on, so no caller is left waiting. When idle the
//! thread sleeps on a condition variable.
use super::backend::{PromptChunk, SlotId};
use super::{
    BatchBackend, EventSink, FinishReason, GenRequest, MetricsSnapshot, SamplingParams, SeqEvent,
    SubmitError, TokenConstraint, TokenLogprob, TTFT_BUCKETS,
};
use crate::generate::{GenerationConfig, Sampler};
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in prefill or decode at once.
    pub max_concurrent: usize,
    /// Most requests waiting for a slot; beyond it, [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// Most prompt tokens prefilled per iteration (so a long prompt does not stall decoding).
    pub prefill_chunk: usize,
    /// A sequence running longer is cancelled (measured from its submission, so time spent
    /// queued counts: it bounds what the client waits).
    pub request_timeout: Option<Duration>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            max_queue: 64,
            prefill_chunk: 512,
            request_timeout: None,
        }
    }
}

/// Generated tokens/s is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// What the thread reads once from the backend, so that `submit` can validate without it.
#[derive(Debug, Clone, Copy)]
struct BackendInfo {
    vocab: usize,
    context: usize,
    prompt_in_context: bool,
    chunked_prefill: bool,
}

/// A request waiting for a slot.
struct Queued {
    id: u64,
    req: GenRequest,
    sink: EventSink,
    submitted: Instant,
}

type Reply = mpsc::Sender<Result<()>>;

/// Work for the thread that must run between steps (the backend is not shared).
enum Command {
    Load {
        name: String,
        dir: PathBuf,
        reply: Reply,
    },
    Unload {
        name: String,
        reply: Reply,
    },
}

/// What submitters and the thread share, behind one mutex held only briefly.
struct State {
    queue: VecDeque<Queued>,
    commands: Vec<Command>,
    cancels: Vec<u64>,
    shutting_down: bool,
    /// The thread has ended: nothing will be served any more.
    finished: bool,
    /// Sequences holding a slot (prefill or decode).
    running: usize,
    /// Attached adapters (the thread's copy of `backend.adapters()`).
    adapters: Vec<String>,
    /// Queued and running sequences per adapter: unload is refused while it is not zero.
    in_use: HashMap<String, usize>,
    /// Current estimate for [`SubmitError::QueueFull`].
    retry_after: Duration,
}

/// Counters the thread updates and `metrics()` copies.
#[derive(Default)]
struct Metrics {
    snap: MetricsSnapshot,
    /// (when, tokens generated in that iteration), the last [`RATE_WINDOW`].
    recent: VecDeque<(Instant, u64)>,
}

struct Shared {
    cfg: SchedulerConfig,
    info: BackendInfo,
    state: Mutex<State>,
    /// Wakes the thread: work arrived or shutdown.
    wake: Condvar,
    /// Tells `join` the thread has ended.
    done: Condvar,
    metrics: Mutex<Metrics>,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A poisoned lock only means a panic elsewhere while it was held; every update here leaves
/// the data consistent, so carry on rather than take the whole server down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn shutdown(&self) {
        lock(&self.state).shutting_down = true;
        self.wake.notify_all();
    }

    fn command(&self, make: impl FnOnce(Reply) -> Command) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        {
            let mut st = lock(&self.state);
            if st.finished {
                return Err(Error::msg("the scheduler has stopped"));
            }
            st.commands.push(make(tx));
        }
        self.wake.notify_all();
        // The thread replies, or drops the sender when it ends: recv never blocks forever.
        rx.recv()
            .unwrap_or_else(|_| Err(Error::msg("the scheduler stopped before the command ran")))
    }
}

/// Ends the scheduler when the last handle is dropped (else the thread would wait forever).
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// Talks to the scheduler thread; cheap to clone, usable from any thread. Dropping the last
/// clone shuts the scheduler down (queued and running sequences still finish).
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl SchedulerHandle {
    /// Queue a sequence; its events go to `sink`. Returns the sequence's id.
    ///
    /// Checked here, so a bad request never reaches the thread: the prompt (non-empty, ids in
    /// the vocabulary, shorter than the context where it occupies it), `max_tokens` (at least
    /// 1), the sampling values and the adapter (attached). Then capacity: at most
    /// `max_concurrent` running plus `max_queue` waiting.
    pub fn submit(&self, req: GenRequest, sink: EventSink) -> Result<u64, SubmitError> {
        let s = &self.shared;
        validate(&req, &s.info)?;
        let mut st = lock(&s.state);
        if st.shutting_down || st.finished {
            return Err(SubmitError::ShuttingDown);
        }
        if let Some(a) = &req.adapter {
            if !st.adapters.iter().any(|n| n == a) {
                return Err(SubmitError::Invalid(format!(
                    "adapter: no adapter named `{a}` is loaded (loaded: {})",
                    list_or_none(&st.adapters)
                )));
            }
        }
        if st.running + st.queue.len() >= s.cfg.max_concurrent.max(1) + s.cfg.max_queue {
            return Err(SubmitError::QueueFull {
                retry_after: st.retry_after,
            });
        }
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(a) = &req.adapter {
            *st.in_use.entry(a.clone()).or_default() += 1;
        }
        st.queue.push_back(Queued {
            id,
            req,
            sink,
            submitted: Instant::now(),
        });
        drop(st);
        lock(&s.metrics).snap.requests_total += 1;
        s.wake.notify_all();
        Ok(id)
    }

    /// Cancel a sequence (no-op if it finished): its slot is closed between steps and it ends
    /// with `Finished { reason: Cancelled }`.
    pub fn cancel(&self, id: u64) {
        lock(&self.shared.state).cancels.push(id);
        self.shared.wake.notify_all();
    }

    /// Attach an adapter between decode steps; blocks until done.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> crate::Result<()> {
        let (name, dir) = (name.to_string(), dir.to_path_buf());
        self.shared
            .command(|reply| Command::Load { name, dir, reply })
    }

    /// Detach an adapter; refused while a queued or running sequence uses it.
    pub fn unload_adapter(&self, name: &str) -> crate::Result<()> {
        let name = name.to_string();
        self.shared.command(|reply| Command::Unload { name, reply })
    }

    /// Names of the attached adapters.
    pub fn adapters(&self) -> Vec<String> {
        lock(&self.shared.state).adapters.clone()
    }

    /// A copy of the counters (two short locks; no work on the scheduler thread).
    pub fn metrics(&self) -> MetricsSnapshot {
        let (queue_depth, active) = {
            let st = lock(&self.shared.state);
            (st.queue.len(), st.running)
        };
        let mut m = lock(&self.shared.metrics);
        let now = Instant::now();
        while m
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            m.recent.pop_front();
        }
        let tokens: u64 = m.recent.iter().map(|(_, n)| n).sum();
        let mut snap = m.snap.clone();
        snap.queue_depth = queue_depth;
        snap.active_sequences = active;
        snap.recent_tokens_per_s = tokens as f64 / RATE_WINDOW.as_secs_f64();
        snap
    }

    /// The backend's context length (prompt included where [`Self::prompt_in_context`]).
    pub fn context_length(&self) -> usize {
        self.shared.info.context
    }

    /// Whether the prompt occupies the context (decoders) or is read by an encoder.
    pub fn prompt_in_context(&self) -> bool {
        self.shared.info.prompt_in_context
    }

    /// Length of a row of logits (token ids must be below it).
    pub fn vocab_size(&self) -> usize {
        self.shared.info.vocab
    }

    /// The limits the scheduler runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.cfg
    }

    /// Refuse new requests; sequences in flight and queued finish.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }

    /// Wait for the scheduler thread to end (after [`Self::shutdown`] and the last sequence).
    /// Must not be called from a sink (that runs on the scheduler thread itself).
    pub fn join(&self) {
        let handle = lock(&self.shared.thread).take();
        match handle {
            Some(h) => {
                let _ = h.join();
            }
            None => {
                // Another clone is joining: wait for the thread's end signal.
                let mut st = lock(&self.shared.state);
                while !st.finished {
                    st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

/// Start the scheduler thread over `backend`.
pub fn start(backend: Box<dyn BatchBackend>, cfg: SchedulerConfig) -> SchedulerHandle {
    let info = BackendInfo {
        vocab: backend.vocab_size(),
        context: backend.context_length(),
        prompt_in_context: backend.prompt_in_context(),
        chunked_prefill: backend.chunked_prefill(),
    };
    let adapters = backend.adapters();
    let shared = Arc::new(Shared {
        info,
        state: Mutex::new(State {
            queue: VecDeque::new(),
            commands: Vec::new(),
            cancels: Vec::new(),
            shutting_down: false,
            finished: false,
            running: 0,
            adapters,
            in_use: HashMap::new(),
            retry_after: Duration::from_secs(1),
        }),
        wake: Condvar::new(),
        done: Condvar::new(),
        metrics: Mutex::new(Metrics {
            snap: MetricsSnapshot {
                ttft_buckets: vec![0; TTFT_BUCKETS.len()],
                ..Default::default()
            },
            recent: VecDeque::new(),
        }),
        next_id: AtomicU64::new(1),
        thread: Mutex::new(None),
        cfg,
    });
    let thread_shared = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name("ferrotune-scheduler".into())
        .spawn(move || Worker::new(thread_shared, backend).run());
    match spawned {
        Ok(h) => *lock(&shared.thread) = Some(h),
        // No thread: every call answers at once (submit: ShuttingDown) instead of hanging.
        Err(_) => {
            let mut st = lock(&shared.state);
            st.finished = true;
            st.shutting_down = true;
        }
    }
    SchedulerHandle {
        _owner: Arc::new(Owner(Arc::clone(&shared))),
        shared,
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// The request's own checks (the adapter is checked against the attached ones under the lock).
fn validate(req: &GenRequest, info: &BackendInfo) -> Result<(), SubmitError> {
    let bad = |m: String| Err(SubmitError::Invalid(m));
    if req.prompt.is_empty() {
        return bad("prompt: empty (0 tokens)".into());
    }
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= info.vocab) {
        return bad(format!(
            "prompt: token id {t} is outside the vocabulary of {} tokens",
            info.vocab
        ));
    }
    if info.prompt_in_context && req.prompt.len() >= info.context {
        return bad(format!(
            "prompt: {} tokens but the model's context window is {} tokens (a prompt must leave room for at least one generated token)",
            req.prompt.len(),
            info.context
        ));
    }
    if req.max_tokens == 0 {
        return bad("max_tokens: got 0, expected at least 1".into());
    }
    let s = &req.sampling;
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return bad(format!(
            "temperature: got {}, expected a number >= 0 (0 decodes greedily)",
            s.temperature
        ));
    }
    if let Some(p) = s.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return bad(format!("top_p: got {p}, expected a number in (0, 1]"));
        }
    }
    if s.top_k == Some(0) {
        return bad("top_k: got 0, expected at least 1".into());
    }
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if !v.is_finite() {
            return bad(format!("{name}: got {v}, expected a finite number"));
        }
    }
    for &(t, b) in &s.logit_bias {
        if t as usize >= info.vocab {
            return bad(format!(
                "logit_bias: token id {t} is out of the vocabulary ({} ids)",
                info.vocab
            ));
        }
        if !(b.is_finite() && (-100.0..=100.0).contains(&b)) {
            return bad(format!(
                "logit_bias: {b} for token {t}, expected -100 to 100"
            ));
        }
    }
    Ok(())
}

/// Picks one sequence's tokens: OpenAI's penalties, the constraint's mask, log-probabilities,
/// then [`Sampler`] (greedy is exactly [`crate::generate::argmax`], as `ferrotune generate`).
struct SeqSampler {
    params: SamplingParams,
    inner: Sampler,
    /// How often each token was generated (presence and frequency penalties).
    counts: HashMap<u32, u32>,
}

/// One picked token.
struct Pick {
    id: u32,
    logprob: Option<TokenLogprob>,
}

impl SeqSampler {
    fn new(params: &SamplingParams) -> Self {
        let cfg = GenerationConfig {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            // No seed: a fresh one per request, so that equal requests differ (OpenAI).
            seed: params.seed.unwrap_or_else(rand::random),
            // OpenAI's penalties replace HF's repetition penalty (applied here, before masks).
            repetition_penalty: 1.0,
            ..Default::default()
        };
        Self {
            params: params.clone(),
            inner: Sampler::new(&cfg),
            counts: HashMap::new(),
        }
    }

    fn pick(
        &mut self,
        mut logits: Vec<f32>,
        constraint: Option<&mut Box<dyn TokenConstraint>>,
        logprobs: Option<usize>,
    ) -> std::result::Result<Pick, String> {
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= pp + fp * c as f32;
                }
            }
        }
        for &(t, b) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if let Some(c) = constraint {
            c.mask(&mut logits);
        }
        if !logits.iter().any(|l| l.is_finite()) {
            return Err("no token may come next (every logit is masked or not finite)".into());
        }
        let logprob = logprobs.map(|k| self.log_softmax(&logits, k));
        let id = self.inner.sample(&mut logits, &[]);
        let logprob = logprob.map(|(lp, top)| TokenLogprob {
            logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
            top,
        });
        *self.counts.entry(id).or_default() += 1;
        Ok(Pick { id, logprob })
    }

    /// Log-softmax of the processed logits (scaled by the temperature when sampling, as the
    /// sampled distribution is) and its `k` best entries, best first (ties: lower id first).
    fn log_softmax(&self, logits: &[f32], k: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
        let t = if self.params.temperature > 0.0 {
            (self.params.temperature as f32).max(f32::MIN_POSITIVE)
        } else {
            1.0
        };
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let scaled: Vec<f32> = logits.iter().map(|&l| (l - max) / t).collect();
        let sum: f64 = scaled.iter().map(|&s| (s as f64).exp()).sum();
        let lse = sum.ln() as f32;
        let lp: Vec<f32> = scaled.iter().map(|&s| s - lse).collect();
        let k = k.min(lp.len());
        let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
        let better = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
        if k > 0 && k < idx.len() {
            idx.select_nth_unstable_by(k - 1, better);
            idx.truncate(k);
        }
        idx.sort_unstable_by(better);
        idx.truncate(k);
        let top = idx.into_iter().map(|i| (i, lp[i as usize])).collect();
        (lp, top)
    }
}

/// How a sequence ends.
enum Outcome {
    Finished(FinishReason),
    /// The sink said nobody listens: cancelled, no more events.
    Gone,
    Failed(String),
}

/// A sequence holding a slot.
struct Seq {
    id: u64,
    slot: SlotId,
    prompt: Vec<u32>,
    /// Prompt tokens fed to the backend so far (counting those reused from a cached prefix).
    fed: usize,
    /// Prompt tokens the backend held already (prefix cache).
    cached: usize,
    adapter: Option<String>,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    constraint: Option<Box<dyn TokenConstraint>>,
    logprobs: Option<usize>,
    sampler: SeqSampler,
    sink: EventSink,
    submitted: Instant,
    started: Instant,
    deadline: Option<Instant>,
    generated: usize,
    ttft: Option<Duration>,
    /// The token to feed at the next step (decoding).
    next: Option<u32>,
    outcome: Option<Outcome>,
}

/// Send `ev` to a sink; a panicking sink counts as one nobody listens to.
fn send(sink: &mut EventSink, ev: SeqEvent) -> bool {
    catch_unwind(AssertUnwindSafe(|| sink(ev))).unwrap_or(false)
}

/// A panic payload as text.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Run a backend call; a panic becomes an error (the backend's state for the slots concerned
/// is then unknown, so the caller fails them).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::msg(format!(
            "the backend panicked: {}",
            panic_text(p)
        ))),
    }
}

/// The scheduler thread's own state.
struct Worker {
    shared: Arc<Shared>,
    backend: Box<dyn BatchBackend>,
    seqs: Vec<Seq>,
    /// Mean seconds a sequence holds a slot (moving average), for `retry_after`.
    mean_seq_s: Option<f64>,
    /// Tokens generated this iteration, added to the metrics once per iteration.
    tokens_now: u64,
}

impl Drop for Worker {
    /// However the thread ends (normally, or a panic in this file's own code), callers must
    /// not hang: mark the end, fail what is still queued or running, drop pending commands
    /// (their callers get an error) and wake `join`.
    fn drop(&mut self) {
        let (queued, commands) = {
            let mut st = lock(&self.shared.state);
            st.finished = true;
            st.shutting_down = true;
            st.running = 0;
            (
                std::mem::take(&mut st.queue),
                std::mem::take(&mut st.commands),
            )
        };
        drop(commands);
        for mut q in queued {
            send(
                &mut q.sink,
                SeqEvent::Failed("the scheduler stopped".into()),
            );
        }
        for s in &mut self.seqs {
            if s.outcome.is_none() {
                send(
                    &mut s.sink,
                    SeqEvent::Failed("the scheduler stopped".into()),
                );
            }
        }
        self.shared.done.notify_all();
    }
}

impl Worker {
    fn new(shared: Arc<Shared>, backend: Box<dyn BatchBackend>) -> Self {
        Self {
            shared,
            backend,
            seqs: Vec::new(),
            mean_seq_s: None,
            tokens_now: 0,
        }
    }

    fn run(mut self) {
        loop {
            let Some((commands, cancelled_queued, admitted)) = self.take_work() else {
                return;
            };
            for c in commands {
                self.run_command(c);
            }
            for q in cancelled_queued {
                self.end_queued(q, FinishReason::Cancelled);
            }
            for q in admitted {
                self.admit(q);
            }
            self.check_timeouts();
            if self.backend.mixed_steps() {
                self.mixed();
            } else {
                self.prefill();
                self.decode();
            }
            self.sweep();
        }
    }

    /// Wait until there is something to do, then take it under one lock: commands,
    /// cancellations (queued ones leave the queue here, running ones are marked) and new
    /// sequences for the free slots. `None`: shut down and drained, the thread ends.
    #[allow(clippy::type_complexity)]
    fn take_work(&mut self) -> Option<(Vec<Command>, Vec<Queued>, Vec<Queued>)> {
        let shared = Arc::clone(&self.shared);
        let mut st = lock(&shared.state);
        loop {
            let work = !self.seqs.is_empty()
                || !st.queue.is_empty()
                || !st.commands.is_empty()
                || !st.cancels.is_empty();
            if work {
                break;
            }
            if st.shutting_down {
                return None;
            }
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let commands = std::mem::take(&mut st.commands);
        let cancels = std::mem::take(&mut st.cancels);
        let mut cancelled = Vec::new();
        for id in cancels {
            if let Some(pos) = st.queue.iter().position(|q| q.id == id) {
                cancelled.extend(st.queue.remove(pos));
            } else if let Some(s) = self.seqs.iter_mut().find(|s| s.id == id) {
                s.outcome
                    .get_or_insert(Outcome::Finished(FinishReason::Cancelled));
            }
        }
        // Queued requests past their deadline end without ever taking a slot.
        if let Some(timeout) = shared.cfg.request_timeout {
            let now = Instant::now();
            let mut i = 0;
            while i < st.queue.len() {
                if now.duration_since(st.queue[i].submitted) >= timeout {
                    cancelled.extend(st.queue.remove(i));
                } else {
                    i += 1;
                }
            }
        }
        let free = shared
            .cfg
            .max_concurrent
            .max(1)
            .saturating_sub(self.seqs.len());
        let n = free.min(st.queue.len());
        let admitted: Vec<Queued> = st.queue.drain(..n).collect();
        st.running = self.seqs.len() + admitted.len();
        Some((commands, cancelled, admitted))
    }

    fn run_command(&mut self, c: Command) {
        match c {
            Command::Load { name, dir, reply } => {
                let r = guarded(|| self.backend.load_adapter(&name, &dir));
                if r.is_ok() {
                    let names = catch_unwind(AssertUnwindSafe(|| self.backend.adapters()))
                        .unwrap_or_else(|_| vec![name.clone()]);
                    let mut st = lock(&self.shared.state);
                    for n in names {
                        if !st.adapters.contains(&n) {
                            st.adapters.push(n);
                        }
                    }
                }
                let _ = reply.send(r);
            }
            Command::Unload { name, reply } => {
                // Checked and removed from the list under the lock, so no submit can pick the
                // adapter between the check and the unload.
                let refused = {
                    let mut st = lock(&self.shared.state);
                    let users = st.in_use.get(&name).copied().unwrap_or(0);
                    if users > 0 {
                        Some(format!(
                            "adapter `{name}` is in use by {users} queued or running request(s); unload it when they finish"
                        ))
                    } else if let Some(pos) = st.adapters.iter().position(|n| *n == name) {
                        st.adapters.remove(pos);
                        None
                    } else {
                        Some(format!(
                            "no adapter named `{name}` is loaded (loaded: {})",
                            list_or_none(&st.adapters)
                        ))
                    }
                };
                let r = match refused {
                    Some(m) => Err(Error::msg(m)),
                    None => {
                        let r = guarded(|| self.backend.unload_adapter(&name));
                        if r.is_err() {
                            lock(&self.shared.state).adapters.push(name);
                        }
                        r
                    }
                };
                let _ = reply.send(r);
            }
        }
    }

    /// Give a request a slot and its sampler.
    fn admit(&mut self, q: Queued) {
        let Queued {
            id,
            req,
            mut sink,
            submitted,
        } = q;
        let adapter = req.adapter.clone();
        let (prompt, backend) = (&req.prompt, &mut self.backend);
        // a backend that reuses a prompt's start still leaves its last token to run
        let most = prompt.len().saturating_sub(1);
        match guarded(|| backend.open_with_prompt(adapter.as_deref(), prompt)) {
            Ok((slot, reused)) => self.seqs.push(Seq {
                id,
                slot,
                sampler: SeqSampler::new(&req.sampling),
                prompt: req.prompt,
                fed: reused.min(most),
                cached: reused.min(most),
                adapter,
                max_tokens: req.max_tokens,
                stop_ids: req.stop_ids,
                constraint: req.constraint,
                logprobs: req.logprobs.map(|k| k.min(self.shared.info.vocab)),
                sink,
                submitted,
                started: Instant::now(),
                deadline: self.shared.cfg.request_timeout.map(|t| submitted + t),
                generated: 0,
                ttft: None,
                next: None,
                outcome: None,
            }),
            Err(e) => {
                send(&mut sink, SeqEvent::Failed(e.to_string()));
                self.release(adapter.as_deref(), false);
                lock(&self.shared.metrics).snap.requests_failed += 1;
            }
        }
    }

    /// A request that never took a slot ends (cancelled or timed out while queued).
    fn end_queued(&mut self, mut q: Queued, reason: FinishReason) {
        send(
            &mut q.sink,
            SeqEvent::Finished {
                reason,
                prompt_tokens: q.req.prompt.len(),
                completion_tokens: 0,
                time_to_first_token: None,
            },
        );
        self.release(q.req.adapter.as_deref(), false);
        lock(&self.shared.metrics).snap.requests_cancelled += 1;
    }

    /// One fewer user of `adapter`; `slot`: it also held a slot.
    fn release(&self, adapter: Option<&str>, slot: bool) {
        let mut st = lock(&self.shared.state);
        if let Some(a) = adapter {
            if let Some(n) = st.in_use.get_mut(a) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.in_use.remove(a);
                }
            }
        }
        if slot {
            st.running = st.running.saturating_sub(1);
        }
    }

    fn check_timeouts(&mut self) {
        let now = Instant::now();
        for s in &mut self.seqs {
            if s.deadline.is_some_and(|d| now >= d) {
                s.outcome
                    .get_or_insert(Outcome::Finished(FinishReason::Cancelled));
            }
        }
    }

    /// This iteration's prompt chunks within its token budget: `(sequence, tokens)`.
    ///
    /// Chunked: the prompts with the fewest tokens left go first (a short request that
    /// arrives while a long prompt is being read gets its first token after its own prompt,
    /// not after the long one: with FIFO it waited for all of it), and the oldest prompt in
    /// prefill always gets a quarter of the budget, so a stream of short prompts cannot stall
    /// it. Whole prompts (a backend without chunking): FIFO.
    fn prefill_plan(&self) -> Vec<(usize, usize)> {
        let budget = self.shared.cfg.prefill_chunk.max(1);
        if !self.shared.info.chunked_prefill {
            return self.prefill_plan_whole(budget);
        }
        let waiting: Vec<(usize, usize)> = self
            .seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.outcome.is_none() && s.fed < s.prompt.len())
            .map(|(i, s)| (i, s.prompt.len() - s.fed))
            .collect();
        let Some(&(oldest, oldest_left)) = waiting.first() else {
            return Vec::new();
        };
        let reserved = oldest_left.min((budget / 4).max(1));
        let mut rest = budget - reserved;
        let mut shortest = waiting[1..].to_vec();
        shortest.sort_by_key(|&(i, left)| (left, i));
        let mut plan = Vec::new();
        for (i, left) in shortest {
            if rest == 0 {
                break;
            }
            let n = left.min(rest);
            rest -= n;
            plan.push((i, n));
        }
        plan.push((oldest, oldest_left.min(reserved + rest)));
        plan.sort_unstable();
        plan
    }

    /// [`Self::prefill_plan`] for whole prompts: FIFO, one per iteration and more while the
    /// budget lasts.
    fn prefill_plan_whole(&self, budget: usize) -> Vec<(usize, usize)> {
        let mut budget = budget;
        let mut fed_any = false;
        let mut plan = Vec::new();
        for (i, s) in self.seqs.iter().enumerate() {
            if s.outcome.is_some() || s.fed >= s.prompt.len() {
                continue;
            }
            let left = s.prompt.len() - s.fed;
            if left > budget && fed_any {
                break;
            }
            let n = left;
            budget = budget.saturating_sub(n);
            fed_any = true;
            plan.push((i, n));
            if budget == 0 {
                break;
            }
        }
        plan
    }

    /// Feed pending prompts, FIFO, within this iteration's token budget.
    fn prefill(&mut self) {
        for (i, n) in self.prefill_plan() {
            let s = &self.seqs[i];
            let (slot, from) = (s.slot, s.fed);
            let last = from + n == s.prompt.len();
            let ids = &self.seqs[i].prompt[from..from + n];
            let backend = &mut self.backend;
            let r = guarded(|| backend.prefill(slot, ids, last));
            self.seqs[i].fed += n;
            self.prompt_fed(i, last, r);
        }
    }

    /// The result of feeding sequence `i` a prompt chunk (`last`: its prompt's last).
    fn prompt_fed(&mut self, i: usize, last: bool, r: Result<Option<Vec<f32>>>) {
        match r {
            Err(e) => self.seqs[i].outcome = Some(Outcome::Failed(e.to_string())),
            Ok(Some(logits)) if last => self.token(i, logits),
            Ok(None) if last => {
                self.seqs[i].outcome = Some(Outcome::Failed(
                    "the backend returned no logits for the prompt's last position".into(),
                ))
            }
            Ok(_) => {}
        }
    }

    /// One pass for this iteration's prompt chunks (as [`Self::prefill`] picks them) and the
    /// next token of every decoding sequence, for backends that run both at once. A sequence
    /// whose prompt ends here decodes from the next iteration on.
    fn mixed(&mut self) {
        let plan = self.prefill_plan();
        let rows = self.decoding();
        if plan.is_empty() && rows.is_empty() {
            return;
        }
        let seqs = &self.seqs;
        let chunks: Vec<PromptChunk<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &seqs[i];
                PromptChunk {
                    slot: s.slot,
                    ids: &s.prompt[s.fed..s.fed + n],
                    last: s.fed + n == s.prompt.len(),
                }
            })
            .collect();
        let lasts: Vec<bool> = chunks.iter().map(|c| c.last).collect();
        let batch = self.batch_of(&rows);
        let backend = &mut self.backend;
        let out = catch_unwind(AssertUnwindSafe(|| backend.step_mixed(&chunks, &batch)));
        drop(chunks);
        if !rows.is_empty() {
            let mut m = lock(&self.shared.metrics);
            m.snap.decode_steps += 1;
            m.snap.decode_rows += rows.len() as u64;
        }
        for &(i, n) in &plan {
            self.seqs[i].fed += n;
        }
        let everyone = plan.iter().map(|&(i, _)| i).chain(rows.iter().copied());
        match out {
            Err(p) => {
                let m = format!("the backend panicked: {}", panic_text(p));
                for i in everyone {
                    self.seqs[i].outcome = Some(Outcome::Failed(m.clone()));
                }
            }
            Ok((pre, dec)) if pre.len() != plan.len() || dec.len() != rows.len() => {
                let m = format!(
                    "the backend returned {} prompt results and {} rows of logits for {} and {}",
                    pre.len(),
                    dec.len(),
                    plan.len(),
                    rows.len()
                );
                for i in everyone {
                    self.seqs[i].outcome = Some(Outcome::Failed(m.clone()));
                }
            }
            Ok((pre, dec)) => {
                for ((&(i, _), r), last) in plan.iter().zip(pre).zip(lasts) {
                    self.prompt_fed(i, last, r);
                }
                self.decoded(&rows, dec);
            }
        }
    }

    /// The sequences that decode this iteration.
    fn decoding(&self) -> Vec<usize> {
        (0..self.seqs.len())
            .filter(|&i| self.seqs[i].outcome.is_none() && self.seqs[i].next.is_some())
            .collect()
    }

    /// `(slot, next token)` of each of `rows`.
    fn batch_of(&self, rows: &[usize]) -> Vec<(SlotId, u32)> {
        rows.iter()
            .map(|&i| (self.seqs[i].slot, self.seqs[i].next.unwrap_or(0)))
            .collect()
    }

    /// One batched step over every decoding sequence.
    fn decode(&mut self) {
        let rows = self.decoding();
        if rows.is_empty() {
            return;
        }
        let batch = self.batch_of(&rows);
        let backend = &mut self.backend;
        let out = catch_unwind(AssertUnwindSafe(|| backend.step_rows(&batch)));
        {
            let mut m = lock(&self.shared.metrics);
            m.snap.decode_steps += 1;
            m.snap.decode_rows += rows.len() as u64;
        }
        match out {
            Err(p) => {
                let m = format!("the backend panicked: {}", panic_text(p));
                for &i in &rows {
                    self.seqs[i].outcome = Some(Outcome::Failed(m.clone()));
                }
            }
            Ok(results) => self.decoded(&rows, results),
        }
    }

    /// The results of a decode step over `rows` (one per row, else every row fails).
    fn decoded(&mut self, rows: &[usize], results: Vec<Result<Vec<f32>>>) {
        if results.len() != rows.len() {
            let m = format!(
                "the backend returned {} rows of logits for a batch of {}",
                results.len(),
                rows.len()
            );
            for &i in rows {
                self.seqs[i].outcome = Some(Outcome::Failed(m.clone()));
            }
            return;
        }
        for (&i, r) in rows.iter().zip(results) {
            self.seqs[i].next = None;
            match r {
                Ok(logits) => self.token(i, logits),
                Err(e) => self.seqs[i].outcome = Some(Outcome::Failed(e.to_string())),
            }
        }
    }

    /// Sample sequence `i`'s next token from `logits`, report it, and decide whether the
    /// sequence goes on.
    fn token(&mut self, i: usize, logits: Vec<f32>) {
        let vocab = self.shared.info.vocab;
        let ctx = self.shared.info.context;
        let in_ctx = self.shared.info.prompt_in_context;
        let s = &mut self.seqs[i];
        if logits.len() != vocab {
            s.outcome = Some(Outcome::Failed(format!(
                "the backend returned {} logits, expected {vocab}",
                logits.len()
            )));
            return;
        }
        let pick = match s.sampler.pick(logits, s.constraint.as_mut(), s.logprobs) {
            Ok(p) => p,
            Err(m) => {
                s.outcome = Some(Outcome::Failed(m));
                return;
            }
        };
        s.generated += 1;
        self.tokens_now += 1;
        if s.ttft.is_none() {
            s.ttft = Some(s.submitted.elapsed());
        }
        if let Some(c) = s.constraint.as_mut() {
            c.accept(pick.id);
        }
        let listening = send(
            &mut s.sink,
            SeqEvent::Token {
                id: pick.id,
                logprob: pick.logprob,
            },
        );
        let used = if in_ctx {
            s.prompt.len() + s.generated
        } else {
            s.generated
        };
        s.outcome = if !listening {
            Some(Outcome::Gone)
        } else if s.stop_ids.contains(&pick.id)
            || s.constraint.as_ref().is_some_and(|c| c.is_complete())
        {
            Some(Outcome::Finished(FinishReason::Stop))
        } else if s.generated >= s.max_tokens || used >= ctx {
            // `ferrotune generate` stops the same way: the token that fills the context is
            // reported, never fed.
            Some(Outcome::Finished(FinishReason::Length))
        } else {
            s.next = Some(pick.id);
            None
        };
    }

    /// Close the slots of ended sequences, send their last event and count them.
    fn sweep(&mut self) {
        let mut i = 0;
        while i < self.seqs.len() {
            if self.seqs[i].outcome.is_none() {
                i += 1;
                continue;
            }
            let mut s = self.seqs.remove(i);
            let slot = s.slot;
            let backend = &mut self.backend;
            // A panicking close only leaks that slot's memory; the sequence ends either way.
            let _ = catch_unwind(AssertUnwindSafe(|| backend.close(slot)));
            self.release(s.adapter.as_deref(), true);
            let held = s.started.elapsed().as_secs_f64();
            self.mean_seq_s = Some(match self.mean_seq_s {
                None => held,
                Some(m) => 0.8 * m + 0.2 * held,
            });
            let mut m = lock(&self.shared.metrics);
            m.snap.prompt_tokens_total += s.fed as u64;
            m.snap.prompt_tokens_cached_total += s.cached as u64;
            m.snap.completion_tokens_total += s.generated as u64;
            if let Some(t) = s.ttft {
                let secs = t.as_secs_f64();
                m.snap.ttft_seconds_sum += secs;
                m.snap.ttft_count += 1;
                for (b, &bound) in m.snap.ttft_buckets.iter_mut().zip(TTFT_BUCKETS) {
                    if secs <= bound {
                        *b += 1;
                    }
                }
            }
            let ev = match s.outcome.take() {
                Some(Outcome::Finished(reason)) => {
                    if reason == FinishReason::Cancelled {
                        m.snap.requests_cancelled += 1;
                    }
                    Some(SeqEvent::Finished {
                        reason,
                        prompt_tokens: s.prompt.len(),
                        completion_tokens: s.generated,
                        time_to_first_token: s.ttft,
                    })
                }
                Some(Outcome::Failed(msg)) => {
                    m.snap.requests_failed += 1;
                    Some(SeqEvent::Failed(msg))
                }
                Some(Outcome::Gone) | None => {
                    m.snap.requests_cancelled += 1;
                    None
                }
            };
            drop(m);
            if let Some(ev) = ev {
                send(&mut s.sink, ev);
            }
        }
        self.flush_rate();
    }

    /// Record this iteration's tokens for `recent_tokens_per_s` and the queue estimate.
    fn flush_rate(&mut self) {
        let now = Instant::now();
        let n = std::mem::take(&mut self.tokens_now);
        if n > 0 {
            let mut m = lock(&self.shared.metrics);
            m.recent.push_back((now, n));
            while m
                .recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                m.recent.pop_front();
            }
        }
        if let Some(mean) = self.mean_seq_s {
            let mut st = lock(&self.shared.state);
            // Slots free up about every mean / max_concurrent seconds; a request behind
            // `queue` others waits for that many frees, plus its own.
            let per_free = mean / self.shared.cfg.max_concurrent.max(1) as f64;
            let wait = per_free * (st.queue.len() + 1) as f64;
            st.retry_after = Duration::from_secs_f64(wait.clamp(1.0, 600.0));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler over a fake backend whose next token is `last + 1` (+1 more with an
    //! adapter), with delays and failures on chosen tokens. The real model backend is tested
    //! against `generate` in `backend.rs`.
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const VOCAB: usize = 32;
    /// Fed to `step`: an error for that row.
    const ERR_TOKEN: u32 = 20;
    /// Fed to `step`: a panic (the whole batch fails).
    const PANIC_STEP_TOKEN: u32 = 25;
    /// In a prompt: `prefill` panics.
    const PANIC_PROMPT_TOKEN: u32 = 30;

    #[derive(Default)]
    struct Log {
        open: usize,
        max_open: usize,
        /// "p{slot}:{n}" per prefill call, "s{rows}" per step.
        events: Vec<String>,
    }

    struct Fake {
        log: Arc<Mutex<Log>>,
        context: usize,
        chunked: bool,
        step_delay: Duration,
        prefill_delay: Duration,
        /// Per slot: its adapter shift and its last token.
        slots: Vec<Option<(u32, u32)>>,
        adapters: Vec<String>,
    }

    fn fake(context: usize, step_ms: u64) -> (Fake, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        (
            Fake {
                log: Arc::clone(&log),
                context,
                chunked: true,
                step_delay: Duration::from_millis(step_ms),
                prefill_delay: Duration::ZERO,
                slots: Vec::new(),
                adapters: Vec::new(),
            },
            log,
        )
    }

    /// The next token is `last + 1 + shift` (logit 5), its successor is second best (logit 4).
    fn logits(last: u32, shift: u32) -> Vec<f32> {
        let mut l = vec![0.0; VOCAB];
        let next = (last + 1 + shift) as usize % VOCAB;
        l[next] = 5.0;
        l[(next + 1) % VOCAB] = 4.0;
        l
    }

    impl BatchBackend for Fake {
        fn vocab_size(&self) -> usize {
            VOCAB
        }
        fn context_length(&self) -> usize {
            self.context
        }
        fn chunked_prefill(&self) -> bool {
            self.chunked
        }
        fn open(&mut self, adapter: Option<&str>) -> Result<SlotId> {
            if let Some(a) = adapter {
                if !self.adapters.iter().any(|n| n == a) {
                    return Err(Error::msg(format!("no adapter `{a}`")));
                }
            }
            let mut log = lock(&self.log);
            log.open += 1;
            log.max_open = log.max_open.max(log.open);
            self.slots.push(Some((u32::from(adapter.is_some()), 0)));
            Ok(self.slots.len() - 1)
        }
        fn prefill(&mut self, slot: SlotId, ids: &[u32], last: bool) -> Result<Option<Vec<f32>>> {
            lock(&self.log)
                .events
                .push(format!("p{slot}:{}", ids.len()));
            if ids.contains(&PANIC_PROMPT_TOKEN) {
                panic!("prefill panic");
            }
            std::thread::sleep(self.prefill_delay);
            let s = self.slots[slot].as_mut().unwrap();
            s.1 = *ids.last().unwrap();
            Ok(last.then(|| logits(s.1, s.0)))
        }
        fn step(&mut self, batch: &[(SlotId, u32)]) -> Result<Vec<Vec<f32>>> {
            self.step_rows(batch).into_iter().collect()
        }
        fn step_rows(&mut self, batch: &[(SlotId, u32)]) -> Vec<Result<Vec<f32>>> {
            lock(&self.log).events.push(format!("s{}", batch.len()));
            std::thread::sleep(self.step_delay);
            if batch.iter().any(|&(_, t)| t == PANIC_STEP_TOKEN) {
                panic!("step panic");
            }
            batch
                .iter()
                .map(|&(slot, t)| {
                    if t == ERR_TOKEN {
                        return Err(Error::msg(format!("boom on {t}")));
                    }
                    let s = self.slots[slot].as_mut().unwrap();
                    s.1 = t;
                    Ok(logits(t, s.0))
                })
                .collect()
        }
        fn close(&mut self, slot: SlotId) {
            if self.slots[slot].take().is_some() {
                lock(&self.log).open -= 1;
            }
        }
        fn load_adapter(&mut self, name: &str, _dir: &Path) -> Result<()> {
            if name == "bad" {
                return Err(Error::msg("cannot load `bad`"));
            }
            self.adapters.push(name.to_string());
            Ok(())
        }
        fn unload_adapter(&mut self, name: &str) -> Result<()> {
            self.adapters.retain(|n| n != name);
            Ok(())
        }
        fn adapters(&self) -> Vec<String> {
            self.adapters.clone()
        }
    }

    fn cfg(max_concurrent: usize, max_queue: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_concurrent,
            max_queue,
            prefill_chunk: 64,
            request_timeout: None,
        }
    }

    fn req(prompt: &[u32], max_tokens: usize) -> GenRequest {
        GenRequest {
            prompt: prompt.to_vec(),
            adapter: None,
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            logprobs: None,
            stop_ids: Vec::new(),
            constraint: None,
        }
    }

    fn submit(h: &SchedulerHandle, r: GenRequest) -> (u64, mpsc::Receiver<SeqEvent>) {
        let (tx, rx) = mpsc::channel();
        let id = h
            .submit(r, Box::new(move |ev| tx.send(ev).is_ok()))
            .unwrap();
        (id, rx)
    }

    /// Every event up to the last one (which is returned apart); fails rather than hangs.
    fn collect(rx: &mpsc::Receiver<SeqEvent>) -> (Vec<u32>, SeqEvent) {
        let mut ids = Vec::new();
        loop {
            let ev = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("no event within 10 s");
            match ev {
                SeqEvent::Token { id, .. } => ids.push(id),
                other => return (ids, other),
            }
        }
    }

    fn reason(ev: &SeqEvent) -> FinishReason {
        match ev {
            SeqEvent::Finished { reason, .. } => *reason,
            other => panic!("expected Finished, got {other:?}"),
        }
    }

    /// Poll `f` until true (10 s at most).
    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn tokens_stop_ids_max_tokens_and_context_end_sequences() {
        let (b, log) = fake(64, 0);
        let h = start(Box::new(b), cfg(4, 4));
        let (_, rx) = submit(&h, req(&[1, 2, 3], 5));
        let (ids, last) = collect(&rx);
        assert_eq!(ids, vec![4, 5, 6, 7, 8]);
        match last {
            SeqEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                time_to_first_token,
            } => {
                assert_eq!(reason, FinishReason::Length);
                assert_eq!((prompt_tokens, completion_tokens), (3, 5));
                assert!(time_to_first_token.is_some());
            }
            other => panic!("{other:?}"),
        }
        // A stop id is reported, then the sequence stops.
        let mut r = req(&[1, 2, 3], 50);
        r.stop_ids = vec![6];
        let (_, rx) = submit(&h, r);
        let (ids, last) = collect(&rx);
        assert_eq!((ids, reason(&last)), (vec![4, 5, 6], FinishReason::Stop));
        // The context: 60 prompt tokens leave 4 to generate.
        let long: Vec<u32> = (0..60).map(|i| i % 16).collect();
        let (_, rx) = submit(&h, req(&long, 100));
        let (ids, last) = collect(&rx);
        assert_eq!((ids.len(), reason(&last)), (4, FinishReason::Length));
        h.shutdown();
        h.join();
        let m = h.metrics();
        assert_eq!(m.requests_total, 3);
        assert_eq!(m.completion_tokens_total, 5 + 3 + 4);
        assert_eq!(m.prompt_tokens_total, 3 + 3 + 60);
        assert_eq!(m.ttft_count, 3);
        assert_eq!(m.ttft_buckets.len(), TTFT_BUCKETS.len());
        assert_eq!(*m.ttft_buckets.last().unwrap(), 3);
        assert_eq!((m.queue_depth, m.active_sequences), (0, 0));
        assert!(m.recent_tokens_per_s > 0.0);
        assert_eq!(lock(&log).open, 0);
    }

    #[test]
    fn invalid_requests_are_one_line_errors_naming_the_field() {
        let (b, _) = fake(64, 0);
        let h = start(Box::new(b), cfg(1, 1));
        let cases: Vec<(GenRequest, &str)> = vec![
            (req(&[], 5), "prompt"),
            (req(&[1; 64], 5), "context window"),
            (req(&[1, 99], 5), "vocabulary"),
            (req(&[1], 0), "max_tokens"),
            (
                GenRequest {
                    adapter: Some("nope".into()),
                    ..req(&[1], 5)
                },
                "adapter: no adapter named `nope`",
            ),
            (
                GenRequest {
                    sampling: SamplingParams {
                        temperature: f64::NAN,
                        ..Default::default()
                    },
                    ..req(&[1], 5)
                },
                "temperature",
            ),
            (
                GenRequest {
                    sampling: SamplingParams {
                        top_p: Some(0.0),
                        ..Default::default()
                    },
                    ..req(&[1], 5)
                },
                "top_p",
            ),
            (
                GenRequest {
                    sampling: SamplingParams {
                        frequency_penalty: f32::INFINITY,
                        ..Default::default()
                    },
                    ..req(&[1], 5)
                },
                "frequency_penalty",
            ),
        ];
        for (r, want) in cases {
            match h.submit(r, Box::new(|_| true)) {
                Err(SubmitError::Invalid(m)) => {
                    assert!(m.contains(want), "{m} should name {want}");
                    assert_eq!(m.lines().count(), 1, "{m}");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
        // 63 tokens leave room for one.
        let (_, rx) = submit(&h, req(&[1; 63], 5));
        assert_eq!(collect(&rx).0.len(), 1);
        assert_eq!(h.metrics().requests_total, 1);
    }

    #[test]
    fn a_full_queue_is_refused_with_a_retry_estimate() {
        let (b, _) = fake(1 << 20, 2);
        let h = start(Box::new(b), cfg(1, 1));
        let (a, rxa) = submit(&h, req(&[1], 1 << 19));
        let (b, rxb) = submit(&h, req(&[1], 1 << 19));
        match h.submit(req(&[1], 5), Box::new(|_| true)) {
            Err(SubmitError::QueueFull { retry_after }) => {
                assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}")
            }
            other => panic!("expected QueueFull, got {other:?}"),
        }
        assert_eq!(h.metrics().queue_depth + h.metrics().active_sequences, 2);
        h.cancel(b);
        h.cancel(a);
        assert_eq!(reason(&collect(&rxa).1), FinishReason::Cancelled);
        let (ids, last) = collect(&rxb);
        assert_eq!((ids.len(), reason(&last)), (0, FinishReason::Cancelled));
        // Room again.
        let (_, rx) = submit(&h, req(&[1], 2));
        assert_eq!(collect(&rx).0, vec![2, 3]);
        assert_eq!(h.metrics().requests_cancelled, 2);
    }

    #[test]
    fn cancel_and_a_gone_sink_free_the_slot() {
        let (b, log) = fake(1 << 20, 1);
        let h = start(Box::new(b), cfg(1, 4));
        let (a, rxa) = submit(&h, req(&[1], 1 << 19));
        let (_, rxb) = submit(&h, req(&[1], 3));
        // A is running (B waits for its slot): cancel it mid-generation.
        assert!(matches!(
            rxa.recv_timeout(Duration::from_secs(10)),
            Ok(SeqEvent::Token { .. })
        ));
        h.cancel(a);
        assert_eq!(reason(&collect(&rxa).1), FinishReason::Cancelled);
        let (ids, last) = collect(&rxb);
        assert_eq!((ids, reason(&last)), (vec![2, 3, 4], FinishReason::Length));
        // A sink that stops listening after 3 tokens: the sequence ends, no more events.
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        h.submit(
            req(&[1], 1 << 19),
            Box::new(move |_| c.fetch_add(1, Ordering::SeqCst) < 2),
        )
        .unwrap();
        wait_for("the gone sink's sequence ends", || {
            h.metrics().requests_cancelled == 2 && h.metrics().active_sequences == 0
        });
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(lock(&log).open, 0);
        assert_eq!(lock(&log).max_open, 1);
        // cancel of a finished id is a no-op.
        h.cancel(a);
        let (_, rx) = submit(&h, req(&[5], 1));
        assert_eq!(collect(&rx).0, vec![6]);
    }

    #[test]
    fn a_request_past_its_timeout_is_cancelled_running_or_queued() {
        // Steps of 400 ms, a timeout of 150 ms: A has its first token (from the prefill) when
        // its first step ends past the deadline; B, queued behind it all along, never starts.
        let (b, log) = fake(1 << 20, 400);
        let mut c = cfg(1, 4);
        c.request_timeout = Some(Duration::from_millis(150));
        let h = start(Box::new(b), c);
        let t = Instant::now();
        let (_, rxa) = submit(&h, req(&[1], 1 << 19));
        let (_, rxb) = submit(&h, req(&[1], 1 << 19));
        let (ids, last) = collect(&rxa);
        assert_eq!(reason(&last), FinishReason::Cancelled);
        assert!(!ids.is_empty());
        let (ids, last) = collect(&rxb);
        assert_eq!(reason(&last), FinishReason::Cancelled);
        assert!(ids.is_empty(), "B never got the slot");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(3),
            "{took:?}"
        );
        wait_for("slot closed", || lock(&log).open == 0);
        assert_eq!(h.metrics().requests_cancelled, 2);
    }

    #[test]
    fn unload_is_refused_while_a_queued_or_running_request_uses_the_adapter() {
        let (b, _) = fake(1 << 20, 1);
        let h = start(Box::new(b), cfg(1, 4));
        let e = h.load_adapter("bad", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("bad"));
        h.load_adapter("a", Path::new("x")).unwrap();
        assert_eq!(h.adapters(), vec!["a".to_string()]);
        // Running with it.
        let (id, rx) = submit(
            &h,
            GenRequest {
                adapter: Some("a".into()),
                ..req(&[1], 1 << 19)
            },
        );
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // The adapter's shift: 1 -> 3.
        assert!(matches!(first, SeqEvent::Token { id: 3, .. }), "{first:?}");
        let e = h.unload_adapter("a").unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        h.cancel(id);
        collect(&rx);
        // Queued behind a base request.
        let (base, rxbase) = submit(&h, req(&[1], 1 << 19));
        let (q, rxq) = submit(
            &h,
            GenRequest {
                adapter: Some("a".into()),
                ..req(&[1], 2)
            },
        );
        let e = h.unload_adapter("a").unwrap_err().to_string();
        assert!(e.contains("in use by 1"), "{e}");
        h.cancel(q);
        h.cancel(base);
        collect(&rxq);
        collect(&rxbase);
        h.unload_adapter("a").unwrap();
        assert!(h.adapters().is_empty());
        assert!(h
            .unload_adapter("a")
            .unwrap_err()
            .to_string()
            .contains("no adapter"));
        match h.submit(
            GenRequest {
                adapter: Some("a".into()),
                ..req(&[1], 2)
            },
            Box::new(|_| true),
        ) {
            Err(SubmitError::Invalid(m)) => assert!(m.contains("`a`"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shutdown_refuses_new_requests_and_drains_the_others() {
        let (b, log) = fake(64, 1);
        let h = start(Box::new(b), cfg(1, 8));
        let rxs: Vec<_> = (0..3).map(|i| submit(&h, req(&[i], 5)).1).collect();
        h.shutdown();
        assert_eq!(
            h.submit(req(&[1], 5), Box::new(|_| true)).unwrap_err(),
            SubmitError::ShuttingDown
        );
        h.join();
        for (i, rx) in rxs.iter().enumerate() {
            let (ids, last) = collect(rx);
            let want: Vec<u32> = (1..=5).map(|k| i as u32 + k).collect();
            assert_eq!((ids, reason(&last)), (want, FinishReason::Length));
        }
        assert_eq!(lock(&log).open, 0);
        assert!(h.load_adapter("a", Path::new("x")).is_err(), "thread gone");
        h.join(); // twice: returns at once
    }

    #[test]
    fn dropping_every_handle_ends_the_thread() {
        let (b, log) = fake(64, 0);
        let h = start(Box::new(b), cfg(1, 8));
        let (_, rx) = submit(&h, req(&[1], 3));
        let shared = Arc::clone(&h.shared);
        drop(h);
        assert_eq!(collect(&rx).0, vec![2, 3, 4], "in flight finishes");
        wait_for("thread ends", || lock(&shared.state).finished);
        assert_eq!(lock(&log).open, 0);
    }

    #[test]
    fn backend_errors_and_panics_fail_only_the_sequences_concerned() {
        let (b, log) = fake(64, 0);
        let h = start(Box::new(b), cfg(4, 8));
        // Steps on 18, 19, then 20 errs: 3 tokens, then Failed.
        let (_, err) = submit(&h, req(&[17], 10));
        let (_, panics) = submit(&h, req(&[PANIC_PROMPT_TOKEN], 10));
        let (_, ok1) = submit(&h, req(&[1], 6));
        let (_, ok2) = submit(&h, req(&[2], 6));
        let (ids, last) = collect(&err);
        assert_eq!(ids, vec![18, 19, 20]);
        assert!(
            matches!(&last, SeqEvent::Failed(m) if m.contains("boom on 20")),
            "{last:?}"
        );
        let (ids, last) = collect(&panics);
        assert!(ids.is_empty());
        assert!(
            matches!(&last, SeqEvent::Failed(m) if m.contains("panicked") && m.contains("prefill panic")),
            "{last:?}"
        );
        assert_eq!(collect(&ok1).0, (2..8).collect::<Vec<u32>>());
        assert_eq!(collect(&ok2).0, (3..9).collect::<Vec<u32>>());
        // A panic in a step fails that step's rows, and the thread carries on.
        let (_, p) = submit(&h, req(&[PANIC_STEP_TOKEN - 1], 5));
        let (ids, last) = collect(&p);
        assert_eq!(ids, vec![PANIC_STEP_TOKEN]);
        assert!(
            matches!(&last, SeqEvent::Failed(m) if m.contains("step panic")),
            "{last:?}"
        );
        let (_, rx) = submit(&h, req(&[1], 2));
        assert_eq!(collect(&rx).0, vec![2, 3]);
        assert_eq!(h.metrics().requests_failed, 3);
        wait_for("slots closed", || lock(&log).open == 0);
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_between_decode_steps() {
        let (b, log) = fake(1 << 20, 1);
        let mut c = cfg(4, 8);
        c.prefill_chunk = 4;
        let h = start(Box::new(b), c);
        let (a, rxa) = submit(&h, req(&[1], 1 << 19));
        rxa.recv_timeout(Duration::from_secs(10)).unwrap();
        let (_, rxb) = submit(&h, req(&[1; 10], 2));
        assert_eq!(collect(&rxb).0, vec![2, 3]);
        h.cancel(a);
        collect(&rxa);
        let events = lock(&log).events.clone();
        let b_chunks: Vec<(usize, &String)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.starts_with("p1:"))
            .collect();
        let sizes: Vec<&str> = b_chunks.iter().map(|(_, e)| &e[3..]).collect();
        assert_eq!(sizes, vec!["4", "4", "2"], "{events:?}");
        // A kept decoding between B's chunks.
        for w in b_chunks.windows(2) {
            assert!(
                events[w[0].0..w[1].0].iter().any(|e| e.starts_with('s')),
                "{events:?}"
            );
        }
        // A backend without chunked prefill gets the prompt whole.
        let (mut b, log) = fake(64, 0);
        b.chunked = false;
        let mut c = cfg(4, 8);
        c.prefill_chunk = 4;
        let h = start(Box::new(b), c);
        let (_, rx) = submit(&h, req(&[1; 10], 1));
        collect(&rx);
        assert_eq!(lock(&log).events[0], "p0:10");
    }

    /// A short prompt that arrives while a long one is being read goes first (its first token
    /// does not wait for the long prompt), and the long one keeps a quarter of each pass.
    #[test]
    fn a_short_prompt_is_not_queued_behind_a_long_one() {
        let (mut b, log) = fake(1 << 20, 0);
        // 512 chunks of the long prompt take at least half a second
        b.prefill_delay = Duration::from_millis(1);
        let mut c = cfg(4, 8);
        c.prefill_chunk = 8;
        let h = start(Box::new(b), c);
        let (_, rxa) = submit(&h, req(&[1; 4096], 1));
        wait_for("the long prompt's first chunk", || {
            lock(&log).events.iter().any(|e| e.starts_with("p0:"))
        });
        let (_, rxb) = submit(&h, req(&[1; 10], 2));
        assert_eq!(collect(&rxb).0, vec![2, 3]);
        collect(&rxa);
        let events = lock(&log).events.clone();
        let b_chunks: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.starts_with("p1:"))
            .map(|(i, _)| i)
            .collect();
        let sizes: Vec<&str> = b_chunks.iter().map(|&i| &events[i][3..]).collect();
        // 8 a pass, 2 of them the long prompt's: 6, then the last 4
        assert_eq!(sizes, vec!["6", "4"], "{events:?}");
        let a_last = events.iter().rposition(|e| e.starts_with("p0:")).unwrap();
        assert!(b_chunks[1] < a_last, "B waited for A's whole prompt");
        // the long prompt's share of the same passes (it runs first: slot order): its quarter,
        // then its quarter and what B left
        let a_share: Vec<&str> = b_chunks.iter().map(|&i| events[i - 1].as_str()).collect();
        assert_eq!(a_share, vec!["p0:2", "p0:4"], "{events:?}");
    }

    /// Allows only token 7, and is complete after two of them.
    struct OnlySevens(usize);
    impl TokenConstraint for OnlySevens {
        fn mask(&mut self, logits: &mut [f32]) {
            for (i, l) in logits.iter_mut().enumerate() {
                if i != 7 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        fn accept(&mut self, id: u32) {
            assert_eq!(id, 7);
            self.0 += 1;
        }
        fn is_complete(&self) -> bool {
            self.0 >= 2
        }
    }

    #[test]
    fn constraints_penalties_and_logprobs() {
        let (b, _) = fake(64, 0);
        let h = start(Box::new(b), cfg(4, 8));
        let mut r = req(&[1], 10);
        r.constraint = Some(Box::new(OnlySevens(0)));
        r.logprobs = Some(2);
        let (_, rx) = submit(&h, r);
        let mut got = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                SeqEvent::Token { id, logprob } => got.push((id, logprob.unwrap())),
                last => {
                    assert_eq!(reason(&last), FinishReason::Stop);
                    break;
                }
            }
        }
        assert_eq!(got.len(), 2);
        for (id, lp) in &got {
            // Masked to one token: it has all the probability.
            assert_eq!(*id, 7);
            assert!(lp.logprob.abs() < 1e-6, "{lp:?}");
            assert_eq!(lp.top[0].0, 7);
        }
        // Presence penalty 2 turns "last + 1" (logit 5) into the runner-up (logit 4) once a
        // token repeats; the fake's tokens never repeat in 5 steps, so compare one sampler.
        let mut s = SeqSampler::new(&SamplingParams {
            temperature: 0.0,
            presence_penalty: 2.0,
            ..Default::default()
        });
        let l = |best: usize| {
            let mut v = vec![0.0f32; 8];
            v[best] = 5.0;
            v[(best + 1) % 8] = 4.0;
            v
        };
        assert_eq!(s.pick(l(3), None, None).unwrap().id, 3);
        assert_eq!(s.pick(l(3), None, None).unwrap().id, 4, "3 penalised");
        let mut f = SeqSampler::new(&SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.6,
            ..Default::default()
        });
        // 3 wins until it was picked twice: 5 - 2·0.6 < 4.
        let picks: Vec<u32> = (0..3)
            .map(|_| f.pick(l(3), None, None).unwrap().id)
            .collect();
        assert_eq!(picks, vec![3, 3, 4]);
        // logit_bias: +100 forces a token, -100 bans the best one; the bias shows in logprobs.
        let mut b = SeqSampler::new(&SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(6, 100.0), (3, -100.0)],
            ..Default::default()
        });
        let p = b.pick(l(3), None, Some(1)).unwrap();
        assert_eq!(p.id, 6);
        assert!(p.logprob.unwrap().logprob > -1e-3);
        let mut ban = SeqSampler::new(&SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(3, -100.0)],
            ..Default::default()
        });
        assert_eq!(ban.pick(l(3), None, None).unwrap().id, 4);
        // Log-probabilities: a distribution, best first, the pick's own value.
        let mut g = SeqSampler::new(&SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        let p = g.pick(vec![1.0, 3.0, 2.0, 0.5], None, Some(3)).unwrap();
        let lp = p.logprob.unwrap();
        assert_eq!(p.id, 1, "greedy is argmax");
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        assert_eq!(lp.logprob, lp.top[0].1);
        let (all, _) = g.log_softmax(&[1.0, 3.0, 2.0, 0.5], 0);
        let total: f32 = all.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // Temperature scales the reported distribution as it scales the sampled one.
        let hot = SeqSampler::new(&SamplingParams {
            temperature: 2.0,
            seed: Some(1),
            ..Default::default()
        });
        let (warm, _) = hot.log_softmax(&[1.0, 3.0], 0);
        let want = (1.0f32 / (1.0 + (-1.0f32).exp())).ln();
        assert!((warm[1] - want).abs() < 1e-6, "{warm:?}");
        // A constraint that masks everything fails the sequence rather than picking garbage.
        struct Nothing;
        impl TokenConstraint for Nothing {
            fn mask(&mut self, l: &mut [f32]) {
                l.fill(f32::NEG_INFINITY)
            }
            fn accept(&mut self, _: u32) {}
            fn is_complete(&self) -> bool {
                false
            }
        }
        let mut r = req(&[1], 10);
        r.constraint = Some(Box::new(Nothing));
        let (_, rx) = submit(&h, r);
        assert!(matches!(collect(&rx).1, SeqEvent::Failed(m) if m.contains("masked")));
    }
}
