"""Sharding on 8 host CPU devices: logits under several meshes equal one device, parameter
shardings follow the rule table, each device holds only its shard, expert parallelism really
dispatches with all_to_all."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import dsv32_jax
from dsv32_jax.params import path_str
from dsv32_jax.sharding import make_mesh, parse_mesh, spec_for

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (set by tests/conftest.py)")
B, T = 8, 24
# float32 on every mesh; only the summation order of sharded matmuls / all-reduces differs
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def single(tiny_hf):
    _, path = tiny_hf
    ids = np.random.RandomState(0).randint(0, 256, (B, T)).astype(np.int32)
    return path, ids, np.asarray(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact")(ids))


@pytest.mark.parametrize("mesh", ["data=8", "expert=8", "tensor=2,expert=4", "data=2,expert=2,tensor=2"])
def test_logits_equal_single_device(single, mesh):
    path, ids, ref = single
    model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", mesh=mesh)
    out = np.asarray(model(ids))
    assert np.abs(out - ref).max() <= REL_TOL * np.abs(ref).max()


def test_param_shardings_follow_rules_and_shards_stay_on_their_devices(single):
    path, _, _ = single
    model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", mesh="tensor=2,expert=4")
    mesh = model.options.mesh
    from flax import nnx
    for p, var in nnx.to_flat_state(model.state):
        arr = var.get_value()
        want = spec_for(var.get_metadata()["axes"], arr.shape, mesh)
        assert arr.sharding.spec == want, path_str(p)
    st = model.state
    assert st["stacks"][1]["block"]["mlp"]["experts"]["gate"].get_value().sharding.spec == P(None, "expert", None, "tensor")
    assert st["stacks"][1]["block"]["mlp"]["experts"]["down"].get_value().sharding.spec == P(None, "expert", "tensor", None)
    assert st["stacks"][0]["block"]["attn"]["q_b"]["kernel"].get_value().sharding.spec == P(None, None, "tensor")
    assert st["stacks"][0]["block"]["attn"]["o"]["kernel"].get_value().sharding.spec == P(None, "tensor", None)
    assert st["embed"]["embedding"].get_value().sharding.spec == P("tensor", None)
    # each device holds exactly its slice: 16 experts / 4, hidden 32 / 2
    gate = st["stacks"][1]["block"]["mlp"]["experts"]["gate"].get_value()     # layers 1-2, stacked
    shards = gate.addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (2, 4, 64, 16) for s in shards)
    full = np.asarray(gate)
    for s in shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index])


def test_expert_parallel_uses_all_to_all(single):
    path, ids, _ = single
    model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", mesh="expert=8")
    hlo = model._forward.lower(model.state, model._ids(ids)).compile().as_text()
    assert "all-to-all" in hlo


def test_mesh_strings():
    assert parse_mesh("data=2,expert=4") == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    with pytest.raises(ValueError, match="bad entry 'pipeline=2'"):
        parse_mesh("pipeline=2")
    with pytest.raises(ValueError, match="not an integer"):
        parse_mesh("data=x")
    with pytest.raises(ValueError, match="has 6 devices but 8"):
        make_mesh("data=2,tensor=3")
