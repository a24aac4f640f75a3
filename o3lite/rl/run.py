"""The RL stage: PPO / GRPO steps from a policy, evaluation before and after.
`python -m o3lite.train --config=configs/rl.py` runs it through the stage harness
(`o3lite.training.stage`), which owns the run folder, resume, the loop and eval.json.

Where RL starts: `init_from` (a run folder or a local Hugging Face folder), else the
nested `warm_start` section, a short SFT run in DIR/sft (resumed if interrupted).

One RL step: take `prompts_per_step` training prompts, sample `group_size` completions
each from the current policy arrays, score them with the reward functions, let the
learner score the samples (log-probs, reference log-probs, values; one minibatch at a
time), compute advantages, then `epochs` passes of minibatch updates, each the one train
step of `o3lite.training.step` with the registered "ppo_actor_critic" loss. Sampling,
scoring and the learner's arrays are `rollouts.py`'s.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from o3lite import errors
from o3lite.data import sources
from o3lite.evaluation import heldout
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.rl import algorithms as alg
from o3lite.rl import learner
from o3lite.rl import rewards as rewards_lib
from o3lite.rl import rollouts
from o3lite.sampling import draws
from o3lite.sampling import policy as policy_lib
from o3lite.training import losses
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import sft as sft_lib
from o3lite.training import stage as stage_lib
from o3lite.training import step as step_lib

WARM_START_DIR = "sft"
MEMORY_SETTINGS = ("lower rl.minibatch_size, raise rl.grad_accum_steps, set rl.vocab_chunk "
                   "(e.g. 8192) or model.remat=True")


def algo_config(rl_cfg: ml_collections.ConfigDict) -> alg.RLAlgoConfig:
  """The RLAlgoConfig fields of the `rl` section (validated)."""
  names = {f.name for f in dataclasses.fields(alg.RLAlgoConfig)}
  return alg.RLAlgoConfig(**{k: v for k, v in rl_cfg.items() if k in names})


def validate_rl(config: ml_collections.ConfigDict) -> None:
  """The `rl` section and its ties to `optimizer`, `mesh` and `eval`."""
  rl_cfg = config.rl
  algo_config(rl_cfg)
  for name in ("prompts_per_step", "group_size", "minibatch_size", "epochs",
               "max_prompt_len", "max_new_tokens", "max_sampling_rounds"):
    if rl_cfg[name] < 1:
      raise errors.ConfigError(f"rl.{name}={rl_cfg[name]} must be at least 1")
  if not rl_cfg.temperature > 0:
    raise errors.ConfigError(f"rl.temperature={rl_cfg.temperature}: rollouts need a "
                             "temperature > 0 (PPO's ratio needs a distribution)")
  rows = rl_cfg.prompts_per_step * rl_cfg.group_size
  if rows % rl_cfg.minibatch_size:
    raise errors.ConfigError(
        f"rl.minibatch_size={rl_cfg.minibatch_size} does not divide the {rows} "
        "completions of a step (prompts_per_step x group_size)")
  if rl_cfg.grad_accum_steps < 1 or rl_cfg.minibatch_size % rl_cfg.grad_accum_steps:
    raise errors.ConfigError(
        f"rl.grad_accum_steps={rl_cfg.grad_accum_steps} must be >= 1 and divide "
        f"rl.minibatch_size={rl_cfg.minibatch_size}")
  mesh, rules = stage_lib.mesh_and_rules(config)
  sharding_lib.check_batch(rl_cfg.minibatch_size // rl_cfg.grad_accum_steps, mesh, rules)
  optimizer_lib.validate(config.optimizer)
  if not (rl_cfg.value_learning_rate >= 0):
    raise errors.ConfigError(f"rl.value_learning_rate={rl_cfg.value_learning_rate} must "
                             "be a number >= 0")
  rewards_lib.validate_weights(dict(rl_cfg.rewards), options=_options(rl_cfg.reward_options))
  if rl_cfg.vocab_chunk < 0:
    raise errors.ConfigError(f"rl.vocab_chunk={rl_cfg.vocab_chunk} must be >= 0")
  process = rl_cfg.process_reward
  if process.function:
    rewards_lib.STEP_REWARDS.check_options(process.function, dict(process.options))
    alg.step_rewards([], process.mode)


def _options(section) -> dict[str, dict]:
  """`rl.reward_options` as plain dicts: {reward name: its factory's options}."""
  return {name: dict(opts) for name, opts in dict(section).items()}


@dataclasses.dataclass
class RLRun:
  """What one RL step reads: the run's model, tokenizer and mesh, its algorithm and
  rollout settings, read once from the `rl` section (`run_settings`)."""

  tokenizer: Any
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  algo: alg.RLAlgoConfig
  rollout: rollouts.RolloutSettings
  sampling: draws.Sampling
  step_reward: Callable | None = None  # fn(prompts, completions) -> [StepRewards], or None.


def run_settings(rl_cfg) -> tuple[rollouts.RolloutSettings, draws.Sampling]:
  """The rollout and sampling settings of the `rl` section."""
  rollout = rollouts.RolloutSettings(
      prompts_per_step=rl_cfg.prompts_per_step, group_size=rl_cfg.group_size,
      dynamic_sampling=rl_cfg.dynamic_sampling,
      max_sampling_rounds=rl_cfg.max_sampling_rounds)
  sampling = draws.Sampling(max_new_tokens=rl_cfg.max_new_tokens,
                            temperature=rl_cfg.temperature,
                            prompt_bucket=rl_cfg.max_prompt_len)
  return rollout, sampling


def reward_context(ctx: stage_lib.Context) -> rewards_lib.RewardContext:
  """What the run's reward factories are given."""
  return rewards_lib.RewardContext(sources.get_checker(ctx.config.data), ctx.tokenizer,
                                   ctx.mesh, ctx.rules, ctx.config.model)


def state_spec(ctx: stage_lib.Context, algo: alg.RLAlgoConfig):
  """(the RL state's StateSpec: policy, critic with PPO, frozen reference; its tx)."""
  rl_cfg = ctx.config.rl
  trees = {"policy": None}
  if algo.uses_critic:
    trees["critic"] = rl_cfg.value_learning_rate
  updates_per_step = rl_cfg.epochs * (
      rl_cfg.prompts_per_step * rl_cfg.group_size // rl_cfg.minibatch_size)
  tx, _ = optimizer_lib.make_optimizer(ctx.config.optimizer,
                                       ctx.config.loop.num_steps * updates_per_step, trees)
  return learner.state_spec(ctx.model_cfg, tx, algo.uses_critic, ctx.mesh, ctx.rules), tx


class RL(stage_lib.Stage):
  """PPO / GRPO and their variants (the `rl` section names the registered maths)."""

  name = "rl"
  log_all = True
  shown = ("reward", "accuracy", "kl_to_reference", "entropy", "response_length",
           "sampling_fraction")
  fixed = ("rl.advantage",)

  def kind(self, config) -> str:
    return f"rl-{config.rl.advantage}"

  def validate(self, config) -> None:
    validate_rl(config)
    sft_lib.validate_data(config.data)
    sft_lib.validate_eval(config.eval)
    if not config.init_from:
      stage_lib.validate(stage_lib.nested_config(config, "warm_start"))

  def source(self, config, workdir: str) -> str:
    """`init_from`, else the warm start in DIR/sft (made once, resumed if cut off)."""
    if config.init_from:
      return config.init_from
    sft_dir = os.path.join(workdir, WARM_START_DIR)
    if stage_lib.read_result(sft_dir) is None:
      nested = stage_lib.nested_config(config, "warm_start")
      print(f"SFT warm start ({nested.loop.num_steps} steps) in {sft_dir}", flush=True)
      stage_lib.run(nested, sft_dir)
    return sft_dir

  def setup(self, ctx: stage_lib.Context) -> stage_lib.Plan:
    config, rl_cfg = ctx.config, ctx.config.rl
    algo = algo_config(rl_cfg)
    spec, tx = state_spec(ctx, algo)
    rewards_ctx = reward_context(ctx)
    process = rl_cfg.process_reward
    run = RLRun(ctx.tokenizer, ctx.model_cfg, ctx.mesh, ctx.rules, algo,
                *run_settings(rl_cfg),
                rewards_lib.STEP_REWARDS.build(process.function, rewards_ctx,
                                               dict(process.options))
                if process.function else None)
    stream = rollouts.PromptStream(sources.load_examples(config.data, "train"),
                                   ctx.tokenizer, config.data.seed, rl_cfg.max_prompt_len)

    def init():
      params = ctx.source.load_policy(spec.abstract.params["policy"], ctx.model_cfg,
                                      ctx.tokenizer)
      return learner.initial_state(spec, params, algo.uses_critic, config.seed)

    scorer = rewards_lib.RewardScorer(dict(rl_cfg.rewards), rewards_ctx,
                                      rl_cfg.reward_timeout_s,
                                      options=_options(rl_cfg.reward_options))
    iterate, compile_steps = make_iterate(run, rl_cfg, spec, tx, stream, scorer,
                                          config.seed)
    evaluate = sft_lib.policy_evaluation(ctx)
    return stage_lib.Plan(
        spec=spec, init=init, iterate=iterate, evaluate=evaluate,
        evaluate_before=_evaluate_before(ctx),
        close=scorer.close, compile=compile_steps, memory_settings=MEMORY_SETTINGS)


def _evaluate_before(ctx: stage_lib.Context) -> stage_lib.Evaluate:
  """The evaluation of the starting policy (the frozen reference). When RL starts from
  its own warm start, that run's final evaluation is the same one (the nested stage
  shares `data` and `eval`, and its last parameters are the reference): it is reused,
  with its samples (DIR/sft/eval_samples.jsonl), instead of sampled again."""
  evaluate = sft_lib.policy_evaluation(ctx, lambda s: s.frozen["reference"])
  warm = os.path.join(ctx.workdir, WARM_START_DIR)
  if ctx.source is None or os.path.abspath(ctx.source.path) != os.path.abspath(warm):
    return evaluate

  def reuse(state, tag):
    result = stage_lib.read_result(warm)
    if result is None:
      return evaluate(state, tag)
    return result["metrics"], heldout.read_samples(
        warm, stage_lib.RESULT_FILE.removesuffix(".json"))
  return reuse


def make_iterate(run: RLRun, rl_cfg, spec, tx, stream: rollouts.PromptStream,
                 scorer: rewards_lib.RewardScorer, seed: int):
  """(One RL step as the loop's `iterate`: sample, score, learner batch, updates;
  its learner's steps compiled at their shapes, for the memory check)."""
  tok, algo = run.tokenizer, run.algo
  seq_len = rl_cfg.max_prompt_len + rl_cfg.max_new_tokens + 1
  batch_sharding = sharding_lib.batch_sharding(run.mesh, run.rules)
  score_fn = step_lib.jit_eval_fn(
      learner.make_score_fn(run.model_cfg, algo.uses_critic, rl_cfg.temperature,
                            rl_cfg.vocab_chunk),
      spec.shardings, batch_sharding, run.mesh, run.rules)
  loss_fn = losses.get_loss("ppo_actor_critic", run.model_cfg, algo=algo,
                            temperature=rl_cfg.temperature, vocab_chunk=rl_cfg.vocab_chunk)
  update = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, tx, rl_cfg.grad_accum_steps), spec.shardings,
      batch_sharding, run.mesh, run.rules)
  process = ((rl_cfg.process_reward.weight, rl_cfg.process_reward.mode)
             if run.step_reward is not None else None)

  def iterate(state, position, step):
    t0 = time.time()
    policy = policy_lib.Policy(state.params["policy"], run.model_cfg, tok, run.mesh,
                               run.rules)
    groups, position, stats = rollouts.sample_groups(
        policy, run.rollout, run.sampling, stream, position,
        jax.random.fold_in(state.rng, step), scorer, run.step_reward)
    t1 = time.time()
    t_sample = t1 - t0
    batch, view = rollouts.learner_batch(groups, state, score_fn, algo, seq_len,
                                         rl_cfg.minibatch_size, tok, batch_sharding,
                                         process)
    t_score = time.time() - t1
    rows = len(batch["mask"])
    order_rng = np.random.default_rng([seed, step])
    updates: list[dict] = []
    for _ in range(rl_cfg.epochs):
      order = order_rng.permutation(rows)
      for mb_start in range(0, rows, rl_cfg.minibatch_size):
        idx = order[mb_start:mb_start + rl_cfg.minibatch_size]
        mb = sharding_lib.put_global_batch({k: v[idx] for k, v in batch.items()},
                                           batch_sharding)
        state, m = update(state, mb)
        updates.append(m)
    updates = jax.device_get(updates)
    t_learn = time.time() - t1
    metrics = step_metrics(updates, batch, view, algo)
    metrics.update({
        # Learning = the scoring pass (log-probs, reference, values) + the updates.
        "time_sampling_s": t_sample, "time_learning_s": t_learn,
        "time_scoring_s": t_score,
        "sampling_fraction": t_sample / max(t_sample + t_learn, 1e-9),
        "tokens_per_second": float(batch["segment_ids"].sum()) / max(
            time.time() - t0, 1e-9),
        **{k: float(v) for k, v in stats.items()},
    })
    return state, position, metrics

  def compile_steps():
    rows = learner.abstract_batch(rl_cfg.minibatch_size, seq_len - 1, algo.uses_critic,
                                  batch_sharding)
    rollout = {k: rows[k] for k in learner.ROLLOUT_KEYS}
    return {"RL update": update.compile(spec.abstract, rows),
            "RL scoring pass": score_fn.compile(spec.abstract, rollout)}
  return iterate, compile_steps


