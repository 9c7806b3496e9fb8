"""End to end through the CLI: the shipped config runs, a SIGKILLed run resumes bit-exactly, bad config keys."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from cli_env import cli_env

ROOT = Path(__file__).resolve().parent.parent

# A small, fast run: short pairs, tiny model (the real 32000-piece tokenizer still needs the full vocab).
SMALL = ["model.hidden_size=32", "model.intermediate_size=32", "model.num_hidden_layers=2",
         "data.max_length=32", "data.max_prompt_length=16", "train.batch_size=4",
         "train.learning_rate=0.01", "train.warmup_steps=0", "train.schedule=constant", "log.every=1",
         "log.tensorboard=false", "export_hf=false", "checkpoint.every=2"]


def _run(args, check=True, devices=1, max_file_bytes=None):
    # Under a file-size limit jax would write truncated entries into the shared compilation cache (it writes
    # in place), and every later run would warn reading them: such a run keeps away from the cache.
    env = cli_env(devices, **({"JSMAUG_COMPILATION_CACHE": "off"} if max_file_bytes else {}))
    def limit_file_size():  # a disk that fills up: writes past this size fail with EFBIG
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    r = subprocess.run([sys.executable, "-m", "jsmaug.train", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600, preexec_fn=limit_file_size if max_file_bytes else None)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _jsmaug_tracebacks(stderr: str) -> str:
    """The tracebacks that pass through jsmaug's code and the `error:` lines, out of a stderr that Orbax's and
    asyncio's threads fill with their own."""
    blocks = re.split(r"(?=Traceback \(most recent call last\):)", stderr)
    ours = [b[:3000] for b in blocks if "/jsmaug/" in b and b.startswith("Traceback")]
    errors = [ln for ln in stderr.splitlines() if "error: " in ln and "absl" not in ln]
    return "\n".join(ours + errors) or stderr[-3000:]


