"""Tiny transformers `DeepseekV32ForCausalLM` models, the test oracle (test-only dependency).

`make_hf_model(tmp_dir, **overrides)` builds a random tiny model in float32, perturbs the
parameters transformers initialises to constants (norm weights, router bias, LayerNorm bias)
so that a port which ignores them fails, saves it with `save_pretrained`, and returns
(torch model, checkpoint dir).
"""
from __future__ import annotations

from pathlib import Path

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16,
    num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
    index_n_heads=16, index_head_dim=32, index_topk=8, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=2560, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                         original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                         mscale=1.0, mscale_all_dim=1.0),
)


def make_hf_model(out_dir, seed: int = 0, **overrides):
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    kw = dict(TINY)
    kw.update(overrides)
    cfg = DeepseekV32Config(**kw)
    model = DeepseekV32ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "weight" in name or "proj" in name:
                # larger weights than the 0.02 default so layers do not collapse to near-identity
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    out = Path(out_dir)
    model.save_pretrained(out)
    return model, out


def abstract_decode_step(model, batch: int, max_len: int):
    """One decode step of an abstract model (nnx.eval_shape), nothing allocated:
    -> (step(state, caches, tokens, positions) -> (caches, logits [B, V]), state, abstract
    caches of `max_len` slots, an abstract int32 [batch] for the tokens and the positions)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    gd, state = nnx.split(model)
    caches = jax.eval_shape(lambda: nnx.merge(gd, state).init_caches(batch, max_len))

    def step(state, caches, tokens, positions):
        m = nnx.merge(gd, state)
        h, _, caches = m.hidden(tokens[:, None], positions[:, None], caches)
        return caches, m.logits(h[:, 0])

    return step, state, caches, jax.ShapeDtypeStruct((batch,), jnp.int32)
