"""Public entry point of the sparse MLA attention op."""
from __future__ import annotations

import functools
import operator

import jax.numpy as jnp

from pallas_kernels.common import platform_backend
from pallas_kernels.sparse_mla import compact, reference
from pallas_kernels.sparse_mla.vjp import sparse_mla_blockwise, sparse_mla_vjp
from pallas_kernels.sparse_mla.xla import sparse_mla_rows

IMPLS = ("auto", "pallas", "interpret", "reference", "xla")
BACKENDS = ("tpu", "gpu")
VARIANTS = ("auto", "prefill", "decode")


def kernel_forward(backend: str, variant: str, **kernel_options):
    """The forward kernel as a callable (q, kv, indices, *, softmax_scale, v_dim) -> (out, lse).

    backend "tpu" | "gpu"; variant "prefill" | "decode"; kernel_options are bound to the
    kernel (interpret, block sizes, ...).
    """
    if backend == "tpu":
        from pallas_kernels.sparse_mla import tpu
        fn = tpu.sparse_mla_decode_tpu if variant == "decode" else tpu.sparse_mla_prefill_tpu
    elif backend == "gpu":
        from pallas_kernels.sparse_mla import gpu
        fn = gpu.sparse_mla_decode_gpu if variant == "decode" else gpu.sparse_mla_prefill_gpu
    else:
        raise ValueError(f"sparse_mla: unknown backend {backend!r}; expected {BACKENDS}")
    return functools.partial(fn, **kernel_options)


def _kv_shape(kv):
    """Shapes of the cache arrays, for messages."""
    if isinstance(kv, compact.CompactKV):
        return (f"CompactKV(latent {tuple(kv.latent.shape)}, scale {tuple(kv.scale.shape)}, "
                f"rope {tuple(kv.rope.shape)})")
    return str(tuple(kv.shape))


def check_layer(q, kv, layer):
    """Validates the cache's rank against `layer`; -> layer as an int32 scalar (None stays None).

    Without layer kv must be one cache [B, L, Dk]; with layer a stacked cache [n, B, L, Dk] whose
    batch is q's. A Python int layer must lie in [-n, n) (negative counts from the end, as
    kv[layer]); a traced one must be an integer scalar and in [0, n) (not checked)."""
    rank = len(kv.shape)
    if layer is None:
        if rank != 3:
            raise ValueError(f"error: sparse_mla: kv must be one cache [B, L, Dk] when layer is None, got kv "
                             f"{_kv_shape(kv)}; pass layer=... to read a stacked cache [n, B, L, Dk]")
        return None
    if rank != 4:
        raise ValueError(f"error: sparse_mla: layer={layer!r} wants a stacked kv [n, B, L, Dk] (one cache "
                         f"per layer), got kv {_kv_shape(kv)}")
    n, b = kv.shape[:2]
    if b != q.shape[0]:
        raise ValueError(f"error: sparse_mla: stacked kv {_kv_shape(kv)} has batch {b}, q {tuple(q.shape)} has "
                         f"{q.shape[0]}")
    if isinstance(layer, int) or (hasattr(layer, "__index__") and not hasattr(layer, "shape")):
        layer = operator.index(layer)
        if not -n <= layer < n:
            raise ValueError(f"error: sparse_mla: layer={layer} is out of range for kv {_kv_shape(kv)} "
                             f"({n} layers)")
        return jnp.int32(layer % n)
    if getattr(layer, "shape", None) != () or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise ValueError(f"error: sparse_mla: layer must be an int or an integer scalar array, got "
                         f"{getattr(layer, 'dtype', type(layer).__name__)}{tuple(getattr(layer, 'shape', ()))}")
    return layer.astype(jnp.int32)


