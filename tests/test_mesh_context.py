"""jsmaug/parallel/mesh_context.py: what a layer sees while a step is traced for a mesh, and outside it."""

import jax
import jax.numpy as jnp

from jsmaug.parallel import mesh_context, sharding as shd


def test_scope_sets_and_restores_the_mesh_and_drops_size_one_axes():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, expert=4), devices=jax.devices())
    assert mesh_context.active_mesh() is None
    assert mesh_context.target_platform() == jax.default_backend()
    with mesh_context.mesh_scope(mesh, ("data", "fsdp", "expert")):
        got_mesh, axes = mesh_context.active_mesh()
        assert got_mesh is mesh and axes == ("data", "expert")  # fsdp has size 1
        assert mesh_context.target_platform() == mesh.devices.flat[0].platform
        assert mesh_context.batch_shards() == 8  # the rows split 2 x 4 ways
    assert mesh_context.active_mesh() is None and mesh_context.batch_shards() == 1


def test_under_mesh_traces_inside_the_scope_for_calls_and_lowering():
    mesh = shd.make_mesh(shd.MeshConfig(data=8), devices=jax.devices())
    seen = []

    def f(x):
        seen.append(mesh_context.active_mesh())
        return x * 2

    fn = mesh_context.under_mesh(jax.jit(f), mesh, ("data",))
    assert float(fn(jnp.ones(()))) == 2.0
    fn.lower(jnp.ones((3,)))  # another shape: traced again, inside the scope
    assert len(seen) == 2 and all(s is not None and s[0] is mesh for s in seen)
    assert mesh_context.active_mesh() is None
