"""Every config file builds; locked configs reject unknown keys and wrong types."""

import glob
import importlib
import os

import pytest

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.training import sft as trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not p.endswith("__init__.py"))


def test_there_are_configs():
  assert {"sft", "sft_answer_only", "sft_addition", "sft_multiplication", "rl", "grpo",
          "rl_qwen_gsm8k", "orm", "prm", "sft_filtered", "test_time"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_builds(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.method == "test_time":  # A sweep config: strategies, not a training run.
    from o3lite.search import sweep  # pylint: disable=g-import-not-at-top
    sweep.validate(config)
    config.lock()
    with pytest.raises(AttributeError):
      config.num_problemz = 3
    return
  model_cfg = trainer.model_config_from(config.model, vocab_size=100)
  assert isinstance(model_cfg, model_lib.ModelConfig)
  assert config.sft.batch_size % config.sft.grad_accum_steps == 0
  assert config.eval.split in ("train", "validation", "test")
  assert len(config.mesh.axes) == len(config.mesh.shape)
  if config.method == "rl":  # The algorithm section is valid and the batch splits.
    from o3lite.rl import run as rl_trainer  # pylint: disable=g-import-not-at-top
    rl_trainer.algo_config(config.rl)
    rows = config.rl.prompts_per_step * config.rl.group_size
    assert rows % config.rl.minibatch_size == 0
    rl_trainer.validate(config)  # The whole check a run makes before any work.
  elif config.method == "verifier":
    from o3lite.verifiers import run as verifier_run  # pylint: disable=g-import-not-at-top
    verifier_run.validate(config)
  elif config.method == "filtered_sft":
    from o3lite.verifiers import filtering  # pylint: disable=g-import-not-at-top
    filtering.validate(config)
  else:
    trainer.validate(config)
  config.lock()
  with pytest.raises(AttributeError):
    config.train.num_stepz = 3  # A typo is an error, not a new key.
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
    trainer.model_config_from(config.model, vocab_size=40)
