//! Everything but generation: models, adapters, health, metrics.
use crate::api::from_value;
use crate::error::ApiError;
use crate::openai::read_body;
use crate::{json_response, AppState, LogInfo};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ferrotune::serve::{MetricsSnapshot, TTFT_BUCKETS};
use serde::Deserialize;
use serde_json::json;
use std::fmt::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

fn model_card(st: &AppState, id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": st.started, "owned_by": "ferrotune"})
}

/// `GET /v1/models`: the base, then each attached adapter as `BASE:NAME`.
pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    let mut adapters = st.engine.adapters();
    adapters.sort();
    let base = &st.cfg.model_id;
    let mut data = vec![model_card(&st, base)];
    data.extend(
        adapters
            .iter()
            .map(|a| model_card(&st, &format!("{base}:{a}"))),
    );
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
pub async fn model(
    State(st): State<Arc<AppState>>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Response {
    let id = match id {
        Ok(UrlPath(id)) => id,
        Err(e) => return path_rejection("model", e),
    };
    match crate::openai::resolve_model(&st, &id) {
        Ok(_) => json_response(StatusCode::OK, &model_card(&st, &id)),
        Err(e) => e.into_response(),
    }
}

/// `GET /health`: 200 while serving, 503 once shutting down (so a load balancer drains us).
pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.is_shutting_down() {
        return ApiError::unavailable("shutting down").into_response();
    }
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = prometheus_text(&st.engine.metrics(), &st.response_counts());
    let mut r = Response::new(axum::body::Body::from(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// The scheduler's counters and the HTTP responses by status, as Prometheus text.
pub fn prometheus_text(
    m: &MetricsSnapshot,
    responses: &std::collections::BTreeMap<u16, u64>,
) -> String {
    let mut s = String::new();
    let mut one = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(s, "# HELP {name} {help}");
        let _ = writeln!(s, "# TYPE {name} {kind}");
        let _ = writeln!(s, "{name} {value}");
    };
    one(
        "ferrotune_requests_total",
        "counter",
        "Sequences submitted to the scheduler.",
        m.requests_total.to_string(),
    );
    one(
        "ferrotune_requests_failed_total",
        "counter",
        "Sequences that ended with an error.",
        m.requests_failed.to_string(),
    );
    one(
        "ferrotune_requests_cancelled_total",
        "counter",
        "Sequences cancelled (client gone, stop string, timeout).",
        m.requests_cancelled.to_string(),
    );
    one(
        "ferrotune_prompt_tokens_total",
        "counter",
        "Prompt tokens of ended sequences (prefilled or taken from the prefix cache).",
        m.prompt_tokens_total.to_string(),
    );
    one(
        "ferrotune_prompt_tokens_cached_total",
        "counter",
        "Prompt tokens taken from a cached prefix of an earlier sequence instead of prefilled.",
        m.prompt_tokens_cached_total.to_string(),
    );
    one(
        "ferrotune_completion_tokens_total",
        "counter",
        "Tokens generated.",
        m.completion_tokens_total.to_string(),
    );
    one(
        "ferrotune_queue_depth",
        "gauge",
        "Requests waiting for a sequence slot.",
        m.queue_depth.to_string(),
    );
    one(
        "ferrotune_active_sequences",
        "gauge",
        "Sequences in prefill or decode.",
        m.active_sequences.to_string(),
    );
    one(
        "ferrotune_decode_steps_total",
        "counter",
        "Batched decode steps run.",
        m.decode_steps.to_string(),
    );
    one(
        "ferrotune_decode_rows_total",
        "counter",
        "Sequences carried by the decode steps (rows / steps = mean batch).",
        m.decode_rows.to_string(),
    );
    one(
        "ferrotune_tokens_per_second",
        "gauge",
        "Generated tokens per second over the last few seconds.",
        format!("{}", m.recent_tokens_per_s),
    );
    let name = "ferrotune_time_to_first_token_seconds";
    let _ = writeln!(
        s,
        "# HELP {name} Time from submission to the first generated token."
    );
    let _ = writeln!(s, "# TYPE {name} histogram");
    for (i, le) in TTFT_BUCKETS.iter().enumerate() {
        // Cumulative counts per bound; a snapshot without buckets reads as zeros.
        let c = m.ttft_buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {c}");
    }
    let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", m.ttft_count);
    let _ = writeln!(s, "{name}_sum {}", m.ttft_seconds_sum);
    let _ = writeln!(s, "{name}_count {}", m.ttft_count);
    let name = "ferrotune_http_responses_total";
    let _ = writeln!(s, "# HELP {name} HTTP responses by status code.");
    let _ = writeln!(s, "# TYPE {name} counter");
    for (code, n) in responses {
        let _ = writeln!(s, "{name}{{code=\"{code}\"}} {n}");
    }
    s
}

#[derive(Deserialize)]
struct LoadAdapter {
    name: String,
    path: String,
}

/// Adapter names: what fits in `BASE:NAME` and a log line unambiguously.
/// An adapter name as served (`MODEL:NAME`): 1 to 64 of `A-Z a-z 0-9 _ - .`, not starting
/// with `.` (also what `--adapter NAME=DIR` accepts).
pub fn check_adapter_name(name: &str) -> Result<(), String> {
    check_name(name).map_err(|e| e.message)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    // No '.': the engines address an adapter's modules by dotted paths (`...q_proj.NAME`).
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            "name",
            format!(
                "`{}`: expected 1 to 64 of A-Z a-z 0-9 _ -",
                crate::error::quoted(name)
            ),
        ))
    }
}

