"""Budget forcing (Muennighoff et al. 2025, "s1: Simple test-time scaling") as search
strategies, so a thinking budget sits on the same accuracy-against-compute curve as
voting and search. One completion per problem; `budget` is in thinking tokens:

  think_budget  the cap: once the chain has `budget` tokens, `</think>` is forced and
                the model answers (the sampler's `think_budget`)
  wait          the floor: an `</think>` (or EOS) before `budget` thinking tokens is
                replaced by `wait` ("Wait" in s1; here any text, default "\\n": one more
                step), so the model keeps thinking (the sampler's `min_think` and
                `wait_ids`)

No verifier is used. Greedy by default (s1 decodes greedily).
"""

from __future__ import annotations

from typing import Any

from o3lite import errors
from o3lite.data import formatting
from o3lite.search import core

_GREEDY = core.Sampling(temperature=0.0)


def _forced(problems: list[dict], policy: core.Policy, seed: int, sampling: core.Sampling,
            **forcing: Any) -> list[core.SearchResult]:
  think_end_id = getattr(policy.tokenizer, "think_end_id", -1)
  if think_end_id is None or think_end_id < 0:
    raise errors.ConfigError("budget forcing needs a tokenizer with a single "
                             f"{formatting.THINK_END} token")
  return [core.result(d, 0)
          for d in core.draw(problems, policy, 1, seed, sampling.replace(**forcing))]


@core.STRATEGIES.register("think_budget")
def think_budget(problems, policy, verifier, budget, seed, *,
                 sampling: core.Sampling = _GREEDY) -> list[core.SearchResult]:
  """At most `budget` thinking tokens, then `</think>` is forced (s1's cap)."""
  del verifier  # Uses none.
  return _forced(problems, policy, seed, sampling, think_budget=budget)


@core.STRATEGIES.register("wait")
def wait(problems, policy, verifier, budget, seed, *, wait: str = "\n",
         sampling: core.Sampling = _GREEDY) -> list[core.SearchResult]:
  """At least `budget` thinking tokens: an early `</think>` becomes `wait` (s1's
  "Wait" extension)."""
  del verifier  # Uses none.
  ids = tuple(policy.tokenizer.encode(wait))
  if not ids:
    raise errors.ConfigError(f"search strategy 'wait': wait={wait!r} encodes to no tokens")
  return _forced(problems, policy, seed, sampling, min_think=budget, wait_ids=ids)
