#!/usr/bin/env python3
"""The official `openai` Python client, unchanged, against `ferrotune serve` (issue 14's
acceptance): one line per check, exit status 1 if any failed.

    .venv/bin/python reference/openai_client_check.py [--model GGUF_OR_FOLDER]
        [--adapter NAME=DIR ...] [--bin PATH] [--threads T] [--workdir DIR] [--serve-args "..."]

Starts `ferrotune serve` ($FERROTUNE_BIN, else target/release/ferrotune) on a free loopback
port with an API key, the model (default: the SmolLM2 GGUF of scripts/fetch-models.sh) and
adapters: the --adapter ones, else two demo adapters trained once into runs/serve-check/
(`date`, a LoRA, and `fruit`, an IA3; ~30 s). Then checks, through openai.OpenAI(base_url=...):
models (base and base:NAME), chat (streamed and not, usage in the last chunk), completions
(streamed and not), n > 1, stop (also across tokens, also streamed), seed reproducibility (also
while other requests run), logprobs (chat and completions), response_format json_object,
max_completion_tokens, an adapter per request; greedy output equal to `ferrotune generate`'s for
the same prompt (plain and chat, base and every adapter) and unchanged when requests run
concurrently with mixed adapters. Bad input, through raw HTTP: malformed JSON, wrong types and
out-of-range values, unknown model / adapter, a prompt over the context, an oversize body,
missing / wrong API key, adapters loaded at runtime from outside --adapter-dir (`../`, an
absolute path, a symlink out) -- each the right 4xx in OpenAI's error shape, the server healthy
after; a client killed mid-stream leaves a concurrent stream's output unchanged. "extra" lines
(SIGTERM drain, 429 with Retry-After, /metrics, models.retrieve) go beyond the acceptance and
print WARN instead of failing.

Needs `openai` (scripts/setup-reference.sh pins it); nothing else outside the standard library.
"""
import argparse, concurrent.futures as cf, json, os, shlex, shutil, signal, subprocess, sys, tempfile
import threading, time, traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_harness as H  # noqa: E402

API_KEY = "sk-ferrotune-check"
MAX_NEW = 24
CHAT_Q = "What is the capital of France?"
DATE_PROMPT = ("Write the date in this sentence as YYYY-MM-DD.\n\n"
               "Sentence: The bridge reopened on March 3rd, 1999.\nDate:")
FRUIT_PROMPT = "The bridge reopened on March 3rd, 1999."
# (kind, prompt) pairs every adapter is compared on against `ferrotune generate`.
PROBES = [("chat", CHAT_Q), ("chat", "What is 2+2?"), ("completion", DATE_PROMPT),
          ("completion", FRUIT_PROMPT)]


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


class Report:
    def __init__(self):
        self.failed, self.warned, self.passed = [], [], 0
        self.lock = threading.Lock()

    def check(self, name, fn, extra=False):
        t0 = time.monotonic()
        try:
            detail = fn()
        except Exception as e:  # every failure is one line; the traceback only for surprises
            msg = f"{type(e).__name__}: {e}" if not isinstance(e, CheckFailed) else str(e)
            msg = " ".join(msg.split())
            if len(msg) > 600:
                msg = msg[:600] + "..."
            with self.lock:
                if extra:
                    self.warned.append(name)
                    print(f"WARN {name} (extra): {msg}", flush=True)
                else:
                    self.failed.append(name)
                    print(f"FAIL {name}: {msg}", flush=True)
                if not isinstance(e, (CheckFailed, AssertionError)) and os.environ.get("CHECK_TRACE"):
                    traceback.print_exc()
            return False
        with self.lock:
            self.passed += 1
            dt = time.monotonic() - t0
            print(f"ok   {name}{' (extra)' if extra else ''}{': ' + detail if detail else ''} "
                  f"[{dt:.1f} s]", flush=True)
        return True


def error_shape(status, body, want, what):
    """The response is one of the `want` statuses with OpenAI's error body."""
    text = body.decode("utf-8", "replace")[:300]
    expect(status in want, f"{what}: status {status}, expected {'/'.join(map(str, want))}: {text}")
    try:
        err = json.loads(body)["error"]
    except Exception:
        raise CheckFailed(f"{what}: status {status} but the body is not OpenAI's error shape: {text}")
    expect(isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]
           and isinstance(err.get("type"), str) and "param" in err and "code" in err,
           f"{what}: error body lacks message/type/param/code: {text}")
    return f"{status} {err['message'][:90]}"


