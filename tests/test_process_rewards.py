"""A PRM's step scores as dense rewards in PPO and GRPO: the maths, and a run with a
frozen PRM in the same program."""

import json
import os

import numpy as np
import pytest

from configs import rl as rl_config
from o3lite import errors
from o3lite import stages
from o3lite.rl import algorithms as alg
from o3lite.rl import run as rl_trainer
from o3lite.training import stage as stage_lib
from o3lite.verifiers import reward_model as rm
from conftest import data_of as _data_of, set_fields as _set


def test_step_rewards_score_and_difference():
  assert alg.step_rewards([0.9, 0.6, 0.2], "score") == [0.9, 0.6, 0.2]
  diff = alg.step_rewards([0.9, 0.6, 0.2], "difference")
  np.testing.assert_allclose(diff, [0.9, -0.3, -0.4])
  assert sum(diff) == pytest.approx(0.2)  # Telescopes to the last score.
  with pytest.raises(errors.ConfigError, match="process reward mode 'sum'"):
    alg.step_rewards([0.5], "sum")


def _brute_process_advantages(r, m, mask, group_size, eps):
  out = np.zeros_like(r)
  for g in range(0, len(r), group_size):
    values = r[g:g + group_size][m[g:g + group_size] > 0]
    mean, std = values.mean(), values.std()
    for b in range(g, g + group_size):
      for t in range(r.shape[1]):
        out[b, t] = sum((r[b, u] - mean) / (std + eps) for u in range(t, r.shape[1])
                        if m[b, u]) * mask[b, t]
  return out


def test_process_advantages_are_grpo_normalized_rewards_to_go():
  rng = np.random.default_rng(0)
  B, T, G = 6, 9, 3
  mask = np.zeros((B, T), np.float32)
  m = np.zeros((B, T), np.float32)
  for b in range(B):
    n = rng.integers(3, T)
    mask[b, 1:n] = 1
    ends = rng.choice(np.arange(1, n), size=min(2, n - 1), replace=False)
    m[b, ends] = 1
  r = rng.random((B, T)).astype(np.float32) * m
  got = np.asarray(alg.process_advantages(r, m, mask, G, 1e-6))
  np.testing.assert_allclose(got, _brute_process_advantages(r, m, mask, G, 1e-6),
                             rtol=1e-5, atol=1e-5)
  for b in range(B):  # Tokens after a row's last step get nothing.
    last = np.flatnonzero(m[b]).max()
    assert np.all(got[b, last + 1:] == 0) and got[b, last] != 0


def test_a_verifier_must_read_the_policys_tokens():
  class Tok:
    vocab_size, eos_id = 3, 1

    def __init__(self, pieces):
      self.pieces = pieces

    def decode(self, ids):
      return "".join(self.pieces[i] for i in ids)

  rm.check_same_tokenizer(Tok("abc"), Tok("abc"), "x")
  with pytest.raises(errors.ConfigError, match="^rl.process_reward.verifier=/p: its "
                     "tokenizer differs from the policy's"):
    rm.check_same_tokenizer(Tok("abc"), Tok("abd"), "rl.process_reward.verifier=/p")


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_rl_with_process_rewards_from_a_frozen_prm(tiny_run, tiny_prm, tmp_path, advantage):
  config = _set(rl_config.get_config(), {
      **_data_of(tiny_run), "init_from": tiny_run, "loop.num_steps": 2,
      "rl.prompts_per_step": 8, "rl.group_size": 4, "rl.minibatch_size": 16,
      "rl.max_new_tokens": 24, "loop.log_every": 1, "loop.checkpoint_every": 2,
      "rl.advantage": advantage, "rl.process_reward.function": "prm",
      "rl.process_reward.options.verifier": tiny_prm,
      "rl.process_reward.mode": "difference", "rl.rewards.correctness": 0.0,
      "eval.num_examples": 8, "eval.batch_size": 8, "eval.max_new_tokens": 24,
      "eval.num_samples": 0, "mesh.shape": (4, 2, 1)})
  if advantage == "grpo":  # Every reward is 0: dynamic sampling drops every group and
    # tops up from the first round's, whose steps the PRM must then score.
    config = _set(config, {"rl.dynamic_sampling": True, "rl.max_sampling_rounds": 2})
  workdir = str(tmp_path / advantage)
  result = stages.run(config, workdir)
  assert result["stage"] == "rl" and {"before", "after"} <= set(result)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(l) for l in f if '"reward"' in l]
  assert [m["step"] for m in steps] == [1, 2]
  for m in steps:
    assert 0 < m["prm_step_score"] < 1 and 0 <= m["prm_low_fraction"] <= 1
    assert m["prm_steps_per_completion"] > 0
    assert m["reward"] == 0  # Outcome weight 0: the process rewards alone move the policy.
    assert m["advantage_std"] > 0 and m["update_norm"] > 0


PRM = {"rl.process_reward.function": "prm"}


def test_process_reward_config_errors(tiny_run, tiny_prm):
  base = {**_data_of(tiny_run), "init_from": tiny_run}
  # The rl section's own check, and the whole pre-run check, say the same.
  for validate in (rl_trainer.validate_rl, stage_lib.validate):
    with pytest.raises(errors.ConfigError, match="is not a verifier run folder"):
      validate(_set(rl_config.get_config(), {
          **base, **PRM, "rl.process_reward.options.verifier": tiny_run}))
    with pytest.raises(errors.ConfigError, match="^rl.process_reward.options.verifier is "
                       "empty"):
      validate(_set(rl_config.get_config(), {**base, **PRM}))
    with pytest.raises(errors.ConfigError, match="^unknown step reward 'prn'"):
      validate(_set(rl_config.get_config(), {**base, "rl.process_reward.function": "prn"}))
    with pytest.raises(errors.ConfigError, match="process reward mode 'max'"):
      validate(_set(rl_config.get_config(), {
          **base, **PRM, "rl.process_reward.options.verifier": tiny_prm,
          "rl.process_reward.mode": "max"}))
  # A config written before the step rewards were registered names the new fields.
  old = _set(rl_config.get_config(), base)
  old.rl.process_reward.verifier = tiny_prm
  with pytest.raises(errors.ConfigError, match=r"^rl.process_reward.verifier was replaced "
                     r"by rl.process_reward.options.verifier \(with "
                     r"rl.process_reward.function=prm\)$"):
    stage_lib.validate(old)
