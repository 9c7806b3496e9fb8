"""Completion log-probs: the chunked kernel against the plain computation (values, gradients), masked positions
never unembedded, LD-DPO's token weights and WPO's aligned log-probs against naive full-logits formulas, rows
laid end to end in groups (`row_groups`) equal to rows one by one."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import logps


def test_sequence_logps_naive_and_chunked():
    rng = np.random.default_rng(0)
    b, s, v = 3, 11, 17
    logits = jnp.asarray(rng.normal(size=(b, s, v)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (b, s)), jnp.int32)
    lsm = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
    want = np.array([sum(lsm[i, t, labels[i, t]] for t in range(s) if mask[i, t]) for i in range(b)])
    got, n = logps.sequence_logps(logits, labels, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n, np.asarray(mask).sum(1))
    for chunk in (1, 4, 5):
        got_c, _ = logps.sequence_logps(logits, labels, mask, chunk_size=chunk)
        np.testing.assert_allclose(got_c, got, rtol=1e-6, atol=1e-6)
    # hidden-state form with a chunked unembed: values and gradients equal the plain form
    d = 6
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    plain = lambda w: jnp.sum(logps.sequence_logps_from_hidden(h, lambda x: x @ w, labels, mask)[0])
    chunked = lambda w: jnp.sum(logps.sequence_logps_from_hidden(h, lambda x: x @ w, labels, mask, chunk_size=4)[0])
    np.testing.assert_allclose(chunked(w), plain(w), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(chunked)(w), jax.grad(plain)(w), rtol=1e-5, atol=1e-6)
    for chunk in (1, 2, 5, 50):
        f = lambda h, w: jnp.sum(jnp.sin(logps.sequence_logps_from_hidden(h, lambda x: x @ w, labels, mask,
                                                                            chunk_size=chunk)[0]))
        g = lambda h, w: jnp.sum(jnp.sin(logps.sequence_logps_from_hidden(h, lambda x: x @ w, labels, mask)[0]))
        for a, b_, name in zip(jax.grad(f, (0, 1))(h, w), jax.grad(g, (0, 1))(h, w), ("hidden", "unembed")):
            np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6, err_msg=f"chunk {chunk} {name}")
    zero = jnp.zeros_like(mask)
    np.testing.assert_array_equal(logps.sequence_logps_from_hidden(h, lambda x: x @ w, labels, zero,
                                                                    chunk_size=2)[0], np.zeros(b))


def test_chunked_logps_never_touch_unmasked_positions():
    """Prompt and padding positions never reach the unembedding: NaN hidden states there change nothing."""
    rng = np.random.default_rng(1)
    b, s, d, v = 2, 12, 4, 9
    mask = np.zeros((b, s), np.int32)
    mask[0, 8:11] = 1
    mask[1, 3:5] = 1
    h = rng.normal(size=(b, s, d)).astype(np.float32)
    h_nan = np.where(mask[..., None] > 0, h, np.nan).astype(np.float32)
    labels = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    f = lambda h, w: logps.sequence_logps_from_hidden(h, lambda x: x @ w, labels, mask, chunk_size=1)[0]
    np.testing.assert_allclose(f(h_nan, w), f(h, w), rtol=1e-6)
    grad_w = jax.grad(lambda w: jnp.sum(f(h_nan, w)))(w)
    assert np.all(np.isfinite(grad_w))
    assert not np.all(np.isfinite(logps.sequence_logps_from_hidden(h_nan, lambda x: x @ w, labels, mask)[0]))


def test_ld_weights_follow_trls_rule():
    mask = np.zeros((4, 8), np.int32)
    mask[0, 2:7] = 1  # chosen of pair 0: 5 tokens
    mask[2, 3:5] = 1  # rejected of pair 0: 2 tokens -> shared 2
    mask[1, 1:4] = 1  # chosen of pair 1: 3 tokens
    mask[3, 0:6] = 1  # rejected of pair 1: 6 tokens -> shared 3
    w = np.asarray(logps.ld_weights(jnp.asarray(mask), 0.25))
    assert w[0].tolist() == [0, 0, 1, 1, .25, .25, .25, 0] and w[2].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert w[1].tolist() == [0, 1, 1, 1, 0, 0, 0, 0] and w[3].tolist() == [1, 1, 1, .25, .25, .25, 0, 0]


def _pairs_batch(seed, s, d, v):
    """Hidden states (4, s, d), an unembedding (d, v), labels, completion masks of 5 / 3 / 8 / 2 tokens for
    two [chosen; rejected] pairs, and their LD-DPO weights (alpha 0.4)."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(4, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (4, s)), jnp.int32)
    mask = np.zeros((4, s), np.int32)
    for i, (a, n) in enumerate([(2, 5), (4, 3), (1, 8), (6, 2)]):
        mask[i, a:a + n] = 1
    return h, w, labels, mask, logps.ld_weights(jnp.asarray(mask), 0.4)


