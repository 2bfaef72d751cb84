#!/usr/bin/env bash
# Create the reference environment that bench/ and reference/ run in: a git-ignored virtualenv
# at .venv with every reference tool pinned here (the one place versions are pinned).
#   scripts/setup-reference.sh            # everything (llama-cpp-python builds llama.cpp, ~5 min)
#   scripts/setup-reference.sh --no-llama # skip llama-cpp-python and its server (bench/decode_vs_llamacpp.py
#                                         # and bench/serve_load.py need them)
# Then: .venv/bin/python bench/... or .venv/bin/python reference/...
# Idempotent: a venv already built with these exact pins is left alone (FORCE=1 rebuilds it).
# The interpreter that creates the venv is $PYTHON, else python3 (3.10 or newer).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
PY="${PYTHON:-python3}"

# Pinned reference versions. Fixtures in tests/fixtures were written with these.
PINS=(
  "torch==2.15.0"          # CUDA wheel from PyPI; runs on the CPU here
  "transformers==5.24.0"
  "peft==0.21.2"
  "accelerate==1.16.0"
  "gguf==0.19.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
  "rouge-score==0.1.2"
  "nltk==3.10.4"
  "sacrebleu==2.6.0"
  "sentencepiece==0.2.3"   # reference/tokenizer_fixtures.py
  "protobuf==7.36.2"       # reference/t5_fixtures.py (transformers reads spiece.model with it)
  "regex==2026.11.19"      # reference/tokenizer_fixtures.py (llama.cpp's pre-tokenizer regexes)
  "sentence-transformers==6.2.0"  # reference/bert_fixtures.py (all-MiniLM-L6-v2 embeddings)
  "bitsandbytes==0.50.2"   # reference/optimizer_fixtures.py (8-bit AdamW; runs on the CPU)
  "scikit-learn==1.9.1"    # reference/classification_fixtures.py (accuracy, macro-F1)
  "lm-eval==0.4.13"        # reference/lm_eval_fixtures.py, bench/bench_vs_lm_eval.py (lm-evaluation-harness)
  "openai==3.60.0"         # reference/openai_client_check.py, bench/serve_load.py (the official client)
)
LLAMA_PIN="llama-cpp-python==0.3.36"
# llama-cpp-python's [server] extra (bench/serve_load.py runs `python -m llama_cpp.server`), pinned
# one by one and installed after llama-cpp-python so that its build is never redone for them.
LLAMA_SERVER_PINS=(
  "fastapi==0.165.0"
  "uvicorn==0.55.0"
  "sse-starlette==3.7.1"
  "starlette-context==0.3.6"
  "pydantic-settings==2.16.3"
  "PyYAML==6.0.4"
)

with_llama=1
for a in "$@"; do
  case "$a" in
    --no-llama) with_llama=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup-reference.sh: unknown argument \`$a\` (expected --no-llama)" >&2; exit 2 ;;
  esac
done

want="${PINS[*]}"
[ "$with_llama" = 1 ] && want="$want $LLAMA_PIN ${LLAMA_SERVER_PINS[*]}"
stamp="$venv/.ferrotune-pins"
if [ -z "${FORCE:-}" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv is up to date ($(wc -w <"$stamp") pinned packages; FORCE=1 to rebuild)"
  exit 0
fi

if [ ! -x "$venv/bin/python" ] || [ -n "${FORCE:-}" ]; then
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup-reference.sh: $PY is not a Python 3.10 or newer (set PYTHON to one)" >&2
    exit 1
  fi
  rm -rf "$venv"
  if ! "$PY" -m venv "$venv"; then
    rm -rf "$venv"
    echo "setup-reference.sh: \`$PY -m venv\` failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${PINS[@]}"
if [ "$with_llama" = 1 ]; then
  # Builds llama.cpp from source for this CPU (GGML_NATIVE), as a user of llama.cpp would.
  # An llama-cpp-python already at $LLAMA_PIN is "already satisfied": pip does not rebuild it.
  # (On a KVM Intel Xeon with AMX, 2026-12-05, the GGML_NATIVE=ON build segfaulted on its first
  # chat completion; CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
  # -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON" worked there, with --force-reinstall.)
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$venv/bin/python" -m pip install -q --no-cache-dir "$LLAMA_PIN"
  "$venv/bin/python" -m pip install -q "${LLAMA_SERVER_PINS[@]}"
fi
"$venv/bin/python" - <<'PYEOF'
import importlib
for m in ["torch", "transformers", "peft", "gguf", "safetensors", "numpy", "rouge_score", "sacrebleu", "nltk",
          "sentencepiece", "regex", "sentence_transformers", "openai"]:
    importlib.import_module(m)
try:
    import llama_cpp  # noqa: F401
except ImportError:
    pass
else:
    import llama_cpp.server.app  # noqa: F401  (the [server] extra's packages import)
print("reference environment ready")
PYEOF
echo "$want" >"$stamp"
echo "$venv: ready (use .venv/bin/python for bench/ and reference/)"
