#!/usr/bin/env python3
"""Write the quickstart task: find the date in a sentence and write it as YYYY-MM-DD.

The data is synthetic and ours (no download): sentences from a few templates with dates in
several spellings. A 135M model does not know the output format zero-shot but learns it in a
few dozen LoRA steps, so the validation loss drops visibly in a short CPU run.

    python3 examples/quickstart/make_data.py   # rewrites train.jsonl and validation.jsonl
"""
import json
import pathlib
import random

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
SENTENCES = [
    "The meeting was moved to {d}.",
    "Alice was born on {d} in a small town.",
    "Our invoice dated {d} is still unpaid.",
    "The bridge reopened to traffic on {d}.",
    "Please submit the report no later than {d}.",
    "On {d}, the team shipped version two.",
    "The museum exhibition closes on {d}.",
    "His flight to Lisbon leaves on {d}.",
    "The contract was signed on {d} by both parties.",
    "We adopted our dog on {d}.",
    "The first snow fell on {d} that year.",
    "Registration opens on {d} at noon.",
]


def ordinal(n):
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def spell(y, m, d, style):
    name = MONTHS[m - 1]
    return [
        f"{name} {d}, {y}",
        f"{d} {name} {y}",
        f"{name[:3]}. {d}, {y}",
        f"the {ordinal(d)} of {name}, {y}",
        f"{name} {ordinal(d)}, {y}",
    ][style]


def rows(rng, n):
    out = []
    for _ in range(n):
        y = rng.randint(1950, 2030)
        m = rng.randint(1, 12)
        d = rng.randint(1, 28)
        sentence = rng.choice(SENTENCES).format(d=spell(y, m, d, rng.randrange(5)))
        out.append({"sentence": sentence[0].upper() + sentence[1:], "iso": f"{y:04d}-{m:02d}-{d:02d}"})
    return out


def main():
    here = pathlib.Path(__file__).parent
    rng = random.Random(20251125)
    for name, n in [("train.jsonl", 200), ("validation.jsonl", 40)]:
        with open(here / name, "w") as f:
            for r in rows(rng, n):
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
