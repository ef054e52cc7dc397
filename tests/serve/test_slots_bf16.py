"""The slot engine with bfloat16 caches held as their bits (uint16 latent, uint8 e4m3 indexer
keys) and two prefill buckets (chunk 128 and the 64-token one for short tails and budgets
under a chunk).

The cache rows are checked against a plain-jnp scatter into float arrays (bit for bit); the
engine against itself: requests interleaved under a small prefill budget, and a request whose
prefix comes from the pool, give exactly the tokens they give alone and cold.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv32_jax
from dsv32_jax.attention import LayerCache
from dsv32_jax.serve import Request, ServingEngine
from oracle import make_hf_model


def test_bit_held_cache_write_equals_float_scatter():
    """write() into a bit-held cache, seen through view(), equals .at[].set on the float arrays
    (exact: both move the same bits); positions past the cache are dropped."""
    rs = np.random.RandomState(0)
    b, s, t = 3, 16, 2
    lat = jnp.asarray(rs.randn(b, s, 8), jnp.bfloat16)
    ik = jnp.asarray(rs.randn(b, s, 4), jnp.float8_e4m3fn)
    scale = jnp.asarray(rs.rand(b, s), jnp.float32)
    pos = jnp.asarray([[3, 4], [0, 16], [15, 9]], jnp.int32)          # 16: past the cache
    new = (jnp.asarray(rs.randn(b, t, 8), jnp.float32), jnp.asarray(rs.randn(b, t, 4), jnp.float32),
           jnp.asarray(rs.rand(b, t), jnp.float32))
    held = LayerCache(lat, ik, scale).as_bits()
    assert (held.latent.dtype, held.index_k.dtype, held.index_k_scale.dtype) == (jnp.uint16, jnp.uint8, jnp.float32)
    got = jax.jit(lambda c, p, *r: c.write(p, *r).view())(held, pos, *new)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], pos.shape)
    for g, base, r in zip((got.latent, got.index_k, got.index_k_scale), (lat, ik, scale), new):
        want = base.at[rows, pos].set(r.astype(base.dtype), mode="drop")
        assert g.dtype == base.dtype
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _, path = make_hf_model(tmp_path_factory.mktemp("serve_bf16"), seed=0)
    model = dsv32_jax.load(path, dtype=jnp.bfloat16, numerics="reference")
    eng = ServingEngine(model, max_slots=4, max_len=256, chunk=128, steps=4, prefill_budget=192, prefix_blocks=8)
    eng.warmup()
    return eng


def _prompt(seed, n):
    return list(map(int, np.random.RandomState(seed).randint(2, 256, n)))


def test_bf16_interleaved_and_cached_equal_alone(engine):
    assert engine.chunk_small == 64 and engine.chunk == 128
    n0 = engine.compile_count()
    mixed = [(150, dict(max_tokens=6, temperature=0.0)), (90, dict(max_tokens=5, temperature=0.9, seed=2)),
             (30, dict(max_tokens=7, temperature=0.0)), (200, dict(max_tokens=4, temperature=1.0, top_k=5, seed=3))]
    alone = []
    for i, (n, kw) in enumerate(mixed):
        alone.append(engine.generate([Request(_prompt(i, n), **kw)])[0].tokens)
    engine.prefix = type(engine.prefix)(engine.prefix.entries)      # forget those prompts' blocks
    reqs = [Request(_prompt(i, n), **kw) for i, (n, kw) in enumerate(mixed)]
    engine.submit(reqs[0])
    engine.step()
    for r in reqs[1:]:
        engine.submit(r)
        engine.step()
    engine.run_until_idle()
    for r, want in zip(reqs, alone):
        assert r.tokens == want
    # the 150-token prompt's first two blocks are in the pool now: 128 cached, a 22-token tail
    again = engine.generate([Request(_prompt(0, 150), **mixed[0][1])])[0]
    assert again.cached_tokens == 128 and again.tokens == alone[0]
    assert engine.compile_count() == n0
