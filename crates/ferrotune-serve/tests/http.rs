//! The HTTP layer end to end over real sockets: a server on a free loopback port, requests
//! written by hand (HTTP/1.1, so framing, status lines and SSE are what a client sees).
//!
//! Two engines behind it:
//! - `FakeEngine` (here): runs each sequence on its own thread with a fixed rule (next token =
//!   previous + 1, + 2 with the adapter `plus2`; after `bird` comes `</s>`), and records
//!   cancellations and what was submitted, so queue-full, disconnects and the request fields
//!   are checked exactly;
//! - the real scheduler over `CountingBackend` (same rule as logits), for what the two must
//!   agree on.
mod common;

use common::*;
use ferrotune::serve::{self, SchedulerConfig};
use ferrotune_serve::ServerConfig;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

// ---- models, health, metrics, routing ----

#[test]
fn models_lists_base_and_adapters() {
    let (srv, _eng) = fake_server(ServerConfig::new("tiny", 256), &["plus2"]);
    let r = get(srv.addr, "/v1/models");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "tiny:plus2"]);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(
        get(srv.addr, "/v1/models/tiny:plus2").json()["id"],
        "tiny:plus2"
    );
    let r = get(srv.addr, "/v1/models/other");
    assert_error(&r, 404, Some("model_not_found"));
}

#[test]
fn health_metrics_and_unknown_routes() {
    let (srv, _eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    let r = get(srv.addr, "/health");
    assert_eq!(r.status, 200);
    // One request so the HTTP counter has a row.
    post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 2}),
    );
    let m = get(srv.addr, "/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    for name in [
        "ferrotune_requests_total 7",
        "ferrotune_completion_tokens_total",
        "ferrotune_queue_depth 3",
        "ferrotune_time_to_first_token_seconds_bucket{le=\"0.05\"} 1",
        "ferrotune_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
        "ferrotune_time_to_first_token_seconds_count 2",
        "ferrotune_tokens_per_second 12.5",
        "ferrotune_http_responses_total{code=\"200\"}",
    ] {
        assert!(m.body.contains(name), "{name} missing from\n{}", m.body);
    }
    assert_error(&get(srv.addr, "/v2/nothing"), 404, Some("unknown_url"));
    assert_error(&get(srv.addr, "/v1/chat/completions"), 405, None);
}

// ---- completions and chat ----

#[test]
fn completion_follows_the_engine_and_reports_usage() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 3, "temperature": 0,
                "unknown_field": {"ignored": true}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "tiny");
    assert!(v["created"].as_u64().unwrap() > 0);
    assert_eq!(v["choices"][0]["text"], "dog sun moon");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4})
    );
    let sub = eng.submitted();
    assert_eq!(sub.len(), 1);
    assert_eq!(sub[0].prompt, vec![13]);
    assert_eq!(sub[0].max_tokens, 3);
    assert_eq!(sub[0].sampling.temperature, 0.0);
    // EOS ends the text (not part of it) with finish_reason stop.
    let v = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "tree"}),
    )
    .json();
    assert_eq!(v["choices"][0]["text"], "rock fish bird");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn chat_applies_the_template_and_forwards_sampling_fields() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &["plus2"]);
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        &json!({"model": "tiny:plus2", "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "say cat"}]}],
                "max_completion_tokens": 2, "temperature": 0.7, "top_p": 0.9, "seed": 5,
                "presence_penalty": 0.5, "frequency_penalty": -0.25}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny:plus2");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let sub = &eng.submitted()[0];
    // The template's rendering, word by word: "system : be brief user : say cat assistant :".
    let tok = tokenizer();
    let want = tok
        .encode("system: be brief\nuser: say cat\nassistant:", false)
        .unwrap();
    assert_eq!(sub.prompt, want);
    assert_eq!(sub.adapter.as_deref(), Some("plus2"));
    // The prompt ends with ":" (4); the adapter adds 2 per token: 6 = user, 8 = be.
    assert_eq!(v["choices"][0]["message"]["content"], "user be");
    assert_eq!(sub.sampling.temperature, 0.7);
    assert_eq!(sub.sampling.top_p, Some(0.9));
    assert_eq!(sub.sampling.seed, Some(5));
    assert_eq!(sub.sampling.presence_penalty, 0.5);
    assert_eq!(sub.sampling.frequency_penalty, -0.25);
    assert_eq!(sub.stop_ids, vec![2]);
    assert_eq!(v["usage"]["prompt_tokens"], want.len());
}

