"""The SFT run: data, tokenizer, sharded state, checkpoints, the loop, evaluation.

`run_sft(config, workdir)` is what `python -m o3lite.train` calls; it is importable from
a notebook. A rerun with the same workdir resumes from the latest checkpoint (train state,
RNG and data position), so a killed run ends with the parameters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from o3lite import checkpoint as checkpoint_lib
from o3lite import evaluation
from o3lite import hf
from o3lite import metrics as metrics_lib
from o3lite import model as model_lib
from o3lite import optimizer as optimizer_lib
from o3lite import sft
from o3lite import sharding as sharding_lib
from o3lite import tasks
from o3lite import tokenizer as tokenizer_lib
from o3lite import train_state as train_state_lib
from o3lite.data import pipeline
from o3lite.data import sources


def model_config_from(model_fields, vocab_size: int) -> model_lib.ModelConfig:
  """The frozen ModelConfig of a run config's `model` section."""
  fields = dict(model_fields)
  if not fields.get("vocab_size"):
    fields["vocab_size"] = vocab_size
  elif fields["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the "
                     f"tokenizer's {vocab_size} tokens")
  return model_lib.ModelConfig(**fields)


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
  abstract_state: Any
  state_shardings: Any


def hf_model_config(path: str, model_fields, vocab_size: int) -> model_lib.ModelConfig:
  """The shape of the Hugging Face checkpoint in `path`, with dtype and remat from the
  run config's `model` section and room for the tokenizer's `vocab_size` tokens."""
  config_file = os.path.join(path, hf.CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path}: no {hf.CONFIG_FILE} there")
  with open(config_file) as f:
    cfg = hf.model_config_from_hf(json.load(f), dtype=model_fields.dtype,
                                  remat=model_fields.remat)
  return dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, vocab_size))


def _get_tokenizer(config: ml_collections.ConfigDict):
  if config.train.init_from_hf and not config.data.tokenizer:
    return tokenizer_lib.HFTokenizer(config.train.init_from_hf)  # The checkpoint's own.
  return tokenizer_lib.get_tokenizer(config.data)


