"""The parameter tree: abstract shapes/dtypes/logical axes, and the Hugging Face name of each leaf.

Every parameter is declared once, in its module (dsv32_jax.layers.param). `abstract_params`
builds the model under `nnx.eval_shape`, so it allocates nothing, and returns the flat table
path -> ParamInfo (shape, dtype, logical axes) in the checkpoint layout. `hf_source` maps such
a path to the checkpoint tensor(s) it is made of; the loader, the converter and the sharding
rules all read these two.

Checkpoint layout vs state: the model stores its decoder layers stacked (dsv32_jax.model:
state path ("stacks", g, "block", ...) with a leading layer axis [n, ...]); checkpoints (Hugging
Face and converted) keep one tensor per layer, addressed by the per-layer path
("layers", i, ...). `checkpoint_paths` maps a state path to the per-layer paths it holds.

Layout conventions (ours vs the Hugging Face checkpoint):
  Linear `kernel` [in, out]        = HF `weight` [out, in] transposed
  Linear `kernel_scale`            = HF `weight_scale_inv` transposed (FP8 checkpoints)
  routed experts `gate|up|down`    = HF `experts.{e}.{gate,up,down}_proj.weight`, transposed and stacked on axis 0
  router `kernel` [D, E]           = HF `mlp.gate.weight` transposed; router `bias` = `e_score_correction_bias`
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv32_jax.config import ModelConfig

Path = tuple  # a checkpoint-layout path, e.g. ("layers", 3, "attn", "q_a", "kernel")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple


@dataclasses.dataclass(frozen=True)
class HFSource:
    """How a parameter is made from checkpoint tensors.

    names: the HF tensor names (one, or one per expert for stacked experts);
    transform: "copy" | "T" (transpose) | "stack_T" (transpose each, stack on a new axis 0).
    """
    names: tuple[str, ...]
    transform: str


def build_abstract(cfg: ModelConfig, options):
    """(graphdef, abstract state) of the model: nothing is allocated."""
    from dsv32_jax.model import Transformer

    model = nnx.eval_shape(lambda: Transformer(cfg, options, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def checkpoint_paths(path: tuple, cfg: ModelConfig) -> list[tuple[Path, int | None]]:
    """A state path -> [(checkpoint-layout path, index on the layer axis)].

    ("stacks", g, "block", *rest) (stacked layers first..first+n-1) ->
    [(("layers", first + j, *rest), j) for j < n]; any other path -> [(path, None)].
    """
    from dsv32_jax.model import layer_groups

    p = tuple(path)
    if p and p[0] == "stacks":
        first, n, _ = layer_groups(cfg)[int(p[1])]
        return [(("layers", first + j) + p[3:], j) for j in range(n)]
    return [(p, None)]


def state_path(path: Path, cfg: ModelConfig) -> tuple[tuple, int | None]:
    """Inverse of checkpoint_paths: ("layers", i, *rest) -> (("stacks", g, "block", *rest), j)."""
    from dsv32_jax.model import layer_groups

    p = tuple(path)
    if p and p[0] == "layers":
        i = int(p[1])
        for g, (first, n, _) in enumerate(layer_groups(cfg)):
            if first <= i < first + n:
                return ("stacks", g, "block") + p[2:], i - first
        raise KeyError(f"no decoder layer {i} (the model has {cfg.num_hidden_layers})")
    return p, None


def layer_info(info: ParamInfo, j: int | None) -> ParamInfo:
    """The ParamInfo of one layer of a stacked parameter (j None: the parameter itself)."""
    if j is None:
        return info
    return ParamInfo(info.shape[1:], info.dtype, None if info.axes is None else tuple(info.axes)[1:])


def stacked_zeros(shape, dtype, sharding=None):
    """A zeroed stacked parameter [n, ...] born in `sharding` (None: the default device); its
    layers are then written in place with `set_layer`."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.lru_cache(maxsize=None)
def _layer_setter(sharding):
    def update(stacked, value, j):
        return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), j, 0)

    return jax.jit(update, donate_argnums=0, out_shardings=sharding)


def set_layer(stacked, value, j: int):
    """stacked [n, ...] with layer j replaced by value [...] (already on the devices, sharded like
    one layer of `stacked`); `stacked` is donated, so no second whole copy is made, and the result
    keeps its sharding."""
    return _layer_setter(stacked.sharding)(stacked, value, jnp.int32(j))


