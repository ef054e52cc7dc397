"""Mosaic TPU kernels for token-level sparse MLA attention.

Contract (same as `reference.sparse_mla`):
    q [B, T, H, Dk], kv [B, L, Dk], indices [B, T, K] int32 (-1 = no key)
    -> out float32 [B, T, H, v_dim], lse float32 [B, T, H]
    logits = softmax_scale * q . kv[idx]; value = kv[idx, :v_dim].
`lse` is the natural-log log-sum-exp over the selected keys (-inf for a query with no
valid index; its output is zero). The backward pass recomputes the softmax from it.

Design. Queries are flattened to rows r = b*T + t. One grid step owns `rows_per_step`
consecutive rows and, for each row, walks its K indices in blocks of `block_k`:

  * the kv cache stays in HBM (`memory_space=pl.ANY`); the selected rows of one block
    are gathered with one `make_async_copy` per row into a VMEM buffer [2, block_k, Dk]
    (double-buffered: the DMAs of the next block -- possibly the first block of the
    next row -- are in flight while the current block is computed);
  * the per-row number of blocks up to the last valid index ("extent") is a
    scalar-prefetch operand (SMEM), so blocks of trailing -1 (T < K in prefill, short
    sequences in decode) are never fetched or computed; a row with no valid index
    still runs one all-masked block and writes zeros;
  * each row's index list is copied HBM -> SMEM scratch [2, Kp] by a DMA started one
    row ahead (the scalar DMA addresses are read from there), and the step's indices
    also arrive as a pipelined VMEM block [rows, 1, Kp] for the vector validity mask.
    SMEM thus holds two index lists (16 KiB at K = 2048), never the [B*T, K] table,
    which would not fit as a whole scalar-prefetch operand at prefill sizes. Slots
    holding -1 fetch row 0 instead (a valid address) and are masked to -inf, so no
    stale or uninitialised VMEM ever reaches the MXU;
  * logits [H, block_k] = q [H, Dk] x block^T on the MXU with f32 accumulation, online
    softmax in f32 VMEM scratch, p is cast to the kv dtype for the value product
    block[:, :v_dim] (bf16 p on bf16 caches, as in FlashMLA).

Two entry points share the kernel body and differ in blocking:
  * `sparse_mla_prefill_tpu`: a grid step = `block_q` consecutive query rows.
  * `sparse_mla_decode_tpu`: a grid step = `block_b` whole sequences (all of their few
    query tokens); the DMA pipeline runs across sequence boundaries, so a batch with
    ragged lengths (indices -1 past each length) is processed without bubbles and each
    sequence only pays for its own valid blocks.
A compact FP8 cache (compact.CompactKV: latent e4m3 [B, L, v_dim], float32 scales, rope) is
gathered the same way, one DMA per selected row from each of its three arrays, and each block is
dequantised in VMEM (latent * its scale per lane block, cast to rope's dtype) into a [block_k, Dk]
buffer before the same two matmuls: 656 bytes per selected row at the release's dims instead
of 1152.
Stacked caches (one per scanned decoder layer): with `layer` given, kv is [n, B, L, Dk] (compact:
[n, B, L, ...]) and the layer index is a second scalar-prefetch operand folded into each row DMA's
source address, kv_hbm.at[layer, b, row]: the kernel reads the selected rows of that layer and
nothing else (no [B, L, Dk] slice of the layer is ever formed). Without `layer` the cache is
viewed as a stack of one (a free reshape) at layer 0.
Both lower for TPU from any host; they run (and are tested) under the Pallas
interpreters. Not verified on TPU hardware: the final Mosaic compile and the speed of
one [1, Dk] DMA per selected row (1152 bytes at bf16; a cache laid out as
[B, L, 1, Dk], one tile per row, may be friendlier to the DMA engine).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_mla.compact import CompactKV

NEG_INF = float("-inf")


def _kernel(ext_ref, layer_ref, idx_v_ref, q_ref, idx_hbm, *refs, n_kv, seq_len, num_seqs, block_k,
            v_dim, softmax_scale):
    """One grid step: `rb` query rows.

    ext_ref [Rp] int32 (scalar prefetch, SMEM): blocks to visit per row (>= 1).
    layer_ref [1] int32 (scalar prefetch, SMEM): the layer of the stacked cache to read.
    idx_v_ref [rb, 1, Kp] int32 (VMEM block): the rows' indices, for the validity mask.
    q_ref [rb, H, Dk]; idx_hbm [Rp, Kp] int32 and the n_kv stacked cache arrays stay in HBM:
    kv [n, B, L, Dk] (n_kv = 1), or a compact cache's latent [n, B, L, v_dim] e4m3, scale
    [n, B, L, ns] f32 and rope [n, B, L, Dk - v_dim] (n_kv = 3).
    o_ref [rb, H, v_dim] f32, lse_ref [rb, 1, H] f32.
    Scratch: idx_smem [2, Kp] int32 (SMEM, one row's indices, double-buffered by row),
    isem DMA[2], per cache array a buffer [2, block_k, width] and DMA[2]; compact only: kbuf
    [block_k, Dk] (the block's dequantised rows); m_scr / l_scr [H, 1] f32, acc_scr [H, v_dim] f32.
    """
    kv_hbm = refs[:n_kv]
    o_ref, lse_ref, idx_smem, isem = refs[n_kv:n_kv + 4]
    bufs = refs[n_kv + 4:2 * n_kv + 4]
    sems = refs[2 * n_kv + 4:3 * n_kv + 4]
    rest = refs[3 * n_kv + 4:]
    kbuf = rest[0] if n_kv == 3 else None
    m_scr, l_scr, acc_scr = rest[-3:]
    rb = q_ref.shape[0]
    cd = bufs[0].dtype if kbuf is None else kbuf.dtype
    prec = lax.Precision.HIGHEST if cd == jnp.float32 else None          # f32: exact passes
    row0 = pl.program_id(0) * rb

    def idx_copy(i):
        """Copy of local row i's index list HBM -> SMEM slot i % 2."""
        return pltpu.make_async_copy(idx_hbm.at[row0 + i], idx_smem.at[lax.rem(i, 2)],
                                     isem.at[lax.rem(i, 2)])

    def fetch(i, j, slot):
        """Starts the block_k row copies (one per cache array) of block j of local row i into
        the buffers' slot."""
        b = jnp.minimum(lax.div(row0 + i, seq_len), num_seqs - 1)   # padded rows -> last seq
        layer = layer_ref[0]
        base = j * block_k
        islot = lax.rem(i, 2)

        def one(t, c):
            row = jnp.maximum(idx_smem[islot, base + t], 0)       # -1 -> row 0, masked
            for hbm, buf, sem in zip(kv_hbm, bufs, sems):
                pltpu.make_async_copy(hbm.at[layer, b, pl.ds(row, 1)], buf.at[slot, pl.ds(t, 1)],
                                      sem.at[slot]).start()
            return c

        lax.fori_loop(0, block_k, one, 0, unroll=8)

    def wait_block(slot):
        """Waits for the block_k row copies into the buffers' slot (same-sized descriptors)."""
        def one(t, c):
            for hbm, buf, sem in zip(kv_hbm, bufs, sems):
                pltpu.make_async_copy(hbm.at[0, 0, pl.ds(0, 1)], buf.at[slot, pl.ds(t, 1)],
                                      sem.at[slot]).wait()
            return c

        lax.fori_loop(0, block_k, one, 0, unroll=8)

    def keys(slot):
        """(keys [block_k, Dk], values [block_k, v_dim]) of the block in buffer slot `slot`:
        a compact block is dequantised into kbuf, one scale block (lane slice) at a time."""
        if kbuf is None:
            return bufs[0][slot], bufs[0][slot, :, pl.ds(0, v_dim)]
        lat, sc, rope = bufs
        ns = sc.shape[-1]
        blk = v_dim // ns
        for g in range(ns):
            part = lat[slot, :, pl.ds(g * blk, blk)].astype(jnp.float32) * sc[slot, :, pl.ds(g, 1)]
            kbuf[:, pl.ds(g * blk, blk)] = part.astype(cd)
        kbuf[:, pl.ds(v_dim, rope.shape[-1])] = rope[slot]
        return kbuf[...], kbuf[:, pl.ds(0, v_dim)]

    idx_copy(0).start()                                  # prologue
    idx_copy(0).wait()
    fetch(0, 0, 0)

    def row_body(i, n_done):
        n_blocks = ext_ref[row0 + i]

        @pl.when(i + 1 < rb)
        def _():
            idx_copy(i + 1).start()

        m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        q = q_ref[i]                                     # [H, Dk]

        def blk_body(j, n):
            slot = lax.rem(n, 2)

            @pl.when(j + 1 < n_blocks)
            def _():
                fetch(i, j + 1, 1 - slot)

            @pl.when(jnp.logical_and(j + 1 == n_blocks, i + 1 < rb))
            def _():
                idx_copy(i + 1).wait()
                fetch(i + 1, 0, 1 - slot)

            wait_block(slot)
            start = pl.multiple_of(j * block_k, block_k)
            valid = idx_v_ref[i, :, pl.ds(start, block_k)] >= 0          # [1, block_k]
            k_blk, v_blk = keys(slot)                                    # [block_k, Dk / v_dim]
            s = lax.dot_general(q, k_blk, (((1,), (1,)), ((), ())), precision=prec,
                                preferred_element_type=jnp.float32)      # [H, block_k]
            s = jnp.where(valid, s * softmax_scale, NEG_INF)
            m_prev = m_scr[...]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe)
            l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p.astype(v_blk.dtype), v_blk, (((1,), (0,)), ((), ())),
                                 precision=prec, preferred_element_type=jnp.float32)
            acc_scr[...] = alpha * acc_scr[...] + pv
            m_scr[...] = m_new
            return n + 1

        n_done = lax.fori_loop(0, n_blocks, blk_body, n_done)
        l = l_scr[...]
        has = l > 0.0
        l1 = jnp.where(has, l, 1.0)
        o_ref[i] = acc_scr[...] / l1
        lse = jnp.where(has, m_scr[...] + jnp.log(l1), NEG_INF)          # [H, 1]
        lse_ref[i] = lse.reshape(1, lse.shape[0])
        return n_done

    lax.fori_loop(0, rb, row_body, 0)


