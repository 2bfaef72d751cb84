#!/usr/bin/env bash
# DDP throughput on MPI (issue 15: 2 ranks x 1 thread vs 1 rank x 1 thread >= 1.7x for LoRA at
# 4x256): SmolLM2-135M Q4_1 with LoRA (examples/dialogsum-lora.toml: r 16 on q/v), packed rows of
# 4 x 256 DialogSum tokens, the same global batch both ways (one process accumulates the two
# micro-batches the two ranks train side by side). Prints tokens/s, the ratio, the time in
# collectives and both final losses (equal: DDP walks the data in one process's order).
#   bench/ddp_throughput.sh [OUT_DIR]   (default runs/bench-ddp; STEPS=3; NPROC=2)
# Needs the `mpi` build (cargo build --release -p ferrotune-cli --features mpi), mpirun, and
# scripts/fetch-models.sh; the data from ../shared/data/dialogsum.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-runs/bench-ddp}"
case "$out" in /*) ;; *) out="$root/$out" ;; esac
mkdir -p "$out"
bin="${FERROTUNE:-target/release/ferrotune}"
steps="${STEPS:-3}"
n="${NPROC:-2}"
grep -m1 "model name" /proc/cpuinfo | sed 's/.*: /cpu: /'
echo "cores: $(nproc); simd: $(grep -o -w -m1 -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
common=(train --config examples/dialogsum-lora.toml --overwrite --threads 1
  --set train.max_seq_len=256 --set data.packing=true --set "train.max_steps=$steps"
  --set "train.save_every=$steps" --set train.eval_every=100000)
"$bin" "${common[@]}" --set "output_dir=\"$out/one\"" --set "train.grad_accum=$n" > "$out/one.log" 2>&1
"$bin" launch --nproc "$n" --threads 1 -- "${common[@]}" --set "output_dir=\"$out/ddp\"" \
  --set 'train.distributed="ddp"' > "$out/ddp.log" 2>&1
python3 - "$out" "$n" <<'PY'
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
one = json.load(open(os.path.join(out, "one/summary.json")))
ddp = json.load(open(os.path.join(out, "ddp/summary.json")))
print(f"{'run':<28} {'tokens/s':>9} {'in collectives':>15} {'final train loss':>17}")
print(f"{'1 process x 1 thread':<28} {one['train_tokens_per_s']:>9.1f} {'-':>15} {one['final_train_loss']:>17.6f}")
comm = ddp["comm_time_s"] / ddp["train_time_s"]
print(f"{f'{n} ranks x 1 thread, DDP':<28} {ddp['train_tokens_per_s']:>9.1f} {comm:>15.1%} {ddp['final_train_loss']:>17.6f}")
print(f"ratio: {ddp['train_tokens_per_s'] / one['train_tokens_per_s']:.2f}x (target >= 1.7x for 2 ranks)")
PY
