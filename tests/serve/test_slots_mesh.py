"""The slot engine on a mesh (8 host devices): slots split over the batch axes, prefill lanes
per shard, prefix blocks copied between a shard's slot and the replicated pool — the same
tokens as on one device (float32, exact numerics, greedy and seeded sampling)."""
import jax.numpy as jnp
import pytest

import dsv32_jax
from dsv32_jax.model import CACHE_BATCH_AXIS
from multihost_cases import run_serving


@pytest.fixture(scope="module")
def single(tiny_hf):
    return run_serving(dsv32_jax.load(tiny_hf[1], dtype=jnp.float32, numerics="exact"))[1]


@pytest.mark.parametrize("mesh", ["expert=8", "data=2,expert=2,tensor=2"])
def test_mesh_slots_equal_one_device(tiny_hf, single, mesh):
    eng, reqs = run_serving(dsv32_jax.load(tiny_hf[1], dtype=jnp.float32, numerics="exact", mesh=mesh))
    assert eng.sm.lanes == (8 if mesh == "expert=8" else 4)
    leaf = eng.slots.caches[0].latent
    assert {sh.data.shape[CACHE_BATCH_AXIS] for sh in leaf.addressable_shards} == {8 // eng.sm.lanes}
    assert reqs[-1].cached_tokens == 128
    for r, want in zip(reqs, single):
        assert r.tokens == want.tokens


@pytest.mark.parametrize("mesh", ["data=2,tensor=4", "tensor=8"])
def test_mesh_prefill_row_buckets_compile_once(tiny_hf, single, mesh):
    """Every request submitted at once with prefill row buckets (2, 4): multi-row prefill calls
    run per lane (2 lanes of 4 slots; 1 lane of 8 when the batch is not split), nothing
    compiles after warm-up (the running hidden rows and slot fields are born where the device
    functions leave them), and each request gives its one-device tokens."""
    from dsv32_jax.serve import Request, ServingEngine
    from multihost_cases import serving_requests

    model = dsv32_jax.load(tiny_hf[1], dtype=jnp.float32, numerics="exact", mesh=mesh)
    eng = ServingEngine(model, max_slots=8, max_len=256, chunk=32, steps=4, prefill_rows=(2, 4))
    eng.warmup()
    compiled = dict(eng.sm.traces)
    reqs = eng.generate([Request(p, **kw) for p, kw in serving_requests()])
    assert dict(eng.sm.traces) == compiled
    assert eng.stats["prefill_calls_rows_4"] >= 1
    for r, want in zip(reqs, single):
        assert r.tokens == want.tokens
