"""gpt-oss on an expert mesh: a tiny gpt-oss with every switch on (q/k/v/o biases, attention sinks, a sliding
window of 4 under 16-token rows, yarn RoPE, a router bias, expert biases, the clamped SwiGLU reached by a fair share
of the activations) on 8 fake CPU devices, expert 4 x tensor 2 with the all_to_all token dispatch, gives the logits
of one device (1e-5) and the same DPO step (loss, aux loss; every parameter's gradient within 1e-4 of its largest
entry); and a LoRA DPOP step on that mesh
with adapters on attention and every expert starts at the no-margin loss log 2 (the policy is the reference) and
learns the pairs by its second step (slow).

Cost, measured on the loaded 2-core machine (2026-12-06): the file without the slow test 19 s of CPU with a cold
compilation cache, 8 s warm."""

import functools
import math

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from jsmaug.data import batches as data
from jsmaug.models import config as cfg_lib, decoder as model, glu as glu_lib, lora
from jsmaug.parallel import sharding as shd
from jsmaug.train import step
from jsmaug.train.config import LossSection

LIMIT = 0.5  # the SwiGLU clamp, below the scaled-up experts' pre-activations
# The local experts' path: ragged traces in half the time of CPU's default bucketed (this file's cost); every path's
# gpt-oss compute against dense is tests/test_glu.py's.
IMPL = "ragged"
CONF = cfg_lib.tiny(model_type="gpt_oss", vocab_size=64, num_local_experts=8, num_experts_per_tok=2,
                    swiglu_limit=LIMIT, router_aux_loss_coef=0.02, rope_type="yarn", rope_factor=8.0,
                    rope_beta_fast=8.0, rope_beta_slow=1.0, rope_truncate=False,
                    rope_original_max_position_embeddings=32, moe_dispatch="all_to_all", moe_impl=IMPL)
MESH = shd.MeshConfig(data=1, expert=4, tensor=2)
DPO = LossSection(type="dpo", beta=0.3)  # DPO: DPOP's kink switches on round-off at policy == reference
LR = 0.5
OPT = optax.sgd(LR)  # the update is -LR x the gradient: the gradients are read back from it


def _batch(seed=1, n=8):
    rng = np.random.default_rng(seed)
    ex = [{"prompt": np.r_[1, rng.integers(3, 64, 4)].astype(np.int32),
           "chosen": np.r_[rng.integers(3, 64, rng.integers(4, 9)), 2].astype(np.int32),
           "rejected": np.r_[rng.integers(3, 64, rng.integers(4, 9)), 2].astype(np.int32)} for _ in range(n)]
    return data.collate(ex, (16,))  # rows longer than the window of 4


@functools.lru_cache(maxsize=None)
def _params():
    """Random weights with the gpt-oss switches made to matter: biases and sinks non-zero, norms off 1, the router
    scaled up for clear-cut top-k choices (no near-ties for the devices to break differently), q/k for sharp
    attention, the experts' gate/up so that the clamp at LIMIT binds."""
    scale = {"gate": 40.0, "q_proj": 10.0, "k_proj": 10.0, "w1": 8.0, "w3": 8.0}

    def tweak(i, path, x):
        name, noise = path[-1].key, jax.random.normal(jax.random.key(100 + i), x.shape)
        if name.endswith("_bias") or name == "sinks":
            return x + (0.5 if name in ("gate_bias", "sinks") else 0.1) * noise
        if name == "weight":  # the norms
            return 1.0 + 0.2 * noise
        return x * scale.get(name, 1.0)

    @jax.jit  # one program, not one per leaf
    def make():
        leaves, tree = jax.tree_util.tree_flatten_with_path(model.init_params(CONF, jax.random.key(0)))
        return jax.tree.unflatten(tree, [tweak(i, p, x) for i, (p, x) in enumerate(leaves)])
    return jax.tree.map(np.asarray, make())  # host arrays: each run places (copies) them itself


def _on(mesh_cfg, devices):
    """(mesh, param shardings, params placed, batch placed)."""
    mesh = shd.make_mesh(mesh_cfg, CONF, devices)
    param_sh = shd.param_shardings(CONF, mesh, mesh_cfg)
    params = jax.device_put(_params(), param_sh)
    return mesh, param_sh, params, shd.put_batch(_batch(), mesh=mesh, mesh_cfg=mesh_cfg)


def _recording_glu(seen: list):
    """Glu.__call__ that also hands its pre-activations (p1, p3) to `seen` from inside the compiled program."""
    call = glu_lib.Glu.__call__

    def record(self, p1, p3):
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), p1, p3)
        return call(self, p1, p3)
    return record


