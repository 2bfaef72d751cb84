#!/usr/bin/env python3
"""Reference fixtures for ferrotune's Rust tests, produced with PyTorch + transformers.

Usage (from the repository root):

    python reference/make_fixtures.py tiny         # tests/fixtures/models/<name>/
    python reference/make_fixtures.py smollm2      # tests/fixtures/smollm2/logits.json + last_logits.f32
    python reference/make_fixtures.py perplexity   # tests/fixtures/smollm2/perplexity.json
    python reference/make_fixtures.py hf-export    # tests/fixtures/smollm2/hf-export/
    python reference/make_fixtures.py all

`python` is the reference environment's interpreter: `.venv/bin/python` after
`scripts/setup-reference.sh` (which pins the versions these fixtures were written with).

The SmolLM2 GGUF is looked up at $FERROTUNE_CACHE/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(FERROTUNE_CACHE defaults to <repo>/.cache, as in scripts/fetch-models.sh) or given with --gguf.

Determinism: one CPU thread, fixed seeds, float32 weights and activations, eager attention.
Floats are written with the shortest decimal that round-trips the float32 value, so a reader
that parses them as f32 gets the exact value transformers produced.

PERPLEXITY CONVENTION (tests/fixtures/smollm2/perplexity.json, and what ferrotune must match)
--------------------------------------------------------------------------------------------
* ids = tokenizer(text, add_special_tokens=True).input_ids   (SmolLM2 adds no BOS this way.)
* Sliding windows over ids, n = len(ids): window k begins at begin = k * stride and covers
  ids[begin : end] with end = min(begin + window, n). Windows stop after the first one whose
  end == n.
* Inside a window the model sees only that window's tokens (positions restart at 0). Target
  position p is scored when max(prev_end, begin + 1) <= p < end, where prev_end is the previous
  window's end (0 for the first window): ids[p] is predicted from the logits at position
  p - 1 - begin of that window. Then prev_end = end.
* Hence every token except ids[0] is scored exactly once: tokens = n - 1, and later windows
  score only their new tokens while earlier tokens act as context.
* nll = (sum of -log_softmax(logits)[target]) / tokens, with the log-softmax taken in float64
  over the float32 logits; perplexity = exp(nll).
* JSONL files: every line's "text" is tokenized and windowed independently by the same rule
  (context never crosses lines); tokens and total NLL are summed over lines before dividing.

TINY MODEL FIXTURES (tests/fixtures/models/<name>/)
---------------------------------------------------
config.json + model.safetensors (f32, save_pretrained) + generation_config.json + expected.json:
  {"sequences": [{"input_ids": [24 ids], "logits": [[vocab] x 24], "nll_mean": f, "perplexity": f},
                 {"input_ids": [40 ids], ...}],
   "batch": {"input_ids": [[16 ids], [16 ids]], "logits": [[[vocab] x 16] x 2]}}
nll_mean is the mean over i of -log p(ids[i+1] | ids[..=i]) (float64 log-softmax of the f32 logits),
perplexity = exp(nll_mean). The batch has no padding and no attention mask.
config.json uses the classic hub layout (top-level "rope_theta", "rope_scaling" only when not
default) except tiny-llama-head-dim, which keeps the transformers>=5 layout ("rope_parameters"
holding rope_theta), so that loaders are tested on both.

TRANSFORMERS' HF EXPORT OF SMOLLM2 (tests/fixtures/smollm2/hf-export/)
--------------------------------------------------------------------
What `save_pretrained` writes for the GGUF loaded by transformers (dequantized to f32), minus the
538 MB of weights, which ferrotune's tests recreate and check against this record:
* config.json, generation_config.json, tokenizer_config.json, chat_template.jinja: verbatim.
* tokenizer.json.gz: transformers' tokenizer.json (3.5 MB), gzip-compressed (mtime 0).
* manifest.json: {"transformers_version", "torch_version", "gguf": file name,
    "files": {name: {"stored_as": name in this folder, "bytes": n, "crc32": c}},
    "tensors": {name: {"dtype": "F32", "shape": [...], "crc32": c, "sum": f64,
                       "samples": [[flat index, f32 value], ...]}}}
  crc32 is zlib's CRC-32 of the tensor's little-endian bytes exactly as model.safetensors holds
  them (the same CRC-32 as Rust's crc32fast). The set of names is exactly what transformers saved
  (a tied lm_head is not saved). sum (float64) and the samples are only there to describe a
  mismatch; equality is decided by the CRC-32 of every tensor.
"""

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
)

