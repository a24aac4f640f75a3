"""Every shipped config runs: its data loads at its own settings and its stages take a
step (step counts, evaluation and labelling sizes cut to the least that still runs each
part), so a config that cannot run fails here, not on a user's machine."""

import importlib
import json
import os
import shutil

import ml_collections
import pytest

from conftest import set_fields
from o3lite import stages
from o3lite.evaluation import heldout
from o3lite.training import stage as stage_lib

# Configs that start from a checkpoint this machine does not have: rl_qwen_gsm8k is built
# and compiled at a tiny shape below; rl_smollm2 runs on the real SmolLM2 folder below.
RUN_HERE = ("sft", "sft_addition", "sft_answer_only", "sft_multiplication", "sft_gsm8k",
            "rl", "grpo", "prm", "orm", "sft_filtered", "test_time")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shipped_data"))


def tiny_steps(config: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
  """One iteration of every (nested) stage's loop, 2 evaluation problems, 2 labelled
  problems; everything else (data, model, batch shapes, sampling) as shipped."""
  if "data" in config:
    config.data.data_dir = data_dir
  if "loop" in config:
    set_fields(config, {"loop.num_steps": 1, "loop.checkpoint_every": 1,
                        "loop.eval_every": 0})
  if "eval" in config:
    config.eval.num_examples = 2
  if "verifier" in config and isinstance(config.verifier, ml_collections.ConfigDict):
    set_fields(config, {"verifier.num_problems": 2, "verifier.eval_problems": 2})
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and "method" in value:
      tiny_steps(value, data_dir)  # A nested stage, or a pipeline the run may make.
  return config


@pytest.mark.parametrize("name", RUN_HERE)
def test_shipped_config_runs(name, data_dir, tmp_path, monkeypatch):
  config = tiny_steps(importlib.import_module(f"configs.{name}").get_config(), data_dir)
  if name == "test_time":
    config.num_problems = 2
    for entry in config.strategies.values():
      entry.budgets = entry.budgets[:1]
  evaluations = []
  evaluate = heldout.evaluate
  monkeypatch.setattr(heldout, "evaluate",
                      lambda *a, **k: evaluations.append(1) or evaluate(*a, **k))
  result = stages.run(config, str(tmp_path / name))
  if config.method == "rl" and not config.init_from:
    # RL's "before" is its warm start's final evaluation (same data, eval settings and
    # parameters), reused with its samples: two evaluations in all, not three.
    assert len(evaluations) == 2
    warm = os.path.join(tmp_path, name, "sft")
    assert result["before"] == stage_lib.read_result(warm)["metrics"]
    with open(os.path.join(warm, "eval_samples.jsonl")) as a, \
        open(os.path.join(tmp_path, name, "eval_before_samples.jsonl")) as b:
      assert a.read() == b.read()
  assert result["stage"] == config.method
  if config.method == "test_time":
    assert len(result["metrics"]["accuracy"]) == len(config.strategies)
    return
  # `step` counts optimizer updates: one per iteration, RL's minibatch updates per step.
  updates = 1
  if config.method == "rl":
    rl = config.rl
    updates = rl.epochs * rl.prompts_per_step * rl.group_size // rl.minibatch_size
  assert result["step"] == updates and result["metrics"]


def test_rl_qwen_gsm8k_builds_and_steps_at_a_tiny_shape(smollm2_dir, data_dir, tmp_path):
  """configs/rl_qwen_gsm8k.py starts from a Qwen2.5 folder this machine does not have:
  a random Qwen2 of 2 layers, width 64, with QKV biases, on SmolLM2's real BPE tokenizer
  (49,152 tokens + the think delimiters) stands in. Everything else is the config's own
  (GSM8K as shipped, its prompt length, bf16 compute, remat, 4 microbatches, vocabulary
  chunks, DAPO's dynamic sampling, the eval's samples) but the sizes of a step."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  folder = str(tmp_path / "qwen2")
  torch.manual_seed(0)
  transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=49_152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
      max_position_embeddings=1024)).save_pretrained(folder)
  for name in os.listdir(smollm2_dir):
    if name.startswith(("tokenizer", "special_tokens", "chat_template")):
      shutil.copy(os.path.join(smollm2_dir, name), folder)
  config = tiny_steps(importlib.import_module("configs.rl_qwen_gsm8k").get_config(), data_dir)
  # 4 prompts x 8 (the config's group size): 32 rows, 4 microbatches of 8, one per
  # simulated device.
  set_fields(config, {"init_from": folder, "rl.prompts_per_step": 4, "rl.max_new_tokens": 8,
                      "eval.max_new_tokens": 8, "eval.num_samples": 2})
  assert config.rl.grad_accum_steps == 4 and config.rl.vocab_chunk < 49_152
  assert config.rl.minibatch_size == 32 and config.rl.group_size == 8
  result = stages.run(config, str(tmp_path / "run"))
  assert result["stage"] == "rl" and result["step"] == 1
  assert {"before", "after"} <= set(result)


def test_rl_smollm2_runs_in_half_this_machine(smollm2_dir, data_dir, tmp_path):
  """configs/rl_smollm2.py as a user runs it (`python -m o3lite.train`, one device, the
  real SmolLM2-135M-Instruct folder): its warm start's SFT batch, its RL minibatch, chat
  prompts, vocabulary chunks and evaluation settings as shipped, one step of each stage
  and 2 evaluation problems. The whole process stays within half of a 24 GiB machine
  (12 GiB peak resident), with the memory check on: the config the issue first shipped
  (SFT batch 32, whole-vocabulary log-probs) was killed at 24 GiB before its first step."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, as on a user's machine.
  rl = importlib.import_module("configs.rl_smollm2").get_config().rl
  flags = {"warm_start.init_from": smollm2_dir, "data.data_dir": data_dir,
           "warm_start.loop.num_steps": 1, "loop.num_steps": 1, "eval.num_examples": 2,
           "rl.prompts_per_step": rl.minibatch_size // rl.group_size}
  log = tmp_path / "log.txt"
  with open(log, "w") as f:
    child = subprocess.Popen(
        [sys.executable, "-m", "o3lite.train", "--config=configs/rl_smollm2.py",
         f"--workdir={tmp_path / 'run'}"] + [f"--config.{k}={v}" for k, v in flags.items()],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
        stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)  # This child's own peak resident memory.
  assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
  assert usage.ru_maxrss * 1024 <= 12 * 2**30, f"peak resident {usage.ru_maxrss / 2**20:.1f} GiB"
  with open(tmp_path / "run" / "eval.json") as f:
    result = json.load(f)
  assert result["step"] == 1 and {"before", "after"} <= set(result)
