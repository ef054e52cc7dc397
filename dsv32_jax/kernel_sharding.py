"""The attention ops under a mesh: each runs inside `jax.shard_map` on its per-device slice.

Pallas kernels (Mosaic on TPU, Triton on GPU) cannot be partitioned by GSPMD, and the plain-XLA
ops, left to GSPMD inside the partitioned jit, get collectives they do not need (an all-reduce of
every gathered [K, 576] block of the sparse-attention loop, all-gathers of the indexer scores
around top_k). So under a mesh `indexer_topk` and `sparse_mla` (whatever their impl: kernel,
interpret or XLA) run inside one `jax.shard_map` each over the whole mesh, and need no
collective: every device attends its own sequences with its own heads.

This module is the one place that decides their partition specs, from the logical-axis rule
table `dsv32_jax.sharding.RULES` (through `spec_for`, so a dimension that its mesh axes do not
divide is replicated, as `batch_spec` does):

    sparse MLA   q [B, T, H, Dk]   -> (batch, -, heads, -)    heads split over RULES["heads"]
                 kv [B, L, Dk]     -> (batch, -, -)            replicated over the head axes
                 indices [B, T, K] -> (batch, -, -)
                 out [B, T, H, v]  -> (batch, -, heads, -)
    indexer      q [B, T, Hi, D], weights [B, T, Hi], q_positions [B, T], k [B, L, D],
                 k_scale [B, L], kv_lengths [B]           -> batch split, everything else whole
                 out indices [B, T, K]                    -> (batch, -, -)
    With `layer` given, the cache operands (kv, k, k_scale) are stacks of layers [n, B, L, ...]
    whose leading axis is never split, and the layer index is a replicated scalar.

Indexer heads are never split. Its selection is a top-k over a weighted *sum* over the Hi
heads, I[t, s] = sum_j w[t, j] relu(q[t, j] . k[s]); with heads split, every device would hold
a partial sum and the fused kernel (scores + top-k in one pass) would need the full sum before
its top-k, i.e. an all-reduce of [B, T, L] float32 scores per layer (at 128K context, 0.5 MB per
decode token, ~128 MB per 256-token prefill chunk) and the top-k moved out of the kernel. The
indexer query projection (wq_b, [q_lora 1536, 64 x 128]) is already replicated by the rule table
(axes ("q_lora", None)), so its queries arrive whole on every device with no collective; the
tensor-parallel devices of one sequence then compute the same selection redundantly, which
costs FLOPs, not communication, and leaves the kernel unchanged.

The custom_vjp of the sparse MLA runs inside the same shard_map (the whole differentiable op is
wrapped), so grads w.r.t. q come out split like q; the kv gradient of each head slice is summed
over the head axes by shard_map's transpose (kv is replicated there), the only collective of the
backward. `check_vma=False`: Mosaic lowering needs shard_map, and the kernels' outputs carry no
varying-manual-axes type.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from dsv32_jax.sharding import spec_for
from pallas_kernels.indexer_topk import indexer_topk
from pallas_kernels.sparse_mla import sparse_mla

# logical axes of the operands (names of dsv32_jax.sharding.RULES; None = never split)
SPARSE_MLA_AXES = {"q": ("batch", None, "heads", None), "kv": ("batch", None, None),
                   "indices": ("batch", None, None), "out": ("batch", None, "heads", None)}
INDEXER_AXES = {"q": ("batch", None, None, None), "k": ("batch", None, None),
                "weights": ("batch", None, None), "q_positions": ("batch", None), "q_starts": ("batch", None),
                "k_scale": ("batch", None), "kv_lengths": ("batch",), "out": ("batch", None, None)}


def sparse_mla_specs(mesh: Mesh, q_shape) -> dict[str, P]:
    """Partition specs of sparse MLA's q, kv, indices and out for q of shape [B, T, H, Dk]."""
    b, t, h, dk = q_shape
    q = spec_for(SPARSE_MLA_AXES["q"], (b, t, h, dk), mesh)
    rows = spec_for(SPARSE_MLA_AXES["kv"], (b, 1, 1), mesh)
    return {"q": q, "kv": rows, "indices": rows, "out": q}


