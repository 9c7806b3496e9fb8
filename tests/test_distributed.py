"""Two JAX processes of 4 CPU devices (gloo collectives, `tools/launch_local.py`, a free port each time) behave
as one process with the same 8 devices: losses, eval, the precomputed reference and the HF export; process 0
alone writes; SIGTERM saves one step on every process and the restart resumes it; a peer that never comes or
dies is one named error.

DPO throughout: two programs are compared, and DPOP's penalty switches at policy == reference on a round-off."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_env import cli_env

ROOT = Path(__file__).resolve().parent.parent

BASE = ["configs/tiny_dpop.yaml", "model.hidden_size=32", "model.intermediate_size=32", "model.num_hidden_layers=2",
        "data.max_length=32", "data.max_prompt_length=16", "train.batch_size=8", "train.learning_rate=0.01",
        "train.warmup_steps=0", "train.schedule=constant", "log.every=1", "loss.type=dpo", "checkpoint.every=100",
        "distributed.initialization_timeout=120"]
# fsdp (the outer mesh axis) spans the two processes; experts are split within each; the reference precomputed.
POD = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "model.moe_dispatch=all_to_all", "reference.mode=precomputed",
       "train.batch_size=16", "train.micro_batches=2", "train.steps=3"]




def _two(args, timeout=500):
    """Two processes through the launcher; returns (exit code, output)."""
    r = subprocess.run([sys.executable, "tools/launch_local.py", "--processes", "2", "--devices_per_process", "4",
                        "--grace", "20", "--", *args], cwd=ROOT, env=cli_env(4), capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _one(args, timeout=500):
    r = subprocess.run([sys.executable, "-m", "jsmaug.train", *args], cwd=ROOT, env=cli_env(8), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _pairs(path):
    rows = [{"prompt": f"Q{i}: {i} plus {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics(wd):
    return [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(a, b, rtol=1e-5, atol=2e-5):
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if k != "tokens_per_sec":
                np.testing.assert_allclose(np.asarray(y[k], float), np.asarray(x[k], float), rtol=rtol, atol=atol,
                                           err_msg=f"step {x['step']} {k}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with 8 devices, the same mesh."""
    tmp = tmp_path_factory.mktemp("one")
    data = _pairs(tmp / "pairs.jsonl")
    wd = tmp / "run"
    _one([*BASE, *POD, f"data.train_path={data}", f"data.eval_path={data}", f"workdir={wd}"])
    return data, wd


