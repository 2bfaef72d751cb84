//! What the HTTP tests share: the word-level tokenizer, a fake engine, a fake batch backend
//! for the real scheduler, a server on a free port, and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use ferrotune::serve::{
    BatchBackend, EventSink, FinishReason, GenRequest, MetricsSnapshot, SamplingParams, SeqEvent,
    SubmitError, TokenConstraint, TokenLogprob,
};
use ferrotune::tokenizer::Tokenizer;
use ferrotune_serve::{AppState, Engine, ServerConfig};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[path = "../../../ferrotune/tests/common/word_model.rs"]
mod word_model;
pub use word_model::tmp;

/// The tokenizer's first words (ids 24..256 are `w24`..`w255`): every id decodes to one word.
pub const WORDS: &[&str] = &[
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    ":",
    "system",
    "user",
    "assistant",
    "be",
    "brief",
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "rock",
    "fish",
    "bird",
    "say",
    "=",
    "one",
];
pub const EOS: u32 = 2;
const BIRD: u32 = 20;
/// One `role: content` line per message.
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// The word-level tokenizer (no BOS added, EOS `</s>`, the chat template above).
pub fn tokenizer() -> Arc<Tokenizer> {
    static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let d = word_model::word_level_model(&tmp("tok"), WORDS, 256, false, Some(CHAT_TEMPLATE));
        Arc::new(Tokenizer::from_hf_dir(&d).unwrap())
    })
    .clone()
}

/// The rule both fakes generate by: the next id after `last` (+1, or +2 with the `plus2`
/// adapter); after `bird` comes EOS.
pub fn next_token(last: u32, adapter: Option<&str>) -> u32 {
    if last == BIRD {
        return EOS;
    }
    let step = if adapter == Some("plus2") { 2 } else { 1 };
    let t = last + step;
    if t >= 256 {
        24 + t % 232
    } else {
        t
    }
}

/// What a submission carried (the constraint only as present or not).
#[derive(Clone, Debug)]
pub struct Submitted {
    pub prompt: Vec<u32>,
    pub adapter: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub logprobs: Option<usize>,
    pub stop_ids: Vec<u32>,
    pub had_constraint: bool,
}

