"""Writes grade-school word problems in GSM8K's layout: {"question", "answer"}, the answer's steps annotated with
calculator calls `<<a*b=c>>c` and ending in `#### N`, as openai/gsm8k ships them. The problems are this script's own
(twelve templates, random names and numbers); the same --seed gives the same bytes.

    python tools/make_gsm8k_like.py --n 400 --seed 0 --out /tmp/gsm/train.jsonl

One template has a single step (its only result is the final answer), so `jsmaug pairs make --format gsm8k` skips
those rows and counts them ("no corruptible step").

`--level easy` writes one- and two-step problems with numbers from 2 to 20 instead (five templates: more, fewer,
groups of, more then fewer, three colours), for models too small to solve the default ones (SmolLM2-135M-Instruct
solved 0 of 24 samples of those; tools/iterate_experiment.py uses these):

    python tools/make_gsm8k_like.py --level easy --n 120 --seed 0 --out /tmp/easy.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Natalia", "Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ivan", "Zoe", "Raj", "Ella", "Noah", "Priya", "Ben"]
ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "shells", "cards", "cupcakes", "stamps"]


def step(a, op: str, b, dollar: bool = False) -> tuple[int, str]:
    """(result, 'a op b = <<a op b=c>>c'), GSM8K's printed calculation."""
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    money = "$" if dollar else ""
    return c, f"{money}{a} {op} {money}{b} = {money}<<{a}{op}{b}={c}>>{c}"


