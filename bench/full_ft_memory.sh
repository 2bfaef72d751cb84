#!/usr/bin/env bash
# Full fine-tuning of SmolLM2-135M on the quickstart task with each optimizer: the memory
# estimate the run prints before it starts against the peak RSS it measured (summary.json),
# and each optimizer's final validation loss against AdamW's (issue 11: estimate within 15%,
# 8-bit AdamW and Adafactor within 5% of AdamW's loss). Same data, steps, lr and seed.
#   bench/full_ft_memory.sh [OUT_DIR]      (default runs/bench-full-ft; about 4 x 30 steps)
# Needs scripts/fetch-models.sh and a release build (cargo build --release).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-runs/bench-full-ft}"
bin="${FERROTUNE:-target/release/ferrotune}"
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo | sed 's/.*: /cpu: /'
echo "cores: $(nproc); simd: $(grep -o -w -m1 -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
run() { # run NAME CONFIG [--set ...]
  local name="$1" cfg="$2"; shift 2
  "$bin" train --config "$cfg" --set "output_dir=\"$root/$out/$name\"" --overwrite "$@" \
    > "$out/$name.log" 2>&1
}
run adamw examples/quickstart/quickstart-full-adamw.toml
run adafactor examples/quickstart/quickstart-full-adafactor.toml
run adamw_8bit examples/quickstart/quickstart-full-adamw8bit.toml
run sgd examples/quickstart/quickstart-full-adamw.toml --set 'train.optimizer="sgd"'
python3 - "$out" <<'PY'
import json, re, sys, os
out = sys.argv[1]
units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
rows = []
for name in ["adamw", "adafactor", "adamw_8bit", "sgd"]:
    log = open(os.path.join(out, name + ".log")).read()
    m = re.search(r"memory estimate: .* = ([\d.]+) (\w+)", log)
    est = float(m.group(1)) * units[m.group(2)]
    s = json.load(open(os.path.join(out, name, "summary.json")))
    rows.append((name, est, s["peak_rss_bytes"], s["final_val_loss"]))
base = rows[0][3]
print(f"{'optimizer':<11} {'estimate':>9} {'peak RSS':>9} {'est/RSS':>8} {'val loss':>9} {'vs AdamW':>9}")
for name, est, rss, loss in rows:
    print(f"{name:<11} {est/1e9:>8.2f}G {rss/1e9:>8.2f}G {est/rss:>8.3f} {loss:>9.4f} {loss/base:>9.3f}")
PY