def _pairs(path: Path):
    rows = [{"prompt": f"Q{i}: {i} plus {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics(workdir):
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_shipped_config_runs_two_steps_and_exports(tmp_path):
    wd = tmp_path / "run"
    r = _run(["configs/tiny_dpop.yaml", "train.steps=2", f"workdir={wd}", "log.every=1", "log.eval_batches=1"])
    assert "step 2/2" in r.stdout and "exported the final policy" in r.stdout
    m = _metrics(wd)
    assert [x["step"] for x in m if "loss" in x] == [1, 2]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "dpop/penalty", "dpop/active_fraction", "moe/aux_loss", "moe/expert_load_min",
                "moe/expert_load_max", "moe/expert_load_entropy", "moe/experts_idle", "grad_norm", "learning_rate",
                "tokens_per_sec", "skipped_steps"):
        assert key in m[0], key
    # The per-expert vector goes to TensorBoard only; the line has its summary, consistent with itself.
    assert "moe/expert_load" not in m[0] and 0 < m[0]["moe/expert_load_min"] <= 1 <= m[0]["moe/expert_load_max"] < 4
    assert 0 < m[0]["moe/expert_load_entropy"] <= 1 and "experts " in r.stdout
    assert "eval/rewards/accuracies" in m[-1]
    assert (wd / "metrics.png").stat().st_size > 1000 and list((wd / "tensorboard").iterdir())
    # The HF export holds the checkpoint's final policy.
    from jsmaug import hf
    from jsmaug.train import checkpoint

    config, params = hf.load(wd / "hf")
    _, ck = checkpoint.load_params(wd)
    import jax
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ck)
    assert (wd / "hf" / "tokenizer.model").stat().st_size == 493443
    # The converter tool exports a workdir with the tokenizer it trained with, by default.
    r = subprocess.run([sys.executable, "tools/convert_jax_to_hf.py", "--ckpt_dir", str(wd), "--out_dir",
                        str(tmp_path / "tool")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        assert (tmp_path / "tool" / name).read_bytes() == (wd / "hf" / name).read_bytes(), name


def test_sigkill_between_saves_resumes_bit_exact_and_learns(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    # DPO: the run is compared with runs on other meshes, and DPOP's penalty at policy == reference switches on a
    # 1e-7 round-off that differs between meshes (docs/pods.md, "DPOP's kink"). Resume itself does not depend on the loss.
    common = ["configs/tiny_dpop.yaml", *SMALL, "loss.type=dpo", f"data.train_path={data}", f"data.eval_path={data}",
              "train.steps=8", "log.eval_every=0"]
    full = tmp_path / "full"
    _run([*common, f"workdir={full}"])
    killed = tmp_path / "killed"
    r = _run([*common, f"workdir={killed}", "debug.kill_at_step=5"], check=False)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    moved = tmp_path / "moved"  # the same killed run, to be resumed on 8 devices below
    shutil.copytree(killed, moved)
    # A save that died mid-write: Orbax's temporary folder for step 6, half written. It must be ignored.
    junk = killed / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "partial").write_bytes(b"\0" * 100)
    r = _run([*common, f"workdir={killed}"])
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    a, b = _metrics(full), _metrics(killed)
    strip = lambda recs: [{k: v for k, v in x.items() if k != "tokens_per_sec"} for x in recs]
    assert strip(a) == strip(b)  # bitwise equal metrics, eval included
    # ...and the run learned its pairs: eval on the training pairs beats the starting loss (ln 2) and chance.
    final = a[-1]
    assert final["eval/loss/preference"] < np.log(2) - 0.05 and final["eval/rewards/accuracies"] > 0.5
    train = [x for x in a if "loss" in x]
    assert train[-1]["loss/preference"] < train[0]["loss/preference"]

    # The killed 1-device run resumed on 8 devices (fsdp 2 x expert 2 x tensor 2, tokens moved by all_to_all):
    # Orbax reshards the checkpoint and the metrics follow the 1-device run. (A state moved between two meshes
    # and two dispatches in memory: tests/test_sharding.py.)
    r = _run([*common, f"workdir={moved}", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2",
              "model.moe_dispatch=all_to_all"], devices=8)
    assert "'fsdp': 2, 'expert': 2, 'tensor': 2" in r.stdout and "at step 4" in r.stdout
    assert "moe_dispatch=all_to_all -> all_to_all" in r.stdout
    c = _metrics(moved)
    assert [x["step"] for x in c] == [x["step"] for x in a]
    for x, y in zip(strip(a), strip(c)):
        for k, v in x.items():
            if k == "rewards/accuracies" and x["step"] == 1:
                continue  # policy == reference: every reward is 0 up to round-off, which decides reward_c > reward_r
            # Rewards are beta x differences of ~-100-nat float32 sums, taken after Adam steps that turn another
            # mesh's reduction order into small update differences: 4.5e-4 on rewards/chosen at step 3 on this
            # session's CPU (2026-12-06; the same at 7b966c5, whose CI machine stayed under 2e-4), i.e. 1.5e-3 nats
            # on the log-probs. The log-prob and reward keys get 1e-3; every other metric keeps 2e-4.
            atol = 1e-3 if k.startswith(("rewards/", "logps/")) else 2e-4
            np.testing.assert_allclose(np.asarray(y[k], float), np.asarray(v, float), rtol=2e-4, atol=atol,
                                       err_msg=f"step {x['step']} {k}")


def test_precomputed_reference_mode_matches_online(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    # DPO: the precomputed reference logps come from another program than the online ones, so with DPOP a pair
    # at policy == reference could take the penalty in one run and not in the other.
    common = ["configs/tiny_dpop.yaml", *SMALL, "loss.type=dpo", f"data.train_path={data}", "data.eval_path=null",
              "train.steps=2", "checkpoint.every=100"]
    _run([*common, f"workdir={tmp_path / 'on'}"])
    r = _run([*common, f"workdir={tmp_path / 'pre'}", "reference.mode=precomputed"])
    assert "reference logps: computed for 8 pairs" in r.stdout
    a, b = _metrics(tmp_path / "on"), _metrics(tmp_path / "pre")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x["rewards/margins"], y["rewards/margins"], rtol=1e-5, atol=1e-6)


def test_faults_are_named_and_nothing_is_lost(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    common = ["configs/tiny_dpop.yaml", *SMALL, f"data.train_path={data}", "data.eval_path=null",
              "checkpoint.async_save=false"]
    wd = tmp_path / "wd"
    _run([*common, "train.steps=4", f"workdir={wd}"])  # checkpoints 2 and 4
    config_json = (wd / "config.json").read_bytes()

    # Another model shape: refused before anything is touched, naming the keys.
    r = _run([*common, "train.steps=6", f"workdir={wd}", "model.hidden_size=48", "model.intermediate_size=40"],
             check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "model.hidden_size: stored 32, requested 48; model.intermediate_size: stored 32, requested 40" in r.stderr
    assert (wd / "config.json").read_bytes() == config_json

    # A torn last line in metrics.jsonl (a kill mid-write) and a damaged newest checkpoint (a data file gone).
    with open(wd / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.')
    data_files = [p for p in (wd / "checkpoints" / "4").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert data_files
    for p in data_files:
        p.unlink()
    r = _run([*common, "train.steps=6", f"workdir={wd}"])
    assert "dropped a torn last line" in r.stdout
    assert "checkpoints/4 is damaged" in r.stdout and "at step 2" in r.stdout, r.stdout[-3000:]
    assert [x["step"] for x in _metrics(wd)] == [1, 2, 3, 4, 5, 6]
    assert len(list((wd / "damaged_checkpoints").iterdir())) == 1

    # A disk that fills up during a save: one error naming the folder and the cause, no temporary folder left.
    full = tmp_path / "full"
    r = _run([*common, "train.steps=4", f"workdir={full}"], check=False, max_file_bytes=200_000)
    # Twice on a loaded machine (2026-12-07, once in CI) this exited with 1 and stderr's head and tail held only
    # Orbax's threads: the likeliest cause, an OSError while removing the temporary folder that a writer thread
    # was still filling, is now retried (test_checkpoint). If it happens again, the traceback through jsmaug shows.
    assert r.returncode == 2, _jsmaug_tracebacks(r.stderr)
    # (Orbax's threads print to the same stderr, so the line is searched for, not assumed to start a line.)
    assert r.stderr.count("error: ") == 1, r.stderr[-3000:]
    assert f"error: {full}/checkpoints: saving the checkpoint of step 2 failed: File too large" in r.stderr
    assert [p.name for p in (full / "checkpoints").iterdir()] == []

    # An unwritable workdir and a typo in init_from: named, and nothing created.
    (tmp_path / "a_file").write_text("x")
    r = _run([*common, f"workdir={tmp_path / 'a_file' / 'wd'}"], check=False)
    assert r.returncode == 2 and f"workdir: cannot write {tmp_path / 'a_file' / 'wd'}" in r.stderr
    r = _run([*common, f"workdir={tmp_path / 'w2'}", f"init_from={tmp_path / 'typo'}"], check=False)
    assert r.returncode == 2 and f"init_from: {tmp_path / 'typo'}: no such file or folder" in r.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "w2").exists()


def test_lora_cli_trains_resumes_exactly_and_exports_merged_weights(tmp_path):
    import jax
    import torch
    from transformers import MixtralForCausalLM

    from jsmaug import hf

    from jsmaug.models import decoder as model

    from jsmaug import eval as eval_lib
    from jsmaug.train import checkpoint

    data = _pairs(tmp_path / "pairs.jsonl")
    common = ["configs/tiny_dpop.yaml", *SMALL, f"data.train_path={data}", "data.eval_path=null", "train.steps=6",
              "lora.rank=8", "lora.alpha=16", "lora.targets=[q_proj, v_proj, w1, w2]"]
    full = tmp_path / "full"
    r = _run([*common, f"workdir={full}", "export_hf=true"])
    assert "LoRA rank 8" in r.stdout and "frozen base in float32" in r.stdout and "(also the reference)" in r.stdout
    killed = tmp_path / "killed"
    assert _run([*common, f"workdir={killed}", "debug.kill_at_step=3"], check=False).returncode == -9
    r = _run([*common, f"workdir={killed}"])
    assert "at step 2" in r.stdout
    strip = lambda recs: [{k: v for k, v in x.items() if k != "tokens_per_sec"} for x in recs]
    a = strip(_metrics(full))
    assert a == strip(_metrics(killed))  # bit-exact resume
    assert a[0]["rewards/margins"] == 0.0 and a[-1]["rewards/margins"] > 0  # starts AT the reference, learns
    # The merged export: transformers' logits equal jsmaug's, and the workdir scores as its export does.
    config, merged = checkpoint.load_params(full)
    assert config.lora_rank == 0
    config_hf, from_hf = hf.load(full / "hf")
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(merged), jax.tree.leaves(from_hf)))
    ids = np.array([[1, 415, 2936, 9060, 285, 1142, 28723, 13]], np.int32)
    ours = np.asarray(model.forward(config_hf, from_hf, ids)[0])
    with torch.no_grad():
        theirs = MixtralForCausalLM.from_pretrained(full / "hf").eval()(torch.as_tensor(ids, dtype=torch.long)).logits
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)
    assert eval_lib.load_model(full)[0].lora_rank == 0


def test_packed_run_killed_then_preempted_resumes_exactly(tmp_path):
    """Packing, a precomputed reference and eval. SIGKILL at step 3 (step 2 is saved), a restart that gets SIGTERM
    (a scheduler's preemption notice) after step 3: it saves step 3, says so and exits with 143; a second restart
    finishes the run bitwise equal to an uninterrupted one."""
    data = _pairs(tmp_path / "pairs.jsonl")
    common = ["configs/tiny_dpop.yaml", *SMALL, "loss.type=dpo", f"data.train_path={data}", f"data.eval_path={data}",
              "train.steps=4", "reference.mode=precomputed", "data.packing=true"]
    r = _run([*common, f"workdir={tmp_path / 'full'}"])
    line = next(x for x in r.stdout.splitlines() if x.startswith("padding: "))
    padded, packed = (float(x.split("%")[0].split()[-1]) for x in line.split(", ")[:2])
    assert "packing on, steps of near-equal tokens" in line and packed < padded, line  # rows of 32 tokens hold two or three short sequences
    r = _run([*common, f"workdir={tmp_path / 'term'}", "debug.kill_at_step=3"], check=False)
    assert r.returncode == -9 and "at step" not in r.stdout, r.stderr[-2000:]
    r = _run([*common, f"workdir={tmp_path / 'term'}", "debug.sigterm_at_step=3"], check=False)
    assert r.returncode == 143 and "at step 2" in r.stdout, r.stderr[-2000:]
    assert "preempted at step 3: checkpoint saved" in r.stdout
    assert sorted(p.name for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    r = _run([*common, f"workdir={tmp_path / 'term'}"])
    assert "at step 3" in r.stdout and "reference logps: cached" in r.stdout
    strip = lambda recs: [{k: v for k, v in x.items() if k != "tokens_per_sec"} for x in recs]  # noqa: E731
    full = _metrics(tmp_path / "full")
    assert strip(full) == strip(_metrics(tmp_path / "term"))
    assert all(0 <= x["padding_fraction"] < 1 for x in full if "padding_fraction" in x)
