//! `POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's request and response
//! shapes, whole or streamed as server-sent events.
use crate::api::{
    int_in, parse_body, real_in, ChatRequest, Common, CompletionRequest, Content, Prompt,
    MAX_CHOICES, MAX_TOP_LOGPROBS,
};
use crate::error::ApiError;
use crate::gen::{submit_all, DriveError, Params, Running, Seq, TokenInfo, Update, Usage};
use crate::{log_line, AppState, LogInfo};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ferrotune::serve::SamplingParams;
use ferrotune::tokenizer::ChatMessage;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// The body, at most `--max-body` bytes (413 beyond: by `Content-Length` before reading, and
/// while reading a chunked body).
pub async fn read_body(st: &AppState, req: Request) -> Result<Bytes, ApiError> {
    let limit = st.cfg.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    // A body that does not arrive in time (a stalled or trickling client) ends the request.
    let timeout = st.cfg.body_timeout;
    tokio::time::timeout(timeout, axum::body::to_bytes(req.into_body(), limit))
        .await
        .map_err(|_| ApiError::body_timeout(timeout))?
        .map_err(|e| {
            if is_length_limit(&e) {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("reading the request body failed: {e}"))
            }
        })
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// `model`: the base id (`None`: no adapter) or `BASE:ADAPTER` for an attached adapter.
pub fn resolve_model(st: &AppState, model: &str) -> Result<Option<String>, ApiError> {
    let base = &st.cfg.model_id;
    if model == base {
        return Ok(None);
    }
    if let Some(name) = model
        .strip_prefix(base.as_str())
        .and_then(|r| r.strip_prefix(':'))
    {
        if st.engine.adapters().iter().any(|a| a == name) {
            return Ok(Some(name.to_string()));
        }
        return Err(ApiError::model_not_found(format!(
            "the model `{}` does not exist: no adapter `{}` is loaded (see GET /v1/models)",
            crate::error::quoted(model),
            crate::error::quoted(name)
        )));
    }
    Err(ApiError::model_not_found(format!(
        "the model `{}` does not exist: this server has `{base}` and `{base}:ADAPTER` for its adapters (see GET /v1/models)",
        crate::error::quoted(model)
    )))
}

/// Which endpoint a request came through (the shapes differ).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// A checked request, ready to submit.
struct Prepared {
    kind: Kind,
    model: String,
    seqs: Vec<Seq>,
    params: Params,
    n_choices: usize,
    stream: bool,
    include_usage: bool,
}