# name -> (architecture, config overrides, seed, keep transformers>=5 rope layout)
TINY_MODELS = {
    "tiny-llama-gqa-untied": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
             rope_theta=10000.0, rms_norm_eps=1e-5),
        1001,
        False,
    ),
    "tiny-llama-mha-tied": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
             rope_theta=10000.0, rms_norm_eps=1e-5),
        1002,
        False,
    ),
    "tiny-llama3-rope-scaling": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
             rope_theta=500000.0, rms_norm_eps=1e-5,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        1003,
        False,
    ),
    "tiny-qwen2": (
        "qwen2",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False,
             sliding_window=None),
        1004,
        False,
    ),
    "tiny-mistral": (
        "mistral",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
             rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=None),
        1005,
        False,
    ),
    # head_dim 32 != hidden/heads = 16; a non-default theta makes a loader that misses
    # rope_parameters["rope_theta"] produce wrong logits instead of passing by accident.
    "tiny-llama-head-dim": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             tie_word_embeddings=False, rope_theta=50000.0, rms_norm_eps=1e-5),
        1006,
        True,
    ),
}


# ---------------------------------------------------------------------------------------------
# JSON writing with exact float32 values
# ---------------------------------------------------------------------------------------------

def _f32(x) -> str:
    v = np.float32(x)
    if not np.isfinite(v):
        raise ValueError(f"non-finite value {v} cannot be written to JSON")
    # numpy prints the shortest string that parses back to the same float32.
    return str(v)


def _encode(obj) -> str:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.float32:
            if obj.ndim == 1:
                return "[" + ",".join(_f32(v) for v in obj) + "]"
            return "[" + ",".join(_encode(row) for row in obj) + "]"
        return json.dumps(obj.tolist())
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _encode(v) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_encode(v) for v in obj) + "]"
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite value {obj} cannot be written to JSON")
        return repr(obj)
    return json.dumps(obj)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _encode(obj)
    json.loads(text)  # guard: what we hand-encoded must be valid JSON
    path.write_text(text + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


# ---------------------------------------------------------------------------------------------
# Shared scoring
# ---------------------------------------------------------------------------------------------

def token_nlls(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(ids[i+1] | logits[i]) for every i, in float64. logits: [T, V] f32, ids: [T]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp[:-1].gather(1, ids[1:].unsqueeze(1)).squeeze(1)


@torch.no_grad()
def forward_logits(model, ids) -> torch.Tensor:
    """Logits [T, V] (or [B, T, V] for a 2-D batch) in float32."""
    t = torch.as_tensor(ids, dtype=torch.long)
    squeeze = t.ndim == 1
    if squeeze:
        t = t.unsqueeze(0)
    out = model(input_ids=t, use_cache=False).logits.float()
    return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------------
# Tiny random models
# ---------------------------------------------------------------------------------------------

def _tiny_config(arch: str, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(**TINY_COMMON, **overrides, attn_implementation="eager")


def _tiny_model(arch: str, config):
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
           "mistral": MistralForCausalLM}[arch]
    return cls(config).float().eval()


@torch.no_grad()
def _init_weights(model, seed: int) -> None:
    # std 0.2 (not the 0.02 default) keeps logits far from uniform, so wrong wiring shows up
    # as large errors; RMSNorm gains in [0.5, 1.5] make a loader that ignores them fail.
    # Parameters are visited by sorted name with one generator, so the values do not depend
    # on module construction order. Tied weights appear once in named_parameters().
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float32) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.2)


def _classic_rope_layout(cfg: dict) -> dict:
    """Rewrite transformers>=5 "rope_parameters" into the hub-standard rope_theta/rope_scaling."""
    rp = cfg.pop("rope_parameters", None)
    if rp is None:
        return cfg
    rp = dict(rp)
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rp
    return dict(sorted(cfg.items()))


