"""Converted checkpoints: the directory `python -m convert weights` writes, and how to load it.

Layout of a converted directory (format version 1):

    config.json           our ModelConfig.to_hf_dict() (quantization_config only for float8)
    dsv32_convert.json    the manifest: format/version, dtype ("bfloat16" | "float8"), keep_mtp,
                          source fingerprint, the planned items, and for every finished item its
                          parameters (shape, dtype, crc32); "complete" is set last, after the
                          whole directory has been written and verified
    tokenizer files       copied from the Hugging Face directory
    params/<item>/        one orbax checkpoint (PyTree of arrays) per item:
                            layer_000 ... layer_{L-1}: the parameters below ("layers", i)
                            globals: embed/embedding, norm/scale, lm_head/kernel
                            mtp: the parameters below ("mtp",) (only with --keep-mtp)

The arrays are in our layout (`dsv32_jax.params`): kernels [in, out], routed experts stacked
[E, D, I] / [E, I, D]. A "bfloat16" checkpoint holds dequantised weights (norms, router and
indexer weights_proj in float32, as the model declares them); a "float8" one keeps the e4m3
kernels plus their float32 `*_scale` tiles, so it loads with `fp8_weights=True`.

`load_converted` builds the model's abstract state and restores every item straight into the
requested shardings and dtype (orbax casts on read), so no host ever holds the whole model.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.config import load_config
from dsv32_jax.params import build_abstract, path_str
from dsv32_jax.safetensors_io import CheckpointError

MANIFEST_NAME = "dsv32_convert.json"
FORMAT = "dsv32-jax-converted"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
OUT_DTYPES = ("bfloat16", "float8")
GLOBALS_ITEM = "globals"
MTP_ITEM = "mtp"


def item_of(path: tuple) -> tuple[str, tuple]:
    """State path -> (item name, path inside the item).

    ("layers", 3, "attn", "q_a", "kernel") -> ("layer_003", ("attn", "q_a", "kernel"));
    ("mtp", "block", ...) -> ("mtp", ("block", ...)); anything else -> ("globals", path).
    """
    path = tuple(path)
    if path[0] == "layers":
        return f"layer_{int(path[1]):03d}", path[2:]
    if path[0] == "mtp":
        return MTP_ITEM, path[1:]
    return GLOBALS_ITEM, path


def item_key(sub: tuple) -> str:
    """The manifest key of a parameter inside its item: "attn/q_a/kernel"."""
    return path_str(sub)


def is_converted(path) -> bool:
    """True when `path` is a directory written by `python -m convert weights`."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path) -> dict:
    """The manifest of a converted directory (format and version checked)."""
    p = Path(path) / MANIFEST_NAME
    try:
        man = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no conversion manifest") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt conversion manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a {FORMAT} manifest")
    if man.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: format version {man.get('format_version')!r} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
    if man.get("dtype") not in OUT_DTYPES:
        raise CheckpointError(f"{p}: unknown dtype {man.get('dtype')!r}")
    return man


