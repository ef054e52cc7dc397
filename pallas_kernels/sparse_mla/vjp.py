"""custom_vjp wrapper for the sparse MLA forward kernels, and the blockwise backward.

The Pallas forward kernels return (out [B, T, H, v_dim] f32, lse [B, T, H] f32). Pallas
calls are not differentiable, so `sparse_mla_vjp` pairs a kernel forward with a
backward pass written in blockwise jnp that, like the forward, touches only the
selected rows of the cache (no dense [T, L] matrix is ever formed):

    p   = exp(scale * q . kv[idx] - lse)                 (recomputed from the saved lse)
    dp  = d_out . kv[idx, :v_dim]
    ds  = p * (dp - delta),  delta = sum(d_out * out, -1)
    dq  = scale * ds . kv[idx]
    dkv[idx] += scale * ds^T q  (+ p^T d_out on the first v_dim columns)

Queries are processed `query_chunk` at a time with lax.scan; each step gathers the
chunk's rows [B, chunk, K, Dk], and scatter-adds its row gradients into a float32
[B, L, Dk] accumulator (slots with index -1 are dropped). Indices get no gradient.

`sparse_mla_blockwise` is a jnp forward with the kernels' (out, lse) interface, shaped
for XLA:CPU: one query row at a time (lax.map), so the gathered rows [K, Dk] and the
logits [H, K] of a row stay in cache and both products are plain 2-D matmuls. It is
the fastest CPU path (about 3x the reference at K=2048, H=128) and, through the same
custom_vjp, a differentiable one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.sparse_mla import compact

_HI = lax.Precision.HIGHEST


def sparse_mla_bwd(q, kv, indices, out, lse, d_out, *, softmax_scale, v_dim,
                   query_chunk=None):
    """Gradients of the sparse MLA forward w.r.t. q and kv.

    q [B, T, H, Dk], kv [B, L, Dk], indices [B, T, K] int32 (-1 = none),
    out [B, T, H, v_dim] f32, lse [B, T, H] f32 (-inf for rows with no valid index),
    d_out [B, T, H, v_dim] -> (dq [B, T, H, Dk] in q.dtype, dkv [B, L, Dk] in kv.dtype).
    query_chunk=None picks a chunk that keeps the gathered rows near 64 MiB (f32).
    """
    B, T, H, Dk = q.shape
    L = kv.shape[1]
    K = indices.shape[-1]
    if query_chunk is None:
        query_chunk = max(1, min(T, (16 << 20) // max(1, B * K * Dk)))
    tc = max(1, min(query_chunk, T))
    n = -(-T // tc)
    Tp = n * tc
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)                 # [B, T, H]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    pad = Tp - T

    def chunks(x, fill=0):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return x.reshape((B, n, tc) + x.shape[2:]).swapaxes(0, 1)

    xs = (chunks(q), chunks(indices.astype(jnp.int32), -1), chunks(d_out), chunks(delta),
          chunks(lse))
    kv32 = kv.astype(jnp.float32)

    def step(dkv, x):
        qc, ic, doc, dc, lc = x               # [B, tc, H, Dk], [B, tc, K], ...
        qc = qc.astype(jnp.float32)
        valid = ic >= 0
        safe = jnp.where(valid, ic, 0)
        rows = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv32, safe)             # [B, tc, K, Dk]
        s = jnp.einsum("bthd,btkd->bthk", qc, rows, precision=_HI) * softmax_scale
        p = jnp.where(valid[:, :, None, :], jnp.exp(s - lc[..., None]), 0.0)
        dp = jnp.einsum("bthv,btkv->bthk", doc, rows[..., :v_dim], precision=_HI)
        ds = p * (dp - dc[..., None]) * softmax_scale                        # [B, tc, H, K]
        dq = jnp.einsum("bthk,btkd->bthd", ds, rows, precision=_HI)
        drows = jnp.einsum("bthk,bthd->btkd", ds, qc, precision=_HI)
        dval = jnp.einsum("bthk,bthv->btkv", p, doc, precision=_HI)
        drows = drows + jnp.pad(dval, ((0, 0),) * 3 + ((0, Dk - v_dim),))
        tgt = jnp.where(valid, ic, L).reshape(B, tc * K)                     # L = dropped
        dkv = jax.vmap(lambda acc, t, g: acc.at[t].add(g, mode="drop"))(
            dkv, tgt, drows.reshape(B, tc * K, Dk))
        return dkv, dq

    dkv, dq = lax.scan(step, jnp.zeros((B, L, Dk), jnp.float32), xs)
    dq = dq.swapaxes(0, 1).reshape(B, Tp, H, Dk)[:, :T]
    return dq.astype(q.dtype), dkv.astype(kv.dtype)


# gathered rows per lax.map step of the blockwise forward when rows_per_step is automatic:
# [r, K, Dk] float32 within 256 KiB (the CPU's L2). A decode step of a small model takes all its
# rows in one step (B=16, K=8, Dk=48: 0.83 -> 0.69 ms per decode step of the tiny oracle model on
# a 2-core CPU); at the release's K=2048 x Dk=576 (4.7 MB per row) it stays one row per step.
AUTO_ROWS_BYTES = 256 * 1024


def auto_rows_per_step(rows: int, k: int, dk: int) -> int:
    """Query rows per step whose float32 gather [r, K, Dk] fits AUTO_ROWS_BYTES (>= 1, <= rows)."""
    return max(1, min(rows, AUTO_ROWS_BYTES // (4 * k * dk)))


def sparse_mla_blockwise(q, kv, indices, *, softmax_scale, v_dim, rows_per_step=None, layer=None):
    """jnp forward, `rows_per_step` query rows per lax.map step (None: auto_rows_per_step).

    q [B, T, H, Dk], kv [B, L, Dk] or a compact.CompactKV, indices [B, T, K] int32 (-1 = none)
    -> (out f32 [B, T, H, v_dim], lse f32 [B, T, H]; -inf / zeros for empty rows).
    layer: None, or an int32 scalar with kv stacked [n, B, L, Dk] (compact: [n, B, L, ...]):
    rows of kv[layer] are read from the stacked cache flattened to [n * B * L, Dk].
    """
    B, T, H, Dk = q.shape
    K = indices.shape[-1]
    R = B * T
    if rows_per_step is None:
        rows_per_step = auto_rows_per_step(R, K, Dk)
    n = -(-R // rows_per_step)
    Rp = n * rows_per_step
    q2 = jnp.pad(q.reshape(R, H, Dk), ((0, Rp - R), (0, 0), (0, 0)))
    i2 = jnp.pad(indices.reshape(R, K).astype(jnp.int32), ((0, Rp - R), (0, 0)),
                 constant_values=-1)
    b2 = jnp.minimum(jnp.arange(Rp, dtype=jnp.int32) // T, B - 1)
    L = kv.shape[-2]
    if layer is not None:
        b2 = b2 + layer * B                # row block of (layer, b) in the [n * B * L] flattening

    def step(x):
        qc, ic, bc = x                    # [r, H, Dk], [r, K], [r]
        valid = ic >= 0
        # one-index gather from the cache flattened to [B * L, Dk]: b * L + index
        rows = compact.take_flat(kv, bc[:, None] * L + jnp.where(valid, ic, 0)).astype(jnp.float32)
        s = lax.dot_general(qc.astype(jnp.float32), rows, (((2,), (2,)), ((0,), (0,))),
                            precision=_HI) * softmax_scale                    # [r, H, K]
        s = jnp.where(valid[:, None, :], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = lax.dot_general(p, rows[..., :v_dim], (((2,), (1,)), ((0,), (0,))),
                            precision=_HI)
        has = l > 0
        l1 = jnp.where(has, l, 1.0)
        return o / l1, jnp.where(has, m + jnp.log(l1), -jnp.inf)[..., 0]

    shp = lambda x: x.reshape((n, rows_per_step) + x.shape[1:])  # noqa: E731
    out, lse = lax.map(step, (shp(q2), shp(i2), shp(b2)))
    return (out.reshape(Rp, H, v_dim)[:R].reshape(B, T, H, v_dim),
            lse.reshape(Rp, H)[:R].reshape(B, T, H))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def sparse_mla_vjp(q, kv, indices, forward, softmax_scale, v_dim, query_chunk):
    """Differentiable sparse MLA: out f32 [B, T, H, v_dim] = forward(q, kv, indices)[0].

    q [B, T, H, Dk], kv [B, L, Dk], indices [B, T, K] int32.
    forward: a hashable callable (q, kv, indices, *, softmax_scale, v_dim) -> (out, lse),
    e.g. a Pallas kernel entry point bound to its block sizes with functools.partial.
    query_chunk: chunk size of the backward (None = automatic).
    """
    out, _ = forward(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim)
    return out


def _vjp_fwd(q, kv, indices, forward, softmax_scale, v_dim, query_chunk):
    out, lse = forward(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim)
    return out, (q, kv, indices, out, lse)


def _vjp_bwd(forward, softmax_scale, v_dim, query_chunk, res, d_out):
    q, kv, indices, out, lse = res
    dq, dkv = sparse_mla_bwd(q, kv, indices, out, lse, d_out, softmax_scale=softmax_scale,
                             v_dim=v_dim, query_chunk=query_chunk)
    return dq, dkv, None


sparse_mla_vjp.defvjp(_vjp_fwd, _vjp_bwd)
