"""`jsmaug pairs sample`: verifiers, pair rules, reproducible sampling, the kept log-probs against a NumPy
log-softmax of the plain forward, resume after an interruption, and the CLI. One tiny random model."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
from cli_env import ROOT, cli_env

from jsmaug.data import batches as data_lib
from jsmaug.errors import DataError
from jsmaug.models import config as config_lib, decoder as model
from jsmaug.pairs import cli as pairs_cli, sample, verify
from jsmaug.pairs.stats import levenshtein_reference
from jsmaug.parallel.sharding import MeshConfig
from jsmaug.train import checkpoint

K, NEW = 4, 6
# top_p 1: a nucleus sort over the 32,000-token vocabulary per step is most of a tiny model's sampling time
OPTS = sample.Options(k=K, max_new_tokens=NEW, temperature=1.0, top_p=1.0, batch_size=2, seed=3)
TEMPLATE = "configs/chat_templates/mixtral_instruct.jinja"


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.tiny(vocab_size=32000, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=3)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    return cfg, params, data_lib.Tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ps")
    (d / "check.py").write_text(textwrap.dedent("""\
        def even(problem, completion):
            return len(completion) % 2 == 0
        def boom(problem, completion):
            raise KeyError("no such thing")
        def text(problem, completion):
            return "yes"
        def nan(problem, completion):
            return float("nan")
        """))
    with open(d / "problems.jsonl", "w") as fh:
        for i in range(5):
            fh.write(json.dumps({"prompt": f"Q: {i}+{i}=", "answer": f"#### {2 * i}"}) + "\n")
    return d


def _verifier(files, name="even"):
    return verify.Verifier(f"{files / 'check.py'}:{name}")


def _run(tiny, files, out, opts=OPTS, template=None, **kw):
    cfg, params, tok = tiny
    v = _verifier(files)
    problems = verify.read_problems(files / "problems.jsonl", v.kind)
    return sample.run(cfg, params, tok, problems, v, out, opts, template=template, progress=False, **kw)


@pytest.fixture(scope="module")
def reference_run(tiny, files):
    out = files / "ref.jsonl"
    summary = _run(tiny, files, out)
    return summary, out.read_bytes()


# ------------------------------------------------------------------------------------------------ verifiers

GSM = {"question": "q", "answer": "She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 1,200"}


@pytest.mark.parametrize("completion, flexible, strict", [
    ("3 * 400 = 1200 dollars.\n#### 1200", 1.0, 1.0),
    ("So she pays $1,200.", 1.0, 0.0),  # the last number, '$' and ',' removed; no '####' for strict
    ("#### 1200 and then 7 more", 0.0, 1.0),  # flexible takes the last number (7), strict the first '####'
    ("She pays 1100.", 0.0, 0.0),
    ("I cannot tell.", 0.0, 0.0),  # unparsable: no number at all
])
def test_gsm8k_verifiers(completion, flexible, strict):
    problem = verify.Problem(0, "p.jsonl:line 1", GSM, "Question: q\nAnswer:")
    assert verify.Verifier("gsm8k")(problem, completion) == flexible
    assert verify.Verifier("gsm8k_strict")(problem, completion) == strict


MC = {"question": "Question: Which planet is closest to the Sun?\nAnswer:", "choices": ["Venus", "Mercury", "Mars"],
      "gold": 1}


@pytest.mark.parametrize("completion, score", [
    ("B", 1.0), (" (B) Mercury", 1.0), ("B. because it is", 1.0), ("The answer is B.", 1.0),
    ("mercury!", 1.0), ("Mercury is closest.", 1.0),  # the choice's text, case and punctuation ignored
    ("A", 0.0), ("Venus", 0.0), ("D", 0.0),  # D is no choice: unparsable
    ("I think it is hot", 0.0), ("", 0.0),
])
def test_mc_verifier(completion, score):
    problem = verify.Problem(0, "p.jsonl:line 1", MC, "")
    assert verify.Verifier("mc")(problem, completion) == score


def test_prompts_made_from_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GSM) + "\n" + json.dumps(MC) + "\n")
    gsm = verify.read_problems(path, "gsm8k", max_rows=1)
    assert gsm[0].prompt == "Question: q\nAnswer:"
    path.write_text(json.dumps(MC) + "\n")
    assert verify.read_problems(path, "mc")[0].prompt == \
        "Question: Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Mars\nAnswer:"
    path.write_text(json.dumps(GSM) + "\n" + json.dumps({"question": "x", "answer": "12"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:line 2: .*'#### N'"):
        verify.read_problems(path, "gsm8k")


def test_user_verifier_errors_name_the_problem(files):
    problem = verify.Problem(3, "problems.jsonl:line 4", {"prompt": "x"}, "x")
    assert _verifier(files)(problem, "ab") == 1.0 and _verifier(files)(problem, "abc") == 0.0
    with pytest.raises(DataError, match=r"problems.jsonl:line 4: verifier .*boom raised KeyError"):
        _verifier(files, "boom")(problem, "ab")
    with pytest.raises(DataError, match=r"problems.jsonl:line 4: verifier .*text returned 'yes' \(str\)"):
        _verifier(files, "text")(problem, "ab")
    with pytest.raises(DataError, match=r"returned nan"):
        _verifier(files, "nan")(problem, "ab")
    with pytest.raises(DataError, match="has no function 'missing'"):
        _verifier(files, "missing")
    with pytest.raises(DataError, match="cannot import no_such_module_x"):
        verify.Verifier("no_such_module_x:f")


# ------------------------------------------------------------------------------------------------ pair rules

def _samples(spec):
    """(text, correct, logp, completion ids) -> Samples."""
    return [sample.Sample(t, float(c), c, [1], ids, lp) for t, c, lp, ids in spec]


def test_pair_rules_on_controlled_samples():
    s = _samples([
        ("good a", True, -5.0, [1, 2, 3, 4]),
        ("bad far", False, -1.0, [9, 9, 9, 9, 9]),  # the most likely wrong sample, far from every correct one
        ("bad near", False, -4.0, [1, 2, 3, 5]),  # one edit from "good a"
        ("good b", True, -2.0, [7, 7, 7]),
        ("bad mid", False, -3.0, [7, 7, 8, 7]),  # one insertion from "good b"
        ("bad far", False, -1.0, [9, 9, 9, 9, 9]),  # a duplicate text: counted once
        ("   ", False, -0.5, [2]),  # blank: never paired
    ])
    assert sample.choose_pairs(s, "likely", 10) == [(3, 1), (0, 4), (3, 2)]
    assert sample.choose_pairs(s, "likely", 1) == [(3, 1)]
    # edit: distances to the nearest correct sample, checked against the plain dynamic programme
    for w, c in ((2, 0), (4, 3)):
        assert levenshtein_reference(s[w].completion_ids, s[c].completion_ids) == 1
    assert levenshtein_reference(s[1].completion_ids, s[3].completion_ids) == 5
    assert levenshtein_reference(s[1].completion_ids, s[0].completion_ids) == 5
    # distance 1 twice: the more likely wrong sample first; "bad far" is 5 from both: the more likely chosen
    assert sample.choose_pairs(s, "edit", 10) == [(3, 4), (0, 2), (3, 1)]
    assert sample.choose_pairs(s, "edit", 2) == [(3, 4), (0, 2)]
    assert sample.choose_pairs(s[:1] + s[3:4], "likely", 2) == "no wrong sample"
    assert sample.choose_pairs(s[1:3], "edit", 2) == "no correct sample"


def test_skipped_problems_are_counted(tiny, files, monkeypatch, tmp_path):
    texts = {0: ["ab", "abc", "abcd", "ab"], 1: ["a", "abc", "abcde", "x"], 2: ["ab", "cd", "ef", "gh"],
             3: ["ab", "abc", "abcd", "abcde"], 4: ["a", "b", "c", "de"]}
    monkeypatch.setattr(sample, "draw", lambda cfg, params, tok, prompts, indices, opts, until, mesh:
                        [texts[int(tok.decode(ids)[3])] for ids in prompts])
    summary = _run(tiny, files, tmp_path / "o.jsonl", sample.Options(k=K, max_new_tokens=NEW, pairs_per_problem=3))
    assert (summary.problems, summary.samples, summary.correct) == (5, 20, 3 + 0 + 4 + 2 + 1)
    assert (summary.no_correct, summary.no_wrong) == (1, 1)
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    # problem 0: one wrong sample ("abc"); 1: none correct; 2: none wrong; 3: two wrong; 4: three wrong
    assert [r["problem"] for r in rows] == [0, 3, 3, 4, 4, 4]
    assert all(r["chosen_score"] == 1.0 and r["rejected_score"] == 0.0 for r in rows)


# ------------------------------------------------------------------------------------------------ sampling

def test_reproducible_whatever_the_batch(tiny, files, reference_run, tmp_path, monkeypatch):
    """Rows per call 2 (the reference: a problem's 4 samples in two calls), 5 (one problem a call, 4 rows) and
    20 (all five problems' samples in one call): the same file, byte for byte."""
    summary, want = reference_run
    assert summary.pairs > 0 and summary.samples == 5 * K
    real, calls = sample.gen.generate, []
    monkeypatch.setattr(sample.gen, "generate", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    _run(tiny, files, tmp_path / "b20.jsonl", dataclasses.replace(OPTS, batch_size=20))
    assert calls == [20]
    _run(tiny, files, tmp_path / "b5.jsonl", dataclasses.replace(OPTS, batch_size=5))
    assert calls == [20] + [4] * 5
    assert (tmp_path / "b20.jsonl").read_bytes() == want == (tmp_path / "b5.jsonl").read_bytes()
    _run(tiny, files, tmp_path / "s.jsonl", dataclasses.replace(OPTS, seed=4))
    assert (tmp_path / "s.jsonl").read_bytes() != want


def test_the_same_pairs_on_a_mesh(tiny, files, reference_run, tmp_path):
    """data=2, fsdp=2, tensor=2 (8 fake CPU devices), 8 rows a call: the same samples and pairs, and log-probs
    (computed with the params split over the mesh) equal to float32 rounding."""
    out = tmp_path / "mesh.jsonl"
    _run(tiny, files, out, dataclasses.replace(OPTS, batch_size=8), mesh_config=MeshConfig(data=2, fsdp=2, tensor=2))
    want = [json.loads(x) for x in (files / "ref.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    logps = lambda rows: np.array([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows])  # noqa: E731
    np.testing.assert_allclose(logps(got), logps(want), rtol=1e-5, atol=1e-4)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)


_forward = jax.jit(model.forward, static_argnums=0)


def _numpy_logp(cfg, params, ctx, cont):
    """log p(cont | ctx) from the plain forward's logits with a float64 NumPy log-softmax (one 64-token row;
    causal attention makes the right padding invisible)."""
    ids = np.zeros((1, 64), np.int32)
    ids[0, :len(ctx) + len(cont)] = list(ctx) + list(cont)
    logits = np.asarray(_forward(cfg, params, ids)[0][0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_kept_logps_are_the_trainers_pairs_under_the_sampling_model(tiny, files, reference_run, tmp_path,
                                                                    template):
    """The trainer's data path reads the file; its (prompt, chosen, rejected) ids scored by a NumPy log-softmax
    of the sampling model's forward equal the kept reference log-probs."""
    cfg, params, tok = tiny
    if template is None:
        out = files / "ref.jsonl"
    else:
        from jsmaug.data import formats
        out = tmp_path / "chat.jsonl"
        _run(tiny, files, out, template=formats.load_chat_template(TEMPLATE, tok))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all(isinstance(r["chosen"], list) == (template is not None) for r in rows)
    examples, report = data_lib.prepare(out, data_lib.DataConfig(max_length=64, max_prompt_length=48,
                                                                  chat_template=template), tok)
    assert report.kept == len(rows)
    for row, ex in zip(rows, examples):
        for side in ("chosen", "rejected"):
            want = _numpy_logp(cfg, params, ex["prompt"], ex[side])
            assert abs(row[f"ref_{side}_logps"] - want) < 2e-3, (side, row[f"ref_{side}_logps"], want)


def test_a_token_merging_across_the_prompt_end_is_scored_on_the_pairs_ids(tiny, files, monkeypatch, tmp_path):
    """'Q: 1+1=' + '=1' tokenises '==' as one token, so the trainer's pair starts its completions one token
    earlier than the rejected sample alone would: the pair's log-probs are computed again on the pair's ids."""
    cfg, params, tok = tiny
    monkeypatch.setattr(sample, "draw", lambda cfg, params, tok, prompts, *a: [["=1", "abc", "=1", "x y"]] * len(prompts))
    real, pair_calls = sample.completion_logps, []

    def counting(config, params, items, batch_size, **kw):
        pair_calls.append(batch_size == 2)
        return real(config, params, items, batch_size=batch_size, **kw)

    monkeypatch.setattr(sample, "completion_logps", counting)
    out = tmp_path / "merge.jsonl"
    _run(tiny, files, out, sample.Options(k=K, max_new_tokens=NEW, pairs_per_problem=2))
    assert sum(pair_calls) == 10  # every pair scored again on its own ids
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    examples, _ = data_lib.prepare(out, data_lib.DataConfig(max_length=64, max_prompt_length=48), tok)
    assert len(rows) == 10 and tok.decode(examples[0]["chosen"][:1]) == "=="
    for row, ex in zip(rows, examples):
        for side in ("chosen", "rejected"):
            assert abs(row[f"ref_{side}_logps"] - _numpy_logp(cfg, params, ex["prompt"], ex[side])) < 2e-3


# ------------------------------------------------------------------------------------------------ resume, CLI

def _stop_at_third_step(monkeypatch) -> list:
    """`sample_step` raises KeyboardInterrupt on its third call (two problems done, one a step); returns the calls."""
    real, calls = sample.sample_step, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "sample_step", dies_on_the_third)
    return calls


def test_resume_after_interruption_gives_the_same_file(tiny, files, reference_run, monkeypatch, tmp_path):
    _, want = reference_run
    out = tmp_path / "r.jsonl"
    real = sample.sample_step
    calls = _stop_at_third_step(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, files, out)
    partial = sample.partial_path(out)
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 2  # settings + one step of 2
    with open(partial, "a") as fh:
        fh.write('{"problem": 2, "samples": 4, "cor')  # a torn last line
    monkeypatch.setattr(sample, "sample_step", real)
    with pytest.raises(DataError, match=r"r.jsonl.partial: a resume file written with other settings .*options"):
        _run(tiny, files, out, dataclasses.replace(OPTS, seed=9))
    calls.clear()
    monkeypatch.setattr(sample, "sample_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _run(tiny, files, out)
    assert len(calls) == 3  # only the three unfinished problems were sampled (one a step: k 4, 2 rows a call)
    assert out.read_bytes() == want and not partial.exists()


def test_cli(tiny, files, reference_run, tmp_path, capsys):
    cfg, params, _ = tiny
    checkpoint.save_params(tmp_path / "model", cfg, params)
    args = ["sample", "--model", str(tmp_path / "model"), "--input", str(files / "problems.jsonl"), "--k", str(K),
            "--max_new_tokens", str(NEW), "--temperature", "1.0", "--top_p", "1", "--seed", "3", "--batch_size", "2",
            "--verifier", f"{files / 'check.py'}:even", "--out", str(tmp_path / "cli.jsonl"), "--quiet"]
    assert pairs_cli.main(args) == 0
    assert "5 problems, 20 samples" in capsys.readouterr().out
    assert (tmp_path / "cli.jsonl").read_bytes() == (files / "ref.jsonl").read_bytes()
    bad = args[:args.index("--verifier") + 1] + [f"{files / 'check.py'}:boom"] + args[args.index("--verifier") + 2:]
    assert pairs_cli.main(bad) == 2
    assert "problems.jsonl:line 1: verifier" in capsys.readouterr().err
    assert pairs_cli.main(args[:-1] + ["--k", "1"]) == 2
    assert "--k must be at least 2" in capsys.readouterr().err
    assert pairs_cli.main(args + ["--mesh", "data=3"]) == 2
    assert "--mesh 'data=3': mesh: sizes" in capsys.readouterr().err
    assert pairs_cli.main(args + ["--mesh", "data:2"]) == 2
    assert "expected axis=size items" in capsys.readouterr().err


def test_two_processes_resume_a_one_process_run_and_write_the_same_file(tiny, files, reference_run, monkeypatch,
                                                                       tmp_path):
    """`jsmaug launch -- pairs sample`: two processes of 2 CPU devices, one mesh (data=2 across the processes,
    tensor=2 within each), resume a one-process run stopped after two problems and write the one-process file
    byte for byte: the rows placed across processes, every row's tokens read by both, the verifier run on process
    0 and its scores sent, the resume file read on process 0 only. A resume file process 0 refuses stops both
    processes with one error each. About 40 s (fresh processes compile)."""
    cfg, params, _ = tiny
    checkpoint.save_params(tmp_path / "model", cfg, params)
    out = tmp_path / "two.jsonl"
    args = ["sample", "--model", str(tmp_path / "model"), "--input", str(files / "problems.jsonl"), "--k", str(K),
            "--max_new_tokens", str(NEW), "--temperature", "1.0", "--top_p", "1", "--seed", "3", "--batch_size", "4",
            "--verifier", f"{files / 'check.py'}:even", "--out", str(out)]

    def launch():
        r = subprocess.run([sys.executable, "-m", "jsmaug.cli.main", "launch", "--processes", "2",
                            "--devices_per_process", "2", "--grace", "20", "--", "pairs", *args, "--mesh",
                            "data=2,tensor=2"], cwd=ROOT, env=cli_env(2), capture_output=True, text=True, timeout=400)
        return r.returncode, r.stdout + r.stderr

    calls = _stop_at_third_step(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, files, out)  # a resume file with other settings (no model or input digests)
    code, log = launch()
    assert code == 2, log[-4000:]
    assert "[p0] error: " in log and "a resume file written with other settings" in log
    assert "[p1] error: " in log and "two.jsonl.partial: process 0 could not resume from it" in log
    sample.partial_path(out).unlink()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        pairs_cli.main(args + ["--quiet"])  # the same command in one process, stopped after two problems
    assert len(sample.partial_path(out).read_text().splitlines()) == 1 + 2  # settings + two problems
    code, log = launch()
    assert code == 0, log[-4000:]
    assert "[p0] pairs sample: resuming, 2 problems done" in log and "[p1] pairs sample:" not in log
    assert "[p0] 5 problems, 20 samples" in log
    assert out.read_bytes() == reference_run[1] and not sample.partial_path(out).exists()
