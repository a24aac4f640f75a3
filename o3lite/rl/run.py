"""The RL run: SFT warm start (if needed), then PPO / GRPO steps, evaluation before and
after. `run_rl(config, workdir)` is what `python -m o3lite.train --config=configs/rl.py`
calls.

One RL step: take `prompts_per_step` training prompts, sample `group_size` completions
each from the current policy arrays, score them with the reward functions, let the
learner score the samples (log-probs, reference log-probs, values; one minibatch at a
time), compute advantages, then `epochs` passes of minibatch updates, each the one train
step of `o3lite.training.step` with the registered "ppo" loss. The loop
(`o3lite.training.loop.fit`) owns logging, checkpoints (policy, critic, reference,
optimizer states, RNG, prompt position), periodic evaluation and resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from o3lite import errors
from o3lite.data import batching
from o3lite.data import sources
from o3lite.data import tokenizers as tokenizer_lib
from o3lite.evaluation import heldout
from o3lite.interop import huggingface as hf
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.rl import algorithms as alg
from o3lite.rl import learner
from o3lite.rl import rewards as rewards_lib
from o3lite.sampling import sampler as sampling
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import loop as loop_lib
from o3lite.training import losses
from o3lite.training import metric_writer
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import run_folder
from o3lite.training import sft as sft_lib
from o3lite.training import step as step_lib


def algo_config(rl_cfg: ml_collections.ConfigDict) -> alg.RLAlgoConfig:
  """The RLAlgoConfig fields of the `rl` section (validated)."""
  names = {f.name for f in dataclasses.fields(alg.RLAlgoConfig)}
  return alg.RLAlgoConfig(**{k: v for k, v in rl_cfg.items() if k in names})


def _warm_start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  sft_config = ml_collections.ConfigDict(config.to_dict())
  del sft_config["rl"]
  sft_config.method = "sft"
  return sft_config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole RL config, warm start included, before any work starts."""
  rl_cfg = config.rl
  if rl_cfg.init_from_hf and rl_cfg.sft_init:
    raise errors.ConfigError("set one of rl.sft_init and rl.init_from_hf, not both")
  if rl_cfg.init_from_hf:
    hf.check_folder(rl_cfg.init_from_hf, "rl.init_from_hf")
  if rl_cfg.sft_init and not os.path.isfile(
      os.path.join(rl_cfg.sft_init, run_folder.MODEL_CONFIG_FILE)):
    raise errors.ConfigError(f"rl.sft_init={rl_cfg.sft_init} is not an o3lite run "
                             f"folder (no {run_folder.MODEL_CONFIG_FILE})")
  sft_lib.validate(_warm_start_config(config))
  algo_config(rl_cfg)
  for name in ("num_steps", "prompts_per_step", "group_size", "minibatch_size", "epochs",
               "max_prompt_len", "max_new_tokens", "log_every", "checkpoint_every",
               "keep_checkpoints", "max_sampling_rounds", "max_nonfinite_in_a_row"):
    if rl_cfg[name] < (0 if name == "num_steps" else 1):
      raise errors.ConfigError(f"rl.{name}={rl_cfg[name]} must be at least "
                               f"{0 if name == 'num_steps' else 1}")
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
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  sharding_lib.check_batch(rl_cfg.minibatch_size // rl_cfg.grad_accum_steps, mesh,
                           tuple(tuple(r) for r in config.mesh.rules))
  optimizer_lib.validate(rl_cfg.optimizer, "rl.optimizer")
  if not (rl_cfg.value_learning_rate >= 0):
    raise errors.ConfigError(f"rl.value_learning_rate={rl_cfg.value_learning_rate} must "
                             "be a number >= 0")
  rewards_lib.validate_weights(dict(rl_cfg.rewards))
  if rl_cfg.vocab_chunk < 0:
    raise errors.ConfigError(f"rl.vocab_chunk={rl_cfg.vocab_chunk} must be >= 0")