def _run(q, kv, indices, *, softmax_scale, v_dim, rows_per_step, block_k, interpret, layer=None):
    """Shared driver; kv [B, L, Dk] or a compact.CompactKV, or with `layer` (an int or int32
    scalar) a stacked one [n, B, L, ...]. Returns (out f32 [B, T, H, v_dim], lse f32 [B, T, H])."""
    B, T, H, Dk = q.shape
    K = indices.shape[-1]
    R = B * T
    rb = max(1, min(rows_per_step, R))
    Rp = pl.cdiv(R, rb) * rb
    Kp = pl.cdiv(K, block_k) * block_k
    q2 = q.reshape(R, H, Dk)
    idx2 = indices.reshape(R, K).astype(jnp.int32)
    idx2 = jnp.pad(idx2, ((0, Rp - R), (0, Kp - K)), constant_values=-1)
    if Rp != R:
        q2 = jnp.pad(q2, ((0, Rp - R), (0, 0), (0, 0)))
    pos = jnp.arange(1, Kp + 1, dtype=jnp.int32)
    last = jnp.max(jnp.where(idx2 >= 0, pos[None, :], 0), axis=1)
    ext = jnp.maximum((last + block_k - 1) // block_k, 1)                  # [Rp]
    arrays = [kv.latent, kv.scale, kv.rope] if isinstance(kv, CompactKV) else [kv]
    if layer is None:                                    # a stack of one layer (a free reshape)
        arrays, layer = [a[None] for a in arrays], 0
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    n_kv = len(arrays)
    kernel = functools.partial(_kernel, n_kv=n_kv, seq_len=T, num_seqs=B, block_k=block_k, v_dim=v_dim,
                               softmax_scale=float(softmax_scale))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(Rp // rb,),
        in_specs=[
            pl.BlockSpec((rb, 1, Kp), lambda s, ext, layer: (s, 0, 0)),
            pl.BlockSpec((rb, H, Dk), lambda s, ext, layer: (s, 0, 0)),
            any_spec,
        ] + [any_spec] * n_kv,
        out_specs=[
            pl.BlockSpec((rb, H, v_dim), lambda s, ext, layer: (s, 0, 0)),
            pl.BlockSpec((rb, 1, H), lambda s, ext, layer: (s, 0, 0)),
        ],
        scratch_shapes=[
            pltpu.SMEM((2, Kp), jnp.int32),
            pltpu.SemaphoreType.DMA((2,)),
        ] + [pltpu.VMEM((2, block_k, a.shape[-1]), a.dtype) for a in arrays]
          + [pltpu.SemaphoreType.DMA((2,)) for _ in arrays]
          + ([pltpu.VMEM((block_k, Dk), kv.dtype)] if n_kv > 1 else [])
          + [
            pltpu.VMEM((H, 1), jnp.float32),
            pltpu.VMEM((H, 1), jnp.float32),
            pltpu.VMEM((H, v_dim), jnp.float32),
        ],
    )
    row_bytes = sum(a.shape[-1] * jnp.dtype(a.dtype).itemsize for a in arrays)
    n_rows_gathered = R * Kp
    cost = pl.CostEstimate(
        flops=2 * R * H * Kp * (Dk + v_dim),
        transcendentals=R * H * Kp,
        bytes_accessed=(n_rows_gathered * row_bytes + q.size * q.dtype.itemsize
                        + R * H * (v_dim + 1) * 4 + idx2.size * 8),
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((Rp, H, v_dim), jnp.float32),
                   jax.ShapeDtypeStruct((Rp, 1, H), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=cost,
        interpret=interpret,
        name="sparse_mla_fwd_tpu",
    )(ext, layer, idx2.reshape(Rp, 1, Kp), q2, idx2, *arrays)
    return out[:R].reshape(B, T, H, v_dim), lse[:R, 0].reshape(B, T, H)


def sparse_mla_prefill_tpu(q, kv, indices, *, softmax_scale, v_dim, block_q=4, block_k=256,
                           interpret=False, layer=None):
    """Sparse MLA forward for prefill: a grid step = `block_q` queries of one sequence.

    q [B, T, H, Dk], kv [B, L, Dk], indices [B, T, K] int32 (-1 = none)
    -> (out f32 [B, T, H, v_dim], lse f32 [B, T, H]).
    block_k must be a multiple of 128 (lane-aligned index slices); K need not be a
    multiple of block_k (padded with -1). `interpret` is passed to pallas_call
    (True, False or a `pltpu.InterpretParams`). layer: None, or an int / int32 scalar with kv
    stacked [n, B, L, Dk] (compact: [n, B, L, ...]): attends to kv[layer] (scalar-prefetched).
    """
    return _run(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim, rows_per_step=block_q,
                block_k=block_k, interpret=interpret, layer=layer)


def sparse_mla_decode_tpu(q, kv, indices, *, softmax_scale, v_dim, block_b=4, block_k=256,
                          interpret=False, layer=None):
    """Sparse MLA forward for decode: a grid step = `block_b` sequences x all T queries.

    q [B, T, H, Dk] (T small: 1, or 2 with MTP), kv [B, L, Dk],
    indices [B, T, K] int32, -1 past each sequence's length (ragged batch)
    -> (out f32 [B, T, H, v_dim], lse f32 [B, T, H]).
    The batch is padded to a multiple of block_b with empty rows. layer: as for prefill.
    """
    T = q.shape[1]
    return _run(q, kv, indices, softmax_scale=softmax_scale, v_dim=v_dim,
                rows_per_step=max(1, block_b) * T, block_k=block_k, interpret=interpret, layer=layer)
