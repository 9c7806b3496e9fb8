"""A frozen NF4 base, exported as it is: Hugging Face's folder layout with bitsandbytes' 4-bit serialization, the
form in which transformers saves and loads a `load_in_4bit` model (and vLLM serves one), so the QLoRA base that a
run trained on can be loaded, served or resumed without quantizing again.

    jsmaug export --quantized --ckpt_dir CKPT --out_dir OUT [--step N] [--dtype float32]

CKPT is a converter checkpoint made with `jsmaug convert --quantize nf4`, or a QLoRA training workdir (then its
base, quantized as the run quantized it; the adapters go out separately with `jsmaug export --peft`, and
`PeftModel.from_pretrained(base, adapters)` puts them back on top, as the run trained them).

**Which tensors are 4-bit.** Exactly those transformers turns into `bnb.nn.Linear4bit` when it loads a 4-bit
model: every `nn.Linear` of the attention (q/k/v/o) and of the dense MLPs (gate/up/down), each stored as

    <name>.weight                                  uint8 (n / 2, 1): codes, the first of each pair in the HIGH nibble
    <name>.weight.absmax                           float32 (n / blocksize,): each block's absmax
    <name>.weight.quant_map                        float32 (16,): NF4's levels
    <name>.weight.quant_state.bitsandbytes__nf4    uint8: JSON {"quant_type", "blocksize", "dtype", "shape"}

(n = out x in; blocks of `blocksize` consecutive values of the (out, in) weight, i.e. along the input axis, where
jsmaug's groups are too; no double quantization). Everything else is written in `--dtype` (default: the dtype the
base was quantized from): norms, biases, routers, and the parts transformers never quantizes: the embedding,
`lm_head`, and the MoE experts (transformers 5 keeps them as fused 3-D parameters, not `nn.Linear`, so its
bitsandbytes path leaves them unquantized). Where jsmaug stores those quantized (its QLoRA quantizes the experts
and, by default, the embeddings), they are written dequantized: the values the run computed with, in `--dtype`.

**Exactly as trained.** A 4-bit tensor is re-derived from jsmaug's dequantized weight in HF's (out, in) order:
its absmax per block (each non-empty group holds a value at +-1 times its scale, so this is jsmaug's bfloat16
scale, exactly) and each value's level. The writer then checks that the levels times the absmax give back
jsmaug's dequantized weight bit for bit, and refuses the tensor if not (jsmaug's groups would not line up with
bitsandbytes' blocks). So bitsandbytes dequantizes to exactly the weights the run used (tests/test_export_bnb.py).
jsmaug's int8 and int4 formats have no bitsandbytes 4-bit form and are refused with the way out (merged or
PEFT exports).
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

import numpy as np

from jsmaug.hf import layout, write
from jsmaug.hf.layout import CheckpointError
from jsmaug.models import quant
from jsmaug.models.config import ModelConfig, layer_groups

# The leaves whose HF module is an nn.Linear that transformers' bitsandbytes path quantizes (dense MLPs only:
# experts live under block_sparse_moe/ and are not Linear modules in transformers 5).
LINEAR_LEAVES = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
                 "mlp/up_proj", "mlp/down_proj")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes
STATE_KEY = "quant_state.bitsandbytes__nf4"
_MIDPOINTS = (quant.NF4_LEVELS[1:] + quant.NF4_LEVELS[:-1]) / 2


def quantization_config(compute_dtype: str) -> dict:
    """config.json's `quantization_config`, as transformers writes it for a `load_in_4bit` NF4 model."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


def check_base(config: ModelConfig, base, source: str) -> int:
    """The base's NF4 group (bitsandbytes' block size), after checking that every Linear weight is NF4 in a group
    bitsandbytes has; one error naming the leaf and the way out otherwise."""
    if config.model_type == "gpt_oss":
        raise CheckpointError(f"{source}: gpt-oss's interleaved experts are written by the float export only; "
                              "export without --quantized")
    groups = set()
    for group, _sparse, _idx in layer_groups(config):
        for leaf in LINEAR_LEAVES:
            node = _find(base["layers"][group], leaf)
            if node is None:
                continue
            if not quant.is_quantized(node) or node.fmt != "nf4":
                what = f"{node.fmt}" if quant.is_quantized(node) else "not quantized"
                raise CheckpointError(
                    f"{source}: layers/{group}/{leaf} is {what}; --quantized writes an NF4 base in bitsandbytes' "
                    "4-bit form (convert with --quantize nf4, or train QLoRA with lora.base_quant: nf4); export "
                    "merged weights without --quantized, or the adapters with --peft")
            groups.add(node.group)
    if not groups:
        raise CheckpointError(f"{source}: no attention or MLP projection to write in 4 bits")
    (group,) = groups if len(groups) == 1 else (None,)
    if group not in BLOCKSIZES:
        raise CheckpointError(f"{source}: NF4 groups of {sorted(groups)}; bitsandbytes' blocks are one of "
                              f"{BLOCKSIZES} values (convert again with --quant_group 64)")
    return group


