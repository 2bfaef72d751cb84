#!/usr/bin/env python3
"""ferrotune's GGUF export (`ferrotune quantize`, `merge --format gguf`) against llama.cpp's own
tools on SmolLM2-135M, in one run:

1. export: `ferrotune quantize` of the f32 HF folder to f16, q8_0 and q4_k_m; llama.cpp's
   `llama_model_quantize` of our f16 file to Q8_0 and Q4_K_M (the reference quantization);
   `ferrotune quantize` of our f16 file to q8_0 / q4_k_m too, so both quantizers start from
   the same f16 values: per tensor, are the type and the bytes identical?
2. greedy text: on 5 chat prompts, the first --new tokens from llama.cpp (llama-cpp-python) and
   from `ferrotune generate` on the same file, with ferrotune's activations at 16 bits (its
   default), 8 bits and llama.cpp's own 8-bit rounding (`FERROTUNE_ACT_BITS=llamacpp`); and, as
   the control, ferrotune against itself with its portable kernels (`FERROTUNE_QUANT_ISA=scalar`:
   the same rounding, only the order of f32 additions differs) at each activation precision;
3. perplexity on DialogSum validation text (the first dialogues, about --ppl-tokens tokens),
   windows of --ctx tokens without overlap on both sides (each window scores its tokens after
   the first, as `ferrotune perplexity --window N --stride N` does); llama.cpp's from its logits
   (`logits_all=True`): our file vs llama.cpp's quantization of the same f16 file, and ferrotune
   vs llama.cpp on our file;
4. a LoRA adapter (given with --adapter, or trained here for --lora-steps steps on DialogSum):
   `ferrotune merge --format gguf --quant q8_0` (and f32) run in llama.cpp, against
   `ferrotune generate --adapter` on the f32 base, greedy.

    .venv/bin/python bench/gguf_vs_llamacpp.py [--hf DIR] [--work DIR] [--adapter DIR] [--all-presets]
        [--skip greedy,ppl,lora]

Needs a release build (`cargo build --release -p ferrotune-cli`), the SmolLM2 HF folder
(`scripts/convert-smollm2-hf.sh`), llama-cpp-python in .venv (`scripts/setup-reference.sh`) and
DialogSum in ../shared/data/dialogsum. Files go to --work (default .cache/gguf-bench/).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FERROTUNE_CACHE", os.path.join(ROOT, ".cache"))
SHARED = os.environ.get("FERROTUNE_SHARED_DIR", os.path.join(os.path.dirname(ROOT), "shared"))
EXE = os.path.join(ROOT, "target/release/ferrotune")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for learning to code.",
    "Summarize: #Person1#: Are you coming to the party tonight? #Person2#: I can't, I have to work late.",
]


def chat(q):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")


def run(args, **kw):
    t0 = time.perf_counter()
    out = subprocess.run(args, check=False, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(args)}\n{out.stderr[-3000:]}")
    return out, time.perf_counter() - t0


def ferrotune(*args):
    return run([EXE, *args])


def log(*a):
    print(*a, flush=True)


_SILENT = None


def silence_llama_cpp():
    """llama.cpp logs every tensor it quantizes or loads to stderr; keep the report readable."""
    global _SILENT
    import ctypes
    import llama_cpp

    @llama_cpp.llama_log_callback
    def silent(level, text, user_data):
        pass

    _SILENT = silent
    llama_cpp.llama_log_set(silent, ctypes.c_void_p())


def quiet_llama(path, n_ctx, logits_all=False):
    import llama_cpp
    # An f32 KV cache, as ferrotune keeps it (llama.cpp's default is f16).
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count(),
                           logits_all=logits_all, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def llama_quantize(src, dst, ftype):
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = os.cpu_count()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        sys.exit(f"llama_model_quantize {src} -> {dst} failed ({rc})")


def tensors(path):
    import gguf
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).tobytes())) for t in r.tensors}


def compare_bytes(ours, theirs):
    a, b = tensors(ours), tensors(theirs)
    same_type = sum(1 for n in b if n in a and a[n][0] == b[n][0])
    same_bytes = sum(1 for n in b if n in a and a[n] == b[n])
    diff = [f"{n} ({a[n][0] if n in a else '-'} vs {b[n][0]})" for n in b if n not in a or a[n] != b[n]]
    return {"tensors": len(b), "same_type": same_type, "same_bytes": same_bytes,
            "missing": sorted(set(b) ^ set(a)), "differing": diff[:8]}


def llama_greedy(path, prompt, n_new):
    """llama.cpp's greedy tokens, their text, and per step the text length so far and the gap
    between the two largest logits (how close the step was to a tie)."""
    # logits_all: without it llama-cpp-python 0.3.36 leaves `scores` zero after eval.
    m = quiet_llama(path, 512, logits_all=True)
    toks = m.tokenize(prompt.encode(), add_bos=False, special=True)
    m.eval(toks)
    out, ends, gaps = [], [], []
    for _ in range(n_new):
        row = np.asarray(m.scores[m.n_tokens - 1])
        top2 = np.sort(row)[-2:]
        nxt = int(np.argmax(row))
        out.append(nxt)
        gaps.append(float(top2[1] - top2[0]))
        ends.append(len(m.detokenize(out).decode("utf-8", errors="replace")))
        m.eval([nxt])
    return toks, out, m.detokenize(out).decode("utf-8", errors="replace"), ends, gaps


def ferrotune_greedy(model, prompt, n_new, adapter=None, act_bits=None, isa=None):
    """ferrotune's greedy text for n_new + 1 tokens (its streaming text holds back the end of
    the last token, so one more makes the first n_new complete)."""
    extra = ["--adapter", adapter] if adapter else []
    env = dict(os.environ)
    if act_bits:
        env["FERROTUNE_ACT_BITS"] = str(act_bits)
    if isa:
        env["FERROTUNE_QUANT_ISA"] = isa
    out, _ = run([EXE, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", str(n_new + 1),
                  "--ignore-eos", "--json", *extra], env=env)
    return json.loads(out.stdout)["text"]


def bits_label(bits):
    return f"{bits}-bit" if str(bits).isdigit() else "llama.cpp's 8-bit rounding"


def self_consistency(files, n_new, act_bits=(16, 8, "llamacpp")):
    """ferrotune's greedy text with its best kernels vs its portable ones (same activation
    rounding; only the order of f32 additions differs): how much a last-bit difference moves
    the text at each activation precision."""
    rows = {}
    log(f"\n[control] ferrotune's best kernels vs its portable (scalar) ones, first {n_new} tokens:")
    for f in files:
        for bits in act_bits:
            same = 0
            for q in QUESTIONS:
                p = chat(q)
                same += ferrotune_greedy(f, p, n_new, act_bits=bits) == ferrotune_greedy(f, p, n_new, act_bits=bits, isa="scalar")
            rows[f"{os.path.basename(f)}/{bits}"] = same
            log(f"  {os.path.basename(f)}, activations {bits_label(bits)}: {same}/{len(QUESTIONS)} identical")
    return rows


def greedy_table(label, files, n_new, adapter_model=None, adapter=None, act_bits=(16, 8, "llamacpp")):
    """llama.cpp runs each of `files`; ferrotune runs adapter_model + adapter if given, else the
    same file, once per activation precision. Identical: llama.cpp's text of n_new tokens is a
    prefix of ferrotune's (n_new + 1 tokens)."""
    rows = []
    for q in QUESTIONS:
        p = chat(q)
        for f in files:
            _, ids, lt, ends, gaps = llama_greedy(f, p, n_new)
            for bits in act_bits:
                ft = ferrotune_greedy(adapter_model or f, p, n_new, adapter, bits)
                same = ft.startswith(lt)
                c = next((i for i, (x, y) in enumerate(zip(lt, ft)) if x != y), min(len(lt), len(ft)))
                step = next((k for k, e in enumerate(ends) if e > c), len(ends) - 1)
                rows.append({"file": os.path.basename(f), "act_bits": bits, "prompt": q[:40], "identical": same,
                             "first_diff_char": None if same else c,
                             "first_diff_token": None if same else step,
                             "llama_cpp_top2_gap_there": None if same else gaps[step],
                             "llama_cpp_min_gap": min(gaps), "llama_cpp": lt, "ferrotune": ft})
    log(f"\n[{label}] greedy, first {n_new} tokens:")
    for bits in act_bits:
        for f in files:
            sel = [r for r in rows if r["act_bits"] == bits and r["file"] == os.path.basename(f)]
            log(f"  {os.path.basename(f)}, ferrotune activations {bits_label(bits)}: {sum(r['identical'] for r in sel)}/{len(sel)} identical")
    for r in rows:
        if not r["identical"]:
            c = r["first_diff_char"]
            log(f"  {r['file']} ({bits_label(r['act_bits'])}) / {r['prompt']!r}: first difference at token {r['first_diff_token']} "
                f"(llama.cpp's top-2 logit gap there {r['llama_cpp_top2_gap_there']:.3f}):\n"
                f"    llama.cpp: {r['llama_cpp'][max(0, c - 30):c + 40]!r}\n"
                f"    ferrotune: {r['ferrotune'][max(0, c - 30):c + 40]!r}")
    return rows


