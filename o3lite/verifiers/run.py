"""The verifier run: policy, its solutions, their labels, a reward model, its evaluation.

`run_verifier(config, workdir)` is what `python -m o3lite.train --config=configs/prm.py`
(or orm.py) calls. Each stage writes its result into the run folder and is skipped when
a rerun finds it, so a killed run resumes where it stopped:

  DIR/policy/            the policy (an SFT run made here, unless `verifier.policy` names one)
  DIR/labels/train.jsonl the policy's solutions to training problems, labelled
                         (`solutions.label_solutions`; `verifier.labels` gives a file instead)
  DIR/labels/eval.jsonl  held-out solutions with exact labels (the task's true
                         intermediate values) and outcomes
  DIR/checkpoints/       the reward model's train state (the one train step and loop)
  DIR/eval.json          step-level and first-error metrics (PRM), accuracy and
                         calibration (both), DIR/reliability.png
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

from o3lite import errors
from o3lite.data import sources
from o3lite.data import tokenizers as tokenizer_lib
from o3lite.interop import huggingface as hf
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import loop as loop_lib
from o3lite.training import losses
from o3lite.training import metric_writer
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import run_folder
from o3lite.training import sft as sft_lib
from o3lite.training import step as step_lib
from o3lite.verifiers import label_files
from o3lite.verifiers import labellers
from o3lite.verifiers import metrics as metrics_lib
from o3lite.verifiers import reward_model as rm
from o3lite.verifiers import solutions as solutions_lib
from o3lite.verifiers import verifier_data

LOSSES = {"bce": "verifier_bce", "bradley_terry": "verifier_bradley_terry"}
TRAIN_LABELS, EVAL_LABELS = "labels/train.jsonl", "labels/eval.jsonl"


def _policy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return run_folder.stage_config(config, "sft", ("verifier",))


def _is_run(path: str) -> bool:
  return os.path.isfile(os.path.join(path, run_folder.MODEL_CONFIG_FILE))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole verifier config (policy warm start included) before any work."""
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
  for name in ("policy", "init_from"):
    if v[name] and not _is_run(v[name]):
      what = "does not exist" if not os.path.exists(v[name]) else (
          f"is not an o3lite run folder (no {run_folder.MODEL_CONFIG_FILE})")
      raise errors.ConfigError(f"verifier.{name}={v[name]} {what}")
  if v.init_from and v.init_from_hf:
    raise errors.ConfigError("set one of verifier.init_from and verifier.init_from_hf")
  if v.init_from_hf:
    hf.check_folder(v.init_from_hf, "verifier.init_from_hf")
  for name in ("labels", "eval_labels"):
    if v[name] and not os.path.isfile(v[name]):
      raise errors.ConfigError(f"verifier.{name}={v[name]}: no such file")
  labellers.LABELLERS.lookup(v.labeller)
  if v.consensus_with:
    labellers.LABELLERS.lookup(v.consensus_with)
  for name in ("num_problems", "eval_problems", "samples_per_problem", "max_new_tokens",
               "sample_batch_size", "seq_len", "batch_size", "log_every",
               "checkpoint_every", "keep_checkpoints", "max_nonfinite_in_a_row",
               "eval_batch_size"):
    if v[name] < 1:
      raise errors.ConfigError(f"verifier.{name}={v[name]} must be at least 1")
  if v.num_steps < 0 or not v.temperature >= 0 or not 0 < v.threshold < 1:
    raise errors.ConfigError("verifier.num_steps >= 0, verifier.temperature >= 0 and "
                             "0 < verifier.threshold < 1, please")
  labellers.MonteCarloConfig(**dict(v.monte_carlo))
  optimizer_lib.validate(v.optimizer, "verifier.optimizer")
  if not v.policy:
    sft_lib.validate(_policy_config(config))
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  sharding_lib.check_batch(v.batch_size, mesh, tuple(tuple(r) for r in config.mesh.rules))


