"""Indexer top-k kernels (TPU Mosaic and GPU Triton) against the plain-jnp reference.

The kernels run in Pallas interpret mode on CPU (``interpret=True`` at moderate sizes,
``pltpu.InterpretParams()`` only at a tiny size), plus one lowering test per kernel for
its real platform at realistic shapes (Hi=64, D=128, topk=2048, L=8192).

Selections are compared tie-aware: the kernels sum in a different order than the
reference, so two keys whose scores agree to within the rounding bound may legitimately
swap places at the k-th slot.  See ``_check`` for the rules and the tolerance.
"""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.indexer_topk import api, gpu, reference, tpu

F8 = jnp.float8_e4m3fn
BACKENDS = ("tpu", "gpu")


# ------------------------------------------------------------------------------ inputs
def _act_quant(x):
    """Per-vector e4m3 quantisation with a power-of-two scale (the ue8m0 act_quant):
    x [..., D] f32 -> (x8 [..., D] float8_e4m3fn, scale [...] f32)."""
    amax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), 1e-4)
    s = jnp.exp2(jnp.ceil(jnp.log2(amax * (1.0 / 448.0))))
    x8 = jnp.clip(x / s[..., None], -448.0, 448.0).astype(F8)
    return x8, s


def _make(seed, *, B, T, Hi, D, L, q_dtype=jnp.bfloat16, k_dtype=jnp.bfloat16):
    """Random q [B,T,Hi,D], k [B,L,D], weights [B,T,Hi] (both signs), k_scale [B,L] | None."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, Hi, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((B, T, Hi)), jnp.float32) * Hi ** -0.5
    if q_dtype == F8:
        q, qs = _act_quant(q)
        w = w * qs  # the per-head q scale is folded into the weights
    else:
        q = q.astype(q_dtype)
    k_scale = None
    if k_dtype == F8:
        k, k_scale = _act_quant(k)
    else:
        k = k.astype(k_dtype)
    return q, k, w, k_scale


def _make_exact(seed, *, B, T, Hi, D, L, q_dtype, k_dtype):
    """Inputs whose scores are exact in fp32 in any summation order: q, k integers in
    [-3, 3] (exact in bf16 and e4m3), weights multiples of 1/16 in [-2, 2], k_scale powers
    of two (FP8 keys only).  Every partial sum is a multiple of 1/16 below 2^20 in
    magnitude (64 heads * 2 * 128 * 9), well inside fp32's 24-bit significand."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.integers(-3, 4, (B, T, Hi, D)), jnp.float32).astype(q_dtype)
    k = jnp.asarray(rng.integers(-3, 4, (B, L, D)), jnp.float32).astype(k_dtype)
    w = jnp.asarray(rng.integers(-32, 33, (B, T, Hi)) / 16.0, jnp.float32)
    ks = None
    if k_dtype == F8:
        ks = jnp.asarray(2.0 ** rng.integers(-3, 4, (B, L)), jnp.float32)
    return q, k, w, ks


