"""Sequential revision under a PRM (Snell et al. 2024, "Scaling LLM Test-Time Compute
Optimally can be More Effective than Scaling Model Parameters", section 6: revisions),
here with the PRM as the critic that says where the solution goes wrong.

One solution y_0 per problem (the same sample as best-of-N's first candidate: `core.draw`
at the seed); then, for round r = 1 .. R (R = `budget`):

  1. the PRM scores the steps of y_{r-1}: p_1 .. p_n, p_j = P(step j correct | steps <= j)
     (steps: `verifiers.steps.split_completion`);
  2. j* = min { j : p_j < threshold }; when there is none the problem stops (nothing to
     revise: no step is below the threshold, or the solution has no steps);
  3. y_r = y_{r-1}'s tokens before step j* (kept unchanged) + a fresh continuation the
     policy samples from prompt + that prefix (`sampler.prime`, then `sampler.continue_`:
     sampled as if the policy had written the prefix itself), up to
     `sampling.max_new_tokens` new tokens.

The last revision is scored too (for the record and for `answer="best"`). The answer
(option `answer`):
  "last"  y_R' (R' <= R the rounds run): the latest revision (Snell et al.'s sequential
          chain, whose last revision is the final answer)
  "best"  argmax_r agg(p(y_r)), `aggregation` of its step scores (best_of_n's, default
          "last"), the first on ties: best-of-N over the revision chain

All problems revise together: each round is one verifier call and `prime` + `continue_`
calls of `sampling.problems_per_call(1)` rows over the problems still revising.
Compute: generated tokens = y_0's + every continuation's (EOS counted); verifier tokens
= each round's call split over its problems by their rows' tokens (prompt + text + EOS).
`SearchResult.tree`: one level per revision, one node each {"parent": 0 (-1 for y_0),
"text": y_r, "score": its aggregated PRM score, "steps": its step scores, "first_low":
j* - 1 (None: every step passed), "kept": the text the next revision keeps (None when
there is none)}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from o3lite import errors
from o3lite.parallel import mesh as sharding_lib
from o3lite.sampling import sampler
from o3lite.search import best_of_n
from o3lite.search import core
from o3lite.verifiers import steps as steps_lib
from o3lite.verifiers import aggregation as aggregation_lib

ANSWERS = ("last", "best")


def first_below(step_scores: Sequence[float], threshold: float) -> int | None:
  """The index of the first step scored below `threshold`; None when there is none."""
  return next((j for j, p in enumerate(step_scores) if p < threshold), None)


def rows_per_call(policy: core.Policy, rows: int) -> int:
  """`rows` rounded up to fill the policy's mesh batch shards (unchanged without one)."""
  shards = 1 if policy.mesh is None else sharding_lib.batch_shards(policy.mesh, policy.rules)
  return -(-rows // shards) * shards


def complete(policy: core.Policy, prefixes: Sequence[Sequence[int]],
             cfg: sampler.SamplingConfig, rng: jax.Array, rows: int
             ) -> list[sampler.Completion]:
  """The policy's continuation of each prefix (prompt + tokens to keep), sampled as if it
  had written the prefix itself: `prime` (the prefix in the cache, its last token
  pending), then `continue_`; `rows` prefixes per call (key `fold_in(rng, call)`), the
  last call padded with copies of the first prefix that decode nothing."""
  where = {"mesh": policy.mesh, "rules": policy.rules}
  rows = rows_per_call(policy, rows)
  out = []
  for call, begin in enumerate(range(0, len(prefixes), rows)):
    chunk = [list(p) for p in prefixes[begin:begin + rows]]
    state = sampler.prime(policy.params, chunk + [chunk[0]] * (rows - len(chunk)),
                          policy.model_cfg, cfg, **where)
    state = sampler.continue_(policy.params, state,
                              [[]] * len(chunk) + [None] * (rows - len(chunk)),
                              policy.model_cfg, cfg, jax.random.fold_in(rng, call), **where)
    out += sampler.completions(state, cfg)[:len(chunk)]
  return out


@dataclasses.dataclass
class _Revision:
  tokens: list[int]  # The solution (prompt and EOS excluded).
  steps: list[float] | None = None  # The PRM's step scores, once scored.
  first_low: int | None = None  # Index of the first step below the threshold.
  kept: list[int] | None = None  # The tokens the next revision keeps.


def _kept_tokens(tokens: list[int], text: str, step: int, tokenizer: Any) -> list[int]:
  """The tokens before the one where step `step` (of `split_completion(text)`) starts."""
  steps = steps_lib.split_completion(text)
  return tokens[:steps_lib.token_spans(tokens, tokenizer.decode, steps)[step].start]


@core.STRATEGIES.register("revise")
def revise(problems: Sequence[dict], policy: core.Policy, verifier: Any, budget: int,
           seed: int, *, threshold: float = 0.5, answer: str = "last",
           aggregation: str | None = None, sampling: core.Sampling = core.Sampling()
           ) -> list[core.SearchResult]:
  """Up to R = `budget` rounds of revision: regenerate each solution from just before its
  first step the PRM scores below `threshold` (Snell et al. 2024), stopping early when no
  step is; the answer is the last revision, or with answer="best" the revision with the
  best `aggregation` of its step scores (see the module docstring)."""
  if core.verifier_kind(verifier, "revise") != "prm":
    raise errors.ConfigError("search strategy 'revise' finds the first low step: it needs "
                             "a PRM")
  agg = best_of_n.aggregator(verifier, "revise", aggregation)
  if not 0 < threshold <= 1:
    raise errors.ConfigError(f"search strategy 'revise': threshold={threshold} must be in "
                             "(0, 1]")
  if answer not in ANSWERS:
    raise errors.ConfigError(f"search strategy 'revise': answer={answer!r}: expected one "
                             f"of {list(ANSWERS)}")
  tok = policy.tokenizer
  cfg = sampling.config(tok, 1)
  key = jax.random.PRNGKey(seed)
  drawn = core.draw(problems, policy, 1, seed, sampling)  # y_0: best-of-N's first sample.
  chains = [[_Revision(list(d.completions[0].tokens))] for d in drawn]
  generated = np.array([d.generated_tokens[0] for d in drawn], np.int64)
  spent = np.zeros(len(problems), np.int64)
  todo = list(range(len(problems)))  # Problems whose latest revision is not scored yet.
  for r in range(budget + 1):
    latest = [chains[p][-1] for p in todo]
    texts = [tok.decode(y.tokens) for y in latest]
    before = verifier.tokens_scored
    scored = verifier.score_steps([problems[p] for p in todo], texts)
    shares = core.split_count(verifier.tokens_scored - before,
                              [len(drawn[p].prompt) + len(y.tokens) + 1
                               for p, y in zip(todo, latest)])
    revising = []
    for p, y, text, steps, share in zip(todo, latest, texts, scored, shares):
      spent[p] += share
      y.steps = [float(s) for s in steps]
      # Steps past what the verifier read (a truncated row) cannot be located.
      y.first_low = first_below(y.steps[:len(steps_lib.split_completion(text))], threshold)
      if y.first_low is not None and r < budget:
        y.kept = _kept_tokens(y.tokens, text, y.first_low, tok)
        revising.append(p)
    if not revising:
      break
    got = complete(policy, [drawn[p].prompt + chains[p][-1].kept for p in revising], cfg,
                   jax.random.fold_in(key, r + 1),
                   min(sampling.problems_per_call(1), len(drawn)))
    for p, completion in zip(revising, got):
      chains[p].append(_Revision(chains[p][-1].kept + completion.tokens))
      generated[p] += len(completion.tokens) + int(completion.finished)
    todo = revising
  results = []
  for p, chain in enumerate(chains):
    texts = [tok.decode(y.tokens) for y in chain]
    scores = [agg(y.steps) if y.steps else aggregation_lib.NO_STEPS for y in chain]
    chosen = len(chain) - 1 if answer == "last" else int(np.argmax(scores))
    out = core.result(core.Drawn(drawn[p].prompt, [], texts),
                      chosen, scores, [y.steps for y in chain], int(spent[p]))
    out.compute.generated_tokens = int(generated[p])
    out.tree = [[{"parent": -1 if r == 0 else 0, "text": text, "score": score,
                  "steps": list(y.steps), "first_low": y.first_low,
                  "kept": None if y.kept is None else tok.decode(y.kept)}]
                for r, (y, text, score) in enumerate(zip(chain, texts, scores))]
    results.append(out)
  return results