@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_token_weights_and_wpo_alignment_equal_full_logits(chunk):
    h, w, labels, mask, weights = _pairs_batch(4, 10, 5, 13)
    out = logps.sequence_logps_from_hidden(h, lambda x: x @ w, labels, mask, chunk_size=chunk,
                                           token_weights_BxS=weights, with_aligned=True)
    logits = np.asarray(h @ w, np.float64)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    lp = np.take_along_axis(lsm, np.asarray(labels)[..., None], -1)[..., 0]
    log_sum_sq = np.log((np.exp(lsm) ** 2).sum(-1))
    np.testing.assert_allclose(out.logps, (lp * mask * np.asarray(weights)).sum(1), rtol=1e-5)
    np.testing.assert_allclose(out.logps_unweighted, (lp * mask).sum(1), rtol=1e-5)
    np.testing.assert_allclose(out.aligned_logps, ((lp - log_sum_sq) * mask).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(out.num_tokens, mask.sum(1))
    # The weighted sum's gradient is the weighted gradient; the aligned term carries none (WPO: no_grad).
    g = jax.grad(lambda w: jnp.sum(logps.sequence_logps_from_hidden(
        h, lambda x: x @ w, labels, mask, chunk_size=chunk, token_weights_BxS=weights, with_aligned=True).logps))(w)
    g_plain = jax.grad(lambda w: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ w), labels[..., None], -1)[..., 0]
                                         * mask * weights))(w)
    np.testing.assert_allclose(g, g_plain, rtol=1e-4, atol=1e-6)
    g_aligned = jax.grad(lambda w: jnp.sum(logps.sequence_logps_from_hidden(
        h, lambda x: x @ w, labels, mask, chunk_size=chunk, with_aligned=True).aligned_logps))(w)
    assert not np.any(np.asarray(g_aligned))


def test_bad_inputs_raise_clearly():
    with pytest.raises(TypeError, match="labels must be integers"):
        logps.sequence_logps(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)), jnp.ones((1, 2)))


