"""The optional MTP head against transformers' own decoder layer and norms.

transformers does not run the MTP layer, so the oracle is assembled from its parts: its
RMSNorm for enorm/hnorm/shared_head.norm, a `DeepseekV32DecoderLayer` (MoE) loaded with the
checkpoint's `model.layers.{L}.*` block, plain torch matmuls for eh_proj and the head.
"""
import numpy as np
import torch

import jax.numpy as jnp

import dsv32_jax
from oracle import make_hf_model
from release_fixture import load_into_torch, write_release_checkpoint


def test_mtp_logits_equal_assembled_oracle(tmp_path):
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as M

    hf, _ = make_hf_model(tmp_path / "hf", seed=5)
    deq = write_release_checkpoint(hf, tmp_path / "rel", block=(32, 32), mtp=True)
    n = hf.config.num_hidden_layers
    pre = f"model.layers.{n}."
    load_into_torch(hf, {k: v for k, v in deq.items() if not k.startswith(pre)})

    cfg = hf.config
    layer = M.DeepseekV32DecoderLayer(cfg, layer_idx=n - 1).float().eval()   # layer n-1 is MoE
    sd = {}
    for name in layer.state_dict():
        if name.endswith("mlp.experts.gate_up_proj"):
            sd[name] = torch.tensor(np.stack([np.concatenate([deq[f"{pre}mlp.experts.{e}.gate_proj.weight"],
                                                              deq[f"{pre}mlp.experts.{e}.up_proj.weight"]])
                                              for e in range(cfg.n_routed_experts)]))
        elif name.endswith("mlp.experts.down_proj"):
            sd[name] = torch.tensor(np.stack([deq[f"{pre}mlp.experts.{e}.down_proj.weight"]
                                              for e in range(cfg.n_routed_experts)]))
        else:
            sd[name] = torch.tensor(deq[pre + name])
    layer.load_state_dict(sd, strict=True)

    def norm(w):
        m = M.DeepseekV32RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m.weight.data = torch.tensor(w)
        return m

    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 30)).astype(np.int32)
    cur, nxt = ids[:, :-1], ids[:, 1:]
    t = cur.shape[1]
    with torch.no_grad():
        h = hf.model(torch.tensor(cur, dtype=torch.long)).last_hidden_state
        emb = torch.tensor(deq[pre + "embed_tokens.weight"])[torch.tensor(nxt, dtype=torch.long)]
        u = torch.cat([norm(deq[pre + "enorm.weight"])(emb), norm(deq[pre + "hnorm.weight"])(h)], -1)
        u = u @ torch.tensor(deq[pre + "eh_proj.weight"]).T
        pos = torch.arange(t)[None].expand(2, t)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(2, 1, t, t)
        u = layer(u, attention_mask=mask, position_ids=pos, position_embeddings=hf.model.rotary_emb(u, pos))
        ref = (norm(deq[pre + "shared_head.norm.weight"])(u) @ torch.tensor(deq[pre + "shared_head.head.weight"]).T)
        ref = ref.numpy()

    model = dsv32_jax.load(tmp_path / "rel", dtype=jnp.float32, numerics="exact", mtp=True)
    hidden, _, _ = model.module.hidden(jnp.asarray(cur))
    ours = np.asarray(model.module.mtp_logits(hidden, jnp.asarray(nxt)))
    # float32 both sides (tolerance as the main-model oracle test)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # without mtp=True the head is absent
    plain = dsv32_jax.load(tmp_path / "rel", dtype=jnp.float32, numerics="exact")
    assert plain.module.mtp is None
