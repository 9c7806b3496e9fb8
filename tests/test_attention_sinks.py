"""Attention sinks (gpt-oss: one learned logit per query head in each softmax's denominator). The `xla` kernel
against transformers' own gpt_oss `eager_attention_forward` (packing, padding, a window, GQA); `chunked` and
`splash` against `xla` in values and in the gradients of q, k, v and the sinks; the sinks' gradient against central
finite differences of transformers' function in float64; `auto` and `cudnn` with sinks; and the decoder's
Attention module of a gpt_oss config (biases, sinks, sliding and full) against GptOssAttention, with and without
the KV cache, its sinks' and biases' gradients against finite differences."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.errors import ConfigError
from jsmaug.models import attention, splash

RNG = np.random.default_rng(0)


def _segments(b, s):
    seg = np.ones((b, s), np.int32)
    seg[0, s // 3: 2 * s // 3] = 2  # three packed segments in row 0
    seg[0, 2 * s // 3:] = 3
    seg[1, s - s // 5:] = 0  # right padding in row 1
    return jnp.asarray(seg)


def _inputs(b, s, h, kv, dh, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.normal(size=(b, s, n, dh)), jnp.float32) for n in (h, kv, kv, h))
    sinks = jnp.asarray(rng.normal(size=(h,)) * 2.0, jnp.float32)  # some rows dominated by the sink
    return q * 2.0, k, v, w, sinks


def _hf_eager(q, k, v, mask, sinks, dtype):
    """transformers' gpt_oss eager_attention_forward on (B, S, H, Dh) arrays and a boolean (B, S, T) mask."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    h, kv, dh = q.shape[2], k.shape[2], q.shape[3]
    module = torch.nn.Module()
    module.sinks = torch.nn.Parameter(torch.tensor(np.asarray(sinks), dtype=dtype), requires_grad=False)
    module.num_key_value_groups = h // kv
    module.eval()
    t = [torch.tensor(np.asarray(x), dtype=dtype).transpose(1, 2) for x in (q, k, v)]
    additive = torch.where(torch.tensor(np.asarray(mask))[:, None], torch.tensor(0.0, dtype=dtype),
                           torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    out, _ = eager_attention_forward(module, *t, additive, scaling=dh ** -0.5)
    return out, module.sinks


@pytest.mark.parametrize("window", [None, 5])
def test_xla_equals_transformers_gpt_oss_eager_attention(window):
    """Every row, fully masked padding queries included (both give them 0: the sink takes the whole softmax)."""
    q, k, v, _, sinks = _inputs(2, 23, 4, 2, 8)
    seg = _segments(2, 23)
    mask = attention.mask_BxSxT(seg, window)
    want, _ = _hf_eager(q, k, v, mask, sinks, __import__("torch").float32)
    got = attention.xla_attention(q, k, v, mask, sinks)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-6, rtol=0)
    plain = attention.xla_attention(q, k, v, mask)  # the sinks do change the output
    assert float(jnp.max(jnp.abs(plain - got))) > 0.1


CASES = {  # b, s, heads, kv heads, head_dim, window, block
    "gqa_packed_padded": (2, 37, 4, 2, 8, None, 8),
    "mqa_window_over_blocks": (2, 45, 4, 1, 8, 13, 8),
}
PATHS = {
    "chunked": lambda q, k, v, seg, window, block, sinks: attention.chunked_attention(q, k, v, seg, window, block,
                                                                                        sinks),
    "splash": lambda q, k, v, seg, window, block, sinks: splash.splash_attention(q, k, v, seg, window, 128,
                                                                                  interpret=True, sinks_H=sinks),
}


@pytest.mark.parametrize("path,name", [("chunked", "mqa_window_over_blocks"), ("splash", "gqa_packed_padded")])
def test_kernels_with_sinks_equal_xla_in_values_and_gradients(path, name):
    b, s, h, kv, dh, window, block = CASES[name]
    q, k, v, w, sinks = _inputs(b, s, h, kv, dh, seed=1)
    seg = _segments(b, s)
    real = (seg > 0)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v, sinks: jnp.sum(jnp.where(real, fn(q, k, v, sinks), 0.0) * w)

    ref = loss(lambda q, k, v, sinks: attention.xla_attention(q, k, v, attention.mask_BxSxT(seg, window), sinks))
    got = loss(lambda q, k, v, sinks: PATHS[path](q, k, v, seg, window, block, sinks))
    lr, gr = jax.jit(jax.value_and_grad(ref, (0, 1, 2, 3)))(q, k, v, sinks)
    lg, gg = jax.jit(jax.value_and_grad(got, (0, 1, 2, 3)))(q, k, v, sinks)
    np.testing.assert_allclose(lg, lr, rtol=1e-5, atol=1e-4)
    for name_, a, b_ in zip("qkv", gg[:3], gr[:3]):
        np.testing.assert_allclose(a, b_, atol=2e-5, rtol=1e-4, err_msg=name_)
    np.testing.assert_allclose(gg[3], gr[3], atol=2e-5, rtol=1e-4, err_msg="sinks")
    assert float(jnp.min(jnp.abs(gr[3]))) > 1e-3  # every head's sink gets a gradient


