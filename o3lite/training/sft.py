"""The SFT run: data, tokenizer, sharded state, the loop, evaluation.

`run_sft(config, workdir)` is what `python -m o3lite.train --config=configs/sft.py`
calls; it is importable from a notebook, and an outer loop (STaR, distillation, the RL
warm start) calls it in-process with its own `examples` or `init_params` and gets the
trained parameters back. A rerun with the same workdir resumes from the latest
checkpoint (train state, RNG and data position), so a killed run ends with the
parameters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from o3lite import errors
from o3lite.data import batching
from o3lite.data import sources
from o3lite.data import tasks
from o3lite.data import tokenizers as tokenizer_lib
from o3lite.evaluation import heldout
from o3lite.interop import hf_config
from o3lite.interop import huggingface as hf
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import loop as loop_lib
from o3lite.training import losses
from o3lite.training import metric_writer
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import run_folder
from o3lite.training import state as state_lib
from o3lite.training import step as step_lib


def model_config_from(model_fields, vocab_size: int) -> model_lib.ModelConfig:
  """The frozen ModelConfig of a run config's `model` section."""
  fields = dict(model_fields)
  if not fields.get("vocab_size"):
    fields["vocab_size"] = vocab_size
  elif fields["vocab_size"] < vocab_size:
    raise errors.ConfigError(f"model.vocab_size={fields['vocab_size']} is smaller than "
                             f"the tokenizer's {vocab_size} tokens")
  return model_lib.ModelConfig(**fields)


def hf_model_config(path: str, model_fields, vocab_size: int) -> model_lib.ModelConfig:
  """The shape of the Hugging Face checkpoint in `path`, with dtype and remat from the
  run config's `model` section and room for the tokenizer's `vocab_size` tokens."""
  config_file = os.path.join(path, hf.CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise errors.CheckpointError(f"{path}: no {hf.CONFIG_FILE} there")
  with open(config_file) as f:
    cfg = hf_config.model_config_from_hf(json.load(f), dtype=model_fields.dtype,
                                  remat=model_fields.remat)
  return dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, vocab_size))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole SFT part of a config (model, data, train, optimizer, mesh, eval)
  before any work starts; a one-line ConfigError / MeshError names the first problem."""
  train = config.train
  if config.train.init_from and config.train.init_from_hf:
    raise errors.ConfigError("set one of train.init_from and train.init_from_hf, not both")
  if config.train.init_from_hf:
    hf.check_folder(config.train.init_from_hf, "train.init_from_hf")
  for name in ("batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
               "keep_checkpoints"):
    if train[name] < 1:
      raise errors.ConfigError(f"train.{name}={train[name]} must be at least 1")
  if train.num_steps < 0 or train.eval_every < 0:
    raise errors.ConfigError(f"train.num_steps={train.num_steps} and train.eval_every="
                             f"{train.eval_every} must be >= 0")
  if train.batch_size % train.grad_accum_steps:
    raise errors.ConfigError(f"train.batch_size={train.batch_size} is not divisible by "
                             f"train.grad_accum_steps={train.grad_accum_steps}")
  if config.data.source not in sources.SOURCES:
    raise errors.ConfigError(f"data.source={config.data.source!r}: expected one of "
                             f"{list(sources.SOURCES)}")
  if config.data.source == "task":
    tasks.get_task(config.data.task, **dict(config.data.task_kwargs))
  if config.data.seq_len < 2:
    raise errors.ConfigError(f"data.seq_len={config.data.seq_len} must be at least 2")
  if config.data.cot_slip_rate and (config.data.source != "task"
                                    or config.data.task != "opchain"):
    raise errors.ConfigError(
        "data.cot_slip_rate needs data.source='task' and data.task='opchain'")
  if not config.train.init_from_hf:  # The shape is the model section's: check it now.
    model_lib.ModelConfig(**{**dict(config.model),
                             "vocab_size": config.model.vocab_size or 1})
  elif config.model.dtype not in ("float32", "bfloat16"):
    raise errors.ConfigError(f"model.dtype={config.model.dtype!r}: expected 'float32' "
                             "or 'bfloat16'")
  optimizer_lib.validate(config.optimizer)
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  sharding_lib.check_batch(train.batch_size // train.grad_accum_steps, mesh, rules)
  if config.eval.num_examples < 1 or config.eval.batch_size < 1 \
      or config.eval.max_new_tokens < 1 or config.eval.num_samples < 0:
    raise errors.ConfigError("eval.num_examples, eval.batch_size and "
                             "eval.max_new_tokens must be at least 1, "
                             "eval.num_samples >= 0")
  if config.eval.split not in tasks.SPLITS:
    raise errors.ConfigError(f"eval.split={config.eval.split!r}: expected one of "
                             f"{list(tasks.SPLITS)}")


@dataclasses.dataclass
class Run:
  """Everything a run builds before its loop; handy in notebooks."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: Any
  schedule: Any
  spec: state_lib.StateSpec

  @property
  def abstract_state(self):
    return self.spec.abstract

  @property
  def state_shardings(self):
    return self.spec.shardings


