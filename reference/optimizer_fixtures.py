"""Expected parameters after a few updates of each optimizer ferrotune implements, from the
reference implementations: torch.optim.SGD, transformers' Adafactor, bitsandbytes' AdamW8bit.

Writes tests/fixtures/optim/optimizers.json:
  params: {name: {"shape": [...], "data": [...]}}       the initial values (f32)
  grads:  [{name: [...]}, ...]                          one gradient per update (flat)
  qmap_signed, qmap_unsigned: bitsandbytes' dynamic quantization maps (256 values each)
  cases:  [{"name", "optimizer", "config", "lr", "expected": {name: [...]}}]
          `config` uses ferrotune's [train] keys (weight_decay, betas, eps) and the keys of
          [train.sgd] / [train.adafactor] / [train.adamw_8bit].
`cargo test -p ferrotune --test integration optimizers::` checks ferrotune against it.

Run: .venv/bin/python reference/optimizer_fixtures.py   (a few seconds, CPU, one thread)
"""
import json
import os

import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "optim", "optimizers.json")
STEPS = 4


def initial():
    g = torch.Generator().manual_seed(11)
    params = {
        # 640 values: 2.5 blocks of 256 (a partial last block) when quantized
        "w": torch.randn(8, 80, generator=g) * 0.5,
        "b": torch.randn(40, generator=g) * 0.1,
    }
    grads = [
        {k: torch.randn(v.shape, generator=g) * (0.1 * (s + 1)) for k, v in params.items()}
        for s in range(STEPS)
    ]
    return params, grads


def run(make, lr_free=False):
    params, grads = initial()
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make(list(ps.values()))
    for step in grads:
        for k, p in ps.items():
            p.grad = step[k].clone()
        opt.step()
    return {k: p.detach().reshape(-1).tolist() for k, p in ps.items()}


def quantize_nearest(A, code, absmax_out, out_uint8, blocksize):
    """bitsandbytes.backends.default's quantize_blockwise: per block x / absmax, then the code
    whose midpoints bracket it (the nearest)."""
    a = A.reshape(-1).float()
    n = a.numel()
    absmax = torch.stack([a[i:i + blocksize].abs().max() for i in range(0, n, blocksize)])
    scaled = torch.cat([
        torch.clamp(a[i:i + blocksize] * (1.0 / absmax[i // blocksize].clamp(min=1e-38)), -1, 1)
        for i in range(0, n, blocksize)
    ])
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    out_uint8.copy_(q.reshape(out_uint8.shape))
    absmax_out.copy_(absmax)


def dequantize(A_uint8, absmax, code, blocksize):
    v = code[A_uint8.reshape(-1).long()]
    out = torch.cat([v[i:i + blocksize] * absmax[i // blocksize] for i in range(0, v.numel(), blocksize)])
    return out.reshape(A_uint8.shape)


def main():
    from transformers.optimization import Adafactor
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    cases = []

    def case(name, optimizer, config, lr, make):
        cases.append({"name": name, "optimizer": optimizer, "config": config, "lr": lr,
                      "expected": run(make)})

    case("sgd_nesterov_wd", "sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, 0.05,
         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01))
    case("sgd_dampening", "sgd", {"momentum": 0.8, "dampening": 0.1}, 0.1,
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.1))
    case("sgd_plain", "sgd", {}, 0.1, lambda ps: torch.optim.SGD(ps, lr=0.1))
    # transformers' defaults: its own relative-step schedule and parameter scale
    case("adafactor_relative_step", "adafactor",
         {"scale_parameter": True, "relative_step": True, "warmup_init": False}, 0.0,
         lambda ps: Adafactor(ps, lr=None))
    case("adafactor_warmup_init", "adafactor",
         {"scale_parameter": True, "relative_step": True, "warmup_init": True, "weight_decay": 0.1}, 0.0,
         lambda ps: Adafactor(ps, lr=None, warmup_init=True, weight_decay=0.1))
    # HF Trainer's choice: an external lr, with a first moment and clipping that bites
    case("adafactor_lr_beta1", "adafactor",
         {"scale_parameter": False, "relative_step": False, "beta1": 0.9, "clip_threshold": 0.5,
          "decay_rate": -0.7, "weight_decay": 0.05}, 0.01,
         lambda ps: Adafactor(ps, lr=0.01, scale_parameter=False, relative_step=False, beta1=0.9,
                              clip_threshold=0.5, decay_rate=-0.7, weight_decay=0.05))
    # 8-bit states for w (min_8bit_size 256), f32 states for b (40 values), as bnb decides.
    cfg8 = {"min_8bit_size": 256, "betas": [0.9, 0.995], "eps": 1e-8, "weight_decay": 0.01}
    make8 = lambda ps: bnb.optim.AdamW8bit(ps, lr=0.01, betas=(0.9, 0.995), eps=1e-8,
                                           weight_decay=0.01, min_8bit_size=256)
    # bnb's CPU kernel as shipped: its native quantizer finds codes with an approximate search
    # that maps some small values to a code that is not the nearest (e.g. 4e-6 to 1.6e-5), so
    # the test compares with a looser bound.
    case("adamw_8bit_bnb_cpu", "adamw_8bit", cfg8, 0.01, make8)
    # The same bnb update with nearest-code quantization (bnb's `default` torch backend, which
    # is what its CUDA kernel computes): ferrotune quantizes this way.
    cpu_ops = bnb.backends.cpu.ops
    saved = (cpu_ops._quant_blockwise_fp32_direct, cpu_ops._dequant_blockwise_fp32_direct)
    cpu_ops._quant_blockwise_fp32_direct = quantize_nearest
    cpu_ops._dequant_blockwise_fp32_direct = dequantize
    case("adamw_8bit", "adamw_8bit", cfg8, 0.01, make8)
    cpu_ops._quant_blockwise_fp32_direct, cpu_ops._dequant_blockwise_fp32_direct = saved

    params, grads = initial()
    out = {
        "params": {k: {"shape": list(v.shape), "data": v.reshape(-1).tolist()} for k, v in params.items()},
        "grads": [{k: v.reshape(-1).tolist() for k, v in s.items()} for s in grads],
        "qmap_signed": F.create_dynamic_map(signed=True).tolist(),
        "qmap_unsigned": F.create_dynamic_map(signed=False).tolist(),
        "versions": {"torch": torch.__version__, "bitsandbytes": bnb.__version__},
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f)
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
