"""Hugging Face <-> jsmaug weight conversion (safetensors files through numpy; no torch).

Import (`load`) reads tensor by tensor (plain reads, no mmap) and builds each stacked parameter one
layer at a time into a preallocated device array (donated update), so host memory stays near one layer's
expert stack, never the model. Accepts the hub layout (per-expert w1/w2/w3) and transformers-5's fused layout
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, `mlp.gate.weight`).

Export (`save`) writes the hub layout, sharded safetensors with `model.safetensors.index.json`, `config.json`
and `generation_config.json`, gathering one tensor at a time, into a temporary folder renamed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jsmaug.config import MixtralConfig
from jsmaug.hf_tokenizer import write_tokenizer_files


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file or tensor at fault."""


# ------------------------------------------------------------------------------------------------ name mapping
# Every jsmaug leaf -> how to build it from HF tensors. Per-layer leaves are stacked on axis 0 (the scan axis);
# expert leaves additionally on axis 1.

_LAYER = "layers/layer/"


def _hub_names(config: MixtralConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "block_sparse_moe.gate.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        for e in range(config.num_local_experts):
            names += [p + f"block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")]
    return names


def _expected_hf_shape(config: MixtralConfig, name: str) -> tuple[int, ...] | None:
    d, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_local_experts
    hq, hkv, dh = config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim
    table = {
        r"model\.embed_tokens\.weight": (v, d), r"lm_head\.weight": (v, d), r"model\.norm\.weight": (d,),
        r".*layernorm\.weight": (d,), r".*q_proj\.weight": (hq * dh, d), r".*[kv]_proj\.weight": (hkv * dh, d),
        r".*o_proj\.weight": (d, hq * dh), r".*(block_sparse_moe|mlp)\.gate\.weight": (e, d),
        r".*\.w[13]\.weight": (f, d), r".*\.w2\.weight": (d, f),
        r".*gate_up_proj": (e, 2 * f, d), r".*down_proj": (e, d, f),
    }
    for pat, shape in table.items():
        if re.fullmatch(pat, name):
            return shape
    return None


# ------------------------------------------------------------------------------------------------ reading

_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_NP_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
              "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}


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

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _NP_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        dtype = _NP_DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        count = (end - start) // dtype.itemsize
        arr = np.fromfile(self.path, dtype=dtype, count=count, offset=self.base + start)
        if arr.size != count:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated (file shorter than its header says)")
        return arr.reshape(e["shape"])


class _Reader:
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

    def get(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing")
        arr = self._handles[self.location[name]].get(name)
        self.read_bytes += arr.nbytes
        self.read_count += 1
        return arr


def _detect_layout(keys: set[str]) -> str:
    if any(".mlp.experts.gate_up_proj" in k for k in keys):
        return "fused"
    return "hub"


def _check_keys_and_shapes(reader: _Reader, config: MixtralConfig, layout: str) -> None:
    if layout == "hub":
        expected = set(_hub_names(config))
    else:
        expected = {n for n in _hub_names(config) if ".block_sparse_moe." not in n}
        for n in range(config.num_hidden_layers):
            p = f"model.layers.{n}.mlp."
            expected |= {p + "gate.weight", p + "experts.gate_up_proj", p + "experts.down_proj"}
    keys = reader.keys()
    # Tied checkpoints may still carry lm_head; HF ignores it, so do we.
    unexpected = sorted(keys - expected - {"lm_head.weight"})
    missing = sorted(expected - keys)
    if missing:
        raise CheckpointError(f"{reader.dir}: {len(missing)} tensor(s) missing for the config in config.json, "
                              f"first: {missing[0]}")
    if unexpected:
        raise CheckpointError(f"{reader.dir}: {len(unexpected)} unexpected tensor(s) (not in a Mixtral with this "
                              f"config.json), first: {unexpected[0]} in {reader.location[unexpected[0]]}")
    for name in sorted(expected):
        dtype = reader.dtype_name(name)
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{reader.dir / reader.location[name]}: tensor {name} has dtype {dtype}; Mixtral "
                                  f"weights are floating point ({', '.join(_FLOAT_DTYPES)})")
        want = _expected_hf_shape(config, name)
        got = reader.shape(name)
        if want is not None and got != want:
            raise CheckpointError(f"{reader.dir / reader.location[name]}: tensor {name} has shape {got}, "
                                  f"config.json implies {want}")


