"""Public entry point of the indexer top-k op."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import platform_backend
from pallas_kernels.indexer_topk import reference, xla

IMPLS = ("auto", "pallas", "interpret", "reference", "xla")
BACKENDS = ("tpu", "gpu")


def _check_layer(q, k, k_scale, layer):
    """error: when the key shapes and ``layer`` disagree (stacked keys need a layer and back)."""
    want = 3 if layer is None else 4
    if k.ndim != want:
        if layer is None:
            raise ValueError(f"indexer_topk: k has shape {tuple(k.shape)} ({k.ndim} axes) but layer is "
                             "None; pass layer= for keys stacked over layers [n, B, L, D], "
                             "else k must be [B, L, D]")
        raise ValueError(f"indexer_topk: layer={layer!r} needs k stacked over layers [n, B, L, D], "
                         f"got k of shape {tuple(k.shape)}")
    if k_scale is not None and tuple(k_scale.shape) != tuple(k.shape[:-1]):
        raise ValueError(f"indexer_topk: k_scale of shape {tuple(k_scale.shape)} does not match k "
                         f"{tuple(k.shape)} (expected {tuple(k.shape[:-1])}"
                         f"{'' if layer is None else ' with layer given'})")
    if layer is None:
        return
    if isinstance(layer, bool) or not (
            isinstance(layer, int) or (hasattr(layer, "dtype") and hasattr(layer, "shape")
                                       and jnp.issubdtype(layer.dtype, jnp.integer))):
        raise ValueError(f"indexer_topk: layer must be an int or an integer scalar array, got {layer!r}")
    if tuple(getattr(layer, "shape", ())) != ():
        raise ValueError(f"indexer_topk: layer must be a scalar (shape ()), got shape {tuple(layer.shape)}")
    if isinstance(layer, int) and not 0 <= layer < k.shape[0]:
        raise ValueError(f"indexer_topk: layer={layer} out of range for k of shape {tuple(k.shape)} "
                         f"({k.shape[0]} layers)")
    if k.shape[1] != q.shape[0]:
        raise ValueError(f"indexer_topk: k of shape {tuple(k.shape)} (layer given: [n, B, L, D]) has batch "
                         f"{k.shape[1]}, q of shape {tuple(q.shape)} has batch {q.shape[0]}")


def indexer_topk(q, k, weights, *, topk, q_positions, k_scale=None, kv_lengths=None, q_starts=None,
                 impl: str = "reference", backend: str | None = None, layer=None, **kernel_options):
    """Indices of the top-k visible keys per query.

    q: [B, T, Hi, D] (bf16/f32 or float8_e4m3fn, its scale folded into weights),
    k: [B, L, D] (bf16/f32, or float8_e4m3fn with k_scale), weights: [B, T, Hi] f32,
    q_positions: [B, T] int32, k_scale: [B, L] f32 or None, kv_lengths: [B] int32 or None,
    q_starts: [B, T] int32 or None: the lowest visible key slot of each query (packed rows:
    the first slot of the query's segment), so query t sees keys q_starts <= s <= q_positions.
    Returns int32 [B, T, min(topk, L)], -1 where fewer visible keys than topk.

    layer: None, or a Python int / int32 scalar (traced or not): then k is the per-layer stack
    [n, B, L, D] (k_scale [n, B, L]) and the op scores layer ``layer``'s keys, with the same
    result as on ``k[layer]``, ``k_scale[layer]``, without copying that layer's keys out first
    (the kernels index the stack in their key DMA / loads; the plain-jnp paths slice it per key
    chunk). A traced layer out of range is clamped (dynamic-slice semantics).

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
    _check_layer(q, k, k_scale, layer)
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
                                    k_scale=k_scale, kv_lengths=kv_lengths, q_starts=q_starts,
                                    layer=layer, **kernel_options)
    if impl == "reference":
        return reference.indexer_topk(q, k, weights, topk=topk, q_positions=q_positions,
                                      k_scale=k_scale, kv_lengths=kv_lengths, q_starts=q_starts,
                                      layer=layer)
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
    return kernel(q, k, weights, q_positions, k_scale, kv_lengths, q_starts, layer, topk=topk,
                  **kernel_options)
