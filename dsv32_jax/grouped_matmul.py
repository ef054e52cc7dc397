"""The one grouped matmul of the MoE: rows sorted by expert times each row's expert weight.

    out[m] = x[m] @ w[g(m)]        x [M, K] sorted by group, w [G, K, N], group_sizes [G]
                                   (rows past sum(group_sizes) give zeros)

Two implementations, chosen by backend:
  "ragged": `jax.lax.ragged_dot` — the TPU/GPU grouped-matmul kernels.
  "tiles":  for XLA:CPU, whose ragged_dot computes every group densely (G x the work). The
            sorted rows are cut into tiles of `tile` rows; a tile touches a contiguous range of
            groups, so the (tile, group) pairs number at most n_tiles + G - 1. A lax.scan over
            that static bound multiplies each tile by each of its groups' weights (rows of
            other groups masked), so the cost follows the tokens routed:
            (n_tiles + G) x tile x K x N instead of G x M x K x N.
Both accumulate in float32 (preferred_element_type) and return float32 [M, N].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv32_jax.bits import as_bits, from_bits

IMPLS = ("auto", "ragged", "tiles")


def _check(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; expected one of {IMPLS}")


def _tile_rows(m: int, g: int) -> int:
    """Rows per tile: about M / G (one tile per group when routing is balanced), 8..128."""
    t = 8
    while t < 128 and t * g < m:
        t *= 2
    return t


def tiled_shape(m: int, g: int, tile: int | None = None) -> tuple[int, int]:
    """(scan steps, rows per step) of the "tiles" form for M sorted rows over G groups."""
    t = tile or _tile_rows(m, g)
    return -(-m // t) + g - 1, t


def grouped_matmul(x, w, group_sizes, *, impl: str = "auto", tile: int | None = None):
    """x [M, K] (sorted by group), w [G, K, N], group_sizes int32 [G] -> float32 [M, N].

    impl "auto" decides when the program is lowered: "tiles" for the CPU, "ragged" for TPU/GPU
    (so a TPU program lowered on a CPU host gets ragged_dot)."""
    _check(impl)
    if impl == "auto":
        return jax.lax.platform_dependent(x, w, group_sizes, cpu=lambda *a: _tiles(*a, tile),
                                          default=_ragged)
    return _ragged(x, w, group_sizes) if impl == "ragged" else _tiles(x, w, group_sizes, tile)


def _ragged(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)


def _tiles(x, w, group_sizes, tile):
    m, k = x.shape
    g, _, n = w.shape
    n_pairs, t = tiled_shape(m, g, tile)
    n_tiles = -(-m // t)
    dt = x.dtype
    xp = as_bits(jnp.pad(x, ((0, n_tiles * t - m), (0, 0))))
    wb = as_bits(w.astype(dt))
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(n_tiles * t, dtype=jnp.int32), side="right")   # G = past the end
    # groups touched by each tile: [first, last] (contiguous); pairs enumerated tile-major
    first = row_group[::t]
    last = jnp.minimum(row_group[t - 1::t], g - 1)
    count = jnp.where(first < g, last - first + 1, 0)
    pair_end = jnp.cumsum(count)
    pid = jnp.arange(n_pairs, dtype=jnp.int32)
    pair_tile = jnp.minimum(jnp.searchsorted(pair_end, pid, side="right"), n_tiles - 1)
    pair_group = first[pair_tile] + pid - (pair_end - count)[pair_tile]
    valid = pid < pair_end[-1]

    def body(out, p):
        tile_i, grp, ok = p
        rows = from_bits(jax.lax.dynamic_slice_in_dim(xp, tile_i * t, t, 0), dt)
        wg = from_bits(jax.lax.dynamic_index_in_dim(wb, jnp.minimum(grp, g - 1), 0, keepdims=False), dt)
        y = jnp.dot(rows, wg, preferred_element_type=jnp.float32)
        mine = (jax.lax.dynamic_slice_in_dim(row_group, tile_i * t, t, 0) == grp) & ok
        cur = jax.lax.dynamic_slice_in_dim(out, tile_i * t, t, 0)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + jnp.where(mine[:, None], y, 0.0), tile_i * t, 0), None

    out0 = jnp.zeros((n_tiles * t, n), jnp.float32)
    out, _ = jax.lax.scan(body, out0, (pair_tile, pair_group, valid))
    return out[:m]
