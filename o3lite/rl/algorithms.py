"""RL maths as small pure functions, registered by name and picked in the config.

Shapes: B sequences, T tokens; `mask_BxT` is 1 on completion tokens (the ones the policy
chose), 0 on prompt and padding. Log-probabilities are of the token actually taken.

  advantage estimators  ADVANTAGES[name](AdvantageInputs, RLAlgoConfig) -> (adv, returns)
  policy losses         POLICY_LOSSES[name](logp, old_logp, adv, cfg) -> (loss, clipped)
  KL estimators         KL_ESTIMATORS[name](logp, ref_logp) -> kl     (per token)
  loss aggregation      AGGREGATIONS[name](loss_BxT, mask_BxT) -> (sum, count)
                        (the train step adds both over microbatches, then divides)
  process rewards       step_rewards(prm_scores, mode), process_advantages(...) (a PRM's
                        dense reward per step: in gae's token rewards, or GRPO-normalized)

Every function works on numpy or jax arrays and inside `jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from o3lite import errors
from o3lite.registry import Registry

ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
KL_ESTIMATORS = Registry("KL estimator")
AGGREGATIONS = Registry("loss aggregation")
register_advantage_estimator = ADVANTAGES.register
register_policy_loss = POLICY_LOSSES.register
register_kl_estimator = KL_ESTIMATORS.register
register_aggregation = AGGREGATIONS.register


@dataclasses.dataclass(frozen=True)
class RLAlgoConfig:
  """The algorithm half of a run config's `rl` section, validated on construction."""

  advantage: str = "grpo"  # gae | grpo | dr_grpo | rloo
  policy_loss: str = "ppo"
  loss_aggregation: str = "token-mean"
  group_size: int = 8  # Completions per prompt (outcome estimators normalize over them).
  gamma: float = 1.0  # GAE discount.
  lam: float = 0.95  # GAE lambda.
  clip_low: float = 0.2  # Ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO: 0.28 high).
  clip_high: float = 0.2
  dual_clip: float = 0.0  # Dual-clip constant c > 1 (Ye et al. 2020); 0 = off.
  value_clip: float = 0.2  # PPO value clipping around the old values; 0 = off.
  kl_estimator: str = "k3"
  kl_coef: float = 0.0  # Weight of the KL to the reference policy.
  kl_in_reward: bool = False  # True: -kl_coef * KL per token in the reward; False: in the loss.
  entropy_coef: float = 0.0  # Entropy bonus weight.
  eps: float = 1e-6  # Added to the group std (grpo).

  def __post_init__(self):
    ADVANTAGES.lookup(self.advantage)
    POLICY_LOSSES.lookup(self.policy_loss)
    KL_ESTIMATORS.lookup(self.kl_estimator)
    AGGREGATIONS.lookup(self.loss_aggregation)
    if self.group_size < 1 or (self.advantage == "rloo" and self.group_size < 2):
      raise errors.ConfigError(f"group_size={self.group_size} is too small for {self.advantage}")
    if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
      raise errors.ConfigError(f"clip_low={self.clip_low}, clip_high={self.clip_high} out of range")
    if self.kl_in_reward and self.kl_coef and self.advantage != "gae":
      raise errors.ConfigError(
          f"kl_in_reward=True with advantage={self.advantage!r}: only gae reads per-token "
          "rewards, so the KL penalty would be dropped; set kl_in_reward=False (KL in "
          "the loss, as GRPO does) or advantage='gae'")
    if self.dual_clip and self.dual_clip <= 1:
      raise errors.ConfigError(f"dual_clip={self.dual_clip} must be > 1 (or 0 for off)")

  @property
  def uses_critic(self) -> bool:
    return self.advantage == "gae"


# ---------------------------------------------------------------------------------------
# Advantage estimators.


@dataclasses.dataclass
class AdvantageInputs:
  scores_B: Any  # Outcome reward of each sequence; groups are consecutive rows.
  token_rewards_BxT: Any  # Per-token rewards: the score on the last completion token,
  #                         plus any per-token KL penalty (used by gae).
  values_BxT: Any  # Critic values V(s_t) of each completion position (gae only).
  mask_BxT: Any


def _group(x_B, group_size: int):
  return x_B.reshape(-1, group_size)


def _broadcast(adv_B, mask_BxT):
  return adv_B[:, None] * mask_BxT


