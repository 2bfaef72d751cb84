#!/usr/bin/env python3
"""Decode and prompt tokens/s: ferrotune vs llama.cpp on the same GGUF, same chat prompt,
same thread count, in one run; prints the ratios, then the rows of the README table
("Speed: decode vs llama.cpp") in its markdown format.

    scripts/bench.sh decode [flags]       # the README table: builds, fetches, prints the CPU
    .venv/bin/python bench/decode_vs_llamacpp.py [--gguf F] [--threads 2] [--new 128] [--runs 3]
        [--configs 2:16,2:8,1:16] [--ferrotune-args "..."]

--configs lists THREADS:ACTIVATION_BITS pairs, one table row each (activation bits 16, the
default, or 8, set through FERROTUNE_ACT_BITS for ferrotune; llama.cpp always quantizes
activations to 8 bits). Without it, one row: --threads with the activations FERROTUNE_ACT_BITS
selects (16 when unset).

Needs the reference environment with llama-cpp-python (`scripts/setup-reference.sh`; it builds
llama.cpp from source for this CPU, ~5 min), the model (`scripts/fetch-models.sh`) and a release
build of ferrotune (`cargo build --release`); `scripts/bench.sh decode` does the last two. Both
engines decode greedily with EOS ignored, so each generates exactly --new tokens; the best of
--runs runs is kept for each (after one warm-up).
"""
import argparse, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FERROTUNE_CACHE", os.path.join(ROOT, ".cache"))
DEFAULT_GGUF = os.path.join(CACHE, "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# SmolLM2's chat template rendered for one user turn (its default system prompt included), so
# both engines see exactly the same text and token ids.
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle.<|im_end|>\n"
          "<|im_start|>assistant\n")
ACTIVATIONS = {16: "16-bit (default)", 8: "8-bit"}


def bench_llamacpp(gguf, threads, n_new, runs):
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama_cpp is not installed in this Python: run scripts/setup-reference.sh "
                 "(without --no-llama) and use .venv/bin/python")
    m = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                        n_batch=512, verbose=False)
    toks = m.tokenize(PROMPT.encode(), add_bos=False, special=True)
    best_pp, best_tg = 0.0, 0.0
    for r in range(runs + 1):
        m.reset()
        t0 = time.perf_counter()
        m.eval(toks)
        t1 = time.perf_counter()
        nxt = int(m.scores[m.n_tokens - 1].argmax())
        t2 = time.perf_counter()
        for _ in range(n_new - 1):
            m.eval([nxt])
            nxt = int(m.scores[m.n_tokens - 1].argmax())
        t3 = time.perf_counter()
        if r == 0:
            continue  # warm-up
        best_pp = max(best_pp, len(toks) / (t1 - t0))
        best_tg = max(best_tg, (n_new - 1) / (t3 - t2))
    return len(toks), best_pp, best_tg


def bench_ferrotune(gguf, threads, n_new, runs, extra, act_bits):
    exe = os.path.join(ROOT, "target/release/ferrotune")
    if not os.path.exists(exe):
        sys.exit(f"{exe} missing: run cargo build --release (scripts/bench.sh decode does)")
    env = dict(os.environ)
    if act_bits is not None:
        env["FERROTUNE_ACT_BITS"] = str(act_bits)
    best_pp, best_tg, n_prompt = 0.0, 0.0, 0
    for r in range(runs + 1):
        out = subprocess.run([exe, "generate", "--model", gguf, "--prompt", PROMPT, "--threads", str(threads),
                              "--max-new-tokens", str(n_new), "--ignore-eos", "--json", *extra],
                             check=True, capture_output=True, text=True, env=env)
        v = json.loads(out.stdout)
        if r == 0:
            continue
        n_prompt = v["prompt_tokens"]
        best_pp = max(best_pp, v["prompt_tokens_per_s"])
        best_tg = max(best_tg, v["decode_tokens_per_s"])
    return n_prompt, best_pp, best_tg


def parse_configs(text):
    """'2:16,2:8' -> [(2, 16), (2, 8)]"""
    configs = []
    for item in text.split(","):
        try:
            threads, bits = (int(x) for x in item.split(":"))
        except ValueError:
            sys.exit(f"--configs: `{item}` is not THREADS:BITS (e.g. 2:16)")
        if threads < 1 or bits not in ACTIVATIONS:
            sys.exit(f"--configs: `{item}`: threads must be >= 1 and bits 16 or 8")
        configs.append((threads, bits))
    return configs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--configs", help="THREADS:ACTIVATION_BITS,... one table row each")
    ap.add_argument("--ferrotune-args", default="", help="extra flags for ferrotune generate")
    a = ap.parse_args()
    if not os.path.isfile(a.gguf):
        sys.exit(f"{a.gguf}: not found (run scripts/fetch-models.sh)")
    if a.configs:
        configs = parse_configs(a.configs)
    else:
        env_bits = 8 if os.environ.get("FERROTUNE_ACT_BITS") == "8" else 16
        configs = [(a.threads, env_bits)]
    rows = []
    for threads, bits in configs:
        n1, pp1, tg1 = bench_ferrotune(a.gguf, threads, a.new, a.runs, a.ferrotune_args.split(), bits)
        n2, pp2, tg2 = bench_llamacpp(a.gguf, threads, a.new, a.runs)
        if n1 != n2:
            print(f"warning: prompt token counts differ: ferrotune {n1}, llama.cpp {n2}")
        print(f"model {os.path.basename(a.gguf)}, {threads} threads, {bits}-bit activations, "
              f"prompt {n1} tokens, {a.new} new tokens, best of {a.runs}")
        print(f"{'engine':<12}{'prompt tok/s':>14}{'decode tok/s':>14}")
        print(f"{'ferrotune':<12}{pp1:>14.1f}{tg1:>14.1f}")
        print(f"{'llama.cpp':<12}{pp2:>14.1f}{tg2:>14.1f}")
        print(f"{'ratio':<12}{pp1 / pp2:>13.2f}x{tg1 / tg2:>13.2f}x", flush=True)
        rows.append(f"| {threads} | {ACTIVATIONS[bits]} | {tg1:.1f} | {tg2:.1f} | "
                    f"**{tg1 / tg2:.2f}x** | {pp1 / pp2:.2f}x |")
    print()
    print("| threads | activations | ferrotune decode tok/s | llama.cpp decode tok/s | decode ratio | prompt ratio |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
