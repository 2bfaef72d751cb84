#!/usr/bin/env python3
"""How busy the cores are through `ferrotune train` steps, for A/B runs of two builds.

    python3 bench/step_idle.py --config CFG.toml [--rounds 4] EXE [EXE ...]

Runs `EXE train --config CFG.toml` for each binary in turn, `--rounds` times (interleaved, so
a slow spell of a shared host moves every binary alike), and prints per run the median step time
(`step_s` in metrics.jsonl, the first two steps left out) and the share of the machine's CPU
time that was idle (/proc/stat, from the end of the second step to the end of the run). On a
machine running nothing else, idle time during steps is time the training threads waited for
one another: serial code on one thread, the tail of a split product, wake-ups. The config's
`output_dir` is removed before each run. Extra environment (e.g. FERROTUNE_QUANT_ISA=avx2) is
passed through. Linux only.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, time


def cpu_times():
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return v[3] + v[4], sum(v)  # idle + iowait, all


def output_dir(cfg):
    for line in open(cfg):
        key, _, value = line.partition("=")
        if key.strip() == "output_dir":
            return json.loads(value.strip())
    sys.exit(f"{cfg}: no output_dir")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("exes", nargs="+")
    a = ap.parse_args()
    out = output_dir(a.config)
    metrics = os.path.join(out, "metrics.jsonl")
    res = {e: [] for e in a.exes}
    for _ in range(a.rounds):
        for exe in a.exes:
            shutil.rmtree(out, ignore_errors=True)
            p = subprocess.Popen([exe, "train", "--config", a.config],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            start = last = None
            while p.poll() is None:
                try:
                    done = sum(1 for l in open(metrics) if '"train"' in l)
                except OSError:
                    done = 0
                if done >= 2:
                    last = cpu_times()
                    start = start or last
                time.sleep(0.05)
            if p.returncode != 0:
                sys.exit(f"{exe} failed:\n{p.stderr.read()}")
            steps = [json.loads(l) for l in open(metrics) if '"train"' in l]
            if start is None or len(steps) < 4:
                sys.exit("need at least 4 steps (train.max_steps)")
            idle = (last[0] - start[0]) / max(1, last[1] - start[1])
            med = statistics.median(s["step_s"] for s in steps[2:])
            res[exe].append((med, idle))
            print(f"{exe}: median step {med:.3f} s, idle {100 * idle:.1f}%", flush=True)
    for exe, v in res.items():
        print(f"{exe}: over {len(v)} runs, median step {statistics.median(x[0] for x in v):.3f} s, "
              f"idle {100 * statistics.median(x[1] for x in v):.1f}% "
              f"({100 * min(x[1] for x in v):.1f}-{100 * max(x[1] for x in v):.1f})")


if __name__ == "__main__":
    main()
