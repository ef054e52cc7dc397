"""Sparse MLA attention kernels (TPU Mosaic and GPU Triton) against the jnp reference.

Every kernel runs for real in Pallas interpret mode on the CPU (`interpret=True`, the
HLO interpreter, at moderate sizes; `pltpu.InterpretParams`, the TPU-semantics
interpreter with race detection and NaN-filled uninitialised memory, at tiny sizes),
and is lowered for its real platform at the real sizes of DeepSeek-V3.2
(H=128, Dk=576, v_dim=512, K=2048, L=8192) without a device.

Tolerances:
  * f32 inputs: the kernels do the same f32 arithmetic as the reference (the dots
    run at HIGHEST precision on the CPU, see conftest.py) but accumulate the softmax
    online, block by block, so sums are reordered: errors are a few ulps times the
    number of blocks, measured <= 1e-5; we allow atol = rtol = 1e-4.
  * bf16 inputs: q . k is exact in f32 as in the reference (bf16 x bf16 products fit
    in f32), but the kernels cast the probabilities p to bf16 for the value product
    (as FlashMLA does). A relative error of 2^-9 on each p gives an output error of at
    most ~2^-9 * max|v| ~ 1e-2 for N(0, 1) values (measured ~4e-3); we allow 3e-2.
  * gradients (f32): the backward recomputes p from the saved lse in f32; measured
    relative errors ~1e-5 against jax.grad of the reference; we allow 1e-4 relative to
    the gradient's max magnitude (bf16: 3e-2, from the bf16 p of the forward output
    that enters delta = sum(dout * out)).
"""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_mla import api, gpu, reference, tpu
from pallas_kernels.sparse_mla.compact import CompactKV
from pallas_kernels.sparse_mla.vjp import sparse_mla_blockwise, sparse_mla_bwd

SCALE = 0.13523378  # DeepSeek-V3.2 softmax scale


def _inputs(seed, B, T, H, L, K, dtype, Dk=576, neg_frac=0.2):
    """Random q, kv and indices with a fraction of -1 slots scattered anywhere."""
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (B, T, H, Dk), jnp.float32).astype(dtype)
    kv = jax.random.normal(k[1], (B, L, Dk), jnp.float32).astype(dtype)
    idx = jax.random.randint(k[2], (B, T, K), 0, L, jnp.int32)
    drop = jax.random.uniform(k[3], (B, T, K)) < neg_frac
    return q, kv, jnp.where(drop, -1, idx)


def _causal_indices(B, T, L, K, seed=0):
    """Prefill-like selection at the start of a sequence (T < K): query t sees keys
    0..t, picks min(K, t+1) of them in random order, the rest of its K slots are -1."""
    rng = np.random.default_rng(seed)
    idx = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t in range(T):
            n = min(K, t + 1)
            idx[b, t, :n] = rng.permutation(t + 1)[:n]
    assert L >= T
    return jnp.asarray(idx)


def _ragged_decode_indices(lengths, T, K, seed=0):
    """Decode selection for a ragged batch: sequence b of length n_b selects
    min(K, n_b) distinct keys < n_b, slots past that are -1 (all -1 when n_b = 0)."""
    rng = np.random.default_rng(seed)
    idx = np.full((len(lengths), T, K), -1, np.int32)
    for b, n in enumerate(lengths):
        for t in range(T):
            m = min(K, n)
            idx[b, t, :m] = rng.permutation(n)[:m]
    return jnp.asarray(idx)


def _ref(q, kv, idx, v_dim=512):
    return reference.sparse_mla(q, kv, idx, softmax_scale=SCALE, v_dim=v_dim)


def _tol(dtype):
    return 1e-4 if dtype == jnp.float32 else 3e-2


KERNELS = {
    "tpu_prefill": functools.partial(tpu.sparse_mla_prefill_tpu, block_q=3, block_k=128),
    "tpu_decode": functools.partial(tpu.sparse_mla_decode_tpu, block_b=2, block_k=128),
    "gpu_prefill": functools.partial(gpu.sparse_mla_prefill_gpu, block_h=8, block_k=64),
    "gpu_decode": functools.partial(gpu.sparse_mla_decode_gpu, block_h=16, block_k=32,
                                    num_splits=3),
}


