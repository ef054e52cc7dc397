"""The Pallas kernels under meshes lower for TPU (Mosaic) and GPU (Triton), from abstract arrays.

A 2-layer model (1 dense + 1 MoE layer with 8 small experts) with the release's attention dims
(128 heads, q_lora 1536, latent 512 + rope 64, indexer 64 x 128, index_topk 2048) and a narrow
residual stream is built with `nnx.eval_shape`; every argument is a ShapeDtypeStruct carrying
its sharding, so nothing of real size is allocated. For each mesh and platform we lower, with
attention_impl="pallas" and kernel_backend set to the lowering platform's kernels:
  * the forward (T = 4096 > index_topk, so the prefill kernels see a real selection),
  * a prefill chunk of 256 tokens writing into 8192-slot caches,
  * a decode step (one token per row) over the same caches,
  * a LoRA train step (finetune.train.train_step: remat, grad w.r.t. the adapters through the
    sparse MLA's custom_vjp, AdamW update).
Lowering only (no TPU/GPU compile). Mosaic refuses a kernel that GSPMD would have to partition,
so the TPU lowering itself checks the shard_map; the jaxpr walk below checks it for both.
"""
import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv32_jax.config import ModelConfig
from dsv32_jax.finetune.lora import LoRAConfig, LoRAWeight, apply_lora
from dsv32_jax.finetune.train import TrainHParams, make_optimizer, train_step
from dsv32_jax.model import RuntimeOptions, Transformer
from dsv32_jax.sharding import batch_spec, make_mesh, param_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (set by tests/conftest.py)")

RELEASE_ATTENTION = ModelConfig(
    vocab_size=1024, hidden_size=256, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, index_n_heads=64,
    index_head_dim=128, index_topk=2048, max_position_embeddings=163840, num_nextn_predict_layers=0,
    fp8_block_size=None)
MESHES = ["data=8", "expert=8", "tensor=2,expert=4", "data=2,expert=2,tensor=2"]
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "cuda": ("gpu", "__gpu$xla.gpu.triton")}
B, T_FWD, T_CHUNK, L, T_TRAIN = 8, 4096, 256, 8192, 4096


def _abstract(tree, mesh, shardings):
    """nnx state of abstract values -> the same with ShapeDtypeStruct leaves carrying shardings."""
    return jax.tree.map(lambda s, v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                        shardings, tree)


def _rows(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, batch_spec(mesh, len(shape), shape[0])))


def _kernels_inside_shard_map(jaxpr) -> int:
    """Number of pallas_call equations; asserts each one sits inside a shard_map."""
    count = 0

    def walk(jx, inside):
        nonlocal count
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                assert inside, "a pallas_call outside shard_map"
                count += 1
                continue
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, inside or eqn.primitive.name == "shard_map")

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, False)
    return count


