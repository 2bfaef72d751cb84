#!/usr/bin/env python3
"""Does a model folder that ferrotune's full fine-tuning wrote load in transformers with the same
logits? (issue 11 acceptance)

    .venv/bin/python reference/full_ft_check.py --fixture tests/fixtures/full_ft/llama [--write]
    .venv/bin/python reference/full_ft_check.py MODEL_DIR [--texts N]

--fixture DIR: DIR/model is the committed folder of a tiny full fine-tuning run and DIR/input.json
its text and ids (both written by `FERROTUNE_WRITE_FULL_FT_FIXTURES=1 cargo test --release -p
ferrotune --test integration train_full::a_fully_fine_tuned`). transformers loads the folder
(AutoModelForCausalLM, f32, eager attention; the sharded index too) and its tokenizer; with
--write its token ids of the text and its logits go to DIR/transformers_expected.json, which that
cargo test compares with ours.

MODEL_DIR (e.g. runs/compare-dialogsum/runs/full/model, a SmolLM2 fully fine-tuned here): the
first N DialogSum test dialogues (default 8), one document; transformers' perplexity (mean NLL
in float64 from float32 logits) against `ferrotune perplexity --model MODEL_DIR --json`, and
their relative difference; exit status 1 above 1e-4. Needs a release build and ../shared (or
$FERROTUNE_SHARED_DIR).
"""
import argparse, json, math, os, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FERROTUNE_SHARED_DIR", os.path.join(ROOT, "../shared"))
DIALOGSUM = os.path.join(SHARED, "data/dialogsum/dialogsum.test.jsonl")
EXE = os.path.join(ROOT, "target/release/ferrotune")


def load(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return tok, model


def fixture(d, write):
    import torch
    inp = json.load(open(os.path.join(d, "input.json")))
    tok, model = load(os.path.join(d, "model"))
    ids = tok(inp["text"])["input_ids"]
    if ids != inp["input_ids"]:
        print(f"tokenizer: transformers {ids}, ferrotune {inp['input_ids']}", file=sys.stderr)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inp["input_ids"]])).logits[0]
    # The logits are of ferrotune's ids (its tokenizer adds the BOS this folder's tokenizer_config
    # asks for; transformers' generic fast tokenizer does not); the test checks the rest agree.
    out = {"text": inp["text"], "input_ids": inp["input_ids"], "transformers_input_ids": ids,
           "logits": [[float(x) for x in row] for row in logits.tolist()]}
    path = os.path.join(d, "transformers_expected.json")
    if write:
        with open(path, "w") as f:
            json.dump(out, f)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    else:
        print(json.dumps({"input_ids": ids, "last_logits": out["logits"][-1][:8]}))


def real(folder, texts):
    import torch
    for path, how in [(EXE, "run cargo build --release"),
                      (DIALOGSUM, "put ../shared beside the repository or set FERROTUNE_SHARED_DIR"),
                      (os.path.join(folder, "config.json"), "not an HF model folder")]:
        if not os.path.isfile(path):
            sys.exit(f"{path}: not found ({how})")
    rows = [json.loads(l) for l in open(DIALOGSUM)][:texts]
    text = "\n\n".join(r["dialogue"] for r in rows)
    path = os.path.join(tempfile.mkdtemp(prefix="ferrotune-full-"), "dialogues.txt")
    with open(path, "w") as f:
        f.write(text)
    tok, model = load(folder)
    torch.set_num_threads(2)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    ppl = math.exp(-logp.gather(1, ids[0, 1:].unsqueeze(1)).mean().item())
    out = subprocess.run([EXE, "perplexity", "--model", folder, "--file", path, "--json"],
                         check=True, capture_output=True, text=True)
    v = json.loads(out.stdout)
    rel = abs(v["perplexity"] - ppl) / ppl
    print(f"tokens: transformers {ids.shape[1]}, ferrotune {v['tokens']}")
    print(f"perplexity: transformers {ppl:.6f}, ferrotune {v['perplexity']:.6f}, "
          f"relative difference {rel:.2e}")
    sys.exit(0 if rel <= 1e-4 else 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--fixture")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--texts", type=int, default=8)
    a = ap.parse_args()
    if a.fixture:
        fixture(a.fixture, a.write)
    elif a.model:
        real(a.model, a.texts)
    else:
        ap.error("give MODEL_DIR or --fixture DIR")


if __name__ == "__main__":
    main()
