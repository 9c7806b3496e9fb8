"""Matmul FLOPs and collective bytes of a compiled program per step, counted from its optimized HLO text,
independently of XLA's cost analysis (which counts a while loop's body once: the layer scan's 32 layers as 1).

    counts = hlo_stats.count(compiled.as_text())
    counts["dot"], counts["ragged_dot"], counts["ragged_dot_rows"], counts["collectives"] (kind -> bytes),
    counts["unknown_trip_count_loops"]

Every `dot`, `convolution` (TPU rewrites many dots as convolutions) and `ragged-dot` is counted once per
execution: a while loop's body counts its trip count times (XLA's `known_trip_count`, else the constant N of its
condition `i < N` over the step its body adds to `i`; a loop with neither, such as a fori_loop with run-time bounds, counts once and is reported),
fusions, calls and async wrappers count as often as their caller, each branch of a conditional counts once (an upper bound). FLOPs are 2 x multiply-adds:
- dot:         2 x output elements x contracted size;
- convolution: 2 x output batch x output features x input features x the window taps that land on real input
               (TPU writes batched matmuls as convolutions whose window slides over a padded dim);
- ragged-dot, and the grouped-matmul kernels TPU programs call as custom calls (megablox's gmm / tgmm, and XLA's
               own `ragged-dot-*` kernel; out (M, N) from lhs (M, K), or out (G, K, N) from lhs (M, K)):
               2 x M x K x N, with the static row count M. A ragged-dot's rows are
               a static buffer; the kernel computes only the rows its group sizes cover, which the HLO cannot
               say (all_to_all dispatch sizes that buffer for the worst case). `ragged_dot_rows` is the static row
               count per execution summed, so a caller can rescale to the rows actually routed.
Collectives (all-gather, all-reduce, all-to-all, reduce-scatter, collective-permute, and their -start forms)
count their result bytes per execution, by kind.
Element-wise work (softmax, norms, the optimizer) is left out: it is a small share of a transformer's FLOPs.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict

import numpy as np

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z0-9]+\[[0-9,]*\])")


def _dims(shape: str) -> list[int] | None:
    m = _SHAPE.match(shape.strip())
    if not m:
        return None
    return [int(x) for x in m.group(1).split(",") if x]


def _attr_dims(attrs: str, name: str) -> list[int]:
    m = re.search(name + r"=\{([0-9,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _parse(hlo: str):
    """computation name -> list of (opcode, result shape, operand names, attributes); and the entry's name."""
    comps, shapes, entry, cur = {}, {}, None, None
    for line in hlo.splitlines():
        head = _HEADER.match(line)
        if head and not line.startswith(" "):
            cur = head.group(1)
            comps[cur], shapes[cur] = [], {}
            if line.startswith("ENTRY"):
                entry = cur
            for name, shape in _PARAM.findall(head.group(2)):
                shapes[cur][name] = shape
            continue
        ins = _INSTR.match(line) if cur else None
        if not ins:
            continue
        name, shape, op, operands, attrs = ins.groups()
        shapes[cur][name] = shape
        literal = operands if op == "constant" else attrs
        comps[cur].append((op, shape, re.findall(r"%([\w.\-]+)", operands), literal, name))
    return comps, shapes, entry


def _constants(instrs) -> dict[str, int]:
    return {name: int(c.group(1)) for op, _, _, a, name in instrs if op == "constant"
            for c in [re.match(r"\s*(-?\d+)\s*$", a)] if c}


def _loop_step(index: int | None, body) -> int:
    """How much a loop's body adds to its counter (tuple element `index`): the constant of the `add` the body's
    root tuple holds there; 1 when that cannot be read. XLA on TPU writes some loops as `i += 2`."""
    if index is None or not body:
        return 1
    instrs = {name: (op, operands) for op, _, operands, _, name in body}
    roots = [operands for op, _, operands, _, _ in body if op == "tuple"]
    src = roots[-1][index] if roots and index < len(roots[-1]) else None
    if src in instrs and instrs[src][0] == "add":
        steps = [v for o, v in _constants(body).items() if o in instrs[src][1]]
        if steps and steps[0] > 0:
            return steps[0]
    return 1