#[test]
fn n_choices_and_prompt_lists_get_their_own_index_and_seed() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    let v = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": ["cat", "red"], "n": 2, "max_tokens": 2, "seed": 10}),
    )
    .json();
    let texts: Vec<(u64, &str)> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        texts,
        [
            (0, "dog sun"),
            (1, "dog sun"),
            (2, "green blue"),
            (3, "green blue")
        ]
    );
    let seeds: Vec<Option<u64>> = eng.submitted().iter().map(|s| s.sampling.seed).collect();
    assert_eq!(seeds, [Some(10), Some(11), Some(10), Some(11)]);
    // Prompts count once each (not once per choice); completions add up.
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert_eq!(v["usage"]["completion_tokens"], 8);
}

#[test]
fn stop_strings_split_across_tokens() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    // "red" -> "green blue cat ...": "n bl" spans the tokens "green" and "blue".
    let body = json!({"model": "tiny", "prompt": "red", "max_tokens": 6, "stop": ["n bl", "zzz"]});
    let v = post(srv.addr, "/v1/completions", &body).json();
    assert_eq!(v["choices"][0]["text"], "gree");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        eng.cancelled().len(),
        1,
        "the sequence is cancelled at the stop string"
    );
    // Streamed: the held-back "n" never reaches the client.
    let mut b = body.clone();
    b["stream"] = json!(true);
    let s = post(srv.addr, "/v1/completions", &b);
    let chunks = sse(&s);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "gree");
    let reasons: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|r| !r.is_null())
        .collect();
    assert_eq!(reasons, [&json!("stop")]);
    // A single stop string too, and one that never completes is released at the end.
    let v = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "rock", "stop": "bird!"}),
    )
    .json();
    assert_eq!(v["choices"][0]["text"], "fish bird");
}

#[test]
fn streaming_chat_is_sse_with_role_first_and_done_last() {
    let (srv, _eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "cat"}],
                      "max_tokens": 3, "stream": true, "n": 2});
    let r = post(srv.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    // Framing: every event is one `data: ` line and a blank line; the last is [DONE].
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    for ev in r.body.split_terminator("\n\n") {
        assert!(
            ev.starts_with("data: ") && !ev.contains('\n'),
            "bad event {ev:?}"
        );
    }
    let chunks = sse(&r);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id));
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0])
            .filter(|c| c["index"] == i)
            .collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant");
        let text: String = mine
            .iter()
            .filter_map(|c| c["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "system user assistant");
        assert_eq!(mine.last().unwrap()["finish_reason"], "length");
    }
    // Same text as the whole response.
    let mut b = body.clone();
    b["stream"] = json!(false);
    let v = post(srv.addr, "/v1/chat/completions", &b).json();
    assert_eq!(
        v["choices"][1]["message"]["content"],
        "system user assistant"
    );
}

#[test]
fn include_usage_adds_a_final_chunk_with_empty_choices() {
    let (srv, _eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 2, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let chunks = sse(&r);
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    );
    assert!(rest
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    assert!(rest.iter().all(|c| c["object"] == "text_completion"));
}

#[test]
fn logprobs_in_both_shapes() {
    let (srv, _eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    let v = post(
        srv.addr,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "cat"}],
                "max_tokens": 2, "logprobs": true, "top_logprobs": 2}),
    )
    .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    // The fake reports logprob -0.25 for its pick and the next ids as alternatives.
    assert_eq!(content[0]["token"], "system");
    assert_eq!(content[0]["logprob"], -0.25);
    assert_eq!(content[0]["bytes"], json!(b"system".to_vec()));
    assert_eq!(content[0]["top_logprobs"][1]["token"], "user");
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let v = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 2, "logprobs": 1}),
    )
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["dog", "sun"]));
    assert_eq!(lp["token_logprobs"], json!([-0.25, -0.25]));
    assert_eq!(lp["top_logprobs"], json!([{"dog": -0.25}, {"sun": -0.25}]));
    // "dog sun": the second token starts after "dog" (its text is " sun").
    assert_eq!(lp["text_offset"], json!([0, 3]));
}

