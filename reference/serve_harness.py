"""Shared by reference/openai_client_check.py and bench/serve_load.py: start `ferrotune serve`
(or llama.cpp's server) on a free loopback port and wait for it, train the two small demo
adapters both scripts serve, run `ferrotune generate`, raw HTTP requests, and the CPU line.

Not a script: imported with `sys.path.insert(0, <this folder>)`.
"""
import http.client, json, os, re, signal, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FERROTUNE_CACHE", os.path.join(ROOT, ".cache"))
DEFAULT_GGUF = os.path.join(CACHE, "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# Trained adapters are kept here (git-ignored) and reused by later runs.
DEFAULT_WORKDIR = os.path.join(ROOT, "runs", "serve-check")
QUICKSTART = os.path.join(ROOT, "examples", "quickstart")


def ferrotune_bin(path=None):
    exe = path or os.environ.get("FERROTUNE_BIN") or os.path.join(ROOT, "target/release/ferrotune")
    if not os.path.isfile(exe):
        sys.exit(f"{exe}: no ferrotune binary (cargo build --release -p ferrotune-cli, "
                 "or set FERROTUNE_BIN)")
    return exe


def free_port():
    """A loopback port free now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_line():
    """CPU model, core count and SIMD level, as the other benchmark headers print them."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    level = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    if "avx512_vnni" in flags:
        level += " VNNI"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    return f"CPU: {model}; {cores} cores available; SIMD: {level}; load average {' '.join(load)}"


class Server:
    """A server process on 127.0.0.1:port; its output goes to a log file (read on failure)."""

    def __init__(self, name, cmd, port, log_path, health_path="/health", env=None, ready_s=120):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + ready_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {self.proc.returncode} before it was "
                                   f"ready: {' '.join(cmd)}\n{self.log_tail()}")
            try:
                st, _, _ = http_request("GET", self.base + health_path, timeout=2)
                if st == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{name} did not answer {health_path} within {ready_s} s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n=30):
        self.log.flush()
        try:
            lines = open(self.log_path, "rb").read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  [{self.name}] {l}" for l in lines[-n:])

    def alive(self):
        return self.proc.poll() is None

    def terminate(self, wait_s=30):
        """SIGTERM, then SIGKILL after wait_s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def http_request(method, url, body=None, headers=None, timeout=60):
    """One request with http.client. body: bytes, str, or a JSON-able object. Returns
    (status, headers dict with lower-case keys, body bytes)."""
    m = re.match(r"http://([^/:]+):(\d+)(/.*)?$", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def send_oversize(url, path, nbytes, headers, timeout=60):
    """POST a body of nbytes (a JSON object padded with an unknown field) through a raw socket,
    tolerating the server closing early; returns (status or None, response bytes)."""
    m = re.match(r"http://([^/:]+):(\d+)", url)
    host, port = m.group(1), int(m.group(2))
    head_json = b'{"model": "x", "prompt": "hi", "pad": "'
    tail_json = b'"}'
    pad = nbytes - len(head_json) - len(tail_json)
    req = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {nbytes}\r\nConnection: close\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    s = socket.create_connection((host, port), timeout=timeout)
    resp = b""
    try:
        s.sendall(req + head_json)
        chunk = b"a" * (1 << 20)
        sent = 0
        try:
            while sent < pad:
                n = min(len(chunk), pad - sent)
                s.sendall(chunk[:n])
                sent += n
            s.sendall(tail_json)
        except OSError:
            pass  # the server refused the rest of the body: its answer should be waiting
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                resp += b
                if b"\r\n\r\n" in resp and len(resp) > 4096:
                    break
        except OSError:
            pass
    finally:
        s.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", resp)
    return (int(m.group(1)) if m else None), resp


def generate(exe, model, prompt, max_new, chat=False, adapter=None, threads=None):
    """`ferrotune generate --json` greedy output: the dict it prints (text, prompt_tokens, ...)."""
    cmd = [exe, "-q", "generate", "--model", model, "--prompt", prompt, "--max-new-tokens",
           str(max_new), "--json", "--temperature", "0"]
    if chat:
        cmd.append("--chat")
    if adapter:
        cmd += ["--adapter", adapter]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train(exe, config, out_dir, sets, log):
    done = os.path.join(out_dir, "adapter", "adapter_config.json")
    if os.path.isfile(done):
        return os.path.join(out_dir, "adapter")
    cmd = [exe, "-q", "train", "--config", config, "--overwrite",
           "--set", f"output_dir={json.dumps(out_dir)}"]
    for s in sets:
        cmd += ["--set", s]
    print(f"training a demo adapter: {' '.join(cmd)}", file=log, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 or not os.path.isfile(done):
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return os.path.join(out_dir, "adapter")


def demo_adapters(exe, model, workdir, log=sys.stderr, lora_only=False):
    """Two small adapters that change SmolLM2's greedy output, trained once (~30 s on 2 cores)
    and reused: `date` (LoRA on q/k/v/o, the quickstart task: a sentence's date as YYYY-MM-DD)
    and `fruit` (IA3: answers everything with "PINEAPPLE PINEAPPLE"), so that a mixed batch
    holds two PEFT methods. lora_only: `fruit` is a LoRA too (`fruit-lora`), so that the server
    keeps its fast batched engine (which runs LoRA; other methods use the model's own forward)."""
    os.makedirs(workdir, exist_ok=True)
    model_set = f"model={json.dumps(os.path.abspath(model))}"
    quick = ["train.max_steps=8", "train.eval_every=100", "train.save_every=100"]
    date = _train(exe, os.path.join(QUICKSTART, "quickstart.toml"), os.path.join(workdir, "date"),
                  [model_set] + quick, log)
    fruit_data = os.path.join(workdir, "fruit.jsonl")
    with open(os.path.join(QUICKSTART, "train.jsonl")) as f, open(fruit_data + ".tmp", "w") as g:
        for line in list(f)[:64]:
            g.write(json.dumps({"q": json.loads(line)["sentence"], "a": "PINEAPPLE PINEAPPLE"}) + "\n")
    os.replace(fruit_data + ".tmp", fruit_data)
    fruit_cfg = os.path.join(workdir, "fruit-lora.toml" if lora_only else "fruit.toml")
    with open(fruit_cfg + ".tmp", "w") as g:
        method, lr = ("lora", "1e-2") if lora_only else ("ia3", "3e-2")
        g.write(f'method = "{method}"\n[data]\ntrain = "fruit.jsonl"\ntemplate = "{{q}}"\n'
                'completion = " {a}"\n[train]\nbatch_size = 8\nmax_steps = 10\nmax_seq_len = 64\n'
                f'lr = {lr}\nwarmup_steps = 1\neval_every = 100\nsave_every = 100\nseed = 7\n')
    os.replace(fruit_cfg + ".tmp", fruit_cfg)
    name = "fruit-lora" if lora_only else "fruit"
    fruit = _train(exe, fruit_cfg, os.path.join(workdir, name), [model_set], log)
    return {"date": date, name: fruit}


def parse_adapter_args(items):
    out = {}
    for it in items or []:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            sys.exit(f"--adapter {it!r}: expected NAME=DIR")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            sys.exit(f"--adapter {it!r}: {path} has no adapter_config.json")
        out[name] = os.path.abspath(path)
    return out


def model_id(model, served_name=None):
    """The id `ferrotune serve` lists for the model: the file or folder stem (issue 14)."""
    if served_name:
        return served_name
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base
