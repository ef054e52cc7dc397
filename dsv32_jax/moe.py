"""Feed-forward blocks: the dense SwiGLU MLP and the DeepSeek MoE (spec 2.6).

Router (all float32): score = sigmoid(x @ W_g); the bias `e_score_correction_bias` is added
only for *choosing*: group score = sum of the top-2 biased scores of each of n_group groups,
keep topk_group groups, pick num_experts_per_tok experts among them by biased score; weights
= the unbiased scores of the chosen experts, renormalised (norm_topk_prob) and multiplied by
routed_scaling_factor. The shared expert(s) are added unweighted.

Routed experts run as grouped matmuls (`grouped_matmul`: ragged_dot on TPU/GPU, a tiled scan
whose cost follows the routed rows on CPU) over tokens sorted by expert; on CPU, when every
token through every expert costs little more than the tiled scan (decode batches of a model
with few experts), as three plain matmuls instead (`dense_routed`: no scan, no sort);
FP8 experts through `fp8_ragged_dot` (FP8 tiles, never a dequantised copy of the stack). Each
expert's output is rounded to the compute dtype before the float32 weighted sum, as the
official experts' bf16 Linear outputs are (a no-op for float32 models). With a mesh whose
"expert" axis is > 1 they run expert-parallel (dsv32_jax.expert_parallel); `MoE.exchange` and
`MoE.capacity_factor` (set for a whole model with `set_expert_exchange`) choose the exchange.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.config import ModelConfig
from dsv32_jax.expert_parallel import EXCHANGES, GroupedFFN, expert_parallel_experts
from dsv32_jax.fp8_matmul import fp8_ragged_dot
from dsv32_jax.grouped_matmul import grouped_matmul, tiled_shape
from dsv32_jax.layers import Linear, param
from dsv32_jax.numerics import dequant_blocks

EXPERT_PROJ = ("gate", "up", "down")


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
    """Routed experts stacked for grouped matmuls: gate/up [E, D, I], down [E, I, D]
    (FP8: float8_e4m3fn plus `{name}_scale` [E, ceil(in/b), ceil(out/b)])."""

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

    @property
    def kernel_block(self) -> tuple[int, int] | None:
        """The FP8 tile over each [in, out] expert matrix, or None."""
        return None if self.fp8_block is None else (self.fp8_block[1], self.fp8_block[0])

    def weight(self, name):
        """The stacked `name` weights in the compute dtype (FP8: dequantised whole; for export)."""
        w = getattr(self, name)[...]
        if self.fp8_block is None:
            return w
        return dequant_blocks(w, getattr(self, name + "_scale")[...], self.kernel_block).astype(self.dtype)

    def gmm(self, ops, name, a, sizes):
        """Grouped matmul of rows a [R, in] (sorted by expert) with ops[name] -> float32 [R, out]."""
        w = ops[name]
        if self.fp8_block is None:
            return grouped_matmul(a, w, sizes)
        return fp8_ragged_dot(a, w, ops[name + "_scale"], sizes, self.kernel_block)

    def ffn(self, ops, xs, sizes):
        """SwiGLU of every row with its expert: xs [R, D] -> float32 [R, D]."""
        hdn = jax.nn.silu(self.gmm(ops, "gate", xs, sizes)) * self.gmm(ops, "up", xs, sizes)
        return self.gmm(ops, "down", hdn.astype(xs.dtype), sizes)

    def grouped(self) -> GroupedFFN:
        """The experts as a pure function of their arrays (for the expert-parallel shard_map)."""
        ops, axes = {}, {}
        for name in EXPERT_PROJ:
            roles = ("experts", None, "hidden") if name != "down" else ("experts", "hidden", None)
            ops[name], axes[name] = getattr(self, name).get_value(), roles
            if self.fp8_block is not None:
                ops[name + "_scale"], axes[name + "_scale"] = getattr(self, name + "_scale").get_value(), roles
        granule = 1 if self.fp8_block is None else math.lcm(*self.fp8_block)
        return GroupedFFN(self.ffn, ops, axes, granule)

    def __call__(self, x, weights, experts):
        """x [N, D], weights/experts [N, k] -> [N, D] (float32 combine)."""
        g = self.grouped()
        n, k = experts.shape
        e, d, i = self.gate.shape
        if self.fp8_block is None and dense_is_cheaper(n, k, e, d, i):
            return jax.lax.platform_dependent(g.operands, x, weights, experts, cpu=dense_routed,
                                              default=lambda *a: combine_local(g.fn, *a))
        return combine_local(g.fn, g.operands, x, weights, experts)


# XLA:CPU spends a few microseconds on each step of the tiled scan (slice, matmul, mask,
# update) whatever its size: counted as this many FLOPs of matmul work per step. Measured on
# the tiny test model (D 64, I 32, E 16, k 4) against D 1024, I 512: dense wins at N = 16 and
# 64 tokens there (0.12 vs 0.22 ms, 0.27 vs 0.34 ms a layer), loses from N = 128 and at every N
# of the wider experts (87 vs 29 ms at N = 16).
SCAN_STEP_FLOPS = 100_000


def dense_is_cheaper(n: int, k: int, e: int, d: int, i: int) -> bool:
    """Whether `dense_routed` (N x E expert rows) beats the tiled grouped matmul on CPU for N
    tokens with k of E experts each (D model dim, I expert width): its extra rows over the
    scan's (tiles + E - 1) x tile cost less than the scan's three loops' step overhead."""
    pairs, tile = tiled_shape(n * k, e)
    extra_flops = (n * e - pairs * tile) * 6 * d * i
    return extra_flops <= 3 * pairs * SCAN_STEP_FLOPS


