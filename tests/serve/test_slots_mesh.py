"""The slot engine on a mesh (8 host devices): slots split over the batch axes, prefill lanes
per shard, prefix blocks copied between a shard's slot and the replicated pool — the same
tokens as on one device (float32, exact numerics, greedy and seeded sampling)."""
import jax.numpy as jnp
import numpy as np
import pytest

import dsv32_jax
from dsv32_jax.serve import Request, ServingEngine


def _prompt(seed, n):
    return list(map(int, np.random.RandomState(seed).randint(2, 256, n)))


def _requests():
    shared = _prompt(70, 140)
    reqs = [Request(_prompt(i, n), max_tokens=t, temperature=temp, top_p=0.9, seed=i)
            for i, (n, t, temp) in enumerate([(21, 6, 0.0), (70, 5, 0.8), (13, 7, 1.0), (40, 4, 0.0),
                                             (33, 6, 1.2), (9, 5, 0.7)])]
    reqs.append(Request(shared + [3, 4], max_tokens=4, temperature=0.0))
    reqs.append(Request(shared + [5, 6, 7], max_tokens=4, temperature=0.0))       # 128 tokens cached
    return reqs


def _run(model):
    eng = ServingEngine(model, max_slots=8, max_len=256, chunk=32, steps=4, prefix_blocks=8)
    reqs = _requests()
    for i, r in enumerate(reqs[:-1]):
        eng.submit(r)
        if i % 2:
            eng.step()
    eng.run_until_idle()
    eng.submit(reqs[-1])
    eng.run_until_idle()
    return eng, reqs


@pytest.fixture(scope="module")
def single(tiny_hf):
    return _run(dsv32_jax.load(tiny_hf[1], dtype=jnp.float32, numerics="exact"))[1]


@pytest.mark.parametrize("mesh", ["expert=8", "data=2,expert=2,tensor=2"])
def test_mesh_slots_equal_one_device(tiny_hf, single, mesh):
    eng, reqs = _run(dsv32_jax.load(tiny_hf[1], dtype=jnp.float32, numerics="exact", mesh=mesh))
    assert eng.sm.lanes == (8 if mesh == "expert=8" else 4)
    leaf = eng.slots.caches[0].latent
    assert {sh.data.shape[0] for sh in leaf.addressable_shards} == {8 // eng.sm.lanes}
    assert reqs[-1].cached_tokens == 128
    for r, want in zip(reqs, single):
        assert r.tokens == want.tokens
