"""End to end through the CLI: the shipped config runs, a SIGKILLed run resumes bit-exactly, bad config keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jsmaug.config import ConfigError
from jsmaug.run_config import load_run_config

ROOT = Path(__file__).resolve().parent.parent

# A small, fast run: short pairs, tiny model (the real 32000-piece tokenizer still needs the full vocab).
SMALL = ["model.hidden_size=32", "model.intermediate_size=32", "model.num_hidden_layers=2",
         "data.max_length=32", "data.max_prompt_length=16", "train.batch_size=4",
         "train.learning_rate=0.01", "train.warmup_steps=0", "train.schedule=constant", "log.every=1",
         "log.tensorboard=false", "export_hf=false", "checkpoint.every=2"]


def _run(args, check=True, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # Share compiled steps between the subprocess runs of this module.
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    r = subprocess.run([sys.executable, "-m", "jsmaug.train", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


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
                "logps/rejected", "dpop/penalty", "dpop/active_fraction", "moe/aux_loss", "moe/expert_load",
                "grad_norm", "learning_rate", "tokens_per_sec", "skipped_steps"):
        assert key in m[0], key
    assert len(m[0]["moe/expert_load"]) == 4
    assert "eval/rewards/accuracies" in m[-1]
    assert (wd / "metrics.png").stat().st_size > 1000 and list((wd / "tensorboard").iterdir())
    # The HF export holds the checkpoint's final policy.
    from jsmaug import checkpoint, hf

    config, params = hf.load(wd / "hf")
    _, ck = checkpoint.load_params(wd)
    import jax
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ck)
    assert (wd / "hf" / "tokenizer.model").stat().st_size == 493443


def test_sigkill_between_saves_resumes_bit_exact_and_learns(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    common = ["configs/tiny_dpop.yaml", *SMALL, f"data.train_path={data}", f"data.eval_path={data}",
              "train.steps=8", "log.eval_every=0"]
    full = tmp_path / "full"
    _run([*common, f"workdir={full}"])
    killed = tmp_path / "killed"
    r = _run([*common, f"workdir={killed}", "debug.kill_at_step=5"], check=False)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
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

    # The same run on 8 devices (expert 4 x tensor 2), killed, then resumed on another mesh
    # (fsdp 2 x expert 2 x tensor 2): Orbax reshards the checkpoint and the metrics follow the 1-device run.
    moved = tmp_path / "moved"
    r = _run([*common, f"workdir={moved}", "debug.kill_at_step=5", "mesh.data=1", "mesh.expert=4",
              "mesh.tensor=2"], check=False,
             devices=8)
    assert r.returncode == -9, r.stderr[-2000:]
    r = _run([*common, f"workdir={moved}", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
             devices=8)
    assert "'fsdp': 2, 'expert': 2, 'tensor': 2" in r.stdout and "at step 4" in r.stdout
    c = _metrics(moved)
    assert [x["step"] for x in c] == [x["step"] for x in a]
    for x, y in zip(strip(a), strip(c)):
        for k, v in x.items():
            np.testing.assert_allclose(np.asarray(y[k], float), np.asarray(v, float), rtol=2e-4, atol=2e-4,
                                       err_msg=f"step {x['step']} {k}")


def test_precomputed_reference_mode_matches_online(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    common = ["configs/tiny_dpop.yaml", *SMALL, f"data.train_path={data}", "data.eval_path=null",
              "train.steps=2", "checkpoint.every=100"]
    _run([*common, f"workdir={tmp_path / 'on'}"])
    r = _run([*common, f"workdir={tmp_path / 'pre'}", "reference.mode=precomputed"])
    assert "reference logps: computed for 8 pairs" in r.stdout
    a, b = _metrics(tmp_path / "on"), _metrics(tmp_path / "pre")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x["rewards/margins"], y["rewards/margins"], rtol=1e-5, atol=1e-6)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_run_config("configs/tiny_dpop.yaml", ["train.stepz=3"])
    with pytest.raises(ConfigError, match="loss.beta: expected a number"):
        load_run_config("configs/tiny_dpop.yaml", ["loss.beta=high"])
    with pytest.raises(ConfigError, match="loss.type: must be one of"):
        load_run_config("configs/tiny_dpop.yaml", ["loss.type=kto"])
    with pytest.raises(ConfigError, match="model.hidden_sizes"):
        load_run_config("configs/tiny_dpop.yaml", ["model.hidden_sizes=3"])
    r = _run(["configs/tiny_dpop.yaml", "train.batch_size=1.5"], check=False)
    assert r.returncode == 2 and "train.batch_size: expected an integer" in r.stderr
    for name in ("tiny_dpop", "tiny_dpo", "smaug_mixtral_8x7b"):
        cfg, _ = load_run_config(f"configs/{name}.yaml")
        assert cfg.loss.type in ("dpop", "dpo")
