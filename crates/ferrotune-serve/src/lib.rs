//! `ferrotune serve`: an OpenAI-compatible HTTP server over [`ferrotune::serve`].
//!
//! This crate is the HTTP layer only: it parses OpenAI's request shapes, applies the chat
//! template, tokenizes, submits sequences to the scheduler ([`Engine`], implemented by
//! [`SchedulerHandle`]) and turns the token events back into OpenAI's responses and
//! server-sent-event streams. Batching, sampling and adapters live in the core crate, which
//! stays free of tokio and axum.
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, `POST /v1/adapters`, `DELETE /v1/adapters/{name}` (all behind
//! the API key when one is set), `GET /health`, `GET /metrics` (open, for probes and scrapers).
pub mod admin;
pub mod api;
pub mod error;
pub mod gen;
pub mod openai;
pub mod stop;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use error::ApiError;
use ferrotune::serve::{
    EventSink, GenRequest, MetricsSnapshot, SchedulerHandle, SubmitError, TokenConstraint,
};
use ferrotune::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the HTTP layer needs from the scheduler. [`SchedulerHandle`] is the real one; tests
/// put fakes behind it to drive queue-full, cancellation and timing cases exactly.
pub trait Engine: Send + Sync + 'static {
    fn submit(&self, req: GenRequest, sink: EventSink) -> Result<u64, SubmitError>;
    fn cancel(&self, id: u64);
    /// Blocks until the adapter is attached (called off the async threads).
    fn load_adapter(&self, name: &str, dir: &Path) -> ferrotune::Result<()>;
    fn unload_adapter(&self, name: &str) -> ferrotune::Result<()>;
    fn adapters(&self) -> Vec<String>;
    fn metrics(&self) -> MetricsSnapshot;
    /// Refuse new sequences; those in flight finish.
    fn shutdown(&self);
    /// Blocks until the scheduler has ended (after [`Engine::shutdown`]).
    fn join(&self);
}

impl Engine for SchedulerHandle {
    fn submit(&self, req: GenRequest, sink: EventSink) -> Result<u64, SubmitError> {
        SchedulerHandle::submit(self, req, sink)
    }
    fn cancel(&self, id: u64) {
        SchedulerHandle::cancel(self, id)
    }
    fn load_adapter(&self, name: &str, dir: &Path) -> ferrotune::Result<()> {
        SchedulerHandle::load_adapter(self, name, dir)
    }
    fn unload_adapter(&self, name: &str) -> ferrotune::Result<()> {
        SchedulerHandle::unload_adapter(self, name)
    }
    fn adapters(&self) -> Vec<String> {
        SchedulerHandle::adapters(self)
    }
    fn metrics(&self) -> MetricsSnapshot {
        SchedulerHandle::metrics(self)
    }
    fn shutdown(&self) {
        SchedulerHandle::shutdown(self)
    }
    fn join(&self) {
        SchedulerHandle::join(self)
    }
}

/// Makes a fresh JSON-mode constraint for one sequence (`response_format: json_object`).
pub type ConstraintFactory =
    Arc<dyn Fn() -> ferrotune::Result<Box<dyn TokenConstraint>> + Send + Sync>;

/// The server's settings (from `ferrotune serve`'s flags and the loaded model).
#[derive(Clone)]
pub struct ServerConfig {
    /// The base model's id in `/v1/models`; adapters are `ID:NAME`.
    pub model_id: String,
    /// Accepted `Authorization: Bearer` keys; empty: no authentication.
    pub api_keys: Vec<String>,
    /// Most tokens one sequence may generate (`max_tokens` above it is refused); also the
    /// default when a request gives none.
    pub max_tokens: usize,
    /// Most bytes in a request body (413 beyond).
    pub max_body_bytes: usize,
    /// The model's context (prompt tokens must stay below it when `prompt_in_context`).
    pub context_length: usize,
    pub prompt_in_context: bool,
    /// Most prompt tokens one sequence may have (`--max-prompt-tokens`; `None`: the context).
    pub max_prompt_tokens: Option<usize>,
    /// Where `POST /v1/adapters` may load from (canonical path); `None`: runtime loading off.
    pub adapter_dir: Option<PathBuf>,
    /// The scheduler's per-request timeout (the HTTP layer gives up a little after it).
    pub request_timeout: Option<Duration>,
    /// JSON mode; `None`: `response_format: json_object` is refused.
    pub json_mode: Option<ConstraintFactory>,
    /// Most sequences the scheduler holds at once (running + queued): a request needing more
    /// can never be admitted (400, not 429).
    pub max_sequences: usize,
    /// Most open connections; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// A request head must arrive within this time, also on an idle keep-alive connection
    /// awaiting its next request (else the connection is closed): slow or silent clients
    /// cannot hold connections open.
    pub header_timeout: Duration,
    /// A request body must arrive within this time (408 after).
    pub body_timeout: Duration,
}

