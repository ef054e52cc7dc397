"""LoRA fine-tuning CLI.

    python -m dsv32_jax.finetune --ckpt DIR --data train.jsonl --out RUN_DIR \\
        [--rank 8 --alpha 16 --lr 1e-4 --steps 1000 --batch 4 --seq-len 2048 --mesh data=8 \\
         --eval-data eval.jsonl]

RUN_DIR receives: checkpoints/ (Orbax: adapters + optimiser state + data position, every
--save-every steps), log.jsonl (one JSON object per step / eval), run_config.json, and at the
end adapter/ (PEFT-style safetensors + adapter_config.json), merged/ (a Hugging Face
checkpoint with the adapters folded in, readable by dsv32_jax.load; skipped with --no-merge)
and summary.json (the metrics of the last step, also printed).

Every input (flags, checkpoint directory, tokenizer, --targets, --mesh, both data files) is
checked before the model is loaded, and RUN_DIR is written only once training starts, so a
failed start leaves it as it was. Data whose rows hold no assistant token is refused; rows that
cut conversations are reported. Ctrl-C finishes the current step, saves a checkpoint of it and
exits with status 130. Rerunning the same command after an interruption (Ctrl-C or a kill)
resumes from the latest checkpoint, drops log rows of steps after it, and produces the same
adapters as an uninterrupted run; rerunning a finished run re-exports and keeps its summary.

Multi-host: start the same command on every host (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) with a --mesh over all devices; each batch is split over the processes, all of
them take the same steps and write the (shared) checkpoints together, and process 0 writes the
logs, the exports and the summary.

Indexer alignment (--indexer-kl WEIGHT; on, weight 1, whenever the adapters touch the main
attention): the lightning indexer gets LoRA adapters on wq_b and wk (the "indexer" preset) trained
by its own KL loss towards the main attention (finetune.indexer_loss), so its selection follows the
attention the LoRA run moves; the LM loss never reaches it. The exported adapter and the merged
checkpoint carry these adapters. Evaluations report the indexer's recall (the share of the dense
attention mass that falls in its top-k, per layer).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from dsv32_jax.cli import (ArgumentParser, CliError, LoadProgress, abspath, check_checkpoint_dir, check_mesh,
                           exit_codes_epilog, float_in, int_at_least, run_cli, warn)
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
DTYPES = ("bfloat16", "float32")
EXIT_CODES = {0: "trained (or already finished) and exported",
              1: "training or export failed (checkpoints so far are kept; rerunning resumes)",
              2: "bad input: a flag, the checkpoint, the tokenizer, a data file (file:line named), or a "
                 "run directory holding a run with other settings; nothing was written",
              130: "interrupted (Ctrl-C): a checkpoint of the last finished step was saved; rerun the same "
                   "command to resume"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dsv32_jax.finetune", description=__doc__, epilog=exit_codes_epilog(EXIT_CODES))
    p.add_argument("--ckpt", required=True, help="base model checkpoint directory (Hugging Face layout or converted)")
    p.add_argument("--data", required=True, help="training JSONL: one {\"messages\": [...]} per line")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, exports)")
    p.add_argument("--eval-data", help="evaluation JSONL (same format)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --ckpt)")
    p.add_argument("--rank", type=int_at_least(1), default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float_in(0.0, lo_open=True), default=16.0,
                   help="LoRA alpha; the update is scaled by alpha / rank (default 16)")
    p.add_argument("--dropout", type=float_in(0.0, 1.0, hi_open=True), default=0.0,
                   help="dropout on the adapter input, in [0, 1)")
    p.add_argument("--targets", default="attn",
                   help=f"comma-separated presets {sorted(TARGET_PRESETS)} or regexes over module paths "
                        "such as 'layers\\.[0-3]\\.attn\\.q_b'")
    p.add_argument("--lr", type=float_in(0.0, lo_open=True), default=1e-4,
                   help="peak AdamW learning rate, reached after --warmup, then cosine decay (default 1e-4)")
    p.add_argument("--steps", type=int_at_least(1), default=100, help="optimizer steps in total (default 100)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float_in(0.0), default=0.0,
                   help="AdamW weight decay on the adapters (default 0)")
    p.add_argument("--clip", type=float_in(0.0, lo_open=True), default=1.0, help="global gradient-norm clip")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int_at_least(1), default=2048,
                   help="tokens per training row; longer conversations are cut (default 2048)")
    p.add_argument("--mode", choices=MODES, default="pack", help="pack conversations or pad each to a row")
    p.add_argument("--thinking-mode", choices=("chat", "thinking"), default="chat",
                   help="chat template mode used to encode the data (default chat)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute / base-weight dtype")
    p.add_argument("--fp8-weights", action="store_true",
                   help="keep FP8 base weights as e4m3 + scales (an FP8 checkpoint; the merged export is "
                        "written with dequantised weights)")
    p.add_argument("--numerics", choices=("exact", "reference"), default="exact",
                   help="exact: no FP8 simulation (default); reference: the official FP8 indexer/KV numerics")
    p.add_argument("--attention-impl", choices=("auto", "xla", "pallas", "interpret"), default="auto",
                   help="auto (default): pallas on GPU/TPU, xla on CPU")
    p.add_argument("--indexer-kl", type=float, default=None, metavar="WEIGHT",
                   help="weight of the indexer alignment loss; >0 adds LoRA adapters to the indexer's "
                        "wq_b/wk trained by it (default: 1 when the adapters touch the main attention, else 0)")
    p.add_argument("--indexer-kl-stage", choices=("dense", "sparse"), default="dense",
                   help="alignment over all visible keys (dense: also moves the selection, one extra "
                        "forward-only dense attention pass) or over the selected keys only (sparse: cheap "
                        "at long context) (default dense)")
    p.add_argument("--mesh", help="device mesh such as 'data=4,tensor=2'")
    p.add_argument("--no-remat", action="store_true", help="keep all activations (no per-layer remat)")
    p.add_argument("--save-every", type=int_at_least(1), default=50,
                   help="checkpoint adapters + optimizer state + data position every N steps (default 50)")
    p.add_argument("--eval-every", type=int_at_least(1), default=50,
                   help="evaluate on --eval-data every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of adapter init, data order and dropout")
    p.add_argument("--no-merge", action="store_true", help="skip the merged-checkpoint export")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------------ run directory
def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:      # a line cut by a kill mid-write
            continue
    return rows


def _main_process() -> bool:
    """Multi-host: every process trains (same steps, its shards); only process 0 writes files."""
    return jax.process_index() == 0


def _write_atomic(path: Path, text: str):
    if not _main_process():
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def truncate_log(path: Path, step: int):
    """Keep the log rows of steps <= `step` (those after it were lost with an interruption)."""
    rows = _read_log(path)
    keep = [r for r in rows if int(r.get("step", 0)) <= step]
    if len(keep) != len(rows) or (path.is_file() and not path.read_text().endswith("\n") and path.stat().st_size):
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def _append_log(path: Path, record: dict):
    if not _main_process():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def summary_from_log(path: Path, step: int, position: int) -> dict:
    """{"step", "data_position", metrics of the last training step, and of its evaluation}."""
    rows = _read_log(path)
    train = [r for r in rows if "loss" in r and r.get("step") == step]
    evals = [r for r in rows if "eval_loss" in r and r.get("step") == step]
    out = {"step": step, "data_position": position}
    for r in train[-1:] + evals[-1:]:
        out.update({k: v for k, v in r.items() if k != "step"})
    return out


def check_run_dir(out: Path, config: dict) -> bool:
    """Raise CliError if `out` cannot hold this run; returns True if it holds this run's progress.

    A run_config.json with other settings is refused only when the directory holds progress of
    that run (a checkpoint or logged steps); otherwise nothing would be lost and it is replaced.
    """
    if out.exists() and not out.is_dir():
        raise CliError(f"--out: {out} exists and is not a directory")
    path = out / "run_config.json"
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"--out: {path}: corrupt run config ({e}); use a new --out directory") from None
    diff = {k: (old.get(k), config.get(k)) for k in RESUME_KEYS if old.get(k) != config.get(k)}
    progress = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) or \
        any("loss" in r for r in _read_log(out / "log.jsonl"))
    if diff and progress:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise CliError(f"--out: {out} holds a run with different settings ({shown}); rerun with the same "
                       "settings to resume it, or use a new --out directory")
    return not diff


# ------------------------------------------------------------------------------ input checks
def _load_data(flag: str, path: Path, tokenizer, args, vocab: int, *, shuffle: bool) -> ChatDataset:
    """A ChatDataset, or CliError naming the flag/file/line; refuses data without training
    targets, warns about rows that cut conversations."""
    try:
        ds = ChatDataset.from_jsonl(path, tokenizer, seq_len=args.seq_len, mode=args.mode,
                                    thinking_mode=args.thinking_mode, seed=args.seed, shuffle=shuffle,
                                    vocab_size=vocab)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None
    st = ds.stats
    if st.target_tokens == 0:
        raise CliError(f"{flag}: {path}: no assistant message in any of its {st.conversations} conversation(s): "
                       "the loss covers assistant tokens only, so there is nothing to train on")
    if st.kept_targets == 0:
        raise CliError(f"{flag}: {path}: --seq-len {args.seq_len} with --mode {args.mode} cuts every assistant token "
                       f"(the earliest one is token {st.first_target + 1} of its conversation); raise --seq-len "
                       f"to at least {st.first_target + 1}")
    if args.mode == "pad" and st.kept_targets < st.target_tokens:
        lost = st.target_tokens - st.kept_targets
        warn(f"{flag}: {path}: --seq-len {args.seq_len} cuts {st.over_length} of {st.conversations} conversations "
             f"(longest {st.longest} tokens): {lost} of {st.target_tokens} assistant tokens "
             f"({100 * lost / st.target_tokens:.0f}%) are not trained on")
    elif args.mode == "pack" and st.over_length:
        warn(f"{flag}: {path}: {st.over_length} of {st.conversations} conversations are longer than a row of "
             f"--seq-len {args.seq_len} tokens (longest {st.longest}): they are split across rows, and a row's "
             f"tokens are trained without the conversation before them in context "
             f"(about {st.kept_targets / max(1, len(ds)) * args.batch:.0f} target tokens per step)")
    return ds


def _check_targets(cfg, options, lora_cfg: LoRAConfig):
    """CliError for a --targets entry that is not a valid regex or matches no module (on the
    abstract model: nothing is allocated)."""
    import re

    from flax import nnx

    from dsv32_jax.finetune.lora import find_targets
    from dsv32_jax.model import Transformer

    for t in lora_cfg.targets:
        try:
            re.compile(TARGET_PRESETS.get(t, t))
        except re.error as e:
            raise CliError(f"--targets: {t!r} is not a preset {sorted(TARGET_PRESETS)} nor a valid regex ({e})") \
                from None
    if not lora_cfg.targets:
        raise CliError("--targets: no target given")
    abstract = nnx.eval_shape(lambda: Transformer(cfg, options, rngs=nnx.Rngs(0)))
    for t in lora_cfg.targets:
        if not find_targets(abstract, LoRAConfig(targets=(t,))):
            raise CliError(f"--targets: {t!r} matches no module of this model (presets: {sorted(TARGET_PRESETS)}; "
                           "regexes must match whole paths such as 'layers.0.attn.q_a' or 'layers.1.mlp.experts')")


def prepare(args) -> dict:
    """Check every input before the model is loaded; returns paths, config, tokenizer, data."""
    from dsv32_jax.converted import is_converted, read_manifest
    from dsv32_jax.generate.tokenizer import load_tokenizer
    from dsv32_jax.model import RuntimeOptions

    ckpt, data, out = abspath(args.ckpt), abspath(args.data), abspath(args.out)
    eval_data, tok_dir = abspath(args.eval_data), abspath(args.tokenizer or args.ckpt)
    check_mesh("--mesh", args.mesh, devices=jax.device_count())
    cfg = check_checkpoint_dir(ckpt)
    if args.fp8_weights:
        f8 = read_manifest(ckpt)["dtype"] == "float8" if is_converted(ckpt) else cfg.fp8_block_size is not None
        if not f8:
            raise CliError(f"--fp8-weights: {ckpt} holds no FP8 weights (no quantization_config, or a bfloat16 "
                           "conversion)")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    config = {k: v for k, v in vars(args).items() if k != "debug"}
    config.update(ckpt=str(ckpt), data=str(data), out=str(out), eval_data=eval_data and str(eval_data),
                  tokenizer=args.tokenizer and str(tok_dir))
    resuming = check_run_dir(out, config)
    if not tok_dir.is_dir():
        raise CliError(f"--tokenizer: {tok_dir} is not a directory")
    try:
        tokenizer = load_tokenizer(tok_dir)
    except FileNotFoundError:
        raise CliError(f"{'--tokenizer' if args.tokenizer else '--ckpt'}: {tok_dir / 'tokenizer.json'} not found "
                       "(pass --tokenizer DIR)") from None
    except Exception as e:  # noqa: BLE001 - a tokenizer file the tokenizers library cannot read
        raise CliError(f"{'--tokenizer' if args.tokenizer else '--ckpt'}: {tok_dir / 'tokenizer.json'}: cannot be "
                       f"read ({e})") from None
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    options = RuntimeOptions(dtype=jnp.dtype(args.dtype), fp8_weights=args.fp8_weights)
    _check_targets(cfg, options, LoRAConfig(targets=targets))
    indexer_kl = resolve_indexer_kl(cfg, options, targets, args.indexer_kl)
    if indexer_kl > 0 and "indexer" not in targets:
        targets += ("indexer",)
    lora_cfg = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets, seed=args.seed)
    train_ds = _load_data("--data", data, tokenizer, args, cfg.vocab_size, shuffle=True)
    eval_ds = (_load_data("--eval-data", eval_data, tokenizer, args, cfg.vocab_size, shuffle=False)
               if eval_data else None)
    return {"ckpt": ckpt, "out": out, "tok_dir": tok_dir, "config": config, "resuming": resuming,
            "lora_cfg": lora_cfg, "indexer_kl": indexer_kl, "train_ds": train_ds, "eval_ds": eval_ds}


# ------------------------------------------------------------------------------ training
class _StopRequest:
    """SIGINT while training: the first one asks the loop to stop after the current step (and
    save it), a second one interrupts at once. Installed only in the main thread."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt("stopped without saving the current step; rerun the same command to resume "
                                    "from the last checkpoint")
        self.requested = True
        print("\ninterrupt: finishing the current step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def train(args, *, stop_after: int | None = None) -> dict:
    """The CLI's work on parsed arguments; see `run`."""
    import dsv32_jax

    prep = prepare(args)
    out, config = prep["out"], prep["config"]
    train_ds, eval_ds = prep["train_ds"], prep["eval_ds"]
    bar = LoadProgress("loading base model", enabled=not args.quiet)
    try:
        loaded = dsv32_jax.load(prep["ckpt"], dtype=jnp.dtype(args.dtype), attention_impl=args.attention_impl,
                                numerics=args.numerics, fp8_weights=args.fp8_weights, mesh=args.mesh, progress=bar)
    except ValueError as e:           # CheckpointError / ConfigError: a tensor or field named
        raise CliError(f"--ckpt: {e}") from None
    finally:
        bar.close()
    model = loaded.module
    apply_lora(model, prep["lora_cfg"])
    hp = TrainHParams(lr=args.lr, steps=args.steps, warmup=args.warmup, weight_decay=args.weight_decay,
                      clip=args.clip, remat=not args.no_remat, seed=args.seed, indexer_kl=prep["indexer_kl"],
                      align_stage=args.indexer_kl_stage)
    trainer = Trainer(model, hp)

    # every input is valid: from here on the run directory is written
    out.mkdir(parents=True, exist_ok=True)
    if not prep["resuming"]:
        _write_atomic(out / "run_config.json", json.dumps(config, indent=2))
    log_path = out / "log.jsonl"
    ckpt = Checkpointer(out / "checkpoints")
    position = 0
    if ckpt.latest_step() is not None:
        meta = ckpt.restore(trainer)
        position = int(meta["data_position"])
        print(f"resuming from step {trainer.step} (data position {position})", file=sys.stderr)
    truncate_log(log_path, trainer.step)

    tokens_per_step = args.batch * args.seq_len
    pbar = tqdm(total=args.steps, initial=trainer.step, disable=args.quiet or not _main_process(), unit="step",
                dynamic_ncols=True)
    ran = 0
    try:
        with _StopRequest() as stop:
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
                _append_log(log_path, {"step": trainer.step, **m, "tokens_per_s": tokens_per_step / dt, **lb})
                pbar.update(1)
                pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                                 moe_max=f"{lb.get('moe_max_load', 0):.2f}")
                if eval_ds is not None and (trainer.step % args.eval_every == 0 or trainer.step == args.steps):
                    ev = trainer.evaluate(eval_ds, args.batch, recall=True)
                    _append_log(log_path, {"step": trainer.step, **ev})
                    rec = ev.get("eval_indexer_recall")
                    pbar.write(f"step {trainer.step}: eval_loss {ev['eval_loss']:.4f}" +
                               (f" indexer_recall {rec:.3f} (ceiling {ev['eval_attention_ceiling']:.3f})"
                                if rec is not None else ""))
                if trainer.step % args.save_every == 0 or trainer.step == args.steps or stop.requested:
                    if ckpt.latest_step() != trainer.step:
                        ckpt.save(trainer, {"data_position": position})
                if stop.requested and trainer.step < args.steps:
                    ckpt.close()
                    raise KeyboardInterrupt(f"saved a checkpoint of step {trainer.step} of {args.steps} in "
                                            f"{out / 'checkpoints'}; run the same command again to resume")
    finally:
        pbar.close()

    if ckpt.latest_step() != trainer.step:
        ckpt.save(trainer, {"data_position": position})
    ckpt.close()
    trainer.sync()
    save_peft(model, out / "adapter", base_model_name_or_path=config["ckpt"])
    if not args.no_merge:
        export_merged(model, args, prep["ckpt"], prep["tok_dir"], out / "merged")
    summary = summary_from_log(log_path, trainer.step, position)
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def run(argv=None, *, stop_after: int | None = None) -> dict:
    """Run the CLI; `stop_after` ends this process's loop after that many steps without any final
    save or export (what an interruption leaves behind). Returns a summary dict. Bad input
    raises CliError (SystemExit for a flag argparse rejects)."""
    return train(build_parser().parse_args(argv), stop_after=stop_after)


