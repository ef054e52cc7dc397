"""Ask the compiler about a deployment before anything is allocated.

The generation engine's own jitted functions (a decode block and a prefill chunk) are traced
with abstract arguments — parameters, caches and inputs as `jax.ShapeDtypeStruct`s carrying
the shardings the rule table gives them on the mesh — and lowered for a platform ("tpu",
"cuda" or "cpu"). Nothing is allocated: the model is built under `nnx.eval_shape`, so the
671B release can be checked on a laptop, on as many fake host devices as the mesh needs
(`python -m dsv32_jax.plan --lower tpu`). Compiling for the CPU backend adds XLA's own
per-device argument / output / temporary bytes and the collectives of the partitioned program
(`--compile`).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from dsv32_jax.config import ModelConfig
from dsv32_jax.introspect import collectives as lowered_collectives
from dsv32_jax.introspect import compiled_collectives
from dsv32_jax.sharding import batch_spec, make_mesh, param_shardings

def abstract_engine(cfg: ModelConfig, options, *, prefill_chunk: int = 256, block: int = 16,
                    exchange: str = "auto"):
    """An Engine over the abstract model (nnx.eval_shape: no parameter is allocated).
    exchange: the expert-parallel exchange ("ragged" for a TPU/GPU program lowered on a CPU host)."""
    from dsv32_jax.generate.engine import Engine
    from dsv32_jax.model import Transformer
    from dsv32_jax.moe import set_expert_exchange

    module = nnx.eval_shape(lambda: Transformer(cfg, options, rngs=nnx.Rngs(0)))
    set_expert_exchange(module, exchange)
    return Engine(module, prefill_chunk=prefill_chunk, len_bucket=1, block=block)


def _with_shardings(tree, shardings):
    """Abstract leaves of `tree` carrying the shardings of `shardings` (a prefix of `tree`)."""
    full = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, tree)

    def one(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, full)


def _abstract_state(engine):
    mesh = engine.module.options.mesh
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), engine.state)
    if mesh is None:
        return state
    return _with_shardings(state, param_shardings(engine.state, mesh))


def _batch_arg(mesh, shape, dtype):
    sharding = None if mesh is None else NamedSharding(mesh, batch_spec(mesh, len(shape), shape[0]))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _abstract_caches(engine, batch: int, max_len: int):
    module = engine.module
    shapes = module.cache_shapes(batch, max_len)
    shardings = module.cache_shardings(batch, max_len)
    return shapes if shardings is None else _with_shardings(shapes, shardings)


def trace_decode(engine, batch: int, max_len: int):
    """The engine's decode block (engine.block greedy steps) traced on abstract arguments."""
    from dsv32_jax.generate.engine import DecodeState

    mesh = engine.module.options.mesh
    i32 = jnp.int32
    ds = DecodeState(_abstract_caches(engine, batch, max_len), _batch_arg(mesh, (batch,), i32),
                     _batch_arg(mesh, (batch,), i32), _batch_arg(mesh, (batch,), jnp.bool_),
                     _batch_arg(mesh, (batch,), i32), jax.eval_shape(lambda: jax.random.key(0)))
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    return engine._block.trace(_abstract_state(engine), ds, f32, f32, jax.ShapeDtypeStruct((), i32),
                               jax.ShapeDtypeStruct((1,), i32), jax.ShapeDtypeStruct((), i32),
                               steps=engine.block, greedy=True)


def trace_prefill(engine, batch: int, max_len: int, chunk: int):
    """One prefill chunk of `chunk` tokens per row, attending to a `max_len` cache, traced."""
    mesh = engine.module.options.mesh
    d = engine.cfg.hidden_size
    return engine._prefill.trace(_abstract_state(engine), _abstract_caches(engine, batch, max_len),
                                 _batch_arg(mesh, (batch, chunk), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                                 _batch_arg(mesh, (batch,), jnp.int32),
                                 _batch_arg(mesh, (batch, d), engine.module.options.dtype))


def check(cfg: ModelConfig, mesh_spec, *, platform: str, batch: int, max_len: int, chunk: int,
          dtype=jnp.bfloat16, numerics: str = "reference", fp8_weights: bool = True,
          attention_impl: str | None = None, compile: bool = False, block: int = 16, kv_cache: str = "dense") -> dict:
    """Lower (and for platform "cpu" optionally compile) the decode block and a prefill chunk.

    Returns {"decode": {...}, "prefill": {...}} with lowering (and compile) seconds, the
    collectives of the lowered program (explicit ones: shard_map bodies), and with compile=True
    per-device argument / output / temp bytes and the collectives of the partitioned program.
    The expert exchange is the ragged one for tpu/cuda, the padded one for cpu.
    attention_impl defaults to "pallas" on tpu/cuda and "xla" on cpu.
    """
    from dsv32_jax.model import RuntimeOptions

    mesh = make_mesh(mesh_spec) if isinstance(mesh_spec, str) and mesh_spec else mesh_spec or None
    if attention_impl is None:
        attention_impl = "xla" if platform == "cpu" else "pallas"
    backend = None if platform == "cpu" else ("gpu" if platform == "cuda" else "tpu")
    options = RuntimeOptions(dtype=jnp.dtype(dtype), numerics=numerics, attention_impl=attention_impl,
                             fp8_weights=fp8_weights, mesh=mesh, kernel_backend=backend, kv_cache=kv_cache)
    engine = abstract_engine(cfg, options, prefill_chunk=max(16, 1 << (chunk - 1).bit_length()), block=block,
                             exchange="padded" if platform == "cpu" else "ragged")
    out = {}
    for name, traced in (("decode", lambda: trace_decode(engine, batch, max_len)),
                         ("prefill", lambda: trace_prefill(engine, batch, max_len, chunk))):
        t0 = time.perf_counter()
        lowered = traced().lower(lowering_platforms=(platform,))
        rec = {"lower_s": round(time.perf_counter() - t0, 2)}
        low = {}
        for c in lowered_collectives(lowered.as_text()):
            r = low.setdefault(c.op, {"count": 0, "bytes": 0})
            r["count"] += c.calls
            r["bytes"] += c.calls * c.wire_bytes
        rec["lowered_collectives"] = low
        if compile:
            t0 = time.perf_counter()
            compiled = lowered.compile()
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            mem = compiled.memory_analysis()
            rec.update(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                       temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
                       collectives=compiled_collectives(compiled.as_text()))
        out[name] = rec
    return out