impl ServerConfig {
    /// Defaults for a model id and context: no key, 1024 tokens, 1 MiB bodies, no adapter dir.
    pub fn new(model_id: impl Into<String>, context_length: usize) -> Self {
        ServerConfig {
            model_id: model_id.into(),
            api_keys: Vec::new(),
            max_tokens: 1024,
            max_body_bytes: 1 << 20,
            context_length,
            prompt_in_context: true,
            max_prompt_tokens: None,
            adapter_dir: None,
            request_timeout: None,
            json_mode: None,
            max_sequences: usize::MAX,
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    pub cfg: ServerConfig,
    pub engine: Arc<dyn Engine>,
    pub tok: Arc<Tokenizer>,
    /// `created` of the models in `/v1/models` (the server's start).
    pub started: u64,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    /// HTTP responses by status code, for `/metrics`.
    responses: Mutex<BTreeMap<u16, u64>>,
}

impl AppState {
    pub fn new(cfg: ServerConfig, engine: Arc<dyn Engine>, tok: Arc<Tokenizer>) -> Arc<Self> {
        Arc::new(AppState {
            cfg,
            engine,
            tok,
            started: unix_now(),
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            responses: Mutex::new(BTreeMap::new()),
        })
    }

    /// Refuse new requests (the scheduler refuses new sequences; in-flight ones finish).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.engine.shutdown();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// A response id, unique in this process: `PREFIX-` then time and a counter in hex.
    pub fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        format!("{prefix}-{t:x}{n:06x}")
    }

    pub(crate) fn count_response(&self, status: u16) {
        if let Ok(mut m) = self.responses.lock() {
            *m.entry(status).or_insert(0) += 1;
        }
    }

    pub(crate) fn response_counts(&self) -> BTreeMap<u16, u64> {
        self.responses.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A JSON response (axum's `Json` needs its `json` feature, which also pulls in the default
/// extractor whose plain-text rejections we do not want).
pub fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// What a handler tells the request log about its request (a response extension).
#[derive(Clone, Debug, Default)]
pub struct LogInfo {
    pub model: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// A stream logs its own line when it ends (the response starts before the tokens exist).
    pub deferred: bool,
}

/// The router with every route and middleware.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(admin::models))
        .route("/v1/models/{id}", get(admin::model))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/adapters", post(admin::load_adapter))
        .route("/v1/adapters/{name}", delete(admin::unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .fallback(|m: Method, uri: axum::http::Uri| async move {
            ApiError::no_route(m.as_str(), uri.path())
        })
        .method_not_allowed_fallback(|m: Method, uri: axum::http::Uri| async move {
            ApiError::method_not_allowed(m.as_str(), uri.path())
        })
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

/// `Authorization: Bearer KEY` on `/v1/*` when keys are set (401 otherwise).
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if st.cfg.api_keys.is_empty() {
        return next.run(req).await;
    }
    // A value that is not visible ASCII holds no key we issued: a wrong key, not a missing one.
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().map(bearer_token));
    match given {
        None => ApiError::unauthorized(
            "no API key: send it as `Authorization: Bearer KEY` (this server was started with --api-key)",
        )
        .into_response(),
        Some(Err(_)) => ApiError::unauthorized(
            "incorrect API key (the Authorization header holds bytes other than visible ASCII)",
        )
        .into_response(),
        Some(Ok(None)) => ApiError::unauthorized(
            "the Authorization header is not `Bearer KEY`: send the API key as `Authorization: Bearer KEY`",
        )
        .into_response(),
        Some(Ok(Some(k))) => {
            if st.cfg.api_keys.iter().any(|key| same_secret(key, k)) {
                next.run(req).await
            } else {
                ApiError::unauthorized("incorrect API key").into_response()
            }
        }
    }
}

/// The credentials of an `Authorization` value with the `Bearer` scheme: the scheme's name
/// in any case and the whitespace around the key as HTTP allows (RFC 9110 11.1, 11.4);
/// `None` for another scheme or none.
fn bearer_token(value: &str) -> Option<&str> {
    let v = value.trim_matches([' ', '\t']);
    let split = v.find([' ', '\t'])?;
    let (scheme, key) = v.split_at(split);
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim_matches([' ', '\t']))
        .filter(|k| !k.is_empty())
}

/// Compares without returning early on the first differing byte (no timing hint of how much
/// of a guessed key was right).
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// One log line per request: method, path, status, model, tokens, latency.
async fn log_request(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    st.count_response(status);
    let info = resp
        .extensions()
        .get::<LogInfo>()
        .cloned()
        .unwrap_or_default();
    if !info.deferred {
        log_line(method.as_str(), &path, status, &info, t0.elapsed());
    }
    resp
}

/// The request log line (also written by a stream when it ends).
pub fn log_line(method: &str, path: &str, status: u16, info: &LogInfo, latency: Duration) {
    tracing::info!(
        target: "ferrotune_serve",
        "{method} {path} {status} model={} prompt_tokens={} completion_tokens={} latency_ms={:.1}",
        info.model.as_deref().unwrap_or("-"),
        info.prompt_tokens,
        info.completion_tokens,
        latency.as_secs_f64() * 1e3
    );
}

/// Serve on `listener` until `shutdown` resolves; then refuse new requests, let in-flight ones
/// finish (their streams included), and wait for the scheduler to end.
///
/// Our own accept loop (rather than `axum::serve`) for what a server open to the network needs:
/// at most `max_connections` open connections (more wait in the backlog), hyper's header-read
/// timeout on every connection (also while idle between keep-alive requests), and a clean
/// graceful shutdown of each connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let app = router(state.clone());
    let permits = Arc::new(tokio::sync::Semaphore::new(
        state.cfg.max_connections.max(1),
    ));
    // Dropping the sender tells every connection to finish its request in flight and close.
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    let header_timeout = state.cfg.header_timeout;
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, keep serving.
                    tracing::warn!(target: "ferrotune_serve", "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut close = close_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = close.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    tracing::info!(target: "ferrotune_serve", "shutting down: finishing requests in flight");
    state.begin_shutdown();
    drop(listener);
    drop(close_tx);
    while conns.join_next().await.is_some() {}
    // The scheduler was told to stop when the signal came (also when the server ended by an
    // error, so the join below cannot wait forever).
    state.begin_shutdown();
    let _ = tokio::task::spawn_blocking(move || state.engine.join()).await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Log lines on stderr (`quiet`: warnings only). Safe to call more than once.
pub fn init_logging(quiet: bool) {
    let level = if quiet {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        // Colour codes only on a terminal (not in a redirected log file).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Bind `addr`, call `on_listening` with the bound address (port 0 picks a free one), and
/// serve until Ctrl-C / SIGTERM. Builds its own tokio runtime: the caller stays synchronous.
pub fn run(
    state: Arc<AppState>,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    // Few async workers: the model runs on the scheduler's thread and its compute pool; these
    // threads only parse, tokenize and write responses.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        on_listening(listener.local_addr()?);
        serve(listener, state, first_of_two_signals()).await
    })
}

/// Resolves on the first Ctrl-C / SIGTERM (a graceful shutdown begins) and leaves a watcher
/// that ends the process on the second, as uvicorn and vLLM do: an operator who signals twice
/// does not want to wait for the requests in flight (or a client that stalls mid-body).
async fn first_of_two_signals() {
    shutdown_signal().await;
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!(
            target: "ferrotune_serve",
            "second signal: exiting without finishing the requests in flight"
        );
        std::process::exit(130);
    });
}

#[cfg(test)]
mod auth_tests {
    #[test]
    fn bearer_scheme_in_any_case_with_any_spacing() {
        for v in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "Bearer\tk1",
            "  Bearer   k1  ",
        ] {
            assert_eq!(super::bearer_token(v), Some("k1"), "{v:?}");
        }
        for v in ["Basic azE=", "Bearer", "Bearer   ", "Bearerk1", "k1", ""] {
            assert_eq!(super::bearer_token(v), None, "{v:?}");
        }
    }
}
