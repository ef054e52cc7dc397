"""`dsv32_jax.load`: build the model from a checkpoint directory.

A Hugging Face directory (config.json + safetensors, bf16/fp32 or the FP8 release with
`weight_scale_inv` blocks) is read tensor by tensor; FP8 weights are dequantised on load
(partial 128-tiles included) unless `fp8_weights=True` keeps them as e4m3 + scales.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from dsv32_jax.cli import abspath
from dsv32_jax.config import ModelConfig, load_config
from dsv32_jax.model import RuntimeOptions, Transformer
from dsv32_jax.numerics import dequant_blocks
from dsv32_jax.params import (ParamInfo, apply_transform, build_abstract, checkpoint_paths, hf_source, layer_info,
                              path_str, set_layer, stacked_zeros)
from dsv32_jax.safetensors_io import CheckpointError, HFCheckpoint
from dsv32_jax.sharding import batch_spec, make_mesh, put, spec_for

FP8 = np.dtype(jnp.float8_e4m3fn)


def _scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "weight_scale_inv"


def read_hf_tensor(ckpt: HFCheckpoint, name: str, cfg: ModelConfig, keep_fp8: bool) -> np.ndarray:
    """One checkpoint tensor; FP8 weights are dequantised to float32 unless keep_fp8."""
    arr = ckpt.get(name)
    if arr.dtype == FP8 and not keep_fp8:
        sname = _scale_name(name)
        if sname not in ckpt:
            raise CheckpointError(f"{ckpt.dir}: FP8 tensor {name!r} has no {sname!r}")
        block = cfg.fp8_block_size or (128, 128)
        try:
            arr = dequant_blocks(arr, ckpt.get(sname), block, xp=np)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.dir}: tensor {sname!r}: {e}") from None
    return arr


def hf_param_value(ckpt: HFCheckpoint, path, info: ParamInfo, cfg: ModelConfig) -> np.ndarray:
    """The value of one parameter (our layout and dtype) read from a Hugging Face checkpoint."""
    src = hf_source(path, cfg)
    keep_fp8 = info.dtype == FP8
    arrays = [read_hf_tensor(ckpt, n, cfg, keep_fp8) for n in src.names]
    value = apply_transform(arrays, src.transform)
    if tuple(value.shape) != tuple(info.shape):
        raise CheckpointError(f"{ckpt.dir}: tensor {src.names[0]!r} has shape {tuple(arrays[0].shape)}, "
                              f"which does not give parameter {path_str(path)} of shape {info.shape}")
    if info.dtype == FP8 and value.dtype != FP8:
        raise CheckpointError(f"{ckpt.dir}: tensor {src.names[0]!r} is {value.dtype}, expected float8_e4m3fn "
                              "(fp8_weights=True needs an FP8 checkpoint)")
    return value.astype(info.dtype)


class Model:
    """A loaded model: the nnx module plus jitted entry points.

    model(input_ids int32 [B, T]) -> logits float32 [B, T, vocab]
    """

    def __init__(self, module: Transformer):
        self.module = module
        self.graphdef, self.state = nnx.split(module)
        gd = self.graphdef
        self._forward = jax.jit(lambda st, ids: nnx.merge(gd, st)(ids))
        self._with_indices = jax.jit(lambda st, ids: nnx.merge(gd, st).forward_with_indices(ids))

    @property
    def config(self) -> ModelConfig:
        return self.module.cfg

    @property
    def options(self) -> RuntimeOptions:
        return self.module.options

    def _ids(self, input_ids):
        ids = jnp.asarray(input_ids, jnp.int32)
        mesh = self.options.mesh
        if mesh is not None:
            ids = put(ids, NamedSharding(mesh, batch_spec(mesh, ids.ndim, ids.shape[0])))
        return ids

    def __call__(self, input_ids):
        return self._forward(self.state, self._ids(input_ids))

    def forward_with_indices(self, input_ids):
        """(logits [B, T, V], [per-layer DSA indices int32 [B, T, K]])."""
        return self._with_indices(self.state, self._ids(input_ids))


def load_hf(path, options: RuntimeOptions, cfg: ModelConfig | None = None, progress=None) -> Transformer:
    """Build a Transformer from a Hugging Face checkpoint directory.

    progress: called as progress(parameter path, parameters done, parameters total) after each."""
    path = abspath(path)
    cfg = cfg or load_config(path)
    ckpt = HFCheckpoint(path)
    graphdef, state = build_abstract(cfg, options)
    mesh = options.mesh
    flat = nnx.to_flat_state(state)
    total = len(flat)
    def place(value, info):      # under a mesh each device receives only its shard of the host array
        if mesh is None:
            return jnp.asarray(value)
        return put(value, NamedSharding(mesh, spec_for(info.axes, info.shape, mesh)))

    for n_done, (p, var) in enumerate(flat, 1):
        v = var.get_value()
        info = ParamInfo(tuple(v.shape), np.dtype(v.dtype), var.get_metadata().get("axes"))
        layers = checkpoint_paths(p, cfg)
        if layers[0][1] is None:
            var.set_value(place(hf_param_value(ckpt, tuple(p), info, cfg), info))
        else:   # stacked layers: born whole (sharded), each layer written into its slice
            sharding = None if mesh is None else NamedSharding(mesh, spec_for(info.axes, info.shape, mesh))
            value = stacked_zeros(info.shape, info.dtype, sharding)
            for lp, j in layers:
                one = layer_info(info, j)
                value = set_layer(value, place(hf_param_value(ckpt, lp, one, cfg), one), j)
            var.set_value(value)
        if progress is not None:
            progress(path_str(p), n_done, total)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(path, dtype=jnp.bfloat16, attention_impl: str = "auto", *, numerics: str = "reference",
         mtp: bool = False, fp8_weights: bool | None = None, mesh=None, progress=None,
         kv_cache: str = "dense") -> Model:
    """Load a checkpoint directory (Hugging Face layout) into a ready-to-call model.

    dtype: parameter/activation dtype (float32 for exact comparisons, bfloat16 for speed).
    attention_impl: "auto" (default: "pallas" on TPU/GPU, "xla" on CPU), "xla" (plain-jnp ops),
        "pallas" (backend kernels), "interpret" (kernels in Pallas interpret mode).
    numerics: "reference" (the official FP8 simulations) or "exact".
    mtp: also load the multi-token-prediction head (checkpoint layer num_hidden_layers).
    fp8_weights: keep FP8 weights as e4m3 + block scales (True) or dequantise them (False).
        None (default): as the checkpoint stores them, i.e. True only for a converted
        `--dtype float8` directory.
    mesh: a mesh string such as "data=2,expert=4" (see dsv32_jax.sharding) or a Mesh: every
        parameter is placed straight into its shards by the logical-axis rules.
    progress: called as progress(name, done, total) while loading (parameters of a Hugging
        Face directory, items of a converted one).
    kv_cache: "dense" (default) or "fp8", the compact FP8 latent cache (needs numerics
        "reference"; see RuntimeOptions).
    path may be relative.
    """
    path = abspath(path)
    mesh = make_mesh(mesh)
    from dsv32_jax import converted

    if converted.is_converted(path):   # written by `python -m convert weights` (float8 => fp8_weights)
        return Model(converted.load_converted(path, dtype=dtype, attention_impl=attention_impl, numerics=numerics,
                                              mtp=mtp, fp8_weights=fp8_weights, mesh=mesh, progress=progress,
                                              kv_cache=kv_cache))
    options = RuntimeOptions(dtype=jnp.dtype(dtype), numerics=numerics, attention_impl=attention_impl,
                             fp8_weights=bool(fp8_weights), mtp=mtp, mesh=mesh, kv_cache=kv_cache)
    return Model(load_hf(path, options, progress=progress))
