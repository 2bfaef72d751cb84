//! `ferrotune serve`: load the model, pick the batch backend, start the scheduler and hand
//! both to the HTTP layer (crate `ferrotune-serve`).
use super::{bar, device, input_dir, set_threads, ModelArgs, QUIET};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ferrotune::model::{self, ArchitectureKind};
use ferrotune::serve::backend::ModelBackend;
use ferrotune::serve::fast::FastBatchBackend;
use ferrotune::serve::json_mode::{JsonConstraint, JsonVocab};
use ferrotune::serve::{BatchBackend, SchedulerConfig, TokenConstraint};
use ferrotune_serve::{AppState, ServerConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Most sequences in flight at once (each holds a KV cache).
const MAX_CONCURRENT: usize = 1024;
/// Largest accepted `--max-body` (bytes).
const MAX_BODY: usize = 1 << 30;
/// Longest API-key file read (bytes): a key file is a few lines.
const MAX_KEY_FILE: u64 = 1 << 20;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// A PEFT adapter served as `MODEL:NAME` (repeatable).
    #[arg(long, value_name = "NAME=DIR")]
    adapter: Vec<String>,
    /// Folder that `POST /v1/adapters` may load adapters from (its paths must stay inside it);
    /// without it, loading at run time is off.
    #[arg(long)]
    adapter_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Accepted API key (`Authorization: Bearer KEY`; repeatable). Without any, no key is asked.
    #[arg(long)]
    api_key: Vec<String>,
    /// File with accepted API keys, one per line (`#` comments and blank lines skipped).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Most sequences decoded at once (each choice of `n` is one).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    max_concurrent: usize,
    /// Most sequences waiting for a slot; beyond it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    max_queue: usize,
    /// Most tokens a request may generate (`max_tokens` above it is refused); the default
    /// when a request gives none.
    #[arg(long, default_value_t = 1024, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Most prompt tokens per request (default: the model's context).
    #[arg(long, allow_negative_numbers = true)]
    max_prompt_tokens: Option<usize>,
    /// Most bytes in a request body (413 beyond).
    #[arg(long, default_value_t = 1 << 20, allow_negative_numbers = true)]
    max_body: usize,
    /// A request running longer is cancelled (seconds from its arrival; 0: no limit).
    #[arg(long, default_value_t = 600.0, allow_negative_numbers = true)]
    request_timeout: f64,
    /// Most prompt tokens prefilled per scheduler step (a long prompt does not stall the
    /// sequences decoding).
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    prefill_chunk: usize,
    /// Batch backend: auto (the fast CPU engine when it runs the model and the adapters:
    /// LLaMA family, plain LoRA), fast, or model (the model's own forward: every family and
    /// PEFT method).
    #[arg(long, default_value = "auto", value_parser = ["auto", "fast", "model"])]
    engine: String,
    /// The model's id in /v1/models (default: the file or folder stem).
    #[arg(long)]
    served_name: Option<String>,
    /// Only warnings on stderr (no per-request lines).
    #[arg(long)]
    quiet_requests: bool,
    /// Most open client connections; more wait until one closes.
    #[arg(long, default_value_t = 1024, allow_negative_numbers = true)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers, also on an idle keep-alive connection
    /// (then the connection is closed).
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body (then 408).
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    body_timeout: f64,
}

/// `NAME=DIR` of `--adapter`.
fn parse_adapter(s: &str) -> Result<(String, PathBuf)> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--adapter `{s}`: expected NAME=DIR"))?;
    ferrotune_serve::admin::check_adapter_name(name)
        .map_err(|e| anyhow!("--adapter `{s}`: {e}"))?;
    if dir.is_empty() {
        bail!("--adapter `{s}`: expected NAME=DIR (the folder is empty)");
    }
    let dir = PathBuf::from(dir);
    input_dir("--adapter", &dir)?;
    Ok((name.to_string(), dir))
}

