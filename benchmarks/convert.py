"""Throughput and peak memory of `python -m convert weights` on a synthetic FP8 checkpoint; prints JSON.

A checkpoint in the release layout (FP8 e4m3 weights with 128x128 float32 `weight_scale_inv`
blocks, bf16 norms/embeddings, an index file and several shards) is generated on the fly into
a temporary directory, with realistic per-layer sizes: hidden 2048, 64 routed experts of
width 1024 per MoE layer (about 420 MB of FP8 per MoE layer), 8 layers, about 3.2 GB in all
(`--layers`, `--experts` scale it). Every tensor name, shape and dtype comes from
`convert.expected_tensors`, i.e. from the model's parameter tree.

Each conversion (bfloat16, then float8) runs as a child process (`python -m convert weights
--quiet`); its peak resident memory is the VmHWM of that process, which the child reads from
/proc as it exits. The JSON reports, per dtype: wall seconds, MB/s of source read and of
output written, peak RSS, the largest single output item (a layer) and
(peak RSS - fixed overhead) / largest item, where the fixed overhead is the peak RSS of a
child that only imports the converter and plans the same conversion. All temporary files
are deleted.

    python benchmarks/convert.py [--layers 8] [--experts 64] [--tmp DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from dsv32_jax.config import ModelConfig  # noqa: E402

SAFETENSORS_DTYPE = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F32": np.dtype(np.float32),
                     "BF16": np.dtype(ml_dtypes.bfloat16)}


def bench_config(layers: int, experts: int) -> ModelConfig:
    """A DeepSeek-V3.2-shaped config with realistic per-layer proportions, scaled down in width."""
    return ModelConfig(vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
                       num_hidden_layers=layers, num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=experts,
                       n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
                       first_k_dense_replace=1, index_n_heads=16, index_head_dim=128, index_topk=512,
                       num_nextn_predict_layers=0, fp8_block_size=(128, 128))


def _tensor(rng, dname: str, shape) -> np.ndarray:
    n = int(np.prod(shape))
    if dname == "F8_E4M3":
        b = rng.integers(0, 256, size=n, dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] ^= 1                      # no NaN encodings
        return b.view(ml_dtypes.float8_e4m3fn).reshape(shape)
    if dname == "F32":
        return (rng.random(n, dtype=np.float32) * 1e-3 + 1e-4).reshape(shape)
    return (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).reshape(shape)


def write_checkpoint(out: Path, cfg: ModelConfig, shard_bytes: int = 512 * 2**20, seed: int = 0) -> int:
    """Write the synthetic release-layout checkpoint, streaming tensor by tensor; returns its bytes."""
    from convert import expected_tensors

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    exp = expected_tensors(cfg)

    def key(name):                                       # layer order, as in the release shards
        parts = name.split(".")
        return (int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else 10**6, name)

    entries = []
    for name in sorted(exp, key=key):
        e = exp[name]
        dname = {"fp8": "F8_E4M3", "scale": "F32"}.get(e.role, "BF16")
        entries.append((name, dname, e.shape, int(np.prod(e.shape)) * SAFETENSORS_DTYPE[dname].itemsize))
    shards, cur, size = [], [], 0
    for ent in entries:
        if cur and size + ent[3] > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(ent)
        size += ent[3]
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dname, shape, nbytes in shard:
            header[name] = {"dtype": dname, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(hb).to_bytes(8, "little") + hb)
            for name, dname, shape, _ in shard:
                f.write(np.ascontiguousarray(_tensor(rng, dname, shape)).tobytes())
                weight_map[name] = fname
        total += off
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    return total


# Runs a module or code in a child and reports the child's own peak RSS (VmHWM of the process
# after exec; the rusage of a child also counts the parent's memory at fork time).
_WRAP = """
import runpy, sys
args = sys.argv[1:]
code = 0
try:
    if args[0] == "-c":
        sys.argv = ["-c"] + args[2:]
        exec(compile(args[1], "<child>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = args
        runpy.run_module(args[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
sys.stderr.write(f"\\n@@VmHWM_kB={hwm}\\n")
sys.exit(code)
"""


def run_child(args: list[str]) -> tuple[int, float, float, str, str]:
    """(exit status, wall seconds, peak RSS in MB, stdout, stderr) of `python -m MODULE ...` or
    `python -c CODE ...` (args without the interpreter)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _WRAP, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    marks = [line for line in p.stderr.splitlines() if line.startswith("@@VmHWM_kB=")]
    peak = int(marks[-1].split("=")[1]) / 1024 if marks else float("nan")
    return p.returncode, wall, peak, p.stdout, p.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--tmp", default=None, help="parent directory for the temporary files")
    args = ap.parse_args()

    cfg = bench_config(args.layers, args.experts)
    tmp = Path(tempfile.mkdtemp(prefix="dsv32-convert-bench-", dir=args.tmp))
    try:
        t0 = time.time()
        src_bytes = write_checkpoint(tmp / "hf", cfg)
        gen_s = time.time() - t0
        results = {}
        for dtype in ("bfloat16", "float8"):
            plan_code = ("import sys; sys.path.insert(0, '.'); from convert import plan_conversion; "
                         f"p = plan_conversion({str(tmp / 'hf')!r}, {dtype!r}); "
                         "print(max(i.bytes_out for i in p.items), sum(i.bytes_out for i in p.items), p.bytes_in)")
            rc, _, base_rss, stdout, err = run_child(["-c", plan_code])
            if rc != 0:
                raise SystemExit(f"planning failed ({rc}): {err[-2000:]}")
            largest, out_bytes, in_bytes = map(int, stdout.split())
            out = tmp / f"out_{dtype}"
            rc, wall, peak, _, err = run_child(["convert", "weights", "--hf-dir", str(tmp / "hf"), "--out", str(out),
                                                "--dtype", dtype, "--quiet"])
            if rc != 0:
                raise SystemExit(f"conversion failed ({rc}): {err[-2000:]}")
            mb = 1e6
            results[dtype] = {
                "wall_s": round(wall, 2), "source_MB": round(in_bytes / mb, 1), "output_MB": round(out_bytes / mb, 1),
                "read_MB_per_s": round(in_bytes / mb / wall, 1), "write_MB_per_s": round(out_bytes / mb / wall, 1),
                "peak_rss_MB": round(peak, 1), "fixed_overhead_rss_MB": round(base_rss, 1),
                "largest_layer_MB": round(largest / mb, 1),
                "peak_over_largest_layer": round(peak * 2**20 / largest, 2),
                "peak_minus_overhead_over_largest_layer": round((peak - base_rss) * 2**20 / largest, 2)}
            shutil.rmtree(out)
        print(json.dumps({"benchmark": "convert weights", "layers": cfg.num_hidden_layers,
                          "routed_experts": cfg.n_routed_experts, "hidden": cfg.hidden_size,
                          "source_checkpoint_MB": round(src_bytes / 1e6, 1), "generate_s": round(gen_s, 1),
                          "cpus": os.cpu_count(), "results": results}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
