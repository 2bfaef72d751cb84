#!/usr/bin/env python3
"""The same multiple-choice benchmark, ferrotune bench vs lm-evaluation-harness (HF backend), in
one run on this CPU; prints wall-clock seconds, the accuracy each got (it must agree) and the
speed ratio.

    .venv/bin/python bench/bench_vs_lm_eval.py [--shots 0,5] [--limit 200] [--lm-eval-batch 8]

The task is bench/tasks/bench_sst2.yaml (SST-2 dev from ../shared/data, first_n few-shot
examples from train). lm-eval runs `--model hf` on the SmolLM2 f32 HF folder
(scripts/convert-smollm2-hf.sh) on the CPU with all cores (torch's default); ferrotune runs
the same HF folder and, as a second row, the Q4_1 GGUF it was converted from, as it ships. Each command's whole wall time counts (start, load, scoring).
Needs the reference environment (scripts/setup-reference.sh), the models
(scripts/fetch-models.sh, scripts/convert-smollm2-hf.sh) and `cargo build --release`.
"""
import argparse, json, os, platform, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FERROTUNE_CACHE", os.path.join(ROOT, ".cache"))
GGUF = os.path.join(CACHE, "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
HF = os.path.join(CACHE, "models/smollm2-hf")
TASKS = os.path.join(ROOT, "bench/tasks")
BIN = os.path.join(ROOT, "target/release/ferrotune")


def cpu_line():
    model, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {simd}"


def timed(cmd, env=None):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{p.stderr[-3000:]}")
    return dt, p.stdout


def run_lm_eval(shots, limit, batch, out):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={HF},dtype=float32", "--device", "cpu",
           "--tasks", "bench_sst2", "--include_path", TASKS, "--num_fewshot", str(shots),
           "--limit", str(limit), "--batch_size", str(batch), "--output_path", out]
    dt, _ = timed(cmd, env)
    acc = None
    for dirpath, _, files in os.walk(out):
        for f in files:
            if f.startswith("results") and f.endswith(".json"):
                acc = json.load(open(os.path.join(dirpath, f)))["results"]["bench_sst2"]["acc,none"]
    return dt, acc


def run_ferrotune(shots, limit, model, batch):
    cmd = [BIN, "bench", "--model", model, "--tasks", os.path.join(TASKS, "bench_sst2.yaml"),
           "--num-fewshot", str(shots), "--limit", str(limit), "--batch-size", str(batch), "--json"]
    dt, out = timed(cmd)
    return dt, json.loads(out.strip().splitlines()[-1])["bench_sst2"]["acc,none"]


def best_of(n, fns):
    """Each command's fastest of n rounds; a round runs every command once, in turn, so a slow
    spell of a shared machine (seen here: the same command 6.7 s, then 11 s) hits them alike."""
    runs = [[] for _ in fns]
    for _ in range(n):
        for r, fn in zip(runs, fns):
            r.append(fn())
    return [(min(x[0] for x in r), r[0][1]) for r in runs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--lm-eval-batch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="ferrotune --batch-size")
    ap.add_argument("--repeat", type=int, default=3, help="runs per command; the fastest counts")
    a = ap.parse_args()
    for p, what in [(BIN, "cargo build --release"), (GGUF, "scripts/fetch-models.sh"),
                    (os.path.join(HF, "config.json"), "scripts/convert-smollm2-hf.sh")]:
        if not os.path.exists(p):
            sys.exit(f"{p}: missing ({what})")
    import tempfile
    print(f"# bench_sst2 (SST-2 dev, multiple choice), first {a.limit} documents; {cpu_line()}")
    print(f"# lm-eval {__import__('lm_eval').__version__} --model hf (f32, batch {a.lm_eval_batch}); "
          f"ferrotune {os.path.relpath(BIN, ROOT)} (--batch-size {a.batch}); "
          f"f32 = the same HF folder for both, Q4_1 = the GGUF it was converted from; "
          f"fastest of {a.repeat} runs each, whole command wall time")
    print("| shots | lm-eval s | acc | ferrotune f32 s | acc | ratio | ferrotune Q4_1 s | acc | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in [int(x) for x in a.shots.split(",")]:
        def lm_eval_once():
            with tempfile.TemporaryDirectory() as tmp:
                return run_lm_eval(k, a.limit, a.lm_eval_batch, tmp)
        (le, le_acc), (f32, f32_acc), (q4, q4_acc) = best_of(a.repeat, [
            lm_eval_once,
            lambda: run_ferrotune(k, a.limit, HF, a.batch),
            lambda: run_ferrotune(k, a.limit, GGUF, a.batch),
        ])
        print(f"| {k} | {le:.1f} | {le_acc:.4f} | {f32:.1f} | {f32_acc:.4f} | {le / f32:.2f}x | {q4:.1f} | {q4_acc:.4f} | {le / q4:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
