"""Narrow floats moved as bits: the same values as the plain ops, and no float32 copy of the
whole operand in the CPU program (XLA:CPU gathers and slices bfloat16 arrays through one)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv32_jax.bits import as_bits, bits_dtype, from_bits, take_rows
from dsv32_jax.layers import Embed


def test_bits_round_trip():
    x = jnp.asarray(np.random.RandomState(0).randn(5, 3), jnp.bfloat16)
    assert as_bits(x).dtype == jnp.uint16 and bits_dtype(jnp.float8_e4m3fn) == jnp.uint8
    assert bits_dtype(jnp.float32) is None and as_bits(x.astype(jnp.float32)).dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(from_bits(as_bits(x), jnp.bfloat16), np.float32), np.asarray(x, np.float32))


def test_embedding_lookup_gathers_bits():
    vocab, dim = 1000, 48
    emb = Embed(vocab, dim, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[3, 999, 0, 3], [7, 7, 500, 1]], jnp.int32)
    graphdef, state = nnx.split(emb)
    fn = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))
    table = emb.embedding[...]
    got = fn(state, ids)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(table, np.float32)[np.asarray(ids)])
    assert f"f32[{vocab},{dim}]" not in fn.lower(state, ids).compile().as_text()
    np.testing.assert_array_equal(np.asarray(take_rows(table, ids), np.float32), np.asarray(got, np.float32))