#[test]
fn json_mode_uses_the_constraint_factory() {
    let mut cfg = ServerConfig::new("tiny", 256);
    let (srv, eng) = fake_server(cfg.clone(), &[]);
    let body = json!({"model": "tiny", "prompt": "cat", "max_tokens": 2,
                      "response_format": {"type": "json_object"}});
    assert_error(&post(srv.addr, "/v1/completions", &body), 400, None);
    assert!(eng.submitted().is_empty());
    drop(srv);
    cfg.json_mode = Some(std::sync::Arc::new(|| {
        Ok(Box::new(NoConstraint) as Box<dyn serve::TokenConstraint>)
    }));
    let (srv, eng) = fake_server(cfg, &[]);
    assert_eq!(post(srv.addr, "/v1/completions", &body).status, 200);
    assert!(eng.submitted()[0].had_constraint);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "response_format": {"type": "json_schema"}}),
    );
    assert_error(&r, 400, None);
    assert_eq!(r.json()["error"]["param"], "response_format.type");
}

// ---- bad input ----

#[test]
fn bad_requests_get_openai_errors_naming_the_field() {
    let mut cfg = ServerConfig::new("tiny", 8);
    cfg.max_tokens = 50;
    let (srv, eng) = fake_server(cfg, &["plus2"]);
    let chat = "/v1/chat/completions";
    let comp = "/v1/completions";
    // (path, body, status, param)
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (chat, "{not json".into(), 400, None),
        (chat, "[1, 2]".into(), 400, None),
        (chat, r#"{"messages": []}"#.into(), 400, Some("model")),
        (chat, r#"{"model": "tiny", "messages": "hi"}"#.into(), 400, Some("messages")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": 5}]}"#.into(), 400, Some("messages[0].content")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}"#.into(), 400, Some("messages[0].role")),
        (chat, r#"{"model": "tiny", "messages": []}"#.into(), 400, Some("messages")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}"#.into(), 400, Some("max_tokens")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 51}"#.into(), 400, Some("max_tokens")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}"#.into(), 400, Some("max_completion_tokens")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}"#.into(), 400, Some("temperature")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e308}"#.into(), 400, Some("temperature")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}"#.into(), 400, Some("top_p")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}"#.into(), 400, Some("presence_penalty")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": -3}"#.into(), 400, Some("frequency_penalty")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}"#.into(), 400, Some("n")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": 3}"#.into(), 400, Some("stop")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": [""]}"#.into(), 400, Some("stop")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#.into(), 400, Some("top_logprobs")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}"#.into(), 400, Some("top_logprobs")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#.into(), 400, Some("stream")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "user": 5}"#.into(), 400, Some("user")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user"}]}"#.into(), 400, Some("messages[0].content")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": null}]}"#.into(), 400, Some("messages[0].content")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": []}]}"#.into(), 400, Some("messages[0].content")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]}"#.into(), 400, Some("messages[1].content")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "4"}]}"#.into(), 400, Some("messages[1].tool_call_id")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "zz"}]}"#.into(), 400, Some("messages[1].tool_calls")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": []}]}"#.into(), 400, Some("messages[1].tool_calls")),
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]}"#.into(), 400, Some("messages[0].tool_calls")),
        // 1 prompt token + 8 for the output: over the context of 8
        (comp, r#"{"model": "tiny", "prompt": "cat", "max_tokens": 8}"#.into(), 400, Some("max_tokens")),
        (comp, r#"{"model": "tiny", "prompt": "cat", "max_completion_tokens": 8}"#.into(), 400, Some("max_completion_tokens")),
        // The template renders 9 tokens for this: over the context of 8.
        (chat, r#"{"model": "tiny", "messages": [{"role": "user", "content": "cat dog sun moon"}]}"#.into(), 400, Some("messages")),
        (comp, r#"{"model": "tiny", "prompt": "cat dog sun moon tree rock fish bird"}"#.into(), 400, Some("prompt")),
        (comp, r#"{"model": "tiny", "prompt": ""}"#.into(), 400, Some("prompt")),
        (comp, r#"{"model": "tiny", "prompt": {"a": 1}}"#.into(), 400, Some("prompt")),
        (comp, r#"{"model": "tiny", "prompt": [9999]}"#.into(), 400, Some("prompt")),
        (comp, r#"{"model": "tiny", "prompt": "cat", "logprobs": true}"#.into(), 400, Some("logprobs")),
        (comp, r#"{"model": "tiny", "prompt": "cat", "echo": true}"#.into(), 400, Some("echo")),
        (comp, r#"{"model": "tiny", "prompt": "cat", "n": 2, "best_of": 1}"#.into(), 400, Some("best_of")),
        (comp, r#"{"model": "tiny", "prompt": "cat", "best_of": 0}"#.into(), 400, Some("best_of")),
    ];
    for (path, body, status, param) in &cases {
        let r = request(srv.addr, "POST", path, &[], Some(body.as_bytes()));
        assert_error(&r, *status, None);
        // short messages: a huge number is written in its shortest form (1e308)
        assert!(r.body.len() < 400, "{}", r.body);
        assert_eq!(
            r.json()["error"]["param"].as_str(),
            *param,
            "{body} -> {}",
            r.body
        );
    }
    for (model, code) in [
        ("gpt-4", "model_not_found"),
        ("tiny:nope", "model_not_found"),
    ] {
        let r = post(
            srv.addr,
            chat,
            &json!({"model": model, "messages": [{"role": "user", "content": "x"}]}),
        );
        assert_error(&r, 404, Some(code));
    }
    assert!(
        eng.submitted().is_empty(),
        "no bad request reached the engine"
    );
    // The server is unaffected.
    assert_eq!(
        post(
            srv.addr,
            comp,
            &json!({"model": "tiny", "prompt": "cat", "max_tokens": 1})
        )
        .status,
        200
    );
    // A tool round trip as OpenAI's clients send it passes the checks above.
    let r = post(
        srv.addr,
        chat,
        &json!({"model": "tiny", "max_tokens": 1, "user": "u1", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"}]}),
    );
    assert_ne!(
        r.json()["error"]["param"].as_str(),
        Some("messages[1].content"),
        "{}",
        r.body
    );
    assert_ne!(
        r.json()["error"]["param"].as_str(),
        Some("messages[2].tool_call_id"),
        "{}",
        r.body
    );
}

#[test]
fn body_over_the_limit_is_413() {
    let mut cfg = ServerConfig::new("tiny", 256);
    cfg.max_body_bytes = 200;
    let (srv, eng) = fake_server(cfg, &[]);
    let big = json!({"model": "tiny", "prompt": "cat ".repeat(100)}).to_string();
    let r = request(
        srv.addr,
        "POST",
        "/v1/completions",
        &[],
        Some(big.as_bytes()),
    );
    assert_error(&r, 413, Some("request_too_large"));
    // Chunked (no Content-Length): caught while reading.
    let r = chunked_post(srv.addr, "/v1/completions", big.as_bytes());
    assert_error(&r, 413, Some("request_too_large"));
    assert!(eng.submitted().is_empty());
    assert_eq!(get(srv.addr, "/health").status, 200);
}

#[test]
fn api_key_required_on_v1_only() {
    let mut cfg = ServerConfig::new("tiny", 256);
    cfg.api_keys = vec!["sekrit".into()];
    let (srv, _eng) = fake_server(cfg, &[]);
    let r = get(srv.addr, "/v1/models");
    assert_error(&r, 401, Some("invalid_api_key"));
    let r = request(
        srv.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer wrong")],
        None,
    );
    assert_error(&r, 401, Some("invalid_api_key"));
    let r = request(
        srv.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "sekrit")],
        None,
    );
    assert_error(&r, 401, Some("invalid_api_key"));
    let r = request(
        srv.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer sekrit")],
        None,
    );
    assert_eq!(r.status, 200);
    // A key in bytes other than visible ASCII is a wrong key, not a missing one.
    let r = request(
        srv.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer s\u{e9}krit")],
        None,
    );
    assert_error(&r, 401, Some("invalid_api_key"));
    assert!(r.body.contains("incorrect API key"), "{}", r.body);
    // Probes and scrapers need no key.
    assert_eq!(get(srv.addr, "/health").status, 200);
    assert_eq!(get(srv.addr, "/metrics").status, 200);
}

#[test]
fn queue_full_is_429_with_retry_after() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    eng.set_full(true);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat"}),
    );
    assert_error(&r, 429, Some("rate_limit_exceeded"));
    assert_eq!(r.header("retry-after"), Some("3"));
    eng.set_full(false);
    assert_eq!(
        post(
            srv.addr,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "cat", "max_tokens": 1})
        )
        .status,
        200
    );
}

#[test]
fn n_over_capacity_cancels_the_sequences_already_queued() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    eng.set_capacity(2);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "n": 3, "max_tokens": 200}),
    );
    assert_error(&r, 429, Some("rate_limit_exceeded"));
    wait_for(
        || eng.cancelled().len() == 2,
        "both queued sequences cancelled",
    );
}

// ---- disconnects ----

#[test]
fn client_gone_mid_stream_cancels_its_generation() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    eng.set_delay(Duration::from_millis(20));
    // 250 tokens at 20 ms: long enough to hang up mid-stream, within the context of 256
    let body = json!({"model": "tiny", "prompt": "cat", "max_tokens": 250, "stream": true});
    let mut s = send_raw(
        srv.addr,
        "POST",
        "/v1/completions",
        &[],
        Some(body.to_string().as_bytes()),
    );
    // Wait for the first text, then hang up.
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"text\"") {
        let k = s.read(&mut buf).unwrap();
        assert!(k > 0, "stream ended early");
        got.extend_from_slice(&buf[..k]);
    }
    drop(s);
    wait_for(
        || eng.cancelled().len() == 1,
        "the streamed sequence cancelled",
    );
    // The others are unaffected.
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 2}),
    );
    assert_eq!(r.json()["choices"][0]["text"], "dog sun");
}

