"""jsmaug/train/plan.py: the one plan of a run. The step the planner lowers on abstract shapes (what `jsmaug plan`
/ tools/plan_pod.py compiles for a pod) is the program training lowers on its real state and batch: the same
HLO text, fingerprinted, for the same config on 8 CPU devices."""

import hashlib

import jax
import pytest

from jsmaug.models import decoder as model
from jsmaug.models.config import ConfigError
from jsmaug.train import plan as plan_lib, run as train_run, setup as run_setup
from jsmaug.train.config import load_run_config
from jsmaug.train.outputs import RunOutputs

BASE = ["train.steps=1", "data.max_length=64", "data.max_prompt_length=32", "log.eval_every=0"]


def _fingerprint(lowered) -> str:
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


@pytest.mark.parametrize("overrides", [
    ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "train.batch_size=8"],
    ["mesh.fsdp=4", "mesh.expert=2", "train.batch_size=8", "lora.rank=4", "reference.mode=precomputed",
     "data.packing=true"],
], ids=["full-dpop-mesh", "lora-precomputed-packed"])
def test_plan_lowers_the_program_training_runs(tmp_path, overrides):
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", [*BASE, *overrides, f"workdir={tmp_path}"])
    run_data = train_run.load_data(cfg)
    setup = run_setup.build(cfg, run_data, RunOutputs(cfg.workdir, writer=True))
    batch = setup.place(run_data.train[:cfg.train.batch_size], setup.train_ref, cfg.train.micro_batches)
    trained = setup.plan.step.lower(setup.state, batch, setup.ref_params, False)
    # The model config's former name (`mconf`) is the same object, on the plan and on the setup.
    assert setup.mconf is setup.config is setup.plan.config is setup.plan.mconf

    planned = plan_lib.plan(cfg, jax.devices())  # what the planner builds from the config alone
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
    assert set(abstract) == set(planned.batch_shapes())
    assert _fingerprint(planned.lower(abstract)) == _fingerprint(trained)
    # The planner's own batch at the config's length has the batch's structure and shardings.
    shapes = planned.batch_shapes(length=batch["input_ids"].shape[-1])
    assert {k: v.sharding for k, v in shapes.items()} == {k: v.sharding for k, v in batch.items()}


def test_plan_refuses_a_batch_the_mesh_cannot_split():
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", ["mesh.data=8", "train.batch_size=4"])
    with pytest.raises(ConfigError, match=r"train.batch_size=4 .* data-parallel mesh size 8"):
        plan_lib.plan(cfg, jax.devices())


def test_host_view_names_hosts_and_their_pairs():
    """Also the model config's former keyword: `plan(..., mconf=)` still plans that model (with a
    DeprecationWarning), and `mconf` with `config` is refused."""
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", ["mesh.data=2", "mesh.fsdp=4"])
    given = plan_lib.model_config(cfg).replace(num_hidden_layers=1)  # not the config's 2 layers
    with pytest.warns(DeprecationWarning, match="mconf"):
        planned = plan_lib.plan(cfg, jax.devices(), mconf=given)
    assert planned.config is given and planned.mconf is given
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
    assert shapes(planned.state.params) == shapes(model.param_shapes(given)) != shapes(model.param_shapes(cfg.model))
    with pytest.raises(TypeError, match="twice"):
        plan_lib.plan(cfg, jax.devices(), given, mconf=given)
    assert planned.host_view() == (
        "hosts: 1 (one JAX process each, distributed.enabled=true), 8 devices per host; pairs per host per step: "
        "8 of 8")


@pytest.mark.parametrize("overrides, row, want", [
    (["data.max_length=64"], 64, "xla"),  # one attention block: the plain path
    (["data.max_length=64", "model.attention_block_size=32"], 64, "chunked"),
    (["data.max_length=64", "model.attention_block_size=96", "data.packing=true"], 128, "chunked"),  # ladder: 2x
    (["data.max_length=64", "data.packing=true", "data.packing_length=96", "model.attention_block_size=96"],
     96, "xla"),
])
def test_plan_reports_the_attention_path_its_rows_run(overrides, row, want):
    """On CPU `auto` depends on the row length: the plan's report (`jsmaug plan`, the run log) resolves it for
    the longest row the data can make, as the step's attention resolves it for that row."""
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", ["data.max_prompt_length=32", *overrides])
    assert plan_lib.longest_row(cfg.data) == row
    planned = plan_lib.plan(cfg, jax.devices()[:1])
    assert planned.paths["attention"] == want, planned.paths["attention_why"]
    from jsmaug.models import attention
    assert attention.resolve_impl("auto", "float32", 16, "cpu", seq_len=row,
                                  block_size=cfg.model.attention_block_size)[0] == want
