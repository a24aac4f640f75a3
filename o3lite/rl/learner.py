"""The RL learner: its train state, the scoring pass, and the registered PPO loss that
the one train step (`o3lite.training.step`) optimizes.

State (a `TrainState`):
  params  {"policy": <transformer>, "critic": {"trunk", "head", "bias"}}  (critic: PPO)
  frozen  {"reference": <transformer>}  (the KL anchor)
The sampler reads `state.params["policy"]`, the very arrays the step updates, so there
is no weight sync.

Minibatch arrays, all [B, T] (rows are prompt + completion, left-aligned, padded):
  inputs, targets, positions, segment_ids   as in SFT
  mask         1 on targets the policy sampled (completion tokens, EOS included)
  old_logp     log-prob of each target under the policy that sampled, at the sampling
               temperature (recomputed by the learner; the sampler's own are compared)
  ref_logp     log-prob under the frozen reference policy, same temperature
  advantages   per token
  returns, old_values   per token (critic only)

Log-probabilities come from `losses.policy_token_logprobs`: log-sum-exp over vocabulary
chunks of `vocab_chunk` columns, never a [B, T, V] log-softmax, so a 150k vocabulary
fits (bench/rl_memory.py measures it).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from o3lite.model import heads
from o3lite.model import transformer as model_lib
from o3lite.rl import algorithms as alg
from o3lite.training import losses
from o3lite.training import state as state_lib

Batch = dict[str, jax.Array]
# A rollout row's arrays (`batching.rollout_batch`), then what the scoring pass adds.
ROLLOUT_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask")
SCORED_KEYS = ("old_logp", "ref_logp", "advantages")
CRITIC_KEYS = ("returns", "old_values")


def abstract_batch(rows: int, length: int, use_critic: bool, sharding
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one minibatch of `rows` learner rows of `length` tokens, for compiling
  ahead of time (the memory check, bench/rl_memory.py)."""
  keys = ROLLOUT_KEYS + SCORED_KEYS + (CRITIC_KEYS if use_critic else ())
  floats = ("mask",) + SCORED_KEYS + CRITIC_KEYS
  return {k: jax.ShapeDtypeStruct((rows, length), jnp.float32 if k in floats else jnp.int32,
                                  sharding=sharding) for k in keys}


def state_spec(model_cfg: model_lib.ModelConfig, tx, use_critic: bool, mesh, rules
               ) -> state_lib.StateSpec:
  """Shapes and shardings of the RL state (allocating nothing until `create`)."""

  def init_boxed(rng):
    policy = model_lib.init_params(model_cfg, rng)
    params = {"policy": policy}
    if use_critic:
      params["critic"] = heads.init_scalar_head(model_cfg, jax.random.fold_in(rng, 1))
    return params, {"reference": policy}

  return state_lib.StateSpec(init_boxed, tx, mesh, rules)


def initial_state(spec: state_lib.StateSpec, policy_params, use_critic: bool, seed: int):
  """The RL start: policy and reference from `policy_params` (e.g. the SFT result); the
  critic's trunk starts from the policy too, with a zero head and bias."""
  params = {"policy": policy_params}
  if use_critic:
    head_shardings = spec.shardings.params["critic"]
    zeros = lambda a, s: jax.device_put(jnp.zeros(a.shape, a.dtype), s)
    params["critic"] = {
        "trunk": policy_params,
        "head": zeros(spec.abstract.params["critic"]["head"], head_shardings["head"]),
        "bias": zeros(spec.abstract.params["critic"]["bias"], head_shardings["bias"])}
  return spec.around(params, {"reference": policy_params}, seed)


def make_score_fn(model_cfg: model_lib.ModelConfig, use_critic: bool, temperature: float,
                  vocab_chunk: int = 0) -> Callable:
  """`(state, batch) -> {"logp", "ref_logp", "entropy"[, "values"]}`: the learner's view
  of fresh samples before any update, at the temperature they were sampled at."""
  critic = heads.ScalarHead(model_cfg)

  def score(state, batch: Batch):
    logp, entropy = losses.policy_token_logprobs(
        state.params["policy"], batch, model_cfg, vocab_chunk, True, temperature)
    ref_logp, _ = losses.policy_token_logprobs(
        state.frozen["reference"], batch, model_cfg, vocab_chunk, False, temperature)
    out = {"logp": logp, "ref_logp": ref_logp, "entropy": entropy}
    if use_critic:
      out["values"] = critic.apply({"params": state.params["critic"]}, batch["inputs"],
                                   batch["positions"], batch["segment_ids"])
    return out

  return score


@losses.register_loss("ppo_actor_critic")
def ppo_actor_critic(model_cfg: model_lib.ModelConfig, algo: alg.RLAlgoConfig,
                     temperature: float = 1.0, vocab_chunk: int = 0) -> Callable:
  """The PPO / GRPO objective over one minibatch (policy and, for gae, the critic):

    L = agg(pg_t + kl_coef * kl_t - entropy_coef * H_t)  +  mean_t value_loss_t

  pg_t: `algo.policy_loss` (clipped surrogate; Schulman et al. 2017); kl_t:
  `algo.kl_estimator` to the reference (in the loss unless `kl_in_reward`); H_t: the
  policy's entropy, computed only when entropy_coef != 0; agg: `algo.loss_aggregation`.
  The critic's clipped value loss is a token mean; the two terms touch disjoint trees,
  so the sum gives each its own gradient. Returns sums (see `losses.LossSums`); the value
  term is scaled to the policy term's count per microbatch: exact without gradient
  accumulation, and with it under token-mean aggregation (both count tokens).
  """
  critic = heads.ScalarHead(model_cfg)
  policy_loss = alg.POLICY_LOSSES[algo.policy_loss]
  kl_estimator = alg.KL_ESTIMATORS[algo.kl_estimator]
  aggregation = alg.AGGREGATIONS[algo.loss_aggregation]

  def loss_fn(params, frozen, batch: Batch) -> losses.LossSums:
    del frozen  # The reference's log-probs come with the batch (`ref_logp`).
    mask = batch["mask"]
    tokens = jnp.sum(mask)
    logp, entropy = losses.policy_token_logprobs(
        params["policy"], batch, model_cfg, vocab_chunk, bool(algo.entropy_coef),
        temperature)
    pg, clipped = policy_loss(logp, batch["old_logp"], batch["advantages"], algo)
    kl = kl_estimator(logp, batch["ref_logp"])
    per_token = pg
    if algo.kl_coef and not algo.kl_in_reward:
      per_token = per_token + algo.kl_coef * kl
    if algo.entropy_coef:
      per_token = per_token - algo.entropy_coef * entropy
    loss_sum, count = aggregation(per_token, mask)
    token_sum = lambda x: (jnp.sum(x * mask), tokens)
    metrics = {"policy_loss": aggregation(pg, mask), "kl": token_sum(kl),
               "clip_fraction": token_sum(clipped),
               "approx_kl_to_old": token_sum(0.5 * jnp.square(logp - batch["old_logp"]))}
    if algo.entropy_coef:
      metrics["entropy_in_loss"] = token_sum(entropy)
    if algo.uses_critic:
      values = critic.apply({"params": params["critic"]}, batch["inputs"],
                            batch["positions"], batch["segment_ids"])
      v_loss = alg.value_loss(values, batch["old_values"], batch["returns"],
                              algo.value_clip)
      v_sum, v_count = token_sum(v_loss)
      metrics["value_loss"] = (v_sum, v_count)
      loss_sum = loss_sum + v_sum * count / jnp.maximum(v_count, 1.0)
    return losses.LossSums(loss_sum, count, metrics)

  return loss_fn
