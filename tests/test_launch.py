"""`jsmaug launch`'s command lines (jsmaug/cli/launch.py); the processes themselves run in test_distributed.py
(training) and test_pairs_sample.py (`pairs sample`)."""

import pytest

from jsmaug.cli import launch


def test_each_process_gets_the_coordinator_in_its_commands_own_form():
    train = launch.command(["tiny_dpop", "train.steps=3"], "127.0.0.1:99", 2, 1, python="py")
    assert train == ["py", "-m", "jsmaug.train", "tiny_dpop", "train.steps=3",
                     "distributed.coordinator_address=127.0.0.1:99", "distributed.num_processes=2",
                     "distributed.process_id=1"]
    assert launch.command(["train", "tiny_dpop", "train.steps=3"], "127.0.0.1:99", 2, 1, python="py") == train
    sample = launch.command(["pairs", "sample", "--model", "M"], "127.0.0.1:99", 2, 0, python="py")
    assert sample == ["py", "-m", "jsmaug.cli.main", "pairs", "sample", "--model", "M", "--coordinator_address",
                      "127.0.0.1:99", "--num_processes", "2", "--process_id", "0"]
    with pytest.raises(SystemExit, match="not `pairs make`"):
        launch.command(["pairs", "make", "--format", "gsm8k"], "127.0.0.1:99", 2, 0)
