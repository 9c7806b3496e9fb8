"""MXFP4 (OCP Microscaling, FP4 E2M1 elements with one E8M0 scale per block of 32): the format the hub stores
gpt-oss's experts in, dequantized on import (jsmaug/hf/read.py) one expert at a time.

The hub's tensors, per expert weight `W` of HF orientation (out, in) (`gate_up_proj`: (2F, D), `down_proj`:
(D, F)):
- `*_blocks` uint8 (E, out, in / 32, 16): two FP4 codes a byte, the LOW nibble first (element 2j is
  `byte_j & 0xF`, element 2j + 1 is `byte_j >> 4`), 32 elements a block along `in`;
- `*_scales` uint8 (E, out, in / 32): the block's E8M0 exponent, value 2 ** (s - 127).
An FP4 E2M1 code is sign (bit 3), a 2-bit exponent (bits 2-1, bias 1) and a 1-bit mantissa (bit 0): exponent 0 is
subnormal (0 or 0.5), so the 16 codes are +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. Every product code * 2 ** k has at most
two significant bits: float32 and bfloat16 hold it exactly down to 2 ** -128 (float16 while 2 ** k stays in its
range); the products above float32's range (scale 253 with |code| >= 4, 254 with |code| >= 2) are inf, as transformers gives them.
The E8M0 code 255 is NaN in the OCP spec: refused, naming the tensor, rather than turned into inf.

transformers' `integrations/mxfp4.py` (`convert_moe_packed_tensors`) is the reference the tests hold this to,
bit for bit, after its (E, out, in) -> (E, in, out) transpose (gpt-oss's `gate_up_proj` parameter is (E, D, 2F)).
"""

from __future__ import annotations

import numpy as np

from jsmaug.errors import CheckpointError

BLOCK = 32  # elements per scale
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127
SCALE_NAN = 255


def _e2m1_values() -> np.ndarray:
    """The 16 FP4 E2M1 values by code, from the bit fields (sign 1, exponent 2 with bias 1, mantissa 1)."""
    codes = np.arange(16)
    sign = np.where(codes & 0b1000, -1.0, 1.0)
    exponent, mantissa = (codes >> 1) & 0b11, codes & 0b1
    magnitude = np.where(exponent == 0, mantissa * 0.5, 2.0 ** (exponent - 1) * (1.0 + mantissa / 2.0))
    return (sign * magnitude).astype(np.float32)


FP4_E2M1 = _e2m1_values()


def packed_shapes(out_features: int, in_features: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """(blocks shape, scales shape) of one expert's (out, in) weight; `in` must be a multiple of 32."""
    if in_features % BLOCK:
        raise ValueError(f"MXFP4 packs blocks of {BLOCK} along the input axis; {in_features} is not a multiple")
    groups = in_features // BLOCK
    return (out_features, groups, BYTES_PER_BLOCK), (out_features, groups)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32, name: str = "MXFP4 tensor") -> np.ndarray:
    """(..., G, 16) uint8 blocks and (..., G) uint8 scales -> (..., G * 32) values in `dtype` (exact).
    `name` (the checkpoint tensor) goes into the errors."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CheckpointError(f"{name}: MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1:] != (BYTES_PER_BLOCK,) or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"{name}: MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair: blocks "
                              f"are (..., G, {BYTES_PER_BLOCK}) with scales (..., G)")
    if np.any(scales == SCALE_NAN):
        where = tuple(int(i[0]) for i in np.nonzero(scales == SCALE_NAN))
        raise CheckpointError(f"{name}: MXFP4 scale 255 (E8M0 NaN) at index {where}; a checkpoint's weights are "
                              "finite")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # (..., G, 16, 2): low nibble first
    values = FP4_E2M1[codes].reshape(*scales.shape, BLOCK)  # (..., G, 32) float32
    exponents = scales.astype(np.int32) - SCALE_BIAS
    with np.errstate(over="ignore"):  # scales 253-254 with large codes: inf, as in transformers
        out = np.ldexp(values, exponents[..., None])  # float32, exact otherwise (2 significant bits)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).astype(dtype, copy=False)
