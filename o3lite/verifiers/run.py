"""The verifier stage: a policy, its solutions, their labels, a reward model, its evaluation.

`python -m o3lite.train --config=configs/prm.py` (or orm.py) runs it through the stage
harness (`o3lite.training.stage`). What must exist before training is made in the run
folder and reused by a rerun, so a killed run resumes where it stopped:

  DIR/policy/            the policy, unless `init_from` names one (a run folder or a
                         Hugging Face folder): an SFT run made here from the nested
                         `policy` section
  DIR/labels/train.jsonl the policy's solutions to training problems, labelled
                         (`solutions.label_solutions`; `verifier.labels` gives a file instead)
  DIR/labels/eval.jsonl  held-out solutions with exact labels (the task's true
                         intermediate values) and outcomes
  DIR/checkpoints/       the reward model's train state (the one train step and loop)
  DIR/eval.json          step-level and first-error metrics (PRM), accuracy and
                         calibration (both), DIR/reliability.png

The reward model's trunk starts from `verifier.trunk_from` ("" = the policy).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import ml_collections
import numpy as np
import optax

from o3lite import errors
from o3lite.data import sources
from o3lite.parallel import mesh as sharding_lib
from o3lite.sampling import draws
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import losses
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import policy_source
from o3lite.training import run_folder
from o3lite.training import sft as sft_lib
from o3lite.training import stage as stage_lib
from o3lite.training import step as step_lib
from o3lite.verifiers import aggregation
from o3lite.verifiers import label_files
from o3lite.verifiers import labellers
from o3lite.verifiers import metrics as metrics_lib
from o3lite.verifiers import reward_model as rm
from o3lite.verifiers import solutions as solutions_lib
from o3lite.verifiers import verifier_data

POLICY_DIR = "policy"
LOSSES = {"bce": "verifier_bce", "bradley_terry": "verifier_bradley_terry"}
TRAIN_LABELS, EVAL_LABELS = "labels/train.jsonl", "labels/eval.jsonl"


def validate_verifier(config: ml_collections.ConfigDict) -> None:
  """The `verifier` section (and the nested policy, when it is made here)."""
  v = config.verifier
  if v.kind not in rm.KINDS:
    raise errors.ConfigError(f"verifier.kind={v.kind!r}: expected one of {list(rm.KINDS)}")
  if v.loss not in LOSSES:
    raise errors.ConfigError(f"verifier.loss={v.loss!r}: expected one of {list(LOSSES)}")
  if v.loss == "bradley_terry" and v.kind != "orm":
    raise errors.ConfigError("verifier.loss='bradley_terry' compares whole solutions: it "
                             "needs verifier.kind='orm'")
  if v.answer_read and v.kind != "prm":
    raise errors.ConfigError("verifier.answer_read adds an answer read to a PRM's steps: "
                             "it needs verifier.kind='prm'")
  if v.trunk_from:
    policy_source.resolve(v.trunk_from, "verifier.trunk_from")
  for name in ("labels", "eval_labels"):
    if v[name] and not os.path.isfile(v[name]):
      raise errors.ConfigError(f"verifier.{name}={v[name]}: no such file")
  labellers.LABELLERS.lookup(v.labeller)
  if v.consensus_with:
    labellers.LABELLERS.lookup(v.consensus_with)
  for name in ("num_problems", "eval_problems", "samples_per_problem", "max_new_tokens",
               "sample_batch_size", "seq_len", "batch_size", "eval_batch_size"):
    if v[name] < 1:
      raise errors.ConfigError(f"verifier.{name}={v[name]} must be at least 1")
  if not v.temperature >= 0 or not 0 < v.threshold < 1:
    raise errors.ConfigError("verifier.temperature >= 0 and 0 < verifier.threshold < 1, "
                             "please")
  labellers.MonteCarloConfig(**dict(v.monte_carlo))
  optimizer_lib.validate(config.optimizer)
  if not config.init_from:
    stage_lib.validate(stage_lib.nested_config(config, POLICY_DIR))
  mesh, rules = stage_lib.mesh_and_rules(config)
  sharding_lib.check_batch(v.batch_size, mesh, rules)


def policy_run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The policy whose solutions are labelled: `init_from`, else an SFT run in
  DIR/policy (the nested `policy` section), made once and reused (resumed if cut off)."""
  if config.init_from:
    return config.init_from
  policy_dir = os.path.join(workdir, POLICY_DIR)
  if stage_lib.read_result(policy_dir) is None:
    nested = stage_lib.nested_config(config, POLICY_DIR)
    print(f"policy: SFT ({nested.loop.num_steps} steps) in {policy_dir}", flush=True)
    stage_lib.run(nested, policy_dir)
  return policy_dir