#[test]
fn client_gone_before_a_whole_response_cancels_its_generation() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    eng.set_delay(Duration::from_millis(20));
    let body = json!({"model": "tiny", "prompt": "cat", "max_tokens": 250});
    let s = send_raw(
        srv.addr,
        "POST",
        "/v1/completions",
        &[],
        Some(body.to_string().as_bytes()),
    );
    wait_for(|| eng.submitted().len() == 1, "the request submitted");
    drop(s);
    wait_for(|| eng.cancelled().len() == 1, "the sequence cancelled");
}

// ---- adapters ----

#[test]
fn adapters_load_inside_adapter_dir_only() {
    let dir = tmp("adapters");
    let root = dir.join("adapters");
    std::fs::create_dir_all(root.join("good/inner")).unwrap();
    std::fs::create_dir_all(dir.join("outside")).unwrap();
    std::fs::write(root.join("file.txt"), "x").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(dir.join("outside"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("good"), root.join("alias")).unwrap();
        // a folder inside whose file links outside, and one holding a FIFO
        std::fs::write(dir.join("outside/adapter_config.json"), "{}").unwrap();
        std::fs::create_dir_all(root.join("linkfile")).unwrap();
        std::os::unix::fs::symlink(
            dir.join("outside/adapter_config.json"),
            root.join("linkfile/adapter_config.json"),
        )
        .unwrap();
        std::fs::create_dir_all(root.join("fifo")).unwrap();
        let fifo = root.join("fifo/adapter_config.json");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success(), "mkfifo");
    }
    let mut cfg = ServerConfig::new("tiny", 256);
    let (srv, _eng) = fake_server(cfg.clone(), &[]);
    let r = post(
        srv.addr,
        "/v1/adapters",
        &json!({"name": "a", "path": "good"}),
    );
    assert_error(&r, 403, None);
    drop(srv);

    cfg.adapter_dir = Some(root.canonicalize().unwrap());
    let (srv, eng) = fake_server(cfg, &[]);
    let abs = dir.join("outside").display().to_string();
    let mut cases = vec![
        ("../outside", 403),
        ("good/../../outside", 403),
        (abs.as_str(), 403),
        ("missing", 400),
        ("file.txt", 400),
        ("", 400),
    ];
    if cfg!(unix) {
        cases.push(("escape", 403));
        cases.push(("linkfile", 403));
        cases.push(("fifo", 400));
    }
    for (path, status) in cases {
        let r = post(
            srv.addr,
            "/v1/adapters",
            &json!({"name": "a", "path": path}),
        );
        assert_error(&r, status, None);
        assert_eq!(r.json()["error"]["param"], "path", "{path}: {}", r.body);
        assert!(
            !r.body.contains(&*dir.display().to_string()) || path == abs,
            "{}",
            r.body
        );
    }
    // path segments that are not UTF-8: OpenAI's JSON error shape, not a plain-text 400
    for (method, path, param) in [
        ("DELETE", "/v1/adapters/%ff", "name"),
        ("GET", "/v1/models/%ff%fe", "model"),
    ] {
        let r = request(srv.addr, method, path, &[], None);
        assert_error(&r, 400, None);
        assert_eq!(r.json()["error"]["param"], param, "{}", r.body);
    }
    for bad in [
        json!({"name": "a:b", "path": "good"}),
        json!({"name": "", "path": "good"}),
        json!({"name": "a.b", "path": "good"}),
        json!({"name": "x".repeat(100_000), "path": "good"}),
    ] {
        let r = post(srv.addr, "/v1/adapters", &bad);
        assert_error(&r, 400, None);
        assert_eq!(r.json()["error"]["param"], "name");
        // a long name is not echoed whole
        assert!(r.body.len() < 1000, "{} bytes", r.body.len());
    }
    assert_error(
        &post(srv.addr, "/v1/adapters", &json!({"name": "a"})),
        400,
        None,
    );
    assert!(eng.loaded().is_empty());

    let r = post(
        srv.addr,
        "/v1/adapters",
        &json!({"name": "a", "path": "./good/inner"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model"], "tiny:a");
    if cfg!(unix) {
        // A symlink that stays inside is fine.
        assert_eq!(
            post(
                srv.addr,
                "/v1/adapters",
                &json!({"name": "b", "path": "alias"})
            )
            .status,
            200
        );
    }
    assert_eq!(
        eng.loaded()[0],
        (
            "a".to_string(),
            root.canonicalize().unwrap().join("good/inner")
        )
    );
    let r = post(
        srv.addr,
        "/v1/adapters",
        &json!({"name": "a", "path": "good"}),
    );
    assert_error(&r, 409, None);
    let ids = get(srv.addr, "/v1/models").json()["data"].to_string();
    assert!(ids.contains("\"tiny:a\""), "{ids}");
    // Usable per request, then gone after DELETE.
    let req = json!({"model": "tiny:a", "prompt": "cat", "max_tokens": 1});
    assert_eq!(post(srv.addr, "/v1/completions", &req).status, 200);
    let r = request(srv.addr, "DELETE", "/v1/adapters/a", &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deleted"], true);
    assert_error(
        &post(srv.addr, "/v1/completions", &req),
        404,
        Some("model_not_found"),
    );
    assert_error(
        &request(srv.addr, "DELETE", "/v1/adapters/a", &[], None),
        404,
        Some("model_not_found"),
    );
}

// ---- the real scheduler ----

#[test]
fn real_scheduler_greedy_chat_n_and_stop() {
    let handle = serve::start(
        Box::new(CountingBackend::new(256)),
        SchedulerConfig::default(),
    );
    let srv = start_server(ServerConfig::new("tiny", 256), std::sync::Arc::new(handle));
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "temperature": 0, "max_tokens": 4, "n": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    for i in 0..2 {
        assert_eq!(v["choices"][i]["text"], "dog sun moon tree");
        assert_eq!(v["choices"][i]["finish_reason"], "length");
    }
    assert_eq!(v["usage"]["completion_tokens"], 8);
    // EOS after "bird".
    let v = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "tree", "temperature": 0}),
    )
    .json();
    assert_eq!(v["choices"][0]["text"], "rock fish bird");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let s = post(
        srv.addr,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                "temperature": 0, "max_tokens": 5, "stop": "r as", "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let chunks = sse(&s);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    // After ":" come "system user assistant be": stopped inside "user assistant".
    assert_eq!(text, "system use");
    let last = chunks.last().unwrap();
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() >= 3);
    let m = get(srv.addr, "/metrics").body;
    assert!(m.contains("ferrotune_requests_total 4"), "{m}");
}