def setup(config: ml_collections.ConfigDict, workdir: str,
          model_cfg: model_lib.ModelConfig | None = None) -> Run:
  """Tokenizer, model config, mesh, optimizer and the state's shardings.

  The model config is `model_cfg` if given (a saved run's), else the `train.init_from_hf`
  checkpoint's shape, else the `model` section.
  """
  if config.train.init_from and config.train.init_from_hf:
    raise ValueError("set one of train.init_from and train.init_from_hf, not both")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_count() > 1:
    # Process 0 builds the dataset and tokenizer first, so processes sharing a data
    # folder never race to write it; the others then read (or build their own copy).
    if jax.process_index() == 0:
      _get_tokenizer(config)
    multihost_utils.sync_global_devices("o3lite: data prepared")
  tokenizer = _get_tokenizer(config)
  if model_cfg is None and config.train.init_from_hf:
    model_cfg = hf_model_config(config.train.init_from_hf, config.model,
                                tokenizer.vocab_size)
  elif model_cfg is None:
    model_cfg = model_config_from(config.model, tokenizer.vocab_size)
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  train = config.train
  if train.batch_size % train.grad_accum_steps:
    raise ValueError(f"train.batch_size={train.batch_size} is not divisible by "
                     f"train.grad_accum_steps={train.grad_accum_steps}")
  sharding_lib.check_batch(train.batch_size // train.grad_accum_steps, mesh, rules)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, train.num_steps)
  abstract, shardings = train_state_lib.state_shardings(model_cfg, tx, mesh, rules)
  return Run(config, workdir, tokenizer, model_cfg, mesh, rules, tx, schedule, abstract,
             shardings)


def _save_run_files(run: Run) -> None:
  """The config and tokenizer next to the checkpoints (process 0 only)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(run.workdir, "config.json"), "w") as f:
    f.write(run.config.to_json_best_effort(indent=2))
  with open(os.path.join(run.workdir, "model_config.json"), "w") as f:
    json.dump(dataclasses.asdict(run.model_cfg), f, indent=2)
  run.tokenizer.save(os.path.join(run.workdir, "tokenizer"))


def train_examples(data_cfg) -> Sequence[dict]:
  """The SFT training examples, with `data.cot_slip_rate` slips if asked for."""
  examples = sources.load_examples(data_cfg, "train")
  if not data_cfg.cot_slip_rate:
    return examples
  if data_cfg.source != "task" or data_cfg.task != "opchain":
    raise ValueError("data.cot_slip_rate needs data.source='task' and data.task='opchain'")
  modulus = dict(data_cfg.task_kwargs).get("modulus", 10)
  return [tasks.slip_opchain(examples[i], data_cfg.cot_slip_op, data_cfg.cot_slip_rate,
                             modulus, data_cfg.seed) for i in range(len(examples))]


def held_out_examples(run: Run, split: str, num_examples: int) -> list[dict]:
  """The first `num_examples` problems of a split."""
  examples = sources.load_examples(run.config.data, split)
  return [examples[i] for i in range(min(num_examples, len(examples)))]


def evaluate(run: Run, params, split: str, num_examples: int) -> tuple[dict, list]:
  """Every held-out metric of the run's `eval` section (see `evaluation.evaluate`)."""
  return evaluation.evaluate(
      params, run.model_cfg, held_out_examples(run, split, num_examples), run.tokenizer,
      sources.get_checker(run.config.data), run.config.eval, split, run.mesh, run.rules)


def load_run(workdir: str, step: int | None = None) -> tuple[Run, Any]:
  """A finished or running training run rebuilt from its folder: (Run, params)."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{workdir} is not a run folder: no config.json")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.data.tokenizer = tokenizer_lib.saved_path(os.path.join(workdir, "tokenizer"))
  config.lock()
  with open(os.path.join(workdir, "model_config.json")) as f:
    model_cfg = model_lib.ModelConfig(**json.load(f))
  run = setup(config, workdir, model_cfg)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
  try:
    state, _ = ckpt.restore(run.abstract_state, step)
  finally:
    ckpt.close()
  return run, state.params


def run_sft(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or resume) and evaluate; returns the final held-out metrics."""
  run = setup(config, workdir)
  _save_run_files(run)
  train = config.train
  is_main = jax.process_index() == 0

  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), train.checkpoint_every,
      train.keep_checkpoints, train.async_checkpointing)
  if ckpt.latest_step() is not None:
    state, position = ckpt.restore(run.abstract_state)
    print(f"resumed from step {int(state.step)} of {ckpt.directory}", flush=True)
  else:
    params = None
    if train.init_from_hf:  # A Hugging Face checkpoint, read into the params' shardings.
      _, params = hf.load_hf_checkpoint(
          train.init_from_hf, shardings=run.state_shardings.params,
          min_vocab_size=run.model_cfg.vocab_size, dtype=run.model_cfg.dtype,
          remat=run.model_cfg.remat)
      print(f"initialized parameters from {train.init_from_hf}", flush=True)
    state = train_state_lib.create_train_state(
        run.model_cfg, run.tx, run.mesh, run.rules, config.seed, params)
    if train.init_from:  # Start from another run's parameters (fresh optimizer).
      params = checkpoint_lib.restore_params(train.init_from, run.abstract_state)
      state = state.replace(params=params)
      print(f"initialized parameters from {train.init_from}", flush=True)
    position = 0
  start_step = int(state.step)

  batcher = pipeline.SFTBatcher(
      train_examples(config.data), run.tokenizer, train.batch_size,
      config.data.seq_len, seed=config.data.seed, with_cot=config.data.with_cot,
      pack=config.data.pack)
  batch_sharding = sharding_lib.batch_sharding(run.mesh, run.rules)
  step_fn = sft.jit_train_step(
      sft.make_train_step(run.model_cfg, run.tx, train.grad_accum_steps),
      run.state_shardings, batch_sharding, run.mesh, run.rules)
  writer = metrics_lib.MetricWriter(workdir, train.num_steps, start_step, enabled=is_main)

  pending = None  # Metrics of the previous step, read from device one step late.
  window_tokens, window_start = 0, time.time()
  for step in range(start_step, train.num_steps):
    batch, position = batcher.get_batch(position)
    window_tokens += int(np.sum(batch["segment_ids"] > 0))
    state, metrics = step_fn(state, sharding_lib.put_global_batch(batch, batch_sharding))
    done = step + 1
    if pending is not None:
      _log(writer, *pending)
      pending = None
    if done % train.log_every == 0 or done == train.num_steps:
      elapsed = time.time() - window_start
      extra = {"tokens_per_second": window_tokens / max(elapsed, 1e-9),
               "learning_rate": float(run.schedule(step))}
      pending = (done, metrics, extra)
      window_tokens, window_start = 0, time.time()
    ckpt.save(done, state, position, force=done == train.num_steps)
    if train.eval_every and done % train.eval_every == 0 and done < train.num_steps:
      eval_metrics, _ = evaluate(run, state.params, config.eval.split,
                                 config.eval.num_examples)
      writer.write(done, {k: v for k, v in eval_metrics.items()
                          if isinstance(v, (int, float))}, prefix=f"eval_{config.eval.split}/")
      if is_main:
        print(f"step {done}: {config.eval.split} accuracy {eval_metrics['accuracy']:.3f}",
              flush=True)
  if pending is not None:
    _log(writer, *pending)
  ckpt.wait()
  ckpt.close()

  eval_metrics, samples = evaluate(run, state.params, config.eval.split,
                                   config.eval.num_examples)
  eval_metrics["step"] = int(state.step)
  if is_main:
    evaluation.write_eval(workdir, eval_metrics, samples)
    writer.write(int(state.step), {k: v for k, v in eval_metrics.items()
                                   if isinstance(v, (int, float)) and k != "step"},
                 prefix=f"eval_{config.eval.split}/")
    print(f"{config.eval.split} accuracy {eval_metrics['accuracy']:.3f} on "
          f"{eval_metrics['num_examples']} problems; wrote {workdir}/eval.json", flush=True)
  writer.close()
  return eval_metrics


def _log(writer: metrics_lib.MetricWriter, step: int, metrics, extra) -> None:
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  values.update(extra)
  writer.write(step, values)
  shown = {k: values[k] for k in ("loss", "token_accuracy", "grad_norm",
                                  "tokens_per_second")}
  writer.progress(step, shown)
