"""The stage harness: one way to run every stage of the recipe.

A stage (SFT, RL, the verifier run, filtered SFT, the test-time sweep, and any new one)
is a small object registered by its `config.method`, that says only what is its own:

  name, kind(config)        its method, and the kind of state its checkpoints hold
  shown, log_all, fixed     console metrics, whether every iteration is logged, config
                            keys a rerun may not change (beyond `model`, `data`, `init_from`)
  validate(config)          its config checks (the harness checks `loop` and `mesh`)
  source(config, workdir) -> path | ""
                            where its state's policy starts: by default `init_from` ("" =
                            random init); RL's default when it is empty is the folder of
                            a nested stage it runs first (`run(...)` below)
  setup(ctx) -> Plan        its state spec, its first state, its `iterate` (one loop
                            iteration) and its evaluation; ctx holds what the harness
                            resolved (source, tokenizer, model config, mesh)

`run(config, workdir)` does everything else, once, for every stage:

  1. the config: a field renamed since (`errors.RENAMED`), the `loop` section, the
     mesh and the stage's own checks, each a one-line ConfigError before any work; after
     the stage's setup and the rerun check (4), its steps compiled at their shapes and
     their memory held against the device's (`memory`; a ConfigError naming the
     settings that shrink it), before anything is saved;
  2. the run folder: made, and refused when it holds another method's run;
  3. the policy source: the stage's `source` (`init_from`, or a nested stage's folder),
     resolved once with its tokenizer and model config (`policy_source`);
  4. the rerun check, then config, model config and tokenizer saved beside the
     checkpoints (`run_folder`);
  5. the checkpointer and resume (state and data position), the loop (`loop.fit`) with
     the `loop` section's settings, the metric writer;
  6. the evaluation before (stages that start from a policy and ask for it; kept in
     DIR/eval_before.json so a resumed run does not repeat it), periodic evaluations,
     and the final one;
  7. one result file, DIR/eval.json, written atomically (`write_json`):
       {"stage": method, "step": N, "metrics": {...}, "before": {...}, "after": {...}}
     (`before` / `after` where the stage evaluated the policy it started from).

A stage without training (the test-time sweep) sets `trains = False` and gives
`evaluate_only(config, workdir)`; the harness still owns steps 1, 2 and 7.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from o3lite import errors
from o3lite import registry
from o3lite.data import sources
from o3lite.evaluation import heldout
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import loop as loop_lib
from o3lite.training import memory
from o3lite.training import metric_writer
from o3lite.training import policy_source
from o3lite.training import run_folder

STAGES = registry.Registry("stage (config.method)")
RESULT_FILE = "eval.json"
BEFORE_FILE = "eval_before.json"
LOOP_FIELDS = ("num_steps", "log_every", "eval_every", "checkpoint_every",
               "keep_checkpoints", "max_nonfinite_in_a_row", "async_checkpointing")
# Sections a nested stage shares with the run around it (its own sections replace the rest).
SHARED = ("seed", "model", "data", "mesh", "eval")


def register(stage):
  """Registers a stage object under its `name`; returns it."""
  STAGES.register(stage.name)(stage)
  return stage


@dataclasses.dataclass
class Context:
  """What the harness resolved for a stage before its setup."""

  config: ml_collections.ConfigDict
  workdir: str
  source: policy_source.Source | None  # Where the policy starts; None = random init.
  tokenizer: Any
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


Evaluate = Callable[[Any, str], tuple[dict, list | None]]  # (state, tag) -> metrics, samples


@dataclasses.dataclass
class Plan:
  """A training stage's own parts, as its `setup` returns them."""

  spec: Any  # state.StateSpec: the abstract state and its shardings.
  init: Callable[[], Any]  # The first state (from ctx.source, or random).
  iterate: Callable[[Any, int, int], tuple[Any, int, dict]]  # See loop.fit.
  evaluate: Evaluate  # The final (and periodic) evaluation of a state.
  # The evaluation of the starting policy, when the stage reports before / after.
  evaluate_before: Evaluate | None = None
  host_metrics: Callable[[int], dict] | None = None  # Extra figures on logged lines.
  close: Callable[[], None] | None = None  # Releases what setup opened (threads, pools).
  extra: Callable[[Any], dict] | None = None  # More fields of eval.json, from the state.
  # Its steps compiled for abstract arguments, {name: executable}, and the settings that
  # shrink them: the memory check before any work (`memory`, `loop.memory_check`).
  compile: Callable[[], dict[str, Any]] | None = None
  memory_settings: str = ""


