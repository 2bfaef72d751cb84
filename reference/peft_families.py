#!/usr/bin/env python3
"""PEFT LoRA round trips for the T5 (SEQ_2_SEQ_LM) and BERT / RoBERTa (SEQ_CLS) families.

Run from the repository root with the reference environment (`scripts/setup-reference.sh`):

    .venv/bin/python reference/peft_families.py
        (a) writes PEFT-made adapters on the tiny models of reference/t5_fixtures.py and
            reference/bert_fixtures.py, each with random non-zero LoRA A and B (and, for SEQ_CLS,
            a perturbed classifier copy, so the saved head differs from the base's):
              tests/fixtures/peft/t5-lora-peft/       T5 v1.1 (tests/fixtures/t5/t5-v1_1),
                  task_type SEQ_2_SEQ_LM, r=4, alpha=8, on q, k, v, o, wi_0, wi_1, wo
              tests/fixtures/peft/bert-lora-peft/     tiny BERT (tests/fixtures/bert/tiny-bert),
              tests/fixtures/peft/roberta-lora-peft/  tiny RoBERTa (tests/fixtures/bert/tiny-roberta),
                  task_type SEQ_CLS, r=4, alpha=8, on query and value; modules_to_save left unset,
                  so PEFT adds ["classifier", "score"] itself and saves the head's copy
            each with adapter_config.json, adapter_model.safetensors (save_pretrained) and
            expected.json (below).
        (d) for each ferrotune-made adapter committed under tests/fixtures/peft/
            {t5,bert}-lora-ferrotune/ (written by `FERROTUNE_WRITE_PEFT_FIXTURE=1 cargo test
            --release -p ferrotune --test integration peft_families::ferrotune_family_adapters_for_peft`), loads
            it in PEFT and writes PEFT's numbers for it there as peft_expected.json.

    .venv/bin/python reference/peft_families.py --ferrotune-fixture-only
        only (d).

    .venv/bin/python reference/peft_families.py --check DIR
        (b) DIR/t5 and DIR/bert hold adapters ferrotune wrote with its own numbers
            (expected.json), from `cargo test --release -p ferrotune --test integration
            peft_families::ferrotune_family_adapters_for_peft -- --nocapture`, which prints DIR. Loads each in
            PEFT (PeftModel.from_pretrained on the same base) and compares: T5 mean NLL within 1e-4
            relative; BERT logits within 1e-4 relative (max |PEFT - ferrotune| / max |PEFT|);
            merge_and_unload() must keep PEFT's numbers. Exit status 1 on any mismatch.

expected.json / peft_expected.json:
  T5:   {"input_ids": [b][s], "attention_mask": [b][s], "labels": [b][t] (-100 = no loss),
         "nll_mean": transformers' loss (mean CE over labelled tokens, float64 from float32
         logits), "logits": [b][t][vocab], "base_nll_mean", "report"}
  BERT: {"input_ids", "token_type_ids", "attention_mask": [b][t], "logits": [b][num_labels],
         "base_logits", "merged_logits" (after merge_and_unload()), "report"}
"report" is print_trainable_parameters() (adapters loaded trainable, as ferrotune counts them).
One CPU thread, float32, fixed seeds: reruns write the same files with the same versions.
"""

import argparse
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, write_json  # noqa: E402

OUT = ROOT / "tests/fixtures/peft"
T5_BASE = "tests/fixtures/t5/t5-v1_1"
BERT_BASES = {"bert": "tests/fixtures/bert/tiny-bert", "roberta": "tests/fixtures/bert/tiny-roberta"}
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]

# A padded batch of two: encoder inputs of 11 and 8 tokens, targets of 6 and 4 (+ EOS 1).
T5_INPUT_IDS = [[(i * 37 + 11) % 250 + 3 for i in range(10)] + [1],
                [(i * 53 + 7) % 250 + 3 for i in range(7)] + [1, 0, 0, 0]]
T5_MASK = [[1] * 11, [1] * 8 + [0] * 3]
T5_LABELS = [[(i * 29 + 5) % 250 + 3 for i in range(6)] + [1],
             [(i * 41 + 13) % 250 + 3 for i in range(4)] + [1, -100, -100]]
