"""Plain-jnp reference of token-level sparse MLA attention in the absorbed (MQA) form.

    logits[b, t, h, j] = softmax_scale * q[b, t, h, :] . kv[b, indices[b, t, j], :]
    out[b, t, h, :]    = sum_j softmax_j(logits) * kv[b, indices[b, t, j], :v_dim]

Index -1 means "no key": it takes no part in the softmax. A query with no valid
index gets a zero output. kv may be a compact FP8 cache (`compact.CompactKV`): its selected rows
are dequantised after the gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_mla import compact


def sparse_mla(q, kv, indices, *, softmax_scale, v_dim, query_chunk=None, layer=None):
    """q: [B, T, H, Dk] (Dk = kv_lora_rank + qk_rope_head_dim), kv: [B, L, Dk] latent cache
    (or a compact.CompactKV standing for one),
    indices: [B, T, K] int32 (-1 = none) -> out float32 [B, T, H, v_dim].

    Gathers only the selected rows; `query_chunk` bounds the [B, chunk, K, Dk] gather
    buffer for long prefills (the T axis is processed in chunks with lax.map).
    layer: None, or an int32 scalar with kv a stacked cache [n, B, L, Dk] (compact: arrays
    [n, B, L, ...]): attends to kv[layer], gathering its rows with index (layer, b, idx).
    """
    B, T, H, Dk = q.shape
    if query_chunk is not None and T > query_chunk and T % query_chunk == 0:
        n = T // query_chunk
        qc = q.reshape(B, n, query_chunk, H, Dk).swapaxes(0, 1)
        ic = indices.reshape(B, n, query_chunk, -1).swapaxes(0, 1)
        out = jax.lax.map(lambda a: sparse_mla(a[0], kv, a[1], softmax_scale=softmax_scale,
                                               v_dim=v_dim, layer=layer), (qc, ic))
        return out.swapaxes(0, 1).reshape(B, T, H, v_dim)
    valid = indices >= 0
    safe = jnp.where(valid, indices, 0)
    rows = compact.gather(kv, safe, layer)                               # [B, T, K, Dk]
    rows = rows.astype(jnp.float32)
    logits = jnp.einsum("bthd,btkd->bthk", q.astype(jnp.float32), rows,
                        precision=jax.lax.Precision.HIGHEST) * softmax_scale
    logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bthk,btkd->bthd", p, rows[..., :v_dim],
                      precision=jax.lax.Precision.HIGHEST)
