"""Plain-jnp reference of the lightning-indexer scoring and causal top-k.

    I[b, t, s] = k_scale[b, s] * sum_h weights[b, t, h] * relu(q[b, t, h, :] . k[b, s, :])

Key s is visible to query t iff s <= q_positions[b, t] and s < kv_lengths[b] (and, when
q_starts is given, s >= q_starts[b, t]: the first slot of the query's packed segment).
Selected indices are the top min(topk, L) visible keys per query; slots that no
visible key can fill are -1 (a query with fewer visible keys than topk).
Ties are broken towards the lower key index (jax.lax.top_k's rule).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


KEY_CHUNK = 1024


def visibility_mask(q_positions, kv_lengths, num_keys, q_starts=None):
    """q_positions [B, T] int32, kv_lengths [B] int32 or None, q_starts [B, T] int32 or None
    (lowest visible key slot per query) -> bool [B, T, L]."""
    s = jnp.arange(num_keys, dtype=jnp.int32)
    vis = s[None, None, :] <= q_positions[:, :, None]
    if kv_lengths is not None:
        vis = vis & (s[None, None, :] < kv_lengths[:, None, None])
    if q_starts is not None:
        vis = vis & (s[None, None, :] >= q_starts[:, :, None])
    return vis


def visible_counts(q_positions, kv_lengths, num_keys):
    """Number of visible keys per query: int32 [B, T]; key s is visible iff s < count.

    Same visibility as visibility_mask: s <= q_positions[b, t] and s < kv_lengths[b]
    (and s < num_keys).  Used by the kernels, which only need one limit per query.
    """
    lim = jnp.minimum(q_positions.astype(jnp.int32) + 1, num_keys)
    if kv_lengths is not None:
        lim = jnp.minimum(lim, kv_lengths.astype(jnp.int32)[:, None])
    return jnp.maximum(lim, 0).astype(jnp.int32)


def stack_layer(k, k_scale, layer):
    """Canonical stacked form of the keys: -> (k [n, B, L, D], k_scale [n, B, L] | None, layer int32 []).

    layer None: k [B, L, D] is viewed as a one-layer stack (a bitcast, no copy) with layer 0, so
    the per-layer and the single-layer calls run the same code (the same sums).
    """
    if layer is None:
        return k[None], None if k_scale is None else k_scale[None], jnp.zeros((), jnp.int32)
    return k, k_scale, jnp.asarray(layer, jnp.int32).reshape(())


def _bits(k):
    """Same-width unsigned-integer view of bf16 / fp8 keys (None for other dtypes)."""
    if jnp.issubdtype(k.dtype, jnp.floating) and k.dtype.itemsize < 4:
        return jax.lax.bitcast_convert_type(k, jnp.dtype(f"uint{8 * k.dtype.itemsize}"))
    return None


def key_block(k, layer, start, size, *, bits=False):
    """k [n, B, L, D] -> k[layer, :, start:start + size] as [B, size, D].

    A dynamic slice of the stacked keys, which XLA fuses into its consumer (the dtype conversion
    or the score matmul) or copies as this one block. bits: slice the unsigned-integer view of
    bf16 / fp8 keys: XLA:CPU runs a bf16 / fp8 dynamic slice in float32, widening its whole operand.
    """
    _, b, _, d = k.shape
    zero = jnp.zeros((), jnp.int32)
    start = (layer, zero, jnp.asarray(start, jnp.int32), zero)
    view = _bits(k) if bits else None
    if view is None:
        return jax.lax.dynamic_slice(k, start, (1, b, size, d))[0]
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_slice(view, start, (1, b, size, d))[0], k.dtype)


def chunked_scores(score, k, layer, chunk, *, bits=False):
    """Scores of every key of layer `layer`, one key chunk at a time.

    score: keys [B, C, D] -> [B, T, C]; k [n, B, L, D] with L > chunk. The chunks are dynamic
    slices of the stacked keys (key_block; at most one [B, chunk, D] block exists at a time on
    backends that slice bf16 / fp8 natively); the last chunk starts at L - chunk (overlapping its
    predecessor) so that every chunk is in bounds and of one shape. Returns float32 [B, T, L].
    """
    n = k.shape[2]
    m = -(-n // chunk)
    starts = jnp.minimum(jnp.arange(m, dtype=jnp.int32) * chunk, n - chunk)
    parts = jax.lax.map(lambda s0: score(key_block(k, layer, s0, chunk, bits=bits)), starts)  # [m, B, T, C]
    b, t = parts.shape[1], parts.shape[2]
    full = parts[:m - 1].transpose(1, 2, 0, 3).reshape(b, t, (m - 1) * chunk)
    tail = parts[m - 1][..., m * chunk - n:]                 # keys (m-1)*chunk .. n-1
    return jnp.concatenate([full, tail], axis=-1)


def _one_layer(k, layer):
    """k [n, B, L, D] -> k[layer] as [1, B, L, D], copied in its storage dtype (for bf16 / fp8
    through the integer view, so that XLA:CPU neither widens it nor the stack to float32)."""
    view = _bits(k)
    if view is None:
        return jax.lax.dynamic_index_in_dim(k, layer, 0)
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_index_in_dim(view, layer, 0), k.dtype)


def indexer_scores(q, k, weights, *, q_positions, k_scale=None, kv_lengths=None, q_starts=None,
                   layer=None):
    """Index scores with invisible keys at -inf.

    q: [B, T, Hi, D] (float or float8), k: [B, L, D] (float or float8),
    weights: [B, T, Hi] float32 (every positive constant and the per-head q scale folded in),
    q_positions: [B, T] int32 absolute positions, k_scale: [B, L] float32 or None,
    kv_lengths: [B] int32 or None (all L keys valid), q_starts: [B, T] int32 or None (keys
    below it are invisible: segment-aware packing). Returns float32 [B, T, L].
    layer: None, or an int / int32 scalar: then k is [n, B, L, D] and k_scale [n, B, L], and
    the keys of layer `layer` are scored (read in place by the decode form; the key-chunk
    form for prefill copies that one layer once, in its storage dtype).
    """
    k, k_scale, layer = stack_layer(k, k_scale, layer)
    q32, w32 = q.astype(jnp.float32), weights.astype(jnp.float32)

    def score(keys):                                   # keys [B, C, D] -> [B, T, C]
        logits = jnp.einsum("bthd,bsd->bths", q32, keys.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("bths,bth->bts", jax.nn.relu(logits), w32, precision=jax.lax.Precision.HIGHEST)

    n = k.shape[2]
    if n > 2 * KEY_CHUNK and q.shape[1] >= 16:
        # prefill-like calls: key chunks keep the [B, T, Hi, chunk] logits small instead of
        # writing [B, T, Hi, L] (2-3x faster on CPU at L = 64K; decode calls are faster unchunked)
        # XLA:CPU converts (and hoists out of the loop) the whole operand of a bf16 / fp8
        # dynamic slice in a loop, so that layer is copied once in its storage dtype (B * L * D
        # elements, as the single-layer call copies its keys) and the loop slices its bits.
        if _bits(k) is None:      # float32 keys: sliced per chunk from the stack in place
            scores = chunked_scores(score, k, layer, KEY_CHUNK)
        else:
            scores = chunked_scores(score, _one_layer(k, layer), jnp.zeros((), jnp.int32), KEY_CHUNK,
                                    bits=True)
    else:   # decode: a bf16 / fp8 layer slice fuses into the float32 conversion (no copy of its
        # own); float32 keys are copied once for XLA:CPU's matmul
        scores = score(key_block(k, layer, 0, n))
    if k_scale is not None:
        ks = jax.lax.dynamic_index_in_dim(k_scale, layer, 0, keepdims=False)
        scores = scores * ks.astype(jnp.float32)[:, None, :]
    vis = visibility_mask(q_positions, kv_lengths, n, q_starts)
    return jnp.where(vis, scores, -jnp.inf)


def topk_from_scores(scores, topk):
    """scores [B, T, L] float32 with -inf for invisible keys -> int32 [B, T, min(topk, L)], -1 = empty."""
    kk = min(topk, scores.shape[-1])
    vals, idx = jax.lax.top_k(scores.astype(jnp.float32), kk)
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)


def indexer_topk(q, k, weights, *, topk, q_positions, k_scale=None, kv_lengths=None, q_starts=None,
                 layer=None):
    """Top-k key indices per query: int32 [B, T, min(topk, L)], -1 where no visible key is left.
    layer: see indexer_scores (k [n, B, L, D] stacked over layers)."""
    scores = indexer_scores(q, k, weights, q_positions=q_positions, k_scale=k_scale,
                            kv_lengths=kv_lengths, q_starts=q_starts, layer=layer)
    return topk_from_scores(scores, topk)
