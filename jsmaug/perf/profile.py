"""A train step's time by part, on both sides: jsmaug's compiled step from a `jax.profiler` trace, and the HF
transformers + PyTorch DPOP step from `torch.profiler`, grouped into the same parts (`tools/profile_step.py`).

JAX side: the trace's per-thunk events (each names the HLO instruction it ran, `hlo_op`) are summed per
instruction, and each instruction is given a part from the `op_name` metadata of the ops it fuses (the name
scopes the model's modules open: `self_attn`, `block_sparse_moe`, ...). `scopes()` adds a few name scopes at
trace time (RoPE, the norms, the log-prob kernel) by wrapping those functions; the computation is unchanged.
Control-flow thunks (while, conditional, call) are not counted: their bodies' thunks are. Thunks that run at
the same time on the two CPU threads both count, so parts can sum to more than the step's wall time.

PyTorch side: forward hooks open a `record_function` range per module (attention, norms, MoE gate and experts,
lm_head); the log-softmax and gather of the log-probs, the optimizer and the clipping are found by op name; a
backward op belongs to the part of the forward op whose autograd sequence number it carries. Each event's self
CPU time (main thread; intra-op threads are inside it) is added to its part.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import json
import re
from collections import defaultdict

PARTS = ("attention", "MoE routing/sort/gather/scatter", "MoE expert matmuls", "norms + RoPE",
         "unembedding + log-probs", "optimizer (+ clipping)", "other (embedding, loss, scan glue)")
ATTN, ROUTE, EXPERT, NORM, LOGPS, OPT, OTHER = PARTS
_CONTROL = ("while", "conditional", "call", "parameter", "constant", "tuple", "get-tuple-element")
_TRIVIAL = ("parameter", "constant", "bitcast", "tuple", "get-tuple-element", "broadcast", "iota")


# ------------------------------------------------------------------------------------------------ JAX side

@contextlib.contextmanager
def scopes():
    """Name scopes for the parts the model's own scopes do not name: RoPE, the RMS norms and the log-prob kernel
    (wrapping `rope.apply_rope`/`rope.cos_sin`, `decoder.rms_norm`, `logps.sequence_logps_from_hidden` while the
    step is traced; the ops are the same)."""
    import jax

    from jsmaug.models import decoder, logps, rope

    targets = [(rope, "apply_rope", "prof_rope"), (rope, "cos_sin", "prof_rope"),
               (decoder, "rms_norm", "prof_norm"), (logps, "sequence_logps_from_hidden", "prof_logps")]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets if hasattr(mod, name)]

    def wrap(fn, scope):
        @functools.wraps(fn)
        def inner(*a, **k):
            with jax.named_scope(scope):
                return fn(*a, **k)
        return inner

    try:
        for mod, name, scope in targets:
            if hasattr(mod, name):
                setattr(mod, name, wrap(getattr(mod, name), scope))
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def part_of_op(op_name: str, is_dot: bool) -> str:
    """The part of one HLO op from its `op_name` metadata (name scopes, forward and backward alike)."""
    if "prof_logps" in op_name:
        return LOGPS
    if "prof_norm" in op_name or "prof_rope" in op_name or "layernorm" in op_name:
        return NORM
    if "block_sparse_moe" in op_name:
        # the expert matmuls are the einsums over a capacity axis `c` (the base buffer's `ecd,edf->ecf`, the
        # overflow blocks' `mcd,mdf->mcf`, and their backward specs) and ragged_dot; the router's matmul has none
        expert = re.search(r"(?:^|/)[a-z]*c[a-z]*,[a-z]+->", op_name) or "ragged_dot" in op_name
        return EXPERT if is_dot and expert else ROUTE
    if "self_attn" in op_name:
        return ATTN
    if "jvp(" not in op_name:  # after the gradient: the optimizer update, clipping, the metrics
        return OPT
    return OTHER


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def hlo_parts(hlo_text: str) -> dict[str, str | None]:
    """HLO instruction name -> part (None for control flow, whose bodies are counted instead), for every
    instruction of an optimized HLO module's text. A fusion's part is its dot's (a matmul fusion), else the
    part most of its ops have."""
    comps: dict[str, list[tuple[str, str, str, list[str]]]] = {}
    cur = None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            head = _COMP.match(line)
            cur = head.group(1) if head else None
            if cur:
                comps[cur] = []
            continue
        m = _INSTR.match(line)
        if not (m and cur):
            continue
        name, op, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', rest)
        calls = re.findall(r"calls=%?([\w.\-]+)", rest)
        comps[cur].append((name, op, meta.group(1) if meta else "", calls))

    def constituents(op, meta, calls, depth=0):
        out = [(op, meta)]
        if op == "fusion" and depth < 8:
            for c in calls:
                for _, o2, m2, c2 in comps.get(c, []):
                    out += constituents(o2, m2, c2, depth + 1)
        return out

    parts: dict[str, str | None] = {}
    for instrs in comps.values():
        for name, op, meta, calls in instrs:
            if op in _CONTROL:
                parts[name] = None
                continue
            ops = [(o, m) for o, m in constituents(op, meta, calls) if o not in _TRIVIAL and o != "fusion" and m]
            dots = [m for o, m in ops if o in ("dot", "convolution") or "dot_general" in m]
            if dots:
                parts[name] = part_of_op(dots[0], True)
                continue
            votes: dict[str, int] = defaultdict(int)
            for o, m in ops or [(op, meta)]:
                votes[part_of_op(m, False)] += 1
            parts[name] = max(votes, key=votes.get)
    return parts


def trace_op_seconds(trace_dir: str, module_prefix: str = "jit_train_step") -> dict[str, float]:
    """Seconds per HLO instruction of the module(s) named `module_prefix*`, summed over a `jax.profiler` trace
    (the `*.trace.json.gz` under `trace_dir`)."""
    files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (did jax.profiler.trace write one?)")
    out: dict[str, float] = defaultdict(float)
    for path in files:
        with gzip.open(path) as fh:
            events = json.load(fh)
        for e in events.get("traceEvents", []) if isinstance(events, dict) else events:
            args = e.get("args") or {}
            if e.get("ph") == "X" and "hlo_op" in args and str(args.get("hlo_module", "")).startswith(module_prefix):
                out[args["hlo_op"]] += e.get("dur", 0.0) * 1e-6
    return dict(out)


def group_jax(op_seconds: dict[str, float], parts: dict[str, str | None], steps: int) -> dict[str, float]:
    """Seconds per step by part; thunks the HLO text does not name go to `other`."""
    out = dict.fromkeys(PARTS, 0.0)
    for op, sec in op_seconds.items():
        part = parts.get(op, OTHER)
        if part is not None:
            out[part] += sec / steps
    return out


# ------------------------------------------------------------------------------------------------ PyTorch side

_TORCH_MODULES = (("MixtralAttention", ATTN), ("RMSNorm", NORM), ("RotaryEmbedding", NORM),
                  ("Experts", EXPERT), ("BlockSparseTop2MLP", EXPERT), ("SparseMoeBlock", ROUTE))


def torch_module_part(module, vocab_size: int, num_experts: int) -> str | None:
    """The part of an HF Mixtral module: by class name (attention, norms, rotary tables, experts, the MoE
    block's own ops around them), and for plain Linear layers by width (lm_head: vocab_size outputs; the
    router: num_experts outputs); other modules inherit the part of the module around them."""
    name = type(module).__name__
    if name == "Linear":
        out = getattr(module, "out_features", None)
        return LOGPS if out == vocab_size else ROUTE if out == num_experts else None
    return next((part for key, part in _TORCH_MODULES if key in name), None)


@contextlib.contextmanager
def torch_part_hooks(vocab_size: int, num_experts: int):
    """While open, every module `torch_module_part` names runs inside a `part::<part>` record_function range
    (global module hooks), and HF Mixtral's `apply_rotary_pos_emb` inside `part::norms + RoPE`."""
    import torch
    from torch.nn.modules import module as nn_module

    stacks: dict[int, list] = {}

    def pre(m, args):
        part = torch_module_part(m, vocab_size, num_experts)
        if part is not None:
            rf = torch.autograd.profiler.record_function(f"part::{part}")
            rf.__enter__()
            stacks.setdefault(id(m), []).append(rf)

    def post(m, args, out):
        if stacks.get(id(m)):
            stacks[id(m)].pop().__exit__(None, None, None)

    handles = [nn_module.register_module_forward_pre_hook(pre), nn_module.register_module_forward_hook(post)]
    patched = None
    try:
        from transformers.models.mixtral import modeling_mixtral as hf

        orig = hf.apply_rotary_pos_emb

        def rope(*a, **k):
            with torch.autograd.profiler.record_function(f"part::{NORM}"):
                return orig(*a, **k)

        patched, hf.apply_rotary_pos_emb = (hf, orig), rope
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if patched:
            patched[0].apply_rotary_pos_emb = patched[1]


