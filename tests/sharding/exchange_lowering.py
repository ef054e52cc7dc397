"""Lower one expert-parallel MoE exchange with the release's dims from abstract arrays and count
its collective bytes (test helper; also run as a script in a subprocess with more fake devices:
`python exchange_lowering.py MESH EXCHANGE PLATFORM` prints one JSON line)."""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

# release dims: hidden 7168, expert hidden 2048, 256 experts, top-8, FP8 128x128 blocks
D, I, E, K, BLOCK = 7168, 2048, 256, 8, (128, 128)
TOKENS_PER_DEVICE = 32


def release_experts(mesh):
    """Abstract FP8 expert stacks (sharded over "expert") as a GroupedFFN, built by the model's
    own Experts module."""
    from flax import nnx

    from dsv32_jax.config import load_config
    from dsv32_jax.moe import Experts

    cfg = load_config("configs/deepseek-v3.2-exp.json")
    ex = nnx.eval_shape(lambda: Experts(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), fp8_block=BLOCK))
    g = ex.grouped()
    ops = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P("expert")))
           for n, a in g.operands.items()}
    return g, ops


def lower_exchange(mesh_spec: str, exchange: str, platform: str = "tpu"):
    """-> (StableHLO text, tokens per device, payload bytes per device both ways)."""
    from dsv32_jax.expert_parallel import GroupedFFN, expert_parallel_experts
    from dsv32_jax.sharding import make_mesh

    mesh = make_mesh(mesh_spec)
    g, ops = release_experts(mesh)
    tok_axes = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1)
    n = TOKENS_PER_DEVICE * mesh.size // mesh.shape["tensor"]
    tok = NamedSharding(mesh, P(tok_axes, None))
    x = jax.ShapeDtypeStruct((n, D), jnp.bfloat16, sharding=tok)
    w = jax.ShapeDtypeStruct((n, K), jnp.float32, sharding=tok)
    e = jax.ShapeDtypeStruct((n, K), jnp.int32, sharding=tok)

    def f(x, w, e, ops):
        return expert_parallel_experts(x, w, e, GroupedFFN(g.fn, ops, g.axes, g.hidden_granule), mesh,
                                       exchange=exchange)

    text = jax.jit(f).trace(x, w, e, ops).lower(lowering_platforms=(platform,)).as_text()
    payload = 2 * TOKENS_PER_DEVICE * K * D * 2
    return text, TOKENS_PER_DEVICE, payload


def exchange_report(mesh_spec: str, exchange: str, platform: str = "tpu") -> dict:
    from dsv32_jax.introspect import collectives

    text, tokens, payload = lower_exchange(mesh_spec, exchange, platform)
    cs = collectives(text)
    a2a = sum(c.wire_bytes * c.calls for c in cs if c.op in ("all_to_all", "ragged_all_to_all"))
    other = sum(c.wire_bytes * c.calls for c in cs if c.op not in ("all_to_all", "ragged_all_to_all"))
    return {"mesh": mesh_spec, "exchange": exchange, "platform": platform, "tokens_per_device": tokens,
            "payload_bytes": payload, "all_to_all_bytes": a2a, "other_collective_bytes": other,
            "ratio": a2a / payload, "ragged_ops": sum(c.op == "ragged_all_to_all" for c in cs)}


if __name__ == "__main__":
    print(json.dumps(exchange_report(*sys.argv[1:4])))
