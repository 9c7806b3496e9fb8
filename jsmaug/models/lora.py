"""Low-rank adapters (LoRA, arXiv 2106.09685) on the attention projections and on every expert, for DPOP with the
frozen base as the reference.

A targeted weight W (named after the HF projections: `q_proj`, `k_proj`, `v_proj`, `o_proj`, and the MLP's
`gate_proj`, `up_proj`, `down_proj`, dense or per expert; `w1`, `w3`, `w2` are Mixtral's names of the experts'
gate, up and down and name the same targets) is used as

    W_eff = W + (alpha / rank) * A @ B          A: (*batch, *in, rank)   B: (*batch, rank, *out)

where `batch` is the expert axis for expert weights (per-expert factors, (E, D, r) and (E, r, F)) and empty for
attention. The product is formed inside each layer, so every MoE dispatch path (dense, bucketed, blocked, ragged,
capacity; gspmd or all_to_all) sees an ordinary weight, and the adapters shard like their base weights. B starts
at zero, so at initialisation W_eff == W exactly and the policy IS the reference. The reference forward is the
base forward (`rank 0`): no second copy of the weights exists, online or precomputed.

The adapters live in the params tree beside their weights as `<name>_lora_a` / `<name>_lora_b`; `split` and
`combine` separate and rejoin them, and `merge` folds them into the base (the export).

QLoRA (arXiv 2305.14314): `quantize_base` stores every projection of a frozen base (all the names of `TARGETS`,
targeted or not) and, by default, the embedding table and an untied lm_head as a `quant.QuantizedArray`, grouped
along the contracted axis (the last input axis; the hidden axis for the tables); norms, biases and routers stay
as they are. `weights.weight` dequantizes a projection inside the layer, then adds A @ B; `decoder.embed_rows`
dequantizes only the looked-up rows of the table and `decoder.unembed_weight` the unembedding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jsmaug.models import quant

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w3", "w2")
# weight name -> (leading batch axes, input axes) of its per-layer shape; the remaining axes are outputs.
# gate_proj/up_proj/down_proj are the dense MLP's (D, F) / (F, D); w1/w3/w2 the experts' (E, D, F) / (E, F, D).
_SPLIT = {"q_proj": (0, 1), "k_proj": (0, 1), "v_proj": (0, 1), "o_proj": (0, 2), "gate_proj": (0, 1),
          "up_proj": (0, 1), "down_proj": (0, 1), "w1": (1, 1), "w3": (1, 1), "w2": (1, 1)}
# The number of output axes of each per-layer weight (q/k/v: heads and head_dim), beside _SPLIT's batch and inputs.
_OUTS = {"q_proj": 2, "k_proj": 2, "v_proj": 2}
# The experts' leaves keep Mixtral's names; a target of either name covers both the dense and the expert weight.
ALIASES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "gate_proj", "w3": "up_proj",
           "w2": "down_proj"}
_SUFFIXES = ("_lora_a", "_lora_b")


def is_target(name: str, targets) -> bool:
    """Whether the weight leaf `name` gets adapters under `targets` (HF names or Mixtral's w1/w3/w2)."""
    return name in targets or ALIASES.get(name) in targets


def factor_shapes(name: str, shape, axes, rank: int):
    """(A shape, A logical axes, B shape, B logical axes) for a per-layer weight of `shape` / `axes`."""
    nb, ni = _SPLIT[name]
    batch, ins, outs = shape[:nb], shape[nb:nb + ni], shape[nb + ni:]
    bax, iax, oax = axes[:nb], axes[nb:nb + ni], axes[nb + ni:]
    return (*batch, *ins, rank), (*bax, *iax, "lora"), (*batch, rank, *outs), (*bax, "lora", *oax)


def a_init(name: str):
    """A ~ N(0, 1 / fan_in): the adapter's input projection starts at the scale of its inputs."""
    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[-1 - _SPLIT[name][1]:-1])
        return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
    return init


def delta(name: str, a, b):
    """A @ B over the rank, with any leading (layer, expert) axes: the shape of the base weight."""
    ni = _SPLIT[name][1]
    lead = a.shape[:a.ndim - 1 - ni]
    ins, outs, r = a.shape[len(lead):-1], b.shape[len(lead) + 1:], a.shape[-1]
    a2 = a.reshape(*lead, math.prod(ins), r)
    b2 = b.reshape(*lead, r, math.prod(outs))
    return jnp.einsum("...ir,...ro->...io", a2, b2).reshape(*lead, *ins, *outs)


