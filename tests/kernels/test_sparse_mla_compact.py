"""Sparse MLA over the compact FP8 latent cache (compact.CompactKV: e4m3 latent + float32 block
scales + rope) for every impl: the kernels in interpret mode, the CPU and accelerator-shaped XLA
forwards and the plain-jnp reference, against the reference on the dequantised cache.

The compact ops dequantise only the gathered rows, to exactly the values of the dense cache
`compact.dense(kv)` (e4m3 * power-of-two scale is exact in f32, then the same cast), and then
run the dense ops' arithmetic unchanged, so each impl's output on the compact cache must EQUAL
(bit for bit) the same impl on the dense cache. Against the reference the kernels keep the dense
kernels' tolerances (tests/kernels/test_sparse_mla.py: f32 1e-4 for the online softmax's
reordered sums, bf16 3e-2 for the bf16 p of the value product).
Edge cases: K not a multiple of any block, -1 anywhere, a query with no valid index, prefill
with T < K (causal start), ragged decode batch with an empty sequence, batch > 1. The kernels'
DMA pipeline is the dense one's with three copies per row instead of one (its race / stale-VMEM
checks under the TPU-semantics interpreter are in tests/kernels/test_sparse_mla.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.numerics import act_quant
from pallas_kernels.sparse_mla import api, compact, gpu, reference, tpu
from pallas_kernels.sparse_mla.compact import CompactKV
from pallas_kernels.sparse_mla.xla import sparse_mla_rows

SCALE = 0.13523378
DV, DR = 256, 64                  # two 128-value scale blocks + rope (the release: 512 = 4 blocks)


def _inputs(seed, B, T, H, L, K, dtype, neg_frac=0.2, dv=DV, dr=DR, block=128):
    """q, a compact cache quantised as the official act_quant (ue8m0 scales), indices."""
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (B, T, H, dv + dr), jnp.float32).astype(dtype)
    kv = jax.random.normal(k[1], (B, L, dv + dr), jnp.float32) * 3.0
    lat, s = act_quant(kv[..., :dv], block)
    idx = jax.random.randint(k[2], (B, T, K), 0, L, jnp.int32)
    idx = jnp.where(jax.random.uniform(k[3], (B, T, K)) < neg_frac, -1, idx)
    return q, CompactKV(lat, s, kv[..., dv:].astype(dtype)), idx


KERNELS = {
    "tpu_prefill": functools.partial(tpu.sparse_mla_prefill_tpu, block_q=3, block_k=128),
    "tpu_decode": functools.partial(tpu.sparse_mla_decode_tpu, block_b=2, block_k=128),
    "gpu_prefill": functools.partial(gpu.sparse_mla_prefill_gpu, block_h=8, block_k=64),
    "gpu_decode": functools.partial(gpu.sparse_mla_decode_gpu, block_h=8, block_k=32, num_splits=3),
}


def _both(fn, q, kv, idx):
    """fn on the compact cache and on its dense twin, jitted."""
    run = jax.jit(lambda a, b, c: fn(a, b, c, softmax_scale=SCALE, v_dim=DV))
    return run(q, kv, idx), run(q, compact.dense(kv), idx)


def _check(got, dense, ref, dtype):
    out, lse = got
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense[0]))      # bit-equal to dense
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(dense[1]))
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)


def test_dequantize_is_the_official_round_trip():
    # dense(kv) holds act_dequant(act_quant(c)) exactly: the values the reference numerics'
    # FP8 KV-latent simulation (numerics.fp8_round_trip) feeds the dense cache
    from dsv32_jax.numerics import fp8_round_trip

    c = (jax.random.normal(jax.random.key(0), (2, 7, DV), jnp.float32) * 5).astype(jnp.bfloat16)
    rope = jax.random.normal(jax.random.key(1), (2, 7, DR), jnp.bfloat16)
    lat, s = jax.jit(act_quant)(c)
    d = jax.jit(compact.dense)(CompactKV(lat, s, rope))
    np.testing.assert_array_equal(np.asarray(d[..., :DV]), np.asarray(jax.jit(fp8_round_trip)(c)))
    np.testing.assert_array_equal(np.asarray(d[..., DV:]), np.asarray(rope))
    assert CompactKV(lat, s, rope).row_bytes() == DV + 4 * 2 + 2 * DR


def _prefill_indices(B, T, K, seed=0):
    """The start of a sequence, T < K: query t selects its t+1 keys, the rest of its K slots -1."""
    rng = np.random.default_rng(seed)
    idx = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t in range(T):
            idx[b, t, :t + 1] = rng.permutation(t + 1)
    return jnp.asarray(idx)


def _decode_indices(lengths, K, seed=1):
    """Ragged decode: sequence b of length n selects min(K, n) of its keys, the rest -1."""
    rng = np.random.default_rng(seed)
    idx = np.full((len(lengths), 1, K), -1, np.int32)
    for b, n in enumerate(lengths):
        idx[b, 0, :min(K, n)] = rng.permutation(n)[:min(K, n)]
    return jnp.asarray(idx)


@pytest.mark.parametrize("name", ["tpu_prefill", "gpu_decode"])
def test_kernels_edge_cases(name):
    """Prefill kernels: batch 2 at the start of the sequences (T = 6 < K = 130, K no multiple of
    any block), one query with no valid index. Decode kernels: a ragged batch of 4, lengths 37,
    0 (no valid index), 150 (> K: two blocks) and 5. bf16 cache, as served. (Each backend's
    prefill and decode entry points run one kernel body, blocked differently; the other two are
    lowered below.)"""
    if name.endswith("prefill"):
        q, kv, _ = _inputs(1, B=2, T=6, H=8, L=6, K=130, dtype=jnp.bfloat16)
        idx = _prefill_indices(2, 6, 130).at[1, 3].set(-1)
        empty = (1, 3)
    else:
        lengths = [37, 0, 150, 5]
        q, kv, _ = _inputs(2, B=4, T=1, H=8, L=160, K=130, dtype=jnp.bfloat16)
        idx = _decode_indices(lengths, 130)
        empty = (1, 0)
    got = _both(functools.partial(KERNELS[name], interpret=True), q, kv, idx)
    _check(got[0], got[1], reference.sparse_mla(q, compact.dense(kv), idx, softmax_scale=SCALE, v_dim=DV),
           jnp.bfloat16)
    assert np.all(np.asarray(got[0][0][empty]) == 0) and np.all(np.isneginf(np.asarray(got[0][1][empty])))


def test_accelerator_xla_forward():
    # the accelerator-shaped XLA path (batched rows, bf16 operands; the CPU path is run by the
    # model test): equal to itself on the dense cache; against the reference with bf16 p
    q, kv, idx = _inputs(4, B=2, T=3, H=4, L=40, K=20, dtype=jnp.bfloat16)
    idx = idx.at[1, 0].set(-1)
    got = _both(functools.partial(sparse_mla_rows, query_chunk=2), q, kv, idx)
    _check(got[0], got[1], reference.sparse_mla(q, compact.dense(kv), idx, softmax_scale=SCALE, v_dim=DV),
           jnp.bfloat16)


def test_api_validation():
    q = jnp.zeros((1, 1, 4, DV + DR), jnp.float32)
    kv = CompactKV(jnp.zeros((1, 8, DV), jnp.float8_e4m3fn), jnp.ones((1, 8, 2), jnp.float32),
                   jnp.zeros((1, 8, DR), jnp.float32))
    idx = jnp.zeros((1, 1, 4), jnp.int32)
    with pytest.raises(ValueError, match="v_dim"):
        api.sparse_mla(q, kv, idx, softmax_scale=SCALE, v_dim=DV + DR, impl="reference")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        api.sparse_mla(q, CompactKV(kv.latent.astype(jnp.bfloat16), kv.scale, kv.rope), idx, softmax_scale=SCALE,
                       v_dim=DV, impl="xla")


REAL = dict(H=128, L=8192, K=2048)


@pytest.mark.parametrize("fn,platform,B,T,marker", [
    (tpu.sparse_mla_prefill_tpu, "tpu", 1, 64, "tpu_custom_call"),
    (tpu.sparse_mla_decode_tpu, "tpu", 8, 1, "tpu_custom_call"),
    (gpu.sparse_mla_prefill_gpu, "cuda", 1, 64, "__gpu$xla.gpu.triton"),
    (gpu.sparse_mla_decode_gpu, "cuda", 64, 1, "__gpu$xla.gpu.triton")])
def test_kernels_lower_at_release_dims(fn, platform, B, T, marker):
    sds = jax.ShapeDtypeStruct
    L = REAL["L"]
    kv = CompactKV(sds((B, L, 512), jnp.float8_e4m3fn), sds((B, L, 4), jnp.float32), sds((B, L, 64), jnp.bfloat16))
    q = sds((B, T, REAL["H"], 576), jnp.bfloat16)
    idx = sds((B, T, REAL["K"]), jnp.int32)
    f = jax.jit(lambda a, b, c: fn(a, b, c, softmax_scale=SCALE, v_dim=512))
    assert marker in f.trace(q, kv, idx).lower(lowering_platforms=(platform,)).as_text()


# ----------------------------------------------------------------------------- stacked caches
# A stacked compact cache (latent / scale / rope each [n, B, L, ...], one per scanned layer) read
# with `layer` must give, bit for bit, what the same path gives on the sliced cache kv[layer], and
# so (the principle above) on its dense twin: each case is checked against the path on the dense
# sliced cache compact.dense(kv)[layer] (the dense kernels compile in a third of the compact ones'
# time in interpret mode). TPU: the decode entry point only; prefill runs the same driver (`_run`,
# only the rows per grid step differ) and is checked with `layer` on the dense cache and lowered
# for the compact one in tests/kernels/test_sparse_mla.py, with the no-copy jaxpr check.

LAYER_CASES = {
    "reference": ("reference", None, "auto", dict(query_chunk=2)),
    "xla_cpu": ("xla", None, "auto", dict(rows_per_step=3)),
    "xla_rows": ("xla", "tpu", "auto", {}),
    "tpu_decode": ("interpret", "tpu", "decode", dict(block_b=2, block_k=128)),
    "gpu_prefill": ("interpret", "gpu", "prefill", dict(block_h=8, block_k=16)),
    "gpu_decode": ("interpret", "gpu", "decode", dict(block_h=8, block_k=16, num_splits=2)),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_stacked_compact_cache_layer_equals_sliced_cache(case):
    # 3 layers of different contents, batch 2, T = 4 < K = 20, L = 37 (no block multiple), -1
    # anywhere and one query (1, 2) with no valid index; the layer a traced scalar inside jit
    # (lax.map over the layers, as the model's scan)
    B, T, L, K = 2, 4, 37, 20
    rng = np.random.default_rng(40)                     # numpy draws: no small XLA programs to compile
    q = jnp.asarray(rng.standard_normal((B, T, 8, DV + DR), np.float32).astype(jnp.bfloat16))
    idx = np.where(rng.random((B, T, K)) < 0.2, -1, rng.integers(0, L, (B, T, K))).astype(np.int32)
    idx[1, 2] = -1
    c = rng.standard_normal((3, B, L, DV + DR), np.float32) * 3
    kv = CompactKV(*jax.jit(act_quant)(c[..., :DV]), jnp.asarray(c[..., DV:].astype(jnp.bfloat16)))
    impl, backend, variant, opts = LAYER_CASES[case]
    op = functools.partial(api.sparse_mla, softmax_scale=SCALE, v_dim=DV, impl=impl, backend=backend,
                           variant=variant, **opts)

    def both(a, b, c):
        stacked = jax.lax.map(lambda layer: op(a, b, c, layer=layer), jnp.arange(3, dtype=jnp.int32))
        return stacked, jax.lax.map(lambda kv_l: op(a, kv_l, c), compact.dense(b))

    got, want = (np.asarray(x) for x in jax.jit(both)(q, kv, idx))
    np.testing.assert_array_equal(got, want)
    assert np.all(got[:, 1, 2] == 0) and not np.array_equal(got[0], got[2])
