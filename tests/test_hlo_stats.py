"""jsmaug/perf/hlo_stats.py: matmul FLOPs and collective bytes per step from compiled HLO text, loops counted by their
trip counts (XLA's cost analysis counts a loop body once)."""


import jax
import jax.numpy as jnp
import pytest

from jsmaug.perf import hlo_stats

HLO = """
HloModule m

%body (p: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %x = bf16[8,16]{1,0} get-tuple-element(%p), index=1
  %w = bf16[16,16]{1,0} constant({...})
  %f = bf16[8,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused
  %ag = (bf16[1,128]{1,0}, bf16[4,128]{1,0}) all-gather-start(%w2), dimensions={0}
  %ar.1 = f32[] all-reduce(%l), to_apply=%add
  ROOT %t = (s32[], bf16[8,16]{1,0}) tuple(%i, %f)
}

%fused (param_0: bf16[8,16], param_1: bf16[16,16]) -> bf16[8,16] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  %param_1 = bf16[16,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[8,16], lhs: bf16[64,32], rhs: bf16[4,32,24], g: s32[4], img: f32[2,10,3], k: f32[5,3,7]) -> bf16[8,16] {
  %x = bf16[8,16]{1,0} parameter(0)
  %lhs = bf16[64,32]{1,0} parameter(1)
  %rhs = bf16[4,32,24]{2,1,0} parameter(2)
  %g = s32[4]{0} parameter(3)
  %img = f32[2,10,3]{2,1,0} parameter(4)
  %k = f32[5,3,7]{2,1,0} parameter(5)
  %rd = bf16[64,24]{1,0} ragged-dot(%lhs, %rhs, %g), lhs_contracting_dims={1}, rhs_contracting_dims={1}, lhs_ragged_dims={0}, rhs_group_dims={0}
  %conv = f32[2,6,7]{2,1,0} convolution(%img, %k), window={size=5}, dim_labels=b0f_0io->b0f
  %a2a = bf16[8,2048]{1,0} all-to-all(%y), dimensions={0}
  %w0 = (s32[], bf16[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"32"}}
  ROOT %o = bf16[8,16]{1,0} get-tuple-element(%w0), index=1
}
"""


def test_counts_by_hand():
    got = hlo_stats.count(HLO)
    assert got["dot"] == 32 * 2 * 8 * 16 * 16 + 2 * (2 * 6 * 7) * (5 * 3)  # the loop's dot 32 times; the conv
    assert got["ragged_dot"] == 2 * 64 * 24 * 32 and got["ragged_dot_rows"] == 64
    assert got["collectives"] == {"all-gather": 32 * (128 + 4 * 128) * 2, "all-reduce": 32 * 4,
                                  "all-to-all": 8 * 2048 * 2}
    assert got["unknown_trip_count_loops"] == 0


def test_a_compiled_scan_of_matmuls_counts_every_layer():
    layers, m, n = 5, 16, 32

    def f(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    compiled = jax.jit(jax.grad(f, 1)).lower(jnp.ones((m, n)), jnp.ones((layers, n, n))).compile()
    got = hlo_stats.count(compiled.as_text())
    # forward c @ w, backward dc = g @ w.T and dw = c.T @ g, in each of the 5 layers
    assert got["dot"] == pytest.approx(3 * layers * 2 * m * n * n)
    print(f"cost_analysis: {compiled.cost_analysis()['flops']:.0f}, hlo_stats: {got['dot']:.0f}")


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_stats.count("%x = f32[] parameter(0)")


STEPPED = """
HloModule m

%cond (p: (s32[], bf16[8,16])) -> pred[] {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,16]{1,0} get-tuple-element(%p), index=1
  %w = bf16[16,16]{1,0} constant({...})
  %d = bf16[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(STEP)
  %next = s32[] add(%i, %two)
  ROOT %t = (s32[], bf16[8,16]{1,0}) tuple(%next, %d)
}

ENTRY %main (x: bf16[8,16]) -> bf16[8,16] {
  %x = bf16[8,16]{1,0} parameter(0)
  %w0 = (s32[], bf16[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %o = bf16[8,16]{1,0} get-tuple-element(%w0), index=1
}
"""


@pytest.mark.parametrize("step, trips", [(1, 4), (2, 2), (3, 2)])
def test_a_loop_that_steps_by_more_than_one_counts_its_real_trips(step, trips):
    """TPU programs write some fsdp loops as `i += 2` while `i < 4`: two trips, not four (the v6e-8 plans)."""
    got = hlo_stats.count(STEPPED.replace("STEP", str(step)))
    assert got["dot"] == trips * 2 * 8 * 16 * 16 and got["unknown_trip_count_loops"] == 0
