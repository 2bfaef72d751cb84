#!/usr/bin/env bash
# Convert the SmolLM2-135M-Instruct GGUF (Q4_1) into an f32 Hugging Face folder, so the
# safetensors/config.json loading path can be tested on a real checkpoint:
#   .cache/models/smollm2-hf/{config.json, generation_config.json, model.safetensors,
#                             tokenizer.json, tokenizer_config.json, chat_template.jinja ...}
# Weights are the Q4_1 blocks dequantized by transformers (so they equal the GGUF values exactly
# in f32). config.json is written in the classic hub layout (top-level rope_theta) rather than the
# transformers>=5 "rope_parameters" layout, matching the upstream SmolLM2 config.json.
# Needs a Python with torch, transformers, gguf, safetensors: $PYTHON, else the reference
# environment's .venv/bin/python (scripts/setup-reference.sh creates it).
# Idempotent: an existing complete conversion is left alone (FORCE=1 redoes it).
# tests/fixtures/smollm2/hf-export records what transformers writes here (reference/README.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${FERROTUNE_CACHE:-$root/.cache}"
src="$cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$cache/models/smollm2-hf"
PY="${PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "$PY: not found: run scripts/setup-reference.sh first (or set PYTHON)" >&2
  exit 1
fi

if [ ! -f "$src" ]; then
  echo "$src: not found (run scripts/fetch-models.sh first)" >&2
  exit 1
fi
if [ -e "$dest/.complete" ] && [ -z "${FORCE:-}" ]; then
  echo "$dest already converted (FORCE=1 to redo)"
  exit 0
fi

rm -rf "$dest.tmp"
"$PY" - "$src" "$dest.tmp" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
model = AutoModelForCausalLM.from_pretrained(
    src.parent, gguf_file=src.name, dtype=torch.float32, attn_implementation="eager").eval()
# The weights are already dequantized; without this the saved config would claim a GGUF
# quantization that the safetensors file does not have.
model.config.quantization_config = None
if hasattr(model.config, "__dict__"):
    model.config.__dict__.pop("quantization_config", None)
model.hf_quantizer = None
model.save_pretrained(dest, safe_serialization=True)
tok.save_pretrained(dest)

cfg_path = dest / "config.json"
cfg = json.loads(cfg_path.read_text())
cfg.pop("quantization_config", None)
rp = cfg.pop("rope_parameters", None)
if rp is not None:
    rp = dict(rp)
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rp
cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")

# The folder must reproduce the GGUF model exactly.
reloaded = AutoModelForCausalLM.from_pretrained(
    dest, dtype=torch.float32, attn_implementation="eager").eval()
tok2 = AutoTokenizer.from_pretrained(dest)
msgs = [{"role": "user", "content": "What is the capital of France?"}]
text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
if tok2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) != text:
    sys.exit("saved tokenizer renders the chat template differently")
ids = tok(text, add_special_tokens=False).input_ids
if tok2(text, add_special_tokens=False).input_ids != ids:
    sys.exit("saved tokenizer tokenizes differently")
with torch.no_grad():
    a = model(torch.tensor([ids])).logits
    b = reloaded(torch.tensor([ids])).logits
diff = (a - b).abs().max().item()
if diff != 0.0:
    sys.exit(f"reloaded HF folder differs from the GGUF model: max |dlogit| = {diff}")
print(f"verified: HF folder reproduces GGUF logits exactly ({len(ids)} tokens)")
PYEOF
touch "$dest.tmp/.complete"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
ls -l "$dest"
echo "converted $src -> $dest"
