#!/usr/bin/env python3
"""The README's forgetting table from the four runs of examples/forgetting/*.toml: per task and
metric, the base's score, then each run's score with its change, the change's 95% paired-
bootstrap interval and the verdict (from each run's forgetting.json).

    python3 bench/forgetting_table.py [runs/forgetting]
"""
import json, os, sys

RUNS = [("dialogsum-lora", "LoRA, DialogSum"), ("dialogsum-full", "full, DialogSum"),
        ("multitask-lora", "LoRA, mixture"), ("multitask-full", "full, mixture")]
SHORT = {"forgot": "forgot", "improved": "improved", "no significant change": "n.s.", "n/a": "n/a"}


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/forgetting"
    reports = {}
    for run, _ in RUNS:
        p = os.path.join(root, run, "forgetting.json")
        if os.path.exists(p):
            reports[run] = {(r["task"], r["metric"]): r for r in json.load(open(p))["rows"]}
    if not reports:
        sys.exit(f"no forgetting.json under {root}")
    keys = []
    for rows in reports.values():
        for k in rows:
            if k not in keys:
                keys.append(k)
    head = "| task | metric | base |" + "".join(f" {label} |" for run, label in RUNS if run in reports)
    print(head)
    print("|---|---|---:|" + "---:|" * len(reports))
    for task, metric in keys:
        base = next(r[(task, metric)]["before"] for r in reports.values() if (task, metric) in r)
        arrow = "↑" if next(r[(task, metric)]["higher_is_better"] for r in reports.values() if (task, metric) in r) else "↓"
        cells = []
        for run, _ in RUNS:
            if run not in reports:
                continue
            r = reports[run].get((task, metric))
            if r is None:
                cells.append(" — |")
                continue
            ci = "" if r["ci_low"] is None or r["ci_low"] != r["ci_low"] else f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            cells.append(f" {r['after']:.3f} ({r['delta']:+.3f}{ci}) {SHORT.get(r['verdict'], r['verdict'])} |")
        print(f"| {task} | {metric} {arrow} | {base:.3f} |" + "".join(cells))


if __name__ == "__main__":
    main()
