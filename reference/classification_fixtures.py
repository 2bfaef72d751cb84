"""Golden values for ferrotune's classification metrics (crates/ferrotune/src/eval/metrics/
classification.rs): scikit-learn's `accuracy_score` and `f1_score(average="macro")`.

Run from the repository root with the reference environment (`scripts/setup-reference.sh` pins
scikit-learn):

    .venv/bin/python reference/classification_fixtures.py

Writes tests/fixtures/metrics/classification.json:
    "versions"  {"scikit-learn": ...}
    "cases"     [{"gold": [ids], "pred": [ids], "accuracy": float, "f1": float}, ...]:
                random label sequences (fixed seed) with 2 to 8 classes and 1 to 60 rows,
                including classes that are only predicted or only gold, and hand-picked edge
                cases (all right, all wrong, one class).
Deterministic: rerunning rewrites an identical file.
"""

import json
import os
import random

import sklearn
from sklearn.metrics import accuracy_score, f1_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "metrics", "classification.json")


def case(gold, pred):
    return {
        "gold": gold,
        "pred": pred,
        "accuracy": float(accuracy_score(gold, pred)),
        "f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
    }


def main() -> None:
    rng = random.Random(10)
    cases = [
        case([0, 0, 1, 1, 2], [0, 1, 1, 1, 1]),
        case([1, 1, 1], [1, 1, 1]),
        case([0, 1, 0, 1], [1, 0, 1, 0]),
        case([0, 0], [0, 7]),
        case([3], [3]),
        case([2, 2, 2, 2], [0, 1, 2, 3]),
    ]
    for _ in range(40):
        classes = rng.randint(2, 8)
        n = rng.randint(1, 60)
        skill = rng.random()
        gold = [rng.randrange(classes) for _ in range(n)]
        pred = [g if rng.random() < skill else rng.randrange(classes) for g in gold]
        cases.append(case(gold, pred))
    with open(OUT, "w") as f:
        json.dump({"versions": {"scikit-learn": sklearn.__version__}, "cases": cases}, f)
        f.write("\n")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
