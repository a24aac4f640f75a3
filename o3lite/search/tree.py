"""Step-level search under a PRM: beam search and diverse verifier tree search (DVTS).

A step is what the policy writes up to its next "\\n" (the one chain format's step
delimiter) or to EOS. Each problem keeps N rows in the sampler; one iteration:

  1. every live row writes one more step (`sampler.continue_` from its kept state: no
     prefix is ever recomputed);
  2. the PRM scores each live row's newest step, p = P(step correct | steps so far),
     from the step's own tokens: each row keeps the PRM's KV cache of its tokens,
     forked with it (`verifiers.step_reader`; an external PRM re-reads rows whole)
     (with `lookahead` L > 0: the score of the step L greedy steps further on, from a
     throwaway fork, as Snell et al.'s lookahead search);
  3. rows are split into `groups` of N / groups rows; in each group the `keep` best live
     rows survive and are forked `expand` times each back to N rows (`sampler.fork`);
     rows that ended (EOS, or the step cap) leave the pool as finished candidates.

  beam  one group: keep N / m, expand m (Snell et al. 2024, "Scaling LLM Test-Time
        Compute Optimally..."; search-and-learn's beam search)
  dvts  N / m groups (independent subtrees): keep 1, expand m (Beeching, Tunstall & Rush
        2024, "Scaling test-time compute with open models"), so one strong early step
        cannot take over every subtree

until no row is live or `max_steps` iterations; the answer is the finished candidate
with the best aggregated PRM score (`aggregation_lib.STEP_AGGREGATIONS`, default `last`; or
`answer`, the PRM's answer read of each finished candidate; live rows cut off by
`max_steps` compete only when nothing finished). All problems of a call share one
compiled shape: problems_per_call x N rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from o3lite import errors
from o3lite.data import formatting
from o3lite.sampling import sampler
from o3lite.sampling import stops as stops_lib
from o3lite.search import best_of_n
from o3lite.search import core
from o3lite.verifiers import step_reader
from o3lite.verifiers import aggregation as aggregation_lib


def select(scores: Sequence[float], live: Sequence[bool], groups: int, keep: int,
           expand: int) -> list[int]:
  """The parent of each of the N next rows (N = len(scores)): in each of `groups`
  consecutive groups of N / groups rows, the `keep` best live rows (ties: the earlier
  row), each `expand` times in order; a group with fewer live rows cycles through the
  ones it has; a group with none keeps its rows (they stay finished)."""
  N = len(scores)
  size = N // groups
  parents = []
  for g in range(groups):
    rows = range(g * size, (g + 1) * size)
    alive = sorted((r for r in rows if live[r]), key=lambda r: (-scores[r], r))[:keep]
    if not alive:
      parents += list(rows)
      continue
    chosen = [alive[i // expand] for i in range(min(keep, len(alive)) * expand)]
    parents += [chosen[i % len(chosen)] for i in range(size)]
  return parents


@dataclasses.dataclass
class _Row:
  tokens: list[int] | None  # The row's completion so far (stops included, EOS excluded).
  live: bool = True
  steps: tuple[float, ...] = ()  # The PRM's score of each of its steps so far.
  score: float = aggregation_lib.NO_STEPS  # What it is ranked by: its newest step's score.


def _step_config(policy: core.Policy, sampling: core.Sampling, step_tokens: int,
                 num_samples: int, greedy: bool = False) -> sampler.SamplingConfig:
  tok = policy.tokenizer
  step = sampling.replace(max_new_tokens=step_tokens,
                          temperature=0.0 if greedy else sampling.temperature)
  return dataclasses.replace(step.config(tok, num_samples),
                             stops=stops_lib.stop_set(tok, ["\n"]).stops)


def _lookahead(policy: core.Policy, state, live: list[bool], steps: int,
               cfg: sampler.SamplingConfig, generated: np.ndarray, N: int) -> list[list[int]]:
  """The tokens `steps` greedy steps add to each live row, from a throwaway fork of the
  state (the rows themselves are not moved); their tokens are counted in `generated`."""
  where = {"mesh": policy.mesh, "rules": policy.rules}
  ahead = sampler.fork(state, list(range(len(live))), **where)
  extra = [[] for _ in live]
  going = list(live)
  for _ in range(steps):
    if not any(going):
      break
    ahead = sampler.continue_(policy.params, ahead, [[] if g else None for g in going],
                              policy.model_cfg, cfg, **where)
    for b, got in enumerate(sampler.completions(ahead, cfg)):
      if going[b]:
        extra[b] += got.tokens
        generated[b // N] += len(got.tokens) + int(got.finished)
        going[b] = got.stop not in (sampler.STOP_EOS, sampler.STOP_NONE)
  return extra


def _spend(verifier: Any, before: int, spent: np.ndarray, tokens_P: Sequence[int]) -> None:
  """The verifier's tokens since `before`, split over the problems by `tokens_P`."""
  spent += np.asarray(core.split_count(verifier.tokens_scored - before, tokens_P))


