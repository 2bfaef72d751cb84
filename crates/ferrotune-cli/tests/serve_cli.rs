//! `ferrotune serve` as a user starts it: flags refused in one line, and a real server on the
//! tiny model answering over HTTP with the greedy text `generate` prints, for the base and
//! for a LoRA adapter chosen per request (the full OpenAI-client check is
//! reference/openai_client_check.py).
use crate::support::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serve_refuses_bad_flags_in_one_line() {
    let tmp = tmp("serve-flags");
    let model = tiny_model(&tmp, false);
    let m = arg(&model);
    for (flags, says) in [
        (vec!["--adapter", "noequals"], "expected NAME=DIR"),
        (vec!["--api-key", "s\u{e9}krit"], "visible ASCII"),
        (vec!["--api-key", " "], "visible ASCII"),
        (vec!["--adapter", "a=/no/such/dir"], "no such folder"),
        (vec!["--host", "localhost:80"], "expected an IP address"),
        (vec!["--max-concurrent", "0"], "--max-concurrent 0"),
        (vec!["--max-body", "5"], "--max-body 5"),
        (vec!["--served-name", "a:b"], "without `:`"),
        (vec!["--adapter-dir", "/no/such/dir"], "no such folder"),
        (vec!["--request-timeout", "-1"], "--request-timeout"),
        (vec!["--max-connections", "0"], "--max-connections 0"),
        (vec!["--header-timeout", "nan"], "--header-timeout"),
        (vec!["--body-timeout", "0"], "--body-timeout 0"),
        (
            vec!["--max-prompt-tokens", "100000"],
            "context is 256 tokens",
        ),
    ] {
        let mut args = vec!["serve", "--model", m.as_str()];
        args.extend(flags.iter().copied());
        let line = fails(&args);
        assert!(line.contains(says), "{flags:?}: {line}");
    }
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `ferrotune serve` on a free port and wait for its "serving ... on http://ADDR" line.
fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .arg("serve")
        .args(args)
        .args(["--port", "0", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let t0 = Instant::now();
    let port = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the server exited before listening"))
            .unwrap();
        if let Some(rest) = line.split("on http://").nth(1) {
            let addr = rest.split_whitespace().next().unwrap();
            break addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no listening line");
    };
    // Keep draining stderr (the request log) so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, port }
}

/// One HTTP/1.1 request; returns (status, body).
fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

fn generate_text(model: &Path, prompt: &str, adapter: Option<&Path>) -> String {
    let m = arg(model);
    let mut args = vec![
        "-q".to_string(),
        "generate".into(),
        "--model".into(),
        m,
        "--prompt".into(),
        prompt.into(),
        "--max-new-tokens".into(),
        "12".into(),
        "--ignore-eos".into(),
        "--json".into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), arg(a)]);
    }
    json(&succeeds(&args))["text"].as_str().unwrap().to_string()
}

/// A LoRA adapter trained a few steps on the tiny model (its greedy output differs from the
/// base's on the probe).
fn lora_adapter(tmp: &Path, model: &Path) -> std::path::PathBuf {
    let data = tmp.join("train.jsonl");
    let rows: String = (0..32)
        .map(|i| {
            format!(
                "{}\n",
                json!({"q": format!("cat dog w{}", 30 + i % 20), "a": "bird bird bird"})
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let cfg = tmp.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {model:?}\noutput_dir = {out:?}\nmethod = \"lora\"\n[lora]\nr = 4\nalpha = 8\ntargets = [\"q_proj\", \"v_proj\"]\n[data]\ntrain = {data:?}\ntemplate = \"{{q}}\"\ncompletion = \" {{a}}\"\n[train]\nbatch_size = 8\nmax_steps = 12\nmax_seq_len = 32\nlr = 5e-2\nwarmup_steps = 1\neval_every = 100\nsave_every = 100\nseed = 3\n",
            model = model.display().to_string(),
            out = tmp.join("run").display().to_string(),
            data = data.display().to_string(),
        ),
    )
    .unwrap();
    succeeds(&["-q", "train", "--config", &arg(&cfg)]);
    tmp.join("run/adapter")
}

#[test]
fn served_greedy_equals_generate_for_base_and_adapter() {
    let tmp = tmp("serve-greedy");
    let model = tiny_model(&tmp, false);
    let adapter = lora_adapter(&tmp, &model);
    let prompt = "cat dog w33";
    let base_text = generate_text(&model, prompt, None);
    let lora_text = generate_text(&model, prompt, Some(&adapter));
    assert_ne!(
        base_text, lora_text,
        "the adapter must change the output for the test to mean much"
    );
    let srv = start(&[
        "--model",
        &arg(&model),
        "--adapter",
        &format!("t={}", adapter.display()),
        "--served-name",
        "tiny",
    ]);
    let (st, models) = request(srv.port, "GET", "/v1/models", None);
    assert_eq!(st, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "tiny:t"]);
    for (model_id, want) in [("tiny", &base_text), ("tiny:t", &lora_text)] {
        let (st, r) = request(
            srv.port,
            "POST",
            "/v1/completions",
            Some(
                &json!({"model": model_id, "prompt": prompt, "max_tokens": 12,
                         "temperature": 0, "ignore_eos": true}),
            ),
        );
        assert_eq!(st, 200, "{r}");
        assert_eq!(
            r["choices"][0]["text"].as_str().unwrap(),
            want,
            "{model_id}"
        );
        assert_eq!(r["usage"]["completion_tokens"], 12, "{r}");
    }
    let (st, r) = request(
        srv.port,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "tiny:nope", "prompt": prompt})),
    );
    assert_eq!(st, 404, "{r}");
    assert_eq!(r["error"]["code"], "model_not_found", "{r}");
}

#[test]
fn a_second_sigterm_ends_a_graceful_shutdown_at_once() {
    let tmp = tmp("serve-two-signals");
    let model = tiny_model(&tmp, false);
    let mut srv = start(&["--model", &arg(&model), "--body-timeout", "120"]);
    // A request whose body never finishes arriving: the graceful shutdown waits for it.
    let mut stalled = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    write!(
        stalled,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"prompt\": "
    )
    .unwrap();
    stalled.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = srv.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        srv.child.try_wait().unwrap().is_none(),
        "one SIGTERM waits for the request in flight"
    );
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the second SIGTERM did not end the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
}
