"""Mosaic TPU kernel: lightning-indexer scores with a fused running top-k.

Contract (see ``reference.py``):

    I[b, t, s] = k_scale[b, s] * sum_h weights[b, t, h] * relu(q[b, t, h, :] . k[b, s, :])

key s visible to query t iff s <= q_positions[b, t] and s < kv_lengths[b] (and s >=
q_starts[b, t] when given: segment-aware packing); the result is
int32 [B, T, min(topk, L)], sorted by descending score, -1 in the slots that no visible
key fills.

Grid ``(B, T / bq, L / N)``; the last axis walks the keys in tiles of N keys, where
``N = max(128, next_pow2(min(topk, L)))`` is also the size of the running list.  Per grid
step:

1. scores of the [bq, N] tile, computed in chunks of ``kc`` keys: one MXU matmul
   ``[bq*Hi, D] x [D, kc]`` with fp32 accumulation, relu, multiply by the head weights
   and reduce over the heads (VPU), times ``k_scale``; the chunk is stored into a VMEM
   scratch laid out ``[bq, N/128, 128]`` (one query's list fills whole vregs, so decode
   with bq = 1 is not 8x sublane-padded).  Invisible keys become -inf.
2. if any score of the tile beats the current N-th best of its query, the tile is sorted
   (bitonic network) and merged into the running best-N list: ``c = better(best_desc,
   tile_asc)`` element-wise is bitonic and holds the top N of the union, and one bitonic
   merge (log2 N stages) sorts it again.  Otherwise the tile is skipped.
3. on the last key step the indices (or -1 for -inf entries) are written out.

The full [T, L] score matrix never exists: only the current [bq, N] tile lives in VMEM.

Sorting network on TPU: ``sort``, ``top_k``, ``gather`` and ``rev`` have no Mosaic
lowering, so every compare-exchange stage fetches the partner element ``p ^ j`` with two
``pltpu.roll`` calls (lane rotation for j < 128, sublane rotation for j >= 128; roll
follows ``jnp.roll``) and picks with ``jnp.where``.  Elements are (score, index) pairs
compared lexicographically: higher score first, then LOWER index first, so ties are
broken exactly like ``jax.lax.top_k`` in the reference and the output is deterministic.

Keys stacked over layers ([n, B, L, D], the model's per-scan cache) are read in place: the
layer is a second scalar-prefetch operand that the key and key-scale index_maps select with.

Tiles past the last visible key of a query block (causal limit or kv_length) are neither
computed nor fetched: a scalar-prefetched tile count per (batch, query block) clamps the
key index_map, so the pipeline re-uses the previous block instead of issuing a new DMA.

NaN scores are treated as invisible (-inf) so that they cannot corrupt the network.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.indexer_topk import reference

LANES = 128
_NO_INDEX = jnp.iinfo(jnp.int32).max  # index of the empty (-inf) list entries


def list_size(topk: int, num_keys: int) -> int:
    """Size N of the running list (= key tile): a power of two >= min(topk, L), >= 128."""
    k = min(topk, num_keys)
    return max(LANES, 1 << max(k - 1, 0).bit_length())


# ----------------------------------------------------------------------------- network
def _better(av, ai, bv, bi):
    """(av, ai) ranks before (bv, bi): higher score, ties -> lower key index."""
    return (av > bv) | ((av == bv) & (ai < bi))


def _partner(x, j, pos):
    """x[..., p ^ j] for the flat list position p = sublane * 128 + lane of x [R, S, 128]."""
    if j < LANES:
        axis, shift, size = 2, j, LANES
    else:
        axis, shift, size = 1, j // LANES, x.shape[1]
    fwd = pltpu.roll(x, size - shift, axis)  # fwd[p] = x[p + j]
    bwd = pltpu.roll(x, shift, axis)         # bwd[p] = x[p - j]
    return jnp.where((pos & j) == 0, fwd, bwd)


def _stage(v, i, pos, j, desc):
    """One compare-exchange stage at distance j.  desc: Python bool or bool mask
    broadcastable to v (True where the pair's block puts the better entry first).
    Only and/or/xor/not on masks (no mask equality) to stay on well-trodden Mosaic ops."""
    pv, pi = _partner(v, j, pos), _partner(i, j, pos)
    is_low = (pos & j) == 0
    if isinstance(desc, bool):
        flip = ~is_low if desc else is_low
    else:
        flip = is_low ^ desc
    keep = _better(v, i, pv, pi) ^ flip  # low keeps the better one iff desc, high the other
    return jnp.where(keep, v, pv), jnp.where(keep, i, pi)


def _bitonic_sort(v, i, pos, n, descending):
    """Sort each [S, 128] list (n = S*128 entries) of v, i [R, S, 128]."""
    size = 2
    while size <= n:
        if size == n:
            desc = descending
        else:
            desc = ((pos & size) == 0) if descending else ((pos & size) != 0)
        j = size // 2
        while j >= 1:
            v, i = _stage(v, i, pos, j, desc)
            j //= 2
        size *= 2
    return v, i


def _bitonic_merge(v, i, pos, n, descending):
    """Sort bitonic lists of n entries."""
    j = n // 2
    while j >= 1:
        v, i = _stage(v, i, pos, j, descending)
        j //= 2
    return v, i


# ------------------------------------------------------------------------------ kernel
def _kernel(tiles_ref, layer_ref, q_ref, w_ref, lim_ref, *rest, n, kc, nq, has_scale, has_start, cdtype):
    """tiles_ref: SMEM int32 [B*nq] key tiles to visit per (batch, query block); layer_ref:
    SMEM int32 [1], the layer of the stacked keys (used by the key index_maps only);
    q_ref [bq, Hi, D]; w_ref [bq, Hi, 1] f32; lim_ref [bq, 1, 1] int32 (visible keys are
    s < lim); lo_ref [bq, 1, 1] int32 (if has_start: visible keys are s >= lo); k_ref [N, D];
    ks_ref [1, N] f32 (if has_scale); out_ref [bq, N/128, 128] int32;
    scratch: best values / indices [bq, N/128, 128] and the tile's scores [bq, N/128, 128]."""
    if has_start:
        lo_ref, *rest = rest
    k_ref, *rest = rest
    if has_scale:
        ks_ref, out_ref, bv_ref, bi_ref, sc_ref = rest
    else:
        ks_ref = None
        out_ref, bv_ref, bi_ref, sc_ref = rest
    b, qb, kt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, hi, d = q_ref.shape
    rows = n // LANES
    shape = (bq, rows, LANES)

    @pl.when(kt == 0)
    def _init():
        bv_ref[...] = jnp.full(shape, -jnp.inf, jnp.float32)
        bi_ref[...] = jnp.full(shape, _NO_INDEX, jnp.int32)

    @pl.when(kt < tiles_ref[b * nq + qb])
    def _tile():
        q2 = q_ref[...].astype(cdtype).reshape(bq * hi, d)
        w = w_ref[...].astype(jnp.float32)
        prec = jax.lax.Precision.HIGHEST if cdtype == jnp.float32 else None
        for c in range(n // kc):
            kk = k_ref[pl.ds(c * kc, kc), :].astype(cdtype)
            logits = jax.lax.dot_general(q2, kk, (((1,), (1,)), ((), ())), precision=prec,
                                         preferred_element_type=jnp.float32)
            s = jnp.sum(jnp.maximum(logits, 0.0).reshape(bq, hi, kc) * w, axis=1)  # [bq, kc]
            if has_scale:
                s = s * ks_ref[:, pl.ds(c * kc, kc)]
            for u in range(kc // LANES):
                sc_ref[:, pl.ds(c * kc // LANES + u, 1), :] = (
                    s[:, u * LANES:(u + 1) * LANES][:, None, :])
        pos = (jax.lax.broadcasted_iota(jnp.int32, (1, rows, LANES), 1) * LANES
               + jax.lax.broadcasted_iota(jnp.int32, (1, rows, LANES), 2))
        key = kt * n + pos
        tv = sc_ref[...]
        ok = (key < lim_ref[...]) & (tv == tv)
        if has_start:
            ok = ok & (key >= lo_ref[...])
        tv = jnp.where(ok, tv, -jnp.inf)
        bv = bv_ref[...]
        worst = jnp.min(bv, axis=(1, 2), keepdims=True)  # N-th best; a later key must beat it

        @pl.when(jnp.any(tv > worst))
        def _merge():
            ti = jnp.broadcast_to(key, shape)
            sv, si = _bitonic_sort(tv, ti, pos, n, descending=False)
            bi = bi_ref[...]
            take = _better(sv, si, bv, bi)
            cv, ci = jnp.where(take, sv, bv), jnp.where(take, si, bi)
            cv, ci = _bitonic_merge(cv, ci, pos, n, descending=True)
            bv_ref[...] = cv
            bi_ref[...] = ci

    @pl.when(kt == pl.num_programs(2) - 1)
    def _out():
        out_ref[...] = jnp.where(bv_ref[...] == -jnp.inf, -1, bi_ref[...])


def _compute_dtype(q, k):
    if q.dtype == jnp.float32 or k.dtype == jnp.float32:
        return jnp.float32
    return jnp.bfloat16  # fp8 and bf16 upcast exactly; products are exact in fp32


@functools.partial(jax.jit, static_argnames=("topk", "block_q", "chunk", "interpret"))
def indexer_topk_tpu(q, k, weights, q_positions, k_scale=None, kv_lengths=None, q_starts=None, layer=None,
                     *, topk, block_q=8, chunk=512, interpret=False):
    """Top-k visible keys per query (TPU kernel).

    q: [B, T, Hi, D] (f32 / bf16 / float8_e4m3fn), k: [B, L, D] (f32 / bf16 / float8_e4m3fn),
    weights: [B, T, Hi] f32, q_positions: [B, T] int32, k_scale: [B, L] f32 or None,
    kv_lengths: [B] int32 or None, q_starts: [B, T] int32 or None (keys below it are
    invisible).  Returns int32 [B, T, min(topk, L)], descending score,
    ties by lower key index, -1 where no visible key is left.
    layer: None, or an int32 scalar: then k is [n, B, L, D] and k_scale [n, B, L], and the
    kernel reads layer ``layer`` of the stack in place: the layer is a scalar-prefetch operand
    of the key / key-scale index_maps, so only that layer's tiles are DMA'd (no [B, L, D] copy;
    except a short cache L < N, whose one layer is copied and padded to a tile).
    block_q: queries per block (multiple of 8, or >= T); chunk: keys per matmul (multiple
    of 128).  interpret: False, True, or a ``pltpu.InterpretParams``.
    """
    B, T, Hi, D = q.shape
    k, k_scale, layer = reference.stack_layer(k, k_scale, layer)   # k [nl, B, L, D]
    L = k.shape[2]
    K = min(topk, L)
    n = list_size(topk, L)
    kc = min(chunk, n)
    assert kc % LANES == 0 and n % kc == 0, (chunk, n)
    bq = T if T <= block_q else block_q
    assert bq == T or bq % 8 == 0, block_q
    nq = pl.cdiv(T, bq)

    # Pad heads to a multiple of 8 with zero weights (they add nothing to any score).
    hp = -(-Hi // 8) * 8
    w = weights.astype(jnp.float32)
    if hp != Hi:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - Hi), (0, 0)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, hp - Hi)))
    # Short caches (L < N): pad the layer's keys to one tile; the pad is invisible.
    if L < n:
        k = jnp.pad(jax.lax.dynamic_index_in_dim(k, layer, 0), ((0, 0), (0, 0), (0, n - L), (0, 0)))
        if k_scale is not None:
            k_scale = jnp.pad(jax.lax.dynamic_index_in_dim(k_scale, layer, 0), ((0, 0), (0, 0), (0, n - L)))
        layer = jnp.zeros((), jnp.int32)
    nk = pl.cdiv(max(L, n), n)

    lim = reference.visible_counts(q_positions, kv_lengths, L)           # [B, T]
    lim_pad = jnp.pad(lim, ((0, 0), (0, nq * bq - T)))
    tiles = pl.cdiv(jnp.max(lim_pad.reshape(B, nq, bq), axis=-1), n)     # [B, nq]
    tiles = jnp.minimum(tiles, nk).astype(jnp.int32).reshape(B * nq)

    def kv_map(b, qb, kt, tiles_ref, layer_ref):
        last = jnp.maximum(tiles_ref[b * nq + qb] - 1, 0)
        return layer_ref[0], b, jnp.minimum(kt, last), 0

    def ks_map(b, qb, kt, tiles_ref, layer_ref):
        lay, _, blk, _ = kv_map(b, qb, kt, tiles_ref, layer_ref)
        return lay, b, 0, blk

    def q_map(b, qb, kt, *_):
        return b, qb, 0, 0

    in_specs = [
        pl.BlockSpec((None, bq, hp, D), q_map),
        pl.BlockSpec((None, bq, hp, 1), q_map),
        pl.BlockSpec((None, bq, 1, 1), q_map),
    ]
    args = [q, w[..., None], lim[:, :, None, None]]
    if q_starts is not None:
        in_specs.append(pl.BlockSpec((None, bq, 1, 1), q_map))
        args.append(q_starts.astype(jnp.int32)[:, :, None, None])
    in_specs.append(pl.BlockSpec((None, None, n, D), kv_map))   # the stack itself, no copy
    args.append(k)
    if k_scale is not None:
        in_specs.append(pl.BlockSpec((None, None, 1, n), ks_map))
        args.append(k_scale.astype(jnp.float32)[:, :, None, :])
    rows = n // LANES
    kernel = functools.partial(_kernel, n=n, kc=kc, nq=nq, has_scale=k_scale is not None,
                               has_start=q_starts is not None, cdtype=_compute_dtype(q, k))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, T, rows, LANES), jnp.int32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, nq, nk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, bq, rows, LANES), lambda b, qb, kt, *_: (b, qb, 0, 0)),
            scratch_shapes=[pltpu.VMEM((bq, rows, LANES), jnp.float32),
                            pltpu.VMEM((bq, rows, LANES), jnp.int32),
                            pltpu.VMEM((bq, rows, LANES), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(tiles, layer.reshape(1), *args)
    return out.reshape(B, T, n)[:, :, :K]
