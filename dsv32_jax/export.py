"""Write a model as a Hugging Face checkpoint directory (the inverse of the HF loader).

Every parameter goes to the checkpoint names `dsv32_jax.params.hf_source` gives it, in the
checkpoint's [out, in] layout; stacked experts are split back per expert; FP8 kernels are
written as F8_E4M3 with their `weight_scale_inv`. Used by the built-in demo, by LoRA
export (merged weights) and by tests; `dsv32_jax.load` and transformers both read the result.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dsv32_jax.params import checkpoint_paths, hf_source

MAX_SHARD_BYTES = 2 * 2**30


def host_value(x) -> np.ndarray:
    """A whole array on the host, also when it is split over several processes (multi-host:
    every process must call this, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def hf_tensors(module) -> dict[str, np.ndarray]:
    """{checkpoint name: numpy array} for every parameter of a Transformer module."""
    cfg = module.cfg
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        whole = host_value(var.get_value())
        if whole.dtype == np.dtype("bfloat16"):
            whole = whole.astype(ml_dtypes.bfloat16)
        for lp, j in checkpoint_paths(path, cfg):      # stacked layers: one tensor per layer
            _add_tensors(out, hf_source(lp, cfg), whole if j is None else whole[j])
    return out


def _add_tensors(out: dict, src, value: np.ndarray):
    """out[name] = value in the checkpoint's layout (the inverse of params.apply_transform)."""
    if src.transform == "copy":
        out[src.names[0]] = value
    elif src.transform == "T":
        out[src.names[0]] = np.ascontiguousarray(np.swapaxes(value, -1, -2))
    elif src.transform == "stack_T":
        for name, part in zip(src.names, value):
            out[name] = np.ascontiguousarray(np.swapaxes(part, -1, -2))
    else:
        raise ValueError(src.transform)


def save_hf(module, out_dir, *, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write `module` (a dsv32_jax Transformer) as safetensors shards + index + config.json.
    Multi-host: every process calls it (to gather split parameters); process 0 writes."""
    out = Path(out_dir)
    tensors = hf_tensors(module)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if cur and size + nbytes > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map},
        indent=2))
    cfg = module.cfg
    if not module.options.fp8_weights:
        cfg = cfg.replace(fp8_block_size=None)
    if module.mtp is None:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    for name, content in (extra_files or {}).items():
        p = out / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return out
