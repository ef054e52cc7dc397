"""Text generation: chat encoding, tokenizer, sampling and the generation loop."""
from dsv32_jax.generate.engine import Completion, DecodeState, Engine
from dsv32_jax.generate.sampling import SamplingParams, sample, sampling_defaults

__all__ = ["Completion", "DecodeState", "Engine", "SamplingParams", "sample", "sampling_defaults"]