def dense_routed(ops, x, weights, experts):
    """Every token through every expert, the k chosen outputs summed with their weights:
    x [N, D], weights/experts [N, k] -> float32 [N, D].

    Batched matmuls over the stacked weights (gate/up [E, D, I], down [E, I, D]): gate and up
    per expert on every token, the SwiGLU in float32, then each token's hidden rows scaled by
    its routing weight per expert (0 for the unchosen ones) and one down contraction over
    experts and hidden units together, which does the weighted sum as it contracts. float32
    models: the numerics of `combine_local` up to the order of the float32 sums. Other dtypes
    keep its rounding of each expert's output to x's dtype before the weighted sum."""
    f32 = jnp.float32
    e = ops["gate"].shape[0]
    with jax.named_scope("dense_experts"):
        xe = jnp.broadcast_to(x, (e,) + x.shape)                                  # [E, N, D]
        gate = jnp.einsum("end,edi->eni", xe, ops["gate"].astype(x.dtype), preferred_element_type=f32)
        up = jnp.einsum("end,edi->eni", xe, ops["up"].astype(x.dtype), preferred_element_type=f32)
        hdn = jax.nn.silu(gate) * up                                              # [E, N, I]
        coef = jnp.sum(jnp.where(experts[None] == jnp.arange(e)[:, None, None],
                                 weights.astype(f32)[None], 0.0), axis=2)           # [E, N]
        down = ops["down"].astype(x.dtype)
        if x.dtype == f32:
            return jnp.einsum("eni,eid->nd", hdn * coef[:, :, None], down, precision=jax.lax.Precision.HIGHEST)
        y = jnp.einsum("eni,eid->end", hdn.astype(x.dtype), down, preferred_element_type=f32)
        return jnp.einsum("end,en->nd", y.astype(x.dtype).astype(f32), coef)


def combine_local(fn, ops, x, weights, experts):
    """Single-device routed experts: sort the N*k assignments by expert, fn(ops, xs, sizes),
    round each output to x's dtype and sum with the weights in float32 -> [N, D]."""
    n, k = experts.shape
    num_e = ops["gate"].shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = jnp.take(x, order // k, axis=0)
    sizes = jnp.bincount(flat, length=num_e).astype(jnp.int32)
    ys = fn(ops, xs, sizes).astype(x.dtype)                                   # [N*k, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights.astype(jnp.float32))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs, fp8_block=None, mesh=None, exchange: str = "auto",
                 capacity_factor: float | None = None):
        self.mesh = mesh
        self.exchange = exchange
        self.capacity_factor = capacity_factor
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
            routed = expert_parallel_experts(flat, w, e, self.experts.grouped(), self.mesh,
                                             exchange=self.exchange, capacity_factor=self.capacity_factor)
        else:
            routed = self.experts(flat, w, e)
        y = routed + self.shared(flat).astype(jnp.float32)
        return y.astype(x.dtype).reshape(shape)


def set_expert_exchange(model, exchange: str = "auto", capacity_factor: float | None = None):
    """Choose the expert-parallel exchange of every MoE layer of `model`.

    model: a Transformer (changed in place and returned) or a loaded `dsv32_jax.Model` (its
    module is changed; a new Model is returned, since the old one's jitted functions hold the
    previous static structure). exchange: "auto" (padded on the CPU backend, ragged
    elsewhere), "ragged", "padded" or "emulated" (see dsv32_jax.expert_parallel).
    capacity_factor: None = dropless, else the receive buffer holds cf x the average
    assignments per device (overflow dropped). Set it before jitting.
    """
    from dsv32_jax.loading import Model

    if isinstance(model, Model):
        return Model(set_expert_exchange(model.module, exchange, capacity_factor))
    if exchange not in EXCHANGES:
        raise ValueError(f"error: expert exchange {exchange!r} is not one of {EXCHANGES}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"error: capacity_factor must be > 0, got {capacity_factor}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoE):
            node.exchange = exchange
            node.capacity_factor = capacity_factor
    return model
