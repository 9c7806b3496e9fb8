"""Math rows -> chosen (the solution) and rejected (the same solution with ONE computed intermediate result changed).

Formats (hub columns):   metamath  query, response   (meta-math/MetaMathQA; ends "The answer is: X")
                         gsm8k     question, answer  (openai/gsm8k; `<<a*b=c>>` annotations, ends "#### X")
Prompt "Question: {question}\\nAnswer:", chosen " {solution}" (lm-evaluation-harness's gsm8k text).

What can be corrupted (a *step*), searched only in the solution before its final answer:
  - a GSM8K calculator annotation `<<expr=c>>` whose expr has an operator: c there and its printed copy right
    after `>>` (`<<48/2=24>>24`) change together, to the same new value;
  - elsewhere, an equation `a op b [op ...] = c` (op one of + - * / x × ÷ \\times \\cdot \\div, LaTeX or plain)
    whose left side evaluates to c (to c's decimals), is not the tail of a longer expression, and whose c is not
    followed by more of an expression (`= 3/4`, `= 2^3`, `= 5x`).
A step is left out when its c equals a number of the question (a number copied from it, not computed) or the
final answer's value. The final answer line (`The answer is: X`, `#### X`) is never touched. One step is drawn
with the row's generator; c becomes c + d (d a non-zero multiple of c's last decimal place, |d| at most
max(3, 20% of c), the sign of c kept, never the final answer), printed as c was (decimals, thousands commas).
A row with no step, or no final answer, is skipped and counted.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from jsmaug.pairs.read import text_field

FORMATS = ("metamath", "gsm8k")
COLUMNS = {"metamath": ("query", "response"), "gsm8k": ("question", "answer")}
FINAL = {"metamath": re.compile(r"The answer is:?"), "gsm8k": re.compile(r"####")}
NO_STEP, NO_FINAL = "no corruptible step", "no final answer"

NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
NUM_RE = re.compile(rf"(?<![\d.,]){NUM}(?![\d])")
ANNOTATION = re.compile(rf"<<(?P<expr>[^<>=]*)=(?P<c>-?{NUM})>>(?P<printed>\$?(?P<p>-?{NUM}))?")
OPS = r"(?:\\times|\\cdot|\\div|[-+*/×÷]|(?<=\s)x(?=\s))"
TERM = rf"\(*\s*\$?{NUM}\s*\)*"
EQUATION = re.compile(rf"(?<![\w.,\\{{}}^_]){TERM}(?:\s*{OPS}\s*{TERM})+\s*=\s*\$?\s*(?P<c>{NUM})")
TAIL = re.compile(rf"\s*(?:{OPS}|\^)|\\frac|[{{\w]|\.\d|,\d")
HEAD_OPS = ("+", "-", "*", "/", "×", "÷", "^", "(", "\\times", "\\cdot", "\\div", "_", "{")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class Problem:
    where: str
    question: str
    solution: str

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    def solved(self) -> str:
        return f"{self.prompt} {self.solution}"


@dataclass(frozen=True)
class Step:
    """A computed result: its value, the spans (start, end) of the solution that print it and their texts."""

    value: Decimal
    texts: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]


def problem(fmt: str, row: dict, where: str) -> Problem:
    q, s = COLUMNS[fmt]
    return Problem(where, text_field(row, q, where), text_field(row, s, where))


def number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def final_answer(fmt: str, solution: str) -> tuple[int, Decimal | None] | None:
    """(where the final answer line starts, its value if it is a number), or None without one."""
    hits = list(FINAL[fmt].finditer(solution))
    if not hits:
        return None
    start = hits[-1].start()
    tail = solution[hits[-1].end():].strip().strip("$").rstrip(".").strip()
    return start, number(tail) if re.fullmatch(rf"-?{NUM}", tail) else None


def _evaluate(expr: str) -> float | None:
    text = re.sub(r"\\times|×|(?<=\s)x(?=\s)|\\cdot", "*", expr)
    text = re.sub(r"\\div|÷", "/", text).replace(",", "").replace("$", "")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError("not arithmetic")
    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _agrees(value: float, c: Decimal, text: str) -> bool:
    return abs(value - float(c)) <= 0.5 * 10.0 ** -_decimals(text) * (1 + 1e-9)


def steps(body: str) -> list[Step]:
    """Every computed result printed in `body` (annotations first, then equations outside them), in order."""
    found: list[Step] = []
    masked = list(body)
    for m in ANNOTATION.finditer(body):
        masked[m.start():m.end()] = "\0" * (m.end() - m.start())  # no equation reads into it
        if not re.search(OPS, m["expr"]) or number(m["c"]) is None:
            continue
        value = number(m["c"])
        spans, texts = [m.span("c")], [m["c"]]
        if m["p"] is not None and number(m["p"]) == value:
            spans.append(m.span("p"))
            texts.append(m["p"])
        found.append(Step(value, tuple(texts), tuple(spans)))
    text = "".join(masked)
    for m in EQUATION.finditer(text):
        head = text[:m.start()].rstrip()
        if head.endswith(HEAD_OPS) or TAIL.match(text, m.end()):
            continue
        lhs = text[m.start():m.start("c")].rstrip().rstrip("$").rstrip().rstrip("=")
        value, got = number(m["c"]), _evaluate(lhs)
        if value is None or got is None or not _agrees(got, value, m["c"]):
            continue
        found.append(Step(value, (m["c"],), (m.span("c"),)))
    return sorted(found, key=lambda s: s.spans[0])


def _format(value: Decimal, like: str) -> str:
    d = _decimals(like)
    text = f"{value:,.{d}f}" if "," in like else f"{value:.{d}f}"
    return text


def new_value(step: Step, rng: random.Random, avoid: set[Decimal]) -> Decimal:
    """A different value for the step (see the module docstring), in steps of its last printed decimal place."""
    unit = Decimal(1).scaleb(-max(_decimals(t) for t in step.texts))
    k = max(3, int(abs(step.value) / unit * Decimal("0.2")))
    for _ in range(1000):
        new = step.value + rng.choice((-1, 1)) * rng.randint(1, k) * unit
        if new == step.value or new in avoid or (step.value > 0 and new <= 0) or (step.value < 0 and new >= 0):
            continue
        return new
    raise RuntimeError(f"no new value for {step}")  # cannot happen: k >= 3 leaves several candidates


def corruptible_steps(fmt: str, p: Problem) -> list[Step] | str:
    """The steps of `p` that may be corrupted, or the skip reason."""
    final = final_answer(fmt, p.solution)
    if final is None:
        return NO_FINAL
    start, final_value = final
    question_numbers = {number(m.group()) for m in NUM_RE.finditer(p.question)}
    ok = [s for s in steps(p.solution[:start]) if s.value not in question_numbers and s.value != final_value]
    return ok or NO_STEP


def corrupt(fmt: str, p: Problem, rng: random.Random) -> tuple[str, Step, Decimal] | str:
    """(rejected solution, the step changed, its new value), or the skip reason (NO_STEP, NO_FINAL). Each printed
    copy of the step gets the new value in its own format (`<<..=1800>>1,800` -> `<<..=1850>>1,850`)."""
    found = corruptible_steps(fmt, p)
    if isinstance(found, str):
        return found
    step = rng.choice(found)
    final_value = final_answer(fmt, p.solution)[1]
    new = new_value(step, rng, {final_value} if final_value is not None else set())
    out = p.solution
    for (a, b), text in sorted(zip(step.spans, step.texts), reverse=True):
        out = out[:a] + _format(new, text) + out[b:]
    return out, step, new