@register_advantage_estimator("gae")
def gae(inputs: AdvantageInputs, cfg: RLAlgoConfig):
  """Generalized advantage estimation (Schulman et al. 2016), as in PPO for LLMs
  (Ouyang et al. 2022):

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = sum_l (gamma * lam)^l delta_{t+l},
    returns R_t = A_t + V_t,

  over completion tokens only (V after the last completion token is 0).
  """
  r_BxT = inputs.token_rewards_BxT * inputs.mask_BxT
  v_BxT = inputs.values_BxT * inputs.mask_BxT
  m_BxT = inputs.mask_BxT
  next_v_BxT = jnp.concatenate([v_BxT[:, 1:], jnp.zeros_like(v_BxT[:, :1])], axis=1)
  delta_BxT = (r_BxT + cfg.gamma * next_v_BxT - v_BxT) * m_BxT

  def back(carry_B, xs):
    delta_B, m_B = xs
    adv_B = delta_B + cfg.gamma * cfg.lam * carry_B
    adv_B = adv_B * m_B + carry_B * (1 - m_B)  # Padding passes the carry through.
    return adv_B, adv_B

  _, adv_TxB = jax.lax.scan(back, jnp.zeros(delta_BxT.shape[0], delta_BxT.dtype),
                            (delta_BxT.T, m_BxT.T), reverse=True)
  adv_BxT = adv_TxB.T * m_BxT
  return adv_BxT, (adv_BxT + v_BxT) * m_BxT


@register_advantage_estimator("grpo")
def grpo(inputs: AdvantageInputs, cfg: RLAlgoConfig):
  """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean(r_group)) / (std(r_group)
  + eps), the same for every token of completion i; std is the population std."""
  r_GxN = _group(inputs.scores_B, cfg.group_size)
  adv_GxN = (r_GxN - r_GxN.mean(axis=1, keepdims=True)) / (
      r_GxN.std(axis=1, keepdims=True) + cfg.eps)
  return _broadcast(adv_GxN.reshape(-1), inputs.mask_BxT), None


@register_advantage_estimator("dr_grpo")
def dr_grpo(inputs: AdvantageInputs, cfg: RLAlgoConfig):
  """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): A_i = r_i -
  mean(r_group): no std normalization (pair it with a loss aggregation that has no length
  normalization, e.g. seq-mean-token-sum)."""
  r_GxN = _group(inputs.scores_B, cfg.group_size)
  adv_GxN = r_GxN - r_GxN.mean(axis=1, keepdims=True)
  return _broadcast(adv_GxN.reshape(-1), inputs.mask_BxT), None


@register_advantage_estimator("rloo")
def rloo(inputs: AdvantageInputs, cfg: RLAlgoConfig):
  """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i -
  mean_{j != i} r_j = n / (n - 1) * (r_i - mean(r_group))."""
  r_GxN = _group(inputs.scores_B, cfg.group_size)
  n = cfg.group_size
  adv_GxN = (r_GxN.sum(axis=1, keepdims=True) - r_GxN) / (n - 1)
  adv_GxN = r_GxN - adv_GxN
  return _broadcast(adv_GxN.reshape(-1), inputs.mask_BxT), None


# Process rewards: a reward per step (a PRM's), at the step's last token.


def step_rewards(probabilities: Sequence[float], mode: str) -> list[float]:
  """Dense rewards of one completion's steps from a PRM's step scores p_1..p_n:

    score       r_i = p_i                       (Math-Shepherd's step-by-step PPO)
    difference  r_i = p_i - p_{i-1}, p_0 = 0    (the change the step makes; sums to p_n)
  """
  if mode == "score":
    return [float(p) for p in probabilities]
  if mode == "difference":
    return [float(p - q) for p, q in zip(probabilities, [0.0, *probabilities[:-1]])]
  raise errors.ConfigError(f"process reward mode {mode!r}: expected 'score' or 'difference'")


def process_advantages(step_rewards_BxT, step_mask_BxT, mask_BxT, group_size: int,
                       eps: float = 1e-6):
  """GRPO with process supervision (Shao et al. 2024, DeepSeekMath, section 4.1.3): each
  step reward is normalized over all steps of its group,

    r~_j = (r_j - mean(R_group)) / (std(R_group) + eps),

  and a token's advantage is the sum of the normalized rewards of the steps that end at
  or after it: A_t = sum_{j: end(j) >= t} r~_j. Step rewards sit at their steps' last
  tokens (`step_mask_BxT` 1 there); rows with no steps get 0.
  """
  r_BxT, m_BxT = jnp.asarray(step_rewards_BxT), jnp.asarray(step_mask_BxT)
  B, T = r_BxT.shape
  r_GxNT = r_BxT.reshape(-1, group_size * T)
  m_GxNT = m_BxT.reshape(-1, group_size * T)
  n_G = jnp.maximum(m_GxNT.sum(axis=1, keepdims=True), 1.0)
  mean_G = (r_GxNT * m_GxNT).sum(axis=1, keepdims=True) / n_G
  var_G = (((r_GxNT - mean_G) ** 2) * m_GxNT).sum(axis=1, keepdims=True) / n_G
  normed_BxT = ((r_GxNT - mean_G) / (jnp.sqrt(var_G) + eps) * m_GxNT).reshape(B, T)
  to_go_BxT = jnp.flip(jnp.cumsum(jnp.flip(normed_BxT, axis=1), axis=1), axis=1)
  return to_go_BxT * jnp.asarray(mask_BxT)


