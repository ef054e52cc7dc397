"""LoRA training: loss, jitted train/eval steps, MoE load statistics, Orbax checkpoints.

The step is a pure function of (adapters, frozen rest of the model, optimizer state, batch,
step number). Inside it the model is rebuilt with `nnx.merge` and instrumented on that
traced copy only (the persistent module tree and its state paths never change):
  * each stack of decoder layers runs its scanned layer body under jax.checkpoint
    (`BlockStack.remat`: only layer inputs are saved for the backward, everything inside is
    recomputed);
  * each stacked MoE router is wrapped by `RouterProbe`, which records the tokens routed per
    expert and layer;
  * the LoRA dropout key is fold_in(seed, step), so a resumed run draws the same masks.
Gradients are taken w.r.t. the adapters (`LoRAWeight`) only, and optax updates only them: the
base parameters are arguments that are never differentiated nor written.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv32_jax.finetune.indexer_loss import N_STATS, install_probes, probe_stats, summarize
from dsv32_jax.finetune.lora import LoRAKey, LoRAWeight
from dsv32_jax.model import LAYER_AXIS
from dsv32_jax.moe import MoE
from dsv32_jax.sharding import batch_spec, put


@dataclasses.dataclass(frozen=True)
class TrainHParams:
    """Optimiser and step settings (hashable: part of the jit cache key)."""
    lr: float = 1e-4
    steps: int = 100
    warmup: int = 10
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    remat: bool = True
    seed: int = 0
    indexer_kl: float = 0.0        # weight of the indexer alignment loss (0: not computed)
    align_stage: str = "sparse"    # "dense" (all visible keys) | "sparse" (the selected set)
    align_chunk: int = 128         # queries per chunk of the alignment loss
    align_topk: int | None = None  # K of the logged recall (default: the layers' index_topk)


def make_optimizer(hp: TrainHParams) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on a linear-warmup + cosine-decay learning rate."""
    return optax.chain(optax.clip_by_global_norm(hp.clip),
                       optax.adamw(lr_schedule(hp), b1=hp.b1, b2=hp.b2, weight_decay=hp.weight_decay))


def lr_schedule(hp: TrainHParams):
    """Learning rate of step s (0-based): lr * (s + 1) / warmup during the warmup steps, then a
    cosine decay to lr * end_lr_ratio at the last step (no step runs with lr 0)."""
    warmup = min(hp.warmup, max(hp.steps - 1, 0))
    base = optax.warmup_cosine_decay_schedule(0.0, hp.lr, warmup, max(hp.steps, warmup + 1),
                                              end_value=hp.lr * hp.end_lr_ratio)
    return lambda step: base(step + 1)


# ------------------------------------------------------------------------------ instrumentation
class LoadStat(nnx.Variable):
    """Tokens routed to each expert in the last forward, float32 [n, E] (n: layers of a stack)."""


class RouterProbe(nnx.Module):
    """Wraps a stacked MoE router (n layers); same outputs, and records the per-expert token
    count of each layer in `load` [n, E] (written from the scanned layer body)."""

    def __init__(self, router, num_experts: int, layers: int):
        self.router = router
        self.num_experts = num_experts
        self.load = LoadStat(jnp.zeros((layers, num_experts), jnp.float32), axes=(LAYER_AXIS, None))

    def __call__(self, x):
        w, e, s = self.router(x)
        self.load[...] = jnp.bincount(e.reshape(-1), length=self.num_experts).astype(jnp.float32)
        return w, e, s


def instrument(model, *, remat: bool, training: bool, key_data=None) -> list[RouterProbe]:
    """Prepare a (traced) model copy for a step; returns the router probes (one per stack of
    MoE layers; their loads concatenate to [n_moe_layers, E])."""
    if getattr(model, "lora", None) is not None:
        model.lora.training = training
        if key_data is not None:
            model.lora.key = LoRAKey(key_data)     # a new variable: the old one belongs to an outer trace
    probes = []
    for stack in model.stacks:
        stack.remat = remat
        mlp = stack.block.mlp
        if isinstance(mlp, MoE):
            probe = RouterProbe(mlp.router, model.cfg.n_routed_experts, stack.n)
            mlp.router = probe
            probes.append(probe)
    return probes


