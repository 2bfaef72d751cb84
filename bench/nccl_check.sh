#!/usr/bin/env bash
# The NCCL back-end on one machine with 2 or more NVIDIA GPUs (issue 15), after
# `scripts/build-cuda.sh <compute capability>` (features cuda + nccl, binaries in
# ${CARGO_TARGET_DIR:-target}/release):
#   1. every collective against the value it must give (ferrotune-nccl-check, one rank a GPU);
#   2. DDP, LoRA on SmolLM2: N GPUs with batch b each vs 1 GPU with grad_accum N: same losses
#      and adapter (1e-5 relative is the CPU test's bound; GPUs sum in another order, so the
#      script prints the largest difference), tokens/s both ways;
#   3. full fine-tuning under DDP and ZeRO-3 on N GPUs: same weights, each rank's peak GPU
#      memory, tokens/s, time in collectives and MFU (6 N_params tokens/s over the GPUs' peak).
#   bench/nccl_check.sh [OUT_DIR]     (default runs/bench-nccl; NPROC=GPUs to use, default all;
#   STEPS=10; PEAK_TFLOPS=the per-GPU peak MFU divides by, default 989 (H100 SXM bf16 dense))
# NCCL needs one GPU per rank (two ranks on one GPU are refused by NCCL itself).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-runs/bench-nccl}"
case "$out" in /*) ;; *) out="$root/$out" ;; esac
mkdir -p "$out"
rel="${CARGO_TARGET_DIR:-target}/release"
bin="${FERROTUNE:-$rel/ferrotune}"
check="$rel/ferrotune-nccl-check"
steps="${STEPS:-10}"
[ -f .cache/cuda/env.sh ] && source .cache/cuda/env.sh
gpus="$(nvidia-smi -L | wc -l)"
n="${NPROC:-$gpus}"
if [ "$n" -lt 2 ]; then
  echo "bench/nccl_check.sh: needs 2 or more GPUs (this machine has $gpus)" >&2
  exit 2
fi
nvidia-smi -L | head -"$n"
grep -m1 "model name" /proc/cpuinfo | sed 's/.*: /cpu: /'

# 1. collectives, torchrun-style environment by hand
port=$((29500 + RANDOM % 1000))
pids=()
for r in $(seq 0 $((n - 1))); do
  RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$check" > "$out/check.$r.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
cat "$out"/check.*.log

# peak memory used on each GPU while a command runs (nvidia-smi polled every 0.2 s)
watch_gpus() {
  local log="$1"; shift
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$log.mem" &
  local smi=$!
  "$@" > "$log" 2>&1 || { kill $smi; echo "failed: $*; see $log" >&2; tail -5 "$log" >&2; exit 1; }
  kill $smi
}

quick=(train --config examples/quickstart/quickstart.toml --overwrite
  --set "train.max_steps=$steps" --set "train.save_every=$steps" --set "train.eval_every=$steps"
  --set 'train.device="cuda"')
# 2. DDP LoRA on N GPUs vs one GPU accumulating N micro-batches
watch_gpus "$out/lora-1gpu.log" "$bin" "${quick[@]}" --set "output_dir=\"$out/lora-1gpu\"" \
  --set "train.grad_accum=$n"
watch_gpus "$out/lora-ddp.log" "$bin" launch --backend nccl --nproc "$n" -- "${quick[@]}" \
  --set "output_dir=\"$out/lora-ddp\"" --set 'train.distributed="ddp"'

full=(train --config examples/quickstart/quickstart-full-adamw.toml --overwrite
  --set "train.max_steps=$steps" --set "train.save_every=$steps" --set "train.eval_every=$steps")
# 3. full fine-tuning, DDP and ZeRO-3
for stage in ddp zero3; do
  watch_gpus "$out/full-$stage.log" "$bin" launch --backend nccl --nproc "$n" -- "${full[@]}" \
    --set "output_dir=\"$out/full-$stage\"" --set "train.distributed=\"$stage\""
done

python3 - "$out" "$n" "${PEAK_TFLOPS:-989}" <<'PY'
import json, os, struct, sys
out, n, peak = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) * 1e12

def tensors(path):
    """A safetensors file's f32 tensors as flat lists (no numpy on a bare GPU machine)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(size))
        data = f.read()
    res = {}
    for k, v in head.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        a, b = v["data_offsets"]
        res[k] = struct.unpack(f"<{(b - a) // 4}f", data[a:b])
    return res

def max_rel(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), (a, b)
    worst = 0.0
    for k in ta:
        num = max(abs(x - y) for x, y in zip(ta[k], tb[k]))
        den = max(max(abs(x) for x in ta[k]), 1e-12)
        worst = max(worst, num / den)
    return worst

def summary(run):
    return json.load(open(os.path.join(out, run, "summary.json")))

def peak_mem(run):
    per = {}
    for line in open(os.path.join(out, run + ".log.mem")):
        try:
            i, m = (int(x) for x in line.split(","))
        except ValueError:
            continue
        per[i] = max(per.get(i, 0), m)
    return " / ".join(f"{per[i] / 1024:.2f}" for i in sorted(per)[:n]) + " GiB"

print(f"\n{'run':<16} {'GPUs':>4} {'tokens/s':>10} {'comm':>6} {'final val loss':>15} {'peak GPU mem':>24} {'MFU':>6}")
for run, g in [("lora-1gpu", 1), ("lora-ddp", n), ("full-ddp", n), ("full-zero3", n)]:
    s = summary(run)
    tps = s["train_tokens_per_s"]
    comm = s.get("comm_time_s", 0.0) / max(s["train_time_s"], 1e-9)
    # MFU for full fine-tuning only: LoRA's FLOPs are not 6 N per token (no weight gradients).
    mfu = f"{6 * s['all_params'] * tps / (peak * g):.1%}" if run.startswith("full") else "-"
    print(f"{run:<16} {g:>4} {tps:>10.1f} {comm:>6.1%} {s['final_val_loss']:>15.7f} {peak_mem(run):>24} {mfu:>6}")
one, ddp = summary("lora-1gpu"), summary("lora-ddp")
print(f"\nDDP x{n} vs 1 GPU: tokens/s {ddp['train_tokens_per_s'] / one['train_tokens_per_s']:.2f}x;"
      f" final val loss {one['final_val_loss']:.7f} vs {ddp['final_val_loss']:.7f}")
print("adapter max relative difference (DDP vs 1 GPU + grad_accum):",
      f"{max_rel(os.path.join(out, 'lora-1gpu/adapter/adapter_model.safetensors'), os.path.join(out, 'lora-ddp/adapter/adapter_model.safetensors')):.2e}")
def weights(run):
    d = os.path.join(out, run, "model")
    return os.path.join(d, "model.safetensors")
print("full fine-tuning max relative difference (ZeRO-3 vs DDP):",
      f"{max_rel(weights('full-ddp'), weights('full-zero3')):.2e}")
PY
