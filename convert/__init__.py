"""Checkpoint conversion: `python -m convert weights --hf-dir DIR --out DIR` (see convert.__main__).

This module is the source side: it validates a Hugging Face checkpoint against the config
(`plan_conversion`) and produces our parameters from it one at a time (`read_param`).
`convert.writer` is the output side (orbax items, manifest, resume, verification).

Source identity (what makes a finished layer trustworthy on a rerun): every source tensor's
bytes are hashed (sha256) while they are streamed for the conversion, so the digest costs CPU
(about 1 GB/s per worker thread, in parallel with the dequantisation) but no extra read. The
writer records, per output item, the digests of the tensors it was made from and the
(size, mtime_ns, inode) of the shard files as they were before the read. See `convert.writer`
for how a rerun uses them.

Everything is derived from the parameter tree (`dsv32_jax.params`): which checkpoint tensors
exist, their shapes and dtypes, and how each of our parameters is made from them. Shards are
read lazily through `dsv32_jax.safetensors_io` (memory-mapped, one tensor at a time).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv32_jax.cli import abspath
from dsv32_jax.config import ModelConfig, load_config
from dsv32_jax.converted import GLOBALS_ITEM, OUT_DTYPES, item_key, item_of
from dsv32_jax.params import abstract_params, hf_source, path_str
from dsv32_jax.safetensors_io import CheckpointError, HFCheckpoint

__all__ = ["ConvertError", "Plan", "convert_weights", "plan_conversion", "read_param", "shard_stats",
           "tensor_digest"]

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = frozenset({"BF16", "F32", "F16"})
# float32 value of every e4m3 byte: a table lookup is several times faster than the cast
_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)


class ConvertError(CheckpointError):
    """The source checkpoint or the output directory cannot be converted; names file and tensor."""


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the checkpoint must hold under one tensor name."""
    shape: tuple[int, ...]
    dtypes: frozenset            # safetensors dtype names allowed
    role: str                    # "fp8" (quantised weight) | "scale" | "plain"
    param: tuple                 # the parameter path it feeds
    mtp: bool                    # part of the MTP layer


