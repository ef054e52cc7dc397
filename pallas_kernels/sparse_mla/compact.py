"""The compact FP8 latent cache the sparse MLA ops read (FlashMLA's FP8 KV format).

Per cached token: the latent c as float8_e4m3fn with one float32 scale per `block` values,
and the rope key in the compute dtype. At DeepSeek-V3.2's dims (c 512, 4 scales, rope 64 bf16)
that is 512 + 16 + 128 = 656 bytes instead of 1152 for a bf16 [c | k_pe] row. The entry the
ops attend to is the dequantised row

    kv[b, l] = [ (latent[b, l, i] as f32) * scale[b, l, i // block]  for i < Dv  |  rope[b, l] ]

cast to the compute dtype (rope's dtype); the value is its first Dv = v_dim columns. The ops
dequantise only the rows they gather (the kernels inside their gather loop), never the cache.
The three arrays are kept apart (not one packed byte row) so that each has a plain dtype for
the kernels' DMAs and loads, and a batch split over a mesh splits all three alike.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CompactKV:
    """latent [B, L, Dv] float8_e4m3fn, scale [B, L, Dv // block] float32, rope [B, L, Dr]
    (compute dtype). Dk = Dv + Dr as for a dense kv [B, L, Dk]. A stacked cache (one per scanned
    layer, read with `layer=`) has the three arrays [n, B, L, ...]."""
    latent: jax.Array
    scale: jax.Array
    rope: jax.Array

    @property
    def shape(self):
        """(B, L, Dk) (stacked: (n, B, L, Dk)) of the dense rows it stands for."""
        return (*self.latent.shape[:-1], self.latent.shape[-1] + self.rope.shape[-1])

    @property
    def dtype(self):
        """The compute dtype of the dequantised rows."""
        return self.rope.dtype

    @property
    def v_dim(self) -> int:
        return self.latent.shape[-1]

    @property
    def block(self) -> int:
        """Latent values per scale."""
        return self.latent.shape[-1] // self.scale.shape[-1]

    def row_bytes(self) -> int:
        """Bytes per cached token."""
        return sum(x.shape[-1] * jnp.dtype(x.dtype).itemsize for x in (self.latent, self.scale, self.rope))


def check(kv: CompactKV, v_dim: int) -> None:
    """ValueError unless the three arrays form one cache ([B, L, ...] or stacked [n, B, L, ...])
    whose latent is the value (v_dim)."""
    lead, dv = kv.latent.shape[:-1], kv.latent.shape[-1]
    ns = kv.scale.shape[-1]
    if kv.latent.dtype != jnp.float8_e4m3fn or kv.scale.dtype != jnp.float32:
        raise ValueError(f"error: sparse_mla: compact kv wants latent float8_e4m3fn and scale float32, got "
                         f"{kv.latent.dtype} / {kv.scale.dtype}")
    if kv.scale.shape[:-1] != lead or kv.rope.shape[:-1] != lead or ns == 0 or dv % ns:
        raise ValueError(f"error: sparse_mla: compact kv shapes do not match: latent {kv.latent.shape}, scale "
                         f"{kv.scale.shape}, rope {kv.rope.shape}")
    if v_dim != dv:
        raise ValueError(f"error: sparse_mla: v_dim {v_dim} must equal the compact latent width {dv}")


def dequantize(latent, scale, rope):
    """Rows of a compact cache -> dense rows: latent [..., Dv] e4m3, scale [..., Dv // block] f32,
    rope [..., Dr] -> [..., Dv + Dr] in rope's dtype (the latent as f32 * its block's scale)."""
    dv, ns = latent.shape[-1], scale.shape[-1]
    blocks = latent.astype(jnp.float32).reshape(*latent.shape[:-1], ns, dv // ns) * scale[..., None]
    return jnp.concatenate([blocks.reshape(latent.shape).astype(rope.dtype), rope], axis=-1)


def dense(kv: CompactKV):
    """The whole cache dequantised, [B, L, Dk] (tests and references only; the ops never do this)."""
    return dequantize(kv.latent, kv.scale, kv.rope)


def _take_stacked(x, indices, layer):
    """x [n, B, L, W], indices [B, ...] -> x[layer, b, indices[b, ...]] [B, ..., W]: one gather
    with index (layer, b, idx), never a [B, L, W] slice of the layer."""
    b = jnp.arange(x.shape[1], dtype=jnp.int32).reshape((-1,) + (1,) * (indices.ndim - 1))
    return x[layer, b, indices]


def gather(kv, indices, layer=None):
    """Rows kv[b, indices[b, ...]] of a dense [B, L, Dk] or compact cache -> [B, ..., Dk] in the
    cache's (compute) dtype; indices must be valid (>= 0). A compact cache is dequantised after
    the gather, so only the selected rows are ever dequantised.
    layer: None, or an int32 scalar for a stacked cache [n, B, L, ...]: rows of kv[layer] gathered
    straight from the stacked arrays."""
    if layer is None:
        take = jax.vmap(lambda x, i: x[i])
    else:
        take = lambda x, i: _take_stacked(x, i, layer)                # noqa: E731
    if isinstance(kv, CompactKV):
        return dequantize(take(kv.latent, indices), take(kv.scale, indices), take(kv.rope, indices))
    return take(kv, indices)


def take_flat(kv, flat):
    """Rows of the cache flattened to [B * L, Dk] at flat indices b * L + l -> [..., Dk]
    (a stacked cache [n, B, L, Dk]: flattened to [n * B * L, Dk], flat = (layer * B + b) * L + l;
    the flattening is a reshape, no copy)."""
    if isinstance(kv, CompactKV):
        f = lambda x: x.reshape(-1, x.shape[-1])[flat]               # noqa: E731
        return dequantize(f(kv.latent), f(kv.scale), f(kv.rope))
    kv = kv.reshape(-1, kv.shape[-1])
    if kv.dtype == jnp.bfloat16:
        # gather the bits: XLA:CPU gathers bfloat16 through a float32 copy of the whole cache
        return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(kv, jnp.uint16)[flat], jnp.bfloat16)
    return kv[flat]