def _layer_tensor(reader: _Reader, layout: str, config: MixtralConfig, leaf: str, n: int) -> np.ndarray:
    """One layer's slice of a stacked jsmaug leaf, in jsmaug's (in, out) orientation."""
    d, hq, hkv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim
    f, e = config.intermediate_size, config.num_local_experts
    p = f"model.layers.{n}."
    if leaf == "input_layernorm/weight":
        return reader.get(p + "input_layernorm.weight")
    if leaf == "post_attention_layernorm/weight":
        return reader.get(p + "post_attention_layernorm.weight")
    if leaf == "self_attn/q_proj":
        return reader.get(p + "self_attn.q_proj.weight").T.reshape(d, hq, dh)
    if leaf in ("self_attn/k_proj", "self_attn/v_proj"):
        return reader.get(p + f"self_attn.{leaf[-6]}_proj.weight").T.reshape(d, hkv, dh)
    if leaf == "self_attn/o_proj":
        return reader.get(p + "self_attn.o_proj.weight").T.reshape(hq, dh, d)
    if leaf == "block_sparse_moe/gate":
        name = p + ("block_sparse_moe.gate.weight" if layout == "hub" else "mlp.gate.weight")
        return reader.get(name).T
    if layout == "hub":
        w = leaf.split("/")[-1]
        return np.stack([reader.get(p + f"block_sparse_moe.experts.{j}.{w}.weight").T for j in range(e)])
    if leaf in ("block_sparse_moe/w1", "block_sparse_moe/w3"):
        gate_up = reader.get(p + "mlp.experts.gate_up_proj")  # (E, 2F, D) = [w1; w3]
        part = gate_up[:, :f] if leaf.endswith("w1") else gate_up[:, f:]
        return np.transpose(part, (0, 2, 1))
    if leaf == "block_sparse_moe/w2":
        return np.transpose(reader.get(p + "mlp.experts.down_proj"), (0, 2, 1))  # (E, D, F) -> (E, F, D)
    raise KeyError(leaf)


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
    alloc = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    buf = alloc()
    put = jax.jit(lambda b, v, i: jax.lax.dynamic_update_index_in_dim(b, v, i, 0), donate_argnums=0,
                  out_shardings=sharding)
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


def read_config(hf_dir: str | os.PathLike, **overrides) -> MixtralConfig:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: not found (an HF model folder has a config.json)")
    return MixtralConfig.from_hf_dict(_read_config_json(path), source=str(path), **overrides)


def _read_config_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def load(hf_dir: str | os.PathLike, dtype: str | None = None, mesh=None, shardings=None,
         progress: bool = False, **config_overrides) -> tuple[MixtralConfig, Any]:
    """Reads an HF Mixtral folder -> (MixtralConfig, params).

    dtype: the parameter dtype to store (default: the checkpoint's config `torch_dtype`/`dtype`, else float32).
    mesh: a `jax.sharding.Mesh` with jsmaug's axes (`jsmaug.sharding.make_mesh`): params are placed with the
      default logical-axis rules. shardings: a pytree like the params of NamedShardings (wins over `mesh`).
      Either way each layer goes straight onto its devices; nothing is assembled on one device first.
    """
    hf_dir = Path(hf_dir)
    cfg_json = _read_config_json(hf_dir / "config.json") if (hf_dir / "config.json").exists() else {}
    if dtype is None:
        dtype = cfg_json.get("torch_dtype") or cfg_json.get("dtype") or "float32"
        dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    overrides = dict(config_overrides)
    overrides.setdefault("param_dtype", dtype)
    config = read_config(hf_dir, **overrides)
    reader = _Reader(hf_dir)
    layout = _detect_layout(reader.keys())
    _check_keys_and_shapes(reader, config, layout)

    from jsmaug import model  # local import: model imports flax, which hf users may not need for reading names

    shapes = model.param_shapes(config)
    if shardings is None and mesh is not None:
        from jsmaug import sharding as shd

        shardings = shd.param_shardings(config, mesh, shd.MeshConfig())
    shard_map = dict(_leaf_paths(shardings)) if shardings is not None else {}
    np_dtype = jnp.dtype(config.param_dtype)
    params: dict = {}
    t0 = time.time()
    leaves = _leaf_paths(shapes)
    for i, (path, sds) in enumerate(leaves):
        sharding = shard_map.get(path)
        if path == "embed_tokens":
            arr = _device_put(reader.get("model.embed_tokens.weight"), np_dtype, sharding)
        elif path == "lm_head":
            arr = _device_put(reader.get("lm_head.weight").T, np_dtype, sharding)
        elif path == "norm/weight":
            arr = _device_put(reader.get("model.norm.weight"), np_dtype, sharding)
        elif path.startswith(_LAYER):
            leaf = path[len(_LAYER):]
            gen = (_layer_tensor(reader, layout, config, leaf, n) for n in range(config.num_hidden_layers))
            arr = _stack_into_device_array(gen, sds.shape, np_dtype, sharding)
        else:  # pragma: no cover - the param tree and this mapping are written together
            raise KeyError(path)
        if arr.shape != sds.shape:  # pragma: no cover - guarded by the HF shape checks above
            raise CheckpointError(f"{hf_dir}: {path} built with shape {arr.shape}, expected {sds.shape}")
        _set_from_path(params, path, arr)
        if progress:
            _progress("import", i + 1, len(leaves), reader.read_bytes, t0)
    if progress:
        print(file=sys.stderr)
    return config, params


