"""jsmaug/perf/flops.py: the analytic FLOPs (MaxText's formula) by hand for one layer. (The compiled count is
jsmaug/perf/hlo_stats.py's, tested in tests/test_hlo_stats.py.)"""

from jsmaug.models import config as cfg_lib
from jsmaug.perf.flops import analytic_flops_per_step


def test_analytic_flops_by_hand():
    c = cfg_lib.tiny(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    d, f, e, k, hq, hkv, dh, v, s = 8, 12, 4, 2, 2, 1, 4, 100, 16
    per_token = (2 * d * e + 3 * 2 * d * f * k + 2 * d * (hq + 2 * hkv) * dh + 2 * d * hq * dh + 4 * s * hq * dh / 2
                 + 2 * d * v)
    assert analytic_flops_per_step(c, 32, s, with_reference=False) == 32 * per_token * 3
    assert analytic_flops_per_step(c, 32, s, with_reference=True) == 32 * per_token * 4
    layers = 2 * d * e + 3 * 2 * d * f * k + 2 * d * (hq + 2 * hkv) * dh + 2 * d * hq * dh + 4 * s * hq * dh / 2
    assert analytic_flops_per_step(c, 32, s, False, remat_layers=True) == 32 * (per_token * 3 + layers)