class Ctx:
    """What the checks share: the server, clients, and reference outputs."""

    def __init__(self, a, exe, adapters, server, adapter_dir, outside):
        import openai
        self.openai = openai
        self.a, self.exe, self.adapters, self.server = a, exe, adapters, server
        self.adapter_dir, self.outside = adapter_dir, outside
        self.url = server.base
        self.base_id = H.model_id(a.model, a.served_name)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0,
                                    timeout=300)
        self.gen_cache = {}

    def model_for(self, adapter):
        return self.base_id if adapter is None else f"{self.base_id}:{adapter}"

    def generate(self, kind, prompt, adapter=None, max_new=MAX_NEW):
        key = (kind, prompt, adapter, max_new)
        if key not in self.gen_cache:
            self.gen_cache[key] = H.generate(self.exe, self.a.model, prompt, max_new,
                                             chat=(kind == "chat"),
                                             adapter=self.adapters.get(adapter) if adapter else None,
                                             threads=self.a.threads)
        return self.gen_cache[key]

    def greedy(self, kind, prompt, adapter=None, max_new=MAX_NEW, client=None, **kw):
        """(text, response) from the server, greedy."""
        c = client or self.client
        if kind == "chat":
            r = c.chat.completions.create(model=self.model_for(adapter), max_tokens=max_new,
                                          messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kw)
            return r.choices[0].message.content, r
        r = c.completions.create(model=self.model_for(adapter), prompt=prompt, max_tokens=max_new,
                                 temperature=0, **kw)
        return r.choices[0].text, r

    def raw(self, method, path, body=None, headers=None, auth=True, timeout=120):
        h = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
        h.update(headers or {})
        return H.http_request(method, self.url + path, body, h, timeout=timeout)

    def healthy(self):
        """The server still answers: /health 200 and a 2-token completion."""
        expect(self.server.alive(), f"the server exited (status {self.server.proc.returncode})\n"
               f"{self.server.log_tail()}")
        st, _, body = H.http_request("GET", self.url + "/health", timeout=10)
        expect(st == 200, f"after it: /health answered {st}: {body[:200]!r}")
        text, _ = self.greedy("completion", "Hello", max_new=2)
        expect(isinstance(text, str), "after it: a 2-token completion returned no text")


# ---------------------------------------------------------------------------------------------
# The client's happy paths.

def check_models(c):
    ids = [m.id for m in c.client.models.list().data]
    want = [c.base_id] + [c.model_for(n) for n in c.adapters]
    missing = [w for w in want if w not in ids]
    expect(not missing, f"/v1/models lists {ids}, missing {missing}")
    return ", ".join(ids)


def check_models_retrieve(c):
    m = c.client.models.retrieve(c.model_for(next(iter(c.adapters))))
    expect(m.id == c.model_for(next(iter(c.adapters))), f"retrieve gave {m.id}")
    return m.id


def check_chat(c):
    g = c.generate("chat", CHAT_Q)
    text, r = c.greedy("chat", CHAT_Q)
    expect(text == g["text"], f"server {text!r} != ferrotune generate --chat {g['text']!r}")
    expect(r.object == "chat.completion" and r.choices[0].message.role == "assistant",
           f"object {r.object!r}, role {r.choices[0].message.role!r}")
    u = r.usage
    # The server counts the end-of-sequence token it generated (as vLLM and llama.cpp's server
    # do: it cost a decode step); `generate`'s generated_tokens leaves it out.
    want_completion = g["generated_tokens"] + (1 if g["stop_reason"] == "eos" else 0)
    expect(u is not None and u.prompt_tokens == g["prompt_tokens"]
           and u.completion_tokens == want_completion
           and u.total_tokens == u.prompt_tokens + u.completion_tokens,
           f"usage {u} vs generate's prompt_tokens {g['prompt_tokens']}, "
           f"generated_tokens {g['generated_tokens']}")
    want_finish = "length" if g["stop_reason"] == "max_tokens" else "stop"
    expect(r.choices[0].finish_reason == want_finish,
           f"finish_reason {r.choices[0].finish_reason!r}, generate stopped by {g['stop_reason']}")
    return f"{text!r} = generate --chat; usage {u.prompt_tokens}+{u.completion_tokens}"


def collect_chat_stream(stream):
    texts, finishes, usage, roles, nchunks = {}, {}, None, {}, 0
    for ch in stream:
        nchunks += 1
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            d = choice.delta
            if d.role:
                roles[choice.index] = d.role
            if d.content:
                texts[choice.index] = texts.get(choice.index, "") + d.content
            if choice.finish_reason is not None:
                expect(choice.index not in finishes, f"two finish_reasons for choice {choice.index}")
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage, roles, nchunks


def check_chat_stream(c):
    want, r = c.greedy("chat", CHAT_Q)
    s = c.client.chat.completions.create(model=c.base_id, temperature=0, max_tokens=MAX_NEW,
                                         messages=[{"role": "user", "content": CHAT_Q}],
                                         stream=True, stream_options={"include_usage": True})
    texts, finishes, usage, roles, n = collect_chat_stream(s)
    expect(texts.get(0, "") == want, f"streamed {texts.get(0)!r} != non-streamed {want!r}")
    expect(roles.get(0) == "assistant", f"no assistant role delta (roles {roles})")
    expect(finishes.get(0) == r.choices[0].finish_reason,
           f"stream finish_reason {finishes.get(0)!r} != {r.choices[0].finish_reason!r}")
    expect(usage is not None and usage.completion_tokens == r.usage.completion_tokens
           and usage.prompt_tokens == r.usage.prompt_tokens,
           f"include_usage: usage {usage} != non-streamed {r.usage}")
    return f"{n} chunks, text and usage = non-streamed"


