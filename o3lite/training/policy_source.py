"""Where a policy comes from: one config field, `init_from`, resolved once.

  init_from = ""                 none: the stage's own default (random init for SFT; the
                                 nested stage it runs first for RL and the verifier run)
  init_from = "runs/sft-..."     an o3lite run folder: its latest checkpoint's policy, its
                                 saved model config and tokenizer
  init_from = "~/hf/Qwen2.5"     a local Hugging Face Llama / Qwen2 folder (config.json,
                                 safetensors, tokenizer): its shape, its tokenizer (the
                                 think delimiters added when missing), its weights

Every stage reads its policy through `resolve(path)` and the `Source` it returns; nested
stages (RL's `warm_start`, the verifier run's `policy`) name theirs the same way, in their
own section. Anything else at that path is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import optax

from o3lite import errors
from o3lite.data import sources
from o3lite.data import tokenizers as tokenizer_lib
from o3lite.interop import hf_config
from o3lite.interop import huggingface as hf
from o3lite.model import transformer as model_lib
from o3lite.sampling import policy as policy_lib
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import run_folder
from o3lite.training import state as state_lib

@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved policy source: `path` and whether it is a Hugging Face folder."""

  path: str
  is_hf: bool

  def tokenizer(self, chat_template: bool = False):
    """Its tokenizer (a Hugging Face folder's own, or the one a run folder saved), its
    prompts in the chat template when asked (`data.chat_template`) or when the run
    folder's were."""
    if self.is_hf:
      return tokenizer_lib.HFTokenizer(self.path, chat_template)
    return saved_tokenizer(self.path, chat_template)

  def model_config(self, model_fields=None, vocab_size: int = 0) -> model_lib.ModelConfig:
    """Its shape: a run folder's saved model config, or a Hugging Face folder's (with
    dtype and remat from `model_fields`, a config's `model` section, and room for
    `vocab_size` tokens); the `kernels` backend switch from `model_fields` for both."""
    fields = dict(model_fields or {})
    if not self.is_hf:
      cfg = run_folder.load_model_config(self.path)
    else:
      with open(os.path.join(self.path, hf.CONFIG_FILE)) as f:
        cfg = hf_config.model_config_from_hf(json.load(f),
                                             dtype=fields.get("dtype", "float32"),
                                             remat=fields.get("remat", False))
      cfg = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, vocab_size))
    return dataclasses.replace(cfg, kernels=fields.get("kernels", cfg.kernels))

  def load_policy(self, abstract_policy: Any, model_cfg: model_lib.ModelConfig,
                  tokenizer: Any, step: int | None = None) -> Any:
    """Its policy parameters, placed with the shardings of `abstract_policy` (a tree of
    ShapeDtypeStructs; leaves without a sharding come back as host arrays)."""
    if self.is_hf:
      shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_policy)
      _, params = hf.load_hf_checkpoint(
          self.path, shardings=shardings, min_vocab_size=model_cfg.vocab_size,
          dtype=model_cfg.dtype, remat=model_cfg.remat, tokenizer=tokenizer)
      return params
    params, _ = checkpoint_lib.restore_params(
        os.path.join(self.path, run_folder.CHECKPOINT_DIR), {"policy": abstract_policy},
        step)
    return params["policy"]


def load(path: str, model_fields, mesh, rules, field: str = "init_from",
         step: int | None = None) -> policy_lib.Policy:
  """The policy at `path` (a run folder or a Hugging Face folder) as a Policy bundle,
  its parameters placed on `mesh`; `model_fields` (a `model` section) give a Hugging Face
  folder's dtype and remat."""
  source = resolve(path, field)
  tokenizer = source.tokenizer()
  model_cfg = source.model_config(model_fields, tokenizer.vocab_size)
  spec = state_lib.policy_spec(model_cfg, optax.identity(), mesh, rules)
  params = source.load_policy(spec.abstract.params["policy"], model_cfg, tokenizer, step)
  return policy_lib.Policy(params, model_cfg, tokenizer, mesh, rules)


def saved_tokenizer(run_dir: str, chat_template: bool = False):
  """The tokenizer an o3lite run folder saved."""
  return sources.get_tokenizer(ml_collections.ConfigDict({
      "tokenizer": tokenizer_lib.saved_path(os.path.join(run_dir, run_folder.TOKENIZER_DIR)),
      "chat_template": chat_template}))


def resolve(path: str, field: str = "init_from") -> Source:
  """The Source at `path` (a run folder, its checkpoints/ folder, or a local Hugging
  Face folder); a one-line ConfigError naming `field` when it is neither."""
  path = os.path.expanduser(path)
  if os.path.basename(os.path.normpath(path)) == run_folder.CHECKPOINT_DIR:
    path = os.path.dirname(os.path.normpath(path))  # A run's checkpoints/: the run.
  if not os.path.exists(path):
    raise errors.ConfigError(f"{field}={path} does not exist")
  if run_folder.is_run(path):
    if not os.path.isdir(os.path.join(path, run_folder.CHECKPOINT_DIR)):
      raise errors.ConfigError(f"{field}={path} is an o3lite run folder with no "
                               f"{run_folder.CHECKPOINT_DIR}/")
    return Source(path, is_hf=False)
  if os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
    hf.check_folder(path, field)
    return Source(path, is_hf=True)
  raise errors.ConfigError(
      f"{field}={path} is neither an o3lite run folder (no {run_folder.MODEL_CONFIG_FILE}) "
      f"nor a Hugging Face folder (no {hf.CONFIG_FILE})")


def check_renamed(config: ml_collections.ConfigDict) -> None:
  """A one-line ConfigError when `config` still has a field that an earlier o3lite named
  otherwise (`errors.RENAMED`: a config written for an earlier o3lite)."""
  for old in errors.RENAMED:
    *sections, name = old.split(".")
    node = config
    for section in sections:
      node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and name in node:
      raise errors.ConfigError(errors.renamed_message(old))
