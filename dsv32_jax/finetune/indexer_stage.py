"""Pieces of the two-stage recipe that gives a dense MLA checkpoint a lightning indexer (report 2.1).

  1. dense warm-up: a fresh indexer, the model attends densely (every visible key selected), only
     the indexer is trained, by the dense alignment KL (report: lr 1e-3, 1000 steps);
  2. sparse: the model attends to the indexer's top-k; the indexer keeps training on the KL over
     its selected set while the main model trains on the LM loss (here: LoRA adapters).

The indexer's parameters are trained in full (wq_b, wk, k_norm, weights_proj): it starts from
scratch, so adapters on a random base would make no sense.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv32_jax.attention import MLA
from dsv32_jax.config import load_config
from dsv32_jax.loading import hf_param_value
from dsv32_jax.model import RuntimeOptions, Transformer
from dsv32_jax.params import ParamInfo, checkpoint_paths, hf_source, layer_info
from dsv32_jax.safetensors_io import HFCheckpoint

# every parameter of every layer's lightning indexer (nnx filter)
INDEXER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("indexer"))


def load_with_fresh_indexer(path, options: RuntimeOptions, *, seed: int = 0):
    """A Transformer from a Hugging Face checkpoint; indexer tensors the checkpoint lacks (a dense
    MLA checkpoint of the V3.1-Terminus layout has none) keep a fresh random initialisation.

    The config's index_n_heads / index_head_dim / index_topk (defaults: the V3.2 release's 64 / 128 /
    2048) shape the new indexer. Returns (model, number of freshly initialised indexer tensors).
    Every other tensor must be present (a clear error otherwise, as dsv32_jax.load).
    """
    path = Path(path)
    cfg = load_config(path)
    ckpt = HFCheckpoint(path)
    model = Transformer(cfg, options, rngs=nnx.Rngs(seed))
    fresh = 0
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        p = tuple(p)
        v = var.get_value()
        info = ParamInfo(tuple(v.shape), np.dtype(v.dtype), var.get_metadata().get("axes"))
        value = v
        for lp, j in checkpoint_paths(p, cfg):        # stacked layers: one checkpoint tensor per layer
            if "indexer" in lp and not all(n in ckpt for n in hf_source(lp, cfg).names):
                fresh += 1
                continue
            one = jnp.asarray(hf_param_value(ckpt, lp, layer_info(info, j), cfg))
            value = one if j is None else value.at[j].set(one)
        var.set_value(value)
    return model, fresh


def set_index_topk(model, topk: int):
    """Give every MLA (and its indexer) of the model index_topk = topk; topk >= the sequence
    length makes the attention exactly dense causal (the warm-up). Returns the previous value."""
    old = model.cfg.index_topk
    cfg = model.cfg.replace(index_topk=topk)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MLA):
            node.cfg = cfg
            node.indexer.cfg = cfg
    return old
