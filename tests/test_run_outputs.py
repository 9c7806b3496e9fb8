"""Who writes what: a process other than 0 writes nothing; process 0 writes each file whole.

A run in a bucket is not tested here: neither GCS emulator installable offline held up (see docs/pods.md,
"A workdir every host sees"); the paths go through `etils.epath`, whose local backend these tests use."""

import json

import numpy as np

from jsmaug.train.outputs import RunOutputs


def test_only_the_writer_writes(tmp_path):
    quiet = RunOutputs(tmp_path / "run", writer=False)
    quiet.check_writable()  # every process checks that it can write its checkpoint shards
    quiet.write_config({"a": 1})
    m = quiet.metrics(0, tensorboard=True)
    m.write(1, {"loss": 1.0})
    m.close()
    quiet.save_ref_cache(quiet.ref_cache_path("x"), np.zeros((2, 2), np.float32))
    assert list((tmp_path / "run").iterdir()) == []
    loud = RunOutputs(tmp_path / "run", writer=True)
    loud.write_config({"a": 1})
    m = loud.metrics(0, tensorboard=False)
    m.write(1, {"loss": 1.0})
    assert m.logged(1, "loss") and not m.logged(1, "eval/loss")
    m.close()
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 1}
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