def get_tokenizer(config: ml_collections.ConfigDict):
  """The run's tokenizer: `data.tokenizer`, else the `train.init_from_hf` checkpoint's
  own, else one trained on the data (see `sources.get_tokenizer`)."""
  if config.train.init_from_hf and not config.data.tokenizer:
    return tokenizer_lib.HFTokenizer(config.train.init_from_hf)
  if jax.process_count() > 1:
    # Process 0 builds the dataset and tokenizer first, so processes sharing a data
    # folder never race to write it; the others then read (or build their own copy).
    if jax.process_index() == 0:
      sources.get_tokenizer(config.data)
    multihost_utils.sync_global_devices("o3lite: data prepared")
  return sources.get_tokenizer(config.data)


def setup(config: ml_collections.ConfigDict, workdir: str,
          model_cfg: model_lib.ModelConfig | None = None, tokenizer: Any = None) -> Run:
  """Tokenizer, model config, mesh, optimizer and the state's shardings; writes nothing.

  The model config is `model_cfg` if given (a saved run's), else the `train.init_from_hf`
  checkpoint's shape, else the `model` section.
  """
  tokenizer = tokenizer or get_tokenizer(config)
  if model_cfg is None and config.train.init_from_hf:
    model_cfg = hf_model_config(config.train.init_from_hf, config.model,
                                tokenizer.vocab_size)
  elif model_cfg is None:
    model_cfg = model_config_from(config.model, tokenizer.vocab_size)
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  train = config.train
  sharding_lib.check_batch(train.batch_size // train.grad_accum_steps, mesh, rules)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, train.num_steps)
  spec = state_lib.policy_spec(model_cfg, tx, mesh, rules)
  return Run(config, workdir, tokenizer, model_cfg, mesh, rules, tx, schedule, spec)


def train_examples(data_cfg) -> Sequence[dict]:
  """The SFT training examples, with `data.cot_slip_rate` slips if asked for."""
  examples = sources.load_examples(data_cfg, "train")
  if not data_cfg.cot_slip_rate:
    return examples
  modulus = dict(data_cfg.task_kwargs).get("modulus", 10)
  return [tasks.slip_opchain(examples[i], data_cfg.cot_slip_op, data_cfg.cot_slip_rate,
                             modulus, data_cfg.seed) for i in range(len(examples))]


def held_out_examples(run: Run, split: str, num_examples: int) -> list[dict]:
  """The first `num_examples` problems of a split."""
  examples = sources.load_examples(run.config.data, split)
  return [examples[i] for i in range(min(num_examples, len(examples)))]


def evaluate(run: Run, policy_params, split: str, num_examples: int) -> tuple[dict, list]:
  """Every held-out metric of the run's `eval` section (see `heldout.evaluate`)."""
  return heldout.evaluate(
      policy_params, run.model_cfg, held_out_examples(run, split, num_examples),
      run.tokenizer, sources.get_checker(run.config.data), run.config.eval, split,
      run.mesh, run.rules)


def load_run(workdir: str, step: int | None = None,
             mesh_shape: tuple[int, ...] | None = None) -> tuple[Run, Any]:
  """Any finished or running run (SFT or RL) rebuilt from its folder:
  (Run, policy parameters of its latest or `step` checkpoint), on the run's mesh or on
  `mesh_shape` (the parameters are placed with that mesh's shardings)."""
  config = run_folder.load_config(workdir)
  if mesh_shape is not None:
    config.mesh.shape = type(config.mesh.shape)(mesh_shape)  # list, as JSON loads it
  model_cfg = run_folder.load_model_config(workdir)
  config.data.tokenizer = tokenizer_lib.saved_path(
      os.path.join(workdir, run_folder.TOKENIZER_DIR))
  config.lock()
  run = setup(config, workdir, model_cfg)
  params, _ = checkpoint_lib.restore_params(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR),
      {"policy": run.abstract_state.params["policy"]}, step)
  return run, params["policy"]


@dataclasses.dataclass
class SFTResult:
  metrics: dict[str, Any]  # The final held-out evaluation (eval.json).
  params: Any  # The trained policy parameters (sharded device arrays).
  run: Run


