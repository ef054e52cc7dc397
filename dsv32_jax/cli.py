"""What every command line of this package shares: one error style, exit codes, path handling.

Each CLI (`python -m convert weights`, `python -m dsv32_jax.generate`, `python -m dsv32_jax.finetune`,
`python -m dsv32_jax.plan`) has a `main(argv) -> int` built on `run_cli`:

  * a user mistake is one line on stderr, `error: <what>`, naming the flag, file, line or field,
    and a non-zero exit status (listed in each `--help` epilog); no traceback;
  * `--debug` adds the traceback (for bug reports);
  * Ctrl-C is `interrupted: ...` and exit status 130 (the CLI says what was kept and how to resume);
  * an unexpected failure is `error: <type>: <message>` and exit status 1, with a pointer to --debug.

Paths given on the command line are made absolute once, here (`abspath`), before anything uses
them: orbax refuses relative checkpoint paths, and a run's recorded settings must not depend on
the directory it was started from.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1          # the work itself failed (or, for plan, the model does not fit)
EXIT_USAGE = 2           # bad input: a flag, a file, a line of data, a config field
EXIT_INTERRUPTED = 130   # Ctrl-C (128 + SIGINT)


class CliError(Exception):
    """A user mistake or an unusable input: printed as `error: <message>`, exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `error: ...` lines, exit status 2 for usage errors and a `--debug` flag.

    debug: add `--debug` (leaf parsers; sub-command parsers inherit the class and pass it again).
    """

    def __init__(self, *args, debug: bool = True, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        if debug:
            self.add_argument("--debug", action="store_true",
                              help="print the Python traceback of an error (for bug reports)")

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def exit_codes_epilog(codes: dict[int, str]) -> str:
    """The `--help` epilog listing a CLI's exit statuses."""
    lines = ["exit status:"] + [f"  {k:<4d}{v}" for k, v in sorted(codes.items())]
    lines.append("Errors are one line on stderr, 'error: ...'; --debug adds the traceback.")
    return "\n".join(lines)


def abspath(p) -> Path | None:
    """An absolute path ("~" expanded), symlinks kept; None stays None."""
    if p is None:
        return None
    return Path(os.path.abspath(os.path.expanduser(str(p))))


# ------------------------------------------------------------------------------ argument types
def int_at_least(lo: int):
    """argparse type: an integer >= lo."""
    def conv(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n
    conv.__name__ = f"integer >= {lo}"
    return conv


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in [lo, hi] (open ends where asked)."""
    def conv(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {x}")
        if hi is not None and (x > hi or (hi_open and x == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {x}")
        return x
    conv.__name__ = "number"
    return conv


def check_mesh(flag: str, spec: str | None, *, devices: int | None = None) -> None:
    """Raise CliError naming `flag` if the mesh string is malformed (or, given `devices`, does
    not use exactly that many devices)."""
    if not spec:
        return
    from dsv32_jax.sharding import parse_mesh

    try:
        sizes = parse_mesh(spec)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None
    if devices is not None and math.prod(sizes.values()) != devices:
        raise CliError(f"{flag} {spec!r} uses {math.prod(sizes.values())} devices but {devices} are available")


def is_disk_full(e: BaseException) -> bool:
    """True for 'no space left on device' (or quota) errors, also when a library wrapped them."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def check_checkpoint_dir(ckpt: Path, flag: str = "--ckpt"):
    """The config of a checkpoint directory, or CliError saying what is wrong with it (missing,
    an interrupted conversion, no config.json, a bad field)."""
    from dsv32_jax.config import load_config
    from dsv32_jax.converted import is_converted, read_manifest
    from dsv32_jax.safetensors_io import CheckpointError

    if not ckpt.is_dir():
        raise CliError(f"{flag}: {ckpt} is not a directory" if ckpt.exists() else f"{flag}: {ckpt} does not exist")
    if is_converted(ckpt):
        try:
            man = read_manifest(ckpt)
        except CheckpointError as e:
            raise CliError(f"{flag}: {e}") from None
        if not man.get("complete"):
            raise CliError(f"{flag}: {ckpt}: the conversion is incomplete (interrupted or still running); run the "
                           "same `python -m convert weights` command again to finish it")
    if not (ckpt / "config.json").is_file():
        raise CliError(f"{flag}: {ckpt / 'config.json'} not found (not a checkpoint directory)")
    try:
        return load_config(ckpt)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None


class LoadProgress:
    """A progress bar on stderr for `dsv32_jax.load(progress=...)`."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, name, done, total):
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, file=sys.stderr, dynamic_ncols=True, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------ running
def run_cli(parser: argparse.ArgumentParser, argv, body, *, interrupted: str = "interrupted") -> int:
    """Parse `argv` and run `body(args) -> int | None`, turning exceptions into the common style.

    CliError -> its message and code; KeyboardInterrupt -> `interrupted` and 130; any other
    exception -> `error: <type>: <message>` and 1 (the traceback too with --debug).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                 # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    try:
        rc = body(args)
        return EXIT_OK if rc is None else int(rc)
    except CliError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code
    except KeyboardInterrupt as e:       # a CLI may raise KeyboardInterrupt("what was saved") itself
        if debug:
            traceback.print_exc()
        print(f"\ninterrupted: {str(e) or interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback only on request
        if debug:
            traceback.print_exc()
        if is_disk_full(e):
            print(f"error: no space left on device ({e})", file=sys.stderr, flush=True)
        else:
            print(f"error: {type(e).__name__}: {e}" + ("" if debug else " (run again with --debug for the "
                                                        "traceback)"), file=sys.stderr, flush=True)
        return EXIT_FAILED


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)

