"""RL maths against hand-computed values."""

import math

import numpy as np
import pytest

from o3lite import errors
from o3lite.rl import algorithms as alg


def _inputs(scores, T=3, mask=None, token_rewards=None, values=None):
  B = len(scores)
  mask = np.ones((B, T), np.float32) if mask is None else np.asarray(mask, np.float32)
  zeros = np.zeros((B, T), np.float32)
  return alg.AdvantageInputs(
      np.asarray(scores, np.float32),
      zeros if token_rewards is None else np.asarray(token_rewards, np.float32),
      zeros if values is None else np.asarray(values, np.float32), mask)


def test_grpo_dr_grpo_rloo_hand_values():
  scores = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # Two groups of 4.
  mask = np.ones((8, 2), np.float32)
  mask[1, 1] = 0  # Padding gets no advantage.
  inputs = _inputs(scores, T=2, mask=mask)
  # Group 1: mean 0.5, population std 0.5 -> +-1; group 2: all equal -> 0.
  cfg = alg.RLAlgoConfig(advantage="grpo", group_size=4, eps=0.0 + 1e-12)
  adv, returns = alg.ADVANTAGES["grpo"](inputs, cfg)
  assert returns is None
  np.testing.assert_allclose(np.asarray(adv)[:, 0], [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-6)
  assert np.asarray(adv)[1, 1] == 0 and np.asarray(adv)[0, 1] == pytest.approx(1.0)
  adv, _ = alg.ADVANTAGES["dr_grpo"](inputs, alg.RLAlgoConfig(advantage="dr_grpo",
                                                              group_size=4))
  np.testing.assert_allclose(np.asarray(adv)[:, 0], [.5, -.5, -.5, .5, 0, 0, 0, 0])
  # RLOO: r_i - mean of the 3 others: 1 - 1/3, 0 - 2/3, ...
  adv, _ = alg.ADVANTAGES["rloo"](inputs, alg.RLAlgoConfig(advantage="rloo", group_size=4))
  np.testing.assert_allclose(np.asarray(adv)[:4, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3],
                             atol=1e-6)


def test_gae_hand_values():
  # One sequence: a prompt token (mask 0), 3 completion tokens, one padding token.
  mask = [[0, 1, 1, 1, 0]]
  rewards = [[0, 0, 0, 1.0, 0]]
  values = [[9.0, 0.5, 0.6, 0.7, 9.0]]  # Values outside the mask are ignored.
  cfg = alg.RLAlgoConfig(advantage="gae", gamma=0.9, lam=0.5)
  adv, returns = alg.gae(_inputs([1.0], T=5, mask=mask, token_rewards=rewards,
                                 values=values), cfg)
  d3 = 1.0 - 0.7                        # r + gamma * 0 - V
  d2 = 0.0 + 0.9 * 0.7 - 0.6
  d1 = 0.0 + 0.9 * 0.6 - 0.5
  a3 = d3
  a2 = d2 + 0.45 * a3
  a1 = d1 + 0.45 * a2
  np.testing.assert_allclose(np.asarray(adv)[0], [0, a1, a2, a3, 0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(returns)[0], [0, a1 + .5, a2 + .6, a3 + .7, 0],
                             atol=1e-6)
  # gamma = lam = 1: every advantage is the final reward minus the value.
  adv, returns = alg.gae(_inputs([1.0], T=5, mask=mask, token_rewards=rewards,
                                 values=values), alg.RLAlgoConfig(gamma=1.0, lam=1.0))
  np.testing.assert_allclose(np.asarray(adv)[0, 1:4], [0.5, 0.4, 0.3], atol=1e-6)
  np.testing.assert_allclose(np.asarray(returns)[0, 1:4], [1, 1, 1], atol=1e-6)


def test_ppo_loss_clip_higher_and_dual_clip():
  logp = np.log(np.array([[1.5, 0.5, 1.1, 0.1]], np.float32))  # Ratios (old_logp = 0).
  old = np.zeros_like(logp)
  adv = np.array([[1.0, -1.0, 1.0, -1.0]], np.float32)
  cfg = alg.RLAlgoConfig(clip_low=0.2, clip_high=0.28)
  loss, clipped = alg.ppo_loss(logp, old, adv, cfg)
  # A>0, ratio 1.5 -> clipped at 1.28; A<0, ratio .5 -> max(.5, .8) = .8; inside: -1.1;
  # A<0, ratio .1 -> .8.
  np.testing.assert_allclose(np.asarray(loss)[0], [-1.28, 0.8, -1.1, 0.8], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(clipped)[0], [1, 1, 0, 1])
  # Dual clip caps the loss of a negative advantage at c * |A|.
  logp2 = np.log(np.array([[5.0, 2.0]], np.float32))
  adv2 = np.array([[-1.0, -1.0]], np.float32)
  loss2, _ = alg.ppo_loss(logp2, np.zeros_like(logp2), adv2,
                          alg.RLAlgoConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0))
  np.testing.assert_allclose(np.asarray(loss2)[0], [3.0, 2.0], atol=1e-5)


def test_kl_estimators():
  logp = np.array([[math.log(0.5)]], np.float32)
  ref = np.array([[math.log(0.25)]], np.float32)
  d = math.log(2.0)
  assert float(alg.kl_k1(logp, ref)[0, 0]) == pytest.approx(d, rel=1e-6)
  assert float(alg.kl_k2(logp, ref)[0, 0]) == pytest.approx(d * d / 2, rel=1e-6)
  assert float(alg.kl_k3(logp, ref)[0, 0]) == pytest.approx(0.5 - 1 + d, rel=1e-6)
  for name in ("k1", "k2", "k3"):  # Zero when the policies agree.
    assert float(alg.KL_ESTIMATORS[name](logp, logp)[0, 0]) == 0.0
  # k1 and k3 are unbiased: their mean under p is KL(p || q) exactly (2 outcomes).
  p, q = np.array([0.7, 0.3]), np.array([0.4, 0.6])
  kl = float(np.sum(p * np.log(p / q)))
  for name in ("k1", "k3"):
    vals = np.asarray(alg.KL_ESTIMATORS[name](np.log(p)[None], np.log(q)[None]))[0]
    assert float(np.sum(p * vals)) == pytest.approx(kl, rel=1e-6)


def test_loss_aggregations():
  loss = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  # Each returns (sum, count); the loss is their ratio.
  assert [float(x) for x in alg.token_mean(loss, mask)] == [10, 4]
  assert [float(x) for x in alg.seq_mean_token_mean(loss, mask)] == [2 + 4, 2]
  assert [float(x) for x in alg.seq_mean_token_sum(loss, mask)] == [6 + 4, 2]
  assert float(alg.aggregate("token-mean", loss, mask)) == pytest.approx(10 / 4)
  assert float(alg.aggregate("seq-mean-token-mean", loss, mask)) == pytest.approx(3)
  assert float(alg.aggregate("seq-mean-token-sum", loss, mask)) == pytest.approx(5)
  # Sums over two halves of a batch, divided once, equal the whole batch's value.
  halves = [alg.seq_mean_token_mean(loss[i:i + 1], mask[i:i + 1]) for i in range(2)]
  assert sum(float(s) for s, _ in halves) / sum(float(c) for _, c in halves) == 3


def test_value_loss_clipping():
  v = np.array([[1.0, 0.0]], np.float32)
  old = np.array([[0.0, 0.0]], np.float32)
  ret = np.array([[1.0, 1.0]], np.float32)
  # Token 0: V moved 1.0 from old, clipped to 0.2 -> max(0, 0.64) / 2.
  np.testing.assert_allclose(np.asarray(alg.value_loss(v, old, ret, 0.2))[0], [0.32, 0.5])
  np.testing.assert_allclose(np.asarray(alg.value_loss(v, old, ret, 0.0))[0], [0.0, 0.5])


def test_dynamic_sampling_and_explained_variance():
  keep = alg.informative_groups([1, 1, 0, 1, 0, 0, 0.5, 0.5], group_size=2)
  assert keep.tolist() == [False, True, False, False]
  assert alg.explained_variance([1, 2, 3], [1, 2, 3], [1, 1, 1]) == 1.0
  assert alg.explained_variance([0, 0, 0, 9], [1, 2, 3, 0], [1, 1, 1, 0]) == pytest.approx(
      1 - np.var([1, 2, 3]) / np.var([1, 2, 3]))


def test_config_validation_names_the_problem():
  with pytest.raises(errors.O3liteError, match="unknown advantage estimator 'ppo2'"):
    alg.RLAlgoConfig(advantage="ppo2")
  with pytest.raises(errors.O3liteError, match="unknown KL estimator 'k4'"):
    alg.RLAlgoConfig(kl_estimator="k4")
  with pytest.raises(errors.O3liteError, match="group_size=1 is too small for rloo"):
    alg.RLAlgoConfig(advantage="rloo", group_size=1)
  for advantage in ("grpo", "dr_grpo", "rloo"):  # They read no per-token reward.
    with pytest.raises(errors.ConfigError, match=f"kl_in_reward=True with advantage='{advantage}'"):
      alg.RLAlgoConfig(advantage=advantage, kl_coef=0.1, kl_in_reward=True)
  alg.RLAlgoConfig(advantage="gae", kl_coef=0.1, kl_in_reward=True)  # GAE reads them.
  with pytest.raises(errors.O3liteError, match="dual_clip"):
    alg.RLAlgoConfig(dual_clip=0.5)
