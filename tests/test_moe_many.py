"""Many small experts (Qwen3-MoE / OLMoE shapes in miniature: 64 and 128 experts, top-8, tiny widths): every MoE
path equals `dense` in outputs and gradients (router included), a router that sends every token to one expert
drops nothing with 64 experts (bucketed's overflow blocks), the all_to_all dispatch equals one device with 64 and
128 experts on expert axes of 4 and 8, a DPO step with 16 experts top-4 on 8 fake devices (all_to_all on fsdp 2 x
expert 4, gspmd on data 2 x expert 4) equals one device, and an expert axis that does not divide the number
of experts is named."""

import functools

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from jsmaug.data import batches as data
from jsmaug.models import bucketed, config as cfg_lib, decoder as model, moe
from jsmaug.models.config import ConfigError
from jsmaug.parallel import expert_parallel as ep, mesh_context, sharding as shd
from jsmaug.train import step
from jsmaug.train.config import LossSection

T, D, F, K = 64, 16, 8, 8


def _weights(num_experts, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (T, D))
    wr = jax.random.normal(k[1], (D, num_experts))  # router: logits ~ N(0, D), clear-cut top-8
    w = (jax.random.normal(k[2], (num_experts, D, F)) * 0.3, jax.random.normal(k[3], (num_experts, D, F)) * 0.3,
         jax.random.normal(k[4], (num_experts, F, D)) * 0.3)
    return x, wr, w


def _loss(fn, one_expert=None):
    """value_and_grad over (x, router, w1, w3, w2) of a nonlinear function of the layer's output."""
    def f(x, wr, w1, w3, w2):
        logits = x @ wr
        if one_expert is not None:
            logits = logits.at[:, one_expert].add(100.0)
        _, idx, w = moe.route(logits, K, renormalize=False)  # OLMoE's routing: the weights' gradient matters
        y, dropped = fn(x, idx, w, w1, w3, w2)
        return jnp.sum(y * jnp.cos(y)), dropped
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)


@functools.lru_cache(maxsize=None)
def _reference(num_experts, one_expert=None):
    x, wr, w = _weights(num_experts)
    (l0, _), g0 = jax.jit(_loss(functools.partial(moe.expert_ffn, impl="dense"), one_expert))(x, wr, *w)
    return float(l0), [np.asarray(g) for g in g0]


def _check(loss, grads, ref):
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref[1]):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_experts", [64, 128])
@pytest.mark.parametrize("impl", ["bucketed", "ragged", "blocked", "megablox"])  # megablox: Pallas interpret mode
def test_every_path_equals_dense_with_many_small_experts(num_experts, impl):
    x, wr, w = _weights(num_experts)
    fn = functools.partial(moe.expert_ffn, impl=impl, block_size=8)
    (loss, dropped), grads = jax.jit(_loss(fn))(x, wr, *w)
    assert int(dropped) == 0
    _check(loss, grads, _reference(num_experts))
    assert np.abs(_reference(num_experts)[1][1]).max() > 1e-3  # the router's gradient is really compared


