"""Chat data pipeline (real DeepSeek-V3.2 tokenizer) and the fine-tuning CLI end to end.

The CLI model is a tiny oracle model (2 layers: dense + MoE) with the tokenizer's vocabulary
size, so the real chat template and tokenizer can be used; float32, numerics "exact".
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import dsv32_jax
from dsv32_jax.cli import CliError
from dsv32_jax.finetune.__main__ import build_parser, prepare, run
from dsv32_jax.finetune.data import ChatDataset, build_rows, encode_conversation, message_pieces
from dsv32_jax.finetune.lora import load_peft
from dsv32_jax.generate.chat import encode_messages
from dsv32_jax.generate.tokenizer import demo_tokenizer_dir, load_tokenizer

VOCAB = 129280

CONVS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy geography."},
     {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome.", "reasoning_content": "Also easy."}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "one two three"}],
    [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue, mostly."}],
    [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Opposite of hot"}, {"role": "assistant", "content": "cold"}],
]



@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """(torch model, checkpoint dir with the tokenizer) of the CLI's tiny oracle model."""
    from oracle import make_hf_model

    hf, path = make_hf_model(tmp_path_factory.mktemp("cli_model"), vocab_size=VOCAB, num_hidden_layers=2)
    demo_tokenizer_dir(path)
    return hf, path


@pytest.fixture(scope="module")
def ckpt(hf_ckpt):
    return hf_ckpt[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS) + "\n")
    return p


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_loss_mask_covers_exactly_the_assistant_replies(tok, mode):
    conv = CONVS[0]
    ids, mask = encode_conversation(conv, tok, mode)
    # piecewise tokenisation equals tokenising the whole rendered conversation
    assert ids.tolist() == tok.encode(encode_messages(conv, thinking_mode=mode))
    masked = tok.decode([int(i) for i, m in zip(ids, mask) if m])
    eos = tok.eos_token
    if mode == "chat":
        assert masked == f"Paris.{eos}Rome.{eos}"
    else:   # the last turn's reasoning is rendered (and trained); earlier reasoning is dropped
        assert masked == f"Paris.{eos}Also easy.</think>Rome.{eos}"
    unmasked = tok.decode([int(i) for i, m in zip(ids, mask) if not m])
    assert "Capital of France?" in unmasked and "<｜Assistant｜>" in unmasked
    assert [r for r, _ in message_pieces(conv, mode)] == [m["role"] for m in conv]


def test_rows_and_deterministic_positions(tok, data_file):
    ex = [encode_conversation(c, tok) for c in CONVS]
    tok_p, m_p = build_rows(ex, 16, "pack", tok.eos_id)
    n = sum(len(e[0]) for e in ex)
    assert tok_p.shape == (-(-n // 17), 17) and m_p.sum() == sum(e[1].sum() for e in ex)
    tok_d, m_d = build_rows(ex, 16, "pad", tok.eos_id)
    assert tok_d.shape == (len(CONVS), 17) and tok_d[1, len(ex[1][0]):].tolist() == \
        [tok.eos_id] * (17 - len(ex[1][0]))
    ds = ChatDataset.from_jsonl(data_file, tok, seq_len=16, seed=3)
    b1, b2 = ds.batch(5, 4), ds.batch(5, 4)
    assert np.array_equal(b1.inputs, b2.inputs) and np.array_equal(b1.weights, b2.weights)
    assert np.array_equal(b1.inputs[:, 1:], b1.targets[:, :-1])
    rows = {tuple(ds.batch(p, 1).inputs[0]) for p in range(len(ds))}
    assert len(rows) == len(ds)     # one epoch visits every row once


def _args(ckpt, data, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--rank", "4", "--alpha", "8",
            "--lr", "1e-2", "--steps", "8", "--warmup", "1", "--batch", "2", "--seq-len", "24",
            "--dropout", "0.1", "--targets", "attn,shared", "--dtype", "float32", "--save-every", "2",
            "--eval-every", "3", "--quiet", *extra]


@pytest.fixture(scope="module")
def full_run(ckpt, data_file, tmp_path_factory, shared_compile_cache):
    """An uninterrupted 8-step run (eval, merged export), in a directory where two starts failed
    first (bad data, then a mistyped flag): a failed start leaves the directory usable. Its
    executables go to the module's compilation cache, which the later runs load from."""
    d = tmp_path_factory.mktemp("full_run")
    out = d / "a"
    bad = d / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVS[1]}) + "\n{oops\n")
    with pytest.raises(CliError, match=r"bad\.jsonl:2"):
        run(_args(ckpt, bad, out, "--eval-data", str(data_file)))
    with pytest.raises(SystemExit):
        run(_args(ckpt, data_file, out, "--eval-data", str(data_file), "--dtype", "bf16"))
    assert not out.exists()
    return out, run(_args(ckpt, data_file, out, "--eval-data", str(data_file)))


