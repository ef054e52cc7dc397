"""The lightning indexer's alignment loss (V3.2-Exp report 2.1) and its recall metric.

Per layer and query t, with the main attention's per-head probabilities P_h[t, s] (H heads):

    target   p_t(s) = sum_h P_h[t, s] / H                      (L1-normalised head sum; detached)
    indexer  q_t(s) = softmax_s(I[t, s])                       (I: index scores, section 2.5)
    loss     KL(p_t || q_t) = sum_s p_t(s) (log p_t(s) - log q_t(s))

  stage "dense":  s ranges over every visible key and P is the dense causal softmax (the warm-up);
  stage "sparse": s ranges over the selected set S_t (the layer's top-k indices) and P is the
                  sparse attention's own softmax over S_t (what the sparse model really computes).

The target is stop-gradient'ed and the indexer reads detached inputs (dsv32_jax.indexer), so this
loss trains the indexer only, and the LM loss cannot reach it (its output is integer indices).
The index scores of the loss are computed from unquantised q/k ("exact" numerics) whatever the
model's numerics: the FP8 path of "reference" numerics is a rounding of these same scores.

Recall (no gradient, dense attention): for queries with more than K = index_topk visible keys,
recall_t = sum_{s in S_t} p_t(s), the share of the dense attention mass that the indexer's
selection S_t (its top K of the same unquantised scores) keeps, and ceiling_t = the mass of p_t's
own top K (the best any K keys can keep). S_t is the indexer's own top-k, not the layer's indices,
so recall is also measured while the model runs dense (the warm-up).

Nothing of size [T, T] per head is materialised: queries are processed `chunk` at a time with
lax.map (dense: [B, chunk, H, L] logits; sparse: [B, chunk, H, K] over gathered rows), each chunk
under jax.checkpoint so the backward stores only chunk inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.model import LAYER_AXIS


STAGES = ("dense", "sparse")
# stats per layer: [kl_sum, queries, recall_sum, ceiling_sum, recall_queries]
N_STATS = 5
HI = jax.lax.Precision.HIGHEST


def mla_projections(mla, x, cos, sin, numerics):
    """The main attention's absorbed queries and keys, as MLA.__call__ computes them.

    x [B, T, D] (attn-normed hidden) -> (q_full [B, T, H, Dk], latent [B, T, Dk], qr [B, T, q_lora]),
    Dk = kv_lora_rank + qk_rope_head_dim.
    """
    q_full, qr, _ = mla.absorbed_queries(x, cos, sin)
    return q_full, mla.latent(x, cos, sin, numerics), qr


def _kl_rows(p, logits, valid):
    """KL(p || softmax(logits)) per row over `valid` entries: p, logits, valid [..., N] -> [...]."""
    logits = jnp.where(valid, logits, -jnp.inf)
    logq = jax.nn.log_softmax(logits, axis=-1)
    logq = jnp.where(valid, logq, 0.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.sum(jnp.where(valid, plogp - p * logq, 0.0), axis=-1)


def _index_scores(iq, iw, ik):
    """iq [B, C, Hi, D], iw [B, C, Hi] f32, ik [B, C, N, D] or [B, N, D] -> f32 [B, C, N]."""
    eq = "bchd,bcnd->bchn" if ik.ndim == 4 else "bchd,bnd->bchn"
    dots = jnp.einsum(eq, iq.astype(jnp.float32), ik.astype(jnp.float32), precision=HI)
    return jnp.einsum("bchn,bch->bcn", jax.nn.relu(dots), iw.astype(jnp.float32), precision=HI)


def _masked_softmax(logits, valid):
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    d = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(d > 0, d, 1.0)


def _dense_chunk(q, iq, iw, slot, start, latent, ik, *, scale, topk):
    """One query chunk, dense stage. q [B, C, H, Dk], iq [B, C, Hi, D], iw [B, C, Hi],
    slot/start [B, C] int32 -> stats [B, C, N_STATS]."""
    n = latent.shape[1]
    s = jnp.arange(n, dtype=jnp.int32)
    vis = (s[None, None, :] <= slot[..., None]) & (s[None, None, :] >= start[..., None])   # [B, C, L]
    logits = jnp.einsum("bchd,bnd->bchn", q.astype(jnp.float32), latent.astype(jnp.float32),
                        precision=HI) * scale
    p = jnp.mean(_masked_softmax(logits, vis[:, :, None, :]), axis=2)                      # [B, C, L]
    p = jax.lax.stop_gradient(p)
    scores = _index_scores(iq, iw, ik)
    kl = _kl_rows(p, scores, vis)
    # recall of the indexer's top-k and its ceiling, on queries that really select
    kk = min(topk, n)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(jnp.where(vis, scores, -jnp.inf)), kk)
    recall = jnp.sum(jnp.take_along_axis(p, idx, axis=-1), axis=-1)
    ceiling = jnp.sum(jax.lax.top_k(p, kk)[0], axis=-1)
    sparse_q = (jnp.sum(vis, axis=-1) > topk).astype(jnp.float32)
    one = jnp.ones_like(kl)
    return jnp.stack([kl, one, recall * sparse_q, ceiling * sparse_q, sparse_q], axis=-1)


def _sparse_chunk(q, iq, iw, idx, latent, ik, *, scale):
    """One query chunk, sparse stage: KL over the selected set only. -> stats [B, C, N_STATS]."""
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    rows = jax.vmap(lambda kv, i: kv[i])(latent, safe)                                    # [B, C, K, Dk]
    logits = jnp.einsum("bchd,bckd->bchk", q.astype(jnp.float32), rows.astype(jnp.float32),
                        precision=HI) * scale
    p = jax.lax.stop_gradient(jnp.mean(_masked_softmax(logits, valid[:, :, None, :]), axis=2))
    krows = jax.vmap(lambda k, i: k[i])(ik, safe)                                          # [B, C, K, D]
    kl = _kl_rows(p, _index_scores(iq, iw, krows), valid)
    kl = jnp.where(jnp.any(valid, axis=-1), kl, 0.0)
    z = jnp.zeros_like(kl)
    return jnp.stack([kl, jnp.ones_like(kl), z, z, z], axis=-1)


def alignment_stats(mla, x, cos, sin, indices, *, stage: str, numerics: str = "exact", q_starts=None,
                    chunk: int = 128, topk: int | None = None):
    """Alignment statistics of one MLA layer (no cache: keys are this call's tokens).

    x [B, T, D] attn-normed hidden, cos/sin [B, T, R/2], indices [B, T, K] the layer's selection,
    q_starts [B, T] int32 or None (packed rows), topk: K of the recall (default cfg.index_topk).
    Returns float32 [N_STATS]:
    [sum of per-query KL, number of queries, sum of recall, sum of ceiling, number of queries with
    more than K visible keys] (recall entries are 0 in the sparse stage). Differentiable w.r.t. the
    indexer's parameters only.
    """
    if stage not in STAGES:
        raise ValueError(f"alignment stage must be one of {STAGES}, got {stage!r}")
    cfg = mla.cfg
    b, t, _ = x.shape
    with jax.named_scope("indexer_alignment"):
        q_full, latent, qr = mla_projections(mla, x, cos, sin, numerics)
        q_full, latent = jax.lax.stop_gradient(q_full), jax.lax.stop_gradient(latent)
        iq, iw = mla.indexer.queries(x, qr, cos, sin, "exact")
        ik, _ = mla.indexer.keys(x, cos, sin, "exact")
        slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        start = jnp.zeros((b, t), jnp.int32) if q_starts is None else q_starts.astype(jnp.int32)
        indices = indices.astype(jnp.int32)
        if stage == "dense":
            fn = jax.checkpoint(lambda a: _dense_chunk(*a, latent, ik, scale=cfg.softmax_scale,
                                                       topk=topk or cfg.index_topk))
            args = (q_full, iq, iw, slot, start)
        else:
            fn = jax.checkpoint(lambda a: _sparse_chunk(*a, latent, ik, scale=cfg.softmax_scale))
            args = (q_full, iq, iw, indices)
        stats = _chunked(fn, args, chunk, t)
        return jnp.sum(stats, axis=(0, 1))


def _chunked(fn, args, chunk, t):
    """fn over query chunks (axis 1) of args with lax.map; padded queries get zero stats."""
    if t <= chunk:
        return fn(args)
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode="edge") if pad else a
        return a.reshape(a.shape[0], n, chunk, *a.shape[2:]).swapaxes(0, 1)

    out = jax.lax.map(fn, tuple(split(a) for a in args))                     # [n, B, chunk, S]
    out = out.swapaxes(0, 1).reshape(out.shape[1], n * chunk, N_STATS)
    return out[:, :t]


# ------------------------------------------------------------------------------ model probes
class AlignStat(nnx.Variable):
    """Alignment statistics of the last forward of each layer of a stack, float32 [n, N_STATS]."""


class AlignProbe(nnx.Module):
    """Wraps a stack's (stacked) MLA: same outputs, and records `alignment_stats` of each layer's
    call in its row of `stats` [layers, N_STATS] (written from the scanned layer body)."""

    def __init__(self, mla, *, stage: str, chunk: int = 128, topk: int | None = None, layers: int = 1):
        self.mla, self.stage, self.chunk, self.topk = mla, stage, chunk, topk
        self.stats = AlignStat(jnp.zeros((layers, N_STATS), jnp.float32), axes=(LAYER_AXIS, None))

    def __call__(self, x, positions, cos, sin, *, numerics="exact", cache=None, q_starts=None, **kw):
        kw2 = dict(kw, **({} if q_starts is None else {"q_starts": q_starts}))
        out, idx, new_cache = self.mla(x, positions, cos, sin, numerics=numerics, cache=cache, **kw2)
        if cache is None:
            self.stats[...] = alignment_stats(self.mla, x, cos, sin, idx, stage=self.stage,
                                              numerics=numerics, q_starts=q_starts, chunk=self.chunk,
                                              topk=self.topk)
        return out, idx, new_cache


def install_probes(model, *, stage: str, chunk: int = 128, topk: int | None = None) -> list[AlignProbe]:
    """Wrap the (stacked) attention of every stack of decoder layers of a (traced) model copy;
    returns the probes (one per stack, stats [n, N_STATS]). topk: K of the recall (default: the
    layers' cfg.index_topk)."""
    if stage not in STAGES:
        raise ValueError(f"alignment stage must be one of {STAGES}, got {stage!r}")
    probes = []
    for stack in model.stacks:
        probe = AlignProbe(stack.block.attn, stage=stage, chunk=chunk, topk=topk, layers=stack.n)
        stack.block.attn = probe
        probes.append(probe)
    return probes


def probe_stats(probes):
    """[n_layers, N_STATS] from installed probes."""
    return jnp.concatenate([p.stats[...] for p in probes])


def summarize(stats) -> dict:
    """Host summary of [n_layers, N_STATS] stats (summed over batches): mean KL over layers and
    queries, and per-layer recall / ceiling (mean over queries with more than K visible keys;
    None where there is no such query, e.g. in the sparse stage, which has no dense attention)."""
    import numpy as np
    s = np.asarray(stats, np.float64)
    out = {"indexer_kl": float((s[:, 0] / np.maximum(s[:, 1], 1)).mean()),
           "indexer_recall": None, "attention_ceiling": None}
    if s[:, 4].sum() > 0:
        rec = s[:, 2] / np.maximum(s[:, 4], 1)
        ceil = s[:, 3] / np.maximum(s[:, 4], 1)
        has = s[:, 4] > 0
        out.update(indexer_recall=float(rec[has].mean()), attention_ceiling=float(ceil[has].mean()),
                   indexer_recall_per_layer=[float(r) if h else None for r, h in zip(rec, has)],
                   attention_ceiling_per_layer=[float(c) if h else None for c, h in zip(ceil, has)])
    return out
