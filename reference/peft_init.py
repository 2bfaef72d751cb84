#!/usr/bin/env python3
"""PEFT's PiSSA and OLoRA initialisations (`init_lora_weights`) and their conversion for the
original base (`save_pretrained(path_initial_model_for_weight_conversion=...)`), on SmolLM2
layers 0-1 (CAUSAL_LM, the f32 HF folder .cache/models/smollm2-hf) and the tiny T5 v1.1
(SEQ_2_SEQ_LM, tests/fixtures/t5/t5-v1_1).

Run from the repository root with the reference environment (`scripts/setup-reference.sh`):

    .venv/bin/python reference/peft_init.py
        writes tests/fixtures/peft/init/<case>/ for every case below:
          (a) init.json: for every adapted module the init's product s*B@A and the residual base
              weight W - s*B@A that PEFT computed (SVD / QR factors have sign freedom: products
              are compared, not factors). SmolLM2: 64 sampled entries of each (seeded
              positions), their Frobenius norms and sums; T5: init.safetensors holds them whole
              (`<module>.delta`, `<module>.residual`) and, for PiSSA, the exact product from an
              f64 SVD (`<module>.delta_f64`).
          (c) peft/: the adapter PEFT saved after the init and a seeded perturbation of A and B
              (a stand-in for training), unconverted (init_lora_weights = "pissa" / "olora":
              loading it re-runs the init on the base), and peft-converted/: the same adapter
              converted for the original base (rank 2r). expected.json: the inputs and PEFT's
              mean NLL of the perturbed model (`nll_mean`), of the converted adapter on a fresh
              base (`converted_nll_mean`) and of the unconverted one reloaded on a fresh base
              (`reload_nll_mean`); the base's (`base_nll_mean`).
        and (b) PEFT's numbers for the ferrotune-made converted adapters committed under
          tests/fixtures/peft/init/<case>/ferrotune/ (written by `FERROTUNE_WRITE_PEFT_FIXTURE=1
          cargo test --release -p ferrotune --test integration peft_init::ferrotune_init_adapters_for_peft`):
          peft_expected.json (PeftModel.from_pretrained on the ORIGINAL base: mean NLL, and after
          merge_and_unload()).

    .venv/bin/python reference/peft_init.py --ferrotune-fixture-only
        only (b).

    .venv/bin/python reference/peft_init.py --check DIR
        DIR/<case>/ hold converted adapters ferrotune wrote with its own NLL (expected.json),
        from `cargo test --release -p ferrotune --test integration peft_init::ferrotune_init_adapters_for_peft
        -- --nocapture` (prints DIR); compares PEFT's NLL (1e-4 relative). Exit status 1 on any
        mismatch.

Cases: smollm2-pissa (r 2, alpha 4, q/v of layers 0-1), smollm2-olora (r 2, alpha 2, rsLoRA,
q/v of layers 0-1), t5-pissa (r 2, alpha 8, q/v/wo, rank_pattern wo: 3, alpha_pattern v: 2),
t5-olora (r 2, alpha 4, q/k/wi_0). One CPU thread, float32, fixed seeds.
"""

import argparse
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, write_json  # noqa: E402
from peft_families import load_t5, sort_targets  # noqa: E402
from peft_variants import inputs, load_smol, numbers  # noqa: E402

OUT = ROOT / "tests/fixtures/peft/init"
CASES = ["smollm2-pissa", "smollm2-olora", "t5-pissa", "t5-olora"]
SAMPLES = 64


def config(case: str):
    from peft import LoraConfig

    if case == "smollm2-pissa":
        return LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, init_lora_weights="pissa",
                          target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1])
    if case == "smollm2-olora":
        return LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=2, use_rslora=True,
                          init_lora_weights="olora", target_modules=["q_proj", "v_proj"],
                          layers_to_transform=[0, 1])
    if case == "t5-pissa":
        return LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=8, init_lora_weights="pissa",
                          target_modules=["q", "v", "wo"], rank_pattern={"wo": 3},
                          alpha_pattern={"v": 2})
    return LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=4, init_lora_weights="olora",
                      target_modules=["q", "k", "wi_0"])


def family(case: str) -> str:
    return case.split("-")[0]


def load(case: str):
    return load_smol() if family(case) == "smollm2" else load_t5()


def lora_modules(model):
    """(HF module name, LoRA layer) of every adapted module, sorted by name."""
    out = []
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            out.append((n[len("base_model.model."):], m))
    return sorted(out, key=lambda kv: kv[0])


@torch.no_grad()
def init_products(model):
    prods = {}
    for name, m in lora_modules(model):
        s = m.scaling["default"]
        delta = s * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
        prods[name] = (delta.contiguous(), m.base_layer.weight.detach().clone().contiguous())
    return prods


def samples(t: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, t.shape[0], (SAMPLES,), generator=g)
    cols = torch.randint(0, t.shape[1], (SAMPLES,), generator=g)
    return {"rows": rows.tolist(), "cols": cols.tolist(),
            "values": [float(t[r, c]) for r, c in zip(rows, cols)]}


@torch.no_grad()
def perturb(model, seed: int, amp: float):
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(amp * torch.randn(p.shape, generator=g))


