"""Block-scaled FP8 matmuls: equal to dequantise-then-matmul (plain jnp reference), partial
tiles, multi-step tile plans, grouped (ragged) form, and no full-size dequantised copy."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.fp8_matmul import fp8_head_einsum, fp8_matmul, fp8_ragged_dot, tile_plan
from dsv32_jax.numerics import dequant_blocks

HI = jax.lax.Precision.HIGHEST


def _weights(rng, shape, block, pow2=False):
    """Random e4m3 weights [..., K, N] and float32 scales [..., ceil(K/bk), ceil(N/bn)]."""
    w8 = jnp.asarray(np.clip(rng.standard_normal(shape) * 100, -448, 448), jnp.float8_e4m3fn)
    sshape = shape[:-2] + (math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    s = rng.uniform(0.001, 0.01, sshape)
    if pow2:                                   # ue8m0 scales, as the release's quantiser writes
        s = 2.0 ** np.round(np.log2(s))
    return w8, jnp.asarray(s, jnp.float32)


# (K, N, block, M, max_tile_ratio, min_tile_bytes): partial last tiles on K and/or N, one-step
# and multi-step plans, the batched (small M) and per-chunk (large M) step bodies
CASES = [
    (256, 70, (32, 32), 2, 1.0, 0),           # 4 steps of 2 chunks: one batched dot per step, partial N tile
    (100, 70, (32, 32), 7, 0.25, 0),          # partial tiles on both dims, chunk rows gcd(100, 32) = 4
    (48, 40, (32, 32), 3, 1.0, 1 << 30),      # one step, chunks of gcd(48, 32) = 16 rows
    (576, 160, (128, 128), 300, 0.5, 0),      # the release's 576-row partial tile, large M: per-chunk sums
]


@pytest.mark.parametrize("k,n,block,m,ratio,min_bytes", CASES)
def test_fp8_matmul_equals_dequantise_then_matmul_f32(k, n, block, m, ratio, min_bytes):
    rng = np.random.default_rng(k + n)
    w8, s = _weights(rng, (k, n), block)
    x = jnp.asarray(rng.standard_normal((2, m, k)), jnp.float32)
    y = jax.jit(functools.partial(fp8_matmul, block=block, max_tile_ratio=ratio, min_tile_bytes=min_bytes))(x, w8, s)
    ref = jnp.dot(x, dequant_blocks(w8, s, block), precision=HI)
    assert y.shape == (2, m, n) and y.dtype == jnp.float32
    # float32: (x @ w8) * s vs x @ (w8 * s) differ by one rounding of w8 * s and the summation
    # order (K <= 576 terms): far below 1e-5 of the output scale
    assert float(jnp.max(jnp.abs(y - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))


def test_fp8_matmul_bf16_compute():
    """bf16 compute with ue8m0 (power-of-two) scales: the dequantised weight is exact in bf16,
    so ours and dequantise(bf16)-then-matmul differ only by f32 summation order and the final
    rounding to bf16: <= 2 bf16 ulps (2^-7 relative) plus 1e-5 of the output scale."""
    rng = np.random.default_rng(1)
    block = (128, 128)
    w8, s = _weights(rng, (640, 384), block, pow2=True)
    x = jnp.asarray(rng.standard_normal((8, 640)), jnp.bfloat16)
    y = jax.jit(functools.partial(fp8_matmul, block=block, min_tile_bytes=0))(x, w8, s)
    ref = jnp.dot(x, dequant_blocks(w8, s, block).astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    y32, ref32 = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert y.dtype == jnp.bfloat16
    assert np.all(np.abs(y32 - ref32) <= 2.0 ** -7 * np.abs(ref32) + 1e-5 * np.abs(ref32).max())


@pytest.mark.parametrize("k,n,block,ratio,min_bytes", [(100, 70, (32, 32), 0.5, 0), (256, 128, (128, 128), 1.0, 1 << 30)])
def test_fp8_ragged_dot_equals_dequantised_ragged_dot(k, n, block, ratio, min_bytes):
    rng = np.random.default_rng(k)
    g = 4
    w8, s = _weights(rng, (g, k, n), block)
    sizes = jnp.asarray([3, 0, 5, 2], jnp.int32)          # an empty group; rows 10, 11 past the sum
    x = jnp.asarray(rng.standard_normal((12, k)), jnp.float32)
    y = jax.jit(functools.partial(fp8_ragged_dot, block=block, max_tile_ratio=ratio,
                                  min_tile_bytes=min_bytes))(x, w8, s, sizes)
    ref = jax.lax.ragged_dot(x, dequant_blocks(w8, s, block), sizes, precision=HI)
    assert float(jnp.max(jnp.abs(y - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))   # as the dense case
    assert float(jnp.max(jnp.abs(y[10:]))) == 0.0


@pytest.mark.parametrize("k,bk", [(7168, 128), (2048, 128), (1536, 128), (16384, 128), (512, 128), (576, 128),
                                  (100, 32)])
def test_tile_plan_bounds_the_dequantised_tile(k, bk):
    for itemsize in (2, 4):
        c, a, s = tile_plan(k, 2048, bk, itemsize, max_tile_ratio=1 / 6, min_tile_bytes=0)
        assert a * s * c == k and bk % c == 0 and k % c == 0
        # tile [A*c, N] in the compute dtype over the FP8 weight [K, N]
        assert itemsize * a * c / k <= 1 / 6, (k, itemsize, c, a, s)


def test_scale_shape_mismatch_is_a_clear_error():
    w8 = jnp.zeros((64, 64), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="error: fp8_matmul: scale shape"):
        fp8_matmul(jnp.zeros((2, 64)), w8, jnp.ones((3, 2)), (32, 32))


def test_release_linear_temporaries_on_xla_cpu():
    """A 7168x2048 e4m3 Linear at decode size (8 rows, float32 compute): dequantise-then-matmul
    compiles with a full float32 copy (4x the 14.7 MB weight); the blockwise form stays near one
    FP8-sized buffer (XLA:CPU copies the float8 parameter once to slice its bits, see
    fp8_matmul._tile) plus one tile."""
    k, n, block = 7168, 2048, (128, 128)
    x = jax.ShapeDtypeStruct((8, k), jnp.float32)
    w = jax.ShapeDtypeStruct((k, n), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((56, 16), jnp.float32)

    def old(x, w, s):
        return jnp.dot(x, dequant_blocks(w, s, block), preferred_element_type=jnp.float32)

    def new(x, w, s):
        return fp8_matmul(x, w, s, block)

    temp = {f.__name__: jax.jit(f).lower(x, w, s).compile().memory_analysis().temp_size_in_bytes for f in (old, new)}
    weight = k * n
    print("XLA:CPU temp bytes", temp, "weight", weight)
    assert temp["old"] >= 4 * weight
    assert temp["new"] <= 1.25 * weight


def test_gradient_to_x_without_stored_tiles():
    """d/dx of the blockwise matmul equals d/dx of dequantise-then-matmul (float32), and its
    backward pass recomputes each tile instead of keeping all of them: XLA:CPU temporaries stay
    below the FP8 weight's bytes (storing the f32 tiles would be 4x)."""
    rng = np.random.default_rng(3)
    block = (32, 32)
    w8, s = _weights(rng, (256, 96), block)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    f = functools.partial(fp8_matmul, block=block, max_tile_ratio=1.0, min_tile_bytes=0)
    g = jax.jit(jax.grad(lambda x: jnp.sum(f(x, w8, s) * ct)))(x)
    ref = ct @ dequant_blocks(w8, s, block).T
    assert float(jnp.max(jnp.abs(g - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))   # as the forward

    k, n = 7168, 2048
    xa = jax.ShapeDtypeStruct((64, k), jnp.bfloat16)
    wa = jax.ShapeDtypeStruct((k, n), jnp.float8_e4m3fn)
    sa = jax.ShapeDtypeStruct((56, 16), jnp.float32)
    grad = jax.grad(lambda x, w, s: fp8_matmul(x, w, s, (128, 128)).astype(jnp.float32).sum())
    temp = jax.jit(grad).lower(xa, wa, sa).compile().memory_analysis().temp_size_in_bytes
    assert temp < k * n, temp


# (heads, R, nope, v, block, max_tile_ratio, min_tile_bytes, dtype): the release's 128-column head
# halves on 128-blocks in bf16; tiny heads several to a scale block with a partial row tile; a
# one-step plan with unequal nope / v
HEAD_CASES = [
    (8, 256, 128, 128, (128, 128), 1 / 6, 0, jnp.bfloat16),
    (4, 32, 16, 16, (128, 128), 0.5, 0, jnp.float32),
    (6, 100, 24, 8, (32, 16), 1.0, 1 << 30, jnp.float32),
]


@pytest.mark.parametrize("heads,r,nope,v,block,ratio,min_bytes,dtype", HEAD_CASES)
def test_fp8_head_einsum_equals_dequantise_then_einsum(heads, r, nope, v, block, ratio, min_bytes, dtype):
    """MLA's absorbed W_UK / W_UV products with a head-tiled FP8 kv_b against the plain-jnp
    reference (dequantise_blocks whole, cast to the compute dtype, einsum with f32 accumulation,
    as Linear.weight() + attention did). Each tile is dequantised exactly as dequant_blocks
    (same f32 product, same cast), so both contract the same operands over the same axis:
    measured bit-equal on XLA:CPU; we allow 1e-6 of the output scale (f32 summation order of
    <= 512 terms, should a backend block the contraction differently)."""
    rng = np.random.default_rng(heads + r)
    w8, s = _weights(rng, (r, heads * (nope + v)), block)
    w = dequant_blocks(w8, s, block).astype(dtype).reshape(r, heads, nope + v)
    q = jnp.asarray(rng.standard_normal((2, 3, heads, nope)), dtype)
    o = jnp.asarray(rng.standard_normal((2, 3, heads, r)), dtype)
    kw = dict(heads=heads, max_tile_ratio=ratio, min_tile_bytes=min_bytes)
    got_k = jax.jit(lambda x, a, b: fp8_head_einsum("btan,can->btac", x, a, b, block, cols=(0, nope), **kw))(q, w8, s)
    got_v = jax.jit(lambda x, a, b: fp8_head_einsum("btac,cav->btav", x, a, b, block, cols=(nope, nope + v), **kw))(
        o, w8, s)
    ref_k = jnp.einsum("bthn,chn->bthc", q, w[..., :nope], preferred_element_type=jnp.float32).astype(dtype)
    ref_v = jnp.einsum("bthc,chv->bthv", o, w[..., nope:], preferred_element_type=jnp.float32).astype(dtype)
    for got, ref in ((got_k, ref_k), (got_v, ref_v)):
        assert got.shape == ref.shape and got.dtype == dtype
        g, e = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert np.max(np.abs(g - e)) <= 1e-6 * np.max(np.abs(e)), np.max(np.abs(g - e))


def test_fp8_head_einsum_temporaries_below_the_weight():
    """The release's kv_b (512 x 128 heads x 256, 16 MiB of e4m3): the dequantise-whole path
    makes a float32 copy 4.0x the FP8 bytes; the head-tiled product's largest weight-derived
    temporary is <= 1/6 of them (introspect.temporaries on the jaxpr)."""
    from dsv32_jax.introspect import largest_weight_temp, temporaries

    block, heads, r, p = (128, 128), 128, 512, 256
    params = {"kernel": jax.ShapeDtypeStruct((r, heads * p), jnp.float8_e4m3fn),
              "kernel_scale": jax.ShapeDtypeStruct((r // 128, heads * p // 128), jnp.float32)}
    q = jax.ShapeDtypeStruct((8, 1, heads, 128), jnp.bfloat16)

    def old(prm, q):
        w = dequant_blocks(prm["kernel"], prm["kernel_scale"], block).astype(jnp.bfloat16).reshape(r, heads, p)
        return jnp.einsum("bthn,chn->bthc", q, w[..., :128], preferred_element_type=jnp.float32)

    def new(prm, q):
        return fp8_head_einsum("btan,can->btac", q, prm["kernel"], prm["kernel_scale"], block, heads=heads,
                               cols=(0, 128))

    before = largest_weight_temp(temporaries(old, params, q, weight_args=(0,)))
    after = largest_weight_temp(temporaries(new, params, q, weight_args=(0,)))
    print("kv_b weight-derived temporaries / FP8 bytes: before", before.weight_ratio, before.shape,
          "after", after.weight_ratio, after.shape)
    assert before.weight_ratio == 4.0
    assert after.weight_ratio <= 1 / 6 and after.weight == "['kernel']"
