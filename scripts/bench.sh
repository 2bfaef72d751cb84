#!/usr/bin/env bash
# One entry point per README performance table. Prints a header naming the machine (CPU model,
# cores, SIMD level, date, commit, tool versions), the benchmark's own report, then the table's
# rows in the README's markdown format, ready to paste:
#   scripts/bench.sh decode [flags]   # "Speed: decode vs llama.cpp" (bench/decode_vs_llamacpp.py)
#   scripts/bench.sh train [flags]    # "Speed and memory vs PyTorch + PEFT" and the memory
#                                     # estimate table (bench/lora_train_vs_peft.py)
#   scripts/bench.sh serve [flags]    # `ferrotune serve` with the official openai client
#                                     # (reference/openai_client_check.py), then under load vs
#                                     # llama.cpp's server (bench/serve_load.py)
# Flags go to the Python script after the README's settings, so they override them:
#   decode: --runs 5 --configs 2:16,2:8,1:16
#   train:  --shapes 4x256,1x1024 --steps 6 --rows peft,f32,q4_1,q4_1_ckpt
#   serve:  --clients 32 --requests 8 (flags go to bench/serve_load.py only)
# Quickest check that everything runs: `scripts/bench.sh decode --runs 1 --new 16 --configs 2:16`,
# `scripts/bench.sh train --steps 2 --shapes 1x64` and `scripts/bench.sh serve --clients 4 --requests 2`.
# Needs the reference environment (scripts/setup-reference.sh; $PYTHON overrides .venv/bin/python)
# and, for train, DialogSum in ../shared/data/dialogsum ($FERROTUNE_SHARED_DIR overrides ../shared).
# Fetches the models (scripts/fetch-models.sh) and builds ferrotune in release when needed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
what="${1:-}"
case "$what" in
  decode)
    script=bench/decode_vs_llamacpp.py
    defaults=(--runs 5 --configs 2:16,2:8,1:16)
    modules=(llama_cpp)
    ;;
  train)
    script=bench/lora_train_vs_peft.py
    defaults=(--shapes 4x256,1x1024 --steps 6 --rows peft,f32,q4_1,q4_1_ckpt)
    modules=(torch transformers peft)
    ;;
  serve)
    script=bench/serve_load.py
    defaults=(--clients 32 --requests 8)
    modules=(openai llama_cpp)
    ;;
  -h|--help) usage; exit 0 ;;
  *) echo "bench.sh: expected \`decode\`, \`train\` or \`serve\`, got \`$what\` (scripts/bench.sh --help)" >&2; exit 2 ;;
esac
shift

PY="${PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "bench.sh: $PY not found: run scripts/setup-reference.sh first (or set PYTHON)" >&2
  exit 1
fi
versions="$("$PY" - "${modules[@]}" <<'PYEOF'
import importlib, importlib.metadata, sys
dist = {"llama_cpp": "llama-cpp-python"}
out = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except ImportError as e:
        sys.exit(f"bench.sh: {m} is missing from {sys.executable} ({e}): run scripts/setup-reference.sh"
                 + (" without --no-llama" if m == "llama_cpp" else ""))
    out.append(f"{dist.get(m, m)} {importlib.metadata.version(dist.get(m, m))}")
print(", ".join(out))
PYEOF
)"

./scripts/fetch-models.sh >&2
cargo build --release -p ferrotune-cli >&2

# The machine, so that a row can be compared with rows from the same kind of CPU only.
cpu="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)"
[ -n "$cpu" ] || cpu="$(uname -m)"
flags=" $(awk -F': ' '/^flags/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true) "
has() { [[ "$flags" == *" $1 "* ]]; }
if has avx512_vnni; then simd="AVX-512 VNNI"
elif has avx512f; then simd="AVX-512"
elif has avx2; then simd="AVX2"
else simd="no AVX2 (scalar kernels)"; fi
if has avx_vnni; then simd="$simd + AVX-VNNI"; fi
present=()
for f in avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni; do
  if has "$f"; then present+=("$f"); fi
done
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit+changes"; fi

echo "scripts/bench.sh $what $*"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); ferrotune $commit; $versions"
echo "CPU: $cpu; $(nproc) cores available (nproc); SIMD: $simd (${present[*]:-none})"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
if [ -n "${FERROTUNE_QUANT_ISA:-}" ]; then echo "FERROTUNE_QUANT_ISA=$FERROTUNE_QUANT_ISA"; fi
echo
if [ "$what" = serve ]; then
  # The acceptance's client check runs here (CI runs it only where its python has openai); the
  # load run goes on after a failed check, and the exit status reports both.
  check_rc=0
  "$PY" reference/openai_client_check.py || check_rc=$?
  echo
  load_rc=0
  "$PY" "$script" "${defaults[@]}" "$@" || load_rc=$?
  if [ "$check_rc" != 0 ]; then echo "bench.sh: reference/openai_client_check.py failed" >&2; fi
  if [ "$check_rc" != 0 ] || [ "$load_rc" != 0 ]; then exit 1; fi
  exit 0
fi
exec "$PY" "$script" "${defaults[@]}" "$@"