def _trip_count(attrs: str, comps) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count`, else its condition `i < N` with N a constant (the
    form of every scan and static fori_loop; TPU programs do not record known_trip_count), divided by the step
    its body adds to `i` (counted from 0). None if neither."""
    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    if trip:
        return int(trip.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", attrs)
    cond_body = comps.get(cond.group(1), []) if cond else []
    constants = _constants(cond_body)
    elements = {name: int(m.group(1)) for op, _, _, a, name in cond_body if op == "get-tuple-element"
                for m in [re.search(r"index=(\d+)", a)] if m}
    body = re.search(r"body=%?([\w.\-]+)", attrs)
    for op, _, operands, a, _ in cond_body:
        if op == "compare" and "direction=LT" in a and len(operands) == 2 and operands[1] in constants:
            step = _loop_step(elements.get(operands[0]), comps.get(body.group(1), []) if body else [])
            return -(-constants[operands[1]] // step)
    return None


def _callees(op: str, attrs: str, comps) -> list[tuple[str, int | None]]:
    """(computation, times per execution of the caller); None times = a loop whose trip count is unknown."""
    out = []
    if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", attrs)
        if body:
            out.append((body.group(1), _trip_count(attrs, comps)))
        return out
    for key in ("calls", "to_apply"):
        for m in re.finditer(key + r"=%?([\w.\-]+)", attrs):
            out.append((m.group(1), 1))
    branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if branches:
        out += [(b.strip().lstrip("%"), 1) for b in branches.group(1).split(",") if b.strip()]
    for key in ("true_computation", "false_computation"):
        m = re.search(key + r"=%?([\w.\-]+)", attrs)
        if m:
            out.append((m.group(1), 1))
    return out


_DTYPE_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuples included."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
               for dtype, dims in _DTYPE_SHAPE.findall(shape))


def _window(attrs: str, key: str, nd: int, default):
    m = re.search(r"\b" + key + r"=([0-9_x\-]+)", attrs)
    if not m:
        return [default] * nd
    return [tuple(int(v) for v in part.split("_")) if "_" in part else int(part) for part in m.group(1).split("x")]


def _conv_flops(out, lhs, rhs, attrs) -> float:
    """2 x output batch x output features x input features (per group) x the (output position, window tap)
    pairs that land on real input, per spatial dim. TPU encodes batched matmuls as convolutions whose window
    runs over a padded batch-like dim (e.g. size=32, pad=31_31: 1 real tap per output), so taps on padding
    must not count."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not labels:
        return 0.0
    ll, rl, ol = labels.groups()
    nd = sum(ch.isdigit() for ch in ol)
    size = _window(attrs, "size", nd, 1)
    pad = _window(attrs, "pad", nd, (0, 0))
    stride = _window(attrs, "stride", nd, 1)
    lhs_dil = _window(attrs, "lhs_dilate", nd, 1)
    rhs_dil = _window(attrs, "rhs_dilate", nd, 1)
    taps = 1
    for d in range(nd):
        n_in, n_out = lhs[ll.index(str(d))], out[ol.index(str(d))]
        o = np.arange(n_out)[:, None]
        w = np.arange(size[d])[None, :]
        p = o * stride[d] + w * rhs_dil[d] - pad[d][0]
        taps *= int(np.sum((p >= 0) & (p <= (n_in - 1) * lhs_dil[d]) & (p % lhs_dil[d] == 0)))
    return 2.0 * out[ol.index("b")] * rhs[rl.index("o")] * rhs[rl.index("i")] * taps


def _op_flops(op, shape, operands, attrs, table) -> tuple[float, float]:
    """(FLOPs, static output rows for ragged-dot) of one instruction."""
    out = _dims(shape)
    if out is None or op not in ("dot", "convolution", "ragged-dot"):
        return 0.0, 0.0
    lhs = _dims(table.get(operands[0], "")) if operands else None
    rhs = _dims(table.get(operands[1], "")) if len(operands) > 1 else None
    if op == "convolution":
        return (_conv_flops(out, lhs, rhs, attrs) if lhs and rhs else 0.0), 0.0
    if lhs is None:
        return 0.0, 0.0
    contracted = math.prod(lhs[d] for d in _attr_dims(attrs, "lhs_contracting_dims"))
    flops = 2.0 * math.prod(out) * contracted
    return flops, (float(out[0]) if op == "ragged-dot" and out else 0.0)


def _megablox_flops(name, shape, operands, table) -> tuple[float, float]:
    """gmm: out (M, N) from lhs (M, K); tgmm: out (G, K, N) from lhs (M, K) (or its transpose (K, M)). lhs is the
    first 2-D operand (the scalar-prefetch group metadata before it is 1-D). Static rows M, as for ragged-dot."""
    out = _dims(shape)
    lhs = next((d for d in (_dims(table.get(o, "")) for o in operands) if d and len(d) == 2), None)
    if out is None or lhs is None:
        return 0.0, 0.0
    if name.startswith("tgmm") and len(out) == 3:
        k = out[1]
        m = lhs[0] if lhs[1] == k else lhs[1]
        return 2.0 * m * k * out[2], float(m)
    if len(out) == 2:
        return 2.0 * out[0] * lhs[1] * out[1], float(out[0])
    return 0.0, 0.0


def count(hlo_text: str) -> dict:
    """{"dot": FLOPs, "ragged_dot": FLOPs (static rows), "ragged_dot_rows": rows, "collectives": {kind: bytes},
    "unknown_trip_count_loops": n}, all per execution of the program."""
    comps, shapes, entry = _parse(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    times: dict[str, float] = defaultdict(float)
    unknown = 0

    def visit(comp: str, mult: float, depth: int = 0):
        nonlocal unknown
        if comp not in comps or depth > 64:
            return
        times[comp] += mult
        for op, _, _, attrs, _ in comps[comp]:
            for callee, n in _callees(op, attrs, comps):
                if n is None:
                    unknown += 1
                visit(callee, mult * (1 if n is None else n), depth + 1)

    visit(entry, 1.0)
    totals = {"dot": 0.0, "ragged_dot": 0.0, "ragged_dot_rows": 0.0, "collectives": {}}
    for comp, mult in times.items():
        for op, shape, operands, attrs, name in comps[comp]:
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind in COLLECTIVES:
                totals["collectives"][kind] = totals["collectives"].get(kind, 0) + mult * shape_bytes(shape)
            if op == "custom-call" and re.match(r"(t?gmm|ragged-dot)", name):  # megablox; XLA's TPU ragged-dot
                flops, rows = _megablox_flops(name, shape, operands, shapes[comp])
                totals["ragged_dot"] += mult * flops
                totals["ragged_dot_rows"] += mult * rows
                continue
            flops, rows = _op_flops(op, shape, operands, attrs, shapes[comp])
            totals["ragged_dot" if op == "ragged-dot" else "dot"] += mult * flops
            totals["ragged_dot_rows"] += mult * rows
    totals["unknown_trip_count_loops"] = unknown
    return totals


if __name__ == "__main__":  # python -m jsmaug.perf.hlo_stats module.hlo.txt
    import sys
    print(json.dumps(count(open(sys.argv[1]).read()), indent=1))