def make_tiny(only=None) -> None:
    from transformers import AutoModelForCausalLM

    base = ROOT / "tests/fixtures/models"
    for name, (arch, overrides, seed, keep_v5_layout) in TINY_MODELS.items():
        if only and name not in only:
            continue
        torch.manual_seed(seed)
        config = _tiny_config(arch, overrides)
        model = _tiny_model(arch, config)
        _init_weights(model, seed)

        g = torch.Generator().manual_seed(seed + 500)
        vocab = config.vocab_size
        seqs = [torch.randint(0, vocab, (n,), generator=g) for n in (24, 40)]
        batch_ids = torch.randint(0, vocab, (2, 16), generator=g)

        out_dir = base / name
        if out_dir.exists():
            shutil.rmtree(out_dir)
        model.save_pretrained(out_dir, safe_serialization=True)
        if not keep_v5_layout:
            cfg_path = out_dir / "config.json"
            cfg = _classic_rope_layout(json.loads(cfg_path.read_text()))
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

        # Expected values come from the model reloaded from the written folder, so the fixture
        # is self-consistent with what a loader sees (config rewrite, tied weights, dtype).
        reloaded = AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, attn_implementation="eager").eval()
        expected = {"sequences": []}
        for ids in seqs:
            logits = forward_logits(reloaded, ids)
            ref = forward_logits(model, ids)
            if not torch.equal(logits, ref):
                diff = (logits - ref).abs().max().item()
                raise SystemExit(f"{name}: reloaded model differs from in-memory model by {diff}")
            nll = token_nlls(logits, ids).mean().item()
            expected["sequences"].append({
                "input_ids": ids.tolist(),
                "logits": logits.numpy(),
                "nll_mean": nll,
                "perplexity": math.exp(nll),
            })
        blogits = forward_logits(reloaded, batch_ids)
        # Each batch row must equal the same sequence run alone (no padding, no mask).
        for b in range(2):
            alone = forward_logits(reloaded, batch_ids[b])
            if not torch.allclose(blogits[b], alone, atol=1e-5, rtol=1e-5):
                raise SystemExit(f"{name}: batch row {b} differs from the single-sequence run")
        expected["batch"] = {"input_ids": batch_ids.tolist(), "logits": blogits.numpy()}
        write_json(out_dir / "expected.json", expected)
        s = expected["sequences"]
        print(f"  {name}: nll24={s[0]['nll_mean']:.4f} nll40={s[1]['nll_mean']:.4f} "
              f"logit range [{float(blogits.min()):.2f}, {float(blogits.max()):.2f}]")


# ---------------------------------------------------------------------------------------------
# SmolLM2 (real GGUF, dequantized to f32 by transformers)
# ---------------------------------------------------------------------------------------------

def gguf_path(arg) -> Path:
    if arg:
        return Path(arg)
    cache = Path(os.environ.get("FERROTUNE_CACHE", ROOT / ".cache"))
    return cache / "models/smollm2" / GGUF_NAME


