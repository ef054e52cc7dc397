"""Public entry point of the sparse MLA attention op."""
from __future__ import annotations

from pallas_kernels.sparse_mla import reference


def sparse_mla(q, kv, indices, *, softmax_scale, v_dim, impl: str = "reference"):
    """q: [B, T, H, Dk], kv: [B, L, Dk], indices: [B, T, K] int32 (-1 = none)
    -> float32 [B, T, H, v_dim]."""
    if impl == "reference":
        return reference.sparse_mla(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim,
                                    query_chunk=256)
    raise ValueError(f"sparse_mla: unknown impl {impl!r}")