BERT_TEXTS = ["the movie was very good", "a lazy dog sat on the mat and it was not fun !",
              "awful plot", "great actors, quick story"]


def report_line(model) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def load_t5():
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(T5_BASE, dtype=torch.float32).eval()


def load_cls(flavor: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        BERT_BASES[flavor], dtype=torch.float32).eval()


@torch.no_grad()
def t5_numbers(model, ids=T5_INPUT_IDS, mask=T5_MASK, labels=T5_LABELS):
    labels_t = torch.tensor(labels)
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=labels_t)
    logits = out.logits.float()
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = labels_t != -100
    nll = -logp.gather(2, labels_t.clamp(min=0).unsqueeze(2)).squeeze(2)[keep].mean()
    assert abs(float(nll) - float(out.loss)) < 1e-5 * float(out.loss), (nll, out.loss)
    return logits, float(nll)


def bert_inputs(flavor: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BERT_BASES[flavor])
    enc = tok(BERT_TEXTS, padding=True)
    types = enc.get("token_type_ids") or [[0] * len(r) for r in enc["input_ids"]]
    return {"input_ids": enc["input_ids"], "token_type_ids": types,
            "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def bert_logits(model, inputs) -> torch.Tensor:
    kw = {k: torch.tensor(v) for k, v in inputs.items()}
    return model(**kw).logits.float()


def sort_targets(d: Path):
    # PEFT keeps target_modules as a set, saved in hash order: sort it so reruns write the same file.
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (d / "README.md").unlink(missing_ok=True)  # PEFT's model-card boilerplate


@torch.no_grad()
def perturb(model, seed: int, amp: float = 0.2):
    """Random values for every trainable tensor (LoRA A and B; a classifier copy gets noise
    added, so it stays a sensible head but differs from the base's)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=g) * amp
        if "modules_to_save" in name:
            p.add_(noise)
        else:
            p.copy_(noise)


def make_t5():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base_logits, base_nll = t5_numbers(load_t5())
    model = get_peft_model(load_t5(), LoraConfig(
        task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=T5_TARGETS))
    perturb(model, 1234)
    model.eval()
    d = OUT / "t5-lora-peft"
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    sort_targets(d)
    logits, nll = t5_numbers(model)
    merged = copy.deepcopy(model).merge_and_unload()
    _, merged_nll = t5_numbers(merged)
    assert abs(merged_nll - nll) < 1e-5 * nll, (merged_nll, nll)
    write_json(d / "expected.json", {
        "input_ids": T5_INPUT_IDS, "attention_mask": T5_MASK, "labels": T5_LABELS,
        "nll_mean": nll, "logits": logits, "base_nll_mean": base_nll,
        "report": report_line(model)})
    print(f"T5 PEFT adapter: nll {nll:.6f} (base {base_nll:.6f})")


def make_cls(flavor: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    inputs = bert_inputs(flavor)
    base = bert_logits(load_cls(flavor), inputs)
    model = get_peft_model(load_cls(flavor), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["query", "value"]))
    perturb(model, 4321)
    model.eval()
    d = OUT / f"{flavor}-lora-peft"
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    sort_targets(d)
    logits = bert_logits(model, inputs)
    merged = bert_logits(copy.deepcopy(model).merge_and_unload(), inputs)
    assert float((merged - logits).abs().max()) < 1e-5
    write_json(d / "expected.json", {
        **inputs, "logits": logits, "base_logits": base, "merged_logits": merged,
        "report": report_line(model)})
    print(f"{flavor} PEFT adapter: max |logit change| from the base "
          f"{float((logits - base).abs().max()):.4f}")


def peft_numbers_for(family: str, d: Path, ours: dict):
    """PEFT's numbers for the ferrotune adapter in d, on the inputs in `ours`."""
    from peft import PeftModel

    if family == "t5":
        model = PeftModel.from_pretrained(load_t5(), d, is_trainable=True).eval()
        logits, nll = t5_numbers(model, ours["input_ids"], ours["attention_mask"], ours["labels"])
        merged = copy.deepcopy(model).merge_and_unload()
        _, merged_nll = t5_numbers(merged, ours["input_ids"], ours["attention_mask"],
                                   ours["labels"])
        return {"nll_mean": nll, "logits": logits, "merged_nll_mean": merged_nll,
                "report": report_line(model)}
    inputs = {k: ours[k] for k in ["input_ids", "token_type_ids", "attention_mask"]}
    model = PeftModel.from_pretrained(load_cls(family), d, is_trainable=True).eval()
    logits = bert_logits(model, inputs)
    merged = bert_logits(copy.deepcopy(model).merge_and_unload(), inputs)
    return {"logits": logits, "merged_logits": merged, "report": report_line(model)}


def make_ferrotune_expected():
    import peft

    for family in ["t5", "bert"]:
        d = OUT / f"{family}-lora-ferrotune"
        if not (d / "adapter_model.safetensors").is_file():
            print(f"{d.relative_to(ROOT)}: no adapter (FERROTUNE_WRITE_PEFT_FIXTURE=1 cargo test "
                  "--release -p ferrotune --test integration peft_families::ferrotune_family_adapters_for_peft "
                  "writes it); skipped")
            continue
        ours = json.loads((d / "expected.json").read_text())
        nums = peft_numbers_for(family, d, ours)
        write_json(d / "peft_expected.json", {
            "source": f"PEFT {peft.__version__}: PeftModel.from_pretrained(base, this folder)",
            **{k: ours[k] for k in ours if k in ("input_ids", "token_type_ids",
                                                  "attention_mask", "labels")},
            **nums})


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (a may be flat: ferrotune writes its logits flattened)."""
    a = a.reshape(b.shape)
    return float((a - b).abs().max() / b.abs().max())


def check(dir_: Path) -> int:
    ok = True
    for family in ["t5", "bert"]:
        d = dir_ / family
        ours = json.loads((d / "expected.json").read_text())
        nums = peft_numbers_for(family, d, ours)
        if family == "t5":
            rel = abs(nums["nll_mean"] - ours["nll_mean"]) / abs(nums["nll_mean"])
            mrel = abs(nums["merged_nll_mean"] - ours["nll_mean"]) / abs(nums["nll_mean"])
            lrel = rel_diff(torch.tensor(ours["logits"]), nums["logits"])
            print(f"T5 ({d}): PEFT nll {nums['nll_mean']:.8f}, ferrotune {ours['nll_mean']:.8f}, "
                  f"relative diff {rel:.2e}; logits relative diff {lrel:.2e}; "
                  f"PEFT merged nll relative diff {mrel:.2e}")
            ok = ok and rel < 1e-4 and mrel < 1e-4 and lrel < 1e-4
        else:
            theirs = nums["logits"]
            mine = torch.tensor(ours["logits"]).reshape(theirs.shape)
            lrel = rel_diff(mine, theirs)
            mrel = rel_diff(mine, nums["merged_logits"])
            print(f"BERT SEQ_CLS ({d}): logits relative diff {lrel:.2e} "
                  f"(max |diff| {float((mine - theirs).abs().max()):.2e}); PEFT merged: {mrel:.2e}")
            ok = ok and lrel < 1e-4 and mrel < 1e-4
        if "report" in ours and ours["report"] != nums["report"]:
            print(f"  report differs: ferrotune `{ours['report']}` vs PEFT `{nums['report']}`")
            ok = False
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", type=Path, metavar="DIR",
                    help="verify the T5 and BERT adapters ferrotune wrote in DIR against PEFT")
    ap.add_argument("--ferrotune-fixture-only", action="store_true",
                    help="only write PEFT's numbers for the committed ferrotune adapters")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.check:
        return check(args.check)
    if not args.ferrotune_fixture_only:
        make_t5()
        for flavor in BERT_BASES:
            make_cls(flavor)
    make_ferrotune_expected()
    return 0


if __name__ == "__main__":
    sys.exit(main())
