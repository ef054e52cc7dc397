"""FP8 helpers shared by the model, the loader and the converter.

- `act_quant`: the official per-128-block e4m3 quantisation with power-of-two (ue8m0)
  scales (spec 3.2): amax clamped to >= 1e-4, s = 2^ceil(log2(amax / 448)), clamp to
  +-448 *before* the cast (e4m3fn has no infinity; a plain cast of an overflow is NaN).
- `hadamard`: the Sylvester Hadamard rotation v -> v @ H_n * n^-0.5 the official indexer
  applies before quantising.
- `dequant_blocks`: W = fp8 * scale per [rows, cols] tile, ceil tiles (partial last tiles).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

FP8_MAX = 448.0


def pow2_scale(amax):
    """2^ceil(log2(amax / 448)) in float32, with amax clamped to >= 1e-4 (ue8m0 scales)."""
    v = jnp.maximum(amax.astype(jnp.float32), 1e-4) * jnp.float32(1.0 / FP8_MAX)
    # exact: exponent bits of v, plus one if any mantissa bit is set (as the official kernel)
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(exp << 23, jnp.float32)


def act_quant(x, block: int = 128):
    """Quantise the last axis of x in blocks of `block` to float8_e4m3fn.

    x: [..., N] with N % block == 0 -> (q [..., N] float8_e4m3fn, s [..., N // block] float32).
    """
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"act_quant: last axis {n} is not a multiple of the block {block}")
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], n // block, block)
    s = pow2_scale(jnp.max(jnp.abs(xb), axis=-1))
    q = jnp.clip(xb / s[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q.reshape(x.shape), s


def act_dequant(q, s, block: int = 128):
    """Inverse of `act_quant`: float32 [..., N]."""
    n = q.shape[-1]
    qb = q.astype(jnp.float32).reshape(*q.shape[:-1], n // block, block)
    return (qb * s[..., None]).reshape(q.shape)


def fp8_round_trip(x, block: int = 128):
    """x -> dequant(quant(x)) in x's dtype (the release's simulation of an FP8 KV cache)."""
    q, s = act_quant(x, block)
    return act_dequant(q, s, block).astype(x.dtype)


def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix H_n (n a power of two), entries +-1, float32."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard(x):
    """Rotate the last axis: x @ H_n * n^-0.5, computed in float32, returned in x's dtype."""
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n)) * jnp.float32(n ** -0.5)
    y = jnp.dot(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def check_block_scale(w, scale, block, where: str) -> None:
    """ValueError unless scale [..., ceil(R/br), ceil(C/bc)] fits the block-scaled w [..., R, C]."""
    br, bc = block
    r, c = w.shape[-2:]
    want = (math.ceil(r / br), math.ceil(c / bc))
    if tuple(scale.shape[-2:]) != want:
        raise ValueError(f"error: {where}: scale shape {tuple(scale.shape)} does not match FP8 weight {tuple(w.shape)} "
                         f"with {br}x{bc} blocks (expected [..., {want[0]}, {want[1]}])")


def dequant_blocks(w, scale, block=(128, 128), xp=jnp):
    """Dequantise a block-scaled matrix: w [R, C] (fp8) * scale [ceil(R/br), ceil(C/bc)] -> float32.

    Works for jnp and numpy (`xp=np`) arrays; the last row/column tiles may be partial.
    """
    br, bc = block
    r, c = w.shape[-2:]
    check_block_scale(w, scale, block, "dequant_blocks")
    s = xp.repeat(xp.repeat(scale.astype(xp.float32), br, axis=-2), bc, axis=-1)[..., :r, :c]
    return w.astype(xp.float32) * s