def test_two_processes_equal_one_process_write_once_and_resume_after_sigterm(one_process, tmp_path):
    data, one = one_process
    wd = tmp_path / "run"
    args = [*BASE, *POD, f"data.train_path={data}", f"data.eval_path={data}", f"workdir={wd}"]
    # SIGTERM to every process after step 1 (a scheduler taking the hosts): both stop at the same step, save it,
    # and exit with 143; the same command on both resumes there.
    code, out = _two([*args, "debug.sigterm_at_step=1"])
    assert code == 143, out[-4000:]
    assert "2 processes, 4 devices each" in out and "reference logps: computed for 16 pairs" in out
    stopped = [int(line.split("preempted at step ")[1].split(":")[0]) for line in out.splitlines()
               if "preempted at step" in line]
    assert len(stopped) == 1 and 1 <= stopped[0] <= 3, out[-3000:]  # printed once (process 0), one step
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [stopped[0]]
    code, out = _two(args)
    assert code == 0 and f"at step {stopped[0]}" in out and "reference logps: cached" in out, out[-4000:]
    # The same numbers as one 8-device process: train steps and the final eval, each logged once.
    _assert_same_metrics(_metrics(one), _metrics(wd))
    assert [x["step"] for x in _metrics(wd)] == [1, 2, 3, 3]
    # One writer: every progress line once, from process 0; one TensorBoard file per start; the same reference
    # cache file name (its fingerprint does not depend on the process count), holding every pair.
    assert "[p1] step" not in out and "[p1] eval" not in out
    assert len(list((wd / "tensorboard").iterdir())) == 2
    (cache,) = (wd / "ref_cache").iterdir()
    assert [p.name for p in (one / "ref_cache").iterdir()] == [cache.name]
    np.testing.assert_allclose(np.load(cache), np.load(one / "ref_cache" / cache.name), rtol=1e-5, atol=1e-5)
    assert np.load(cache).shape == (16, 2)
    assert sorted(p.name for p in wd.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not [p for p in wd.rglob("*") if ".tmp" in p.name]
    # The HF export: gathered one tensor at a time, written once, the same weights. Adam amplifies round-off on
    # the few lm_head rows whose gradients are ~0 (tokens nobody predicts), hence a looser bound for 10 elements.
    from safetensors.numpy import load_file

    a, b = load_file(one / "hf" / "model.safetensors"), load_file(wd / "hf" / "model.safetensors")
    assert sorted(a) == sorted(b)
    diffs = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    assert diffs.max() < 1e-4 and (diffs > 1e-5).sum() <= 10, (diffs.max(), (diffs > 1e-5).sum())


def test_lora_on_fsdp_across_processes_with_a_batch_both_processes_hold(tmp_path):
    # Weights split over fsdp = all 8 devices (both processes); the batch replicated on every device, so both
    # processes must feed the same rows.
    data = _pairs(tmp_path / "pairs.jsonl")
    args = [*BASE, "mesh.data=1", "mesh.fsdp=8", "mesh.rules=[[batch, null]]", "lora.rank=4", "train.steps=2",
            f"data.train_path={data}", "data.eval_path=null"]
    _one([*args, f"workdir={tmp_path / 'one'}"])
    code, out = _two([*args, f"workdir={tmp_path / 'two'}"])
    assert code == 0, out[-4000:]
    _assert_same_metrics(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"))
    from safetensors.numpy import load_file

    a, b = (load_file(tmp_path / w / "hf" / "model.safetensors") for w in ("one", "two"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)


def test_a_peer_that_never_comes_is_one_error_and_nothing_is_written(tmp_path):
    wd = tmp_path / "run"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "jsmaug.train", *BASE, f"workdir={wd}", "distributed.num_processes=2",
                        "distributed.process_id=0", "distributed.coordinator_address=127.0.0.1:1",
                        "distributed.initialization_timeout=5"], cwd=ROOT, env=cli_env(4), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60
    assert ("error: distributed: process 0 could not join the run within distributed.initialization_timeout=5s "
            "(coordinator 127.0.0.1:1, 2 processes expected)") in r.stderr
    assert "Check failure" not in r.stderr and not wd.exists()


def test_a_process_that_dies_stops_the_other_with_one_error(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    wd = tmp_path / "run"
    args = [*BASE, "mesh.data=2", "mesh.fsdp=4", "train.steps=200", "checkpoint.every=1", "export_hf=false",
            f"data.train_path={data}", "data.eval_path=null", f"workdir={wd}", "distributed.heartbeat_timeout=10"]
    launcher = subprocess.Popen([sys.executable, "tools/launch_local.py", "--processes", "2", "--devices_per_process",
                                 "4", "--grace", "60", "--", *args], cwd=ROOT, env=cli_env(4), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    out = []
    for line in launcher.stdout:
        out.append(line)
        if "step 2/200" in line:
            break
    victim = subprocess.run(["pgrep", "-f", f"workdir={wd} .*distributed.process_id=1"], capture_output=True,
                            text=True).stdout.split()
    assert len(victim) == 1, victim
    os.kill(int(victim[0]), signal.SIGKILL)
    t0 = time.time()
    out += launcher.stdout.readlines()
    launcher.wait(timeout=120)
    text = "".join(out)
    assert time.time() - t0 < 45, text[-3000:]
    # Two bounded ways to stop, both naming the dead process (docs/pods.md): gloo reports the closed connection at
    # p0's next collective (one error line, exit 2), or, when p0 is waiting in a checkpoint barrier instead, JAX's
    # coordination service stops it once distributed.heartbeat_timeout has passed.
    clean = "[p0] error: process 0 of 2: a collective with the other processes failed" in text
    heartbeat = "The following tasks are unhealthy (stopped sending heartbeats):\n[p0] 1" in text
    assert clean or heartbeat, text[-3000:]
    assert not clean or "process 0 exited with code 2" in text or "exit codes [2, -9]" in text, text[-2000:]
    # The newest complete checkpoint is intact: its metadata reads (what a restart resumes from).
    from jsmaug.train import checkpoint

    found = checkpoint.stored_model_config(wd / "checkpoints")
    assert found is not None and found[0] >= 1


def test_from_writer_in_one_process_keeps_dtype_and_shape_and_raises_as_it_is():
    """The one-process path of `distributed.from_writer` (the several-process path runs in test_pairs_sample.py's
    two-process test): float64 values arrive unrounded, in the shape asked for; the computation's error is its own."""
    from jsmaug.parallel import distributed

    got = distributed.from_writer(lambda: [0.1, 1 / 3], np.zeros(2))
    assert got.dtype == np.float64 and got.tolist() == [0.1, 1 / 3]
    with pytest.raises(KeyError, match="boom"):
        distributed.from_writer(lambda: {}["boom"], np.zeros(1))