/// The fields both endpoints share, checked. `prompts` are the token ids (one per prompt);
/// `field` names where they came from for errors.
fn prepare(
    st: &AppState,
    kind: Kind,
    c: Common,
    prompts: Vec<Vec<u32>>,
    field: &str,
    logprobs: Option<usize>,
) -> Result<Prepared, ApiError> {
    let adapter = resolve_model(st, &c.model)?;
    let cap = st.cfg.max_tokens;
    let (mt_field, mt) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", Some(v)),
        (None, v) => ("max_tokens", v),
    };
    let max_tokens = match mt {
        None => cap,
        Some(v) if v < 1 => {
            return Err(ApiError::field(
                mt_field,
                format!("{v}: must be at least 1"),
            ))
        }
        Some(v) if v as u64 > cap as u64 => {
            return Err(ApiError::field(
                mt_field,
                format!("{v} is more than this server's limit of {cap} (--max-tokens)"),
            ))
        }
        Some(v) => v as usize,
    };
    let temperature = real_in("temperature", c.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = c.top_p;
    if let Some(p) = top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(ApiError::field(
            "top_p",
            format!("{p} is out of range: expected a number in (0, 1]"),
        ));
    }
    // vLLM's convention: 0 or -1 means no top-k.
    let top_k = match c.top_k {
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) if k == 0 || k == -1 => None,
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                format!("{k}: expected -1, 0 or at least 1"),
            ))
        }
        None => None,
    };
    let presence = real_in("presence_penalty", c.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency = real_in("frequency_penalty", c.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let n = int_in("n", c.n, 1, MAX_CHOICES as i64)?.unwrap_or(1);
    if n * prompts.len() > MAX_CHOICES {
        return Err(ApiError::field(
            "n",
            format!(
                "{n} choices for each of {} prompts: at most {MAX_CHOICES} sequences per request",
                prompts.len()
            ),
        ));
    }
    // Every sequence must fit in the server at once (running + queued): a request for more
    // could never be admitted, so it is a 400, not a 429 to retry.
    if n * prompts.len() > st.cfg.max_sequences {
        let what = if prompts.len() > 1 {
            format!("{n} choices for each of {} prompts", prompts.len())
        } else {
            format!("{n} choices")
        };
        return Err(ApiError::field(
            if n > 1 { "n" } else { field },
            format!(
                "{what} = {} sequences, but this server holds at most {} at once (--max-concurrent + --max-queue)",
                n * prompts.len(),
                st.cfg.max_sequences
            ),
        ));
    }
    let logit_bias = logit_bias(c.logit_bias.as_ref(), st.tok.vocab_size())?;
    let stop = match c.stop {
        Some(s) => s.strings()?,
        None => Vec::new(),
    };
    let json_mode = match c.response_format.as_ref().map(|f| f.kind.as_str()) {
        None | Some("text") => false,
        Some("json_object") => {
            if st.cfg.json_mode.is_none() {
                return Err(ApiError::field(
                    "response_format",
                    "json_object is not available on this server",
                ));
            }
            true
        }
        Some(other) => {
            return Err(ApiError::field(
                "response_format.type",
                format!("`{other}` is not supported: expected text or json_object"),
            ))
        }
    };
    let vocab = st.tok.vocab_size();
    for p in &prompts {
        if p.is_empty() {
            return Err(ApiError::field(field, "the prompt is empty (0 tokens)"));
        }
        if st.cfg.prompt_in_context && p.len() >= st.cfg.context_length {
            return Err(ApiError::field(
                field,
                format!(
                    "the prompt is {} tokens; this model's context is {} tokens (prompt and output must fit in it)",
                    p.len(),
                    st.cfg.context_length
                ),
            )
            .code("context_length_exceeded"));
        }
        // An explicit output budget must fit beside the prompt, as OpenAI and vLLM require
        // (without one, generation stops at the context with finish_reason "length").
        if st.cfg.prompt_in_context && mt.is_some() && p.len() + max_tokens > st.cfg.context_length
        {
            return Err(ApiError::field(
                mt_field,
                format!(
                    "this model's context is {} tokens; {} were requested ({} in the prompt, {max_tokens} for the output): lower {mt_field} or shorten the prompt",
                    st.cfg.context_length,
                    p.len() + max_tokens,
                    p.len()
                ),
            )
            .code("context_length_exceeded"));
        }
        if let Some(limit) = st.cfg.max_prompt_tokens.filter(|&l| p.len() > l) {
            return Err(ApiError::field(
                field,
                format!(
                    "the prompt is {} tokens; this server takes at most {limit} (--max-prompt-tokens)",
                    p.len()
                ),
            )
            .code("context_length_exceeded"));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::field(
                field,
                format!("token id {bad} is out of the vocabulary ({vocab} ids)"),
            ));
        }
    }
    let seed = c.seed.map(|s| s as u64);
    let mut seqs = Vec::with_capacity(n * prompts.len());
    for (pi, p) in prompts.into_iter().enumerate() {
        for i in 0..n {
            seqs.push(Seq {
                prompt: p.clone(),
                choice: pi * n + i,
                // Each choice its own stream of draws, all reproducible from the one seed.
                seed: seed.map(|s| s.wrapping_add(i as u64)),
            });
        }
    }
    Ok(Prepared {
        kind,
        model: c.model,
        n_choices: seqs.len(),
        seqs,
        params: Params {
            adapter,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p: top_p.filter(|&p| p < 1.0),
                top_k,
                seed: None,
                presence_penalty: presence as f32,
                frequency_penalty: frequency as f32,
                logit_bias,
            },
            logprobs,
            stop,
            json_mode,
            ignore_eos: c.ignore_eos.unwrap_or(false),
        },
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// OpenAI's `logit_bias`: keys are token ids (strings), values numbers from -100 to 100.
fn logit_bias(
    m: Option<&serde_json::Map<String, serde_json::Value>>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(m) = m else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity(m.len());
    for (k, v) in m {
        let key: String = if k.chars().count() > 24 {
            k.chars().take(24).chain("...".chars()).collect()
        } else {
            k.clone()
        };
        let id = k
            .parse::<u32>()
            .ok()
            .filter(|&t| (t as usize) < vocab)
            .ok_or_else(|| {
                ApiError::field(
                    "logit_bias",
                    format!(
                        "key `{key}`: expected a token id from 0 to {}",
                        vocab.saturating_sub(1)
                    ),
                )
            })?;
        let b = v
            .as_f64()
            .filter(|b| b.is_finite() && (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                ApiError::field(
                    "logit_bias",
                    format!("token {id}: expected a number from -100 to 100"),
                )
            })?;
        out.push((id, b as f32));
    }
    Ok(out)
}

/// The chat template applied to the messages, as `ferrotune generate --chat` does.
fn chat_prompt(st: &AppState, req: ChatRequest) -> Result<Vec<u32>, ApiError> {
    let tok = &st.tok;
    let tmpl = tok.chat_template().ok_or_else(|| {
        ApiError::field(
            "messages",
            "this model has no chat template: use /v1/completions with a plain prompt",
        )
    })?;
    if req.messages.is_empty() {
        return Err(ApiError::field(
            "messages",
            "empty: give at least one message",
        ));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" | "tool" => m.role.clone(),
            // OpenAI's newer name for system; chat templates know only system.
            "developer" => "system".to_string(),
            other => {
                return Err(ApiError::field(
                    &format!("messages[{i}].role"),
                    format!("`{other}`: expected system, developer, user, assistant or tool"),
                ))
            }
        };
        match &m.tool_calls {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(calls)) if role == "assistant" && !calls.is_empty() => {}
            Some(serde_json::Value::Array(_)) if role == "assistant" => {
                return Err(ApiError::field(
                    &format!("messages[{i}].tool_calls"),
                    "an empty list: give the calls, or leave the field out",
                ))
            }
            Some(serde_json::Value::Array(_)) => {
                return Err(ApiError::field(
                    &format!("messages[{i}].tool_calls"),
                    format!(
                        "only an assistant message calls tools, not a {} message",
                        m.role
                    ),
                ))
            }
            Some(other) => {
                return Err(ApiError::field(
                    &format!("messages[{i}].tool_calls"),
                    format!("expected a list of tool calls, found {}", json_kind(other)),
                ))
            }
        }
        let field = format!("messages[{i}].content");
        let content = match m.content {
            Some(Content::Parts(parts)) if parts.is_empty() => {
                return Err(ApiError::field(
                    &field,
                    "an empty list: give at least one content part",
                ))
            }
            Some(c) => c.text(&field)?,
            // OpenAI: content may be left out only by an assistant turn that called tools
            None if role == "assistant" && m.tool_calls.as_ref().is_some_and(|t| t.is_array()) => {
                String::new()
            }
            None => {
                return Err(ApiError::field(
                    &field,
                    format!(
                        "missing or null: a {} message needs content (only an assistant message with tool_calls may omit it)",
                        m.role
                    ),
                ))
            }
        };
        if m.role == "tool" && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::field(
                &format!("messages[{i}].tool_call_id"),
                "missing: a tool message answers the assistant's tool call of this id",
            ));
        }
        msgs.push(ChatMessage { role, content });
    }
    let extra = json!({ "bos_token": tok.bos_token(), "eos_token": tok.eos_token() });
    let text = tmpl.render(&msgs, true, &extra).map_err(|e| {
        ApiError::field(
            "messages",
            format!(
                "the chat template refused them: {}",
                ferrotune::error::first_line(&e.to_string())
            ),
        )
    })?;
    tok.encode(&text, false)
        .map_err(|e| ApiError::internal(ferrotune::error::first_line(&e.to_string())))
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let prepared = async {
        let body = read_body(&st, req).await?;
        let (common, chat): (Common, ChatRequest) = parse_body(&body)?;
        let top = match (chat.logprobs.unwrap_or(false), chat.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::field("top_logprobs", "needs \"logprobs\": true"))
            }
            (false, None) => None,
            (true, t) => Some(int_in("top_logprobs", t, 0, MAX_TOP_LOGPROBS as i64)?.unwrap_or(0)),
        };
        // Model first: an unknown model is a 404 whatever the messages say.
        resolve_model(&st, &common.model)?;
        let ids = chat_prompt(&st, chat)?;
        prepare(&st, Kind::Chat, common, vec![ids], "messages", top)
    }
    .await;
    match prepared {
        Ok(p) => respond(st, p, t0).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/completions`.
pub async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let prepared = async {
        let body = read_body(&st, req).await?;
        let (common, comp): (Common, CompletionRequest) = parse_body(&body)?;
        if comp.echo == Some(true) {
            return Err(ApiError::field(
                "echo",
                "true is not supported by this server",
            ));
        }
        if comp.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::field("suffix", "not supported by this server"));
        }
        match comp.best_of {
            // OpenAI's own check: best_of candidates are what the n choices are picked from
            Some(b) if b < common.n.unwrap_or(1) => {
                return Err(ApiError::field("best_of", "must be at least n"));
            }
            Some(b) if b > common.n.unwrap_or(1) => {
                return Err(ApiError::field(
                    "best_of",
                    "more than n is not supported by this server",
                ));
            }
            _ => {}
        }
        let top = int_in("logprobs", comp.logprobs, 0, MAX_TOP_LOGPROBS as i64)?;
        resolve_model(&st, &common.model)?;
        let encode = |s: &str| {
            st.tok
                .encode(s, true)
                .map_err(|e| ApiError::internal(ferrotune::error::first_line(&e.to_string())))
        };
        let prompts = match comp.prompt {
            Prompt::Text(s) => vec![encode(&s)?],
            Prompt::Texts(v) => v.iter().map(|s| encode(s)).collect::<Result<_, _>>()?,
            Prompt::Tokens(ids) => vec![ids],
            Prompt::TokenLists(v) => v,
        };
        if prompts.is_empty() {
            return Err(ApiError::field("prompt", "an empty list"));
        }
        prepare(&st, Kind::Completion, common, prompts, "prompt", top)
    }
    .await;
    match prepared {
        Ok(p) => respond(st, p, t0).await,
        Err(e) => e.into_response(),
    }
}

/// Submit and answer: one JSON body, or a stream.
async fn respond(st: Arc<AppState>, mut p: Prepared, t0: Instant) -> Response {
    let seqs = std::mem::take(&mut p.seqs);
    let running = match submit_all(&st, seqs, &p.params) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if p.stream {
        return stream_response(st, p, running, t0);
    }
    whole_response(st, p, running).await
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Chat's log-probability entry for one token.
fn chat_logprob(t: &TokenInfo) -> Value {
    json!({
        "token": t.text,
        "logprob": t.logprob,
        "bytes": t.text.as_bytes(),
        "top_logprobs": t.top.iter().map(|(s, l)| json!({
            "token": s, "logprob": l, "bytes": s.as_bytes(),
        })).collect::<Vec<_>>(),
    })
}

/// Completions' log-probability object for some tokens (parallel lists).
fn completion_logprobs(ts: &[TokenInfo]) -> Value {
    json!({
        "tokens": ts.iter().map(|t| &t.text).collect::<Vec<_>>(),
        "token_logprobs": ts.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": ts.iter().map(|t| {
            t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": ts.iter().map(|t| t.offset).collect::<Vec<_>>(),
    })
}

fn fingerprint() -> String {
    format!("ferrotune-{}", env!("CARGO_PKG_VERSION"))
}

async fn whole_response(st: Arc<AppState>, p: Prepared, mut running: Running) -> Response {
    let n = p.n_choices;
    let mut texts = vec![String::new(); n];
    let mut toks: Vec<Vec<TokenInfo>> = vec![Vec::new(); n];
    let mut reasons: Vec<&'static str> = vec!["stop"; n];
    let want_logprobs = p.params.logprobs.is_some();
    // If the client disconnects, hyper drops this future and `running` with it, which
    // cancels the sequences.
    let usage = running
        .drive(
            &st.tok,
            |u| {
                match u {
                    Update::Text {
                        choice,
                        text,
                        token,
                    } => {
                        texts[choice].push_str(&text);
                        toks[choice].extend(token);
                    }
                    Update::Finish { choice, reason } => reasons[choice] = reason,
                }
                true
            },
            std::future::pending(),
        )
        .await;
    let usage = match usage {
        Ok(u) => u,
        Err(DriveError::Api(e)) => return e.into_response(),
        Err(DriveError::Gone) => return StatusCode::from_u16(499).unwrap().into_response(),
    };
    let created = crate::unix_now();
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let logprobs = match (want_logprobs, p.kind) {
                (false, _) => Value::Null,
                (true, Kind::Chat) => json!({
                    "content": toks[i].iter().map(chat_logprob).collect::<Vec<_>>(),
                    "refusal": null,
                }),
                (true, Kind::Completion) => completion_logprobs(&toks[i]),
            };
            match p.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i], "refusal": null},
                    "logprobs": logprobs,
                    "finish_reason": reasons[i],
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": texts[i],
                    "logprobs": logprobs,
                    "finish_reason": reasons[i],
                }),
            }
        })
        .collect();
    let (id, object) = match p.kind {
        Kind::Chat => (st.new_id("chatcmpl"), "chat.completion"),
        Kind::Completion => (st.new_id("cmpl"), "text_completion"),
    };
    let body = json!({
        "id": id,
        "object": object,
        "created": created,
        "model": p.model,
        "system_fingerprint": fingerprint(),
        "choices": choices,
        "usage": usage_json(&usage),
    });
    let mut r = crate::json_response(StatusCode::OK, &body);
    r.extensions_mut().insert(LogInfo {
        model: Some(p.model),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        deferred: false,
    });
    r
}

/// Server-sent events: `data: {chunk}` per piece of text, `data: [DONE]` at the end. A task
/// drives the sequences and writes the events into the body's channel; when the client goes,
/// the body (and the channel's receiver) is dropped, the task stops, and dropping its
/// [`Running`] cancels the sequences.
fn stream_response(st: Arc<AppState>, p: Prepared, mut running: Running, t0: Instant) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes, Infallible>>();
    let (id, object) = match p.kind {
        Kind::Chat => (st.new_id("chatcmpl"), "chat.completion.chunk"),
        Kind::Completion => (st.new_id("cmpl"), "text_completion"),
    };
    let created = crate::unix_now();
    let model = p.model.clone();
    let chunk = move |choices: Value, usage: Option<Value>, include_usage: bool| -> Value {
        let mut c = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
        });
        // With include_usage, OpenAI sends `"usage": null` on every chunk but the last.
        if include_usage || usage.is_some() {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        c
    };
    let task_st = st.clone();
    tokio::spawn(async move {
        let tok = task_st.tok.clone();
        let send = |v: &Value| tx.send(Ok(Bytes::from(format!("data: {v}\n\n")))).is_ok();
        let kind = p.kind;
        let iu = p.include_usage;
        let want_logprobs = p.params.logprobs.is_some();
        if kind == Kind::Chat {
            // OpenAI's first chunk of each choice carries the role.
            for i in 0..p.n_choices {
                let c = json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]);
                send(&chunk(c, None, iu));
            }
        }
        let result = running
            .drive(
                &tok,
                |u| {
                    let choice = match u {
                        Update::Text {
                            choice,
                            text,
                            token,
                        } => {
                            if text.is_empty() && token.is_none() {
                                return true;
                            }
                            let lp = match (want_logprobs, &token, kind) {
                                (false, _, _) | (true, None, _) => Value::Null,
                                (true, Some(t), Kind::Chat) => {
                                    json!({"content": [chat_logprob(t)], "refusal": null})
                                }
                                (true, Some(t), Kind::Completion) => {
                                    completion_logprobs(std::slice::from_ref(t))
                                }
                            };
                            match kind {
                                Kind::Chat => json!({"index": choice, "delta": {"content": text},
                                    "logprobs": lp, "finish_reason": null}),
                                Kind::Completion => json!({"index": choice, "text": text,
                                    "logprobs": lp, "finish_reason": null}),
                            }
                        }
                        Update::Finish { choice, reason } => match kind {
                            Kind::Chat => json!({"index": choice, "delta": {},
                                "logprobs": null, "finish_reason": reason}),
                            Kind::Completion => json!({"index": choice, "text": "",
                                "logprobs": null, "finish_reason": reason}),
                        },
                    };
                    send(&chunk(json!([choice]), None, iu))
                },
                tx.closed(),
            )
            .await;
        let mut info = LogInfo {
            model: Some(p.model.clone()),
            ..Default::default()
        };
        let status = match result {
            Ok(usage) => {
                info.prompt_tokens = usage.prompt_tokens;
                info.completion_tokens = usage.completion_tokens;
                if iu {
                    send(&chunk(json!([]), Some(usage_json(&usage)), iu));
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
                200
            }
            // The response had started (200); the error goes into the stream, then [DONE].
            Err(DriveError::Api(e)) => {
                send(&e.body());
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
                e.status.as_u16()
            }
            // nginx's "client closed request": the log shows who ended it.
            Err(DriveError::Gone) => 499,
        };
        let path = match kind {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        };
        drop(running);
        log_line("POST", path, status, &info, t0.elapsed());
    });
    let body = Body::from_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r.extensions_mut().insert(LogInfo {
        deferred: true,
        ..Default::default()
    });
    r
}

/// What a JSON value is, for messages ("a string", "a number", ...).
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}
