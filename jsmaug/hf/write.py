"""jsmaug -> Hugging Face: `save` writes the hub layout (sharded safetensors with `model.safetensors.index.json`,
`config.json`, `generation_config.json` and the tokenizer files), gathering one tensor at a time into a
temporary folder that is renamed at the end, so a failure leaves nothing behind.

gpt-oss's experts are written unquantized (`gate_up_proj` with gate and up interleaved again, `down_proj`) in the
export's dtype, never in the hub's MXFP4 (docs/conversion.md).

In a multi-process run every process calls `save` (each tensor is gathered by a collective the processes take
part in alike) and only the one with `write=True` writes: host memory holds one tensor, never the model."""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from jsmaug.models import families
from jsmaug.data.files import DataError
from jsmaug.data.tokenizer_files import check_tokenizer, export_tokenizer_files
from jsmaug.hf import layout
from jsmaug.hf.layout import CheckpointError
from jsmaug.models.config import ModelConfig
from jsmaug.paths import is_remote

# ------------------------------------------------------------------------------------------------ writing

@functools.lru_cache(maxsize=None)
def _take_replicated(mesh, n_idx: int):
    """x[i0, ..., i{n-1}] (indices traced: one program per array shape), the result on every device."""
    return jax.jit(lambda x, idx: x[tuple(idx[i] for i in range(n_idx))], out_shardings=NamedSharding(mesh, P()))


def write_generation_config(folder, config: ModelConfig) -> None:
    """`folder/generation_config.json` from the model config's bos/eos ids, as transformers derives one from a
    model config (`_from_model_config`)."""
    (epath.Path(folder) / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "_from_model_config": True},
        indent=2))


def gather(x, *idx: int) -> np.ndarray:
    """One slice x[idx] of a (possibly sharded, possibly multi-process) array, on the host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x[idx] if idx else x))
    return np.asarray(jax.device_get(_take_replicated(x.sharding.mesh, len(idx))(x, jnp.asarray(idx, jnp.int32))))


def _leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def to_hf(a: np.ndarray, entry: layout.Entry) -> np.ndarray:
    if a.size != np.prod(entry.hf_shape):  # a wrong leaf: the writer's shape check names the tensor
        return a
    return a.reshape(entry.hf_shape[::-1]).T if entry.transposed else a.reshape(entry.hf_shape)


def _interleave(even: np.ndarray, odd: np.ndarray) -> np.ndarray:
    """(..., F) and (..., F) -> (..., 2F) with even[..., i] at 2i and odd[..., i] at 2i + 1."""
    return np.stack([even, odd], axis=-1).reshape(*even.shape[:-1], 2 * even.shape[-1])


def _hub_tensors(config: ModelConfig, params) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(hub name, shape, thunk giving the numpy tensor) in hub order; each thunk gathers one tensor (one layer's
    slice, or one expert's) only. jsmaug/hf/layout.py names the tensors of each family."""
    positions = layout.layer_positions(config)
    for entry, n in layout.hub_order(config):
        if n is None:
            arr = _leaf(params, entry.leaf)
            yield entry.names[0], entry.hf_shape, lambda arr=arr, entry=entry: to_hf(gather(arr), entry)
            continue
        group, _, j = positions[n]
        arr = _leaf(params["layers"][group], entry.leaf)
        if entry.fused == "odd":  # written with its even half
            continue
        if entry.fused == "even":  # gpt-oss's gate_up_proj (and its bias): the two leaves interleaved
            odd = _leaf(params["layers"][group], entry.pair)
            yield entry.names[0], entry.hf_shape, lambda a=arr, b=odd, j=j: _interleave(gather(a, j), gather(b, j))
            continue
        if len(entry.names) == 1:
            yield entry.names[0], entry.hf_shape, lambda arr=arr, j=j, entry=entry: to_hf(gather(arr, j), entry)
        else:  # one tensor per expert
            for e, name in enumerate(entry.names):
                yield name, entry.hf_shape, lambda arr=arr, j=j, e=e, entry=entry: to_hf(gather(arr, j, e), entry)


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
              np.dtype(np.uint8): "U8"}


