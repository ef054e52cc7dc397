"""LoRA adapters as a wrapper over a loaded Transformer (the model code knows nothing of LoRA).

`apply_lora(model, LoRAConfig(...))` replaces, in place, every target module by a wrapper that
keeps the frozen base module and adds trainable low-rank factors:

    Linear  kernel W [in, out]:      y = x @ W + dropout(x) @ A @ B * (alpha / r)
                                     A [in, r], B [r, out] (B = 0 at init, so the model is unchanged)
    Experts gate/up/down [E, in, out]: per-expert A [E, in, r], B [E, r, out], applied through the
                                     same grouped (ragged_dot) matmuls as the base experts.

Adapter factors are `LoRAWeight` variables (not `nnx.Param`), so `nnx.state(model, LoRAWeight)`
/ `nnx.split(model, LoRAWeight, ...)` select exactly the adapters and every `nnx.Param` (base
weight, bf16 or FP8 + scales) stays frozen. Adapters are float32 whatever the base dtype.

Targets are chosen by regular expressions over per-layer module paths such as
`layers.3.attn.q_a`, `layers.3.mlp.shared.up`, `layers.3.mlp.experts` (see TARGET_PRESETS). The
model stores its decoder layers stacked (dsv32_jax.model.BlockStack), so one wrapper adapts a
module of every layer of a stack and its factors carry the leading layer axis [n, ...] (scanned
with the layers); when a target matches only some layers of a stack (`layers\\.[0-3]\\..*`), the
slices of the other layers are masked out of the forward (scale 0, hence no gradient either)
and never exported. The MTP head is never adapted. Note: the indexer's inputs are detached
from the LM loss (as in the official training), so indexer adapters ("indexer" preset) receive
no gradient from the LM loss.

Exports: `merged_module` (base + A @ B * scale, a plain Transformer for `export.save_hf`) and
`save_peft` / `load_peft` (safetensors with PEFT names, `lora_A.weight` [r, in],
`lora_B.weight` [out, r], plus `adapter_config.json`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from dsv32_jax.expert_parallel import GroupedFFN
from dsv32_jax.grouped_matmul import grouped_matmul
from dsv32_jax.layers import Linear
from dsv32_jax.moe import EXPERT_PROJ, Experts, combine_local
from dsv32_jax.model import LAYER_AXIS
from dsv32_jax.params import checkpoint_paths, hf_source

TARGET_PRESETS = {
    "attn": r"layers\.\d+\.attn\.(q_a|q_b|kv_a|kv_b|o)",
    "mlp": r"layers\.\d+\.mlp\.(gate|up|down)",            # dense (non-MoE) layers
    "shared": r"layers\.\d+\.mlp\.shared\.(gate|up|down)",
    "experts": r"layers\.\d+\.mlp\.experts",
    "indexer": r"layers\.\d+\.attn\.indexer\.(wq_b|wk)",
}
EXPERT_UID_OFFSET = 1 << 20


class LoRAWeight(nnx.Variable):
    """A trainable adapter factor (the only variables the optimizer sees)."""


class LoRALayer(nnx.Variable):
    """The decoder layer index of each slice of a stacked adapter, int32 [n] (its dropout
    stream), or -1 where the targets do not adapt that layer (masked out)."""


class LoRAKey(nnx.Variable):
    """Raw PRNG key data (uint32 [2]) for adapter dropout, set once per step by the trainer."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (scale = alpha / r), dropout on the adapter input, target presets/regexes."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn",)
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def patterns(self) -> list[re.Pattern]:
        return [re.compile(TARGET_PRESETS.get(t, t)) for t in self.targets]