class Stage:
  """Defaults of a stage; a stage overrides what is its own (see the module docstring)."""

  name = ""
  trains = True
  shown: tuple[str, ...] = ("loss",)
  log_all = False
  fixed: tuple[str, ...] = ()

  def kind(self, config) -> str:
    del config
    return self.name

  def validate(self, config) -> None:
    del config

  def source(self, config, workdir: str) -> str:
    del workdir
    return config.init_from

  def setup(self, ctx: Context) -> Plan:
    raise NotImplementedError

  def evaluate_only(self, config, workdir: str) -> dict:
    raise NotImplementedError

  def summary(self, metrics: dict) -> str:
    return summary(metrics)


# --- config -----------------------------------------------------------------------------

def validate_loop(loop: ml_collections.ConfigDict, where: str = "loop") -> None:
  """The `loop` section: the same fields in every stage."""
  for name in LOOP_FIELDS:
    if name not in loop:
      raise errors.ConfigError(f"{where}.{name} is missing")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints",
               "max_nonfinite_in_a_row"):
    if loop[name] < 1:
      raise errors.ConfigError(f"{where}.{name}={loop[name]} must be at least 1")
  for name in ("num_steps", "eval_every"):
    if loop[name] < 0:
      raise errors.ConfigError(f"{where}.{name}={loop[name]} must be >= 0")


def mesh_and_rules(config) -> tuple[jax.sharding.Mesh, tuple]:
  """The config's mesh (a one-line MeshError when it does not fit) and its rules."""
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  return mesh, tuple(tuple(r) for r in config.mesh.rules)


def validate(config: ml_collections.ConfigDict) -> Stage:
  """Every check of a stage's config, before any work; returns the stage."""
  if "method" not in config:
    raise errors.ConfigError("config.method is missing: it names the stage to run")
  stage = STAGES.lookup(config.method)
  policy_source.check_renamed(config)
  if stage.trains:
    validate_loop(config.loop)
    mesh_and_rules(config)
    if config.init_from:
      policy_source.resolve(config.init_from)
  stage.validate(config)
  return stage


def nested_config(config: ml_collections.ConfigDict, section: str
                  ) -> ml_collections.ConfigDict:
  """The full config of the nested stage in `config[section]` (RL's warm start, the
  verifier run's policy): its own sections, with the run's shared ones (`SHARED`)."""
  nested = ml_collections.ConfigDict(config[section].to_dict())
  for name in SHARED:
    if name in config:
      nested[name] = ml_collections.ConfigDict(config[name].to_dict()) \
          if isinstance(config[name], ml_collections.ConfigDict) else config[name]
  return nested


# --- results ----------------------------------------------------------------------------

def write_json(path: str, tree: Any) -> None:
  """`tree` as JSON at `path`, atomically, on process 0 (`heldout.write_json`)."""
  if jax.process_index() == 0:
    heldout.write_json(path, tree)


def read_json(path: str) -> dict | None:
  """The JSON file at `path`, or None when there is none."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_result(workdir: str) -> dict | None:
  """A finished run's eval.json, or None when the run has not finished."""
  return read_json(os.path.join(workdir, RESULT_FILE))