def write_safetensors(path: epath.Path, entries: list[tuple[str, tuple[int, ...], np.dtype, Callable]]) -> int:
    """Streams tensors into one safetensors file: header first (from shapes), then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, dtype, fetch in entries:
            arr = np.ascontiguousarray(fetch(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name} came out with shape {arr.shape}, expected {shape}")
            fh.write(arr.tobytes())
    return offset


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use e.g. '5GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def prepare_out_dir(out_dir: epath.Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")


def commit_dir(tmp: epath.Path, out_dir: epath.Path) -> None:
    """Replaces out_dir by tmp with renames only (the old folder is removed after the new one is in place).
    Either may be a plain path or a string (`jsmaug convert` passes pathlib paths)."""
    tmp, out_dir = epath.Path(tmp), epath.Path(out_dir)
    if out_dir.exists():
        old = out_dir.parent / (out_dir.name + f".old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        old.rmtree(missing_ok=True)
    else:
        tmp.rename(out_dir)


def check_tokenizer_path(tokenizer_path: str | os.PathLike | None) -> None:
    """Fails before any tensor is written when the tokenizer to export is missing or unreadable."""
    if tokenizer_path is None:
        return
    try:  # a folder with tokenizer.json or tokenizer.model, or one of those files
        check_tokenizer(tokenizer_path)
    except DataError as err:
        raise CheckpointError(str(err)) from None


def split_shards(entries: list, limit: int) -> list[list]:
    """(name, shape, np dtype, fetch) entries in order, cut into shards of at most `limit` bytes (a tensor
    larger than the limit gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for ent in entries:
        nbytes = int(np.prod(ent[1])) * np.dtype(ent[2]).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(ent)
        size += nbytes
    return shards


def write_shards(folder, shards: list[list], progress_label: str | None = None, t0: float = 0.0) -> int:
    """Writes the shards as the hub names them (model.safetensors, or model-0000i-of-0000n.safetensors and
    the index) into `folder`; returns the bytes of tensor data written. With `progress_label`, a progress line."""
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    num_entries = sum(len(shard) for shard in shards)
    total, done, weight_map = 0, 0, {}
    for fname, shard in zip(names, shards):
        total += write_safetensors(folder / fname, shard)
        weight_map.update({ent[0]: fname for ent in shard})
        done += len(shard)
        if progress_label:
            layout.progress(progress_label, done, num_entries, total, t0)
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def save(out_dir: str | os.PathLike, config: ModelConfig, params, dtype: str | None = None,
         max_shard_size: str | int = "5GB", tokenizer_path: str | os.PathLike | None = None,
         overwrite: bool = False, progress: bool = False, chat_template: str | None = None,
         write: bool = True, tensors=None, quantization_config: dict | None = None) -> dict[str, Any]:
    """Writes an HF folder in the hub layout. Returns a summary (tensors, bytes, seconds, files).

    With `tokenizer_path` the folder also gets the tokenizer files: a tokenizer.json tokenizer's folder files
    copied as they are, or for a SentencePiece tokenizer.model what a Mixtral hub repository ships
    (`jsmaug.data.tokenizer_files`); `chat_template` (the Jinja source a run trained with) goes with them. With `write=False`
    (the processes other than 0 of a multi-process run) every tensor is gathered and nothing is written.
    `tensors` ((name, shape, numpy dtype, thunk) in file order) replaces the float tensors of `params`, and
    `quantization_config` goes into config.json (`jsmaug.hf.bnb`'s 4-bit export)."""
    out_dir = epath.Path(out_dir)
    if write:
        prepare_out_dir(out_dir, overwrite)
    check_tokenizer_path(tokenizer_path)
    dtype = dtype or config.param_dtype
    np_dtype = np.dtype(jnp.dtype(dtype))
    limit = parse_size(max_shard_size)
    t0 = time.time()
    if tensors is None:
        entries = [(name, shape, np_dtype, fetch) for name, shape, fetch in _hub_tensors(config, params)]
    else:
        entries = list(tensors)
    shards = split_shards(entries, limit)

    if not write:
        for ent in entries:
            ent[3]()
        return {"tensors": len(entries), "bytes": 0, "seconds": time.time() - t0, "files": 0}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # In a bucket there is no folder rename to commit with (it is a copy of every object): the files are
    # written in place, each one whole (an object appears once its upload is complete).
    tmp = out_dir if is_remote(out_dir) else out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.rmtree(missing_ok=True)
    tmp.mkdir(parents=True)
    try:
        total = write_shards(tmp, shards, "export" if progress else None, t0)
        hf_config = families.to_hf_dict(config, torch_dtype=dtype)
        if quantization_config is not None:
            hf_config["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_generation_config(tmp, config)
        if tokenizer_path is not None:
            export_tokenizer_files(tokenizer_path, tmp, chat_template)
        if tmp != out_dir:
            commit_dir(tmp, out_dir)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    if progress:
        print(file=sys.stderr)
    return {"tensors": len(entries), "bytes": total, "seconds": time.time() - t0, "files": len(shards)}