/// A request the scheduler cuts off at `--request-timeout` is an error (504, code `timeout`),
/// not a 200 that passes truncated text off as complete; streamed, the error event follows the
/// text sent so far, then `[DONE]`. A queued request that times out before it runs, too.
#[test]
fn real_scheduler_request_timeout_is_an_error() {
    let mut backend = CountingBackend::new(256);
    // "cat" runs 8 tokens to its end of sequence: 700 ms at 100 ms a step
    backend.step_delay = Duration::from_millis(100);
    let handle = serve::start(
        Box::new(backend),
        SchedulerConfig {
            max_concurrent: 1,
            request_timeout: Some(Duration::from_millis(350)),
            ..Default::default()
        },
    );
    let srv = start_server(ServerConfig::new("tiny", 256), std::sync::Arc::new(handle));
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 200}),
    );
    assert_error(&r, 504, Some("timeout"));
    assert!(r.body.contains("--request-timeout"), "{}", r.body);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 200, "stream": true}),
    );
    assert_eq!(r.status, 200);
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", r.body);
    let err: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "timeout", "{}", r.body);
    assert!(events.len() >= 3, "text before the error: {}", r.body);
    // within the timeout: a normal completion
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
}

#[test]
fn real_scheduler_queue_full_and_disconnect() {
    let mut backend = CountingBackend::new(256);
    backend.step_delay = Duration::from_millis(20);
    let handle = serve::start(
        Box::new(backend),
        SchedulerConfig {
            max_concurrent: 1,
            max_queue: 0,
            ..Default::default()
        },
    );
    let srv = start_server(ServerConfig::new("tiny", 256), std::sync::Arc::new(handle));
    let body = json!({"model": "tiny", "prompt": "cat", "max_tokens": 200, "stream": true});
    let mut s = send_raw(
        srv.addr,
        "POST",
        "/v1/completions",
        &[],
        Some(body.to_string().as_bytes()),
    );
    let mut buf = [0u8; 4096];
    let k = s.read(&mut buf).unwrap();
    assert!(k > 0);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat"}),
    );
    assert_error(&r, 429, Some("rate_limit_exceeded"));
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    drop(s);
    // The slot frees once the stream's sequence is cancelled.
    let t0 = Instant::now();
    loop {
        let r = post(
            srv.addr,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "cat", "max_tokens": 1}),
        );
        if r.status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "slot never freed: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = get(srv.addr, "/metrics").body;
    assert!(m.contains("ferrotune_requests_cancelled_total 1"), "{m}");
}

