"""The SFT stage: supervised fine-tuning on (question, chain, answer) examples.

`python -m o3lite.train --config=configs/sft.py` runs it through the stage harness
(`stage.run`), which owns the run folder, the policy source (`init_from`: a run folder, a
Hugging Face folder, or "" for a random init), resume, the loop and eval.json. What is
SFT's own is here: its config checks, the packed batches, the cross-entropy train step
and the held-out evaluation.

An outer loop (STaR, filtering by a verifier) runs SFT on its own examples with
`stage.run(config, workdir, stage=SFT(examples))`. `load_run` rebuilds any run folder's
policy (SFT or RL, from this o3lite or an earlier one) for evaluation and export.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax

from o3lite import errors
from o3lite.data import batching
from o3lite.data import sources
from o3lite.data import tasks
from o3lite.evaluation import heldout
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.sampling import policy as policy_lib
from o3lite.training import losses
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import policy_source
from o3lite.training import run_folder
from o3lite.training import stage as stage_lib
from o3lite.training import state as state_lib
from o3lite.training import step as step_lib


def validate_data(data) -> None:
  """The `data` section of any stage."""
  if data.source not in sources.SOURCES:
    raise errors.ConfigError(f"data.source={data.source!r}: expected one of "
                             f"{list(sources.SOURCES)}")
  if data.source == "task":
    tasks.get_task(data.task, **dict(data.task_kwargs))
  if data.seq_len < 2:
    raise errors.ConfigError(f"data.seq_len={data.seq_len} must be at least 2")
  if data.cot_slip_rate and (data.source != "task" or data.task != "opchain"):
    raise errors.ConfigError(
        "data.cot_slip_rate needs data.source='task' and data.task='opchain'")


def validate_eval(eval_cfg) -> None:
  """The `eval` section of a stage that evaluates a policy."""
  if eval_cfg.num_examples < 1 or eval_cfg.batch_size < 1 \
      or eval_cfg.max_new_tokens < 1 or eval_cfg.num_samples < 0:
    raise errors.ConfigError("eval.num_examples, eval.batch_size and "
                             "eval.max_new_tokens must be at least 1, "
                             "eval.num_samples >= 0")
  if eval_cfg.split not in tasks.SPLITS:
    raise errors.ConfigError(f"eval.split={eval_cfg.split!r}: expected one of "
                             f"{list(tasks.SPLITS)}")


def validate_model(config) -> None:
  """The `model` section: its shape when the model starts random, its dtype always."""
  if not config.init_from:  # The shape is the model section's: check it now.
    model_lib.ModelConfig(**{**dict(config.model),
                             "vocab_size": config.model.vocab_size or 1})
  elif config.model.dtype not in ("float32", "bfloat16"):
    raise errors.ConfigError(f"model.dtype={config.model.dtype!r}: expected 'float32' "
                             "or 'bfloat16'")


def train_examples(data_cfg) -> Sequence[dict]:
  """The SFT training examples, with `data.cot_slip_rate` slips if asked for."""
  examples = sources.load_examples(data_cfg, "train")
  if not data_cfg.cot_slip_rate:
    return examples
  modulus = dict(data_cfg.task_kwargs).get("modulus", 10)
  return [tasks.slip_opchain(examples[i], data_cfg.cot_slip_op, data_cfg.cot_slip_rate,
                             modulus, data_cfg.seed) for i in range(len(examples))]


# --- what every policy stage shares (SFT, RL, filtered SFT) ----------------------------

def policy_evaluation(ctx: stage_lib.Context, params_of: Callable[[Any], Any] = lambda s: s.params[
    "policy"]) -> stage_lib.Evaluate:
  """Held-out evaluation of the policy in a state (the `eval` section: greedy accuracy,
  pass@k, maj@k, thinking budgets; `heldout.evaluate`)."""
  eval_cfg = ctx.config.eval
  examples = held_out_examples(ctx.config.data, eval_cfg.split, eval_cfg.num_examples)
  checker = sources.get_checker(ctx.config.data)

  settings = heldout.EvalSettings.of(eval_cfg)

  def evaluate(state, tag):
    del tag
    policy = policy_lib.Policy(params_of(state), ctx.model_cfg, ctx.tokenizer, ctx.mesh,
                               ctx.rules)
    return heldout.evaluate(policy, examples, checker, settings, eval_cfg.split)
  return evaluate


def held_out_examples(data_cfg, split: str, num_examples: int) -> list[dict]:
  """The first `num_examples` problems of a split."""
  examples = sources.load_examples(data_cfg, split)
  return [examples[i] for i in range(min(num_examples, len(examples)))]


def timed_tokens():
  """A window for tokens/s: `add(n)` per step; `rate()` since the last read."""
  window = {"tokens": 0, "start": time.time()}

  def add(n):
    window["tokens"] += n

  def rate():
    elapsed = time.time() - window["start"]
    out = window["tokens"] / max(elapsed, 1e-9)
    window.update(tokens=0, start=time.time())
    return out
  return add, rate


MEMORY_SETTINGS = ("lower sft.batch_size, raise sft.grad_accum_steps, set sft.vocab_chunk "
                   "(e.g. 8192) or model.remat=True")


class SFT(stage_lib.Stage):
  """Cross-entropy on the completion tokens of packed (prompt, chain, answer) rows."""

  name = "sft"
  shown = ("loss", "token_accuracy", "grad_norm", "tokens_per_second")

  def __init__(self, examples: Sequence[dict] | None = None):
    """`examples` ({"question", "cot", "answer"} dicts) replace the data's training
    split (an outer loop's own data)."""
    self.examples = examples

  def validate(self, config) -> None:
    s = config.sft
    for name in ("batch_size", "grad_accum_steps"):
      if s[name] < 1:
        raise errors.ConfigError(f"sft.{name}={s[name]} must be at least 1")
    if s.get("vocab_chunk", 0) < 0:
      raise errors.ConfigError(f"sft.vocab_chunk={s.vocab_chunk} must be at least 0")
    if s.batch_size % s.grad_accum_steps:
      raise errors.ConfigError(f"sft.batch_size={s.batch_size} is not divisible by "
                               f"sft.grad_accum_steps={s.grad_accum_steps}")
    validate_data(config.data)
    validate_model(config)
    optimizer_lib.validate(config.optimizer)
    mesh, rules = stage_lib.mesh_and_rules(config)
    sharding_lib.check_batch(s.batch_size // s.grad_accum_steps, mesh, rules)
    validate_eval(config.eval)

  def setup(self, ctx: stage_lib.Context) -> stage_lib.Plan:
    config, s = ctx.config, ctx.config.sft
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.loop.num_steps)
    spec = state_lib.policy_spec(ctx.model_cfg, tx, ctx.mesh, ctx.rules)
    examples = train_examples(config.data) if self.examples is None else self.examples
    batcher = batching.SFTBatcher(
        examples, ctx.tokenizer, s.batch_size, config.data.seq_len, seed=config.data.seed,
        with_cot=config.data.with_cot, pack=config.data.pack,
        drop_too_long=bool(config.data.get("drop_too_long", False)))
    if batcher.num_dropped:
      print(f"dropped {batcher.num_dropped} of {len(examples)} training examples longer "
            f"than data.seq_len + 1 = {config.data.seq_len + 1} tokens", flush=True)

    def init():
      if ctx.source is None:
        return spec.create(config.seed)
      params = ctx.source.load_policy(spec.abstract.params["policy"], ctx.model_cfg,
                                      ctx.tokenizer)
      print(f"initialized parameters from {ctx.source.path}", flush=True)
      return spec.around({"policy": params}, {}, config.seed)

    batch_sharding = sharding_lib.batch_sharding(ctx.mesh, ctx.rules)
    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(losses.get_loss("sft_cross_entropy", ctx.model_cfg,
                                                 vocab_chunk=s.get("vocab_chunk", 0)), tx,
                                 s.grad_accum_steps),
        spec.shardings, batch_sharding, ctx.mesh, ctx.rules)
    add_tokens, tokens_per_second = timed_tokens()

    def iterate(state, position, step):
      del step
      batch, position = batcher.get_batch(position)
      add_tokens(int(np.sum(batch["segment_ids"] > 0)))
      state, metrics = step_fn(state, sharding_lib.put_global_batch(batch, batch_sharding))
      return state, position, metrics

    def host_metrics(done):
      return {"tokens_per_second": tokens_per_second(),
              "learning_rate": float(schedule(done - 1))}

    def compile_steps():
      first, _ = batcher.get_batch(0)
      return {"SFT train step": step_fn.compile(spec.abstract, {
          k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
          for k, v in first.items()})}

    return stage_lib.Plan(spec=spec, init=init, iterate=iterate,
                          evaluate=policy_evaluation(ctx),
                          host_metrics=host_metrics,
                          extra=lambda state: {"train_examples": batcher.num_examples,
                                               "dropped_too_long": batcher.num_dropped},
                          compile=compile_steps, memory_settings=MEMORY_SETTINGS)