class LoRAContext(nnx.Module):
    """State shared by all adapters of a model: the config and the dropout key.

    `training` is a plain (static) attribute: the trainer sets it on the copy of the model it
    builds inside its traced step; outside a step dropout is off.
    """

    def __init__(self, config: LoRAConfig):
        self.config = config
        self.training = False
        self.key = LoRAKey(jax.random.key_data(jax.random.key(0)))

    def dropout(self, x, uid: int, layer):
        """x [..., in] -> x with inverted dropout (rate config.dropout) when training, else x
        (the mask stream: fold_in(fold_in(key, uid), layer), layer int32 [] the decoder layer)."""
        rate = self.config.dropout
        if not self.training or rate == 0.0:
            return x
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(self.key[...]), uid), layer)
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _init_a(key, shape, fan_in):
    """PEFT's default: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoRALinear(nnx.Module):
    """A frozen (stacked) `Linear` plus adapters lora_a [n, in, r], lora_b [n, r, out] (float32),
    n the layers of the stack (inside the scanned layer body: one layer's [in, r] / [r, out]).

    __call__(x [..., in]) -> [..., out] in x's dtype: base(x) + dropout(x) @ a @ b * scale
    (the adapter path in float32). `weight()` returns the merged kernel (used where the model
    reads a weight directly, e.g. MLA's absorbed kv_b; no dropout there).
    """

    def __init__(self, base: Linear, ctx: LoRAContext, uid: int, factors: dict, active: tuple[bool, ...]):
        self.base, self.ctx, self.uid, self.active = base, ctx, uid, active
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype = base.dtype
        self.fp8_block = None
        self.layer = LoRALayer(factors["layer"], axes=(LAYER_AXIS,))
        self.lora_a = LoRAWeight(factors["lora_a"], axes=(LAYER_AXIS, None, None))
        self.lora_b = LoRAWeight(factors["lora_b"], axes=(LAYER_AXIS, None, None))

    @staticmethod
    def factor_init(base: Linear, rank: int):
        """{name: (shape, fan_in, key fold)} of the factors; fan_in None = zeros (B starts at 0);
        key fold None = the adapter's own key, i = its fold_in(key, i)."""
        lead = tuple(base.kernel.shape[:-2])
        return {"lora_a": (lead + (base.in_features, rank), base.in_features, None),
                "lora_b": (lead + (rank, base.out_features), None, None)}

    def delta(self):
        """a @ b * scale, float32 [(n,) in, out] (zero for layers the targets leave out)."""
        d = jnp.matmul(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST)
        return d * _scale(self, 2)

    def weight(self):
        """Merged kernel [(n,) in, out] in the compute dtype."""
        return (self.base.weight().astype(jnp.float32) + self.delta()).astype(self.dtype)

    def __call__(self, x):
        y = self.base(x)
        xd = self.ctx.dropout(x, self.uid, self.layer[...]).astype(jnp.float32)
        hi = jax.lax.Precision.HIGHEST
        d = jnp.dot(jnp.dot(xd, self.lora_a[...], precision=hi), self.lora_b[...], precision=hi)
        return (y.astype(jnp.float32) + d * _scale(self)).astype(y.dtype)


def _scale(wrapper, trailing: int = 0):
    """alpha / r: a float when every layer of the stack is adapted; else float32 [] inside the
    scanned layer body ([n] outside, with `trailing` unit dims), 0 where the layer is not
    adapted (LoRALayer -1)."""
    scale = wrapper.ctx.config.scale
    if all(wrapper.active):
        return scale
    m = jnp.where(wrapper.layer[...] >= 0, scale, 0.0).astype(jnp.float32)
    return m.reshape(m.shape + (1,) * trailing)


class LoRAExperts(nnx.Module):
    """Routed experts (stacked gate/up [n, E, D, I], down [n, E, I, D], n the layers of the
    stack) with per-expert adapters `{proj}_a` [n, E, in, r] and `{proj}_b` [n, E, r, out] for
    proj in gate/up/down (inside the scanned layer body: one layer's, without n).

    __call__(x [N, D], weights [N, k], experts [N, k]) -> [N, D] float32, the same grouped
    computation as `Experts` with each grouped matmul g(xs, W) replaced by
    g(xs, W) + g(g(dropout(xs), A), B) * scale; the base term is the base's own grouped matmul
    (FP8 bases stay FP8). `grouped()` gives the same for the expert-parallel path (without
    dropout); `weight(name)` returns merged stacks (for export).
    """

    def __init__(self, base: Experts, ctx: LoRAContext, uid: int, factors: dict, active: tuple[bool, ...]):
        self.base, self.ctx, self.uid, self.active = base, ctx, uid, active
        factors = dict(factors)
        self.layer = LoRALayer(factors.pop("layer"), axes=(LAYER_AXIS,))
        for name, value in factors.items():
            setattr(self, name, LoRAWeight(value, axes=(LAYER_AXIS, "experts", None, None)))

    @staticmethod
    def factor_init(base: Experts, rank: int):
        out = {}
        for i, name in enumerate(EXPERT_PROJ):
            shape = tuple(getattr(base, name).shape)
            lead, (e, din, dout) = shape[:-3], shape[-3:]
            out[name + "_a"] = (lead + (e, din, rank), din, i)
            out[name + "_b"] = (lead + (e, rank, dout), None, None)
        return out

    def delta(self, name):
        """A @ B * scale per expert, float32 [(n,) E, in, out]."""
        d = jnp.einsum("...eir,...ero->...eio", getattr(self, name + "_a")[...], getattr(self, name + "_b")[...],
                       precision=jax.lax.Precision.HIGHEST)
        return d * _scale(self, 3)

    def weight(self, name):
        return (self.base.weight(name).astype(jnp.float32) + self.delta(name)).astype(self.base.dtype)

    def _ffn(self, ops, xs, sizes, dropout: bool):
        """SwiGLU with adapters: xs [R, D] rows sorted by expert -> float32 [R, D]."""
        scale = _scale(self)

        def gmm(a, w):
            return grouped_matmul(a, w, sizes)

        def proj(a, name, uid):
            ad = (self.ctx.dropout(a, uid, self.layer[...]) if dropout else a).astype(jnp.float32)
            low = gmm(ad, ops[name + "_a"])
            return self.base.gmm(ops, name, a, sizes) + gmm(low, ops[name + "_b"]) * scale

        base_uid = EXPERT_UID_OFFSET + 3 * self.uid     # dropout streams distinct from LoRALinear's
        hdn = jax.nn.silu(proj(xs, "gate", base_uid)) * proj(xs, "up", base_uid + 1)
        return proj(hdn.astype(xs.dtype), "down", base_uid + 2)

    def grouped(self) -> GroupedFFN:
        """Base arrays plus adapters (a of down and b of gate/up split like the hidden dim)."""
        g = self.base.grouped()
        ops, axes = dict(g.operands), dict(g.axes)
        for name in EXPERT_PROJ:
            ops[name + "_a"] = getattr(self, name + "_a")[...]
            ops[name + "_b"] = getattr(self, name + "_b")[...]
            hidden_in = name == "down"
            axes[name + "_a"] = ("experts", "hidden" if hidden_in else None, None)
            axes[name + "_b"] = ("experts", None, None if hidden_in else "hidden")
        return GroupedFFN(lambda o, xs, sizes: self._ffn(o, xs, sizes, dropout=False), ops, axes,
                          g.hidden_granule)

    def __call__(self, x, weights, experts):
        g = self.grouped()
        return combine_local(lambda o, xs, sizes: self._ffn(o, xs, sizes, dropout=True), g.operands, x, weights,
                             experts)


# ------------------------------------------------------------------------------ wrapping
def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _layer_modules(model, path) -> list[tuple[tuple, int]]:
    """[(per-layer module path ("layers", i, ...), index on the layer axis)] of a stacked module."""
    return [(lp[:-1], j) for lp, j in checkpoint_paths(tuple(path) + ("_",), model.cfg)]


def _active_layers(model, path, pats) -> tuple[bool, ...]:
    """Per layer of the stacked module at `path`: does a target match its per-layer path?"""
    return tuple(any(p.fullmatch(_path_str(lp)) for p in pats) for lp, _ in _layer_modules(model, path))


def find_targets(model, config: LoRAConfig) -> list[tuple[tuple, nnx.Module]]:
    """(path, module) of every stacked Linear / Experts of `model` whose per-layer dotted path
    (`layers.{i}.attn.q_a`) fully matches a target for at least one layer i of its stack."""
    pats = config.patterns()
    return [(tuple(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, (Linear, Experts)) and path and path[0] == "stacks"
            and any(_active_layers(model, path, pats))]


def _set_child(model, path, value):
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def apply_lora(model, config: LoRAConfig):
    """Wrap the target modules of a Transformer in place; returns the model.

    Raises ValueError if no module matches or if the model already has adapters.
    """
    if getattr(model, "lora", None) is not None:
        raise ValueError("the model already has LoRA adapters")
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(f"no module matches the LoRA targets {config.targets}")
    ctx = LoRAContext(config)
    kinds = [LoRAExperts if isinstance(node, Experts) else LoRALinear for _, node in targets]
    inits = tuple(tuple(kind.factor_init(node, config.rank).items()) for kind, (_, node) in zip(kinds, targets))
    pats = config.patterns()
    active = [_active_layers(model, path, pats) for path, _ in targets]
    layers = tuple(tuple(lp[1] if on else -1 for (lp, _), on in zip(_layer_modules(model, path), act))
                   for (path, _), act in zip(targets, active))
    factors = _init_factors(config.seed, inits, layers, getattr(getattr(model, "options", None), "mesh", None))
    for uid, (kind, (path, node)) in enumerate(zip(kinds, targets)):
        _set_child(model, path, kind(node, ctx, uid, factors[uid], active[uid]))
    model.lora = ctx
    return model


def _init_factors(seed: int, inits: tuple, layers: tuple, mesh) -> list[dict]:
    """Initial adapter factors, created by one jitted function whose outputs are born where they
    live: replicated on every device of `mesh` (adapters are small), or on the default device.

    inits: per adapter ((name, (shape, fan_in, fold)), ...) from `factor_init`: A factors
    (fan_in set) are PEFT-uniform from fold_in(key(seed), uid) (further folded with `fold` when
    set), B factors are zeros. layers: per adapter, the decoder layer indices of its stack
    (stored as its `layer` [n] int32, -1 for layers it leaves out).
    """
    def make():
        key = jax.random.key(seed)
        out = []
        for uid, named in enumerate(inits):
            k, d = jax.random.fold_in(key, uid), {"layer": jnp.asarray(layers[uid], jnp.int32)}
            for name, (shape, fan_in, fold) in named:
                if fan_in is None:
                    d[name] = jnp.zeros(shape, jnp.float32)
                else:
                    d[name] = _init_a(k if fold is None else jax.random.fold_in(k, fold), shape, fan_in)
            out.append(d)
        return out

    shardings = None
    if mesh is not None:
        rep = NamedSharding(mesh, PartitionSpec())
        shardings = jax.tree.map(lambda _: rep, jax.eval_shape(make))
    return jax.jit(make, out_shardings=shardings)()


def adapters(model) -> list[tuple[tuple, nnx.Module]]:
    """(path of the wrapped module, wrapper) for every adapter of the model, in graph order."""
    return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, (LoRALinear, LoRAExperts))]


def count_params(model) -> tuple[int, int]:
    """(adapter parameters, base parameters)."""
    n_lora = sum(int(np.prod(v.shape)) * sum(w.active) // len(w.active)       # adapted layers only
                 for _, w in adapters(model) for v in jax.tree.leaves(nnx.state(w, LoRAWeight)))
    n_base = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return n_lora, n_base


# ------------------------------------------------------------------------------ merge / export
def merged_module(model):
    """A copy of the model with adapters folded into the base weights and no LoRA modules.

    Merged kernel = base + a @ b * scale, computed in float32 and stored in the base dtype
    (bf16/f32). FP8 base weights are not requantised: merging an FP8 model raises ValueError;
    load the base with fp8_weights=False, `transfer_adapters` into it and merge that.
    """
    if model.options.fp8_weights:
        raise ValueError("cannot merge adapters into FP8 base weights; load the base with "
                         "fp8_weights=False, transfer_adapters(...) and merge that model")
    merged = nnx.clone(model)
    for path, wrapper in adapters(merged):
        base = wrapper.base
        if isinstance(wrapper, LoRALinear):
            base.kernel[...] = wrapper.weight().astype(base.kernel.dtype)
        else:
            for name in EXPERT_PROJ:
                var = getattr(base, name)
                var[...] = wrapper.weight(name).astype(var.dtype)
        _set_child(merged, path, base)
    del merged.lora
    return merged


def transfer_adapters(src, dst):
    """Give `dst` (a Transformer of the same config) the adapters of `src`; returns dst."""
    if getattr(dst, "lora", None) is None:
        apply_lora(dst, src.lora.config)
    nnx.update(dst, nnx.state(src, LoRAWeight))
    return dst


def _peft_entries(model, path, wrapper) -> list[tuple[str, str, str, tuple]]:
    """[(hf module name, attribute of a, attribute of b, index into the stacked factors)] for
    one adapter: one per layer of its stack (index (j,)), per expert for Experts ((j, e))."""
    cfg = model.cfg
    out = []
    for lp, j in _layer_modules(model, path):
        if not wrapper.active[j]:
            continue
        if isinstance(wrapper, LoRALinear):
            name = hf_source(lp + ("kernel",), cfg).names[0]
            out.append((name[: -len(".weight")], "lora_a", "lora_b", (j,)))
            continue
        for proj in EXPERT_PROJ:
            for e, name in enumerate(hf_source(lp + (proj,), cfg).names):
                out.append((name[: -len(".weight")], proj + "_a", proj + "_b", (j, e)))
    return out


def peft_tensors(model) -> dict[str, np.ndarray]:
    """{PEFT name: float32 array}: `base_model.model.<hf module>.lora_A.weight` [r, in] and
    `...lora_B.weight` [out, r] per layer (routed experts: one pair per expert)."""
    out = {}
    for path, wrapper in adapters(model):
        host = {}
        for mod, an, bn, idx in _peft_entries(model, path, wrapper):
            for attr, x in ((an, "A"), (bn, "B")):
                if attr not in host:
                    host[attr] = np.asarray(getattr(wrapper, attr)[...])
                out[f"base_model.model.{mod}.lora_{x}.weight"] = np.ascontiguousarray(host[attr][idx].T)
    return out


def save_peft(model, out_dir, base_model_name_or_path: str = "") -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT LoRA layout) to out_dir
    (multi-host: process 0 writes; the adapters are replicated on every device)."""
    out = Path(out_dir)
    cfg: LoRAConfig = model.lora.config
    tensors = peft_tensors(model)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    modules = sorted({n.split(".")[-3] for n in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "target_modules": modules, "modules_to_save": None,
        # the dsv32_jax target expressions, so load_peft can rebuild the same wrappers
        "dsv32_jax_targets": list(cfg.targets),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_peft(model, adapter_dir):
    """Wrap `model` as described by adapter_config.json and load the adapter weights; returns model."""
    d = Path(adapter_dir)
    meta = json.loads((d / "adapter_config.json").read_text())
    targets = tuple(meta.get("dsv32_jax_targets") or ("attn",))
    config = LoRAConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                        dropout=float(meta.get("lora_dropout", 0.0)), targets=targets)
    apply_lora(model, config)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    used = set()
    for path, wrapper in adapters(model):
        values = {}
        for mod, an, bn, idx in _peft_entries(model, path, wrapper):
            for attr, x in ((an, "A"), (bn, "B")):
                name = f"base_model.model.{mod}.lora_{x}.weight"
                if name not in tensors:
                    raise ValueError(f"{d}: adapter_model.safetensors has no tensor {name!r}")
                v = values.setdefault(attr, np.zeros(getattr(wrapper, attr).shape, np.float32))
                if v[idx].shape != tensors[name].T.shape:
                    raise ValueError(f"{d}: tensor {name!r} has shape {tensors[name].shape}, expected "
                                     f"{v[idx].T.shape}")
                v[idx] = tensors[name].T
                used.add(name)
        for attr, v in values.items():
            getattr(wrapper, attr)[...] = jnp.asarray(v, jnp.float32)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{d}: adapter tensors match no module of the model, e.g. {unused[:3]}")
    return model