def test_splash_with_sinks_under_a_mesh_equals_xla():
    """The kernel under shard_map: rows over data, heads (and their sinks) over tensor=4, the 2 kv heads repeated."""
    from jsmaug.parallel import mesh_context, sharding as shd

    mesh = shd.make_mesh(shd.MeshConfig(data=2, tensor=4), devices=jax.devices())
    b, s, h, kv, dh = 4, 24, 4, 2, 8
    q, k, v, _, sinks = _inputs(b, s, h, kv, dh, seed=5)
    seg = jnp.concatenate([_segments(2, s), _segments(2, s)[::-1]])
    real = (seg > 0)[:, :, None, None]

    def f(q, k, v, sinks):
        with mesh_context.mesh_scope(mesh, ("data", "fsdp", "expert")):
            return jnp.where(real, splash.splash_attention(q, k, v, seg, None, 128, sinks_H=sinks), 0.0)

    got = jax.jit(f)(q, k, v, sinks)
    ref = jnp.where(real, attention.xla_attention(q, k, v, attention.mask_BxSxT(seg, None), sinks), 0.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_sinks_gradient_equals_finite_differences_of_transformers_function():
    """d loss / d sinks of `xla` and `chunked` (float32, autodiff / the hand-written VJP) against central
    differences of transformers' eager function in float64."""
    import torch

    b, s, h, kv, dh = 2, 19, 4, 2, 8
    q, k, v, w, sinks = _inputs(b, s, h, kv, dh, seed=2)
    seg = _segments(b, s)
    mask = attention.mask_BxSxT(seg, 6)
    w_t = torch.tensor(np.asarray(w), dtype=torch.float64)

    def hf_loss(sinks_np):
        out, _ = _hf_eager(q, k, v, mask, sinks_np, torch.float64)
        return float((out * w_t).sum())

    eps = 1e-5
    fd = np.array([(hf_loss(np.asarray(sinks, np.float64) + eps * np.eye(h)[i])
                    - hf_loss(np.asarray(sinks, np.float64) - eps * np.eye(h)[i])) / (2 * eps) for i in range(h)])
    grads = {
        "xla": jax.grad(lambda sk: jnp.sum(attention.xla_attention(q, k, v, mask, sk) * w))(sinks),
        "chunked": jax.grad(lambda sk: jnp.sum(attention.chunked_attention(q, k, v, seg, 6, 8, sk) * w))(sinks),
    }
    for name, g in grads.items():
        np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-4, atol=1e-5, err_msg=name)


def test_auto_never_picks_a_kernel_without_sinks_and_cudnn_refuses_them():
    assert attention.resolve_impl("auto", "bfloat16", 64, "gpu", sinks=False)[0] == "cudnn"
    path, why = attention.resolve_impl("auto", "bfloat16", 64, "gpu", sinks=True)
    assert path == "chunked" and "sinks" in why
    assert attention.resolve_impl("auto", "bfloat16", 64, "tpu", sinks=True)[0] == "splash"
    assert attention.resolve_impl("auto", "float32", 64, "cpu", seq_len=64, sinks=True)[0] == "xla"
    with pytest.raises(ConfigError, match="attention_impl=cudnn: cuDNN's fused attention .* has no attention sinks"):
        attention.resolve_impl("cudnn", "bfloat16", 64, "gpu", sinks=True)


# ---------------------------------------------------------------------------------------------- the module

def _gpt_oss_attention(layer_type):
    """A gpt_oss config (biases, sinks, a window of 5, yarn RoPE), transformers' GptOssAttention with random
    weights and jsmaug's params holding the same values."""
    import torch
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

    from jsmaug.models import families

    hf_cfg = GptOssConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
                          num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                          rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, beta_fast=8.0,
                                               beta_slow=1.0, truncate=False, original_max_position_embeddings=16))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    module = GptOssAttention(hf_cfg, layer_idx=hf_cfg.layer_types.index(layer_type)).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 1.0))
    config = families.from_hf_dict(hf_cfg.to_dict())
    assert config.attention_sinks and config.qkv_bias and config.o_bias and config.rope_type == "yarn"
    d, h, kv, dh = 32, 4, 2, 8
    w = {n: p.detach().numpy().astype(np.float32) for n, p in module.named_parameters()}
    params = {"q_proj": w["q_proj.weight"].T.reshape(d, h, dh), "k_proj": w["k_proj.weight"].T.reshape(d, kv, dh),
              "v_proj": w["v_proj.weight"].T.reshape(d, kv, dh), "o_proj": w["o_proj.weight"].T.reshape(h, dh, d),
              "q_proj_bias": w["q_proj.bias"].reshape(h, dh), "k_proj_bias": w["k_proj.bias"].reshape(kv, dh),
              "v_proj_bias": w["v_proj.bias"].reshape(kv, dh), "o_proj_bias": w["o_proj.bias"],
              "sinks": w["sinks"]}
    return hf_cfg, module, config, jax.tree.map(jnp.asarray, params)


