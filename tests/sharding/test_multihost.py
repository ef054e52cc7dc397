"""Multi-host: two processes (4 host CPU devices each) join through jax.distributed, build one
8-device mesh (data=2, expert=4; expert-parallel all_to_all across the processes, CPU
collectives over gloo) and give what one process gives: logits, and greedy generation of a
ragged batch split across the processes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import dsv32_jax
from dsv32_jax.generate.engine import Engine
from dsv32_jax.generate.sampling import SamplingParams
from multihost_cases import GEN_TOKENS, generation_prompts, logits_ids, run_serving

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(argv_of, extra_env, timeout=420):
    """Start argv_of(pid) in two processes of one distributed runtime (environment plus
    extra_env); returns their outputs."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, **extra_env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen(argv_of(pid), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      cwd=str(ROOT)))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out.decode(errors="replace"))
            assert p.returncode == 0, outs[-1][-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.fixture(scope="module")
def worker_out(tiny_hf, tmp_path_factory, compile_cache_env):
    """One two-process launch of multihost_worker.py that loads the model once and writes the
    logits, generation and serving results the tests below compare (one process start and
    one distributed set-up instead of three)."""
    _, path = tiny_hf
    out = tmp_path_factory.mktemp("multihost")
    run_two_processes(lambda pid: [sys.executable, str(HERE / "multihost_worker.py"), "logits,generate,serve",
                                   str(path), str(out)], compile_cache_env)
    return out


@pytest.fixture(scope="module")
def generation_ref(tiny_hf):
    """The single-process greedy generation of generation_prompts() (token ids per prompt)."""
    _, path = tiny_hf
    one = Engine(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact"), prefill_chunk=16, block=4)
    return [c.token_ids for c in one.generate(generation_prompts(), max_new_tokens=GEN_TOKENS,
                                              sampling=SamplingParams(temperature=0.0))]


def test_two_processes_logits_equal_one(tiny_hf, worker_out):
    _, path = tiny_hf
    ref = np.asarray(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact")(logits_ids()))
    got = np.load(worker_out / "logits.npy")
    # float32; only the order of sharded sums differs (same tolerance as the single-host meshes)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_two_processes_generation_equals_one(worker_out, generation_ref):
    """8 ragged prompts split over data=2 x expert=4 across two processes: token for token the
    single-process greedy generation (reads of tokens / done flags are replicated, so both
    processes run the same decode loop)."""
    got = json.loads((worker_out / "gen.json").read_text())
    assert got == generation_ref


def test_two_processes_serving_engine_equals_one(tiny_hf, worker_out):
    """The slot engine across two processes (process 0 schedules and broadcasts each
    iteration's plan; slots split over data=2 x expert=4): the mixed requests give the
    single-process tokens, and the prefix cache serves the shared prefix there too."""
    _, path = tiny_hf
    _, ref = run_serving(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact"))
    got = json.loads((worker_out / "serve.json").read_text())
    assert got[:-1] == [r.tokens for r in ref]
    assert got[-1] == ref[-1].cached_tokens == 128


def test_two_processes_generate_cli_equals_one(tiny_hf, tmp_path, generation_ref, compile_cache_env):
    """`python -m dsv32_jax.generate --prompts FILE --mesh data=2,expert=4` started on two
    processes: process 0 prints one JSON line per prompt, the single-process engine's tokens."""
    _, path = tiny_hf
    prompts = generation_prompts()
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    argv = [sys.executable, "-m", "dsv32_jax.generate", "--ckpt", str(path), "--prompts", str(batch), "--json",
            "--mesh", "data=2,expert=4", "--dtype", "float32", "--numerics", "exact", "--temperature", "0",
            "--max-new-tokens", str(GEN_TOKENS), "--prefill-chunk", "16"]
    outs = run_two_processes(lambda pid: argv, compile_cache_env)
    rows = [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]
    assert [r["token_ids"] for r in rows] == generation_ref
    assert not any(line.startswith("{") for line in outs[1].splitlines())      # process 1 prints nothing


def test_two_processes_finetune_cli_equals_one(tmp_path, compile_cache_env):
    """`python -m dsv32_jax.finetune ... --mesh data=2,expert=4` on two processes (each batch
    split across them): the logged losses and the exported adapters equal a one-process run of
    the same command (float32; only the order of sharded sums differs)."""
    from oracle import make_hf_model
    from safetensors.numpy import load_file

    from dsv32_jax.finetune.__main__ import run
    from dsv32_jax.generate.tokenizer import demo_tokenizer_dir

    _, ckpt = make_hf_model(tmp_path / "ckpt", vocab_size=129280, num_hidden_layers=2)
    demo_tokenizer_dir(ckpt)
    convs = [[{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": f"{w} {w}."}]
             for w in ("hi", "yes", "blue", "four", "cold", "Paris", "seven", "tea")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    common = ["--ckpt", str(ckpt), "--data", str(data), "--steps", "3", "--batch", "8", "--seq-len", "32",
              "--dtype", "float32", "--lr", "1e-3", "--warmup", "1", "--no-merge", "--quiet"]
    run(common + ["--out", str(tmp_path / "one")])
    argv = [sys.executable, "-m", "dsv32_jax.finetune"] + common + ["--out", str(tmp_path / "two"),
                                                                    "--mesh", "data=2,expert=4"]
    run_two_processes(lambda pid: argv, compile_cache_env)

    def losses(run_dir):
        rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3                  # process 1 wrote no second copy of the rows
    np.testing.assert_allclose(two, one, rtol=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # AdamW normalises each gradient: 1e-7-relative differences of tiny gradients move the
        # update by up to ~lr x 1e-3; the factors are O(0.1)
        np.testing.assert_allclose(b[k], a[k], atol=2e-5)
