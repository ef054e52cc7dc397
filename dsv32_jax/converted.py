"""Converted checkpoints: the directory `python -m convert weights` writes, and how to load it.

Layout of a converted directory (format version 1):

    config.json           our ModelConfig.to_hf_dict() (quantization_config only for float8)
    dsv32_convert.json    the manifest: format/version, dtype ("bfloat16" | "float8"), keep_mtp,
                          source fingerprint, the planned items, and for every finished item its
                          parameters (shape, dtype, crc32); "complete" is set last, after the
                          whole directory has been written and verified
    tokenizer files       copied from the Hugging Face directory
    params/<item>/        one orbax checkpoint (PyTree of arrays) per item:
                            layer_000 ... layer_{L-1}: the parameters below ("layers", i) of the
                            checkpoint layout (one layer each; the model stacks them on load)
                            globals: embed/embedding, norm/scale, lm_head/kernel
                            mtp: the parameters below ("mtp",) (only with --keep-mtp)

The arrays are in our layout (`dsv32_jax.params`): kernels [in, out], routed experts stacked
[E, D, I] / [E, I, D]. A "bfloat16" checkpoint holds dequantised weights (norms, router and
indexer weights_proj in float32, as the model declares them); a "float8" one keeps the e4m3
kernels plus their float32 `*_scale` tiles, so it loads with `fp8_weights=True`.

`load_converted` builds the model's abstract state and restores every item straight into the
requested shardings and dtype (orbax casts on read), so no host ever holds the whole model.
A "float8" checkpoint loaded with fp8_weights=False is dequantised item by item on the devices
(the same float32 tile products, rounded once to the compute dtype, as the FP8 forward uses).
Paths may be relative: they are made absolute here (orbax needs absolute paths).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.cli import abspath
from dsv32_jax.config import load_config
from dsv32_jax.numerics import dequant_blocks
from dsv32_jax.params import build_abstract, checkpoint_paths, path_str, set_layer, stacked_zeros
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


def _layer_sharding(s):
    """The sharding of one layer of a stacked array sharded by `s` (the layer axis dropped)."""
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[1:]))
    return s


def _replicated(s):
    """A sharding on the same devices as `s` that keeps the whole (small) array on each."""
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    return s


def restore_state(path, options, shardings=None, cfg=None, progress=None):
    """(graphdef, state) of the model described by `options`, restored from a converted directory.

    shardings: None (every array on the default device), one Sharding, {path: Sharding}, or a
    pytree like the abstract state with Sharding leaves; with `options.mesh` set and no
    shardings, the logical-axis rules of dsv32_jax.sharding decide. Arrays are cast to the
    dtypes of the abstract state while they are read. A "float8" checkpoint restored with
    options.fp8_weights=False is dequantised on the devices (e4m3 kernel x its block scales).
    progress: called as progress(item name, items done, items total) after each item.
    """
    import orbax.checkpoint as ocp

    path = abspath(path)
    man = read_manifest(path)
    if not man.get("complete"):
        raise CheckpointError(f"{path}: the conversion is incomplete (it was interrupted or is still "
                              "running); run the same `python -m convert weights` command again to finish it")
    cfg = cfg or load_config(path)
    dequant = man["dtype"] == "float8" and not options.fp8_weights
    if dequant and cfg.fp8_block_size is None:
        raise CheckpointError(f"{path / 'config.json'}: a float8 conversion without quantization_config")
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
    stacked = {}           # state path -> stacked array being filled layer by layer
    for p, var in flat:
        p = tuple(p)
        for lp, j in checkpoint_paths(p, cfg):
            groups.setdefault(item_of(lp)[0], []).append((p, lp, j, var))
        if checkpoint_paths(p, cfg)[0][1] is not None:
            v = var.get_value()
            stacked[p] = stacked_zeros(v.shape, v.dtype, sh[p])
    stored_abstract = {}
    if dequant:      # shapes/dtypes as stored: e4m3 kernels + float32 block scales
        _, f8_state = build_abstract(cfg, dataclasses.replace(options, fp8_weights=True))
        stored_abstract = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(f8_state)}
    block_ours = tuple(reversed(cfg.fp8_block_size)) if dequant else None   # our kernels are [in, out]
    dequant_fns = {}

    def dequantise(k, sc, sharding, dtype):
        key = (sharding, jnp.dtype(dtype))
        if key not in dequant_fns:
            dequant_fns[key] = jax.jit(lambda a, b: dequant_blocks(a, b, block_ours).astype(dtype),
                                       out_shardings=sharding)
        return dequant_fns[key](k, sc)

    def one_layer(shape, j):
        return tuple(shape) if j is None else tuple(shape)[1:]

    ckptr = ocp.StandardCheckpointer()
    try:
        for n_done, (item, members) in enumerate(groups.items(), 1):
            rec = man["items"].get(item)
            item_dir = path / PARAMS_DIR / item
            if rec is None or not item_dir.is_dir():
                hint = " (convert with --keep-mtp to include the MTP head)" if item == MTP_ITEM else ""
                raise CheckpointError(f"{path}: the converted checkpoint has no item {item!r}{hint}")
            stored = rec["params"]
            target: dict = {}
            used = set()
            scaled = {}            # layer path -> sub path of its block scale (dequantised on load)

            def add(sub, shape, dtype, sharding):
                node = target
                for k in sub[:-1]:
                    node = node.setdefault(str(k), {})
                node[str(sub[-1])] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                used.add(item_key(sub))

            for p, lp, j, var in members:
                sub = item_of(lp)[1]
                key = item_key(sub)
                shape = one_layer(var.get_value().shape, j)
                sharding = sh[p] if j is None else _layer_sharding(sh[p])
                if key not in stored:
                    raise CheckpointError(f"{item_dir}: parameter {path_str(lp)} is not in the converted "
                                          f"checkpoint (dtype {man['dtype']})")
                if tuple(stored[key]["shape"]) != shape:
                    raise CheckpointError(f"{item_dir}: parameter {path_str(lp)} has shape {stored[key]['shape']}, "
                                          f"the model expects {shape}")
                scale_p = p[:-1] + (f"{p[-1]}_scale",)
                if dequant and scale_p in stored_abstract:
                    ssub = sub[:-1] + (f"{sub[-1]}_scale",)
                    sv = stored_abstract[scale_p]
                    add(sub, shape, stored_abstract[p].dtype, sharding)
                    add(ssub, one_layer(sv.shape, j), sv.dtype, _replicated(sharding))
                    scaled[lp] = ssub
                else:
                    add(sub, shape, var.get_value().dtype, sharding)
            extra = sorted(set(stored) - used)
            if extra:
                raise CheckpointError(f"{item_dir}: holds parameter {extra[0]!r}, which this model "
                                      "does not have (converted by an incompatible version?)")
            restored = ckptr.restore(item_dir, target)

            def get(sub):
                node = restored
                for k in sub:
                    node = node[str(k)]
                return node

            for p, lp, j, var in members:
                value = get(item_of(lp)[1])
                if lp in scaled:
                    value = dequantise(value, get(scaled[lp]), sh[p] if j is None else _layer_sharding(sh[p]),
                                       var.get_value().dtype)
                if j is None:
                    var.set_value(value)
                else:
                    stacked[p] = set_layer(stacked[p], value, j)
            del restored
            if progress is not None:
                progress(item, n_done, len(groups))
    finally:
        ckptr.close()
    for p, var in flat:
        if tuple(p) in stacked:
            var.set_value(stacked[tuple(p)])
    return graphdef, nnx.from_flat_state(flat)


def load_converted(path, *, dtype=jnp.bfloat16, attention_impl: str = "xla", numerics: str = "reference",
                   mtp: bool = False, fp8_weights: bool | None = None, mesh=None, shardings=None, progress=None,
                   kv_cache: str = "dense"):
    """Build a Transformer from a converted directory.

    fp8_weights: None (default) loads the weights as stored: a "float8" checkpoint with
    fp8_weights=True (e4m3 kernels + scales), a "bfloat16" one dequantised. False on a "float8"
    checkpoint dequantises on load (kernels in `dtype`); True on a "bfloat16" one is an error
    (its weights are already dequantised). dtype is the compute dtype the kernels are cast to
    on read. mesh / shardings / progress: see `restore_state`. kv_cache: see RuntimeOptions.
    """
    from dsv32_jax.model import RuntimeOptions

    path = abspath(path)
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
                             fp8_weights=is_f8 if fp8_weights is None else bool(fp8_weights), mtp=mtp,
                             kv_cache=kv_cache, **kw)
    graphdef, state = restore_state(path, options, shardings, progress=progress)
    return nnx.merge(graphdef, state)
