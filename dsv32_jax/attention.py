"""Multi-head Latent Attention with DeepSeek Sparse Attention (spec 2.4, 2.5).

Attention always runs in the absorbed (MQA) form over the cached 576-d entries
[normalised latent c (kv_lora_rank) | rotated shared rope key k_pe (qk_rope_head_dim)]:

    q_abs[h]  = q_nope[h] @ W_UK[h]^T                     (W_UK = kv_b rows [0:nope) of head h)
    logits    = softmax_scale * [q_abs | q_pe] . [c | k_pe]   over the indexer-selected keys
    o[h]      = (softmax @ c) @ W_UV[h]^T                  (W_UV = kv_b rows [nope:nope+v) of head h)

In float32 this equals the expanded (MHA) form transformers uses. The two ops that touch the
keys, `indexer_topk` and `sparse_mla`, come from `pallas_kernels` through one seam:
`attention_impl`:
  "auto"       (default) "pallas" on TPU/GPU, "xla" on CPU;
  "xla"        plain jnp shaped for the backend: on CPU the reference indexer and the blockwise
               sparse attention (one query row per step, float32); on TPU/GPU batched rows with
               operands in the compute dtype and float32 accumulation; both sparse attentions
               with the kernels' custom_vjp backward;
  "pallas"     the TPU/GPU kernels;
  "interpret"  the kernels in Pallas interpret mode (the TPU ones unless kernel_backend="gpu"),
               for CPU tests.
`kernel_backend` ("tpu" | "gpu" | None = the platform jax runs on) picks whose kernels and
XLA shapes are used; set it explicitly to lower for another platform than the host's.
Under a mesh both ops run inside `jax.shard_map` on their per-device slices, with the specs
decided in `dsv32_jax.kernel_sharding` (no collective in attention when the batch is split).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.config import ModelConfig
from dsv32_jax.fp8_matmul import fp8_head_einsum
from dsv32_jax.indexer import Indexer
from dsv32_jax.layers import Linear, RMSNorm, rope_interleaved
from dsv32_jax.numerics import act_quant, fp8_round_trip
from dsv32_jax.kernel_sharding import sharded_indexer_topk, sharded_sparse_mla
from dsv32_jax.bits import bits_dtype
from dsv32_jax.sharding import spec_for
from pallas_kernels.common import platform_backend
from pallas_kernels.sparse_mla import CompactKV

# attention_impl -> (indexer_topk impl, sparse_mla impl); "auto" is resolved by resolve_attention
ATTENTION_IMPLS = {"auto": None, "xla": ("xla", "xla"), "pallas": ("pallas", "pallas"),
                   "interpret": ("interpret", "interpret")}
KERNEL_BACKENDS = ("tpu", "gpu")
# Query chunk of the plain-XLA path: bounds the [B, chunk, Hi, L] indexer logits and the
# [B, chunk, K, 576] gathered rows of a long prefill.
XLA_QUERY_CHUNK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """Static per-layer cache, preallocated to S slots.

    Dense (kv_cache="dense"):
      latent: [B, S, kv_lora_rank + qk_rope_head_dim] (normalised latent | rotated rope key)
    Compact (kv_cache="fp8", FlashMLA's FP8 layout: 656 B per token at the release's dims):
      latent: [B, S, kv_lora_rank] float8_e4m3fn (the normalised latent, quantised as the
        official FP8 KV-cache simulation does: per-128 ue8m0 scales, numerics.act_quant),
      latent_scale: [B, S, kv_lora_rank // 128] float32, rope: [B, S, qk_rope_head_dim].
    index_k: [B, S, index_head_dim] (compute dtype, or float8_e4m3fn in reference numerics)
    index_k_scale: [B, S] float32, or None when keys are not quantised.
    latent_scale / rope: None in a dense cache.
    """
    latent: jax.Array
    index_k: jax.Array
    index_k_scale: jax.Array | None
    latent_scale: jax.Array | None = None
    rope: jax.Array | None = None

    @property
    def keys(self):
        """What the sparse MLA attends to: the dense latent, or a CompactKV of the three arrays."""
        if self.latent_scale is None:
            return self.latent
        return CompactKV(self.latent, self.latent_scale, self.rope)

    def as_bits(self) -> "LayerCache":
        """The same cache with its narrow float arrays (bfloat16, float8_e4m3fn) held as their
        unsigned-int bits (uint16, uint8). XLA:CPU updates such arrays in place, whereas it
        writes one row of a bfloat16 cache by converting the whole cache to float32 and back
        (or, for bitcast views, by a full copy) — per layer and per decode step. Readers see
        the float values through `view()`; `write` takes float rows either way."""
        held = {f: b for b, f in BITS_HOLD.items()}
        return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, held[jnp.dtype(x.dtype)])
                            if jnp.dtype(x.dtype) in held else x, self)

    def view(self) -> "LayerCache":
        """The cache with bit-held arrays seen as their floats (uint16 -> bfloat16, uint8 ->
        float8_e4m3fn); a cache of floats is returned as is."""
        return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, BITS_HOLD[jnp.dtype(x.dtype)])
                            if jnp.dtype(x.dtype) in BITS_HOLD else x, self)

    def write(self, positions, latent, index_k, index_k_scale, layer=None):
        """Store entries of tokens at absolute `positions` [B, T] (slot = position): latent
        [B, T, Dk] for a dense cache, a CompactKV of [B, T, ...] rows for a compact one.
        layer: None, or an int32 scalar when the cache is a stack of layers' caches (leaves
        [n, B, S, ...]): the rows go to that layer's cache, in place.

        Each row scatters into its own sequence (a scatter batched over B), so a batch split
        over devices is written without any collective."""
        rows = LayerCache(latent, index_k, index_k_scale)
        if isinstance(latent, CompactKV):
            rows = LayerCache(latent.latent, index_k, index_k_scale, latent.scale, latent.rope)
        if self.index_k_scale is None:
            rows.index_k_scale = None
        with jax.named_scope("cache_write"):
            return jax.tree.map(lambda c, r: _scatter_rows(c, positions, r, layer), self, rows)


def latent_block(cfg: ModelConfig) -> int:
    """Latent values per FP8 scale of the KV-latent quantisation (128; the whole latent when
    kv_lora_rank is not a multiple of 128, as in tiny test models)."""
    r = cfg.kv_lora_rank
    return 128 if r % 128 == 0 else r


def resolve_attention(attention_impl: str, kernel_backend: str | None = None):
    """-> (indexer_topk impl, sparse_mla impl, backend "tpu" | "gpu" | None) for this trace.

    kernel_backend None means the platform jax runs on (None on CPU).
    """
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {tuple(ATTENTION_IMPLS)}, got {attention_impl!r}")
    if kernel_backend is not None and kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS} or None, got {kernel_backend!r}")
    backend = kernel_backend or platform_backend()
    if attention_impl == "auto":
        attention_impl = "xla" if backend is None else "pallas"
    elif attention_impl == "interpret":
        backend = kernel_backend or "tpu"
    elif attention_impl == "pallas" and backend is None:
        raise ValueError("attention_impl='pallas' needs a TPU or GPU (or kernel_backend='tpu'|'gpu' to "
                         "lower for one); use 'xla' or 'interpret' on CPU")
    index_impl, attn_impl = ATTENTION_IMPLS[attention_impl]
    return index_impl, attn_impl, backend


def _scatter_rows(cache, positions, rows, layer=None):
    """cache[b, positions[b]] = rows[b] for every b, in place: cache [B, S, ...], positions [B, T],
    rows [B, T, ...]; with `layer` (int32 scalar) the cache is a stack [n, B, S, ...] and
    cache[layer, b, positions[b]] = rows[b]. Positions past the cache are dropped.

    One scatter batched over B (the batch is a batching dimension of the scatter, never moved), so
    a batch split over devices is written without a collective and the cache is updated in place.
    Narrow float caches (float8, bf16) are scattered as their unsigned-int bits: XLA has no float8
    scatter on some backends, and XLA:CPU scatters bf16 by converting the whole cache to float32
    and back (two full passes over every layer's cache per decode step)."""
    if jnp.dtype(cache.dtype) in BITS_HOLD:                              # a bit-held cache (as_bits)
        bits = jax.lax.bitcast_convert_type(rows.astype(BITS_HOLD[jnp.dtype(cache.dtype)]), cache.dtype)
        return _scatter(cache, positions, bits, layer)
    rows = rows.astype(cache.dtype)
    ub = bits_dtype(cache.dtype)
    if ub is None:
        return _scatter(cache, positions, rows, layer)
    bits = _scatter(jax.lax.bitcast_convert_type(cache, ub), positions,
                    jax.lax.bitcast_convert_type(rows, ub), layer)
    return jax.lax.bitcast_convert_type(bits, cache.dtype)


def _scatter(cache, positions, rows, layer):
    """The scatter of `_scatter_rows` (rows already in the cache's dtype)."""
    lead = 0 if layer is None else 1                                     # the batch axis of the cache
    pos = positions.astype(jnp.int32)[..., None]                         # [B, T, 1]
    if layer is not None:
        pos = jnp.concatenate([jnp.broadcast_to(jnp.asarray(layer, jnp.int32), pos.shape), pos], axis=-1)
    n_feat = cache.ndim - lead - 2
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(2, 2 + n_feat)),
        inserted_window_dims=(0, 2) if lead else (1,),
        scatter_dims_to_operand_dims=(0, 2) if lead else (1,),
        operand_batching_dims=(lead,), scatter_indices_batching_dims=(0,))
    return jax.lax.scatter(cache, pos, rows, dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


# unsigned-int bits -> the float they hold in a bit-held cache (LayerCache.as_bits)
BITS_HOLD = {jnp.dtype(jnp.uint16): jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint8): jnp.dtype(jnp.float8_e4m3fn)}


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs, fp8_block=None, mesh=None, kernel_backend=None):
        """mesh: the model's Mesh (the attention ops then run under shard_map) or None;
        kernel_backend: "tpu" | "gpu" | None (the platform's), see resolve_attention."""
        self.cfg = cfg
        self.dtype = dtype
        self.mesh = mesh
        self.kernel_backend = kernel_backend
        h = cfg.num_attention_heads
        lin = dict(dtype=dtype, rngs=rngs, fp8_block=fp8_block)
        self.q_a = Linear(cfg.hidden_size, cfg.q_lora_rank, axes=("embed", "q_lora"), **lin)
        self.q_norm = RMSNorm(cfg.q_lora_rank, eps=1e-6, rngs=rngs)
        self.q_b = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, axes=("q_lora", "heads"), **lin)
        self.kv_a = Linear(cfg.hidden_size, cfg.kv_dim, axes=("embed", None), **lin)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=1e-6, rngs=rngs)
        self.kv_b = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                           axes=("kv_lora", "heads"), **lin)
        self.o = Linear(h * cfg.v_head_dim, cfg.hidden_size, axes=("heads", "embed"), **lin)
        self.indexer = Indexer(cfg, dtype=dtype, rngs=rngs, fp8_block=fp8_block)

    def latent(self, x, cos, sin, numerics, compact: bool = False):
        """x [B, T, D] -> cache entries [B, T, kv_lora_rank + rope]; compact=True: the same
        entries as a CompactKV (e4m3 latent [B, T, kv_lora_rank] + float32 scales + rope),
        from the very quantisation whose round trip the reference numerics apply."""
        r = self.cfg.kv_lora_rank
        kv = self.kv_a(x)
        c = self.kv_norm(kv[..., :r])
        k_pe = rope_interleaved(kv[..., r:], cos, sin)
        if compact:
            q8, scale = act_quant(c, latent_block(self.cfg))
            return CompactKV(q8, scale, k_pe)
        if numerics == "reference":       # the release's FP8 KV-cache simulation (128-blocks)
            c = fp8_round_trip(c, block=latent_block(self.cfg))
        return jnp.concatenate([c, k_pe], axis=-1)

    def __call__(self, x, positions, cos, sin, *, numerics="exact", attention_impl="auto",
                 cache: LayerCache | None = None, kv_lengths=None, q_starts=None, layer=None):
        """x [B, T, D], positions [B, T] int32 absolute, cos/sin [B, T, rope/2].

        Without a cache, the keys are this call's tokens: key slot = token index 0..T-1, and
        causality runs over slots (positions only feed rope through cos/sin). q_starts [B, T]
        int32 or None: lowest visible key slot per query (packed rows: the segment start).
        With a cache, this call's entries are written at `positions` and the keys are the
        whole cache; `kv_lengths` [B] bounds the valid slots. layer: None, or an int32 scalar
        when `cache` holds the caches of a stack of layers (leaves [n, B, S, ...], the scan of
        model.BlockStack): this layer's entries are written and read in place, never copied out.
        Returns (out [B, T, D], indices [B, T, K] int32, new cache or None).
        """
        with jax.named_scope("mla"):
            return self._attention(x, positions, cos, sin, numerics, attention_impl, cache, kv_lengths, q_starts,
                                   layer)

    def absorbed_queries(self, x, cos, sin):
        """x [B, T, D] -> (q_full [B, T, H, kv_lora_rank + rope] with W_UK folded in, the
        normed query latent qr [B, T, q_lora_rank], the kv_b Linear (see kv_b_product))."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        qr = self.q_norm(self.q_a(x))
        q = self.q_b(qr).reshape(b, t, h, cfg.qk_head_dim)
        q_pe = rope_interleaved(q[..., nope:], cos, sin)
        q_abs = self.kv_b_product("bthn,chn->bthc", q[..., :nope], (0, nope))
        return jnp.concatenate([q_abs, q_pe], axis=-1), qr, self.kv_b

    def kv_b_product(self, spec, x, cols):
        """einsum(spec, x [B, T, H, X], kv_b as [kv_lora_rank, H, nope + v][:, :, cols[0]:cols[1]])
        in x's dtype with float32 accumulation. W_UK: cols (0, nope); W_UV: (nope, nope + v).

        FP8 kv_b is dequantised a few heads at a time inside the product
        (`fp8_matmul.fp8_head_einsum`): no full-size dequantised copy of it exists per call."""
        cfg = self.cfg
        h, p = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim
        c0, c1 = cols
        lin = self.kv_b
        if getattr(lin, "fp8_block", None) is not None:
            tile = spec.replace("h", "a")                 # over a tile of A heads
            shards = 1
            if self.mesh is not None:
                part = spec_for(lin.kernel.get_metadata().get("axes"), lin.kernel.shape, self.mesh)[1]
                for ax in ((part,) if isinstance(part, str) else (part or ())):
                    shards *= self.mesh.shape[ax]
            return fp8_head_einsum(tile, x, lin.kernel[...], lin.kernel_scale[...], lin.kernel_block, heads=h,
                                   cols=cols, head_shards=shards)
        w = lin.weight().reshape(cfg.kv_lora_rank, h, p)[..., c0:c1]
        return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)

    def _attention(self, x, positions, cos, sin, numerics, attention_impl, cache, kv_lengths, q_starts, layer):
        cfg = self.cfg
        b, t, _ = x.shape
        h, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        q_full, qr, _ = self.absorbed_queries(x, cos, sin)                    # [B, T, H, 576]

        latent = self.latent(x, cos, sin, numerics, compact=cache is not None and cache.latent_scale is not None)
        ik, iks = self.indexer.keys(x, cos, sin, numerics)
        iq, iw = self.indexer.queries(x, qr, cos, sin, numerics)
        if cache is None:
            keys, index_k, index_k_scale = latent, ik, iks
            q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            cache = cache.write(positions, latent, ik, iks, layer)
            seen = cache.view()
            keys, index_k, index_k_scale = seen.keys, seen.index_k, seen.index_k_scale
            q_positions = positions.astype(jnp.int32)

        index_impl, attn_impl, backend = resolve_attention(attention_impl, self.kernel_backend)
        mesh = self.mesh
        on_layer = {} if cache is None or layer is None else {"layer": layer}

        def attend(q_full_c, iq_c, iw_c, qpos_c, qst_c=None):
            idx = sharded_indexer_topk(iq_c, index_k, iw_c, mesh=mesh, topk=cfg.index_topk,
                                       q_positions=qpos_c, k_scale=index_k_scale, kv_lengths=kv_lengths,
                                       q_starts=qst_c, impl=index_impl, backend=backend, **on_layer)
            o = sharded_sparse_mla(q_full_c, keys, idx, mesh=mesh, softmax_scale=cfg.softmax_scale,
                                   v_dim=cfg.kv_lora_rank, impl=attn_impl, backend=backend, **on_layer)
            return o, idx

        args = (q_full, iq, iw, q_positions) + (() if q_starts is None else (q_starts.astype(jnp.int32),))
        if index_impl in ("reference", "xla") and t > XLA_QUERY_CHUNK:
            o_lat, idx = _map_query_chunks(attend, args, XLA_QUERY_CHUNK)
        else:
            o_lat, idx = attend(*args)
        o = self.kv_b_product("bthc,chv->bthv", o_lat.astype(x.dtype), (nope, nope + v))
        return self.o(o.reshape(b, t, h * v)), idx, cache


def _map_query_chunks(fn, args, chunk):
    """Apply fn over chunks of the T axis (axis 1) of every arg with lax.map; pads T to a multiple."""
    t = args[0].shape[1]
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(a):
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode="edge")
        return a.reshape(a.shape[0], n, chunk, *a.shape[2:]).swapaxes(0, 1)

    outs = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in args))
    return tuple(o.swapaxes(0, 1).reshape(o.shape[1], n * chunk, *o.shape[3:])[:, :t] for o in outs)
