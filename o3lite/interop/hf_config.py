"""Hugging Face `config.json` <-> o3lite `ModelConfig`, for Llama and Qwen2: what maps
one to one, what is refused (sliding windows, attention or MLP biases other than Qwen2's
q / k / v, rope types other than default and llama3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from o3lite import errors
from o3lite.model import transformer as model_lib

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
  if hf_config.get(key) is None:
    raise errors.CheckpointError(f"config.json has no {key!r}")
  return hf_config[key]


def _model_type(hf_config: Mapping[str, Any]) -> str:
  archs = hf_config.get("architectures") or []
  by_arch = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
  if archs:
    if len(archs) != 1 or archs[0] not in by_arch:
      raise errors.CheckpointError(f"architectures={archs} is not supported; expected one of "
                                   f"{sorted(by_arch)}")
    return by_arch[archs[0]]
  model_type = hf_config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise errors.CheckpointError(f"model_type={model_type!r} is not supported; expected one of "
                                 f"{sorted(ARCHITECTURES)}")
  return model_type


def _rope_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """Our RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` +
  `rope_scaling` (transformers 4)."""
  rope = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
  theta = rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  fields = {"rope_theta": float(theta)}
  if rope_type == "default":
    return fields
  if rope_type != "llama3":
    raise errors.CheckpointError(f"rope_type={rope_type!r} (rope_parameters / rope_scaling) is not "
                                 "supported; expected 'default' or 'llama3'")
  keys = {"rope_scaling_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
          "rope_high_freq_factor": "high_freq_factor",
          "rope_original_max_len": "original_max_position_embeddings"}
  for ours, theirs in keys.items():
    if rope.get(theirs) is None:
      raise errors.CheckpointError(f"rope_type='llama3' needs {theirs!r} in rope_parameters")
    fields[ours] = rope[theirs]
  fields["rope_original_max_len"] = int(fields["rope_original_max_len"])
  return fields


def model_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> model_lib.ModelConfig:
  """The ModelConfig of a transformers `config.json` (Llama or Qwen2).

  `overrides` replace fields of the result, e.g. `dtype="bfloat16"` or `remat=True`.

  Raises:
    ValueError: an unsupported architecture or feature, naming the config field.
  """
  model_type = _model_type(hf_config)
  if hf_config.get("hidden_act", "silu") != "silu":
    raise errors.CheckpointError(f"hidden_act={hf_config['hidden_act']!r} is not supported; "
                                 "expected 'silu'")
  if hf_config.get("mlp_bias"):
    raise errors.CheckpointError("mlp_bias=true is not supported: our MLP has no biases")
  if model_type == "llama" and hf_config.get("attention_bias"):
    raise errors.CheckpointError(
        "attention_bias=true is not supported: a Llama with attention bias "
        "also has an o_proj bias, which our attention lacks")
  if model_type == "qwen2":
    if hf_config.get("use_sliding_window"):
      raise errors.CheckpointError("use_sliding_window=true is not supported: our attention is "
                                   "full causal attention")
    layer_types = hf_config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
      raise errors.CheckpointError(f"layer_types={layer_types} is not supported: every layer must "
                                   "be 'full_attention'")
  hidden = _require(hf_config, "hidden_size")
  num_heads = _require(hf_config, "num_attention_heads")
  fields = dict(
      vocab_size=_require(hf_config, "vocab_size"),
      num_layers=_require(hf_config, "num_hidden_layers"),
      embed_dim=hidden,
      num_heads=num_heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
      head_dim=hf_config.get("head_dim") or hidden // num_heads,
      mlp_dim=_require(hf_config, "intermediate_size"),
      norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      qkv_bias=model_type == "qwen2",
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      **_rope_fields(hf_config),
  )
  return model_lib.ModelConfig(**{**fields, **overrides})


def hf_config_from_model_config(cfg: model_lib.ModelConfig, *, eos_id: int, pad_id: int,
                                bos_id: int | None = None, arch: str | None = None,
                                max_position_embeddings: int = 4096) -> dict[str, Any]:
  """A transformers `config.json` (as a dict) for our model.

  `arch` is "llama" or "qwen2"; by default Qwen2 when `cfg.qkv_bias`, else Llama (a
  Llama with attention bias would also need an o_proj bias). RoPE is written both as
  `rope_parameters` (transformers 5) and as `rope_theta` / `rope_scaling` (4).
  """
  arch = arch or ("qwen2" if cfg.qkv_bias else "llama")
  if arch not in ARCHITECTURES:
    raise errors.ConfigError(f"arch={arch!r}: expected one of {sorted(ARCHITECTURES)}")
  if arch == "llama" and cfg.qkv_bias:
    raise errors.ConfigError("arch='llama' cannot hold qkv_bias=True (Llama's attention_bias "
                             "also adds an o_proj bias); use arch='qwen2'")
  if arch == "qwen2" and not cfg.qkv_bias:
    raise errors.ConfigError("arch='qwen2' needs qkv_bias=True: Qwen2 always has q/k/v biases")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_factor != 1.0:
    rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  config = {
      "architectures": [ARCHITECTURES[arch]],
      "model_type": arch,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max_position_embeddings,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "rope_parameters": rope,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": ({k: v for k, v in rope.items() if k != "rope_theta"}
                       if rope["rope_type"] != "default" else None),
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
      "dtype": "float32",
      "torch_dtype": "float32",
  }
  if arch == "llama":
    config.update(attention_bias=False, mlp_bias=False)
  else:
    config.update(use_sliding_window=False, sliding_window=None)
  return config
