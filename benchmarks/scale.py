"""The release at scale, measured without allocating the model; prints one JSON object.

Everything here is asked of the compiler on abstract arrays (`dsv32_jax.compile_check`: the
engine's decode block and prefill chunk traced with ShapeDtypeStructs that carry the rule
table's shardings, lowered, and compiled for the CPU backend on fake host devices):

(a) "argument_bytes": per-device argument bytes of the compiled 61-layer FP8 decode block
    against the planner's formula (parameters + caches per device; target within 2%), for
    decode batch 8 and 32 at a 32K context on expert=8; plus the CPU temporaries, reported
    only (XLA:CPU converts bf16 dot operands to f32 by itself).
    "largest_intermediate": the largest array the model code creates in a decode step (from
    the jaxpr, per device) over the largest weight it multiplies (target <= 0.25; measured
    0.036 with --quick, an FP8 expert tile dequantised in the grouped matmul).
(b) "compile_time": compile seconds of the decode block at 61 layers over 5 layers (target <= 1.5x;
    the layers run as one lax.scan per stack: 35.5 s / 34.5 s = 1.03 measured on a loaded 2-core
    host, where the unrolled 5-layer step took 45.5 s; unrolled before: 91.2 s / ~4 s).
(c) "collectives": per device per decode step in the compiled CPU program: bytes of every
    collective other than the MoE's all-to-all (attention and the indexer need none when the
    batch is split; target 0), and the all-to-all bytes per MoE layer in the program lowered
    for TPU over the useful payload (tokens x top-8 x hidden x 2 B, both ways; target <= 2x).
    With --expert64 the same on expert=64 (64 fake devices, 32 decode tokens per device).

    python benchmarks/scale.py [--layers 61] [--small-layers 5] [--batches 8,32] [--context 32768]
                               [--expert64] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "deepseek-v3.2-exp.json"


def _config(layers: int):
    from dsv32_jax.config import load_config

    cfg = load_config(CONFIG)
    return dataclasses.replace(cfg, num_hidden_layers=layers)


def _plan_bytes(cfg, mesh: str, batch: int, context: int) -> int:
    from dsv32_jax.plan import plan

    p = plan(cfg, mesh, max_len=context, batch=batch, fp8_weights=True)
    return p["total_bytes_per_device"]


def _moe_layers(cfg) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def _moe_stacks(cfg) -> int:
    from dsv32_jax.model import layer_groups

    return sum(moe for _, _, moe in layer_groups(cfg))


def _largest_intermediate(cfg, mesh: str, batch: int, context: int) -> dict:
    """The largest array the model code creates in one decode step (from the jaxpr; per device
    inside shard_map bodies) over the largest weight it multiplies (per device), and the
    largest weight-derived temporary (a dequantised copy) over its own weight."""
    import jax.numpy as jnp

    from dsv32_jax import compile_check as cc
    from dsv32_jax import introspect
    from dsv32_jax.model import RuntimeOptions
    from dsv32_jax.sharding import make_mesh

    m = make_mesh(mesh)
    options = RuntimeOptions(dtype=jnp.bfloat16, numerics="reference", attention_impl="pallas", fp8_weights=True,
                             mesh=m, kernel_backend="tpu")
    engine = cc.abstract_engine(cfg, options, block=1, exchange="ragged")
    state = cc._abstract_state(engine)
    caches = cc._abstract_caches(engine, batch, context)
    i32 = jnp.int32
    temps = introspect.temporaries(engine._step, state, caches, cc._batch_arg(m, (batch,), i32),
                                   cc._batch_arg(m, (batch,), i32), weight_args=(0,))
    import jax
    biggest_weight = max(x.size * jnp.dtype(x.dtype).itemsize // _shards(x.sharding, m)
                         for x in jax.tree.leaves(state) if len(x.shape) >= 2)
    largest = temps[0]
    worst = introspect.largest_weight_temp(temps)
    # shapes outside shard_map bodies are global: an upper bound of their per-device size
    return {"largest_intermediate_bytes": largest.nbytes,
            "largest_intermediate": f"{largest.primitive} {largest.dtype}{list(largest.shape)} at {largest.where}",
            "per_device": largest.per_device, "largest_weight_bytes_per_device": biggest_weight,
            "ratio": round(largest.nbytes / biggest_weight, 4),
            "worst_weight_temp": None if worst is None else {
                "weight": worst.weight, "bytes": worst.nbytes, "ratio_to_its_weight": round(worst.weight_ratio, 3)}}


def _shards(sharding, mesh) -> int:
    n = 1
    for part in sharding.spec:
        for a in ((part,) if isinstance(part, str) else (part or ())):
            n *= mesh.shape[a]
    return n


def measure(args) -> dict:
    """Runs in a process whose XLA_FLAGS give it args.devices host devices."""
    import jax.numpy as jnp

    from dsv32_jax import compile_check as cc

    out = {}
    mesh = args.mesh
    kw = dict(platform="cpu", max_len=args.context, chunk=args.chunk, dtype=jnp.bfloat16, numerics="reference",
              fp8_weights=True, compile=True, block=1)
    for batch in args.batches:
        row = {}
        for layers in sorted({args.small_layers, args.layers}):
            cfg = _config(layers)
            r = cc.check(cfg, mesh, batch=batch, **kw)["decode"]
            plan_b = _plan_bytes(cfg, mesh, batch, args.context)
            coll = r["collectives"]
            a2a = coll.get("all-to-all", {}).get("bytes", 0) + coll.get("ragged-all-to-all", {}).get("bytes", 0)
            other = sum(v["bytes"] for k, v in coll.items() if k not in ("all-to-all", "ragged-all-to-all"))
            row[f"layers_{layers}"] = {
                "compile_s": r["compile_s"], "argument_bytes": r["argument_bytes"], "plan_bytes": plan_b,
                "argument_over_plan": round(r["argument_bytes"] / plan_b, 4), "cpu_temp_bytes": r["temp_bytes"],
                "non_moe_collective_bytes": other, "collectives": coll,
                # compiled HLO counts an op of a loop body once: the scanned MoE stack's body is
                # one layer, so per MoE layer = the bytes over the number of MoE stacks
                "cpu_all_to_all_bytes_per_moe_layer": a2a // max(1, _moe_stacks(cfg))}
        small, full = row[f"layers_{args.small_layers}"], row[f"layers_{args.layers}"]
        row["compile_ratio_full_over_small"] = round(full["compile_s"] / small["compile_s"], 2)
        # the program lowered for TPU (Pallas kernels under shard_map, the ragged expert exchange)
        cfg = _config(args.small_layers)
        tpu = cc.check(cfg, mesh, batch=batch, **dict(kw, platform="tpu", compile=False))["decode"]
        low = tpu["lowered_collectives"]
        a2a = sum(v["bytes"] for k, v in low.items() if "all_to_all" in k)
        per_dev_tokens = max(1, batch // _batch_shards(mesh))
        payload = per_dev_tokens * cfg.num_experts_per_tok * cfg.hidden_size * 2 * 2
        row["tpu_lowered_collectives"] = low
        row["tpu_all_to_all_bytes_per_moe_layer"] = a2a // max(1, _moe_layers(cfg))
        row["tpu_payload_bytes_per_moe_layer"] = payload
        row["tpu_all_to_all_over_payload"] = round(row["tpu_all_to_all_bytes_per_moe_layer"] / payload, 2)
        row["largest_intermediate"] = _largest_intermediate(cfg, mesh, batch, args.context)
        out[f"batch_{batch}"] = row
    return out


def _batch_shards(mesh: str) -> int:
    from dsv32_jax.sharding import parse_mesh

    s = parse_mesh(mesh)
    return s["data"] * s["fsdp"] * s["expert"]


def _run_worker(devices: int, args, mesh: str, batches) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mesh", mesh, "--layers", str(args.layers),
           "--small-layers", str(args.small_layers), "--context", str(args.context), "--chunk", str(args.chunk),
           "--batches", ",".join(map(str, batches))]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"worker {mesh} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--small-layers", type=int, default=5)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--expert64", action="store_true", help="also expert=64 on 64 fake devices")
    ap.add_argument("--quick", action="store_true", help="10 layers instead of 61, batch 8 only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mesh", default="expert=8", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.worker:
        print(json.dumps(measure(args)))
        return
    if args.quick:
        args.layers, args.batches = 10, [8]
    result = {"config": "deepseek-v3.2-exp (FP8 weights, reference numerics, bf16)", "context": args.context,
              "layers": args.layers, "small_layers": args.small_layers,
              "expert8": _run_worker(8, args, "expert=8", args.batches)}
    if args.expert64:
        # 64 devices x 32 decode tokens; only the small model (compile time on 2 CPU cores)
        small = argparse.Namespace(**dict(vars(args), layers=args.small_layers))
        result["expert64"] = _run_worker(64, small, "expert=64", [64 * 32])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
