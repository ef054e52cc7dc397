"""The output side of `python -m convert weights`: one orbax item per layer, resumable.

For every planned item (decoder layer i, then the globals, then the MTP head) not already
finished:

  1. build its parameters from the source, one at a time (`convert.read_param`), and record
     shape, dtype and crc32 of each, and the sha256 of every source tensor read for it (hashed
     while it streams: no second read);
  2. save them as one orbax checkpoint into `params/<item>.partial` (uncompressed, one chunk per
     array, the host arrays referenced, not copied: the item's arrays are the only large
     allocation);
  3. read every array back (one at a time) and compare its crc32;
  4. rename `<item>.partial` -> `<item>` and record the item in the manifest (written to a
     temporary file and renamed), with its source digests and the (size, mtime_ns, inode) of
     the shard files it read, as they were before the read.

When is a finished item trusted on a rerun (resume, or a rerun over a complete output)?
The source must have the same fingerprint (config, tensor table, first 64 KiB of each shard;
otherwise the directory is refused as another model's), and for each recorded item:
  * if every shard it read still has the recorded (size, mtime_ns, inode), it is kept without
    reading anything (the cheap check: a rerun over a finished 690 GB output stays instant);
  * otherwise (a shard was rewritten, replaced or copied elsewhere) the item's source tensors
    are hashed again (one read, no write) and the item is kept only if every digest matches;
    an item whose source changed is converted again, so the output never mixes two models.
The cheap check cannot see a shard rewritten in place to the same size with its mtime set
back; `--verify-source` (verify_source=True) re-hashes every item's sources instead, which
costs one full read of the source and no write. The shard stats are checked once more before
the completion mark, so a source modified during the run is not marked complete.

A full disk is checked before writing (free space against the bytes still to write) and, if it
fills up anyway, reported with what is kept; rerunning resumes.

A killed run leaves at most one `.partial` directory and orbax temporaries, which the next run
deletes before it redoes that item; recorded items are skipped. After the last item the
tokenizer files and config.json are copied/written, every item's orbax metadata is checked
against the manifest, and only then is the manifest marked "complete". Peak memory is one
item's arrays plus bounded temporaries, whatever the number of layers.

Test hook: `sleep_per_layer` (CLI `--_sleep-per-layer`, hidden) pauses after each item is
saved and before it is verified and renamed, so a test can kill the process mid-item.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from convert import ConvertError, Item, Plan, plan_conversion, read_param, shard_stats, tensor_digest
from dsv32_jax.cli import abspath, is_disk_full
from dsv32_jax.config import load_config
from dsv32_jax.converted import FORMAT, FORMAT_VERSION, MANIFEST_NAME, PARAMS_DIR, read_manifest
from dsv32_jax.safetensors_io import CheckpointError

PARTIAL = ".partial"
LOCK_NAME = ".convert.lock"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# ----------------------------------------------------------------------------- files
def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary name, fsync, and rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or "token" in name.lower() or name.endswith(".jinja")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


# ----------------------------------------------------------------------------- arrays
def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it in per-thread arenas otherwise, and
    the resident size would creep up item after item)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def _nest(flat: dict) -> dict:
    """{"attn/q_a/kernel": v} -> {"attn": {"q_a": {"kernel": v}}}."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = key.split("/")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = v
    return out


def _flatten_meta(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_meta(v, prefix + (k,)))
        else:
            out["/".join(prefix + (k,))] = v
    return out


def _checkpointer():
    """A synchronous orbax checkpointer that writes host arrays uncompressed, without copying them."""
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


