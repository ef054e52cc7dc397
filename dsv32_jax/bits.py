"""Narrow floats moved as their bits.

XLA:CPU computes a gather, a scatter or a dynamic slice of a bfloat16 (or float8) array
through a float32 copy of the whole operand: on every call the whole cache, embedding table
or expert stack is converted, and the picked part converted back. Moving the unsigned-int
bits picks the same values without that copy (on other backends the bitcasts are free).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bits_dtype(dtype):
    """The unsigned-int type a float narrower than 32 bits is moved as (None for others)."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 4:
        return None
    return {1: jnp.dtype(jnp.uint8), 2: jnp.dtype(jnp.uint16)}[dtype.itemsize]


def as_bits(a):
    """a as its unsigned-int bits when it is a narrow float (else a itself)."""
    b = bits_dtype(a.dtype)
    return a if b is None else jax.lax.bitcast_convert_type(a, b)


def from_bits(a, dtype):
    """The inverse of as_bits for an array that was of `dtype`."""
    return a if a.dtype == jnp.dtype(dtype) else jax.lax.bitcast_convert_type(a, dtype)


def take_rows(table, ids):
    """table[ids] along axis 0 (an embedding lookup), gathered as bits."""
    return from_bits(jnp.take(as_bits(table), ids, axis=0), table.dtype)
