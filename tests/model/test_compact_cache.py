"""The compact FP8 latent cache (RuntimeOptions.kv_cache="fp8") against the dense cache.

With numerics="reference" the dense cache already holds the FP8 round trip of the latent
(act_dequant(act_quant(c)), spec 2.4 step 6); the compact cache stores that quantisation's e4m3
values and scales, and every attention path dequantises the rows it gathers to exactly the same
values before the same arithmetic. So prefill and decode through the compact cache must give the
SAME logits, bit for bit, as through the dense cache: asserted with exact equality on the CPU
XLA path (attention_impl="xla", the CPU default), on a tiny model whose index_topk (16) is below
the sequence (24 prompt + 2 decoded tokens), batch 2. The other paths (accelerator-shaped XLA,
the kernels) are shown bit-equal on compact and dense caches op by op in
tests/kernels/test_sparse_mla_compact.py; `_run` accepts them (attention_impl / kernel_backend)
for a full-model check outside CI (slow under Pallas interpret mode).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv32_jax.config import load_config
from dsv32_jax.model import RuntimeOptions, Transformer

# one dense layer (the cache is the attention's; the MoE is not involved), a small vocabulary
CFG = load_config("configs/tiny.json").replace(num_hidden_layers=1, vocab_size=512)
B, T, STEPS, MAX_LEN = 2, 24, 2, 32


@pytest.fixture(scope="module")
def state():
    return nnx.split(Transformer(CFG, RuntimeOptions(dtype=jnp.bfloat16), rngs=nnx.Rngs(0)))[1]


def _run(st, kv_cache, attention_impl, kernel_backend=None):
    """Prefill B x T tokens into MAX_LEN-slot caches, then STEPS greedy decode steps.
    -> (prefill logits [B, T, V], decode logits [STEPS, B, V], caches)."""
    opts = RuntimeOptions(dtype=jnp.bfloat16, numerics="reference", attention_impl=attention_impl,
                          kernel_backend=kernel_backend, kv_cache=kv_cache)
    model = nnx.eval_shape(lambda: Transformer(CFG, opts, rngs=nnx.Rngs(0)))
    gd = nnx.split(model)[0]

    @jax.jit
    def step(st, caches, ids, pos):
        m = nnx.merge(gd, st)
        h, _, caches = m.hidden(ids, pos, caches)
        return m.logits(h), caches

    ids = jnp.asarray(np.random.default_rng(0).integers(2, CFG.vocab_size, (B, T)), jnp.int32)
    caches = model.init_caches(B, MAX_LEN)
    pre, caches = step(st, caches, ids, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    tok = jnp.argmax(pre[:, -1], axis=-1)
    dec = []
    for i in range(STEPS):
        lg, caches = step(st, caches, tok[:, None], jnp.full((B, 1), T + i, jnp.int32))
        dec.append(lg[:, 0])
        tok = jnp.argmax(lg[:, 0], axis=-1)
    return pre, jnp.stack(dec), caches


def test_compact_cache_equals_dense_cache(state):
    dense = _run(state, "dense", "xla")
    comp = _run(state, "fp8", "xla")
    # the caches of the one stack of layers, [layers, B, L, ...]: its only layer
    c, d = (jax.tree.map(lambda x: x[0], run[2][0]) for run in (comp, dense))
    r = CFG.kv_lora_rank
    assert c.latent.dtype == jnp.float8_e4m3fn and c.latent.shape == (B, MAX_LEN, r)
    assert c.latent_scale.shape == (B, MAX_LEN, 1) and c.rope.shape == (B, MAX_LEN, CFG.qk_rope_head_dim)
    # the compact rows dequantise to the dense cache's rows (written slots and zeros past them)
    deq = (c.latent.astype(jnp.float32) * c.latent_scale).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate([deq, c.rope], -1)), np.asarray(d.latent))
    assert bool(jnp.all(jnp.isfinite(dense[0])))
    np.testing.assert_array_equal(np.asarray(comp[0]), np.asarray(dense[0]))       # prefill logits
    np.testing.assert_array_equal(np.asarray(comp[1]), np.asarray(dense[1]))       # decode logits


def test_options_and_cache_bytes():
    with pytest.raises(ValueError, match="kv_cache"):
        RuntimeOptions(kv_cache="int4")
    with pytest.raises(ValueError, match="numerics='reference'"):
        RuntimeOptions(numerics="exact", kv_cache="fp8")
    # the release's dims: 512 e4m3 + 4 f32 scales + 64 bf16 rope = 656 B, indexer 128 + 4 = 132 B
    rel = load_config("configs/deepseek-v3.2-exp.json").replace(num_hidden_layers=1, first_k_dense_replace=1,
                                                                num_nextn_predict_layers=0)
    per_token = {}
    for kv in ("dense", "fp8"):
        m = nnx.eval_shape(lambda: Transformer(rel, RuntimeOptions(kv_cache=kv), rngs=nnx.Rngs(0)))
        leaves = dataclasses.asdict(m.cache_shapes(1, 1)[0])
        per_token[kv] = {k: int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
                         for k, v in leaves.items() if v is not None}
    assert sum(per_token["dense"].values()) == 1152 + 132
    assert per_token["fp8"] == {"latent": 512, "latent_scale": 16, "rope": 128, "index_k": 128, "index_k_scale": 4}


def test_prefix_pool_carries_the_compact_rows(state):
    """The serving engine's prefix pool (serve.slots) holds and copies every array of a compact
    cache: a 64-token block of random rows saved from slot 0 and loaded into slot 1 arrives
    bit for bit in latent (e4m3), latent_scale, rope, index_k and index_k_scale."""
    from dsv32_jax.serve.slots import BLOCK, SlotModel

    opts = RuntimeOptions(dtype=jnp.bfloat16, numerics="reference", attention_impl="xla", kv_cache="fp8")
    module = nnx.merge(nnx.split(nnx.eval_shape(lambda: Transformer(CFG, opts, rngs=nnx.Rngs(0))))[0], state)
    sm = SlotModel(module, max_slots=2, max_len=2 * BLOCK, chunk=16, steps=1)
    slots, pool = sm.new_slots(), sm.new_pool(3)
    names = ("latent", "latent_scale", "rope", "index_k", "index_k_scale")
    seen = pool[0].view()                            # the slot engine holds narrow floats as their bits
    assert seen.latent.dtype == jnp.float8_e4m3fn and seen.latent.shape == (1, 3, BLOCK, CFG.kv_lora_rank)
    assert all(getattr(pool[0], n) is not None for n in names)
    keys = iter(jax.random.split(jax.random.key(3), 16))
    caches = jax.tree.map(lambda x: jax.random.bits(next(keys), x.shape, jnp.uint32).astype(x.dtype)
                          if jnp.issubdtype(x.dtype, jnp.unsignedinteger)
                          else jax.random.normal(next(keys), x.shape).astype(x.dtype), slots.caches)
    want = {n: np.asarray(getattr(caches[0], n)[:, 0, BLOCK:2 * BLOCK]) for n in names}
    slots = dataclasses.replace(slots, caches=caches)
    i32 = jnp.int32
    pool = sm._save_prefix(slots, pool, i32(0), jnp.asarray([-1, 2], i32))     # slot 0, block 1 -> entry 2
    slots = sm._load_prefix(slots, pool, i32(1), jnp.asarray([2, -1], i32))    # entry 2 -> slot 1, block 0
    for n in names:
        np.testing.assert_array_equal(np.asarray(getattr(slots.caches[0], n)[:, 1, :BLOCK]), want[n], n)
