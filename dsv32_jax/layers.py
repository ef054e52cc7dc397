"""Basic layers: parameters with logical axes, Linear (optionally FP8 block-scaled), norms, YaRN rope.

Every parameter is created through `param(...)`, which records its *logical* axis names as
variable metadata (`axes`). Sharding (dsv32_jax.sharding), initialisation and the checkpoint
layout (dsv32_jax.params) all read that one declaration.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv32_jax.bits import take_rows
from dsv32_jax.config import ModelConfig
from dsv32_jax.fp8_matmul import fp8_matmul
from dsv32_jax.numerics import dequant_blocks

INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, shape, dtype, axes: tuple, init: str = "normal") -> nnx.Param:
    """Declare one parameter: shape, dtype and logical axis names (one name per dim, None = replicated)."""
    assert len(axes) == len(shape), (shape, axes)
    if init == "normal":
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * INIT_STD).astype(dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(init)
    return nnx.Param(value, axes=tuple(axes))


def matmul(x, w):
    """x [..., K] @ w [K, N] with float32 accumulation, result in x's dtype."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel, kernel [in, out] (the transpose of the Hugging Face [out, in] weight).

    With `fp8_block` set, `kernel` is stored as float8_e4m3fn and `kernel_scale`
    [ceil(in/b), ceil(out/b)] holds the per-tile dequantisation scale (the checkpoint's
    `weight_scale_inv`, transposed); the forward is a block-scaled matmul that keeps the
    kernel in FP8 (`dsv32_jax.fp8_matmul`, no full-size dequantised copy); `weight()` still
    returns the dequantised kernel for export, merges and reshaped uses.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple, dtype, rngs,
                 fp8_block: tuple[int, int] | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.fp8_block = fp8_block
        if fp8_block is None:
            self.kernel = param(rngs, (in_features, out_features), dtype, axes)
        else:
            self.kernel = param(rngs, (in_features, out_features), jnp.float8_e4m3fn, axes, init="zeros")
            shape = (math.ceil(in_features / fp8_block[1]), math.ceil(out_features / fp8_block[0]))
            self.kernel_scale = param(rngs, shape, jnp.float32, (None, None), init="ones")

    @property
    def kernel_block(self) -> tuple[int, int] | None:
        """The FP8 tile over the [in, out] kernel: (rows of in, columns of out), or None."""
        return None if self.fp8_block is None else (self.fp8_block[1], self.fp8_block[0])

    def weight(self):
        """The kernel in the compute dtype, [in, out] (FP8: dequantised whole)."""
        if self.fp8_block is None:
            return self.kernel[...]
        return dequant_blocks(self.kernel[...], self.kernel_scale[...], self.kernel_block).astype(self.dtype)

    def __call__(self, x):
        """x [..., in] -> [..., out] in x's dtype (float32 accumulation)."""
        if self.fp8_block is None:
            return matmul(x, self.kernel[...])
        return fp8_matmul(x, self.kernel[...], self.kernel_scale[...], self.kernel_block)


class F32Linear(nnx.Module):
    """A linear held and computed in float32 (indexer weights_proj, MoE router): x is upcast."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple, rngs):
        self.kernel = param(rngs, (in_features, out_features), jnp.float32, axes)

    def __call__(self, x):
        return jnp.dot(x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST)


class Embed(nnx.Module):
    """Token embedding [vocab, D]."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs):
        self.embedding = param(rngs, (vocab, dim), dtype, ("vocab", "embed"))

    def __call__(self, ids):
        return take_rows(self.embedding[...], ids)


class RMSNorm(nnx.Module):
    """w * x / sqrt(mean(x^2) + eps), computed in float32 with the weight held in float32."""

    def __init__(self, dim: int, *, eps: float, rngs, axis_name=None):
        self.eps = eps
        self.scale = param(rngs, (dim,), jnp.float32, (axis_name,), init="ones")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Mean-centred LayerNorm with weight and bias (the indexer's k_norm), float32 compute."""

    def __init__(self, dim: int, *, eps: float, rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), jnp.float32, (None,), init="ones")
        self.bias = param(rngs, (dim,), jnp.float32, (None,), init="zeros")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


# ---------------------------------------------------------------------------------- rope
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """The qk_rope_head_dim/2 YaRN frequencies (spec 2.3), float32 [R/2]."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrap = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type != "yarn":
        return extrap
    factor = cfg.rope_factor
    interp = (1.0 / (factor * pos_freqs)).astype(np.float32)

    def corr_dim(rot):
        return dim * math.log(cfg.rope_original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (interp * (1 - keep) + extrap * keep).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's cos/sin multiplier: mscale(mscale)/mscale(mscale_all_dim) (1.0 in the release)."""
    if cfg.rope_type != "yarn":
        return 1.0

    def ms(scale, m):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return ms(cfg.rope_factor, cfg.rope_mscale) / ms(cfg.rope_factor, cfg.rope_mscale_all_dim)
    return ms(cfg.rope_factor, 1.0)


def rope_cos_sin(cfg: ModelConfig, positions):
    """positions int [..., T] -> (cos, sin) float32 [..., T, R/2]."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = positions.astype(jnp.float32)[..., None] * inv
    f = rope_attention_factor(cfg)
    return jnp.cos(ang) * f, jnp.sin(ang) * f


def rope_interleaved(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) (MLA layout). x [B, T, ..., R]; cos/sin [B, T, R/2]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    extra = x.ndim - cos.ndim
    c = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    s = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    y = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    return y.astype(x.dtype)


def rope_half_split(x, cos, sin):
    """Rotate pairs (x[i], x[i + R/2]) (the indexer's NeoX layout). x [B, T, ..., R]."""
    x32 = x.astype(jnp.float32)
    h = x.shape[-1] // 2
    x1, x2 = x32[..., :h], x32[..., h:]
    extra = x.ndim - cos.ndim
    c = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    s = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