def make_case(i: int, case: str):
    from peft import PeftModel, get_peft_model

    fam = family(case)
    d = OUT / case
    d.mkdir(parents=True, exist_ok=True)
    base_nll = numbers(fam, load(case))
    model = get_peft_model(load(case), config(case))
    # (a) the init
    prods = init_products(model)
    if fam == "smollm2":
        info = {}
        for j, (name, (delta, res)) in enumerate(prods.items()):
            info[name] = {
                "scaling": model.base_model.model.get_submodule(name).scaling["default"],
                "delta": {**samples(delta, 1000 + j), "fro": float(delta.double().norm()),
                          "sum": float(delta.double().sum())},
                "residual": {**samples(res, 2000 + j), "fro": float(res.double().norm()),
                             "sum": float(res.double().sum())},
            }
        write_json(d / "init.json", {"modules": info})
    else:
        tensors = {}
        base = load(case).state_dict()
        for name, (delta, res) in prods.items():
            tensors[f"{name}.delta"] = delta
            tensors[f"{name}.residual"] = res
            if case.endswith("pissa"):
                # The exact init, from an f64 SVD: PEFT's f32 one strays from it by up to
                # ~3e-5 where two singular values nearly coincide (sigma_r - sigma_r+1 ~ 0.006).
                m = model.base_model.model.get_submodule(name)
                w = base[f"{name}.weight"].double()
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                r = m.r["default"]
                tensors[f"{name}.delta_f64"] = ((u[:, :r] * s[:r]) @ vh[:r]).float().contiguous()
        save_file(tensors, d / "init.safetensors")
        write_json(d / "init.json", {"modules": sorted(prods)})
    # (c) a "trained" adapter, saved both ways
    with tempfile.TemporaryDirectory() as tmp:
        initial = Path(tmp) / "initial"
        # PEFT's recipe: save the untouched init first (with init_lora_weights = true).
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(initial))
        model.peft_config["default"].init_lora_weights = config(case).init_lora_weights
        perturb(model, 300 + i, 0.02 if fam == "smollm2" else 0.1)
        model.eval()
        nll = numbers(fam, model)
        for sub in ["peft", "peft-converted"]:
            shutil.rmtree(d / sub, ignore_errors=True)
        model.save_pretrained(str(d / "peft"))
        model.save_pretrained(str(d / "peft-converted"),
                              path_initial_model_for_weight_conversion=str(initial))
    for sub in ["peft", "peft-converted"]:
        sort_targets(d / sub)
    converted = PeftModel.from_pretrained(load(case), d / "peft-converted").eval()
    converted_nll = numbers(fam, converted)
    reloaded = PeftModel.from_pretrained(load(case), d / "peft").eval()
    reload_nll = numbers(fam, reloaded)
    write_json(d / "expected.json", {**inputs(fam), "nll_mean": nll, "base_nll_mean": base_nll,
                                     "converted_nll_mean": converted_nll,
                                     "reload_nll_mean": reload_nll})
    print(f"{d.relative_to(ROOT)}: nll {nll:.6f} (base {base_nll:.6f}, converted "
          f"{converted_nll:.6f}, reloaded {reload_nll:.6f})")


def peft_numbers_for(case: str, d: Path, ours: dict) -> dict:
    from peft import PeftModel

    fam = family(case)
    model = PeftModel.from_pretrained(load(case), d).eval()
    nll = numbers(fam, model, ours)
    merged = numbers(fam, copy.deepcopy(model).merge_and_unload(), ours)
    return {"nll_mean": nll, "merged_nll_mean": merged}


def make_ferrotune_expected():
    import peft

    for case in CASES:
        d = OUT / case / "ferrotune"
        if not (d / "adapter_model.safetensors").is_file():
            print(f"{d.relative_to(ROOT)}: no adapter (FERROTUNE_WRITE_PEFT_FIXTURE=1 cargo test "
                  "--release -p ferrotune --test integration peft_init::ferrotune_init_adapters_for_peft writes "
                  "it); skipped")
            continue
        ours = json.loads((d / "expected.json").read_text())
        nums = peft_numbers_for(case, d, ours)
        write_json(d / "peft_expected.json", {
            "source": f"PEFT {peft.__version__}: PeftModel.from_pretrained(original base, this folder)",
            **{k: ours[k] for k in ("input_ids", "attention_mask", "labels") if k in ours}, **nums})
        print(f"{d.relative_to(ROOT)}: PEFT nll {nums['nll_mean']:.8f}, ours {ours['nll_mean']:.8f}")


def check(dir_: Path) -> int:
    ok = True
    for case in CASES:
        d = dir_ / case
        if not d.is_dir():
            print(f"{d}: missing")
            ok = False
            continue
        ours = json.loads((d / "expected.json").read_text())
        nums = peft_numbers_for(case, d, ours)
        rel = abs(nums["nll_mean"] - ours["nll_mean"]) / abs(nums["nll_mean"])
        mrel = abs(nums["merged_nll_mean"] - ours["nll_mean"]) / abs(nums["nll_mean"])
        print(f"{case}: PEFT nll {nums['nll_mean']:.8f}, ferrotune {ours['nll_mean']:.8f}, "
              f"relative diff {rel:.2e}; PEFT merged {mrel:.2e}")
        ok = ok and rel < 1e-4 and mrel < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", type=Path, metavar="DIR")
    ap.add_argument("--ferrotune-fixture-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.check:
        return check(args.check)
    if not args.ferrotune_fixture_only:
        for i, case in enumerate(CASES):
            make_case(i, case)
    make_ferrotune_expected()
    return 0


if __name__ == "__main__":
    sys.exit(main())
