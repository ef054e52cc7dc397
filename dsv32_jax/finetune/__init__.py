"""LoRA fine-tuning of dsv32_jax models (`python -m dsv32_jax.finetune --help`).

    from dsv32_jax.finetune import LoRAConfig, apply_lora, Trainer, TrainHParams
    model = dsv32_jax.load(ckpt, dtype=jnp.bfloat16).module
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=("attn", "shared")))
    trainer = Trainer(model, TrainHParams(lr=1e-4, steps=1000))
    metrics = trainer.train_step(batch)         # batch: finetune.data.Batch
"""
from dsv32_jax.finetune.data import Batch, ChatDataset, encode_conversation
from dsv32_jax.finetune.lora import (
    LoRAConfig,
    LoRAExperts,
    LoRALinear,
    LoRAWeight,
    apply_lora,
    load_peft,
    merged_module,
    save_peft,
    transfer_adapters,
)
from dsv32_jax.finetune.train import Checkpointer, TrainHParams, Trainer

__all__ = ["Batch", "ChatDataset", "Checkpointer", "LoRAConfig", "LoRAExperts", "LoRALinear", "LoRAWeight",
           "TrainHParams", "Trainer", "apply_lora", "encode_conversation", "load_peft", "merged_module",
           "save_peft", "transfer_adapters"]