def make_labels(config: ml_collections.ConfigDict, policy_dir: str, split: str,
                path: str) -> dict[str, Any]:
  """Samples the policy's solutions to the first problems of `split` and labels them
  into `path` (train: `verifier.labeller`, with `consensus_with`; eval: exact labels
  where the task has them, else the same labeller); returns the labelling stats."""
  v = config.verifier
  mesh, rules = stage_lib.mesh_and_rules(config)
  run = policy_source.load(policy_dir, config.model, mesh, rules)
  train = split == "train"
  examples = sft_lib.held_out_examples(config.data, split,
                                         v.num_problems if train else v.eval_problems)
  sampling = draws.Sampling(max_new_tokens=v.max_new_tokens, temperature=v.temperature,
                            prompt_bucket=v.prompt_bucket)
  t0 = time.time()
  of, texts, dropped = solutions_lib.sample_solutions(
      run, examples, v.samples_per_problem, sampling, v.seed + (0 if train else 1),
      v.sample_batch_size)
  t_sample = time.time() - t0
  checker = sources.get_checker(config.data)
  rollouts = labellers.Rollouts(
      run.params, run.model_cfg, run.tokenizer, labellers.MonteCarloConfig(**dict(v.monte_carlo)),
      labellers.answer_outcome(checker), run.mesh, run.rules)
  labeller = v.labeller
  if not train and all("step_values" in e for e in of):
    labeller = "exact"
  records, stats = solutions_lib.label_solutions(
      of, texts, labeller, rollouts, v.consensus_with if train else "")
  stats.update(split=split, problems=len(examples), dropped_solutions=dropped,
               sampling_seconds=t_sample,
               labelling_seconds=time.time() - t0 - t_sample)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  label_files.write_labelled(path, records)
  with open(path.removesuffix(".jsonl") + "_stats.json", "w") as f:
    json.dump(stats, f, indent=2)
  print(f"labelled {len(records)} {split} solutions ({labeller}"
        f"{', consensus with ' + v.consensus_with if train and v.consensus_with else ''}) "
        f"in {stats['sampling_seconds'] + stats['labelling_seconds']:.0f} s: "
        f"{stats['correct_step_fraction']:.1%} of steps correct, "
        f"{stats['outcome_accuracy']:.1%} of answers; wrote {path}", flush=True)
  return stats


def evaluate(verifier: rm.Verifier, records: Sequence[label_files.LabelledSolution],
             threshold: float, plot_path: str | None = None) -> dict[str, Any]:
  """Held-out metrics: ORM and PRM outcome accuracy and calibration; for a PRM the
  step-level and first-error metrics against the records' labels (exact where made
  here; `exact_labels` metadata preferred when present)."""
  examples = [{"question": r.question, "answer": r.answer} for r in records]
  texts = [r.solution for r in records]
  outcomes = [int(r.metadata.get("outcome", 0)) for r in records]
  out: dict[str, Any] = {"kind": verifier.kind, "solutions": len(records),
                         "outcome_accuracy_of_policy": float(np.mean(outcomes))}
  if verifier.kind == "prm":
    reads = verifier._probabilities([rm.encode(r.question, r.solution, verifier.tokenizer,
                                               "prm", r.steps, answer_read=verifier.answer_read)
                                     for r in records])
    scores = [p[:-1] for p in reads] if verifier.answer_read else reads
    gold = [r.metadata.get("exact_labels", r.labels) for r in records]
    out["step"] = metrics_lib.step_metrics(scores, gold, threshold)
    out["first_error"] = metrics_lib.first_error_f1(scores, gold, threshold)
    solution_p = {agg: [aggregation.aggregate(agg, s) for s in scores]
                  for agg in ("last", "min")}
    if verifier.answer_read:  # Its read of the answer itself.
      solution_p["answer"] = [p[-1] for p in reads]
    out["outcome"] = {agg: metrics_lib.calibration(p, outcomes)
                      for agg, p in solution_p.items()}
    main = out["outcome"]["min"]
  else:
    out["outcome"] = metrics_lib.calibration(verifier.score_outcomes(examples, texts),
                                             outcomes)
    main = out["outcome"]
  if plot_path:
    metrics_lib.reliability_plot(main, plot_path, f"{verifier.kind.upper()} outcome")
  return out


def summary(metrics: dict[str, Any]) -> str:
  """One line of the headline figures."""
  if metrics["kind"] == "prm":
    s, f, o = metrics["step"], metrics["first_error"], metrics["outcome"]["min"]
    return (f"PRM: step error F1 {s['error_f1']:.3f} (P {s['error_precision']:.3f} R "
            f"{s['error_recall']:.3f}), step AUC {s['auc']:.3f}, first-error F1 "
            f"{f['f1']:.3f}, outcome (min) accuracy {o['accuracy']:.3f} ECE {o['ece']:.3f}"
            + ("" if "answer" not in metrics["outcome"] else
               f"; answer read: AUC {metrics['outcome']['answer']['auc']:.3f} ECE "
               f"{metrics['outcome']['answer']['ece']:.3f}"))
  o = metrics["outcome"]
  return f"ORM: accuracy {o['accuracy']:.3f}, AUC {o['auc']:.3f}, ECE {o['ece']:.3f}"


