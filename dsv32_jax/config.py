"""The model configuration: one frozen dataclass read from a Hugging Face `config.json`.

Field names follow the Hugging Face config of DeepSeek-V3.2-Exp; the defaults are the
released 671B model. `ModelConfig.from_hf_dict` accepts both the release's legacy form
(`rope_scaling` + top-level `rope_theta`) and the form transformers >= 5 writes
(`rope_parameters`), rejects unknown fields and inconsistent values with a message that
names the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field is unknown, missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_type: str = "yarn"
    rope_factor: float = 40.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    # FP8 block size of the checkpoint's weights (None: the checkpoint is not quantised).
    fp8_block_size: tuple[int, int] | None = (128, 128)

    # ----------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one cached MLA entry: latent + shared rope key (576 in the release)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def yarn_mscale(self) -> float:
        """Softmax-scale correction of YaRN (HF: from `mscale_all_dim`)."""
        if self.rope_type != "yarn" or not self.rope_mscale_all_dim or self.rope_factor <= 1:
            return 1.0
        return 0.1 * self.rope_mscale_all_dim * math.log(self.rope_factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-0.5 * mscale^2 (0.13523378 in the release)."""
        return self.qk_head_dim ** -0.5 * self.yarn_mscale ** 2

    # ----------------------------------------------------------------- parsing
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        d = dict(d)
        kw: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)}

        def err(field, msg):
            raise ConfigError(f"{source}: field {field!r}: {msg}")

        # rope: legacy `rope_scaling` + `rope_theta`, or transformers-5 `rope_parameters`.
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        d.pop("rope_scaling", None)
        if "rope_theta" in d:
            kw["rope_theta"] = float(d.pop("rope_theta"))
        if rope:
            rope = dict(rope)
            rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
            if rtype not in ("yarn", "default"):
                err("rope_scaling.type", f"unsupported rope type {rtype!r} (expected 'yarn')")
            kw["rope_type"] = rtype
            if "rope_theta" in rope:
                kw["rope_theta"] = float(rope.pop("rope_theta"))
            mapping = {"factor": "rope_factor",
                       "original_max_position_embeddings": "rope_original_max_position_embeddings",
                       "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow",
                       "mscale": "rope_mscale", "mscale_all_dim": "rope_mscale_all_dim"}
            for key, val in rope.items():
                if key in mapping:
                    if val is not None:
                        kw[mapping[key]] = val
                elif key in ("truncate",) and val in (True, None):
                    pass
                elif key == "attention_factor" and val is None:
                    pass
                else:
                    err(f"rope_scaling.{key}", "unknown or unsupported rope field")
        else:
            kw["rope_type"] = "default"

        quant = d.pop("quantization_config", None)
        if quant is None:
            kw["fp8_block_size"] = None
        else:
            if quant.get("quant_method") != "fp8":
                err("quantization_config.quant_method", f"{quant.get('quant_method')!r} is not 'fp8'")
            if quant.get("fmt", "e4m3") != "e4m3":
                err("quantization_config.fmt", f"{quant.get('fmt')!r} is not 'e4m3'")
            bs = quant.get("weight_block_size", [128, 128])
            if not (isinstance(bs, (list, tuple)) and len(bs) == 2):
                err("quantization_config.weight_block_size", f"expected [rows, cols], got {bs!r}")
            kw["fp8_block_size"] = (int(bs[0]), int(bs[1]))

        # transformers' `num_experts` alias
        if "num_experts" in d and "n_routed_experts" not in d:
            d["n_routed_experts"] = d.pop("num_experts")

        # Bookkeeping fields: accepted, checked where they carry meaning, not stored.
        derived_checks = {}
        for key in ("architectures", "model_type", "num_key_value_heads", "attention_dropout",
                    "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache",
                    "ep_size", "pad_token_id", "output_router_logits", "auto_map", "hidden_act",
                    "scoring_func", "topk_method", "attention_bias", "mlp_bias", "head_dim",
                    "qk_head_dim", "layer_types", "mlp_layer_types", "aux_loss_alpha", "seq_aux",
                    "router_aux_loss_coef", "_name_or_path", "return_dict", "chunk_size_feed_forward",
                    "is_encoder_decoder", "id2label", "label2id", "problem_type",
                    "tokenizer_class", "output_hidden_states", "output_attentions"):
            if key in d:
                derived_checks[key] = d.pop(key)

        for key, val in d.items():
            if key not in fields or key in ("rope_type", "fp8_block_size") or key.startswith("rope_"):
                err(key, "unknown config field (not part of the DeepSeek-V3.2 configuration)")
            kw[key] = val

        # Coerce types with field names in errors.
        typed: dict[str, Any] = {}
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, val in kw.items():
            t = hints[key]
            try:
                if t == "int":
                    if isinstance(val, bool) or (isinstance(val, float) and not val.is_integer()):
                        raise TypeError
                    typed[key] = int(val)
                elif t == "float":
                    typed[key] = float(val)
                elif t == "bool":
                    if not isinstance(val, bool):
                        raise TypeError
                    typed[key] = val
                else:
                    typed[key] = val
            except (TypeError, ValueError):
                err(key, f"expected {t}, got {val!r}")
        cfg = cls(**typed)
        cfg._check(derived_checks, source)
        return cfg

    def _check(self, extra: dict[str, Any], source: str) -> None:
        def err(field, msg):
            raise ConfigError(f"{source}: field {field!r}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group", "index_n_heads",
                     "index_head_dim", "index_topk", "moe_layer_freq"):
            if getattr(self, name) <= 0:
                err(name, f"must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            err("qk_rope_head_dim", "must be even (rotary pairs)")
        if self.index_head_dim < self.qk_rope_head_dim:
            err("index_head_dim", f"{self.index_head_dim} is smaller than qk_rope_head_dim "
                f"{self.qk_rope_head_dim} (the indexer's rope slice)")
        if self.n_routed_experts % self.n_group:
            err("n_group", f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}")
        if self.topk_group > self.n_group:
            err("topk_group", f"{self.topk_group} > n_group {self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            err("num_experts_per_tok", "more experts per token than the kept groups hold")
        if self.n_routed_experts // self.n_group < 2:
            err("n_group", "each expert group needs at least 2 experts (group score = top-2 sum)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            err("first_k_dense_replace", f"{self.first_k_dense_replace} > num_hidden_layers")
        if self.rms_norm_eps <= 0:
            err("rms_norm_eps", "must be positive")
        if extra.get("hidden_act", "silu") != "silu":
            err("hidden_act", f"{extra['hidden_act']!r} is not 'silu'")
        if extra.get("scoring_func", "sigmoid") != "sigmoid":
            err("scoring_func", f"{extra['scoring_func']!r} is not 'sigmoid'")
        if extra.get("topk_method", "noaux_tc") != "noaux_tc":
            err("topk_method", f"{extra['topk_method']!r} is not 'noaux_tc'")
        for b in ("attention_bias", "mlp_bias"):
            if extra.get(b, False):
                err(b, "biases are not part of this architecture")
        if "head_dim" in extra and extra["head_dim"] not in (None, self.qk_rope_head_dim):
            err("head_dim", f"{extra['head_dim']} != qk_rope_head_dim {self.qk_rope_head_dim}")
        if "qk_head_dim" in extra and extra["qk_head_dim"] not in (None, self.qk_head_dim):
            err("qk_head_dim", f"{extra['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim")
        mlt = extra.get("mlp_layer_types")
        if mlt is not None:
            want = ["sparse" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]
            if list(mlt) != want:
                err("mlp_layer_types", f"{mlt} disagrees with first_k_dense_replace/moe_layer_freq")
        lt = extra.get("layer_types")
        if lt is not None and any(x != "indexed_attention" for x in lt):
            err("layer_types", "every layer must be 'indexed_attention'")
        if self.tie_word_embeddings:
            err("tie_word_embeddings", "DeepSeek-V3.2 has a separate lm_head")

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json form (legacy `rope_scaling`, as released)."""
        d = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
        for f in dataclasses.fields(self):
            if f.name.startswith("rope_") or f.name == "fp8_block_size":
                continue
            d[f.name] = getattr(self, f.name)
        d["rope_theta"] = self.rope_theta
        if self.rope_type == "yarn":
            d["rope_scaling"] = {
                "type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
                "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow,
                "mscale": self.rope_mscale, "mscale_all_dim": self.rope_mscale_all_dim}
        if self.fp8_block_size is not None:
            d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": list(self.fp8_block_size), "scale_fmt": "ue8m0"}
        d["hidden_act"] = "silu"
        d["scoring_func"] = "sigmoid"
        d["topk_method"] = "noaux_tc"
        return d

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def load_config(path: str | Path) -> ModelConfig:
    """Read a config.json file, or the config.json inside a checkpoint directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"no config.json at {p}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_dict(d, source=str(p))
