"""Pallas kernels for DeepSeek Sparse Attention.

Each op lives in its own package with the same layout:
  api.py        the public function, `impl="auto"|"pallas"|"interpret"|"reference"`
  reference.py  the plain-jnp twin every kernel is tested against
  tpu.py        the Mosaic TPU kernel(s)
  gpu.py        the GPU Pallas (Triton) kernel(s)

This package knows nothing of the model: inputs are plain arrays.
"""
