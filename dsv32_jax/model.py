"""The DeepSeek-V3.2 transformer: decoder blocks, final norm, lm_head, optional MTP head.

    h = embed(ids)
    per layer:  h = h + MLA(RMSNorm(h));  h = h + FFN(RMSNorm(h))   (FFN: dense MLP or MoE)
    logits = RMSNorm(h) @ lm_head  (float32)

The decoder layers are stored as `stacks`: each run of consecutive layers of one structure
(the first `first_k_dense_replace` dense-MLP layers, then the MoE layers) is one `BlockStack`
whose parameters carry a leading layer axis [n, ...] (logical axis "layers", never split), and
runs as one `jax.lax.scan`, so the program (and its compile time) does not grow with depth.
Decode caches follow: one `LayerCache` per stack with leaves [n, B, L, ...]. The checkpoint
layouts stay per layer (`dsv32_jax.params.checkpoint_paths` maps a stacked parameter to its
layers' names).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from dsv32_jax.attention import ATTENTION_IMPLS, KERNEL_BACKENDS, MLA, LayerCache, latent_block
from dsv32_jax.config import ModelConfig
from dsv32_jax.indexer import NUMERICS
from dsv32_jax.layers import Embed, Linear, RMSNorm, rope_cos_sin
from dsv32_jax.moe import MLP, MoE
from dsv32_jax.segments import segment_layout
from dsv32_jax.sharding import constrain_batch, spec_for

# Logical axis of the leading [n] dimension of stacked layer parameters and caches (never split).
LAYER_AXIS = "layers"
# Logical axes of the decode caches (declared once, like the parameters'): per stack of layers,
# the batch is split as the activations are (RULES["batch"]); the layers, the cached sequence
# and the 576-d entries (shared by all heads: MQA form) are never split.
CACHE_AXES = LayerCache(latent=(LAYER_AXIS, "batch", "cache_seq", None),
                        index_k=(LAYER_AXIS, "batch", "cache_seq", None),
                        index_k_scale=(LAYER_AXIS, "batch", "cache_seq"),
                        latent_scale=(LAYER_AXIS, "batch", "cache_seq", None),
                        rope=(LAYER_AXIS, "batch", "cache_seq", None))
# kv_cache: how the MLA latent cache is stored (see LayerCache)
KV_CACHES = ("dense", "fp8")
CACHE_BATCH_AXIS = 1      # cache leaves are [layers, B, L, ...]


def cache_batch_axes(cache_shardings):
    """The mesh axes the batch of the caches is split over (a PartitionSpec entry), from
    `Transformer.cache_shardings(...)`; None without a mesh."""
    if cache_shardings is None:
        return None
    return jax.tree.leaves(cache_shardings[0])[0].spec[CACHE_BATCH_AXIS]


def per_layer(fn):
    """fn written for one layer's cache leaves (arrays [B, ...], batch first; other arguments
    closed over) -> fn applied to stacked leaves [layers, B, ...] (vmapped over the layers).
    Use as jax.tree.map(per_layer(fn), caches, ...); pools from `cache_shapes` are stacked too."""
    return jax.vmap(fn)


def layer_groups(cfg: ModelConfig) -> list[tuple[int, int, bool]]:
    """Runs of consecutive decoder layers of one structure: [(first layer, count, is_moe)]."""
    groups = []
    for i in range(cfg.num_hidden_layers):
        moe = cfg.is_moe_layer(i)
        if groups and groups[-1][2] == moe:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1, moe)
        else:
            groups.append((i, 1, moe))
    return groups


def is_stacked(_path, var) -> bool:
    """nnx filter: a variable with a leading layer axis (its logical axes start with LAYER_AXIS)."""
    axes = var.get_metadata().get("axes") if hasattr(var, "get_metadata") else None
    return bool(axes) and axes[0] == LAYER_AXIS


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How to run the model (not part of the checkpoint).

    dtype: parameter and activation dtype (float32 for tests, bfloat16 for speed).
    numerics: "reference" (the official FP8 indexer + FP8 KV-latent simulations; default) or
        "exact" (what transformers computes).
    attention_impl: "auto" (pallas on TPU/GPU, xla on CPU) | "xla" | "pallas" | "interpret"
        (see dsv32_jax.attention).
    fp8_weights: keep FP8 checkpoint weights as e4m3 + block scales instead of dequantising.
    mtp: build the multi-token-prediction head.
    mesh: a jax.sharding.Mesh with axes dsv32_jax.sharding.MESH_AXES, or None (one device):
        activations get batch sharding constraints at layer boundaries, the attention ops run
        under shard_map (dsv32_jax.kernel_sharding) and the routed experts run expert-parallel
        when the mesh has expert > 1.
    kernel_backend: "tpu" | "gpu" | None (the platform jax runs on): whose kernels "pallas" /
        "auto" use and which XLA shapes "xla" uses; set it to lower for another platform.
    kv_cache: "dense" (default: latent + rope key in `dtype`, 1152 B per token per layer in
        bf16 at the release's dims) or "fp8" (the compact cache of FlashMLA's FP8 layout: e4m3
        latent + one float32 scale per 128 + rope in `dtype`, 656 B), which holds exactly the
        values of the reference numerics' FP8 KV-latent round trip, so it needs
        numerics="reference" and gives the same results as "dense".
    """
    dtype: jnp.dtype = jnp.bfloat16
    numerics: str = "reference"
    attention_impl: str = "auto"
    fp8_weights: bool = False
    mtp: bool = False
    mesh: object = None
    kernel_backend: str | None = None
    kv_cache: str = "dense"

    def __post_init__(self):
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {tuple(ATTENTION_IMPLS)}, "
                             f"got {self.attention_impl!r}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.kv_cache == "fp8" and self.numerics != "reference":
            raise ValueError("kv_cache='fp8' stores the FP8-rounded latent of numerics='reference' "
                             f"(got numerics={self.numerics!r}); use kv_cache='dense' with exact numerics")
        if self.kernel_backend is not None and self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS} or None, "
                             f"got {self.kernel_backend!r}")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs, fp8_block=None, moe=None, mesh=None,
                 kernel_backend=None):
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
        self.attn = MLA(cfg, dtype=dtype, rngs=rngs, fp8_block=fp8_block, mesh=mesh, kernel_backend=kernel_backend)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
        is_moe = cfg.is_moe_layer(layer) if moe is None else moe
        self.mlp = (MoE(cfg, dtype=dtype, rngs=rngs, fp8_block=fp8_block, mesh=mesh) if is_moe else
                    MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs, fp8_block=fp8_block))

    def __call__(self, h, positions, cos, sin, *, numerics, attention_impl, cache=None, kv_lengths=None,
                 q_starts=None, layer=None):
        """layer: None, or the int32 index of this layer in `cache` when it holds a stack of
        layers' caches (see MLA.__call__)."""
        a, idx, cache = self.attn(self.attn_norm(h), positions, cos, sin, numerics=numerics,
                                  attention_impl=attention_impl, cache=cache, kv_lengths=kv_lengths, layer=layer,
                                  **({} if q_starts is None else {"q_starts": q_starts}))
        h = h + a
        h = h + self.mlp(self.ffn_norm(h))
        return h, idx, cache


