#!/usr/bin/env python3
"""PEFT soft-prompt (PROMPT_TUNING, PREFIX_TUNING, P_TUNING) fixtures and checks for ferrotune.

Run from the repository root with the reference environment (`scripts/setup-reference.sh`):

    .venv/bin/python reference/peft_prompts.py
        writes tests/fixtures/peft/prompts/ : for each case on SmolLM2-135M-Instruct
        (.cache/models/smollm2-hf, f32), an adapter made by PEFT (get_peft_model, seeded, then
        save_pretrained) and expected.json with its mean NLL on INPUT_IDS
        (`model(input_ids, labels=input_ids).loss`: PEFT's forward, the virtual tokens' labels
        -100). Cases whose prompt is made of SmolLM2's own embedding rows (prompt tuning with
        TEXT and SAMPLE_VOCAB init) commit no tensor: expected.json lists the token ids each
        virtual token equals (checked here exactly), and the Rust test rebuilds the prompt.

    .venv/bin/python reference/peft_prompts.py --check DIR
        DIR holds ferrotune-written adapters, one folder per case, each with expected.json
        {"input_ids", "nll_mean"}: loads each in PeftModel.from_pretrained on the same base
        and asserts the NLL equals ferrotune's within 1e-4 relative; with --write, stores
        PEFT's NLL as peft_expected.json next to it (the committed
        tests/fixtures/peft/prompts-ferrotune/ folders are made that way:
        FERROTUNE_WRITE_PROMPT_FIXTURES=1 cargo test --release -p ferrotune --test integration
        peft_prompts::, then this with --check tests/fixtures/peft/prompts-ferrotune --write).

    The same on the tiny T5 (tests/fixtures/t5/t5-v1_0, SEQ_2_SEQ_LM): PEFT-made adapters in
    tests/fixtures/peft/prompts/t5/ (the tiny model's prompts are committed whole), each
    expected.json with the encoder batch (input_ids, attention_mask, labels: -100 ignored) and
    PEFT's `model(input_ids, attention_mask, labels).loss`; ours are checked with
    --check tests/fixtures/peft/prompts-ferrotune/t5 (the task_type of each adapter picks the
    base). `--family t5` (or smollm2) makes only that family's fixtures. On this T5, d_model
    (16) is not heads x d_kv (24) and the decoder has 3 layers to the encoder's 2, so prefix
    tuning needs token_dim = 24, num_attention_heads = 3, num_layers = 3 (PEFT's defaults,
    d_model and the encoder's num_layers, do not fit the decoder's self-attention).
One CPU thread, float32, fixed seeds.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
BASE = ".cache/models/smollm2-hf"
OUT = ROOT / "tests/fixtures/peft/prompts"
INPUT_IDS = [(i * 1237 + 101) % 49152 for i in range(16)]
INIT_TEXT = "Summarize the dialogue in one sentence:"

CASES = {
    "prompt-random": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=4, prompt_tuning_init="RANDOM"),
    "prompt-sample-vocab": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=5,
                                prompt_tuning_init="SAMPLE_VOCAB"),
    "prompt-text": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=12, prompt_tuning_init="TEXT",
                        prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=BASE),
    "prefix": dict(peft_type="PREFIX_TUNING", num_virtual_tokens=2),
    "prefix-projection": dict(peft_type="PREFIX_TUNING", num_virtual_tokens=2, prefix_projection=True,
                              encoder_hidden_size=32),
    "p-tuning": dict(peft_type="P_TUNING", num_virtual_tokens=4, encoder_hidden_size=32),
}


T5_BASE = "tests/fixtures/t5/t5-v1_0"
T5_OUT = OUT / "t5"
# Two rows, the second padded, the labels of the second cut short with -100.
T5_BATCH = {
    "input_ids": [[5, 17, 42, 99, 3, 120, 1], [8, 64, 200, 1, 0, 0, 0]],
    "attention_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]],
    "labels": [[10, 11, 12, 13, 1], [30, 31, 1, -100, -100]],
}
T5_PREFIX_SIZES = dict(token_dim=24, num_attention_heads=3, num_layers=3)
T5_CASES = {
    "t5-prompt-random": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=3, prompt_tuning_init="RANDOM"),
    "t5-prompt-sample-vocab": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=4,
                                   prompt_tuning_init="SAMPLE_VOCAB"),
    "t5-prompt-text": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                           prompt_tuning_init_text="Summarize the dialogue:", tokenizer_name_or_path=T5_BASE),
    "t5-prefix": dict(peft_type="PREFIX_TUNING", num_virtual_tokens=2, **T5_PREFIX_SIZES),
    "t5-prefix-projection": dict(peft_type="PREFIX_TUNING", num_virtual_tokens=3, prefix_projection=True,
                                 encoder_hidden_size=12, **T5_PREFIX_SIZES),
    "t5-p-tuning": dict(peft_type="P_TUNING", num_virtual_tokens=3, encoder_hidden_size=12),
}


def load_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ROOT / BASE, dtype=torch.float32).eval()


def load_t5():
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(ROOT / T5_BASE, dtype=torch.float32).eval()


@torch.no_grad()
def t5_nll(model, batch) -> float:
    t = {k: torch.tensor(v) for k, v in batch.items()}
    return float(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"]).loss)


def make_config(kw, task_type="CAUSAL_LM"):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    kw = dict(kw)
    cls = {"PROMPT_TUNING": PromptTuningConfig, "PREFIX_TUNING": PrefixTuningConfig,
           "P_TUNING": PromptEncoderConfig}[kw.pop("peft_type")]
    if "tokenizer_name_or_path" in kw:
        kw["tokenizer_name_or_path"] = str(ROOT / kw["tokenizer_name_or_path"])
    return cls(task_type=task_type, **kw)


@torch.no_grad()
def nll(model, ids) -> float:
    t = torch.tensor([ids])
    return float(model(input_ids=t, labels=t).loss)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")


def make_fixtures():
    from peft import get_peft_model

    emb = load_base().get_input_embeddings().weight.detach()
    for i, (name, kw) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        model = get_peft_model(load_base(), make_config(kw))
        if kw["peft_type"] != "PROMPT_TUNING" or kw["prompt_tuning_init"] == "RANDOM":
            # Move the (seeded) parameters away from their init so the test sees trained-like
            # values: the MLP of prefix projection / P-tuning included.
            g = torch.Generator().manual_seed(7 + i)
            with torch.no_grad():
                for pn, p in model.named_parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.eval()
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        (d / "README.md").unlink(missing_ok=True)
        cfg_path = d / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_name_or_path"):
            cfg["tokenizer_name_or_path"] = BASE  # machine-independent
        cfg["base_model_name_or_path"] = BASE
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        saved = load_file(str(d / "adapter_model.safetensors"))["prompt_embeddings"]
        # PEFT's loaded adapter (inference mode) must give the training-mode NLL.
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(load_base(), d).eval()
        value, loaded_value = nll(model, INPUT_IDS), nll(loaded, INPUT_IDS)
        assert abs(value - loaded_value) < 1e-5 * abs(value), (value, loaded_value)
        exp = {"input_ids": INPUT_IDS, "nll_mean": value, "base_nll_mean": nll(load_base(), INPUT_IDS),
               "shape": list(saved.shape)}
        if kw["peft_type"] == "PROMPT_TUNING" and kw["prompt_tuning_init"] != "RANDOM":
            # Which vocabulary rows the prompt is: exactly, row by row.
            ids = []
            for row in saved:
                hit = (emb == row).all(dim=1).nonzero().flatten().tolist()
                assert hit, "a prompt row is no embedding row"
                ids.append(hit[0])
            exp["token_ids"] = ids
            (d / "adapter_model.safetensors").unlink()  # SmolLM2's own weights: not committed
        write_json(d / "expected.json", exp)
        print(f"{name}: nll {value:.6f} (base {exp['base_nll_mean']:.6f}), prompt {tuple(saved.shape)}")


def make_t5_fixtures():
    from peft import PeftModel, get_peft_model

    emb = load_t5().get_input_embeddings().weight.detach()
    for i, (name, kw) in enumerate(T5_CASES.items()):
        torch.manual_seed(200 + i)
        model = get_peft_model(load_t5(), make_config(kw, "SEQ_2_SEQ_LM"))
        if kw["peft_type"] != "PROMPT_TUNING" or kw["prompt_tuning_init"] == "RANDOM":
            g = torch.Generator().manual_seed(17 + i)
            with torch.no_grad():
                for _, p in model.named_parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.eval()
        d = T5_OUT / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        (d / "README.md").unlink(missing_ok=True)
        cfg_path = d / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_name_or_path"):
            cfg["tokenizer_name_or_path"] = T5_BASE  # machine-independent
        cfg["base_model_name_or_path"] = T5_BASE
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        saved = load_file(str(d / "adapter_model.safetensors"))["prompt_embeddings"]
        loaded = PeftModel.from_pretrained(load_t5(), d).eval()
        value, loaded_value = t5_nll(model, T5_BATCH), t5_nll(loaded, T5_BATCH)
        assert abs(value - loaded_value) < 1e-5 * abs(value), (value, loaded_value)
        exp = dict(T5_BATCH, nll_mean=value, base_nll_mean=t5_nll(load_t5(), T5_BATCH), shape=list(saved.shape))
        if kw["peft_type"] == "PROMPT_TUNING" and kw["prompt_tuning_init"] != "RANDOM":
            ids = []
            for row in saved:
                hit = (emb == row).all(dim=1).nonzero().flatten().tolist()
                assert hit, "a prompt row is no embedding row"
                ids.append(hit[0])
            exp["token_ids"] = ids
        write_json(d / "expected.json", exp)
        print(f"{name}: nll {value:.6f} (base {exp['base_nll_mean']:.6f}), prompt {tuple(saved.shape)}")


def check(d: Path, write: bool) -> int:
    from peft import PeftModel

    bad = 0
    for case in sorted(p for p in d.iterdir() if (p / "adapter_config.json").is_file()):
        exp = json.loads((case / "expected.json").read_text())
        seq2seq = json.loads((case / "adapter_config.json").read_text()).get("task_type") == "SEQ_2_SEQ_LM"
        model = PeftModel.from_pretrained(load_t5() if seq2seq else load_base(), case).eval()
        if seq2seq:
            batch = {k: exp[k] for k in T5_BATCH}
            value = t5_nll(model, batch)
        else:
            value = nll(model, exp["input_ids"])
        rel = abs(value - exp["nll_mean"]) / abs(exp["nll_mean"])
        ok = rel < 1e-4
        bad += not ok
        print(f"{case.name}: PEFT nll {value:.8f}, ferrotune {exp['nll_mean']:.8f}, rel {rel:.2e} "
              f"{'ok' if ok else 'MISMATCH'}")
        if write:
            keep = T5_BATCH if seq2seq else ["input_ids"]
            write_json(case / "peft_expected.json", dict({k: exp[k] for k in keep}, nll_mean=value))
    return 1 if bad else 0


def main():
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", type=Path)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--family", choices=["all", "smollm2", "t5"], default="all")
    a = ap.parse_args()
    if a.check:
        sys.exit(check(a.check, a.write))
    if a.family in ("all", "smollm2"):
        make_fixtures()
    if a.family in ("all", "t5"):
        make_t5_fixtures()


if __name__ == "__main__":
    main()