def test_one_expert_gets_every_token_and_nothing_is_dropped_with_64_experts():
    num_experts = 64
    x, wr, w = _weights(num_experts)
    idx = moe.route((x @ wr).at[:, 5].add(100.0), K)[1]
    sizes = np.bincount(np.asarray(idx).ravel(), minlength=num_experts)
    layout, ladder = bucketed.plan(T, K, num_experts)
    need = int(bucketed.needed_blocks(jnp.asarray(sizes), *layout))
    assert sizes.max() == T and need > ladder[len(ladder) // 2]  # the busiest expert needs a high rung
    ref = _reference(num_experts, one_expert=5)
    for impl in ("bucketed", "ragged"):
        (loss, dropped), grads = jax.jit(_loss(functools.partial(moe.expert_ffn, impl=impl), 5))(x, wr, *w)
        assert int(dropped) == 0
        _check(loss, grads, ref)
    mesh_cfg = shd.MeshConfig(data=1, expert=8)  # all_to_all: every token's row to the one shard of expert 5
    mesh = shd.make_mesh(mesh_cfg, cfg_lib.tiny(num_local_experts=num_experts))
    fn = jax.jit(_loss(functools.partial(ep.expert_ffn, dispatch="all_to_all", impl="bucketed"), 5))
    (loss, dropped), grads = mesh_context.under_mesh(fn, mesh, mesh_cfg.rule_table()["batch"])(x, wr, *w)
    assert int(dropped) == 0
    _check(loss, grads, ref)


@pytest.mark.parametrize("num_experts, mesh_name, impl", [
    (64, "data2_expert4", "bucketed"), (128, "expert8", "bucketed"), (128, "expert8", "ragged"),
    (128, "fsdp2_expert4", "megablox")])
def test_all_to_all_with_many_experts_equals_one_device(num_experts, mesh_name, impl):
    mesh_cfg = {"data2_expert4": shd.MeshConfig(data=2, expert=4), "expert8": shd.MeshConfig(data=1, expert=8),
                "fsdp2_expert4": shd.MeshConfig(data=1, fsdp=2, expert=4)}[mesh_name]
    mesh = shd.make_mesh(mesh_cfg, cfg_lib.tiny(num_local_experts=num_experts))
    x, wr, w = _weights(num_experts)
    fn = jax.jit(_loss(functools.partial(ep.expert_ffn, dispatch="all_to_all", impl=impl)))
    (loss, dropped), grads = mesh_context.under_mesh(fn, mesh, mesh_cfg.rule_table()["batch"])(x, wr, *w)
    assert int(dropped) == 0
    _check(loss, grads, _reference(num_experts))


# --- a DPO step of a whole model with 16 experts top-4 (as tests/test_sharding.py does it for Mixtral's 4) ---

CONF = cfg_lib.tiny(vocab_size=64, num_hidden_layers=1, num_local_experts=16, num_experts_per_tok=4,
                    router_aux_loss_coef=0.02)
LOSS = LossSection(type="dpo", beta=0.3)  # DPO: DPOP's kink switches on round-off at policy == reference
OPT = optax.sgd(0.5, momentum=0.9)  # linear in the gradient: 1e-5 compares the sharded math itself


def _batch():
    rng = np.random.default_rng(1)
    ex = [{"prompt": np.r_[1, rng.integers(3, 64, 4)].astype(np.int32),
           "chosen": np.r_[rng.integers(3, 64, rng.integers(2, 7)), 2].astype(np.int32),
           "rejected": np.r_[rng.integers(3, 64, rng.integers(2, 7)), 2].astype(np.int32)} for _ in range(8)]
    return data.collate(ex, (16,))


def _dpo_step(mesh_cfg, devices, dispatch="gspmd"):
    config = CONF.replace(moe_dispatch=dispatch)
    mesh = shd.make_mesh(mesh_cfg, config, devices)
    param_sh = shd.param_shardings(config, mesh, mesh_cfg)
    params = jax.jit(lambda k: model.init_params(config, k), out_shardings=param_sh)(jax.random.key(0))
    ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
    state_sh = step.state_shardings(OPT, params, param_sh, mesh)
    state = step.init_state(OPT, params, state_sh, seed=0)
    batch = shd.put_batch(_batch(), mesh=mesh, mesh_cfg=mesh_cfg)
    fn = step.jit_train_step(state_sh, jax.tree.map(lambda x: x.sharding, batch), param_sh, config=config,
                             loss_cfg=LOSS, optimizer=OPT)
    state, m = fn(state, batch, ref, jnp.asarray(False))
    return state, m


@pytest.fixture(scope="module")
def single():
    state, m = _dpo_step(shd.MeshConfig(data=1), jax.devices()[:1])
    return jax.tree.map(np.asarray, state.params), float(m["loss"]), float(m["moe/aux_loss"])


# Each dispatch and each mesh once (not their product: tests/test_sharding.py crosses meshes and dispatches with
# Mixtral's 4 experts; here the subject is 16 experts, 4 a shard).
@pytest.mark.parametrize("dispatch, mesh_name", [("all_to_all", "fsdp2_expert4"), ("gspmd", "data2_expert4")])
def test_dpo_step_with_16_experts_on_8_devices_equals_one_device(single, mesh_name, dispatch):
    mesh_cfg = {"data2_expert4": shd.MeshConfig(data=2, expert=4),
                "fsdp2_expert4": shd.MeshConfig(data=1, fsdp=2, expert=4)}[mesh_name]
    state, m = _dpo_step(mesh_cfg, jax.devices(), dispatch)
    np.testing.assert_allclose([float(m["loss"]), float(m["moe/aux_loss"])], single[1:], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5),
                 state.params, single[0])
    w1 = state.params["layers"]["layer"]["block_sparse_moe"]["w1"]  # (L, E, D, F): 4 local experts per shard
    assert {s.data.shape[1] for s in w1.addressable_shards} == {4}


