#!/usr/bin/env python3
"""PEFT round trips for IA3, DoRA and LoRA with rank_pattern / alpha_pattern / rsLoRA, on SmolLM2
(CAUSAL_LM, the f32 HF folder .cache/models/smollm2-hf from scripts/convert-smollm2-hf.sh) and on
the tiny T5 v1.1 (SEQ_2_SEQ_LM, tests/fixtures/t5/t5-v1_1).

Run from the repository root with the reference environment (`scripts/setup-reference.sh`):

    .venv/bin/python reference/peft_variants.py
        (a) writes tests/fixtures/peft/variants/<model>-<variant>-peft/ for every case below:
            an adapter PEFT made (random non-zero weights from a seeded generator, saved with
            save_pretrained) and expected.json (below);
        (d) for each ferrotune-made adapter committed under
            tests/fixtures/peft/variants/<model>-<variant>-ferrotune/ (written by
            `FERROTUNE_WRITE_PEFT_FIXTURE=1 cargo test --release -p ferrotune --test integration
            peft_variants::ferrotune_variant_adapters_for_peft`), loads it in PEFT and writes PEFT's numbers for
            it there as peft_expected.json.

    .venv/bin/python reference/peft_variants.py --ferrotune-fixture-only
        only (d).

    .venv/bin/python reference/peft_variants.py --check DIR
        (b) DIR/<model>-<variant>/ hold adapters ferrotune wrote with its own numbers
            (expected.json), from `cargo test --release -p ferrotune --test integration
            peft_variants::ferrotune_variant_adapters_for_peft -- --nocapture` (prints DIR). Loads each with
            PeftModel.from_pretrained on the same base and compares the mean NLL (1e-4 relative),
            also after merge_and_unload(). Exit status 1 on any mismatch.

Cases (variant: PEFT config; SmolLM2 adapts layers 0 and 1 only, so the files stay small):
  ia3:      IA3Config; SmolLM2: k_proj, v_proj (output scaling) and down_proj (feed-forward,
            input scaling) by regex; T5: PEFT's defaults (k, v, wo; wo feed-forward).
            Vectors 1 + N(0, 0.3²).
  dora:     LoraConfig(use_dora=True, r=2, alpha=4) on q/v; A, B ~ N(0, amp²), magnitudes
            scaled by 1 + N(0, 0.1²).
  patterns: LoraConfig(r=4, alpha=8, use_rslora=True) with rank_pattern and alpha_pattern (a
            suffix key and a regex key each).

expected.json / peft_expected.json: {"input_ids", ("attention_mask", "labels": T5), "nll_mean",
"base_nll_mean", "merged_nll_mean" (after merge_and_unload()), "report"
(print_trainable_parameters with the adapter loaded trainable)}; for T5 also
merged_targets.safetensors: every adapted weight after merge_and_unload().
NLL: SmolLM2 mean of -log p(ids[i+1] | ids[..=i]); T5 transformers' loss over the labels.
One CPU thread, float32, fixed seeds.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, forward_logits, token_nlls, write_json  # noqa: E402
from peft_families import T5_INPUT_IDS, T5_LABELS, T5_MASK, load_t5, report_line, sort_targets, t5_numbers  # noqa: E402

OUT = ROOT / "tests/fixtures/peft/variants"
SMOL = ".cache/models/smollm2-hf"
SMOL_IDS = [1, 9690, 314, 216, 3358, 1524, 28, 2114, 253, 26929, 30, 378, 4159, 314, 5716, 2]
SMOL_LAYERS = r"model\.layers\.[01]\."


def smol_config(variant: str):
    from peft import IA3Config, LoraConfig

    if variant == "ia3":
        return IA3Config(task_type="CAUSAL_LM",
                         target_modules=SMOL_LAYERS + r"(self_attn\.(k_proj|v_proj)|mlp\.down_proj)",
                         feedforward_modules=r".*\.mlp\.down_proj")
    if variant == "dora":
        return LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, use_dora=True,
                          target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1])
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_rslora=True,
                      target_modules=["q_proj", "v_proj", "o_proj"], layers_to_transform=[0, 1],
                      rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3},
                      alpha_pattern={"o_proj": 3, r"layers\.0\.self_attn\.q_proj": 16})


def t5_config(variant: str):
    from peft import IA3Config, LoraConfig

    if variant == "ia3":
        return IA3Config(task_type="SEQ_2_SEQ_LM")
    if variant == "dora":
        return LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=4, use_dora=True,
                          target_modules=["q", "v", "wo"])
    return LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, use_rslora=True,
                      target_modules=["q", "v", "wi_0", "wo"],
                      rank_pattern={"v": 2, r"decoder\.block\.1\.layer\.2\.DenseReluDense\.wo": 3},
                      alpha_pattern={"wi_0": 3, r"encoder\.block\.0\.layer\.0\.SelfAttention\.q": 16})


def load_smol():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).eval()


def smol_nll(model, ids=SMOL_IDS) -> float:
    with torch.no_grad():
        logits = forward_logits(model, ids)
        return float(token_nlls(logits, torch.tensor(ids)).mean())


def numbers(family: str, model, ours=None) -> float:
    if family == "smollm2":
        return smol_nll(model, ours["input_ids"] if ours else SMOL_IDS)
    if ours:
        return t5_numbers(model, ours["input_ids"], ours["attention_mask"], ours["labels"])[1]
    return t5_numbers(model)[1]


def inputs(family: str) -> dict:
    if family == "smollm2":
        return {"input_ids": SMOL_IDS}
    return {"input_ids": T5_INPUT_IDS, "attention_mask": T5_MASK, "labels": T5_LABELS}


@torch.no_grad()
def perturb(model, seed: int, amp: float):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=g)
        if "ia3_l" in name:
            p.copy_(1 + 0.3 * noise)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * noise)
        else:
            p.copy_(amp * noise)


def merged_targets(model) -> dict:
    """The weights of every adapted module after merge_and_unload(), under their HF names."""
    names = [n[len("base_model.model."):] for n, m in model.named_modules()
             if hasattr(m, "base_layer") and n.startswith("base_model.model.")]
    merged = copy.deepcopy(model).merge_and_unload()
    sd = merged.state_dict()
    return {f"{n}.weight": sd[f"{n}.weight"].contiguous() for n in names}


def make_peft_case(family: str, variant: str, seed: int):
    from peft import get_peft_model

    load = load_smol if family == "smollm2" else load_t5
    base_nll = numbers(family, load())
    cfg = smol_config(variant) if family == "smollm2" else t5_config(variant)
    model = get_peft_model(load(), cfg)
    perturb(model, seed, 0.05 if family == "smollm2" else 0.3)
    model.eval()
    d = OUT / f"{family}-{variant}-peft"
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    sort_targets(d)
    nll = numbers(family, model)
    merged = copy.deepcopy(model).merge_and_unload()
    merged_nll = numbers(family, merged)
    if family == "t5":
        save_file(merged_targets(model), d / "merged_targets.safetensors")
    write_json(d / "expected.json", {**inputs(family), "nll_mean": nll, "base_nll_mean": base_nll,
                                     "merged_nll_mean": merged_nll, "report": report_line(model)})
    print(f"{d.relative_to(ROOT)}: nll {nll:.6f} (base {base_nll:.6f}, merged {merged_nll:.6f})")


def peft_numbers_for(family: str, d: Path, ours: dict) -> dict:
    from peft import PeftModel

    load = load_smol if family == "smollm2" else load_t5
    model = PeftModel.from_pretrained(load(), d, is_trainable=True).eval()
    nll = numbers(family, model, ours)
    merged_nll = numbers(family, copy.deepcopy(model).merge_and_unload(), ours)
    return {"nll_mean": nll, "merged_nll_mean": merged_nll, "report": report_line(model),
            "merged": merged_targets(model) if family == "t5" else None}


CASES = [(f, v) for f in ["smollm2", "t5"] for v in ["ia3", "dora", "patterns"]]


def make_ferrotune_expected():
    import peft

    for family, variant in CASES:
        d = OUT / f"{family}-{variant}-ferrotune"
        if not (d / "adapter_model.safetensors").is_file():
            print(f"{d.relative_to(ROOT)}: no adapter (FERROTUNE_WRITE_PEFT_FIXTURE=1 cargo test "
                  "--release -p ferrotune --test integration peft_variants::ferrotune_variant_adapters_for_peft "
                  "writes it); skipped")
            continue
        ours = json.loads((d / "expected.json").read_text())
        nums = peft_numbers_for(family, d, ours)
        merged = nums.pop("merged")
        if merged is not None:
            save_file(merged, d / "peft_merged_targets.safetensors")
        write_json(d / "peft_expected.json", {
            "source": f"PEFT {peft.__version__}: PeftModel.from_pretrained(base, this folder)",
            **{k: ours[k] for k in ("input_ids", "attention_mask", "labels") if k in ours}, **nums})
        print(f"{d.relative_to(ROOT)}: PEFT nll {nums['nll_mean']:.8f}, ours {ours['nll_mean']:.8f}")


def check(dir_: Path) -> int:
    ok = True
    for family, variant in CASES:
        d = dir_ / f"{family}-{variant}"
        if not d.is_dir():
            print(f"{d}: missing")
            ok = False
            continue
        ours = json.loads((d / "expected.json").read_text())
        nums = peft_numbers_for(family, d, ours)
        rel = abs(nums["nll_mean"] - ours["nll_mean"]) / abs(nums["nll_mean"])
        mrel = abs(nums["merged_nll_mean"] - ours["nll_mean"]) / abs(nums["nll_mean"])
        print(f"{family}-{variant}: PEFT nll {nums['nll_mean']:.8f}, ferrotune {ours['nll_mean']:.8f}, "
              f"relative diff {rel:.2e}; PEFT merged {mrel:.2e}")
        ok = ok and rel < 1e-4 and mrel < 1e-4
        if ours.get("report") and ours["report"] != nums["report"]:
            print(f"  report differs: ferrotune `{ours['report']}` vs PEFT `{nums['report']}`")
            ok = False
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
        for i, (family, variant) in enumerate(CASES):
            make_peft_case(family, variant, 100 + i)
    make_ferrotune_expected()
    return 0


if __name__ == "__main__":
    sys.exit(main())