/// A path segment axum could not decode (e.g. `%ff`, not UTF-8): OpenAI's JSON error shape,
/// not axum's plain-text 400.
fn path_rejection(param: &str, e: PathRejection) -> Response {
    ApiError::field(param, format!("the URL path: {}", e.body_text())).into_response()
}

/// `path` of `POST /v1/adapters`, resolved inside `root` (canonical). A relative path without
/// `..`, whose canonical form (symlinks followed) is still under `root`: anything else is 403.
/// Messages name the path as the client gave it (the server's own layout stays private).
pub fn resolve_adapter_path(root: &Path, rel: &str) -> Result<PathBuf, ApiError> {
    if rel.is_empty() {
        return Err(ApiError::field("path", "empty"));
    }
    let p = Path::new(rel);
    if p.is_absolute() || p.has_root() {
        return Err(ApiError::forbidden(format!(
            "path: `{rel}` is absolute; give a folder relative to the server's --adapter-dir"
        ))
        .param("path"));
    }
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ApiError::forbidden(format!(
            "path: `{rel}` leaves --adapter-dir (`..` is not allowed)"
        ))
        .param("path"));
    }
    let canon = root
        .join(p)
        .canonicalize()
        .map_err(|e| unreadable(rel, &e, "does not exist in the server's --adapter-dir"))?;
    // A symlink inside the folder may point anywhere: the resolved path decides.
    if !canon.starts_with(root) {
        return Err(ApiError::forbidden(format!(
            "path: `{rel}` leads outside --adapter-dir (through a symlink)"
        ))
        .param("path"));
    }
    if !canon.is_dir() {
        return Err(ApiError::field(
            "path",
            format!("`{rel}` is not a folder (an adapter is a PEFT folder)"),
        ));
    }
    // The files in it are read too: each must resolve inside the folder tree and be a regular
    // file (a FIFO would block the loader, and with it every request, forever; a link to
    // /dev/zero would never end).
    let entries = std::fs::read_dir(&canon)
        .map_err(|e| unreadable(rel, &e, "cannot be read in --adapter-dir"))?;
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Ok(real) = e.path().canonicalize() else {
            continue; // a dangling link: whatever needs it reports it missing
        };
        if !real.starts_with(root) {
            return Err(ApiError::forbidden(format!(
                "path: `{rel}/{file}` leads outside --adapter-dir (through a symlink)"
            ))
            .param("path"));
        }
        if !real.is_file() && !real.is_dir() {
            return Err(ApiError::field(
                "path",
                format!("`{rel}/{file}` is not a regular file (a FIFO or device?)"),
            ));
        }
    }
    Ok(canon)
}

/// A failed read of `rel` under `--adapter-dir`: the client's fault (400: `what`) when the
/// path is not there or not readable, the server's (500) otherwise (out of file descriptors,
/// an I/O error): a client must not be told to change a request that would work.
fn unreadable(rel: &str, e: &std::io::Error, what: &str) -> ApiError {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound | NotADirectory | InvalidInput | InvalidFilename => {
            ApiError::field("path", format!("`{rel}` {what}"))
        }
        PermissionDenied => ApiError::field(
            "path",
            format!("`{rel}` cannot be read in --adapter-dir (permission denied)"),
        ),
        _ => ApiError::internal(format!(
            "reading `{rel}` in --adapter-dir failed on the server: {}",
            ferrotune::error::first_line(&e.to_string())
        )),
    }
}

/// `msg` with the adapter folder's absolute location (as given and as resolved) cut to the
/// path under it.
fn without_root(msg: &str, root: &Path) -> String {
    let mut out = msg.to_string();
    let mut roots = vec![root.to_path_buf()];
    roots.extend(root.canonicalize().ok());
    for r in roots {
        let r = r.display().to_string();
        if !r.is_empty() {
            out = out.replace(&format!("{r}/"), "").replace(&r, ".");
        }
    }
    out
}