stage_lib.register(SFT())


# --- a saved run's policy, for evaluation, export, labelling and search --------------------

@dataclasses.dataclass
class LoadedRun:
  """A run folder's policy side, rebuilt: what evaluation and sampling need."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple


def load_run(workdir: str, step: int | None = None,
             mesh_shape: tuple[int, ...] | None = None) -> tuple[LoadedRun, Any]:
  """Any run folder with a policy (SFT, RL, filtered SFT; made by this o3lite or an
  earlier one) rebuilt: (LoadedRun, the policy parameters of its latest or `step`
  checkpoint), on the run's mesh or on `mesh_shape`."""
  config = run_folder.load_config(workdir)
  if mesh_shape is not None:
    config.mesh.shape = type(config.mesh.shape)(mesh_shape)  # list, as JSON loads it
  source = policy_source.Source(workdir, is_hf=False)
  model_cfg = run_folder.load_model_config(workdir)
  tokenizer = source.tokenizer(config.data.get("chat_template", False))
  config.lock()
  mesh, rules = stage_lib.mesh_and_rules(config)
  # Only the policy is read: no optimizer state.
  spec = state_lib.policy_spec(model_cfg, optax.identity(), mesh, rules)
  params = source.load_policy(spec.abstract.params["policy"], model_cfg, tokenizer, step)
  return LoadedRun(config, workdir, tokenizer, model_cfg, mesh, rules), params


def evaluate(run: LoadedRun, policy_params, split: str, num_examples: int
             ) -> tuple[dict, list]:
  """Every held-out metric of the run's `eval` section (see `heldout.evaluate`)."""
  policy = policy_lib.Policy(policy_params, run.model_cfg, run.tokenizer, run.mesh, run.rules)
  return heldout.evaluate(policy, held_out_examples(run.config.data, split, num_examples),
                          sources.get_checker(run.config.data),
                          heldout.EvalSettings.of(run.config.eval), split)
