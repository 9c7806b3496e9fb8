"""Where one decoding step's time goes: `fast_decode.fast_step` at SmolLM2-135M-Instruct's shapes (30 layers,
hidden 576, 9 heads / 3 KV heads, MLP 1536, tied 49,152-token vocabulary), random float32 weights, B rows and a
cache of T slots (the generate/sampling bench: 32 rows, 16 + 128 slots).

    python tools/profile_decode.py [--rows 32] [--slots 144] [--trace_dir /tmp/jsmaug_decode_trace]

Prints (milliseconds):
- the step inside a generation chunk (`generate._decode_chunk`, 32 greedy steps, the cache donated), per step;
- the step compiled alone (caches donated), per call;
- each part alone, 30 layers' worth: the fused q/k/v, o, gate/up and down matmuls, the attention over the cache,
  the tied unembedding;
- a `jax.profiler` trace of the step alone, summed per kind of HLO instruction and output shape (XLA CPU runs the
  dots as `ynn_fusion`s, YNNPACK).

Random weights give near-uniform logits, so sampling with top-p here would take the whole-vocabulary path that a
real model's peaked logits rarely need: the chunk is timed greedy (the draw: docs/making-pairs.md).
"""

from __future__ import annotations

import argparse
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import decoder as model, generate as gen
from jsmaug.models.config import ModelConfig
from jsmaug.models.fast_decode import _attend, decode_weights, fast_step
from jsmaug.perf.bench import time_alternating
from jsmaug.perf.profile import trace_op_seconds

SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=1e5,
               max_position_embeddings=2048, rms_norm_eps=1e-5)


def _median_ms(fn, n=10) -> float:
    """Median milliseconds of `fn()` waited for, after a first (compiling) call: the bench's `time_alternating`."""
    blocking = lambda: jax.block_until_ready(fn())  # noqa: E731
    blocking()
    return 1e3 * time_alternating({"fn": blocking}, rounds=n)["fn"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--slots", type=int, default=144)
    ap.add_argument("--trace_dir", default="/tmp/jsmaug_decode_trace")
    args = ap.parse_args()
    c, b, t = ModelConfig(**SMOLLM2), args.rows, args.slots
    kv, dh = c.num_key_value_heads, c.resolved_head_dim
    w = decode_weights(c, jax.jit(lambda k: model.init_params(c, k))(jax.random.key(0)))
    caches = lambda: tuple((jnp.zeros((b, kv, dh, t)), jnp.zeros((b, kv, t, dh))) for _ in range(c.num_hidden_layers))
    tok, pos = jnp.arange(b, dtype=jnp.int32), jnp.full((b,), 20, jnp.int32)
    valid = jnp.ones((b, t), jnp.int32)
    print(f"SmolLM2-135M shapes, float32, {b} rows, {t} cache slots, backend {jax.default_backend()}")

    greedy = gen.SamplingConfig(max_new_tokens=1, temperature=0.0, eos_id=None)
    state = (tok + 0, pos + 0, valid + 0, caches(), gen.row_keys(0, np.arange(b)))  # donated: copies
    state, _ = gen._decode_chunk(c, w, greedy, 32, True, state, jnp.int32(16))  # compile
    per = []
    for _ in range(3):
        t0 = time.perf_counter()
        state, toks = gen._decode_chunk(c, w, greedy, 32, True, state, jnp.int32(16))
        jax.block_until_ready(toks)
        per.append((time.perf_counter() - t0) / 32)
    print(f"{'step inside a 32-step chunk (greedy)':44s} {1e3 * np.median(per):8.1f}")

    def decode_step(w, cc):
        return fast_step(c, w, tok, pos, valid, cc, jnp.int32(30))

    step = jax.jit(decode_step, donate_argnums=(1,))
    box = {"cc": caches()}

    def one():
        logits, box["cc"] = step(w, box["cc"])
        return logits

    print(f"{'step alone (caches donated)':44s} {_median_ms(one):8.1f}")
    x = jax.random.normal(jax.random.key(1), (b, c.hidden_size))
    xf = jax.random.normal(jax.random.key(1), (b, c.intermediate_size))
    layers = w["layers"]
    for name, key, inp in (("q/k/v", "wqkv", x), ("o", "wo", x[:, :c.num_attention_heads * dh]),
                           ("gate/up", "w_gate_up", x), ("down", "w_down", xf)):
        f = jax.jit(lambda v, ls, key=key: [v @ layer[key] for layer in ls])
        print(f"{'30 x ' + name + ' matmul':44s} {_median_ms(lambda: f(inp, layers)):8.1f}")
    q = jax.random.normal(jax.random.key(2), (b, c.num_attention_heads, dh))
    # Each layer its own cache, as in the step (one cache read 30 times stays in the CPU's caches: 2-3x faster)
    att = jax.jit(lambda q, cc, m: [_attend(c, q + i, k, v, m) for i, (k, v) in enumerate(cc)])
    kv_caches, mask = caches(), valid > 0  # made once: not part of the timed call
    print(f"{'30 x attention over the cache':44s} {_median_ms(lambda: att(q, kv_caches, mask)):8.1f}")
    un = jax.jit(lambda v, w: model.unembed(c, w, v[:, None]))
    print(f"{'unembedding (tied table)':44s} {_median_ms(lambda: un(x, w)):8.1f}")

    shutil.rmtree(args.trace_dir, ignore_errors=True)
    with jax.profiler.trace(args.trace_dir):
        for _ in range(5):
            jax.block_until_ready(one())
    ops = trace_op_seconds(args.trace_dir, "jit_decode_step")
    hlo = step.lower(w, box["cc"]).compile().as_text()
    shape = {m.group(1): m.group(2).split("{")[0]
             for m in (re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", ln) for ln in hlo.splitlines()) if m}
    groups: dict[tuple[str, str], float] = {}
    for op, sec in ops.items():
        key = (re.sub(r"[._]\d+$", "", op), shape.get(op, "?"))
        groups[key] = groups.get(key, 0.0) + sec / 5
    print(f"trace of the step alone: {1e3 * sum(groups.values()):.1f} ms of instructions per step; the largest:")
    for (kind, shp), sec in sorted(groups.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {1e3 * sec:8.2f}  {kind} -> {shp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
