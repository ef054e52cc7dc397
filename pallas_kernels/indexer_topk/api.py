"""Public entry point of the indexer top-k op."""
from __future__ import annotations

from pallas_kernels.indexer_topk import reference


def indexer_topk(q, k, weights, *, topk, q_positions, k_scale=None, kv_lengths=None,
                 impl: str = "reference"):
    """Indices of the top-k visible keys per query.

    q: [B, T, Hi, D], k: [B, L, D] (bf16/f32 or float8_e4m3fn), weights: [B, T, Hi] f32,
    q_positions: [B, T] int32, k_scale: [B, L] f32 or None, kv_lengths: [B] int32 or None.
    Returns int32 [B, T, min(topk, L)], -1 where fewer visible keys than topk.
    """
    if impl == "reference":
        return reference.indexer_topk(q, k, weights, topk=topk, q_positions=q_positions,
                                      k_scale=k_scale, kv_lengths=kv_lengths)
    raise ValueError(f"indexer_topk: unknown impl {impl!r}")
