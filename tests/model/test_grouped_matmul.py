"""The grouped matmul (both implementations) against a plain-jnp reference that gathers each
row's group weight: sizes with empty groups, rows past the last group, M not a tile multiple."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.grouped_matmul import grouped_matmul


def reference(x, w, sizes):
    """out[m] = x[m] @ w[group of m], zeros past the last group (float64 on the host)."""
    ends = np.cumsum(sizes)
    out = np.zeros((x.shape[0], w.shape[-1]))
    for m in range(min(x.shape[0], int(ends[-1]) if len(ends) else 0)):
        g = int(np.searchsorted(ends, m, side="right"))
        out[m] = np.asarray(x[m], np.float64) @ np.asarray(w[g], np.float64)
    return out


CASES = [(10, 4, [3, 0, 5, 2]), (37, 5, [0, 0, 30, 0, 2]), (7, 3, [0, 0, 0]), (64, 16, "random"),
         (300, 8, "random"), (40, 6, [1, 1, 1, 1, 1, 30])]


@pytest.mark.parametrize("impl", ["tiles", "ragged"])
@pytest.mark.parametrize("m,g,sizes", CASES)
def test_grouped_matmul_equals_reference(impl, m, g, sizes):
    rs = np.random.RandomState(m + g)
    if sizes == "random":
        sizes = np.bincount(rs.randint(0, g, m - 3), minlength=g)          # 3 rows past the end
    sizes = np.asarray(sizes, np.int32)
    x = rs.randn(m, 24).astype(np.float32)
    w = rs.randn(g, 24, 12).astype(np.float32)
    got = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl=impl, tile=8))(x, w, jnp.asarray(sizes))
    assert got.dtype == jnp.float32
    # float32 accumulation of 24 products of O(1) values: ~1e-6 relative
    np.testing.assert_allclose(np.asarray(got), reference(x, w, sizes), rtol=1e-5, atol=1e-5)


def test_tiles_cost_follows_rows():
    """The tiled form's work is bounded by (tiles + groups) tile-matmuls, not groups x rows."""
    m, g, k, n = 1024, 16, 64, 32
    x = jax.ShapeDtypeStruct((m, k), jnp.float32)
    w = jax.ShapeDtypeStruct((g, k, n), jnp.float32)
    s = jax.ShapeDtypeStruct((g,), jnp.int32)

    def flops(impl):
        c = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl=impl)).lower(x, w, s).compile()
        return c.cost_analysis()["flops"]

    tiles = flops("tiles")          # a scan body is counted once: multiply by its trip count
    t = 64                          # _tile_rows(1024, 16)
    assert tiles * (m // t + g - 1) <= 2 * 2 * (m + g * t) * k * n
    assert flops("ragged") >= g * 2 * m * k * n * 0.9
