"""attention_impl="auto" and the accelerator-shaped XLA path.

* "auto" resolves to the kernels on TPU/GPU and to the XLA ops on CPU; kernel_backend overrides
  the platform (so a CPU host can lower the TPU or GPU kernels).
* The XLA path chosen for TPU/GPU (batched query rows, operands in the compute dtype with float32
  accumulation) is run here on CPU: against the plain-jnp references of `pallas_kernels`, with
  index_topk smaller than the number of keys, and inside the model against the CPU path.
"""
import numpy as np
import pytest
import jax
import jax.extend
import jax.numpy as jnp

import dsv32_jax
from dsv32_jax.attention import resolve_attention
from dsv32_jax.loading import Model, load_hf
from dsv32_jax.model import RuntimeOptions
from pallas_kernels.indexer_topk import indexer_topk
from pallas_kernels.indexer_topk.reference import indexer_scores as ref_scores
from pallas_kernels.indexer_topk.xla import indexer_scores as xla_scores
from pallas_kernels.sparse_mla import sparse_mla
from pallas_kernels.sparse_mla.reference import sparse_mla as ref_sparse_mla
from dsv32_jax.indexer import quantize_keys, quantize_queries


def test_auto_resolves_by_backend():
    assert RuntimeOptions().attention_impl == "auto"
    assert jax.default_backend() == "cpu"
    assert resolve_attention("auto") == ("xla", "xla", None)
    assert resolve_attention("auto", "tpu") == ("pallas", "pallas", "tpu")
    assert resolve_attention("auto", "gpu") == ("pallas", "pallas", "gpu")
    assert resolve_attention("xla", "gpu") == ("xla", "xla", "gpu")
    assert resolve_attention("interpret") == ("interpret", "interpret", "tpu")
    assert resolve_attention("interpret", "gpu") == ("interpret", "interpret", "gpu")
    with pytest.raises(ValueError, match="needs a TPU or GPU"):
        resolve_attention("pallas")
    with pytest.raises(ValueError, match="kernel_backend"):
        RuntimeOptions(kernel_backend="cuda0")


def _mla_inputs(seed, B=2, T=5, H=8, L=40, K=16, dtype=jnp.float32):
    """Random q/kv and indices of K distinct visible-or-not keys per query (-1 padded tails)."""
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, T, H, 48), dtype)
    kv = jnp.asarray(rng.randn(B, L, 48), dtype)
    idx = np.stack([np.stack([rng.permutation(L)[:K] for _ in range(T)]) for _ in range(B)]).astype(np.int32)
    idx[0, 0, K // 2:] = -1          # a query with fewer selected keys
    idx[1, 1, :] = -1                # a query with none (output zeros)
    return q, kv, jnp.asarray(idx)


@pytest.mark.parametrize("query_chunk", [None, 2])
def test_accelerator_sparse_mla_equals_reference_fp32(query_chunk):
    q, kv, idx = _mla_inputs(0)
    kw = dict(softmax_scale=0.2, v_dim=32)
    want = ref_sparse_mla(q, kv, idx, **kw)
    opts = {} if query_chunk is None else {"query_chunk": query_chunk}      # 2 -> 3 chunks, padded
    got = jax.jit(lambda a, b, c: sparse_mla(a, b, c, impl="xla", backend="tpu", **kw, **opts))(q, kv, idx)
    # float32 operands; only the softmax normalisation order differs from the reference
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # gradients through the kernels' custom_vjp equal jax's autodiff of the reference
    loss = lambda f: lambda a, b: jnp.sum(f(a, b) * jnp.cos(f(a, b)))  # noqa: E731
    ga = jax.grad(loss(lambda a, b: sparse_mla(a, b, idx, impl="xla", backend="gpu", **kw)), (0, 1))(q, kv)
    gr = jax.grad(loss(lambda a, b: ref_sparse_mla(a, b, idx, **kw)), (0, 1))(q, kv)
    for x, y in zip(ga, gr):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_accelerator_sparse_mla_bf16_is_batched_bf16_with_f32_accumulation():
    q, kv, idx = _mla_inputs(1, dtype=jnp.bfloat16)
    kw = dict(softmax_scale=0.2, v_dim=32)
    f = lambda a, b, c: sparse_mla(a, b, c, impl="xla", backend="tpu", **kw)  # noqa: E731
    want = np.asarray(ref_sparse_mla(q, kv, idx, **kw))        # f32 math on the same bf16 values
    got = np.asarray(jax.jit(f)(q, kv, idx))
    # the probabilities are rounded to bf16 (8 significant bits) for the value product:
    # a relative error of 2^-8 per term, bounded by 1e-2 of the output scale
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    # the test session asks for HIGHEST by default (conftest); the op itself must not force it
    with jax.default_matmul_precision("default"):
        jaxpr = jax.make_jaxpr(f)(q, kv, idx).jaxpr
    eqns = list(_all_eqns(jaxpr))
    assert not any(e.primitive.name in ("while", "scan") for e in eqns)        # no serial row loop
    assert any(e.primitive.name == "custom_vjp_call" for e in eqns)            # the kernels' backward
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2                                       # logits and the value product
    for eqn in dots:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars)
        assert eqn.params["preferred_element_type"] == jnp.float32
        assert jax.lax.Precision.HIGHEST not in np.atleast_1d(eqn.params["precision"] or ())


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def _indexer_inputs(seed, B=2, T=6, Hi=4, D=32, L=300):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, T, Hi, D), jnp.float32)
    k = jnp.asarray(rng.randn(B, L, D), jnp.float32)
    w = jnp.asarray(rng.randn(B, T, Hi), jnp.float32)
    pos = jnp.asarray(np.stack([np.arange(L - T, L), np.arange(100, 100 + T)]), jnp.int32)
    return q, k, w, pos, jnp.asarray([L, 250], jnp.int32)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("key_chunk", [None, 128])
