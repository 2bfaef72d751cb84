#!/usr/bin/env python3
"""PEFT (LoRA) compatibility fixtures and checks for ferrotune's `peft` module.

Run from the repository root, with the reference environment (`scripts/setup-reference.sh`):

    .venv/bin/python reference/peft_check.py
        (a) writes tests/fixtures/peft/tiny-lora-peft/ : a LoRA made by PEFT on
            tests/fixtures/models/tiny-llama-gqa-untied (r=4, alpha=8, q_proj+v_proj, random
            non-zero A and B from a seeded generator), saved with save_pretrained, plus
              expected.json               input_ids, PEFT logits [T, vocab], nll_mean, and the
                                          target-matching cases below
              merged_targets.safetensors  the q_proj/v_proj weights after merge_and_unload()
            and tests/fixtures/peft/matching.json: for several target_modules configs, the
            module names PEFT wraps and its print_trainable_parameters() line.
        (d) loads the committed adapter ferrotune wrote, tests/fixtures/peft/tiny-lora-ferrotune/
            (adapter_config.json, adapter_model.safetensors), into PEFT and writes PEFT's own
            numbers for it there, which the Rust test compares with ferrotune's:
              peft_expected.json               input_ids, PEFT logits [T, vocab], nll_mean,
                                               merged_nll_mean (after merge_and_unload()), report
              peft_merged_targets.safetensors  every adapted weight after merge_and_unload()

    .venv/bin/python reference/peft_check.py --ferrotune-fixture-only
        only (d).

    .venv/bin/python reference/peft_check.py --check-ours DIR
        (b) loads the adapter ferrotune wrote in DIR into PEFT on the same base, computes PEFT's
            logits and mean NLL on DIR/expected.json's input_ids and asserts they equal
            ferrotune's (expected.json "logits" within 1e-4 absolute, "nll_mean" within 1e-4
            relative); (c) runs merge_and_unload() and asserts the merged weights equal
            ferrotune's merged weights in DIR/merged_targets.safetensors (1e-5 absolute) and
            that the merged model's NLL is unchanged. Exit status 1 on any mismatch.
        DIR is the temp folder printed by
        `cargo test --release -p ferrotune --test integration peft_lora::ferrotune_adapter_for_peft -- --nocapture`
        (FERROTUNE_WRITE_PEFT_FIXTURE=1 makes that test rewrite the committed adapter instead:
        then run (d) again).

NLL convention (same as reference/make_fixtures.py): nll_mean is the mean over i of
-log p(ids[i+1] | ids[..=i]), log-softmax in float64 of the float32 logits. One CPU thread,
float32, fixed seeds: regenerating gives the same files with the same library versions.
"""

import argparse
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, forward_logits, token_nlls, write_json  # noqa: E402

BASE = "tests/fixtures/models/tiny-llama-gqa-untied"
PEFT_DIR = ROOT / "tests/fixtures/peft/tiny-lora-peft"
OURS_DIR = ROOT / "tests/fixtures/peft/tiny-lora-ferrotune"
MATCHING = ROOT / "tests/fixtures/peft/matching.json"
INPUT_IDS = [(i * 37 + 11) % 256 for i in range(24)]

# target_modules cases for the matching fixture: (config kwargs, what it exercises).
MATCH_CASES = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules="all-linear"),
    dict(r=2, lora_alpha=4, target_modules=r".*\.1\.mlp\..*_proj"),
    dict(r=4, lora_alpha=8, target_modules=["self_attn.o_proj", "lm_head"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
         rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 3}, alpha_pattern={"up_proj": 32}),
    dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["k_proj"]),
]


def load_base():
    from transformers import AutoModelForCausalLM

    # A relative path keeps base_model_name_or_path in the saved config machine-independent.
    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def report_line(model) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def logits_and_nll(model, ids):
    logits = forward_logits(model, ids)
    nll = float(token_nlls(logits, torch.tensor(ids)).mean())
    return logits, nll


def merged_targets(peft_model) -> dict:
    """merge_and_unload() on a copy; the merged weight of every module that had a LoRA."""
    targets = [n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    merged = copy.deepcopy(peft_model).merge_and_unload()
    mods = dict(merged.named_modules())
    return {f"{n}.weight": mods[n].weight.detach().clone().contiguous() for n in targets}, merged


def make_matching():
    from peft import LoraConfig, get_peft_model

    cases = []
    for kw in MATCH_CASES:
        model = get_peft_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **kw))
        mods = [n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")]
        ranks = [model.base_model.model.get_submodule(n).r["default"] for n in mods]
        scales = [model.base_model.model.get_submodule(n).scaling["default"] for n in mods]
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in kw.items()}
        cases.append(dict(config=cfg, modules=mods, ranks=ranks, scales=scales,
                          report=report_line(model)))
        print(f"{kw['target_modules']}: {len(mods)} modules; {cases[-1]['report']}")
    write_json(MATCHING, {"cases": cases})


