"""Tiny checkpoints in the exact layout of the FP8 release (test helper).

From a tiny transformers model, `write_release_checkpoint` writes:
  - every projection the release stores in FP8 (MLA, indexer wq_b/wk, dense MLP, experts,
    shared experts) as F8_E4M3 with F32 `weight_scale_inv` [ceil(out/b), ceil(in/b)] tiles;
    block sizes that do not divide the dims give partial last tiles, as the 576-row
    `kv_a_proj_with_mqa` of the release does;
  - norms, embeddings and lm_head as BF16; `e_score_correction_bias`, `indexer.weights_proj`
    and the indexer `k_norm` as F32 (as released);
  - an MTP layer `model.layers.{L}.*` (random), several shards and `model.safetensors.index.json`,
    `config.json` with `quantization_config`, and `generation_config.json`.
It returns the dequantised float32 weights by name, which are loaded back into the torch
model so the oracle runs on exactly the values the checkpoint holds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

FP8_NAMES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "indexer.wq_b",
             "indexer.wk", "gate_proj", "up_proj", "down_proj")
F32_NAMES = ("e_score_correction_bias", "indexer.weights_proj", "indexer.k_norm")


def quantize_fp8_blocks(w: np.ndarray, block: tuple[int, int]):
    """w [R, C] float32 -> (e4m3 [R, C], scale [ceil(R/br), ceil(C/bc)] float32), W ~ q * scale."""
    br, bc = block
    r, c = w.shape
    sr, sc = math.ceil(r / br), math.ceil(c / bc)
    scale = np.zeros((sr, sc), np.float32)
    q = np.zeros_like(w, dtype=ml_dtypes.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            tile = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = max(float(np.abs(tile).max()), 1e-12) / 448.0
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = np.clip(tile / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize_fp8_blocks(q, scale, block):
    br, bc = block
    s = np.repeat(np.repeat(scale, br, 0), bc, 1)[: q.shape[0], : q.shape[1]]
    return q.astype(np.float32) * s


def _kind(name: str) -> str:
    """Storage of a checkpoint tensor in the release: "fp8", "f32" or "bf16"."""
    if any(k in name for k in F32_NAMES):
        return "f32"
    if name.endswith(".weight") and any(name[: -len(".weight")].endswith(k) for k in FP8_NAMES):
        return "fp8"
    return "bf16"


def hf_state_dict(torch_model) -> dict[str, np.ndarray]:
    """The per-expert checkpoint names of a transformers model (experts unfused)."""
    sd = {}
    for name, t in torch_model.state_dict().items():
        a = t.detach().float().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            inter = a.shape[1] // 2
            for e in range(a.shape[0]):
                sd[f"{pre}{e}.gate_proj.weight"] = a[e, :inter]
                sd[f"{pre}{e}.up_proj.weight"] = a[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("down_proj")]
            for e in range(a.shape[0]):
                sd[f"{pre}{e}.down_proj.weight"] = a[e]
        else:
            sd[name] = a
    return sd


def load_into_torch(torch_model, weights: dict[str, np.ndarray]) -> None:
    """Load per-expert-named float32 weights back into a transformers model (fusing experts)."""
    import torch

    sd = torch_model.state_dict()
    new = {}
    for name in sd:
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            n = sd[name].shape[0]
            new[name] = torch.tensor(np.stack([np.concatenate([weights[f"{pre}{e}.gate_proj.weight"],
                                                               weights[f"{pre}{e}.up_proj.weight"]])
                                               for e in range(n)]))
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("down_proj")]
            new[name] = torch.tensor(np.stack([weights[f"{pre}{e}.down_proj.weight"]
                                               for e in range(sd[name].shape[0])]))
        else:
            new[name] = torch.tensor(weights[name])
    torch_model.load_state_dict(new, strict=True)


def write_release_checkpoint(torch_model, out_dir, *, block=(128, 128), num_shards: int = 3,
                             mtp: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Write `torch_model` in the FP8 release layout; returns the dequantised float32 weights."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = torch_model.config
    sd = hf_state_dict(torch_model)
    if mtp:
        n = cfg.num_hidden_layers
        src = f"model.layers.{n - 1}."          # a MoE block to copy shapes from
        for k, v in list(sd.items()):
            if k.startswith(src):
                sd[f"model.layers.{n}." + k[len(src):]] = rng.standard_normal(v.shape).astype(np.float32) * (
                    v.shape[-1] ** -0.5 if v.ndim == 2 else 0.1) + (1.0 if "norm.weight" in k else 0.0)
        d, vocab = cfg.hidden_size, cfg.vocab_size
        extra = {"enorm.weight": 1 + 0.1 * rng.standard_normal(d), "hnorm.weight": 1 + 0.1 * rng.standard_normal(d),
                 "eh_proj.weight": rng.standard_normal((d, 2 * d)) * (2 * d) ** -0.5,
                 "shared_head.norm.weight": 1 + 0.1 * rng.standard_normal(d),
                 "shared_head.head.weight": rng.standard_normal((vocab, d)) * d ** -0.5,
                 "embed_tokens.weight": rng.standard_normal((vocab, d))}
        for k, v in extra.items():
            sd[f"model.layers.{n}.{k}"] = v.astype(np.float32)

    tensors, deq = {}, {}
    for name, a in sd.items():
        kind = _kind(name)
        if kind == "fp8":
            q, s = quantize_fp8_blocks(a, block)
            tensors[name] = q
            tensors[name[: -len("weight")] + "weight_scale_inv"] = s
            deq[name] = dequantize_fp8_blocks(q, s, block)
        elif kind == "f32":
            tensors[name] = a.astype(np.float32)
            deq[name] = tensors[name]
        else:
            tensors[name] = a.astype(ml_dtypes.bfloat16)
            deq[name] = tensors[name].astype(np.float32)

    names = sorted(tensors)
    weight_map = {}
    per = math.ceil(len(names) / num_shards)
    for i in range(num_shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.nbytes for v in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    c = cfg.to_dict()
    c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": list(block)}
    c["num_nextn_predict_layers"] = 1 if mtp else 0
    (out / "config.json").write_text(json.dumps(c, indent=2, default=str))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 0.95}))
    return deq
