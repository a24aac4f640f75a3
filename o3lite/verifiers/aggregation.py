"""A PRM's step scores -> one score per solution: the one place every user reads
(best-of-N and the tree searches, weighted voting, revision, MCTS, filtering of training
chains, the verifier's own evaluation).

  r = agg(p_1, ..., p_n),   p_j = P(step j correct | x, steps 1..j)

STEP_AGGREGATIONS (pure functions of a non-empty list of step scores):
  last  p_n           Snell et al. 2024 find it the best for their PRM; search-and-learn's
                      default
  min   min_j p_j     the weakest step (Wang et al. 2024, Math-Shepherd)
  prod  prod_j p_j    P(every step correct) were step errors independent (Lightman et
                      al. 2023)

One rule for a solution in which the PRM finds no step: it scores NO_STEPS = 0.5, no
evidence either way (as `Verifier.score_outcomes` reads an empty solution).
A PRM trained with an answer read has one more aggregation, ANSWER: its read of the EOS
after the final answer (`Verifier.score_outcomes`), which is not a function of the steps.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from o3lite.registry import Registry

STEP_AGGREGATIONS = Registry("PRM step aggregation")
ANSWER = "answer"  # Not a function of step scores: the PRM's answer read (see above).
NO_STEPS = 0.5  # The score of a solution in which a PRM finds no step.


@STEP_AGGREGATIONS.register("last")
def last(step_scores: Sequence[float]) -> float:
  """r = p_n: the PRM's read after the last step (Snell et al. 2024)."""
  return float(step_scores[-1])


@STEP_AGGREGATIONS.register("min")
def minimum(step_scores: Sequence[float]) -> float:
  """r = min_j p_j: a chain is as good as its weakest step (Math-Shepherd)."""
  return float(min(step_scores))


@STEP_AGGREGATIONS.register("prod")
def product(step_scores: Sequence[float]) -> float:
  """r = prod_j p_j: every step correct, steps taken as independent (Lightman et al.)."""
  return float(math.prod(step_scores))


def aggregate(agg: str | Callable[[Sequence[float]], float],
              step_scores: Sequence[float]) -> float:
  """One solution's score: `agg` (a name or a registered function) of its step
  scores, NO_STEPS when it has none."""
  fn = STEP_AGGREGATIONS.lookup(agg) if isinstance(agg, str) else agg
  return fn(step_scores) if len(step_scores) else NO_STEPS
