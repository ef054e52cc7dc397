"""The decoder layers run as one lax.scan per stack of same-structure layers (longer than
UNROLL_MAX): the lowered decode step does not grow with depth (it grew linearly while the layers
were unrolled), and the
stacked layout maps one-to-one onto the per-layer checkpoint names."""
import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.config import load_config
from dsv32_jax.model import UNROLL_MAX, RuntimeOptions, Transformer, layer_groups
from dsv32_jax.params import abstract_params, checkpoint_paths, state_path
from oracle import abstract_decode_step


def _config(layers: int):
    return load_config("configs/deepseek-v3.2-exp.json").replace(num_hidden_layers=layers, first_k_dense_replace=1,
                                                                  num_nextn_predict_layers=0)


def _decode_step_text(layers: int) -> str:
    """StableHLO of one decode step (batch 4, 1024 cached tokens) of the release's layer shapes
    with `layers` decoder layers, lowered from abstract arrays (nothing allocated)."""
    cfg = _config(layers)
    model = nnx.eval_shape(lambda: Transformer(cfg, RuntimeOptions(dtype=jnp.bfloat16, fp8_weights=True,
                                                                   attention_impl="xla"), rngs=nnx.Rngs(0)))
    step, state, caches, tok = abstract_decode_step(model, 4, 1024)
    return jax.jit(step).lower(state, caches, tok, tok).as_text()


def test_decode_step_does_not_grow_with_depth():
    # 1 dense + 5 MoE layers vs 1 dense + 9 MoE layers (stacks longer than UNROLL_MAX): unrolled,
    # the second program would be ~1.6x the first; scanned, only the loop bounds and stacked
    # shapes differ. 2% leaves room for those digits while failing for one extra unrolled layer
    # (~8% of the program here).
    small, deep = _decode_step_text(6), _decode_step_text(10)
    assert small.count("stablehlo.while") == deep.count("stablehlo.while")
    assert abs(len(deep) - len(small)) <= 0.02 * len(small), (len(small), len(deep))


def test_short_stacks_are_unrolled():
    """A stack of at most UNROLL_MAX layers runs without a loop of its own (XLA:CPU copies a
    scanned layer's weight slices out of the stack on every step); a longer one is a scan."""
    assert UNROLL_MAX == 4
    unrolled, scanned = _decode_step_text(4), _decode_step_text(6)     # 1 dense + 3 / 5 MoE layers
    assert unrolled.count("stablehlo.while") == scanned.count("stablehlo.while") - 1


def test_stacks_map_onto_per_layer_checkpoint_paths():
    cfg = _config(5).replace(first_k_dense_replace=2)
    assert layer_groups(cfg) == [(0, 2, False), (2, 3, True)]
    opts = RuntimeOptions(dtype=jnp.bfloat16)
    model = nnx.eval_shape(lambda: Transformer(cfg, opts, rngs=nnx.Rngs(0)))
    kernel = model.stacks[1].block.attn.q_a.kernel
    assert kernel.shape == (3, cfg.hidden_size, cfg.q_lora_rank)
    assert kernel.get_metadata()["axes"] == ("layers", "embed", "q_lora")
    path = ("stacks", 1, "block", "attn", "q_a", "kernel")
    want = [(("layers", i, "attn", "q_a", "kernel"), i - 2) for i in (2, 3, 4)]
    assert checkpoint_paths(path, cfg) == want
    assert all(state_path(lp, cfg) == (path, j) for lp, j in want)
    table = abstract_params(cfg, opts)            # the checkpoint layout: one entry per layer
    assert table[("layers", 4, "attn", "q_a", "kernel")].shape == (cfg.hidden_size, cfg.q_lora_rank)
    assert table[("layers", 4, "attn", "q_a", "kernel")].axes == ("embed", "q_lora")
    assert not any(p[0] == "stacks" for p in table)


def test_lowered_collectives_count_scan_iterations():
    """A collective inside a scan over 3 layers runs 3 times per call (the lowered text holds it
    once), so per-layer figures from `collectives` stay per layer."""
    from jax.sharding import PartitionSpec as P

    from dsv32_jax.introspect import collectives

    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    exchange = jax.shard_map(lambda a: jax.lax.all_to_all(a, "x", 1, 1, tiled=True), mesh=mesh,
                             in_specs=P("x"), out_specs=P("x"))

    def layers(x, w):
        return jax.lax.scan(lambda c, wi: (exchange(c * wi.sum()), None), x, w)[0]

    text = jax.jit(layers).lower(jnp.ones((8, 16)), jnp.ones((3, 5))).as_text()
    (c,) = collectives(text)
    assert (c.op, c.operand_bytes, c.calls) == ("all_to_all", 2 * 16 * 4, 3)


def _eqn_outputs(jaxpr):
    """Every equation's output avals in a jaxpr and all the sub-jaxprs it calls (scan bodies,
    shard_map, pjit, custom_vjp, cond branches)."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, [v.aval for v in eqn.outvars]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _eqn_outputs(inner)


def test_decode_step_reads_and_writes_caches_in_place():
    """The scan carries the stacked caches [n, B, L, ...] whole: a layer writes its new rows at
    [layer, b, position] and its attention ops read the layer in place. No array of one layer's
    cache shape [B, L, ...] is ever made (the scan used to slice each layer's cache out of the
    stack and write it back whole: a copy of every cache per decode step), and the compiled step
    updates the donated caches in place with less temporary memory than one layer's cache."""
    # 1 dense + 5 MoE layers: the MoE stack is longer than UNROLL_MAX, so it is scanned
    cfg = load_config("configs/tiny.json").replace(num_hidden_layers=6, first_k_dense_replace=1)
    batch, max_len = 3, 2048
    model = nnx.eval_shape(lambda: Transformer(cfg, RuntimeOptions(dtype=jnp.float32, attention_impl="xla"),
                                               rngs=nnx.Rngs(0)))
    step, state, caches, tok = abstract_decode_step(model, batch, max_len)
    # the rows sparse attention reads (the indexer scores every key of its layer: its [B, L, D]
    # keys may be read through a slice XLA fuses into the score; the compiled check covers them)
    slices = {c.latent.shape[1:] for c in caches}
    assert all(s[:2] == (batch, max_len) for s in slices)
    jaxpr = jax.make_jaxpr(step)(state, caches, tok, tok).jaxpr
    made = [(name, a.shape) for name, avals in _eqn_outputs(jaxpr) for a in avals
            if getattr(a, "shape", None) in slices]
    assert not made, made
    mem = jax.jit(step, donate_argnums=1).lower(state, caches, tok, tok).compile().memory_analysis()
    cache_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))
    # one layer's latent cache; the temporaries left are the indexer's float32 view of its keys
    # and scores (the CPU reference scores in float32), smaller than that
    slice_bytes = min(c.latent.size // c.latent.shape[0] * c.latent.dtype.itemsize for c in caches)
    assert mem.alias_size_in_bytes >= cache_bytes
    assert mem.temp_size_in_bytes < slice_bytes, (mem.temp_size_in_bytes, slice_bytes)