def _run(name, q, kv, idx, v_dim=512, **kw):
    return jax.jit(lambda a, b, c: KERNELS[name](a, b, c, softmax_scale=SCALE, v_dim=v_dim,
                                                 interpret=True, **kw))(q, kv, idx)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_random_indices(name, dtype):
    # K = 300 is not a multiple of the TPU (128) or GPU (64 / 32) block; -1 anywhere;
    # batch row (1, 2) has no valid index at all -> zeros.
    q, kv, idx = _inputs(1, B=2, T=5, H=16, L=700, K=300, dtype=dtype)
    idx = idx.at[1, 2].set(-1)
    out, lse = _run(name, q, kv, idx)
    ref = _ref(q, kv, idx)
    assert out.shape == (2, 5, 16, 512) and out.dtype == jnp.float32
    tol = _tol(dtype)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)
    assert np.all(np.asarray(out[1, 2]) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse[1, 2])))


@pytest.mark.parametrize("name", ["tpu_prefill", "gpu_prefill"])
def test_prefill_causal_start_t_lt_k(name):
    # T < K: most slots are -1 (query t has t+1 keys); the trailing all--1 blocks are
    # skipped by the kernels' per-row extents, the output must not change.
    B, T, L, K = 1, 24, 64, 200
    q, kv, _ = _inputs(2, B=B, T=T, H=16, L=L, K=K, dtype=jnp.float32)
    idx = _causal_indices(B, T, L, K)
    out, lse = _run(name, q, kv, idx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_ref(q, kv, idx)), atol=1e-4,
                               rtol=1e-4)
    # query 0 attends to key 0 only: out = kv[0, :512] for every head, lse = its logit
    np.testing.assert_allclose(np.asarray(out[0, 0]),
                               np.broadcast_to(np.asarray(kv[0, 0, :512]), (16, 512)),
                               atol=1e-5, rtol=1e-5)
    lse0 = SCALE * jnp.einsum("hd,d->h", q[0, 0], kv[0, 0])
    np.testing.assert_allclose(np.asarray(lse[0, 0]), np.asarray(lse0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["tpu_decode", "gpu_decode"])
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_ragged_batch(name, T, dtype):
    # 5 sequences of different lengths, one empty (all -1 -> zeros), one longer than K.
    lengths = [37, 0, 300, 129, 5]
    L, K = 320, 200
    q, kv, _ = _inputs(3, B=len(lengths), T=T, H=16, L=L, K=K, dtype=dtype)
    idx = _ragged_decode_indices(lengths, T, K)
    out, lse = _run(name, q, kv, idx)
    tol = _tol(dtype)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_ref(q, kv, idx)), atol=tol,
                               rtol=tol)
    assert np.all(np.asarray(out[1]) == 0.0) and np.all(np.isneginf(np.asarray(lse[1])))


@pytest.mark.parametrize("name", list(KERNELS))
def test_all_indices_invalid_gives_zeros(name):
    q, kv, idx = _inputs(4, B=2, T=3, H=16, L=50, K=70, dtype=jnp.float32)
    idx = jnp.full_like(idx, -1)
    out, lse = _run(name, q, kv, idx)
    assert np.all(np.asarray(out) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse)))