def test_an_expert_axis_that_does_not_divide_the_experts_is_named():
    with pytest.raises(ConfigError, match="mesh.expert=8 does not divide num_local_experts=20; use an expert"):
        shd.make_mesh(shd.MeshConfig(data=1, expert=8), CONF.replace(num_local_experts=20), jax.devices())
    with pytest.raises(ConfigError, match="mesh.expert=4 does not divide num_local_experts=18"):
        shd.make_mesh(shd.MeshConfig(data=2, expert=4), CONF.replace(num_local_experts=18), jax.devices())


@pytest.mark.parametrize("name, billions, active", [
    ("qwen3_30b_a3b", 30.5, 3.3), ("qwen3_235b_a22b", 235.1, 22), ("olmoe_1b_7b", 6.9, 1.3),
    ("mixtral_8x22b", 140.6, 39)])
def test_the_presets_have_the_published_sizes(name, billions, active):
    c = cfg_lib.preset(name)  # total and active parameters as the model cards give them
    idle = (c.num_local_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.expert_intermediate_size
    assert round(c.num_params() / 1e9, 1) == billions
    assert abs((c.num_params() - c.num_hidden_layers * idle) / 1e9 - active) < 0.06 * active


def test_analytic_flops_count_each_layer_with_its_own_mlp():
    from jsmaug.perf.flops import analytic_flops_per_step

    kw = dict(vocab_size=100, hidden_size=8, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1)
    d, hq, hkv, dh, v, s = 8, 2, 1, 4, 100, 16
    attn = 2 * d * (hq + 2 * hkv) * dh + 2 * d * hq * dh + 4 * s * hq * dh / 2
    moe_c = cfg_lib.tiny(model_type="qwen3_moe", moe_intermediate_size=6, num_local_experts=16,
                         num_experts_per_tok=4, mlp_only_layers=(1,), **kw)
    layers = 2 * (attn + 2 * d * 16 + 3 * 2 * d * 6 * 4) + (attn + 3 * 2 * d * 40)  # two sparse, one dense
    assert analytic_flops_per_step(moe_c, 32, s, False) == 32 * (layers + 2 * d * v) * 3
    dense_c = cfg_lib.tiny(model_type="llama", **kw)
    assert analytic_flops_per_step(dense_c, 32, s, True) == 32 * (3 * (attn + 3 * 2 * d * 40) + 2 * d * v) * 4


@pytest.mark.parametrize("name, devices", [("qwen3_30b_a3b", 16), ("qwen3_235b_a22b", 128), ("mixtral_8x22b", 64),
                                           ("olmoe_1b_7b", 4)])
def test_the_pod_configs_load_with_a_mesh_for_their_topology(name, devices):
    from jsmaug.train.config import load_run_config

    cfg, _ = load_run_config(name, [])
    m, mesh = cfg.model, cfg.mesh.sizes(devices)  # the devices of the topology each was planned for
    assert m == cfg_lib.preset(name, param_dtype="float32", remat="full")
    assert m.num_local_experts % mesh["expert"] == 0
    assert cfg.train.batch_size == 64 and cfg.data.max_length == 1024 and cfg.loss.type == "dpop"
    assert cfg.train.batch_size % (mesh["data"] * mesh["fsdp"] * mesh["expert"]) == 0
