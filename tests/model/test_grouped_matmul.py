"""The grouped matmul (both implementations) against a plain-jnp reference that gathers each
row's group weight: sizes with empty groups, rows past the last group, M not a tile multiple;
and the CPU dense form of the routed experts against a per-row reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from dsv32_jax.config import ModelConfig
from dsv32_jax.grouped_matmul import grouped_matmul
from dsv32_jax.moe import Experts, combine_local, dense_is_cheaper, dense_routed


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


def _moe_reference(x, gate, up, down, weights, experts):
    """Routed SwiGLU experts row by row on the host (float64): sum_k w[n,k] * expert_e(x[n])."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    out = np.zeros((x.shape[0], down.shape[-1]))
    for n in range(x.shape[0]):
        for j, e in enumerate(np.asarray(experts[n])):
            g, u = x[n] @ gate[e], x[n] @ up[e]
            out[n] += float(weights[n, j]) * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return out


@pytest.mark.parametrize("n", [1, 16])
def test_dense_routed_equals_reference_and_sorted_path(n):
    """The CPU dense form of the routed experts (every token through every expert, the chosen
    outputs combined) against a per-row reference and against the sorted grouped-matmul path."""
    cfg = ModelConfig(vocab_size=64, hidden_size=24, moe_intermediate_size=12, n_routed_experts=16,
                      num_experts_per_tok=4, n_group=4, topk_group=2, num_hidden_layers=2)
    ex = Experts(cfg, dtype=jnp.float32, rngs=nnx.Rngs(n))
    rs = np.random.RandomState(n)
    x = rs.randn(n, 24).astype(np.float32)
    experts = np.stack([rs.choice(16, 4, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rs.rand(n, 4).astype(np.float32)
    ops = ex.grouped().operands
    dense = jax.jit(dense_routed)(ops, x, weights, experts)
    sorted_ = jax.jit(lambda o, *a: combine_local(ex.grouped().fn, o, *a))(ops, x, weights, experts)
    ref = _moe_reference(x, ops["gate"], ops["up"], ops["down"], weights, experts)
    # float32 sums of 24- and 12-term products of O(1) values: ~1e-6 relative
    np.testing.assert_allclose(np.asarray(dense), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(sorted_), rtol=1e-5, atol=1e-6)


def test_dense_choice_follows_cost():
    """Dense for decode batches of the tiny test model, the tiled scan for its prefill and for
    wide experts (D 1024, I 512) at any batch, and for the release's 256 experts."""
    assert dense_is_cheaper(16, 4, 16, 64, 32) and dense_is_cheaper(1, 4, 16, 64, 32)
    assert not dense_is_cheaper(512, 4, 16, 64, 32)
    assert not dense_is_cheaper(16, 4, 16, 1024, 512)
    assert not dense_is_cheaper(16, 8, 256, 7168, 2048)


def test_tiles_bf16_reads_the_weights_as_they_are():
    """bfloat16 rows and weights: the tiled form equals the float64 reference of the same
    values, and the CPU program never makes a float32 copy of the stacked weights (XLA:CPU
    computes a slice of a bfloat16 array inside a loop through a float32 copy of the whole
    operand: every expert's weights converted on every call)."""
    m, g, k, n = 300, 16, 64, 32
    rs = np.random.RandomState(3)
    sizes = np.bincount(rs.randint(0, g, m), minlength=g).astype(np.int32)
    x = jnp.asarray(rs.randn(m, k), jnp.bfloat16)
    w = jnp.asarray(rs.randn(g, k, n), jnp.bfloat16)
    fn = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl="tiles"))
    got = fn(x, w, jnp.asarray(sizes))
    # bfloat16 x bfloat16 products are exact in float32; 64 of them summed in float32: ~1e-6
    np.testing.assert_allclose(np.asarray(got), reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes),
                               rtol=1e-5, atol=1e-4)
    text = fn.lower(x, w, jnp.asarray(sizes)).compile().as_text()
    assert f"f32[{g},{k},{n}]" not in text
