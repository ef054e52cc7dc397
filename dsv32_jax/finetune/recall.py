"""Indexer recall on held-out chat data: is DSA losing information?

    python -m dsv32_jax.finetune.recall --ckpt DIR --data eval.jsonl [--adapter RUN/adapter] \\
        [--seq-len 2048 --batch 4]

Prints one JSON object: eval_loss (the model's sparse-attention NLL on assistant tokens), and per
decoder layer the share of the main (dense) attention mass, summed over heads and normalised, that
falls in the indexer's top-k selection (indexer_recall_per_layer), next to the best any k keys can
keep (attention_ceiling_per_layer: the mass of the attention's own top-k); averages over layers as
indexer_recall / attention_ceiling, and the dense alignment KL (indexer_kl). Only queries with more
than index_topk visible keys count (shorter ones are dense anyway).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from dsv32_jax.finetune.data import MODES, ChatDataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsv32_jax.finetune.recall", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint directory (Hugging Face layout or converted)")
    p.add_argument("--data", required=True, help="held-out JSONL: one {\"messages\": [...]} per line")
    p.add_argument("--adapter", help="PEFT adapter directory written by the fine-tuning CLI")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --ckpt)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--batch", type=int, default=4, help="rows per forward (default 4)")
    p.add_argument("--mode", choices=MODES, default="pack", help="pack conversations or pad each to a row")
    p.add_argument("--thinking-mode", choices=("chat", "thinking"), default="chat")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    p.add_argument("--numerics", choices=("exact", "reference"), default="exact")
    p.add_argument("--attention-impl", choices=("xla", "pallas", "interpret"), default=None,
                   help="default: pallas on GPU/TPU, xla on CPU")
    p.add_argument("--chunk", type=int, default=128, help="queries per chunk of the dense pass (default 128)")
    return p


def run(argv=None) -> dict:
    import dsv32_jax
    from dsv32_jax.finetune.lora import load_peft
    from dsv32_jax.finetune.train import TrainHParams, Trainer
    from dsv32_jax.generate.tokenizer import load_tokenizer

    args = build_parser().parse_args(argv)
    for flag, v in (("--seq-len", args.seq_len), ("--batch", args.batch), ("--chunk", args.chunk)):
        if v < 1:
            raise SystemExit(f"error: {flag} must be >= 1, got {v}")
    if args.attention_impl is None:
        args.attention_impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    for name, path in (("--ckpt", args.ckpt), ("--data", args.data), ("--adapter", args.adapter)):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"error: {name} {path}: no such file or directory")
    tokenizer = load_tokenizer(Path(args.tokenizer or args.ckpt))
    model = dsv32_jax.load(args.ckpt, dtype=jnp.dtype(args.dtype), attention_impl=args.attention_impl,
                           numerics=args.numerics).module
    if args.adapter:
        load_peft(model, args.adapter)
    try:
        ds = ChatDataset.from_jsonl(args.data, tokenizer, seq_len=args.seq_len, mode=args.mode,
                                    thinking_mode=args.thinking_mode, shuffle=False,
                                    vocab_size=model.cfg.vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    trainer = Trainer(model, TrainHParams(align_chunk=args.chunk))
    ev = trainer.evaluate(ds, args.batch, recall=True)
    return {k[len("eval_"):] if k.startswith("eval_indexer") or k.startswith("eval_attention") else k: v
            for k, v in ev.items()}


def main(argv=None):
    print(json.dumps(run(argv)))


if __name__ == "__main__":
    sys.exit(main())
