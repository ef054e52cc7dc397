"""Helpers shared by the kernel ops."""
from __future__ import annotations

import jax


def platform_backend() -> str | None:
    """"tpu" or "gpu" for the default JAX backend, None elsewhere (CPU)."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return None
