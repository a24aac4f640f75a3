"""The RL run: SFT warm start (if needed), then PPO / GRPO steps, evaluation before and
after. `run_rl(config, workdir)` is what `python -m o3lite.train --config=configs/rl.py`
calls.

One RL step: take `prompts_per_step` training prompts, sample `group_size` completions
each from the current policy arrays, score them with the reward functions, let the
learner score the samples (log-probs, reference log-probs, values; one minibatch at a
time), compute advantages, then `epochs` passes of minibatch updates, each the one train
step of `o3lite.training.step` with the registered "ppo" loss. The loop
(`o3lite.training.loop.fit`) owns logging, checkpoints (policy, critic, reference,
optimizer states, RNG, prompt position), periodic evaluation and resume. Sampling,
scoring and the learner's arrays are `rollouts.py`'s.
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
from o3lite.data import sources
from o3lite.data import tokenizers as tokenizer_lib
from o3lite.evaluation import heldout
from o3lite.interop import huggingface as hf
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.rl import algorithms as alg
from o3lite.rl import learner
from o3lite.rl import rewards as rewards_lib
from o3lite.rl import rollouts
from o3lite.sampling import sampler as sampling
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import loop as loop_lib
from o3lite.training import losses
from o3lite.training import metric_writer
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import run_folder
from o3lite.training import sft as sft_lib
from o3lite.training import step as step_lib
from o3lite.verifiers import reward_model
from o3lite.verifiers import run as verifier_run


def algo_config(rl_cfg: ml_collections.ConfigDict) -> alg.RLAlgoConfig:
  """The RLAlgoConfig fields of the `rl` section (validated)."""
  names = {f.name for f in dataclasses.fields(alg.RLAlgoConfig)}
  return alg.RLAlgoConfig(**{k: v for k, v in rl_cfg.items() if k in names})


def _warm_start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return run_folder.stage_config(config, "sft", ("rl",))


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
  process = rl_cfg.process_reward
  if process.verifier:
    saved = run_folder.load_config(process.verifier) if os.path.isdir(process.verifier) \
        else None
    if saved is None or saved.get("method") != "verifier":
      raise errors.ConfigError(f"rl.process_reward.verifier={process.verifier} is not a "
                               "verifier run folder (configs/prm.py)")
    if saved.verifier.kind != "prm":
      raise errors.ConfigError(f"rl.process_reward.verifier={process.verifier} holds an "
                               f"{saved.verifier.kind!r} verifier: process rewards need a PRM")
    alg.step_rewards([], process.mode)
    if process.batch_size < 1:
      raise errors.ConfigError("rl.process_reward.batch_size must be at least 1")


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
  prm: Any = None  # The frozen PRM (reward_model.Verifier) of process rewards, or None.

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
  prm = None
  if rl_cfg.process_reward.verifier:  # In this program, on this mesh: no server, no copy.
    path = rl_cfg.process_reward.verifier
    prm = verifier_run.load_verifier(path, rl_cfg.process_reward.batch_size,
                                     tuple(config.mesh.shape))
    reward_model.check_same_tokenizer(prm.tokenizer, tokenizer,
                                      f"rl.process_reward.verifier={path}")
  return RLRun(config, workdir, sft_dir, tokenizer, model_cfg, mesh, rules, algo, tx,
               spec, prm)


def _evaluate(run: RLRun, params, name: str) -> dict[str, Any]:
  cfg = run.config
  metrics, samples = sft_lib.evaluate(run, params, cfg.eval.split, cfg.eval.num_examples)
  if jax.process_index() == 0:
    heldout.write_eval(run.workdir, metrics, samples, name=name)
  return metrics


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
  stream = rollouts.PromptStream(examples, run.tokenizer, config.data.seed,
                                 rl_cfg.max_prompt_len)
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
  writer = metric_writer.MetricWriter(workdir, rl_cfg.num_steps, start, enabled=is_main)

  def iterate(state, position, step):
    t0 = time.time()
    groups, position, stats = rollouts.sample_groups(run, state, stream, position, step,
                                                     scorer, scfg)
    t_sample = time.time() - t0

    process = ((rl_cfg.process_reward.weight, rl_cfg.process_reward.mode)
               if run.prm is not None else None)
    batch, view = rollouts.learner_batch(groups, state, score_fn, run.algo, seq_len,
                                         rl_cfg.minibatch_size, tok, batch_sharding,
                                         process)
    mask, adv = batch["mask"], batch["advantages"]
    scores_B, kl_BxT = view["scores"], view["kl"]

    t1 = time.time()
    rows = len(mask)
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
        "reward": float(scores_B.mean()), "accuracy": float(np.nanmean(view["correct"])),
        "response_length": float(mask.sum(1).mean()),
        "kl_to_reference": float(kl_BxT.sum() / max(mask.sum(), 1)),
        "entropy": float((view["entropy"] * mask).sum() / max(mask.sum(), 1)),
        "advantage_mean": float(m_adv.mean()), "advantage_std": float(m_adv.std()),
        "advantage_min": float(m_adv.min()), "advantage_max": float(m_adv.max()),
        "sampler_learner_logp_max_abs_diff": float(np.max(view["logp_gap"])),
        "time_sampling_s": t_sample, "time_learning_s": t_learn,
        "sampling_fraction": t_sample / max(t_sample + t_learn, 1e-9),
        "tokens_per_second": float(batch["segment_ids"].sum()) / max(
            time.time() - t0, 1e-9),
        **{k: float(v) for k, v in stats.items()},
    })
    if "prm_scores" in view:  # The PRM's view of this step's samples.
      prm_scores = view["prm_scores"]
      metrics.update(prm_step_score=float(prm_scores.mean()) if prm_scores.size else 0.0,
                     prm_low_fraction=float((prm_scores < 0.5).mean())
                     if prm_scores.size else 0.0,
                     prm_steps_per_completion=prm_scores.size / max(len(mask), 1))
    if run.algo.uses_critic:
      metrics["explained_variance"] = alg.explained_variance(
          batch["old_values"], batch["returns"], mask)
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