def headline(metrics: dict) -> dict:
  """A result's final metrics, whether written by this harness or before it
  (`{"stage", "metrics"}`, or the flat / before_rl-after_rl files of older runs)."""
  if "metrics" in metrics and "stage" in metrics:
    return metrics["metrics"]
  return metrics.get("after_rl", metrics)


def scalars(tree: dict, prefix: str = "") -> dict[str, float]:
  """The flat finite numbers of a metrics tree ("a/b" keys), for TensorBoard."""
  out = {}
  for k, x in tree.items():
    if isinstance(x, dict):
      out.update(scalars(x, f"{prefix}{k}/"))
    elif isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x):
      out[prefix + k] = float(x)
  return out


# --- the run ----------------------------------------------------------------------------

def data_tokenizer(config):
  """The tokenizer of a stage without a source: `data.tokenizer`, else one trained on the
  data (see `sources.get_tokenizer`); process 0 makes it first in a multi-process run."""
  if jax.process_count() > 1:
    # Process 0 builds the dataset and tokenizer first, so processes sharing a data
    # folder never race to write it; the others then read (or build their own copy).
    if jax.process_index() == 0:
      sources.get_tokenizer(config.data)
    multihost_utils.sync_global_devices("o3lite: data prepared")
  return sources.get_tokenizer(config.data)


def model_config_from(model_fields, vocab_size: int) -> model_lib.ModelConfig:
  """The frozen ModelConfig of a config's `model` section (vocab_size 0: the tokenizer's)."""
  fields = dict(model_fields)
  if not fields.get("vocab_size"):
    fields["vocab_size"] = vocab_size
  elif fields["vocab_size"] < vocab_size:
    raise errors.ConfigError(f"model.vocab_size={fields['vocab_size']} is smaller than "
                             f"the tokenizer's {vocab_size} tokens")
  return model_lib.ModelConfig(**fields)


def context(config, workdir: str, source_path: str) -> Context:
  """Source, tokenizer, model config, mesh: resolved once."""
  source = policy_source.resolve(source_path) if source_path else None
  if source is None:
    tokenizer = data_tokenizer(config)
    model_cfg = model_config_from(config.model, tokenizer.vocab_size)
  else:
    tokenizer = source.tokenizer(config.data.get("chat_template", False))
    model_cfg = source.model_config(config.model, tokenizer.vocab_size)
  mesh, rules = mesh_and_rules(config)
  return Context(config, workdir, source, tokenizer, model_cfg, mesh, rules)


def _check_method(workdir: str, method: str) -> None:
  saved = run_folder.saved_method(workdir)
  if saved is not None and saved != method:
    raise errors.RunFolderError(f"{workdir} holds a {saved!r} run, not a {method!r} run: "
                                "use another --workdir")


def build(config: ml_collections.ConfigDict, workdir: str, stage: Stage | None = None
          ) -> tuple[Stage, Context, Plan]:
  """What a training stage builds before its loop (checks, source, context, its Plan),
  writing nothing in `workdir` but what nested stages make: for notebooks and tests."""
  registered = validate(config)
  stage = stage or registered
  ctx = context(config, workdir, stage.source(config, workdir))
  return stage, ctx, stage.setup(ctx)


