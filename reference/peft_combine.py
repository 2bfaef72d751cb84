#!/usr/bin/env python3
"""PEFT's `add_weighted_adapter` fixtures for ferrotune's `peft combine`.

Run from the repository root with the reference environment (`scripts/setup-reference.sh`):

    .venv/bin/python reference/peft_combine.py

On tests/fixtures/models/tiny-llama-gqa-untied it makes three LoRA adapters with PEFT (random
non-zero A and B from a seeded generator) and writes, under tests/fixtures/peft/combine/:

    a/, b/, c/         the adapters (save_pretrained): a r=4 alpha=8 q_proj+v_proj;
                       b r=4 alpha=16 q_proj+k_proj; c r=2 alpha=4 v_proj+o_proj
    linear/            add_weighted_adapter([a, b], [0.7, -0.4], combination_type="linear")
    cat/               add_weighted_adapter([a, c], [0.5, 1.5], combination_type="cat")
    svd/               add_weighted_adapter([a, c], [1.0, -0.6], combination_type="svd")
    cases.json         the adapters and weights of each case

The Rust test (crates/ferrotune/tests/peft_combine.rs) loads a, b, c, combines them the same
way and compares the tensors with PEFT's (linear and cat: 1e-5; svd: the products B·A, since
singular vectors are defined up to sign). One CPU thread, float32, fixed seeds.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
# Relative (the script runs from the repository root), so the saved configs name no path of
# this machine in base_model_name_or_path.
BASE = "tests/fixtures/models/tiny-llama-gqa-untied"
OUT = ROOT / "tests/fixtures/peft/combine"

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
    "c": dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]),
}
CASES = {
    "linear": (["a", "b"], [0.7, -0.4]),
    "cat": (["a", "c"], [0.5, 1.5]),
    "svd": (["a", "c"], [1.0, -0.6]),
}


def base():
    return AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32).eval()


def make_adapter(name, seed):
    model = get_peft_model(base(), LoraConfig(task_type="CAUSAL_LM", **ADAPTERS[name]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(OUT / name)
    (OUT / name / "README.md").unlink(missing_ok=True)


def main():
    import os

    os.chdir(ROOT)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for i, name in enumerate(ADAPTERS):
        make_adapter(name, 100 + i)
    for case, (names, weights) in CASES.items():
        model = PeftModel.from_pretrained(base(), OUT / names[0], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(OUT / n, adapter_name=n)
        model.add_weighted_adapter(names, weights, case, combination_type=case)
        tmp = OUT / f"_{case}"
        model.save_pretrained(tmp, selected_adapters=[case])
        shutil.move(tmp / case, OUT / case)
        (OUT / case / "README.md").unlink(missing_ok=True)
        shutil.rmtree(tmp)
    cases = {c: {"adapters": n, "weights": w} for c, (n, w) in CASES.items()}
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
