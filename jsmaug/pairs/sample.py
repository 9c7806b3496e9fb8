"""`jsmaug pairs sample`: the model makes its own pairs. k samples per problem, graded by a verifier
(`jsmaug.pairs.verify`), a correct and a wrong one of the same problem become a pair.

Sampling. A problem's k samples are rows of `jsmaug.models.generate.generate` (the KV cache, temperature /
top-k / top-p), sample j of problem n (its row number) drawn with its own key, `row_keys(seed, (n, j))`: its
tokens depend on the seed, n, j and the prompt only, never on the other rows of its call, `--batch_size`, a
resume or the mesh (up to floating-point rounding; docs/making-pairs.md). So several problems share a call:
`--batch_size` is rows per call; a step holds batch_size // k problems (at least one; a problem with k >
batch_size takes several calls), its calls padded to the same number of rows (one compiled batch shape). A
step's problems are graded, paired and appended to the resume file together. `mesh` (`run`, or `--mesh
data=2,tensor=2` on the command line: the `mesh:` section of a run config, axis=size): the params placed by the
run's rule table, a call's rows split over the batch axes, in one process or several (`jsmaug launch -- pairs
sample ...`: process 0 runs the verifier and writes the files; docs/making-pairs.md, "Several processes"). A
sample's text is the new tokens up to EOS, decoded with special tokens skipped and cut before the first stop
sequence (`--until`; the gsm8k verifiers default to lm-eval's gsm8k stops).

Log-probs. A sample's log-prob is that of the trainer's tokenisation of the pair the text ends up in (TRL's
rule, `jsmaug.data.formats.row_ids`: prompt + completion + EOS tokenised together, the completion starting where
the prompt's ids end), summed over the completion, under the sampling model (`jsmaug.eval.completion_logps`, the
trainer's own policy-logps function). These are what the trainer's reference would compute for the pair before
truncation, and they are written as `ref_chosen_logps` / `ref_rejected_logps` (TRL's column names).

Pair rules (at most `--pairs_per_problem` pairs, duplicates of a text counted once, blank texts never paired):
  likely  rejected: the wrong samples by log-prob, highest first; chosen: the correct samples by log-prob,
          highest first, in turn
  edit    rejected: the wrong samples by their token edit distance to the nearest correct sample, smallest
          first (ties: higher log-prob); chosen: that nearest correct sample (ties: higher log-prob)
A problem with no correct or no wrong sample gives no pair and is counted.

Resume. Finished problems are appended, one step at a time, to `OUT.partial` (its first line holds the run's
settings); a restart with the same settings skips them, and a torn last line is dropped. At the end OUT is
written atomically, problems in input order, and `OUT.partial` is removed (`jsmaug.pairs.resume`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jsmaug import paths
from jsmaug.data import formats
from jsmaug.data.tokenizer import Tokenizer, joined_ids, split_at_prompt
from jsmaug.errors import DataError
from jsmaug.eval import generation, gsm8k as gsm8k_lib
from jsmaug.eval.logprobs import completion_logps
from jsmaug.models import generate as gen
from jsmaug.pairs.resume import VERSION as PARTIAL_VERSION, append_records, file_digest, finished_problems, partial_path
from jsmaug.pairs.stats import edit_distances
from jsmaug.parallel import distributed
from jsmaug.pairs.verify import Problem, Verifier

RULES = ("likely", "edit")
SCORE_MULTIPLE = 32  # scoring pads each problem's rows to a multiple of this many tokens (few compiled shapes)


@dataclass(frozen=True)
class Options:
    k: int = 8
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    pairs_per_problem: int = 1
    rule: str = "likely"
    batch_size: int = 64  # rows per generate call (see the module docstring)
    until: tuple[str, ...] = ()

    def check(self) -> None:
        if self.k < 2:
            raise DataError(f"--k must be at least 2 (a pair needs a correct and a wrong sample), got {self.k}")
        if self.rule not in RULES:
            raise DataError(f"--rule must be one of {list(RULES)}, got {self.rule!r}")
        for name in ("pairs_per_problem", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name} must be at least 1, got {getattr(self, name)}")
        gen.SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                           top_p=self.top_p)  # raises ValueError on a bad setting


@dataclass
class Sample:
    text: str
    score: float
    correct: bool
    prompt_ids: list[int]  # the trainer's ids of prompt and completion (+ EOS) for this text
    completion_ids: list[int]
    logp: float = float("nan")


@dataclass
class Summary:
    problems: int = 0
    samples: int = 0
    correct: int = 0
    pairs: int = 0
    no_correct: int = 0
    no_wrong: int = 0
    out: str = ""

    def add(self, record: dict) -> None:
        self.problems += 1
        self.samples += record["samples"]
        self.correct += record["correct"]
        self.pairs += len(record["pairs"])
        self.no_correct += record["skipped"] == "no correct sample"
        self.no_wrong += record["skipped"] == "no wrong sample"

    def line(self) -> str:
        share = self.correct / max(self.samples, 1)
        return (f"{self.problems} problems, {self.samples} samples ({share:.1%} correct), {self.pairs} pairs "
                f"written to {self.out}; problems skipped: no correct sample {self.no_correct}, no wrong sample "
                f"{self.no_wrong}")

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), share_correct=self.correct / max(self.samples, 1))


# ------------------------------------------------------------------------------------------------ tokens

def training_prompt(problem: Problem, template) -> str | list:
    """The prompt as the pairs' file holds it: chat messages when a template is used, else the string."""
    if template is None:
        if not isinstance(problem.prompt, str):
            raise DataError(f"{problem.where}: the prompt is a list of messages, which needs --chat_template")
        return problem.prompt
    return problem.prompt if isinstance(problem.prompt, list) else [{"role": "user", "content": problem.prompt}]


