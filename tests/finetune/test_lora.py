"""LoRA wrapper and trainer on the tiny oracle model (3 layers: dense + 2 MoE, index_topk 8).

float32 everywhere with full-precision matmuls (tests/conftest.py), numerics "exact".
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import dsv32_jax
from dsv32_jax.export import save_hf
from dsv32_jax.finetune.data import Batch
from dsv32_jax.finetune.lora import (LoRAConfig, LoRAExperts, LoRALinear, LoRAWeight, adapters, apply_lora,
                                     count_params, load_peft, merged_module, save_peft)
from dsv32_jax.finetune.train import TrainHParams, Trainer, eval_step, forward_loss, instrument

B, T = 2, 32          # T well above the tiny model's index_topk (8): attention is sparse
ALL = ("attn", "mlp", "shared", "experts")


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(shared_compile_cache):
    """Several tests compile the same logits function (the base model, a merged model with the
    base's structure, a reloaded adapter model): later ones load the first executable."""
    yield


def _load(path, impl="xla"):
    return dsv32_jax.load(path, dtype=jnp.float32, attention_impl=impl, numerics="exact").module


def _batch(seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    w = (rng.random((B, T)) < 0.6).astype(np.float32)
    return Batch(tok[:, :-1], tok[:, 1:], w)


def _randomise_adapters(model, scale=0.05, seed=0):
    """Give every adapter factor random values (B starts at zero, which would make merges trivial)."""
    state = nnx.state(model, LoRAWeight)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.normal(k, v.shape, jnp.float32) * scale for k, v in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def _logits_fn(model):
    gd, st = nnx.split(model)
    return jax.jit(lambda s, ids: nnx.merge(gd, s)(ids)), st


def test_wrapping_selects_targets_and_starts_as_identity(tiny_hf):
    _, path = tiny_hf
    model = _load(path)
    ids = jnp.asarray(_batch().inputs)
    fn, st = _logits_fn(model)
    before = fn(st, ids)
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    wrapped = {".".join(map(str, p)): type(w) for p, w in adapters(model)}
    # stacks: layer 0 (dense), layers 1-2 (MoE); one wrapper per stacked module
    assert wrapped["stacks.0.block.attn.q_a"] is LoRALinear and wrapped["stacks.0.block.mlp.up"] is LoRALinear
    assert wrapped["stacks.1.block.mlp.shared.down"] is LoRALinear
    assert wrapped["stacks.1.block.mlp.experts"] is LoRAExperts
    assert not any("indexer" in k or "router" in k for k in wrapped)
    # the adapter filter selects exactly the factors; the base parameters are untouched in number
    lora_paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, LoRAWeight))]
    assert lora_paths and all(p[-1] in ("lora_a", "lora_b", "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")
                              for p in lora_paths)
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == n_params
    fn, st = _logits_fn(model)
    # B = 0 at init: the adapter path adds exact zeros. On CPU the unwrapped MoE layers run
    # these few tokens through the dense experts form (moe.dense_routed: one float32
    # contraction over the 16 experts x 32 hidden units, weights folded in) while the adapted
    # experts run the sorted grouped matmul (per-expert sums, then the weighted sum of 4): the
    # same products summed in another order. Logits are O(1); a 512-term float32 sum in another
    # order moves them by up to ~512 * 2^-24 ~ 3e-5 of the terms' size (observed 1.6e-6).
    np.testing.assert_allclose(np.asarray(fn(st, ids)), np.asarray(before), rtol=1e-5, atol=1e-5)
    # default targets: the five MLA projections of every layer
    m2 = apply_lora(_load(path), LoRAConfig())
    assert sorted({p[-1] for p, _ in adapters(m2)}) == ["kv_a", "kv_b", "o", "q_a", "q_b"]


def test_overfit_loss_falls_and_base_is_frozen(tiny_hf):
    _, path = tiny_hf
    model = apply_lora(_load(path), LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=("attn", "shared")))
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    trainer = Trainer(model, TrainHParams(lr=2e-2, steps=30, warmup=2, remat=True))
    batch = _batch()
    losses = [trainer.train_step(batch)["loss"] for _ in range(30)]
    # 30 AdamW steps on one batch of 2x32 random tokens: the adapters memorise a large part of it
    assert losses[-1] < 0.6 * losses[0], losses
    trainer.sync()
    base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
        assert a.dtype == b.dtype and np.array_equal(a, b)     # bit-identical
    assert any(np.abs(np.asarray(v)).max() > 0 for v in jax.tree.leaves(nnx.state(model, LoRAWeight)))


