"""Best-of-N under a verifier, and the verifier scores of candidates that every
verifier-guided strategy reads.

Best-of-N (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems";
Lightman et al. 2023, "Let's Verify Step by Step"): sample N solutions y_1..y_N of a
problem x, score each with a verifier, answer with the best one's answer:

  i* = argmax_i r(x, y_i)        (the first such i on ties)

ORM:  r = P(y correct | x), the verifier's read after the whole solution.
PRM:  r = agg(p_1, ..., p_n), p_j = P(step j correct | x, steps 1..j), with agg one of
      `verifiers.aggregation.STEP_AGGREGATIONS` (last, min, prod; a solution without
      steps scores aggregation.NO_STEPS = 0.5).
      Or `answer`: a PRM trained with an answer read (`verifier.answer_read`) reads
      the EOS after the final answer too: r = its P(answer correct | x, y), the
      outcome judged by the same model that judges the steps (best-of-N, weighted
      majority, beam and DVTS take it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from o3lite import errors
from o3lite.search import core
from o3lite.verifiers import aggregation as aggregation_lib

@dataclasses.dataclass
class Scored:
  """A verifier's view of one problem's candidates."""

  scores: list[float]  # One per candidate: ORM outcome, or the aggregated PRM steps.
  step_scores: list[list[float]] | None  # PRM: every candidate's step scores.
  verifier_tokens: int  # This problem's share of the tokens the verifier ran.


def aggregator(verifier: Any, strategy: str, aggregation: str | None,
               answer: bool = False) -> Callable[[Sequence[float]], float] | None:
  """The PRM aggregation `strategy` scores with (default "last"), or None where the
  verifier's `score_outcomes` scores (an ORM; a PRM's answer read, aggregation "answer",
  which `strategy` takes where `answer`), checked before any sampling: no verifier, an
  unknown aggregation, or an aggregation given with an ORM (which has no steps to
  aggregate) is a one-line ConfigError."""
  kind = core.verifier_kind(verifier, strategy)
  if kind == "orm":
    if aggregation is not None:
      raise errors.ConfigError(f"aggregation={aggregation!r} aggregates a PRM's step "
                               "scores; an ORM scores whole solutions")
    return None
  if aggregation == aggregation_lib.ANSWER:
    if not answer:
      raise errors.ConfigError(f"search strategy {strategy!r} ranks by step scores: "
                               "aggregation='answer' is for best_of_n, "
                               "weighted_majority, beam and dvts")
    if not getattr(verifier, "answer_read", False):
      raise errors.ConfigError("aggregation='answer' needs a PRM with an answer read "
                               "(train it with verifier.answer_read=True)")
    return None
  return aggregation_lib.STEP_AGGREGATIONS.lookup(
      "last" if aggregation is None else aggregation)


def score_candidates(verifier: Any, problems: Sequence[dict], drawn: Sequence[core.Drawn],
                     agg: Callable[[Sequence[float]], float] | None) -> list[Scored]:
  """Every candidate of every problem scored in one verifier call (the verifier batches
  the rows): `score_outcomes` when `agg` is None (an ORM), else `score_steps` and
  r = agg(step scores) (aggregation.NO_STEPS for a solution without steps)."""
  examples = [p for p, d in zip(problems, drawn) for _ in d.texts]
  solutions = [t for d in drawn for t in d.texts]
  before = verifier.tokens_scored
  if agg is None:
    flat, flat_steps = verifier.score_outcomes(examples, solutions), None
  else:
    flat_steps = verifier.score_steps(examples, solutions)
    flat = [aggregation_lib.aggregate(agg, s) for s in flat_steps]
  shares = core.split_count(verifier.tokens_scored - before, [d.row_tokens for d in drawn])
  out, at = [], 0
  for d, share in zip(drawn, shares):
    n = len(d.texts)
    out.append(Scored([float(s) for s in flat[at:at + n]],
                      None if flat_steps is None else [list(s) for s in flat_steps[at:at + n]],
                      share))
    at += n
  return out


@core.STRATEGIES.register("best_of_n")
def best_of_n(problems: Sequence[dict], policy: core.Policy, verifier: Any, budget: int,
              seed: int, *, aggregation: str | None = None,
              sampling: core.Sampling = core.Sampling()) -> list[core.SearchResult]:
  """N = `budget` samples per problem, the answer of the one the verifier scores highest:
  i* = argmax_i r(x, y_i), first on ties (see the module docstring for r under an ORM and
  a PRM's `aggregation`: last, min, prod or answer). Every candidate competes, parsed or not:
  the verifier judges."""
  agg = aggregator(verifier, "best_of_n", aggregation, answer=True)
  drawn = core.draw(problems, policy, budget, seed, sampling)
  scored = score_candidates(verifier, problems, drawn, agg)
  return [core.result(d, int(np.argmax(s.scores)), s.scores, s.step_scores, s.verifier_tokens)
          for d, s in zip(drawn, scored)]
