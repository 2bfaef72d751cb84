"""Reference fixtures for ferrotune's bitsandbytes formats (`crates/ferrotune/src/quant/bnb.rs`).

bitsandbytes (0.50.2) on CPU: `quantize_4bit` runs the default torch kernel
(`backends/default/ops.py`: absmax per flat block of 64, `A * (1/absmax)` on full blocks and
`A / absmax` on the last partial one, `bucketize` against the code's midpoints), double quant
runs `_absmax.mean()` and the C++ `quantize_blockwise` (a 65536-entry LUT over the dynamic map),
`dequantize_4bit` the C++ kernel (or the default torch one for odd last dimensions).

Writes `tests/fixtures/bnb/`:
- `random.safetensors`: small tensors (a multiple of 64, odd and non-multiple-of-16 last
  dimensions, zeros, exact midpoints, a NaN block, bf16 input) quantized as NF4 and FP4 with and
  without double quant: `<case>.input`, `<case>.<kind>[_dq].packed|absmax|qabsmax|nested_absmax|
  offset|absmax_f32|dequant`;
- `nested.safetensors`: a bigger tensor (384 blocks: two nested blocks) as NF4 + double quant;
- `smollm2.safetensors`: the first 16 rows of SmolLM2-135M's layer-0 q_proj (NF4+dq, FP4, int8);
- `int8.safetensors`: LLM.int8 weights (`Int8Params`: f16, then `int8_vectorwise_quant`);
- `mean.safetensors`: float32 vectors and their `torch.mean` (the double-quant offset);
- `codes.safetensors`: bnb's NF4 / FP4 / dynamic maps and the FP4 bucket order;
- `tiny-nf4-dq/`, `tiny-int8/`: `tests/fixtures/models/tiny-llama-gqa-untied` loaded by
  transformers with `BitsAndBytesConfig(...)` and saved with `save_pretrained`.

Run: `.venv/bin/python reference/bnb_fixtures.py` (a second run rewrites identical files).
Every check below asserts; the script prints the figures it measured.
"""
import json
import pathlib
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute, _get_4bit_quantize_bounds

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "bnb"
SMOL = ROOT / ".cache" / "models" / "smollm2-hf" / "model.safetensors"
TINY = ROOT / "tests" / "fixtures" / "models" / "tiny-llama-gqa-untied"

# The double-quant offset is `torch.mean`, whose summation order changes with torch's thread
# count above 32768 elements; one thread is what ferrotune reproduces.
torch.set_num_threads(1)


def quant4(name, t, kind, dq, out):
    """Quantize `t` as bnb does and record every piece under `name`."""
    packed, qs = F.quantize_4bit(t, blocksize=64, compress_statistics=dq, quant_type=kind)
    out[f"{name}.packed"] = packed.reshape(-1).contiguous()
    if dq:
        out[f"{name}.qabsmax"] = qs.absmax.contiguous()
        out[f"{name}.nested_absmax"] = qs.state2.absmax.contiguous()
        out[f"{name}.offset"] = qs.offset.reshape(1).float()
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
        out[f"{name}.absmax_f32"] = absmax.float().contiguous()
    else:
        out[f"{name}.absmax"] = qs.absmax.contiguous()
        absmax = qs.absmax
    # The CPU kernel bnb runs (C++; AVX-512 or scalar) and the default torch kernel.
    real = F.dequantize_4bit(packed, qs)
    code = F.get_4bit_type(kind, device="cpu")
    ref = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, 64, qs.shape, qs.dtype)
    r, d = real.float().reshape(-1), ref.float().reshape(-1)
    both_nan = torch.isnan(r) & torch.isnan(d)
    assert bool(((r == d) | both_nan).all()), f"{name}: CPU kernel and default kernel differ"
    signed_zero = int(((r == 0) & (torch.signbit(r) != torch.signbit(d))).sum())
    if signed_zero:
        print(f"  {name}: the C++ scalar kernel writes -0.0 where the code map has +0.0: {signed_zero} values")
    out[f"{name}.dequant"] = ref.reshape(-1).contiguous()
    return packed, qs