@pytest.mark.parametrize("name", ["tpu_prefill", "gpu_prefill"])
def test_lse_matches_logsumexp(name):
    q, kv, idx = _inputs(5, B=1, T=3, H=16, L=90, K=130, dtype=jnp.float32)
    _, lse = _run(name, q, kv, idx)
    rows = kv[0][jnp.maximum(idx[0], 0)]                                  # [T, K, Dk]
    s = SCALE * jnp.einsum("thd,tkd->thk", q[0], rows)
    s = jnp.where(idx[0][:, None, :] >= 0, s, -jnp.inf)
    np.testing.assert_allclose(np.asarray(lse[0]),
                               np.asarray(jax.nn.logsumexp(s, axis=-1)), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("variant", ["prefill", "decode"])
def test_tpu_semantics_interpreter_tiny(variant):
    # The TPU interpreter checks what interpret=True does not: DMA semaphores, SMEM
    # scratch, races between DMAs and vector accesses (detect_races), and reads of
    # uninitialised VMEM (filled with NaN: any stale-buffer read would poison `out`).
    # Tiny sizes: it makes a Python callback per DMA. K = 130 -> 2 blocks of 128.
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    q, kv, idx = _inputs(6, B=2, T=2, H=8, L=64, K=130, dtype=jnp.float32, Dk=72)
    idx = idx.at[1, 1].set(-1)
    fn = tpu.sparse_mla_prefill_tpu if variant == "prefill" else tpu.sparse_mla_decode_tpu
    out, lse = fn(q, kv, idx, softmax_scale=SCALE, v_dim=64, block_k=128,
                  interpret=pltpu.InterpretParams(detect_races=True))
    assert ipc.races is None or not ipc.races.races_found
    np.testing.assert_allclose(np.asarray(out), np.asarray(_ref(q, kv, idx, v_dim=64)),
                               atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(out[1, 1]) == 0.0)


# ----------------------------------------------------------------------------- gradients


def _loss(impl, q, kv, idx, w, **kw):
    out = api.sparse_mla(q, kv, idx, softmax_scale=SCALE, v_dim=512, impl=impl, **kw)
    return jnp.sum(out * w)


@pytest.mark.parametrize("backend,variant", [("tpu", "prefill"), ("tpu", "decode"),
                                             ("gpu", "prefill"), ("gpu", "decode")])
def test_custom_vjp_grads_f32(backend, variant):
    B, T, H, L, K = 2, 3, 16, 150, 200
    q, kv, idx = _inputs(7, B=B, T=T, H=H, L=L, K=K, dtype=jnp.float32)
    idx = idx.at[0, 1].set(-1)                     # an empty row: zero gradient
    w = jax.random.normal(jax.random.key(8), (B, T, H, 512))
    opts = dict(block_k=128) if backend == "tpu" else dict(block_h=16, block_k=64)
    g = jax.jit(jax.grad(functools.partial(_loss, "interpret", backend=backend,
                                           variant=variant, bwd_query_chunk=2, **opts),
                         argnums=(0, 1)))(q, kv, idx, w)
    g_ref = jax.jit(jax.grad(functools.partial(_loss, "reference"), argnums=(0, 1)))(
        q, kv, idx, w)
    for a, b in zip(g, g_ref):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)
    assert np.all(np.asarray(g[0][0, 1]) == 0.0)


def test_custom_vjp_grads_bf16():
    B, T, H, L, K = 1, 4, 16, 200, 160
    q, kv, idx = _inputs(9, B=B, T=T, H=H, L=L, K=K, dtype=jnp.bfloat16)
    w = jax.random.normal(jax.random.key(10), (B, T, H, 512))
    g = jax.jit(jax.grad(functools.partial(_loss, "interpret", backend="tpu",
                                           variant="prefill", block_k=128),
                         argnums=(0, 1)))(q, kv, idx, w)
    g_ref = jax.grad(functools.partial(_loss, "reference"), argnums=(0, 1))(q, kv, idx, w)
    for a, b in zip(g, g_ref):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=3e-2 * np.abs(b).max(), rtol=0)


def test_blockwise_backward_chunking_is_exact():
    # The backward's query chunking (with T not a multiple of the chunk) changes nothing.
    q, kv, idx = _inputs(11, B=2, T=5, H=8, L=60, K=40, dtype=jnp.float32)
    out, lse = _run("tpu_prefill", q, kv, idx)
    d = jax.random.normal(jax.random.key(12), out.shape)
    bwd = jax.jit(sparse_mla_bwd, static_argnames=("softmax_scale", "v_dim", "query_chunk"))
    a = bwd(q, kv, idx, out, lse, d, softmax_scale=SCALE, v_dim=512, query_chunk=2)
    b = bwd(q, kv, idx, out, lse, d, softmax_scale=SCALE, v_dim=512, query_chunk=5)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows_per_step", [1, 4])
