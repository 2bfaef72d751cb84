#!/usr/bin/env python3
"""Does an adapter that ferrotune trained load in PEFT and score the same? (issue 3 acceptance)

    .venv/bin/python reference/peft_trained_adapter.py ADAPTER_DIR [--texts N]

Needs the reference environment (`scripts/setup-reference.sh`), a release build (`cargo build
--release`), DialogSum in data/dialogsum of $FERROTUNE_SHARED_DIR (default: the `../shared`
beside the repository) and the f32 HF folder of SmolLM2, which `scripts/convert-smollm2-hf.sh`
writes (run here when it is missing).
Writes the first N DialogSum test dialogues (default 8) to a temp file, one document, then:
- PyTorch: `PeftModel.from_pretrained(AutoModelForCausalLM(f32 folder), ADAPTER_DIR)`, mean NLL of
  the tokens (one window; the text fits the context), in float64 from float32 logits;
- ferrotune: `ferrotune perplexity --model <f32 folder> --adapter ADAPTER_DIR --json` on the file;
and prints both perplexities and their relative difference; exit status 1 above 1e-4.
"""
import argparse, json, math, os, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FERROTUNE_CACHE", os.path.join(ROOT, ".cache"))
HF_DIR = os.path.join(CACHE, "models/smollm2-hf")
SHARED = os.environ.get("FERROTUNE_SHARED_DIR", os.path.join(ROOT, "../shared"))
DIALOGSUM = os.path.join(SHARED, "data/dialogsum/dialogsum.test.jsonl")
EXE = os.path.join(ROOT, "target/release/ferrotune")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter")
    ap.add_argument("--texts", type=int, default=8)
    a = ap.parse_args()
    for path, how in [(EXE, "run cargo build --release"),
                      (DIALOGSUM, "put ../shared beside the repository or set FERROTUNE_SHARED_DIR"),
                      (os.path.join(a.adapter, "adapter_config.json"), "not an adapter folder")]:
        if not os.path.isfile(path):
            sys.exit(f"{path}: not found ({how})")
    if not os.path.exists(os.path.join(HF_DIR, ".complete")):
        env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
        # Its report goes to stderr, so that stdout holds only this script's results.
        subprocess.run([os.path.join(ROOT, "scripts/convert-smollm2-hf.sh")], check=True, env=env,
                       stdout=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    torch.set_num_threads(2)
    rows = [json.loads(l) for l in open(DIALOGSUM)][: a.texts]
    text = "\n\n".join(r["dialogue"] for r in rows)
    path = os.path.join(tempfile.mkdtemp(prefix="ferrotune-peft-"), "dialogues.txt")
    with open(path, "w") as f:
        f.write(text)

    tok = AutoTokenizer.from_pretrained(HF_DIR)
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp.gather(1, ids[0, 1:].unsqueeze(1)).mean().item()
    ppl_peft = math.exp(nll)

    out = subprocess.run([EXE, "perplexity", "--model", HF_DIR, "--adapter", a.adapter, "--file", path,
                          "--json"], check=True, capture_output=True, text=True)
    v = json.loads(out.stdout)
    rel = abs(v["perplexity"] - ppl_peft) / ppl_peft
    print(f"tokens: PEFT {ids.shape[1]}, ferrotune {v['tokens']}")
    print(f"perplexity: PEFT {ppl_peft:.6f}, ferrotune {v['perplexity']:.6f}, relative difference {rel:.2e}")
    sys.exit(0 if rel <= 1e-4 else 1)


if __name__ == "__main__":
    main()