/// An engine that runs each sequence on its own thread by [`next_token`].
#[derive(Default)]
pub struct FakeEngine {
    adapters: Mutex<Vec<String>>,
    next_id: AtomicU64,
    cancelled: Arc<Mutex<HashSet<u64>>>,
    submitted: Mutex<Vec<Submitted>>,
    loaded: Mutex<Vec<(String, PathBuf)>>,
    delay_ms: Arc<AtomicU64>,
    full: AtomicBool,
    /// Sequences accepted before QueueFull (0: unlimited).
    capacity: AtomicUsize,
    shut: AtomicBool,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl FakeEngine {
    pub fn new(adapters: &[&str]) -> Arc<Self> {
        let e = FakeEngine::default();
        *e.adapters.lock().unwrap() = adapters.iter().map(|s| s.to_string()).collect();
        Arc::new(e)
    }
    pub fn submitted(&self) -> Vec<Submitted> {
        self.submitted.lock().unwrap().clone()
    }
    pub fn cancelled(&self) -> HashSet<u64> {
        self.cancelled.lock().unwrap().clone()
    }
    pub fn loaded(&self) -> Vec<(String, PathBuf)> {
        self.loaded.lock().unwrap().clone()
    }
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
    pub fn set_full(&self, on: bool) {
        self.full.store(on, Ordering::SeqCst);
    }
    pub fn set_capacity(&self, n: usize) {
        self.capacity.store(n, Ordering::SeqCst);
    }
    pub fn was_shut_down(&self) -> bool {
        self.shut.load(Ordering::SeqCst)
    }
}

impl Engine for FakeEngine {
    fn submit(&self, req: GenRequest, mut sink: EventSink) -> Result<u64, SubmitError> {
        if self.shut.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let cap = self.capacity.load(Ordering::SeqCst);
        if self.full.load(Ordering::SeqCst)
            || (cap > 0 && self.submitted.lock().unwrap().len() >= cap)
        {
            return Err(SubmitError::QueueFull {
                retry_after: Duration::from_millis(2500),
            });
        }
        self.submitted.lock().unwrap().push(Submitted {
            prompt: req.prompt.clone(),
            adapter: req.adapter.clone(),
            max_tokens: req.max_tokens,
            sampling: req.sampling.clone(),
            logprobs: req.logprobs,
            stop_ids: req.stop_ids.clone(),
            had_constraint: req.constraint.is_some(),
        });
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let cancelled = self.cancelled.clone();
        let delay = self.delay_ms.load(Ordering::SeqCst);
        let t = std::thread::spawn(move || {
            let mut last = *req.prompt.last().unwrap();
            let mut n = 0;
            let mut reason = FinishReason::Length;
            while n < req.max_tokens {
                std::thread::sleep(Duration::from_millis(delay));
                if cancelled.lock().unwrap().contains(&id) {
                    reason = FinishReason::Cancelled;
                    break;
                }
                let tok = next_token(last, req.adapter.as_deref());
                let logprob = req.logprobs.map(|k| TokenLogprob {
                    logprob: -0.25,
                    top: (0..k as u32)
                        .map(|j| (next_token(last, None) + j, -0.25 - j as f32))
                        .collect(),
                });
                n += 1;
                if !sink(SeqEvent::Token { id: tok, logprob }) {
                    cancelled.lock().unwrap().insert(id);
                    return;
                }
                last = tok;
                if req.stop_ids.contains(&tok) {
                    reason = FinishReason::Stop;
                    break;
                }
            }
            sink(SeqEvent::Finished {
                reason,
                prompt_tokens: req.prompt.len(),
                completion_tokens: n,
                time_to_first_token: Some(Duration::from_millis(1)),
            });
        });
        self.threads.lock().unwrap().push(t);
        Ok(id)
    }
    fn cancel(&self, id: u64) {
        self.cancelled.lock().unwrap().insert(id);
    }
    fn load_adapter(&self, name: &str, dir: &Path) -> ferrotune::Result<()> {
        self.loaded
            .lock()
            .unwrap()
            .push((name.to_string(), dir.to_path_buf()));
        self.adapters.lock().unwrap().push(name.to_string());
        Ok(())
    }
    fn unload_adapter(&self, name: &str) -> ferrotune::Result<()> {
        self.adapters.lock().unwrap().retain(|a| a != name);
        Ok(())
    }
    fn adapters(&self) -> Vec<String> {
        self.adapters.lock().unwrap().clone()
    }
    /// Fixed values: the tests check how they are written out.
    fn metrics(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            requests_total: 7,
            queue_depth: 3,
            ttft_seconds_sum: 0.3,
            ttft_count: 2,
            ttft_buckets: vec![1, 1, 1, 2, 2, 2, 2, 2, 2],
            recent_tokens_per_s: 12.5,
            ..Default::default()
        }
    }
    fn shutdown(&self) {
        self.shut.store(true, Ordering::SeqCst);
    }
    fn join(&self) {
        let ts: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for t in ts {
            let _ = t.join();
        }
    }
}

/// A batch backend for the real scheduler: logits peak at [`next_token`] of each slot's last
/// token.
pub struct CountingBackend {
    vocab: usize,
    slots: Vec<Option<(u32, Option<String>)>>,
    adapters: Vec<String>,
    pub step_delay: Duration,
}

impl CountingBackend {
    pub fn new(vocab: usize) -> Self {
        CountingBackend {
            vocab,
            slots: Vec::new(),
            adapters: Vec::new(),
            step_delay: Duration::ZERO,
        }
    }
    fn logits(&self, last: u32, adapter: Option<&str>) -> Vec<f32> {
        let mut l = vec![0.0; self.vocab];
        l[next_token(last, adapter) as usize] = 10.0;
        l
    }
}