def abstract_params(cfg: ModelConfig, options) -> dict[Path, ParamInfo]:
    """Checkpoint-layout path -> ParamInfo for every parameter of the model built with `options`
    (stacked layers listed one layer at a time, without the layer axis)."""
    _, state = build_abstract(cfg, options)
    out = {}
    for path, var in nnx.to_flat_state(state):
        v = var.get_value() if hasattr(var, "get_value") else var.value
        info = ParamInfo(tuple(v.shape), np.dtype(v.dtype), var.get_metadata().get("axes"))
        for lp, j in checkpoint_paths(path, cfg):
            out[lp] = layer_info(info, j)
    return out


_MODULES = {
    "attn": "self_attn", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "q_a": "q_a_proj", "q_norm": "q_a_layernorm", "q_b": "q_b_proj", "kv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm", "kv_b": "kv_b_proj", "o": "o_proj", "shared": "shared_experts",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
_LEAVES = {"kernel": ("weight", "T"), "kernel_scale": ("weight_scale_inv", "T"),
           "scale": ("weight", "copy"), "bias": ("bias", "copy"), "embedding": ("weight", "copy")}


def _block_name(rest: tuple, prefix: str, cfg: ModelConfig) -> HFSource:
    """Names inside one decoder block (`rest` is the path below the block)."""
    rest = list(rest)
    # MoE router and stacked experts need their own rules.
    if rest[:2] == ["mlp", "router"]:
        leaf = rest[2]
        if leaf == "kernel":
            return HFSource((f"{prefix}.mlp.gate.weight",), "T")
        if leaf == "bias":
            return HFSource((f"{prefix}.mlp.gate.e_score_correction_bias",), "copy")
    if rest[:2] == ["mlp", "experts"]:
        m = re.fullmatch(r"(gate|up|down)(_scale)?", rest[2])
        suffix = "weight_scale_inv" if m.group(2) else "weight"
        return HFSource(tuple(f"{prefix}.mlp.experts.{e}.{m.group(1)}_proj.{suffix}"
                              for e in range(cfg.n_routed_experts)), "stack_T")
    mods, leaf = rest[:-1], rest[-1]
    hf_mods = []
    for i, m in enumerate(mods):
        # inside the indexer the module names are the checkpoint's own
        if "indexer" in mods[:i]:
            hf_mods.append(m)
        else:
            hf_mods.append(_MODULES.get(m, m))
    hf_leaf, transform = _LEAVES[leaf]
    return HFSource((".".join([prefix, *hf_mods, hf_leaf]),), transform)


def hf_source(path: Path, cfg: ModelConfig) -> HFSource:
    """The checkpoint tensor(s) a checkpoint-layout parameter path is made of."""
    p = tuple(path)
    if p == ("embed", "embedding"):
        return HFSource(("model.embed_tokens.weight",), "copy")
    if p == ("norm", "scale"):
        return HFSource(("model.norm.weight",), "copy")
    if p == ("lm_head", "kernel"):
        return HFSource(("lm_head.weight",), "T")
    if p[0] == "layers":
        return _block_name(p[2:], f"model.layers.{p[1]}", cfg)
    if p[0] == "mtp":
        pre = f"model.layers.{cfg.num_hidden_layers}"
        sub = p[1:]
        if sub[0] == "block":
            return _block_name(sub[1:], pre, cfg)
        table = {("embed", "embedding"): (f"{pre}.embed_tokens.weight", "copy"),
                 ("enorm", "scale"): (f"{pre}.enorm.weight", "copy"),
                 ("hnorm", "scale"): (f"{pre}.hnorm.weight", "copy"),
                 ("eh_proj", "kernel"): (f"{pre}.eh_proj.weight", "T"),
                 ("norm", "scale"): (f"{pre}.shared_head.norm.weight", "copy"),
                 ("head", "kernel"): (f"{pre}.shared_head.head.weight", "T")}
        if sub in table:
            name, tr = table[sub]
            return HFSource((name,), tr)
    raise KeyError(f"no checkpoint name for parameter {'/'.join(map(str, p))}")


def apply_transform(arrays: list[np.ndarray], transform: str) -> np.ndarray:
    if transform == "copy":
        return arrays[0]
    if transform == "T":
        return np.swapaxes(arrays[0], -1, -2)
    if transform == "stack_T":
        return np.stack([np.swapaxes(a, -1, -2) for a in arrays])
    raise ValueError(transform)


def is_quant_scale(path: Path) -> bool:
    """True for FP8 block scales (`kernel_scale`, `gate_scale`, ...), not norm weights (`scale`)."""
    return str(path[-1]).endswith("_scale")


def path_str(path: Path) -> str:
    return "/".join(map(str, path))


def state_leaves(state) -> list[tuple[Path, nnx.Variable]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def logical_axes_tree(state):
    """A pytree like `state` whose leaves are the logical axes tuples."""
    return jax.tree.map(lambda v: v.get_metadata().get("axes"), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
