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

import dataclasses
from typing import Any

import jax

from o3lite import errors
from o3lite.data import formatting
from o3lite.sampling import sampler
from o3lite.search import core

_GREEDY = core.Sampling(temperature=0.0)


def _forced(problems: list[dict], policy: core.Policy, seed: int, sampling: core.Sampling,
            **forcing: Any) -> list[core.SearchResult]:
  tok = policy.tokenizer
  think_end_id = getattr(tok, "think_end_id", -1)
  if think_end_id is None or think_end_id < 0:
    raise errors.ConfigError("budget forcing needs a tokenizer with a single "
                             f"{formatting.THINK_END} token")
  cfg = dataclasses.replace(sampling.config(tok, 1), think_end_id=think_end_id, **forcing)
  prompts = [formatting.encode_prompt(tok, p["question"]) for p in problems]
  rows = sampler.sample(policy.params, prompts, policy.model_cfg, cfg,
                        min(sampling.problems_per_call(1), len(problems)),
                        jax.random.PRNGKey(seed),
                        policy.mesh, policy.rules)
  out = []
  for prompt, (completion,) in zip(prompts, rows):
    text = tok.decode(completion.tokens)
    drawn = core.Drawn(prompt, [completion], [text], [formatting.parse_answer(text)])
    out.append(core.result(drawn, 0))
  return out


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