def run_sft(config: ml_collections.ConfigDict, workdir: str,
            examples: Sequence[dict] | None = None, init_params: Any = None) -> SFTResult:
  """Train (or resume) and evaluate.

  `examples` ({"question", "cot", "answer"} dicts) replace the data config's training
  split; `init_params` (a policy tree in the state's shardings) replace the random or
  `train.init_from*` start. A resumed run continues from its checkpoint either way.
  """
  validate(config)
  run_folder.prepare(workdir)
  run = setup(config, workdir)
  run_folder.check_rerun(workdir, config, run.model_cfg)
  train = config.train
  examples = train_examples(config.data) if examples is None else examples
  batcher = batching.SFTBatcher(
      examples, run.tokenizer, train.batch_size, config.data.seq_len,
      seed=config.data.seed, with_cot=config.data.with_cot, pack=config.data.pack)
  run_folder.save(workdir, config, run.model_cfg, run.tokenizer)
  is_main = jax.process_index() == 0

  def init():
    if init_params is not None:
      return run.spec.around({"policy": init_params}, {}, config.seed)
    if train.init_from_hf:  # A Hugging Face checkpoint, read into the params' shardings.
      _, params = hf.load_hf_checkpoint(
          train.init_from_hf, shardings=run.state_shardings.params["policy"],
          min_vocab_size=run.model_cfg.vocab_size, dtype=run.model_cfg.dtype,
          remat=run.model_cfg.remat, tokenizer=run.tokenizer)
      print(f"initialized parameters from {train.init_from_hf}", flush=True)
      return run.spec.around({"policy": params}, {}, config.seed)
    if train.init_from:  # Another run's parameters (fresh optimizer).
      params, _ = checkpoint_lib.restore_params(
          os.path.join(train.init_from, run_folder.CHECKPOINT_DIR)
          if run_folder.is_run(train.init_from) else train.init_from,
          {"policy": run.abstract_state.params["policy"]})
      print(f"initialized parameters from {train.init_from}", flush=True)
      return run.spec.around(params, {}, config.seed)
    return run.spec.create(config.seed)

  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR), train.checkpoint_every,
      train.keep_checkpoints, train.async_checkpointing, kind="sft")
  state, position, start = loop_lib.restore_or_init(ckpt, run.abstract_state, init)
  batch_sharding = sharding_lib.batch_sharding(run.mesh, run.rules)
  step_fn = step_lib.jit_train_step(
      step_lib.make_train_step(losses.get_loss("sft_cross_entropy", run.model_cfg),
                               run.tx, train.grad_accum_steps),
      run.state_shardings, batch_sharding, run.mesh, run.rules)
  writer = metric_writer.MetricWriter(workdir, train.num_steps, start, enabled=is_main)
  window = {"tokens": 0, "start": time.time()}

  def iterate(state, position, step):
    batch, position = batcher.get_batch(position)
    window["tokens"] += int(np.sum(batch["segment_ids"] > 0))
    state, metrics = step_fn(state, sharding_lib.put_global_batch(batch, batch_sharding))
    return state, position, metrics

  def host_metrics(done):
    elapsed = time.time() - window["start"]
    out = {"tokens_per_second": window["tokens"] / max(elapsed, 1e-9),
           "learning_rate": float(run.schedule(done - 1))}
    window.update(tokens=0, start=time.time())
    return out

  def periodic_eval(state, done):
    eval_metrics, _ = evaluate(run, state.params["policy"], config.eval.split,
                               config.eval.num_examples)
    writer.write(done, heldout.scalars(eval_metrics), prefix=f"eval_{config.eval.split}/")
    if is_main:
      print(f"step {done}: {config.eval.split} accuracy {eval_metrics['accuracy']:.3f}",
            flush=True)

  loop = loop_lib.Loop(num_steps=train.num_steps, log_every=train.log_every,
                       eval_every=train.eval_every,
                       max_nonfinite_in_a_row=train.max_nonfinite_in_a_row,
                       shown=("loss", "token_accuracy", "grad_norm", "tokens_per_second"))
  try:
    state = loop_lib.fit(state, iterate, loop, ckpt, writer, position, start,
                         periodic_eval, host_metrics)
  finally:
    ckpt.close()

  eval_metrics, samples = evaluate(run, state.params["policy"], config.eval.split,
                                   config.eval.num_examples)
  eval_metrics["step"] = int(state.step)
  if is_main:
    heldout.write_eval(workdir, eval_metrics, samples)
    writer.write(int(state.step), heldout.scalars(eval_metrics),
                 prefix=f"eval_{config.eval.split}/")
    print(f"{config.eval.split} accuracy {eval_metrics['accuracy']:.3f} on "
          f"{eval_metrics['num_examples']} problems; wrote {workdir}/eval.json", flush=True)
  writer.close()
  return SFTResult(eval_metrics, state.params["policy"], run)