def test_cli_resume_is_exact_and_exports_load(ckpt, data_file, full_run, tmp_path):
    a_dir, full = full_run
    assert full["step"] == 8 and full["data_position"] == 16
    log = [json.loads(line) for line in (a_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert len(steps) == 8 and [r["step"] for r in evals] == [3, 6, 8]
    assert all(r["tokens_per_s"] > 0 and r["moe_max_load"] >= 1.0 and "moe_cv" in r for r in steps)
    # attention adapters switch the indexer alignment on by default: its KL and recall are logged
    assert all(r["indexer_kl"] > 0 for r in steps)
    live = [r for r in steps if r["indexer_recall"] is not None]    # rows with > index_topk keys
    assert live and all(0 < r["indexer_recall"] <= r["attention_ceiling"] + 1e-6
                        and len(r["indexer_recall_per_layer"]) == 2 for r in live)
    assert all(0 < r["eval_indexer_recall"] <= 1 for r in evals)

    # interrupted after 3 steps (last checkpoint at step 2), then the same command again
    stopped = run(_args(ckpt, data_file, tmp_path / "b", "--no-merge"), stop_after=3)
    assert stopped == {"stopped_at": 3}
    assert not (tmp_path / "b" / "adapter").exists()
    resumed = run(_args(ckpt, data_file, tmp_path / "b", "--no-merge"))
    assert resumed["step"] == 8 and resumed["data_position"] == 16
    # step 3 ran before the interruption but was not checkpointed: its row is replaced, not repeated
    assert [json.loads(r)["step"] for r in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == \
        list(range(1, 9))
    assert resumed["loss"] > 0 and resumed["tokens"] > 0
    # rerunning the finished run keeps its summary (metrics included)
    again = run(_args(ckpt, data_file, tmp_path / "b", "--no-merge"))
    assert again == resumed == json.loads((tmp_path / "b" / "summary.json").read_text())
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    # per layer 5 MLA + 2 indexer (wq_b, wk) adapters, + 3 shared-expert projections
    assert sorted(a) == sorted(b) and len(a) == 2 * (7 * 2 + 3)
    assert any("indexer.wq_b.lora_B" in k and np.abs(v).max() > 0 for k, v in a.items())
    for k in a:
        # same compiled step on the same restored values and data: bit-identical
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert max(np.abs(v).max() for k, v in a.items() if "lora_B" in k) > 0

    # a changed hyper-parameter is refused instead of silently mixing runs
    with pytest.raises(CliError, match="different settings"):
        run(_args(ckpt, data_file, tmp_path / "b", "--no-merge", "--rank", "8"))

    # merged export: a checkpoint dsv32_jax.load reads, with the adapter model's logits
    merged_dir = a_dir / "merged"
    assert (merged_dir / "tokenizer.json").is_file()
    ids = jnp.asarray(encode_conversation(CONVS[0], load_tokenizer(ckpt))[0][None, :32])
    merged = dsv32_jax.load(merged_dir, dtype=jnp.float32, numerics="exact")
    adapted = dsv32_jax.load(ckpt, dtype=jnp.float32, numerics="exact").module
    load_peft(adapted, a_dir / "adapter")
    gd, st = nnx.split(adapted)
    ref = jax.jit(lambda s, x: nnx.merge(gd, s)(x))(st, ids)
    # float32, only the summation order differs (see test_lora.py)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_data_that_trains_little_or_nothing(ckpt, data_file, tmp_path, capsys):
    """Rows without targets are refused (tested in tests/test_cli_errors.py); rows that split
    conversations are reported before the model is loaded."""
    args = build_parser().parse_args(["--ckpt", str(ckpt), "--data", str(data_file), "--out", str(tmp_path / "o"),
                                      "--seq-len", "8", "--mode", "pack", "--batch", "1"])
    st = prepare(args)["train_ds"].stats
    err = capsys.readouterr().err
    assert st.over_length > 0 and st.kept_targets == st.target_tokens > 0
    assert "warning: --data" in err and f"{st.over_length} of {len(CONVS)} conversations are longer" in err
    args = build_parser().parse_args(["--ckpt", str(ckpt), "--data", str(data_file), "--out", str(tmp_path / "o"),
                                      "--seq-len", "12", "--mode", "pad"])
    st = prepare(args)["train_ds"].stats
    assert 0 < st.kept_targets < st.target_tokens
    assert f"{st.target_tokens - st.kept_targets} of {st.target_tokens} assistant tokens" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_help_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "dsv32_jax.finetune", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--eval-data" in res.stdout and "--seq-len" in res.stdout


def _losses(log):
    return [json.loads(r)["step"] for r in log.read_text().splitlines() if '"loss"' in r] if log.exists() else []


def _start_and_signal(cmd, env, log, rows, sig):
    """Start the CLI, wait until `log` holds `rows` training steps, send `sig`; (exit status, stderr)."""
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and len(_losses(log)) < rows:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_cli_ctrl_c_then_kill_then_rerun_gives_identical_adapters(ckpt, data_file, full_run, tmp_path,
                                                                   shared_compile_cache):
    """A real process: Ctrl-C (SIGINT) saves a checkpoint of the last finished step and exits 130
    (no checkpoint would exist otherwise: --save-every is beyond --steps); the rerun is killed
    with SIGKILL mid-run; the third run finishes. The adapters equal those of an uninterrupted
    run bit for bit, and the log holds every step once. The three starts share the module's
    persistent compilation cache: they load the executables the in-process runs compiled."""
    import os
    import signal

    from dsv32_jax.finetune.train import Checkpointer

    out = tmp_path / "interrupted"
    args = _args(ckpt, data_file, out, "--no-merge", "--save-every", "100")
    cmd = [sys.executable, "-m", "dsv32_jax.finetune", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **shared_compile_cache)
    log = out / "log.jsonl"

    rc, err = _start_and_signal(cmd, env, log, 2, signal.SIGINT)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err
    step = len(_losses(log))
    assert 2 <= step < 8 and _losses(log) == list(range(1, step + 1))
    assert f"interrupted: saved a checkpoint of step {step} of 8" in err and "run the same command again" in err
    ck = Checkpointer(out / "checkpoints")
    assert ck.latest_step() == step
    ck.close()

    rc, err = _start_and_signal(cmd, env, log, step + 2, signal.SIGKILL)
    assert rc == -signal.SIGKILL and f"resuming from step {step}" in err
    assert not (out / "adapter").exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from step {step}" in done.stderr
    assert _losses(log) == list(range(1, 9))           # rows of the killed run's lost steps were dropped
    # the uninterrupted run: same settings but eval, save interval and export, none of which
    # changes the adapters
    a_dir, full = full_run
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert full["step"] == summary["step"] == 8 and summary["loss"] == full["loss"]
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fp8_conversion_lora_merged_export_with_relative_paths(hf_ckpt, data_file, tmp_path, monkeypatch):
    """A `--dtype float8` conversion fine-tuned with --fp8-weights exports merged/ (adapters folded
    into the dequantised weights) and summary.json; every path relative to the working directory.
    The release checkpoint is written from the module's oracle model (read only)."""
    from release_fixture import write_release_checkpoint

    from convert.writer import convert_weights

    hf, _ = hf_ckpt
    write_release_checkpoint(hf, tmp_path / "rel", block=(32, 32), num_shards=2)
    demo_tokenizer_dir(tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    convert_weights("rel", "conv8", "float8", progress=False)
    summary = run(["--ckpt", "conv8", "--data", str(data_file), "--out", "run", "--rank", "4", "--alpha", "8",
                   "--lr", "1e-2", "--steps", "2", "--batch", "2", "--seq-len", "24", "--dtype", "float32",
                   "--targets", "attn", "--fp8-weights", "--quiet"])
    assert summary["step"] == 2 and summary["tokens"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["ckpt"] == str(tmp_path / "conv8")
    merged = dsv32_jax.load("run/merged", dtype=jnp.float32, numerics="exact")
    adapted = dsv32_jax.load("conv8", dtype=jnp.float32, numerics="exact", fp8_weights=False).module
    load_peft(adapted, "run/adapter")
    ids = jnp.asarray(encode_conversation(CONVS[0], load_tokenizer("conv8"))[0][None, :32])
    gd, st = nnx.split(adapted)
    ref = jax.jit(lambda s, x: nnx.merge(gd, s)(x))(st, ids)
    # float32, only the summation order differs (see test_lora.py)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_recall_command(ckpt, data_file):
    from dsv32_jax.finetune.recall import run as recall_run

    res = recall_run(["--ckpt", str(ckpt), "--data", str(data_file), "--seq-len", "32", "--batch", "2",
                      "--dtype", "float32"])
    assert res["eval_loss"] > 0 and len(res["indexer_recall_per_layer"]) == 2
    assert 0 < res["indexer_recall"] <= res["attention_ceiling"] + 1e-6 <= 1 + 1e-6
    with pytest.raises(SystemExit, match="error: --data"):
        recall_run(["--ckpt", str(ckpt), "--data", str(data_file) + ".missing"])
