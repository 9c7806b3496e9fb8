"""Packed pairs (`data.packing: true`): each step's pairs laid into rows of several sequences, so no compute is
spent on padding. The same pairs as without packing, truncated the same way; only their layout changes.

Each pair gives two sequences, prompt + chosen and prompt + rejected, each a segment of its own (its own
`positions`, from 0; attention never crosses a segment). The pairs of a step are split into groups, one per
micro-batch and data shard of the mesh (a shard's rows hold only its own pairs). The row length comes from a
ladder of multiples of `ROW_STEP` (64 tokens; 1/8 of the bucket length for short buckets), from the longest
sequence up to twice the batch's bucket length: the length that needs the fewest token slots, each group's
sequences laid into its rows first-fit, longest first. Rows of the bucket length alone (first-fit in pair
order, the layout before the ladder) left 19-23% of the slots empty at 8 pairs per group, when sequences are
about half a bucket long; the ladder leaves 4-8% (docs/performance.md). The rows per group are the smallest of
a few counts (`row_counts`) that holds every group. A training run takes one row length and a few row counts for
all its steps (`run_layout` -> `RunLayout`, chosen from its first steps' lengths before the first step), since
every new (rows, length) shape is a new compile of the whole step: the layout of least work, a compile counted
as `data.packing_compile_steps` steps; `data.packing_length` fixes the row length instead. A packed batch:

    input_ids, segment_ids, positions, labels, loss_mask, sequence_ids   (M, D*R, L) int32
    pair_index                                                           (2, B) int32

M micro-batches, D data shards, R rows per group, L the row length; axis 1 is split over the data shards.
`sequence_ids[t]` names the sequence a position's label belongs to within its micro-batch: pair q of the
micro-batch's Bm pairs is sequence q (chosen) and Bm + q (rejected), so the log-probs come out per sequence
in the usual [chosen; rejected] order (`logps.sequence_logps_from_hidden`). `pair_index` is the pairs' dataset
index (its shape gives B); a precomputed reference adds `ref_logps` (2, B).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jsmaug.data.batches import batch_length
from jsmaug.data.files import DataError
from jsmaug.segments import CHOSEN, PROMPT, REJECTED, shared_id

ROW_KEYS = ("input_ids", "segment_ids", "positions", "labels", "loss_mask", "sequence_ids")


def sequence_lengths(pair) -> tuple[int, int]:
    """(prompt + chosen, prompt + rejected) tokens of a pair."""
    n = len(pair["prompt"])
    return n + len(pair["chosen"]), n + len(pair["rejected"])


def unit_length(pair) -> int:
    """Tokens of a pair laid out with its prompt shared (`materialize`): prompt, chosen, the prompt's last token
    again, rejected."""
    return len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"]) + 1


def item_lengths(pair, shared: bool) -> tuple[int, ...]:
    """The lengths of what a pair puts into packed rows: its two sequences, or with `shared` its one unit."""
    return (unit_length(pair),) if shared else sequence_lengths(pair)


def longest_item(pairs, shared: bool = False) -> int:
    return max(max(item_lengths(p, shared)) for p in pairs)



def first_fit(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Rows of sequence indices: each sequence, in order, into the first row it fits."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > row_length:
            raise DataError(f"a sequence of {n} tokens does not fit a packed row of {row_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_length - n)
    return rows


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every sequence of a step goes: `rows[g]` lists group g's rows, each a list of (pair, chosen?); with
    shared prompts, of (pair, None): the pair's unit."""
    micro: int
    shards: int
    row_length: int
    rows_per_group: int
    rows: tuple[tuple[tuple[tuple[int, bool | None], ...], ...], ...]

    @property
    def slots(self) -> int:
        """Token slots of the packed batch, padding included."""
        return self.micro * self.shards * self.rows_per_group * self.row_length


