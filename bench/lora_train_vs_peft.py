#!/usr/bin/env python3
"""LoRA training tokens/s and peak RSS: ferrotune vs PyTorch + PEFT, same model, data, batch,
sequence length, rank, targets and thread count, in one run; prints the ratios.

    /work/cache/venv/bin/python bench/lora_train_vs_peft.py [--shapes 4x256,1x1024] [--steps 6]
        [--rank 8] [--targets q_proj,v_proj] [--threads 2] [--rows peft,f32,q4_1]

The model is SmolLM2-135M-Instruct from the shipped Q4_1 GGUF. PyTorch loads it through
transformers (`scripts/convert-smollm2-hf.sh` dequantizes it to an f32 HF folder once, so the
GGUF dequantization spike is not counted in the peer's RSS). ferrotune trains twice: on the same
f32 weights (`train.dequantize = true`), and on the Q4_1 base kept quantized (QLoRA-style).

Data: DialogSum training rows under the summarization template, each row's prompt made of
consecutive dialogues and truncated from the start so that every example is exactly L tokens
(prompt + " summary" + EOS): no padding on either side, and the loss covers the summary tokens
only (labels -100 on the prompt, as TRL's completion-only collator does).

Each side runs in its own process; peak RSS is that process's high-water mark (VmHWM) and
includes loading. Time per step is the median over steps after the first (warm-up). It needs
torch, transformers, peft and a release build (`cargo build --release`).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, ".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
HF_DIR = os.path.join(ROOT, ".cache/models/smollm2-hf")
DIALOGSUM = os.path.join(ROOT, "../shared/data/dialogsum/dialogsum.train.jsonl")
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
COMPLETION = " {summary}"


def vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_rows(tok, seq_len, n_rows, path):
    """Rows whose rendered prompt is longer than seq_len tokens, so truncating the prompt start
    yields exactly seq_len tokens."""
    src = [json.loads(l) for l in open(DIALOGSUM)]
    rows, i = [], 0
    while len(rows) < n_rows:
        parts, summary = [], None
        while True:
            r = src[i % len(src)]
            i += 1
            parts.append(r["dialogue"])
            summary = r["summary"]
            prompt = TEMPLATE.format(dialogue="\n".join(parts))
            if len(tok(prompt + COMPLETION.format(summary=summary))["input_ids"]) > seq_len + 8:
                break
        rows.append({"dialogue": "\n".join(parts), "summary": summary})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def peer_worker(a):
    """PyTorch + PEFT: the same loop as a Trainer step (forward with labels, backward, AdamW)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules=a.targets.split(","), task_type="CAUSAL_LM"))
    model.train()
    rows = [json.loads(l) for l in open(a.data)]
    ids, labels = [], []
    for r in rows:
        p = tok(TEMPLATE.format(dialogue=r["dialogue"]))["input_ids"]
        c = tok(COMPLETION.format(summary=r["summary"]))["input_ids"] + [tok.eos_token_id]
        p = p[len(p) - (a.seq_len - len(c)):]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times, tokens = [], 0
    for step in range(a.steps):
        lo = (step * a.batch) % len(rows)
        x = torch.tensor(ids[lo:lo + a.batch])
        y = torch.tensor(labels[lo:lo + a.batch])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        tokens = x.numel()
    print(json.dumps({"step_s": times, "tokens_per_step": tokens, "peak_rss_bytes": vm_hwm_bytes()}))


def run_peer(a, data, batch, seq_len):
    out = subprocess.run([sys.executable, __file__, "--peer-worker", "--data", data, "--batch", str(batch),
                          "--seq-len", str(seq_len), "--steps", str(a.steps), "--rank", str(a.rank),
                          "--targets", a.targets, "--threads", str(a.threads)],
                         check=True, capture_output=True, text=True)
    v = json.loads(out.stdout.strip().splitlines()[-1])
    return v["step_s"], v["tokens_per_step"], v["peak_rss_bytes"]


