"""The packing benchmark (`tools/bench.py`'s `packing/*` rows): real (non-padding) tokens per second of the DPOP
step, padded vs packed, on two synthetic length distributions, and the share of token slots spent on padding.

Layouts: `padded` (each sequence its own row of the batch's bucket length), `packed_bucket_rows` (rows of the
bucket length, first-fit in pair order: `packing.plan(row_step=0)`, the layout before the ladder) and
`packed_ladder` (the row length from the ladder of multiples of `packing.ROW_STEP`, the default).
"""

from __future__ import annotations

import jax
import numpy as np

from jsmaug.perf.bench import record, step_run_config, time_alternating


def _pair(rng, i, p, c, r, vocab):
    ids = lambda k: rng.integers(3, vocab, k).astype(np.int32)  # noqa: E731
    return {"prompt": np.r_[1, ids(p - 1)].astype(np.int32), "chosen": np.r_[ids(c - 1), 2].astype(np.int32),
            "rejected": np.r_[ids(r - 1), 2].astype(np.int32), "index": np.int32(i)}


def long_tailed_pairs(n, max_length, seed=0, vocab=32000):
    """Prompt lengths lognormal (median 32, sigma 0.6), completion lengths lognormal (median 48, sigma 1.09: p99
    about 600 tokens), cut to fit `max_length` as the trainer cuts them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = int(np.clip(rng.lognormal(np.log(32), 0.6), 4, max_length // 2))
        c, r = (int(np.clip(rng.lognormal(np.log(48), 1.09), 2, max_length - p)) for _ in range(2))
        out.append(_pair(rng, i, p, c, r, vocab))
    return out


def mild_pairs(n, max_length=512, seed=0, vocab=32000):
    """Mildly long-tailed pairs: prompts of 16 to 72 tokens, completions of 3 to 180 tokens (uniform), as short
    chat pairs are; every sequence fits a 256-token bucket, which `max_length` (512) does not force."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = int(rng.integers(16, 73))
        c, r = (int(min(rng.integers(3, 181), max_length - p)) for _ in range(2))
        out.append(_pair(rng, i, p, c, r, vocab))
    return out


DISTRIBUTIONS = {"long_tailed": (long_tailed_pairs, 1024,
                                 "prompts lognormal(median 32), completions lognormal(median 48, p99 ~600)"),
                 "mild": (mild_pairs, 512, "prompts 16-72 tokens, completions 3-180 tokens (uniform)")}


def place_layouts(pairs, mesh, max_length):
    """{layout: the placed batch} of one step's pairs on a one-device mesh."""
    from jsmaug.data import batches as data, packing
    from jsmaug.parallel import sharding as shd

    one = shd.MeshConfig(data=1)
    buckets = data.power_of_two_buckets(max_length)

    def packed(row_step):
        layout = packing.plan(pairs, micro=1, shards=1, buckets=buckets, row_step=row_step)
        rows = shd.place_rows(packing.materialize(pairs, layout, [0]), list(range(layout.rows_per_group)),
                              layout.rows_per_group, mesh, one)
        index = np.array([p["index"] for p in pairs], np.int32)
        return rows | shd.place_rows({"pair_index": np.stack([index, index])}, list(range(len(pairs))), len(pairs),
                                     mesh, one)

    return {"padded": shd.put_batch(data.collate(pairs, buckets), mesh, one),
            "packed_bucket_rows": packed(0), "packed_ladder": packed(packing.ROW_STEP)}


class _Stepper:
    """The planned DPOP step (`jsmaug.train.plan`) for padded or packed batches (data.packing) and its state."""

    def __init__(self, conf, ref, max_length, packed: bool):
        import dataclasses

        from jsmaug.models import decoder as model
        from jsmaug.train import plan as plan_lib, step

        cfg = step_run_config(conf, "dpop", max_length)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packed))
        self.plan = plan_lib.plan(cfg, jax.devices()[:1], mconf=conf)
        self.state = step.init_state(self.plan.optimizer, model.init_params(conf, jax.random.key(0)),
                                     self.plan.state_sh, seed=0)
        self.ref = ref

    def run(self, batch):
        self.state, m = self.plan.step(self.state, batch, self.ref, False)
        jax.block_until_ready(m)