def test_xla_blockwise_forward_and_grads(rows_per_step):
    # The CPU path (impl="xla"): same f32 arithmetic as the reference, per row.
    q, kv, idx = _inputs(15, B=3, T=3, H=8, L=90, K=70, dtype=jnp.float32)
    idx = idx.at[2, 0].set(-1)
    out, lse = sparse_mla_blockwise(q, kv, idx, softmax_scale=SCALE, v_dim=512,
                                    rows_per_step=rows_per_step)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_ref(q, kv, idx)), atol=1e-5,
                               rtol=1e-5)
    assert np.all(np.asarray(out[2, 0]) == 0) and np.all(np.isneginf(np.asarray(lse[2, 0])))
    w = jax.random.normal(jax.random.key(16), out.shape)
    g = jax.jit(jax.grad(functools.partial(_loss, "xla", rows_per_step=rows_per_step),
                         argnums=(0, 1)))(q, kv, idx, w)
    g_ref = jax.jit(jax.grad(functools.partial(_loss, "reference"), argnums=(0, 1)))(
        q, kv, idx, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                   atol=1e-4 * float(jnp.max(jnp.abs(b))), rtol=0)


# ----------------------------------------------------------------------------- API


def test_api_auto_is_reference_on_cpu_and_validates():
    q, kv, idx = _inputs(13, B=1, T=2, H=4, L=30, K=16, dtype=jnp.float32)
    out = api.sparse_mla(q, kv, idx, softmax_scale=SCALE, v_dim=512)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_ref(q, kv, idx)))
    with pytest.raises(ValueError):
        api.sparse_mla(q, kv, idx, softmax_scale=SCALE, v_dim=512, impl="nope")
    with pytest.raises(ValueError):
        api.sparse_mla(q, kv, idx, softmax_scale=SCALE, v_dim=512, impl="pallas")


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_api_interpret_matches_reference(backend):
    q, kv, idx = _inputs(14, B=1, T=6, H=16, L=100, K=96, dtype=jnp.float32)
    opts = dict(block_k=128) if backend == "tpu" else dict(block_h=16)
    out = jax.jit(lambda a, b, c: api.sparse_mla(a, b, c, softmax_scale=SCALE, v_dim=512,
                                                 impl="interpret", backend=backend,
                                                 **opts))(q, kv, idx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_ref(q, kv, idx)), atol=1e-4,
                               rtol=1e-4)


# ----------------------------------------------------------------------------- lowering

REAL = dict(H=128, Dk=576, v_dim=512, K=2048, L=8192)