def sparse_mla(q, kv, indices, *, softmax_scale, v_dim, impl: str = "auto",
               backend: str | None = None, variant: str = "auto", decode_max_t: int = 4,
               query_chunk: int = 256, bwd_query_chunk: int | None = None, layer=None,
               **kernel_options):
    """Token-level sparse MLA attention (absorbed / MQA form).

    q: [B, T, H, Dk], kv: [B, L, Dk] or a compact FP8 cache `compact.CompactKV` (latent
    [B, L, v_dim] e4m3 + scales + rope; every impl dequantises only the rows it gathers),
    indices: [B, T, K] int32 (-1 = none) -> float32 [B, T, H, v_dim]
    (logits = softmax_scale * q . kv[idx], softmax over the selected keys,
    value = kv[idx, :v_dim]; a query with no valid index gets zeros).
    A compact cache is an inference cache: its forward is not wrapped in the custom_vjp
    (gradients w.r.t. q flow through the "reference" / "xla" forwards, not the kernels).

    impl:
      "reference": the plain-jnp reference (gathers only the selected rows,
        `query_chunk` queries at a time); differentiated by jax directly;
      "xla": a jnp forward with the kernels' custom_vjp backward, shaped for `backend`:
        None (CPU): blockwise, in float32, as many query rows per step as keep the gathered
        rows within the CPU's L2 (one row at the release's K x Dk; kernel_options may set
        rows_per_step); "tpu"/"gpu": xla.sparse_mla_rows, all rows
        of a query chunk per step as batched matmuls in the cache dtype with float32
        accumulation (kernel_options may set query_chunk);
      "auto": the TPU kernel on TPU, the GPU kernel on GPU, the reference elsewhere;
      "pallas": the kernel of `backend` (default: the current platform's), compiled;
      "interpret": the kernel of `backend` (default "tpu") in Pallas interpret mode;
        pass `interpret=pltpu.InterpretParams()` for the TPU-semantics interpreter
        (slow: tiny sizes only).
    variant: "prefill", "decode", or "auto" (decode when T <= decode_max_t).
    Kernel impls are wrapped in a custom_vjp (vjp.py): jax.grad works w.r.t. q and kv
    with a blockwise backward that recomputes the softmax from the saved log-sum-exp;
    `bwd_query_chunk` bounds its gather buffer (None = automatic).
    kernel_options: forwarded to the kernel (tpu: block_q / block_b, block_k;
    gpu: block_h, block_k, num_splits, num_warps, num_stages).

    layer: None (kv is one cache [B, L, Dk]), or the layer to read of a stacked cache: kv
    [n, B, L, Dk] (one cache per scanned decoder layer; compact: latent / scale / rope each
    [n, B, L, ...]) and layer a Python int or a traced int32 scalar (shape ()). The result is
    bit-identical to the same call on kv[layer], but kv[layer] is never materialised: the
    reference / xla impls gather the selected rows straight from the stacked arrays (gather
    index (layer, b, idx), or (layer * B + b) * L + idx into the stack viewed as rows), the TPU
    kernels take the layer as a scalar-prefetch operand folded into each row DMA's source
    address, the GPU kernels as a one-element int32 operand added to their row pointers.
    With layer the op is an inference op (caches are never differentiated): no custom_vjp is
    attached. The reference / xla impls stay differentiable by jax w.r.t. q (jax.grad of their
    jnp forward); the kernel impls are not differentiable. A traced layer must lie in [0, n)
    (unchecked).
    """
    if impl not in IMPLS:
        raise ValueError(f"sparse_mla: unknown impl {impl!r}; expected one of {IMPLS}")
    if variant not in VARIANTS:
        raise ValueError(f"sparse_mla: unknown variant {variant!r}; expected {VARIANTS}")
    is_compact = isinstance(kv, compact.CompactKV)
    if is_compact:
        compact.check(kv, v_dim)
    layer = check_layer(q, kv, layer)
    if impl == "auto":
        backend = platform_backend()
        impl = "reference" if backend is None else "pallas"
    if impl == "reference":
        return reference.sparse_mla(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim,
                                    query_chunk=query_chunk, layer=layer)
    if layer is not None:
        kernel_options["layer"] = layer
    if impl == "xla":
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"sparse_mla: unknown backend {backend!r}; expected {BACKENDS}")
        fwd = functools.partial(sparse_mla_blockwise if backend is None else sparse_mla_rows,
                                **kernel_options)
        if is_compact or layer is not None:
            return fwd(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim)[0]
        return sparse_mla_vjp(q, kv, indices, fwd, float(softmax_scale), int(v_dim),
                              bwd_query_chunk)
    if impl == "interpret":
        backend = backend or "tpu"
        kernel_options.setdefault("interpret", True)
    else:
        backend = backend or platform_backend()
        if backend is None:
            raise ValueError("sparse_mla: impl='pallas' needs a TPU or GPU; use "
                             "impl='interpret' on CPU")
    if variant == "auto":
        variant = "decode" if q.shape[1] <= decode_max_t else "prefill"
    fwd = kernel_forward(backend, variant, **kernel_options)
    if is_compact or layer is not None:
        return fwd(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim)[0]
    return sparse_mla_vjp(q, kv, indices, fwd, float(softmax_scale), int(v_dim),
                          bwd_query_chunk)