# ----------------------------------------------------------------------------- progress
class Progress:
    """Two tqdm bars on stderr: overall bytes (with ETA) and the current tensor; no-op if disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        common = dict(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)
        self.overall = tqdm(total=total, initial=initial, desc="convert", position=0, **common)
        self.tensor = tqdm(total=0, desc="", position=1, leave=False, **common)

    def item(self, name: str) -> None:
        if self.enabled:
            self.overall.set_postfix_str(name)

    def tensor_start(self, desc: str, total: int) -> None:
        if self.enabled:                     # like tqdm.reset, without forcing a redraw per tensor
            t = self.tensor
            t.n, t.last_print_n, t.total = 0, 0, total
            t.start_t = t.last_print_t = time.time()
            t.set_description_str(desc, refresh=False)

    def advance(self, n: int) -> None:
        if self.enabled:
            self.tensor.update(n)
            self.overall.update(n)

    def phase(self, text: str) -> None:
        if self.enabled:
            self.tensor.set_description_str(text)
            self.tensor.refresh()

    def close(self) -> None:
        if self.enabled:
            self.tensor.close()
            self.overall.close()


# ----------------------------------------------------------------------------- manifest
def _new_manifest(plan: Plan) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": plan.dtype, "keep_mtp": plan.keep_mtp,
            "fp8_block_size": list(plan.out_cfg.fp8_block_size) if plan.out_cfg.fp8_block_size else None,
            "source": plan.source, "items_planned": [i.name for i in plan.items], "items": {},
            "complete": False}


def _save_manifest(out: Path, man: dict) -> None:
    atomic_write_text(out / MANIFEST_NAME, json.dumps(man, indent=1))


def _open_output(out: Path, plan: Plan) -> dict:
    """The manifest of `out`: a new one, or the existing one if it is this same conversion."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    if (out / MANIFEST_NAME).exists():
        try:
            man = read_manifest(out)
        except CheckpointError as e:
            raise ConvertError(f"{e}; refusing to write into {out}") from None
        old, new = man.get("source", {}).get("fingerprint"), plan.source["fingerprint"]
        if old != new:
            raise ConvertError(f"{out}: already holds a conversion of a different model (source fingerprint "
                               f"{old}, but {plan.hf_dir} has {new}); use another --out or delete it")
        if man["dtype"] != plan.dtype or bool(man.get("keep_mtp")) != plan.keep_mtp:
            raise ConvertError(f"{out}: already holds a conversion of this model with --dtype {man['dtype']}"
                               f"{' --keep-mtp' if man.get('keep_mtp') else ''}; use another --out or delete it")
        if man.get("items_planned") != [i.name for i in plan.items]:
            raise ConvertError(f"{out}: holds a conversion planned differently ({man.get('items_planned')}); "
                               "use another --out or delete it")
        return man
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out}: exists, is not empty and holds no conversion ({MANIFEST_NAME} missing); "
                           "refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    man = _new_manifest(plan)
    _save_manifest(out, man)
    return man