_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def _torch_op_part(name: str) -> str | None:
    if "log_softmax" in name or name in ("aten::gather", "aten::take_along_dim"):
        return LOGPS
    if name.startswith("Optimizer.") or "foreach" in name or "clip_grad" in name or "linalg_vector_norm" in name:
        return OPT
    return None


def group_torch(events, steps: int) -> dict[str, float]:
    """Seconds per step by part from `torch.profiler.profile(...).events()` of `steps` steps run under
    `torch_part_hooks`: each event's self CPU time goes to the part of its nearest labelled ancestor (a
    `part::` range, an op named like the log-probs or the optimizer), a backward op's to the part of the
    forward op with its sequence number; within the experts, only the matmuls count as expert matmuls (the
    rest is routing, as on jsmaug's side, where the expert part is the einsums over the experts' weights)."""
    def own(e):
        while e is not None:
            if e.name.startswith("part::"):
                return e.name[len("part::"):]
            p = _torch_op_part(e.name)
            if p:
                return p
            e = e.cpu_parent
        return None

    seq_part = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and "Backward" not in e.name:
            p = own(e)
            if p:
                seq_part.setdefault(e.sequence_nr, p)

    def part(e):
        p = labelled(e)
        # Inside HF's experts module only the matmuls are expert matmuls: its one-hot, `where`, row gather,
        # activation and `index_add_` are the MoE block's other work, which jsmaug's side files under routing.
        return ROUTE if p == EXPERT and e.name not in _MATMULS else p

    def labelled(e):
        x = e
        while x is not None:
            if x.name.startswith("part::"):
                return x.name[len("part::"):]
            p = _torch_op_part(x.name)
            if p:
                return p
            if x.name.startswith("autograd::engine::evaluate_function") and x.sequence_nr in seq_part:
                return seq_part[x.sequence_nr]
            x = x.cpu_parent
        return OTHER

    out = dict.fromkeys(PARTS, 0.0)
    for e in events:
        if e.name.startswith("part::"):
            continue  # a range's own time is the hooks' bookkeeping
        out[part(e)] += e.self_cpu_time_total * 1e-6 / steps
    return out