def make_peft_fixture():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     task_type="CAUSAL_LM")
    model = get_peft_model(load_base(), cfg)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                # Non-zero B, so the adapter changes the logits; 0.2 keeps them in a sane range.
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    PEFT_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(PEFT_DIR)
    (PEFT_DIR / "README.md").unlink(missing_ok=True)  # PEFT's model-card boilerplate
    # PEFT keeps target_modules as a set, saved in hash order: sort it so reruns write the same file.
    cfg_path = PEFT_DIR / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    print(f"wrote {PEFT_DIR.relative_to(ROOT)}/adapter_config.json, adapter_model.safetensors")
    logits, nll = logits_and_nll(model, INPUT_IDS)
    _, base_nll = logits_and_nll(load_base(), INPUT_IDS)
    weights, merged = merged_targets(model)
    _, merged_nll = logits_and_nll(merged, INPUT_IDS)
    assert abs(merged_nll - nll) < 1e-5 * abs(nll), (merged_nll, nll)
    save_file(weights, str(PEFT_DIR / "merged_targets.safetensors"))
    write_json(PEFT_DIR / "expected.json", {
        "input_ids": INPUT_IDS,
        "logits": logits,
        "nll_mean": nll,
        "base_nll_mean": base_nll,
        "report": report_line(model),
    })
    print(f"PEFT adapter: nll_mean {nll:.6f} (base {base_nll:.6f}), merged nll {merged_nll:.6f}")


def make_ferrotune_adapter_expected(d: Path = OURS_DIR):
    """PEFT's logits, NLL and merged weights for the adapter ferrotune wrote in d."""
    import peft
    from peft import PeftModel

    for name in ["adapter_config.json", "adapter_model.safetensors"]:
        if not (d / name).is_file():
            raise SystemExit(f"{d / name}: missing (FERROTUNE_WRITE_PEFT_FIXTURE=1 cargo test "
                             "--release -p ferrotune --test integration peft_lora::ferrotune_adapter_for_peft "
                             "writes it)")
    # is_trainable: the report then counts the adapter's parameters, as ferrotune's load does.
    model = PeftModel.from_pretrained(load_base(), d, is_trainable=True).eval()
    logits, nll = logits_and_nll(model, INPUT_IDS)
    weights, merged = merged_targets(model)
    _, merged_nll = logits_and_nll(merged, INPUT_IDS)
    assert abs(merged_nll - nll) < 1e-5 * abs(nll), (merged_nll, nll)
    save_file(weights, str(d / "peft_merged_targets.safetensors"))
    write_json(d / "peft_expected.json", {
        "source": f"PEFT {peft.__version__}: PeftModel.from_pretrained({BASE}, this folder)",
        "input_ids": INPUT_IDS,
        "logits": logits,
        "nll_mean": nll,
        "merged_nll_mean": merged_nll,
        "report": report_line(model),
    })
    print(f"PEFT on ferrotune's adapter: nll_mean {nll:.8f}, merged {merged_nll:.8f}, "
          f"{len(weights)} merged weights")


def check_ours(d: Path) -> int:
    from peft import PeftModel

    exp = json.loads((d / "expected.json").read_text())
    ids = exp["input_ids"]
    model = PeftModel.from_pretrained(load_base(), d).eval()
    logits, nll = logits_and_nll(model, ids)
    ours = torch.tensor(exp["logits"], dtype=torch.float32)
    dlogit = float((logits - ours).abs().max())
    rel = abs(nll - exp["nll_mean"]) / abs(exp["nll_mean"])
    print(f"{d}: PEFT nll_mean {nll:.8f}, ferrotune {exp['nll_mean']:.8f}, "
          f"relative diff {rel:.2e}; max |logit diff| {dlogit:.2e}")
    ok = rel < 1e-4 and dlogit < 1e-4
    weights, merged = merged_targets(model)
    theirs = load_file(str(d / "merged_targets.safetensors"))
    if sorted(theirs) != sorted(weights):
        print(f"merged weights: module sets differ: PEFT {sorted(weights)} vs ferrotune {sorted(theirs)}")
        ok = False
    else:
        dw = max(float((weights[k] - theirs[k]).abs().max()) for k in weights)
        print(f"merge_and_unload: {len(weights)} weights, max |PEFT - ferrotune| {dw:.2e}")
        ok = ok and dw < 1e-5
    _, merged_nll = logits_and_nll(merged, ids)
    mrel = abs(merged_nll - exp["nll_mean"]) / abs(exp["nll_mean"])
    print(f"merged model: PEFT nll_mean {merged_nll:.8f}, relative diff to ferrotune {mrel:.2e}")
    ok = ok and mrel < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check-ours", type=Path, metavar="DIR",
                    help="verify an adapter folder written by ferrotune against PEFT")
    ap.add_argument("--ferrotune-fixture-only", action="store_true",
                    help="only write PEFT's numbers for tests/fixtures/peft/tiny-lora-ferrotune")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.check_ours:
        return check_ours(args.check_ours)
    if not args.ferrotune_fixture_only:
        make_peft_fixture()
        make_matching()
    make_ferrotune_adapter_expected()
    return 0


if __name__ == "__main__":
    sys.exit(main())
