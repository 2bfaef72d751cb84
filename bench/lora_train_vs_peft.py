#!/usr/bin/env python3
"""LoRA training tokens/s and peak RSS: ferrotune vs PyTorch + PEFT, same model, data, batch,
sequence length, rank, targets and thread count, in one run; prints the ratios, then the rows of
the README tables ("Speed and memory vs PyTorch + PEFT", and the memory estimate against the
measured peak) in their markdown format.

    scripts/bench.sh train [flags]        # the README tables: builds, fetches, prints the CPU
    .venv/bin/python bench/lora_train_vs_peft.py [--shapes 4x256,1x1024] [--steps 6]
        [--rank 8] [--targets q_proj,v_proj] [--threads 2] [--rows peft,f32,q4_1,q4_1_ckpt]
        [--isa native|avx2] [--ft-set key=value ...] [--rounds 1]

Rows: `peft` PyTorch + PEFT on the f32 weights; `f32` ferrotune on the same f32 weights
(`train.dequantize = true`); `q4_1` ferrotune on the Q4_1 base kept quantized (QLoRA-style);
`q4_1_ckpt` the same with `train.gradient_checkpointing = true`; `nf4` ferrotune on the f32 HF
folder with `train.base_quant = "nf4"` (QLoRA: bitsandbytes' NF4 with double quantization,
quantized at load); `nf4_ckpt` the same with checkpointing. Ratios are against the PyTorch + PEFT
row of the same shape (the first row when `peft` is not run).

`--isa avx2` measures what an AVX2-only CPU runs, on an AVX-512 machine: ferrotune built without
its `avx512` feature (`cargo build --release -p ferrotune-cli --no-default-features
--target-dir target/avx2`: gemm's AVX2 microkernels only) with `FERROTUNE_QUANT_ISA=avx2` (our
quantized kernels' AVX2 level), and PyTorch with `ATEN_CPU_CAPABILITY=avx2`,
`MKL_ENABLE_INSTRUCTIONS=AVX2` and `ONEDNN_MAX_CPU_ISA=AVX2` (its vectorized kernels, MKL's
GEMM and oneDNN capped at AVX2). The header prints the CPU and the level each side runs at.

The model is SmolLM2-135M-Instruct from the shipped Q4_1 GGUF. PyTorch loads it through
transformers (`scripts/convert-smollm2-hf.sh`, run here when needed, dequantizes it to an f32 HF
folder once, so the GGUF dequantization spike is not counted in the peer's RSS).

Data: DialogSum training rows under the summarization template, each row's prompt made of
consecutive dialogues and truncated from the start so that every example is exactly L tokens
(prompt + " summary" + EOS): no padding on either side, and the loss covers the summary tokens
only (labels -100 on the prompt, as TRL's completion-only collator does). DialogSum is read from
data/dialogsum in $FERROTUNE_SHARED_DIR, default the `../shared` beside the repository.

Each side runs in its own process; peak RSS is that process's high-water mark (VmHWM) and
includes loading. Time per step is the median over steps after the first (warm-up). With
`--rounds N` every engine runs N times, interleaved (peft, q4_1, nf4, peft, q4_1, ...): on a
shared host whose speed drifts by 10-20% within minutes, the ratio of runs minutes apart is
steadier than that of runs far apart; the speed printed is the median of the rounds' ratios, with
their range, the s/step the median of the rounds' medians and the RSS the highest. It needs the
reference environment (`scripts/setup-reference.sh`: torch, transformers, peft), the model
(`scripts/fetch-models.sh`) and a release build (`cargo build --release`); `scripts/bench.sh
train` does the last two.
"""
import argparse, atexit, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FERROTUNE_CACHE", os.path.join(ROOT, ".cache"))
GGUF = os.path.join(CACHE, "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
HF_DIR = os.path.join(CACHE, "models/smollm2-hf")
SHARED = os.environ.get("FERROTUNE_SHARED_DIR", os.path.join(ROOT, "../shared"))
DIALOGSUM = os.path.join(SHARED, "data/dialogsum/dialogsum.train.jsonl")
# --rows name -> (README engine label, ferrotune dequantize?, extra --set for ferrotune train)
ENGINES = {
    "peft": ("PyTorch + PEFT, f32", None, []),
    "f32": ("ferrotune, same f32 weights", True, []),
    "q4_1": ("**ferrotune, Q4_1 base (QLoRA)**", False, []),
    "q4_1_ckpt": ("ferrotune, Q4_1, `gradient_checkpointing`", False,
                  ["train.gradient_checkpointing=true"]),
    "nf4": ("**ferrotune, NF4 base (QLoRA)**", None, ["train.base_quant=nf4"]),
    "nf4_ckpt": ("ferrotune, NF4, `gradient_checkpointing`", None,
                 ["train.base_quant=nf4", "train.gradient_checkpointing=true"]),
}
# Environment that caps each side at AVX2 (--isa avx2).
AVX2_ENV_FERROTUNE = {"FERROTUNE_QUANT_ISA": "avx2"}
AVX2_ENV_TORCH = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                  "ONEDNN_MAX_CPU_ISA": "AVX2"}
# README memory-estimate table labels of the ferrotune rows.
ESTIMATE_LABELS = {"f32": "f32", "q4_1": "Q4_1", "q4_1_ckpt": "Q4_1, {shape}, checkpointing",
                   "nf4": "NF4", "nf4_ckpt": "NF4, {shape}, checkpointing"}
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
    if a.report_isa:
        print(json.dumps({"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}))
        return
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
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


def peer_env(a):
    return dict(os.environ, **(AVX2_ENV_TORCH if a.isa == "avx2" else {}))


def run_peer(a, data, batch, seq_len):
    out = subprocess.run([sys.executable, __file__, "--peer-worker", "--data", data, "--batch", str(batch),
                          "--seq-len", str(seq_len), "--steps", str(a.steps), "--rank", str(a.rank),
                          "--targets", a.targets, "--threads", str(a.threads)],
                         check=True, capture_output=True, text=True, env=peer_env(a))
    v = json.loads(out.stdout.strip().splitlines()[-1])
    return v["step_s"], v["tokens_per_step"], v["peak_rss_bytes"]


def human_bytes(b):
    """README style: 1.72 GB, 480 MB."""
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"


def parse_human_bytes(text):
    """ferrotune's human_bytes ("1.77 GB", "496.3 MB", "12.0 kB", "5 B") -> bytes."""
    value, unit = text.split()
    return float(value) * {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1}[unit]


def ferrotune_exe(a):
    if a.isa == "avx2":
        exe = os.path.join(ROOT, "target/avx2/release/ferrotune")
        how = ("cargo build --release -p ferrotune-cli --no-default-features "
               "--target-dir target/avx2")
    else:
        exe = os.path.join(ROOT, "target/release/ferrotune")
        how = "cargo build --release (scripts/bench.sh train does)"
    if not os.path.exists(exe):
        sys.exit(f"{exe} missing: run {how}")
    return exe


def run_ferrotune(a, data, batch, seq_len, row, work):
    exe = ferrotune_exe(a)
    _, dequantize, row_set = ENGINES[row]
    # the NF4 rows quantize the f32 HF folder at load; the others run the shipped Q4_1 GGUF
    model = HF_DIR if dequantize is None else GGUF
    out_dir = os.path.join(work, f"ft-{batch}x{seq_len}-{row}")
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier round's run: start afresh
    cfg = os.path.join(work, "bench.toml")
    targets = ", ".join(f'"{t}"' for t in a.targets.split(","))
    with open(cfg, "w") as f:
        f.write(f'''model = {json.dumps(model)}
method = "lora"
output_dir = {json.dumps(out_dir)}
[data]
train = {json.dumps(data)}
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
    sets = row_set + a.ft_set
    env = dict(os.environ, **(AVX2_ENV_FERROTUNE if a.isa == "avx2" else {}))
    r = subprocess.run([exe, "train", "--config", cfg] + sum((["--set", s] for s in sets), []),
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"ferrotune train failed:\n{r.stderr}")
    estimate = None
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("memory estimate"):
            print(f"    ({row} {batch}x{seq_len}) {line}", flush=True)
            estimate = parse_human_bytes(line.rsplit("=", 1)[1].strip())
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
        print(f"    ({row} {batch}x{seq_len}) s/step: forward {f:.2f}, "
              f"backward {b:.2f}, optimizer {o:.3f}", flush=True)
    return times, toks, summary["peak_rss_bytes"], estimate


def cpu_header(a):
    """The CPU, its SIMD levels, and the level each side runs at."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu_level = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "SSE")
    out = subprocess.run([sys.executable, __file__, "--peer-worker", "--report-isa"],
                         capture_output=True, text=True, env=peer_env(a))
    try:
        torch_level = json.loads(out.stdout.strip().splitlines()[-1])["torch_cpu_capability"]
    except (ValueError, IndexError, KeyError):
        torch_level = "unknown"
    ft_level = "AVX2 (no avx512 feature, FERROTUNE_QUANT_ISA=avx2)" if a.isa == "avx2" else \
        f"{cpu_level} (native)"
    return (f"CPU: {model}, {os.cpu_count()} logical cores, {cpu_level}"
            f"{' + VNNI' if 'avx512_vnni' in flags else ''}; ferrotune runs at {ft_level}; "
            f"PyTorch at {torch_level}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4x256,1x1024")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, interleaved; speed = median ratio")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="peft,f32,q4_1",
                    help=f"engines to run, of {','.join(ENGINES)}")
    ap.add_argument("--ft-set", action="append", default=[], help="extra --set for ferrotune train")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: run both sides at AVX2 on an AVX-512 machine (see the docstring)")
    ap.add_argument("--peer-worker", action="store_true")
    ap.add_argument("--report-isa", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data"), ap.add_argument("--batch", type=int), ap.add_argument("--seq-len", type=int)
    a = ap.parse_args()
    if a.peer_worker:
        return peer_worker(a)
    rows = a.rows.split(",")
    unknown = [r for r in rows if r not in ENGINES]
    if unknown:
        sys.exit(f"--rows: unknown {unknown} (expected some of {','.join(ENGINES)})")
    if a.steps < 1:
        sys.exit("--steps must be at least 1")
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    for path, how in [(GGUF, "run scripts/fetch-models.sh"),
                      (DIALOGSUM, "put ../shared beside the repository or set FERROTUNE_SHARED_DIR")]:
        if not os.path.isfile(path):
            sys.exit(f"{path}: not found ({how})")
    if not os.path.exists(os.path.join(HF_DIR, ".complete")):
        env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
        # Its report goes to stderr, so that stdout holds only this script's results.
        subprocess.run([os.path.join(ROOT, "scripts/convert-smollm2-hf.sh")], check=True, env=env,
                       stdout=sys.stderr)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    work = tempfile.mkdtemp(prefix="ferrotune-bench-")
    # the rows and the runs (15-30 MB) go when the script ends, however it ends
    atexit.register(shutil.rmtree, work, True)
    print(cpu_header(a))
    print(f"LoRA r={a.rank} on {a.targets}, {a.threads} threads, {a.steps} steps (median s/step after the first)"
          + (f", {a.rounds} interleaved rounds (speed: the median of the rounds' ratios)" if a.rounds > 1 else ""))
    print(f"{'shape':>8} {'engine':<22} {'s/step':>8} {'tok/s':>8} {'peak RSS':>10} {'speed':>7} {'RSS':>6}")
    table, estimates = [], []
    for shape in a.shapes.split(","):
        try:
            batch, seq_len = (int(x) for x in shape.split("x"))
        except ValueError:
            sys.exit(f"--shapes: `{shape}` is not BATCHxLENGTH (e.g. 4x256)")
        data = os.path.join(work, f"rows-{seq_len}.jsonl")
        make_rows(tok, seq_len, batch * a.steps, data)
        # Rounds: every engine once per round, in the same order, so an engine and PyTorch +
        # PEFT run minutes apart and a slow spell of the shared host moves both; the speed is
        # the median of the rounds' ratios.
        runs = {row: [] for row in rows}
        for _ in range(a.rounds):
            for row in rows:
                if row == "peft":
                    runs[row].append(run_peer(a, data, batch, seq_len) + (None,))
                else:
                    runs[row].append(run_ferrotune(a, data, batch, seq_len, row, work))

        def step_s(times):
            return statistics.median(times[1:] if len(times) > 1 else times)

        # Ratios against PyTorch + PEFT of the same shape and round (the first row without it).
        base = runs["peft"] if "peft" in runs else runs[rows[0]]
        for row in rows:
            per_round = runs[row]
            s = statistics.median(step_s(t) for t, _, _, _ in per_round)
            toks = per_round[0][1]
            tps = toks / s
            speeds = [(toks / step_s(t)) / (b[1] / step_s(b[0]))
                      for (t, _, _, _), b in zip(per_round, base)]
            speed = statistics.median(speeds)
            rss = max(r[2] for r in per_round)
            mem = rss / max(r[2] for r in base)
            estimate = per_round[0][3]
            rounds_note = ""
            if a.rounds > 1:
                rounds_note = "  rounds: " + " ".join(f"{x:.2f}x" for x in speeds) + \
                    "  s/step: " + " ".join(f"{step_s(t):.2f}" for t, _, _, _ in per_round)
            print(f"{shape:>8} {row:<22} {s:8.2f} {tps:8.1f} {rss / 1e9:8.2f}GB "
                  f"{speed:6.2f}x {mem:5.2f}x{rounds_note}", flush=True)
            label = ENGINES[row][0]
            bold = "**" if label.startswith("**") else ""
            pretty = f"{batch} × {seq_len}"
            spread = f" ({min(speeds):.2f}-{max(speeds):.2f}x)" if a.rounds > 1 else ""
            table.append(f"| {pretty} | {label} | {s:.2f} | {tps:.1f} | {rss / 1e9:.2f} GB | "
                         f"{bold}{speed:.2f}x{bold}{spread} | {bold}{mem:.2f}x{bold} |")
            if estimate is not None:
                name = ESTIMATE_LABELS[row].format(shape=pretty)
                if "{shape}" not in ESTIMATE_LABELS[row]:
                    name = f"{name}, {pretty}"
                pct = (estimate - rss) / rss * 100
                sign = "+" if pct >= 0 else "\u2212"
                estimates.append(f"| {name} | {human_bytes(estimate)} | "
                                 f"{human_bytes(rss)} ({sign}{abs(pct):.1f}%) |")
    print()
    print("| batch | engine | s/step | tokens/s | peak RSS | speed | RSS |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))
    if estimates:
        print()
        print("| config | estimate | measured |")
        print("|---|---|---|")
        print("\n".join(estimates))


if __name__ == "__main__":
    main()