#[test]
fn graceful_shutdown_finishes_the_stream_in_flight() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    eng.set_delay(Duration::from_millis(10));
    let body = json!({"model": "tiny", "prompt": "cat", "max_tokens": 30, "stream": true});
    let mut s = send_raw(
        srv.addr,
        "POST",
        "/v1/completions",
        &[],
        Some(body.to_string().as_bytes()),
    );
    let mut first = [0u8; 64];
    assert!(s.read(&mut first).unwrap() > 0);
    let addr = srv.addr;
    let t = srv.stop_in_background();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let all = [&first[..], &rest[..]].concat();
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("data: [DONE]"), "{text}");
    // cat dog ... bird, then EOS: the whole sequence ran although the server was stopping.
    assert!(text.contains(" bird"), "{text}");
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    t.join().unwrap();
    assert!(eng.was_shut_down());
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
}

// ---- helpers local to this file ----

fn post(addr: std::net::SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, &[], Some(body.to_string().as_bytes()))
}

fn get(addr: std::net::SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], None)
}

fn chunked_post(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for part in body.chunks(50) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The server may answer 413 and close before reading everything: a write error is fine.
    let _ = s.write_all(&req);
    read_response(s)
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn logit_bias_is_forwarded_and_checked() {
    let (srv, eng) = fake_server(ServerConfig::new("tiny", 256), &[]);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 1,
                "logit_bias": {"5": 100, "3": -2.5}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut bias = eng.submitted()[0].sampling.logit_bias.clone();
    bias.sort_by_key(|b| b.0);
    assert_eq!(bias, vec![(3, -2.5), (5, 100.0)]);
    for (b, what) in [
        (json!({"abc": 1}), "key `abc`"),
        (json!({"999999": 1}), "key `999999`"),
        (json!({"-1": 1}), "key `-1`"),
        (json!({"5": 101}), "token 5"),
        (json!({"5": "x"}), "token 5"),
    ] {
        let r = post(
            srv.addr,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "cat", "max_tokens": 1, "logit_bias": b}),
        );
        assert_error(&r, 400, None);
        assert!(
            r.body.contains("logit_bias") && r.body.contains(what),
            "{}",
            r.body
        );
    }
    assert_eq!(eng.submitted().len(), 1);
}