# ------------------------------------------------------------------------------ loss and steps
def token_nll(logits, targets):
    """logits float32 [B, T, V], targets int32 [B, T] -> negative log-likelihood [B, T]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - tgt


def forward_loss(model, batch):
    """Summed weighted NLL and weight total of a batch (inputs/targets/weights [B, T])."""
    h, _, _ = model.hidden(batch["inputs"], segment_ids=batch.get("segments"))
    nll = token_nll(model.logits(h), batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def _loads(probes):
    if not probes:
        return jnp.zeros((0, 0), jnp.float32)
    return jnp.concatenate([p.load[...] for p in probes])


def _align(aprobes):
    """(mean KL over layers, stats [n_layers, N_STATS]) of installed alignment probes."""
    if not aprobes:
        return jnp.zeros((), jnp.float32), jnp.zeros((0, N_STATS), jnp.float32)
    stats = probe_stats(aprobes)
    return jnp.mean(stats[:, 0] / jnp.maximum(stats[:, 1], 1.0)), stats


@functools.partial(jax.jit, static_argnames=("graphdef", "hp"), donate_argnames=("lora", "opt_state"))
def train_step(graphdef, hp: TrainHParams, lora, rest, opt_state, batch, step):
    """One AdamW step on the trainable state (adapters, or the indexer in the two-stage recipe).
    Returns (lora, opt_state, metrics).

    metrics: loss (mean NLL over weighted targets), tokens (weight sum), grad_norm, lr,
    expert_load float32 [n_moe_layers, E], and with hp.indexer_kl > 0: indexer_kl (mean over
    layers of the per-query alignment KL) and align_stats float32 [n_layers, N_STATS]. The
    optimised objective is loss + hp.indexer_kl * indexer_kl.
    """
    key_data = jax.random.key_data(jax.random.fold_in(jax.random.key(hp.seed), step))

    def loss_fn(lora):
        model = nnx.merge(graphdef, lora, rest)
        aprobes = (install_probes(model, stage=hp.align_stage, chunk=hp.align_chunk, topk=hp.align_topk)
                   if hp.indexer_kl > 0 else [])
        probes = instrument(model, remat=hp.remat, training=True, key_data=key_data)
        total, count = forward_loss(model, batch)
        lm = total / jnp.maximum(count, 1.0)
        kl, astats = _align(aprobes)
        return lm + hp.indexer_kl * kl, (lm, count, _loads(probes), kl, astats)

    (_, (loss, count, loads, kl, astats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
    tx = make_optimizer(hp)
    updates, opt_state = tx.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(hp)(step), "expert_load": loads}
    if hp.indexer_kl > 0:
        metrics.update(indexer_kl=kl, align_stats=astats)
    return lora, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "align_stage", "align_chunk", "align_topk"))
def eval_step(graphdef, lora, rest, batch, align_stage=None, align_chunk=128, align_topk=None):
    """(summed NLL, weight total, expert_load [n_moe_layers, E]) of one batch, no dropout;
    with align_stage ("dense" gives the recall): + alignment stats [n_layers, N_STATS]."""
    model = nnx.merge(graphdef, lora, rest)
    aprobes = install_probes(model, stage=align_stage, chunk=align_chunk, topk=align_topk) if align_stage else []
    probes = instrument(model, remat=False, training=False)
    total, count = forward_loss(model, batch)
    if align_stage:
        return total, count, _loads(probes), _align(aprobes)[1]
    return total, count, _loads(probes)


def load_balance(loads) -> dict[str, float]:
    """Expert-load statistics from token counts [n_moe_layers, E] (averaged over layers):
    max_load = max / mean tokens per expert (1 = perfectly balanced), cv = std / mean,
    idle = fraction of experts that received no token."""
    loads = np.asarray(loads, np.float64)
    if loads.size == 0:
        return {}
    mean = loads.mean(axis=1, keepdims=True).clip(min=1e-9)
    return {"moe_max_load": float((loads.max(axis=1, keepdims=True) / mean).mean()),
            "moe_cv": float((loads.std(axis=1, keepdims=True) / mean).mean()),
            "moe_idle": float((loads == 0).mean())}


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """Holds the split model (adapters | frozen rest), the optimiser state and the step count.

    model: a Transformer with adapters (finetune.lora.apply_lora). The model object itself is
    updated with the trained adapters by `sync()`.
    trainable: the nnx filter of the trained variables (default: the adapters; the two-stage
    indexer recipe passes finetune.indexer_stage.INDEXER_PARAMS).
    """

    def __init__(self, model, hp: TrainHParams, trainable=LoRAWeight):
        self.model, self.hp = model, hp
        self.mesh = model.options.mesh
        # the trained variables are born where they live (adapters: replicated by apply_lora;
        # indexer weights: in their rule-table shards); the optimizer state is created by a jitted
        # init whose out_shardings put each moment next to its array (scalars replicated)
        self.graphdef, self.lora, self.rest = nnx.split(model, trainable, ...)
        init = make_optimizer(hp).init
        shardings = None
        if self.mesh is not None:
            rep = NamedSharding(self.mesh, PartitionSpec())
            by_shape = {}
            for a in jax.tree.leaves(self.lora):
                by_shape.setdefault(tuple(a.shape), a.sharding)
            shardings = jax.tree.map(lambda s: by_shape.get(tuple(s.shape), rep) if s.ndim else rep,
                                     jax.eval_shape(init, self.lora))
        self.opt_state = jax.jit(init, out_shardings=shardings)(self.lora)
        self.step = 0

    def device_batch(self, batch) -> dict:
        b = {k: jnp.asarray(v) for k, v in batch.as_dict().items()}
        if self.mesh is not None:
            b = {k: put(v, NamedSharding(self.mesh, batch_spec(self.mesh, v.ndim, v.shape[0])))
                 for k, v in b.items()}
        return b

    def train_step(self, batch) -> dict:
        """Run one step on a data.Batch; returns host metrics (floats + expert_load array)."""
        self.lora, self.opt_state, m = train_step(self.graphdef, self.hp, self.lora, self.rest, self.opt_state,
                                                  self.device_batch(batch), jnp.asarray(self.step, jnp.int32))
        self.step += 1
        m = jax.device_get(m)
        arrays = ("expert_load", "align_stats")
        out = {k: float(v) for k, v in m.items() if k not in arrays}
        out.update({k: np.asarray(m[k]) for k in arrays if k in m})
        return out

    def evaluate(self, dataset, batch_size: int, *, recall: bool = False) -> dict:
        """Mean NLL over all weighted targets of a ChatDataset (every row once) + load stats;
        recall=True adds the dense-attention alignment figures (indexer_loss.summarize, prefixed
        eval_): the dense KL and the share of attention mass in the indexer's top-k per layer."""
        total, count, loads, align = 0.0, 0.0, 0.0, 0.0
        for batch in dataset.sequential_batches(batch_size):
            if recall:
                t, c, lo, st = eval_step(self.graphdef, self.lora, self.rest, self.device_batch(batch),
                                         align_stage="dense", align_chunk=self.hp.align_chunk,
                                         align_topk=self.hp.align_topk)
                align = align + np.asarray(st)
            else:
                t, c, lo = eval_step(self.graphdef, self.lora, self.rest, self.device_batch(batch))
            total, count, loads = total + float(t), count + float(c), loads + np.asarray(lo)
        out = {"eval_loss": total / max(count, 1.0), "eval_tokens": count, **load_balance(loads)}
        if recall:
            out.update({"eval_" + k: v for k, v in summarize(align).items()})
        return out

    def sync(self):
        """Write the current adapters into self.model; returns the model."""
        nnx.update(self.model, self.lora)
        return self.model

    # ---------------------------------------------------------------- checkpoint pytree
    def _leaves(self):
        return jax.tree.leaves((self.lora, self.opt_state))

    def checkpoint_tree(self) -> dict:
        """{"p00000": array, ...}: adapters then optimiser-state leaves, in pytree order."""
        return {f"p{i:05d}": v for i, v in enumerate(self._leaves())}

    def load_checkpoint_tree(self, tree: dict, step: int):
        treedef = jax.tree.structure((self.lora, self.opt_state))
        old = self._leaves()
        if len(tree) != len(old):
            raise ValueError(f"checkpoint has {len(tree)} arrays, this run expects {len(old)} "
                             "(different LoRA targets/rank?)")
        leaves = []
        for i, ref in enumerate(old):
            v = tree[f"p{i:05d}"]
            if tuple(v.shape) != tuple(ref.shape):
                raise ValueError(f"checkpoint array {i} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
            sharding = getattr(ref, "sharding", None)
            if isinstance(v, jax.Array) and v.dtype == ref.dtype and v.sharding == sharding:
                leaves.append(v)                 # restored straight into its shards
            else:
                leaves.append(put(np.asarray(v).astype(ref.dtype), sharding) if sharding is not None
                              else jnp.asarray(v, ref.dtype))
        self.lora, self.opt_state = jax.tree.unflatten(treedef, leaves)
        self.step = int(step)


class Checkpointer:
    """Orbax checkpoints of (adapters, optimiser state) + JSON metadata (data position, ...)."""

    def __init__(self, directory, *, max_to_keep: int = 2):
        self.dir = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                           enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, trainer: Trainer, meta: dict):
        self.manager.save(trainer.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(trainer.checkpoint_tree()),
            meta=ocp.args.JsonSave(dict(meta, step=trainer.step))), force=True)
        self.manager.wait_until_finished()

    def restore(self, trainer: Trainer, step: int | None = None) -> dict:
        """Load a checkpoint (default: the latest) into the trainer; returns its metadata."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.checkpoint_tree())
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        trainer.load_checkpoint_tree(got["state"], got["meta"]["step"])
        return dict(got["meta"])

    def close(self):
        self.manager.close()
