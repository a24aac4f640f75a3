"""Voting over the answers of N sampled solutions: plain and verifier-weighted.

Self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought
Reasoning in Language Models"): sample N solutions, parse each one's final answer a_i
(`formatting.parse_answer`; unparsed ones do not vote), answer with the most frequent:

  a* = argmax_a sum_i 1[a_i = a]

Weighted majority (Li et al. 2023, "Making Language Models Better Reasoners with
Step-Aware Verifier"; Uesato et al. 2022; Snell et al. 2024's "weighted best-of-N"): each
vote counts its solution's verifier score r_i (ORM outcome, or a PRM's aggregated step
scores, `aggregation_lib.STEP_AGGREGATIONS`, default "last"):

  a* = argmax_a sum_i r_i 1[a_i = a]

Ties go to the answer seen first, as `evaluation.heldout.majority_answer` (maj@k) does;
the chosen solution is the first candidate with a*, or candidate 0 when no answer parsed.
"""

from __future__ import annotations

from typing import Any, Sequence

from o3lite.evaluation import heldout
from o3lite.search import best_of_n as best_of_n_lib
from o3lite.search import core


def weighted_answer(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
  """argmax_a sum_i weights[i] 1[answers[i] = a] over parsed answers (first seen wins
  ties); None if none parsed. Unit weights give `heldout.majority_answer`."""
  totals: dict[str, float] = {}  # In first-seen order.
  for a, w in zip(answers, weights):
    if a is not None:
      totals[a] = totals.get(a, 0.0) + float(w)
  if not totals:
    return None
  best = max(totals.values())
  return next(a for a, total in totals.items() if total == best)


def _first(answers: Sequence[str | None], answer: str | None) -> int:
  return 0 if answer is None else list(answers).index(answer)


@core.STRATEGIES.register("majority")
def majority(problems: Sequence[dict], policy: core.Policy, verifier: Any, budget: int,
             seed: int, *, sampling: core.Sampling = core.Sampling()
             ) -> list[core.SearchResult]:
  """Self-consistency over N = `budget` samples per problem: a* = argmax_a sum_i
  1[a_i = a]. Needs no verifier (one given is not used)."""
  del verifier
  out = []
  for d in core.draw(problems, policy, budget, seed, sampling):
    out.append(core.result(d, _first(d.answers, heldout.majority_answer(d.answers))))
  return out


@core.STRATEGIES.register("weighted_majority")
def weighted_majority(problems: Sequence[dict], policy: core.Policy, verifier: Any,
                      budget: int, seed: int, *, aggregation: str | None = None,
                      sampling: core.Sampling = core.Sampling()
                      ) -> list[core.SearchResult]:
  """Verifier-weighted voting over N = `budget` samples per problem: a* = argmax_a
  sum_i r_i 1[a_i = a], r_i an ORM's outcome score or a PRM's `aggregation` (last, min,
  prod of its step scores, default last; or answer, its answer read)."""
  agg = best_of_n_lib.aggregator(verifier, "weighted_majority", aggregation, answer=True)
  drawn = core.draw(problems, policy, budget, seed, sampling)
  scored = best_of_n_lib.score_candidates(verifier, problems, drawn, agg)
  return [core.result(d, _first(d.answers, weighted_answer(d.answers, s.scores)), s.scores,
                      s.step_scores, s.verifier_tokens)
          for d, s in zip(drawn, scored)]
