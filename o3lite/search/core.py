"""Test-time search: the registry of strategies, what they are given, what they return,
and the compute they spend.

A strategy turns more test-time compute into (one hopes) better answers: it samples
several solutions of each problem from the policy and picks one, by vote or by a
verifier (Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally can be More
Effective than Scaling Model Parameters"). Each is a function registered by name,

  @STRATEGIES.register("best_of_n")
  def best_of_n(problems, policy, verifier, budget, seed, *, option=..., ...)
      -> list[SearchResult]                                 # one per problem, in order

and is run through `run_strategy`, which checks the name, the budget and the options
(each a one-line ConfigError) and times the call:

  from o3lite.search import core
  policy = core.Policy(params, model_cfg, tokenizer)
  results = core.run_strategy("best_of_n", problems, policy, verifier, budget=16, seed=0,
                              aggregation="min", sampling=core.Sampling(max_new_tokens=64))

`problems` are examples ({"question": ..., "answer": ...}); the prompt of each is
`formatting.format_prompt(question)`, as in training and evaluation. `budget` is the
strategy's knob on the compute axis (N samples per problem for voting and best-of-N).
Problems are searched together: `Sampling.rows_per_call` rows (problems x samples) go
through each compiled sampler call.

The verifier is anything with
  kind                               "orm" or "prm"
  score_outcomes(examples, solutions) -> list[float]         P(solution correct)
  score_steps(examples, solutions)    -> list[list[float]]   P(step i correct | steps <= i)
  tokens_scored                      an int the verifier adds the tokens it runs to
  answer_read                        (optional) True: a PRM whose `score_outcomes` is
                                     its read of the answer (aggregation "answer")
(`verifiers.reward_model.Verifier`, `verifiers.hf_prm.HFProcessRewardModel`, a PRM whose
`kind` is always "prm"); strategies that need none accept None.

Compute, per problem (what the accuracy-against-compute curves are drawn against):
  generated_tokens  tokens the policy sampled for the problem, its EOS counted (as the
                    RL rollouts count a completion's length)
  verifier_tokens   tokens the verifier ran for the problem: the counter's increase over
                    a call that scores many problems at once, split over them in
                    proportion to their rows' tokens (prompt + completion + EOS: exact
                    for a verifier on the policy's tokenizer; the total is always the
                    counter's)
  wall_seconds      the strategy call's wall time over its problems (they are searched
                    together); a first call at a new shape includes compilation

The same seed, problems, N and `Sampling` give the same candidates in every strategy
(sampler key `jax.random.PRNGKey(seed)`), so strategies compare on paired samples.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Sequence

import jax
import numpy as np

from o3lite import errors
from o3lite.data import formatting
from o3lite.sampling import policy as policy_lib
from o3lite.registry import Registry
from o3lite.sampling import draws

STRATEGIES = Registry("search strategy")
KINDS = ("orm", "prm")


# The policy bundle (params, model config, tokenizer, placement) of the sampling layer.
Policy = policy_lib.Policy


# The one sampling-settings type and sampled-completions record of the sampling layer.
Sampling = draws.Sampling
Drawn = draws.Drawn


@dataclasses.dataclass
class Compute:
  """What a strategy spent on one problem (see the module docstring)."""

  generated_tokens: int = 0
  verifier_tokens: int = 0
  wall_seconds: float = 0.0


@dataclasses.dataclass
class SearchResult:
  """One problem's outcome: the answer, the solution it came from, and, for inspection,
  every candidate with its parsed answer and the score the strategy ranked it by."""

  answer: str | None  # `formatting.parse_answer` of the chosen solution (None: none parsed).
  solution: str  # The chosen candidate's text.
  chosen: int  # Its index in `candidates`.
  candidates: list[str]
  answers: list[str | None]
  scores: list[float] | None  # Per candidate (ORM outcome / aggregated PRM); None: unscored.
  step_scores: list[list[float]] | None  # A PRM's per-step scores of each candidate.
  compute: Compute
  # Tree searches: one level per step, one node per row: {"parent": its row at the level
  # before (-1 at the first), "text": the row's completion so far (None once it has
  # ended), "score": the PRM's score of its newest step, "live": still writing}.
  tree: list[list[dict]] | None = None


def draw(problems: Sequence[dict], policy: Policy, num_samples: int, seed: int,
         sampling: Sampling) -> list[Drawn]:
  """`num_samples` completions of every problem's prompt, decoded (`draws.draw`, key
  `PRNGKey(seed)`)."""
  prompts = [formatting.encode_prompt(policy.tokenizer, p["question"]) for p in problems]
  return draws.draw(policy, prompts, num_samples, sampling, jax.random.PRNGKey(seed))


def verifier_kind(verifier: Any, strategy: str) -> str:
  """"orm" or "prm"; a one-line ConfigError when `strategy` gets no usable verifier."""
  if verifier is None:
    raise errors.ConfigError(f"search strategy {strategy!r} needs a verifier (an ORM or "
                             "a PRM)")
  kind = getattr(verifier, "kind", None)
  if kind not in KINDS:
    raise errors.ConfigError(f"verifier kind {kind!r}: expected one of {list(KINDS)}")
  return kind


def split_count(total: int, weights: Sequence[float]) -> list[int]:
  """`total` split into integers in proportion to `weights`, summing to `total`
  (largest remainders get the leftover units; all-zero weights: equal shares)."""
  w = np.asarray(weights, np.float64)
  if len(w) == 0:
    return []
  w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
  exact = total * w
  out = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - out), kind="stable")
  out[order[:total - int(out.sum())]] += 1
  return [int(x) for x in out]


def result(drawn: Drawn, chosen: int, scores: Sequence[float] | None = None,
           step_scores: Sequence[Sequence[float]] | None = None,
           verifier_tokens: int = 0) -> SearchResult:
  """The SearchResult of choosing candidate `chosen` of `drawn`."""
  return SearchResult(
      answer=drawn.answers[chosen], solution=drawn.texts[chosen], chosen=chosen,
      candidates=list(drawn.texts), answers=list(drawn.answers),
      scores=None if scores is None else [float(s) for s in scores],
      step_scores=None if step_scores is None else [[float(x) for x in s]
                                                    for s in step_scores],
      compute=Compute(generated_tokens=sum(drawn.generated_tokens),
                      verifier_tokens=int(verifier_tokens)))


def _options(fn) -> dict[str, Any]:
  """A strategy's options: its keyword-only parameters and their defaults."""
  return {name: p.default for name, p in inspect.signature(fn).parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def run_strategy(name: str, problems: Sequence[dict], policy: Policy, verifier: Any,
                 budget: int, seed: int, **options) -> list[SearchResult]:
  """Strategy `name` on every problem at `budget`; each result's compute carries its
  share of the call's wall time. Bad input is one line: an unknown strategy or option,
  or a budget that is not a positive int (ConfigError); a problem without a question
  (DataError)."""
  fn = STRATEGIES.lookup(name)
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
    raise errors.ConfigError(f"search budget {budget!r}: expected a positive int")
  known = _options(fn)
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise errors.ConfigError(f"search strategy {name!r} has no option(s) {unknown}; its "
                             f"options: {sorted(known)}")
  for i, problem in enumerate(problems):
    if "question" not in problem:
      raise errors.DataError(f"problem {i} has no 'question'")
  if not problems:
    return []
  begin = time.perf_counter()
  results = fn(list(problems), policy, verifier, int(budget), int(seed), **options)
  seconds = time.perf_counter() - begin
  for r in results:
    r.compute.wall_seconds = seconds / len(results)
  return results
