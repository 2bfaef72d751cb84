#!/usr/bin/env python3
"""Parameter counts for `ferrotune plan`, from transformers + PEFT (never from ferrotune).

Usage (from the repository root):

    .venv/bin/python reference/plan_counts.py      # writes tests/fixtures/plan/counts.json

For each config folder below, the model its config.json names (`architectures[0]`) is built on
the meta device (no weights), and the script records:
  - "params": sum of numel over model.parameters() (a tied tensor once). T5: transformers 5
    reads `tie_word_embeddings: false` as untying the stacks' `embed_tokens` from `shared` too,
    while the saved folders (written by transformers' save_pretrained) hold them once as `shared`;
    the flag is set as the file says and the stacks' copies are counted once, and the result is
    checked against the tensors in the folder's model.safetensors;
  - "lora": trainable parameters after get_peft_model with LoraConfig(r, target_modules) for
    each case: PEFT's default targets for the family (target_modules=None), "all-linear", and
    DoRA (use_dora=True) on the default targets;
  - "prompt_tuning": trainable parameters of PromptTuningConfig(num_virtual_tokens=20).

counts.json: {"models": [{"dir": <folder relative to tests/fixtures>, "params": int,
  "lora": [{"r": int, "targets": null | "all-linear", "dora": bool, "trainable": int}, ...],
  "prompt_tuning": {"virtual_tokens": 20, "trainable": int}}]}
"""
import json
import math
import os
import sys

import torch
import transformers
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DIRS = [
    "models/tiny-llama-gqa-untied",
    "models/tiny-llama-mha-tied",
    "models/tiny-qwen2",
    "models/tiny-llama-head-dim",
    "smollm2/hf-export",
    "t5/t5-v1_1",
    "t5/t5-v1_0",
    "bert/tiny-bert",
    "bert/tiny-roberta",
]


def build(cfg):
    arch = cfg.architectures[0]
    cls = getattr(transformers, arch)
    with torch.device("meta"):
        return cls(cfg)


def task_type(cfg):
    if cfg.model_type in ("t5", "mt5"):
        return TaskType.SEQ_2_SEQ_LM
    if cfg.model_type in ("bert", "roberta"):
        return TaskType.FEATURE_EXTRACTION
    return TaskType.CAUSAL_LM


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main():
    out = []
    for d in DIRS:
        folder = os.path.join(FIXTURES, d)
        cfg = transformers.AutoConfig.from_pretrained(folder)
        if cfg.model_type in ("t5", "mt5"):
            with open(os.path.join(folder, "config.json")) as f:
                cfg.tie_word_embeddings = json.load(f).get("tie_word_embeddings", True)
            params = sum(p.numel() for n, p in build(cfg).named_parameters()
                         if not n.endswith("embed_tokens.weight"))
            from safetensors import safe_open
            with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
                saved = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            assert params == saved, (d, params, saved)
        else:
            params = sum(p.numel() for p in build(cfg).parameters())
        cases = []
        family = cfg.model_type
        targets = [None, "all-linear"] if family not in ("bert", "roberta") else [None]
        for r in (8, 16):
            for t in targets:
                lc = LoraConfig(r=r, target_modules=t, task_type=task_type(cfg))
                cases.append({"r": r, "targets": t, "dora": False,
                              "trainable": trainable(get_peft_model(build(cfg), lc))})
        lc = LoraConfig(r=8, use_dora=True, task_type=task_type(cfg))
        cases.append({"r": 8, "targets": None, "dora": True,
                      "trainable": trainable(get_peft_model(build(cfg), lc))})
        pc = PromptTuningConfig(num_virtual_tokens=20, task_type=task_type(cfg))
        pt = trainable(get_peft_model(build(cfg), pc))
        out.append({"dir": d, "params": params, "lora": cases,
                    "prompt_tuning": {"virtual_tokens": 20, "trainable": pt}})
        print(d, params, [c["trainable"] for c in cases], pt, file=sys.stderr)
    path = os.path.join(FIXTURES, "plan", "counts.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"models": out}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
