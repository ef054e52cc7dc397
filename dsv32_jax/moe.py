"""Feed-forward blocks: the dense SwiGLU MLP and the DeepSeek MoE (spec 2.6).

Router (all float32): score = sigmoid(x @ W_g); the bias `e_score_correction_bias` is added
only for *choosing*: group score = sum of the top-2 biased scores of each of n_group groups,
keep topk_group groups, pick num_experts_per_tok experts among them by biased score; weights
= the unbiased scores of the chosen experts, renormalised (norm_topk_prob) and multiplied by
routed_scaling_factor. The shared expert(s) are added unweighted.

Routed experts run as grouped matmuls (`jax.lax.ragged_dot`) over tokens sorted by expert.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.config import ModelConfig
from dsv32_jax.expert_parallel import expert_parallel_experts
from dsv32_jax.layers import Linear, param
from dsv32_jax.numerics import dequant_blocks


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)); silu and the product in float32."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs, fp8_block=None):
        lin = dict(dtype=dtype, rngs=rngs, fp8_block=fp8_block)
        self.gate = Linear(dim, hidden, axes=("embed", "mlp"), **lin)
        self.up = Linear(dim, hidden, axes=("embed", "mlp"), **lin)
        self.down = Linear(hidden, dim, axes=("mlp", "embed"), **lin)

    def __call__(self, x):
        g = self.gate(x).astype(jnp.float32)
        u = self.up(x).astype(jnp.float32)
        return self.down((jax.nn.silu(g) * u).astype(x.dtype))


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs):
        self.cfg = cfg
        self.kernel = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), jnp.float32, ("embed", None))
        self.bias = param(rngs, (cfg.n_routed_experts,), jnp.float32, (None,), init="zeros")

    def __call__(self, x):
        """x [N, D] -> (weights [N, k] f32, experts [N, k] int32, scores [N, E] f32)."""
        cfg = self.cfg
        n = x.shape[0]
        logits = jnp.dot(x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST)
        scores = jax.nn.sigmoid(logits)
        biased = scores + self.bias[...]
        groups = biased.reshape(n, cfg.n_group, -1)
        group_scores = jax.lax.top_k(groups, 2)[0].sum(-1)                       # [N, G]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.sum(jax.nn.one_hot(keep, cfg.n_group, dtype=jnp.bool_), axis=1)
        expert_mask = jnp.repeat(group_mask, cfg.n_routed_experts // cfg.n_group, axis=1)
        _, experts = jax.lax.top_k(jnp.where(expert_mask, biased, -jnp.inf), cfg.num_experts_per_tok)
        w = jnp.take_along_axis(scores, experts, axis=1)
        if cfg.norm_topk_prob:
            w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
        return w * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores


class Experts(nnx.Module):
    """Routed experts stacked for grouped matmuls: gate/up [E, D, I], down [E, I, D]."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs, fp8_block=None):
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.dtype = dtype
        self.fp8_block = fp8_block
        for name, shape, axes in (("gate", (e, d, i), ("experts", "embed", "mlp")),
                                  ("up", (e, d, i), ("experts", "embed", "mlp")),
                                  ("down", (e, i, d), ("experts", "mlp", "embed"))):
            if fp8_block is None:
                setattr(self, name, param(rngs, shape, dtype, axes))
            else:
                setattr(self, name, param(rngs, shape, jnp.float8_e4m3fn, axes, init="zeros"))
                sshape = (e, math.ceil(shape[1] / fp8_block[1]), math.ceil(shape[2] / fp8_block[0]))
                setattr(self, name + "_scale", param(rngs, sshape, jnp.float32, ("experts", None, None),
                                                     init="ones"))

    def weight(self, name):
        w = getattr(self, name)[...]
        if self.fp8_block is None:
            return w
        bt = (self.fp8_block[1], self.fp8_block[0])
        return dequant_blocks(w, getattr(self, name + "_scale")[...], bt).astype(self.dtype)

    def __call__(self, x, weights, experts):
        """x [N, D], weights/experts [N, k] -> [N, D] (float32 combine)."""
        n, k = experts.shape
        num_e = self.gate.shape[0]
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        xs = jnp.take(x, order // k, axis=0)
        sizes = jnp.bincount(flat, length=num_e).astype(jnp.int32)

        def gmm(a, w):
            return jax.lax.ragged_dot(a, w.astype(a.dtype), sizes, preferred_element_type=jnp.float32)

        hdn = jax.nn.silu(gmm(xs, self.weight("gate"))) * gmm(xs, self.weight("up"))
        ys = gmm(hdn.astype(x.dtype), self.weight("down"))                        # [N*k, D] f32
        y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
        return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs, fp8_block=None, mesh=None):
        self.mesh = mesh
        self.router = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs, fp8_block=fp8_block)
        self.shared = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                          dtype=dtype, rngs=rngs, fp8_block=fp8_block)

    def __call__(self, x):
        """x [B, T, D] -> [B, T, D]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, e, _ = self.router(flat)
        if self.mesh is not None and self.mesh.shape.get("expert", 1) > 1:
            ex = self.experts
            routed = expert_parallel_experts(flat, w, e, ex.weight("gate"), ex.weight("up"), ex.weight("down"),
                                             self.mesh)
        else:
            routed = self.experts(flat, w, e)
        y = routed + self.shared(flat).astype(jnp.float32)
        return y.astype(x.dtype).reshape(shape)
