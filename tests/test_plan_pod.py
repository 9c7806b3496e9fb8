"""tools/plan_pod.py's part that needs no TPU: the analytic FLOPs (MaxText's formula) by hand for one layer.
(Its HLO counts are tools/hlo_stats.py's, tested in tests/test_hlo_stats.py.)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import plan_pod  # noqa: E402

from jsmaug.models import config as cfg_lib  # noqa: E402

def test_analytic_flops_by_hand():
    c = cfg_lib.tiny(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    d, f, e, k, hq, hkv, dh, v, s = 8, 12, 4, 2, 2, 1, 4, 100, 16
    per_token = (2 * d * e + 3 * 2 * d * f * k + 2 * d * (hq + 2 * hkv) * dh + 2 * d * hq * dh + 4 * s * hq * dh / 2
                 + 2 * d * v)
    assert plan_pod.analytic_flops_per_step(c, 32, s, with_reference=False) == 32 * per_token * 3
    assert plan_pod.analytic_flops_per_step(c, 32, s, with_reference=True) == 32 * per_token * 4
    layers = 2 * d * e + 3 * 2 * d * f * k + 2 * d * (hq + 2 * hkv) * dh + 2 * d * hq * dh + 4 * s * hq * dh / 2
    assert plan_pod.analytic_flops_per_step(c, 32, s, False, remat_layers=True) == 32 * (per_token * 3 + layers)


def test_host_view_names_hosts_and_their_pairs():
    import jax

    from jsmaug.parallel import sharding as shd
    from jsmaug.train.config import load_run_config

    cfg, _ = load_run_config("configs/tiny_dpop.yaml", ["mesh.data=2", "mesh.fsdp=4"])
    mesh = shd.make_mesh(cfg.mesh, cfg.model)
    assert plan_pod.host_view(mesh, cfg, jax.devices()) == (
        "hosts: 1 (one JAX process each, distributed.enabled=true), 8 devices per host; pairs per host per step: "
        "8 of 8")