def ppl_text(n_dialogues):
    path = os.path.join(SHARED, "data/dialogsum/dialogsum.dev.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(n_dialogues), f)]
    return "\n\n".join(r["dialogue"] + "\nSummary: " + r["summary"] for r in rows)


def llama_ppl(path, ids, ctx):
    m = quiet_llama(path, ctx, logits_all=True)
    nll, n = 0.0, 0
    for begin in range(0, len(ids), ctx):
        w = ids[begin:begin + ctx]
        if len(w) < 2:
            break
        m.reset()
        m.eval(w)
        logits = np.asarray(m.scores[:len(w)], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        lp = logits[np.arange(len(w) - 1), w[1:]] - logz[:-1]
        nll -= lp.sum()
        n += len(w) - 1
    return math.exp(nll / n), n


def ferrotune_ppl(model, text_file, ctx, act_bits=None):
    env = dict(os.environ)
    if act_bits:
        env["FERROTUNE_ACT_BITS"] = act_bits
    out, _ = run([EXE, "perplexity", "--model", model, "--file", text_file, "--window", str(ctx),
                  "--stride", str(ctx), "--json"], env=env)
    v = json.loads(out.stdout.strip().splitlines()[-1])
    return v["perplexity"], v["tokens"]


def train_lora(work, steps):
    run_dir = os.path.join(work, "lora-run")
    cfg = os.path.join(work, "lora.toml")
    with open(cfg, "w") as f:
        f.write(f'''model = "{os.path.join(CACHE, 'models/smollm2-hf')}"
method = "lora"
output_dir = "{run_dir}"

[data]
train = "{os.path.join(SHARED, 'data/dialogsum/dialogsum.train.jsonl')}"
template = "Summarize the following conversation.\\n\\n{{dialogue}}\\n\\nSummary:"
completion = " {{summary}}"

[lora]
r = 8
alpha = 32
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

[train]
batch_size = 2
max_steps = {steps}
max_seq_len = 256
lr = 2e-3
warmup_steps = 0
seed = 7
''')
    if os.path.isdir(os.path.join(run_dir, "adapter")):
        return os.path.join(run_dir, "adapter")
    _, dt = ferrotune("train", "--config", cfg)
    log(f"trained a LoRA adapter ({steps} steps, {dt:.0f} s): {run_dir}/adapter")
    return os.path.join(run_dir, "adapter")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", default=os.path.join(CACHE, "models/smollm2-hf"))
    ap.add_argument("--work", default=os.path.join(CACHE, "gguf-bench"))
    ap.add_argument("--adapter", help="LoRA adapter folder (default: train one)")
    ap.add_argument("--lora-steps", type=int, default=30)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--dialogues", type=int, default=20, help="DialogSum validation rows in the text")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: greedy,ppl,lora")
    ap.add_argument("--all-presets", action="store_true",
                    help="also compare the bytes of q4_0 q4_1 q5_0 q5_1 q5_k_m q6_k bf16 with llama.cpp's")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    if not os.path.exists(EXE):
        sys.exit(f"{EXE} missing: cargo build --release -p ferrotune-cli")
    os.makedirs(a.work, exist_ok=True)
    w = lambda n: os.path.join(a.work, n)
    import llama_cpp
    silence_llama_cpp()
    log(f"llama-cpp-python {llama_cpp.__version__}; source {a.hf}")

    # 1. exports.
    results = {"exports": {}}
    for to in ["f32", "f16", "q8_0", "q4_k_m"]:
        out, dt = ferrotune("quantize", "--model", a.hf, "--to", to, "--out", w(f"ours-{to}.gguf"), "--overwrite")
        log(f"\n$ ferrotune quantize --model {a.hf} --to {to} --out {w(f'ours-{to}.gguf')}  ({dt:.1f} s)\n{out.stdout.strip()}")
        results["exports"][to] = {"bytes": os.path.getsize(w(f"ours-{to}.gguf")), "seconds": dt}
    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    for to, ft in ftypes.items():
        t0 = time.perf_counter()
        llama_quantize(w("ours-f16.gguf"), w(f"llamacpp-{to}.gguf"), ft)
        log(f"llama_model_quantize(ours-f16.gguf -> llamacpp-{to}.gguf, ftype {ft}): {time.perf_counter() - t0:.1f} s, "
              f"{os.path.getsize(w(f'llamacpp-{to}.gguf'))} bytes (ours from f32: {os.path.getsize(w(f'ours-{to}.gguf'))})")
        ferrotune("quantize", "--model", w("ours-f16.gguf"), "--to", to, "--out", w(f"ours-{to}-from-f16.gguf"), "--overwrite")
        results["exports"][to]["bytes_vs_llamacpp_from_same_f16"] = c = compare_bytes(w(f"ours-{to}-from-f16.gguf"), w(f"llamacpp-{to}.gguf"))
        log(f"  {to}: same f16 input -> tensors with llama.cpp's type {c['same_type']}/{c['tensors']}, "
              f"identical bytes {c['same_bytes']}/{c['tensors']} {c['differing'] or ''}")
        results["exports"][to]["bytes_vs_llamacpp_ours_from_f32"] = c = compare_bytes(w(f"ours-{to}.gguf"), w(f"llamacpp-{to}.gguf"))
        log(f"  {to}: ours from the f32 folder -> same type {c['same_type']}/{c['tensors']}, identical bytes "
              f"{c['same_bytes']}/{c['tensors']} (f32 vs f16-rounded input)")

    # The other presets: bytes only (from the same f16 file).
    if a.all_presets:
        for to, ft in [("q4_0", 2), ("q4_1", 3), ("q5_0", 8), ("q5_1", 9), ("q5_k_m", 17), ("q6_k", 18), ("bf16", 32)]:
            llama_quantize(w("ours-f16.gguf"), w(f"llamacpp-{to}.gguf"), ft)
            ferrotune("quantize", "--model", w("ours-f16.gguf"), "--to", to, "--out", w(f"ours-{to}-from-f16.gguf"), "--overwrite")
            c = compare_bytes(w(f"ours-{to}-from-f16.gguf"), w(f"llamacpp-{to}.gguf"))
            results["exports"][to] = {"bytes_vs_llamacpp_from_same_f16": c}
            log(f"  {to}: same f16 input -> llama.cpp's type {c['same_type']}/{c['tensors']}, identical bytes "
                f"{c['same_bytes']}/{c['tensors']} {c['differing'] or ''}")

    # 2. greedy text, same file both engines.
    if "greedy" not in skip:
        results["greedy"] = greedy_table("same file, llama.cpp vs ferrotune",
                                         [w("ours-f32.gguf"), w("ours-q8_0.gguf"), w("ours-q4_k_m.gguf")], a.new)
        results["greedy_control"] = self_consistency([w("ours-q8_0.gguf"), w("ours-q4_k_m.gguf")], a.new)

    # 3. perplexity.
    if "ppl" not in skip:
        text = ppl_text(a.dialogues)
        tf = w("dialogsum-dev.txt")
        with open(tf, "w") as f:
            f.write(text)
        results["perplexity"] = {}
        log(f"\nperplexity: DialogSum dev, first {a.dialogues} rows, windows of {a.ctx} tokens, no overlap")
        for to in ["q8_0", "q4_k_m"]:
            m = quiet_llama(w(f"ours-{to}.gguf"), a.ctx)
            ids = m.tokenize(text.encode(), add_bos=False, special=False)
            del m
            ours_lc, n = llama_ppl(w(f"ours-{to}.gguf"), ids, a.ctx)
            theirs_lc, _ = llama_ppl(w(f"llamacpp-{to}.gguf"), ids, a.ctx)
            ours_ft, n_ft = ferrotune_ppl(w(f"ours-{to}.gguf"), tf, a.ctx)
            ours_ft_lc, _ = ferrotune_ppl(w(f"ours-{to}.gguf"), tf, a.ctx, "llamacpp")
            r = {"tokens_llama_cpp": n, "tokens_ferrotune": n_ft, "llama_cpp_on_ours": ours_lc,
                 "llama_cpp_on_llamacpp_quant": theirs_lc, "ratio_ours_vs_llamacpp_quant": ours_lc / theirs_lc,
                 "ferrotune_on_ours": ours_ft, "ratio_ferrotune_vs_llama_cpp_same_file": ours_ft / ours_lc,
                 "ferrotune_llamacpp_rounding_on_ours": ours_ft_lc,
                 "ratio_ferrotune_llamacpp_rounding_vs_llama_cpp": ours_ft_lc / ours_lc}
            results["perplexity"][to] = r
            log(f"  {to}: llama.cpp on our file {ours_lc:.4f} | llama.cpp on its own quantization {theirs_lc:.4f} "
                  f"| ratio {ours_lc / theirs_lc:.4f}   ({n} tokens scored)")
            log(f"  {to}: ferrotune on our file {ours_ft:.4f} ({n_ft} tokens) | ratio to llama.cpp on the same file {ours_ft / ours_lc:.4f}")
            log(f"  {to}: ferrotune with llama.cpp's activation rounding {ours_ft_lc:.4f} | ratio {ours_ft_lc / ours_lc:.4f}")
        f16_lc, _ = llama_ppl(w("ours-f16.gguf"), ids, a.ctx)
        results["perplexity"]["f16_llama_cpp"] = f16_lc
        log(f"  f16: llama.cpp on our f16 file {f16_lc:.4f}")

    # 4. LoRA merged to GGUF.
    if "lora" not in skip:
        adapter = a.adapter or train_lora(a.work, a.lora_steps)
        for q in ["f32", "q8_0"]:
            out, dt = ferrotune("merge", "--model", a.hf, "--adapter", adapter, "--format", "gguf", "--quant", q,
                                "--out", w(f"lora-{q}.gguf"), "--overwrite")
            log(f"\n$ ferrotune merge --model {a.hf} --adapter {adapter} --format gguf --quant {q} --out {w(f'lora-{q}.gguf')} ({dt:.1f} s)")
        results["lora"] = greedy_table("LoRA: llama.cpp on the merged GGUF vs ferrotune generate --adapter (f32 base)",
                                       [w("lora-f32.gguf"), w("lora-q8_0.gguf")], a.new, adapter_model=a.hf, adapter=adapter,
                                       act_bits=(16,))
    with open(w("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"\nresults: {w('results.json')}")


if __name__ == "__main__":
    main()