impl BatchBackend for CountingBackend {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn context_length(&self) -> usize {
        256
    }
    fn open(&mut self, adapter: Option<&str>) -> ferrotune::Result<usize> {
        if let Some(a) = adapter {
            if !self.adapters.iter().any(|x| x == a) {
                return Err(ferrotune::Error::msg(format!("no adapter {a}")));
            }
        }
        let s = Some((0, adapter.map(str::to_string)));
        match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = s;
                Ok(i)
            }
            None => {
                self.slots.push(s);
                Ok(self.slots.len() - 1)
            }
        }
    }
    fn prefill(
        &mut self,
        slot: usize,
        ids: &[u32],
        last: bool,
    ) -> ferrotune::Result<Option<Vec<f32>>> {
        let s = self.slots[slot].as_mut().unwrap();
        s.0 = *ids.last().unwrap();
        let (t, a) = s.clone();
        Ok(last.then(|| self.logits(t, a.as_deref())))
    }
    fn step(&mut self, batch: &[(usize, u32)]) -> ferrotune::Result<Vec<Vec<f32>>> {
        std::thread::sleep(self.step_delay);
        let mut out = Vec::new();
        for &(slot, tok) in batch {
            let s = self.slots[slot].as_mut().unwrap();
            s.0 = tok;
            let a = s.1.clone();
            out.push(self.logits(tok, a.as_deref()));
        }
        Ok(out)
    }
    fn close(&mut self, slot: usize) {
        self.slots[slot] = None;
    }
    fn load_adapter(&mut self, name: &str, _dir: &Path) -> ferrotune::Result<()> {
        self.adapters.push(name.to_string());
        Ok(())
    }
    fn unload_adapter(&mut self, name: &str) -> ferrotune::Result<()> {
        self.adapters.retain(|a| a != name);
        Ok(())
    }
    fn adapters(&self) -> Vec<String> {
        self.adapters.clone()
    }
}

/// A constraint that allows everything (JSON mode's plumbing, not its grammar).
pub struct NoConstraint;

impl TokenConstraint for NoConstraint {
    fn mask(&mut self, _logits: &mut [f32]) {}
    fn accept(&mut self, _id: u32) {}
    fn is_complete(&self) -> bool {
        false
    }
}

/// A server on a free loopback port, on its own runtime thread; stopped (gracefully) on drop.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Signal shutdown; the returned thread ends once in-flight requests are done.
    pub fn stop_in_background(mut self) -> std::thread::JoinHandle<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread.take().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn start_server(cfg: ServerConfig, engine: Arc<dyn Engine>) -> Server {
    let state = AppState::new(cfg, engine, tokenizer());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            ferrotune_serve::serve(l, state, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    Server {
        addr: addr_rx.recv().unwrap(),
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

pub fn fake_server(cfg: ServerConfig, adapters: &[&str]) -> (Server, Arc<FakeEngine>) {
    let eng = FakeEngine::new(adapters);
    (start_server(cfg, eng.clone()), eng)
}

/// A response as read off the socket.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Open a connection and send one request (`Connection: close`); the caller reads.
pub fn send_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or(&[]));
    s.write_all(&bytes).unwrap();
    s
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    read_response(send_raw(addr, method, path, headers, body))
}

/// Read to EOF and parse (chunked bodies decoded).
pub fn read_response(mut s: TcpStream) -> Resp {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// The JSON chunks of an SSE body (`[DONE]` left out).
pub fn sse(r: &Resp) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .split_terminator("\n\n")
        .map(|ev| ev.strip_prefix("data: ").expect("an SSE data line"))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// `status` and OpenAI's error shape (`code` checked when given).
pub fn assert_error(r: &Resp, status: u16, code: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    let e = &v["error"];
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty() && !m.contains('\n')),
        "{}",
        r.body
    );
    assert!(e["type"].is_string(), "{}", r.body);
    let obj = e.as_object().unwrap();
    assert!(
        obj.contains_key("param") && obj.contains_key("code"),
        "{}",
        r.body
    );
    if let Some(c) = code {
        assert_eq!(e["code"], c, "{}", r.body);
    }
}
