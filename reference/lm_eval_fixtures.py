"""lm-evaluation-harness reference numbers for `ferrotune bench` (tests/fixtures/lm_eval/).

Runs `lm_eval` (the pinned version, HF backend, CPU, float32, batch size 1) on the SmolLM2
f32 HF folder (scripts/convert-smollm2-hf.sh: the Q4_1 GGUF dequantized by transformers, so
ferrotune loading the same GGUF with --dequantize holds the same weights) with the task files
in tests/fixtures/lm_eval/tasks, and writes per task and shot count:
  tests/fixtures/lm_eval/<task>_<k>shot.json
    {"task", "num_fewshot", "limit", "lm_eval_version", "results": results[task],
     "samples": [{"doc_id", "arguments": [[context, continuation], ...], "resps": [...]}],
     "tokens": [{"context", "continuation", "context_enc", "continuation_enc"}, ...]}
`cargo test --release -p ferrotune --test integration bench_lm_eval::` compares ferrotune with
these: the same metrics on the same samples and per-sample log-likelihoods within 1e-3.

Run from anywhere:  .venv/bin/python reference/lm_eval_fixtures.py [TASK...]  (default: all)
(scripts/setup-reference.sh creates .venv; data sets are read from ../shared/data.)
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # the task files' data paths are relative to the repository root
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lm_eval  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

HF_DIR = ROOT / ".cache/models/smollm2-hf"
TASKS_DIR = ROOT / "tests/fixtures/lm_eval/tasks"
OUT = ROOT / "tests/fixtures/lm_eval"

# (task, shots, limit)
RUNS = [
    ("ft_sst2_mc", 0, 40),
    ("ft_sst2_mc", 5, 40),
    ("ft_sst2_mc_seeded", 5, 20),
    ("ft_sst2_gen", 0, 20),
    ("ft_sst2_gen", 5, 20),
    ("ft_sst2_ll", 0, 20),
    ("ft_dialogsum_rolling", 0, 5),
]

# Token ids of each log-likelihood request, as lm-eval's HF backend encodes them.
RECORDED = []
_orig = HFLM._loglikelihood_tokens


def _recording(self, requests, *args, **kwargs):
    for key, ctx_enc, cont_enc in requests:
        # Rolling windows come as token ids only (key None).
        ctx, cont = key if key is not None else (None, None)
        RECORDED.append({"context": ctx, "continuation": cont,
                         "context_enc": list(ctx_enc), "continuation_enc": list(cont_enc)})
    return _orig(self, requests, *args, **kwargs)


HFLM._loglikelihood_tokens = _recording


def main():
    if not (HF_DIR / "config.json").exists():
        sys.exit(f"{HF_DIR}: missing; run scripts/convert-smollm2-hf.sh first")
    tm = TaskManager(include_path=str(TASKS_DIR))
    lm = HFLM(pretrained=str(HF_DIR), dtype="float32", device="cpu", batch_size=1)
    only = set(sys.argv[1:])
    for task, k, limit in RUNS:
        if only and task not in only:
            continue
        RECORDED.clear()
        res = simple_evaluate(
            model=lm, tasks=[task], num_fewshot=k, limit=limit, log_samples=True,
            task_manager=tm, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
            fewshot_random_seed=1234, bootstrap_iters=100000,
        )
        samples = []
        for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
            samples.append({
                "doc_id": s["doc_id"],
                "arguments": [[a for a in args.values()][:2] if isinstance(args, dict) else list(args)[:2]
                              for args in s["arguments"]],
                "resps": s["resps"],
            })
        # Generation arguments hold the kwargs dict: keep the context only.
        for s in samples:
            s["arguments"] = [[a[0], a[1] if len(a) > 1 and isinstance(a[1], str) else None] for a in s["arguments"]]
        out = {
            "task": task, "num_fewshot": k, "limit": limit,
            "lm_eval_version": lm_eval.__version__,
            "results": res["results"][task],
            "samples": samples,
            "tokens": RECORDED[:12],
        }
        path = OUT / f"{task}_{k}shot.json"
        path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(path.relative_to(ROOT), {m: v for m, v in res["results"][task].items() if m != "alias"})


if __name__ == "__main__":
    main()