def training_completion(text: str, template) -> str | list:
    return text if template is None else [{"role": "assistant", "content": text}]


def prompt_ids(tok: Tokenizer, template, prompt: str | list) -> list[int]:
    """The ids the model is prompted with: the trainer's prompt ids (`formats.row_ids`)."""
    if template is None:
        return tok.encode_with_special_tokens(prompt)
    return tok.encode(template.render(list(prompt), add_generation_prompt=True))


def completion_split(tok: Tokenizer, template, prompt: str | list, text: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one completion as the trainer tokenises a pair holding it."""
    if template is None:
        p, full, _ = joined_ids(tok, prompt, text, text)
    else:
        p = prompt_ids(tok, template, prompt)
        full = tok.encode(template.render(list(prompt) + training_completion(text, template),
                                          add_generation_prompt=False))
    pp, cc, _ = split_at_prompt(p, full, full)
    return pp, cc


# ------------------------------------------------------------------------------------------------ sampling

def problems_per_step(opts: Options) -> int:
    return max(1, opts.batch_size // opts.k)


def draw(config, params, tok: Tokenizer, prompts: Sequence[list[int]], indices: Sequence[int], opts: Options,
         until: Sequence[str], mesh=None) -> list[list[str]]:
    """k completions of each prompt (prompt i is problem `indices[i]`), as text: every row keyed by (seed, problem,
    sample), in calls of at most `opts.batch_size` rows padded to one size (module docstring). `mesh`: (Mesh,
    MeshConfig) or None."""
    sampling = gen.SamplingConfig(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                  top_k=opts.top_k, top_p=opts.top_p, eos_id=tok.eos_id)
    kwargs: dict[str, Any] = {}
    if mesh is not None:
        kwargs["mesh"], kwargs["mesh_config"] = mesh
    if until:
        # Generation stops early once every row's text holds a stop sequence; the text before it is the same.
        kwargs["stop_check"] = lambda row, new: any(s in generation.decode_generated(tok, new) for s in until)
    rows = [(i, j) for i in range(len(prompts)) for j in range(opts.k)]
    per_call = min(opts.batch_size, problems_per_step(opts) * opts.k)
    new_ids = []
    for start in range(0, len(rows), per_call):
        call = rows[start:start + per_call]
        keys = gen.row_keys(opts.seed, [(indices[i], j) for i, j in call])
        new_ids += gen.generate(config, params, [prompts[i] for i, _ in call], sampling, keys=keys,
                                row_multiple=per_call, **kwargs)
    texts = []
    for new in new_ids:
        if tok.eos_id is not None and tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        texts.append(generation.cut_at_stops(generation.decode_generated(tok, new), until))
    return [texts[i * opts.k:(i + 1) * opts.k] for i in range(len(prompts))]


def grade(config, params, tok: Tokenizer, template, verifier: Verifier, problem: Problem, texts: list[str]
          ) -> list[Sample]:
    """Each text graded, tokenised as the trainer will, and its log-prob under the sampling model."""
    prompt = training_prompt(problem, template)
    # The verifier runs once, on process 0, and every process gets its scores (they decide which pairs are scored
    # again, a collective where the params span processes).
    scores = distributed.from_writer(lambda: [verifier(problem, t) for t in texts], np.zeros(len(texts)),
                                     f"{problem.where}: the verifier failed on process 0 (see its output)")
    samples = [Sample(text, float(score), verifier.correct(float(score)),
                      *completion_split(tok, template, prompt, text)) for text, score in zip(texts, scores)]
    scored = [s for s in samples if s.text.strip()]
    if scored:
        # One call per problem, k rows: its shapes depend on the problem only, so the figures do not depend on
        # the batch; lengths rounded to SCORE_MULTIPLE, so few shapes compile (not one per distinct length).
        lp, _ = completion_logps(config, params, [(s.prompt_ids, s.completion_ids) for s in scored],
                                 batch_size=len(texts), length_multiple=SCORE_MULTIPLE)
        for s, v in zip(scored, lp):
            s.logp = float(v)
    return samples


def choose_pairs(samples: Sequence[Sample], rule: str, limit: int) -> list[tuple[int, int]] | str:
    """(chosen index, rejected index) pairs by `rule` (module docstring), or why there is none."""
    def unique(indices):
        seen, out = set(), []
        for i in indices:
            if samples[i].text not in seen and samples[i].text.strip():
                seen.add(samples[i].text)
                out.append(i)
        return out

    good = unique(i for i, s in enumerate(samples) if s.correct)
    bad = unique(i for i, s in enumerate(samples) if not s.correct)
    if not good:
        return "no correct sample"
    if not bad:
        return "no wrong sample"
    by_logp = lambda i: (-samples[i].logp, i)  # noqa: E731
    good.sort(key=by_logp)
    if rule == "likely":
        bad.sort(key=by_logp)
        return [(good[j % len(good)], w) for j, w in enumerate(bad[:limit])]
    dist, _, _ = edit_distances([samples[c].completion_ids for w in bad for c in good],
                                [samples[w].completion_ids for w in bad for c in good])
    dist = np.asarray(dist).reshape(len(bad), len(good))
    nearest = {w: min(range(len(good)), key=lambda j: (dist[a, j], j)) for a, w in enumerate(bad)}
    ranked = sorted(range(len(bad)), key=lambda a: (dist[a, nearest[bad[a]]], -samples[bad[a]].logp, bad[a]))
    return [(good[nearest[bad[a]]], bad[a]) for a in ranked[:limit]]


def pair_rows(config, params, tok: Tokenizer, template, problem: Problem, samples: Sequence[Sample],
              chosen_rejected: Sequence[tuple[int, int]]) -> list[dict]:
    """Training-format rows with the sampling model's log-probs as the precomputed reference. Each pair is
    tokenised by the trainer's own function; when its split differs from the samples' (a token that merges
    across the prompt's end), its log-probs are computed again on the pair's ids."""
    prompt = training_prompt(problem, template)
    fmt = formats.STANDARD if template is None else formats.CONVERSATIONAL
    rows = []
    for c, r in chosen_rejected:
        row = {"prompt": prompt, "chosen": training_completion(samples[c].text, template),
               "rejected": training_completion(samples[r].text, template)}
        p, ch, rj = formats.row_ids(problem.where, row, fmt, ("prompt", "chosen", "rejected"), tok, template)
        logps = (samples[c].logp, samples[r].logp)
        if (p, ch, rj) != (samples[c].prompt_ids, samples[c].completion_ids, samples[r].completion_ids) \
                or samples[r].prompt_ids != p:
            logps = tuple(float(x) for x in completion_logps(config, params, [(p, ch), (p, rj)], batch_size=2,
                                                             length_multiple=SCORE_MULTIPLE)[0])
        rows.append(dict(row, ref_chosen_logps=logps[0], ref_rejected_logps=logps[1], problem=problem.index,
                         chosen_score=samples[c].score, rejected_score=samples[r].score))
    return rows


def sample_step(config, params, tok, template, verifier, problems: Sequence[Problem], opts: Options,
                until: Sequence[str], mesh=None) -> list[dict]:
    """The problems' records for the resume file: counts, and their pairs (or why there is none)."""
    prompts = [prompt_ids(tok, template, training_prompt(p, template)) for p in problems]
    records = []
    for problem, texts in zip(problems, draw(config, params, tok, prompts, [p.index for p in problems], opts, until,
                                             mesh)):
        samples = grade(config, params, tok, template, verifier, problem, texts)
        chosen = choose_pairs(samples, opts.rule, opts.pairs_per_problem)
        pairs = [] if isinstance(chosen, str) else pair_rows(config, params, tok, template, problem, samples,
                                                             chosen)
        records.append({"problem": problem.index, "samples": len(samples),
                        "correct": sum(s.correct for s in samples),
                        "skipped": chosen if isinstance(chosen, str) else None, "pairs": pairs})
    return records


# ------------------------------------------------------------------------------------------------ the run

def default_until(tok: Tokenizer, verifier: Verifier, until: Sequence[str] | None) -> list[str]:
    if until is None:
        until = gsm8k_lib.UNTIL if verifier.kind in ("gsm8k", "gsm8k_strict") else ()
    return [s for s in generation.stop_sequences(tok, until) if s]


def sampling_mesh(mesh_config):
    """The mesh to sample on: `mesh_config`, or with several processes and none given, data over all their
    devices (a call's rows split over them); None: the default device."""
    if mesh_config is None and distributed.process_count() > 1:
        from jsmaug.parallel.sharding import MeshConfig

        return MeshConfig()
    return mesh_config


def run(config, params, tok: Tokenizer, problems: Sequence[Problem], verifier: Verifier, out: str | os.PathLike,
        opts: Options, *, template=None, settings: dict | None = None, progress: bool = True,
        mesh_config=None) -> Summary:
    """Sample, grade and pair every problem, resuming from OUT.partial; writes OUT (module docstring).
    `settings` identify the run (model, input, ...) so that a resume with others is refused (`batch_size` and the
    mesh do not change the samples, so a resume may change them). `mesh_config`: a `sharding.MeshConfig` to
    sample on, or None (the default device; with several processes, all their devices). With several processes
    (`jsmaug launch -- pairs sample ...`) every process calls `run` alike; process 0 reads and writes the files
    and prints, and returns the run's summary (the others' counts leave out problems done before a resume)."""
    opts.check()
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DataError(f"{out}: the output must be a .jsonl file")
    if not out.parent.is_dir():
        raise DataError(f"{out}: folder {out.parent} does not exist")
    until = default_until(tok, verifier, opts.until or None)
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "batch_size"}
    settings = json.loads(json.dumps(dict(settings or {}, options=options, until=until, verifier=verifier.spec,
                                          threshold=verifier.threshold, version=PARTIAL_VERSION)))
    writer = distributed.is_writer()
    progress = progress and writer
    mesh_config = sampling_mesh(mesh_config)
    mesh = None
    if mesh_config is not None:
        from jsmaug.parallel import sharding as shd

        mesh = (shd.make_mesh(mesh_config, config), mesh_config)
        params = shd.put_global(params, shd.param_shardings(config, mesh[0], mesh_config))
    partial = partial_path(out)
    done, finished = finished_problems(partial, settings)  # the records on process 0; the numbers on every one
    todo = [p for p in problems if p.index not in finished]
    summary = Summary(out=str(out))
    for r in done.values():
        summary.add(r)
    if progress and done:
        print(f"pairs sample: resuming, {len(done)} problems done in {partial}", file=sys.stderr, flush=True)
    t0, sampled = time.time(), 0
    step = problems_per_step(opts)
    for start in range(0, len(todo), step):
        records = sample_step(config, params, tok, template, verifier, todo[start:start + step], opts, until, mesh)
        if writer:
            append_records(partial, settings, records)
        for r in records:
            done[r["problem"]] = r
            summary.add(r)
            sampled += r["samples"]
        if progress:
            rate = sampled / max(time.time() - t0, 1e-9)
            print(f"pairs sample: {summary.problems}/{len(problems)} problems, {rate:.3g} samples/s, "
                  f"{summary.correct / max(summary.samples, 1):.1%} correct, {summary.pairs} pairs",
                  file=sys.stderr, flush=True)
    if writer:
        rows = [row for p in problems for row in done[p.index]["pairs"]]
        paths.atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        partial.unlink(missing_ok=True)
    distributed.sync("pairs sample: written")  # no process ends before process 0 has written OUT
    return summary


def sample_command(args) -> Summary:
    """`jsmaug pairs sample` (jsmaug/pairs/cli.py's arguments): inputs checked before the model is loaded."""
    from jsmaug import eval as ev
    from jsmaug.pairs.verify import read_problems
    from jsmaug.train.reference_cache import tree_digest

    opts = Options(k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens, seed=args.seed, pairs_per_problem=args.pairs_per_problem,
                   rule=args.rule, batch_size=args.batch_size, until=tuple(args.until or ()))
    try:
        opts.check()
    except ValueError as err:
        raise DataError(f"sampling settings: {err}") from None
    mesh_config = sampling_mesh(args.mesh)  # args.mesh: a MeshConfig or None (cli.mesh_option)
    verifier = Verifier(args.verifier, args.threshold)
    problems = read_problems(args.input, verifier.kind, args.max_rows)
    tok = Tokenizer(args.tokenizer or ev.model_tokenizer_path(args.model))
    template = formats.load_chat_template(args.chat_template, tok)
    for p in problems:
        training_prompt(p, template)  # a conversation without --chat_template fails here, before the model loads
    config, params = ev.load_model(args.model, args.dtype, mesh_config)  # straight onto the mesh's devices
    settings = {"model": str(args.model), "model_digest": tree_digest(params), "input": str(args.input),
                "input_digest": file_digest(args.input), "max_rows": args.max_rows, "tokenizer": tok.fingerprint(),
                "chat_template": template.source if template is not None else None, "dtype": args.dtype}
    return run(config, params, tok, problems, verifier, args.out, opts, template=template, settings=settings,
               progress=not args.quiet, mesh_config=mesh_config)
