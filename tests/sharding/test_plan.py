"""The memory planner on the 671B release config, against totals computed by hand here."""
import json
import subprocess
import sys
from pathlib import Path

from dsv32_jax.config import load_config
from dsv32_jax.plan import plan

CONFIG = Path(__file__).parents[2] / "configs" / "deepseek-v3.2-exp.json"
GiB = 2**30


def hand_count(c) -> int:
    """Parameters of the main model (no MTP) from the config numbers (spec 1.3)."""
    d, h = c.hidden_size, c.num_attention_heads
    attn = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * (c.qk_nope_head_dim + c.qk_rope_head_dim)
            + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * d)
    indexer = (c.q_lora_rank * c.index_n_heads * c.index_head_dim + d * c.index_head_dim
               + 2 * c.index_head_dim + d * c.index_n_heads)
    norms = 2 * d
    dense = 3 * d * c.intermediate_size
    expert = 3 * d * c.moe_intermediate_size
    moe = c.n_routed_experts * expert + c.n_shared_experts * expert + d * c.n_routed_experts + c.n_routed_experts
    n_moe = c.num_hidden_layers - c.first_k_dense_replace
    return (c.num_hidden_layers * (attn + indexer + norms) + c.first_k_dense_replace * dense + n_moe * moe
            + 2 * c.vocab_size * d + d)


def test_671b_totals_against_hand_computation():
    cfg = load_config(CONFIG)
    out = plan(cfg, "expert=8", max_len=131072, batch=8, fp8_weights=True, device_memory_gib=141e9 / GiB)
    assert out["parameters"] == hand_count(cfg)
    assert round(out["parameters"] / 1e9, 1) == 671.9
    # cache: 512 + 64 bf16 latent/rope (1152 B) + 128 e4m3 + 4 B scale indexer key = 1284 B/token/layer
    assert out["cache_bytes_per_token_per_layer"] == 1284
    assert abs(out["cache_bytes_total"] / 8 / GiB - 9.56) < 0.01          # 9.56 GiB per 128K sequence (spec 6)
    assert out["cache_bytes_per_device"] == out["cache_bytes_total"] // 8   # batch split over the 8 devices
    # routed experts (the bulk of the FP8 bytes) are split 8 ways: per device well under the total / 2
    assert out["parameter_bytes_per_device"] < out["parameter_bytes_total"] / 5
    assert out["fits"]                       # 8 x H200
    v5p = plan(cfg, "expert=8,tensor=4", max_len=131072, batch=8, fp8_weights=True, device_memory_gib=95.0)
    assert v5p["devices"] == 32 and v5p["fits"]                                        # v5p-64 = 32 chips
    one = plan(cfg, "", max_len=131072, batch=1, fp8_weights=True, device_memory_gib=141e9 / GiB, kv_cache="fp8")
    assert not one["fits"]                   # the whole model on one H200: no
    # the compact FP8 latent cache: 512 e4m3 + 4 f32 scales + 64 bf16 rope = 656 B, + the indexer's
    # 132 B = 788 B per token per layer; 48,068 B per token over 61 layers, 5.87 GiB per 128K (spec 6)
    assert one["cache_bytes_per_token_per_layer"] == 656 + 132 and one["kv_cache"] == "fp8"
    assert one["cache_bytes_total"] // 131072 == 48068
    assert abs(one["cache_bytes_total"] / GiB - 5.87) < 0.01


def test_cli_json():
    r = subprocess.run([sys.executable, "-m", "dsv32_jax.plan", "--config", str(CONFIG), "--mesh", "expert=8",
                        "--batch", "8", "--device", "h200", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and out["devices"] == 8
    bad = subprocess.run([sys.executable, "-m", "dsv32_jax.plan", "--config", str(CONFIG), "--mesh", "pipe=2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "pipe=2" in bad.stderr


def test_plan_asks_the_compiler(capsys):
    """--lower tpu and --compile on the release config cut to 4 layers (abstract arrays, 8 host
    devices as expert=8): both programs lower with the Pallas kernels and the ragged exchange,
    and XLA's per-device argument bytes of the decode block equal the planner's formula
    (parameters + caches) within 2% (the issue's target)."""
    from dsv32_jax.plan import main

    rc = main(["--config", str(CONFIG), "--mesh", "expert=8", "--batch", "8", "--max-len", "4096",
               "--lower", "tpu", "--compile", "--layers", "4", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    comp = out["compiler"]
    low = comp["lowered_tpu"]["decode"]["lowered_collectives"]
    assert "ragged_all_to_all" in low and "all_to_all" not in low      # the exchange sized to need
    assert comp["compiled_cpu"]["decode"]["argument_bytes"] > 0
    assert abs(comp["decode_arguments_over_formula"] - 1.0) <= 0.02