def bench_packing(conf, dist="long_tailed", pairs=8, steps=6, rounds=2, planner_batches=20):
    """The `packing/<dist>/*` rows: real tokens/s of each layout over `steps` batches of `pairs` pairs (every
    batch's program compiled before timing, the layouts timed alternately), the padding share of the timed
    batches, and the planner's padding share at 8 / 32 / 128 pairs per group (no compute)."""
    from jsmaug.data import batches as data, packing
    from jsmaug.models import decoder as model
    from jsmaug.parallel import sharding as shd

    gen, max_length, about = DISTRIBUTIONS[dist]
    batches = [gen(pairs, max_length, seed=s, vocab=conf.vocab_size) for s in range(steps)]
    mesh = shd.make_mesh(shd.MeshConfig(data=1), conf, jax.devices()[:1])
    ref = model.init_params(conf, jax.random.key(1))
    per_batch = [place_layouts(p, mesh, max_length) for p in batches]
    placed = {name: [b[name] for b in per_batch] for name in per_batch[0]}
    real = sum(sum(len(x["prompt"]) * 2 + len(x["chosen"]) + len(x["rejected"]) for x in p) for p in batches)
    slots = {name: sum(int(np.prod(b["input_ids"].shape)) for b in bs) for name, bs in placed.items()}
    shapes = {name: len({b["input_ids"].shape for b in bs}) for name, bs in placed.items()}
    steppers = {"padded": _Stepper(conf, ref, max_length, packed=False)}
    steppers["packed_bucket_rows"] = steppers["packed_ladder"] = _Stepper(conf, ref, max_length, packed=True)
    for name, bs in placed.items():
        for b in bs:  # compile every shape before timing
            steppers[name].run(b)

    def run_all(name):
        return lambda: [steppers[name].run(b) for b in placed[name]]

    t = time_alternating({name: run_all(name) for name in placed}, rounds)
    rate = {name: real / t[name] for name in placed}
    cfg = (f"{conf.num_params() / 1e6:.1f}M params, {steps} steps of {pairs} pairs, max_length {max_length}, "
           f"{about}; program shapes {shapes}")
    ladder = f"packed, rows from the ladder of multiples of {packing.ROW_STEP} (the default)"
    record(f"packing/{dist}/real_tokens_per_sec_vs_padded", rate["packed_ladder"], rate["padded"], "real tokens/s",
           cfg, ladder, "padded")
    record(f"packing/{dist}/ladder_vs_bucket_rows", rate["packed_ladder"], rate["packed_bucket_rows"],
           "real tokens/s", cfg, ladder, "packed, rows of the bucket length (before)")
    record(f"packing/{dist}/bucket_rows_vs_padded", rate["packed_bucket_rows"], rate["padded"], "real tokens/s",
           cfg, "packed, rows of the bucket length (before)", "padded")
    record(f"packing/{dist}/padding_share_vs_padded", 1 - real / slots["packed_ladder"], 1 - real / slots["padded"],
           "share of token slots", cfg + f"; bucket rows: {1 - real / slots['packed_bucket_rows']:.3f}", ladder,
           "padded")
    buckets = data.power_of_two_buckets(max_length)
    for n in (8, 32, 128):
        many = [gen(n, max_length, seed=100 + s) for s in range(planner_batches)]
        pad, pk = packing.padding_fractions(many, micro=1, shards=1, buckets=buckets)
        _, before = packing.padding_fractions(many, micro=1, shards=1, buckets=buckets, row_step=0)
        record(f"packing/{dist}/padding_share_{n}_pairs_per_group", pk, pad, "share of token slots",
               f"{planner_batches} batches of {n} pairs, max_length {max_length}, {about}; bucket rows: "
               f"{before:.3f}", ladder, "padded")
