"""Public entry point of the indexer top-k op."""
from __future__ import annotations

from pallas_kernels.common import platform_backend
from pallas_kernels.indexer_topk import reference, xla

IMPLS = ("auto", "pallas", "interpret", "reference", "xla")
BACKENDS = ("tpu", "gpu")


def indexer_topk(q, k, weights, *, topk, q_positions, k_scale=None, kv_lengths=None, q_starts=None,
                 impl: str = "reference", backend: str | None = None, **kernel_options):
    """Indices of the top-k visible keys per query.

    q: [B, T, Hi, D] (bf16/f32 or float8_e4m3fn, its scale folded into weights),
    k: [B, L, D] (bf16/f32, or float8_e4m3fn with k_scale), weights: [B, T, Hi] f32,
    q_positions: [B, T] int32, k_scale: [B, L] f32 or None, kv_lengths: [B] int32 or None,
    q_starts: [B, T] int32 or None: the lowest visible key slot of each query (packed rows:
    the first slot of the query's segment), so query t sees keys q_starts <= s <= q_positions.
    Returns int32 [B, T, min(topk, L)], -1 where fewer visible keys than topk.

    impl:
      "reference": plain jnp (materialises the [B, T, L] scores);
      "xla": plain jnp shaped for ``backend``: the reference for None (CPU), or for
        "tpu"/"gpu" the accelerator form of xla.py (operands in their storage precision,
        float32 accumulation, key chunks for long prefills);
      "auto": the TPU kernel on TPU, the GPU kernel on GPU, the reference elsewhere;
      "pallas": the kernel of ``backend`` (default: the current platform's), compiled;
      "interpret": the kernel of ``backend`` (default "tpu") in Pallas interpret mode;
        pass ``interpret=pltpu.InterpretParams()`` in kernel_options for the TPU
        semantics interpreter (slow, tiny sizes only).
    The kernels return the indices in descending score order with ties broken towards the
    lower key index (like the reference); their fp32 sums run in a different order than
    the reference's, so near-ties may resolve differently.
    kernel_options: forwarded to the kernel (tpu: block_q, chunk; gpu: sub, nsplit,
    min_tiles_per_split, target_programs, num_warps).
    """
    if impl not in IMPLS:
        raise ValueError(f"indexer_topk: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        backend = platform_backend()
        if backend is None:
            impl = "reference"
    if impl == "xla":
        if backend is None:
            impl = "reference"
        elif backend not in BACKENDS:
            raise ValueError(f"indexer_topk: unknown backend {backend!r}; expected {BACKENDS}")
        else:
            return xla.indexer_topk(q, k, weights, topk=topk, q_positions=q_positions,
                                    k_scale=k_scale, kv_lengths=kv_lengths, **kernel_options)
    if impl == "reference":
        return reference.indexer_topk(q, k, weights, topk=topk, q_positions=q_positions,
                                      k_scale=k_scale, kv_lengths=kv_lengths, q_starts=q_starts)
    if impl == "interpret":
        backend = backend or "tpu"
        kernel_options.setdefault("interpret", True)
    elif impl == "pallas":
        backend = backend or platform_backend()
        if backend is None:
            raise ValueError("indexer_topk: impl='pallas' needs a TPU or GPU; use "
                             "impl='interpret' on CPU")
    if backend not in BACKENDS:
        raise ValueError(f"indexer_topk: unknown backend {backend!r}; expected {BACKENDS}")
    if backend == "tpu":
        from pallas_kernels.indexer_topk.tpu import indexer_topk_tpu as kernel
    else:
        from pallas_kernels.indexer_topk.gpu import indexer_topk_gpu as kernel
    return kernel(q, k, weights, q_positions, k_scale, kv_lengths, q_starts, topk=topk,
                  **kernel_options)
