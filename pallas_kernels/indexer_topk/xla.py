"""Lightning-indexer scores and top-k in plain jnp shaped for TPU/GPU (the `impl="xla"` path there).

Same contract as `reference.indexer_topk`. The reference computes q . k in float32 at HIGHEST
precision (exact, and the fastest form on XLA:CPU); here the products run as the official FP8
indexer does: q . k with float32 accumulation on operands in their storage precision (float8
keys/queries are widened to bfloat16, which holds every e4m3 value exactly, so the products are
those of an FP8 MMA), then relu, the float32 head weights and the sum over heads in float32.
Prefill-sized calls score the keys in chunks, bounding the [B, T, Hi, chunk] logits; each chunk
is a dynamic slice of the (possibly layer-stacked) keys, which TPU / GPU read in place. (XLA:CPU,
which runs this form in tests only, widens a bf16 / fp8 slice's whole operand to float32: the
CPU path, reference.py, avoids that.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.indexer_topk.reference import (chunked_scores, key_block, stack_layer,
                                                     topk_from_scores, visibility_mask)

# float32 bytes of the [B, T, Hi, chunk] logits per key chunk
LOGITS_BUDGET = 256 << 20


def _operand_dtype(dtype):
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.bfloat16) if dtype.itemsize == 1 else dtype


def indexer_scores(q, k, weights, *, q_positions, k_scale=None, kv_lengths=None, q_starts=None,
                   key_chunk=None, layer=None):
    """float32 [B, T, L] index scores, -inf for invisible keys (see reference.indexer_scores).

    q [B, T, Hi, D], k [B, L, D] (float or float8), weights [B, T, Hi] f32, q_starts [B, T] int32
    or None (keys below it are invisible). key_chunk: keys per step (None: as many as keep the
    logits within LOGITS_BUDGET). layer: None, or an int / int32 scalar: then k is
    [n, B, L, D] and k_scale [n, B, L], and layer `layer`'s keys are scored, sliced per key chunk
    from the stacked array.
    """
    k, k_scale, layer = stack_layer(k, k_scale, layer)
    B, T, Hi, D = q.shape
    L = k.shape[2]
    cd = jnp.promote_types(_operand_dtype(q.dtype), _operand_dtype(k.dtype))
    qc, w = q.astype(cd), weights.astype(jnp.float32)

    def score(keys):                                   # [B, C, D] -> [B, T, C]
        logits = jnp.einsum("bthd,bsd->bths", qc, keys.astype(cd), preferred_element_type=jnp.float32)
        return jnp.sum(jax.nn.relu(logits) * w[..., None], axis=2)

    if key_chunk is None:
        key_chunk = max(128, LOGITS_BUDGET // max(1, B * T * Hi * 4) // 128 * 128)
    if L <= key_chunk:
        scores = score(key_block(k, layer, 0, L))
    else:
        scores = chunked_scores(score, k, layer, key_chunk)
    if k_scale is not None:
        ks = jax.lax.dynamic_index_in_dim(k_scale, layer, 0, keepdims=False)
        scores = scores * ks.astype(jnp.float32)[:, None, :]
    return jnp.where(visibility_mask(q_positions, kv_lengths, L, q_starts), scores, -jnp.inf)


def indexer_topk(q, k, weights, *, topk, q_positions, k_scale=None, kv_lengths=None, q_starts=None,
                 key_chunk=None, layer=None):
    """int32 [B, T, min(topk, L)], -1 where fewer visible keys than topk (layer: see indexer_scores)."""
    scores = indexer_scores(q, k, weights, q_positions=q_positions, k_scale=k_scale,
                            kv_lengths=kv_lengths, q_starts=q_starts, key_chunk=key_chunk,
                            layer=layer)
    return topk_from_scores(scores, topk)
