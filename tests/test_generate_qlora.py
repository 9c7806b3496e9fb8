"""Generation from a QLoRA policy: a base quantized by `lora.quantize_base` (packed NF4 projections, embedding
table and untied lm_head) under non-zero LoRA adapters. Both decoding steps (the fast one, `decode_weights` +
`fast_decode.fast_step`, and the decoder's own `decode`) give, greedy, token for token what the same model gives with its
base dequantized to float by quant's own `dequantize` (the reference: plain params, `decoder.decode`), and the
fast step's first logits equal the dense model's full forward to 1e-5 in float32. Also a quantized base with no
adapters (rank 0), which the fast step used to refuse with an AttributeError on the packed leaves."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import config as cfg_lib, decoder as model, fast_decode, generate as gen, lora, quant

PROMPTS = [[1, 5, 9, 33, 12, 7], [1, 40, 41], [1, 8, 8, 9, 10, 11, 12, 13, 14, 15]]
GREEDY = gen.SamplingConfig(max_new_tokens=8, eos_id=None)
CONFIGS = {  # llama: tied table (the unembedding is the quantized embedding); mixtral: quantized experts, lm_head
    "llama": cfg_lib.tiny(model_type="llama", vocab_size=64, lora_rank=4, lora_alpha=8.0, tie_word_embeddings=True,
                          num_hidden_layers=1),
    # the dense dispatch: the cheapest MoE program to compile (the experts are merged before any dispatch)
    "mixtral": cfg_lib.tiny(vocab_size=64, lora_rank=4, lora_alpha=8.0, num_hidden_layers=1, moe_impl="dense"),
}


def _dequantized(tree):
    return jax.tree.map(lambda x: x.dequantize(jnp.float32) if quant.is_quantized(x) else x, tree,
                        is_leaf=quant.is_quantized)


@functools.lru_cache(maxsize=None)
def _policies(family):
    """(config, QLoRA policy, the same policy with its base dequantized to float32, quantized base alone). The
    weights are drawn with NumPy into `param_shapes`' tree (init_params' compile took 5-9 s CPU here): norms 1,
    everything else, adapters' B included, N(0, 0.1^2)."""
    conf = CONFIGS[family]
    rng = np.random.default_rng(0)

    def draw(path, sds):
        norm = len(path) > 1 and "norm" in path[-2].key
        return jnp.asarray(np.ones(sds.shape) if norm else 0.1 * rng.standard_normal(sds.shape), jnp.float32)

    base, adapters = lora.split(jax.tree_util.tree_map_with_path(draw, model.param_shapes(conf)))
    qbase, float_base = _quantized_and_back(base)
    return conf, lora.combine(qbase, adapters), lora.combine(float_base, adapters), qbase


@jax.jit
def _quantized_and_back(base):
    """The NF4 base (groups of 8) and that base dequantized to float32 by quant's `dequantize`."""
    qbase = lora.quantize_base(base, "nf4", 8)
    return qbase, _dequantized(qbase)


def _first_fast_logits(conf, params, ids_BxP, mask_BxP):
    """The logits of the first fast decoding step (the one after the prefill's token), and that token. The
    prefill and decode weights are generate's own compiled programs (the same shapes: a cache of P + 8 slots)."""
    p = ids_BxP.shape[1]
    token, pos, kv_valid, cache, _ = gen._prefill(conf, params, ids_BxP, mask_BxP, gen._program_key(GREEDY), p + 8,
                                                  True, gen.row_keys(0, range(len(ids_BxP))))
    kv_valid = kv_valid.at[:, p].set(1)
    step = jax.jit(fast_decode.fast_step, static_argnums=0)
    logits, _ = step(conf, gen.decode_weights(conf, params), token, pos, kv_valid, cache, p)
    return logits, token


@functools.partial(jax.jit, static_argnums=0)
def _forward_last(conf, params, ids_BxS, mask_BxS):
    positions = jnp.maximum(jnp.cumsum(mask_BxS, axis=1) - 1, 0)
    return model.forward(conf, params, ids_BxS, mask_BxS, positions=positions)[0][:, -1]


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_qlora_policy_generates_as_its_dequantized_model(family):
    conf, qpolicy, dense, qbase = _policies(family)
    assert gen.fast_step_applies(conf)
    want = gen.generate(conf, dense, PROMPTS, GREEDY, fast=False)  # float base, adapters applied in the layer
    assert gen.generate(conf, qpolicy, PROMPTS, GREEDY, fast=True) == want
    if family == "llama":  # the decoder's decode on the packed base (test_qlora holds its forward for mixtral)
        assert gen.generate(conf, qpolicy, PROMPTS, GREEDY, fast=False) == want

    # The first fast step's logits (packed base, adapters merged once) against the dense model's full forward
    # over prompt + first token: left-padded rows, their own positions.
    ids, mask = (jnp.asarray(a) for a in gen.left_pad(PROMPTS, 16))
    logits, token = _first_fast_logits(conf, qpolicy, ids, mask)
    assert np.asarray(token).tolist() == [row[0] for row in want]
    ext = jnp.concatenate([ids, token[:, None]], axis=1)
    ext_mask = jnp.concatenate([mask, jnp.ones((len(PROMPTS), 1), jnp.int32)], axis=1)
    ref = _forward_last(conf, dense, ext, ext_mask)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    # ...a tolerance far below what the adapters change (the same model with its adapters zeroed)
    base, adapters = lora.split(dense)
    plain = _forward_last(conf, lora.combine(base, jax.tree.map(jnp.zeros_like, adapters)), ext, ext_mask)
    assert float(jnp.max(jnp.abs(plain - ref))) > 1e-2


def test_quantized_base_without_adapters():
    """A packed base under a rank-0 config (no adapters): the fast step (the default for llama) generates what
    the dequantized base does (the reference: the LoRA config's decode with zero adapters, already compiled)."""
    conf, _, dense, qbase = _policies("llama")
    float_base, adapters = lora.split(dense)
    want = gen.generate(conf, lora.combine(float_base, jax.tree.map(jnp.zeros_like, adapters)), PROMPTS, GREEDY,
                        fast=False)
    assert gen.fast_step_applies(conf.replace(lora_rank=0))
    assert gen.generate(conf.replace(lora_rank=0), qbase, PROMPTS, GREEDY) == want
