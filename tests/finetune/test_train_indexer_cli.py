"""The two-stage CLI end to end on a tiny dense MLA checkpoint (the oracle model minus its indexer
tensors, real tokenizer): dense warm-up with an interruption and exact resume, then the sparse stage
from the warm-up's exported checkpoint. float32, numerics "exact", seq-len 24 > index_topk 8."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dsv32_jax
from dsv32_jax.finetune.train_indexer import run
from dsv32_jax.generate.tokenizer import demo_tokenizer_dir

VOCAB = 129280
CONVS = [[{"role": "user", "content": f"Tell me fact number {i} about the sea."},
          {"role": "assistant", "content": "The sea is large and salty; " * (1 + i % 3)}] for i in range(6)]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    from oracle import make_hf_model

    _, path = make_hf_model(tmp_path_factory.mktemp("dsa"), vocab_size=VOCAB, num_hidden_layers=2)
    dense = tmp_path_factory.mktemp("dense")
    for f in path.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dense / f.name)
    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".indexer." not in k}, str(dense / "model.safetensors"),
              metadata={"format": "pt"})
    demo_tokenizer_dir(dense)
    data = dense / "train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS) + "\n")
    return dense, data, tensors


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _args(stage, ckpt, data, out, *extra):
    return ["--stage", stage, "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "3",
            "--batch", "2", "--seq-len", "24", "--lr", "1e-2", "--warmup", "1", "--save-every", "1",
            "--quiet", *extra]


def test_dense_warmup_resume_then_sparse(dense_ckpt, tmp_path):
    ckpt, data, original = dense_ckpt
    full = run(_args("dense-warmup", ckpt, data, tmp_path / "a"))
    assert full["step"] == 3 and full["fresh_indexer_tensors"] == 2 * 5
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["indexer_kl"] < log[0]["indexer_kl"]
    assert all(r["indexer_recall"] is None or r["indexer_recall"] <= r["attention_ceiling"] + 1e-6 for r in log)

    assert run(_args("dense-warmup", ckpt, data, tmp_path / "b"), stop_after=1) == {"stopped_at": 1}
    assert run(_args("dense-warmup", ckpt, data, tmp_path / "b"))["step"] == 3
    a, b = _tensors(tmp_path / "a" / "model"), _tensors(tmp_path / "b" / "model")
    assert sorted(a) == sorted(original)                           # a complete DSA checkpoint
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)       # exact resume
        if ".indexer." not in k:                                   # everything else frozen
            np.testing.assert_array_equal(a[k], original[k], err_msg=k)

    sparse = run(_args("sparse", tmp_path / "a" / "model", data, tmp_path / "s", "--rank", "4"))
    assert sparse["step"] == 3 and sparse["fresh_indexer_tensors"] == 0 and sparse["indexer_kl"] >= 0
    s = _tensors(tmp_path / "s" / "model")
    changed = {k for k in s if not np.array_equal(s[k], a[k])}
    assert any(".indexer." in k for k in changed) and any("q_b_proj" in k for k in changed)
    assert not any("mlp" in k for k in changed)
    model = dsv32_jax.load(tmp_path / "s" / "model", dtype=jnp.float32, numerics="exact")
    assert np.isfinite(np.asarray(model(jnp.arange(40, dtype=jnp.int32)[None] + 100))).all()

    with pytest.raises(SystemExit, match="dense-warmup first"):
        run(_args("sparse", ckpt, data, tmp_path / "bad"))
