"""Quality filtering of chain-of-thought data by a reward model, then SFT on what is kept.

The seeds' SFT stage trains on chains a verifier approves of (rejection sampling with a
reward model; Llama 2's and DeepSeek-R1's SFT data, Math-Shepherd's filtering). Each
training example (question, chain, answer) is written as its completion and scored:

  min      the PRM's lowest step score (one bad step condemns the chain)
  last     the PRM's score of the last step
  prod     the product of the PRM's step scores
  (`verifiers.aggregation`: a chain without steps scores its NO_STEPS)
  outcome  the ORM's P(correct)

and kept when its score is at least `threshold`; with `best_k` > 0, only the k best
chains of each question are kept instead (ties broken by order).

`python -m o3lite.train --config=configs/sft_filtered.py` runs it as a stage: SFT (the
harness, `training.sft.SFT`) on the kept chains. With `filter.verifier` empty it first
runs the nested `verifier_pipeline` (configs/prm.py's: an SFT policy on the unfiltered
chains, its solutions, Monte Carlo labels, a PRM) in DIR/verifier, so
DIR/verifier/policy/eval.json is the unfiltered baseline and DIR/eval.json the SFT on
filtered chains, same settings.
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections
import numpy as np

from o3lite import errors
from o3lite.data import formatting
from o3lite.training import run_folder
from o3lite.training import sft as sft_lib
from o3lite.training import stage as stage_lib
from o3lite.verifiers import aggregation
from o3lite.verifiers import reward_model as rm
from o3lite.verifiers import run as verifier_run
from o3lite.verifiers import steps as steps_lib

SCORES = ("min", "last", "prod", "outcome")


def chain_scores(verifier: rm.Verifier, examples: Sequence[dict], score: str) -> list[float]:
  """The verifier's score of each example's chain (see the module docstring)."""
  if score not in SCORES:
    raise errors.ConfigError(f"filter.score={score!r}: expected one of {list(SCORES)}")
  if (score == "outcome") != (verifier.kind == "orm"):
    raise errors.ConfigError(f"filter.score={score!r} needs "
                             f"{'an ORM' if score == 'outcome' else 'a PRM'}; the "
                             f"verifier is a {verifier.kind.upper()}")
  completions = [formatting.format_completion(e["cot"], e["answer"]) for e in examples]
  if score == "outcome":
    return verifier.score_outcomes(examples, completions)
  steps = verifier.score_steps(examples, completions)
  return [aggregation.aggregate(score, s) for s in steps]


def keep(examples: Sequence[dict], scores: Sequence[float], threshold: float,
         best_k: int = 0) -> list[int]:
  """Indices of the examples kept: score >= threshold, or (best_k > 0) the best_k
  highest-scoring chains of each question."""
  if best_k <= 0:
    return [i for i, s in enumerate(scores) if s >= threshold]
  by_question: dict[str, list[int]] = {}
  for i, e in enumerate(examples):
    by_question.setdefault(e["question"], []).append(i)
  kept = []
  for indices in by_question.values():
    kept += sorted(indices, key=lambda i: -scores[i])[:best_k]
  return sorted(kept)


VERIFIER_DIR = "verifier"


def validate_filter(config: ml_collections.ConfigDict) -> None:
  f = config.filter
  if f.score not in SCORES:
    raise errors.ConfigError(f"filter.score={f.score!r}: expected one of {list(SCORES)}")
  if not 0 <= f.threshold <= 1 or f.best_k < 0 or f.batch_size < 1:
    raise errors.ConfigError("filter.threshold must be in [0, 1], filter.best_k >= 0 and "
                             "filter.batch_size >= 1")
  if f.verifier:
    if (run_folder.saved_method(f.verifier) if os.path.isdir(f.verifier) else None) \
        != "verifier":
      raise errors.ConfigError(f"filter.verifier={f.verifier} is not a verifier run folder")
  else:
    stage_lib.validate(stage_lib.nested_config(config, "verifier_pipeline"))


def filtered_examples(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """The verifier (given, or trained in DIR/verifier), then the training chains it keeps
  (DIR/filter.json: how many, and how well it finds the flawed ones)."""
  f = config.filter
  verifier_dir = f.verifier or os.path.join(workdir, VERIFIER_DIR)
  if not f.verifier and stage_lib.read_result(verifier_dir) is None:
    print(f"verifier: configs/prm.py's pipeline in {verifier_dir}", flush=True)
    stage_lib.run(stage_lib.nested_config(config, "verifier_pipeline"), verifier_dir)
  examples = sft_lib.train_examples(config.data)
  examples = [examples[i] for i in range(len(examples))]
  verifier = verifier_run.load_verifier(verifier_dir, f.batch_size, tuple(config.mesh.shape))
  scores = chain_scores(verifier, examples, f.score)
  kept = keep(examples, scores, f.threshold, f.best_k)
  if not kept:
    raise errors.DataError(f"the filter kept none of {len(examples)} training chains "
                           f"(filter.score={f.score}, threshold {f.threshold})")
  stats = filter_stats(examples, scores, kept)
  stats.update(verifier=verifier_dir, score=f.score, threshold=f.threshold, best_k=f.best_k)
  stage_lib.write_json(os.path.join(workdir, "filter.json"), stats)
  print(f"filter: kept {len(kept)} of {len(examples)} training chains "
        f"({stats['kept_fraction']:.1%})"
        + (f"; flawed chains {stats['flawed_fraction_before']:.1%} -> "
           f"{stats['flawed_fraction_after']:.1%}" if "flawed_fraction_before" in stats
           else ""), flush=True)
  return [examples[i] for i in kept]


def filter_stats(examples: Sequence[dict], scores: Sequence[float], kept: list[int]) -> dict:
  """How many chains were kept, and where the task knows the true intermediate values,
  how well the filter finds the flawed ones."""
  slipped = [("step_values" in e) and 0 in steps_lib.exact_labels(
      formatting.format_completion(e["cot"], e["answer"]), e["step_values"]) for e in examples]
  stats = {"examples": len(examples), "kept": len(kept),
           "kept_fraction": len(kept) / len(examples), "mean_score": float(np.mean(scores))}
  if any(slipped):
    s = np.asarray(slipped)
    k = np.zeros(len(examples), bool)
    k[kept] = True
    stats.update(flawed_fraction_before=float(s.mean()),
                 flawed_fraction_after=float(s[k].mean()),
                 flawless_kept_fraction=float(k[~s].mean()) if (~s).any() else float("nan"))
  return stats


class FilteredSFT(sft_lib.SFT):
  """SFT on the training chains a verifier keeps."""

  name = "filtered_sft"

  def kind(self, config) -> str:
    return "sft"

  def validate(self, config) -> None:
    validate_filter(config)
    super().validate(config)

  def setup(self, ctx: stage_lib.Context) -> stage_lib.Plan:
    return sft_lib.SFT(filtered_examples(ctx.config, ctx.workdir)).setup(ctx)


stage_lib.register(FilteredSFT())
