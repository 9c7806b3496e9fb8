"""Generates the shipped sample preference data (deterministic: same bytes every run).

MetaMath-like pairs: a worked arithmetic solution (chosen) vs the same solution with exactly one number edited
(rejected): the low-edit-distance case the DPOP paper is about. ARC-like pairs: a multiple-choice science
question, the correct answer vs each wrong one. mc.jsonl: the same ARC-like questions as multiple choice
(query, four choices, gold index), the format `tools/evaluate.py --mc` reads.

    python tools/make_sample_data.py [--out_dir data/sample] [--check]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ivan", "Zoe", "Raj", "Ella"]
ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "shells", "cards"]

ARC = [
    ("Which of these animals is a mammal?", "a whale", ["a shark", "a trout", "a frog"]),
    ("What gas do plants take in from the air to make food?", "carbon dioxide", ["oxygen", "helium", "neon"]),
    ("Which force pulls objects toward the center of the Earth?", "gravity", ["magnetism", "friction", "tension"]),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100", ["50", "0", "212"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Mars", "Jupiter"]),
    ("What part of the plant absorbs water from the soil?", "the roots", ["the leaves", "the flowers", "the seeds"]),
    ("Which state of matter has a fixed shape?", "solid", ["liquid", "gas", "plasma"]),
    ("What do we call an animal that eats only plants?", "a herbivore", ["a carnivore", "a predator", "a scavenger"]),
    ("Which organ pumps blood through the body?", "the heart", ["the lungs", "the liver", "the stomach"]),
    ("What causes day and night on Earth?", "the Earth spinning on its axis",
     ["the Moon orbiting the Earth", "the Sun orbiting the Earth", "clouds covering the Sun"]),
    ("Which material conducts electricity best?", "copper", ["wood", "rubber", "glass"]),
    ("What is the main source of energy for life on Earth?", "the Sun", ["the Moon", "volcanoes", "the wind"]),
    ("Which layer of the Earth do we live on?", "the crust", ["the mantle", "the outer core", "the inner core"]),
    ("What is frozen water called?", "ice", ["steam", "fog", "dew"]),
    ("Which sense organ detects sound?", "the ear", ["the eye", "the nose", "the tongue"]),
    ("What do bees collect from flowers to make honey?", "nectar", ["pollen", "sap", "water"]),
    ("Which of these is a renewable energy source?", "wind", ["coal", "oil", "natural gas"]),
    ("What tool measures temperature?", "a thermometer", ["a ruler", "a scale", "a barometer"]),
    ("Which of these is a property of metals?", "they are shiny", ["they are brittle", "they float", "they are soft"]),
    ("How many legs does an insect have?", "six", ["four", "eight", "ten"]),
]


def arithmetic_pair(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 9)
    total = a + b
    left = total - c
    prompt = (f"Question: {name} has {a} {item} and gets {b} more. Then {name} gives away {c}. "
              f"How many {item} does {name} have now?\nAnswer:")
    steps = [f"{name} starts with {a} {item}.", f"After getting {b} more, {name} has {a} + {b} = {total}.",
             f"After giving away {c}, {name} has {total} - {c} = {left}.", f"The answer is: {left}"]
    chosen = " " + " ".join(steps)
    # One number edited (low edit distance), in one of the computed values.
    which = rng.choice(["total", "left"])
    wrong = (total if which == "total" else left) + rng.choice([-2, -1, 1, 2])
    if which == "total":
        steps[1] = f"After getting {b} more, {name} has {a} + {b} = {wrong}."
    else:
        steps[3] = f"The answer is: {wrong}"
    return {"prompt": prompt, "chosen": chosen, "rejected": " " + " ".join(steps), "source": "metamath_like"}


def arc_pairs() -> list[dict]:
    out = []
    for q, right, wrongs in ARC:
        prompt = f"Question: {q}\nAnswer:"
        out += [{"prompt": prompt, "chosen": f" {right}", "rejected": f" {w}", "source": "arc_like"} for w in wrongs]
    return out


def arc_multiple_choice(rng: random.Random) -> list[dict]:
    out = []
    for q, right, wrongs in ARC:
        choices = [right] + list(wrongs)
        rng.shuffle(choices)
        out.append({"query": f"Question: {q}\nAnswer:", "choices": choices, "gold": choices.index(right)})
    return out


def build() -> dict[str, list[dict]]:
    rng = random.Random(20240213)
    math = [arithmetic_pair(rng) for _ in range(320)]
    arc = arc_pairs()  # 60 pairs
    rng.shuffle(arc)
    train = math[:288] + arc[:48]
    test = math[288:] + arc[48:]
    rng.shuffle(train)
    return {"train": train, "test": test, "mc": arc_multiple_choice(random.Random(7))}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default=str(Path(__file__).resolve().parent.parent / "data" / "sample"))
    ap.add_argument("--check", action="store_true", help="verify the files on disk equal what would be generated")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    splits = build()
    if args.check:
        bad = [s for s, rows in splits.items() if not (out / f"{s}.jsonl").exists()
               or (out / f"{s}.jsonl").read_text() != render(rows)]
        if bad:
            print(f"sample data out of date: {bad}; run python tools/make_sample_data.py", file=sys.stderr)
            return 1
        print("sample data up to date")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text(render(rows))
        tmp.replace(out / f"{split}.jsonl")
        print(f"wrote {out / f'{split}.jsonl'}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