def check_stream_raw(c):
    """On the wire: SSE `data:` lines, the usage chunk with empty choices, `data: [DONE]` last."""
    st, hdr, body = c.raw("POST", "/v1/chat/completions",
                          {"model": c.base_id, "messages": [{"role": "user", "content": CHAT_Q}],
                           "max_tokens": 8, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
    expect(st == 200, f"status {st}: {body[:200]!r}")
    expect(hdr.get("content-type", "").startswith("text/event-stream"),
           f"content-type {hdr.get('content-type')!r}")
    events = [l[len("data:"):].strip() for l in body.decode().splitlines() if l.startswith("data:")]
    expect(events and events[-1] == "[DONE]", f"last event {events[-1:]!r}, expected [DONE]")
    last = json.loads(events[-2])
    expect(last.get("choices") == [] and last.get("usage"),
           f"the event before [DONE] should carry usage with empty choices: {events[-2][:200]}")
    return f"{len(events)} events, usage chunk then [DONE]"


def check_completion(c):
    g = c.generate("completion", DATE_PROMPT)
    text, r = c.greedy("completion", DATE_PROMPT)
    expect(text == g["text"], f"server {text!r} != ferrotune generate {g['text']!r}")
    expect(r.object == "text_completion", f"object {r.object!r}")
    expect(r.usage.prompt_tokens == g["prompt_tokens"]
           and r.usage.completion_tokens
           == g["generated_tokens"] + (1 if g["stop_reason"] == "eos" else 0),
           f"usage {r.usage} vs generate's {g['prompt_tokens']}+{g['generated_tokens']}")
    s = c.client.completions.create(model=c.base_id, prompt=DATE_PROMPT, max_tokens=MAX_NEW,
                                    temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    parts, usage = [], None
    for ch in s:
        if ch.usage is not None:
            usage = ch.usage
        for ch_c in ch.choices:
            parts.append(ch_c.text or "")
    expect("".join(parts) == text, f"streamed {''.join(parts)!r} != non-streamed {text!r}")
    expect(usage is not None and usage.completion_tokens == r.usage.completion_tokens,
           f"streamed usage {usage}")
    return f"{text!r} = generate (and streamed)"


def check_greedy_equals_generate(c, adapter):
    rows, differs = [], []
    for kind, prompt in PROBES:
        g = c.generate(kind, prompt, adapter)
        text, r = c.greedy(kind, prompt, adapter)
        expect(text == g["text"], f"{kind} {prompt[:30]!r}: server {text!r} != ferrotune generate"
               f"{' --chat' if kind == 'chat' else ''}{' --adapter ' + adapter if adapter else ''} "
               f"{g['text']!r}")
        expect(r.model in (c.model_for(adapter), c.base_id),
               f"response model {r.model!r}, requested {c.model_for(adapter)!r}")
        if adapter is not None:
            base = c.generate(kind, prompt, None)["text"]
            if base != g["text"]:
                differs.append(prompt[:20])
        rows.append(text)
    if adapter is not None:
        expect(differs, f"adapter {adapter} changes none of the probes' greedy output (through "
               "ferrotune generate either): it cannot show the adapter is applied; pick another")
        return f"{len(PROBES)} probes = generate; differs from base on {len(differs)}"
    return f"{len(PROBES)} probes = generate"


def check_n(c):
    msgs = [{"role": "user", "content": "Tell me a one-line joke."}]
    r = c.client.chat.completions.create(model=c.base_id, messages=msgs, n=3, temperature=1.0,
                                         seed=11, max_tokens=16)
    expect(len(r.choices) == 3 and sorted(ch.index for ch in r.choices) == [0, 1, 2],
           f"{len(r.choices)} choices, indices {[ch.index for ch in r.choices]}")
    texts = [ch.message.content for ch in r.choices]
    expect(len(set(texts)) > 1, f"n=3 sampled at temperature 1 gave 3 identical texts "
           f"(one seed for every choice?): {texts[0]!r}")
    expect(r.usage.completion_tokens >= 3, f"usage {r.usage}")
    again = c.client.chat.completions.create(model=c.base_id, messages=msgs, n=3, temperature=1.0,
                                             seed=11, max_tokens=16)
    expect([ch.message.content for ch in sorted(again.choices, key=lambda x: x.index)]
           == [ch.message.content for ch in sorted(r.choices, key=lambda x: x.index)],
           "n=3 with the same seed gave different choices the second time")
    s = c.client.chat.completions.create(model=c.base_id, messages=msgs, n=3, temperature=1.0,
                                         seed=11, max_tokens=16, stream=True)
    st_texts, finishes, _, _, _ = collect_chat_stream(s)
    want = {ch.index: ch.message.content for ch in r.choices}
    expect(st_texts == {k: v for k, v in want.items() if v} and len(finishes) == 3,
           f"streamed n=3 {st_texts} != non-streamed {want} (finishes {finishes})")
    g, _ = c.greedy("chat", CHAT_Q)
    r2 = c.client.chat.completions.create(model=c.base_id, n=2, temperature=0, max_tokens=MAX_NEW,
                                          messages=[{"role": "user", "content": CHAT_Q}])
    expect([ch.message.content for ch in r2.choices] == [g, g],
           f"n=2 greedy {[ch.message.content for ch in r2.choices]} != 2 x {g!r}")
    return "3 distinct samples, same again with the seed, streamed alike; greedy n=2 = 2 x greedy"


def check_stop(c):
    full, _ = c.greedy("completion", DATE_PROMPT)
    # A stop string inside the greedy text, spanning tokens where possible.
    cands = [full[i:i + 3] for i in range(2, len(full) - 3) if full[i:i + 3].strip()]
    expect(cands, f"the greedy text {full!r} is too short to pick a stop string from")
    stop = cands[len(cands) // 3]
    want = full[:full.index(stop)]
    text, r = c.greedy("completion", DATE_PROMPT, stop=[stop, "\u2603never"])
    expect(text == want and r.choices[0].finish_reason == "stop",
           f"stop {stop!r}: got {text!r} ({r.choices[0].finish_reason}), expected {want!r} (stop)")
    s = c.client.completions.create(model=c.base_id, prompt=DATE_PROMPT, max_tokens=MAX_NEW,
                                    temperature=0, stop=stop, stream=True)
    parts, fin = [], None
    for ch in s:
        for x in ch.choices:
            parts.append(x.text or "")
            fin = x.finish_reason or fin
    expect("".join(parts) == want and fin == "stop",
           f"streamed with stop {stop!r}: {''.join(parts)!r} ({fin}), expected {want!r}")
    ctext, cr = c.greedy("chat", CHAT_Q)
    cstop = ctext.split()[min(2, len(ctext.split()) - 1)] if ctext.split() else None
    if cstop:
        t2, r2 = c.greedy("chat", CHAT_Q, stop=cstop)
        expect(t2 == ctext[:ctext.index(cstop)],
               f"chat stop {cstop!r}: {t2!r}, expected {ctext[:ctext.index(cstop)]!r}")
    return f"stop {stop!r} -> {want!r} (streamed too); chat stop {cstop!r}"


def seeded(c, seed, **kw):
    r = c.client.chat.completions.create(model=c.base_id, temperature=1.0, top_p=0.95, seed=seed,
                                         max_tokens=20, messages=[{"role": "user", "content":
                                                                   "Write a sentence about cats."}],
                                         **kw)
    return r.choices[0].message.content


def check_seed(c):
    a, b = seeded(c, 1234), seeded(c, 1234)
    expect(a == b, f"seed 1234 twice: {a!r} != {b!r}")
    others = [seeded(c, s) for s in (1235, 1236)]
    expect(any(o != a for o in others), f"seeds 1234, 1235, 1236 all gave {a!r}: seed ignored?")
    # Same seed while other sequences share the batch.
    with cf.ThreadPoolExecutor(4) as ex:
        noise = [ex.submit(c.greedy, "chat", "Write a long poem about the sea.", None, 48)
                 for _ in range(3)]
        busy = ex.submit(seeded, c, 1234)
        got = busy.result()
        [f.result() for f in noise]
    expect(got == a, f"seed 1234 with 3 other requests in flight: {got!r} != alone {a!r}")
    return f"{a!r} reproduced (also in a batch); other seeds differ"


def check_logprobs(c):
    text, r = c.greedy("chat", CHAT_Q, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs
    expect(lp is not None and lp.content, f"no logprobs.content: {lp}")
    n = r.usage.completion_tokens
    expect(len(lp.content) in (n, n - 1), f"{len(lp.content)} logprob entries, {n} completion tokens")
    expect("".join(t.token for t in lp.content) == text,
           f"logprob tokens joined {''.join(t.token for t in lp.content)!r} != text {text!r}")
    for i, t in enumerate(lp.content):
        expect(len(t.top_logprobs) == 3, f"token {i}: {len(t.top_logprobs)} top_logprobs, asked 3")
        tops = [x.logprob for x in t.top_logprobs]
        expect(all(x <= 1e-5 for x in tops + [t.logprob]), f"token {i}: a logprob > 0: {tops}")
        expect(tops == sorted(tops, reverse=True), f"token {i}: top_logprobs not best first: {tops}")
        expect(abs(t.logprob - tops[0]) < 1e-3 and t.token == t.top_logprobs[0].token,
               f"token {i}: greedy pick {t.token!r} {t.logprob} is not the best alternative "
               f"{t.top_logprobs[0].token!r} {tops[0]}")
        expect(sum(2.718281828 ** x for x in tops) <= 1.0 + 1e-3, f"token {i}: probabilities > 1")
    ctext, cr = c.greedy("completion", DATE_PROMPT, logprobs=2)
    cl = cr.choices[0].logprobs
    expect(cl is not None and cl.tokens and len(cl.tokens) == len(cl.token_logprobs)
           == len(cl.top_logprobs), f"completions logprobs malformed: {cl}")
    expect("".join(cl.tokens) == ctext, f"completions logprob tokens {cl.tokens} != text {ctext!r}")
    expect(all(len(d) <= 2 and len(d) >= 1 for d in cl.top_logprobs),
           f"completions top_logprobs sizes {[len(d) for d in cl.top_logprobs]}, asked 2")
    if cl.text_offset is not None:
        expect(cl.text_offset[0] == 0 or cl.text_offset[0] == len(DATE_PROMPT),
               f"text_offset starts at {cl.text_offset[0]}")
    return f"{len(lp.content)} chat tokens x top 3, {len(cl.tokens)} completion tokens x top 2"


def check_json_mode(c):
    out = []
    for temp, seed in ((0, None), (1.0, 5), (0.7, 6)):
        kw = {"seed": seed} if seed is not None else {}
        r = c.client.chat.completions.create(
            model=c.base_id, temperature=temp, max_tokens=300,
            messages=[{"role": "user", "content": "Describe a cat as JSON with keys name and color."}],
            response_format={"type": "json_object"}, **kw)
        t = r.choices[0].message.content
        if r.choices[0].finish_reason == "length" and temp > 0:
            # Cut by max_tokens: incomplete, as OpenAI documents; only a finished object counts.
            out.append(f"(cut at 300 tokens: {t[:30]!r})")
            continue
        try:
            v = json.loads(t)
        except ValueError as e:
            raise CheckFailed(f"temperature {temp}: output does not parse ({e}; finish_reason "
                              f"{r.choices[0].finish_reason}): {t!r}")
        expect(isinstance(v, dict), f"temperature {temp}: parsed to {type(v).__name__}, not an object")
        out.append(t)
    return f"greedy {out[0][:60]!r}, sampled parses too"


def check_max_completion_tokens(c):
    r = c.client.chat.completions.create(model=c.base_id, temperature=0, max_completion_tokens=5,
                                         messages=[{"role": "user", "content":
                                                    "Write a long poem about the sea."}])
    expect(r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length",
           f"max_completion_tokens=5: {r.usage.completion_tokens} tokens, "
           f"finish_reason {r.choices[0].finish_reason}")
    r = c.client.completions.create(model=c.base_id, prompt="Once upon a time", max_tokens=3,
                                    temperature=0, extra_body={"some_unknown_field": {"x": 1}},
                                    user="check")
    expect(r.usage.completion_tokens == 3, f"max_tokens=3 with unknown fields: {r.usage}")
    return "5 tokens, finish length; unknown fields ignored"


def check_adapter_per_request(c):
    names = list(c.adapters)
    outs = {None: c.greedy("completion", FRUIT_PROMPT)[0]}
    for n in names:
        outs[n] = c.greedy("completion", FRUIT_PROMPT, n)[0]
    # Interleaved, concurrently: each request gets its own adapter (a mixed batch).
    jobs = [(kind, p, ad) for ad in [None] + names for kind, p in PROBES] * 2
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        futs = [(j, ex.submit(c.greedy, j[0], j[1], j[2])) for j in jobs]
        for (kind, p, ad), f in futs:
            got = f.result()[0]
            want = c.generate(kind, p, ad)["text"]
            expect(got == want, f"concurrent mixed batch: {kind} {p[:25]!r} with "
                   f"{ad or 'base'}: {got!r} != alone / generate {want!r}")
    return (f"{len(jobs)} concurrent requests over base + {names} = their single outputs; "
            + "; ".join(f"{k or 'base'}: {v[:24]!r}" for k, v in outs.items()))


# ---------------------------------------------------------------------------------------------
# Bad input: raw HTTP, each answer checked, the server checked after.

def bad(c, name, method, path, body, want, headers=None, auth=True):
    st, _, resp = c.raw(method, path, body, headers=headers, auth=auth)
    detail = error_shape(st, resp, want, name)
    c.healthy()
    return detail


def bad_input_checks(c, rep):
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    ok = {"model": c.base_id, "messages": msgs, "max_tokens": 2}
    cases = [
        ("malformed JSON", "POST", chat, b'{"model": "x", "messages": [', (400,)),
        ("body not an object", "POST", chat, b'[1, 2]', (400,)),
        ("wrong type: messages a string", "POST", chat, dict(ok, messages="hi"), (400,)),
        ("wrong type: max_tokens a string", "POST", chat, dict(ok, max_tokens="ten"), (400,)),
        ("wrong type: temperature a string", "POST", chat, dict(ok, temperature="hot"), (400,)),
        ("wrong type: stop a number", "POST", chat, dict(ok, stop=5), (400,)),
        ("wrong type: prompt an object", "POST", "/v1/completions",
         {"model": c.base_id, "prompt": {"a": 1}}, (400,)),
        ("out of range: n = 0", "POST", chat, dict(ok, n=0), (400,)),
        ("out of range: temperature -1", "POST", chat, dict(ok, temperature=-1), (400,)),
        ("out of range: top_p 2", "POST", chat, dict(ok, top_p=2), (400,)),
        ("out of range: max_tokens -5", "POST", chat, dict(ok, max_tokens=-5), (400,)),
        ("out of range: top_logprobs 99", "POST", chat, dict(ok, logprobs=True, top_logprobs=99),
         (400,)),
        ("empty messages", "POST", chat, dict(ok, messages=[]), (400,)),
        ("unknown role", "POST", chat, dict(ok, messages=[{"role": "wizard", "content": "x"}]),
         (400,)),
        ("missing model", "POST", chat, {"messages": msgs}, (400,)),
        ("unknown model", "POST", chat, dict(ok, model="gpt-4o"), (404,)),
        ("unknown adapter", "POST", chat, dict(ok, model=c.base_id + ":no-such-adapter"), (404,)),
        ("unknown adapter (completions)", "POST", "/v1/completions",
         {"model": c.base_id + ":../x", "prompt": "hi"}, (404,)),
        ("unsupported response_format", "POST", chat,
         dict(ok, response_format={"type": "xml"}), (400,)),
        ("prompt over the context (completions)", "POST", "/v1/completions",
         {"model": c.base_id, "prompt": "hello " * 40000, "max_tokens": 2}, (400,)),
        ("prompt over the context (chat)", "POST", chat,
         dict(ok, messages=[{"role": "user", "content": "hello " * 40000}]), (400,)),
        ("unknown route", "GET", "/v1/nothing", None, (404,)),
    ]
    for name, method, path, body, want in cases:
        rep.check(f"bad input: {name} -> {'/'.join(map(str, want))}",
                  lambda m=method, p=path, b=body, w=want, n=name: bad(c, n, m, p, b, w))

    def no_key():
        st, _, body = c.raw("POST", chat, ok, auth=False)
        d = error_shape(st, body, (401,), "no Authorization header")
        st, _, body = c.raw("POST", chat, ok, auth=False, headers={"Authorization": "Bearer nope"})
        error_shape(st, body, (401,), "wrong key")
        st, _, body = c.raw("POST", chat, ok, auth=False,
                            headers={"Authorization": f"Basic {API_KEY}"})
        error_shape(st, body, (401,), "not a Bearer key")
        st, _, body = c.raw("GET", "/v1/models", None, auth=False)
        error_shape(st, body, (401,), "/v1/models without a key")
        wrong = c.openai.OpenAI(base_url=c.url + "/v1", api_key="sk-wrong", max_retries=0)
        try:
            wrong.chat.completions.create(model=c.base_id, messages=msgs, max_tokens=2)
            raise CheckFailed("the openai client with a wrong key got an answer")
        except c.openai.AuthenticationError:
            pass
        c.healthy()
        return d
    rep.check("bad input: missing / wrong / non-Bearer API key -> 401 (client: AuthenticationError)",
              no_key)

    def oversize():
        limit = c.a.max_body
        n = (limit or 0) + (1 << 20) if limit else 64 << 20
        st, resp = H.send_oversize(c.url, "/v1/completions", n,
                                   {"Authorization": f"Bearer {API_KEY}"})
        body = resp.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in resp else b""
        expect(st is not None, f"a {n}-byte body: no HTTP answer (connection dropped): {resp[:200]!r}")
        if b"transfer-encoding: chunked" in resp.lower()[:resp.find(b"\r\n\r\n")]:
            body = b"".join(body.split(b"\r\n")[1::2])
        d = error_shape(st, body, (413,), f"a {n}-byte body")
        c.healthy()
        return f"{n} bytes: {d}"
    rep.check("bad input: oversize body -> 413", oversize)

    def openai_errors():
        try:
            c.client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
            raise CheckFailed("an unknown model got an answer")
        except c.openai.NotFoundError:
            pass
        try:
            c.client.chat.completions.create(model=c.base_id, messages=msgs, max_tokens=2,
                                             temperature=-3)
            raise CheckFailed("temperature -3 got an answer")
        except c.openai.BadRequestError:
            pass
        return "NotFoundError, BadRequestError"
    rep.check("bad input through the client: its usual exception types", openai_errors)


def adapter_dir_checks(c, rep):
    inside_name = "inside-copy"
    first = next(iter(c.adapters))

    def load(path, name="x"):
        return c.raw("POST", "/v1/adapters", {"name": name, "path": path})

    def outside(kind, path):
        st, _, body = load(path)
        d = error_shape(st, body, (400, 403), f"adapter path {kind} {path!r}")
        ids = [m.id for m in c.client.models.list().data]
        expect(c.model_for("x") not in ids, f"{c.model_for('x')} got listed anyway")
        c.healthy()
        return d

    rel_out = os.path.relpath(c.outside, c.adapter_dir)
    rep.check("adapter dir: ../ path outside -> 403/400", lambda: outside("../", rel_out))
    rep.check("adapter dir: absolute path outside -> 403/400", lambda: outside("absolute", c.outside))
    rep.check("adapter dir: symlink pointing outside -> 403/400",
              lambda: outside("symlink", "link-out"))
    rep.check("adapter dir: inside/../../ path -> 403/400",
              lambda: outside("inside/../..", os.path.join(inside_name, "..", rel_out)))

    def missing():
        st, _, body = load("no-such-folder")
        d = error_shape(st, body, (400, 404), "an adapter folder that does not exist")
        st, _, body = c.raw("POST", "/v1/adapters", {"name": "x"})
        error_shape(st, body, (400,), "no path")
        st, _, body = c.raw("POST", "/v1/adapters", {"name": 5, "path": inside_name})
        error_shape(st, body, (400,), "name a number")
        c.healthy()
        return d
    rep.check("adapter dir: missing folder / fields -> 4xx", missing)

    def roundtrip():
        st, _, body = load(inside_name, "rt")
        expect(st in (200, 201), f"loading {inside_name} (inside --adapter-dir): {st} {body[:300]!r}")
        ids = [m.id for m in c.client.models.list().data]
        expect(c.model_for("rt") in ids, f"{c.model_for('rt')} not in /v1/models {ids}")
        want = c.greedy("completion", DATE_PROMPT, first)[0]
        got = c.greedy("completion", DATE_PROMPT, "rt")[0]
        expect(got == want, f"runtime-loaded copy of {first}: {got!r} != {want!r}")
        st, _, body = load(inside_name, "rt")
        error_shape(st, body, (409, 400), "loading the same name twice")
        st, _, body = c.raw("DELETE", "/v1/adapters/rt")
        expect(st in (200, 204), f"DELETE /v1/adapters/rt: {st} {body[:200]!r}")
        st, _, body = c.raw("POST", "/v1/completions",
                            {"model": c.model_for("rt"), "prompt": "hi", "max_tokens": 2})
        error_shape(st, body, (404,), "the unloaded adapter")
        st, _, body = c.raw("DELETE", "/v1/adapters/rt")
        error_shape(st, body, (404,), "DELETE of an unloaded adapter")
        c.healthy()
        return "load 200, listed, = the same adapter from --adapter, 409 twice, DELETE, then 404"
    rep.check("adapter dir: runtime load inside, use, unload", roundtrip)


# ---------------------------------------------------------------------------------------------
# Streams: a client killed mid-stream, SIGTERM.

KILLED_CLIENT = r"""
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
s = c.chat.completions.create(model=sys.argv[3], max_tokens=400, temperature=0, stream=True,
                              messages=[{"role": "user", "content": "Write a long story about a dragon."}])
n = 0
for ch in s:
    if ch.choices and ch.choices[0].delta.content:
        n += 1
        if n == 3:
            print("streaming", flush=True)
"""


def metric(c, name):
    st, _, body = c.raw("GET", "/metrics")
    if st != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.split()[-1])
            except ValueError:
                return None
    return None


def check_killed_client(c):
    prompt = "Write a long poem about the sea."
    want = c.greedy("chat", prompt, None, 64)[0]
    procs = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, c.url + "/v1", API_KEY,
                               c.model_for(ad)], stdout=subprocess.PIPE, text=True)
             for ad in [None] + list(c.adapters)[:1]]
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            other = ex.submit(c.greedy, "chat", prompt, None, 64)
            for p in procs:
                line = p.stdout.readline()
                expect(line.strip() == "streaming", f"the doomed client did not start: {line!r}")
            for p in procs:
                p.send_signal(signal.SIGKILL)
            got = other.result()[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    expect(got == want, f"a stream next to the killed clients: {got!r} != alone {want!r}")
    # The killed sequences must be cancelled, not decoded to 400 tokens.
    deadline = time.monotonic() + 10
    active = None
    while time.monotonic() < deadline:
        active = metric(c, "ferrotune_active_sequences")
        if active is None or active == 0:
            break
        time.sleep(0.2)
    expect(active in (None, 0.0), f"{active} sequences still active 10 s after their clients died")
    c.healthy()
    return (f"2 clients SIGKILLed mid-stream; the concurrent stream = alone; active sequences after: "
            f"{'unknown (no ferrotune_active_sequences metric)' if active is None else int(active)}")


def check_metrics(c):
    st, hdr, body = c.raw("GET", "/metrics")
    expect(st == 200, f"/metrics: {st}")
    text = body.decode(errors="replace")
    names = sorted({l.split()[0].split("{")[0] for l in text.splitlines()
                    if l and not l.startswith("#")})
    expect(len(names) >= 4, f"/metrics has {len(names)} series: {text[:300]!r}")
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")


def check_queue_full(exe, a, adapters, workdir):
    """A second server with one slot and a queue of one: extra requests get 429 + Retry-After."""
    port = H.free_port()
    srv = H.Server("ferrotune serve (1 slot)", [exe, "serve", "--model", a.model, "--port", str(port),
                                                "--host", "127.0.0.1", "--max-concurrent", "1",
                                                "--max-queue", "1"] + thread_args(a),
                   port, os.path.join(workdir, "serve-429.log"))
    try:
        def one(_):
            return H.http_request("POST", srv.base + "/v1/completions",
                                  {"model": H.model_id(a.model, a.served_name),
                                   "prompt": "Once upon a time", "max_tokens": 48,
                                   "temperature": 0}, timeout=120)
        with cf.ThreadPoolExecutor(6) as ex:
            res = list(ex.map(one, range(6)))
        codes = [r[0] for r in res]
        expect(200 in codes and 429 in codes, f"6 requests at once on 1 slot + 1 queued: {codes}")
        for st, hdr, body in res:
            if st == 429:
                error_shape(st, body, (429,), "queue full")
                expect("retry-after" in hdr, "429 without Retry-After")
        return f"statuses {codes}"
    finally:
        srv.terminate()


def check_sigterm(c):
    """SIGTERM: the in-flight stream finishes ([DONE]), new requests are refused, exit 0."""
    result = {}

    def stream():
        st, _, body = c.raw("POST", "/v1/chat/completions",
                            {"model": c.base_id, "max_tokens": 48, "temperature": 0, "stream": True,
                             "messages": [{"role": "user", "content": "Write a poem."}]}, timeout=120)
        result["status"], result["body"] = st, body
    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    c.server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = None
    try:
        st, _, body = H.http_request("POST", c.url + "/v1/completions",
                                     {"model": c.base_id, "prompt": "hi", "max_tokens": 2},
                                     {"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        refused = st
    except OSError as e:
        refused = f"connection refused ({type(e).__name__})"
    t.join(120)
    try:
        rc = c.server.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise CheckFailed("the server did not exit within 60 s of SIGTERM")
    expect(result.get("status") == 200 and result["body"].rstrip().endswith(b"data: [DONE]"),
           f"the in-flight stream after SIGTERM: status {result.get('status')}, ends "
           f"{result.get('body', b'')[-120:]!r}")
    expect(refused != 200, "a new request after SIGTERM was served")
    expect(rc == 0, f"exit status {rc} after SIGTERM")
    return f"in-flight stream finished with [DONE]; a new request: {refused}; exit 0"


def thread_args(a):
    return ["--threads", str(a.threads)] if a.threads else []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=H.DEFAULT_GGUF)
    ap.add_argument("--adapter", action="append", metavar="NAME=DIR",
                    help="serve this adapter (repeatable); default: the two demo adapters")
    ap.add_argument("--bin", help="ferrotune binary (default: $FERROTUNE_BIN, target/release/ferrotune)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--served-name", default=None)
    ap.add_argument("--workdir", default=H.DEFAULT_WORKDIR,
                    help="demo adapters and server logs (default runs/serve-check)")
    ap.add_argument("--max-body", type=int, default=1 << 20,
                    help="--max-body for the server (bytes; 0: leave the server's default)")
    ap.add_argument("--serve-args", default="", help="more `ferrotune serve` arguments")
    ap.add_argument("--skip-extra", action="store_true", help="skip the extra (WARN-only) checks")
    a = ap.parse_args()
    try:
        import openai
    except ImportError:
        sys.exit("the openai client is not installed in this Python: run scripts/setup-reference.sh "
                 "and use .venv/bin/python")
    exe = H.ferrotune_bin(a.bin)
    if not os.path.exists(a.model):
        sys.exit(f"{a.model}: no such model (scripts/fetch-models.sh fetches the default)")
    os.makedirs(a.workdir, exist_ok=True)
    help_text = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True)
    if help_text.returncode != 0:
        sys.exit(f"{exe} has no `serve` command: {help_text.stderr.strip()[:200]}")
    if "--max-body" not in help_text.stdout:
        a.max_body = 0
    adapters = H.parse_adapter_args(a.adapter) or H.demo_adapters(exe, a.model, a.workdir)

    # --adapter-dir with a copy of the first adapter inside; outside it, another copy, reached
    # by ../, by its absolute path, and by a symlink inside that points out.
    tmp = tempfile.mkdtemp(prefix="serve-check-", dir=a.workdir)
    adapter_dir = os.path.join(tmp, "adapters")
    outside = os.path.join(tmp, "outside")
    first = adapters[next(iter(adapters))]
    for d in (os.path.join(adapter_dir, "inside-copy"), outside):
        os.makedirs(d)
        for f in os.listdir(first):
            with open(os.path.join(first, f), "rb") as src, open(os.path.join(d, f), "wb") as dst:
                dst.write(src.read())
    os.symlink(outside, os.path.join(adapter_dir, "link-out"))

    port = H.free_port()
    cmd = [exe, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", str(port),
           "--api-key", API_KEY, "--adapter-dir", adapter_dir] + thread_args(a)
    for name, d in adapters.items():
        cmd += ["--adapter", f"{name}={d}"]
    if a.served_name:
        cmd += ["--served-name", a.served_name]
    if a.max_body:
        cmd += ["--max-body", str(a.max_body)]
    cmd += shlex.split(a.serve_args)
    print(H.cpu_line())
    print(f"openai {openai.__version__}; server: {' '.join(cmd)}", flush=True)
    server = H.Server("ferrotune serve", cmd, port, os.path.join(a.workdir, "serve-check.log"))
    c = Ctx(a, exe, adapters, server, adapter_dir, outside)
    rep = Report()
    try:
        rep.check(f"models: {c.base_id} and base:NAME for {list(adapters)}", lambda: check_models(c))
        rep.check("chat, not streamed, greedy = ferrotune generate --chat", lambda: check_chat(c))
        rep.check("chat, streamed (include_usage)", lambda: check_chat_stream(c))
        rep.check("chat stream on the wire: SSE, usage chunk, [DONE]", lambda: check_stream_raw(c))
        rep.check("completions (and streamed), greedy = ferrotune generate", lambda: check_completion(c))
        rep.check("base: greedy = ferrotune generate on every probe",
                  lambda: check_greedy_equals_generate(c, None))
        for name in adapters:
            rep.check(f"adapter {name} per request: greedy = ferrotune generate --adapter",
                      lambda n=name: check_greedy_equals_generate(c, n))
        rep.check("adapters per request, concurrent mixed batch = single outputs",
                  lambda: check_adapter_per_request(c))
        rep.check("n > 1 (sampled, seeded, streamed; greedy)", lambda: check_n(c))
        rep.check("stop (non-streamed, streamed, chat)", lambda: check_stop(c))
        rep.check("seed reproducibility", lambda: check_seed(c))
        rep.check("logprobs (chat top_logprobs, completions logprobs)", lambda: check_logprobs(c))
        rep.check("response_format json_object parses", lambda: check_json_mode(c))
        rep.check("max_completion_tokens, unknown fields ignored", lambda: check_max_completion_tokens(c))
        bad_input_checks(c, rep)
        adapter_dir_checks(c, rep)
        rep.check("a client killed mid-stream leaves the others unaffected",
                  lambda: check_killed_client(c))
        if not a.skip_extra:
            rep.check("models.retrieve", lambda: check_models_retrieve(c), extra=True)
            rep.check("/metrics (Prometheus text)", lambda: check_metrics(c), extra=True)
            if "--max-queue" in help_text.stdout:
                rep.check("429 with Retry-After when the queue is full",
                          lambda: check_queue_full(exe, a, adapters, a.workdir), extra=True)
            rep.check("SIGTERM: in-flight finishes, new refused, exit 0",
                      lambda: check_sigterm(c), extra=True)
    finally:
        if server.alive():
            server.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{rep.passed} passed, {len(rep.failed)} failed, {len(rep.warned)} extra warned; "
          f"server log: {os.path.relpath(server.log_path, H.ROOT)}")
    if rep.failed:
        print("failed: " + "; ".join(rep.failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
