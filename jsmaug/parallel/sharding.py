"""Meshes and the logical-axis rule table: one place that decides where every array lives.

The model names each weight's axes logically (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `exp`, `vocab`,
`layers`); batches use `batch` and `length`. A rule table maps logical names to mesh axes
(`data`, `fsdp`, `expert`, `tensor`), MaxText's approach: the same code runs on 1 CPU, 8 GPUs or a pod and only
the table and the mesh sizes change.

Default rules:
    batch    -> (data, fsdp, expert)   every non-tensor axis is data parallel for activations
    exp      -> expert                  expert weights are split over `expert`
    embed    -> fsdp                    ZeRO-3 style: weights split over fsdp, gathered per layer by XLA
    heads, kv_heads, mlp, vocab -> tensor
    lora     -> fsdp                    a LoRA factor's rank axis, where its other axes leave fsdp free (B of an
                                        expert's w1/w3: (exp, lora, mlp)), so no adapter or Adam moment is
                                        replicated over fsdp
    layers, head_dim, length -> replicated
A dimension that the mapped mesh axes do not divide is replicated instead (e.g. 2 kv heads on tensor=4).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jsmaug.models.config import ConfigError, ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("exp", "expert"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora", "fsdp"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: tuple[Any, ...] = ()  # [logical_name, mesh_axes] pairs overriding of DEFAULT_RULES, e.g. [[embed, null]]

    def sizes(self, num_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise ConfigError(f"mesh: only one axis may be -1, got {free}")
        for a, s in sizes.items():
            if s == 0 or s < -1:
                raise ConfigError(f"mesh.{a}: must be a positive size or -1, got {s}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if num_devices % fixed:
                raise ConfigError(f"mesh: the fixed axes multiply to {fixed}, which does not divide the "
                                  f"{num_devices} devices; change the mesh.* sizes")
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(f"mesh: sizes {sizes} multiply to {fixed} but there are {num_devices} devices; "
                              "make them multiply to the device count or set one axis to -1")
        return sizes

    def rule_table(self) -> dict[str, tuple[str, ...]]:
        table = {k: _as_tuple(v) for k, v in DEFAULT_RULES}
        for item in self.rules:
            if len(item) != 2:
                raise ConfigError(f"mesh.rules: each rule is [logical_name, mesh_axes], got {item!r}")
            k, v = item
            for ax in _as_tuple(v):
                if ax not in MESH_AXES:
                    raise ConfigError(f"mesh.rules: {k} -> {ax!r}; mesh axes are {MESH_AXES}")
            table[k] = _as_tuple(v)
        return table


def _as_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def make_mesh(mesh_cfg: MeshConfig, model_config: ModelConfig | None = None,
              devices: Sequence | None = None) -> Mesh:
    """Builds the mesh, checking it before anything compiles."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.sizes(len(devices))
    if model_config is not None and not model_config.is_moe and sizes["expert"] > 1:
        raise ConfigError(f"mesh.expert={sizes['expert']}: model_type {model_config.model_type!r} is dense (no "
                          "experts to split); set mesh.expert=1 and give the devices to data or fsdp")
    if model_config is not None and model_config.is_moe and model_config.num_local_experts % sizes["expert"]:
        raise ConfigError(f"mesh.expert={sizes['expert']} does not divide num_local_experts="
                          f"{model_config.num_local_experts}; use an expert axis size that divides it")
    arr = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, table: dict) -> P:
    """Logical axis names -> a PartitionSpec, replicating dims the mesh axes don't divide, never reusing an axis."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
        # Drop trailing axes until the product divides the dimension.
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_shardings(config: ModelConfig, mesh: Mesh, mesh_cfg: MeshConfig):
    from jsmaug.models import decoder as model

    table = mesh_cfg.rule_table()
    axes = model.logical_axes(config)
    shapes = model.param_shapes(config)
    return jax.tree.map(lambda spec, sds: NamedSharding(mesh, spec_for(tuple(spec), sds.shape, mesh, table)),
                        axes, shapes, is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(optimizer: optax.GradientTransformation, params_abstract, param_sh, mesh: Mesh):
    """Optimizer moments live where their params live; scalars (counts) are replicated."""
    state = jax.eval_shape(optimizer.init, params_abstract)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(optimizer, lambda _, s: s, state, param_sh,
                                 transform_non_params=lambda _: replicated)


def _batch_entry(mesh: Mesh, mesh_cfg: MeshConfig):
    """The PartitionSpec entry of a batch axis: the rule table's batch mesh axes of size > 1 (None, a name or a
    tuple of names)."""
    axes = tuple(a for a in mesh_cfg.rule_table().get("batch", ()) if mesh.shape[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def batch_sharding(mesh: Mesh, mesh_cfg: MeshConfig, ndim: int) -> NamedSharding:
    """Sharding of a PAIRED batch array (2, B, ...): axis 0 is chosen/rejected, axis 1 the pairs."""
    return NamedSharding(mesh, P(None, _batch_entry(mesh, mesh_cfg), *([None] * (ndim - 2))))


def rows_sharding(mesh: Mesh, mesh_cfg: MeshConfig) -> NamedSharding:
    """Sharding of an array of rows (B, ...), e.g. generation's prompts and keys: axis 0 over the batch axes."""
    return NamedSharding(mesh, P(_batch_entry(mesh, mesh_cfg)))


