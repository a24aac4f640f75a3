"""The RL run: SFT warm start (if needed), then PPO / GRPO steps, evaluation before and
after. `run_rl(config, workdir)` is what `python -m o3lite.train --config=configs/rl.py`
calls.

One RL step: take `prompts_per_step` training prompts, sample `group_size` completions
each from the current policy arrays, score them with the reward functions, let the
learner score the samples (log-probs, reference log-probs, values), compute advantages,
then `epochs` passes of minibatch updates. A rerun with the same workdir resumes from the
latest checkpoint (policy, critic, reference, optimizer states, RNG, data position).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from o3lite import algorithms as alg
from o3lite import checkpoint as checkpoint_lib
from o3lite import evaluation
from o3lite import hf
from o3lite import metrics as metrics_lib
from o3lite import model as model_lib
from o3lite import rewards as rewards_lib
from o3lite import rl
from o3lite import sampling
from o3lite import sharding as sharding_lib
from o3lite import tokenizer as tokenizer_lib
from o3lite import trainer
from o3lite.data import pipeline
from o3lite.data import sources


def algo_config(rl_cfg: ml_collections.ConfigDict) -> alg.RLAlgoConfig:
  """The RLAlgoConfig fields of the `rl` section (validated)."""
  names = {f.name for f in dataclasses.fields(alg.RLAlgoConfig)}
  return alg.RLAlgoConfig(**{k: v for k, v in rl_cfg.items() if k in names})


def _optimizer(rl_cfg, learning_rate: float) -> optax.GradientTransformation:
  schedule = optax.linear_schedule(0.0, learning_rate, max(rl_cfg.warmup_steps, 1))
  return optax.chain(optax.clip_by_global_norm(rl_cfg.grad_clip_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.99, eps=1e-8,
                                 weight_decay=rl_cfg.weight_decay))


def warm_start(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where RL starts: `rl.init_from_hf` (a Hugging Face folder), else `rl.sft_init` (an
  o3lite run), else a short SFT run in DIR/sft (with the config's `train`, `optimizer`
  and `data` sections; resumed if interrupted)."""
  if config.rl.init_from_hf and config.rl.sft_init:
    raise ValueError("set one of rl.sft_init and rl.init_from_hf, not both")
  if config.rl.init_from_hf:
    if not os.path.isfile(os.path.join(config.rl.init_from_hf, hf.CONFIG_FILE)):
      raise FileNotFoundError(f"rl.init_from_hf={config.rl.init_from_hf}: no "
                              f"{hf.CONFIG_FILE} there")
    return config.rl.init_from_hf
  if config.rl.sft_init:
    if not os.path.isfile(os.path.join(config.rl.sft_init, "model_config.json")):
      raise FileNotFoundError(f"rl.sft_init={config.rl.sft_init} is not an o3lite run "
                              "folder (no model_config.json)")
    return config.rl.sft_init
  sft_dir = os.path.join(workdir, "sft")
  if os.path.isfile(os.path.join(sft_dir, "eval.json")):
    return sft_dir
  sft_config = ml_collections.ConfigDict(config.to_dict())
  del sft_config["rl"]
  sft_config.method = "sft"
  print(f"SFT warm start ({config.train.num_steps} steps) in {sft_dir}", flush=True)
  trainer.run_sft(sft_config, sft_dir)
  return sft_dir


@dataclasses.dataclass
class RLRun:
  config: ml_collections.ConfigDict
  workdir: str
  sft_dir: str
  tokenizer: Any
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  algo: alg.RLAlgoConfig
  tx: Any
  value_tx: Any
  abstract_state: Any
  shardings: Any


