"""jsmaug/train/metrics_log.py: the expert-load summary (64 or 128 numbers per line would be unreadable) and the
writer that puts the summary in metrics.jsonl and the whole vector in TensorBoard."""

import json

import numpy as np
import pytest

from jsmaug.train import metrics_log


def test_expert_load_summary_by_hand():
    s = metrics_log.expert_load_summary(np.full(64, 1 / 64))
    assert s == pytest.approx({"moe/expert_load_min": 1.0, "moe/expert_load_max": 1.0,
                               "moe/expert_load_entropy": 1.0, "moe/experts_idle": 0})
    one = np.zeros(64)
    one[5] = 1.0  # a collapsed router: every token to one expert
    assert metrics_log.expert_load_summary(one) == pytest.approx(
        {"moe/expert_load_min": 0.0, "moe/expert_load_max": 64.0, "moe/expert_load_entropy": 0.0,
         "moe/experts_idle": 63})
    load = np.array([0.5, 0.25, 0.25, 0.0])
    h = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)) / np.log(4)
    assert metrics_log.expert_load_summary(load) == pytest.approx(
        {"moe/expert_load_min": 0.0, "moe/expert_load_max": 2.0, "moe/expert_load_entropy": h,
         "moe/experts_idle": 1})
    assert metrics_log.expert_load_summary([]) == {}  # a dense model has no experts
    assert metrics_log.expert_load_summary(np.zeros(1)) == {}  # the train step's placeholder for a dense model


class _Board:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, key, value, step):
        self.scalars[key] = value

    def flush(self):
        pass

    close = flush


def test_writer_puts_the_summary_in_the_file_and_the_vector_in_tensorboard(tmp_path):
    w = metrics_log.MetricsWriter(tmp_path, 0, tensorboard=False)
    w.tb = _Board()
    load = np.random.default_rng(0).dirichlet(np.ones(128))
    w.write(3, {"loss": np.float32(0.5), "moe/expert_load": load, "moe/dropped": np.int32(0)})
    w.close()
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "moe/expert_load" not in row and row["step"] == 3 and row["loss"] == 0.5
    assert row["moe/expert_load_max"] == pytest.approx(load.max() * 128)
    assert len([k for k in w.tb.scalars if k.startswith("moe/expert_load/")]) == 128
    assert w.tb.scalars["moe/expert_load/7"] == pytest.approx(load[7])
    assert w.tb.scalars["moe/expert_load_entropy"] == row["moe/expert_load_entropy"]
