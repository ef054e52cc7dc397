"""Indexer drift: a LoRA fine-tune that moves the attention, with and without the indexer alignment.

    python benchmarks/indexer_drift.py [--steps 1000] [--seed 0] [--out drift.json]

1. A tiny one-layer DSA model (index_topk K = 8, T = 64 = 8 K, 4 attention heads) with peaked attention
   (main-attention weights x12, tokens from a 32-word vocabulary) gets an indexer of 16 heads x 64 dims
   aligned by the dense warm-up (finetune.train_indexer's stage 1, in memory; 1000 steps, lr 1e-2).
2. LoRA fine-tune (rank 16 on the attention and MLP projections, lr 5e-3, 1000 steps) through the
   sparse attention on a copy task whose answer sits a fixed 8 tokens back (x[t] = x[t - 8] after
   the first 8 tokens): the attention must move to a key the aligned indexer has no reason to select.
   a) --indexer-kl 0: the indexer stays as it was;
   b) --indexer-kl 1 (dense stage): indexer adapters (wq_b, wk; same rank) follow the attention.
3. Held-out: the sparse model's copy loss (NLL on the copied tokens), and the indexer's recall of
   the dense attention mass vs the ceiling (the attention's own top-K mass), both over the same
   queries (those with more than K visible keys).

The indexer is 4x the heads and 2x the head dim of the main attention's 4 x 32 (the release's ratio
is 64 x 128 against 128 heads); an 8 x 32 indexer, or the LoRA lr 2e-3, leaves the aligned arm
10+ points under the ceiling at the end of the fine-tune.

Prints (and writes with --out) one JSON object. CPU: about a minute for the defaults.
"""
from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv32_jax.config import ModelConfig
from dsv32_jax.finetune.data import Batch, ChatDataset
from dsv32_jax.finetune.indexer_stage import INDEXER_PARAMS, set_index_topk
from dsv32_jax.finetune.lora import LoRAConfig, apply_lora
from dsv32_jax.finetune.train import TrainHParams, Trainer
from dsv32_jax.model import RuntimeOptions, Transformer

V, T, K, B, D = 32, 64, 8, 4, 8


def model_config(index_heads: int, index_head_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=1, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
                       kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                       n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                       index_n_heads=index_heads, index_head_dim=index_head_dim, index_topk=K,
                       rope_original_max_position_embeddings=64, fp8_block_size=None)


def random_rows(rng, n):
    return rng.integers(0, V, (n, T + 1)).astype(np.int32)


def copy_rows(rng, n, d=D):
    """x[t] = x[t - d] for t >= d; loss weight on those targets only."""
    tok = rng.integers(0, V, (n, T + 1)).astype(np.int32)
    for t in range(d, T + 1):
        tok[:, t] = tok[:, t - d]
    mask = np.zeros_like(tok, np.float32)
    mask[:, d:] = 1.0
    return tok, mask


def base_model(cfg: ModelConfig, warmup_steps: int, lr: float, seed: int = 0):
    model = Transformer(cfg, RuntimeOptions(dtype=jnp.float32, numerics="exact"), rngs=nnx.Rngs(seed))
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "attn" in p and "indexer" not in p and v.get_value().ndim == 2:
            v.set_value(v.get_value() * 12.0)
    set_index_topk(model, T)
    hp = TrainHParams(lr=lr, steps=warmup_steps, warmup=10, end_lr_ratio=1.0, clip=1e9, remat=False,
                      indexer_kl=1.0, align_stage="dense", align_topk=K, align_chunk=64)
    trainer = Trainer(model, hp, trainable=INDEXER_PARAMS)
    rows = random_rows(np.random.default_rng(1 + 3 * seed), warmup_steps * B)
    for i in range(warmup_steps):
        r = rows[i * B:(i + 1) * B]
        trainer.train_step(Batch(r[:, :-1], r[:, 1:], np.ones((B, T), np.float32)))
    trainer.sync()
    set_index_topk(model, K)
    return model


def finetune(model, held_out, steps: int, kl: float, lr: float, targets=("attn",), rank: int = 8, d: int = D,
             seed: int = 0):
    model = nnx.clone(model)                 # an independent copy for this arm
    targets = tuple(targets) + (("indexer",) if kl > 0 else ())
    apply_lora(model, LoRAConfig(rank=rank, alpha=2 * rank, targets=targets, seed=seed))
    hp = TrainHParams(lr=lr, steps=steps, warmup=10, remat=False, indexer_kl=kl, align_stage="dense",
                      align_topk=K, align_chunk=64)
    trainer = Trainer(model, hp)
    before = trainer.evaluate(held_out, B, recall=True)
    tok, mask = copy_rows(np.random.default_rng(2 + 3 * seed), steps * B, d)
    t0 = time.perf_counter()
    for i in range(steps):
        r, m = tok[i * B:(i + 1) * B], mask[i * B:(i + 1) * B]
        trainer.train_step(Batch(r[:, :-1], r[:, 1:], m[:, 1:]))
    after = trainer.evaluate(held_out, B, recall=True)
    pick = ("eval_loss", "eval_indexer_recall", "eval_attention_ceiling", "eval_indexer_kl")
    return {"before": {k[5:]: before[k] for k in pick}, "after": {k[5:]: after[k] for k in pick},
            "train_s": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="LoRA fine-tuning steps per arm (default 1000)")
    ap.add_argument("--warmup-steps", type=int, default=1000, help="dense warm-up steps (default 1000)")
    ap.add_argument("--lr", type=float, default=5e-3, help="LoRA learning rate (default 5e-3)")
    ap.add_argument("--copy-distance", type=int, default=D, help=f"copy distance (default {D})")
    ap.add_argument("--targets", default="attn,mlp", help="LoRA targets of the main model (default attn,mlp)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--warmup-lr", type=float, default=1e-2, help="dense warm-up learning rate (default 1e-2)")
    ap.add_argument("--index-heads", type=int, default=16, help="indexer heads (default 16)")
    ap.add_argument("--index-head-dim", type=int, default=64, help="indexer head dim (default 64)")
    ap.add_argument("--kl-weight", type=float, default=1.0, help="--indexer-kl of the aligned arm (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    targets = tuple(t for t in args.targets.split(",") if t)
    cfg = model_config(args.index_heads, args.index_head_dim)
    base = base_model(cfg, args.warmup_steps, args.warmup_lr, args.seed)
    d = args.copy_distance
    held_out = ChatDataset(*copy_rows(np.random.default_rng(3 + 3 * args.seed), 16, d), shuffle=False)
    res = {"config": {"T": T, "index_topk": K, "vocab": V, "copy_distance": d, "steps": args.steps,
                      "warmup_steps": args.warmup_steps, "lr": args.lr, "targets": list(targets),
                      "rank": args.rank, "kl_weight": args.kl_weight,
                      "warmup_lr": args.warmup_lr, "index_heads": args.index_heads,
                      "index_head_dim": args.index_head_dim, "seed": args.seed},
           "without_indexer_kl": finetune(base, held_out, args.steps, 0.0, args.lr, targets, args.rank, d,
                                         args.seed),
           "with_indexer_kl": finetune(base, held_out, args.steps, args.kl_weight, args.lr, targets, args.rank,
                                      d, args.seed)}
    for arm in ("without_indexer_kl", "with_indexer_kl"):
        a = res[arm]["after"]
        a["ceiling_minus_recall"] = a["attention_ceiling"] - a["indexer_recall"]
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
