#!/usr/bin/env python3
"""tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf: the tiny Llama 3 RoPE-scaling model as a GGUF,
written the way llama.cpp's convert_hf_to_gguf.py writes a Llama 3.1 model.

Usage (from the repository root, with the reference environment of scripts/setup-reference.sh):

    .venv/bin/python reference/tiny_gguf_fixture.py                    # write the file
    .venv/bin/python reference/tiny_gguf_fixture.py --check-llama-cpp  # and run it in llama.cpp

`--check-llama-cpp` evaluates the written file with llama-cpp-python (f32 KV cache, one thread)
and compares its logits with transformers' (expected.json): llama.cpp itself must accept the file
and reproduce the model (measured: max |diff| 1.1e-5), so the fixture tests ferrotune against
llama.cpp's reading of the format, not against ferrotune's own.

Input: tests/fixtures/models/tiny-llama3-rope-scaling/ (config.json + model.safetensors, written by
reference/make_fixtures.py). Its transformers logits are that folder's expected.json, which the
GGUF must reproduce (crates/ferrotune/tests/fidelity.rs).

What llama.cpp's converter does and this script repeats (LlamaModel in convert_hf_to_gguf.py):
* hparams are `AutoConfig.from_pretrained(dir).to_dict()`;
* metadata: context_length, embedding_length, feed_forward_length, block_count, head_count,
  head_count_kv, rope.freq_base, layer_norm_rms_epsilon, key_length / value_length (the config
  has head_dim), file_type, vocab_size, rope.dimension_count; no rope.scaling.type for llama3
  (the scaling travels as a tensor);
* `rope_freqs.weight` (generate_extra_tensors, written first): one float32 factor per rotated
  pair, 1 where the wavelength is below original_context / high_freq_factor, `factor` above
  original_context / low_freq_factor, and 1 / ((1 - smooth) / factor + smooth) between, so that
  inference computes inv_freq_i = base^(-2i/d) / rope_freqs[i];
* q_proj / k_proj rows permuted for llama.cpp's interleaved RoPE (`LlamaModel.permute`);
* tensors renamed to llama.cpp's scheme, all float32 (`--outtype f32`).

One deliberate difference: llama.cpp reads `original_max_position_embeddings` from the top level
of the config (`self.hparams.get("original_max_position_embeddings", 8192)`), where no Llama 3.x
config has it, so it always uses 8192, which is the value every Llama 3.1 / 3.2 checkpoint states
in its rope scaling. The tiny model states 64 there; this script reads it from the rope parameters,
as transformers does, so the file is the GGUF of a model whose original context is 64.

The tiny model has no tokenizer; the file gets a small sentencepiece-style vocabulary of exactly
vocab_size (256) tokens (<unk>, <s>, </s>, "▁", printable ASCII, byte-fallback tokens) so that the
CLI can load it.
"""

import argparse
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests/fixtures/models/tiny-llama3-rope-scaling"
OUT = ROOT / "tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf"


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rope_freqs(hparams: dict) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors for rope_type llama3 (torch float32 math)."""
    rope = hparams["rope_parameters"]
    assert rope["rope_type"] == "llama3"
    base = rope.get("rope_theta", 10000.0)
    dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    # See the module docstring: where transformers reads it, not llama.cpp's top-level lookup.
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    assert low_freq_wavelen != high_freq_wavelen
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def vocabulary(n: int):
    """<unk>, <s>, </s>, "▁", printable ASCII, then byte tokens up to n tokens."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581"] + [chr(c) for c in range(0x21, 0x7F)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    byte = 0
    while len(tokens) < n:
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
        byte += 1
    scores = [0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)]
    return tokens, scores, types


def main():
    hp = AutoConfig.from_pretrained(SRC).to_dict()
    sd = load_file(SRC / "model.safetensors")
    n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
    head_dim = hp["head_dim"]

    OUT.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(OUT), "llama")
    w.add_name("tiny-llama3-rope-scaling")
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(hp["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    tokens, scores, types = vocabulary(hp["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(hp["bos_token_id"])
    w.add_eos_token_id(hp["eos_token_id"])
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tensor("rope_freqs.weight", rope_freqs(hp))
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(hp["num_hidden_layers"]):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = permute(t, n_head, n_head)
            elif hf == "self_attn.k_proj":
                t = permute(t, n_head, n_kv)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t, dtype=np.float32))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


def check_llama_cpp():
    from llama_cpp import Llama

    m = Llama(str(OUT), logits_all=True, n_ctx=256, n_threads=1, type_k=0, type_v=0, verbose=False)
    exp = json.loads((SRC / "expected.json").read_text())
    worst = 0.0
    for seq in exp["sequences"]:
        ids = seq["input_ids"]
        m.reset()
        m.eval(ids)
        got = np.array(m.scores[: len(ids)])
        worst = max(worst, float(np.abs(got - np.array(seq["logits"])).max()))
    print(f"llama.cpp vs transformers: max |logit diff| = {worst:.3g}")
    if worst > 1e-4:
        raise SystemExit("llama.cpp does not reproduce the model from this file")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check-llama-cpp", action="store_true")
    args = ap.parse_args()
    main()
    if args.check_llama_cpp:
        check_llama_cpp()
