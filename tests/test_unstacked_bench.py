"""jsmaug/perf/unstacked_bench.py's contender: the DPOP step on params held per layer (a Python loop over the
layers) is the shipped scan's step (the same loss, MoE statistics and update), so the bench times two layouts of
one program."""

import jax
import numpy as np

from jsmaug.models import decoder as model
from jsmaug.perf import bench, unstacked_bench


def test_the_unstacked_step_equals_the_scans():
    config = bench.step_model_config(quick=True)
    batch = bench.synthetic_batch(np.random.default_rng(0), 2, 32, config.vocab_size)
    ref = model.init_params(config, jax.random.key(1))  # a reference away from the policy: off DPOP's kink
    scan = bench.StepRunner(config, "dpop", batch, ref)  # each runner has taken one step
    unstacked = unstacked_bench.UnstackedRunner(bench.StepRunner(config, "dpop", batch, ref))  # and one more
    scan.state, m = scan.fn(scan.state, scan.batch, scan.ref, False)
    got = unstacked.metrics
    assert set(got) == set(m)
    for k in ("loss", "loss/preference", "moe/aux_loss", "grad_norm"):
        np.testing.assert_allclose(float(got[k]), float(m[k]), rtol=2e-5, err_msg=k)
    assert float(m["moe/aux_loss"]) > 0
    want = unstacked_bench.unstack(scan.state.params)
    assert jax.tree.structure(want) == jax.tree.structure(unstacked.state.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(unstacked.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=3e-4)


def test_the_loop_is_patched_only_while_tracing():
    shipped = model.run_layers
    with unstacked_bench.layer_loop():
        assert model.run_layers is not shipped
    assert model.run_layers is shipped