def _is_adapter(key: str) -> bool:
    return key.endswith(_SUFFIXES)


def split(params):
    """(base, adapters): the same nested dicts, the adapter leaves in one and everything else in the other."""
    base, adapters = {}, {}
    for k, v in params.items():
        if isinstance(v, dict):
            b, a = split(v)
            if b:
                base[k] = b
            if a:
                adapters[k] = a
        elif _is_adapter(k):
            adapters[k] = v
        else:
            base[k] = v
    return base, adapters


def combine(base, adapters):
    """The inverse of `split`."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def merge(base, adapters, alpha: float, rank: int, quantized_dtype=jnp.float32):
    """The base with every adapter folded in (W + alpha / rank * A @ B, in the base's dtype): the tree of a
    model without adapters, for the export. A quantized base weight is dequantized, into `quantized_dtype`."""
    scale = alpha / rank
    out = {}
    for k, v in base.items():
        if isinstance(v, dict):
            out[k] = merge(v, adapters.get(k, {}), alpha, rank, quantized_dtype)
            continue
        if quant.is_quantized(v):
            v = v.dequantize(quantized_dtype)
        if k + "_lora_a" in adapters:
            d = delta(k, adapters[k + "_lora_a"].astype(jnp.float32), adapters[k + "_lora_b"].astype(jnp.float32))
            out[k] = (v.astype(jnp.float32) + scale * d).astype(v.dtype)
        else:
            out[k] = v
    return out


# The top-level tables and the axis each is quantized along: D, the hidden axis, for both. The embedding (V, D)
# grouped along D lets a look-up dequantize only the gathered rows (`quant.take_rows`), and D is also the axis the
# tied unembedding h @ E.T contracts; the untied lm_head (D, V) contracts D, its axis 0.
EMBEDDINGS = {"embed_tokens": 1, "lm_head": 0}


def quantize_base(base, fmt: str, group: int = quant.DEFAULT_GROUP, embeddings: bool = True,
                  _path: tuple[str, ...] = ()):
    """The base with every projection weight (a name of `_SPLIT`) in `fmt` storage, grouped along its contracted
    axis (its last input axis: o_proj's head_dim, the experts' hidden axis), described per layer (`quant.unstack`)
    so that the scan over the stacked layers sees one layer's weight; with `embeddings` (the default) also the
    embedding table and an untied lm_head, both grouped along the hidden axis (`EMBEDDINGS`). Raises
    quant.QuantError naming the weight's path when `group` does not divide its contracted axis; traceable, so
    `jax.eval_shape` checks a whole model's shapes before anything is built.

    Why the embeddings by default: in a small or mid-sized model they are a large share of the base (55% of the
    bench's 29.8M step model, 21% of SmolLM2-135M, 0.6% of Mixtral-8x7B), so a base with float32 embeddings
    cannot come near 4 bits a weight where the tables dominate; the look-up gathers packed rows and the
    unembedding dequantizes in the compute dtype like every other weight, so the cost is the table's rounding
    (bitsandbytes' QLoRA leaves them unquantized; `embeddings=False` does the same here)."""
    out = {}
    for k, v in base.items():
        path = (*_path, k)
        if isinstance(v, dict):
            out[k] = quantize_base(v, fmt, group, embeddings, path)
        elif k in _SPLIT and not quant.is_quantized(v):
            nb, ni = _SPLIT[k]
            lead = v.ndim - (nb + ni + _OUTS.get(k, 1))  # the stacked layers' axis
            q = quant.quantize(v, fmt, lead + nb + ni - 1, group, name="/".join(path))
            out[k] = quant.unstack(q, lead)
        elif embeddings and not _path and k in EMBEDDINGS and not quant.is_quantized(v):
            out[k] = quant.quantize(v, fmt, EMBEDDINGS[k], group, name=k)
        else:
            out[k] = v
    return out


def init_adapters(adapter_shapes, key):
    """Fresh adapters for a tree of ShapeDtypeStructs (`split(param_shapes(config))[1]`): A random, B zero."""
    leaves = jax.tree_util.tree_flatten_with_path(adapter_shapes)[0]
    keys = jax.random.split(key, max(len(leaves), 1))
    out = {}
    for (path, sds), k in zip(leaves, keys):
        name = path[-1].key
        value = (a_init(name[:-len("_lora_a")])(k, sds.shape, sds.dtype) if name.endswith("_lora_a")
                 else jnp.zeros(sds.shape, sds.dtype))
        node = out
        for p in path[:-1]:
            node = node.setdefault(p.key, {})
        node[name] = value
    return out