def _checked(verifier: Any, name: str, aggregation: str, max_steps: int, step_tokens: int,
             lookahead: int):
  """The aggregation a tree search ranks finished candidates by, its settings checked
  (each a one-line ConfigError) before any sampling."""
  if core.verifier_kind(verifier, name) != "prm":
    raise errors.ConfigError(f"search strategy {name!r} scores steps: it needs a PRM")
  aggregate = best_of_n.aggregator(verifier, name, aggregation, answer=True)
  for what, value in (("max_steps", max_steps), ("step_tokens", step_tokens),
                      ("lookahead", lookahead + 1)):
    if value < 1:
      raise errors.ConfigError(f"search strategy {name!r}: {what} too small ({value})")
  return aggregate


def _chunk_results(chunk, prompts, rows, finished, trees, generated, spent, verifier,
                   aggregate, tok, N: int) -> list[core.SearchResult]:
  """One call's problems answered: each problem's finished candidates (else its rows
  still open at max_steps), ranked by the aggregated step scores or the answer read."""
  P = len(rows) // N
  pools = [finished[p] or [(r.tokens, r.steps) for r in rows[p * N:(p + 1) * N]
                           if r.tokens is not None] for p in range(len(chunk))]
  texts = [[tok.decode(t) for t, _ in pool] for pool in pools]
  if aggregate is None:  # The PRM's answer read of every candidate, in one call.
    before = verifier.tokens_scored
    flat = verifier.score_outcomes([chunk[p] for p, t in enumerate(texts) for _ in t],
                                   [x for t in texts for x in t])
    _spend(verifier, before, spent, [sum(len(prompts[p]) + len(t) + 1 for t, _ in pool)
                                     for p, pool in enumerate(pools)]
           + [0] * (P - len(chunk)))
    bounds = np.cumsum([0] + [len(t) for t in texts])
    scores = [flat[a:b] for a, b in zip(bounds, bounds[1:])]
  else:
    scores = [[aggregation_lib.aggregate(aggregate, list(s)) for _, s in pool]
              for pool in pools]
  results = []
  for p, pool in enumerate(pools):
    drawn = core.Drawn(prompts[p], [], texts[p])
    out = core.result(drawn, int(np.argmax(scores[p])), scores[p],
                      [list(s) for _, s in pool], int(spent[p]))
    out.compute.generated_tokens = int(generated[p])
    out.tree = trees[p]
    results.append(out)
  return results