#[test]
fn more_sequences_than_the_server_holds_is_400_not_429() {
    let mut cfg = ServerConfig::new("tiny", 256);
    cfg.max_sequences = 4;
    let (srv, eng) = fake_server(cfg, &[]);
    for (body, what) in [
        (
            json!({"model": "tiny", "prompt": "cat", "max_tokens": 1, "n": 5}),
            "5 choices",
        ),
        (
            json!({"model": "tiny", "prompt": ["cat", "cat"], "max_tokens": 1, "n": 3}),
            "3 choices for each of 2 prompts",
        ),
    ] {
        let r = post(srv.addr, "/v1/completions", &body);
        assert_error(&r, 400, None);
        assert!(
            r.body.contains(what) && r.body.contains("at most 4"),
            "{}",
            r.body
        );
    }
    assert!(eng.submitted().is_empty());
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "cat", "max_tokens": 1, "n": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Reads until the server closes the connection; how long that took.
fn until_closed(mut s: TcpStream) -> (Duration, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    (t0.elapsed(), buf)
}

#[test]
fn slow_or_silent_clients_are_cut_off() {
    let mut cfg = ServerConfig::new("tiny", 256);
    cfg.header_timeout = Duration::from_millis(300);
    cfg.body_timeout = Duration::from_millis(300);
    let (srv, eng) = fake_server(cfg, &[]);
    // Headers never finished, and a connection that says nothing: both closed.
    let mut half = TcpStream::connect(srv.addr).unwrap();
    half.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let silent = TcpStream::connect(srv.addr).unwrap();
    for s in [half, silent] {
        let (t, _) = until_closed(s);
        assert!(t < Duration::from_secs(5), "still open after {t:?}");
    }
    // A body that stalls: 408 in OpenAI's shape.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 44\r\n\r\n{\"model\":",
    )
    .unwrap();
    let (t, buf) = until_closed(s);
    let text = String::from_utf8_lossy(&buf);
    assert!(t < Duration::from_secs(5), "{t:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("request_timeout") && text.contains("--body-timeout"),
        "{text}"
    );
    assert!(eng.submitted().is_empty());
    assert_eq!(get(srv.addr, "/health").status, 200);
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_one() {
    let mut cfg = ServerConfig::new("tiny", 256);
    cfg.max_connections = 2;
    cfg.header_timeout = Duration::from_millis(500);
    let (srv, _eng) = fake_server(cfg, &[]);
    // Two silent clients hold both connections: a third is served once one is cut off.
    let held = [
        TcpStream::connect(srv.addr).unwrap(),
        TcpStream::connect(srv.addr).unwrap(),
    ];
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    assert_eq!(get(srv.addr, "/health").status, 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    drop(held);
}