def test_only_weighted_targets_contribute(tiny_hf):
    _, path = tiny_hf
    model = apply_lora(_load(path), LoRAConfig(rank=4, targets=("attn",)))
    _randomise_adapters(model)
    gd, lora, rest = nnx.split(model, LoRAWeight, ...)
    b = _batch(1)
    loss = lambda batch: eval_step(gd, lora, rest, {k: jnp.asarray(v) for k, v in batch.as_dict().items()})
    t0, c0, _ = loss(b)
    other = np.where(b.weights > 0, b.targets, (b.targets + 7) % 256)    # change only weight-0 targets
    t1, c1, _ = loss(Batch(b.inputs, other.astype(np.int32), b.weights))
    assert float(t0) == float(t1) and float(c0) == float(c1) == b.weights.sum()
    changed = np.where(b.weights > 0, (b.targets + 7) % 256, b.targets)
    t2, _, _ = loss(Batch(b.inputs, changed.astype(np.int32), b.weights))
    assert abs(float(t2) - float(t0)) > 1e-3


def test_merged_export_and_peft_roundtrip_match_adapter_logits(tiny_hf, tmp_path):
    _, path = tiny_hf
    model = apply_lora(_load(path), LoRAConfig(rank=4, alpha=8, targets=ALL))
    _randomise_adapters(model)
    ids = jnp.asarray(_batch(2).inputs)
    fn, st = _logits_fn(model)
    ref = np.asarray(fn(st, ids))
    base_fn, base_st = _logits_fn(_load(path))
    assert np.abs(np.asarray(base_fn(base_st, ids)) - ref).max() > 1e-2     # the adapters matter

    merged = merged_module(model)
    assert not adapters(merged) and getattr(merged, "lora", None) is None
    save_hf(merged, tmp_path / "merged")
    fn2, st2 = _logits_fn(_load(tmp_path / "merged"))
    # x @ (W + A B s) vs x @ W + (x A) B s: the same sums in a different order, in float32;
    # logits are O(10), so 1e-4 absolute is ~1e-5 relative (a flipped MoE/top-k choice would be O(1))
    np.testing.assert_allclose(np.asarray(fn2(st2, ids)), ref, rtol=1e-4, atol=1e-4)

    save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    cfg = model.cfg
    a = tensors["base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight"]
    bq = tensors["base_model.model.model.layers.0.self_attn.q_a_proj.lora_B.weight"]
    assert a.shape == (4, cfg.hidden_size) and bq.shape == (cfg.q_lora_rank, 4)
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in tensors
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8
    assert {"q_a_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj"} <= set(meta["target_modules"])
    reloaded = load_peft(_load(path), tmp_path / "adapter")
    fn3, st3 = _logits_fn(reloaded)
    np.testing.assert_array_equal(np.asarray(fn3(st3, ids)), ref)    # the same float32 values


def test_targets_covering_part_of_a_layer_stack(tiny_hf, tmp_path):
    """layers 0-1 of q_b: layer 1 shares its stack with layer 2, whose slice stays masked out of
    the forward, the merge, the export and the parameter count."""
    _, path = tiny_hf
    model = apply_lora(_load(path), LoRAConfig(rank=4, targets=(r"layers\.[01]\.attn\.q_b",)))
    assert [w.active for _, w in adapters(model)] == [(True,), (True, False)]
    _randomise_adapters(model)            # layer 2's slice gets values too: they must not count
    ids = jnp.asarray(_batch(3).inputs)
    fn, st = _logits_fn(model)
    ref = np.asarray(fn(st, ids))
    merged = merged_module(model)
    base = _load(path)
    q_b = lambda m: np.asarray(m.stacks[1].block.attn.q_b.kernel[...])       # noqa: E731  [2, in, out]
    np.testing.assert_array_equal(q_b(merged)[1], q_b(base)[1])              # layer 2 untouched
    assert np.abs(q_b(merged)[0] - q_b(base)[0]).max() > 1e-3                # layer 1 adapted
    fn2, st2 = _logits_fn(merged)
    np.testing.assert_allclose(np.asarray(fn2(st2, ids)), ref, rtol=1e-4, atol=1e-4)   # as the merged export test
    save_peft(model, tmp_path / "adapter")
    names = sorted(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert [n.split(".")[4] for n in names] == ["0", "0", "1", "1"]
    assert all(".q_b_proj." in n for n in names)
    n_lora, _ = count_params(model)
    cfg = model.cfg
    assert n_lora == 2 * 4 * (cfg.q_lora_rank + cfg.num_attention_heads * cfg.qk_head_dim)
    fn3, st3 = _logits_fn(load_peft(_load(path), tmp_path / "adapter"))
    np.testing.assert_array_equal(np.asarray(fn3(st3, ids)), ref)


def test_lora_grads_through_sparse_kernel_match_xla(tiny_hf, monkeypatch):
    """LoRA gradients through the sparse attention: the Pallas kernel (interpret mode) with its
    custom_vjp backward, and the default CPU path ("xla": blockwise forward + the same
    custom_vjp backward), against the plain-jnp reference differentiated by JAX itself."""
    from dsv32_jax import attention

    # a model-level name for the reference ops (reference indexer + reference sparse_mla)
    monkeypatch.setitem(attention.ATTENTION_IMPLS, "autodiff", ("reference", "reference"))
    _, path = tiny_hf
    b = _batch(3)
    batch = {k: jnp.asarray(v) for k, v in b.as_dict().items()}
    out = {}
    for impl in ("autodiff", "xla", "interpret"):
        model = apply_lora(_load(path, impl), LoRAConfig(rank=4, targets=("attn",)))
        _randomise_adapters(model)
        assert model.cfg.index_topk < T
        gd, lora, rest = nnx.split(model, LoRAWeight, ...)

        def f(lora):
            m = nnx.merge(gd, lora, rest)
            # per-layer remat on the kernel side only: the comparison also checks that
            # rematerialisation changes neither the value nor the gradient
            instrument(m, remat=impl == "interpret", training=False)
            total, count = forward_loss(m, batch)
            return total / count

        if impl == "interpret":
            # the forward runs the Pallas kernel under its custom_vjp, so jax.grad uses the
            # kernel's blockwise backward over the selected rows (no dense mask anywhere)
            fwd = str(jax.make_jaxpr(f)(lora))
            assert "custom_vjp_call" in fwd and "sparse_mla_fwd" in fwd and "pallas_call" in fwd
        out[impl] = jax.jit(jax.value_and_grad(f))(lora)
    l0, g0 = out["autodiff"]
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-2   # gradients are live
    for impl in ("xla", "interpret"):
        l1, g1 = out[impl]
        # the kernels' online softmax and blockwise backward sum in another order than the
        # reference: float32 rounding only. Observed: |diff| <= 4e-7 on gradients whose largest
        # entries are ~0.05-0.2, so atol 1e-6 is ~1e-5 of the gradient scale (a wrong
        # selection or a missing backward term would be off by O(gradient))
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
        for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-4, atol=1e-6, err_msg=impl)


