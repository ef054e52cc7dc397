"""The parameter tree: abstract shapes/dtypes/logical axes, and the Hugging Face name of each leaf.

Every parameter is declared once, in its module (dsv32_jax.layers.param). `abstract_params`
builds the model under `nnx.eval_shape`, so it allocates nothing, and returns the flat table
path -> ParamInfo (shape, dtype, logical axes). `hf_source` maps a path to the checkpoint
tensor(s) it is made of; the loader, the converter and the sharding rules all read these two.

Layout conventions (ours vs the Hugging Face checkpoint):
  Linear `kernel` [in, out]        = HF `weight` [out, in] transposed
  Linear `kernel_scale`            = HF `weight_scale_inv` transposed (FP8 checkpoints)
  routed experts `gate|up|down`    = HF `experts.{e}.{gate,up,down}_proj.weight`, transposed and stacked on axis 0
  router `kernel` [D, E]           = HF `mlp.gate.weight` transposed; router `bias` = `e_score_correction_bias`
"""
from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from flax import nnx

from dsv32_jax.config import ModelConfig

Path = tuple  # a state path, e.g. ("layers", 3, "attn", "q_a", "kernel")


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


def abstract_params(cfg: ModelConfig, options) -> dict[Path, ParamInfo]:
    """path -> ParamInfo for every parameter of the model built with `options`."""
    _, state = build_abstract(cfg, options)
    out = {}
    for path, var in nnx.to_flat_state(state):
        v = var.get_value() if hasattr(var, "get_value") else var.value
        out[tuple(path)] = ParamInfo(tuple(v.shape), np.dtype(v.dtype), var.get_metadata().get("axes"))
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
    """The checkpoint tensor(s) a parameter path is made of."""
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
