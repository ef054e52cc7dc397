"""MLA + DSA layer: index_topk >= T is exactly dense causal attention, and sparsity is live below.

The dense reference is written here in the expanded (MHA) form of transformers / the paper:
per-head keys [k_nope | k_pe] and values from kv_b, full causal softmax; it shares only the
projections and rope with the module under test (rope is checked against transformers in
test_oracle.py).
"""
import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.attention import MLA
from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import rope_cos_sin, rope_interleaved

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=2, topk_group=1, index_n_heads=8, index_head_dim=32,
                  index_topk=8, rope_original_max_position_embeddings=64, fp8_block_size=None)
B, T = 2, 24


def _layer_and_inputs(cfg, seed=0):
    mla = MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    # larger than the 0.02 init so attention is far from uniform
    for _, v in nnx.to_flat_state(nnx.state(mla, nnx.Param)):
        val = v.get_value()
        if val.ndim == 2:
            v.set_value(val * 25.0)
    x = jax.random.normal(jax.random.key(seed + 1), (B, T, cfg.hidden_size), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_cos_sin(cfg, pos)
    return mla, x, pos, cos, sin


def dense_mha(mla, cfg, x, cos, sin):
    h, nope, r, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = mla.q_b(mla.q_norm(mla.q_a(x))).reshape(B, T, h, nope + r)
    q = jnp.concatenate([q[..., :nope], rope_interleaved(q[..., nope:], cos, sin)], -1)
    kv = mla.kv_a(x)
    c = mla.kv_norm(kv[..., :cfg.kv_lora_rank])
    k_pe = rope_interleaved(kv[..., cfg.kv_lora_rank:], cos, sin)
    kvb = (c @ mla.kv_b.kernel[...]).reshape(B, T, h, nope + v)
    k = jnp.concatenate([kvb[..., :nope], jnp.broadcast_to(k_pe[:, :, None], (B, T, h, r))], -1)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * cfg.softmax_scale
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), kvb[..., nope:])
    return o.reshape(B, T, h * v) @ mla.o.kernel[...]


def test_topk_at_least_T_is_dense_causal_attention():
    for topk in (T, 4 * T):
        cfg = CFG.replace(index_topk=topk)
        mla, x, pos, cos, sin = _layer_and_inputs(cfg)
        out, idx, _ = mla(x, pos, cos, sin, numerics="exact")
        ref = dense_mha(mla, cfg, x, cos, sin)
        # float32 on both sides; absorbed vs expanded form differ only in summation order
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
        # every visible key selected, nothing else
        for t in range(T):
            assert sorted(i for i in np.asarray(idx)[0, t] if i >= 0) == list(range(t + 1))


def test_topk_below_T_selects_and_changes_output():
    cfg = CFG.replace(index_topk=8)
    mla, x, pos, cos, sin = _layer_and_inputs(cfg)
    out, idx, _ = mla(x, pos, cos, sin, numerics="exact")
    ref = dense_mha(mla, cfg, x, cos, sin)
    idx = np.asarray(idx)
    assert idx.shape == (B, T, 8)
    # queries 0..7 see <= 8 keys: still dense; later ones drop keys and differ from dense
    np.testing.assert_allclose(np.asarray(out)[:, :8], np.asarray(ref)[:, :8], rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(out)[:, 8:] - np.asarray(ref)[:, 8:]).max() > 1e-3
    assert (idx[:, 8:] >= 0).all() and (idx[:, 8:] <= np.arange(8, T)[None, :, None]).all()


def test_reference_numerics_runs_and_differs_slightly():
    cfg = CFG.replace(index_topk=8, kv_lora_rank=32)
    mla, x, pos, cos, sin = _layer_and_inputs(cfg)
    exact, _, _ = mla(x, pos, cos, sin, numerics="exact")
    ref, _, _ = mla(x, pos, cos, sin, numerics="reference")
    assert np.isfinite(np.asarray(ref)).all()
    assert float(jnp.abs(ref - exact).max()) > 0
