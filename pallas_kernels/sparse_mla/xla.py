"""Sparse MLA forward in plain jnp shaped for TPU/GPU (the `impl="xla"` path there).

Same contract as the kernels: q [B, T, H, Dk], kv [B, L, Dk], indices [B, T, K] int32 (-1 = none)
-> (out f32 [B, T, H, v_dim], lse f32 [B, T, H]).

Unlike the CPU-shaped `vjp.sparse_mla_blockwise` (one query row per serial step, float32 HIGHEST
matmuls), every step here handles all B rows of a chunk of queries at once as batched matmuls,
with operands in the cache dtype and float32 accumulation, as the official code and FlashMLA
compute: logits = q . kv[idx] (bf16 x bf16 -> f32), softmax in f32, then p cast to the cache
dtype for the value product (f32 accumulation). With a float32 cache the products run at the
backend's default float32 matmul precision. A compact FP8 cache (compact.CompactKV) is read the
same way: its gathered rows are dequantised to the compute dtype (rope's dtype).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.sparse_mla import compact

# bytes of gathered rows [B, chunk, K, Dk] per step; the query chunk is sized to fit
GATHER_BUDGET = 256 << 20


def sparse_mla_rows(q, kv, indices, *, softmax_scale, v_dim, query_chunk=None, layer=None):
    """(out f32 [B, T, H, v_dim], lse f32 [B, T, H]; zeros / -inf for rows with no valid index).

    query_chunk: queries per step (None: as many as keep the gathered rows within GATHER_BUDGET).
    layer: None, or an int32 scalar with kv stacked [n, B, L, Dk] (compact: [n, B, L, ...]):
    the rows of kv[layer] are gathered from the stacked arrays with index (layer, b, idx).
    """
    B, T, H, Dk = q.shape
    K = indices.shape[-1]
    cd = kv.dtype
    if query_chunk is None:
        query_chunk = GATHER_BUDGET // max(1, B * K * Dk * jnp.dtype(cd).itemsize)
    tc = max(1, min(T, query_chunk))
    n = -(-T // tc)
    pad = n * tc - T

    def chunk(qc, ic):                 # [B, tc, H, Dk], [B, tc, K]
        valid = ic >= 0
        rows = compact.gather(kv, jnp.where(valid, ic, 0), layer)            # [B, tc, K, Dk]
        s = jnp.einsum("bthd,btkd->bthk", qc.astype(cd), rows,
                       preferred_element_type=jnp.float32) * softmax_scale
        s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        has = l > 0
        l1 = jnp.where(has, l, 1.0)
        o = jnp.einsum("bthk,btkv->bthv", (p / l1).astype(cd), rows[..., :v_dim],
                       preferred_element_type=jnp.float32)
        return o, jnp.where(has, m + jnp.log(l1), -jnp.inf)[..., 0]

    if n == 1:
        return chunk(q, indices)
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    ip = jnp.pad(indices, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
    split = lambda x: x.reshape((B, n, tc) + x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    out, lse = lax.map(lambda a: chunk(*a), (split(qp), split(ip)))
    merge = lambda x: x.swapaxes(0, 1).reshape((B, n * tc) + x.shape[3:])[:, :T]  # noqa: E731
    return merge(out), merge(lse)