def policy_run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The policy whose solutions are labelled: `verifier.policy`, else an SFT run in
  DIR/policy (the config's `train`, `optimizer`, `data` and `model` sections), made
  once and reused (resumed if it was cut off)."""
  if config.verifier.policy:
    return config.verifier.policy
  policy_dir = os.path.join(workdir, "policy")
  if not os.path.isfile(os.path.join(policy_dir, "eval.json")):
    print(f"policy: SFT ({config.train.num_steps} steps) in {policy_dir}", flush=True)
    sft_lib.run_sft(_policy_config(config), policy_dir)
  return policy_dir


@dataclasses.dataclass
class VerifierRun:
  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  model_cfg: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: Any
  spec: Any
  schedule: Any


def saved_tokenizer(run_dir: str):
  """The tokenizer an o3lite run folder saved."""
  return sources.get_tokenizer(ml_collections.ConfigDict({
      "tokenizer": tokenizer_lib.saved_path(os.path.join(run_dir, run_folder.TOKENIZER_DIR))}))


def _trunk_source(config, policy_dir: str) -> tuple[str, bool]:
  """(where the verifier's trunk starts, whether that is a Hugging Face folder)."""
  v = config.verifier
  if v.init_from_hf:
    return v.init_from_hf, True
  return v.init_from or policy_dir, False


def setup(config: ml_collections.ConfigDict, workdir: str, policy_dir: str) -> VerifierRun:
  source, is_hf = _trunk_source(config, policy_dir)
  if is_hf:
    tokenizer = tokenizer_lib.HFTokenizer(source)
    model_cfg = sft_lib.hf_model_config(source, config.model, tokenizer.vocab_size)
  else:
    tokenizer = saved_tokenizer(source)
    model_cfg = run_folder.load_model_config(source)
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx, schedule = optimizer_lib.make_optimizer(config.verifier.optimizer,
                                              config.verifier.num_steps,
                                              {"verifier": None}, "verifier.optimizer")
  spec = rm.state_spec(model_cfg, tx, mesh, rules)
  return VerifierRun(config, workdir, tokenizer, model_cfg, mesh, rules, tx, spec, schedule)


def make_labels(config: ml_collections.ConfigDict, policy_dir: str, split: str,
                path: str) -> dict[str, Any]:
  """Samples the policy's solutions to the first problems of `split` and labels them
  into `path` (train: `verifier.labeller`, with `consensus_with`; eval: exact labels
  where the task has them, else the same labeller); returns the labelling stats."""
  v = config.verifier
  mesh_shape = tuple(config.mesh.shape)
  run, params = sft_lib.load_run(policy_dir, mesh_shape=mesh_shape)
  train = split == "train"
  examples = sft_lib.held_out_examples(run, split, v.num_problems if train else v.eval_problems)
  sampling = solutions_lib.SolutionSampling(
      num_samples=v.samples_per_problem, temperature=v.temperature,
      max_new_tokens=v.max_new_tokens, batch_size=v.sample_batch_size,
      prompt_bucket=config.verifier.prompt_bucket, seed=v.seed + (0 if train else 1))
  t0 = time.time()
  of, texts, dropped = solutions_lib.sample_solutions(params, run.model_cfg, run.tokenizer, examples,
                                             sampling, run.mesh, run.rules)
  t_sample = time.time() - t0
  checker = sources.get_checker(config.data)
  rollouts = labellers.Rollouts(
      params, run.model_cfg, run.tokenizer, labellers.MonteCarloConfig(**dict(v.monte_carlo)),
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
    solution_p = {"last": [s[-1] if s else 0.5 for s in scores],
                  "min": [min(s) if s else 0.5 for s in scores]}
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


def run_verifier(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Policy, labels, training and evaluation of an ORM or PRM; returns eval.json."""
  validate(config)
  run_folder.prepare(workdir)
  v = config.verifier
  if run_folder.is_run(workdir):
    saved = run_folder.load_config(workdir)
    if saved.get("method") != "verifier":
      raise errors.RunFolderError(f"{workdir} holds a {saved.get('method')!r} run, not a "
                                  "verifier run: use another --workdir")
  policy_dir = policy_run(config, workdir)
  train_path = v.labels or os.path.join(workdir, TRAIN_LABELS)
  eval_path = v.eval_labels or os.path.join(workdir, EVAL_LABELS)
  for split, path in (("train", train_path), (config.eval.split, eval_path)):
    if not os.path.isfile(path):
      make_labels(config, policy_dir, split, path)
  run = setup(config, workdir, policy_dir)
  run_folder.check_rerun(workdir, config, run.model_cfg,
                         ("model", "data", "verifier.kind", "verifier.labels",
                          "verifier.labeller", "verifier.consensus_with",
                          "verifier.soft_labels", "verifier.loss", "verifier.answer_read"))
  records = label_files.read_labelled(train_path)
  eval_records = label_files.read_labelled(eval_path)
  encoded = verifier_data.encode_records(records, run.tokenizer, v.kind, v.soft_labels,
                                         v.answer_read)
  pairs = v.loss == "bradley_terry"
  items = verifier_data.preference_pairs(records, encoded) if pairs else encoded
  if not items:
    raise errors.DataError(f"{train_path}: no " + (
        "question with both a correct and a wrong solution (Bradley-Terry needs pairs)"
        if pairs else "labelled solutions"))
  batches = verifier_data.Batches(items, v.batch_size, v.seq_len, run.tokenizer.pad_id,
                                  config.seed, pairs=pairs)
  run_folder.save(workdir, config, run.model_cfg, run.tokenizer)
  is_main = jax.process_index() == 0
  source, is_hf = _trunk_source(config, policy_dir)

  def init():
    if is_hf:
      _, trunk = hf.load_hf_checkpoint(
          source, shardings=run.spec.shardings.params["verifier"]["trunk"],
          min_vocab_size=run.model_cfg.vocab_size, dtype=run.model_cfg.dtype,
          remat=run.model_cfg.remat, tokenizer=run.tokenizer)
    else:
      trunk, _ = checkpoint_lib.restore_params(
          os.path.join(source, run_folder.CHECKPOINT_DIR),
          {"policy": run.spec.abstract.params["verifier"]["trunk"]})
      trunk = trunk["policy"]
    print(f"verifier trunk from {source}", flush=True)
    return rm.from_policy(run.spec, trunk, config.seed)

  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR), v.checkpoint_every,
      v.keep_checkpoints, async_save=True, kind=f"verifier-{v.kind}")
  state, position, start = loop_lib.restore_or_init(ckpt, run.spec.abstract, init)
  batch_sharding = sharding_lib.batch_sharding(run.mesh, run.rules)
  step_fn = step_lib.jit_train_step(
      step_lib.make_train_step(losses.get_loss(LOSSES[v.loss], run.model_cfg), run.tx),
      run.spec.shardings, batch_sharding, run.mesh, run.rules)
  writer = metric_writer.MetricWriter(workdir, v.num_steps, start, enabled=is_main)

  def iterate(state, position, step):
    del step
    batch, position = batches.get_batch(position)
    state, metrics = step_fn(state, sharding_lib.put_global_batch(batch, batch_sharding))
    return state, position, metrics

  loop = loop_lib.Loop(num_steps=v.num_steps, log_every=v.log_every,
                       max_nonfinite_in_a_row=v.max_nonfinite_in_a_row,
                       shown=("loss", "accuracy", "grad_norm"))
  try:
    state = loop_lib.fit(state, iterate, loop, ckpt, writer, position, start,
                         host_metrics=lambda done: {"learning_rate": float(run.schedule(done - 1))})
  finally:
    ckpt.close()

  verifier = rm.Verifier(state.params["verifier"], run.model_cfg, run.tokenizer, v.kind,
                         v.seq_len, v.eval_batch_size, run.mesh, run.rules, v.answer_read)
  result = evaluate(verifier, eval_records, v.threshold,
                    os.path.join(workdir, "reliability.png") if is_main else None)
  result.update(train_steps=int(state.step), train_labels=train_path, eval_labels=eval_path,
                train_solutions=len(records), train_items=len(items))
  if is_main:
    path = os.path.join(workdir, "eval.json")
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    writer.write(int(state.step), _scalars(result), prefix="eval/")
    print(f"{summary(result)}; wrote {path}", flush=True)
  writer.close()
  return result


def _scalars(result: dict[str, Any]) -> dict[str, float]:
  """The flat numeric figures of eval.json, for TensorBoard."""
  out = {}

  def walk(tree, prefix):
    for k, x in tree.items():
      if isinstance(x, dict):
        walk(x, f"{prefix}{k}/")
      elif isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x):
        out[prefix + k] = float(x)
  walk(result, "")
  return out


def load_verifier(workdir: str, batch_size: int = 32, mesh_shape=None) -> rm.Verifier:
  """The trained reward model of a verifier run folder, ready to score."""
  config = run_folder.load_config(workdir)
  if config.get("method") != "verifier":
    raise errors.RunFolderError(f"{workdir} holds a {config.get('method')!r} run, not a "
                                "verifier run")
  model_cfg = run_folder.load_model_config(workdir)
  tokenizer = saved_tokenizer(workdir)
  mesh = sharding_lib.make_mesh(config.mesh.axes, mesh_shape or config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  spec = rm.state_spec(model_cfg, optimizer_lib.make_optimizer(
      config.verifier.optimizer, 1, {"verifier": None}, "verifier.optimizer")[0], mesh, rules)
  params, _ = checkpoint_lib.restore_params(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR),
      {"verifier": spec.abstract.params["verifier"]})
  return rm.Verifier(params["verifier"], model_cfg, tokenizer, config.verifier.kind,
                     config.verifier.seq_len, batch_size, mesh, rules,
                     bool(config.verifier.get("answer_read", False)))
