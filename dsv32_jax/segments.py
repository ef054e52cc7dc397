"""Packed rows: segment ids -> per-token rope positions and segment starts (see finetune.packing)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_layout(segment_ids):
    """segment_ids int [B, T] -> (positions int32 [B, T], starts int32 [B, T])."""
    seg = jnp.asarray(segment_ids)
    t = seg.shape[1]
    slots = jnp.arange(t, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    starts = jax.lax.cummax(jnp.where(first, slots[None, :], 0), axis=1).astype(jnp.int32)
    return (slots[None, :] - starts).astype(jnp.int32), starts
