"""`python -m dsv32_jax.plan`: per-device memory of a model on a mesh, without allocating anything.

Parameters come from the abstract model (`nnx.eval_shape`), each divided by the number of
shards the logical-axis rules give it on the mesh; caches are the static decode caches
(normalised latent + rope key in the compute dtype, or with --kv-cache fp8 the compact FP8 latent
cache: e4m3 latent + one float32 scale per 128 + rope key; indexer key as e4m3 + one float32
scale in `reference` numerics or in the compute dtype in `exact`), split over the batch axes.
The verdict keeps 10% of the device memory free for activations and workspace.

--lower tpu|cuda asks the compiler too: the generation engine's decode block and one prefill
chunk, with the Pallas kernels under shard_map and the ragged expert exchange, are traced from
abstract arrays on the mesh (fake host devices stand in for the chips) and lowered for that
platform, so a deployment is checked before anything is allocated. --compile compiles both for
the CPU backend and prints XLA's own per-device argument / output / temporary bytes beside the
formula above, and the collectives of the partitioned program.

    python -m dsv32_jax.plan --config configs/deepseek-v3.2-exp.json --mesh expert=8 --batch 8 \
        --max-len 32768 --device h200 --lower tpu --compile --layers 5
"""
from __future__ import annotations

import json
import math
import sys

import jax.numpy as jnp

from dsv32_jax.cli import ArgumentParser, CliError, abspath, check_mesh, exit_codes_epilog, int_at_least, run_cli
from dsv32_jax.config import ModelConfig, load_config
from dsv32_jax.attention import latent_block
from dsv32_jax.model import RuntimeOptions
from dsv32_jax.params import abstract_params, is_quant_scale
from dsv32_jax.sharding import parse_mesh, spec_for

GiB = 2**30
# HBM per device (GiB as the vendors quote GB for GPUs: 80 GB = 74.5 GiB, etc.)
DEVICES = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0, "h100": 80e9 / GiB, "h200": 141e9 / GiB,
           "b200": 192e9 / GiB}
HEADROOM = 0.9


class _MeshShape:
    """Stand-in for a Mesh in sharding rules: only axis sizes are needed to plan."""

    def __init__(self, sizes):
        self.shape = dict(sizes)


