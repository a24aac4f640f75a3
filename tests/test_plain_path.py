"""The model a newcomer reads (`kernels="plain"`: no XLA:CPU tricks) trains too: one SFT
run and one RL update through the harness on the plain path (tests/test_model.py and
tests/test_attention_mask.py check that both paths give the same values)."""

import jax
import numpy as np

from configs import rl as rl_config
from configs import sft as sft_config
from conftest import data_of, set_fields
from o3lite import stages
from o3lite.training import sft
from o3lite.training import stage as stage_lib


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_sft_steps_on_the_plain_path(tiny_run, tmp_path):
  config = set_fields(sft_config.get_config(), {
      **data_of(tiny_run), "model.kernels": "plain", "loop.num_steps": 2,
      "loop.checkpoint_every": 2, "sft.batch_size": 8, "data.seq_len": 64,
      "eval.num_examples": 2, "eval.batch_size": 2, "eval.max_new_tokens": 8})
  result = stages.run(config, str(tmp_path / "sft"))
  run, params = sft.load_run(str(tmp_path / "sft"))
  assert run.model_cfg.kernels == "plain" and result["step"] == 2 and _finite(params)


def test_an_rl_update_on_the_plain_path(tiny_run, tmp_path):
  config = set_fields(rl_config.get_config(), {
      **data_of(tiny_run), "init_from": tiny_run, "model.kernels": "plain",
      "rl.prompts_per_step": 4, "rl.group_size": 2, "rl.minibatch_size": 8,
      "rl.max_new_tokens": 16, "rl.advantage": "grpo", "optimizer.warmup_steps": 0,
      # The tiny policy is never right: a length penalty gives the group's samples
      # different rewards, so the update has a gradient.
      "rl.rewards": {"correctness": 1.0, "length_penalty": 1.0}})
  _, ctx, plan = stage_lib.build(config, str(tmp_path / "rl"))
  assert ctx.model_cfg.kernels == "plain"
  state = plan.init()
  # A copy: on the CPU a fetched array may share the buffer the update donates.
  before = jax.tree.map(lambda x: np.array(x, copy=True), state.params["policy"])
  position = 0
  for step in range(2):  # (The schedule's first update has a learning rate of 0.)
    state, position, metrics = plan.iterate(state, position, step)
  plan.close()
  assert metrics["nonfinite"] == 0 and np.isfinite(metrics["loss"])
  after = jax.device_get(state.params["policy"])
  assert _finite(after) and any(not np.array_equal(a, b) for a, b in
                                zip(jax.tree.leaves(after), jax.tree.leaves(before)))