def run_ferrotune(a, data, batch, seq_len, dequantize, work):
    exe = os.path.join(ROOT, "target/release/ferrotune")
    out_dir = os.path.join(work, f"ft-{batch}x{seq_len}-{'f32' if dequantize else 'q'}")
    cfg = os.path.join(work, "bench.toml")
    targets = ", ".join(f'"{t}"' for t in a.targets.split(","))
    with open(cfg, "w") as f:
        f.write(f'''model = "{GGUF}"
method = "lora"
output_dir = "{out_dir}"
[data]
train = "{data}"
template = {json.dumps(TEMPLATE)}
completion = {json.dumps(COMPLETION)}
length_policy = "truncate_prompt_start"
[lora]
r = {a.rank}
alpha = {2 * a.rank}
dropout = 0.0
targets = [{targets}]
[train]
batch_size = {batch}
max_steps = {a.steps}
max_seq_len = {seq_len}
lr = 2e-4
lr_schedule = "constant"
log_every = 1
threads = {a.threads}
dequantize = {"true" if dequantize else "false"}
seed = 0
''')
    r = subprocess.run([exe, "train", "--config", cfg] + sum((["--set", s] for s in a.ft_set), []),
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ferrotune train failed:\n{r.stderr}")
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("memory estimate"):
            print(f"    ({'f32' if dequantize else 'q4_1'} {batch}x{seq_len}) {line}", flush=True)
    steps = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    steps = [s for s in steps if s.get("type") == "train"]
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    times, prev, breakdown = [], 0.0, []
    for s in steps:
        times.append(s["step_s"] if "step_s" in s else s["elapsed_s"] - prev)
        if "forward_s" in s:
            breakdown.append((s["forward_s"], s["backward_s"], s["optimizer_s"]))
        prev = s["elapsed_s"]
    toks = steps[-1]["tokens"]
    if len(breakdown) > 1:
        f, b, o = (statistics.median(x[i] for x in breakdown[1:]) for i in range(3))
        print(f"    ({'f32' if dequantize else 'q4_1'} {batch}x{seq_len}) s/step: forward {f:.2f}, "
              f"backward {b:.2f}, optimizer {o:.3f}", flush=True)
    return times, toks, summary["peak_rss_bytes"], steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4x256,1x1024")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="peft,f32,q4_1")
    ap.add_argument("--ft-set", action="append", default=[], help="extra --set for ferrotune train")
    ap.add_argument("--peer-worker", action="store_true")
    ap.add_argument("--data"), ap.add_argument("--batch", type=int), ap.add_argument("--seq-len", type=int)
    a = ap.parse_args()
    if a.peer_worker:
        return peer_worker(a)
    if not os.path.exists(os.path.join(HF_DIR, ".complete")):
        subprocess.run([os.path.join(ROOT, "scripts/convert-smollm2-hf.sh")], check=True)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    work = tempfile.mkdtemp(prefix="ferrotune-bench-")
    rows = a.rows.split(",")
    print(f"LoRA r={a.rank} on {a.targets}, {a.threads} threads, {a.steps} steps (median s/step after the first)")
    print(f"{'shape':>8} {'engine':<22} {'s/step':>8} {'tok/s':>8} {'peak RSS':>10} {'speed':>7} {'RSS':>6}")
    for shape in a.shapes.split(","):
        batch, seq_len = (int(x) for x in shape.split("x"))
        data = os.path.join(work, f"rows-{seq_len}.jsonl")
        make_rows(tok, seq_len, batch * a.steps, data)
        results = []
        if "peft" in rows:
            results.append(("PyTorch+PEFT f32",) + run_peer(a, data, batch, seq_len))
        if "f32" in rows:
            results.append(("ferrotune f32",) + run_ferrotune(a, data, batch, seq_len, True, work)[:3])
        if "q4_1" in rows:
            results.append(("ferrotune Q4_1 (QLoRA)",) + run_ferrotune(a, data, batch, seq_len, False, work)[:3])
        base = None
        for name, times, toks, rss in results:
            s = statistics.median(times[1:] if len(times) > 1 else times)
            tps = toks / s
            if base is None:
                base = (tps, rss)
            print(f"{shape:>8} {name:<22} {s:8.2f} {tps:8.1f} {rss / 1e9:8.2f}GB "
                  f"{tps / base[0]:6.2f}x {rss / base[1]:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