def _lower(fn, platform, B, T, dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((B, T, REAL["H"], REAL["Dk"]), dtype)
    kv = jax.ShapeDtypeStruct((B, REAL["L"], REAL["Dk"]), dtype)
    idx = jax.ShapeDtypeStruct((B, T, REAL["K"]), jnp.int32)
    f = jax.jit(lambda a, b, c: fn(a, b, c, softmax_scale=SCALE, v_dim=REAL["v_dim"]))
    return f.trace(q, kv, idx).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("fn,B,T", [(tpu.sparse_mla_prefill_tpu, 1, 64),
                                    (tpu.sparse_mla_decode_tpu, 8, 1),
                                    (tpu.sparse_mla_decode_tpu, 4, 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernels_lower_for_tpu(fn, B, T, dtype):
    text = _lower(fn, "tpu", B, T, dtype)
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("fn,B,T", [(gpu.sparse_mla_prefill_gpu, 1, 64),
                                    (gpu.sparse_mla_decode_gpu, 8, 1),
                                    (gpu.sparse_mla_decode_gpu, 64, 1)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_kernels_lower_for_cuda_triton(fn, B, T, dtype):
    text = _lower(fn, "cuda", B, T, dtype)
    assert "__gpu$xla.gpu.triton" in text        # the Triton custom call (not Mosaic GPU)


# ----------------------------------------------------------------------------- stacked caches
# The model scans its decoder layers over caches stacked per layer, [n, B, L, Dk]; with `layer`
# the op reads layer `layer` of the stack directly. Every path must give exactly (bit for bit)
# what it gives on the sliced cache kv[layer]: the same rows are gathered and the arithmetic after
# the gather is unchanged.

# name -> (impl, backend, variant, options): every path of the op, tiny blocks ("xla" runs one
# function, xla.sparse_mla_rows, for backend "tpu" and "gpu")
LAYER_CASES = {
    "reference": ("reference", None, "auto", dict(query_chunk=2)),       # chunked over T (lax.map)
    "xla_cpu": ("xla", None, "auto", dict(rows_per_step=3)),
    "xla_rows": ("xla", "gpu", "auto", {}),
    "tpu_prefill": ("interpret", "tpu", "prefill", dict(block_q=3, block_k=128)),
    "tpu_decode": ("interpret", "tpu", "decode", dict(block_b=2, block_k=128)),
    "gpu_prefill": ("interpret", "gpu", "prefill", dict(block_h=8, block_k=16)),
    "gpu_decode": ("interpret", "gpu", "decode", dict(block_h=8, block_k=16, num_splits=2)),
}
# n layers, batch 2, T = 4 < K = 20, L = 37 (no block multiple; prime, so no array of the op but a
# layer's cache has B * L rows), Dk = 128 + 64 (the GPU kernels want power-of-two halves)
N_LAYERS, LB, LT, LH, LL, LK, LDV, LDK = 3, 2, 4, 8, 37, 20, 128, 192


def _stacked_inputs(seed, dtype=jnp.bfloat16):
    """q, a stacked cache [n, B, L, Dk] whose layers all differ, indices with -1 anywhere (20%) and
    one query (1, 2) with no valid index. Drawn with numpy: no small XLA programs to compile."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((LB, LT, LH, LDK), np.float32).astype(dtype)
    kv = rng.standard_normal((N_LAYERS, LB, LL, LDK), np.float32).astype(dtype)
    idx = np.where(rng.random((LB, LT, LK)) < 0.2, -1, rng.integers(0, LL, (LB, LT, LK))).astype(np.int32)
    idx[1, 2] = -1
    return jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx)


def _layer_op(case):
    impl, backend, variant, opts = LAYER_CASES[case]
    return functools.partial(api.sparse_mla, softmax_scale=SCALE, v_dim=LDV, impl=impl, backend=backend,
                             variant=variant, **opts)


def _stacked_vs_sliced(op, q, kv, idx):
    """(op on the stacked cache at every layer, the layer a traced scalar as in the model's scan
    over layers; op on each sliced cache kv[layer]), both [n, B, T, H, Dv], from one jit."""
    n = jax.tree.leaves(kv)[0].shape[0]

    def both(a, b, c):
        stacked = jax.lax.map(lambda layer: op(a, b, c, layer=layer), jnp.arange(n, dtype=jnp.int32))
        return stacked, jax.lax.map(lambda kv_l: op(a, kv_l, c), b)

    return jax.tree.map(np.asarray, jax.jit(both)(q, kv, idx))


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_stacked_cache_layer_equals_sliced_cache(case):
    q, kv, idx = _stacked_inputs(30)
    got, want = _stacked_vs_sliced(_layer_op(case), q, kv, idx)
    np.testing.assert_array_equal(got, want)
    assert np.all(got[:, 1, 2] == 0)
    assert not np.array_equal(got[0], got[2])          # the layers differ: a wrong layer would show


def test_stacked_cache_layer_validation():
    q, kv, idx = _stacked_inputs(31)
    op = _layer_op("reference")
    with pytest.raises(ValueError, match=r"layer=1 wants a stacked kv .*\(2, 37, 192\)"):
        op(q, kv[0], idx, layer=1)
    with pytest.raises(ValueError, match=r"kv must be one cache .*\(3, 2, 37, 192\).*layer="):
        op(q, kv, idx)
    with pytest.raises(ValueError, match="layer=3 is out of range"):
        op(q, kv, idx, layer=3)
    with pytest.raises(ValueError, match="layer must be an int"):
        op(q, kv, idx, layer=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="batch"):
        op(q[:1], kv, idx[:1], layer=0)
    # a Python int layer counts from the end when negative, as kv[layer]
    last = jax.jit(lambda a, b, c: (op(a, b, c, layer=-1), op(a, b[2], c)))(q, kv, idx)
    np.testing.assert_array_equal(np.asarray(last[0]), np.asarray(last[1]))


def test_stacked_cache_grad_wrt_q():
    # with `layer` no custom_vjp is attached: the jnp paths are differentiated by jax directly. The
    # CPU "xla" path (whose layer=None form has the custom_vjp): dq against jax.grad of the
    # reference on the sliced cache; same f32 tolerance as the custom_vjp tests
    q, kv, idx = _stacked_inputs(32, dtype=jnp.float32)
    w = np.random.default_rng(33).standard_normal((LB, LT, LH, LDV), np.float32)
    op = _layer_op("xla_cpu")
    g, g_ref = (np.asarray(x) for x in jax.jit(lambda a, b, c, layer: (
        jax.grad(lambda x: jnp.sum(op(x, b, c, layer=layer) * w))(a),
        jax.grad(lambda x: jnp.sum(_ref(x, b[1], c, v_dim=LDV) * w))(a)))(q, kv, idx, jnp.int32(1)))
    np.testing.assert_allclose(g, g_ref, atol=1e-4 * np.abs(g_ref).max(), rtol=0)
    assert np.all(g[1, 2] == 0)


def _layer_sized(jaxpr, widths):
    """(primitive, shape) of every equation (sub-jaxprs included, pallas_call bodies not) that
    outputs as many elements as one layer's cache array [B, L, W], with last dim W: a slice, a copy
    or a flattening of one layer."""
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                shape = tuple(getattr(v.aval, "shape", ()))
                if shape and shape[-1] in widths and int(np.prod(shape)) == LB * LL * shape[-1]:
                    found.append((eqn.primitive.name, shape))
            if eqn.primitive.name != "pallas_call":
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("cache", ["dense", "compact"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_stacked_cache_is_never_sliced(case, cache):
    # no [B, L, ...] slice of the layer (nor its dequantised rows) anywhere in the traced op; the
    # naive kv[layer] (dynamic_slice + squeeze) fails this
    q, kv, idx = _stacked_inputs(34)
    if cache == "compact":
        c = kv.astype(jnp.float32)
        kv = CompactKV(c[..., :LDV].astype(jnp.float8_e4m3fn), jnp.ones((N_LAYERS, LB, LL, 1), jnp.float32),
                       c[..., LDV:].astype(jnp.bfloat16))
        widths = {LDK, LDV, 1, LDK - LDV}
    else:
        widths = {LDK}
    op = _layer_op(case)
    jx = jax.make_jaxpr(lambda a, b, c, layer: op(a, b, c, layer=layer))(q, kv, idx, jnp.int32(1))
    assert _layer_sized(jx, widths) == []
    if case.startswith(("tpu", "gpu")):                  # the kernel gets the whole stack
        calls = [e for e in jx.jaxpr.eqns if e.primitive.name == "pallas_call"]
        stack = {tuple(x.shape) for x in jax.tree.leaves(kv)}
        assert calls and stack <= {tuple(v.aval.shape) for v in calls[0].invars}


@pytest.mark.parametrize("platform,marker", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_stacked_cache_kernels_lower_under_shard_map(platform, marker):
    # the release's dims; 8 sequences over data=4, heads over tensor=2; the stacked cache split
    # P(None, data, None, None), the layer a replicated traced scalar P(). Prefill and decode kernels,
    # dense and compact caches. The kernel's operands are the local stack [n, 2, L, ...]: no
    # [2, L, ...] slice.
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    sds = jax.ShapeDtypeStruct
    n, B, L, H = 4, 8, REAL["L"], REAL["H"]
    dense = sds((n, B, L, 576), jnp.bfloat16)
    comp = CompactKV(sds((n, B, L, 512), jnp.float8_e4m3fn), sds((n, B, L, 4), jnp.float32),
                     sds((n, B, L, 64), jnp.bfloat16))
    backend = "tpu" if platform == "tpu" else "gpu"
    for kv, T, variant in ((dense, 16, "prefill"), (dense, 1, "decode"), (comp, 16, "prefill"), (comp, 1, "decode")):
        kv_spec = jax.tree.map(lambda _: P(None, "data", None, None), kv)

        def local(q, kv, idx, layer):
            return api.sparse_mla(q, kv, idx, softmax_scale=SCALE, v_dim=512, impl="pallas", backend=backend,
                                  variant=variant, layer=layer)

        f = jax.jit(jax.shard_map(local, mesh=mesh, check_vma=False, out_specs=P("data", None, "tensor", None),
                                  in_specs=(P("data", None, "tensor", None), kv_spec, P("data", None, None), P())))
        text = f.trace(sds((B, T, H, 576), jnp.bfloat16), kv, sds((B, T, REAL["K"]), jnp.int32),
                       sds((), jnp.int32)).lower(lowering_platforms=(platform,)).as_text()
        assert marker in text and "sdy.manual_computation" in text, (variant, T)
        assert f"tensor<{n}x2x{L}x" in text and f"tensor<2x{L}x" not in text, (variant, T)
