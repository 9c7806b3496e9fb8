"""MXFP4 dequantization (jsmaug/hf/mxfp4.py) against a scalar reference written from the format's definition
(the 16 E2M1 values by code, the low nibble first, E8M0 scales of bias 127) and against transformers' own
`integrations/mxfp4.convert_moe_packed_tensors`, bit for bit in float32 and bfloat16."""

import ml_dtypes
import numpy as np
import pytest

from jsmaug.errors import CheckpointError
from jsmaug.hf import mxfp4

# OCP MX spec, FP4 E2M1 by code 0..15 (sign bit 3; exponent bits 2-1, bias 1, exponent 0 subnormal; mantissa bit 0).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _reference(blocks, scales):
    """Element by element in Python floats: byte j of a block holds elements 2j (low nibble) and 2j + 1."""
    *lead, groups, nbytes = blocks.shape
    out = np.zeros((*lead, groups * 32), np.float64)
    for idx in np.ndindex(*lead, groups):
        scale = 2.0 ** (int(scales[idx]) - 127)
        for j in range(nbytes):
            byte = int(blocks[idx][j])
            base = idx[:-1] + (idx[-1] * 32 + 2 * j,)
            out[base] = E2M1[byte & 0xF] * scale
            out[base[:-1] + (base[-1] + 1,)] = E2M1[byte >> 4] * scale
    return out


def _bits(a):
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


def test_the_sixteen_values_follow_the_bit_fields():
    np.testing.assert_array_equal(mxfp4.FP4_E2M1, np.float32(E2M1))
    np.testing.assert_array_equal(np.signbit(mxfp4.FP4_E2M1), np.arange(16) >= 8)  # -0.0 is code 8


def test_every_byte_under_every_kind_of_scale_equals_the_reference_bit_for_bit():
    """All 256 bytes (so every nibble in both positions) under scales from the subnormal end to the top of float32:
    float32 and bfloat16 results carry the reference's exact bits, signed zeros included."""
    scales = np.uint8([0, 1, 2, 100, 119, 126, 127, 128, 135, 200, 252])
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (len(scales), 16, 16)).copy()
    scales_2d = np.broadcast_to(scales[:, None], (len(scales), 16)).copy()
    want = _reference(blocks, scales_2d)
    got = mxfp4.dequantize(blocks, scales_2d)
    assert got.shape == (len(scales), 16 * 32) and got.dtype == np.float32
    np.testing.assert_array_equal(_bits(got), _bits(want.astype(np.float32)))
    got_bf16 = mxfp4.dequantize(blocks, scales_2d, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(_bits(got_bf16), _bits(want.astype(np.float32).astype(ml_dtypes.bfloat16)))
    assert np.all(np.isfinite(got)) and got.min() == -6 * 2.0 ** 125 and got[0].max() == 6 * 2.0 ** -127


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_equals_transformers_convert_moe_packed_tensors(dtype):
    """An (E, out, G, 16) expert stack as the hub stores it: transformers dequantizes the stack and transposes to
    its (E, in, out) parameter; jsmaug's per-expert dequantization, transposed alike, has the same bits."""
    import torch
    from transformers.integrations import mxfp4 as hf_mxfp4

    rng = np.random.default_rng(0)
    experts, out_features, groups = 3, 6, 4
    blocks = rng.integers(0, 256, (experts, out_features, groups, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (experts, out_features, groups), dtype=np.uint8)
    scales[0, 0, :2] = (0, 254)  # both ends of the exponent range (254: inf for |code| >= 2, in both)
    torch_dtype = getattr(torch, dtype)
    theirs = hf_mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                 dtype=torch_dtype)
    assert tuple(theirs.shape) == (experts, groups * 32, out_features)
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    ours = np.stack([mxfp4.dequantize(blocks[e], scales[e], np_dtype).T for e in range(experts)])
    theirs_np = theirs.view(torch.int32 if dtype == "float32" else torch.int16).numpy()
    np.testing.assert_array_equal(_bits(ours), theirs_np.view(_bits(ours).dtype))
    assert list(hf_mxfp4.FP4_VALUES) == E2M1


def test_packed_shapes_and_refusals_name_the_tensor():
    assert mxfp4.packed_shapes(5760, 2880) == ((5760, 90, 16), (5760, 90))  # gpt-oss-20b's gate_up_proj
    with pytest.raises(ValueError, match="not a multiple"):
        mxfp4.packed_shapes(8, 40)
    blocks = np.zeros((2, 3, 16), np.uint8)
    scales = np.full((2, 3), 127, np.uint8)
    scales[1, 2] = 255
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.experts.down_proj_scales: MXFP4 scale 255 \(E8M0 NaN\) "
                                              r"at index \(1, 2\)"):
        mxfp4.dequantize(blocks, scales, name="layers.0.mlp.experts.down_proj_scales")
    with pytest.raises(CheckpointError, match="do not pair"):
        mxfp4.dequantize(blocks, scales[:, :2])
    with pytest.raises(CheckpointError, match="uint8"):
        mxfp4.dequantize(blocks.astype(np.int8), scales)
