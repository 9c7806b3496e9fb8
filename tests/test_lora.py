"""LoRA: merged == unmerged on every MoE path; at init the policy IS the reference (exactly); only the adapters
learn and the base stays bit-identical; on a mesh LoRA training equals one device (DPO)."""

import functools

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from jsmaug.data import batches as data

from jsmaug.models import config as cfg_lib, lora, decoder as model

from jsmaug.parallel import sharding as shd

from jsmaug.train import step
from jsmaug.train.config import LossSection

CONF = cfg_lib.tiny(vocab_size=64, lora_rank=4, lora_alpha=8.0, moe_capacity_factor=8.0)
IDS = jax.random.randint(jax.random.key(2), (2, 12), 3, 64)


def _batch(seed, n=8):
    rng = np.random.default_rng(seed)
    ex = [{"prompt": np.r_[1, rng.integers(3, 64, 4)].astype(np.int32),
           "chosen": np.r_[rng.integers(3, 64, rng.integers(2, 7)), 2].astype(np.int32),
           "rejected": np.r_[rng.integers(3, 64, rng.integers(2, 7)), 2].astype(np.int32)} for _ in range(n)]
    return data.collate(ex, (16,))


@functools.lru_cache(maxsize=None)
def _parts():
    base, adapters = lora.split(model.init_params(CONF, jax.random.key(0)))
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    return base, adapters, trained


@pytest.mark.parametrize("impl", ["dense", "bucketed", "blocked", "ragged", "capacity"])
def test_merged_equals_unmerged_on_every_dispatch_path(impl):
    base, _, trained = _parts()
    config = CONF.replace(moe_impl=impl)
    unmerged, _ = jax.jit(model.forward, static_argnums=0)(config, lora.combine(base, trained), IDS)
    merged_params = lora.merge(base, trained, config.lora_alpha, config.lora_rank)
    merged, _ = jax.jit(model.forward, static_argnums=0)(config.replace(lora_rank=0), merged_params, IDS)
    np.testing.assert_allclose(unmerged, merged, rtol=1e-5, atol=1e-5)
    plain, _ = jax.jit(model.forward, static_argnums=0)(config.replace(lora_rank=0), base, IDS)
    assert float(jnp.max(jnp.abs(plain - merged))) > 1e-3  # the adapters do change the model


def test_adapter_shapes_are_per_expert_low_rank_factors():
    _, adapters, _ = _parts()
    moe_ad = adapters["layers"]["layer"]["block_sparse_moe"]
    L, E, D, F, r = 2, 4, 32, 48, 4
    assert moe_ad["w1_lora_a"].shape == (L, E, D, r) and moe_ad["w1_lora_b"].shape == (L, E, r, F)
    assert moe_ad["w2_lora_a"].shape == (L, E, F, r) and moe_ad["w2_lora_b"].shape == (L, E, r, D)
    assert all(float(jnp.max(jnp.abs(b))) == 0.0 for k, b in moe_ad.items() if k.endswith("_lora_b"))


def test_at_init_policy_is_reference_and_only_adapters_learn():
    base, adapters, _ = _parts()
    batch = _batch(1)
    loss_cfg = LossSection(type="dpop", beta=0.3, dpop_lambda=50.0)
    inputs, _, _, _, _ = step.pair_losses(adapters, base, batch, config=CONF, loss_cfg=loss_cfg)
    np.testing.assert_array_equal(inputs.policy_chosen_logps, inputs.reference_chosen_logps)  # exactly
    np.testing.assert_array_equal(inputs.policy_rejected_logps, inputs.reference_rejected_logps)
    opt = optax.adam(1e-2)
    state = step.TrainState(adapters, opt.init(adapters), jnp.int32(0), jnp.int32(0),
                            jax.random.key_data(jax.random.key(0)))
    base_before = jax.tree.map(np.asarray, base)
    fn = jax.jit(functools.partial(step.train_step, config=CONF, loss_cfg=loss_cfg, optimizer=opt))
    for _ in range(3):
        state, m = fn(state, batch, base)
    assert float(m["rewards/margins"]) > 0  # it learns the pairs
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), base, base_before)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)  # the state holds adapters only
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, adapters)
    assert all(v > 0 for v in jax.tree.leaves(moved))


def _train_on(mesh_cfg, devices):
    mesh = shd.make_mesh(mesh_cfg, CONF, devices)
    config = CONF.replace(moe_dispatch="all_to_all")
    base_sh, ad_sh = lora.split(shd.param_shardings(config, mesh, mesh_cfg))
    base, adapters, _ = _parts()
    fresh = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)  # the step donates its state
    base, adapters = jax.device_put(fresh(base), base_sh), jax.device_put(fresh(adapters), ad_sh)
    opt = optax.sgd(0.5, momentum=0.9)
    state_sh = step.state_shardings(opt, adapters, ad_sh, mesh)
    state = step.init_state(opt, adapters, state_sh, seed=0)
    put = functools.partial(shd.put_batch, mesh=mesh, mesh_cfg=mesh_cfg)
    batches = [put(_batch(1)), put(_batch(2))]
    fn = step.jit_train_step(state_sh, jax.tree.map(lambda x: x.sharding, batches[0]), base_sh, config=config,
                             loss_cfg=LossSection(type="dpo", beta=0.3), optimizer=opt)
    losses = []
    for b in batches:
        state, m = fn(state, b, base, jnp.asarray(False))
        losses.append(float(m["loss"]))
    return jax.tree.map(np.asarray, state.params), losses


def test_lora_on_a_mesh_equals_one_device():
    one = _train_on(shd.MeshConfig(data=1), jax.devices()[:1])
    mesh = _train_on(shd.MeshConfig(data=1, fsdp=2, expert=2, tensor=2), jax.devices())
    np.testing.assert_allclose(mesh[1], one[1], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), mesh[0], one[0])


@functools.lru_cache(maxsize=None)
def _merged_adapter_grads():
    """The adapters' gradients through the materialised W + s A @ B (autodiff of `lora.merge`, dense experts)."""
    base, _, trained = _parts()
    plain = CONF.replace(lora_rank=0, moe_impl="dense")
    weights_T = jax.random.normal(jax.random.key(5), (2, 12, 64))

    def loss(ad):
        logits, _ = model.forward(plain, lora.merge(base, ad, CONF.lora_alpha, CONF.lora_rank), IDS)
        return jnp.sum(jax.nn.log_softmax(logits) * weights_T)
    return jax.jit(jax.grad(loss))(trained), weights_T


@pytest.mark.parametrize("impl", ["dense", "bucketed", "blocked", "ragged", "capacity"])
def test_adapter_gradients_equal_those_of_the_merged_weights(impl):
    """The factored adapters (jsmaug/models/factored.py; bucketed: its hand-written VJP) give the gradients of
    W + s A @ B formed in full."""
    base, _, trained = _parts()
    want, weights_T = _merged_adapter_grads()
    config = CONF.replace(moe_impl=impl)

    def loss(ad):
        logits, _ = model.forward(config, lora.combine(base, ad), IDS)
        return jnp.sum(jax.nn.log_softmax(logits) * weights_T)
    got = jax.jit(jax.grad(loss))(trained)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5), got, want)
    assert float(jnp.max(jnp.abs(got["layers"]["layer"]["block_sparse_moe"]["w2_lora_a"]))) > 1e-3
