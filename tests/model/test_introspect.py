"""The jaxpr walker (temporaries, weight-derived temporaries) and the collectives counter, on
functions whose allocations are known by hand, then on a decode step of an FP8 model with the
release's dims (abstract arrays: nothing is allocated)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv32_jax.fp8_matmul import fp8_matmul
from dsv32_jax.introspect import collectives, largest_weight_temp, temporaries
from dsv32_jax.numerics import dequant_blocks
from oracle import abstract_decode_step


def test_temporaries_counts_by_hand():
    w = jax.ShapeDtypeStruct((64, 32), jnp.float32)        # 8192 bytes
    x = jax.ShapeDtypeStruct((4, 64), jnp.float32)

    def f(params, x):
        w2 = params["w"] * 2.0                                   # weight-derived, 8192 B
        y = jnp.dot(x, w2.reshape(64, 32))                       # reshape: a view; y: activation 512 B

        def body(c, row):
            return c + row, row * 3.0                            # carry 128 B per step, ys [4, 32]
        c, ys = jax.lax.scan(body, jnp.zeros((32,)), y)
        return c, ys

    temps = temporaries(f, {"w": w}, x, weight_args=(0,))
    by = {(t.primitive, t.shape): t for t in temps}
    assert by[("mul", (64, 32))].weight_bytes == 8192 and by[("mul", (64, 32))].weight_ratio == 1.0
    assert by[("dot_general", (4, 32))].weight_bytes == 0          # depends on x: an activation
    assert ("reshape", (64, 32)) not in by
    assert by[("scan", (4, 32))].nbytes == 512                     # stacked ys are made by the scan
    assert by[("mul", (32,))].nbytes == 128                        # inside the scan body
    assert temps[0].nbytes == 8192


def test_shard_map_bodies_are_per_device():
    mesh = jax.make_mesh((8,), ("expert",))
    w = jax.ShapeDtypeStruct((16, 64, 32), jnp.float32, sharding=NamedSharding(mesh, P("expert")))

    def f(w):
        body = jax.shard_map(lambda w: w.astype(jnp.bfloat16) * 2, mesh=mesh, in_specs=P("expert"),
                             out_specs=P("expert"))
        return body(w)

    temps = temporaries(f, w, weight_args=(0,))
    conv = next(t for t in temps if t.primitive == "convert_element_type")
    assert conv.per_device and conv.shape == (2, 64, 32)
    # the local weight is 1/8 of 131072 B; its bf16 copy is half that
    assert conv.weight_bytes == 16384 and conv.weight_ratio == 0.5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_release_linear_weight_temporaries(dtype):
    """dequantise-then-matmul makes a float32 copy (4x the FP8 bytes); the blockwise matmul's
    largest weight-derived temporary is one tile, <= 1/6 of the weight's bytes."""
    k, n, block = 7168, 2048, (128, 128)
    params = {"kernel": jax.ShapeDtypeStruct((k, n), jnp.float8_e4m3fn),
              "kernel_scale": jax.ShapeDtypeStruct((56, 16), jnp.float32)}
    x = jax.ShapeDtypeStruct((8, k), dtype)

    def old(p, x):
        w = dequant_blocks(p["kernel"], p["kernel_scale"], block).astype(x.dtype)
        return jnp.dot(x, w, preferred_element_type=jnp.float32)

    def new(p, x):
        return fp8_matmul(x, p["kernel"], p["kernel_scale"], block)

    assert largest_weight_temp(temporaries(old, params, x, weight_args=(0,))).weight_ratio == 4.0
    worst = largest_weight_temp(temporaries(new, params, x, weight_args=(0,)))
    assert worst.weight_ratio <= 1 / 6 and worst.weight == "['kernel']"


def test_decode_step_of_a_release_dim_fp8_model():
    """Decode step (batch 8, 4096 cached slots) of a 2-layer FP8 model with the release's dims
    (one dense layer, one MoE layer with 256 experts), traced from abstract arrays. Every
    weight-derived temporary is <= 0.25 of the weight it comes from, MLA's absorbed kv_b
    included (dequantised a few heads at a time: fp8_matmul.fp8_head_einsum)."""
    from flax import nnx

    from dsv32_jax.config import load_config
    from dsv32_jax.model import RuntimeOptions, Transformer

    cfg = load_config("configs/deepseek-v3.2-exp.json").replace(num_hidden_layers=2, first_k_dense_replace=1,
                                                                num_nextn_predict_layers=0)
    model = nnx.eval_shape(lambda: Transformer(cfg, RuntimeOptions(dtype=jnp.bfloat16, fp8_weights=True),
                                               rngs=nnx.Rngs(0)))
    step, state, caches, tok = abstract_decode_step(model, 8, 4096)
    temps = temporaries(step, state, caches, tok, tok, weight_args=(0,))
    derived = sorted((t for t in temps if t.weight_bytes), key=lambda t: -t.weight_ratio)
    kv_b = max((t for t in derived if "kv_b" in t.weight), key=lambda t: t.weight_ratio)
    experts = max((t for t in derived if "experts" in t.weight), key=lambda t: t.weight_ratio)
    print("largest weight-derived temporary / weight:", derived[0].weight_ratio, derived[0].weight,
          "| kv_b:", kv_b.weight_ratio, kv_b.shape, "| routed experts:", experts.weight_ratio)
    assert derived[0].weight_ratio <= 0.25 and kv_b.weight_ratio <= 1 / 6


def test_collectives_bytes_and_call_multiplicity():
    mesh = jax.make_mesh((8,), ("expert",))
    x = jax.ShapeDtypeStruct((64, 16), jnp.bfloat16, sharding=NamedSharding(mesh, P("expert")))

    def a2a(x):
        return jax.lax.all_to_all(x.reshape(8, 1, 16), "expert", 0, 0).reshape(8, 16)

    body = jax.shard_map(a2a, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))

    @jax.jit
    def f(x):
        return body(body(x) + 1)                 # one body function, called twice

    cs = collectives(f.trace(x).lower(lowering_platforms=("tpu",)).as_text())
    total = sum(c.wire_bytes * c.calls for c in cs if c.op == "all_to_all")
    assert total == 2 * 8 * 16 * 2                # per device: [8, 1, 16] bf16, twice
