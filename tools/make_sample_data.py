"""Generates the shipped sample preference data (deterministic: same bytes every run).

MetaMath-like pairs: a worked arithmetic solution (chosen) vs the same solution with exactly one number edited
(rejected): the low-edit-distance case the DPOP paper is about. ARC-like pairs: a multiple-choice science
question, the correct answer vs each wrong one. mc.jsonl: 20 other ARC-like questions (none of them in
train or test) as multiple choice (query, four choices, gold index), the format `tools/evaluate.py --mc` reads.

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

# Held out for multiple choice only: none of these questions appears in the train or test pairs (an evaluation set
# must be disjoint from the training data; tests/test_data.py checks it).
ARC_MC = [
    ("Which animal lays eggs?", "a chicken", ["a dog", "a cow", "a horse"]),
    ("What is the closest star to the Earth?", "the Sun", ["Sirius", "the North Star", "Betelgeuse"]),
    ("Which of these is a gas at room temperature?", "nitrogen", ["iron", "salt", "sugar"]),
    ("What do plants release into the air during photosynthesis?", "oxygen", ["carbon dioxide", "smoke", "nitrogen"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Saturn", "Neptune"]),
    ("What is the hardest natural material?", "diamond", ["gold", "granite", "glass"]),
    ("Which body part helps a fish breathe in water?", "the gills", ["the fins", "the scales", "the tail"]),
    ("What kind of energy does a moving car have?", "kinetic energy", ["sound energy", "nuclear energy",
                                                                        "chemical energy"]),
    ("What happens to water when it is heated to its boiling point?", "it turns into vapor",
     ["it freezes", "it becomes denser", "it turns into ice"]),
    ("Which organ do humans use to breathe?", "the lungs", ["the kidneys", "the heart", "the skin"]),
    ("What is the largest planet in the solar system?", "Jupiter", ["Earth", "Mars", "Mercury"]),
    ("Which of these objects is attracted to a magnet?", "an iron nail", ["a wooden spoon", "a rubber band",
                                                                         "a paper clip made of plastic"]),
    ("How long does the Earth take to orbit the Sun?", "one year", ["one day", "one month", "one hour"]),
    ("What do caterpillars turn into?", "butterflies", ["beetles", "spiders", "worms"]),
    ("Which tool is used to look at very small things?", "a microscope", ["a telescope", "a compass",
                                                                          "a periscope"]),
    ("What covers most of the Earth's surface?", "water", ["sand", "ice", "forest"]),
    ("Which of these is a source of light?", "a candle flame", ["a mirror", "the Moon", "a window"]),
    ("What is the young of a frog called?", "a tadpole", ["a cub", "a calf", "a chick"]),
    ("Which simple machine is a ramp?", "an inclined plane", ["a pulley", "a lever", "a wheel"]),
    ("What do we call rain, snow, sleet and hail?", "precipitation", ["evaporation", "condensation",
                                                                      "erosion"]),
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
    for q, right, wrongs in ARC_MC:
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
