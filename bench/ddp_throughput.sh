#!/usr/bin/env bash
# DDP throughput on MPI (issue 15: 2 ranks x 1 thread vs 1 rank x 1 thread >= 1.7x for LoRA at
# 4x256): SmolLM2-135M Q4_1 with LoRA (examples/dialogsum-lora.toml: r 16 on q/v), packed rows of
# 4 x 256 DialogSum tokens, the same global batch both ways (one process accumulates the two
# micro-batches the two ranks train side by side). DDP runs twice: gradients sent during the
# backward pass (train.overlap_comm = true) and after it (false; what its default, auto,
# picks where the ranks' threads fill the cores). Prints tokens/s, the ratio, the
# time in collectives, the time the training waited for them, and the final losses (equal:
# DDP walks the data in one process's order).
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
  --set 'train.distributed="ddp"' --set train.overlap_comm=true > "$out/ddp.log" 2>&1
"$bin" launch --nproc "$n" --threads 1 -- "${common[@]}" --set "output_dir=\"$out/ddp-after\"" \
  --set 'train.distributed="ddp"' --set train.overlap_comm=false > "$out/ddp-after.log" 2>&1
python3 - "$out" "$n" <<'PY'
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
one = json.load(open(os.path.join(out, "one/summary.json")))
runs = {k: json.load(open(os.path.join(out, k, "summary.json"))) for k in ("ddp", "ddp-after")}
print(f"{'run':<44} {'tokens/s':>9} {'in collectives':>15} {'waited for them':>16} {'final train loss':>17}")
print(f"{'1 process x 1 thread':<44} {one['train_tokens_per_s']:>9.1f} {'-':>15} {'-':>16} {one['final_train_loss']:>17.6f}")
for key, label in (("ddp", "sent during the backward pass"), ("ddp-after", "sent after the backward pass")):
    s = runs[key]
    comm = s["comm_time_s"] / s["train_time_s"]
    wait = s.get("comm_wait_time_s", s["comm_time_s"]) / s["train_time_s"]
    name = f"{n} ranks x 1 thread, DDP, {label}"
    print(f"{name:<44} {s['train_tokens_per_s']:>9.1f} {comm:>15.1%} {wait:>16.1%} {s['final_train_loss']:>17.6f}")
ddp, after = runs["ddp"], runs["ddp-after"]
print(f"ratio to 1 process: {ddp['train_tokens_per_s'] / one['train_tokens_per_s']:.2f}x overlapped, "
      f"{after['train_tokens_per_s'] / one['train_tokens_per_s']:.2f}x not (target >= 1.7x for 2 ranks); "
      f"overlapped / not: {ddp['train_tokens_per_s'] / after['train_tokens_per_s']:.2f}x")
PY
