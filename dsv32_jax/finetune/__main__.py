"""LoRA fine-tuning CLI.

    python -m dsv32_jax.finetune --ckpt DIR --data train.jsonl --out RUN_DIR \\
        [--rank 8 --alpha 16 --lr 1e-4 --steps 1000 --batch 4 --seq-len 2048 --mesh data=8 \\
         --eval-data eval.jsonl]

RUN_DIR receives: checkpoints/ (Orbax: adapters + optimiser state + data position, every
--save-every steps), log.jsonl (one JSON object per step / eval), run_config.json, and at the
end adapter/ (PEFT-style safetensors + adapter_config.json) and merged/ (a Hugging Face
checkpoint with the adapters folded in, readable by dsv32_jax.load; skipped with --no-merge).
Rerunning the same command after an interruption resumes from the latest checkpoint and
produces the same adapters as an uninterrupted run.

Indexer alignment (--indexer-kl WEIGHT; on, weight 1, whenever the adapters touch the main
attention): the lightning indexer gets LoRA adapters on wq_b and wk (the "indexer" preset) trained
by its own KL loss towards the main attention (finetune.indexer_loss), so its selection follows the
attention the LoRA run moves; the LM loss never reaches it. The exported adapter and the merged
checkpoint carry these adapters. Evaluations report the indexer's recall (the share of the dense
attention mass that falls in its top-k, per layer).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from dsv32_jax.finetune.data import MODES, ChatDataset
from dsv32_jax.finetune.indexer_loss import summarize as summarize_alignment
from dsv32_jax.finetune.lora import TARGET_PRESETS, LoRAConfig, apply_lora, find_targets, merged_module, \
    save_peft, transfer_adapters
from dsv32_jax.finetune.train import Checkpointer, TrainHParams, Trainer, load_balance

# run_config.json keys that must match when resuming (everything that changes the result)
RESUME_KEYS = ("ckpt", "data", "rank", "alpha", "dropout", "targets", "lr", "steps", "warmup", "batch",
               "seq_len", "mode", "thinking_mode", "dtype", "numerics", "weight_decay", "clip", "seed",
               "fp8_weights", "attention_impl", "indexer_kl", "indexer_kl_stage")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsv32_jax.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="base model checkpoint directory (Hugging Face layout or converted)")
    p.add_argument("--data", required=True, help="training JSONL: one {\"messages\": [...]} per line")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, exports)")
    p.add_argument("--eval-data", help="evaluation JSONL (same format)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --ckpt)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0,
                   help="LoRA alpha; the update is scaled by alpha / rank (default 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    p.add_argument("--targets", default="attn",
                   help=f"comma-separated presets {sorted(TARGET_PRESETS)} or regexes over module paths "
                        "such as 'layers\\.[0-3]\\.attn\\.q_b'")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="peak AdamW learning rate, reached after --warmup, then cosine decay (default 1e-4)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in total (default 100)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the adapters (default 0)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="tokens per training row; longer conversations are cut (default 2048)")
    p.add_argument("--mode", choices=MODES, default="pack", help="pack conversations or pad each to a row")
    p.add_argument("--thinking-mode", choices=("chat", "thinking"), default="chat",
                   help="chat template mode used to encode the data (default chat)")
    p.add_argument("--dtype", default="bfloat16", help="compute / base-weight dtype")
    p.add_argument("--fp8-weights", action="store_true", help="keep FP8 base weights as e4m3 + scales")
    p.add_argument("--numerics", choices=("exact", "reference"), default="exact",
                   help="exact: no FP8 simulation (default); reference: the official FP8 indexer/KV numerics")
    p.add_argument("--attention-impl", choices=("xla", "pallas", "interpret"), default=None,
                   help="default: pallas on GPU/TPU, xla on CPU")
    p.add_argument("--indexer-kl", type=float, default=None, metavar="WEIGHT",
                   help="weight of the indexer alignment loss; >0 adds LoRA adapters to the indexer's "
                        "wq_b/wk trained by it (default: 1 when the adapters touch the main attention, else 0)")
    p.add_argument("--indexer-kl-stage", choices=("dense", "sparse"), default="dense",
                   help="alignment over all visible keys (dense: also moves the selection, one extra "
                        "forward-only dense attention pass) or over the selected keys only (sparse: cheap "
                        "at long context) (default dense)")
    p.add_argument("--mesh", help="device mesh such as 'data=4,tensor=2'")
    p.add_argument("--no-remat", action="store_true", help="keep all activations (no per-layer remat)")
    p.add_argument("--save-every", type=int, default=50,
                   help="checkpoint adapters + optimizer state + data position every N steps (default 50)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="evaluate on --eval-data every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of adapter init, data order and dropout")
    p.add_argument("--no-merge", action="store_true", help="skip the merged-checkpoint export")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _log(path: Path, record: dict):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _check_resume(out: Path, config: dict):
    path = out / "run_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), config.get(k)) for k in RESUME_KEYS if old.get(k) != config.get(k)}
        if diff:
            raise SystemExit(f"{out} holds a run with different settings {diff}; use a new --out directory")
    else:
        path.write_text(json.dumps(config, indent=2))


def run(argv=None, *, stop_after: int | None = None) -> dict:
    """Run the CLI; `stop_after` ends this process's loop after that many steps without any final
    save or export (what an interruption leaves behind). Returns a summary dict."""
    import dsv32_jax
    from dsv32_jax.generate.tokenizer import load_tokenizer

    args = build_parser().parse_args(argv)
    if args.mesh:     # multi-host: join the distributed runtime before any device is touched
        from dsv32_jax.sharding import maybe_initialize_distributed
        maybe_initialize_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.attention_impl is None:
        args.attention_impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    config = {k: v for k, v in vars(args).items()}
    config["ckpt"], config["data"] = str(Path(args.ckpt).absolute()), str(Path(args.data).absolute())
    _check_resume(out, config)
    log_path = out / "log.jsonl"

    tok_dir = Path(args.tokenizer or args.ckpt)
    tokenizer = load_tokenizer(tok_dir)
    loaded = dsv32_jax.load(args.ckpt, dtype=jnp.dtype(args.dtype), attention_impl=args.attention_impl,
                            numerics=args.numerics, fp8_weights=args.fp8_weights, mesh=args.mesh)
    model = loaded.module
    cfg = model.cfg
    data_kw = dict(seq_len=args.seq_len, mode=args.mode, thinking_mode=args.thinking_mode,
                   vocab_size=cfg.vocab_size)
    train_ds = ChatDataset.from_jsonl(args.data, tokenizer, seed=args.seed, **data_kw)
    eval_ds = (ChatDataset.from_jsonl(args.eval_data, tokenizer, shuffle=False, **data_kw)
               if args.eval_data else None)
    targets = tuple(t for t in args.targets.split(",") if t)
    indexer_kl = resolve_indexer_kl(model, targets, args.indexer_kl)
    if indexer_kl > 0 and "indexer" not in targets:
        targets += ("indexer",)
    lora_cfg = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets, seed=args.seed)
    apply_lora(model, lora_cfg)
    hp = TrainHParams(lr=args.lr, steps=args.steps, warmup=args.warmup, weight_decay=args.weight_decay,
                      clip=args.clip, remat=not args.no_remat, seed=args.seed, indexer_kl=indexer_kl,
                      align_stage=args.indexer_kl_stage)
    trainer = Trainer(model, hp)
    ckpt = Checkpointer(out / "checkpoints")
    position = 0
    if ckpt.latest_step() is not None:
        meta = ckpt.restore(trainer)
        position = int(meta["data_position"])
        print(f"resuming from step {trainer.step} (data position {position})", file=sys.stderr)

    tokens_per_step = args.batch * args.seq_len
    bar = tqdm(total=args.steps, initial=trainer.step, disable=args.quiet, unit="step", dynamic_ncols=True)
    ran, last = 0, {}
    try:
        while trainer.step < args.steps:
            if stop_after is not None and ran >= stop_after:
                return {"stopped_at": trainer.step}
            t0 = time.perf_counter()
            m = trainer.train_step(train_ds.batch(position, args.batch))
            dt = time.perf_counter() - t0
            position += args.batch
            ran += 1
            lb = load_balance(m.pop("expert_load"))
            if "align_stats" in m:
                lb.update(summarize_alignment(m.pop("align_stats")))
            last = {"step": trainer.step, **m, "tokens_per_s": tokens_per_step / dt, **lb}
            _log(log_path, last)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                            moe_max=f"{lb.get('moe_max_load', 0):.2f}")
            if eval_ds is not None and (trainer.step % args.eval_every == 0 or trainer.step == args.steps):
                ev = trainer.evaluate(eval_ds, args.batch, recall=True)
                _log(log_path, {"step": trainer.step, **ev})
                rec = ev.get("eval_indexer_recall")
                bar.write(f"step {trainer.step}: eval_loss {ev['eval_loss']:.4f}" +
                          (f" indexer_recall {rec:.3f} (ceiling {ev['eval_attention_ceiling']:.3f})"
                           if rec is not None else ""))
                last.update(ev)
            if trainer.step % args.save_every == 0 or trainer.step == args.steps:
                ckpt.save(trainer, {"data_position": position})
    finally:
        bar.close()

    if ckpt.latest_step() != trainer.step:
        ckpt.save(trainer, {"data_position": position})
    ckpt.close()
    trainer.sync()
    save_peft(model, out / "adapter", base_model_name_or_path=config["ckpt"])
    if not args.no_merge:
        export_merged(model, args, tok_dir, out / "merged")
    summary = {"step": trainer.step, "data_position": position, **{k: v for k, v in last.items() if k != "step"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def resolve_indexer_kl(model, targets, weight) -> float:
    """--indexer-kl: the given weight, or by default 1 when some adapter target is a module of the
    main attention (outside the indexer), else 0."""
    if weight is not None:
        if weight < 0:
            raise SystemExit(f"error: --indexer-kl must be >= 0, got {weight}")
        return float(weight)
    touched = find_targets(model, LoRAConfig(targets=targets))
    attn = any("attn" in p and "indexer" not in p for p, _ in touched)
    return 1.0 if attn else 0.0


def export_merged(model, args, tok_dir: Path, dest: Path):
    """Fold the adapters into the base weights and write a Hugging Face checkpoint (+ tokenizer)."""
    import dsv32_jax
    from dsv32_jax.export import save_hf

    if model.options.fp8_weights:   # merge into dequantised weights (FP8 requantisation is not done)
        plain = dsv32_jax.load(args.ckpt, dtype=jnp.dtype(args.dtype), numerics=args.numerics).module
        model = transfer_adapters(model, plain)
    extra = {n: (tok_dir / n).read_bytes() for n in TOKENIZER_FILES if (tok_dir / n).is_file()}
    save_hf(merged_module(model), dest, extra_files=extra)


def main(argv=None):
    summary = run(argv)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