def setup(config: ml_collections.ConfigDict, workdir: str, sft_dir: str) -> RLRun:
  rl_cfg = config.rl
  algo = algo_config(rl_cfg)
  if rl_cfg.init_from_hf:  # The checkpoint's own tokenizer and shape.
    tokenizer = tokenizer_lib.HFTokenizer(sft_dir)
    model_cfg = trainer.hf_model_config(sft_dir, config.model, tokenizer.vocab_size)
  else:
    tokenizer = tokenizer_lib.get_tokenizer(ml_collections.ConfigDict(
        {"tokenizer": tokenizer_lib.saved_path(os.path.join(sft_dir, "tokenizer"))}))
    with open(os.path.join(sft_dir, "model_config.json")) as f:
      model_cfg = model_lib.ModelConfig(**json.load(f))
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  rows = rl_cfg.prompts_per_step * rl_cfg.group_size
  if rows % rl_cfg.minibatch_size:
    raise ValueError(f"rl.minibatch_size={rl_cfg.minibatch_size} does not divide the "
                     f"{rows} completions of a step (prompts_per_step x group_size)")
  sharding_lib.check_batch(rl_cfg.minibatch_size, mesh, rules)
  tx = _optimizer(rl_cfg, rl_cfg.learning_rate)
  value_tx = _optimizer(rl_cfg, rl_cfg.value_learning_rate)
  abstract, shardings = rl.state_shardings(model_cfg, tx, value_tx, algo.uses_critic,
                                           mesh, rules)
  return RLRun(config, workdir, sft_dir, tokenizer, model_cfg, mesh, rules, algo, tx,
               value_tx, abstract, shardings)


class PromptStream:
  """Training prompts in a seeded order, epoch after epoch; `position` counts prompts
  taken, so the stream resumes exactly from a checkpoint."""

  def __init__(self, examples, tokenizer, seed: int, max_prompt_len: int):
    self.examples = examples
    self.prompts = pipeline.encode_prompts(examples, tokenizer)
    longest = max(len(p) for p in self.prompts)
    if longest > max_prompt_len:
      raise ValueError(f"a training prompt has {longest} tokens; rl.max_prompt_len is "
                       f"{max_prompt_len}")
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


def _evaluate(run: RLRun, params, name: str) -> dict[str, Any]:
  cfg = run.config
  metrics, samples = trainer.evaluate(run, params, cfg.eval.split, cfg.eval.num_examples)
  if jax.process_index() == 0:
    evaluation.write_eval(run.workdir, metrics, samples, name=name)
  return metrics


def _sample_groups(run: RLRun, state, stream: PromptStream, position: int, step: int,
                   scorer: rewards_lib.RewardScorer, scfg: sampling.SamplingConfig):
  """Samples, decodes and scores groups; with dynamic sampling, refills dropped groups."""
  rl_cfg = run.config.rl
  want, G = rl_cfg.prompts_per_step, rl_cfg.group_size
  kept: list[dict] = []
  stats = {"reward_failures": 0, "reward_timeouts": 0, "dropped_groups": 0,
           "sampling_rounds": 0}
  first_round: list[dict] = []  # Fallback when too few groups are informative.
  for round_index in range(max(rl_cfg.max_sampling_rounds, 1)):
    indices, position = stream.take(position, want)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, step), round_index)
    prompts = [stream.prompts[i] for i in indices]
    drawn = sampling.sample(state.params, prompts, run.model_cfg, scfg, want, key,
                            run.mesh, run.rules)
    texts, targets, lengths, groups = [], [], [], []
    for i, prompt, group in zip(indices, prompts, drawn):
      for c in group:
        texts.append(run.tokenizer.decode(c.tokens))
        targets.append(stream.examples[i]["answer"])
        lengths.append(len(c.tokens) + int(c.finished))
      groups.append((prompt, group))
    scores = scorer.score(texts, targets, lengths, rl_cfg.max_new_tokens + 1)
    stats["reward_failures"] += scores.failures
    stats["reward_timeouts"] += scores.timeouts
    stats["sampling_rounds"] += 1
    total = np.asarray(scores.total, np.float32)
    keep = (alg.informative_groups(total, G) if rl_cfg.dynamic_sampling
            else np.ones(want, bool))
    stats["dropped_groups"] += int(np.sum(~keep))
    for g, (prompt, group) in enumerate(groups):
      record = {"prompt": prompt, "group": group,
                "scores": total[g * G:(g + 1) * G],
                "correct": np.asarray(scores.parts.get("correctness",
                                                       [np.nan] * len(total)))[g * G:(g + 1) * G]}
      if round_index == 0:
        first_round.append(record)
      if keep[g]:
        kept.append(record)
    if len(kept) >= want:
      break
  if len(kept) < want:  # Not enough informative groups: top up with the first round's.
    kept += [r for r in first_round if not any(r is k for k in kept)][:want - len(kept)]
  return kept[:want], position, stats


