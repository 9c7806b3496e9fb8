"""The trainer reads the reference log-probs a pairs file carries (`ref_chosen_logps` / `ref_rejected_logps`, as
`jsmaug pairs sample` keeps them) under `reference.mode=precomputed`: the table equals the trainer's own reference
forward over the same tokens; trained from the sampling model, step 1 is the tie (log 2); shifted values in the
file move step 1's loss by DPOP's formula, so the file's numbers are the ones used; mixed, cut and non-numeric
rows are refused, naming the row. One tiny random model and pairs sampled from it."""

import json
import math

import numpy as np
import pytest

import jax

from jsmaug.data import batches as data_lib
from jsmaug.errors import DataError
from jsmaug.models import config as config_lib, decoder as model
from jsmaug.pairs import sample, verify
from jsmaug.train import checkpoint, metrics_log, reference_cache, run as train, step as step_lib
from jsmaug.train.config import load_run_config

BETA, LAM = 0.3, 50.0


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model saved as a converter checkpoint, and pairs sampled from it (with the kept log-probs)."""
    d = tmp_path_factory.mktemp("refpairs")
    cfg = config_lib.tiny(vocab_size=32000, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    checkpoint.save_params(d / "start", cfg, params)
    (d / "check.py").write_text("def even(problem, completion):\n    return len(completion) % 2 == 0\n")
    with open(d / "problems.jsonl", "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"prompt": f"Q: {i}+{i}="}) + "\n")
    v = verify.Verifier(f"{d / 'check.py'}:even")
    opts = sample.Options(k=4, max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=6, seed=1,
                          pairs_per_problem=2)
    summary = sample.run(cfg, params, data_lib.Tokenizer(), verify.read_problems(d / "problems.jsonl", v.kind),
                         v, d / "pairs.jsonl", opts, progress=False)
    assert summary.pairs >= 8, summary
    return d, cfg, params


def _cfg(d, pairs, *extra):
    return load_run_config("tiny_dpop", [
        f"workdir={d / 'run'}", f"init_from={d / 'start'}", f"data.train_path={pairs}", "data.eval_path=null",
        "data.max_length=64", "data.max_prompt_length=32", "reference.mode=precomputed", "loss.type=dpop",
        f"loss.beta={BETA}", f"loss.dpop_lambda={LAM}", "train.steps=1", "train.batch_size=8",
        "train.warmup_steps=0", "log.every=1", "log.eval_every=0", "log.tensorboard=false", "checkpoint.every=1",
        "checkpoint.async_save=false", "export_hf=false", *extra])


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_table_is_the_files_and_the_trainers_reference_forward(made):
    d, config, params = made
    cfg, _ = _cfg(d, d / "pairs.jsonl")
    tok = data_lib.Tokenizer()
    examples, report = data_lib.prepare(d / "pairs.jsonl", cfg.data, tok)
    rows = _rows(d / "pairs.jsonl")
    assert report.kept == len(rows) == len(examples)
    table = reference_cache.pairs_reference(cfg, examples, tok.fingerprint())
    np.testing.assert_array_equal(table, np.float32([[r["ref_chosen_logps"], r["ref_rejected_logps"]]
                                                     for r in rows]))
    # The trainer's own reference (step.reference_logps) over the collated pairs, as precompute runs it.
    batch = data_lib.collate(examples, data_lib.bucket_lengths(cfg.data))
    lp = np.asarray(jax.jit(lambda p, b: step_lib.reference_logps(config, p, b))(params, batch))
    n = len(examples)
    np.testing.assert_allclose(table, np.stack([lp[:n], lp[n:]], 1), rtol=1e-5, atol=1e-4)


def test_step_one_is_the_tie_and_the_files_numbers_are_used(made):
    """One step of DPOP from the sampling model on 8 pairs, the first 4 with ref_chosen_logps raised by 1 in the
    file. The others are the tie: the policy's log-probs are the file's, margin 0, no penalty, loss log 2. The
    raised ones have margin -1 and penalty 1: softplus(beta (1 + lambda)). A trainer that ignored the file (or
    computed its own reference) would give log 2 and no penalty on all 8. About 8 s (one training run's compile)
    on the shared 2-core CPU at load 5, 30 s at load 7; the whole file 16 s and 33 s."""
    d, _, _ = made
    rows = _rows(d / "pairs.jsonl")[:8]
    path = _write(d / "half_shifted.jsonl", [dict(r, ref_chosen_logps=r["ref_chosen_logps"] + (i < 4))
                                             for i, r in enumerate(rows)])
    cfg, raw = _cfg(d, path, f"workdir={d / 'one_step'}")
    train.run(cfg, raw)
    first = next(r for r in metrics_log.read_metrics(d / "one_step" / "metrics.jsonl") if "loss" in r)
    assert first["step"] == 1
    assert not list((d / "one_step").glob("ref_cache/*.npy"))  # nothing computed, nothing cached
    raised = math.log1p(math.exp(BETA * (1 + LAM)))
    assert abs(first["loss/preference"] - (4 * math.log(2) + 4 * raised) / 8) < 1e-3, first["loss/preference"]
    assert abs(first["rewards/chosen"] - BETA * -0.5) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4, first
    assert abs(first["dpop/penalty"] - 0.5) < 1e-4 and first["dpop/active_fraction"] == 0.5, first


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [rows[0], {k: v for k, v in rows[1].items() if k != "ref_rejected_logps"}, *rows[2:]],
     r"pairs\.jsonl:line 2: no ref_rejected_logps, while .*line 1 has the reference log-probs"),
    (lambda rows: [rows[0], dict(rows[1], ref_chosen_logps="-3.5"), *rows[2:]],
     r"pairs\.jsonl:line 2: field 'ref_chosen_logps' must be a finite number"),
    (lambda rows: [rows[0], dict(rows[1], ref_chosen_logps=float("nan")), *rows[2:]],
     r"pairs\.jsonl:line 2: field 'ref_chosen_logps' must be a finite number"),
])
def test_bad_rows_are_refused_by_name(made, tmp_path, edit, message):
    d, _, _ = made
    path = _write(tmp_path / "pairs.jsonl", edit(_rows(d / "pairs.jsonl")))
    cfg, _ = _cfg(d, path)
    with pytest.raises(DataError, match=message):
        reference_cache.pairs_reference(cfg, [], data_lib.Tokenizer().fingerprint())


def test_a_cut_pair_and_a_file_without_the_columns_are_refused(made, tmp_path):
    d, _, _ = made
    tok = data_lib.Tokenizer()
    rows = _rows(d / "pairs.jsonl")
    cfg, _ = _cfg(d, d / "pairs.jsonl", "data.max_length=10", "data.max_prompt_length=8")
    examples, _ = data_lib.prepare(d / "pairs.jsonl", cfg.data, tok)
    with pytest.raises(DataError, match=r"pairs\.jsonl:line \d+: data\.max_length=10 .* cut this pair"):
        reference_cache.pairs_reference(cfg, examples, tok.fingerprint())

    plain = _write(tmp_path / "plain.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    cfg, _ = _cfg(d, plain)
    assert reference_cache.pairs_reference(cfg, data_lib.prepare(plain, cfg.data, tok)[0], tok.fingerprint()) is None
    # The train file has them, the eval file (other pairs) has not.
    other = _write(tmp_path / "other.jsonl", [{"prompt": r["prompt"] + " ", "chosen": r["chosen"],
                                               "rejected": r["rejected"]} for r in rows])
    cfg, _ = _cfg(d, d / "pairs.jsonl", f"data.eval_path={other}")
    with pytest.raises(DataError, match=r"other\.jsonl: no ref_chosen_logps / ref_rejected_logps columns"):
        reference_cache.pairs_reference(cfg, data_lib.prepare(other, cfg.data, tok)[0], tok.fingerprint())