def indexer_specs(mesh: Mesh, batch: int) -> dict[str, P]:
    """Partition specs of the indexer's operands and its output (all batch-split only)."""
    return {name: spec_for(axes, (batch,) * len(axes), mesh) for name, axes in INDEXER_AXES.items()}


def _stacked(spec: P) -> P:
    """The spec of a cache array with a leading (never split) layer axis: [n, B, L, ...]."""
    return P(None, *spec)


def sharded_sparse_mla(q, kv, indices, *, mesh: Mesh | None, softmax_scale, v_dim, layer=None, **op_options):
    """`pallas_kernels.sparse_mla` on the per-device slice under `mesh` (directly without one).

    q [B, T, H, Dk], kv [B, L, Dk] or a compact FP8 cache (pallas_kernels.sparse_mla.CompactKV, its
    three [B, L, ...] arrays split like kv), indices [B, T, K] int32 -> float32 [B, T, H, v_dim].
    layer: None, or an int32 scalar: kv (each array of a compact cache) is then a stack of layers'
    caches [n, B, L, ...] and the op reads layer `layer` in place (no copy of the layer's cache).
    op_options: impl, backend, variant, ... (see sparse_mla). Differentiable w.r.t. q and a dense kv.
    """
    layer_args = () if layer is None else (jnp.asarray(layer, jnp.int32),)

    def local(q, kv, indices, *layer_arg):
        return sparse_mla(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim,
                          **({"layer": layer_arg[0]} if layer_arg else {}), **op_options)

    with jax.named_scope("sparse_mla"):
        if mesh is None:
            return local(q, kv, indices, *layer_args)
        s = sparse_mla_specs(mesh, q.shape)
        kv_spec = s["kv"] if layer is None else _stacked(s["kv"])
        in_specs = (s["q"], kv_spec, s["indices"]) + (P(),) * len(layer_args)
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=s["out"],
                             check_vma=False)(q, kv, indices, *layer_args)


def sharded_indexer_topk(q, k, weights, *, mesh: Mesh | None, topk, q_positions, k_scale=None,
                         kv_lengths=None, q_starts=None, layer=None, **op_options):
    """`pallas_kernels.indexer_topk` on the per-device slice under `mesh` (directly without one).

    q [B, T, Hi, D], k [B, L, D], weights [B, T, Hi] f32, q_positions [B, T] int32,
    k_scale [B, L] f32 | None, kv_lengths [B] int32 | None, q_starts [B, T] int32 | None (lowest
    visible key per query: packed segments) -> int32 [B, T, min(topk, L)].
    layer: None, or an int32 scalar: k [n, B, L, D] and k_scale [n, B, L] are then stacks of
    layers' caches and the op scores layer `layer`'s keys in place.
    op_options: impl, backend, kernel options (see indexer_topk).
    """
    args = {"q": q, "k": k, "weights": weights, "q_positions": q_positions, "k_scale": k_scale,
            "kv_lengths": kv_lengths, "q_starts": q_starts,
            "layer": None if layer is None else jnp.asarray(layer, jnp.int32)}
    args = {name: a for name, a in args.items() if a is not None}

    def local(a):
        extra = {n: a[n] for n in ("q_starts", "layer") if n in a}
        return indexer_topk(a["q"], a["k"], a["weights"], topk=topk, q_positions=a["q_positions"],
                            k_scale=a.get("k_scale"), kv_lengths=a.get("kv_lengths"), **extra, **op_options)

    with jax.named_scope("indexer_topk"):
        if mesh is None:
            return local(args)
        s = indexer_specs(mesh, q.shape[0])
        if layer is not None:
            s = dict(s, k=_stacked(s["k"]), k_scale=_stacked(s["k_scale"]), layer=P())
        return jax.shard_map(local, mesh=mesh, in_specs=({n: s[n] for n in args},),
                             out_specs=s["out"], check_vma=False)(args)