/// The keys of `--api-key` and `--api-key-file`.
fn api_keys(a: &ServeArgs) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for k in &a.api_key {
        // HTTP header values carry visible ASCII only: another key could never be sent
        if k.trim().is_empty() || !k.is_ascii() || k.chars().any(char::is_control) {
            bail!("--api-key: a key must be non-empty visible ASCII text (HTTP headers carry no other characters)");
        }
        keys.push(k.trim().to_string());
    }
    if let Some(f) = &a.api_key_file {
        let meta =
            std::fs::metadata(f).with_context(|| format!("--api-key-file {}", f.display()))?;
        if !meta.is_file() || meta.len() > MAX_KEY_FILE {
            bail!(
                "--api-key-file {}: expected a text file of at most {MAX_KEY_FILE} bytes, one key per line",
                f.display()
            );
        }
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("--api-key-file {}", f.display()))?;
        let before = keys.len();
        for (i, line) in text.lines().enumerate() {
            let k = line.trim();
            if k.is_empty() || k.starts_with('#') {
                continue;
            }
            if !k.is_ascii() || k.chars().any(char::is_control) {
                bail!(
                    "{}:{}: a key must be visible ASCII text (HTTP headers carry no other characters)",
                    f.display(),
                    i + 1
                );
            }
            keys.push(k.to_string());
        }
        if keys.len() == before {
            bail!("--api-key-file {}: no key in the file", f.display());
        }
    }
    Ok(keys)
}

/// The id of the model in `/v1/models`: `org/name` of `hf:org/name[@rev]`, else the file or
/// folder stem (`.gguf` dropped).
fn model_id(arg: &str, path: &Path) -> String {
    if let Some(rest) = arg.strip_prefix("hf:") {
        return rest.split('@').next().unwrap_or(rest).to_string();
    }
    let base = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| arg.to_string());
    base.strip_suffix(".gguf").unwrap_or(&base).to_string()
}

