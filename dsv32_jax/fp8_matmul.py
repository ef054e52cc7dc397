"""Block-scaled FP8 matmuls that never materialise the dequantised weight.

The release stores every projection as float8_e4m3fn W8 [K, N] (our [in, out] layout) with one
float32 scale per (bk x bn) tile, scale [ceil(K/bk), ceil(N/bn)]; W = W8 * scale per tile.
Dequantising W whole costs a full-size copy per call (2x the FP8 bytes in bf16, 4x in f32).
Here the contraction is split instead, as the official FP8 GEMM does (spec 3.2: "fp32
accumulation per 128-K block, each block partial multiplied by the scales and summed in fp32"):

    y = sum_j  (x[:, chunk j] @ W8[chunk j, :]) * scale[kb(j), nb(col)]      (f32 sums)

with the partial product computed in the compute dtype (x's dtype; e4m3 -> bf16/f32 is exact)
and float32 accumulation. Chunks are c rows of K (c divides gcd(K, bk), so a chunk never
straddles a scale block and partial last tiles work), grouped as a [A, S, c] view of K: a
`lax.scan` over the S steps handles chunks {a*S + s : a < A} per step, so the largest weight
temporary is one tile [A*c, N] in the compute dtype, itemsize / S of the FP8 weight's bytes.
S is chosen so that this ratio is <= `max_tile_ratio` (default 1/6: S >= 12 in bf16, 24 in f32)
for weights above `min_tile_bytes` (smaller ones take a single step). The [A, S, c, N] view only
splits the leading (row) dim, so it is a layout-preserving reshape, and a K dim sharded over a
mesh axis stays sharded on A.

Gradients flow to x only (the FP8 weights and scales are frozen: `stop_gradient`); each step
is rematerialised in the backward pass (`jax.checkpoint`), so differentiating does not store
the dequantised tiles of every step either.

Numerics: for power-of-two (ue8m0) scales, each partial equals the dequantise-then-matmul
partial exactly; otherwise they differ by one rounding of W8*scale (f32: ~6e-8 relative; bf16
compute: the dequantised weight is itself rounded to bf16 there). Only summation order differs.

`fp8_matmul`: x [..., K] @ W -> [..., N].  `fp8_ragged_dot`: grouped (ragged_dot) form over
expert-stacked W8 [G, K, N] with per-expert scales [G, ceil(K/bk), ceil(N/bn)].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsv32_jax.grouped_matmul import grouped_matmul
from dsv32_jax.numerics import check_block_scale

MAX_TILE_RATIO = 1.0 / 6.0     # dequantised tile bytes / FP8 weight bytes
MIN_TILE_BYTES = 1 << 16       # weights whose compute-dtype copy is below this take one step


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tile_plan(k: int, n_cols: int, bk: int, itemsize: int, *, max_tile_ratio: float = MAX_TILE_RATIO,
              min_tile_bytes: int = MIN_TILE_BYTES) -> tuple[int, int, int]:
    """(c, A, S): the contraction K = A * S * c, chunk rows c | gcd(K, bk), S scan steps.

    `n_cols` is the number of weight elements per K row (N, or G*N for stacked experts).
    """
    full_bytes = k * n_cols * itemsize
    want = math.ceil(itemsize / max_tile_ratio)
    want = max(1, min(want, full_bytes // max(min_tile_bytes, 1)))
    if want == 1:                               # one step, chunks still within scale blocks
        g = math.gcd(k, bk)
        return g, k // g, 1
    best = None
    for c in sorted(_divisors(math.gcd(k, bk)), reverse=True):
        n = k // c
        if n < want:
            continue
        s = min(d for d in _divisors(n) if d >= want)
        if s <= 2 * want:                       # largest chunk with a near-minimal step count
            return c, n // s, s
        if best is None or s < best[2]:
            best = (c, n // s, s)
    if best is None:                            # K smaller than the wanted step count
        return 1, 1, k
    return best


def _chunk_scales(scale, k: int, c: int, bk: int):
    """scale [..., ceil(K/bk), NB] -> per-chunk rows [..., K/c, NB] (chunk j lies in block j*c // bk)."""
    rows = (jnp.arange(k // c) * c) // bk
    return jnp.take(scale.astype(jnp.float32), rows, axis=-2)


def _scale_cols(p, s, n: int, bn: int):
    """p [..., N] f32 times per-block scales s [..., NB] broadcast over each block's bn columns."""
    nb = s.shape[-1]
    if nb * bn == n:
        return (p.reshape(*p.shape[:-1], nb, bn) * s[..., None]).reshape(p.shape)
    return p * jnp.repeat(s, bn, axis=-1)[..., :n]


def _tile(w, i, axis: int, cd):
    """w[(:,) i] along `axis` (dropped), cast to the compute dtype (exact from e4m3).

    On XLA:CPU a float8 dynamic-slice is normalised by converting the whole operand to f16, a
    copy the compiler then hoists out of the loop; there the bits are sliced instead (the
    bitcast of the parameter costs XLA:CPU one FP8-sized copy). TPU/GPU slice float8 directly.
    """
    def direct(w, i):
        return jax.lax.dynamic_index_in_dim(w, i, axis=axis, keepdims=False)

    def bits(w, i):
        t = direct(jax.lax.bitcast_convert_type(w, jnp.uint8), i)
        return jax.lax.bitcast_convert_type(t, w.dtype)

    if jnp.dtype(w.dtype).itemsize == 1 and jnp.issubdtype(w.dtype, jnp.floating):
        t = jax.lax.platform_dependent(w, i, cpu=bits, default=direct)
    else:
        t = direct(w, i)
    return t.astype(cd)


def fp8_matmul(x, w8, scale, block: tuple[int, int], *, out_dtype=None, max_tile_ratio: float = MAX_TILE_RATIO,
               min_tile_bytes: int = MIN_TILE_BYTES):
    """x [..., K] @ (w8 [K, N] e4m3 * scale [ceil(K/bk), ceil(N/bn)] per tile) -> [..., N].

    block = (bk, bn): rows of K and columns of N per scale. Partial products in x's dtype with
    float32 accumulation; the result is cast to `out_dtype` (default x's dtype).
    """
    check_block_scale(w8, scale, block, "fp8_matmul")
    bk, bn = block
    k, n = w8.shape
    if x.shape[-1] != k:
        raise ValueError(f"error: fp8_matmul: x has {x.shape[-1]} features, the weight {k} rows")
    cd = x.dtype
    out_dtype = cd if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    m = math.prod(lead)
    c, a, s = tile_plan(k, n, bk, jnp.dtype(cd).itemsize, max_tile_ratio=max_tile_ratio,
                        min_tile_bytes=min_tile_bytes)
    with jax.named_scope("fp8_matmul"):
        w8, scale = jax.lax.stop_gradient(w8), jax.lax.stop_gradient(scale)         # frozen weights
        cs = _chunk_scales(scale, k, c, bk).reshape(a, s, -1).swapaxes(0, 1)          # [S, A, NB]
        xv = x.reshape(m, a, s, c)                                                      # view of K
        w4 = w8.reshape(a, s, c, n)                                                     # view of K
        # decode-sized calls (the A partials no larger than the tile): one batched dot per step and
        # the sum over A once at the end (one reduction when K is sharded over A); larger calls
        # accumulate one [M, N] partial at a time.
        batched = a * m * n * 4 <= a * c * n * jnp.dtype(cd).itemsize
        keep_a = batched and a > 1

        def step(acc, inp):
            i, cs_s = inp
            x_s = jax.lax.dynamic_index_in_dim(xv, i, axis=2, keepdims=False)          # [M, A, c]
            w_t = _tile(w4, i, 1, cd)                                                   # [A, c, N]
            if batched:
                p = jax.lax.dot_general(x_s, w_t, (((2,), (1,)), ((1,), (0,))),
                                        preferred_element_type=jnp.float32)            # [A, M, N]
                p = _scale_cols(p, cs_s[:, None, :], n, bn)
                return acc + (p if keep_a else jnp.sum(p, axis=0)), None
            for j in range(a):
                p = jnp.dot(x_s[:, j], w_t[j], preferred_element_type=jnp.float32)      # [M, N]
                acc = acc + _scale_cols(p, cs_s[j], n, bn)
            return acc, None

        acc0 = jnp.zeros((a, m, n) if keep_a else (m, n), jnp.float32)
        acc, _ = jax.lax.scan(jax.checkpoint(step), acc0, (jnp.arange(s), cs))
        if keep_a:
            acc = jnp.sum(acc, axis=0)
        return acc.astype(out_dtype).reshape(*lead, n)


def fp8_ragged_dot(x, w8, scale, group_sizes, block: tuple[int, int], *, max_tile_ratio: float = MAX_TILE_RATIO,
                   min_tile_bytes: int = MIN_TILE_BYTES):
    """Grouped matmul over expert-stacked FP8 weights, float32 [R, N].

    x [R, K] rows sorted by group, w8 [G, K, N] e4m3, scale [G, ceil(K/bk), ceil(N/bn)],
    group_sizes int32 [G] (rows past their sum give zeros): row r of group g gets
    x[r] @ (w8[g] * scale[g]). Each K chunk is one `ragged_dot` whose rows are then scaled by
    their own group's scales.
    """
    check_block_scale(w8, scale, block, "fp8_ragged_dot")
    bk, bn = block
    g, k, n = w8.shape
    r = x.shape[0]
    cd = x.dtype
    c, a, s = tile_plan(k, g * n, bk, jnp.dtype(cd).itemsize, max_tile_ratio=max_tile_ratio,
                        min_tile_bytes=min_tile_bytes)
    with jax.named_scope("fp8_ragged_dot"):
        w8, scale = jax.lax.stop_gradient(w8), jax.lax.stop_gradient(scale)         # frozen weights
        cs = _chunk_scales(scale, k, c, bk).reshape(g, a, s, -1).transpose(2, 0, 1, 3)  # [S, G, A, NB]
        xv = x.reshape(r, a, s, c)                                                      # view of K
        w5 = w8.reshape(g, a, s, c, n)
        ends = jnp.cumsum(group_sizes)
        row_group = jnp.minimum(jnp.searchsorted(ends, jnp.arange(r), side="right"), g - 1)

        def step(acc, inp):
            i, cs_s = inp
            x_s = jax.lax.dynamic_index_in_dim(xv, i, axis=2, keepdims=False)          # [R, A, c]
            w_t = _tile(w5, i, 2, cd)                                                   # [G, A, c, N]
            for j in range(a):
                p = grouped_matmul(x_s[:, j], w_t[:, j], group_sizes)
                acc = acc + _scale_cols(p, jnp.take(cs_s[:, j], row_group, axis=0), n, bn)
            return acc, None

        acc, _ = jax.lax.scan(jax.checkpoint(step), jnp.zeros((r, n), jnp.float32), (jnp.arange(s), cs))
        return acc