def spans_processes(mesh: Mesh) -> bool:
    """Whether some of the mesh's devices belong to other processes (a multi-host mesh)."""
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def put_global(tree, shardings):
    """Host values, the same on every process, onto shardings that may span processes: where a sharding is this
    process's alone, `jax.device_put`; else each process hands over its own devices' parts
    (`jax.make_array_from_callback`). Arrays already spread over processes are resharded as they are."""
    def put(x, sharding):
        if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, shardings)


def to_host(x) -> np.ndarray:
    """An array's whole value as NumPy on every process: gathered from the other processes where it spans them
    (a collective: every process must call it)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_rows_divisor(mesh: Mesh, mesh_cfg: MeshConfig) -> int:
    table = mesh_cfg.rule_table()
    return math.prod(mesh.shape[a] for a in table.get("batch", ()))


def pairs_by_host(mesh: Mesh, mesh_cfg: MeshConfig, num_pairs: int, host_of=lambda d: d.process_index
                  ) -> dict[Any, list[int]]:
    """Which pairs of a global batch of `num_pairs` each host's devices hold, in order: a contiguous share when
    the batch axes span hosts, every pair when they do not. `host_of(device)` names a device's host. (With
    `num_pairs` = the number of data shards, it names the shards each host holds.)"""
    held: dict[Any, set[int]] = {}
    for device, index in batch_sharding(mesh, mesh_cfg, 2).devices_indices_map((2, num_pairs)).items():
        held.setdefault(host_of(device), set()).update(range(*index[1].indices(num_pairs)))
    return {h: sorted(v) for h, v in sorted(held.items())}


def local_pair_indices(mesh: Mesh, mesh_cfg: MeshConfig, num_pairs: int) -> list[int]:
    """The pairs of a global batch that this process's devices hold (`pairs_by_host` for this process)."""
    return pairs_by_host(mesh, mesh_cfg, num_pairs)[jax.process_index()]


def place_rows(paired_local: dict[str, np.ndarray], local: Sequence[int], num_pairs: int, mesh: Mesh,
               mesh_cfg: MeshConfig) -> dict[str, jax.Array]:
    """Global arrays (X, num_pairs, ...), axis 1 split over the batch axes, from host arrays that hold the
    entries `local` of axis 1 (in that order): pairs of a paired batch, or rows of a packed one."""
    pos = {g: j for j, g in enumerate(local)}
    out = {}
    for k, v in paired_local.items():
        def rows(index, v=v):
            start, stop, _ = index[1].indices(num_pairs)
            j = pos[start]
            return v[(index[0], slice(j, j + stop - start)) + tuple(index[2:])]
        out[k] = jax.make_array_from_callback((v.shape[0], num_pairs, *v.shape[2:]), batch_sharding(mesh, mesh_cfg, v.ndim),
                                              rows)
    return out


def _paired(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).reshape(2, np.shape(v)[0] // 2, *np.shape(v)[1:]) for k, v in batch.items()}


def put_pairs(pairs: Sequence, collate: Callable[[Sequence], dict[str, np.ndarray]], mesh: Mesh,
              mesh_cfg: MeshConfig) -> dict[str, jax.Array]:
    """The global batch of `pairs` as PAIRED arrays (2, B, ...) sharded over the pairs.

    `collate(some_pairs)` gives their [chosen rows; rejected rows] (2n, ...) at the batch's one length. Each
    process collates only the pairs its own devices hold (`local_pair_indices`), so a batch axis that spans
    processes splits the rows between them and one that does not gives every process the same rows.
    The pair axis keeps chosen and rejected apart across hosts (concatenating processes' [c; r] blocks along
    rows would interleave them); the step flattens (2, B, ...) back to [all chosen; all rejected]."""
    local = local_pair_indices(mesh, mesh_cfg, len(pairs))
    return place_rows(_paired(collate([pairs[i] for i in local])), local, len(pairs), mesh, mesh_cfg)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, mesh_cfg: MeshConfig) -> dict[str, jax.Array]:
    """A whole global [chosen; rejected] batch, the same on every process, -> global PAIRED arrays (2, B, ...);
    each device takes its rows."""
    paired = _paired(batch)
    num = next(iter(paired.values())).shape[1]
    return place_rows(paired, list(range(num)), num, mesh, mesh_cfg)