@pytest.mark.parametrize("chunk", [None, 1, 4, 64])
def test_unembedding_matrix_path_equals_autodiff(chunk):  # 64: one chunk longer than the rows
    """Passing the (D, V) matrix takes the hand-written backward (`_unembed_label_logps`): its values and its
    gradients (hidden states and matrix; token weights on; WPO's aligned sum beside) equal autodiff through the
    same unembedding passed as a function."""
    h, w, labels, mask, weights = _pairs_batch(7, 9, 6, 23)

    def run(h, w, as_matrix, aligned, vd=False):
        unembed = (w.T if vd else w) if as_matrix else (lambda x: x @ w)  # vd: a tied model's (V, D) table
        out = logps.sequence_logps_from_hidden(h, unembed, labels, mask, chunk_size=chunk, token_weights_BxS=weights,
                                               with_aligned=aligned, table_vd=vd)
        # a nonlinear read of both sums, so every position's cotangent differs
        return jnp.sum(jnp.sin(out.logps) + 0.3 * out.logps_unweighted ** 2), out

    for aligned in (False, True):
        (val_f, out_f), g_f = jax.value_and_grad(run, (0, 1), has_aux=True)(h, w, False, aligned)
        for vd in (False, True):
            (val_m, out_m), g_m = jax.value_and_grad(run, (0, 1), has_aux=True)(h, w, True, aligned, vd)
            np.testing.assert_allclose(val_m, val_f, rtol=1e-6)
            if aligned:
                np.testing.assert_allclose(out_m.aligned_logps, out_f.aligned_logps, rtol=1e-6)
            for a, b_, name in zip(g_m, g_f, ("hidden", "unembed")):
                # the (V, D) contraction sums in another order: float32 rounding of a small, cancelling entry
                # (1.9e-6 on an entry of 0.04 seen); a wrong axis or a missing transpose is off by O(1)
                np.testing.assert_allclose(a, b_, rtol=1e-5, atol=5e-6 if vd else 1e-6,
                                           err_msg=f"{name}, aligned={aligned}, vd={vd}")
    # bfloat16 matrix: the same casts as the function path (h to bf16, float32 logits)
    wb = w.astype(jnp.bfloat16)
    f_m = lambda h, w: jnp.sum(logps.sequence_logps_from_hidden(h, w, labels, mask, chunk_size=chunk).logps)
    f_f = lambda h, w: jnp.sum(logps.sequence_logps_from_hidden(
        h, lambda x: jnp.einsum("bsd,dv->bsv", x.astype(w.dtype), w, preferred_element_type=jnp.float32),
        labels, mask, chunk_size=chunk).logps)
    np.testing.assert_allclose(f_m(h, wb), f_f(h, wb), rtol=1e-6)
    for a, b_ in zip(jax.grad(f_m, (0, 1))(h, wb), jax.grad(f_f, (0, 1))(h, wb)):
        assert a.dtype == b_.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("as_matrix", [True, False])
def test_rows_laid_end_to_end_in_groups_give_the_same_values_and_gradients(as_matrix):
    """`row_groups` lays the rows end to end (all in one, in two groups, or one per row): completions of 5 / 3 / 8 /
    2 tokens then share chunks. Values (weighted, plain, aligned) and gradients equal those of every position at once
    (no chunks), as row by row does, and the kernel gets the grouped shapes: in two groups, 8 and 10 masked
    positions in chunks of 2 x 3 (2 chunks), against the longest row's 8 in chunks of 3 (3 chunks)."""
    h, w, labels, mask, weights = _pairs_batch(11, 12, 6, 19)

    def run(h, w, groups, chunk=3):
        unembed = w if as_matrix else (lambda x: x @ w)
        out = logps.sequence_logps_from_hidden(h, unembed, labels, mask, chunk_size=chunk, token_weights_BxS=weights,
                                               with_aligned=True, row_groups=groups)
        return jnp.sum(jnp.sin(out.logps) + 0.3 * out.logps_unweighted ** 2), out

    # the reference: every position unembedded at once (no chunks, no grouping)
    (val, out), grads = jax.value_and_grad(run, (0, 1), has_aux=True)(h, w, None, None)
    for groups in (None, 1, 2, 4, 3):  # 3 does not divide the 4 rows: row by row, as None
        (val_g, out_g), grads_g = jax.value_and_grad(run, (0, 1), has_aux=True)(h, w, groups)
        np.testing.assert_allclose(val_g, val, rtol=1e-6)
        for a, b_ in zip(out_g, out):
            np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-6)
        for a, b_ in zip(grads_g, grads):
            np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
    seen = []
    real = logps._masked_positions_only

    def spy(fn, h, lb, m, chunk, *args):
        seen.append((h.shape[:2], chunk))
        return real(fn, h, lb, m, chunk, *args)

    logps._masked_positions_only = spy
    try:
        for groups in (None, 2):
            logps.sequence_logps_from_hidden(h, w if as_matrix else (lambda x: x @ w), labels, mask, chunk_size=3,
                                             row_groups=groups)
    finally:
        logps._masked_positions_only = real
    assert seen == [((4, 12), 3), ((2, 24), 6)]
