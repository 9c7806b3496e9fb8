"""tools/plan_pod.py's parts that need no TPU: the collective-bytes count of compiled HLO text, and the analytic
FLOPs (MaxText's formula) by hand for one layer."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import plan_pod  # noqa: E402

from jsmaug import config as cfg_lib  # noqa: E402

HLO = """
  %all-to-all.3 = bf16[8,2048,4096]{2,1,0} all-to-all(bf16[8,2048,4096]{2,1,0} %x), replica_groups={}
  %ag = (f32[4,128]{1,0}, s32[2]{0}) all-gather-start(f32[1,128]{1,0} %w), dimensions={0}
  %ar.1 = f32[] all-reduce(f32[] %l), to_apply=%add
  %dot.2 = bf16[8,8]{1,0} dot(bf16[8,4] %a, bf16[4,8] %b)
"""


def test_collective_bytes_counts_result_shapes_per_kind():
    got = plan_pod.collective_bytes(HLO)
    assert got == {"all-to-all": 8 * 2048 * 4096 * 2, "all-gather": 4 * 128 * 4 + 2 * 4, "all-reduce": 4}


def test_analytic_flops_by_hand():
    c = cfg_lib.tiny(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    d, f, e, k, hq, hkv, dh, v, s = 8, 12, 4, 2, 2, 1, 4, 100, 16
    per_token = (2 * d * e + 3 * 2 * d * f * k + 2 * d * (hq + 2 * hkv) * dh + 2 * d * hq * dh + 4 * s * hq * dh / 2
                 + 2 * d * v)
    assert plan_pod.analytic_flops_per_step(c, 32, s, with_reference=False) == 32 * per_token * 3
    assert plan_pod.analytic_flops_per_step(c, 32, s, with_reference=True) == 32 * per_token * 4
