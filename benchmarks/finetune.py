"""LoRA fine-tuning throughput and memory, sparse (DSA) vs dense attention; prints JSON.

Model: a tiny DeepSeek-V3.2 config (3 layers: 1 dense + 2 MoE, hidden 64, kv_lora_rank 32,
16 routed experts), random weights, float32, LoRA rank 8 on the five MLA projections, per-layer
remat, the jitted training step of `dsv32_jax.finetune.train` on random tokens.
  * sparse: index_topk = --topk (default 64), far below --seq-len (default 1024): every query
    attends to its 64 indexer-selected keys;
  * dense:  index_topk = seq_len, so every causal key is selected: the same code path computes
    exact dense causal attention (the indexer still runs, as it would with DSA switched off).
Each variant runs in its own process so that the peak resident memory (ru_maxrss) is its own;
"xla_step_bytes" is XLA's compiled-memory estimate for the step (arguments + outputs + temps),
and on an accelerator "device_peak_bytes" is the allocator's peak. tokens/s counts every input
token of a step (batch x seq_len) over the median steady-state step time.

    python benchmarks/finetune.py [--seq-len 1024 --topk 64 --batch 1 --steps 5 --impl xla]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv32_jax.config import ModelConfig  # noqa: E402
from dsv32_jax.finetune.data import Batch  # noqa: E402
from dsv32_jax.finetune.lora import LoRAConfig, apply_lora  # noqa: E402
from dsv32_jax.finetune import train as train_mod  # noqa: E402
from dsv32_jax.model import RuntimeOptions, Transformer  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
            v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4,
            topk_group=2, first_k_dense_replace=1, index_n_heads=16, index_head_dim=32,
            rope_original_max_position_embeddings=64, max_position_embeddings=16384, fp8_block_size=None)


def run_variant(variant: str, args) -> dict:
    topk = args.topk if variant == "sparse" else args.seq_len
    cfg = ModelConfig(**dict(TINY, num_attention_heads=args.heads), index_topk=topk)
    model = Transformer(cfg, RuntimeOptions(dtype=jnp.float32, numerics="exact", attention_impl=args.impl),
                        rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=8, alpha=16))
    hp = train_mod.TrainHParams(lr=1e-3, steps=args.steps + 1, warmup=1, remat=True)
    trainer = train_mod.Trainer(model, hp)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    batch = Batch(tok[:, :-1], tok[:, 1:], np.ones((args.batch, args.seq_len), np.float32))

    dev_batch = trainer.device_batch(batch)
    lowered = train_mod.train_step.lower(trainer.graphdef, hp, trainer.lora, trainer.rest, trainer.opt_state,
                                         dev_batch, jnp.asarray(0, jnp.int32))
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = None
    if mem is not None:
        xla_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)

    trainer.train_step(batch)                 # warm-up (the jit cache now holds the step)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        m = trainer.train_step(batch)         # returns host metrics: the step has finished
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
    step_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "variant": variant, "index_topk": topk, "seq_len": args.seq_len, "batch": args.batch,
        "attention_impl": args.impl, "backend": jax.default_backend(),
        "tokens_per_s": args.batch * args.seq_len / step_s, "step_s_median": step_s, "step_s_min": min(times),
        "compile_s": compile_s, "xla_step_bytes": xla_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "loss_first": losses[0], "loss_last": losses[-1],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--impl", default="xla", choices=("xla", "pallas", "interpret"))
    p.add_argument("--heads", type=int, default=4, help="attention heads (the GPU kernel needs a multiple of 32)")
    p.add_argument("--variant", choices=("sparse", "dense"), help="run one variant in this process")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    results = {}
    for variant in ("sparse", "dense"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--seq-len", str(args.seq_len),
               "--topk", str(args.topk), "--batch", str(args.batch), "--steps", str(args.steps), "--impl", args.impl,
               "--heads", str(args.heads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    s, d = results["sparse"], results["dense"]
    results["sparse_over_dense"] = {
        "tokens_per_s": s["tokens_per_s"] / d["tokens_per_s"],
        "peak_rss": s["peak_rss_bytes"] / d["peak_rss_bytes"],
        "xla_step_bytes": (s["xla_step_bytes"] / d["xla_step_bytes"]
                           if s["xla_step_bytes"] and d["xla_step_bytes"] else None),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
