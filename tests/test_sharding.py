"""Sharding on 8 fake CPU devices: the same numbers as 1 device, experts really split, mesh errors, resharding."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jsmaug.data import batches as data

from jsmaug.models import config as cfg_lib, decoder as model

from jsmaug.parallel import sharding as shd

from jsmaug.train import step
from jsmaug.models.config import ConfigError
from jsmaug.train.config import LossSection

CONF = cfg_lib.tiny(vocab_size=64, num_key_value_heads=2, router_aux_loss_coef=0.02)
# DPO, not DPOP: the reference starts equal to the policy, and there DPOP's penalty switches on a 1e-7 round-off
# in ref_c - pi_c, which differs between a mesh and one device (see docs/pods.md, "DPOP's kink").
LOSS = LossSection(type="dpo", beta=0.3)
# SGD with momentum: the update is a linear function of the gradient, so 1e-5 compares the sharded math itself.
# (Adam's first steps are ~lr * sign(g), which turns round-off in gradients that are ~0 into lr-sized jumps.)
import optax  # noqa: E402

OPT = optax.sgd(0.5, momentum=0.9)


def _batch(seed):
    rng = np.random.default_rng(seed)
    ex = []
    for _ in range(8):
        ex.append({"prompt": np.r_[1, rng.integers(3, 64, 4)].astype(np.int32),
                   "chosen": np.r_[rng.integers(3, 64, rng.integers(2, 7)), 2].astype(np.int32),
                   "rejected": np.r_[rng.integers(3, 64, rng.integers(2, 7)), 2].astype(np.int32)})
    return data.collate(ex, (16,))


BATCHES = [_batch(1), _batch(2)]


def _train(mesh_cfg: shd.MeshConfig, devices, steps=2, state=None, dispatch="gspmd"):
    config = CONF.replace(moe_dispatch=dispatch.split("+")[0], remat="full" if "+remat" in dispatch else "none",
                          attention_impl="splash" if "+splash" in dispatch else "auto",
                          moe_impl="megablox" if "+megablox" in dispatch else "auto")
    mesh = shd.make_mesh(mesh_cfg, CONF, devices)
    param_sh = shd.param_shardings(CONF, mesh, mesh_cfg)
    params = jax.jit(lambda k: model.init_params(CONF, k), out_shardings=param_sh)(jax.random.key(0))
    ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
    state_sh = step.state_shardings(OPT, params, param_sh, mesh)
    if state is None:
        state = step.init_state(OPT, params, state_sh, seed=0)
    else:  # a state from another mesh: reshard it onto this one
        state = jax.device_put(state, state_sh)
    put = functools.partial(shd.put_batch, mesh=mesh, mesh_cfg=mesh_cfg)
    batch_sh = jax.tree.map(lambda x: x.sharding, put(BATCHES[0]))
    fn = step.jit_train_step(state_sh, batch_sh, param_sh, config=config, loss_cfg=LOSS, optimizer=OPT)
    losses = []
    for _ in range(steps):
        state, m = fn(state, put(BATCHES[int(state.step) % 2]), ref, jnp.asarray(False))
        losses.append(float(m["loss"]))
    return state, losses, mesh


@pytest.fixture(scope="module")
def single():
    state, losses, _ = _train(shd.MeshConfig(data=1), jax.devices()[:1])
    return jax.tree.map(np.asarray, state.params), losses


MESHES = {"data8": shd.MeshConfig(data=8), "data2_expert4": shd.MeshConfig(data=2, expert=4),
          "fsdp2_expert2_tensor2": shd.MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
          "fsdp2_expert4": shd.MeshConfig(data=1, fsdp=2, expert=4)}
# (mesh, MoE token dispatch[+remat][+splash attention][+megablox experts]): GSPMD moves expert weights, all_to_all moves tokens (jsmaug/parallel/expert_parallel.py).
CASES = [("data8", "gspmd"), ("data2_expert4", "gspmd"), ("data2_expert4", "all_to_all"),
         ("fsdp2_expert2_tensor2", "gspmd"), ("fsdp2_expert2_tensor2", "all_to_all"), ("fsdp2_expert4", "all_to_all+remat"),
         # TPU's defaults: the Pallas splash and megablox kernels (interpret mode on CPU); splash under shard_map
         # with rows over data/fsdp/expert and heads over tensor
         ("fsdp2_expert2_tensor2", "all_to_all+splash+megablox")]


@pytest.mark.parametrize("name, dispatch", CASES)
def test_mesh_matches_single_device(single, name, dispatch):
    assert len(jax.devices()) == 8
    state, losses, mesh = _train(MESHES[name], jax.devices(), dispatch=dispatch)
    np.testing.assert_allclose(losses, single[1], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5),
                 state.params, single[0])
    w1 = state.params["layers"]["layer"]["block_sparse_moe"]["w1"]  # (L, E, D, F)
    ep = mesh.shape["expert"]
    assert "expert" in str(w1.sharding.spec) or ep == 1
    local_e = {s.data.shape[1] for s in w1.addressable_shards}
    assert local_e == {CONF.num_local_experts // ep}, (local_e, ep)
    if name == "fsdp2_expert2_tensor2":
        assert w1.sharding.spec == P(None, "expert", "fsdp", "tensor")
        assert {s.data.shape for s in w1.addressable_shards} == {(2, 2, 16, 24)}
        # the optimizer's momentum is sharded like its params
        trace = state.opt_state[0].trace["layers"]["layer"]["block_sparse_moe"]["w1"]
        assert trace.sharding.spec == w1.sharding.spec


def test_state_saved_on_one_mesh_continues_on_another(single):
    # ...and with the other token dispatch: the state does not depend on how tokens travel.
    a_state, a_losses, _ = _train(MESHES["data2_expert4"], jax.devices(), steps=1, dispatch="gspmd")
    b_state, b_losses, mesh = _train(MESHES["fsdp2_expert2_tensor2"], jax.devices(), steps=1, state=a_state,
                                     dispatch="all_to_all")
    assert int(b_state.step) == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5),
                 b_state.params, single[0])


def test_mesh_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="multiply to 6 but there are 8 devices"):
        shd.make_mesh(shd.MeshConfig(data=3, expert=2), CONF, jax.devices())
    with pytest.raises(ConfigError, match="mesh.expert=8 does not divide num_local_experts=4"):
        shd.make_mesh(shd.MeshConfig(data=1, expert=8), CONF, jax.devices())
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        shd.make_mesh(shd.MeshConfig(data=-1, fsdp=-1), CONF, jax.devices())
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        shd.make_mesh(shd.MeshConfig(data=-1, expert=3), CONF, jax.devices())
    mesh = shd.make_mesh(shd.MeshConfig(data=-1, expert=2), CONF, jax.devices())
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}


def test_spec_rules_replicate_what_does_not_divide():
    mesh = shd.make_mesh(shd.MeshConfig(data=1, tensor=8), CONF, jax.devices())
    table = shd.MeshConfig().rule_table()
    # 2 kv heads cannot be split 8 ways: replicated; 64 vocab can.
    assert shd.spec_for(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh, table) == P(None, None, None)
    assert shd.spec_for(("vocab", "embed"), (64, 32), mesh, table) == P("tensor", None)


def _pair_examples(n, seed=3):
    rng = np.random.default_rng(seed)
    return [{"prompt": np.r_[1, rng.integers(3, 64, 3)].astype(np.int32),
             "chosen": np.r_[rng.integers(3, 64, rng.integers(1, 9)), 2].astype(np.int32),
             "rejected": np.r_[rng.integers(3, 64, rng.integers(1, 9)), 2].astype(np.int32)} for _ in range(n)]


@pytest.mark.parametrize("sizes, rules, want", [
    (dict(data=1, fsdp=2, expert=4), (), {0: range(0, 4), 1: range(4, 8)}),  # batch axes span the hosts
    (dict(data=1, fsdp=8), (("batch", None),), {0: range(8), 1: range(8)}),  # a batch both hosts hold whole
    (dict(data=1, tensor=8), (), {0: range(8), 1: range(8)}),  # only tensor parallelism: replicated
    (dict(data=2, tensor=4), (), {0: range(0, 4), 1: range(4, 8)}),
])
def test_each_host_collates_exactly_the_pairs_its_devices_hold(sizes, rules, want):
    # Two pretend hosts of 4 devices each (device ids 0-3 and 4-7), as two processes of 4 devices would be.
    mesh_cfg = shd.MeshConfig(**sizes, rules=rules)
    mesh = shd.make_mesh(mesh_cfg, CONF)
    by_host = shd.pairs_by_host(mesh, mesh_cfg, 8, host_of=lambda d: d.id // 4)
    assert by_host == {h: list(r) for h, r in want.items()}
    # On this one process every pair is local; the placed batch equals the whole batch placed directly, with the
    # batch's one length although a share of the pairs alone might fit a shorter bucket.
    ex = _pair_examples(8)
    asked = []

    def collate(pairs):
        asked.append(len(pairs))
        return data.collate(pairs, (8, 16, 32), length=data.batch_length(ex, (8, 16, 32)))

    placed = shd.put_pairs(ex, collate, mesh, mesh_cfg)
    direct = shd.put_batch(data.collate(ex, (8, 16, 32)), mesh, mesh_cfg)
    assert asked == [8]
    for k in direct:
        assert placed[k].shape == direct[k].shape and placed[k].sharding == direct[k].sharding
        np.testing.assert_array_equal(np.asarray(placed[k]), np.asarray(direct[k]))
        np.testing.assert_array_equal(np.asarray(placed[k]).reshape(16, -1), data.collate(ex, (8, 16, 32))[k])
