#!/usr/bin/env python3
"""Decode and prompt tokens/s: ferrotune vs llama.cpp on the same GGUF, same chat prompt,
same thread count, in one run; prints the ratios.

    /work/cache/venv/bin/python bench/decode_vs_llamacpp.py [--gguf F] [--threads 2] [--new 128] [--runs 3]

Needs `pip install llama-cpp-python` (builds llama.cpp from source, ~5 min) and a release build
of ferrotune (`cargo build --release`). Both engines decode greedily with EOS ignored, so each
generates exactly --new tokens; the best of --runs runs is kept for each (after one warm-up).
"""
import argparse, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.join(ROOT, ".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# SmolLM2's chat template rendered for one user turn (its default system prompt included), so
# both engines see exactly the same text and token ids.
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle.<|im_end|>\n"
          "<|im_start|>assistant\n")


def bench_llamacpp(gguf, threads, n_new, runs):
    import llama_cpp
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


def bench_ferrotune(gguf, threads, n_new, runs, extra):
    exe = os.path.join(ROOT, "target/release/ferrotune")
    if not os.path.exists(exe):
        sys.exit(f"{exe} missing: run cargo build --release")
    best_pp, best_tg, n_prompt = 0.0, 0.0, 0
    for r in range(runs + 1):
        out = subprocess.run([exe, "generate", "--model", gguf, "--prompt", PROMPT, "--threads", str(threads),
                              "--max-new-tokens", str(n_new), "--ignore-eos", "--json", *extra],
                             check=True, capture_output=True, text=True)
        v = json.loads(out.stdout)
        if r == 0:
            continue
        n_prompt = v["prompt_tokens"]
        best_pp = max(best_pp, v["prompt_tokens_per_s"])
        best_tg = max(best_tg, v["decode_tokens_per_s"])
    return n_prompt, best_pp, best_tg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ferrotune-args", default="", help="extra flags for ferrotune generate")
    a = ap.parse_args()
    n1, pp1, tg1 = bench_ferrotune(a.gguf, a.threads, a.new, a.runs, a.ferrotune_args.split())
    n2, pp2, tg2 = bench_llamacpp(a.gguf, a.threads, a.new, a.runs)
    if n1 != n2:
        print(f"warning: prompt token counts differ: ferrotune {n1}, llama.cpp {n2}")
    print(f"model {os.path.basename(a.gguf)}, {a.threads} threads, prompt {n1} tokens, {a.new} new tokens, best of {a.runs}")
    print(f"{'engine':<12}{'prompt tok/s':>14}{'decode tok/s':>14}")
    print(f"{'ferrotune':<12}{pp1:>14.1f}{tg1:>14.1f}")
    print(f"{'llama.cpp':<12}{pp2:>14.1f}{tg2:>14.1f}")
    print(f"{'ratio':<12}{pp1 / pp2:>13.2f}x{tg1 / tg2:>13.2f}x")


if __name__ == "__main__":
    main()
