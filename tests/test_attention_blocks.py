"""jsmaug/perf/attention_blocks.py: every contender's gradients are checked against xla's before it is timed (a
block size that changed the values would be refused, not timed), and a layout's figures name every contender."""

import pytest

from jsmaug.models import attention
from jsmaug.perf import attention_blocks


def test_a_layouts_figures_cover_every_block_and_xla():
    r = attention_blocks.measure(64, 32, 2, 1, 16, rounds=1, calls=2)
    assert set(r["ms"]) == {f"chunked{b}" for b in attention_blocks.BLOCKS} | {"xla"}
    assert r["fastest"] in r["ms"] and r["cpu_block_vs_512"] > 0


def test_a_block_that_changes_the_values_is_refused(monkeypatch):
    shipped = attention.chunked_attention

    def wrong_at_64(q, k, v, seg, block_size=512, **kw):
        out = shipped(q, k, v, seg, block_size=block_size, **kw)
        return out * 1.01 if block_size == 64 else out
    monkeypatch.setattr(attention, "chunked_attention", wrong_at_64)
    with pytest.raises(AssertionError, match="chunked64"):
        attention_blocks.measure(64, 32, 2, 1, 16, rounds=1, calls=2)