def half_as_many(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a = 2 * r.randint(6, 60)
    h, s1 = step(a, "/", 2)
    t, s2 = step(a, "+", h)
    return (f"{n} sold {item} to {a} of {n}'s friends in April, and then {n} sold half as many {item} in May. "
            f"How many {item} did {n} sell altogether in April and May?",
            [f"{n} sold {s1} {item} in May.", f"{n} sold {s2} {item} altogether in April and May."], t)


def earnings(r: random.Random):
    n = r.choice(NAMES)
    rate, hours, days = r.randint(8, 25), r.randint(2, 8), r.randint(3, 6)
    daily, s1 = step(rate, "*", hours, True)
    total, s2 = step(daily, "*", days, True)
    return (f"{n} earns ${rate} an hour babysitting and works {hours} hours a day for {days} days. "
            f"How much does {n} earn in all?",
            [f"Each day {n} earns {s1}.", f"In {days} days {n} earns {s2}."], total)


def packs_left(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    packs, each = r.randint(3, 12), r.randint(4, 15)
    total, s1 = step(packs, "*", each)
    give = r.randint(2, total - 1)
    left, s2 = step(total, "-", give)
    return (f"{n} buys {packs} packs of {item} with {each} {item} in each pack. {n} gives {give} {item} to a "
            f"friend. How many {item} does {n} have left?",
            [f"{n} bought {s1} {item}.", f"After giving some away, {n} has {s2} {item} left."], left)


def coupon(r: random.Random):
    n, item = r.choice(NAMES), r.choice(["notebooks", "shirts", "toy cars", "plants", "mugs"])
    count, price = r.randint(2, 9), r.randint(3, 30)
    cost, s1 = step(count, "*", price, True)
    off = r.randint(1, cost // 2)
    pay, s2 = step(cost, "-", off, True)
    return (f"{n} buys {count} {item} that cost ${price} each and has a coupon for ${off} off the total. "
            f"How much does {n} pay?", [f"The {item} cost {s1}.", f"With the coupon {n} pays {s2}."], pay)


def ages(r: random.Random):
    a, b, c = r.sample(NAMES, 3)
    x, k = r.randint(3, 15), r.randint(2, 4)
    bx, s1 = step(x, "*", k)
    y = r.randint(1, bx - 1)
    cx, s2 = step(bx, "-", y)
    ab, s3 = step(x, "+", bx)
    t, s4 = step(ab, "+", cx)
    return (f"{a} is {x} years old. {b} is {k} times as old as {a}, and {c} is {y} years younger than {b}. "
            f"What is the sum of their ages?",
            [f"{b} is {s1} years old.", f"{c} is {s2} years old.", f"{a} and {b} together are {s3} years old.",
             f"The sum of their ages is {s4}."], t)


def reading(r: random.Random):
    n = r.choice(NAMES)
    per, days = r.randint(5, 30), r.randint(2, 9)
    read, s1 = step(per, "*", days)
    pages = read + r.randint(10, 200)
    left, s2 = step(pages, "-", read)
    return (f"{n}'s book has {pages} pages. {n} reads {per} pages a day for {days} days. "
            f"How many pages does {n} still have to read?",
            [f"{n} has read {s1} pages.", f"{n} still has {s2} pages to read."], left)


def garden(r: random.Random):
    n = r.choice(NAMES)
    rows, per, extra = r.randint(3, 14), r.randint(4, 16), r.randint(2, 20)
    planted, s1 = step(rows, "*", per)
    total, s2 = step(planted, "+", extra)
    return (f"{n} plants {rows} rows of tomatoes with {per} plants in each row, and {extra} more plants along "
            f"the fence. How many tomato plants does {n} plant?",
            [f"The rows hold {s1} plants.", f"In all {n} plants {s2} tomato plants."], total)


def drive(r: random.Random):
    n = r.choice(NAMES)
    speed, hours, more = r.randint(30, 70), r.randint(2, 6), r.randint(5, 90)
    d, s1 = step(speed, "*", hours)
    total, s2 = step(d, "+", more)
    return (f"{n} drives at {speed} miles per hour for {hours} hours, then {more} more miles to reach a lake. "
            f"How many miles does {n} drive?",
            [f"In {hours} hours {n} drives {s1} miles.", f"The whole trip is {s2} miles."], total)


def cookies(r: random.Random):
    n = r.choice(NAMES)
    friends = r.randint(2, 8)
    each_batch, batches = r.randint(6, 24), r.randint(2, 6)
    while (each_batch * batches) % friends:
        each_batch += 1
    made, s1 = step(each_batch, "*", batches)
    each, s2 = step(made, "/", friends)
    return (f"{n} bakes {batches} batches of cookies with {each_batch} cookies in each batch and shares them "
            f"equally among {friends} friends. How many cookies does each friend get?",
            [f"{n} bakes {s1} cookies.", f"Each friend gets {s2} cookies."], each)


def savings(r: random.Random):
    n = r.choice(NAMES)
    week, weeks = r.randint(4, 40), r.randint(3, 12)
    saved, s1 = step(week, "*", weeks, True)
    spend = r.randint(1, saved - 1)
    left, s2 = step(saved, "-", spend, True)
    return (f"{n} saves ${week} every week for {weeks} weeks, then spends ${spend} on a bike helmet. "
            f"How much money does {n} have left?",
            [f"{n} saves {s1}.", f"After buying the helmet {n} has {s2} left."], left)


def more_items(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(5, 90), r.randint(2, 50)
    total, s1 = step(a, "+", b)
    return (f"{n} has {a} {item} and finds {b} more. How many {item} does {n} have now?",
            [f"{n} has {s1} {item} now."], total)


def pencils(r: random.Random):
    n = r.choice(NAMES)
    students = r.randint(2, 9)
    boxes, per, loose = r.randint(2, 9), r.randint(6, 12), r.randint(1, 20)
    while (boxes * per + loose) % students:
        loose += 1
    boxed, s1 = step(boxes, "*", per)
    total, s2 = step(boxed, "+", loose)
    each, s3 = step(total, "/", students)
    return (f"{n} has {boxes} boxes of pencils with {per} pencils in each box, and {loose} loose pencils. "
            f"{n} shares them equally among {students} students. How many pencils does each student get?",
            [f"The boxes hold {s1} pencils.", f"Together with the loose ones there are {s2} pencils.",
             f"Each student gets {s3} pencils."], each)


def easy_more(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 20), r.randint(2, 20)
    total, s1 = step(a, "+", b)
    return (f"{n} has {a} {item}. {n} gets {b} more {item}. How many {item} does {n} have now?",
            [f"{n} has {s1} {item} now."], total)


def easy_fewer(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a = r.randint(5, 20)
    b = r.randint(2, a - 2)
    left, s1 = step(a, "-", b)
    return (f"{n} has {a} {item} and gives {b} {item} to a friend. How many {item} does {n} have left?",
            [f"{n} has {s1} {item} left."], left)


def easy_groups(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 6), r.randint(2, 6)
    total, s1 = step(a, "*", b)
    return (f"{n} has {a} bags with {b} {item} in each bag. How many {item} does {n} have?",
            [f"{n} has {s1} {item}."], total)


def easy_more_then_fewer(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 12), r.randint(2, 8)
    c = r.randint(1, a + b - 1)
    mid, s1 = step(a, "+", b)
    left, s2 = step(mid, "-", c)
    return (f"{n} has {a} {item}, buys {b} more, and then gives away {c}. How many {item} does {n} have now?",
            [f"After buying, {n} has {s1} {item}.", f"After giving some away, {n} has {s2} {item}."], left)


def easy_colours(r: random.Random):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(2, 9)
    ab, s1 = step(a, "+", b)
    total, s2 = step(ab, "+", c)
    return (f"{n} has {a} red {item}, {b} blue {item} and {c} green {item}. How many {item} does {n} have in all?",
            [f"Red and blue make {s1} {item}.", f"With the green ones {n} has {s2} {item}."], total)


EASY_TEMPLATES = [easy_more, easy_fewer, easy_groups, easy_more_then_fewer, easy_colours]

TEMPLATES = [half_as_many, earnings, packs_left, coupon, ages, reading, garden, drive, cookies, savings, more_items,
             pencils]


def problems(n: int, seed: int, level: str = "default") -> list[dict]:
    r = random.Random(seed)
    templates = EASY_TEMPLATES if level == "easy" else TEMPLATES
    out = []
    for _ in range(n):
        question, lines, final = r.choice(templates)(r)
        out.append({"question": question, "answer": "\n".join(lines) + f"\n#### {final}"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="how many problems (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the JSONL file to write")
    ap.add_argument("--level", choices=("default", "easy"), default="default",
                    help="easy: one- and two-step problems with numbers from 2 to 20")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for row in problems(args.n, args.seed, args.level):
            fh.write(json.dumps(row) + "\n")
    print(f"{args.n} problems written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
