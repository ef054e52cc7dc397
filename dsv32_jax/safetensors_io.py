"""Lazy, validating reader of Hugging Face safetensors checkpoints (FP8 and bf16 included).

The safetensors header is parsed here and tensors are memory-mapped one at a time, so
reading a tensor never loads its shard, and float8_e4m3fn / bfloat16 come back as
ml_dtypes numpy arrays without any global patching. Errors name the file and the tensor.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, truncated, corrupt or inconsistent."""


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size; tensors mmapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
        except OSError:
            raise CheckpointError(f"{self.path}: shard file is missing") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{self.path}: corrupt safetensors header length {n}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        data_len = size - self.data_start
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            start, end = e["data_offsets"]
            nbytes = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - start != nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r}: byte range {end - start} does not match "
                                      f"shape {e['shape']} {e['dtype']}")
            if end > data_len:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                      f"{self.data_start + end} but the file has {size} bytes")

    def keys(self):
        return self.entries.keys()

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def nbytes(self, name) -> int:
        s, e = self.entries[name]["data_offsets"]
        return e - s

    def get(self, name) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this file")
        e = self.entries[name]
        shape = tuple(e["shape"])
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, DTYPES[e["dtype"]])
        return np.memmap(self.path, dtype=DTYPES[e["dtype"]], mode="r",
                         offset=self.data_start + e["data_offsets"][0], shape=shape)

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's leading axis (all of a 0-d tensor), read into a new
        array rather than memory-mapped, so streaming a large tensor band by band keeps the
        resident size to one band. Thread-safe (positioned reads)."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this file")
        e = self.entries[name]
        shape, dt = tuple(e["shape"]), DTYPES[e["dtype"]]
        if not shape:
            start, stop, rest = 0, 1, ()
        else:
            start, stop, rest = max(0, start), min(shape[0], stop), shape[1:]
        out = np.empty((max(0, stop - start),) + rest, dt)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        offset = self.data_start + e["data_offsets"][0] + start * (out[:1].nbytes if out.size else 0)
        if not buf.nbytes:
            return out.reshape(shape) if not shape else out
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = 0
            while got < buf.nbytes:
                n = os.preadv(fd, [buf[got:]], offset + got)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} rows {start}:{stop} "
                                          f"end early (read {got} of {buf.nbytes} bytes)")
                got += n
        finally:
            os.close(fd)
        return out.reshape(shape) if not shape else out


class HFCheckpoint:
    """A Hugging Face checkpoint directory: `model.safetensors.index.json` + shards, or one
    `model.safetensors`. Shards are opened lazily on first use."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif single.exists():
            self.weight_map = {k: single.name for k in SafetensorsFile(single).keys()}
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors.index.json or model.safetensors")
        self._files: dict[str, SafetensorsFile] = {}

    def file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.dir / shard)
        return self._files[shard]

    def __contains__(self, name) -> bool:
        return name in self.weight_map

    def names(self):
        return self.weight_map.keys()

    def _locate(self, name) -> SafetensorsFile:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint index")
        f = self.file(self.weight_map[name])
        if name not in f.entries:
            raise CheckpointError(f"{f.path}: tensor {name!r} is listed in the index but absent from the file")
        return f

    def get(self, name) -> np.ndarray:
        return self._locate(name).get(name)

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        return self._locate(name).read_rows(name, start, stop)

    def shape(self, name):
        return self._locate(name).shape(name)

    def dtype(self, name):
        return self._locate(name).dtype(name)

    def nbytes(self, name):
        return self._locate(name).nbytes(name)
