"""all_to_all token dispatch on 8 fake devices: equal to one device in values and gradients, dropless whatever
the router does (every token to one expert included), with fsdp, data and tensor axes."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import config as cfg_lib, moe

from jsmaug.parallel import expert_parallel as ep, mesh_context, sharding as shd

T, D, F, E, K = 64, 16, 24, 8, 2
_k = jax.random.split(jax.random.key(0), 5)
X = jax.random.normal(_k[0], (T, D))
LOGITS = jax.random.normal(_k[1], (T, E))
W = [jax.random.normal(_k[2], (E, D, F)) * 0.1, jax.random.normal(_k[3], (E, D, F)) * 0.1,
     jax.random.normal(_k[4], (E, F, D)) * 0.1]
MESHES = {"expert8": shd.MeshConfig(data=1, expert=8), "data2_expert4": shd.MeshConfig(data=2, expert=4),
          "fsdp2_expert4": shd.MeshConfig(data=1, fsdp=2, expert=4),
          "expert4_tensor2": shd.MeshConfig(data=1, expert=4, tensor=2),
          "data2_fsdp4": shd.MeshConfig(data=2, fsdp=4)}  # one expert shard: shard_map with nothing to exchange


def _loss(fn, logits):
    def f(x, w1, w3, w2):
        _, idx, w = moe.route(logits, K)
        y, dropped = fn(x, idx, w, w1, w3, w2)
        return jnp.sum(y * jnp.cos(y)), dropped
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)


CASES = [(m, i) for m in sorted(MESHES) if m != "data2_fsdp4" for i in ("bucketed", "ragged")] + [
    ("data2_expert4", "megablox"), ("expert4_tensor2", "megablox"),  # the Pallas TPU kernels, interpret mode
    ("data2_fsdp4", "megablox")]


@pytest.mark.parametrize("mesh_name, impl", CASES)
@pytest.mark.parametrize("router", ["balanced", "all_to_expert_3"])
def test_all_to_all_equals_one_device(mesh_name, impl, router):
    logits = LOGITS if router == "balanced" else LOGITS.at[:, 3].add(100.0)
    (l0, _), g0 = jax.jit(_loss(lambda *a: moe.expert_ffn(*a, impl=impl), logits))(X, *W)
    mesh_cfg = MESHES[mesh_name]
    mesh = shd.make_mesh(mesh_cfg, cfg_lib.tiny(num_local_experts=E))
    fn = jax.jit(_loss(lambda *a: ep.expert_ffn(*a, dispatch="all_to_all", impl=impl), logits))
    (l1, dropped), g1 = mesh_context.under_mesh(fn, mesh, mesh_cfg.rule_table()["batch"])(X, *W)
    assert int(dropped) == 0
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_resolution():
    assert ep.resolve_dispatch("auto") == "gspmd"  # no mesh: nothing to move
    mesh = shd.make_mesh(MESHES["expert8"], cfg_lib.tiny(num_local_experts=E))
    assert ep.resolve_dispatch("auto", mesh) == "all_to_all"  # a mesh given directly, as the trainer's log does
    with mesh_context.mesh_scope(mesh, ("data", "fsdp", "expert")):
        assert ep.resolve_dispatch("auto") == "all_to_all"
        assert ep.resolve_dispatch("gspmd") == "gspmd"
    mesh = shd.make_mesh(shd.MeshConfig(data=8), cfg_lib.tiny(num_local_experts=E))
    with mesh_context.mesh_scope(mesh, ("data",)):
        assert ep.resolve_dispatch("auto") == "gspmd"


def test_megablox_is_never_left_to_gspmd_partitioning():
    # A Pallas kernel cannot be split by XLA's partitioner ("Mosaic kernels cannot be automatically partitioned"):
    # under the gspmd dispatch on a multi-device mesh the experts take ragged_dot instead.
    mesh = shd.make_mesh(MESHES["expert8"], cfg_lib.tiny(num_local_experts=E))
    assert ep.resolve_local_impl("megablox", "gspmd", mesh) == "ragged"
    assert ep.resolve_local_impl("megablox", "all_to_all", mesh) == "megablox"
    assert ep.resolve_local_impl("megablox", "auto", mesh) == "megablox"  # auto -> all_to_all on expert 8
    assert ep.resolve_local_impl("megablox", "gspmd") == "megablox"  # one device, no mesh
    assert ep.resolve_local_impl("auto", "gspmd", mesh) == "bucketed"  # CPU devices
    # No expert axis: auto still takes the shard_map path when the experts are megablox (TPU's default there).
    data8 = shd.make_mesh(shd.MeshConfig(data=8), cfg_lib.tiny(num_local_experts=E))
    assert ep.resolve_dispatch("auto", data8, "megablox") == "all_to_all"
    assert ep.resolve_dispatch("auto", data8, "auto") == "gspmd"  # bucketed on CPU: XLA partitions it
    assert ep.resolve_local_impl("megablox", "auto", data8) == "megablox"