def _hf_module_out(hf_cfg, module, x, positions, mask, dtype):
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    module = module.to(dtype)
    xt = torch.tensor(np.asarray(x), dtype=dtype)
    cos, sin = GptOssRotaryEmbedding(hf_cfg)(xt, torch.tensor(np.asarray(positions)))
    additive = torch.where(torch.tensor(np.asarray(mask))[:, None], torch.tensor(0.0, dtype=dtype),
                           torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    out, _ = module(xt, (cos.to(dtype), sin.to(dtype)), additive)
    return out


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_decoder_attention_equals_gpt_oss_attention_with_and_without_the_cache(layer_type):
    """jsmaug's Attention (the layer switch `sliding` picks the window) against GptOssAttention on packed, padded
    rows longer than the window; a prefill through the KV cache path and a one-token step after it give the
    same rows."""
    import torch

    from jsmaug.models import layer, rope

    hf_cfg, module, config, params = _gpt_oss_attention(layer_type)
    sliding = layer_type == "sliding_attention"
    b, s = 2, 14
    x = jnp.asarray(np.random.default_rng(3).normal(size=(b, s, 32)), jnp.float32)
    seg = _segments(b, s)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope.cos_sin(positions, config)
    attn = layer.Attention(config)
    got, _ = attn.apply({"params": params}, x, cos, sin, seg, None, None, jnp.asarray(sliding))
    mask = attention.mask_BxSxT(seg, config.sliding_window if sliding else None)
    want = _hf_module_out(hf_cfg, module, x, positions, mask, torch.float32)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], want.detach().numpy()[real], atol=2e-5, rtol=0)

    # The decoding path: keys and values written into a (B, T, K, Dh) cache, the mask over its slots.
    t = s + 2
    cache = (jnp.zeros((b, t, 2, 8)), jnp.zeros((b, t, 2, 8)))
    kv_valid = jnp.pad(seg, ((0, 0), (0, t - s)))
    window = config.sliding_window if sliding else None
    cmask = attention.mask_BxSxT(seg[:, :s - 1], window, kv_segment_ids_BxT=kv_valid,
                                 kv_index_BxT=jnp.arange(t)[None])
    pre, cache = attn.apply({"params": params}, x[:, :s - 1], cos[:, :s - 1], sin[:, :s - 1], cmask, cache, 0,
                            jnp.asarray(sliding))
    step_mask = attention.mask_BxSxT(seg[:, s - 1:], window, kv_segment_ids_BxT=kv_valid,
                                     q_index_BxS=jnp.full((b, 1), s - 1), kv_index_BxT=jnp.arange(t)[None])
    last, _ = attn.apply({"params": params}, x[:, s - 1:], cos[:, s - 1:], sin[:, s - 1:], step_mask, cache, s - 1,
                         jnp.asarray(sliding))
    both = np.concatenate([np.asarray(pre), np.asarray(last)], axis=1)
    np.testing.assert_allclose(both[real], np.asarray(got)[real], atol=1e-5, rtol=0)


def test_sinks_and_biases_gradients_equal_finite_differences_of_gpt_oss_attention():
    """d(sum of the outputs times fixed weights) / d(sinks, q/o biases) of jsmaug's Attention (float32 autodiff)
    against central differences of GptOssAttention in float64."""
    import torch

    from jsmaug.models import layer, rope

    hf_cfg, module, config, params = _gpt_oss_attention("sliding_attention")
    b, s = 2, 11
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(b, s, 32)), jnp.float32)
    w = rng.normal(size=(b, s, 32))
    seg = _segments(b, s)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin = rope.cos_sin(positions, config)
    real = np.asarray(seg > 0)[..., None]

    def loss(p):
        out, _ = layer.Attention(config).apply({"params": p}, x, cos, sin, seg, None, None, jnp.asarray(True))
        return jnp.sum(jnp.where(real, out, 0.0) * w)

    grads = jax.grad(loss)(params)
    mask = attention.mask_BxSxT(seg, config.sliding_window)
    w_t = torch.tensor(np.where(real, w, 0.0), dtype=torch.float64)
    module = module.double()
    hf_names = {"sinks": "sinks", "q_proj_bias": "q_proj.bias", "o_proj_bias": "o_proj.bias"}
    eps = 1e-6
    for ours, theirs in hf_names.items():
        param = dict(module.named_parameters())[theirs]
        picks = range(param.numel()) if ours == "sinks" else (0, 5, param.numel() - 1)
        for i in picks:
            fd = []
            for sign in (1, -1):
                with torch.no_grad():
                    param.view(-1)[i] += sign * eps
                    fd.append(float((_hf_module_out(hf_cfg, module, x, positions, mask, torch.float64) * w_t).sum()))
                    param.view(-1)[i] -= sign * eps
            want = (fd[0] - fd[1]) / (2 * eps)
            got = float(np.asarray(grads[ours]).reshape(-1)[i])
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4), (ours, i, got, want)
    assert float(jnp.min(jnp.abs(grads["sinks"]))) > 1e-3
