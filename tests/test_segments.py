"""jsmaug/segments.py's rules, on rows written out by hand: runs of one id, each segment's span, and the index a
sliding window measures by (a rejected branch's row index less its chosen branch's length; everything else its
row index)."""

import jax.numpy as jnp
import numpy as np

from jsmaug.segments import CHOSEN, PROMPT, REJECTED, run_starts, segment_bounds, shared_id, window_index

U1 = [shared_id(1, PROMPT)] * 2 + [shared_id(1, CHOSEN)] * 3 + [shared_id(1, REJECTED)] * 3
U2 = [shared_id(2, CHOSEN)] * 2 + [shared_id(2, REJECTED)] * 3  # a one-token prompt: no prompt run
ROW = jnp.array([U1 + U2 + [0] * 3])


def test_run_starts_count_padding_as_a_run_like_any_id():
    ids = jnp.array([[0, 0, 2, 2, 2, 1, 0, 0]])  # packed sequence ids: sequence 0 and padding share the id 0
    assert np.asarray(run_starts(ids))[0].tolist() == [0, 0, 2, 2, 2, 5, 6, 6]


def test_segment_bounds_are_each_runs_span_and_padding_its_own():
    start, end = (np.asarray(a)[0].tolist() for a in segment_bounds(ROW))
    assert start == [0, 0, 2, 2, 2, 5, 5, 5, 8, 8, 10, 10, 10, 13, 14, 15]
    assert end == [2, 2, 5, 5, 5, 8, 8, 8, 10, 10, 13, 13, 13, 14, 15, 16]


def test_the_window_index_is_each_sequences_own_spacing():
    # the pair's own positions: unit 1's chosen and rejected branches both continue its prompt (0, 1, then 2, 3, 4)
    assert np.asarray(window_index(ROW))[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 8, 9, 8, 9, 10, 13, 14, 15]
    plain = jnp.array([[1, 1, 1, 2, 2, 3, 0]])  # ordinary segments: the row's indices
    assert np.asarray(window_index(plain))[0].tolist() == list(range(7))
    # a rejected branch that does not follow its own chosen branch is measured by the row
    stray = jnp.array([[shared_id(1, CHOSEN), shared_id(1, CHOSEN), 5, shared_id(1, REJECTED), shared_id(1, REJECTED)]])
    assert np.asarray(window_index(stray))[0].tolist() == [0, 1, 2, 3, 4]