def _find(tree, path: str):
    for key in path.split("/"):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _slice(x, idx: tuple[int, ...]) -> np.ndarray:
    """x[idx] on the host, dequantized (float32) when x is quantized: the values the model computes with."""
    if not quant.is_quantized(x):
        return write.gather(x, *idx).astype(np.float32)
    lead = x.packed.ndim - len(x.shape)  # the stack axes the static shape does not list
    inner = len(idx) - lead  # indices into the weight's own leading axes (an expert)
    q = quant.QuantizedArray(write.gather(x.packed, *idx), write.gather(x.scales, *idx), x.fmt, x.shape[inner:],
                             x.axis - inner, x.group)
    return np.asarray(quant.dequantize(q, np.float32))


def encode(w_hf: np.ndarray, blocksize: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes packed two per byte, high nibble first, as (n / 2, 1) uint8; absmax per block, float32) of an
    (out, in) float32 weight whose values are NF4 levels times one scale per block; raises if they are not."""
    blocks = w_hf.reshape(-1, blocksize)
    absmax = np.max(np.abs(blocks), axis=1).astype(np.float32)
    safe = np.where(absmax > 0, absmax, 1.0)[:, None]
    codes = np.searchsorted(_MIDPOINTS, blocks / safe, side="right").astype(np.uint8)
    if not np.array_equal(quant.NF4_LEVELS[codes] * absmax[:, None], blocks):
        bad = int(np.argmax(np.any(quant.NF4_LEVELS[codes] * absmax[:, None] != blocks, axis=1)))
        raise CheckpointError(f"{name}: block {bad} of {blocksize} values is not NF4 levels times one scale: "
                              "jsmaug's quantization groups do not line up with bitsandbytes' blocks here")
    flat = codes.reshape(-1)
    return ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8).reshape(-1, 1), absmax


def _state_bytes(shape: tuple[int, ...], blocksize: int, dtype: str) -> np.ndarray:
    text = json.dumps({"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype, "shape": list(shape)})
    return np.frombuffer(text.encode(), np.uint8)


def tensors(config: ModelConfig, base, dtype, blocksize: int
            ) -> Iterator[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(name, shape, numpy dtype, thunk) of every tensor of the export, in the hub's order; each thunk gathers and
    converts one tensor (one layer's slice, or one expert's) only."""
    np_dtype = np.dtype(dtype)
    positions = layout.layer_positions(config)
    for entry, n in layout.hub_order(config):
        if entry.fused is not None:  # gpt-oss's interleaved experts: the float export's own code
            raise CheckpointError(f"{config.model_type}: --quantized is not written for this family's experts")
        if n is None:
            node, idx = _find(base, entry.leaf), ()
        else:
            group, _, j = positions[n]
            node, idx = _find(base["layers"][group], entry.leaf), (j,)
        for e, name in enumerate(entry.names):
            at = idx + ((e,) if len(entry.names) > 1 else ())
            dense = lambda node=node, at=at, entry=entry: write.to_hf(_slice(node, at), entry)  # noqa: E731
            if n is not None and entry.leaf in LINEAR_LEAVES:
                yield from _bnb_tensors(name, entry.hf_shape, dense, blocksize, np_dtype.name)
            else:
                yield name, entry.hf_shape, np_dtype, lambda dense=dense: dense().astype(np_dtype)


def _bnb_tensors(name: str, shape, dense: Callable[[], np.ndarray], blocksize: int, dtype_name: str):
    """The four tensors of one 4-bit Linear weight; the codes and absmax are encoded once, on first use."""
    n = int(np.prod(shape))
    cache: dict[str, np.ndarray] = {}

    def part(key):
        def fetch():
            if key not in cache:
                cache["codes"], cache["absmax"] = encode(np.ascontiguousarray(dense()), blocksize, name)
            return cache.pop(key)
        return fetch

    state = _state_bytes(shape, blocksize, dtype_name)
    yield name, (n // 2, 1), np.dtype(np.uint8), part("codes")
    yield name + ".absmax", (n // blocksize,), np.dtype(np.float32), part("absmax")
    yield name + ".quant_map", (16,), np.dtype(np.float32), lambda: quant.NF4_LEVELS.copy()
    yield name + "." + STATE_KEY, state.shape, np.dtype(np.uint8), lambda state=state: state.copy()


def load_base(ckpt_dir, step: int | None = None) -> tuple[ModelConfig, object, str]:
    """(model config without adapters, the NF4 base with its QuantizedArrays, the dtype it was quantized from) of
    a converter checkpoint made with `--quantize` or of a QLoRA workdir (its base as the run computed with it)."""
    from jsmaug.paths import absolute
    from jsmaug.train import checkpoint, quantized_base

    path = absolute(ckpt_dir)
    config = checkpoint.read_model_config(path, step)  # names a missing folder or a non-checkpoint
    if config.lora_rank:
        base_config, base, _adapters = checkpoint.load_lora_parts(path, config, step)
        return base_config, base, base_config.param_dtype
    rec = quantized_base.read_record(path) if (path / "model_config.json").exists() else None
    if rec is None:
        raise CheckpointError(f"{path}: holds no quantized base (neither a QLoRA workdir nor a `jsmaug convert "
                              "--quantize` checkpoint); export it without --quantized")
    config, base = checkpoint.load_params(path, quantized=True)
    return config, base, rec["quantized_from"]