/// `POST /v1/adapters {"name", "path"}`: attach a PEFT folder from inside `--adapter-dir`.
pub async fn load_adapter(State(st): State<Arc<AppState>>, req: Request) -> Response {
    match load_adapter_inner(&st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn load_adapter_inner(st: &Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let root = st.cfg.adapter_dir.clone().ok_or_else(|| {
        ApiError::forbidden(
            "loading adapters at run time is off: start the server with --adapter-dir DIR",
        )
    })?;
    let body = read_body(st, req).await?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object {\"name\", \"path\"}",
        ));
    }
    let la: LoadAdapter = from_value(&v)?;
    check_name(&la.name)?;
    if st.engine.adapters().contains(&la.name) {
        return Err(ApiError::conflict(format!(
            "an adapter named `{}` is already loaded (DELETE /v1/adapters/{} first)",
            la.name, la.name
        ))
        .param("name"));
    }
    let dir = resolve_adapter_path(&root, &la.path)?;
    let engine = st.engine.clone();
    let name = la.name.clone();
    // Loading reads files and waits for the scheduler's next step boundary: off the async
    // threads.
    tokio::task::spawn_blocking(move || engine.load_adapter(&name, &dir))
        .await
        .map_err(|e| ApiError::internal(format!("loading the adapter: {e}")))?
        .map_err(|e| {
            let msg = ferrotune::error::first_line(&e.to_string());
            // Two requests for one name at once both pass the check above; the engine refuses
            // the second, which is the same conflict.
            // (Only the message: by now a DELETE may have unloaded the winner again.)
            if msg.contains("already loaded") {
                return ApiError::conflict(format!(
                    "an adapter named `{}` is already loaded (DELETE /v1/adapters/{} first)",
                    la.name, la.name
                ))
                .param("name");
            }
            // The client named the folder relative to --adapter-dir: the server's own
            // location on disk is not its business.
            let msg = without_root(&msg, &root);
            ApiError::field("path", format!("`{}`: {msg}", la.path))
        })?;
    let id = format!("{}:{}", st.cfg.model_id, la.name);
    let mut r = json_response(
        StatusCode::OK,
        &json!({"object": "adapter", "name": la.name, "path": la.path, "model": id}),
    );
    r.extensions_mut().insert(LogInfo {
        model: Some(id),
        ..Default::default()
    });
    Ok(r)
}

/// `DELETE /v1/adapters/{name}`: detach (refused with 409 while a sequence uses it).
pub async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    name: Result<UrlPath<String>, PathRejection>,
) -> Response {
    let name = match name {
        Ok(UrlPath(name)) => name,
        Err(e) => return path_rejection("name", e),
    };
    if !st.engine.adapters().contains(&name) {
        return ApiError::model_not_found(format!(
            "no adapter named `{}` is loaded",
            crate::error::quoted(&name)
        ))
        .param("name")
        .into_response();
    }
    let engine = st.engine.clone();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || engine.unload_adapter(&n)).await {
        Ok(Ok(())) => json_response(
            StatusCode::OK,
            &json!({"object": "adapter", "name": name, "deleted": true}),
        ),
        Ok(Err(e)) => ApiError::conflict(format!(
            "adapter `{name}`: {}",
            ferrotune::error::first_line(&e.to_string())
        ))
        .into_response(),
        Err(e) => ApiError::internal(format!("unloading the adapter: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unreadable_adapter_path_is_the_client_s_fault_only_when_it_is() {
        use std::io::{Error, ErrorKind};
        let e = super::unreadable("a", &Error::from(ErrorKind::NotFound), "does not exist");
        assert_eq!(e.status.as_u16(), 400);
        let e = super::unreadable("a", &Error::from(ErrorKind::PermissionDenied), "x");
        assert_eq!(e.status.as_u16(), 400);
        // EMFILE: too many open files on the server
        let e = super::unreadable("a", &Error::from_raw_os_error(24), "x");
        assert_eq!(e.status.as_u16(), 500, "{}", e.message);
    }

    #[test]
    fn adapter_errors_do_not_show_the_server_folder() {
        let root = std::path::Path::new("served/adapters");
        assert_eq!(
            super::without_root("served/adapters/a/adapter_config.json: invalid JSON", root),
            "a/adapter_config.json: invalid JSON"
        );
        assert_eq!(super::without_root("in served/adapters", root), "in .");
        assert_eq!(
            super::without_root("other served/x", root),
            "other served/x"
        );
    }
}
