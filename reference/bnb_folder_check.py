"""Does a folder written by `ferrotune quantize --to nf4|fp4|int8` load in transformers, and is it
the model transformers makes itself?

For each target, on SmolLM2-135M-Instruct's f32 HF folder (`.cache/models/smollm2-hf`):
1. `ferrotune quantize --model M --to T --out DIR` (the release binary, `target/release/ferrotune`);
2. `AutoModelForCausalLM.from_pretrained(DIR)` (transformers + bitsandbytes on the CPU);
3. `AutoModelForCausalLM.from_pretrained(M, quantization_config=BitsAndBytesConfig(...))`:
   transformers' own quantization of the same f32 weights;
4. every tensor of the two state dicts compared (bytes), and the logits of both on a prompt
   (max |delta logit|; 0 when the weights are the same bytes and the same kernels run).

Run: `.venv/bin/python reference/bnb_folder_check.py [MODEL_DIR]` after `cargo build --release`.
Prints one line per target; exits non-zero if a folder does not load or a tensor differs.
"""
import pathlib
import subprocess
import sys
import tempfile
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "ferrotune"

warnings.filterwarnings("ignore", message="MatMul8bitLt")  # once per int8 matmul otherwise
torch.set_num_threads(1)  # the double-quant offset is a torch.mean: one thread, as ferrotune


def configs():
    yield "nf4", ["--double-quant", "true"], BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    yield "fp4", [], BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    yield "int8", [], BitsAndBytesConfig(load_in_8bit=True)


def state_bytes(model):
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().cpu().contiguous().view(torch.uint8).reshape(-1) if v.dim() else v.reshape(1)
    return out


def main():
    model_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".cache" / "models" / "smollm2-hf"
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for to, flags, qc in configs():
            out = pathlib.Path(tmp) / to
            cmd = [str(BIN), "quantize", "--model", str(model_dir), "--to", to, "--out", str(out), *flags]
            subprocess.run(cmd, check=True)
            ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            theirs = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, dtype=torch.float32)
            a, b = state_bytes(ours), state_bytes(theirs)
            differ = [k for k in b if k not in a or not torch.equal(a[k], b[k])]
            extra = [k for k in a if k not in b]
            with torch.no_grad():
                la = ours(ids).logits.float()
                lb = theirs(ids).logits.float()
            d = (la - lb).abs().max().item()
            quantized = sum(1 for k in b if k.endswith(".SCB") or "quant_state" in k)
            print(
                f"{to}: {len(b)} tensors ({quantized} quantized weights), {len(differ)} differ, "
                f"{len(extra)} extra; max |delta logit| = {d:.3e} over {tuple(la.shape)}"
            )
            if differ or extra:
                failed = True
                print("  differ:", differ[:5], "extra:", extra[:5])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