pub(crate) fn run_serve(a: ServeArgs) -> Result<()> {
    if a.max_concurrent == 0 || a.max_concurrent > MAX_CONCURRENT {
        bail!(
            "--max-concurrent {}: expected 1 to {MAX_CONCURRENT}",
            a.max_concurrent
        );
    }
    if a.max_queue > 1 << 20 {
        bail!("--max-queue {}: expected 0 to {}", a.max_queue, 1 << 20);
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens 0: expected at least 1");
    }
    if a.max_prompt_tokens == Some(0) {
        bail!("--max-prompt-tokens 0: expected at least 1");
    }
    if a.max_body < 1024 || a.max_body > MAX_BODY {
        bail!(
            "--max-body {}: expected 1024 to {MAX_BODY} bytes",
            a.max_body
        );
    }
    if a.max_connections == 0 || a.max_connections > 1 << 20 {
        bail!(
            "--max-connections {}: expected 1 to {}",
            a.max_connections,
            1 << 20
        );
    }
    for (flag, v) in [
        ("--header-timeout", a.header_timeout),
        ("--body-timeout", a.body_timeout),
    ] {
        if !v.is_finite() || !(0.1..=86400.0).contains(&v) {
            bail!("{flag} {v}: expected 0.1 to 86400 seconds");
        }
    }
    if !a.request_timeout.is_finite() || a.request_timeout < 0.0 || a.request_timeout > 1e6 {
        bail!(
            "--request-timeout {}: expected 0 (no limit) to 1000000 seconds",
            a.request_timeout
        );
    }
    if a.prefill_chunk == 0 {
        bail!("--prefill-chunk 0: expected at least 1");
    }
    if let Some(n) = &a.served_name {
        if n.is_empty() || n.contains(':') || n.chars().any(char::is_control) {
            bail!("--served-name `{n}`: expected a non-empty name without `:` (adapters are served as NAME:ADAPTER)");
        }
    }
    let host: IpAddr = a.host.parse().map_err(|_| {
        anyhow!(
            "--host `{}`: expected an IP address (127.0.0.1, 0.0.0.0, ::1)",
            a.host
        )
    })?;
    let keys = api_keys(&a)?;
    let mut adapters: Vec<(String, PathBuf)> = Vec::new();
    for s in &a.adapter {
        let (name, dir) = parse_adapter(s)?;
        if adapters.iter().any(|(n, _)| *n == name) {
            bail!("--adapter `{s}`: the name `{name}` is given twice");
        }
        adapters.push((name, dir));
    }
    let adapter_dir = match &a.adapter_dir {
        None => None,
        Some(d) => {
            input_dir("--adapter-dir", d)?;
            Some(
                d.canonicalize()
                    .with_context(|| format!("--adapter-dir {}", d.display()))?,
            )
        }
    };

    ferrotune_serve::init_logging(a.quiet_requests || QUIET.load(Ordering::Relaxed));
    let opts = a.m.load_options()?;
    let dev = device(&a.m.device)?;
    let source = model::resolve(&a.m.model)?;
    set_threads(&a.m);
    let lm = model::load_source_with_progress(source, &opts, &dev, &bar())?;
    a.m.configure(&*lm.model)?;
    if lm.model.kind() == ArchitectureKind::Encoder {
        return Err(ferrotune::model::family::cannot_generate(&*lm.model).into());
    }
    let id = a
        .served_name
        .clone()
        .unwrap_or_else(|| model_id(&a.m.model, lm.source.path()));
    let tok = Arc::new(lm.tokenizer);

    // The fast engine runs LLaMA-family models with plain LoRA; the model's own forward runs
    // every family and PEFT method.
    let fast_ok = FastBatchBackend::check(&*lm.model).and_then(|()| {
        adapters
            .iter()
            .try_for_each(|(_, d)| FastBatchBackend::check_adapter_config(d))
    });
    let use_fast = match (a.engine.as_str(), &fast_ok) {
        ("model", _) => false,
        ("fast", Err(e)) => bail!("--engine fast: {e}"),
        ("fast", Ok(())) => true,
        (_, Ok(())) => true,
        (_, Err(e)) => {
            info!(
                "serving with the model's own forward: {}",
                ferrotune::error::first_line(&e.to_string())
            );
            false
        }
    };
    if !use_fast && a.m.kv_cache.as_deref() == Some("f16") {
        warn!(
            "--kv-cache f16 has no effect: the model's own forward (--engine model, or this model's \
             adapters) keeps f32 keys and values"
        );
    }
    let mut backend: Box<dyn BatchBackend> = if use_fast {
        Box::new(FastBatchBackend::new(lm.model)?)
    } else {
        Box::new(ModelBackend::new(lm.model)?.with_chunked_prefill(false))
    };
    for (name, dir) in &adapters {
        backend
            .load_adapter(name, dir)
            .with_context(|| format!("--adapter {name}={}", dir.display()))?;
    }
    let context = backend.context_length();
    let prompt_in_context = backend.prompt_in_context();
    if let Some(m) = a.max_prompt_tokens {
        if prompt_in_context && m >= context {
            bail!("--max-prompt-tokens {m}: the model's context is {context} tokens (a prompt must be shorter)");
        }
    }
    let timeout = (a.request_timeout > 0.0).then(|| Duration::from_secs_f64(a.request_timeout));
    let handle = ferrotune::serve::start(
        backend,
        SchedulerConfig {
            max_concurrent: a.max_concurrent,
            max_queue: a.max_queue,
            prefill_chunk: a.prefill_chunk,
            request_timeout: timeout,
        },
    );

    let mut cfg = ServerConfig::new(id.clone(), context);
    cfg.api_keys = keys;
    cfg.max_tokens = a.max_tokens;
    cfg.max_body_bytes = a.max_body;
    cfg.prompt_in_context = prompt_in_context;
    cfg.max_prompt_tokens = a.max_prompt_tokens;
    cfg.adapter_dir = adapter_dir;
    cfg.request_timeout = timeout;
    cfg.max_sequences = a.max_concurrent + a.max_queue;
    cfg.max_connections = a.max_connections;
    cfg.header_timeout = Duration::from_secs_f64(a.header_timeout);
    cfg.body_timeout = Duration::from_secs_f64(a.body_timeout);
    // JSON mode: the vocabulary's byte spellings are worked out once, shared by every request.
    match JsonVocab::new(&tok) {
        Ok(vocab) => {
            cfg.json_mode = Some(Arc::new(move || {
                Ok(Box::new(JsonConstraint::with_vocab(vocab.clone())) as Box<dyn TokenConstraint>)
            }))
        }
        Err(e) => info!(
            "response_format json_object is off: {}",
            ferrotune::error::first_line(&e.to_string())
        ),
    }
    let state = AppState::new(cfg, Arc::new(handle), tok);
    let addr = SocketAddr::new(host, a.port);
    let names: Vec<String> = adapters.iter().map(|(n, _)| format!("{id}:{n}")).collect();
    ferrotune_serve::run(state, addr, move |bound| {
        info!(
            "serving {id}{} on http://{bound} ({} engine, {} sequences at once)",
            if names.is_empty() {
                String::new()
            } else {
                format!(" and {}", names.join(", "))
            },
            if use_fast { "fast" } else { "model" },
            a.max_concurrent,
        );
    })
    .with_context(|| format!("serving on {addr}"))?;
    Ok(())
}