# ----------------------------------------------------------------------- tie-aware check
def _check(out, q, k, w, *, topk, q_positions, k_scale, kv_lengths, min_strict=0.8, q_starts=None):
    """Compare a kernel's selection with the reference.  Returns the number of rows on which
    the exact-set check ran.

    Per query row, with c = min(K, #visible) and the reference scores I (fp32, HIGHEST):
      * the first c slots are distinct visible keys and the remaining K - c slots are -1
        (so the -1 count matches the reference);
      * every selected key scores >= (c-th best reference score) - tol;
      * if the c-th and (c+1)-th best scores differ by more than tol (no near-tie at the
        boundary), or all visible keys fit, the set equals the reference's exactly.
    tol: products of bf16/fp8 (or f32 at HIGHEST) values are exact or one rounding in
    fp32, so the kernel and the reference differ only by summation order over D (dot)
    and Hi (head sum) plus the k_scale product.  Recursive summation of n terms errs by at
    most n*u*sum|terms| (u = 2^-24) for each of the two, so
    tol = 2 * (D + Hi + 2) * u * M with M = max_s k_scale * sum_h |w| * sum_d |q k|.
    It is a worst-case bound (real differences are ~100x smaller) and still far below
    the typical gap between neighbouring scores of random inputs, as ``min_strict``
    asserts: at least that fraction of the selecting rows must get the exact check.
    """
    out = np.asarray(out)
    B, T, Hi, D = q.shape
    L = k.shape[1]
    K = min(topk, L)
    assert out.shape == (B, T, K) and out.dtype == np.int32
    ref = np.asarray(reference.indexer_topk(q, k, w, topk=topk, q_positions=q_positions,
                                            k_scale=k_scale, kv_lengths=kv_lengths, q_starts=q_starts))
    scores = np.asarray(reference.indexer_scores(q, k, w, q_positions=q_positions,
                                                 k_scale=k_scale, kv_lengths=kv_lengths,
                                                 q_starts=q_starts))
    qf, kf = np.asarray(q.astype(jnp.float32)), np.asarray(k.astype(jnp.float32))
    absdot = np.einsum("bthd,bsd->bths", np.abs(qf), np.abs(kf))
    mag = np.einsum("bths,bth->bts", absdot, np.abs(np.asarray(w)))
    if k_scale is not None:
        mag = mag * np.asarray(k_scale)[:, None, :]
    tol = 2 * (D + Hi + 2) * 2.0 ** -24 * mag.max(axis=-1)  # [B, T]

    strict = selecting = 0
    for b in range(B):
        for t in range(T):
            row, s = out[b, t], scores[b, t]
            vis = np.isfinite(s)
            c = min(K, int(vis.sum()))
            assert (ref[b, t] == -1).sum() == K - c
            assert np.all(row[c:] == -1), (b, t, row)
            sel = row[:c]
            assert np.all((sel >= 0) & (sel < L)), (b, t, sel)
            assert len(np.unique(sel)) == c, (b, t, "duplicate index")
            assert np.all(vis[sel]), (b, t, "invisible key selected")
            if c == 0:
                continue
            order = np.sort(s[vis])[::-1]
            kth = order[c - 1]
            assert np.all(s[sel] >= kth - tol[b, t]), (b, t, s[sel].min(), kth, tol[b, t])
            if c < vis.sum():
                selecting += 1
                if order[c - 1] - order[c] <= tol[b, t]:
                    continue  # near-tie at the boundary: either key is a valid answer
            strict += 1
            assert set(sel.tolist()) == set(ref[b, t, :c].tolist()), (b, t)
    assert strict >= min_strict * B * T, (strict, B * T)
    return strict, selecting


def _run(backend, q, k, w, *, topk, q_positions, k_scale=None, kv_lengths=None, q_starts=None, **opts):
    return api.indexer_topk(q, k, w, topk=topk, q_positions=q_positions, k_scale=k_scale,
                            kv_lengths=kv_lengths, q_starts=q_starts, impl="interpret", backend=backend,
                            **opts)


# ---------------------------------------------------------------------- numerics tests
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_causal_bf16_selects(backend):
    """Causal prefill, bf16 q/k, no k_scale, T not a multiple of the query block, L not a
    multiple of the key tile (N = 128), queries with fewer and more visible keys than topk."""
    B, T, Hi, D, topk = 2, 300, 16, 64, 100
    q, k, w, _ = _make(0, B=B, T=T, Hi=Hi, D=D, L=T)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = _run(backend, q, k, w, topk=topk, q_positions=pos)
    strict, selecting = _check(out, q, k, w, topk=topk, q_positions=pos, k_scale=None,
                               kv_lengths=None)
    assert selecting >= 0.6 * B * T  # queries t >= topk really select


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_packed_segments(backend):
    """Packed rows: q_starts (first slot of each query's segment) hides earlier segments.
    Segments of 20..170 keys, some shorter and some longer than topk = 48, a boundary inside a
    key tile and one on a tile edge (128); the selection must equal the reference and never
    leave the query's segment."""
    B, T, Hi, D, topk = 2, 300, 8, 32, 48
    q, k, w, _ = _make(7, B=B, T=T, Hi=Hi, D=D, L=T)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    bounds = [(0, 20, 128, 298), (0, 170, 250)]            # segment starts per row
    starts = np.zeros((B, T), np.int32)
    for b, bs in enumerate(bounds):
        for s0 in bs:
            starts[b, s0:] = s0
    starts = jnp.asarray(starts)
    opts = {"nsplit": 2, "min_tiles_per_split": 1} if backend == "gpu" else {"block_q": 16}
    out = _run(backend, q, k, w, topk=topk, q_positions=pos, q_starts=starts, **opts)
    o = np.asarray(out)
    lo, hi = np.asarray(starts)[..., None], np.asarray(pos)[..., None]
    assert np.all((o == -1) | ((o >= lo) & (o <= hi)))
    _, selecting = _check(out, q, k, w, topk=topk, q_positions=pos, k_scale=None, kv_lengths=None,
                          q_starts=starts)
    assert selecting >= 0.5 * B * T


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_fewer_keys_than_topk(backend):
    """T = L = 40 < topk = 64: K = min(topk, L) = 40 slots, query t keeps all t+1 keys,
    the rest are -1 (the -1 count per row is checked)."""
    B, T, Hi, D, topk = 2, 40, 16, 32, 64
    q, k, w, _ = _make(1, B=B, T=T, Hi=Hi, D=D, L=T)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = _run(backend, q, k, w, topk=topk, q_positions=pos)
    assert out.shape == (B, T, T)
    assert int((np.asarray(out) == -1).sum()) == B * (T * T - T * (T + 1) // 2)
    _check(out, q, k, w, topk=topk, q_positions=pos, k_scale=None, kv_lengths=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, F8])