def warm_start(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where RL starts: `rl.init_from_hf` (a Hugging Face folder), else `rl.sft_init` (an
  o3lite run), else a short SFT run in DIR/sft (with the config's `train`, `optimizer`
  and `data` sections; resumed if interrupted)."""
  if config.rl.init_from_hf:
    return config.rl.init_from_hf
  if config.rl.sft_init:
    return config.rl.sft_init
  sft_dir = os.path.join(workdir, "sft")
  if os.path.isfile(os.path.join(sft_dir, "eval.json")):
    return sft_dir
  print(f"SFT warm start ({config.train.num_steps} steps) in {sft_dir}", flush=True)
  sft_lib.run_sft(_warm_start_config(config), sft_dir)
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
  spec: Any  # state.StateSpec

  @property
  def abstract_state(self):
    return self.spec.abstract

  @property
  def shardings(self):
    return self.spec.shardings


def setup(config: ml_collections.ConfigDict, workdir: str, sft_dir: str) -> RLRun:
  rl_cfg = config.rl
  algo = algo_config(rl_cfg)
  if rl_cfg.init_from_hf:  # The checkpoint's own tokenizer and shape.
    tokenizer = tokenizer_lib.HFTokenizer(sft_dir)
    model_cfg = sft_lib.hf_model_config(sft_dir, config.model, tokenizer.vocab_size)
  else:
    tokenizer = sources.get_tokenizer(ml_collections.ConfigDict({
        "tokenizer": tokenizer_lib.saved_path(
            os.path.join(sft_dir, run_folder.TOKENIZER_DIR))}))
    model_cfg = run_folder.load_model_config(sft_dir)
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  trees = {"policy": None}
  if algo.uses_critic:
    trees["critic"] = rl_cfg.value_learning_rate
  updates_per_step = rl_cfg.epochs * (
      rl_cfg.prompts_per_step * rl_cfg.group_size // rl_cfg.minibatch_size)
  tx, _ = optimizer_lib.make_optimizer(rl_cfg.optimizer,
                                       rl_cfg.num_steps * updates_per_step, trees,
                                       "rl.optimizer")
  spec = learner.state_spec(model_cfg, tx, algo.uses_critic, mesh, rules)
  return RLRun(config, workdir, sft_dir, tokenizer, model_cfg, mesh, rules, algo, tx,
               spec)


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


def _evaluate(run: RLRun, params, name: str) -> dict[str, Any]:
  cfg = run.config
  metrics, samples = sft_lib.evaluate(run, params, cfg.eval.split, cfg.eval.num_examples)
  if jax.process_index() == 0:
    heldout.write_eval(run.workdir, metrics, samples, name=name)
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
    drawn = sampling.sample(state.params["policy"], prompts, run.model_cfg, scfg, want,
                            key, run.mesh, run.rules)
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
    correct = np.asarray(scores.parts.get("correctness", [np.nan] * len(total)))
    for g, (prompt, group) in enumerate(groups):
      record = {"prompt": prompt, "group": group, "scores": total[g * G:(g + 1) * G],
                "correct": correct[g * G:(g + 1) * G]}
      if round_index == 0:
        first_round.append(record)
      if keep[g]:
        kept.append(record)
    if len(kept) >= want:
      break
  if len(kept) < want:  # Not enough informative groups: top up with the first round's.
    kept += [r for r in first_round if not any(r is k for k in kept)][:want - len(kept)]
  return kept[:want], position, stats


def _score_in_minibatches(score_fn, state, batch, size: int, batch_sharding):
  """The learner's scoring pass, `size` rows at a time (the update's shapes: one more
  compile at most, and never a whole step's activations at once)."""
  parts = []
  rows = len(batch["inputs"])
  for start in range(0, rows, size):
    mb = {k: v[start:start + size] for k, v in batch.items()}
    parts.append(sharding_lib.to_host(score_fn(
        state, sharding_lib.put_global_batch(mb, batch_sharding))))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run_rl(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """SFT warm start (if needed), RL, evaluation before and after; returns eval.json."""
  validate(config)
  run_folder.prepare(workdir)
  if run_folder.is_run(workdir):  # Before the warm start: it reads DIR/sft.
    saved = run_folder.load_config(workdir)
    if saved.get("method") != "rl":
      raise errors.RunFolderError(f"{workdir} holds a {saved.get('method')!r} run, not an "
                                  "RL run: use another --workdir")
  sft_dir = warm_start(config, workdir)
  run = setup(config, workdir, sft_dir)
  run_folder.check_rerun(workdir, config, run.model_cfg,
                         ("model", "data", "rl.init_from_hf", "rl.sft_init",
                          "rl.advantage"))
  rl_cfg = config.rl
  examples = sources.load_examples(config.data, "train")
  stream = PromptStream(examples, run.tokenizer, config.data.seed, rl_cfg.max_prompt_len)
  run_folder.save(workdir, config, run.model_cfg, run.tokenizer)
  is_main = jax.process_index() == 0

  def init():
    if rl_cfg.init_from_hf:
      _, params = hf.load_hf_checkpoint(
          sft_dir, shardings=run.shardings.params["policy"],
          min_vocab_size=run.model_cfg.vocab_size, dtype=run.model_cfg.dtype,
          remat=run.model_cfg.remat, tokenizer=run.tokenizer)
    else:
      params, _ = checkpoint_lib.restore_params(
          os.path.join(sft_dir, run_folder.CHECKPOINT_DIR),
          {"policy": run.abstract_state.params["policy"]})
      params = params["policy"]
    return learner.initial_state(run.spec, params, run.algo.uses_critic, config.seed)

  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR), rl_cfg.checkpoint_every,
      rl_cfg.keep_checkpoints, async_save=True, kind=f"rl-{run.algo.advantage}")
  state, position, start = loop_lib.restore_or_init(ckpt, run.abstract_state, init)
  before_path = os.path.join(workdir, "eval_before_rl.json")
  if os.path.isfile(before_path):
    with open(before_path) as f:
      before = json.load(f)
  else:
    before = _evaluate(run, state.frozen["reference"], "eval_before_rl")
    print(f"before RL: {config.eval.split} accuracy {before['accuracy']:.3f}", flush=True)

  scorer = rewards_lib.RewardScorer(dict(rl_cfg.rewards), sources.get_checker(config.data),
                                    rl_cfg.reward_timeout_s)
  tok = run.tokenizer
  scfg = sampling.SamplingConfig(
      max_new_tokens=rl_cfg.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
      prompt_bucket=rl_cfg.max_prompt_len, temperature=rl_cfg.temperature,
      num_samples=rl_cfg.group_size, think_end_id=tok.think_end_id)
  seq_len = rl_cfg.max_prompt_len + rl_cfg.max_new_tokens + 1
  batch_sharding = sharding_lib.batch_sharding(run.mesh, run.rules)
  score_fn = step_lib.jit_eval_fn(
      learner.make_score_fn(run.model_cfg, run.algo.uses_critic, rl_cfg.temperature,
                            rl_cfg.vocab_chunk),
      run.shardings, batch_sharding, run.mesh, run.rules)
  loss_fn = losses.get_loss("ppo", run.model_cfg, algo=run.algo,
                            temperature=rl_cfg.temperature, vocab_chunk=rl_cfg.vocab_chunk)
  update = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, run.tx, rl_cfg.grad_accum_steps), run.shardings,
      batch_sharding, run.mesh, run.rules)
  advantage_fn = alg.ADVANTAGES[run.algo.advantage]
  kl_estimator = alg.KL_ESTIMATORS[run.algo.kl_estimator]
  writer = metric_writer.MetricWriter(workdir, rl_cfg.num_steps, start, enabled=is_main)

  def iterate(state, position, step):
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
    batch = batching.rollout_batch(prompts, completions, finished, seq_len, tok.eos_id,
                                   tok.pad_id)
    scored = _score_in_minibatches(score_fn, state, batch, rl_cfg.minibatch_size,
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

    m_adv = adv[mask > 0]
    metrics = {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
    metrics["nonfinite"] = float(max(m["nonfinite"] for m in updates))
    metrics.update({
        "reward": float(scores_B.mean()), "accuracy": float(np.nanmean(correct_B)),
        "response_length": float(mask.sum(1).mean()),
        "kl_to_reference": float(kl_BxT.sum() / max(mask.sum(), 1)),
        "entropy": float((scored["entropy"] * mask).sum() / max(mask.sum(), 1)),
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
    return state, position, metrics

  def periodic_eval(state, done):
    mid = _evaluate(run, state.params["policy"], f"eval_step{done}")
    writer.write(done, heldout.scalars(mid), prefix=f"eval_{config.eval.split}/")
    print(f"step {done}: {config.eval.split} accuracy {mid['accuracy']:.3f}", flush=True)

  loop = loop_lib.Loop(num_steps=rl_cfg.num_steps, log_every=rl_cfg.log_every,
                       log_all=True, eval_every=rl_cfg.eval_every,
                       max_nonfinite_in_a_row=rl_cfg.max_nonfinite_in_a_row,
                       shown=("reward", "accuracy", "kl_to_reference", "entropy",
                              "response_length", "sampling_fraction"))
  try:
    state = loop_lib.fit(state, iterate, loop, ckpt, writer, position, start,
                         periodic_eval)
  finally:
    ckpt.close()
    scorer.close()

  after = _evaluate(run, state.params["policy"], "eval_after_rl")
  after["step"] = rl_cfg.num_steps
  result = {"before_rl": before, "after_rl": after, "split": config.eval.split,
            "num_examples": after["num_examples"], "accuracy": after["accuracy"]}
  if is_main:
    path = os.path.join(workdir, "eval.json")
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    writer.write(rl_cfg.num_steps, heldout.scalars(after),
                 prefix=f"eval_{config.eval.split}/")
    print(f"{config.eval.split} accuracy: {before['accuracy']:.3f} before RL, "
          f"{after['accuracy']:.3f} after; wrote {path}", flush=True)
  writer.close()
  return result