def resolve_indexer_kl(cfg, options, targets, weight) -> float:
    """--indexer-kl: the given weight, or by default 1 when some adapter target is a module of the
    main attention (outside the indexer), else 0 (decided on the abstract model)."""
    from flax import nnx

    from dsv32_jax.model import Transformer

    if weight is not None:
        if not weight >= 0:
            raise CliError(f"--indexer-kl must be >= 0, got {weight}")
        return float(weight)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, options, rngs=nnx.Rngs(0)))
    touched = find_targets(abstract, LoRAConfig(targets=tuple(targets)))
    attn = any("attn" in p and "indexer" not in p for p, _ in touched)
    return 1.0 if attn else 0.0


def export_merged(model, args, ckpt: Path, tok_dir: Path, dest: Path):
    """Fold the adapters into the base weights and write a Hugging Face checkpoint (+ tokenizer)."""
    import dsv32_jax
    from dsv32_jax.export import save_hf

    if model.options.fp8_weights:   # merge into dequantised weights (FP8 requantisation is not done)
        plain = dsv32_jax.load(ckpt, dtype=jnp.dtype(args.dtype), numerics=args.numerics, fp8_weights=False).module
        model = transfer_adapters(model, plain)
    extra = {n: (tok_dir / n).read_bytes() for n in TOKENIZER_FILES if (tok_dir / n).is_file()}
    save_hf(merged_module(model), dest, extra_files=extra)


def _main(args) -> int:
    if args.mesh:     # multi-host: join the distributed runtime before any device is touched
        check_mesh("--mesh", args.mesh)
        from dsv32_jax.sharding import maybe_initialize_distributed
        maybe_initialize_distributed()
    summary = train(args)
    if _main_process():
        print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), argv, _main,
                   interrupted="stopped before training started; nothing was written to --out")


if __name__ == "__main__":
    sys.exit(main())
