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
from dsv32_jax.finetune.__main__ import run
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
def ckpt(tmp_path_factory):
    from oracle import make_hf_model

    _, path = make_hf_model(tmp_path_factory.mktemp("cli_model"), vocab_size=VOCAB, num_hidden_layers=2)
    demo_tokenizer_dir(path)
    return path


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
            "--lr", "1e-2", "--steps", "6", "--warmup", "1", "--batch", "2", "--seq-len", "24",
            "--dropout", "0.1", "--targets", "attn,shared", "--dtype", "float32", "--save-every", "2",
            "--eval-every", "3", "--quiet", *extra]


def test_cli_resume_is_exact_and_exports_load(ckpt, data_file, tmp_path):
    full = run(_args(ckpt, data_file, tmp_path / "a", "--eval-data", str(data_file)))
    assert full["step"] == 6 and full["data_position"] == 12
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert len(steps) == 6 and [r["step"] for r in evals] == [3, 6]
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
    assert resumed["step"] == 6 and resumed["data_position"] == 12
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    # per layer 5 MLA + 2 indexer (wq_b, wk) adapters, + 3 shared-expert projections
    assert sorted(a) == sorted(b) and len(a) == 2 * (7 * 2 + 3)
    assert any("indexer.wq_b.lora_B" in k and np.abs(v).max() > 0 for k, v in a.items())
    for k in a:
        # same compiled step on the same restored values and data: bit-identical
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert max(np.abs(v).max() for k, v in a.items() if "lora_B" in k) > 0

    # a changed hyper-parameter is refused instead of silently mixing runs
    with pytest.raises(SystemExit):
        run(_args(ckpt, data_file, tmp_path / "b", "--no-merge", "--rank", "8"))

    # merged export: a checkpoint dsv32_jax.load reads, with the adapter model's logits
    merged_dir = tmp_path / "a" / "merged"
    assert (merged_dir / "tokenizer.json").is_file()
    ids = jnp.asarray(encode_conversation(CONVS[0], load_tokenizer(ckpt))[0][None, :32])
    merged = dsv32_jax.load(merged_dir, dtype=jnp.float32, numerics="exact")
    adapted = dsv32_jax.load(ckpt, dtype=jnp.float32, numerics="exact").module
    load_peft(adapted, tmp_path / "a" / "adapter")
    gd, st = nnx.split(adapted)
    ref = jax.jit(lambda s, x: nnx.merge(gd, s)(x))(st, ids)
    # float32, only the summation order differs (see test_lora.py)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_cli_help_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "dsv32_jax.finetune", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--eval-data" in res.stdout and "--seq-len" in res.stdout


def test_cli_sigkill_mid_run_then_rerun_gives_identical_adapters(ckpt, data_file, tmp_path):
    """A real process killed with SIGKILL after a few steps (possibly mid-checkpoint), then the
    same command again, ends with the adapters of an uninterrupted run, bit for bit."""
    import os
    import signal
    import time

    args = _args(ckpt, data_file, tmp_path / "killed", "--no-merge", "--steps", "8", "--save-every", "1")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_jax.finetune", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and sum('"loss"' in line for line in log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "killed" / "adapter").exists()
    done = subprocess.run([sys.executable, "-m", "dsv32_jax.finetune", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    full = run(_args(ckpt, data_file, tmp_path / "full", "--no-merge", "--steps", "8", "--save-every", "1"))
    assert full["step"] == 8
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_recall_command(ckpt, data_file):
    from dsv32_jax.finetune.recall import run as recall_run

    res = recall_run(["--ckpt", str(ckpt), "--data", str(data_file), "--seq-len", "32", "--batch", "2",
                      "--dtype", "float32"])
    assert res["eval_loss"] > 0 and len(res["indexer_recall_per_layer"]) == 2
    assert 0 < res["indexer_recall"] <= res["attention_ceiling"] + 1e-6 <= 1 + 1e-6
    with pytest.raises(SystemExit, match="error: --data"):
        recall_run(["--ckpt", str(ckpt), "--data", str(data_file) + ".missing"])