@contextlib.contextmanager
def _lock(out: Path):
    """One converter per output directory (released by the OS if the process dies)."""
    with open(out / LOCK_NAME, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConvertError(f"{out}: another conversion is writing to this directory") from None
        yield


# ----------------------------------------------------------------------------- verification
def _item_meta_matches(ck, item_dir: Path, params: dict) -> str | None:
    """None if the orbax metadata of `item_dir` lists exactly `params` (shape, dtype), else why not."""
    try:
        tree = ck.metadata(item_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001 - any failure to read the metadata means a damaged item
        return f"unreadable orbax metadata ({type(e).__name__}: {e})"
    meta = _flatten_meta(tree)
    if set(meta) != set(params):
        diff = sorted(set(meta) ^ set(params))
        return f"parameter set differs from the manifest (e.g. {diff[0]!r})"
    for key, rec in params.items():
        m = meta[key]
        if tuple(m.shape) != tuple(rec["shape"]) or str(np.dtype(m.dtype)) != rec["dtype"]:
            return f"parameter {key!r} is {tuple(m.shape)} {np.dtype(m.dtype)}, the manifest says {rec}"
    return None


def _verify_item(ck, item_dir: Path, params: dict) -> None:
    """Read every array of a freshly written item back (one at a time) and compare crc32."""
    import orbax.checkpoint as ocp

    why = _item_meta_matches(ck, item_dir, params)
    if why:
        raise ConvertError(f"{item_dir}: written item does not verify: {why}")
    for key, rec in params.items():
        target = _nest({key: jax.ShapeDtypeStruct(tuple(rec["shape"]), np.dtype(rec["dtype"]))})
        args = _nest({key: ocp.RestoreArgs(restore_type=np.ndarray)})
        got = ck.restore(item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True))
        for k in key.split("/"):
            got = got[k]
        if _crc(got) != rec["crc32"]:
            raise ConvertError(f"{item_dir}: parameter {key!r} reads back differently from what was written "
                               "(crc32 mismatch): the disk or file system corrupted it")


def _verify_all(ck, out: Path, plan: Plan, man: dict) -> None:
    """Final check before the completion mark: every item present and matching, config readable."""
    for item in plan.items:
        rec = man["items"].get(item.name)
        if rec is None:
            raise ConvertError(f"{out}: item {item.name!r} was not written")
        want = {j.key for j in item.jobs}
        if set(rec["params"]) != want:
            raise ConvertError(f"{out}: item {item.name!r} holds {sorted(set(rec['params']) ^ want)[0]!r} "
                               "unlike the plan")
        why = _item_meta_matches(ck, out / PARAMS_DIR / item.name, rec["params"])
        if why:
            raise ConvertError(f"{out / PARAMS_DIR / item.name}: {why}")
    if load_config(out) != plan.out_cfg:
        raise ConvertError(f"{out / 'config.json'}: does not describe the converted model")


# ----------------------------------------------------------------------------- writing
def _clean(ck, out: Path, man: dict) -> None:
    """Keep the recorded items whose metadata still matches; delete everything else in params/."""
    pdir = out / PARAMS_DIR
    pdir.mkdir(exist_ok=True)
    done = {}
    for name, rec in man["items"].items():
        d = pdir / name
        if d.is_dir() and _item_meta_matches(ck, d, rec["params"]) is None:
            done[name] = rec
    if done.keys() != man["items"].keys():
        man["items"] = done
        man["complete"] = False
        _save_manifest(out, man)
    for entry in pdir.iterdir():
        if entry.name not in done:
            _remove(entry)


def _build_and_save(ck, tmp: Path, plan: Plan, item: Item, progress: Progress, pool) -> tuple[dict, dict]:
    """Build the item's arrays, save them to `tmp`; returns ({key: {shape, dtype, crc32}},
    {source tensor: sha256}). The arrays are released when this returns."""
    import orbax.checkpoint as ocp

    arrays, meta, digests = {}, {}, {}
    for job in item.jobs:
        progress.tensor_start(job.key, job.bytes_in)
        a = read_param(plan.ckpt, job, plan.cfg.fp8_block_size, pool=pool, on_tensor=progress.advance,
                       digests=digests)
        if a.shape != job.shape or a.dtype != job.dtype:
            raise ConvertError(f"{job.names[0]!r}: built {a.shape} {a.dtype}, planned {job.shape} {job.dtype}")
        arrays[job.key] = a
        meta[job.key] = {"shape": list(a.shape), "dtype": str(a.dtype), "crc32": _crc(a)}
    progress.phase(f"writing {item.name}")
    ck.save(tmp, args=ocp.args.PyTreeSave(_nest(arrays), ocdbt_target_data_file_size=0))
    arrays.clear()
    _release_free_memory()
    if set(digests) != set(item.sources):
        raise ConvertError(f"{item.name}: source digests do not cover the tensors read")
    return meta, {n: digests[n] for n in sorted(digests)}


def _item_files(plan: Plan, item: Item) -> list[str]:
    return sorted({plan.ckpt.weight_map[n] for n in item.sources})


def _write_item(ck, out: Path, plan: Plan, item: Item, man: dict, progress: Progress, pool,
                sleep_per_layer: float) -> None:
    pdir = out / PARAMS_DIR
    tmp, final = pdir / (item.name + PARTIAL), pdir / item.name
    for p in (tmp, final):
        _remove(p)
    progress.item(item.name)
    meta, digests = _build_and_save(ck, tmp, plan, item, progress, pool)
    if sleep_per_layer:
        time.sleep(sleep_per_layer)          # test hook: a window to kill the process mid-item
    progress.phase(f"verifying {item.name}")
    _verify_item(ck, tmp, meta)
    _release_free_memory()
    os.rename(tmp, final)
    _fsync_dir(pdir)
    man["items"][item.name] = {"params": meta, "bytes": item.bytes_out, "source": digests,
                               "source_files": {f: plan.stats[f] for f in _item_files(plan, item)}}
    _save_manifest(out, man)


def _check_sources(out: Path, plan: Plan, man: dict, verify_source: bool, progress: bool) -> list[str]:
    """Drop the recorded items whose source is not the one recorded (see the module docstring);
    returns their names. Items recorded without source digests are dropped too."""
    items = {i.name: i for i in plan.items}
    now = plan.stats
    dropped, rehashed = [], 0
    for name, rec in list(man["items"].items()):
        item = items.get(name)
        digests = rec.get("source")
        why = None
        if item is None or not isinstance(digests, dict) or set(digests) != set(item.sources):
            why = "no source digests recorded for it"
        else:
            files = rec.get("source_files") or {}
            if verify_source or any(files.get(f) != now[f] for f in _item_files(plan, item)):
                rehashed += 1
                if progress:
                    print(f"checking the source of finished item {name} (re-hashing {item.bytes_in / 2**20:.0f} MiB: "
                          + ("--verify-source" if verify_source else "a shard file it came from changed") + ")",
                          file=sys.stderr, flush=True)
                for n in item.sources:
                    if tensor_digest(plan.ckpt, n) != digests[n]:
                        why = (f"source tensor {n!r} ({plan.ckpt.weight_map[n]}) changed since it was "
                               "converted")
                        break
                if why is None:
                    rec["source_files"] = {f: now[f] for f in _item_files(plan, item)}
        if why is not None:
            dropped.append(name)
            del man["items"][name]
            print(f"note: {out / PARAMS_DIR / name}: {why}; converting it again", file=sys.stderr, flush=True)
    if dropped or rehashed:
        if dropped:
            man["complete"] = False
        _save_manifest(out, man)
    return dropped


def _check_space(out: Path, plan: Plan, todo: list) -> None:
    """Refuse to start when the bytes still to write exceed the free space of `out`'s file system."""
    need = sum(i.bytes_out for i in todo)
    free = shutil.disk_usage(out).free
    if need > free:
        raise ConvertError(f"{out}: not enough free space: {len(todo)} item(s) still to write need about "
                           f"{need / 2**30:.2f} GiB, the file system has {free / 2**30:.2f} GiB free; free "
                           "space (or use another --out) and run the same command again")


def _finalize(ck, out: Path, plan: Plan, man: dict) -> None:
    for f in sorted(plan.hf_dir.iterdir()):
        if f.is_file() and _is_tokenizer_file(f.name):
            _atomic_copy(f, out / f.name)
    atomic_write_text(out / "config.json", json.dumps(plan.out_cfg.to_hf_dict(), indent=2))
    _verify_all(ck, out, plan, man)
    changed = sorted(f for f, st in shard_stats(plan.ckpt).items() if st != plan.stats[f])
    if changed:
        raise ConvertError(f"{plan.hf_dir / changed[0]}: the source changed while it was being converted; run the "
                           "same command again: the layers read from changed files are checked and redone")
    man["complete"] = True
    _save_manifest(out, man)


def convert_weights(hf_dir, out_dir, dtype: str = "bfloat16", keep_mtp: bool = False, *, progress: bool = True,
                    workers: int | None = None, sleep_per_layer: float = 0.0, verify_source: bool = False) -> dict:
    """Convert a Hugging Face DeepSeek-V3.2 checkpoint directory into a converted directory.

    dtype: "bfloat16" (dequantise FP8 weights) or "float8" (keep e4m3 + block scales);
    keep_mtp: also convert the MTP layer (checkpoint layer num_hidden_layers). Running it again
    on an interrupted output resumes; on a complete one it only re-checks (items whose source
    changed are converted again; verify_source re-hashes every item's source tensors). Paths may
    be relative. Returns a summary: {"out", "dtype", "items", "written", "skipped",
    "source_changed", "bytes_in", "bytes_out", "seconds", "complete"}.
    Raises ConvertError (file and tensor named) for anything wrong with source or output,
    including a full disk (what is kept is said; rerunning resumes).
    """
    t0 = time.time()
    out = abspath(out_dir)
    plan = plan_conversion(hf_dir, dtype, keep_mtp)
    if out.resolve() == plan.hf_dir.resolve():
        raise ConvertError(f"{out}: --out must differ from --hf-dir")
    man = _open_output(out, plan)
    ck = _checkpointer()
    written = 0
    try:
        with _lock(out):
            _clean(ck, out, man)
            changed = _check_sources(out, plan, man, verify_source, progress)
            todo = [i for i in plan.items if i.name not in man["items"]]
            if not todo and man.get("complete"):
                _verify_all(ck, out, plan, man)
            else:
                _check_space(out, plan, todo)
                done_bytes = sum(i.bytes_in for i in plan.items if i.name in man["items"])
                bar = Progress(plan.bytes_in, done_bytes, progress)
                workers = workers or min(8, os.cpu_count() or 1)
                try:
                    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                        if man.get("complete"):
                            man["complete"] = False
                            _save_manifest(out, man)
                        for item in todo:
                            try:
                                _write_item(ck, out, plan, item, man, bar, pool, sleep_per_layer)
                            except Exception as e:
                                if not is_disk_full(e):
                                    raise
                                raise ConvertError(
                                    f"{out}: no space left on device while writing item {item.name!r} ({e}); "
                                    f"{len(man['items'])} of {len(plan.items)} items are finished and kept: "
                                    "free space and run the same command again to resume") from None
                            written += 1
                finally:
                    bar.close()
                _finalize(ck, out, plan, man)
    finally:
        ck.close()
    return {"out": str(out), "dtype": dtype, "items": len(plan.items), "written": written,
            "skipped": len(plan.items) - written, "source_changed": changed, "bytes_in": plan.bytes_in,
            "bytes_out": sum(i.bytes_out for i in plan.items), "seconds": round(time.time() - t0, 3),
            "complete": True}
