"""dsv32-jax: DeepSeek-V3.2-Exp (MLA + DeepSeek Sparse Attention + MoE) in JAX/Flax.

    import dsv32_jax
    model = dsv32_jax.load(path, dtype=jnp.float32, attention_impl="xla")
    logits = model(input_ids)          # int32 [B, T] -> float32 [B, T, vocab]
"""
from dsv32_jax.config import ConfigError, ModelConfig, load_config
from dsv32_jax.loading import Model, load
from dsv32_jax.model import RuntimeOptions, Transformer

__all__ = ["ConfigError", "Model", "ModelConfig", "RuntimeOptions", "Transformer", "load", "load_config"]