def load_smollm2(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise SystemExit(f"{path}: GGUF not found (run scripts/fetch-models.sh or pass --gguf)")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    return tok, model


PROMPT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _sample_vocab(vocab: int, must: list, size: int = 256) -> list:
    """`size` sorted ids: every id in `must`, the rest evenly spread over [0, vocab)."""
    must = sorted(set(must))
    n = size - len(must)
    while True:
        spread = {int(round(x)) for x in np.linspace(0, vocab - 1, n)}
        ids = set(must) | spread
        if len(ids) >= size:
            break
        n += 1
    # Surplus ids are dropped from the spread ones (never required ones, never the endpoints).
    extra = sorted(ids - set(must) - {0, vocab - 1}, reverse=True)
    while len(ids) > size:
        ids.remove(extra.pop(0))
    return sorted(ids)


def make_smollm2(args) -> None:
    tok, model = load_smollm2(gguf_path(args.gguf))
    out_dir = ROOT / "tests/fixtures/smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)

    text = tok.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    logits = forward_logits(model, ids)  # [T, V]
    vocab = logits.shape[-1]
    top5 = torch.topk(logits, 5, dim=-1).indices
    argmax = logits.argmax(dim=-1)
    if not torch.equal(argmax, top5[:, 0]):
        raise SystemExit("topk and argmax disagree (tied logits?)")
    sample = _sample_vocab(vocab, argmax.tolist())

    def greedy(**stop):
        gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             num_beams=1, temperature=None, top_p=None, top_k=None, **stop)
        new = gen[0, len(ids):].tolist()
        # generate() reuses the KV cache; the same tokens must come out of full re-runs.
        seq = list(ids)
        for t in new:
            nxt = int(forward_logits(model, seq)[-1].argmax())
            if nxt != t:
                raise SystemExit(f"cached greedy token {t} != full-recompute argmax {nxt}")
            seq.append(t)
        return new

    # Stops at the model's EOS (<|im_end|>, included in the ids) like a chat front end would.
    new_ids = greedy()
    # All 12 steps with EOS stopping disabled, to test decoding past the answer.
    forced_ids = greedy(eos_token_id=None, min_new_tokens=12)
    assert forced_ids[:len(new_ids)] == new_ids and len(forced_ids) == 12

    fixture = {
        "prompt_messages": PROMPT_MESSAGES,
        "prompt_text": text,
        "input_ids": ids,
        "sample_vocab": sample,
        "logits_sample": logits[:, sample].numpy(),
        "top5": top5.tolist(),
        "greedy_continuation": new_ids,
        "greedy_text": tok.decode(new_ids, skip_special_tokens=True),
        "greedy_text_raw": tok.decode(new_ids, skip_special_tokens=False),
        "greedy_continuation_ignore_eos": forced_ids,
    }
    write_json(out_dir / "logits.json", fixture)
    last = out_dir / "last_logits.f32"
    logits[-1].numpy().astype("<f4").tofile(last)
    print(f"wrote {last.relative_to(ROOT)} ({last.stat().st_size} bytes, {vocab} values)")
    print(f"  prompt tokens={len(ids)} last argmax={int(argmax[-1])} "
          f"greedy={new_ids} text={fixture['greedy_text_raw']!r} ignore_eos={forced_ids}")


@torch.no_grad()
def windowed_nll(model, ids: list, window: int, stride: int):
    """(total NLL, scored tokens) for one token list under the documented convention."""
    if not 0 < stride <= window:
        raise ValueError("need 0 < stride <= window so that every token is scored")
    n = len(ids)
    ids_t = torch.tensor(ids, dtype=torch.long)
    total, count, prev_end, begin = 0.0, 0, 0, 0
    while n > 1:
        end = min(begin + window, n)
        logits = forward_logits(model, ids_t[begin:end])
        first = max(prev_end, begin + 1)
        if first < end:
            nll = token_nlls(logits, ids_t[begin:end])  # nll[j] scores position begin + j + 1
            total += nll[first - begin - 1:].sum().item()
            count += end - first
        prev_end = end
        if end == n:
            break
        begin += stride
    return total, count


def make_perplexity(args) -> None:
    tok, model = load_smollm2(gguf_path(args.gguf))
    txt = ROOT / "tests/data/perplexity.txt"
    jsonl = ROOT / "tests/data/perplexity.jsonl"
    cases = []

    def add(file: Path, texts: list, window: int, stride: int):
        total, tokens = 0.0, 0
        for text in texts:
            ids = tok(text, add_special_tokens=True).input_ids
            t, c = windowed_nll(model, ids, window, stride)
            assert c == len(ids) - 1, "every token but the first must be scored once"
            total += t
            tokens += c
        nll = total / tokens
        cases.append({"file": str(file.relative_to(ROOT)), "window": window, "stride": stride,
                      "tokens": tokens, "nll": nll, "perplexity": math.exp(nll)})
        print(f"  {cases[-1]}")

    text = txt.read_text()
    add(txt, [text], 2048, 1024)
    add(txt, [text], 256, 128)
    lines = [json.loads(l)["text"] for l in jsonl.read_text().splitlines() if l.strip()]
    add(jsonl, lines, 2048, 1024)
    write_json(ROOT / "tests/fixtures/smollm2/perplexity.json", {"cases": cases})


HF_EXPORT_VERBATIM = ["config.json", "generation_config.json", "tokenizer_config.json",
                      "chat_template.jinja"]