def row_counts(max_rows: int) -> tuple[int, ...]:
    """The row counts a group may take: every count up to 8, then steps of 1/8 (9, 11, 13, 15, 17, 20, ...), and
    `max_rows`. Rounding a group up to the next count wastes at most 1/8 of its rows (powers of two would waste up
    to half: 25 to 35% padding on the bench's long-tailed data, against 7 to 20% with these), while a run meets
    only the few counts near its typical fill, so only a few programs compile."""
    out, n = [], 1
    while n < max_rows:
        out.append(n)
        n = max(n + 1, -(-n * 9 // 8))
    return tuple(out) + (max_rows,)


ROW_STEP = 64  # the row-length ladder's step (`plan`'s default row_step)


def first_fit_decreasing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """`first_fit` over the sequences longest first (fuller rows); each row's indices in ascending order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows = first_fit([lengths[i] for i in order], row_length)
    return [sorted(order[k] for k in row) for row in rows]


def _group_sequences(pairs, g: int, per: int, shared: bool = False):
    if shared:
        seqs = [(j, None) for j in range(g * per, (g + 1) * per)]
        return seqs, [unit_length(pairs[j]) for j, _ in seqs]
    seqs = [(j, c) for j in range(g * per, (g + 1) * per) for c in (True, False)]
    return seqs, [sequence_lengths(pairs[j])[0 if c else 1] for j, c in seqs]


def _layout(groups, row_length: int, fit, per: int):
    """(rows per group, each group's rows) of every group's sequences in rows of `row_length`."""
    rows = [tuple(tuple(seqs[i] for i in row) for row in fit(lengths, row_length)) for seqs, lengths in groups]
    need = max(len(r) for r in rows)
    return next(c for c in row_counts(2 * per) if c >= need), tuple(rows)


def plan(pairs: Sequence[dict], *, micro: int, shards: int, buckets: Sequence[int],
         row_length: int | None = None, row_step: int = ROW_STEP, run_length: "int | RunLayout | None" = None,
         shared: bool = False) -> Plan:
    """The packing of one step's pairs (from their lengths only: every process makes the same plan).

    `row_length` given (data.packing_length): rows of that length, first-fit in pair order. Else with
    `row_step` (the default): the row length is chosen from a ladder of multiples of `row_step` (of 1/8 of the
    bucket length where that is smaller, at least 8), from the longest sequence up to twice the batch's bucket
    length, the one that needs the fewest token slots (rows x
    length; the shorter on a tie), each length's rows filled first-fit longest sequence first. `row_step=0`:
    rows of the bucket length, first-fit in pair order (the layout before the ladder). `run_length` (the run's
    one row length, `run_row_length`): rows of that length filled longest first, whenever the step's longest
    sequence fits it (else this step takes the ladder's length); a `RunLayout` (`run_layout`): rows of its
    length, as many as the smallest of its counts that holds every group. `shared` (data.share_prompt): each
    pair is one unit of `unit_length` tokens instead of two sequences."""
    b = len(pairs)
    groups = micro * shards
    if b % groups:
        raise DataError(f"{b} pairs do not split into {micro} micro-batches x {shards} data shards")
    per = b // groups
    seqs = [_group_sequences(pairs, g, per, shared) for g in range(groups)]
    if row_length is not None or not row_step:
        if row_length is None:  # the padded batch's length: packing changes the layout, not the programs' lengths
            row_length = batch_length(pairs, buckets)
        count, rows = _layout(seqs, row_length, first_fit, per)
        return Plan(micro, shards, row_length, count, rows)
    longest = max(max(lengths) for _, lengths in seqs)
    if isinstance(run_length, RunLayout) and longest <= run_length.length:
        rows = tuple(tuple(tuple(s[i] for i in row) for row in first_fit_decreasing(lengths, run_length.length))
                     for s, lengths in seqs)
        count = run_length.rows_for(max(len(r) for r in rows), 2 * per)
        return Plan(micro, shards, run_length.length, count, rows)
    if isinstance(run_length, RunLayout):
        run_length = None  # a sequence longer than the run's rows: this step takes the ladder's length
    if run_length is not None and longest <= run_length:
        count, rows = _layout(seqs, run_length, first_fit_decreasing, per)
        return Plan(micro, shards, run_length, count, rows)
    bucket = batch_length(pairs, buckets)
    step = min(row_step, max(8, bucket // 8))  # short buckets: a finer ladder (1/8 of the bucket, >= 8)
    best = None
    for length in range(-(-longest // step) * step, max(2 * bucket, longest) + 1, step):
        count, rows = _layout(seqs, length, first_fit_decreasing, per)
        if best is None or count * length < best[0] * best[1]:
            best = (count, length, rows)
    count, length, rows = best
    return Plan(micro, shards, length, count, rows)


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """A packed run's programs: rows of `length` tokens and, per step, the smallest of `counts` (ascending) rows
    per group that holds the step's sequences (a count past them, if a later step needs one: `row_counts`)."""
    length: int
    counts: tuple[int, ...]

    def rows_for(self, need: int, max_rows: int) -> int:
        return next((c for c in self.counts if c >= need), None) or next(c for c in row_counts(max_rows) if c >= need)


def _need(pairs, length: int, micro: int, shards: int, shared: bool = False) -> int:
    """The most rows of `length` tokens any group of this step needs, filled longest first."""
    per = len(pairs) // (micro * shards)
    return max(len(first_fit_decreasing(_group_sequences(pairs, g, per, shared)[1], length))
               for g in range(micro * shards))


def _fewest_counts(needs: dict[int, int], step_slots: float, compile_slots: float):
    """(cost, counts): the row counts, each one of `needs` (count of rows -> steps needing it) and the largest
    among them, that minimise sum over steps of (the smallest count >= its need) x `step_slots` + `compile_slots`
    per count; on a tie, fewer counts. A dynamic programme over the sorted needs: best[j] covers needs[:j]."""
    d = sorted(needs)
    best = [(0.0, 0, ())]
    for j in range(1, len(d) + 1):
        options = []
        for i in range(j):
            steps = sum(needs[x] for x in d[i:j])
            cost, n, counts = best[i]
            options.append((cost + compile_slots + steps * d[j - 1] * step_slots, n + 1, counts + (d[j - 1],)))
        best.append(min(options, key=lambda o: (o[0], o[1])))
    return best[-1][0], best[-1][2]


def run_layout(batches: Sequence[Sequence[dict]], *, micro: int, shards: int, buckets: Sequence[int], longest: int,
               row_step: int = ROW_STEP, max_length: int | None = None, compile_steps: float = 0.0,
               steps: int | None = None, shared: bool = False) -> RunLayout:
    """A packed run's row length and row counts, chosen before its first step from `batches` (its first steps,
    lengths only) to minimise the run's work: token slots over the run's `steps` (default: len(batches)) plus
    `compile_steps` steps' worth of real tokens for every (rows, length) shape, each a compile of the whole step.

    Why the compiles count: on the 2-core CPU machine a compile of the tiny config's step took about 22 s of CPU,
    and each token slot of a step 0.29 ms more (docs/performance.md, "Packing in a run"), so a compile costs the
    slots of about 35 steps' real tokens, and a run of 40 steps whose rows came in 3 counts (5, 6 or 7 rows of
    376 tokens, 9.3% padding) spent more on its two extra compiles than packing saved, and ran at 0.83x padded.
    Counted this way a short run takes one shape, a long run the few counts that pay for their compiles
    (`compile_steps=0`: every row count its steps need, the fewest slots). A step's work also has a part that
    does not depend on the layout (the log-probs of the completion tokens), which this leaves out.

    Lengths run from `longest` (the data's longest sequence) in steps of `row_step` up to twice the largest padded
    length of `batches`, and no further than `max_length` (the longest row that keeps the padded rows' attention
    path: on CPU, rows over attention_block_size take the chunked path, 1.6x the work per slot on the tiny config,
    measured with 512-token blocks, before chunked's CPU blocks of 256) unless the longest sequence needs more.
    Ties: fewer counts, then the shorter length. `shared`: the pairs as units (`plan`); `longest` is then the
    longest unit."""
    steps = len(batches) if steps is None else steps
    batches = list(batches)[:max(steps, 1)]
    weight = steps / len(batches)  # each sampled batch stands for this many steps
    groups = micro * shards
    real = sum(sum(sum(item_lengths(p, shared)) for p in pairs) for pairs in batches) / len(batches)
    first = -(-longest // row_step) * row_step
    cap = max(2 * max(batch_length(b, buckets) for b in batches), longest)
    if max_length is not None:
        cap = min(cap, max_length)
    best = None
    for length in range(first, max(cap, first) + 1, row_step):
        needs: dict[int, int] = {}
        for pairs in batches:
            n = _need(pairs, length, micro, shards, shared)
            needs[n] = needs.get(n, 0) + 1
        cost, counts = _fewest_counts(needs, weight * groups * length, compile_steps * real)
        if best is None or (cost, len(counts)) < (best[0], len(best[1].counts)):
            best = (cost, RunLayout(length, counts))
    return best[1]


def run_row_step(platform: str) -> int:
    """The step of the run's row-length ladder: 8 tokens (the finest the attention kernels take without padding
    a row themselves; on mild data at 8 pairs a step it leaves 9.5% of the slots empty where steps of 64 leave
    12.0%, with the same 3 row counts: tests/test_packing.py), except on TPU, where the splash kernel pads every
    row to a multiple of 128 anyway."""
    return 128 if platform == "tpu" else 8


def run_row_length(batches: Sequence[Sequence[dict]], *, micro: int, shards: int, buckets: Sequence[int],
                   longest: int, row_step: int = ROW_STEP) -> int:
    """One packed row length for a whole run: of the lengths from `longest` (the data's longest sequence) up to
    twice its largest batch length, in steps of `row_step`, the one whose rows, filled longest first, need the
    fewest token slots over `batches` (a sample of the run's steps; the shorter on a tie).

    Why one length: a step's own best length changes from step to step, and every new (rows, length) shape is a
    new compile of the whole step. On mild data at 8 pairs a step, per-step lengths met 12 shapes in the first 40
    steps (a compile each, tens of seconds on a CPU) where padding met 1; with the run's one length only the
    row count varies, over 3 of `row_counts` (docs/performance.md, "Packing in a run")."""
    cap = max(2 * max(batch_length(b, buckets) for b in batches), longest)
    best = None
    for length in range(-(-longest // row_step) * row_step, cap + row_step, row_step):
        slots = 0
        for pairs in batches:
            per = len(pairs) // (micro * shards)
            groups = [_group_sequences(pairs, g, per) for g in range(micro * shards)]
            slots += _layout(groups, length, first_fit_decreasing, per)[0] * length
        if best is None or slots < best[0]:
            best = (slots, length)
    return best[1]


def materialize(pairs: Sequence[dict], p: Plan, shards: Sequence[int]) -> dict[str, np.ndarray]:
    """The row arrays (M, len(shards) * R, L) of the given data shards (the ones this process's devices hold).

    A shared-prompt unit (pair, None) is laid out as prompt[:-1], then prompt[-1] + chosen, then prompt[-1] +
    rejected, with segment ids `segments.shared_id` (`segments.visible`: each branch sees the prompt) and each
    branch's positions continuing the prompt's: the prompt's last token, repeated at the head of each branch, has
    the hidden state it has in the pair's two sequences, and predicts that branch's first token."""
    bm = len(pairs) // p.micro
    out = {k: np.zeros((p.micro, len(shards) * p.rows_per_group, p.row_length), np.int32) for k in ROW_KEYS}

    def put(m, at, t, tokens, seg, first_position, first_label, seq_id):
        """`tokens` at t.. of a row: each token's label the next one (the last unlabelled), in the loss from
        position `first_label` of `tokens` on; positions from `first_position`. Returns where the row goes on."""
        n, sl = len(tokens), slice(t, t + len(tokens))
        if not n:  # a one-token prompt's shared part
            return t
        out["input_ids"][m, at, sl] = tokens
        out["segment_ids"][m, at, sl] = seg
        out["positions"][m, at, sl] = np.arange(first_position, first_position + n)
        out["labels"][m, at, t:t + n - 1] = tokens[1:]
        out["loss_mask"][m, at, t + first_label:t + n - 1] = 1  # labels[t'] = tokens[t'+1], a completion token
        out["sequence_ids"][m, at, sl] = seq_id
        return t + n

    for m in range(p.micro):
        for s_local, d in enumerate(shards):
            for r, row in enumerate(p.rows[m * p.shards + d]):
                at = s_local * p.rows_per_group + r
                t = 0
                for seg, (j, chosen) in enumerate(row, start=1):
                    pair = pairs[j]
                    prompt, q = pair["prompt"], j - m * bm
                    if chosen is None:  # a shared-prompt unit
                        n = len(prompt)
                        t = put(m, at, t, prompt[:-1], shared_id(seg, PROMPT), 0, n, q)  # unlabelled
                        for branch, key, seq_id in ((CHOSEN, "chosen", q), (REJECTED, "rejected", bm + q)):
                            t = put(m, at, t, np.concatenate([prompt[-1:], pair[key]]), shared_id(seg, branch),
                                    n - 1, 0, seq_id)
                        continue
                    completion = pair["chosen" if chosen else "rejected"]
                    t = put(m, at, t, np.concatenate([prompt, completion]), seg, 0, len(prompt) - 1,
                            q if chosen else bm + q)
    return out


def padding_fractions(batches: Sequence[Sequence[dict]], *, micro: int, shards: int, buckets: Sequence[int],
                      row_length: int | None = None, row_step: int = ROW_STEP,
                      run_length: int | None = None, shared: bool = False) -> tuple[float, float]:
    """(padded, packed): the share of token slots that are padding over the given steps' batches, without and
    with packing (`shared`: the packed rows' real tokens are the units', the prompt once a pair)."""
    real = real_packed = padded = packed = 0
    for pairs in batches:
        real += sum(sum(sequence_lengths(p)) for p in pairs)
        real_packed += sum(sum(item_lengths(p, shared)) for p in pairs)
        padded += 2 * len(pairs) * batch_length(pairs, buckets)
        packed += plan(pairs, micro=micro, shards=shards, buckets=buckets, row_length=row_length,
                       row_step=row_step, run_length=run_length, shared=shared).slots
    return 1.0 - real / padded, 1.0 - real_packed / packed