# ------------------------------------------------------------------------------------------------ writing

def _hub_tensors(config: MixtralConfig, params) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(hub name, thunk giving the numpy tensor) in hub order; each thunk gathers one tensor only."""
    layers = params["layers"]["layer"]
    d, hq, hkv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim

    def g(x, *idx):  # gather one slice of a (possibly sharded) array to host
        return np.asarray(jax.device_get(x[idx] if idx else x))

    yield "model.embed_tokens.weight", lambda: g(params["embed_tokens"])
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        a, m = layers["self_attn"], layers["block_sparse_moe"]
        yield p + "input_layernorm.weight", lambda n=n: g(layers["input_layernorm"]["weight"], n)
        yield p + "self_attn.q_proj.weight", lambda n=n: g(a["q_proj"], n).reshape(d, hq * dh).T
        yield p + "self_attn.k_proj.weight", lambda n=n: g(a["k_proj"], n).reshape(d, hkv * dh).T
        yield p + "self_attn.v_proj.weight", lambda n=n: g(a["v_proj"], n).reshape(d, hkv * dh).T
        yield p + "self_attn.o_proj.weight", lambda n=n: g(a["o_proj"], n).reshape(hq * dh, d).T
        yield p + "post_attention_layernorm.weight", lambda n=n: g(layers["post_attention_layernorm"]["weight"], n)
        yield p + "block_sparse_moe.gate.weight", lambda n=n: g(m["gate"], n).T
        for e in range(config.num_local_experts):
            for w in ("w1", "w2", "w3"):
                yield p + f"block_sparse_moe.experts.{e}.{w}.weight", lambda n=n, e=e, w=w: g(m[w], n, e).T
    yield "model.norm.weight", lambda: g(params["norm"]["weight"])
    if not config.tie_word_embeddings:
        yield "lm_head.weight", lambda: g(params["lm_head"]).T


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype, Callable]]) -> int:
    """Streams tensors into one safetensors file: header first (from shapes), then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, dtype, fetch in entries:
            arr = np.ascontiguousarray(fetch(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name} came out with shape {arr.shape}, expected {shape}")
            fh.write(arr.tobytes())
    return offset


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use e.g. '5GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")


def commit_dir(tmp: Path, out_dir: Path) -> None:
    """Replaces out_dir by tmp with renames only (the old folder is removed after the new one is in place)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def check_tokenizer_path(tokenizer_path: str | os.PathLike | None) -> None:
    """Fails before any tensor is written when the tokenizer to export is missing or unreadable."""
    if tokenizer_path is None:
        return
    path = Path(tokenizer_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer model not found (give the path of a SentencePiece tokenizer.model)")
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: not a SentencePiece model ({str(err).splitlines()[0]})") from err


def save(out_dir: str | os.PathLike, config: MixtralConfig, params, dtype: str | None = None,
         max_shard_size: str | int = "5GB", tokenizer_path: str | os.PathLike | None = None,
         overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Writes an HF folder in the hub layout. Returns a summary (tensors, bytes, seconds, files).

    With `tokenizer_path` (a SentencePiece tokenizer.model) the folder also gets what a Mixtral hub repository
    ships for its tokenizer: tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    check_tokenizer_path(tokenizer_path)
    dtype = dtype or config.param_dtype
    np_dtype = np.dtype(jnp.dtype(dtype))
    limit = _parse_size(max_shard_size)
    t0 = time.time()
    entries = []
    for name, fetch in _hub_tensors(config, params):
        shape = _expected_hf_shape(config, name)
        entries.append((name, shape, np_dtype, fetch))
    shards: list[list] = [[]]
    size = 0
    for ent in entries:
        nbytes = int(np.prod(ent[1])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(ent)
        size += nbytes

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        total = 0
        weight_map = {}
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        done = 0
        for fname, shard in zip(names, shards):
            total += _write_safetensors(tmp / fname, shard)
            for ent in shard:
                weight_map[ent[0]] = fname
            done += len(shard)
            if progress:
                _progress("export", done, len(entries), total, t0)
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(torch_dtype=dtype), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
             "_from_model_config": True}, indent=2))
        if tokenizer_path is not None:
            write_tokenizer_files(tokenizer_path, tmp, config.max_position_embeddings)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(file=sys.stderr)
    return {"tensors": len(entries), "bytes": total, "seconds": time.time() - t0, "files": len(shards)}


def _progress(what: str, done: int, total: int, nbytes: int, t0: float) -> None:
    dt = max(time.time() - t0, 1e-9)
    width = 30
    fill = int(width * done / max(total, 1))
    print(f"\r{what} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} tensors "
          f"{nbytes / 1e9:.2f} GB {nbytes / 1e9 / dt:.2f} GB/s", end="", file=sys.stderr, flush=True)