def _lower_all(mesh_str, platform):
    backend, marker = PLATFORMS[platform]
    mesh = make_mesh(mesh_str)
    opts = RuntimeOptions(dtype=jnp.bfloat16, numerics="reference", attention_impl="pallas", mesh=mesh,
                          kernel_backend=backend)
    cfg = RELEASE_ATTENTION
    model = nnx.eval_shape(lambda: Transformer(cfg, opts, rngs=nnx.Rngs(0)))
    gd, st = nnx.split(model)
    st = _abstract(st, mesh, param_shardings(st, mesh))
    # one LayerCache per stack of layers, leaves [n, B, L, ...], batch split by the rule table
    caches = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model.cache_shapes(B, L), model.cache_shardings(B, L))

    def forward(st, ids):
        return nnx.merge(gd, st)(ids)

    def prefill(st, caches, ids, start):
        pos = jnp.broadcast_to(start + jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        h, _, caches = nnx.merge(gd, st).hidden(ids, pos, caches)
        return caches, h[:, -1]

    def decode(st, caches, tokens, positions):
        m = nnx.merge(gd, st)
        h, _, caches = m.hidden(tokens[:, None], positions[:, None], caches)
        return caches, m.logits(h[:, 0])

    # LoRA on the attention projections: gradients flow through the sparse MLA's custom_vjp
    lmodel = nnx.eval_shape(lambda: apply_lora(Transformer(cfg, opts, rngs=nnx.Rngs(0)),
                                               LoRAConfig(rank=8, targets=("attn",))))
    lgd, lora, rest = nnx.split(lmodel, LoRAWeight, ...)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), lora,
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
    lora = _abstract(lora, mesh, replicated)
    rest = _abstract(rest, mesh, param_shardings(rest, mesh))
    hp = TrainHParams()
    opt_state = jax.eval_shape(make_optimizer(hp).init, lora)
    opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
                             opt_state)
    batch = {k: _rows(mesh, (B, T_TRAIN), jnp.float32 if k == "weights" else jnp.int32)
             for k in ("inputs", "targets", "weights")}

    traced = {
        "forward": jax.jit(forward).trace(st, _rows(mesh, (B, T_FWD), jnp.int32)),
        "prefill": jax.jit(prefill, donate_argnums=(1,)).trace(
            st, caches, _rows(mesh, (B, T_CHUNK), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)),
        "decode": jax.jit(decode, donate_argnums=(1,)).trace(
            st, caches, _rows(mesh, (B,), jnp.int32), _rows(mesh, (B,), jnp.int32)),
        "train": train_step.trace(lgd, hp, lora, rest, opt_state, batch, jax.ShapeDtypeStruct((), jnp.int32)),
    }
    out = {}
    for name, tr in traced.items():
        kernels = _kernels_inside_shard_map(tr.jaxpr)
        text = tr.lower(lowering_platforms=(platform,)).as_text()
        out[name] = (kernels, text.count(marker), "sdy.manual_computation" in text)
    return out


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("mesh", MESHES)
def test_kernels_lower_under_mesh(mesh, platform):
    got = _lower_all(mesh, platform)
    for name, (kernels, calls, manual) in got.items():
        # indexer top-k + sparse MLA per layer, all inside shard_map, and they reach the lowering
        assert kernels >= 2 * RELEASE_ATTENTION.num_hidden_layers, (name, kernels)
        assert calls >= 1 and manual, (name, calls, manual)


@pytest.mark.parametrize("mesh_str", ["tensor=2,expert=4"])
def test_compact_cache_kernels_lower_under_mesh(mesh_str):
    """kv_cache="fp8": a prefill chunk and a decode step over the compact FP8 latent caches (born
    with the model's cache shardings) lower for TPU and GPU with every kernel inside shard_map,
    heads split over tensor and the batch over expert."""
    mesh = make_mesh(mesh_str)
    cfg = RELEASE_ATTENTION
    for platform, (backend, marker) in PLATFORMS.items():
        opts = RuntimeOptions(dtype=jnp.bfloat16, numerics="reference", attention_impl="pallas", mesh=mesh,
                              kernel_backend=backend, kv_cache="fp8")
        model = nnx.eval_shape(lambda: Transformer(cfg, opts, rngs=nnx.Rngs(0)))
        gd, st = nnx.split(model)
        st = _abstract(st, mesh, param_shardings(st, mesh))
        caches = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              model.cache_shapes(B, L), model.cache_shardings(B, L))
        assert caches[0].latent.dtype == jnp.float8_e4m3fn and caches[0].latent_scale.shape[1:] == (B, L, 4)

        def step(st, caches, ids, start):
            pos = jnp.broadcast_to(start + jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
            h, _, caches = nnx.merge(gd, st).hidden(ids, pos, caches)
            return caches, h[:, -1]

        for t in (T_CHUNK, 1):
            tr = jax.jit(step, donate_argnums=(1,)).trace(st, caches, _rows(mesh, (B, t), jnp.int32),
                                                          jax.ShapeDtypeStruct((), jnp.int32))
            assert _kernels_inside_shard_map(tr.jaxpr) >= 2 * cfg.num_hidden_layers
            text = tr.lower(lowering_platforms=(platform,)).as_text()
            assert text.count(marker) >= 1 and "sdy.manual_computation" in text, (platform, t)