# Stacks of at most this many layers are unrolled: a scanned layer's matmuls read its weights
# as dynamic slices of the stack, which XLA:CPU copies out on every step (a view when unrolled);
# the program of a short stack stays small either way.
UNROLL_MAX = 4


class BlockStack(nnx.Module):
    """Decoder layers [first, first + n) of one structure (dense MLP or MoE), run by one scan.

    `block` is a `Block` whose every variable has a leading layer axis [n, ...] (logical axis
    LAYER_AXIS), built by vmapping the Block constructor over n keys (under nnx.eval_shape
    nothing is allocated). The call scans over the layers: each step merges one layer's slices
    into a Block and runs it. Variables other modules install on `block` (wrappers such as LoRA
    adapters or training probes) are scanned too when they carry the layer axis; those the
    layer body writes (statistics) come back stacked [n, ...]. remat: rematerialise each layer
    in the backward pass (jax.checkpoint around the scanned body; set on a traced copy).
    """

    def __init__(self, cfg: ModelConfig, first: int, n: int, moe: bool, *, dtype, rngs, fp8_block=None,
                 mesh=None, kernel_backend=None):
        self.first, self.n, self.moe = first, n, moe
        self.remat = False

        def make(key):
            return Block(cfg, first, dtype=dtype, rngs=nnx.Rngs(params=key), fp8_block=fp8_block, moe=moe,
                         mesh=mesh, kernel_backend=kernel_backend)

        keys = jax.random.split(rngs.params(), n)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(keys[0])))
        state = jax.vmap(lambda k: nnx.state(make(k)))(keys)
        for _, var in nnx.to_flat_state(state):
            var.set_metadata("axes", (LAYER_AXIS,) + tuple(var.get_metadata()["axes"]))
        self.block = nnx.merge(graphdef, state)

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.n)

    def __call__(self, h, positions, cos, sin, caches=None, *, numerics, attention_impl, kv_lengths=None,
                 q_starts=None, mesh=None):
        """h [B, T, D] -> (h [B, T, D], indices int32 [n, B, T, K], caches or None).

        caches: LayerCache with leaves [n, B, L, ...], or None. The stack is carried through the
        scan whole; layer i writes its new entries into [i, b, position] and its attention ops
        read [i] in place (given the layer index), so no layer's cache is copied per step."""
        graphdef, stacked, shared = nnx.split(self.block, is_stacked, ...)
        extra = {} if q_starts is None else {"q_starts": q_starts}

        def body(carry, layer_state):
            h, caches, i = carry
            blk = nnx.merge(graphdef, layer_state, shared)
            before = _values(blk)
            with jax.named_scope("layer"):
                h, idx, caches = blk(h, positions, cos, sin, numerics=numerics, attention_impl=attention_impl,
                                     cache=caches, kv_lengths=kv_lengths, layer=i, **extra)
            h = constrain_batch(h, mesh)
            written = {p: v for p, v in _values(blk).items() if v is not before.get(p)}
            return (h, caches, i + 1), (idx, written)

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        with jax.named_scope(f"layers_{self.first}_{self.first + self.n - 1}"):
            (h, caches, _), (indices, written) = jax.lax.scan(body, (h, caches, jnp.int32(0)), stacked,
                                                              unroll=self.n <= UNROLL_MAX)
        if written:
            nnx.update(self.block, nnx.from_flat_state(list(written.items())))
        return h, indices, caches


