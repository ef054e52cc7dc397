"""The lightning indexer of DeepSeek Sparse Attention (spec 2.5).

    I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s]),    w = weights_proj(x) * Hi^-0.5 (float32)

q_I = wq_b(qr) (qr: MLA's normalised q latent), k_I = LayerNorm(wk(x)); rope is half-split
(NeoX) on the *first* qk_rope_head_dim dims of both. Selection = top min(index_topk, visible)
keys per query, causal.

Numerics (`numerics=`):
  "exact"      scores from q/k in the compute dtype, float32 accumulation (what transformers does).
  "reference"  the official code: q/k rounded to bf16, Hadamard-rotated, quantised to e4m3 with one
               power-of-two scale per vector; keys cached as e4m3 + one float32 scale per token.
The indexer's inputs (x, qr) are detached: the LM loss cannot reach it (its output is integer
indices anyway) and its own alignment loss (finetune.indexer_loss) cannot reach the main model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import F32Linear, LayerNorm, Linear, rope_half_split
from dsv32_jax.numerics import act_quant, hadamard

NUMERICS = ("exact", "reference")


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs, fp8_block=None):
        self.cfg = cfg
        self.dtype = dtype
        hi, d = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, hi * d, axes=("q_lora", None), dtype=dtype, rngs=rngs,
                           fp8_block=fp8_block)
        self.wk = Linear(cfg.hidden_size, d, axes=("embed", None), dtype=dtype, rngs=rngs,
                         fp8_block=fp8_block)
        self.k_norm = LayerNorm(d, eps=1e-6, rngs=rngs)
        # weights_proj is kept (and computed) in float32, as in the released code.
        self.weights_proj = F32Linear(cfg.hidden_size, hi, axes=("embed", None), rngs=rngs)

    # ------------------------------------------------------------------ projections
    def keys(self, x, cos, sin, numerics: str):
        """x [B, T, D_model] -> (k [B, T, D] (compute dtype, or float8_e4m3fn), k_scale [B, T] f32 | None)."""
        r = self.cfg.qk_rope_head_dim
        k = self.k_norm(self.wk(jax.lax.stop_gradient(x)))
        k = jnp.concatenate([rope_half_split(k[..., :r], cos, sin), k[..., r:]], axis=-1)
        if numerics == "exact":
            return k, None
        return quantize_keys(k)

    def queries(self, x, qr, cos, sin, numerics: str):
        """-> (q [B, T, Hi, D], weights [B, T, Hi] f32) with every positive constant folded into weights."""
        cfg = self.cfg
        hi, d, r = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        x, qr = jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)
        q = self.wq_b(qr).reshape(*qr.shape[:-1], hi, d)
        q = jnp.concatenate([rope_half_split(q[..., :r], cos, sin), q[..., r:]], axis=-1)
        w = self.weights_proj(x) * (hi ** -0.5) * (d ** -0.5)
        if numerics == "exact":
            return q, w
        return quantize_queries(q, w)


def quantize_keys(k):
    """Official key path: k [..., D] -> bf16 -> Hadamard -> (e4m3 [..., D], scale [...] f32)."""
    k8, ks = act_quant(hadamard(k.astype(jnp.bfloat16)), block=_block(k.shape[-1]))
    return k8, ks[..., 0]


def quantize_queries(q, w):
    """Official query path: q [..., Hi, D] -> bf16 -> Hadamard -> e4m3 with one scale per head;
    the scale is folded into the head weights w [..., Hi]. Returns (q8, w * q_scale)."""
    q8, qs = act_quant(hadamard(q.astype(jnp.bfloat16)), block=_block(q.shape[-1]))
    return q8, w * qs[..., 0]


def _block(d: int) -> int:
    """One FP8 scale per vector: the release's index_head_dim is exactly one 128-block."""
    if d > 128:
        raise ValueError(f"reference numerics need index_head_dim <= 128 (one FP8 block), got {d}")
    return d