def test_decode_fp8_keys_ragged(backend, q_dtype):
    """Decode: T=1 per sequence, q_positions = kv_lengths - 1, ragged kv_lengths across a
    batch of 4 (one shorter than topk -> -1 slots, one empty -> all -1), FP8 keys with a
    per-token fp32 scale, bf16 or FP8 queries, L = 1000 not a multiple of the tile."""
    B, T, Hi, D, L, topk = 4, 1, 32, 64, 1000, 128
    q, k, w, ks = _make(2, B=B, T=T, Hi=Hi, D=D, L=L, q_dtype=q_dtype, k_dtype=F8)
    kvl = jnp.array([1000, 37, 613, 0], jnp.int32)
    pos = (kvl - 1)[:, None]
    out = _run(backend, q, k, w, topk=topk, q_positions=pos, k_scale=ks, kv_lengths=kvl)
    assert np.all(np.asarray(out)[3] == -1)
    assert int((np.asarray(out)[1] == -1).sum()) == topk - 37
    _check(out, q, k, w, topk=topk, q_positions=pos, k_scale=ks, kv_lengths=kvl,
           min_strict=0.75)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(jnp.float32, jnp.float32), (F8, F8)])
def test_multi_query_decode_real_topk_exact(backend, dtypes):
    """topk = 2048 (N = 2048: the full-size sorting network), Hi = 64, D = 128, three
    speculative queries per sequence at the end of ragged caches, batch 2; f32, or FP8 q
    and k with power-of-two k_scale.  The inputs are small integers and dyadic weights, so
    every score is exact in fp32 whatever the summation order: the kernels must reproduce
    the reference element for element, including its many exact ties (lower index first).
    """
    B, T, Hi, D, L, topk = 2, 3, 64, 128, 4500, 2048
    q, k, w, ks = _make_exact(3, B=B, T=T, Hi=Hi, D=D, L=L, q_dtype=dtypes[0],
                              k_dtype=dtypes[1])
    kvl = jnp.array([4500, 2600], jnp.int32)
    pos = kvl[:, None] - 3 + jnp.arange(3, dtype=jnp.int32)[None, :]
    out = _run(backend, q, k, w, topk=topk, q_positions=pos, k_scale=ks, kv_lengths=kvl)
    ref = reference.indexer_topk(q, k, w, topk=topk, q_positions=pos, k_scale=ks,
                                 kv_lengths=kvl)
    # The check is meaningful only if ties exist: count rows with duplicate visible scores.
    scores = np.asarray(reference.indexer_scores(q, k, w, q_positions=pos, k_scale=ks,
                                                 kv_lengths=kvl))
    tied_rows = sum(len(np.unique(r[np.isfinite(r)])) < np.isfinite(r).sum()
                    for r in scores.reshape(B * T, L))
    assert tied_rows == B * T
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_chunk_with_offset_fp8(backend):
    """A prefill chunk whose queries sit at positions 500..563 of a 700-key cache (causal
    within the chunk, later cache entries invisible), FP8 q and k, batch 2 with different
    kv_lengths, several key tiles and query blocks, options that force >1 GPU split."""
    B, T, Hi, D, L, topk = 2, 64, 16, 32, 700, 128
    q, k, w, ks = _make(4, B=B, T=T, Hi=Hi, D=D, L=L, q_dtype=F8, k_dtype=F8)
    kvl = jnp.array([700, 540], jnp.int32)
    pos = jnp.broadcast_to(500 + jnp.arange(T, dtype=jnp.int32), (B, T))
    opts = {"nsplit": 3, "min_tiles_per_split": 1} if backend == "gpu" else {"block_q": 16}
    out = _run(backend, q, k, w, topk=topk, q_positions=pos, k_scale=ks, kv_lengths=kvl,
               **opts)
    _check(out, q, k, w, topk=topk, q_positions=pos, k_scale=ks, kv_lengths=kvl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_lower_index_first(backend):
    """Exact ties: every other key is the zero vector (score exactly 0 in any summation
    order) and the weights are positive, so the other keys score > 0 and the zeros fill
    the remaining slots.  The kernels break ties towards the lower index like the
    reference, so the output must equal the reference element for element."""
    B, T, Hi, D, L, topk = 1, 4, 16, 32, 600, 400
    q, k, _, _ = _make(5, B=B, T=T, Hi=Hi, D=D, L=L)
    k = k.at[:, ::2].set(0)
    w = jnp.abs(jnp.asarray(np.random.default_rng(6).standard_normal((B, T, Hi)),
                            jnp.float32)) + 0.1
    pos = jnp.array([[599, 599, 450, 300]], jnp.int32)
    out = _run(backend, q, k, w, topk=topk, q_positions=pos)
    ref = reference.indexer_topk(q, k, w, topk=topk, q_positions=pos)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_tpu_kernel_tpu_interpreter_tiny():
    """The TPU kernel under the TPU-semantics interpreter (uninitialised memory is NaN,
    out-of-bounds and race checks): partial query block (T=9, block 8), partial key tile
    (L=300, N=128), FP8 keys with scales, ragged kv_lengths."""
    B, T, Hi, D, L, topk = 2, 9, 8, 32, 300, 64
    q, k, w, ks = _make(7, B=B, T=T, Hi=Hi, D=D, L=L, q_dtype=jnp.float32, k_dtype=F8)
    kvl = jnp.array([300, 140], jnp.int32)
    pos = jnp.asarray(np.random.default_rng(8).integers(0, 300, (B, T)), jnp.int32)
    out = tpu.indexer_topk_tpu(q, k, w, pos, ks, kvl, topk=topk,
                               interpret=pltpu.InterpretParams(detect_races=True))
    _check(out, q, k, w, topk=topk, q_positions=pos, k_scale=ks, kv_lengths=kvl)


# --------------------------------------------------------------------------- dispatch
def test_api_dispatch():
    B, T, Hi, D, L, topk = 1, 2, 8, 32, 200, 16
    q, k, w, _ = _make(9, B=B, T=T, Hi=Hi, D=D, L=L)
    pos = jnp.array([[150, 199]], jnp.int32)
    ref = api.indexer_topk(q, k, w, topk=topk, q_positions=pos, impl="reference")
    if jax.default_backend() == "cpu":
        auto = api.indexer_topk(q, k, w, topk=topk, q_positions=pos, impl="auto")
        np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
        with pytest.raises(ValueError, match="interpret"):
            api.indexer_topk(q, k, w, topk=topk, q_positions=pos, impl="pallas")
    interp = api.indexer_topk(q, k, w, topk=topk, q_positions=pos, impl="interpret")
    _check(interp, q, k, w, topk=topk, q_positions=pos, k_scale=None, kv_lengths=None)
    with pytest.raises(ValueError, match="unknown impl"):
        api.indexer_topk(q, k, w, topk=topk, q_positions=pos, impl="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        api.indexer_topk(q, k, w, topk=topk, q_positions=pos, impl="interpret", backend="x")


# --------------------------------------------------------------------------- lowering
def _realistic_args(B, T, *, fp8):
    Hi, D, L = 64, 128, 8192
    kd = F8 if fp8 else jnp.bfloat16
    return (jax.ShapeDtypeStruct((B, T, Hi, D), kd), jax.ShapeDtypeStruct((B, L, D), kd),
            jax.ShapeDtypeStruct((B, T, Hi), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32),
            jax.ShapeDtypeStruct((B, L), jnp.float32) if fp8 else None,
            jax.ShapeDtypeStruct((B,), jnp.int32))


@pytest.mark.parametrize("B,T,fp8", [(4, 1, True), (1, 256, True), (2, 2, False)])
@pytest.mark.parametrize("segments", [False, True])
def test_tpu_lowering_realistic(B, T, fp8, segments):
    """Pallas -> Mosaic lowering of the TPU kernel (no TPU needed): Hi=64, D=128,
    topk=2048, L=8192, decode and prefill, FP8 keys with scales or bf16 keys, with and
    without per-query segment starts."""
    def f(q, k, w, pos, ks, kvl):
        return tpu.indexer_topk_tpu(q, k, w, pos, ks, kvl, pos // 2 if segments else None, topk=2048)
    text = jax.jit(f).trace(*_realistic_args(B, T, fp8=fp8)).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("B,T,fp8", [(8, 1, True), (1, 256, True), (2, 2, False)])
@pytest.mark.parametrize("segments", [False, True])
def test_gpu_lowering_realistic(B, T, fp8, segments):
    """Pallas -> Triton lowering of the GPU kernel(s) for cuda (no GPU needed): Hi=64,
    D=128, topk=2048, L=8192; decode uses the split + merge path, prefill one split; with
    and without per-query segment starts."""
    def f(q, k, w, pos, ks, kvl):
        return gpu.indexer_topk_gpu(q, k, w, pos, ks, kvl, pos // 2 if segments else None, topk=2048,
                                    min_tiles_per_split=1)
    text = jax.jit(f).trace(*_realistic_args(B, T, fp8=fp8)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
    assert "mosaic_gpu" not in text


# ------------------------------------------------------------------ layer-stacked keys
# The model keeps one cache per scanned stack of layers, k [n, B, L, D]; with `layer` the op
# must score k[layer] (identical indices: the same code runs on the stacked and the sliced keys)
# without copying that layer out first.
LAYER_IMPLS = [("reference", None), ("xla", None), ("xla", "tpu"), ("xla", "gpu"),
               ("interpret", "tpu"), ("interpret", "gpu")]


def _stacked(seed, *, n, B, T, Hi, D, L, fp8):
    """n layers of different random keys: q [B,T,Hi,D], k [n,B,L,D], w [B,T,Hi], k_scale [n,B,L] | None."""
    kd = F8 if fp8 else jnp.bfloat16
    q, _, w, _ = _make(seed, B=B, T=T, Hi=Hi, D=D, L=L, q_dtype=kd, k_dtype=kd)
    ks = [_make(seed + 1 + i, B=B, T=1, Hi=1, D=D, L=L, k_dtype=kd) for i in range(n)]
    k = jnp.stack([x[1] for x in ks])
    k_scale = jnp.stack([x[3] for x in ks]) if fp8 else None
    return q, k, w, k_scale


def _layer_case(impl, backend, fp8):
    """Inputs and options of test_layer_of_stacked_keys_equals_sliced (see there)."""
    n, B, T, Hi, D, L, topk = 3, 2, 2, 8, (32 if fp8 else 24), (200 if fp8 else 100), 16
    q, k, w, ks = _stacked(11, n=n, B=B, T=T, Hi=Hi, D=D, L=L, fp8=fp8)
    if fp8:
        pos = jnp.array([[150, 199], [8, 9]], jnp.int32)
        kw = {"kv_lengths": jnp.array([200, 10], jnp.int32), "q_starts": jnp.array([[0, 70], [0, 0]], jnp.int32)}
    else:
        pos = jnp.array([[60, 99], [40, 41]], jnp.int32)
        kw = {"q_starts": jnp.array([[0, 50], [30, 30]], jnp.int32)}
    if impl == "xla" and backend is not None:
        kw["key_chunk"] = 128 if L > 128 else 64            # several chunks, the last overlapping
    return q, k, w, ks, dict(topk=topk, q_positions=pos, impl=impl, backend=backend, **kw)


# The kernels in interpret mode cost ~5-9 s of compilation per call shape on CPU: they run the
# FP8 case only (their layer-independent branches are covered by the tests above).
@pytest.mark.parametrize("impl,backend,fp8", [(i, b, f) for i, b in LAYER_IMPLS for f in (True, False)
                                              if i != "interpret" or f])
def test_layer_of_stacked_keys_equals_sliced(impl, backend, fp8):
    """A traced layer index into n = 3 stacked key layers (different contents) under jax.jit gives
    exactly the indices of the same op on k[layer] (k_scale[layer]) for layers 1 and 2, batch 2.
    fp8: FP8 keys with k_scale, ragged kv_lengths (row 1's queries see 9 and 10 < topk keys: -1 slots),
    q_starts, L = 200 (not a multiple of the 128-key tile). bf16: no k_scale, packed-segment
    q_starts, L = 100, D = 24. The xla accelerator form runs key chunks (the last overlapping)."""
    q, k, w, ks, opts = _layer_case(impl, backend, fp8)
    stacked = jax.jit(lambda k, ks, layer: api.indexer_topk(q, k, w, k_scale=ks, layer=layer, **opts))
    sliced = jax.jit(lambda k, ks: api.indexer_topk(q, k, w, k_scale=ks, **opts))
    outs = []
    for layer in (1, 2):
        got = np.asarray(stacked(k, ks, jnp.int32(layer)))
        want = np.asarray(sliced(k[layer], None if ks is None else ks[layer]))
        np.testing.assert_array_equal(got, want)
        outs.append(got)
    # the layers' selections differ, so ignoring `layer` (layer 0) or an off-by-one fails above
    assert not np.array_equal(outs[0], outs[1])
    if fp8:
        row = outs[0][1]                                 # 9 and 10 visible keys < topk: -1 slots
        assert np.all(row[0, 9:] == -1) and np.all(row[0, :9] >= 0)
        assert np.all(row[1, 10:] == -1) and np.all(row[1, :10] >= 0)
    # and the selection is the plain-jnp reference's on that layer (random scores, no near-ties)
    ref = reference.indexer_topk(q, k[2], w, k_scale=None if ks is None else ks[2], topk=opts["topk"],
                                 q_positions=opts["q_positions"], kv_lengths=opts.get("kv_lengths"),
                                 q_starts=opts.get("q_starts"))
    np.testing.assert_array_equal(np.sort(outs[1], -1), np.sort(np.asarray(ref), -1))


def test_layer_reference_key_chunks():
    """The reference's key-chunk form (L > 2 * KEY_CHUNK, T >= 16) on stacked keys: bf16 keys (the
    layer copied once through the integer view) and float32 keys (sliced per chunk from the
    stack), L = 2100 (the last chunk overlaps): the same scores as on k[layer], and the scores of
    the first and last query equal the unchunked form's (T = 1 calls; per-key sums do not depend
    on the chunking, up to the matmul's blocking: 1e-6 relative)."""
    n, B, T, Hi, D, L = 3, 1, 16, 2, 16, 2100
    assert L > 2 * reference.KEY_CHUNK
    q, k, w, _ = _stacked(21, n=n, B=B, T=T, Hi=Hi, D=D, L=L, fp8=False)
    pos = jnp.broadcast_to(jnp.arange(L - T, L, dtype=jnp.int32), (B, T))
    scores = jax.jit(lambda q, kk, w, pos, layer: reference.indexer_scores(q, kk, w, q_positions=pos, layer=layer))
    for kd in (jnp.bfloat16, jnp.float32):
        kk = k.astype(kd)
        got = np.asarray(scores(q, kk, w, pos, jnp.int32(1)))
        np.testing.assert_array_equal(got, np.asarray(scores(q, kk[1], w, pos, None)))
        one = np.asarray(scores(q[:, ::T - 1].reshape(2, 1, Hi, D), jnp.concatenate([kk[1]] * 2),
                                w[:, ::T - 1].reshape(2, 1, Hi), pos[:, ::T - 1].reshape(2, 1), None))
        np.testing.assert_allclose(got[:, ::T - 1], one.reshape(1, 2, L), rtol=1e-6, atol=1e-6)


def test_layer_validation():
    """Keys and `layer` that disagree are a ValueError naming layer / k and the shapes."""
    q, k, w, ks = _stacked(31, n=2, B=1, T=1, Hi=8, D=16, L=40, fp8=True)
    pos = jnp.array([[39]], jnp.int32)
    call = lambda k, ks=None, layer=None: api.indexer_topk(q, k, w, topk=8, q_positions=pos, k_scale=ks,
                                                           layer=layer)
    with pytest.raises(ValueError, match=r"layer=1 needs k stacked.*\(1, 40, 16\)"):
        call(k[0], ks[0], 1)
    with pytest.raises(ValueError, match=r"k has shape \(2, 1, 40, 16\).*layer is None"):
        call(k, ks)
    with pytest.raises(ValueError, match=r"k_scale of shape \(1, 40\).*\(2, 1, 40\)"):
        call(k, ks[0], 0)
    with pytest.raises(ValueError, match=r"layer=2 out of range"):
        call(k, ks, 2)
    with pytest.raises(ValueError, match=r"layer must be a scalar"):
        call(k, ks, jnp.array([0], jnp.int32))
    with pytest.raises(ValueError, match=r"layer must be an int"):
        call(k, ks, 0.0)
    f = jax.jit(lambda k, ks, layer: api.indexer_topk(q, k, w, topk=8, q_positions=pos, k_scale=ks, layer=layer))
    np.testing.assert_array_equal(np.asarray(f(k, ks, 1)), np.asarray(f(k[1], ks[1], None)))


def _walk(jaxpr, fn):
    for eqn in jaxpr.eqns:
        fn(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _walk(sub, fn)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (set by tests/conftest.py)")
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("fp8", [True, False])
def test_layer_lowering_under_shard_map(platform, fp8):
    """Decode at realistic sizes (Hi=64, D=128, topk=2048, L=8192, n=4 layers, FP8 keys + scales or
    bf16 keys without, B=8 split over the 8 host devices) with a traced layer, inside shard_map
    (check_vma=False): keys P(None, batch, None, None), k_scale P(None, batch, None), layer P().
    The jaxpr's pallas_call takes the per-device stack [n, 1, L, D] itself (no [1, L, D] slice
    anywhere), and it lowers."""
    n, B, T, Hi, D, L = 4, 8, 1, 64, 128, 8192
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))
    bx = ("data", "expert")
    backend = "tpu" if platform == "tpu" else "gpu"

    def local(q, k, w, pos, ks, kvl, layer):
        return api.indexer_topk(q, k, w, topk=2048, q_positions=pos, k_scale=ks, kv_lengths=kvl,
                                impl="pallas", backend=backend, layer=layer)

    f = jax.shard_map(local, mesh=mesh, check_vma=False,
                      in_specs=(P(bx), P(None, bx, None, None), P(bx), P(bx),
                                None if not fp8 else P(None, bx, None), P(bx), P()),
                      out_specs=P(bx))
    kd = F8 if fp8 else jnp.bfloat16
    args = (jax.ShapeDtypeStruct((B, T, Hi, D), kd), jax.ShapeDtypeStruct((n, B, L, D), kd),
            jax.ShapeDtypeStruct((B, T, Hi), jnp.float32), jax.ShapeDtypeStruct((B, T), jnp.int32),
            jax.ShapeDtypeStruct((n, B, L), jnp.float32) if fp8 else None, jax.ShapeDtypeStruct((B,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
    traced = jax.jit(f).trace(*args)
    calls, shapes = [], set()

    def visit(eqn):
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        if eqn.primitive.name == "pallas_call":
            calls.append([tuple(v.aval.shape) for v in eqn.invars])

    _walk(traced.jaxpr.jaxpr, visit)
    assert calls and any((n, 1, L, D) in c for c in calls), calls
    assert not shapes & {(1, L, D), (1, 1, L, D), (L, D)}, shapes & {(1, L, D), (1, 1, L, D), (L, D)}
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
    assert "sdy.manual_computation" in text
