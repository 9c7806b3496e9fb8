"""The train step's programs in a run: the batch shapes its steps will need, compiled before the first step, and
jax's persistent compilation cache, which keeps them for the next run of the same program.

Every new batch shape is a compile of the whole step. On the 2-core CPU machine one compile of the tiny config's
DPO step took 20-24 s of CPU and one of its steps 0.9-1.5 s, so a packed run whose steps came in three or four
row counts spent more on its extra compiles than packing saved over 40 steps, and lost to padding (issue 44;
docs/performance.md, "Packing in a run, compiles counted"). So:

- a packed run's row length and row counts come from its own first steps (`packed_layout`, which asks
  `packing.run_layout` for the layout of least work, a compile counted as `data.packing_compile_steps` steps), in
  rows no longer than those that keep the padded rows' attention path;
- the shapes the first steps need (up to 200 steps; packed or padded) are compiled before the first step
  (`compile_ahead`), each named with its time on a progress line, so no step stalls on a compile and the run says
  what it compiled and why; a later step that meets another shape says so (`ShapeLog`);
- `compilation_cache` (a run setting, default on) keeps the compiled programs on disk across runs
  (`configure_cache`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Callable

import jax
import jax.numpy as jnp

from jsmaug.data import balanced, batches as data_lib, packing

SAMPLE_STEPS = 200  # the run's first steps whose lengths choose the layout and whose shapes compile ahead
CACHE_MAX_BYTES = 4 << 30  # the cache this module places drops its least recently used programs past 4 GiB


# ------------------------------------------------------------------------------------------------ the cache

def cache_dir(setting: str | None, env=os.environ, current: str | None = None) -> tuple[str | None, str]:
    """(the folder jax's persistent compilation cache should use, or None for off; why). `auto`: the folder jax
    was already given (JAX_COMPILATION_CACHE_DIR, or `current`: jax's config), else $XDG_CACHE_HOME/jsmaug/jax
    (~/.cache/jsmaug/jax); a path: that folder; None or "off": off."""
    if setting is None or str(setting).lower() in ("", "off", "none", "false"):
        return None, "off (compilation_cache: null)"
    if setting == "auto":
        given = env.get("JAX_COMPILATION_CACHE_DIR") or current
        if given:
            return str(given), "JAX's own setting (JAX_COMPILATION_CACHE_DIR or jax.config)"
        base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "jsmaug", "jax"), "compilation_cache: auto"
    return os.path.expanduser(str(setting)), "compilation_cache"


def configure_cache(setting: str | None, env=os.environ) -> str:
    """Points jax's persistent compilation cache where `cache_dir` says (before the run's first compile) and
    returns the log line. A folder this module chooses gets an LRU bound of CACHE_MAX_BYTES; JAX's own setting
    is left as it is (the tests' runs give their own folder this way). The environment variable
    JSMAUG_COMPILATION_CACHE (off, auto or a folder), when set, replaces the run's setting: the test suite turns
    the cache off in its own processes this way (tests/conftest.py says why)."""
    setting = env.get("JSMAUG_COMPILATION_CACHE", setting)
    path, why = cache_dir(setting, env, jax.config.jax_compilation_cache_dir)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return f"compilation cache: {why}"
    jax.config.update("jax_enable_compilation_cache", True)
    if why.startswith("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return (f"compilation cache: {path} ({why}; programs that took over "
            f"{jax.config.jax_persistent_cache_min_compile_time_secs:g} s to compile are kept for the next run)")


# ------------------------------------------------------------------------------------------------ the layout

def run_batches(train_pairs, cfg, shards: int):
    """The run's steps of pairs (`ds[i]`: step i's list), shuffled or of near-equal tokens as
    data.balanced_steps says (`data.balanced`); `shards`: the mesh's data shards of a batch."""
    return balanced.train_batches(train_pairs, cfg.data, cfg.train.batch_size, seed=cfg.seed,
                                  groups=cfg.train.micro_batches * shards)


def run_sample(train_pairs, cfg, shards: int) -> list:
    """The run's first min(train.steps, SAMPLE_STEPS) batches of pairs, in the order the run takes them."""
    ds = run_batches(train_pairs, cfg, shards)
    return [ds[i] for i in range(min(cfg.train.steps, SAMPLE_STEPS))]


def attention_row_cap(plan, padded_length: int, row_step: int) -> int | None:
    """The longest packed row (`padded_length` plus a multiple of `row_step`, up to twice `padded_length`) that
    takes the attention path rows of `padded_length` take (`plan.resolved_paths`); None when every length does. On
    CPU `auto` runs rows of up to attention_block_size through `xla` and longer ones through `chunked`, which cost
    1.6x as much per token slot in the tiny config's step (rows of 832 and 1248 tokens against 376, with 512-token
    blocks; docs/performance.md)."""
    from jsmaug.train.plan import resolved_paths

    def path(n):
        return resolved_paths(plan.config, plan.mesh, n)["attention"]

    want, n = path(padded_length), padded_length
    while n + row_step <= 2 * padded_length and path(n + row_step) == want:  # the paths change once, upwards
        n += row_step
    return None if n + row_step > 2 * padded_length else n


def packed_layout(cfg, plan, train_pairs, buckets, log: Callable[[str], None] | None
                  ) -> packing.RunLayout | None:
    """Without data.packing_length: the run's packed row length and row counts (`packing.run_layout` over the
    run's first steps, a compile costing data.packing_compile_steps steps), logged (with `log`) with what it
    costs and what the layout of fewest token slots would have cost; for a padded run, the layout packing would
    take (its padding line says what packing would save). None with data.packing_length."""
    data = cfg.data
    if data.packing_length is not None or not len(train_pairs):
        return None
    sample = run_sample(train_pairs, cfg, plan.batch_divisor)
    shared = data.share_prompt
    longest = packing.longest_item(train_pairs, shared)
    step = packing.run_row_step(plan.mesh.devices.flat[0].platform)
    padded = max(data_lib.batch_length(b, buckets) for b in sample)
    kw = dict(micro=cfg.train.micro_batches, shards=plan.batch_divisor, buckets=buckets, longest=longest,
              row_step=step, max_length=attention_row_cap(plan, padded, step), steps=cfg.train.steps, shared=shared)
    layout = packing.run_layout(sample, compile_steps=data.packing_compile_steps, **kw)
    if log is None:
        return layout
    fewest = packing.run_layout(sample, compile_steps=0.0, **kw)
    frac = {lay: packing.padding_fractions(sample, micro=kw["micro"], shards=kw["shards"], buckets=buckets,
                                           run_length=lay, shared=shared) for lay in {layout, fewest}}
    rows = Counter(packing.plan(b, micro=kw["micro"], shards=kw["shards"], buckets=buckets,
                                run_length=layout, shared=shared).rows_per_group for b in sample)
    needs = ", ".join(f"{r} rows x {n}" for r, n in sorted(rows.items()))
    cap = "" if kw["max_length"] is None else f", rows of at most {kw['max_length']} (the padded rows' attention path)"
    log(f"packing: rows of {layout.length} tokens, {len(layout.counts)} shape{'s' * (len(layout.counts) > 1)} "
        f"({needs} over the first {len(sample)} steps): {frac[layout][1]:.1%} padding, against "
        f"{frac[layout][0]:.1%} padded; the fewest slots would take {len(fewest.counts)} shape"
        f"{'s' * (len(fewest.counts) > 1)} at {frac[fewest][1]:.1%}, and every shape is a compile (counted as "
        f"data.packing_compile_steps={data.packing_compile_steps:g} steps of work{cap})")
    return layout


# ------------------------------------------------------------------------------------------------ compiles

def step_shape(cfg, pairs, buckets, micro: int, shards: int, layout) -> tuple[int, ...]:
    """The shape of a step's `input_ids` (lengths only, nothing placed): packed (M, D x R, L), padded (2, B, S).
    The packing arguments are those of `plan.place_packed`."""
    if cfg.data.packing:
        p = packing.plan(pairs, micro=micro, shards=shards, buckets=buckets, row_length=cfg.data.packing_length,
                         run_length=layout, shared=cfg.data.share_prompt)
        return (micro, shards * p.rows_per_group, p.row_length)
    return (2, len(pairs), data_lib.batch_length(pairs, buckets))


class ShapeLog:
    """The batch shapes a run has compiled; `seen(step, shape)` logs a shape met for the first time in the loop."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.shapes = log, set()

    def seen(self, step: int, shape: tuple[int, ...]) -> None:
        if shape not in self.shapes:
            self.shapes.add(shape)
            self.log(f"step {step}: batch shape {shape} was not compiled ahead (the first {SAMPLE_STEPS} steps' "
                     "data did not need it): compiling it now")


def compile_ahead(cfg, setup, ds, start: int, buckets, shapes: ShapeLog) -> float:
    """Compiles the train step for every batch shape the steps start+1 .. start+SAMPLE_STEPS (at most
    train.steps) need, before the first of them, with a progress line per shape. Returns the seconds spent;
    the loop's own jit calls then find the programs compiled."""
    end = min(cfg.train.steps, start + SAMPLE_STEPS)
    micro = cfg.train.micro_batches
    need = [step_shape(cfg, ds[s], buckets, micro, setup.plan.batch_divisor, setup.run_length)
            for s in range(start, end)]
    first: dict[tuple[int, ...], int] = {}
    for s, shape in enumerate(need, start=start):
        first.setdefault(shape, s)
    if not first:  # a finished run started again
        return 0.0
    shapes.shapes.update(first)
    kind = "packed rows (micro-batches, rows, tokens)" if cfg.data.packing else "padded rows (2, pairs, tokens)"
    shapes.log(f"compiling the train step ahead for {len(first)} batch shape{'s' * (len(first) > 1)} of {kind}: "
               f"those of steps {start + 1}-{end}")
    nan = jax.ShapeDtypeStruct((), jnp.bool_)
    total = 0.0
    for shape, s in sorted(first.items(), key=lambda kv: kv[1]):
        batch = setup.place(ds[s], setup.train_ref, micro)
        sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
        t = time.perf_counter()
        setup.plan.step.lower(setup.state, sds, setup.ref_params, nan).compile()
        took = time.perf_counter() - t
        total += took
        shapes.log(f"  {shape}: {took:.1f} s (first needed by step {s + 1}; {need.count(shape)} of those steps)")
    return total