# ------------------------------------------------------------------------------------------------ the table

def table(jax_parts: dict[str, float], torch_parts: dict[str, float] | None, jax_wall: float,
          torch_wall: float | None, host: dict[str, float]) -> str:
    """One Markdown table, both sides, part by part (ms per step and share of the side's summed part time)."""
    tj = sum(jax_parts.values()) or 1.0
    tt = sum(torch_parts.values()) if torch_parts else 0.0
    lines = ["| part | jsmaug ms/step | share | PyTorch ms/step | share | jsmaug / PyTorch |",
             "|---|---|---|---|---|---|"]
    for p in PARTS:
        a = jax_parts.get(p, 0.0)
        row = f"| {p} | {a * 1e3:.1f} | {a / tj:.0%} |"
        if torch_parts:
            b = torch_parts.get(p, 0.0)
            row += f" {b * 1e3:.1f} | {b / (tt or 1):.0%} | {a / b:.2f} |" if b else f" {b * 1e3:.1f} | 0% | |"
        else:
            row += " | | |"
        lines.append(row)
    lines.append(f"| sum of the parts | {tj * 1e3:.1f} | | {tt * 1e3:.1f} | | |")
    for k, v in host.items():
        lines.append(f"| host: {k} | {v * 1e3:.1f} | | | | |")
    tw = f"{torch_wall * 1e3:.1f}" if torch_wall else ""
    ratio = f"{jax_wall / torch_wall:.2f}" if torch_wall else ""
    lines.append(f"| step wall time (median) | {jax_wall * 1e3:.1f} | | {tw} | | {ratio} |")
    return "\n".join(lines)