def rounding_case():
    """104 values (a full block, then a partial one of 40) where bnb's arithmetic matters: in
    each block, values whose code differs between `x * (1/absmax)` and `x / absmax` (full
    blocks use the first, the partial block the second), for NF4 and FP4."""
    rng = np.random.default_rng(5)
    f32 = np.float32

    def bucket(kind, v):
        b, _ = _get_4bit_quantize_bounds(kind, torch.device("cpu"))
        return int(torch.bucketize(torch.tensor([v], dtype=torch.float32), b)[0])

    blocks = []
    for size in (64, 40):
        a = f32(rng.uniform(0.01, 0.2))
        vals = [a]
        while len(vals) < size:
            kind = ("nf4", "fp4")[len(vals) % 2]
            b, _ = _get_4bit_quantize_bounds(kind, torch.device("cpu"))
            bound = f32(b[rng.integers(0, 15)].item())
            x = f32(bound * a)
            for _ in range(int(rng.integers(-3, 4))):
                x = np.nextafter(x, f32(np.sign(rng.uniform(-1, 1))), dtype=np.float32)
            if abs(x) > a:
                continue
            mul = f32(x * f32(f32(1) / a))
            div = f32(x / a)
            if bucket(kind, float(mul)) != bucket(kind, float(div)):
                vals.append(x)
            elif rng.uniform() < 0.02:
                vals.append(x)  # a plain near-tie now and then
        blocks.append(np.array(vals, dtype=np.float32))
    return torch.from_numpy(np.concatenate(blocks)).reshape(8, 13)


def random_cases():
    g = torch.Generator().manual_seed(13)
    cases = {}
    cases["m64"] = torch.randn(16, 128, generator=g)  # every path: AVX-512 dequant, full blocks
    odd = torch.randn(7, 33, generator=g) * 0.02  # odd last dim: default kernel; partial block
    odd[1, :] = 0.0
    cases["odd"] = odd
    cases["cols50"] = torch.randn(3, 50, generator=g) * 3.0  # scalar C++ kernel, partial block
    # Ties: blocks whose absmax is exactly 1 hold every code and every midpoint between codes,
    # and their neighbours one ulp either side; a block of zeros; a block of -0.0; tiny values.
    rows = []
    for kind in ("nf4", "fp4"):
        b, _ = _get_4bit_quantize_bounds(kind, torch.device("cpu"))
        code = F.get_4bit_type(kind, device="cpu")
        vals = torch.cat([code, b, torch.nextafter(b, torch.tensor(2.0)), torch.nextafter(b, torch.tensor(-2.0))])
        vals = torch.cat([vals, torch.ones(64 - vals.numel())])[:64]
        rows.append(vals)
    rows.append(torch.zeros(64))
    rows.append(-torch.zeros(64))
    tiny = torch.full((64,), 1e-39)
    tiny[0] = -3e-39
    rows.append(tiny)
    cases["ties"] = torch.stack(rows)
    cases["rounding"] = rounding_case()
    nan = torch.randn(2, 64, generator=g)
    nan[0, 5] = float("nan")
    nan[1, 7] = float("inf")
    cases["nonfinite"] = nan
    return cases


def write_codes():
    b_fp4, order = _get_4bit_quantize_bounds("fp4", torch.device("cpu"))
    tensors = {
        "nf4": F.get_4bit_type("nf4", device="cpu"),
        "fp4": F.get_4bit_type("fp4", device="cpu"),
        "fp4_order": order.to(torch.int64),
        "dynamic": F.create_dynamic_map(),
    }
    save_file(tensors, OUT / "codes.safetensors")


def write_random():
    out = {}
    for cname, t in random_cases().items():
        out[f"{cname}.input"] = t.contiguous()
        for kind in ("nf4", "fp4"):
            for dq in (False, True):
                if cname == "nonfinite" and dq:
                    continue  # a NaN absmax makes the mean NaN: nothing left to compare
                quant4(f"{cname}.{kind}{'_dq' if dq else ''}", t, kind, dq, out)
    # bf16 weights: bnb quantizes `A.float()` and dequantizes to the weight's dtype.
    g = torch.Generator().manual_seed(7)
    wb = (torch.randn(4, 64, generator=g) * 0.05).to(torch.bfloat16)
    out["bf16.input"] = wb
    for kind in ("nf4", "fp4"):
        packed, qs = F.quantize_4bit(wb, blocksize=64, compress_statistics=True, quant_type=kind)
        out[f"bf16.{kind}_dq.packed"] = packed.reshape(-1).contiguous()
        out[f"bf16.{kind}_dq.dequant"] = F.dequantize_4bit(packed, qs).reshape(-1).contiguous()
        assert F.dequantize_4bit(packed, qs).dtype == torch.bfloat16
    save_file(out, OUT / "random.safetensors")


