"""The step profile's grouping (jsmaug/perf/profile.py): HLO ops to parts by their name scopes, a real
jax.profiler trace read back, and torch.profiler events (forward and backward) to the same parts."""

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.perf import profile


def test_op_names_map_to_parts():
    assert profile.part_of_op("jit(s)/jvp()/while/body/DecoderLayer/self_attn/dot_general", True) == profile.ATTN
    assert profile.part_of_op("jit(s)/transpose(jvp())/DecoderLayer/self_attn/prof_rope/mul", False) == profile.NORM
    moe = "jit(s)/jvp()/DecoderLayer/block_sparse_moe/cond/branch_1_fun/"
    assert profile.part_of_op(moe + "ecd,edf->ecf/dot_general", True) == profile.EXPERT
    assert profile.part_of_op(moe + "mcd,mdf->mcf/dot_general", True) == profile.EXPERT  # an overflow block
    assert profile.part_of_op(moe + "cd,cf->df/dot_general", True) == profile.EXPERT  # a backward spec
    assert profile.part_of_op(moe + "gate/td,de->te/dot_general", True) == profile.ROUTE  # the router
    assert profile.part_of_op(moe + "gather", False) == profile.ROUTE
    assert profile.part_of_op("jit(s)/jvp()/DecoderLayer/block_sparse_moe/dot_general", True) == profile.ROUTE
    assert profile.part_of_op("jit(s)/jvp(prof_logps)/bsd,dv->bsv/dot_general", True) == profile.LOGPS
    assert profile.part_of_op("jit(s)/mul", False) == profile.OPT  # after the gradient
    assert profile.part_of_op("jit(s)/jvp()/log_sigmoid", False) == profile.OTHER


def test_a_traced_program_is_grouped_by_its_scopes(tmp_path):
    def f(x, w):
        with jax.named_scope("self_attn"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("prof_norm"):
            y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6)
        return jnp.sum(y)

    fn = jax.jit(jax.value_and_grad(f, argnums=1))
    x, w = jnp.ones((64, 64)), jnp.full((64, 64), 0.01)
    compiled = fn.lower(x, w).compile()
    parts = profile.hlo_parts(compiled.as_text())
    assert profile.ATTN in parts.values() and profile.NORM in parts.values()
    jax.block_until_ready(compiled(x, w))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(compiled(x, w))
    secs = profile.trace_op_seconds(str(tmp_path), module_prefix="jit_f")
    assert secs and set(secs) <= set(parts)  # every timed thunk is an instruction of this program
    by_part = profile.group_jax(secs, parts, steps=2)
    assert by_part[profile.ATTN] > 0
    expect = sum(s for op, s in secs.items() if parts[op] is not None) / 2
    np.testing.assert_allclose(sum(by_part.values()), expect, rtol=1e-9)


def test_torch_events_forward_and_backward_go_to_their_modules_parts():
    import torch
    from torch.profiler import ProfilerActivity

    class MixtralAttention(torch.nn.Module):  # named like HF's: the hooks go by class name
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x):
            return torch.tanh(self.proj(x))

    vocab = 50
    model = torch.nn.Sequential(MixtralAttention(), torch.nn.Linear(32, vocab))
    x = torch.randn(16, 32)
    with profile.torch_part_hooks(vocab_size=vocab, num_experts=8):
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = torch.log_softmax(model(x), -1)[:, 0].sum()
            loss.backward()
    events = prof.events()
    parts = profile.group_torch(events, steps=1)
    assert parts[profile.ATTN] > 0 and parts[profile.LOGPS] > 0
    total = sum(e.self_cpu_time_total for e in events if not e.name.startswith("part::")) * 1e-6
    np.testing.assert_allclose(sum(parts.values()), total, rtol=1e-9)
    # The attention's backward (AddmmBackward0, TanhBackward0) counts as attention too: more than its forward.
    def under_attention(e):
        while e is not None:
            if e.name == f"part::{profile.ATTN}":
                return True
            e = e.cpu_parent
        return False

    forward = sum(e.self_cpu_time_total for e in events if under_attention(e) and not e.name.startswith("part::"))
    assert parts[profile.ATTN] > forward * 1e-6 > 0


def test_torch_experts_count_only_their_matmuls_as_expert_matmuls():
    """HF's experts module gathers rows, runs the activation and index_adds the result: those go to routing (as
    jsmaug's dispatch does), its matmuls, forward and backward, to the expert matmuls."""
    import torch
    from torch.profiler import ProfilerActivity

    class MixtralExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 64, 64) / 8)

        def forward(self, x, idx):
            out = torch.zeros_like(x)
            for e in range(4):
                rows = torch.where(idx == e)[0]
                h = torch.nn.functional.silu(x[rows] @ self.w[e])
                out.index_add_(0, rows, h)
            return out

    torch.manual_seed(0)
    model, x, idx = MixtralExperts(), torch.randn(256, 64, requires_grad=True), torch.randint(0, 4, (256,))
    with profile.torch_part_hooks(vocab_size=50, num_experts=4):
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, idx).square().sum().backward()
    events = prof.events()
    parts = profile.group_torch(events, steps=1)
    own = [e for e in events if not e.name.startswith("part::")]
    mm = sum(e.self_cpu_time_total for e in own if e.name in ("aten::mm", "aten::matmul")) * 1e-6
    np.testing.assert_allclose(parts[profile.EXPERT], mm, rtol=1e-9)
    assert parts[profile.ROUTE] > 0  # the where / gather / silu / index_add, forward and backward
    assert any(e.name == "aten::index_add_" for e in own)
    np.testing.assert_allclose(sum(parts.values()), sum(e.self_cpu_time_total for e in own) * 1e-6, rtol=1e-9)
