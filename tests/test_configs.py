"""Every config file builds; locked configs reject unknown keys and wrong types."""

import glob
import importlib
import os

import ml_collections
import pytest

from o3lite import errors
from o3lite import stages
from o3lite.model import transformer as model_lib
from o3lite.training import stage as stage_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not p.endswith("__init__.py"))


def test_there_are_configs():
  assert {"sft", "sft_answer_only", "sft_addition", "sft_multiplication", "rl", "grpo",
          "rl_qwen_gsm8k", "orm", "prm", "sft_filtered", "test_time"} <= set(CONFIG_FILES)


def _sft_sections(config, where=""):
  """Every SFT section (`sft`) of a config and of the stages nested in it (RL's
  `warm_start`, the verifier run's `policy`, filtered SFT's `verifier_pipeline`)."""
  found = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      if name == "sft":
        found.append((where + name, value))
      elif "method" in value:
        found += _sft_sections(value, f"{where}{name}.")
  return found


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_builds(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  # The whole check a run makes before any work, for every stage.
  assert stage_lib.validate(config) is stages.STAGES.lookup(config.method)
  assert stage_lib.validate(config).name == config.method
  if config.method == "test_time":  # A sweep config: strategies, not a training run.
    for pipeline in ("orm_pipeline", "prm_pipeline"):  # The verifier runs it may make.
      assert stage_lib.validate(config[pipeline]).name == "verifier"
    config.lock()
    with pytest.raises(AttributeError):
      config.num_problemz = 3
    return
  assert "train" not in config  # Its fields moved to `loop`, `sft` and `init_from`.
  model_cfg = stage_lib.model_config_from(config.model, vocab_size=100)
  assert isinstance(model_cfg, model_lib.ModelConfig)
  sft_sections = _sft_sections(config)
  assert sft_sections, "no sft section"  # Every training stage has (or nests) SFT.
  for where, section in sft_sections:
    assert section.batch_size % section.grad_accum_steps == 0, where
  for name_, value in config.items():  # Each nested stage is a valid stage of its own.
    if isinstance(value, ml_collections.ConfigDict) and "method" in value:
      nested = stage_lib.nested_config(config, name_)
      assert stage_lib.validate(nested).name == value.method
  assert config.eval.split in ("train", "validation", "test")
  assert len(config.mesh.axes) == len(config.mesh.shape)
  if config.method == "rl":  # The algorithm section is valid and the batch splits.
    from o3lite.rl import run as rl_trainer  # pylint: disable=g-import-not-at-top
    rl_trainer.algo_config(config.rl)
    rows = config.rl.prompts_per_step * config.rl.group_size
    assert rows % config.rl.minibatch_size == 0
  config.lock()
  with pytest.raises(AttributeError):
    config.loop.num_stepz = 3  # A typo is an error, not a new key.
  with pytest.raises(AttributeError):
    config.train = 3  # No section comes back.
  with pytest.raises(TypeError):
    config.loop.num_steps = "many"


def test_answer_only_differs_from_sft_only_in_the_chain():
  from configs import sft, sft_answer_only
  a, b = sft.get_config().to_dict(), sft_answer_only.get_config().to_dict()
  assert a["data"].pop("with_cot") and not b["data"].pop("with_cot")
  assert a == b


def test_model_vocab_smaller_than_tokenizer_is_an_error():
  from configs import sft
  config = sft.get_config()
  config.model.vocab_size = 10
  with pytest.raises(errors.O3liteError, match="vocab_size=10"):
    stage_lib.model_config_from(config.model, vocab_size=40)