def _values(module) -> dict:
    """{path: value} of the stacked variables of a (merged, per-layer) module."""
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, is_stacked))}


class MTPHead(nnx.Module):
    """Multi-token prediction (checkpoint layer `num_hidden_layers`, spec 2.8).

    From the main model's final (normed) hidden state h_i and the embedding of token i+1:
    u = eh_proj([enorm(emb(t_{i+1})) | hnorm(h_i)]) -> one decoder block -> norm -> head,
    giving logits for token i+2.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs, fp8_block=None, mesh=None, kernel_backend=None):
        d = cfg.hidden_size
        self.embed = Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs)
        self.enorm = RMSNorm(d, eps=cfg.rms_norm_eps, rngs=rngs)
        self.hnorm = RMSNorm(d, eps=cfg.rms_norm_eps, rngs=rngs)
        self.eh_proj = Linear(2 * d, d, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.block = Block(cfg, cfg.num_hidden_layers, dtype=dtype, rngs=rngs, fp8_block=fp8_block, moe=True,
                           mesh=mesh, kernel_backend=kernel_backend)
        self.norm = RMSNorm(d, eps=cfg.rms_norm_eps, rngs=rngs)
        self.head = Linear(d, cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, options: RuntimeOptions = RuntimeOptions(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.options = options
        dtype = options.dtype
        fp8 = cfg.fp8_block_size if options.fp8_weights else None
        if options.fp8_weights and fp8 is None:
            raise ValueError("fp8_weights=True needs a config with quantization_config (FP8 block size)")
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.stacks = nnx.List([BlockStack(cfg, first, n, moe, dtype=dtype, rngs=rngs, fp8_block=fp8,
                                           mesh=options.mesh, kernel_backend=options.kernel_backend)
                                for first, n, moe in layer_groups(cfg)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)
        self.mtp = (MTPHead(cfg, dtype=dtype, rngs=rngs, fp8_block=fp8, mesh=options.mesh,
                            kernel_backend=options.kernel_backend) if options.mtp else None)

    # ------------------------------------------------------------------ forward
    def hidden(self, input_ids, positions=None, caches=None, kv_lengths=None, segment_ids=None):
        """input_ids [B, T] -> (final normed hidden [B, T, D], per-layer indices (a list of
        int32 [B, T, K], one per decoder layer), new caches (one LayerCache per stack) or None).

        segment_ids [B, T] int or None: packed rows (dsv32_jax.segments): rope positions restart
        at each segment and no token sees another segment's keys (no caches, no positions then).
        """
        b, t = input_ids.shape
        q_starts = None
        if segment_ids is not None:
            if caches is not None or positions is not None:
                raise ValueError("segment_ids: packed rows take neither caches nor explicit positions")
            positions, q_starts = segment_layout(segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(self.cfg, positions)
        mesh = self.options.mesh
        h = constrain_batch(self.embed(input_ids), mesh)
        indices, new_caches = [], []
        for g, stack in enumerate(self.stacks):
            h, idx, c = stack(h, positions, cos, sin, None if caches is None else caches[g],
                              numerics=self.options.numerics, attention_impl=self.options.attention_impl,
                              kv_lengths=kv_lengths, q_starts=q_starts, mesh=mesh)
            indices.extend(idx[j] for j in range(stack.n))
            new_caches.append(c)
        return self.norm(h), indices, (None if caches is None else new_caches)

    def logits(self, h):
        """h [..., D] -> float32 logits [..., vocab]."""
        w = self.lm_head.weight()
        return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """input_ids int32 [B, T] -> logits float32 [B, T, vocab] (a full causal forward;
        segment_ids [B, T]: packed rows, see hidden)."""
        h, _, _ = self.hidden(input_ids, positions, segment_ids=segment_ids)
        return self.logits(h)

    def forward_with_indices(self, input_ids, segment_ids=None):
        """Logits [B, T, V] and the DSA selections of every layer (list of int32 [B, T, K])."""
        h, indices, _ = self.hidden(input_ids, segment_ids=segment_ids)
        return self.logits(h), indices

    def mtp_logits(self, hidden, next_ids, positions=None):
        """MTP: hidden [B, T, D] (final normed hidden at i), next_ids [B, T] (tokens i+1)
        -> float32 logits [B, T, vocab] for tokens i+2."""
        if self.mtp is None:
            raise ValueError("this model was built without the MTP head (load(..., mtp=True))")
        m = self.mtp
        b, t = next_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(self.cfg, positions)
        u = m.eh_proj(jnp.concatenate([m.enorm(m.embed(next_ids)), m.hnorm(hidden)], axis=-1))
        u, _, _ = m.block(u, positions, cos, sin, numerics=self.options.numerics,
                          attention_impl=self.options.attention_impl)
        return jnp.dot(m.norm(u), m.head.weight().astype(u.dtype), preferred_element_type=jnp.float32)

    def cache_shapes(self, batch: int, max_len: int) -> list[LayerCache]:
        """Abstract caches (jax.ShapeDtypeStruct leaves) of `max_len` slots: one LayerCache per
        stack of layers, leaves [n, batch, max_len, ...]."""
        cfg, o = self.cfg, self.options
        ref = o.numerics == "reference"
        sds = jax.ShapeDtypeStruct

        def one(n):
            c = LayerCache(sds((n, batch, max_len, cfg.kv_dim), o.dtype),
                           sds((n, batch, max_len, cfg.index_head_dim), jnp.float8_e4m3fn if ref else o.dtype),
                           sds((n, batch, max_len), jnp.float32) if ref else None)
            if o.kv_cache == "fp8":
                r = cfg.kv_lora_rank
                c = dataclasses.replace(c, latent=sds((n, batch, max_len, r), jnp.float8_e4m3fn),
                                        latent_scale=sds((n, batch, max_len, r // latent_block(cfg)), jnp.float32),
                                        rope=sds((n, batch, max_len, cfg.qk_rope_head_dim), o.dtype))
            return c

        return [one(stack.n) for stack in self.stacks]

    def cache_shardings(self, batch: int, max_len: int) -> list[LayerCache] | None:
        """NamedShardings of the caches from CACHE_AXES and the rule table (None without a mesh)."""
        mesh = self.options.mesh
        if mesh is None:
            return None
        def one(s, axes):
            return None if s is None else NamedSharding(mesh, spec_for(axes, s.shape, mesh))

        return [LayerCache(**{f.name: one(getattr(c, f.name), getattr(CACHE_AXES, f.name))
                              for f in dataclasses.fields(LayerCache)})
                for c in self.cache_shapes(batch, max_len)]

    def cache_creator(self, batch: int, max_len: int):
        """A jitted function () -> zeroed caches whose out_shardings are `cache_shardings`: under a
        mesh every device allocates only its own slice (born sharded; nothing passes through one
        device or one host)."""
        shapes = self.cache_shapes(batch, max_len)

        def zeros():
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        return jax.jit(zeros, out_shardings=self.cache_shardings(batch, max_len))

    def init_caches(self, batch: int, max_len: int) -> list[LayerCache]:
        """Zeroed static caches of `max_len` slots, one LayerCache per stack of layers (see
        cache_shapes; born sharded under a mesh)."""
        return self.cache_creator(batch, max_len)()