# ---------------------------------------------------------------------------------------
# Policy losses.


@register_policy_loss("ppo")
def ppo_loss(logp_BxT, old_logp_BxT, adv_BxT, cfg: RLAlgoConfig):
  """PPO clipped surrogate (Schulman et al. 2017), per token:

    ratio = exp(logp - old_logp)
    L = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)

  clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025). With dual_clip = c > 1
  (Ye et al. 2020), for A < 0 the loss is further capped at -c * A.
  Returns (loss_BxT, clipped_BxT): clipped marks tokens where the clipped term won.
  """
  ratio = jnp.exp(logp_BxT - old_logp_BxT)
  unclipped = -ratio * adv_BxT
  clipped = -jnp.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * adv_BxT
  loss = jnp.maximum(unclipped, clipped)
  if cfg.dual_clip:
    loss = jnp.where(adv_BxT < 0, jnp.minimum(loss, -cfg.dual_clip * adv_BxT), loss)
  return loss, (clipped > unclipped).astype(jnp.float32)


def value_loss(values_BxT, old_values_BxT, returns_BxT, clip: float):
  """PPO value loss with clipping (as in OpenAI baselines / Ouyang et al. 2022), per token:

    V_clip = old_V + clip(V - old_V, -clip, clip)
    L = 0.5 * max((V - R)^2, (V_clip - R)^2)      (clip = 0: 0.5 * (V - R)^2)
  """
  loss = jnp.square(values_BxT - returns_BxT)
  if clip:
    clipped = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip, clip)
    loss = jnp.maximum(loss, jnp.square(clipped - returns_BxT))
  return 0.5 * loss


# ---------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence"), per token, of
# KL(policy || reference) from samples of the policy; delta = logp - ref_logp.


@register_kl_estimator("k1")
def kl_k1(logp_BxT, ref_logp_BxT):
  """k1 = logp - ref_logp: unbiased, high variance, can be negative."""
  return logp_BxT - ref_logp_BxT


@register_kl_estimator("k2")
def kl_k2(logp_BxT, ref_logp_BxT):
  """k2 = (logp - ref_logp)^2 / 2: biased, low variance, >= 0."""
  return 0.5 * jnp.square(logp_BxT - ref_logp_BxT)


@register_kl_estimator("k3")
def kl_k3(logp_BxT, ref_logp_BxT):
  """k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp): unbiased, low variance, >= 0
  (used by GRPO)."""
  log_ratio = ref_logp_BxT - logp_BxT
  return jnp.exp(log_ratio) - 1 - log_ratio


# ---------------------------------------------------------------------------------------
# Loss aggregation.


@register_aggregation("token-mean")
def token_mean(loss_BxT, mask_BxT):
  """sum(loss * mask) / sum(mask): every token of the batch weighs the same (DAPO)."""
  return jnp.sum(loss_BxT * mask_BxT), jnp.sum(mask_BxT)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(loss_BxT, mask_BxT):
  """mean over sequences of each sequence's token mean (original GRPO); sequences with
  no completion token do not count."""
  tokens_B = jnp.sum(mask_BxT, axis=1)
  per_seq = jnp.sum(loss_BxT * mask_BxT, axis=1) / jnp.maximum(tokens_B, 1.0)
  has = (tokens_B > 0).astype(per_seq.dtype)
  return jnp.sum(per_seq * has), jnp.sum(has)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(loss_BxT, mask_BxT):
  """mean over sequences of each sequence's token sum (Dr. GRPO: no length bias)."""
  return jnp.sum(loss_BxT * mask_BxT), jnp.asarray(mask_BxT.shape[0], jnp.float32)


def aggregate(name: str, loss_BxT, mask_BxT):
  """The aggregated loss itself: sum / count of `AGGREGATIONS[name]`."""
  total, count = AGGREGATIONS[name](loss_BxT, mask_BxT)
  return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------
# DAPO dynamic sampling.


def informative_groups(scores_B, group_size: int) -> np.ndarray:
  """DAPO dynamic sampling (Yu et al. 2025): a group whose rewards are all equal has zero
  advantage everywhere and teaches nothing; True for the groups to keep."""
  r_GxN = np.asarray(scores_B).reshape(-1, group_size)
  return ~np.all(r_GxN == r_GxN[:, :1], axis=1)


def explained_variance(values, returns, mask) -> float:
  """1 - Var(returns - values) / Var(returns) over masked tokens (1 = perfect critic)."""
  m = np.asarray(mask) > 0
  v, r = np.asarray(values)[m], np.asarray(returns)[m]
  var = np.var(r)
  return float(1 - np.var(r - v) / var) if var > 0 else float("nan")
