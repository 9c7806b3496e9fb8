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