HF_EXPORT_GZIPPED = ["tokenizer.json"]


def _tensor_record(arr: np.ndarray) -> dict:
    flat = arr.reshape(-1)
    n = flat.size
    # First, last and six evenly spaced elements between them.
    idx = sorted({int(round(x)) for x in np.linspace(0, n - 1, 8)})
    return {
        "dtype": {np.dtype("float32"): "F32"}[arr.dtype],
        "shape": list(arr.shape),
        "crc32": zlib.crc32(np.ascontiguousarray(arr, dtype="<f4").tobytes()),
        "sum": float(flat.astype(np.float64).sum()),
        "samples": [[i, float(flat[i])] for i in idx],  # exact: every f32 is an f64
    }


def make_hf_export(args) -> None:
    from safetensors.numpy import load_file
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(args.gguf)
    tok, model = load_smollm2(path)
    # The weights are dequantized already; without this the saved config would claim a GGUF
    # quantization that the safetensors file does not have (as scripts/convert-smollm2-hf.sh).
    model.config.quantization_config = None
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    out_dir = ROOT / "tests/fixtures/smollm2/hf-export"
    with tempfile.TemporaryDirectory(prefix="ferrotune-hf-export-") as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        saved = sorted(p.name for p in tmp.iterdir())
        expected = sorted(HF_EXPORT_VERBATIM + HF_EXPORT_GZIPPED + ["model.safetensors"])
        if saved != expected:
            raise SystemExit(f"save_pretrained wrote {saved}, expected {expected}: update "
                             "HF_EXPORT_VERBATIM / HF_EXPORT_GZIPPED and the Rust tests")

        # The saved folder must be the GGUF model: same tokens, bit-identical logits.
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager").eval()
        tok2 = AutoTokenizer.from_pretrained(tmp)
        text = tok.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True, tokenize=False)
        if tok2.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True,
                                    tokenize=False) != text:
            raise SystemExit("the saved tokenizer renders the chat template differently")
        ids = tok(text, add_special_tokens=False).input_ids
        if tok2(text, add_special_tokens=False).input_ids != ids:
            raise SystemExit("the saved tokenizer tokenizes differently")
        if not torch.equal(forward_logits(model, ids), forward_logits(reloaded, ids)):
            raise SystemExit("the saved folder's logits differ from the GGUF model's")

        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        files = {}
        for name in HF_EXPORT_VERBATIM + HF_EXPORT_GZIPPED:
            data = (tmp / name).read_bytes()
            stored = name if name in HF_EXPORT_VERBATIM else name + ".gz"
            if name in HF_EXPORT_VERBATIM:
                (out_dir / stored).write_bytes(data)
            else:
                (out_dir / stored).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
            files[name] = {"stored_as": stored, "bytes": len(data), "crc32": zlib.crc32(data)}
            print(f"wrote {(out_dir / stored).relative_to(ROOT)} "
                  f"({(out_dir / stored).stat().st_size} bytes)")
        weights = load_file(str(tmp / "model.safetensors"))
        tensors = {name: _tensor_record(weights[name]) for name in sorted(weights)}
    write_json(out_dir / "manifest.json", {
        "source": f"transformers save_pretrained of AutoModelForCausalLM.from_pretrained("
                  f"gguf_file={path.name}, dtype=float32) and its AutoTokenizer",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf": path.name,
        "files": files,
        "tensors": tensors,
    })
    print(f"  {len(tensors)} tensors, {sum(int(np.prod(t['shape'])) for t in tensors.values())} "
          f"values; prompt tokens {len(ids)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["tiny", "smollm2", "perplexity", "hf-export", "all"])
    ap.add_argument("--gguf", help=f"path to {GGUF_NAME}")
    ap.add_argument("--only", nargs="*", help="tiny: restrict to these model names")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.what in ("tiny", "all"):
        make_tiny(args.only)
    if args.what in ("smollm2", "all"):
        make_smollm2(args)
    if args.what in ("perplexity", "all"):
        make_perplexity(args)
    if args.what in ("hf-export", "all"):
        make_hf_export(args)


if __name__ == "__main__":
    sys.exit(main())
