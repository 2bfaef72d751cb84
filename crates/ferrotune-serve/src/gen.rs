//! Running one request's sequences: submit them to the scheduler, turn their token events into
//! text (incremental detokenization, stop strings, log-probabilities), and cancel whatever is
//! still running when the request goes away.
use crate::error::ApiError;
use crate::stop::StopMatcher;
use crate::AppState;
use crate::Engine;
use ferrotune::serve::{
    EventSink, FinishReason, GenRequest, SamplingParams, SeqEvent, SubmitError, TokenLogprob,
};
use ferrotune::tokenizer::{TokenStream, Tokenizer};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Extra time past `--request-timeout` before the HTTP layer gives up on the scheduler itself (the
/// scheduler enforces the timeout; this only guards against a stuck one).
const TIMEOUT_GRACE: Duration = Duration::from_secs(10);

/// One sequence to run: its prompt and the choice index it answers as.
pub struct Seq {
    pub prompt: Vec<u32>,
    pub choice: usize,
    pub seed: Option<u64>,
}

/// What every sequence of a request shares.
pub struct Params {
    pub adapter: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// `Some(k)`: report log-probabilities with `k` alternatives.
    pub logprobs: Option<usize>,
    pub stop: Vec<String>,
    pub json_mode: bool,
    /// End-of-sequence tokens do not end the sequence (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

/// A generated token as the response reports it.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
    /// Characters of the choice's text before this token (completions' `text_offset`).
    pub offset: usize,
}

/// What the response is told as generation goes.
pub enum Update {
    /// New text for a choice (may be empty while a possible stop string is held back) and the
    /// token that produced it (with log-probabilities when asked for).
    Text {
        choice: usize,
        text: String,
        token: Option<TokenInfo>,
    },
    /// The choice is complete.
    Finish { choice: usize, reason: &'static str },
}

/// Token counts for `usage`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A request's submitted sequences. Dropping it cancels every sequence still running: that
/// is how a client that disconnects (the handler's future or the stream is dropped) stops its
/// generation.
pub struct Running {
    engine: Arc<dyn Engine>,
    rx: mpsc::UnboundedReceiver<(usize, SeqEvent)>,
    ids: Vec<u64>,
    open: Vec<bool>,
    choices: Vec<usize>,
    stops: Vec<String>,
    stop_ids: Vec<u32>,
    logprobs: bool,
    deadline: Option<Instant>,
    prompt_tokens: usize,
}

impl Drop for Running {
    fn drop(&mut self) {
        for (id, open) in self.ids.iter().zip(&self.open) {
            if *open {
                self.engine.cancel(*id);
            }
        }
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { retry_after } => {
            ApiError::queue_full(retry_after.as_secs_f64().ceil().max(1.0) as u64)
        }
        SubmitError::ShuttingDown => {
            ApiError::unavailable("the server is shutting down; no new requests are accepted")
        }
        SubmitError::Invalid(m) => ApiError::bad_request(m),
    }
}

/// Queue every sequence of a request, or none: if one is refused, those already queued are
/// cancelled (when the partial [`Running`] drops) and the refusal is the answer.
pub fn submit_all(st: &AppState, seqs: Vec<Seq>, p: &Params) -> Result<Running, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    // n > 1 shares a prompt: OpenAI counts it once.
    let mut prompt_tokens = 0;
    for (i, s) in seqs.iter().enumerate() {
        if i == 0 || s.prompt != seqs[i - 1].prompt {
            prompt_tokens += s.prompt.len();
        }
    }
    let mut run = Running {
        engine: st.engine.clone(),
        rx,
        ids: Vec::with_capacity(seqs.len()),
        open: Vec::with_capacity(seqs.len()),
        choices: seqs.iter().map(|s| s.choice).collect(),
        stops: p.stop.clone(),
        stop_ids: if p.ignore_eos {
            Vec::new()
        } else {
            st.tok.eos_ids().to_vec()
        },
        logprobs: p.logprobs.is_some(),
        deadline: st
            .cfg
            .request_timeout
            .map(|t| Instant::now() + t + TIMEOUT_GRACE),
        prompt_tokens,
    };
    for (i, s) in seqs.into_iter().enumerate() {
        let constraint = if p.json_mode {
            let make = st.cfg.json_mode.as_ref().ok_or_else(|| {
                ApiError::field(
                    "response_format",
                    "json_object is not available on this server",
                )
            })?;
            Some(make().map_err(|e| {
                ApiError::internal(format!(
                    "JSON mode: {}",
                    ferrotune::error::first_line(&e.to_string())
                ))
            })?)
        } else {
            None
        };
        let req = GenRequest {
            prompt: s.prompt,
            adapter: p.adapter.clone(),
            max_tokens: p.max_tokens,
            sampling: SamplingParams {
                seed: s.seed,
                ..p.sampling.clone()
            },
            logprobs: p.logprobs,
            stop_ids: run.stop_ids.clone(),
            constraint,
        };
        let tx = tx.clone();
        // Runs on the scheduler thread: an unbounded send never blocks it (a sequence sends at
        // most max_tokens + 1 events), and fails once the receiver is gone, which tells the
        // scheduler to cancel.
        let sink: EventSink = Box::new(move |ev| tx.send((i, ev)).is_ok());
        let id = st.engine.submit(req, sink).map_err(submit_error)?;
        run.ids.push(id);
        run.open.push(true);
    }
    Ok(run)
}

/// Why [`Running::drive`] stopped early.
pub enum DriveError {
    /// The client went away (nothing more can be sent).
    Gone,
    Api(ApiError),
}

impl From<ApiError> for DriveError {
    fn from(e: ApiError) -> Self {
        DriveError::Api(e)
    }
}

fn decode_failed(e: ferrotune::Error) -> ApiError {
    ApiError::internal(format!(
        "decoding the output failed: {}",
        ferrotune::error::first_line(&e.to_string())
    ))
}

impl Running {
    /// Receive every sequence's events until all are finished, calling `on` with each update
    /// (`on` returns false when the client is gone). `closed` resolves when the client
    /// disconnects while we wait (streaming).
    pub async fn drive(
        &mut self,
        tok: &Tokenizer,
        mut on: impl FnMut(Update) -> bool,
        closed: impl Future<Output = ()>,
    ) -> Result<Usage, DriveError> {
        let n = self.ids.len();
        // The same detokenization as `ferrotune generate` (special tokens left out), so greedy
        // output through the server equals the command line's.
        let mut streams: Vec<Option<TokenStream<'_>>> = (0..n)
            .map(|_| Some(tok.stream().skip_special_tokens(true)))
            .collect();
        let mut matchers: Vec<StopMatcher> = (0..n)
            .map(|_| StopMatcher::new(self.stops.clone()))
            .collect();
        let mut chars = vec![0usize; n];
        let mut tokens = vec![0usize; n];
        let mut usage = Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: 0,
        };
        tokio::pin!(closed);
        let far = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
        let deadline = tokio::time::sleep_until(self.deadline.unwrap_or(far).into());
        tokio::pin!(deadline);
        while self.open.iter().any(|&o| o) {
            let ev = tokio::select! {
                ev = self.rx.recv() => ev,
                _ = &mut closed => return Err(DriveError::Gone),
                _ = &mut deadline => {
                    return Err(ApiError::timeout(
                        "the request ran past the server's --request-timeout and was cancelled",
                    )
                    .into())
                }
            };
            let Some((i, ev)) = ev else {
                return Err(ApiError::internal(
                    "the scheduler ended a sequence without finishing it",
                )
                .into());
            };
            if !self.open[i] {
                // Events after a stop string was found (the cancel takes a step to land).
                continue;
            }
            let choice = self.choices[i];
            match ev {
                SeqEvent::Token { id, logprob } => {
                    tokens[i] += 1;
                    // End-of-sequence ids end the text; the Finished event follows.
                    if self.stop_ids.contains(&id) {
                        continue;
                    }
                    let stream = streams[i].as_mut().expect("open sequence has a stream");
                    let piece = stream.push(id).map_err(decode_failed)?;
                    let offset = chars[i];
                    let (text, hit) = match piece {
                        Some(p) => {
                            chars[i] += p.chars().count();
                            matchers[i].push(&p)
                        }
                        None => (String::new(), false),
                    };
                    let token = match (self.logprobs, logprob) {
                        (true, Some(lp)) => Some(token_info(tok, id, &lp, offset)?),
                        _ => None,
                    };
                    if !on(Update::Text {
                        choice,
                        text,
                        token,
                    }) {
                        return Err(DriveError::Gone);
                    }
                    if hit {
                        self.open[i] = false;
                        self.engine.cancel(self.ids[i]);
                        usage.completion_tokens += tokens[i];
                        if !on(Update::Finish {
                            choice,
                            reason: "stop",
                        }) {
                            return Err(DriveError::Gone);
                        }
                    }
                }
                SeqEvent::Finished {
                    reason,
                    completion_tokens,
                    ..
                } => {
                    self.open[i] = false;
                    let rest = streams[i]
                        .take()
                        .expect("open sequence has a stream")
                        .finish()
                        .map_err(decode_failed)?;
                    let (mut text, hit) = matchers[i].push(rest.as_deref().unwrap_or(""));
                    if !hit {
                        text.push_str(&matchers[i].finish());
                    }
                    // Nobody here cancelled it: the scheduler's --request-timeout cut it short. That
                    // is an error (504, code `timeout`; in a stream, an error event after the
                    // text sent so far), not a finish reason: a 200 with "length" would pass
                    // a truncated or empty answer off as a complete one.
                    if matches!(reason, FinishReason::Cancelled) && !hit {
                        return Err(ApiError::timeout(format!(
                            "the request ran past the server's --request-timeout after {} completion tokens and was cancelled",
                            tokens[i].max(completion_tokens)
                        ))
                        .into());
                    }
                    let reason = match reason {
                        _ if hit => "stop",
                        r => r.as_openai(),
                    };
                    usage.completion_tokens += completion_tokens;
                    if !text.is_empty()
                        && !on(Update::Text {
                            choice,
                            text,
                            token: None,
                        })
                    {
                        return Err(DriveError::Gone);
                    }
                    if !on(Update::Finish { choice, reason }) {
                        return Err(DriveError::Gone);
                    }
                }
                SeqEvent::Failed(m) => {
                    self.open[i] = false;
                    return Err(ApiError::internal(format!("generation failed: {m}")).into());
                }
            }
        }
        Ok(usage)
    }
}

/// A token's text for log-probability reports: its own decode (a byte-fallback piece of a
/// character shows as U+FFFD, as OpenAI's `bytes` field exists to resolve).
fn token_text(tok: &Tokenizer, id: u32) -> Result<String, ApiError> {
    tok.decode(&[id], false).map_err(decode_failed)
}

fn token_info(
    tok: &Tokenizer,
    id: u32,
    lp: &TokenLogprob,
    offset: usize,
) -> Result<TokenInfo, ApiError> {
    let top = lp
        .top
        .iter()
        .map(|&(t, l)| Ok((token_text(tok, t)?, l)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(TokenInfo {
        text: token_text(tok, id)?,
        logprob: lp.logprob,
        top,
        offset,
    })
}

/// Keeps the compiler honest that a `Running` can move into a spawned task.
#[allow(dead_code)]
fn assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Running>();
}
