"""A run folder: what a training run saves beside its checkpoints, and the checks that
keep a rerun from spoiling it.

  DIR/config.json        the run config (ml_collections, as JSON)
  DIR/model_config.json  the frozen ModelConfig
  DIR/tokenizer/         the tokenizer
  DIR/checkpoints/       orbax (see `checkpoint`)

A rerun with the same DIR resumes. Before anything in DIR is written, `check_rerun`
compares the new run's model, data and tokenizer settings with the saved ones; a
difference is a one-line `RunFolderError` and the folder stays as it was, so it still
evaluates, exports and resumes with its own settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from o3lite import errors
from o3lite.model import transformer as model_lib

CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
# Config sections (or single keys) whose change makes a run folder's checkpoints
# meaningless: the model's shape, the data it trains on, the tokenizer.
_FIXED = ("model", "data", "init_from")
_MAY_CHANGE = ("data.data_dir", "data.path")  # Where data live may move.


def prepare(workdir: str) -> None:
  """Makes `workdir` (a folder, or a path where one can be made)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.RunFolderError(f"--workdir={workdir} is a file, not a folder")
  os.makedirs(workdir, exist_ok=True)


def is_run(path: str) -> bool:
  """Whether `path` is an o3lite run folder with a model (the one test: its saved model
  config; a Hugging Face folder has a config.json too, but never this file)."""
  return os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def saved_method(workdir: str) -> str | None:
  """The `method` of the run saved in `workdir`, or None when it holds no o3lite run."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.RunFolderError(f"{path} is not valid JSON: {e}") from e
  return saved.get("method") if isinstance(saved, dict) else None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The saved run config of `workdir` (unlocked)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise errors.RunFolderError(f"run folder not found: {workdir}")
  if not os.path.isfile(path):
    raise errors.RunFolderError(f"{workdir} is not a run folder: no {CONFIG_FILE}")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.RunFolderError(f"{path} is not valid JSON: {e}") from e


def load_model_config(workdir: str) -> model_lib.ModelConfig:
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.isfile(path):
    raise errors.RunFolderError(f"{workdir} is not a run folder: no {MODEL_CONFIG_FILE}")
  try:
    with open(path) as f:
      return model_lib.ModelConfig(**json.load(f))
  except (json.JSONDecodeError, TypeError) as e:
    raise errors.RunFolderError(f"{path} does not fit ModelConfig: {e}") from e


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _diff(saved: Any, new: Any, prefix: str) -> str | None:
  """The first dotted key where two JSON trees differ, with both values."""
  if isinstance(saved, dict) and isinstance(new, dict):
    for key in sorted(set(saved) | set(new)):
      where = f"{prefix}.{key}" if prefix else key
      if where in _MAY_CHANGE:
        continue
      if key not in saved and not new[key]:
        continue  # A setting added since the run was made, left at its off default.
      if key not in saved or key not in new:
        return f"{where} is {'new' if key not in saved else 'gone'}"
      found = _diff(saved[key], new[key], where)
      if found:
        return found
    return None
  return None if saved == new else f"{prefix}={new!r} (saved: {saved!r})"


def check_rerun(workdir: str, config: ml_collections.ConfigDict,
                model_cfg: model_lib.ModelConfig, sections: tuple[str, ...] = _FIXED
                ) -> None:
  """A one-line RunFolderError if `workdir` holds a run whose `sections` of the config
  or whose model config differ from this run's. Writes nothing."""
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return
  saved = _plain(load_config(workdir))
  new = _plain(config)
  def get(tree, dotted):
    for key in dotted.split("."):
      tree = tree.get(key) if isinstance(tree, dict) else None
    return tree

  for section in sections:
    if get(saved, section) is None and not get(new, section):
      continue  # A setting added since the run was made, left at its off default.
    found = _diff(get(saved, section), get(new, section), section)
    if found:
      raise errors.RunFolderError(
          f"{workdir} holds a run with other settings: {found}; use another --workdir "
          "(nothing in the folder was changed)")
  if os.path.isfile(os.path.join(workdir, MODEL_CONFIG_FILE)):
    saved_model = dataclasses.asdict(load_model_config(workdir))
    found = _diff(saved_model, json.loads(json.dumps(dataclasses.asdict(model_cfg))),
                  "model_config")
    if found:
      raise errors.RunFolderError(
          f"{workdir} holds a run of another model: {found}; use another --workdir "
          "(nothing in the folder was changed)")


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The config alone (a stage without a model of its own: the test-time sweep)."""
  if jax.process_index() == 0:
    _write(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def save(workdir: str, config: ml_collections.ConfigDict,
         model_cfg: model_lib.ModelConfig, tokenizer: Any) -> None:
  """The config, model config and tokenizer next to the checkpoints (process 0 only),
  each written to a temporary name first and renamed."""
  if jax.process_index() != 0:
    return
  _write(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
  _write(os.path.join(workdir, MODEL_CONFIG_FILE),
         json.dumps(dataclasses.asdict(model_cfg), indent=2))
  tokenizer.save(os.path.join(workdir, TOKENIZER_DIR))
