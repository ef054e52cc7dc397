"""`python -m convert weights`: release-layout FP8 checkpoints -> converted orbax checkpoints.

Tiny checkpoints in the exact release layout (tests/release_fixture.py: e4m3 weights with
block scales incl. partial tiles, bf16 norms/embeddings, fp32 router bias / weights_proj /
k_norm, 3 shards + index, an MTP layer) are converted in both dtypes and loaded with
`dsv32_jax.load`; logits must match transformers run on the very weights the converted
checkpoint holds (the dequantised FP8 values, rounded to bf16 for --dtype bfloat16), and the
parameters must equal, bit for bit, what the direct Hugging Face loader builds.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

import dsv32_jax
from convert import ConvertError
from convert.__main__ import main
from convert.writer import convert_weights
from dsv32_jax.converted import MANIFEST_NAME, PARAMS_DIR, read_manifest, restore_state
from dsv32_jax.safetensors_io import CheckpointError, SafetensorsFile
from oracle import make_hf_model
from release_fixture import _kind, load_into_torch, write_release_checkpoint
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
REL_TOL = 1e-4                       # max |diff| / max |logit|, as in the model tests
IDS = np.random.RandomState(0).randint(0, 256, (2, 24)).astype(np.int32)
SHARD2 = "model-00002-of-00003.safetensors"


def _oracle_logits(hf, deq, layers, round_fp8_to_bf16):
    """transformers on the dequantised weights (optionally rounded to bf16 like the converter)."""
    w = {}
    for k, v in deq.items():
        if k.startswith(f"model.layers.{layers}."):
            continue                                        # the MTP layer is not part of the HF model
        w[k] = v.astype(ml_dtypes.bfloat16).astype(np.float32) if round_fp8_to_bf16 and _kind(k) == "fp8" else v
    load_into_torch(hf, w)
    with torch.no_grad():
        return hf(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _assert_close(ours, ref):
    err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"max |diff| / max |logit| = {err:.3g}"


def _leaves(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for p in a:
        x, y = a[p], b[p]
        assert x.dtype == y.dtype and x.shape == y.shape, (p, x.dtype, y.dtype, x.shape, y.shape)
        assert np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8)), p


def _restore_items(out: Path) -> dict:
    """Every array of a converted directory, as numpy, keyed by (item, key)."""
    import orbax.checkpoint as ocp

    man = read_manifest(out)
    ck = ocp.StandardCheckpointer()
    res = {}
    for item in man["items"]:
        tree = ck.restore(out / PARAMS_DIR / item)
        for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
            res[(item, "/".join(k.key for k in kp))] = np.asarray(v)
    ck.close()
    return res


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny model, its release-layout checkpoint (32x32 blocks) and both oracle logits."""
    d = tmp_path_factory.mktemp("release")
    hf, _ = make_hf_model(d / "hf", seed=3)
    deq = write_release_checkpoint(hf, d / "rel", block=(32, 32), num_shards=3, mtp=True)
    (d / "rel" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (d / "rel" / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (d / "rel" / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    n = hf.config.num_hidden_layers
    ref = {"float8": _oracle_logits(hf, deq, n, False), "bfloat16": _oracle_logits(hf, deq, n, True)}
    return {"dir": d, "rel": d / "rel", "ref": ref, "layers": n}


@pytest.fixture(scope="module")
def converted(release):
    """Uninterrupted conversions: bfloat16 (no MTP) and float8 (--keep-mtp)."""
    d = release["dir"]
    convert_weights(release["rel"], d / "out_bf16", "bfloat16", progress=False)
    convert_weights(release["rel"], d / "out_f8", "float8", keep_mtp=True, progress=False)
    return {"bfloat16": d / "out_bf16", "float8": d / "out_f8"}


# ------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_logits_equal_transformers(release, converted, dtype):
    out = converted[dtype]
    man = read_manifest(out)
    assert man["complete"] and man["dtype"] == dtype
    model = dsv32_jax.load(out, dtype=jnp.float32, numerics="exact")
    assert model.options.fp8_weights == (dtype == "float8")       # float8 implies fp8_weights
    _assert_close(model(IDS), release["ref"][dtype])
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / f).read_bytes() == (release["rel"] / f).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert ("quantization_config" in cfg) == (dtype == "float8")


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_params_bit_equal_direct_load(release, converted, dtype):
    """Stacked experts, transposes, dequantisation: identical to the Hugging Face loader's values."""
    direct = dsv32_jax.load(release["rel"], dtype=jnp.bfloat16, fp8_weights=dtype == "float8")
    ours = dsv32_jax.load(converted[dtype], dtype=jnp.bfloat16)
    _assert_same_params(_leaves(ours.module), _leaves(direct.module))


def test_mtp_kept_or_dropped(release, converted):
    assert sorted(os.listdir(converted["bfloat16"] / PARAMS_DIR)) == ["globals", "layer_000", "layer_001", "layer_002"]
    with pytest.raises(CheckpointError, match="--keep-mtp"):
        dsv32_jax.load(converted["bfloat16"], dtype=jnp.float32, mtp=True)
    with pytest.raises(CheckpointError, match="float8"):
        dsv32_jax.load(converted["bfloat16"], dtype=jnp.float32, fp8_weights=True)
    ours = _leaves(dsv32_jax.load(converted["float8"], dtype=jnp.float32, mtp=True).module)
    direct = _leaves(dsv32_jax.load(release["rel"], dtype=jnp.float32, mtp=True, fp8_weights=True).module)
    assert any(p[0] == "mtp" for p in ours)
    _assert_same_params(ours, direct)


def test_block_128_partial_tiles_and_progress(tmp_path, capsys):
    """(128, 128) blocks: every tiny weight is one partial tile. Progress bars go to stderr."""
    hf, _ = make_hf_model(tmp_path / "hf", seed=4)
    deq = write_release_checkpoint(hf, tmp_path / "rel", block=(128, 128), num_shards=2, mtp=True)
    ref = _oracle_logits(hf, deq, hf.config.num_hidden_layers, True)
    summary = convert_weights(tmp_path / "rel", tmp_path / "out", "bfloat16", progress=True)
    err = capsys.readouterr().err
    assert "convert" in err and "B/s" in err and "100%" in err
    assert summary["written"] == 4 and summary["complete"]
    _assert_close(dsv32_jax.load(tmp_path / "out", dtype=jnp.float32, numerics="exact")(IDS), ref)


def test_restore_into_requested_shardings(converted):
    """restore_state puts each array straight into the sharding asked for (8 host devices)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsv32_jax.model import RuntimeOptions

    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    opts = RuntimeOptions(dtype=jnp.float32, numerics="exact", fp8_weights=True)
    _, single = restore_state(converted["float8"], opts)
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(single)}

    def want(p):
        if p[-1] in ("gate", "up", "down"):                # 16 experts over 4 devices
            return NamedSharding(mesh, P(None, "x") if p[0] == "stacks" else P("x"))
        if p == ("lm_head", "kernel"):
            return NamedSharding(mesh, P(None, "x"))
        return NamedSharding(mesh, P())

    shardings = {p: want(p) for p in flat}
    _, state = restore_state(converted["float8"], opts, shardings)
    for p, var in nnx.to_flat_state(state):
        v = var.get_value()
        assert v.sharding == shardings[tuple(p)], p
        assert v.dtype == flat[tuple(p)].dtype
        assert np.array_equal(np.asarray(v).view(np.uint8), np.asarray(flat[tuple(p)]).view(np.uint8)), p


def test_restore_with_a_mesh_uses_the_logical_axis_rules(converted):
    """options.mesh and no explicit shardings: every parameter lands in its rule-table sharding."""
    from dsv32_jax.model import RuntimeOptions
    from dsv32_jax.sharding import make_mesh, param_shardings

    if jax.device_count() != 8:
        pytest.skip("needs 8 devices")
    mesh = make_mesh("expert=4,tensor=2")
    opts = RuntimeOptions(dtype=jnp.bfloat16, mesh=mesh)
    _, state = restore_state(converted["bfloat16"], opts)
    want = dict(nnx.to_flat_state(param_shardings(state, mesh)))
    for p, var in nnx.to_flat_state(state):
        assert var.get_value().sharding == want[p], p
    # each device holds only its own slice: experts / 4 (expert axis), hidden / 2 (tensor axis)
    gate = state["stacks"][1]["block"]["mlp"]["experts"]["gate"].get_value()     # layers 1-2, stacked
    n, e, d, i = gate.shape
    assert {s.device for s in gate.addressable_shards} == set(mesh.devices.flat)
    assert all(s.data.shape == (n, e // 4, d, i // 2) for s in gate.addressable_shards)


def test_rerun_on_complete_output_writes_nothing(converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted["bfloat16"], out)
    before = {p: p.stat().st_mtime_ns for p in (out / PARAMS_DIR).rglob("*")}
    s = convert_weights(Path(converted["bfloat16"]).parent / "rel", out, "bfloat16", progress=False)
    assert s["written"] == 0 and s["skipped"] == 4
    assert before == {p: p.stat().st_mtime_ns for p in (out / PARAMS_DIR).rglob("*")}


# ------------------------------------------------------------------------------ kill + resume
def test_killed_conversion_resumes_to_identical_result(release, converted, tmp_path, capsys):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "convert", "weights", "--hf-dir", str(release["rel"]), "--out", str(out),
           "--dtype", "bfloat16", "--quiet"]
    proc = subprocess.Popen(cmd + ["--_sleep-per-layer", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 150
    try:
        while True:      # layer_000 committed and layer_001 saved but not yet verified/committed
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "converter made no progress"
            try:
                done = json.loads((out / MANIFEST_NAME).read_text())["items"]
            except (FileNotFoundError, json.JSONDecodeError):
                done = {}
            if "layer_000" in done and (out / PARAMS_DIR / "layer_001.partial").is_dir():
                break
            time.sleep(0.05)
        stamps = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / PARAMS_DIR / "layer_000").rglob("*")}
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    man = read_manifest(out)
    assert not man["complete"] and "layer_001" not in man["items"]
    with pytest.raises(CheckpointError, match="incomplete"):
        dsv32_jax.load(out, dtype=jnp.float32)

    capsys.readouterr()
    assert main([a for a in cmd[3:] if a != "--quiet"]) == 0   # the same command (with its summary), in-process
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 3 and summary["skipped"] == 1
    assert stamps == {p: (p.stat().st_mtime_ns, p.stat().st_ino)
                      for p in (out / PARAMS_DIR / "layer_000").rglob("*")}, "layer_000 was rewritten"
    assert sorted(os.listdir(out / PARAMS_DIR)) == ["globals", "layer_000", "layer_001", "layer_002"]
    assert read_manifest(out)["items"] == read_manifest(converted["bfloat16"])["items"]
    ours, ref = _restore_items(out), _restore_items(converted["bfloat16"])
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and np.array_equal(ours[k].view(np.uint8), ref[k].view(np.uint8)), k


# ------------------------------------------------------------------------------ validation errors
def _copy_release(release, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(release["rel"], src)
    return src


def _index(src):
    return json.loads((src / "model.safetensors.index.json").read_text())


def _write_index(src, idx):
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))


def _rewrite_shard(path: Path, fn):
    """Rewrite a shard with fn({name: array}) -> {name: array}."""
    f = SafetensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    save_file(fn(tensors), str(path), metadata={"format": "pt"})


def _shard_of(src, name):
    return src / _index(src)["weight_map"][name]


def _fails(src, out, capsys, *needles, extra=()):
    capsys.readouterr()
    rc = main(["weights", "--hf-dir", str(src), "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, f"{n!r} not in: {err}"
    return err


def test_missing_shard(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    (src / SHARD2).unlink()
    first = sorted(k for k, v in _index(src)["weight_map"].items() if v == SHARD2)[0]
    _fails(src, tmp_path / "out", capsys, SHARD2, "missing", repr(first))
    assert not (tmp_path / "out").exists()                  # nothing written before validation passes


def test_tensor_listed_but_absent(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = _shard_of(src, name)
    _rewrite_shard(shard, lambda t: {k: v for k, v in t.items() if k != name})
    _fails(src, tmp_path / "out", capsys, shard.name, repr(name), "listed in the index but absent")


def test_unexpected_tensor(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    name = "model.layers.0.self_attn.extra_proj.weight"
    shard = src / SHARD2
    _rewrite_shard(shard, lambda t: {**t, name: np.zeros((4, 4), np.float32)})
    idx = _index(src)
    idx["weight_map"][name] = SHARD2
    _write_index(src, idx)
    _fails(src, tmp_path / "out", capsys, SHARD2, repr(name), "unexpected tensor")


def test_wrong_shape(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    name = "model.layers.1.post_attention_layernorm.weight"
    shard = _shard_of(src, name)
    _rewrite_shard(shard, lambda t: {**t, name: t[name][:63].copy()})
    _fails(src, tmp_path / "out", capsys, shard.name, repr(name), "[63]", "[64]")


def test_wrong_dtype(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    name = "model.layers.0.self_attn.q_a_proj.weight"       # FP8 in the release
    shard = _shard_of(src, name)
    _rewrite_shard(shard, lambda t: {**t, name: t[name].astype(ml_dtypes.bfloat16)})
    _fails(src, tmp_path / "out", capsys, shard.name, repr(name), "BF16", "F8_E4M3")


def test_scale_shape_mismatch(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    weight = "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"   # [48, 64]: a partial 32-row tile
    scale = weight + "_scale_inv"
    shard = _shard_of(src, scale)
    _rewrite_shard(shard, lambda t: {**t, scale: t[scale][:1].copy()})   # the partial tile's row dropped
    _fails(src, tmp_path / "out", capsys, shard.name, repr(scale), repr(weight), "[1, 2]", "[2, 2]")


def test_truncated_shard(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    shard = src / SHARD2
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    err = _fails(src, tmp_path / "out", capsys, SHARD2, "truncated")
    assert "tensor '" in err


def test_corrupt_shard_header(release, tmp_path, capsys):
    src = _copy_release(release, tmp_path)
    shard = src / SHARD2
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\x00\xff garbage \x00\xff"
    shard.write_bytes(bytes(data))
    first = sorted(k for k, v in _index(src)["weight_map"].items() if v == SHARD2)[0]
    _fails(src, tmp_path / "out", capsys, SHARD2, "corrupt", repr(first))


def test_corrupt_tensor_data(release, tmp_path, capsys):
    """A shard of the right size whose FP8 bytes were overwritten with NaN encodings."""
    src = _copy_release(release, tmp_path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = _shard_of(src, name)
    f = SafetensorsFile(shard)
    start = f.data_start + f.entries[name]["data_offsets"][0]
    with open(shard, "r+b") as fh:
        fh.seek(start + 10)
        fh.write(b"\x7f" * 4)
    _fails(src, tmp_path / "out", capsys, shard.name, repr(name), "NaN")


def test_output_holds_a_different_model(release, converted, tmp_path, capsys):
    other = tmp_path / "other"
    hf, _ = make_hf_model(other / "hf", seed=11)
    write_release_checkpoint(hf, other / "rel", block=(32, 32), num_shards=3, mtp=True)
    out = tmp_path / "out"
    shutil.copytree(converted["bfloat16"], out)
    _fails(other / "rel", out, capsys, str(out), "different model")
    # same model, other options
    _fails(release["rel"], out, capsys, str(out), "--dtype bfloat16", extra=("--dtype", "float8"))
    # a non-empty directory that is not a conversion
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(b"x")
    _fails(release["rel"], junk, capsys, str(junk), "not empty")


# ------------------------------------------------------------------------------ CLI
def test_cli_help_explains_every_option(capsys):
    assert main(["weights", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--hf-dir", "--out", "--dtype", "bfloat16", "float8", "--keep-mtp", "--quiet", "--workers",
                "resume", "weight_scale_inv", "--verify-source", "exit status", "130"):
        assert opt in out, opt
    assert "_sleep" not in out


def test_cli_error_exit_status_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "convert", "weights", "--hf-dir", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in p.stderr
    assert str(tmp_path / "nope") in p.stderr


def test_convert_error_is_a_checkpoint_error():
    assert issubclass(ConvertError, CheckpointError)


# ------------------------------------------------------------------------------ source identity, paths, disk
def _overwrite(shard: Path, name: str, data: bytes, keep_mtime: bool = False):
    """Overwrite the first bytes of tensor `name` in place (same names, shapes, dtypes, config)."""
    f = SafetensorsFile(shard)
    start = f.data_start + f.entries[name]["data_offsets"][0]
    assert start - f.data_start > 65536, "the change must lie beyond the fingerprint's 64 KiB sample"
    st = shard.stat()
    with open(shard, "r+b") as fh:
        fh.seek(start)
        fh.write(data)
    if keep_mtime:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def _assert_same_items(a: Path, b: Path):
    ours, ref = _restore_items(a), _restore_items(b)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(ours[k].view(np.uint8), ref[k].view(np.uint8)), k


def test_changed_source_is_converted_again_never_kept(release, converted, tmp_path):
    """Tensor values changed under the same names/shapes/config: the layers made from them are
    converted again (finished output and interrupted one alike); an unchanged copy is re-hashed
    (other inodes) and kept without writing."""
    src = _copy_release(release, tmp_path)
    out = tmp_path / "out"
    shutil.copytree(converted["bfloat16"], out)
    before = {p: p.stat().st_mtime_ns for p in (out / PARAMS_DIR).rglob("*")}
    s = convert_weights(src, out, "bfloat16", progress=False)
    assert s["written"] == 0 and s["source_changed"] == []
    assert before == {p: p.stat().st_mtime_ns for p in (out / PARAMS_DIR).rglob("*")}

    name = "model.layers.1.mlp.shared_experts.up_proj.weight"       # FP8, late in its shard
    _overwrite(_shard_of(src, name), name, b"\x38" * 256)          # e4m3 1.0
    s = convert_weights(src, out, "bfloat16", progress=False)
    assert s["source_changed"] == ["layer_001"] and s["written"] == 1
    convert_weights(src, tmp_path / "fresh", "bfloat16", progress=False)
    _assert_same_items(out, tmp_path / "fresh")
    old = _restore_items(converted["bfloat16"])
    assert not np.array_equal(old[("layer_001", "mlp/shared/up/kernel")],
                              _restore_items(out)[("layer_001", "mlp/shared/up/kernel")])

    # an interrupted conversion (globals not yet written) resumed from a changed source
    man = json.loads((out / MANIFEST_NAME).read_text())
    del man["items"]["globals"]
    man["complete"] = False
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    _overwrite(_shard_of(src, name), name, b"\x40" * 256)          # e4m3 2.0
    s = convert_weights(src, out, "bfloat16", progress=False)
    assert s["source_changed"] == ["layer_001"] and s["written"] == 2
    shutil.rmtree(tmp_path / "fresh")
    convert_weights(src, tmp_path / "fresh", "bfloat16", progress=False)
    _assert_same_items(out, tmp_path / "fresh")

    # an in-place rewrite that keeps size, inode and mtime is what the cheap check cannot see;
    # --verify-source re-hashes every finished layer's source
    _overwrite(_shard_of(src, name), name, b"\x30" * 256, keep_mtime=True)
    assert convert_weights(src, out, "bfloat16", progress=False)["written"] == 0
    s = convert_weights(src, out, "bfloat16", progress=False, verify_source=True)
    assert s["source_changed"] == ["layer_001"] and s["written"] == 1


def test_relative_paths(release, tmp_path, monkeypatch, capsys):
    """--hf-dir / --out relative to the working directory, then dsv32_jax.load of a relative path."""
    shutil.copytree(release["rel"], tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    assert main(["weights", "--hf-dir", "rel", "--out", "conv", "--dtype", "float8", "--quiet"]) == 0, \
        capsys.readouterr().err
    assert read_manifest(tmp_path / "conv")["complete"]
    model = dsv32_jax.load("conv", dtype=jnp.float32, numerics="exact")
    _assert_close(model(IDS), release["ref"]["float8"])


def test_float8_conversion_loads_dequantised_when_asked(release, converted):
    """fp8_weights=False on a float8 conversion gives a model with dequantised kernels (what
    LoRA merging needs); None (the default) keeps them as stored."""
    f8 = dsv32_jax.load(converted["float8"], dtype=jnp.float32, numerics="exact")
    plain = dsv32_jax.load(converted["float8"], dtype=jnp.float32, numerics="exact", fp8_weights=False)
    assert f8.options.fp8_weights and not plain.options.fp8_weights
    leaves = _leaves(plain.module)
    assert not any(str(p[-1]).endswith("_scale") for p in leaves)
    assert all(v.dtype != np.dtype(ml_dtypes.float8_e4m3fn) for v in leaves.values())
    # the same weight values as the FP8 forward dequantises: the oracle on the dequantised weights
    _assert_close(plain(IDS), release["ref"]["float8"])
    np.testing.assert_allclose(np.asarray(plain(IDS)), np.asarray(f8(IDS)), rtol=0, atol=1e-4 * np.abs(
        release["ref"]["float8"]).max())


def test_disk_full_is_reported_and_resumable(release, converted, tmp_path, monkeypatch, capsys):
    import errno

    import convert.writer as writer

    out = tmp_path / "out"
    # less free space than the layers still to write: refused before any layer is written
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 2**40 - 4096, 4096))
    _fails(release["rel"], out, capsys, str(out), "not enough free space", "run the same command again")
    monkeypatch.undo()
    # the disk fills up while layer_001 is written (orbax wraps the OSError): finished layers kept
    real = writer._build_and_save

    def fill_up(ck, tmp, plan, item, *a):
        if item.name == "layer_001":
            try:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
            except OSError as e:
                raise RuntimeError("tensorstore write failed") from e
        return real(ck, tmp, plan, item, *a)

    monkeypatch.setattr(writer, "_build_and_save", fill_up)
    _fails(release["rel"], out, capsys, "no space left on device", "'layer_001'", "1 of 4 items are finished",
           "run the same command again to resume")
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["weights", "--hf-dir", str(release["rel"]), "--out", str(out)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["written"] == 3 and s["skipped"] == 1
    _assert_same_items(out, converted["bfloat16"])