def write_nested():
    g = torch.Generator().manual_seed(21)
    t = (torch.randn(24, 1024, generator=g) * 0.03).to(torch.bfloat16).float()
    out = {"big.input": t.to(torch.bfloat16)}
    quant4("big.nf4_dq", t, "nf4", True, out)
    del out["big.nf4_dq.dequant"]  # absmax_f32 and the packed codes determine it
    save_file(out, OUT / "nested.safetensors")


def int8_quant(w):
    """What `Linear8bitLt` stores for a weight (`Int8Params._quantize` on CPU)."""
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    p = p.to("cpu")
    ref_cb, ref_scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal(p.data, ref_cb) and torch.equal(p.SCB, ref_scb)
    return p.data.contiguous(), p.SCB.contiguous()


def write_int8():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(16, 64, generator=g) * 0.1
    w[3] = 0.0
    # Ties: row absmax 127 (exact in f16) so that `w * (127/127)` lands on .5 values.
    w[4] = torch.arange(64, dtype=torch.float32) - 31.5
    w[4, 0] = 127.0
    w[5] = 1e5  # beyond f16: inf after the cast
    w[5, 1] = 1.0
    out = {"w.input": w}
    out["w.CB"], out["w.SCB"] = int8_quant(w)
    save_file(out, OUT / "int8.safetensors")


def write_smollm2():
    from safetensors import safe_open

    with safe_open(SMOL, "pt") as f:
        q = f.get_slice("model.layers.0.self_attn.q_proj.weight")[0:16, :].contiguous()
    out = {"q.input": q}
    quant4("q.nf4_dq", q, "nf4", True, out)
    quant4("q.fp4", q, "fp4", False, out)
    out["q.CB"], out["q.SCB"] = int8_quant(q)
    save_file(out, OUT / "smollm2.safetensors")


def write_mean():
    g = torch.Generator().manual_seed(3)
    out = {}
    for n in (1, 15, 16, 17, 129, 1000, 5184, 13824):
        v = torch.rand(n, generator=g) * 0.1
        out[f"v{n}"] = v
        out[f"v{n}.mean"] = v.mean().reshape(1)
    save_file(out, OUT / "mean.safetensors")


def save_tiny(qconfig, name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, quantization_config=qconfig, dtype=torch.float32)
    dst = OUT / name
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst)
    return model


def write_tiny():
    from transformers import BitsAndBytesConfig

    m4 = save_tiny(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        "tiny-nf4-dq",
    )
    save_tiny(BitsAndBytesConfig(load_in_8bit=True), "tiny-int8")
    ids = torch.tensor([[1, 5, 9, 77, 200, 3, 42]])
    with torch.no_grad():
        # On a CPU with AVX512-BF16, Linear4bit repacks its weight and multiplies in bf16 (about
        # 0.1 off in these logits); without it, bnb dequantizes to f32 and runs an f32 matmul,
        # which is what ferrotune's dequantized load computes.
        logits_bf16 = m4(ids).logits[0]
        m4 = AutoModelForCausalLM_from(OUT / "tiny-nf4-dq")
        for mod in m4.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.support_avx512bf16_for_cpu = False
        logits = m4(ids).logits[0]
    print(f"  tiny-nf4-dq: bf16 CPU kernel vs f32 dequant path: max |delta logit| = {(logits - logits_bf16).abs().max().item():.3e}")
    save_file({"ids": ids[0], "logits": logits.contiguous()}, OUT / "tiny-nf4-dq.logits.safetensors")


def AutoModelForCausalLM_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    write_codes()
    write_random()
    write_nested()
    write_int8()
    write_smollm2()
    write_mean()
    write_tiny()
    meta = {
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    import transformers

    meta["transformers"] = transformers.__version__
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
