#!/usr/bin/env bash
# Full fine-tuning of SmolLM2-135M (AdamW, f32) on 2 MPI ranks, 1 thread each (or the run CONFIG
# names, below): every rank's peak
# RSS under DDP, ZeRO-1, ZeRO-2 and ZeRO-3 against the memory estimate each rank prints before it
# starts (issue 15: within 15%, falling stage by stage), and one process alone for reference.
# ZeRO-3 walks the layers as activation checkpointing does, so `zero2-ckpt` (ZeRO-2 with
# train.gradient_checkpointing) separates what sharding the parameters saves from what
# checkpointing saves.
#   bench/zero_memory.sh [OUT_DIR]      (default runs/bench-zero-memory; STEPS=4 steps a run;
#   STAGES="none ddp zero1 zero2 zero2-ckpt zero3" to pick rows; a stage ending in -seq, e.g.
#   zero3-seq, runs with train.overlap_comm = false, one ending in -ovl with true; the others
#   with its default, auto)
# Needs the `mpi` build (cargo build --release -p ferrotune-cli --features mpi), mpirun (Open MPI),
# GNU time (/usr/bin/time) and scripts/fetch-models.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-runs/bench-zero-memory}"
bin="${FERROTUNE:-target/release/ferrotune}"
steps="${STEPS:-4}"
# an absolute OUT_DIR as given, a relative one under the repository
case "$out" in /*) ;; *) out="$root/$out" ;; esac
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo | sed 's/.*: /cpu: /'
echo "cores: $(nproc); simd: $(grep -o -w -m1 -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# CONFIG / MODEL: another run, e.g. LoRA on the f32 HF folder, whose frozen base ZeRO-3 shards:
#   CONFIG=examples/quickstart/quickstart.toml MODEL=.cache/models/smollm2-hf STAGES="ddp zero2 zero3"
# SETS: more arguments for every run, split at spaces, e.g. SETS="--set lora.init_lora_weights=true"
config="${CONFIG:-examples/quickstart/quickstart-full-adamw.toml}"
model=()
if [ -n "${MODEL:-}" ]; then model=(--set "model=\"$root/$MODEL\""); fi
read -r -a sets <<< "${SETS:-}"
common=(train --config "$config" "${model[@]}" "${sets[@]}" --overwrite --threads 1
  --set "train.max_steps=$steps" --set "train.save_every=$steps" --set "train.eval_every=$steps")
stages="${STAGES:-none ddp zero1 zero2 zero2-ckpt zero3}"
# a run that fails stops the bench and shows why (its log's first lines), not just the status
failed() {
  echo "stage $1 failed; $out/$1.log begins:" >&2
  head -n 5 "$out/$1.log" >&2
  exit 1
}
for stage in $stages; do
  mode="${stage%-ckpt}"; mode="${mode%-seq}"; mode="${mode%-ovl}"
  args=("${common[@]}" --set "output_dir=\"$out/$stage\"" --set "train.distributed=\"$mode\"")
  case "$stage" in
    *-ckpt) args+=(--set "train.gradient_checkpointing=true") ;;
    # sequential: the collectives on the training thread (train.overlap_comm = false)
    *-seq) args+=(--set "train.overlap_comm=false") ;;
    *-ovl) args+=(--set "train.overlap_comm=true") ;;
  esac
  if [ "$stage" = none ]; then
    /usr/bin/time -f "peak RSS %M kB" "$bin" "${args[@]}" > "$out/$stage.log" 2>&1 || failed "$stage"
  else
    # each rank's GNU time line in its own file ($stage.rss.RANK): interleaved output can split it
    mpirun -np 2 --oversubscribe --bind-to none --tag-output \
      bash -c 'exec /usr/bin/time -f "peak RSS %M kB" -o "$0.rss.$OMPI_COMM_WORLD_RANK" "$@"' \
      "$out/$stage" "$bin" "${args[@]}" > "$out/$stage.log" 2>&1 || failed "$stage"
  fi
done
python3 - "$out" $stages <<'PY'
import re, sys, os
out = sys.argv[1]
units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
print(f"{'stage':<10} {'est r0':>11} {'RSS r0':>11} {'est/RSS r0':>11} {'est r1':>11} {'RSS r1':>11} {'est/RSS r1':>11}")
for stage in sys.argv[2:]:
    log = open(os.path.join(out, stage + ".log")).read()
    # mpirun tags every write with [job,rank]: put each rank's stream back together
    streams = {}
    parts = re.split(r"\[\d+,(\d+)\]<std(?:out|err)>:", log)
    streams[0] = parts[0]
    for rank, text in zip(parts[1::2], parts[2::2]):
        streams[int(rank)] = streams.get(int(rank), "") + text
    for rank in (0, 1):
        if os.path.exists(os.path.join(out, f"{stage}.rss.{rank}")):
            streams.setdefault(rank, "")
    rss, est = {}, {}
    for rank, text in streams.items():
        for f in [os.path.join(out, f"{stage}.rss.{rank}")]:
            if os.path.exists(f):
                text += open(f).read()
        r = re.search(r"peak RSS (\d+) kB", text)
        if r:
            rss[rank] = int(r.group(1)) * 1e3
        # the total, or the load's peak where that is higher (ZeRO-3 with a small trained part)
        m = re.search(r"memory estimate: [^\n]*?; peak ([\d.]+) (\w+) while", text) or re.search(
            r"memory estimate: [^\n]* = ([\d.]+) (\w+)", text)
        if m:
            est[rank] = float(m.group(1)) * units[m.group(2)]
    # DDP's ranks are replicas: rank 0's estimate is every rank's
    for r in rss:
        est.setdefault(r, est[0])
    cells = [f"{rss[r]/1e9:>10.2f}G" if r in rss else f"{'-':>11}" for r in (0, 1)]
    ests = [f"{est[r]/1e9:>10.2f}G" if r in rss else f"{'-':>11}" for r in (0, 1)]
    ratios = [f"{est[r]/rss[r]:>11.3f}" if r in rss else f"{'-':>11}" for r in (0, 1)]
    speed = ""
    summary = os.path.join(out, stage, "summary.json")
    if os.path.exists(summary):
        import json
        s = json.load(open(summary))
        t = max(s["train_time_s"], 1e-9)
        speed = (f" {s['train_tokens_per_s']:>8.1f} tok/s, collectives {s.get('comm_time_s', 0) / t:.1%},"
                 f" waited {s.get('comm_wait_time_s', s.get('comm_time_s', 0)) / t:.1%}")
    print(f"{stage:<10} {ests[0]} {cells[0]} {ratios[0]} {ests[1]} {cells[1]} {ratios[1]}{speed}")
PY
