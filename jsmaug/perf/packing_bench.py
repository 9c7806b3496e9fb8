"""The packing benchmark (`tools/bench.py`'s `packing/*` rows): real (non-padding) tokens per second of the DPOP
step, padded vs packed, on two synthetic length distributions, and the share of token slots spent on padding.

Layouts: `padded` (each sequence its own row of the batch's bucket length), `packed_bucket_rows` (rows of the
bucket length, first-fit in pair order: `packing.plan(row_step=0)`, the layout before the ladder) and
`packed_ladder` (the row length from the ladder of multiples of `packing.ROW_STEP`, the default).

Those rows time a step after its compile, so they never see what a run pays for compiling its shapes (issue 44:
1.53x here, 0.48x in a run). The `packing_run/*` rows (`bench_packing_runs`) time the runs themselves:
`python -m jsmaug.train` packed and padded, fresh processes, compiles included, in alternating blocks.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jsmaug.perf.bench import record, step_run_config, time_alternating

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/tiny_dpo.yaml, the runs' working folder


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

    def __init__(self, config, ref, max_length, packed: bool):
        import dataclasses

        from jsmaug.models import decoder as model
        from jsmaug.train import plan as plan_lib, step

        cfg = step_run_config(config, "dpop", max_length)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packed))
        self.plan = plan_lib.plan(cfg, jax.devices()[:1], config=config)
        self.state = step.init_state(self.plan.optimizer, model.init_params(config, jax.random.key(0)),
                                     self.plan.state_sh, seed=0)
        self.ref = ref

    def run(self, batch):
        self.state, m = self.plan.step(self.state, batch, self.ref, False)
        jax.block_until_ready(m)


def bench_packing(config, dist="long_tailed", pairs=8, steps=6, rounds=2, planner_batches=20):
    """The `packing/<dist>/*` rows: real tokens/s of each layout over `steps` batches of `pairs` pairs (every
    batch's program compiled before timing, the layouts timed alternately), the padding share of the timed
    batches, and the planner's padding share at 8 / 32 / 128 pairs per group (no compute)."""
    from jsmaug.data import batches as data, packing
    from jsmaug.models import decoder as model
    from jsmaug.parallel import sharding as shd

    gen, max_length, about = DISTRIBUTIONS[dist]
    batches = [gen(pairs, max_length, seed=s, vocab=config.vocab_size) for s in range(steps)]
    mesh = shd.make_mesh(shd.MeshConfig(data=1), config, jax.devices()[:1])
    ref = model.init_params(config, jax.random.key(1))
    per_batch = [place_layouts(p, mesh, max_length) for p in batches]
    placed = {name: [b[name] for b in per_batch] for name in per_batch[0]}
    real = sum(sum(len(x["prompt"]) * 2 + len(x["chosen"]) + len(x["rejected"]) for x in p) for p in batches)
    slots = {name: sum(int(np.prod(b["input_ids"].shape)) for b in bs) for name, bs in placed.items()}
    shapes = {name: len({b["input_ids"].shape for b in bs}) for name, bs in placed.items()}
    steppers = {"padded": _Stepper(config, ref, max_length, packed=False)}
    steppers["packed_bucket_rows"] = steppers["packed_ladder"] = _Stepper(config, ref, max_length, packed=True)
    for name, bs in placed.items():
        for b in bs:  # compile every shape before timing
            steppers[name].run(b)

    def run_all(name):
        return lambda: [steppers[name].run(b) for b in placed[name]]

    t = time_alternating({name: run_all(name) for name in placed}, rounds)
    rate = {name: real / t[name] for name in placed}
    cfg = (f"{config.num_params() / 1e6:.1f}M params, {steps} steps of {pairs} pairs, max_length {max_length}, "
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


# ------------------------------------------------------------------------------------------------ in a run

# Common English words, each one piece of Mixtral's SentencePiece tokenizer after a space: n words ~ n tokens.
WORDS = ("the of and to in is was for on that with as by at from his her they have this which one had are not but "
         "were all when there can an been has more if will would their what so about out up into than them some "
         "could time these two may then do first any my now such like our over man me even most made after also "
         "did many before must through back years where much your way well down should because each just those "
         "people how too little state good very make world still own see men work long get here between both life "
         "being under never day same another know while last might us great old year off come since against go "
         "came right used take three number answer problem coins total remaining").split()

RUN_DISTRIBUTIONS = {
    "mild_words": "issue 44's own: 160 pairs, prompts 'Question: <10-40 words>\\nAnswer:', completions 3-180 words "
                  "(uniform), max_length 512",
    "mild": "the bench's mild pairs as words: prompts 16-72, completions 3-180 (uniform), max_length 512",
    "long_tailed": "the bench's long-tailed pairs as words: prompts lognormal(median 32), completions "
                   "lognormal(median 48, p99 ~600), max_length 1024"}


def text_rows(dist: str, n: int = 160, seed: int = 0) -> tuple[list[dict], int]:
    """(rows of a preference JSONL, max_length) for a training run: `RUN_DISTRIBUTIONS[dist]`, text of `WORDS`."""
    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(rng.choice(WORDS, max(int(k), 1)))
    if dist == "mild_words":
        return [{"prompt": f"Question: {words(rng.integers(10, 41)).capitalize()}.\nAnswer:",
                 "chosen": f" {words(rng.integers(3, 181)).capitalize()}.",
                 "rejected": f" {words(rng.integers(3, 181)).capitalize()}."} for _ in range(n)], 512
    gen, max_length, _ = DISTRIBUTIONS[dist]
    # The token pairs' lengths as word counts (less the BOS / EOS the tokenizer adds back).
    return [{"prompt": words(len(p["prompt"]) - 1), "chosen": " " + words(len(p["chosen"]) - 1),
             "rejected": " " + words(len(p["rejected"]) - 1)} for p in gen(n, max_length, seed=seed)], max_length


def run_figures(workdir, stdout: str, first: int = 7, last: int = 36) -> dict:
    """A finished run's own figures: real tokens/s over the whole run, compiles included (its metrics' real
    tokens over the loop's seconds plus those spent compiling ahead), the median of steps first..last's
    tokens/s (issue 44's measure), real tokens per CPU second of the process (loop and compiles: the work,
    which a loaded machine's wall time hides), the mean padding share, the seconds compiling ahead."""
    import ast
    import json

    recs = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if '"tokens"' in x]
    done = ast.literal_eval(next(x for x in stdout.splitlines() if x.startswith("done: "))[len("done: "):])
    seconds = done["seconds"] + done.get("compile_ahead_seconds", 0.0)
    window = [r["tokens_per_sec"] for r in recs if first <= r["step"] <= last] or [r["tokens_per_sec"] for r in recs]
    tokens = sum(r["tokens"] for r in recs)
    cpu = done.get("loop_cpu_seconds", 0.0) + done.get("compile_ahead_cpu_seconds", 0.0)
    return {"whole": tokens / seconds, "steady": float(np.median(window)), "whole_cpu": tokens / cpu if cpu else 0.0,
            "padding": float(np.mean([r["padding_fraction"] for r in recs])),
            "compile_ahead": done.get("compile_ahead_seconds", 0.0), "loop": done["seconds"]}


def train_run(data_path, max_length: int, packed: bool, workdir, steps: int, extra=()) -> dict:
    """`python -m jsmaug.train configs/tiny_dpo.yaml` on the data, as a user runs it (DPO, 8 pairs a step, the
    tiny config), in a fresh process with no compilation cache, so its compiles count as a first run's; its
    `run_figures`."""
    import os
    import subprocess
    import sys

    args = [f"workdir={workdir}", f"data.train_path={data_path}", "data.eval_path=null",
            f"data.max_length={max_length}", f"data.max_prompt_length={max_length // 4}",
            f"model.max_position_embeddings={max(512, max_length)}", f"train.steps={steps}", "log.every=1",
            "checkpoint.every=100000", "export_hf=false", "log.tensorboard=false", "compilation_cache=null",
            f"data.packing={'true' if packed else 'false'}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    r = subprocess.run([sys.executable, "-m", "jsmaug.train", "configs/tiny_dpo.yaml", *args], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"training run failed ({' '.join(args)}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return run_figures(workdir, r.stdout)


def bench_packing_runs(dists=("mild_words", "mild", "long_tailed"), steps: int = 40, blocks: int = 3,
                       pairs: int = 160) -> None:
    """The `packing_run/<dist>/*` rows: packed against padded as a run measures it, each distribution's two runs
    (fresh processes, no compilation cache) in `blocks` alternating blocks (packed first in even blocks, padded
    first in odd ones), each row the median block and its spread: real tokens/s over the run's first `steps`
    steps with its compiles, the median of steps 7-36 (issue 44's measure), and the padding share."""
    import json
    import shutil
    import tempfile

    from jsmaug.perf.bench import record_blocks

    for dist in dists:
        tmp = Path(tempfile.mkdtemp(prefix=f"jsmaug_packing_run_{dist}_"))
        rows, max_length = text_rows(dist, pairs)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        got = {True: [], False: []}
        for b in range(blocks):
            for packed in ((True, False) if b % 2 == 0 else (False, True)):
                work = tmp / f"run_{b}_{'packed' if packed else 'padded'}"
                got[packed].append(train_run(data, max_length, packed, work, steps))
                shutil.rmtree(work, ignore_errors=True)
        cfg = (f"configs/tiny_dpo.yaml, {RUN_DISTRIBUTIONS[dist]}, {pairs} pairs, 8 a step, {steps} steps, "
               "packed: the defaults (the run's layout, steps of near-equal tokens), "
               f"no compilation cache; compile ahead packed {[round(f['compile_ahead'], 1) for f in got[True]]} s, "
               f"padded {[round(f['compile_ahead'], 1) for f in got[False]]} s")
        for key, what in (("whole", f"real tokens/s over the {steps} steps, compiles included"),
                          ("steady", "median real tokens/s of steps 7-36"),
                          ("whole_cpu", f"real tokens per CPU second over the {steps} steps, compiles included")):
            record_blocks(f"packing_run/{dist}/{key}_vs_padded", [f[key] for f in got[True]],
                          [f[key] for f in got[False]], "real tokens/s", cfg + f"; {what}", "packed run",
                          "padded run")
        record(f"packing_run/{dist}/padding_share_vs_padded", float(np.median([f["padding"] for f in got[True]])),
               float(np.median([f["padding"] for f in got[False]])), "share of token slots", cfg, "packed run",
               "padded run")
        shutil.rmtree(tmp, ignore_errors=True)