class VerifierStage(stage_lib.Stage):
  """An ORM or PRM: the policy's trunk and a scalar head, trained on labelled solutions."""

  name = "verifier"
  shown = ("loss", "accuracy", "grad_norm")
  fixed = ("verifier.kind", "verifier.trunk_from", "verifier.labels", "verifier.labeller",
           "verifier.consensus_with", "verifier.soft_labels", "verifier.loss",
           "verifier.answer_read")

  def kind(self, config) -> str:
    return f"verifier-{config.verifier.kind}"

  def validate(self, config) -> None:
    validate_verifier(config)

  def source(self, config, workdir: str) -> str:
    """The policy (given or made in DIR/policy) and its labelled solutions first; the
    trunk then starts from `verifier.trunk_from`, else the policy."""
    policy_dir = policy_run(config, workdir)
    for split, path in label_paths(config, workdir):
      if not os.path.isfile(path):
        make_labels(config, policy_dir, split, path)
    return config.verifier.trunk_from or policy_dir

  def setup(self, ctx: stage_lib.Context) -> stage_lib.Plan:
    config, v = ctx.config, ctx.config.verifier
    (_, train_path), (_, eval_path) = label_paths(config, ctx.workdir)
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.loop.num_steps,
                                                {"verifier": None})
    spec = rm.state_spec(ctx.model_cfg, tx, ctx.mesh, ctx.rules)
    records = label_files.read_labelled(train_path)
    eval_records = label_files.read_labelled(eval_path)
    encoded = verifier_data.encode_records(records, ctx.tokenizer, v.kind, v.soft_labels,
                                           v.answer_read)
    pairs = v.loss == "bradley_terry"
    items = verifier_data.preference_pairs(records, encoded) if pairs else encoded
    if not items:
      raise errors.DataError(f"{train_path}: no " + (
          "question with both a correct and a wrong solution (Bradley-Terry needs pairs)"
          if pairs else "labelled solutions"))
    batches = verifier_data.Batches(items, v.batch_size, v.seq_len, ctx.tokenizer.pad_id,
                                    config.seed, pairs=pairs)

    def init():
      trunk = ctx.source.load_policy(spec.abstract.params["verifier"]["trunk"],
                                     ctx.model_cfg, ctx.tokenizer)
      print(f"verifier trunk from {ctx.source.path}", flush=True)
      return rm.from_policy(spec, trunk, config.seed)

    batch_sharding = sharding_lib.batch_sharding(ctx.mesh, ctx.rules)
    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(losses.get_loss(LOSSES[v.loss], ctx.model_cfg), tx),
        spec.shardings, batch_sharding, ctx.mesh, ctx.rules)

    def iterate(state, position, step):
      del step
      batch, position = batches.get_batch(position)
      state, metrics = step_fn(state, sharding_lib.put_global_batch(batch, batch_sharding))
      return state, position, metrics

    def evaluate_state(state, tag):
      verifier = rm.Verifier(state.params["verifier"], ctx.model_cfg, ctx.tokenizer, v.kind,
                             v.seq_len, v.eval_batch_size, ctx.mesh, ctx.rules,
                             v.answer_read)
      plot = os.path.join(ctx.workdir, "reliability.png") if ctx.is_main and \
          tag == "final" else None
      return evaluate(verifier, eval_records, v.threshold, plot), None

    return stage_lib.Plan(
        spec=spec, init=init, iterate=iterate, evaluate=evaluate_state,
        host_metrics=lambda done: {"learning_rate": float(schedule(done - 1))},
        extra=lambda state: {"train_labels": train_path, "eval_labels": eval_path,
                             "train_solutions": len(records), "train_items": len(items)})

  def summary(self, metrics: dict) -> str:
    return summary(metrics)


def label_paths(config, workdir: str) -> tuple[tuple[str, str], tuple[str, str]]:
  """((train split, its labels file), (held-out split, its labels file))."""
  v = config.verifier
  return (("train", v.labels or os.path.join(workdir, TRAIN_LABELS)),
          (config.eval.split, v.eval_labels or os.path.join(workdir, EVAL_LABELS)))


stage_lib.register(VerifierStage())


def load_verifier(workdir: str, batch_size: int = 32, mesh_shape=None) -> rm.Verifier:
  """The trained reward model of a verifier run folder, ready to score."""
  config = run_folder.load_config(workdir)
  if config.get("method") != "verifier":
    raise errors.RunFolderError(f"{workdir} holds a {config.get('method')!r} run, not a "
                                "verifier run")
  model_cfg = run_folder.load_model_config(workdir)
  tokenizer = policy_source.saved_tokenizer(workdir)
  mesh = sharding_lib.make_mesh(config.mesh.axes, mesh_shape or config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  spec = rm.state_spec(model_cfg, optax.identity(), mesh, rules)
  params, _ = checkpoint_lib.restore_params(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR),
      {"verifier": spec.abstract.params["verifier"]})
  return rm.Verifier(params["verifier"], model_cfg, tokenizer, config.verifier.kind,
                     config.verifier.seq_len, batch_size, mesh, rules,
                     bool(config.verifier.get("answer_read", False)))