def _logits_and_step(mesh_cfg, devices, seen=None):
    """(logits, aux, DPO step loss, its aux, every parameter's gradient). `seen`: record the experts' gate and up
    pre-activations of the forward."""
    mesh, param_sh, params, batch = _on(mesh_cfg, devices)
    local_experts = {s.data.shape[1] for s in params["layers"]["layer"]["block_sparse_moe"]["w1"].addressable_shards}
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    rows = step.unpair(batch)
    with pytest.MonkeyPatch.context() as mp:
        if seen is not None:
            mp.setattr(glu_lib.Glu, "__call__", _recording_glu(seen))
        fwd = step.on_mesh(jax.jit(functools.partial(model.forward, CONF)), batch_sh)
        logits, aux = fwd(params, rows["input_ids"], (rows["segment_ids"] > 0).astype(jnp.int32))
        logits = np.asarray(logits)
    ref = jax.device_put(_params(), param_sh)
    state_sh = step.state_shardings(OPT, params, param_sh, mesh)
    state = step.init_state(OPT, params, state_sh, seed=0)
    fn = step.jit_train_step(state_sh, batch_sh, param_sh, config=CONF, loss_cfg=DPO, optimizer=OPT)
    state, m = fn(state, batch, ref, jnp.asarray(False))
    grads = jax.tree.map(lambda old, new: (np.asarray(old) - np.asarray(new)) / LR, _params(), state.params)
    return logits, float(aux), float(m["loss"]), float(m["moe/aux_loss"]), grads, local_experts


@pytest.fixture(scope="module")
def one_device():
    seen = []
    out = _logits_and_step(shd.MeshConfig(data=1), jax.devices()[:1], seen)
    return out, seen


def test_the_clamp_binds_on_a_fair_share_of_the_routed_pre_activations(one_device):
    _, seen = one_device
    p1, p3 = (np.concatenate([s[i].ravel() for s in seen]) for i in (0, 1))
    assert p1.size >= 2 * 16 * 16 * CONF.num_experts_per_tok * CONF.expert_intermediate_size  # both layers' rows
    for clamped in (p1 > LIMIT, p3 > LIMIT, p3 < -LIMIT):
        assert 0.02 < clamped.mean() < 0.5


def test_expert_and_tensor_mesh_equals_one_device(one_device):
    logits, aux, loss, step_aux, grads, local_experts = _logits_and_step(MESH, jax.devices())
    want_logits, want_aux, want_loss, want_step_aux, want_grads, _ = one_device[0]
    assert local_experts == {CONF.num_local_experts // MESH.expert}  # the experts are split over the expert axis
    valid = (step.unpair(_batch())["segment_ids"] > 0)
    np.testing.assert_allclose(logits[valid], want_logits[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([aux, loss, step_aux], [want_aux, want_loss, want_step_aux], rtol=1e-5, atol=1e-6)
    flat, want_flat = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    for name, g, w in zip(names, flat, want_flat):
        scale = float(np.abs(w).max())
        assert scale > 0, name  # every parameter (sinks and biases included) gets a gradient
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * scale + 1e-7, err_msg=name)


@pytest.mark.slow
def test_lora_dpop_on_the_expert_mesh_starts_at_log_2_and_learns():
    """Slow: 14 s of CPU cold (its own compile; 36 s wall on the loaded 2-core machine), 7 s with a warm
    compilation cache."""
    config = CONF.replace(lora_rank=4, lora_alpha=8.0)
    assert {"w1", "w3", "w2", "q_proj"} <= set(config.lora_targets)
    mesh = shd.make_mesh(MESH, config, jax.devices())
    base_sh, ad_sh = lora.split(shd.param_shardings(config, mesh, MESH))
    base = jax.device_put(_params(), base_sh)
    adapters = jax.jit(lambda k: lora.init_adapters(lora.split(model.param_shapes(config))[1], k),
                       out_shardings=ad_sh)(jax.random.key(3))
    opt = optax.adam(1e-2)
    state_sh = step.state_shardings(opt, adapters, ad_sh, mesh)
    state = step.init_state(opt, adapters, state_sh, seed=0)
    batch = shd.put_batch(_batch(), mesh=mesh, mesh_cfg=MESH)
    loss_cfg = LossSection(type="dpop", beta=0.3, dpop_lambda=50.0)
    fn = step.jit_train_step(state_sh, jax.tree.map(lambda x: x.sharding, batch), base_sh, config=config,
                             loss_cfg=loss_cfg, optimizer=opt)
    state, m1 = fn(state, batch, base, jnp.asarray(False))
    # B = 0: the policy is the reference, no margin and no DPOP penalty, -log sigmoid(0) = log 2 per pair.
    np.testing.assert_allclose(float(m1["loss/preference"]), math.log(2), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), math.log(2) + config.router_aux_loss_coef * float(m1["moe/aux_loss"]),
                               rtol=0, atol=1e-6)
    assert int(m1["applied"]) == 1 and float(m1["grad_norm"]) > 0
    moe_ad = state.params["layers"]["layer"]["block_sparse_moe"]
    assert all(float(jnp.abs(moe_ad[k]).max()) > 0 for k in ("w1_lora_b", "w3_lora_b", "w2_lora_b"))
    state, m2 = fn(state, batch, base, jnp.asarray(False))
    assert float(m2["rewards/margins"]) > 0 and np.isfinite(float(m2["loss"]))  # it learns the pairs