def _flat_shardings(shardings, paths):
    """Normalise `shardings` to {state path: Sharding}.

    Accepts one Sharding for every leaf, a mapping {path tuple: Sharding}, or a pytree shaped
    like the abstract state whose leaves are Shardings (e.g. `dsv32_jax.sharding.param_shardings`).
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return {p: shardings for p in paths}
    if isinstance(shardings, dict) and all(isinstance(k, tuple) for k in shardings):
        flat = dict(shardings)
    else:
        leaves = jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
        flat = {}
        for kp, leaf in leaves:
            if not isinstance(leaf, jax.sharding.Sharding):
                raise TypeError(f"shardings: leaf at {jax.tree_util.keystr(kp)} is {type(leaf).__name__}, "
                                "not a jax.sharding.Sharding")
            key = []
            for k in kp:
                key.append(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))))
            while key and key[-1] in ("value", "raw_value"):
                key.pop()
            flat[tuple(key)] = leaf
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ValueError(f"shardings: no sharding for parameter {path_str(missing[0])} "
                         f"({len(missing)} parameter(s) without one)")
    return flat


def restore_state(path, options, shardings=None, cfg=None):
    """(graphdef, state) of the model described by `options`, restored from a converted directory.

    shardings: None (every array on the default device), one Sharding, {path: Sharding}, or a
    pytree like the abstract state with Sharding leaves; with `options.mesh` set and no
    shardings, the logical-axis rules of dsv32_jax.sharding decide. Arrays are cast to the
    dtypes of the abstract state while they are read.
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    man = read_manifest(path)
    if not man.get("complete"):
        raise CheckpointError(f"{path}: the conversion is incomplete (it was interrupted or is still "
                              "running); run the same `python -m convert weights` command again to finish it")
    cfg = cfg or load_config(path)
    graphdef, state = build_abstract(cfg, options)
    flat = nnx.to_flat_state(state)
    paths = [tuple(p) for p, _ in flat]
    mesh = getattr(options, "mesh", None)
    if shardings is None and mesh is not None:
        from dsv32_jax.sharding import param_shardings

        shardings = param_shardings(state, mesh)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sh = _flat_shardings(shardings, paths)

    groups: dict[str, list] = {}
    for p, var in flat:
        groups.setdefault(item_of(p)[0], []).append((tuple(p), var))
    ckptr = ocp.StandardCheckpointer()
    try:
        for item, members in groups.items():
            rec = man["items"].get(item)
            item_dir = path / PARAMS_DIR / item
            if rec is None or not item_dir.is_dir():
                hint = " (convert with --keep-mtp to include the MTP head)" if item == MTP_ITEM else ""
                raise CheckpointError(f"{path}: the converted checkpoint has no item {item!r}{hint}")
            stored = rec["params"]
            target: dict = {}
            for p, var in members:
                sub = item_of(p)[1]
                key = item_key(sub)
                v = var.get_value()
                if key not in stored:
                    raise CheckpointError(f"{item_dir}: parameter {path_str(p)} is not in the converted "
                                          f"checkpoint (dtype {man['dtype']})")
                if tuple(stored[key]["shape"]) != tuple(v.shape):
                    raise CheckpointError(f"{item_dir}: parameter {path_str(p)} has shape {stored[key]['shape']}, "
                                          f"the model expects {tuple(v.shape)}")
                node = target
                for k in sub[:-1]:
                    node = node.setdefault(str(k), {})
                node[str(sub[-1])] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[p])
            extra = sorted(set(stored) - {item_key(item_of(p)[1]) for p, _ in members})
            if extra:
                raise CheckpointError(f"{item_dir}: holds parameter {extra[0]!r}, which this model "
                                      "does not have (converted by an incompatible version?)")
            restored = ckptr.restore(item_dir, target)
            for p, var in members:
                node = restored
                for k in item_of(p)[1]:
                    node = node[str(k)]
                var.set_value(node)
    finally:
        ckptr.close()
    return graphdef, nnx.from_flat_state(flat)


def load_converted(path, *, dtype=jnp.bfloat16, attention_impl: str = "xla", numerics: str = "reference",
                   mtp: bool = False, fp8_weights: bool | None = None, mesh=None, shardings=None):
    """Build a Transformer from a converted directory.

    A "float8" checkpoint always loads with fp8_weights=True (e4m3 kernels + scales); a
    "bfloat16" one cannot (its weights are already dequantised). dtype is the compute dtype the
    kernels are cast to on read. mesh / shardings: see `restore_state`.
    """
    from dsv32_jax.model import RuntimeOptions

    path = Path(path)
    man = read_manifest(path)
    is_f8 = man["dtype"] == "float8"
    if fp8_weights and not is_f8:
        raise CheckpointError(f"{path}: fp8_weights=True needs a float8 conversion; this one was converted "
                              "with --dtype bfloat16 (weights already dequantised)")
    if mtp and not man.get("keep_mtp"):
        raise CheckpointError(f"{path}: mtp=True needs the MTP head, which this conversion dropped "
                              "(convert with --keep-mtp)")
    kw = {} if mesh is None else {"mesh": mesh}
    options = RuntimeOptions(dtype=jnp.dtype(dtype), numerics=numerics, attention_impl=attention_impl,
                             fp8_weights=is_f8, mtp=mtp, **kw)
    graphdef, state = restore_state(path, options, shardings)
    return nnx.merge(graphdef, state)