def _search(problems: list[dict], policy: core.Policy, verifier: Any, N: int, seed: int,
            groups: int, keep: int, expand: int, aggregation: str, max_steps: int,
            step_tokens: int, lookahead: int, sampling: core.Sampling, name: str
            ) -> list[core.SearchResult]:
  """The iterations of the module docstring, `sampling.problems_per_call(N)` problems at
  a time; the PRM reads each step once, as it is written (`verifiers.step_reader`: its
  KV cache per row is forked with the sampler's rows)."""
  aggregate = _checked(verifier, name, aggregation, max_steps, step_tokens, lookahead)
  tok, where = policy.tokenizer, {"mesh": policy.mesh, "rules": policy.rules}
  cfg = _step_config(policy, sampling, step_tokens, N)
  greedy = _step_config(policy, sampling, step_tokens, 1, greedy=True)
  per_call = min(sampling.problems_per_call(N), len(problems))
  key = jax.random.PRNGKey(seed)
  new_reader = step_reader.readers(verifier, tok)
  results = []
  for c, begin in enumerate(range(0, len(problems), per_call)):
    chunk = problems[begin:begin + per_call]
    prompts = [formatting.encode_prompt(tok, p["question"]) for p in chunk]
    state = sampler.start(policy.params, prompts, policy.model_cfg, cfg,
                          jax.random.fold_in(key, c), batch_size=per_call, **where)
    B = state.batch_size  # per_call x N rows, padding problems' included.
    P = B // N
    spent = np.zeros(P, np.int64)
    before = verifier.tokens_scored
    reader = new_reader(prompts, chunk, copies=N, pad_to=P)
    _spend(verifier, before, spent, [len(p) for p in prompts] + [0] * (P - len(chunk)))
    # Rows of padding problems (a short last chunk) are dead from the start: never
    # continued, scored or waited for.
    rows = [_Row([], live=b // N < len(chunk)) for b in range(B)]
    generated = np.zeros(P, np.int64)
    finished: list[list[tuple[list[int], tuple[float, ...]]]] = [[] for _ in range(P)]
    trees: list[list[list[dict]]] = [[] for _ in range(P)]
    parents = [b % N for b in range(B)]  # Row q of a block came from row parents[q].
    for it in range(max_steps):
      # 1. This call's step joins each live row; the PRM reads it.
      new: list[list[int] | None] = [None] * B
      for b, got in enumerate(sampler.completions(state, cfg)):
        if rows[b].live:
          new[b] = got.tokens
          rows[b].tokens = rows[b].tokens + got.tokens
          generated[b // N] += len(got.tokens) + int(got.finished)
          rows[b].live = got.stop not in (sampler.STOP_EOS, sampler.STOP_NONE)
      before = verifier.tokens_scored
      for b, steps in enumerate(reader.extend(new)):
        rows[b].steps = tuple(steps)
        rows[b].score = steps[-1] if steps else aggregation_lib.NO_STEPS
      # 2. With lookahead, a live row is ranked by its step `lookahead` greedy steps on.
      if lookahead:
        extra = _lookahead(policy, state, [r.live for r in rows], lookahead, greedy,
                           generated, N)
        for b, steps in enumerate(reader.peek(extra)):
          if rows[b].live and steps:
            rows[b].score = steps[-1]
        new = [(n or []) + e for n, e in zip(new, extra)]
      _spend(verifier, before, spent,
             [sum(len(n or ()) for n in new[p * N:(p + 1) * N]) for p in range(P)])
      for p in range(len(chunk)):
        if all(r.tokens is None for r in rows[p * N:(p + 1) * N]):
          continue  # Its search ended at an earlier level (others in the call may go on).
        trees[p].append([{"parent": parents[p * N + q] - p * N if it else -1,
                          "text": None if r.tokens is None else reader.text(p * N + q),
                          "score": float(r.score), "live": r.live}
                         for q, r in enumerate(rows[p * N:(p + 1) * N])])
      for b, row in enumerate(rows):
        if row.tokens is not None and not row.live:  # Ended: a finished candidate.
          if b // N < len(chunk):
            finished[b // N].append((row.tokens, row.steps))
          row.tokens = None
      if not any(r.live for r in rows) or it == max_steps - 1:
        break
      # 3. Keep the best live rows of each group, fork them back to N rows, step on.
      parents = []
      for p in range(P):
        block = rows[p * N:(p + 1) * N]
        parents += [p * N + q for q in select([r.score for r in block],
                                              [r.live for r in block], groups, keep, expand)]
      state = sampler.fork(state, parents, **where)
      reader.fork(parents)
      rows = [_Row(rows[q].tokens, rows[q].live, rows[q].steps, rows[q].score) for q in parents]
      state = sampler.continue_(policy.params, state, [[] if r.live else None for r in rows],
                                policy.model_cfg, cfg, jax.random.fold_in(key, 1_000 * c + it + 1),
                                **where)
    results += _chunk_results(chunk, prompts, rows, finished, trees, generated, spent,
                              verifier, aggregate, tok, N)
  return results


_SAMPLING = core.Sampling()  # Its temperature, top_p, rows_per_call (steps: step_tokens).


@core.STRATEGIES.register("beam")
def beam(problems, policy, verifier, budget, seed, *, expand: int = 4,
         aggregation: str = "last", max_steps: int = 16, step_tokens: int = 32,
         lookahead: int = 0, sampling: core.Sampling = _SAMPLING) -> list[core.SearchResult]:
  """Step-level PRM beam search with N = `budget` beams: keep the N / `expand` best live
  beams after every step, each forked `expand` times (Snell et al. 2024); `lookahead`
  > 0 scores each beam after that many more greedy steps (their tokens count)."""
  _check_width(budget, expand, "beam")
  return _search(problems, policy, verifier, budget, seed, 1, budget // expand, expand,
                 aggregation, max_steps, step_tokens, lookahead, sampling, "beam")


@core.STRATEGIES.register("dvts")
def dvts(problems, policy, verifier, budget, seed, *, expand: int = 4,
         aggregation: str = "last", max_steps: int = 16, step_tokens: int = 32,
         lookahead: int = 0, sampling: core.Sampling = _SAMPLING) -> list[core.SearchResult]:
  """Diverse verifier tree search with N = `budget` rows: N / `expand` independent
  subtrees, each keeping its best live beam and forking it `expand` times per step
  (Beeching, Tunstall & Rush 2024)."""
  _check_width(budget, expand, "dvts")
  return _search(problems, policy, verifier, budget, seed, budget // expand, 1, expand,
                 aggregation, max_steps, step_tokens, lookahead, sampling, "dvts")


def _check_width(budget: int, expand: int, name: str) -> None:
  if expand < 1 or budget % expand:
    raise errors.ConfigError(f"search strategy {name!r}: expand={expand} must be >= 1 and "
                             f"divide the budget {budget}")
