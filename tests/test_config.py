"""ModelConfig: the release config, both rope forms, and errors that name the field."""
import json
from pathlib import Path

import pytest

from dsv32_jax.config import ConfigError, ModelConfig, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


def test_release_config_values():
    cfg = load_config(CONFIGS / "deepseek-v3.2-exp.json")
    assert cfg == ModelConfig()          # the dataclass defaults are the release
    assert cfg.qk_head_dim == 192 and cfg.kv_dim == 576
    assert abs(cfg.softmax_scale - 0.13523378) < 1e-8        # spec 1.3
    assert cfg.fp8_block_size == (128, 128)
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


def test_transformers_form_is_accepted(tiny_hf):
    _, path = tiny_hf
    d = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in d and "layer_types" in d
    cfg = load_config(path)
    assert cfg.rope_factor == 40.0 and cfg.rope_original_max_position_embeddings == 64


def test_round_trip():
    cfg = ModelConfig()
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, field", [
    ({"hidden_sizee": 7168}, "hidden_sizee"),
    ({"n_group": 7}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"num_hidden_layers": "sixty"}, "num_hidden_layers"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "warp": 3}}, "rope_scaling.warp"),
    ({"head_dim": 128}, "head_dim"),
    ({"mlp_layer_types": ["dense"] * 61}, "mlp_layer_types"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_bad_fields_are_named(change, field):
    d = ModelConfig().to_hf_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_hf_dict(d)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
