"""Two-stage recipe: turn a dense MLA checkpoint into a DSA one (V3.2-Exp report 2.1).

    # 1. dense warm-up: fresh indexer, dense attention, only the indexer trains (dense KL)
    python -m dsv32_jax.finetune.train_indexer --stage dense-warmup --ckpt DENSE_DIR \\
        --data train.jsonl --out WARM [--steps 1000 --lr 1e-3 --batch 4 --seq-len 2048]
    # 2. sparse: top-k attention; the indexer trains on the KL over its selection while LoRA
    #    adapters on the main model train on the LM loss
    python -m dsv32_jax.finetune.train_indexer --stage sparse --ckpt WARM/model \\
        --data train.jsonl --out SPARSE [--targets attn --rank 8 --lr 1e-4]

DENSE_DIR: a Hugging Face checkpoint without indexer tensors (V3.1-Terminus layout; its config may
name index_n_heads / index_head_dim / index_topk, else the V3.2 release's 64 / 128 / 2048 apply).
The indexer's parameters are trained in full. RUN_DIR receives checkpoints/ (Orbax: trained state,
optimiser state, data position; rerunning the same command resumes exactly), log.jsonl (per step:
lm loss, indexer_kl, and in the warm-up the recall of the indexer's top-k vs the attention's own
top-k mass), run_config.json and, at the end, model/: a complete DSA checkpoint (base + trained
indexer, LoRA adapters folded in) that dsv32_jax.load and the next stage read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.finetune.data import MODES, Batch, ChatDataset
from dsv32_jax.finetune.indexer_loss import summarize
from dsv32_jax.finetune.indexer_stage import INDEXER_PARAMS, load_with_fresh_indexer, set_index_topk
from dsv32_jax.finetune.lora import LoRAConfig, LoRAWeight, apply_lora, merged_module
from dsv32_jax.finetune.train import Checkpointer, TrainHParams, Trainer

STAGES = ("dense-warmup", "sparse")
RESUME_KEYS = ("stage", "ckpt", "data", "steps", "lr", "warmup", "batch", "seq_len", "mode", "dtype",
               "numerics", "kl_weight", "targets", "rank", "alpha", "seed", "clip", "chunk")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsv32_jax.finetune.train_indexer",
                                description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--ckpt", required=True, help="model checkpoint directory (Hugging Face layout)")
    p.add_argument("--data", required=True, help="training JSONL: one {\"messages\": [...]} per line")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --ckpt)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate (default: 1e-3 dense-warmup, 1e-4 sparse)")
    p.add_argument("--warmup", type=int, default=None, help="lr warmup steps (default 5%% of --steps)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--mode", choices=MODES, default="pack")
    p.add_argument("--dtype", default="float32",
                   help="parameter dtype (default float32: the trained indexer keeps full-precision weights)")
    p.add_argument("--numerics", choices=("exact", "reference"), default="exact")
    p.add_argument("--attention-impl", choices=("xla", "pallas", "interpret"), default=None,
                   help="default: pallas on GPU/TPU, xla on CPU")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of the indexer KL (default 1)")
    p.add_argument("--chunk", type=int, default=128, help="queries per chunk of the KL (default 128)")
    p.add_argument("--targets", default="attn",
                   help="sparse stage: LoRA targets of the main model trained on the LM loss "
                        "('' trains the indexer only) (default attn)")
    p.add_argument("--rank", type=int, default=8, help="sparse stage: LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="sparse stage: LoRA alpha (default 16)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh indexer, data order, adapters")
    p.add_argument("--quiet", action="store_true")
    return p


def _fail(msg):
    raise SystemExit(f"error: {msg}")


def run(argv=None, *, stop_after: int | None = None) -> dict:
    """Run one stage; `stop_after` ends the loop after that many steps with no final save/export
    (what an interruption leaves behind). Returns a summary dict."""
    from dsv32_jax.export import save_hf
    from dsv32_jax.generate.tokenizer import load_tokenizer
    from dsv32_jax.model import RuntimeOptions

    args = build_parser().parse_args(argv)
    for flag in ("steps", "batch", "seq_len", "chunk", "save_every"):
        if getattr(args, flag) < 1:
            _fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("ckpt", "data"):
        if not Path(getattr(args, flag)).exists():
            _fail(f"--{flag} {getattr(args, flag)}: no such file or directory")
    dense = args.stage == "dense-warmup"
    if args.lr is None:
        args.lr = 1e-3 if dense else 1e-4
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    if args.attention_impl is None:
        args.attention_impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(vars(args), ckpt=str(Path(args.ckpt).absolute()), data=str(Path(args.data).absolute()))
    cpath = out / "run_config.json"
    if cpath.exists():
        old = json.loads(cpath.read_text())
        diff = {k: (old.get(k), config.get(k)) for k in RESUME_KEYS if old.get(k) != config.get(k)}
        if diff:
            _fail(f"{out} holds a run with different settings {diff}; use a new --out directory")
    else:
        cpath.write_text(json.dumps(config, indent=2))

    tok_dir = Path(args.tokenizer or args.ckpt)
    tokenizer = load_tokenizer(tok_dir)
    options = RuntimeOptions(dtype=jnp.dtype(args.dtype), numerics=args.numerics,
                             attention_impl=args.attention_impl)
    model, fresh = load_with_fresh_indexer(args.ckpt, options, seed=args.seed)
    if not dense and fresh:
        _fail(f"{args.ckpt}: {fresh} indexer tensors are missing; run --stage dense-warmup first")
    cfg = model.cfg
    try:
        ds = ChatDataset.from_jsonl(args.data, tokenizer, seq_len=args.seq_len, mode=args.mode,
                                    seed=args.seed, vocab_size=cfg.vocab_size)
    except ValueError as e:
        _fail(str(e))
    targets = tuple(t for t in args.targets.split(",") if t)
    if dense:
        set_index_topk(model, args.seq_len)          # every visible key selected: dense attention
        trainable = INDEXER_PARAMS
    else:
        if targets:
            apply_lora(model, LoRAConfig(rank=args.rank, alpha=args.alpha, targets=targets, seed=args.seed))
        trainable = nnx.Any(LoRAWeight, INDEXER_PARAMS)
    hp = TrainHParams(lr=args.lr, steps=args.steps, warmup=args.warmup, clip=args.clip, seed=args.seed,
                      indexer_kl=args.kl_weight, align_stage="dense" if dense else "sparse",
                      align_chunk=args.chunk, align_topk=cfg.index_topk)
    trainer = Trainer(model, hp, trainable=trainable)
    ckpt = Checkpointer(out / "checkpoints")
    position = 0
    if ckpt.latest_step() is not None:
        position = int(ckpt.restore(trainer)["data_position"])
        print(f"resuming from step {trainer.step} (data position {position})", file=sys.stderr)
    ran, last = 0, {}
    while trainer.step < args.steps:
        if stop_after is not None and ran >= stop_after:
            return {"stopped_at": trainer.step}
        batch: Batch = ds.batch(position, args.batch)
        m = trainer.train_step(batch)
        position += args.batch
        ran += 1
        m.pop("expert_load")
        align = summarize(m.pop("align_stats"))
        last = {"step": trainer.step, **m, **align}
        with open(out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(last) + "\n")
        if not args.quiet:
            rec = last.get("indexer_recall")
            print(f"step {trainer.step}: loss {last['loss']:.4f} indexer_kl {last['indexer_kl']:.4f}"
                  + (f" recall {rec:.3f}/{last['attention_ceiling']:.3f}" if rec is not None else ""),
                  file=sys.stderr)
        if trainer.step % args.save_every == 0 or trainer.step == args.steps:
            ckpt.save(trainer, {"data_position": position})
    if ckpt.latest_step() != trainer.step:
        ckpt.save(trainer, {"data_position": position})
    ckpt.close()
    trainer.sync()
    if dense:
        set_index_topk(model, cfg.index_topk)
    export = merged_module(model) if getattr(model, "lora", None) is not None else model
    extra = {n: (tok_dir / n).read_bytes() for n in TOKENIZER_FILES if (tok_dir / n).is_file()}
    save_hf(export, out / "model", extra_files=extra)
    summary = {"step": trainer.step, "data_position": position, "fresh_indexer_tensors": fresh,
               **{k: v for k, v in last.items() if k != "step"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None):
    print(json.dumps(run(argv)))


if __name__ == "__main__":
    main()