def run(config: ml_collections.ConfigDict, workdir: str, stage: Stage | None = None
        ) -> dict:
  """Runs (or resumes) the stage `config.method` in `workdir` (or the given `stage`
  object, e.g. `sft.SFT(examples)`); returns its eval.json."""
  registered = validate(config)
  stage = stage or registered
  run_folder.prepare(workdir)
  _check_method(workdir, stage.name)
  if not stage.trains:
    run_folder.save_config(workdir, config)
    result = {"stage": stage.name, "metrics": stage.evaluate_only(config, workdir)}
    write_json(os.path.join(workdir, RESULT_FILE), result)
    return result
  ctx = context(config, workdir, stage.source(config, workdir))
  plan = stage.setup(ctx)
  run_folder.check_rerun(workdir, config, ctx.model_cfg,
                         ("model", "data", "init_from") + stage.fixed)
  if plan.compile is not None and config.loop.get("memory_check", True):
    limit = memory.device_bytes(ctx.mesh)
    peaks = memory.check(plan.compile(), limit, plan.memory_settings)
    if ctx.is_main:
      print("memory per device (XLA's estimate): " + ", ".join(
          f"{name} {peak / memory.GIB:.1f} GiB" for name, peak in peaks.items())
            + ("" if limit is None else f" of {limit / memory.GIB:.1f} GiB"), flush=True)
  run_folder.save(workdir, config, ctx.model_cfg, ctx.tokenizer)
  try:
    return _fit_and_evaluate(stage, ctx, plan)
  finally:
    if plan.close:
      plan.close()


def _fit_and_evaluate(stage: Stage, ctx: Context, plan: Plan) -> dict:
  loop_cfg, workdir = ctx.config.loop, ctx.workdir
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR), loop_cfg.checkpoint_every,
      loop_cfg.keep_checkpoints, loop_cfg.async_checkpointing, kind=stage.kind(ctx.config))
  state, position, start = loop_lib.restore_or_init(ckpt, plan.spec.abstract, plan.init)
  before = None
  if plan.evaluate_before is not None:
    before = read_json(os.path.join(workdir, BEFORE_FILE))
    if before is None:
      before, samples = plan.evaluate_before(state, "before")
      if ctx.is_main:  # eval_before.json and eval_before_samples.jsonl.
        heldout.write_eval(workdir, before, samples, BEFORE_FILE.removesuffix(".json"))
      print(f"before {stage.name}: {stage.summary(before)}", flush=True)
  writer = metric_writer.MetricWriter(workdir, loop_cfg.num_steps, start,
                                      enabled=ctx.is_main)

  def periodic_eval(state, done):
    metrics, _ = plan.evaluate(state, f"step{done}")
    writer.write(done, scalars(metrics), prefix="eval/")
    if ctx.is_main:
      print(f"step {done}: {stage.summary(metrics)}", flush=True)

  loop = loop_lib.Loop(num_steps=loop_cfg.num_steps, log_every=loop_cfg.log_every,
                       log_all=stage.log_all, eval_every=loop_cfg.eval_every,
                       max_nonfinite_in_a_row=loop_cfg.max_nonfinite_in_a_row,
                       shown=stage.shown)
  try:
    state = loop_lib.fit(state, plan.iterate, loop, ckpt, writer, position, start,
                         periodic_eval, plan.host_metrics)
  finally:
    ckpt.close()
  after, samples = plan.evaluate(state, "final")
  step = int(state.step)
  result = {"stage": stage.name, "step": step, "metrics": after}
  if before is not None:
    result.update(before=before, after=after)
  if plan.extra:
    result.update(plan.extra(state))
  if ctx.is_main:  # eval.json and eval_samples.jsonl.
    heldout.write_eval(workdir, result, samples, RESULT_FILE.removesuffix(".json"))
  # At the loop's last iteration, as the periodic evaluations (`step` counts optimizer
  # updates: RL makes several per iteration).
  writer.write(loop_cfg.num_steps, scalars(after), prefix="eval/")
  writer.close()
  if ctx.is_main:
    print(f"{stage.name}: {'' if before is None else stage.summary(before) + ' before, '}"
          f"{stage.summary(after)}; wrote {os.path.join(workdir, RESULT_FILE)}", flush=True)
  return result


def summary(metrics: dict) -> str:
  """The headline figures of an evaluation, for the console (a stage may override)."""
  if "accuracy" in metrics:
    return f"accuracy {metrics['accuracy']:.3f} on {metrics.get('num_examples', '?')} problems"
  return ", ".join(f"{k} {v:.3f}" for k, v in list(scalars(metrics).items())[:4])