@dataclasses.dataclass(frozen=True)
class ParamJob:
    """One output parameter: shape/dtype in our layout, and the tensors it is made of.

    names: source tensors (one, or one per expert for "stack_T"); scales: their
    `weight_scale_inv` tensors when FP8 weights are dequantised, else None.
    """
    path: tuple
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    names: tuple[str, ...]
    transform: str
    scales: tuple[str, ...] | None
    bytes_in: int

    @property
    def bytes_out(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source tensor read for this parameter (weights, then their scales)."""
        return self.names + (self.scales or ())


@dataclasses.dataclass
class Item:
    """One orbax item of the output (a decoder layer, the globals, or the MTP head)."""
    name: str
    jobs: list[ParamJob]

    @property
    def bytes_in(self) -> int:
        return sum(j.bytes_in for j in self.jobs)

    @property
    def bytes_out(self) -> int:
        return sum(j.bytes_out for j in self.jobs)

    @property
    def sources(self) -> list[str]:
        return [n for j in self.jobs for n in j.sources]


@dataclasses.dataclass
class Plan:
    """A validated conversion: source, output config, items in write order, fingerprint."""
    hf_dir: Path
    ckpt: HFCheckpoint
    cfg: ModelConfig             # the source config
    out_cfg: ModelConfig         # the config written next to the output
    dtype: str
    keep_mtp: bool
    items: list[Item]
    source: dict                 # fingerprint record (see `_fingerprint`)
    stats: dict                  # {shard: [size, mtime_ns, inode]} before anything was read

    @property
    def bytes_in(self) -> int:
        return sum(i.bytes_in for i in self.items)


def _hf_shape(shape: tuple, transform: str) -> tuple:
    """Our parameter shape -> the shape of (each of) its checkpoint tensor(s)."""
    if transform == "stack_T":
        shape = shape[1:]
    return tuple(reversed(shape)) if transform in ("T", "stack_T") else tuple(shape)


def _scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "weight_scale_inv"


def expected_tensors(cfg: ModelConfig) -> dict[str, Expected]:
    """Every tensor name a checkpoint of `cfg` holds (MTP layer included), with shape and dtypes."""
    from dsv32_jax.model import RuntimeOptions

    quant = cfg.fp8_block_size is not None
    has_mtp = cfg.num_nextn_predict_layers > 0
    tree = abstract_params(cfg, RuntimeOptions(dtype=jnp.bfloat16, fp8_weights=quant, mtp=has_mtp))
    out = {}
    for path, info in tree.items():
        src = hf_source(path, cfg)
        if str(path[-1]).endswith("_scale"):     # FP8 block scales, not norm weights ("scale")
            role, dtypes = "scale", frozenset({"F32"})
        elif info.dtype == FP8:
            role, dtypes = "fp8", frozenset({"F8_E4M3"})
        else:
            role, dtypes = "plain", FLOATS
        for name in src.names:
            out[name] = Expected(_hf_shape(info.shape, src.transform), dtypes, role, path, path[0] == "mtp")
    return out


def _fail(msg: str):
    raise ConvertError(msg)


def validate_source(ckpt: HFCheckpoint, cfg: ModelConfig, expected: dict[str, Expected], keep_mtp: bool) -> None:
    """Check every shard and tensor against the config before anything is written.

    Raises ConvertError naming the file and the tensor: missing shard, truncated or corrupt
    file, tensor listed in the index but absent, tensor not listed, unexpected tensor, missing
    tensor, wrong shape or dtype, scale shape that does not match its weight.
    """
    by_shard: dict[str, list[str]] = {}
    for name, shard in ckpt.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard):
        names = sorted(by_shard[shard])
        try:
            f = ckpt.file(shard)
        except CheckpointError as e:
            _fail(f"{e} (the index lists {len(names)} tensor(s) in it, e.g. {names[0]!r})")
        for name in names:
            if name not in f.entries:
                _fail(f"{f.path}: tensor {name!r} is listed in the index but absent from the file")
        for name in sorted(set(f.entries) - set(names)):
            where = ckpt.weight_map.get(name)
            _fail(f"{f.path}: unexpected tensor {name!r}: it is in this file but the index "
                  + (f"places it in {where}" if where else "does not list it"))
    for name in sorted(ckpt.weight_map):
        if name not in expected:
            _fail(f"{ckpt.dir / ckpt.weight_map[name]}: unexpected tensor {name!r} (not part of "
                  f"DeepSeek-V3.2 with this config.json)")
    block = cfg.fp8_block_size
    for name in sorted(expected):
        exp = expected[name]
        if name not in ckpt.weight_map:
            if exp.mtp and not keep_mtp:
                continue
            _fail(f"{ckpt.dir}: tensor {name!r} (parameter {path_str(exp.param)}) is missing from "
                  "the checkpoint index")
        f = ckpt.file(ckpt.weight_map[name])
        shape, dname = f.shape(name), f.entries[name]["dtype"]
        if dname not in exp.dtypes:
            _fail(f"{f.path}: tensor {name!r} has dtype {dname}, expected "
                  f"{' or '.join(sorted(exp.dtypes))} for this config")
        if exp.role == "scale":
            wname = name[: -len("weight_scale_inv")] + "weight"
            wshape = ckpt.shape(wname) if wname in ckpt else None
            if shape != exp.shape:
                detail = (f"its weight {wname!r} {list(wshape)} with {block[0]}x{block[1]} blocks needs "
                          f"{list(exp.shape)}" if wshape is not None else f"expected {list(exp.shape)}")
                _fail(f"{f.path}: scale tensor {name!r} has shape {list(shape)}, which does not match: {detail}")
        elif shape != exp.shape:
            _fail(f"{f.path}: tensor {name!r} has shape {list(shape)}, expected {list(exp.shape)} "
                  f"for this config (parameter {path_str(exp.param)})")


def _fingerprint(ckpt: HFCheckpoint, cfg: ModelConfig) -> dict:
    """Identity of the source model: config, tensor table, index size, and a data sample of each
    shard (the first 64 KiB of tensor data), so a different model of the same shapes differs."""
    index = ckpt.dir / "model.safetensors.index.json"
    total = None
    if index.exists():
        total = (json.loads(index.read_text()).get("metadata") or {}).get("total_size")
    table = hashlib.sha256()
    for name in sorted(ckpt.weight_map):
        f = ckpt.file(ckpt.weight_map[name])
        table.update(f"{name}|{f.shape(name)}|{f.entries[name]['dtype']}\n".encode())
    sample = hashlib.sha256()
    for shard in sorted(set(ckpt.weight_map.values())):
        f = ckpt.file(shard)
        with open(f.path, "rb") as fh:
            fh.seek(f.data_start)
            sample.update(fh.read(65536))
    rec = {"config_sha256": hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()).hexdigest(),
           "total_size": total if total is not None else sum(ckpt.nbytes(n) for n in ckpt.weight_map),
           "num_tensors": len(ckpt.weight_map), "tensors_sha256": table.hexdigest(),
           "data_sample_sha256": sample.hexdigest()}
    rec["fingerprint"] = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:32]
    return rec


def plan_conversion(hf_dir, dtype: str = "bfloat16", keep_mtp: bool = False) -> Plan:
    """Validate the source and plan the items (layers in order, then globals, then MTP)."""
    from dsv32_jax.model import RuntimeOptions

    hf_dir = abspath(hf_dir)
    if dtype not in OUT_DTYPES:
        _fail(f"--dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    if not hf_dir.is_dir():
        _fail(f"{hf_dir}: not a directory")
    try:
        cfg = load_config(hf_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    if dtype == "float8" and cfg.fp8_block_size is None:
        _fail(f"{hf_dir / 'config.json'}: no quantization_config: the checkpoint is not FP8-quantised, "
              "so --dtype float8 is not possible (use --dtype bfloat16)")
    if keep_mtp and cfg.num_nextn_predict_layers < 1:
        _fail(f"{hf_dir / 'config.json'}: num_nextn_predict_layers is 0: there is no MTP layer to keep")
    ckpt = HFCheckpoint(hf_dir)
    validate_source(ckpt, cfg, expected_tensors(cfg), keep_mtp)

    out_cfg = cfg.replace(fp8_block_size=cfg.fp8_block_size if dtype == "float8" else None,
                          num_nextn_predict_layers=cfg.num_nextn_predict_layers if keep_mtp else 0)
    tree = abstract_params(cfg, RuntimeOptions(dtype=jnp.bfloat16, fp8_weights=dtype == "float8", mtp=keep_mtp))
    items: dict[str, Item] = {}
    for path, info in tree.items():
        src = hf_source(path, cfg)
        dequant = info.dtype != FP8 and ckpt.dtype(src.names[0]) == FP8
        scales = tuple(_scale_name(n) for n in src.names) if dequant else None
        nbytes = sum(ckpt.nbytes(n) for n in src.names + (scales or ()))
        name, sub = item_of(path)
        items.setdefault(name, Item(name, [])).jobs.append(
            ParamJob(tuple(path), item_key(sub), tuple(info.shape), np.dtype(info.dtype), tuple(src.names),
                     src.transform, scales, nbytes))

    def order(name):      # decoder layers by number, then the globals, then the MTP head
        return (0, int(name.split("_")[1])) if name.startswith("layer_") else (1 if name == GLOBALS_ITEM else 2, 0)

    stats = shard_stats(ckpt)
    return Plan(hf_dir, ckpt, cfg, out_cfg, dtype, keep_mtp, [items[n] for n in sorted(items, key=order)],
                _fingerprint(ckpt, cfg), stats)


def shard_stats(ckpt: HFCheckpoint) -> dict:
    """{shard file: [size, mtime_ns, inode]}: changes whenever a shard is rewritten or replaced."""
    out = {}
    for shard in sorted(set(ckpt.weight_map.values())):
        st = (ckpt.dir / shard).stat()
        out[shard] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def tensor_digest(ckpt: HFCheckpoint, name: str) -> str:
    """sha256 of a source tensor's bytes, read in bands (what `read_param` records while converting)."""
    f = ckpt.file(ckpt.weight_map[name])
    shape = f.shape(name)
    rows = shape[0] if shape else 1
    step = max(1, BAND_BYTES // max(1, f.nbytes(name) // max(1, rows)))
    h = hashlib.sha256()
    for r0 in range(0, rows, step):
        h.update(_bytes(f.read_rows(name, r0, min(rows, r0 + step))))
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading
def _nonfinite(a: np.ndarray, chunk: int = 1 << 22) -> bool:
    """Any NaN/Inf in `a` (bit tests for the 1- and 2-byte float formats), in chunks of
    `chunk` elements so the temporaries stay small."""
    flat = a.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        if a.dtype == FP8:
            bad = ((part.view(np.uint8) & 0x7F) == 0x7F).any()
        elif a.dtype == BF16:
            bad = ((part.view(np.uint16) & 0x7F80) == 0x7F80).any()
        else:
            bad = not np.isfinite(part).all()
        if bad:
            return True
    return False


BAND_BYTES = 8 << 20     # source bytes read per band of rows (plain copies / FP8 kept as is)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even: the same result as the
    ml_dtypes cast for finite values, in plain integer numpy ops (which release the GIL)."""
    b = x.view(np.uint32)
    r = (b >> 16) & 1
    r += 0x7FFF
    r += b
    r >>= 16
    return r.astype(np.uint16)


def _put(dst: np.ndarray, r0: int, r1: int, band: np.ndarray, transpose: bool) -> None:
    """Store source rows [r0, r1) (`band`) into dst: dst[:, r0:r1] = band.T, or dst[r0:r1] = band."""
    if dst.ndim == 0:
        dst[...] = band.reshape(())
    elif transpose:
        dst[:, r0:r1] = band.T
    else:
        dst[r0:r1] = band


def _fill(dst: np.ndarray, ckpt: HFCheckpoint, name: str, scale: str | None, transpose: bool, block,
          digests: dict) -> None:
    """Write one checkpoint tensor into `dst` (our layout and dtype), band of rows by band.

    FP8 weights with `scale` are dequantised: dst = (w [R, C] * scale tiles [ceil(R/br), ceil(C/bc)])
    (transposed if asked), float32 products rounded once to dst's dtype, the same values as
    `dsv32_jax.numerics.dequant_blocks`. Otherwise the values are copied (cast if the dtype
    differs; e4m3 only to e4m3). Every band is checked for NaN/Inf. Only one band of the
    source is resident at a time. The sha256 of the source bytes (of `name`, and of `scale`) is
    computed on the bands as they are read and stored in `digests[name]`.
    """
    f = ckpt.file(ckpt.weight_map[name])
    src_dtype, shape = f.dtype(name), f.shape(name)
    rows = shape[0] if shape else 1
    where = f"{f.path}: tensor {name!r}"
    if scale is not None:
        br, bc = block
        c = shape[1]
        sval = np.array(ckpt.get(scale))
        digests[scale] = hashlib.sha256(_bytes(sval)).hexdigest()
        srep = np.repeat(sval.astype(np.float32), bc, axis=1)[:, :c]
        h = hashlib.sha256()
        to_bf16 = dst.dtype == BF16
        out = dst.view(np.uint16) if to_bf16 else dst
        for i in range(math.ceil(rows / br)):
            r0, r1 = i * br, min(rows, (i + 1) * br)
            raw = f.read_rows(name, r0, r1).view(np.uint8)
            h.update(_bytes(raw))
            band = np.take(_E4M3_TO_F32, raw)
            band *= srep[i]
            band = _f32_to_bf16_bits(band) if to_bf16 else band.astype(dst.dtype)
            if (_nonfinite(band.view(BF16)) if to_bf16 else _nonfinite(band)):
                _fail(f"{where} holds NaN or Inf after dequantisation with {scale!r} (rows {r0}:{r1})")
            _put(out, r0, r1, band, transpose)
        digests[name] = h.hexdigest()
        return
    if (src_dtype == FP8) != (dst.dtype == FP8):
        _fail(f"{where} is {src_dtype}, which cannot be stored as {dst.dtype}")
    same = src_dtype == dst.dtype and src_dtype.itemsize in (1, 2)
    view = {1: np.uint8, 2: np.uint16}.get(src_dtype.itemsize)
    out = dst.view(view) if same else dst          # plain integer copies for 1- and 2-byte floats
    step = max(1, BAND_BYTES // max(1, f.nbytes(name) // max(1, rows)))
    h = hashlib.sha256()
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        band = f.read_rows(name, r0, r1)
        h.update(_bytes(band))
        if _nonfinite(band):
            _fail(f"{where} holds NaN or Inf values (rows {r0}:{r1}): corrupt data?")
        _put(out, r0, r1, band.view(view) if same else band, transpose)
    digests[name] = h.hexdigest()


def read_param(ckpt: HFCheckpoint, job: ParamJob, block, pool=None, on_tensor=None,
               digests: dict | None = None) -> np.ndarray:
    """The value of one parameter, [job.shape] of job.dtype, built straight into its output array.

    Stacked experts are written expert by expert into the [E, ...] array (in parallel on
    `pool`, a concurrent.futures executor, when given); `on_tensor(nbytes)` is called after
    each source tensor. `digests`, when given, receives {source tensor: sha256 of its bytes}
    for every tensor read (`job.sources`).
    """
    digests = {} if digests is None else digests
    out = np.empty(job.shape, job.dtype)
    transpose = job.transform in ("T", "stack_T")
    stacked = job.transform == "stack_T"

    def one(k):
        name = job.names[k]
        scale = job.scales[k] if job.scales else None
        _fill(out[k] if stacked else out, ckpt, name, scale, transpose, block, digests)
        return ckpt.nbytes(name) + (ckpt.nbytes(scale) if scale else 0)

    if pool is not None and len(job.names) > 1:
        futures = [pool.submit(one, k) for k in range(len(job.names))]
        try:
            for fut in futures:
                n = fut.result()
                if on_tensor:
                    on_tensor(n)
        finally:
            for fut in futures:
                fut.cancel()
    else:
        for k in range(len(job.names)):
            n = one(k)
            if on_tensor:
                on_tensor(n)
    return out


def convert_weights(*args, **kwargs):
    """See `convert.writer.convert_weights`."""
    from convert.writer import convert_weights as run

    return run(*args, **kwargs)
