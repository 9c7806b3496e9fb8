"""Local and bucket paths: whole-or-nothing writes, absolute paths."""

import os

import pytest
from etils import epath

from jsmaug import paths


def test_atomic_write_leaves_no_temporary_and_never_half_a_file(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    paths.atomic_write(target, "one")
    paths.atomic_write(target, b"two")
    assert target.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]

    def broken_replace(self, other):  # a kill between writing and renaming
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(epath.Path(tmp_path)), "replace", broken_replace)
    with pytest.raises(OSError):
        paths.atomic_write(target, "three")
    assert target.read_text() == "two"  # the old content stays whole


def test_remote_and_absolute():
    assert paths.is_remote("gs://bucket/run") and not paths.is_remote("runs/x")
    assert str(paths.absolute("gs://bucket/run")) == "gs://bucket/run"
    assert str(paths.absolute("runs/x")) == os.path.join(os.getcwd(), "runs/x")


def test_read_json_object_names_the_file_and_raises_the_callers_error(tmp_path):
    class Mine(Exception):
        pass

    good, bad, arr = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "arr.json"
    good.write_text('{"a": 1}')
    bad.write_text("{not json")
    arr.write_text("[1, 2]")
    assert paths.read_json_object(good, Mine) == {"a": 1}
    with pytest.raises(Mine, match=f"{bad}: not valid JSON"):
        paths.read_json_object(bad, Mine)
    with pytest.raises(Mine, match=f"{arr}: must hold a JSON object, got list"):
        paths.read_json_object(arr, Mine)