def cache_bytes_per_token_per_layer(cfg: ModelConfig, *, dtype=jnp.bfloat16, numerics: str = "reference",
                                    kv_cache: str = "dense") -> dict:
    """{"latent_rope", "indexer", "total"}: bytes per cached token per layer. latent_rope: dense:
    (kv_lora_rank + rope) in the compute dtype; fp8 (compact): kv_lora_rank e4m3 + one float32
    scale per 128 + rope in the compute dtype (656 B at the release's dims, bf16). indexer: e4m3
    key + float32 scale in reference numerics, the compute dtype in exact."""
    itemsize = jnp.dtype(dtype).itemsize
    r = cfg.kv_lora_rank
    if kv_cache == "fp8":
        lat = r + 4 * (r // latent_block(cfg)) + cfg.qk_rope_head_dim * itemsize
    else:
        lat = cfg.kv_dim * itemsize
    idx = cfg.index_head_dim + 4 if numerics == "reference" else cfg.index_head_dim * itemsize
    return {"latent_rope": lat, "indexer": idx, "total": lat + idx}


def plan(cfg: ModelConfig, mesh: str, *, max_len: int, batch: int, fp8_weights: bool, dtype=jnp.bfloat16,
         numerics: str = "reference", mtp: bool = False, device_memory_gib: float | None = None,
         kv_cache: str = "dense") -> dict:
    sizes = parse_mesh(mesh)
    ms = _MeshShape(sizes)
    options = RuntimeOptions(dtype=jnp.dtype(dtype), numerics=numerics, fp8_weights=fp8_weights, mtp=mtp,
                             kv_cache=kv_cache)
    table = abstract_params(cfg, options)
    n_params = 0
    total_bytes = 0
    per_device = 0.0
    for path, info in table.items():
        count = math.prod(info.shape)
        nbytes = count * info.dtype.itemsize
        if not is_quant_scale(path):
            n_params += count
        total_bytes += nbytes
        spec = spec_for(info.axes, info.shape, ms)
        shards = 1
        for part in spec:
            for a in ((part,) if isinstance(part, str) else (part or ())):
                shards *= sizes[a]
        per_device += nbytes / shards
    per_token_layer = cache_bytes_per_token_per_layer(cfg, dtype=dtype, numerics=numerics, kv_cache=kv_cache)["total"]
    layers = cfg.num_hidden_layers + (1 if mtp else 0)
    cache_total = per_token_layer * layers * max_len * batch
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    cache_dev = cache_total / (batch_shards if batch % batch_shards == 0 else 1)
    out = {
        "mesh": sizes, "devices": math.prod(sizes.values()), "parameters": n_params,
        "parameter_bytes_total": total_bytes, "parameter_bytes_per_device": int(per_device),
        "cache_bytes_per_token_per_layer": per_token_layer, "kv_cache": kv_cache, "cache_bytes_total": cache_total,
        "cache_bytes_per_device": int(cache_dev), "max_len": max_len, "batch": batch,
        "weights": "float8_e4m3fn + block scales" if fp8_weights else str(jnp.dtype(dtype)),
        "total_bytes_per_device": int(per_device + cache_dev),
    }
    if device_memory_gib is not None:
        need = (per_device + cache_dev) / GiB
        out["device_memory_gib"] = device_memory_gib
        out["fits"] = bool(need <= HEADROOM * device_memory_gib)
        out["verdict"] = (f"fits: {need:.1f} GiB of {device_memory_gib:.1f} GiB per device" if out["fits"] else
                          f"does not fit: {need:.1f} GiB needed, {HEADROOM * device_memory_gib:.1f} GiB usable "
                          f"per device")
    return out


def _memory(arg: str | None) -> float | None:
    """--device: a device name or a size ("141GB", "95GiB", "80" = GiB); CliError names the flag."""
    if arg is None:
        return None
    a = arg.strip().lower()
    if a in DEVICES:
        return DEVICES[a]
    num, mult = a, 1.0
    for suffix, m in (("gib", 1.0), ("gb", 1e9 / GiB)):
        if a.endswith(suffix):
            num, mult = a[: -len(suffix)], m
            break
    try:
        value = float(num) * mult
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise CliError(f"--device {arg!r}: not a known device ({', '.join(DEVICES)}) nor a memory size "
                       "such as 141GB or 95GiB")
    return value


EXIT_CODES = {0: "the plan was computed (with --device: the model fits; with --lower/--compile: the compiler "
                 "accepted both programs)",
              1: "with --device: the model does not fit in the device memory",
              2: "bad input (a flag, or the config file)"}


def build_parser():
    ap = ArgumentParser(prog="python -m dsv32_jax.plan", description=__doc__, epilog=exit_codes_epilog(EXIT_CODES))
    ap.add_argument("--config", required=True, help="a Hugging Face config.json (or a checkpoint directory)")
    ap.add_argument("--mesh", default="", help='mesh axes, e.g. "expert=8,tensor=4" (axes: data, fsdp, expert, tensor)')
    ap.add_argument("--max-len", type=int_at_least(1), default=131072,
                    help="cache length in tokens per sequence (default 131072)")
    ap.add_argument("--batch", type=int_at_least(1), default=1, help="sequences decoded at once (default 1)")
    ap.add_argument("--weights", choices=("fp8", "bf16"), default="fp8",
                    help="fp8: e4m3 weights + block scales as released; bf16: dequantised (default fp8)")
    ap.add_argument("--numerics", choices=("reference", "exact"), default="reference",
                    help="reference: FP8 indexer-key cache (132 B/token); exact: bf16 indexer keys")
    ap.add_argument("--kv-cache", choices=("dense", "fp8"), default="dense",
                    help="dense: latent + rope key in bf16 (1152 B/token/layer); fp8: the compact FP8 latent cache "
                         "(512 e4m3 + 4 float32 scales + 64 bf16 rope = 656 B; needs --numerics reference)")
    ap.add_argument("--mtp", action="store_true", help="count the multi-token-prediction layer too")
    ap.add_argument("--device", default=None,
                    help=f"device memory: a name ({', '.join(DEVICES)}) or a size such as 141GB or 95GiB")
    ap.add_argument("--lower", choices=("tpu", "cuda", "cpu"), default=None,
                    help="also ask the compiler: lower the engine's decode block and one prefill chunk for this "
                         "platform on the mesh, with the Pallas kernels (tpu/cuda), from abstract arrays "
                         "(nothing is allocated; fake host devices stand in for the mesh)")
    ap.add_argument("--compile", action="store_true",
                    help="also compile both for the CPU backend and report XLA's per-device argument / output / "
                         "temporary bytes beside the formula (XLA:CPU temporaries are larger than TPU/GPU ones: "
                         "it computes bf16 dots in float32)")
    ap.add_argument("--chunk", type=int_at_least(1), default=256, help="prefill chunk for --lower/--compile")
    ap.add_argument("--layers", type=int_at_least(1), default=None,
                    help="override num_hidden_layers (a quicker --lower/--compile of a shallower model)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def _host_devices(n: int):
    """n CPU devices for a compiler check (fake host devices when the process can still make them)."""
    import os

    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={max(n, 1)}"])
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        raise CliError(f"--mesh needs {n} devices for the compiler check but this process has {len(cpus)} host "
                       f"devices; run plan in a fresh process (it then makes {n})")
    return cpus[:n]


def compiler_check(cfg, args) -> dict:
    """{"decode": {...}, "prefill": {...}} from dsv32_jax.compile_check for --lower / --compile."""
    from dsv32_jax import compile_check
    from dsv32_jax.sharding import make_mesh, parse_mesh

    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    devices = _host_devices(math.prod(parse_mesh(args.mesh).values()))
    mesh = make_mesh(args.mesh, devices=devices) if args.mesh else None
    fp8 = args.weights == "fp8" and cfg.fp8_block_size is not None
    out = {}
    for platform, comp in ((args.lower, False), ("cpu" if args.compile else None, True)):
        if platform is None:
            continue
        res = compile_check.check(cfg, mesh, platform=platform, batch=args.batch, max_len=args.max_len,
                                  chunk=args.chunk, numerics=args.numerics, fp8_weights=fp8, compile=comp,
                                  kv_cache=args.kv_cache)
        out["compiled_cpu" if comp else f"lowered_{platform}"] = res
    return out


def _main(args) -> int:
    check_mesh("--mesh", args.mesh)
    if args.kv_cache == "fp8" and args.numerics != "reference":
        raise CliError("--kv-cache fp8 stores the FP8-rounded latent of --numerics reference; "
                       f"it cannot be used with --numerics {args.numerics}")
    memory = _memory(args.device)
    path = abspath(args.config)
    try:
        cfg = load_config(path)
    except FileNotFoundError:
        raise CliError(f"--config: {path} not found" if not path.is_dir() else
                       f"--config: {path / 'config.json'} not found") from None
    except ValueError as e:         # ConfigError names the file and the field
        raise CliError(f"--config: {e}") from None
    fp8 = args.weights == "fp8" and cfg.fp8_block_size is not None
    plan_cfg = cfg if not args.layers else cfg.replace(num_hidden_layers=args.layers)
    out = plan(plan_cfg, args.mesh, max_len=args.max_len, batch=args.batch, fp8_weights=fp8, numerics=args.numerics,
               mtp=args.mtp, device_memory_gib=memory, kv_cache=args.kv_cache)
    if args.lower or args.compile:
        out["compiler"] = compiler_check(cfg, args)
        comp = out["compiler"].get("compiled_cpu", {}).get("decode")
        if comp:
            out["compiler"]["decode_arguments_over_formula"] = round(
                comp["argument_bytes"] / max(1, out["total_bytes_per_device"]), 4)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"mesh {out['mesh']} ({out['devices']} devices), {out['parameters'] / 1e9:.2f} B parameters, "
              f"weights {out['weights']}")
        print(f"  parameters per device: {out['parameter_bytes_per_device'] / GiB:8.2f} GiB "
              f"(total {out['parameter_bytes_total'] / GiB:.2f} GiB)")
        print(f"  cache per device:      {out['cache_bytes_per_device'] / GiB:8.2f} GiB "
              f"({out['batch']} x {out['max_len']} tokens, {out['cache_bytes_per_token_per_layer']} B/token/layer)")
        if "verdict" in out:
            print(f"  {out['verdict']}")
        for name, res in out.get("compiler", {}).items():
            if not isinstance(res, dict):
                continue
            for step, r in res.items():
                line = f"  {name} {step}: lowered in {r['lower_s']}s"
                if "compile_s" in r:
                    line += (f", compiled in {r['compile_s']}s; per device: arguments {r['argument_bytes'] / GiB:.2f} "
                             f"GiB, outputs {r['output_bytes'] / GiB:.2f} GiB, temporaries {r['temp_bytes'] / GiB:.2f} GiB")
                coll = r.get("collectives", r.get("lowered_collectives", {}))
                if coll:
                    line += "; collectives " + ", ".join(f"{k} x{v['count']} ({v['bytes']} B)" for k, v in coll.items())
                print(line)
    return 0 if out.get("fits", True) else 1


def main(argv=None) -> int:
    return run_cli(build_parser(), argv, _main)


if __name__ == "__main__":
    sys.exit(main())