def test_accelerator_indexer_equals_reference(fp8, key_chunk):
    q, k, w, pos, lens = _indexer_inputs(2)
    ks = None
    if fp8:      # the release's numerics: e4m3 q/k, per-head scale folded into w, per-key scale
        q, w = quantize_queries(q, w)
        k, ks = quantize_keys(k)
    kw = dict(q_positions=pos, k_scale=ks, kv_lengths=lens)
    want = ref_scores(q, k, w, **kw)
    got = xla_scores(q, k, w, key_chunk=key_chunk, **kw)            # 128: 3 key chunks, the last padded
    # exact float32 products (e4m3 widened to bf16 is exact); only the head-sum order differs
    vis = np.isfinite(np.asarray(want))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), vis)
    np.testing.assert_allclose(np.asarray(got)[vis], np.asarray(want)[vis], rtol=1e-5, atol=1e-5)
    topk = 16                                                        # < 100 visible keys
    a = indexer_topk(q, k, w, topk=topk, impl="xla", backend="gpu", **kw)
    b = indexer_topk(q, k, w, topk=topk, impl="reference", **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))     # random scores: no near-ties


def test_model_accelerator_xla_path_equals_cpu_path(tiny_hf):
    """The model with the TPU-shaped XLA path (float32 here) equals the CPU-shaped one."""
    _, path = tiny_hf
    ids = np.random.RandomState(5).randint(0, 256, (2, 40)).astype(np.int32)
    cpu = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", attention_impl="xla")
    assert cpu.config.index_topk < 40
    acc = Model(load_hf(path, RuntimeOptions(dtype=jnp.float32, numerics="exact", attention_impl="xla",
                                             kernel_backend="tpu")))
    (l1, i1), (l2, i2) = cpu.forward_with_indices(ids), acc.forward_with_indices(ids)
    l1, l2 = np.asarray(l1), np.asarray(l2)
    # float32 both ways; summation orders differ (softmax normalisation, head sums)
    assert np.abs(l1 - l2).max() <= 1e-5 * np.abs(l1).max()
    for a, b in zip(i1, i2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
