"""jsmaug/perf/bench.py's timer: the order it calls the contenders in and which calls it times (a fake clock, so
nothing here is timed)."""

from jsmaug.perf import bench


def _contenders(monkeypatch, log):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def make(name, first, rest):
        calls = []

        def fn():  # a step that costs `first` right after the other contender ran, `rest` back to back
            cost = first if not log or log[-1] != name else rest
            log.append(name)
            calls.append(cost)
            clock[0] += cost
        return fn
    return {"a": make("a", 10.0, 1.0), "b": make("b", 20.0, 2.0)}


def test_interleaved_calls_each_in_turn(monkeypatch):
    log = []
    t = bench.time_alternating(_contenders(monkeypatch, log), rounds=3)
    assert log == ["a", "b"] * 3
    assert t == {"a": 10.0, "b": 20.0}  # every call follows the other contender's (a's first follows nothing)


def test_blocks_time_the_steady_state(monkeypatch):
    log = []
    t = bench.time_alternating(_contenders(monkeypatch, log), rounds=2, block=3)
    assert log == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert t == {"a": 1.0, "b": 2.0}  # the first call of each block is not timed


def test_step_runner_places_a_precomputed_reference_batch():
    """The `step/dpop_precomputed_vs_sft` row's runner: the batch carries (2P,) reference log-probs beside the
    (2P, L) rows, each placed with the sharding of its own rank, and a step runs and moves the state."""
    import jax
    import numpy as np

    conf = bench.step_model_config(quick=True)
    batch = bench.synthetic_batch(np.random.default_rng(0), 2, 16, conf.vocab_size)
    batch["ref_logps"] = np.full((4,), -30.0, np.float32)  # far from the policy's: off DPOP's kink
    runner = bench.StepRunner(conf, "dpop", batch, None)
    assert runner.batch["ref_logps"].shape == (2, 2) and runner.batch["input_ids"].shape == (2, 2, 16)
    before = int(runner.state.step)
    runner()
    assert int(runner.state.step) == before + 1
    assert np.isfinite(np.asarray(jax.tree.leaves(runner.state.params)[0])).all()
