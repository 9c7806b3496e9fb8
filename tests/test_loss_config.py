"""The `loss` section: every combination checked before the run, errors that name both sides, weighted terms
logged, a loss of your own trained through the CLI, and TR-DPO's moving reference resumed exactly."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cli_env import cli_env

import jax.numpy as jnp

from jsmaug import losses

from jsmaug.losses import config as loss_config
from jsmaug.models.config import ConfigError
from jsmaug.train.config import LossSection, load_run_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("overrides, message", [
    (["loss.type=kto"], r"loss.type: unknown loss type 'kto'"),
    (["loss.type=bco_pair", "loss.f_divergence=js_divergence"],
     r"loss.f_divergence=js_divergence is not defined for loss.type=bco_pair; TRL allows it with"),
    (["loss.type=[sigmoid, dpop]", "loss.f_divergence=forward_kl"], r"not defined for loss.type=dpop"),
    (["loss.f_divergence=kl"], r"loss.f_divergence: must be one of"),
    (["loss.type=exo_pair"], r"exo_pair needs 0 < label_smoothing < 1"),
    (["loss.type=robust", "loss.label_smoothing=0.5"], r"robust needs 0 <= label_smoothing < 0.5"),
    (["loss.type=[sigmoid, aot]", "loss.wpo=true"], r"loss.wpo: not defined with aot"),
    (["loss.type=simpo", "loss.ld_alpha=0.5"], r"loss.ld_alpha: LD-DPO is defined for the DPOTrainer losses; simpo"),
    (["loss.ld_alpha=1.5"], r"loss.ld_alpha: must be in \[0, 1\]"),
    (["loss.type=[sigmoid, sft]", "loss.weights=[1.0]"], r"loss.weights: 1 weights for 2 losses"),
    (["reference.sync_every=4", "reference.mode=precomputed"], r"reference.sync_every: TR-DPO updates the reference"),
    (["reference.sync_every=4", "lora.rank=4"], r"reference.sync_every: not with LoRA"),
    (["reference.sync_every=4", "loss.type=orpo"], r"reference.sync_every: the loss has no reference to update"),
    (["loss.type=no_such_module_x:f"], r"loss.type=no_such_module_x:f: cannot import module 'no_such_module_x'"),
    (["loss.type=jsmaug.losses:not_there"], r"module 'jsmaug.losses' has no function 'not_there'"),
    (["loss.params=5"], r"loss.params: expected a mapping"),
])
def test_every_combination_is_checked_before_the_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config("configs/tiny_dpop.yaml", overrides)


def test_a_weighted_combination_is_its_terms_weighted_and_logs_each():
    rng = np.random.default_rng(0)
    x = losses.LossInputs(*(jnp.asarray(rng.uniform(-20, -2, 4), jnp.float32) for _ in range(4)),
                          jnp.asarray([3, 4, 5, 6]), jnp.asarray([5, 4, 3, 2]))
    cfg = LossSection(type=("dpo", "bco_pair", "sft"), weights=(0.8, 0.2, 1.0), beta=0.1)
    obj = loss_config.objective(cfg)
    total, parts = obj(x)
    want = (0.8 * losses.preference_loss("sigmoid", x, beta=0.1) + 0.2 * losses.preference_loss("bco_pair", x, beta=0.1)
            + losses.preference_loss("sft", x))
    np.testing.assert_allclose(total, want, rtol=1e-6)
    assert sorted(parts) == ["bco_pair", "dpo", "sft"]
    np.testing.assert_allclose(parts["sft"], np.mean(losses.preference_loss("sft", x)), rtol=1e-6)
    assert loss_config.describe(obj) == "0.8 x dpo + 0.2 x bco_pair + 1 x sft"
    assert loss_config.describe(loss_config.objective(LossSection(type="simpo"))).endswith(
        "reference-free: no reference weights, no reference forward")


def _run(args, env_extra=None, check=True):
    r = subprocess.run([sys.executable, "-m", "jsmaug.train", *args], cwd=ROOT, env=cli_env(**(env_extra or {})),
                       capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


SMALL = ["configs/tiny_dpop.yaml", "model.hidden_size=32", "model.intermediate_size=32", "data.max_length=32",
         "data.max_prompt_length=16", "train.batch_size=4", "train.learning_rate=0.01", "train.warmup_steps=0",
         "train.schedule=constant", "log.every=1", "log.tensorboard=false", "export_hf=false", "data.eval_path=null"]


def _pairs(path):
    path.write_text("".join(json.dumps({"prompt": f"Q{i}: {i} plus {i}?", "chosen": f" {2 * i}",
                                        "rejected": f" {2 * i + 1}"}) + "\n" for i in range(8)))
    return path


def test_a_loss_of_your_own_trains_through_the_cli(tmp_path):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent('''
        import jax
        from jsmaug.losses import logratios

        def margin_dpo(inputs, *, beta, margin=0.0):
            """DPO with a target margin: -log sigmoid(beta * (lc - lr) - margin)."""
            lc, lr = logratios(inputs)
            return -jax.nn.log_sigmoid(beta * (lc - lr) - margin)
    '''))
    data = _pairs(tmp_path / "pairs.jsonl")
    args = [*SMALL, f"data.train_path={data}", "train.steps=3", "loss.type=my_losses:margin_dpo",
            "loss.params={beta: 0.5, margin: 1.0}", f"workdir={tmp_path / 'run'}"]
    r = _run(args, {"PYTHONPATH": str(tmp_path)})
    assert "loss: my_losses:margin_dpo" in r.stdout
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Step 1: policy == reference, so the loss is -log sigmoid(-1) plus the aux term.
    np.testing.assert_allclose(recs[0]["loss/preference"], np.log1p(np.e), rtol=1e-5)
    assert recs[-1]["loss/preference"] < recs[0]["loss/preference"]
    r = _run([*args[:-2], "loss.params={beta: 0.5, mrgin: 1.0}", f"workdir={tmp_path / 'bad'}"],
             {"PYTHONPATH": str(tmp_path)}, check=False)
    assert r.returncode == 2 and "loss.params: my_losses:margin_dpo takes no parameter 'mrgin'" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_tr_dpo_moves_the_reference_and_resumes_exactly(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    common = [*SMALL, "loss.type=dpo", f"data.train_path={data}", "train.steps=5", "checkpoint.every=2",
              "reference.sync_every=2", "reference.mixup_alpha=0.5"]
    _run([*common, f"workdir={tmp_path / 'full'}"])
    r = _run([*common, f"workdir={tmp_path / 'killed'}", "debug.kill_at_step=3"], check=False)
    assert r.returncode == -9
    assert (tmp_path / "killed" / "checkpoints" / "2" / "reference").is_dir()  # the moved reference is saved
    # The reference moved, by TR-DPO's rule: after the sync at step 2 it is 0.5 x the step-2 policy + 0.5 x the start.
    import jax
    import orbax.checkpoint as ocp

    from jsmaug.models import decoder as model
    from jsmaug.train.config import load_run_config

    cfg, _ = load_run_config(common[0], common[1:])
    start = jax.jit(lambda k: model.init_params(cfg.model, k))(jax.random.key(cfg.seed))
    mngr = ocp.CheckpointManager(tmp_path / "killed" / "checkpoints", options=ocp.CheckpointManagerOptions(create=False))
    saved = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     reference=ocp.args.StandardRestore()))
    policy = saved.state["params"] if isinstance(saved.state, dict) else saved.state[0]
    jax.tree.map(lambda r, p, s: np.testing.assert_allclose(r, 0.5 * np.asarray(p) + 0.5 * np.asarray(s), rtol=1e-6,
                                                            atol=1e-7), saved.reference, policy, start)
    assert max(float(np.abs(np.asarray(r) - np.asarray(s)).max())
               for r, s in zip(jax.tree.leaves(saved.reference), jax.tree.leaves(start))) > 1e-4
    _run([*common, f"workdir={tmp_path / 'killed'}"])
    metrics = lambda w: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_sec"}  # noqa: E731
                         for x in (tmp_path / w / "metrics.jsonl").read_text().splitlines()]
    assert metrics("full") == metrics("killed")