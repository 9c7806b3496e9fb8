"""jsmaug's Mixtral against HF transformers' MixtralForCausalLM on the same weights."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from hf_fixtures import hf_forward, make_hf_checkpoint
from jsmaug import hf
from jsmaug.models import decoder as model

# One jitted forward shared by every test (the config is static: a frozen, hashable dataclass).
fwd = jax.jit(model.forward, static_argnums=0)

CASES = {
    # name: (HF config overrides, batch, seq)
    "gqa2_top2": (dict(), 2, 12),
    "mha_top1_3experts": (dict(num_key_value_heads=4, num_local_experts=3, num_experts_per_tok=1), 2, 10),
    "mqa_explicit_head_dim": (dict(num_key_value_heads=1, head_dim=16), 2, 9),
    "sliding_window": (dict(sliding_window=4, num_local_experts=5), 2, 14),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    overrides, b, s = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch_model = make_hf_checkpoint(path, seed=len(request.param), **overrides)
    config, params = hf.load(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(b, s))
    mask = np.ones((b, s), np.int64)
    mask[1, s - 3:] = 0  # right padding in the second row
    return request.param, torch_model, config, params, ids, mask


def test_logits_and_aux_match_hf(case):
    name, torch_model, config, params, ids, mask = case
    want_logits, want_aux = hf_forward(torch_model, ids, mask)
    logits, aux = fwd(config, params, ids, mask)
    logits = np.asarray(logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], want_logits[valid], atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(float(aux), want_aux, atol=1e-5, rtol=0, err_msg=name)


def test_no_padding_matches_hf(case):
    name, torch_model, config, params, ids, _ = case
    want_logits, want_aux = hf_forward(torch_model, ids)
    logits, aux = fwd(config, params, ids)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(float(aux), want_aux, atol=1e-5, rtol=0, err_msg=name)


def test_packed_segments_equal_separate_sequences(case):
    """Two sequences packed in one row (segment ids + restarted positions) give their unpacked logits."""
    name, _, config, params, ids, _ = case
    a, b = ids[0, :5], ids[1, :4]
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 5 + [2] * 4])
    pos = np.array([list(range(5)) + list(range(4))])
    packed_fwd = jax.jit(lambda p, i, s, q: model.forward(config, p, i, segment_ids=s, positions=q)[0])
    got = np.asarray(packed_fwd(params, packed, seg, pos))[0]
    want_a = np.asarray(fwd(config, params, a[None])[0])[0]
    want_b = np.asarray(fwd(config, params, b[None])[0])[0]
    np.testing.assert_allclose(got[:5], want_a, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[5:], want_b, atol=1e-5, err_msg=name)


def test_bfloat16_compute_close_to_float32(case):
    """bf16 compute (float32 master weights): measured max |logit diff| relative to the logit scale."""
    name, _, config, params, ids, mask = case
    want, _ = fwd(config, params, ids, mask)
    got, _ = fwd(config.replace(dtype="bfloat16"), params, ids, mask)
    valid = mask.astype(bool)
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want))[valid].max()
    scale = np.abs(np.asarray(want))[valid].max()
    # Measured ~1e-2 relative on these tiny random models; 5e-2 documents the budget in docs/library.md.
    assert err <= 5e-2 * max(scale, 1.0), (name, err, scale)


def _scan_unrolls(fn, *args) -> list[int]:
    """The `unroll` of every scan of fn's jaxpr whose length is the tiny config's 2 layers and whose carry holds
    the (2, 6, 32) hidden states (the layer scans), nested jaxprs included."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan" and eqn.params["length"] == 2 and any(
                    getattr(v.aval, "shape", None) == (2, 6, 32) for v in eqn.outvars):
                out.append(int(eqn.params["unroll"]))
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(jax.grad(fn))(*args).jaxpr)
    return out


def test_remat_and_logical_axes():
    from jsmaug.models import config as cfg_lib

    c = cfg_lib.tiny()
    params = model.init_params(c, jax.random.key(1))
    ids = jnp.arange(12).reshape(2, 6) % c.vocab_size

    def loss(p, config):
        logits, aux = model.forward(config, p, ids)
        return jnp.mean(logits ** 2) + aux

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g0 = grad(params, c)
    g1 = grad(params, c.replace(remat="full"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g0, g1)
    # scan_unroll: the layer scan unrolled (here fully: 2 layers), the same gradients
    unrolled = c.replace(scan_unroll=2)
    assert _scan_unrolls(lambda p: loss(p, c), params) == [1] * 2  # the scans of the 2 layers (forward, backward)
    assert _scan_unrolls(lambda p: loss(p, unrolled), params) == [2] * 2
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g0, grad(params, unrolled))
    axes = model.logical_axes(c)
    assert tuple(axes["layers"]["layer"]["block_sparse_moe"]["w1"]) == ("layers", "exp", "embed", "mlp")
    assert tuple(axes["embed_tokens"]) == ("vocab", "embed")
    # Every leaf has one logical name per dimension.
    jax.tree.map(lambda spec, p: None if len(spec) == p.ndim else pytest.fail(f"{spec} vs {p.shape}"),
                 axes, params, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
