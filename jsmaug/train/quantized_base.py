"""Converter checkpoints that hold a QLoRA base already quantized (`jsmaug convert --quantize`).

Such a checkpoint is the usual `model_config.json` + Orbax `params/`, where every leaf `lora.quantize_base`
quantizes (the projections and the embedding tables) is stored as `{"packed": uint8 / int8, "scales": bfloat16}`
in place of the float array, plus `quantization.json`, the record of how:

    {"format": "nf4", "group": 64, "embeddings": true, "scale_dtype": "bfloat16", "quantized_from": "float32"}

(`quantized_from`: the parameter dtype the values were in when quantized, the converter's --dtype, which is also
`model_config.json`'s param_dtype and the dtype of the leaves kept in float). The record is a side file, not a
model-config field, because it describes storage, not the architecture: `read_model_config` and everything that
compares architectures read the same config either way.

The static facts of each QuantizedArray (format, per-layer shape, axis, group) are not stored: they follow from
the model config and the record, through `lora.quantize_base` traced with `jax.eval_shape`, exactly as the run
that quantizes in place derives them. Only a QLoRA run (`lora.rank > 0`, `lora.base_quant` and
`lora.base_quant_group` equal to the record's) may start from such a checkpoint; anything else is refused with
one error (`refusal`), because the quantized values are a frozen base, not weights to train or export.
"""

from __future__ import annotations

import json

import jax
from etils import epath

from jsmaug.errors import CheckpointError
from jsmaug.models import lora, quant
from jsmaug.models.config import ConfigError, ModelConfig

RECORD = "quantization.json"


def record(fmt: str, group: int, dtype: str) -> dict:
    return {"format": fmt, "group": group if fmt != "int8" else 0, "embeddings": True, "scale_dtype": "bfloat16",
            "quantized_from": dtype}


def write_record(out_dir, rec: dict) -> None:
    (epath.Path(out_dir) / RECORD).write_text(json.dumps(rec, indent=2))


def read_record(path) -> dict | None:
    """The record of a converter checkpoint folder, None when it holds an unquantized model."""
    f = epath.Path(path) / RECORD
    if not f.exists():
        return None
    try:
        rec = json.loads(f.read_text())
        ok = rec["format"] in quant.FORMATS and isinstance(rec["group"], int) and isinstance(rec["embeddings"], bool)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{f}: not a quantization record ({type(err).__name__}: {err})") from err
    if not ok:
        raise CheckpointError(f"{f}: not a quantization record (format {rec.get('format')!r}, group "
                              f"{rec.get('group')!r}, embeddings {rec.get('embeddings')!r})")
    return rec


def describe(rec: dict) -> str:
    return f"{rec['format']}" + (f" in groups of {rec['group']}" if rec["format"] != "int8" else "")


def refusal(path, rec: dict) -> str:
    return (f"{path}: holds a base quantized to {describe(rec)} by `jsmaug convert --quantize` ({RECORD}): a "
            f"frozen base for QLoRA only (lora.rank > 0, lora.base_quant: {rec['format']}, lora.base_quant_group: "
            f"{rec['group'] or 64}); to train all weights, export or evaluate, convert the HF folder without "
            "--quantize")


def check_run(path, rec: dict, fmt: str, group: int) -> None:
    """A QLoRA run's `lora.base_quant` / `lora.base_quant_group` against the checkpoint's record (int8 has no
    group: any group matches)."""
    if fmt == "none":
        raise ConfigError(f"init_from {refusal(path, rec)}; this run has lora.base_quant: none")
    if fmt != rec["format"] or (fmt != "int8" and group != rec["group"]):
        raise ConfigError(f"init_from {path}: its base is quantized to {describe(rec)} ({RECORD}), but this run "
                          f"asks lora.base_quant: {fmt}, lora.base_quant_group: {group}; set lora.base_quant: "
                          f"{rec['format']}" + (f" and lora.base_quant_group: {rec['group']}" if rec["group"] else "")
                          + f", or convert again with --quantize {fmt} --quant_group {group}")


def abstract(config: ModelConfig, rec: dict):
    """The params tree as `quantize_base` makes it (QuantizedArrays of ShapeDtypeStructs)."""
    from jsmaug.models import decoder as model

    return jax.eval_shape(lambda p: lora.quantize_base(p, rec["format"], rec["group"] or quant.DEFAULT_GROUP,
                                                       rec["embeddings"]), model.param_shapes(config))


def to_storage(params):
    """QuantizedArray leaves as {"packed", "scales"} dicts: plain nested dicts of arrays, as Orbax stores them."""
    return jax.tree.map(lambda x: {"packed": x.packed, "scales": x.scales} if quant.is_quantized(x) else x, params,
                        is_leaf=quant.is_quantized)


def storage_target(abstract_tree, shardings=None):
    """Orbax's restore target: the storage form of `abstract_tree`, on `shardings` (a tree like it, e.g. a QLoRA
    plan's base shardings) when given."""
    def sds(s, sh=None):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)

    if shardings is None:
        tree = jax.tree.map(sds, abstract_tree)
    else:
        tree = jax.tree.map(sds, abstract_tree, shardings)
    return to_storage(tree)


def from_storage(stored, abstract_tree):
    """The restored storage tree back as QuantizedArrays, their static fields from `abstract_tree`."""
    def build(a, s):
        if quant.is_quantized(a):
            return quant.QuantizedArray(s["packed"], s["scales"], a.fmt, a.shape, a.axis, a.group)
        return s

    return jax.tree.map(build, abstract_tree, stored, is_leaf=quant.is_quantized)
