#!/usr/bin/env python3
"""How busy the cores are through `ferrotune train` steps, for A/B runs of two builds.

    python3 bench/step_idle.py --config CFG.toml [--rounds 4] EXE [EXE ...]

Runs `EXE train --config CFG.toml` for each binary in turn, `--rounds` times (interleaved, so
a slow spell of a shared host moves every binary alike), and prints per run the median step time
(`step_s` in metrics.jsonl, the first two steps left out) and the share of the machine's CPU
time that was idle (/proc/stat, from the end of the second step to the end of the run). On a
machine running nothing else, idle time during steps is time the training threads waited for
one another: serial code on one thread, the tail of a split product, wake-ups. Extra
environment (e.g. FERROTUNE_QUANT_ISA=avx2) is passed through. Each run is started with
`--overwrite`, which removes only an earlier run's files from the config's `output_dir`. Linux
only.
"""
import argparse, json, os, statistics, subprocess, sys, time


def cpu_times():
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return v[3] + v[4], sum(v)  # idle + iowait, all


def output_dir(cfg):
    try:
        lines = open(cfg).read().splitlines()
    except OSError as e:
        sys.exit(f"{cfg}: {e.strerror}")
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "output_dir":
            try:
                return json.loads(value.strip())
            except ValueError:
                sys.exit(f"{cfg}: output_dir is not a quoted string")
    sys.exit(f"{cfg}: no output_dir")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("exes", nargs="+")
    a = ap.parse_args()
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    out = output_dir(a.config)
    metrics = os.path.join(out, "metrics.jsonl")
    res = {e: [] for e in a.exes}
    for _ in range(a.rounds):
        for exe in a.exes:
            # `--overwrite` removes only an earlier run's files; an earlier metrics file counts
            # only once this run has written it
            started = time.time()
            try:
                p = subprocess.Popen([exe, "train", "--config", a.config, "--overwrite"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            except OSError as e:
                sys.exit(f"{exe}: {e.strerror}")
            start = last = None
            while p.poll() is None:
                try:
                    fresh = os.stat(metrics).st_mtime >= started
                    done = sum(1 for l in open(metrics) if '"train"' in l) if fresh else 0
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
