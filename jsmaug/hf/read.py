"""Hugging Face -> jsmaug: `load` reads an HF folder of any supported family (jsmaug/models/families.py) tensor by
tensor (plain reads, no mmap) and builds each stacked parameter one layer at a time into a preallocated device
array (donated update), so host memory stays near one layer's expert stack, never the model. Accepts the hub
layout (per-expert tensors) and transformers-5's fused layout (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`,
`mlp.gate.weight`); gpt-oss's experts in bf16/float32 or as the hub's MXFP4 blocks and scales, dequantized one
expert at a time (jsmaug/hf/mxfp4.py) straight into the layer's array in the parameter dtype; jsmaug/hf/layout.py
names the tensors. With `quantize` (`jsmaug convert --quantize`), the leaves a QLoRA base stores quantized are
quantized as they are read, one layer at a time (jsmaug/hf/quantized.py)."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jsmaug import paths
from jsmaug.models import families
from jsmaug.hf import layout, mxfp4, quantized
from jsmaug.hf.layout import CheckpointError, Entry
from jsmaug.models import quant
from jsmaug.models.config import ModelConfig

# ------------------------------------------------------------------------------------------------ reading

_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_NP_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
              "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
              "U8": np.dtype(np.uint8)}


class _SafetensorsFile:
    """Reads one tensor at a time with plain file reads (no mmap).

    safetensors' own reader memory-maps the whole file; every page it touches then stays in this process's RSS
    until the map closes, so reading a checkpoint tensor by tensor still shows the whole checkpoint in RSS.
    Explicit reads keep the footprint at one tensor.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header length {hlen})")
            try:
                header = json.loads(fh.read(hlen))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path}: not a safetensors file ({err})") from err
        header.pop("__metadata__", None)
        self.base = 8 + hlen
        self.entries = header

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor, or with `index` only its slice [index] along the first axis (read alone)."""
        e = self.entries[name]
        if e["dtype"] not in _NP_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        dtype = _NP_DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        shape = list(e["shape"])
        if index is not None:
            rows = shape.pop(0)
            if not 0 <= index < rows:
                raise IndexError(f"{self.path}: tensor {name} has {rows} rows, not {index + 1}")
            start, end = start + (end - start) // rows * index, start + (end - start) // rows * (index + 1)
        count = (end - start) // dtype.itemsize
        arr = np.fromfile(self.path, dtype=dtype, count=count, offset=self.base + start)
        if arr.size != count:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated (file shorter than its header says)")
        return arr.reshape(shape)


class Reader:
    """Lazy access to the tensors of an HF folder (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
            files = sorted(set(weight_map.values()))
            for fn in files:
                if not (hf_dir / fn).exists():
                    users = sorted(k for k, v in weight_map.items() if v == fn)
                    raise CheckpointError(f"{hf_dir / fn}: shard named in {index.name} is missing "
                                          f"(it holds {len(users)} tensors, e.g. {users[0]})")
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{hf_dir}: no model.safetensors.index.json and no *.safetensors file")
            weight_map = None
        self._handles = {}
        self.location: dict[str, str] = {}
        for fn in files:
            h = _SafetensorsFile(hf_dir / fn)
            self._handles[fn] = h
            for k in h.keys():
                self.location[k] = fn
        if weight_map is not None:
            for k, fn in weight_map.items():
                if k not in self.location:
                    raise CheckpointError(f"{hf_dir / fn}: tensor {k} is listed in the index but not in the file")
        self.read_bytes = 0
        self.read_count = 0

    def keys(self) -> set[str]:
        return set(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handles[self.location[name]].shape(name)

    def dtype_name(self, name: str) -> str:
        return self._handles[self.location[name]].entries[name]["dtype"]

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing")
        arr = self._handles[self.location[name]].get(name, index)
        self.read_bytes += arr.nbytes
        self.read_count += 1
        return arr


def _detect_layout(keys: set[str]) -> bool:
    """True for transformers-5's fused expert layout."""
    return any(".mlp.experts.gate_up_proj" in k for k in keys)


def _detect_mxfp4(keys: set[str]) -> bool:
    """True for gpt-oss's experts in MXFP4 (the hub's release)."""
    return any(layout.is_packed(k) for k in keys)


def _ignored(name: str) -> bool:
    # Old checkpoints saved RoPE buffers; transformers ignores them on load, and so do we.
    return name.endswith("rotary_emb.inv_freq")


def check_keys_and_shapes(reader: Reader, config: ModelConfig, fused: bool, mxfp4_experts: bool = False) -> None:
    expected = layout.hf_shapes(config, fused, mxfp4_experts)
    keys = {k for k in reader.keys() if not _ignored(k)}
    # Tied checkpoints may still carry lm_head; HF ignores it, so do we.
    unexpected = sorted(keys - set(expected) - {"lm_head.weight"})
    missing = sorted(set(expected) - keys)
    arch = families.to_hf_dict(config)["architectures"][0]
    if missing:
        raise CheckpointError(f"{reader.dir}: {len(missing)} tensor(s) missing for the config in config.json, "
                              f"first: {missing[0]}")
    if unexpected:
        raise CheckpointError(f"{reader.dir}: {len(unexpected)} unexpected tensor(s) (not in a {arch} with this "
                              f"config.json), first: {unexpected[0]} in {reader.location[unexpected[0]]}")
    for name, want in expected.items():
        dtype = reader.dtype_name(name)
        if layout.is_packed(name):
            if dtype != "U8":
                raise CheckpointError(f"{reader.dir / reader.location[name]}: tensor {name} has dtype {dtype}; "
                                      "MXFP4 blocks and scales are U8")
        elif dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{reader.dir / reader.location[name]}: tensor {name} has dtype {dtype}; model "
                                  f"weights are floating point ({', '.join(_FLOAT_DTYPES)})")
        got = reader.shape(name)
        if got != want:
            raise CheckpointError(f"{reader.dir / reader.location[name]}: tensor {name} has shape {got}, "
                                  f"config.json implies {want}")


_HALF = {"even": np.s_[..., 0::2], "odd": np.s_[..., 1::2], "mxfp4_even": np.s_[..., 0::2],
         "mxfp4_odd": np.s_[..., 1::2], "mxfp4": np.s_[...]}


def _mxfp4_tensor(reader: Reader, entry: Entry, shape: tuple[int, ...], dtype) -> np.ndarray:
    """gpt-oss's expert stack from MXFP4: one expert's blocks and scales read and dequantized at a time, in HF's
    (out, in) order, transposed to (in, out) and (gate_up) halved, into an array of `dtype`."""
    blocks, scales = entry.names
    out = np.empty(shape, dtype)
    for e in range(shape[0]):
        w = mxfp4.dequantize(reader.get(blocks, e), reader.get(scales, e), np.float32, name=f"{blocks} expert {e}")
        out[e] = w.T[_HALF[entry.fused]]
    return out


def _entry_tensor(reader: Reader, entry: Entry, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """One jsmaug leaf (or one layer's slice of a stacked leaf) of `shape`, in jsmaug's (in, out) orientation."""
    if entry.fused in _HALF and entry.fused.startswith("mxfp4"):
        return _mxfp4_tensor(reader, entry, shape, dtype)
    if entry.fused in _HALF:  # gpt-oss: gate and up interleaved on the last axis, already (in, out)
        return reader.get(entry.names[0])[_HALF[entry.fused]].reshape(shape)
    if entry.fused is not None:  # (E, 2F, D) = [gate; up] or (E, D, F): per expert (out, in)
        arr = reader.get(entry.names[0])
        if entry.fused != "down":
            f = arr.shape[1] // 2
            arr = arr[:, :f] if entry.fused == "gate" else arr[:, f:]
        return np.transpose(arr, (0, 2, 1)).reshape(shape)
    if len(entry.names) > 1:  # per-expert tensors, stacked on the expert axis
        return np.stack([reader.get(name).T for name in entry.names]).reshape(shape)
    arr = reader.get(entry.names[0])
    return (arr.T if entry.transposed else arr).reshape(shape)


def _leaf_paths(tree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(str(k.key) for k in path), leaf) for path, leaf in flat]


def _set_from_path(tree: dict, path: str, value) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _stack_into_device_array(layers: Iterator[np.ndarray], shape, dtype, sharding) -> jax.Array:
    """Builds a (L, ...) device array one layer at a time: host memory holds one layer, never the stack."""
    layer_sharding = None
    if sharding is not None:
        spec = sharding.spec
        layer_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    buf = quantized.zeros(shape, dtype, sharding)
    put = quantized.layer_put(sharding)
    for i, layer in enumerate(layers):
        arr = np.asarray(layer).astype(dtype, copy=False)
        if layer_sharding is not None:
            val = jax.make_array_from_callback(arr.shape, layer_sharding, lambda idx, a=arr: a[idx])
        else:
            val = jnp.asarray(arr)
        buf = put(buf, val, i)
    return buf


def _device_put(arr: np.ndarray, dtype, sharding) -> jax.Array:
    arr = np.asarray(arr).astype(dtype, copy=False)
    if sharding is None:
        return jnp.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _check_every_tensor_has_a_leaf(hf_dir, config: ModelConfig, leaf_paths: set[str], top, by_group) -> None:
    """A tensor of the layout with no parameter in jsmaug's model would be dropped silently: refused instead."""
    wanted = set(top) | {f"layers/{group}/{leaf}" for group, layers in by_group.items() for _, entries in layers
                         for leaf in entries}
    missing = sorted(wanted - leaf_paths)
    if missing:
        raise CheckpointError(f"{hf_dir}: jsmaug's {config.model_type} model has no parameter for {missing[0]} "
                              f"({len(missing)} such); its HF tensors would be dropped")


def read_config(hf_dir: str | os.PathLike, **overrides) -> ModelConfig:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: not found (an HF model folder has a config.json)")
    return families.from_hf_dict(_read_config_json(path), source=str(path), **overrides)


def _read_config_json(path: Path) -> dict:
    return paths.read_json_object(path, CheckpointError)


def load(hf_dir: str | os.PathLike, dtype: str | None = None, mesh=None, shardings=None,
         progress: bool = False, quantize: str | None = None, quant_group: int = 64,
         **config_overrides) -> tuple[ModelConfig, Any]:
    """Reads an HF folder of a supported family -> (ModelConfig, params).

    dtype: the parameter dtype to store (default: the checkpoint's config `torch_dtype`/`dtype`, else float32).
    mesh: a `jax.sharding.Mesh` with jsmaug's axes (`jsmaug.parallel.sharding.make_mesh`): params are placed with the
      default logical-axis rules. shardings: a pytree like the params of NamedShardings (wins over `mesh`).
      Either way each layer goes straight onto its devices; nothing is assembled on one device first.
    quantize: None, or a `quant.FORMATS` format: the leaves `lora.quantize_base(params, quantize, quant_group)`
      quantizes (projections and embedding tables) come back as `quant.QuantizedArray`s bit-identical to it, each
      quantized as it is read from its values in `dtype` (`shardings`, if given, are the unquantized params'; the
      packed values and scales take `quant.fit_sharding` of them).
    """
    hf_dir = Path(hf_dir)
    cfg_json = _read_config_json(hf_dir / "config.json") if (hf_dir / "config.json").exists() else {}
    if dtype is None:
        dtype = cfg_json.get("torch_dtype") or cfg_json.get("dtype") or "float32"
        dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    overrides = dict(config_overrides)
    overrides.setdefault("param_dtype", dtype)
    config = read_config(hf_dir, **overrides)
    reader = Reader(hf_dir)
    fused, packed = _detect_layout(reader.keys()), _detect_mxfp4(reader.keys())
    check_keys_and_shapes(reader, config, fused, packed)

    from jsmaug.models import (
        decoder as model,  # local import: model imports flax, which hf users may not need for reading names
    )

    shapes = model.param_shapes(config)
    if shardings is None and mesh is not None:
        from jsmaug.parallel import sharding as shd

        shardings = shd.param_shardings(config, mesh, shd.MeshConfig())
    shard_map = dict(_leaf_paths(shardings)) if shardings is not None else {}
    np_dtype = jnp.dtype(config.param_dtype)
    try:  # before anything is read: a group that does not divide a weight is named here
        q_leaves = quantized.abstract_leaves(shapes, quantize, quant_group) if quantize else {}
    except quant.QuantError as err:
        raise CheckpointError(f"{hf_dir}: --quantize {quantize} --quant_group {quant_group}: {err}") from None
    top = {e.leaf: e for e in layout.top_entries(config)}
    positions = layout.layer_positions(config)
    by_group: dict[str, list[tuple[int, dict[str, Entry]]]] = {}
    for n, (group, sparse, _) in sorted(positions.items()):
        by_group.setdefault(group, []).append(
            (n, {e.leaf: e for e in layout.layer_entries(config, n, sparse, fused, packed)}))
    params: dict = {}
    t0 = time.time()
    leaves = _leaf_paths(shapes)
    _check_every_tensor_has_a_leaf(hf_dir, config, {path for path, _ in leaves}, top, by_group)
    for i, (path, sds) in enumerate(leaves):
        sharding = shard_map.get(path)
        if path in q_leaves and path in top:
            arr = quantized.quantize_leaf(_entry_tensor(reader, top[path], sds.shape), np_dtype, q_leaves[path],
                                          sharding)
        elif path in q_leaves and path.startswith("layers/"):
            group, leaf = path.split("/", 2)[1:]
            gen = (_entry_tensor(reader, entries[leaf], sds.shape[1:], np_dtype) for _, entries in by_group[group])
            arr = quantized.stack_quantized(gen, np_dtype, q_leaves[path], path, sharding)
        elif path in top:
            arr = _device_put(_entry_tensor(reader, top[path], sds.shape), np_dtype, sharding)
        elif path.startswith("layers/"):
            group, leaf = path.split("/", 2)[1:]
            gen = (_entry_tensor(reader, entries[leaf], sds.shape[1:], np_dtype) for _, entries in by_group[group])
            arr = _stack_into_device_array(gen, sds.shape, np_dtype, sharding)
        else:  # pragma: no cover - the param tree and this mapping are written together
            raise KeyError(path)
        if path not in q_leaves and arr.shape != sds.shape:  # pragma: no cover - guarded by the HF shape checks above
            raise CheckpointError(f"{hf_dir}: {path} built with shape {arr.shape}, expected {sds.shape}")
        _set_from_path(params, path, arr)
        if progress:
            layout.progress("import", i + 1, len(leaves), reader.read_bytes, t0)
    if progress:
        print(file=sys.stderr)
    return config, params
