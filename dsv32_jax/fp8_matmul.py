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
import numpy as np

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


def head_tile_steps(heads: int, frac: float, itemsize_fp8_ratio: float, *, max_tile_ratio: float = MAX_TILE_RATIO,
                    head_shards: int = 1, full_bytes: int = 0, min_tile_bytes: int = MIN_TILE_BYTES) -> int:
    """Scan steps S over the heads (S divides heads / head_shards) so that one float32 tile of
    `frac` of a head's columns is <= max_tile_ratio of the FP8 weight (itemsize_fp8_ratio = 4)."""
    local = heads // head_shards if heads % head_shards == 0 else heads
    want = math.ceil(itemsize_fp8_ratio * frac / max_tile_ratio)
    if min_tile_bytes and full_bytes // max(min_tile_bytes, 1) < want:
        want = max(1, full_bytes // max(min_tile_bytes, 1))
    fits = [d for d in _divisors(local) if d >= want]
    return min(fits) if fits else local


def fp8_head_einsum(spec: str, x, w8, scale, block: tuple[int, int], *, heads: int, cols: tuple[int, int],
                    out_dtype=None, head_shards: int = 1, max_tile_ratio: float = MAX_TILE_RATIO,
                    min_tile_bytes: int = MIN_TILE_BYTES):
    """A per-head product with a head-grouped FP8 weight, dequantised a few heads at a time.

    w8 [R, H*P] e4m3 (column h*P + p is column p of head h), scale [ceil(R/br), ceil(H*P/bc)],
    block = (br, bc); W[r, h, p] = w8[r, h*P + p] * scale[r // br, (h*P + p) // bc].
    x [B, T, H, X] -> [B, T, H, Y] = einsum(spec, x[:, :, heads], W[:, heads, c0:c1]) per head
    tile, with spec over a head tile: operands [B, T, A, X] and [R, A, c1 - c0], e.g.
    "btan,can->btac" (MLA's absorbed W_UK) or "btac,cav->btav" (W_UV).

    A `lax.scan` over S steps takes heads {a*S + s : a < A} per step (A = H / S), so a heads dim
    split over a mesh axis stays split on A; the largest weight temporary is one float32 tile
    [R, A, c1 - c0], <= max_tile_ratio of the FP8 weight (weights below min_tile_bytes may take
    one step). Each tile is dequantised exactly as `dequant_blocks` (w8 * scale in float32) and
    cast to x's dtype, so the products equal dequantise-then-einsum's operand for operand.
    """
    check_block_scale(w8, scale, block, "fp8_head_einsum")
    br, bc = block
    r, hp = w8.shape
    p = hp // heads
    c0, c1 = cols
    if hp != heads * p or not 0 <= c0 < c1 <= p:
        raise ValueError(f"error: fp8_head_einsum: weight {tuple(w8.shape)} is not {heads} heads with columns "
                         f"{c0}:{c1}")
    cd = x.dtype
    out_dtype = cd if out_dtype is None else out_dtype
    s = head_tile_steps(heads, (c1 - c0) / p, 4.0, max_tile_ratio=max_tile_ratio, head_shards=head_shards,
                        full_bytes=r * hp, min_tile_bytes=min_tile_bytes)
    a = heads // s
    with jax.named_scope("fp8_head_einsum"):
        w8, scale = jax.lax.stop_gradient(w8), jax.lax.stop_gradient(scale)          # frozen weights
        rows = jnp.take(scale.astype(jnp.float32), jnp.arange(r) // br, axis=0)       # [R, NB]
        w4 = w8.reshape(r, a, s, p)                                                     # view of the columns
        xv = x.reshape(*x.shape[:2], a, s, x.shape[-1])
        col = np.arange(c0, c1)

        def step(_, i):
            w_t = jax.lax.slice_in_dim(_tile(w4, i, 2, w8.dtype), c0, c1, axis=2)      # [R, A, c1-c0] e4m3
            blk = ((jnp.arange(a)[:, None] * s + i) * p + col[None, :]) // bc           # [A, c1-c0]
            w_t = (w_t.astype(jnp.float32) * jnp.take(rows, blk, axis=1)).astype(cd)
            x_t = jax.lax.dynamic_index_in_dim(xv, i, axis=3, keepdims=False)          # [B, T, A, X]
            y = jnp.einsum(spec, x_t, w_t, preferred_element_type=jnp.float32)
            return None, y.astype(out_dtype)

        _, ys = jax.lax.scan(jax.checkpoint(step), None, jnp.arange(s))              # [S, B, T, A, Y]
        ys = jnp.moveaxis(ys, 0, 3)                                                     # [B, T, A, S, Y]
        return ys.reshape(*ys.shape[:2], heads, ys.shape[-1])
