"""Hugging Face import and export of Llama / Qwen2 checkpoints, without torch.

  cfg, params = hf.load_hf_checkpoint("models/Qwen2.5-0.5B", mesh=run.mesh)
  hf.export(params, cfg, tokenizer, "out/")  # AutoModelForCausalLM.from_pretrained("out/")

Checkpoints are local folders: `config.json` (`hf_config.py`) and `model.safetensors` or
the shards of `model.safetensors.index.json` (`safetensors_io.py`); nothing is
downloaded. Our parameters map one to one to the transformers state dict of
`LlamaForCausalLM` / `Qwen2ForCausalLM` (both use the rotate-half RoPE convention, so
q / k need no permutation):

  ours (layer i under params["layer_{i}"])   transformers (under "model.layers.{i}.")
  attn_norm.scale [D]                        input_layernorm.weight [D]
  attn.q_kernel [D, N, H]                    self_attn.q_proj.weight [N*H, D]
  attn.k_kernel / v_kernel [D, K, H]         self_attn.k_proj / v_proj.weight [K*H, D]
  attn.o_kernel [N, H, D]                    self_attn.o_proj.weight [D, N*H]
  attn.q_bias [N, H], k/v_bias [K, H]        self_attn.q/k/v_proj.bias [N*H], [K*H] (Qwen2)
  mlp_norm.scale [D]                         post_attention_layernorm.weight [D]
  mlp.gate_kernel / up_kernel [D, F]         mlp.gate_proj / up_proj.weight [F, D]
  mlp.down_kernel [F, D]                     mlp.down_proj.weight [D, F]
  embedding [V, D]                           model.embed_tokens.weight [V, D]
  final_norm.scale [D]                       model.norm.weight [D]
  lm_head [D, V] (untied only)               lm_head.weight [V, D]
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from o3lite import errors
from o3lite.interop import hf_config
from o3lite.interop import hf_tokenizer_files as hf_tokenizer
from o3lite.interop import safetensors_io
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib

CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------------------
# Parameters.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One parameter: our path and shape, the transformers name and shape.

  `transpose`: ours reshaped to [in, out] is the transpose of theirs ([out, in]).
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  name: str
  hf_shape: tuple[int, ...]
  transpose: bool = False

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.transpose:
      return x.reshape(self.hf_shape[::-1]).T
    return x.reshape(self.hf_shape)

  def from_hf(self, x: np.ndarray) -> np.ndarray:
    return (x.T if self.transpose else x).reshape(self.shape)


def _layout(cfg: model_lib.ModelConfig) -> list[_Tensor]:
  """Every parameter of `cfg`, in a fixed order."""
  D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  F, V = cfg.mlp_dim, cfg.vocab_size
  out = [_Tensor(("embedding",), (V, D), "model.embed_tokens.weight", (V, D))]
  for i in range(cfg.num_layers):
    ours, theirs = f"layer_{i}", f"model.layers.{i}."
    attn = theirs + "self_attn."
    out += [
        _Tensor((ours, "attn_norm", "scale"), (D,), theirs + "input_layernorm.weight", (D,)),
        _Tensor((ours, "attn", "q_kernel"), (D, N, H), attn + "q_proj.weight", (N * H, D), True),
        _Tensor((ours, "attn", "k_kernel"), (D, K, H), attn + "k_proj.weight", (K * H, D), True),
        _Tensor((ours, "attn", "v_kernel"), (D, K, H), attn + "v_proj.weight", (K * H, D), True),
        _Tensor((ours, "attn", "o_kernel"), (N, H, D), attn + "o_proj.weight", (D, N * H), True),
    ]
    if cfg.qkv_bias:
      out += [
          _Tensor((ours, "attn", "q_bias"), (N, H), attn + "q_proj.bias", (N * H,)),
          _Tensor((ours, "attn", "k_bias"), (K, H), attn + "k_proj.bias", (K * H,)),
          _Tensor((ours, "attn", "v_bias"), (K, H), attn + "v_proj.bias", (K * H,)),
      ]
    out += [
        _Tensor((ours, "mlp_norm", "scale"), (D,), theirs + "post_attention_layernorm.weight",
                (D,)),
        _Tensor((ours, "mlp", "gate_kernel"), (D, F), theirs + "mlp.gate_proj.weight", (F, D),
                True),
        _Tensor((ours, "mlp", "up_kernel"), (D, F), theirs + "mlp.up_proj.weight", (F, D), True),
        _Tensor((ours, "mlp", "down_kernel"), (F, D), theirs + "mlp.down_proj.weight", (D, F),
                True),
    ]
  out.append(_Tensor(("final_norm", "scale"), (D,), "model.norm.weight", (D,)))
  if not cfg.tie_embeddings:
    out.append(_Tensor(("lm_head",), (D, V), "lm_head.weight", (V, D), True))
  return out


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[tuple, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def params_to_hf(params: Mapping[str, Any], cfg: model_lib.ModelConfig
                 ) -> dict[str, np.ndarray]:
  """Our (unboxed) parameters as a transformers state dict of fp32 numpy arrays."""
  flat = _flatten(nn.unbox(params))
  layout = _layout(cfg)
  safetensors_io.check_names(set(flat), {t.path for t in layout}, "parameters")
  tensors = {}
  for t in layout:
    x = np.asarray(jax.device_get(flat[t.path]), np.float32)
    if x.shape != t.shape:
      raise ValueError(f"parameter {'/'.join(t.path)} has shape {x.shape}, expected "
                       f"{t.shape}")
    tensors[t.name] = np.ascontiguousarray(t.to_hf(x))
  return tensors


def _is_ignored(name: str, cfg: model_lib.ModelConfig) -> bool:
  """Buffers transformers may save, and the output matrix of tied embeddings."""
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings
                                                  and name == "lm_head.weight")


_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _grow_vocab(name: str, x: np.ndarray, from_size: int, vocab_size: int) -> np.ndarray:
  """Rows for tokens the checkpoint lacks (e.g. added think delimiters): the mean row,
  so new tokens start as an average token (as in `resize_token_embeddings`)."""
  if name not in _VOCAB_TENSORS or x.ndim != 2 or x.shape[0] != from_size:
    return x
  mean = np.asarray(x, np.float32).mean(axis=0, keepdims=True).astype(x.dtype)
  return np.concatenate([x, np.repeat(mean, vocab_size - x.shape[0], axis=0)])


def _mean_rows(name: str, x: np.ndarray, new_ids: Sequence[int], trained_rows: int,
               pieces: Mapping[int, Sequence[int]] | None = None) -> np.ndarray:
  """Rows `new_ids` of a vocabulary tensor set to the mean of the trained rows (ids below
  `trained_rows`, the new ones excluded): a token added to the tokenizer starts as an
  average token, whether the embedding grew for it or had a spare (untrained) row. A new
  id with `pieces` (its text's ids in the original vocabulary, all trained) starts as
  the mean of those rows instead, so two added tokens do not start identical."""
  if name not in _VOCAB_TENSORS or x.ndim != 2 or not new_ids:
    return x
  limit = min(trained_rows, x.shape[0])
  trained = np.setdiff1d(np.arange(limit), new_ids)
  x = np.array(x)
  x[np.asarray(new_ids)] = np.asarray(x[trained], np.float32).mean(axis=0).astype(x.dtype)
  for i in new_ids:
    own = [p for p in (pieces or {}).get(i, ()) if p < limit and p not in new_ids]
    if own:
      x[i] = np.asarray(x[own], np.float32).mean(axis=0).astype(x.dtype)
  return x


def _convert_from_hf(tensors: Mapping[str, np.ndarray], cfg: model_lib.ModelConfig,
                     place: Callable[[tuple[str, ...], np.ndarray], Any],
                     grow_vocab_from: int | None = None, new_ids: Sequence[int] = (),
                     trained_rows: int = 0,
                     pieces: Mapping[int, Sequence[int]] | None = None) -> dict[str, Any]:
  layout = _layout(cfg)
  names = {name for name in tensors if not _is_ignored(name, cfg)}
  safetensors_io.check_names(names, {t.name for t in layout}, "tensors in the checkpoint")
  flat = {}
  for t in layout:  # One tensor at a time: read, convert, place, let go.
    x = tensors[t.name]
    if grow_vocab_from is not None:
      x = _grow_vocab(t.name, x, grow_vocab_from, cfg.vocab_size)
    x = _mean_rows(t.name, x, new_ids, trained_rows, pieces)
    if tuple(x.shape) != t.hf_shape:
      raise errors.CheckpointError(f"tensor {t.name} has shape {tuple(x.shape)} in the checkpoint, "
                                   f"expected {t.hf_shape} from the config")
    flat[t.path] = place(t.path, np.ascontiguousarray(t.from_hf(x), np.float32))
  return _unflatten(flat)


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: model_lib.ModelConfig
                   ) -> dict[str, Any]:
  """Our parameter tree (fp32 numpy) from a transformers state dict; inverse of
  `params_to_hf`.

  Raises:
    ValueError: a missing or unexpected tensor, or a shape that does not fit `cfg`.
  """
  return _convert_from_hf(tensors, cfg, lambda path, x: x)


def param_shardings(cfg: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
                    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES) -> Any:
  """NamedShardings of the parameters of `cfg` (as in the train state)."""
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  sharding_lib.check_divisible(abstract, mesh, rules)
  return sharding_lib.logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)


# ---------------------------------------------------------------------------------------
# Files.


def _require_config(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"{what} folder not found: {path}")
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    raise errors.CheckpointError(f"{what} {path} has no {CONFIG_FILE}")


def check_folder(path: str, what: str = "Hugging Face checkpoint") -> None:
  """A one-line CheckpointError unless `path` is a folder with config.json and
  safetensors weights (checked before its tokenizer is read, so a folder without
  weights is reported as that, not as a tokenizer problem)."""
  _require_config(path, what)
  safetensors_io.require_weights(path, what)


def load_hf_checkpoint(path: str, mesh: jax.sharding.Mesh | None = None,
                       shardings: Any = None,
                       rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
                       min_vocab_size: int = 0, tokenizer: Any = None,
                       **overrides) -> tuple[model_lib.ModelConfig, dict[str, Any]]:
  """(ModelConfig, fp32 params) of a local transformers checkpoint folder.

  Each tensor is read (memory-mapped), converted and placed on its own, so the host holds
  one tensor at a time and no device ever holds a full copy of a sharded parameter.
  Placement: `shardings` (a NamedSharding tree of the params, e.g.
  `sft.Run.state_shardings.params["policy"]`), else the shardings `rules` give on `mesh`, else
  the default device. `overrides` go to `hf_config.model_config_from_hf` (e.g. dtype="bfloat16").
  The tokenizer of the folder: `o3lite.data.tokenizers.HFTokenizer(path)`; it may add the think
  delimiters as new tokens, so `min_vocab_size=len(tokenizer)` grows the embedding (and
  an untied output matrix) to fit them, new rows set to the mean row. Pass that
  `tokenizer` too: the rows of the tokens it added (`added_ids`) are then set to the
  mean of the rows its original tokens trained, also where the embedding had spare rows
  already and did not grow.

  Raises:
    CheckpointError: no such folder, no config.json or safetensors weights in it, an
      unsupported config, or tensors that do not fit it.
  """
  _require_config(path, "Hugging Face checkpoint")  # The weights: once the config fits.
  with open(os.path.join(path, CONFIG_FILE)) as f:
    cfg = hf_config.model_config_from_hf(json.load(f), **overrides)
  grow_from = None
  if cfg.vocab_size < min_vocab_size:
    grow_from = cfg.vocab_size
    cfg = dataclasses.replace(cfg, vocab_size=min_vocab_size)
  if shardings is None and mesh is not None:
    shardings = param_shardings(cfg, mesh, rules)
  if shardings is None:
    place = lambda path, x: jax.device_put(x)
  else:
    flat_shardings = _flatten(shardings)
    safetensors_io.check_names(set(flat_shardings), {t.path for t in _layout(cfg)}, "shardings")

    def place(path, x):  # Each device gets only its slice.
      return jax.make_array_from_callback(x.shape, flat_shardings[path], lambda i: x[i])
  new_ids = list(getattr(tokenizer, "added_ids", ()))
  trained_rows = getattr(tokenizer, "base_size", 0)
  return cfg, _convert_from_hf(safetensors_io.read(path), cfg, place, grow_from, new_ids,
                               trained_rows, getattr(tokenizer, "added_pieces", None))


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def export(params: Mapping[str, Any], cfg: model_lib.ModelConfig, tokenizer: Any,
           out_dir: str, arch: str | None = None,
           max_shard_bytes: int = 2 * 1024**3) -> None:
  """Writes a transformers checkpoint folder: fp32 `model.safetensors` (sharded with an
  index past `max_shard_bytes`), `config.json`, `generation_config.json` (greedy) and the
  tokenizer, so `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(out_dir)` load it.
  """
  if cfg.vocab_size < tokenizer.vocab_size:
    raise errors.ConfigError(f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} tokens")
  bos_id = getattr(tokenizer, "bos_id", None)  # Our tokenizers add no BOS.
  config = hf_config.hf_config_from_model_config(cfg, eos_id=tokenizer.eos_id,
                                       pad_id=tokenizer.pad_id, bos_id=bos_id, arch=arch)
  tensors = params_to_hf(params, cfg)
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write(tensors, out_dir, max_shard_bytes)
  _write_json(os.path.join(out_dir, CONFIG_FILE), config)
  generation = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                "do_sample": False}
  if bos_id is not None:
    generation["bos_token_id"] = bos_id
  _write_json(os.path.join(out_dir, "generation_config.json"), generation)
  hf_tokenizer.save(tokenizer, out_dir)

