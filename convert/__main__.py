"""Command line: `python -m convert weights --hf-dir DIR --out DIR [--dtype bfloat16|float8] [--keep-mtp]`.

Converts the Hugging Face release of DeepSeek-V3.2(-Exp) (FP8 e4m3 safetensors with 128x128
`weight_scale_inv` blocks, or a bf16/fp32 checkpoint) into a sharded orbax checkpoint that
`dsv32_jax.load(out_dir)` restores straight into the requested shardings. It streams: one
tensor is read at a time and one layer is written at a time, so memory does not grow with the
number of layers. Interrupted runs resume when the same command is run again.

Exit status: 0 on success, 1 on a conversion error (the message names file and tensor; a full
disk says what is kept), 2 on a usage error, 130 when interrupted (rerunning resumes).
The hidden option `--_sleep-per-layer SECONDS` is a test hook (a pause between saving an item
and committing it, so tests can kill the process mid-item).
"""
from __future__ import annotations

import argparse
import json
import sys

from dsv32_jax.cli import (EXIT_FAILED, ArgumentParser, CliError, abspath, exit_codes_epilog, int_at_least,
                           is_disk_full, run_cli)

DESCRIPTION = """\
Stream a Hugging Face DeepSeek-V3.2 checkpoint (model.safetensors.index.json + shards +
config.json) into a converted checkpoint directory: one orbax item per decoder layer under
params/, plus the globals (embedding, final norm, lm_head), our config.json, a manifest
(dsv32_convert.json) and the tokenizer files. Load it with dsv32_jax.load(OUT).

The source is validated before anything is written (missing or truncated shards, tensors
absent from their shard, unexpected tensors, shapes and dtypes against config.json, FP8 scale
shapes). Running the same command again after an interruption resumes without redoing
finished layers; the manifest is marked complete only after everything is written and
verified. A directory holding a different model or different options is refused."""


EXIT_CODES = {0: "converted (or already complete and verified)",
              1: "conversion error: the source, the output directory or the disk (the message names the "
                 "file and tensor; finished layers are kept, rerunning resumes)",
              2: "usage error (a flag)",
              130: "interrupted (finished layers are kept; run the same command again to resume)"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m convert", description="dsv32-jax checkpoint conversion.", debug=False,
                            epilog=exit_codes_epilog(EXIT_CODES))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser("weights", help="convert Hugging Face safetensors weights into a sharded orbax checkpoint",
                       description=DESCRIPTION, epilog=exit_codes_epilog(EXIT_CODES))
    w.add_argument("--hf-dir", required=True, metavar="DIR",
                   help="Hugging Face checkpoint directory: config.json, model.safetensors.index.json and "
                        "the model-*.safetensors shards (read lazily, one tensor at a time)")
    w.add_argument("--out", required=True, metavar="DIR",
                   help="output directory; created if missing. An interrupted conversion in it is resumed; "
                        "a non-empty directory that is not a conversion of this model with these options "
                        "is refused")
    w.add_argument("--dtype", choices=("bfloat16", "float8"), default="bfloat16",
                   help="bfloat16 (default): dequantise FP8 weights with their 128x128 weight_scale_inv "
                        "blocks and store bfloat16 (norms, router, indexer weights_proj stay float32). "
                        "float8: keep the e4m3 weights plus float32 block scales, for block-scaled "
                        "matmuls (the model then loads with fp8_weights=True); about half the size")
    w.add_argument("--keep-mtp", action="store_true",
                   help="also convert the multi-token-prediction layer (checkpoint layer "
                        "num_hidden_layers, model.layers.61 in the release); dropped by default")
    w.add_argument("--quiet", action="store_true",
                   help="no progress bars and no summary (errors are still printed)")
    w.add_argument("--verify-source", action="store_true",
                   help="re-hash the source tensors of every finished layer before trusting it (one read of "
                        "the source, no write); by default a finished layer is re-hashed only when a shard "
                        "it came from changed size, mtime or inode since it was converted")
    w.add_argument("--workers", type=int_at_least(1), default=None, metavar="N",
                   help="threads that dequantise/transpose experts in parallel (default: min(8, CPUs))")
    w.add_argument("--_sleep-per-layer", dest="sleep_per_layer", type=float, default=0.0,
                   help=argparse.SUPPRESS)   # test hook, see the module docstring
    return parser


def _main(args) -> int:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)   # orbax's informational logging
    from convert import ConvertError
    from convert.writer import convert_weights
    from dsv32_jax.config import ConfigError
    from dsv32_jax.safetensors_io import CheckpointError

    hf_dir, out = abspath(args.hf_dir), abspath(args.out)
    if not hf_dir.is_dir():
        raise CliError(f"--hf-dir {hf_dir}: " + ("not a directory" if hf_dir.exists() else "does not exist"),
                       EXIT_FAILED)
    try:
        summary = convert_weights(hf_dir, out, args.dtype, args.keep_mtp,
                                  progress=not args.quiet, workers=args.workers,
                                  sleep_per_layer=args.sleep_per_layer, verify_source=args.verify_source)
    except (ConvertError, CheckpointError, ConfigError) as e:
        raise CliError(str(e), EXIT_FAILED) from e
    except OSError as e:
        if is_disk_full(e):
            raise CliError(f"{e}: finished layers are kept; free space and run the same command again to resume",
                           EXIT_FAILED) from e
        raise CliError(str(e), EXIT_FAILED) from e
    if not args.quiet:
        print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), argv, _main,
                   interrupted="finished layers are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