def step_metrics(updates: list[dict], batch: dict, view: dict,
                 algo: alg.RLAlgoConfig) -> dict[str, float]:
  """An RL step's figures: the updates' means, rewards, lengths, KL, advantages, PRM."""
  mask, adv = batch["mask"], batch["advantages"]
  m_adv = adv[mask > 0]
  metrics = {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
  metrics["nonfinite"] = float(max(m["nonfinite"] for m in updates))
  metrics.update({
      "reward": float(view["scores"].mean()),
      "accuracy": float(np.nanmean(view["correct"])),
      "response_length": float(mask.sum(1).mean()),
      "kl_to_reference": float(view["kl"].sum() / max(mask.sum(), 1)),
      "entropy": float((view["entropy"] * mask).sum() / max(mask.sum(), 1)),
      "advantage_mean": float(m_adv.mean()), "advantage_std": float(m_adv.std()),
      "advantage_min": float(m_adv.min()), "advantage_max": float(m_adv.max()),
      "sampler_learner_logp_max_abs_diff": float(np.max(view["logp_gap"])),
  })
  if "prm_scores" in view:  # The PRM's view of this step's samples.
    prm_scores = view["prm_scores"]
    metrics.update(prm_step_score=float(prm_scores.mean()) if prm_scores.size else 0.0,
                   prm_low_fraction=float((prm_scores < 0.5).mean())
                   if prm_scores.size else 0.0,
                   prm_steps_per_completion=prm_scores.size / max(len(mask), 1))
  if algo.uses_critic:
    metrics["explained_variance"] = alg.explained_variance(
        batch["old_values"], batch["returns"], mask)
  return metrics


stage_lib.register(RL())
