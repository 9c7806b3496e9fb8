"""The mesh a step is traced for, visible to the layers that must know it (shard_map regions: the all_to_all MoE
dispatch, the splash attention kernel) and to kernels that must know the target platform.

The mesh is not part of the model: the trainer traces its steps inside `mesh_scope(mesh, batch_axes)` (through
`under_mesh`), and layers read it with `active_mesh()`. Outside that context (one device, tests of the model
alone) there is no mesh and every layer computes locally.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax

_MESH: contextvars.ContextVar = contextvars.ContextVar("jsmaug_mesh", default=None)


@contextlib.contextmanager
def mesh_scope(mesh, batch_axes):
    """Traces inside this context see `mesh`; tokens are split over `batch_axes` (the `batch` rule's axes)."""
    token = _MESH.set((mesh, tuple(a for a in batch_axes if mesh.shape[a] > 1)))
    try:
        yield
    finally:
        _MESH.reset(token)


def under_mesh(fn, mesh, batch_axes):
    """`fn` called (and so traced, on its first call) inside `mesh_scope`."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with mesh_scope(mesh, batch_axes):
            return fn(*args, **kwargs)

    if hasattr(fn, "lower"):  # ahead-of-time compilation (tools/plan_pod.py) traces too
        def lower(*args, **kwargs):
            with mesh_scope(mesh, batch_axes):
                return fn.lower(*args, **kwargs)
        wrapped.lower = lower
    return wrapped


def active_mesh():
    """(mesh, batch axes) set by `mesh_scope`, or None outside it."""
    return _MESH.get()


def batch_shards() -> int:
    """How many ways the active mesh splits the batch's rows (1 outside `mesh_scope`)."""
    active = _MESH.get()
    return 1 if active is None else math.prod(active[0].shape[a] for a in active[1])


def mesh_or_active(mesh=None):
    """`mesh` if given, else the one `mesh_scope` set, else None."""
    if mesh is None and _MESH.get() is not None:
        return _MESH.get()[0]
    return mesh


def target_platform(mesh=None) -> str:
    """The platform the program is compiled for: the devices' of `mesh` or of the active mesh (tools/plan_pod.py
    compiles for TPU from a CPU host), else JAX's default backend."""
    mesh = mesh_or_active(mesh)
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
