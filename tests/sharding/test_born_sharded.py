"""State born sharded: decode caches and LoRA training state are created by jitted functions
whose out_shardings are their targets, so no device ever holds more than its slice."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import dsv32_jax
from dsv32_jax.finetune.lora import LoRAConfig, LoRAWeight, apply_lora
from dsv32_jax.finetune.train import TrainHParams, Trainer
from dsv32_jax.model import CACHE_BATCH_AXIS
from flax import nnx

MESHES = ["data=8", "expert=8", "tensor=2,expert=4", "data=2,expert=2,tensor=2"]


@pytest.fixture(scope="module")
def models(tiny_hf):
    _, path = tiny_hf
    return {m: dsv32_jax.load(path, dtype=jnp.float32, mesh=m).module for m in MESHES}


@pytest.mark.parametrize("mesh", MESHES)
def test_caches_born_with_their_sharding(models, mesh):
    module = models[mesh]
    batch, max_len = 8, 64
    creator = module.cache_creator(batch, max_len)
    compiled = creator.lower().compile()
    targets = module.cache_shardings(batch, max_len)
    mesh_shape = module.options.mesh.shape
    batch_axes = tuple(a for a in ("data", "fsdp", "expert") if mesh_shape[a] > 1)
    split = math.prod(mesh_shape[a] for a in batch_axes)
    for want in jax.tree.leaves(targets):
        # the rule table's batch axes, nothing else (MQA latent: every head reads every entry)
        assert want.spec[CACHE_BATCH_AXIS] == (batch_axes[0] if len(batch_axes) == 1 else batch_axes)
        assert all(s is None for i, s in enumerate(want.spec) if i != CACHE_BATCH_AXIS)
    assert jax.tree.leaves(compiled.output_shardings) == jax.tree.leaves(targets)
    # per device the compiled creator outputs exactly one slice and needs no temporaries:
    # nothing is built whole on one device and then split
    shapes = jax.tree.leaves(module.cache_shapes(batch, max_len))
    per_device = sum(s.size * jnp.dtype(s.dtype).itemsize for s in shapes) // split
    mem = compiled.memory_analysis()
    # (+ 8 bytes per output: XLA:CPU's tuple of buffer pointers)
    assert per_device <= mem.output_size_in_bytes <= per_device + 8 * len(shapes)
    assert mem.temp_size_in_bytes <= 1024
    caches = creator()
    for arr, want in zip(jax.tree.leaves(caches), jax.tree.leaves(targets)):
        assert arr.sharding == want
        assert {sh.data.shape[CACHE_BATCH_AXIS] for sh in arr.addressable_shards} == {batch // split}
        assert not np.any(np.asarray(arr.addressable_shards[0].data.astype(jnp.float32)))


def test_lora_state_born_replicated(models, tiny_hf):
    module = models["data=2,expert=2,tensor=2"]
    config = LoRAConfig(rank=4, targets=("attn", "experts"))
    model = apply_lora(nnx.clone(module), config)
    trainer = Trainer(model, TrainHParams(steps=2))
    rep = NamedSharding(module.options.mesh, P())
    leaves = jax.tree.leaves(nnx.state(model, LoRAWeight)) + jax.tree.leaves(trainer.opt_state)
    assert leaves and all(a.sharding.is_equivalent_to(rep, a.ndim) for a in leaves)
    # the same values as adapters created on one device (the init depends on the seed alone)
    plain = apply_lora(dsv32_jax.load(tiny_hf[1], dtype=jnp.float32).module, config)
    for a, b in zip(jax.tree.leaves(nnx.state(model, LoRAWeight)), jax.tree.leaves(nnx.state(plain, LoRAWeight))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