def test_fp8_base_stays_frozen_and_merges_via_dequantised_base(tmp_path):
    """FP8 (e4m3 + block scales) base weights: training leaves every base bit unchanged; the
    merge refuses to requantise and goes through the dequantised base instead."""
    from oracle import make_hf_model
    from release_fixture import write_release_checkpoint
    from dsv32_jax.finetune.lora import transfer_adapters

    hf, _ = make_hf_model(tmp_path / "hf", seed=5, num_hidden_layers=2)
    write_release_checkpoint(hf, tmp_path / "rel", block=(32, 32), mtp=False)
    fp8 = dsv32_jax.load(tmp_path / "rel", dtype=jnp.float32, numerics="exact", fp8_weights=True).module
    assert fp8.stacks[0].block.attn.q_a.kernel.dtype == jnp.float8_e4m3fn
    apply_lora(fp8, LoRAConfig(rank=4, targets=("attn", "experts")))
    before = jax.tree.map(np.asarray, nnx.state(fp8, nnx.Param))
    trainer = Trainer(fp8, TrainHParams(lr=1e-2, steps=3, warmup=1, remat=False))
    losses = [trainer.train_step(_batch())["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    trainer.sync()
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(fp8, nnx.Param)))):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    with pytest.raises(ValueError, match="FP8"):
        merged_module(fp8)
    plain = dsv32_jax.load(tmp_path / "rel", dtype=jnp.float32, numerics="exact").module
    merged = merged_module(transfer_adapters(fp8, plain))
    ids = jnp.asarray(_batch(4).inputs)
    (f1, s1), (f2, s2) = _logits_fn(fp8), _logits_fn(merged)
    # the FP8 model dequantises to the same float32 values the plain load holds; only the
    # summation order of the adapter term differs (as in the bf16/f32 merge test)
    np.testing.assert_allclose(np.asarray(f2(s2, ids)), np.asarray(f1(s1, ids)), rtol=1e-4, atol=1e-4)


def test_expert_adapters_train_and_match_on_a_device_mesh(tiny_hf):
    """Routed-expert adapters train; on a data x expert x tensor mesh over 8 host devices (base
    sharded by its logical axes, adapters replicated, experts run expert-parallel with the
    base and adapter grouped matmuls inside the shard_map) the losses equal the single-device ones."""
    _, path = tiny_hf
    out = {}
    for mesh in (None, "data=2,expert=2,tensor=2"):
        model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", mesh=mesh).module
        apply_lora(model, LoRAConfig(rank=4, targets=("experts",)))
        trainer = Trainer(model, TrainHParams(lr=1e-2, steps=3, warmup=1, remat=False))
        out[mesh] = [trainer.train_step(_batch()) for _ in range(3)]
    m = out[None]
    assert m[-1]["loss"] < m[0]["loss"]
    assert m[0]["expert_load"].shape == (2, model.cfg.n_routed_experts)
    # every token goes to num_experts_per_tok experts
    assert m[0]["expert_load"].sum(1).tolist() == [B * T * model.cfg.num_experts_per_tok] * 2
    # the same math with sharded reductions (float32 reassociation only); losses after the
    # first depend on the AdamW updates, so they check the sharded update as well
    np.testing.assert_allclose([x["loss"] for x in out["data=2,expert=2,tensor=2"]], [x["loss"] for x in m],
                               rtol=1e-5)