def run_rl(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """SFT warm start (if needed), RL, evaluation before and after; returns eval.json."""
  os.makedirs(workdir, exist_ok=True)
  sft_dir = warm_start(config, workdir)
  run = setup(config, workdir, sft_dir)
  rl_cfg = config.rl
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      json.dump(dataclasses.asdict(run.model_cfg), f, indent=2)
    run.tokenizer.save(os.path.join(workdir, "tokenizer"))

  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     rl_cfg.checkpoint_every, rl_cfg.keep_checkpoints,
                                     async_save=True)
  before_path = os.path.join(workdir, "eval_before_rl.json")
  if ckpt.latest_step() is not None:
    state, position = ckpt.restore(run.abstract_state)
    print(f"resumed RL from step {int(state.step)} of {ckpt.directory}", flush=True)
  else:
    if rl_cfg.init_from_hf:
      _, params = hf.load_hf_checkpoint(
          sft_dir, shardings=run.shardings.params, min_vocab_size=run.model_cfg.vocab_size,
          dtype=run.model_cfg.dtype, remat=run.model_cfg.remat)
    else:
      params = checkpoint_lib.restore_params_only(os.path.join(sft_dir, "checkpoints"),
                                                  run.abstract_state.params)
    state = rl.create_state(params, run.model_cfg, run.tx, run.value_tx,
                            run.algo.uses_critic, run.shardings, config.seed)
    position = 0
  if os.path.isfile(before_path):
    with open(before_path) as f:
      before = json.load(f)
  else:
    before = _evaluate(run, state.ref_params, "eval_before_rl")
    print(f"before RL: {config.eval.split} accuracy {before['accuracy']:.3f}", flush=True)

  examples = sources.load_examples(config.data, "train")
  stream = PromptStream(examples, run.tokenizer, config.data.seed, rl_cfg.max_prompt_len)
  scorer = rewards_lib.RewardScorer(dict(rl_cfg.rewards), sources.get_checker(config.data),
                                    rl_cfg.reward_timeout_s)
  tok = run.tokenizer
  scfg = sampling.SamplingConfig(
      max_new_tokens=rl_cfg.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
      prompt_bucket=rl_cfg.max_prompt_len, temperature=rl_cfg.temperature,
      num_samples=rl_cfg.group_size, think_end_id=tok.think_end_id)
  seq_len = rl_cfg.max_prompt_len + rl_cfg.max_new_tokens + 1
  batch_sharding = sharding_lib.batch_sharding(run.mesh, run.rules)
  score_fn = rl.jit_score_fn(rl.make_score_fn(run.model_cfg, run.algo.uses_critic),
                             run.shardings, batch_sharding, run.mesh, run.rules)
  update = rl.jit_update_step(rl.make_update_step(run.model_cfg, run.tx, run.value_tx,
                                                  run.algo),
                              run.shardings, batch_sharding, run.mesh, run.rules)
  advantage_fn = alg.ADVANTAGES[run.algo.advantage]
  kl_estimator = alg.KL_ESTIMATORS[run.algo.kl_estimator]
  start_step = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, rl_cfg.num_steps, start_step, enabled=is_main)

  for step in range(start_step, rl_cfg.num_steps):
    t0 = time.time()
    groups, position, stats = _sample_groups(run, state, stream, position, step,
                                                scorer, scfg)
    t_sample = time.time() - t0

    prompts, completions, finished, sampler_logp = [], [], [], []
    for record in groups:
      for c in record["group"]:
        prompts.append(record["prompt"])
        completions.append(c.tokens)
        finished.append(c.finished)
        sampler_logp.append(c.logprobs)
    scores_B = np.concatenate([r["scores"] for r in groups]).astype(np.float32)
    correct_B = np.concatenate([r["correct"] for r in groups]).astype(np.float32)
    batch = pipeline.rollout_batch(prompts, completions, finished, seq_len, tok.eos_id,
                                   tok.pad_id)
    placed = sharding_lib.put_global_batch(batch, batch_sharding)
    scored = sharding_lib.to_host(score_fn(state, placed))
    mask = batch["mask"]

    # Sampler vs learner log-probs of the same tokens (EOS excluded: the sampler does
    # not report its log-prob): both run the same function on the same arrays.
    diffs = []
    for b, (prompt, lp) in enumerate(zip(prompts, sampler_logp)):
      start = len(prompt) - 1
      diffs.append(np.max(np.abs(scored["logp"][b, start:start + len(lp)] - lp))
                   if lp else 0.0)
    kl_BxT = np.asarray(kl_estimator(scored["logp"], scored["ref_logp"])) * mask
    last = np.maximum(mask.sum(1).astype(int), 1) + np.array(
        [len(p) - 2 for p in prompts])
    token_rewards = np.zeros_like(mask)
    token_rewards[np.arange(len(prompts)), last] = scores_B
    if run.algo.kl_coef and run.algo.kl_in_reward:
      token_rewards = token_rewards - run.algo.kl_coef * kl_BxT
    values = scored.get("values", np.zeros_like(mask))
    adv, returns = advantage_fn(alg.AdvantageInputs(scores_B, token_rewards, values, mask),
                                run.algo)
    adv, returns = np.asarray(adv, np.float32), (None if returns is None
                                                 else np.asarray(returns, np.float32))
    batch.update(old_logp=scored["logp"].astype(np.float32),
                 ref_logp=scored["ref_logp"].astype(np.float32), advantages=adv)
    if run.algo.uses_critic:
      batch.update(returns=returns, old_values=values.astype(np.float32))

    t1 = time.time()
    rows = len(prompts)
    order_rng = np.random.default_rng([config.seed, step])
    learner: list[dict] = []
    for _ in range(rl_cfg.epochs):
      order = order_rng.permutation(rows)
      for mb_start in range(0, rows, rl_cfg.minibatch_size):
        idx = order[mb_start:mb_start + rl_cfg.minibatch_size]
        mb = sharding_lib.put_global_batch({k: v[idx] for k, v in batch.items()},
                                           batch_sharding)
        state, m = update(state, mb)
        learner.append(m)
    state = state.replace(step=jax.device_put(jnp.asarray(step + 1, jnp.int32),
                                              run.shardings.step))
    learner = jax.device_get(learner)
    t_learn = time.time() - t1
    done = step + 1

    m_adv = adv[mask > 0]
    metrics = {k: float(np.mean([m[k] for m in learner])) for k in learner[0]}
    metrics.update({
        "reward": float(scores_B.mean()), "accuracy": float(np.nanmean(correct_B)),
        "response_length": float(mask.sum(1).mean()),
        "kl_to_reference": float(kl_BxT.sum() / max(mask.sum(), 1)),
        "advantage_mean": float(m_adv.mean()), "advantage_std": float(m_adv.std()),
        "advantage_min": float(m_adv.min()), "advantage_max": float(m_adv.max()),
        "sampler_learner_logp_max_abs_diff": float(np.max(diffs)),
        "time_sampling_s": t_sample, "time_learning_s": t_learn,
        "sampling_fraction": t_sample / max(t_sample + t_learn, 1e-9),
        "tokens_per_second": float(batch["segment_ids"].sum()) / max(
            time.time() - t0, 1e-9),
        **{k: float(v) for k, v in stats.items()},
    })
    if run.algo.uses_critic:
      metrics["explained_variance"] = alg.explained_variance(values, returns, mask)
    writer.write(done, metrics)
    if done % rl_cfg.log_every == 0 or done == rl_cfg.num_steps:
      writer.progress(done, {k: metrics[k] for k in (
          "reward", "accuracy", "kl_to_reference", "entropy", "response_length",
          "sampling_fraction")})
    ckpt.save(done, state, position, force=done == rl_cfg.num_steps)
    if rl_cfg.eval_every and done % rl_cfg.eval_every == 0 and done < rl_cfg.num_steps:
      mid = _evaluate(run, state.params, f"eval_step{done}")
      writer.write(done, {k: v for k, v in mid.items() if isinstance(v, (int, float))},
                   prefix=f"eval_{config.eval.split}/")
      print(f"step {done}: {config.eval.split} accuracy {mid['accuracy']:.3f}", flush=True)
  ckpt.wait()
  ckpt.close()
  scorer.close()

  after = _evaluate(run, state.params, "eval_after_rl")
  after["step"] = int(state.step)
  result = {"before_rl": before, "after_rl": after, "split": config.eval.split,
            "num_examples": after["num_examples"], "accuracy": after["accuracy"]}
  if is_main:
    path = os.path.join(workdir, "eval.json")
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    writer.write(int(state.step), {k: v for k, v in after.items()
                                   if isinstance(v, (int, float)) and k != "step"},
                 prefix=f"eval_{config.eval.split}/")
    print(f"{config.eval.split} accuracy: {before['accuracy']:.3f} before RL, "
          f"{after['accuracy']:.3f} after; wrote {path}", flush=True)
  writer.close()
  return result
