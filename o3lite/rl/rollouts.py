"""Rollouts for RL: the stream of training prompts, sampling and scoring groups of
completions, and turning them into the learner's minibatch arrays (log-probs, values,
rewards, advantages). `run.py` drives one RL step through these; search and
self-improvement stages sample and score the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from o3lite import errors
from o3lite.data import batching
from o3lite.parallel import mesh as sharding_lib
from o3lite.rl import algorithms as alg
from o3lite.rl import rewards as rewards_lib
from o3lite.sampling import draws
from o3lite.sampling import policy as policy_lib


class PromptStream:
  """Training prompts in a seeded order, epoch after epoch; `position` counts prompts
  taken, so the stream resumes exactly from a checkpoint."""

  def __init__(self, examples, tokenizer, seed: int, max_prompt_len: int):
    self.examples = examples
    self.prompts = batching.encode_prompts(examples, tokenizer)
    if not self.prompts:
      raise errors.DataError("the RL training split has no examples")
    longest = max(len(p) for p in self.prompts)
    if longest > max_prompt_len:
      raise errors.ConfigError(f"a training prompt has {longest} tokens; "
                               f"rl.max_prompt_len is {max_prompt_len}")
    self.seed = seed
    self._epoch, self._order = -1, None  # The current epoch's permutation, drawn once.

  def take(self, position: int, n: int) -> tuple[list[int], int]:
    indices = []
    N = len(self.examples)
    for p in range(position, position + n):
      epoch, i = divmod(p, N)
      if epoch != self._epoch:
        self._epoch = epoch
        self._order = np.random.default_rng([self.seed, epoch]).permutation(N)
      indices.append(int(self._order[i]))
    return indices, position + n


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """What a step samples (the `rl` section's rollout fields, read once by the stage)."""

  prompts_per_step: int
  group_size: int  # Completions per prompt (each at most `sampling.max_new_tokens`).
  dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill.
  max_sampling_rounds: int = 1


def sample_groups(policy: policy_lib.Policy, settings: RolloutSettings,
                  sampling: draws.Sampling, stream: PromptStream, position: int,
                  key: jax.Array, scorer: rewards_lib.RewardScorer,
                  step_reward: Callable | None = None):
  """`prompts_per_step` groups of `group_size` completions of the stream's next prompts,
  sampled from `policy` (`draws.draw`, key `key` folded with the round), decoded and
  scored; with dynamic sampling (DAPO) groups whose rewards are all equal are dropped
  and refilled, up to `max_sampling_rounds`. Returns (group records, stream position
  after them, counts); with a step reward (`rewards.STEP_REWARDS`, a frozen PRM) the
  returned groups' steps are scored, once (not the groups dropped). Every process
  samples the same global batch and gets process 0's scores (`RewardScorer.score`), so
  every process keeps the same groups and takes the same number of rounds."""
  want, G = settings.prompts_per_step, settings.group_size
  kept: list[dict] = []
  stats = {"reward_failures": 0, "reward_timeouts": 0, "dropped_groups": 0,
           "sampling_rounds": 0}
  first_round: list[dict] = []  # Fallback when too few groups are informative.
  for round_index in range(max(settings.max_sampling_rounds, 1)):
    indices, position = stream.take(position, want)
    prompts = [stream.prompts[i] for i in indices]
    drawn = draws.draw(policy, prompts, G, sampling, jax.random.fold_in(key, round_index),
                       problems_per_call=want)
    examples, texts, lengths = [], [], []
    for i, d in zip(indices, drawn):
      examples += [stream.examples[i]] * G
      texts += d.texts
      lengths += d.generated_tokens
    # Scored on process 0, the same on every process: so are `keep` and the rounds.
    scores = scorer.score(examples, texts, lengths, sampling.max_new_tokens + 1)
    stats["reward_failures"] += scores.failures
    stats["reward_timeouts"] += scores.timeouts
    stats["sampling_rounds"] += 1
    total = scores.total
    keep = (alg.informative_groups(total, G) if settings.dynamic_sampling
            else np.ones(want, bool))
    stats["dropped_groups"] += int(np.sum(~keep))
    correct = np.asarray(scores.parts.get("correctness", [np.nan] * len(total)))
    for g, d in enumerate(drawn):
      record = {"prompt": d.prompt, "group": d.completions,
                "scores": total[g * G:(g + 1) * G],
                "correct": correct[g * G:(g + 1) * G], "steps": [None] * G}
      if round_index == 0:
        first_round.append(record)
      if keep[g]:
        kept.append(record)
    if len(kept) >= want:
      break
  if len(kept) < want:  # Not enough informative groups: top up with the first round's.
    kept += [r for r in first_round if not any(r is k for k in kept)][:want - len(kept)]
  kept = kept[:want]
  if step_reward is not None:  # Per-step rewards of the kept groups' completions.
    steps = step_reward([r["prompt"] for r in kept for _ in r["group"]],
                        [c.tokens for r in kept for c in r["group"]])
    for g, record in enumerate(kept):
      record["steps"] = steps[g * G:(g + 1) * G]
  return kept, position, stats


def score_in_minibatches(score_fn, state, batch, size: int, batch_sharding):
  """The learner's scoring pass, `size` rows at a time (the update's shapes: one more
  compile at most, and never a whole step's activations at once)."""
  parts = []
  rows = len(batch["inputs"])
  for start in range(0, rows, size):
    mb = {k: v[start:start + size] for k, v in batch.items()}
    parts.append(sharding_lib.to_host(score_fn(
        state, sharding_lib.put_global_batch(mb, batch_sharding))))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def process_rewards(groups: Sequence[dict], mask: np.ndarray, mode: str
                    ) -> tuple[np.ndarray, np.ndarray, list[float]]:
  """(step rewards [B, T] at each step's last token in the learner's target positions,
  their mask, every step score) of groups sampled with a step reward (`record["steps"]`,
  one `rewards.StepRewards` per completion)."""
  rewards, where, scores = np.zeros_like(mask), np.zeros_like(mask), []
  rows = [(r["prompt"], s) for r in groups for s in r["steps"]]
  for b, (prompt, steps) in enumerate(rows):
    for end, r in zip(steps.ends, alg.step_rewards(steps.scores, mode)):
      t = len(prompt) - 1 + end  # The target position of completion token `end`.
      rewards[b, t] += r
      where[b, t] = 1.0
    scores += list(steps.scores)
  return rewards, where, scores


def learner_batch(groups: Sequence[dict], state, score_fn, algo: alg.RLAlgoConfig,
                  seq_len: int, minibatch_size: int, tokenizer, batch_sharding,
                  process: tuple[float, str] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The learner's minibatch arrays for sampled groups (see `learner`): rollout rows,
  the learner's log-probs (old and reference) and values, per-token rewards (the score
  on the last completion token, minus the KL penalty where `kl_in_reward`), advantages
  and returns. Also returns what the step logs: scores, correctness, per-token KL,
  entropy and the sampler / learner log-prob gap of each row.

  `process` = (weight, mode) adds a PRM's step rewards (`alg.step_rewards`): to gae's
  per-token rewards at each step's last token, or, for the group estimators, as
  `weight` x the process advantages of `alg.process_advantages` (DeepSeekMath)."""
  advantage_fn = alg.ADVANTAGES[algo.advantage]
  kl_estimator = alg.KL_ESTIMATORS[algo.kl_estimator]
  prompts, completions, finished, sampler_logp = [], [], [], []
  for record in groups:
    for c in record["group"]:
      prompts.append(record["prompt"])
      completions.append(c.tokens)
      finished.append(c.finished)
      sampler_logp.append(c.logprobs)
  scores_B = np.concatenate([r["scores"] for r in groups]).astype(np.float32)
  correct_B = np.concatenate([r["correct"] for r in groups]).astype(np.float32)
  batch = batching.rollout_batch(prompts, completions, finished, seq_len,
                                 tokenizer.eos_id, tokenizer.pad_id)
  scored = score_in_minibatches(score_fn, state, batch, minibatch_size,
                                batch_sharding)
  mask = batch["mask"]

  # Sampler vs learner log-probs of the same tokens, at the same temperature (EOS
  # excluded: the sampler does not report its log-prob).
  diffs = []
  for b, (prompt, lp) in enumerate(zip(prompts, sampler_logp)):
    first = len(prompt) - 1
    diffs.append(np.max(np.abs(scored["logp"][b, first:first + len(lp)] - lp))
                 if lp else 0.0)
  kl_BxT = np.asarray(kl_estimator(scored["logp"], scored["ref_logp"])) * mask
  last = np.maximum(mask.sum(1).astype(int), 1) + np.array(
      [len(p) - 2 for p in prompts])
  token_rewards = np.zeros_like(mask)
  token_rewards[np.arange(len(prompts)), last] = scores_B
  if algo.kl_coef and algo.kl_in_reward:
    token_rewards = token_rewards - algo.kl_coef * kl_BxT
  prm_scores = None
  if process is not None:
    weight, mode = process
    step_r, step_m, prm_scores = process_rewards(groups, mask, mode)
    if algo.uses_critic:
      token_rewards = token_rewards + weight * step_r
  values = scored.get("values", np.zeros_like(mask))
  adv, returns = advantage_fn(alg.AdvantageInputs(scores_B, token_rewards, values, mask),
                              algo)
  adv, returns = np.asarray(adv, np.float32), (None if returns is None
                                               else np.asarray(returns, np.float32))
  if process is not None and not algo.uses_critic:
    adv = adv + weight * np.asarray(alg.process_advantages(step_r, step_m, mask,
                                                           algo.group_size, algo.eps),
                                    np.float32)
  batch.update(old_logp=scored["logp"].astype(np.float32),
               ref_logp=scored["ref_logp"].astype(np.float32), advantages=adv)
  if algo.uses_critic:
    batch.update(returns=returns, old_values=values.astype(np.float32))
  view = {"scores": scores_B, "correct": correct_B, "kl": kl_BxT,
          "entropy": scored["entropy"], "logp_gap": np.asarray(diffs, np.float32)}
  if prm_scores is not None:
    view["prm_scores"] = np.asarray(prm_scores, np.float32)
  return batch, view
