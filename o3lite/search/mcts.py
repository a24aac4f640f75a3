"""Monte Carlo tree search over steps (UCT), with rStar's mutual check as an option.

Nodes are partial solutions: the root is the prompt, a child is its parent plus one step
(what the policy writes up to its next "\\n", or to EOS, as in tree.py). Each problem runs
`budget` simulations; one simulation:

  1. select: from the root, while the node has children, go to the child maximizing
       UCT(child) = Q(child) + c * sqrt(ln N(node) / N(child))
     (Kocsis & Szepesvari 2006, "Bandit based Monte-Carlo Planning": plain UCT, no
     policy prior as in AlphaZero's PUCT; an unvisited child, N = 0, scores +inf; ties
     go to the earlier child);
  2. expand the leaf it reaches: `expand` candidate next steps sampled from it;
  3. evaluate each new child:
       value="prm"      v = the PRM's score of its new step, P(step correct | steps so far)
       value="rollout"  v = the verifier's score r of a rollout: the child continued to
                        EOS (at most `sampling.max_new_tokens` more tokens) from its own
                        sampler row, scored by the ORM (P(correct)) or the PRM
                        (`aggregation` of its step scores); the true answer is never read
     (with value="rollout", a child whose step ended the solution is scored as it is);
  4. back up: each new child counts one visit with its value, and every node n on the
     path from the root to the leaf gets all of them:
       N(n) += expand,   W(n) += sum of the children's v,   Q(n) = W(n) / N(n)
     so Q(n) is the mean of the evaluations in n's subtree and N(n) their number (the
     `expand` evaluations of one expansion are leaf-parallel playouts: Chaslot, Winands
     & van den Herik 2008, "Parallel Monte-Carlo Tree Search").
  A leaf that cannot grow (its step ended the solution: EOS, or `step_tokens` without a
  "\\n"; or it is `max_steps` steps deep) is not expanded: the simulation backs up its
  stored value once more (N += 1, W += v along the path). So every simulation is one
  expansion or one such revisit, and the root's visits are expand x expansions + revisits.

Candidates (finished solutions) and their scores r (the verifier's: a PRM's
`aggregation`, default "last", of the step scores, or an ORM's outcome):
  value="prm"      the nodes whose step ended the solution (when none did: every leaf);
  value="rollout"  every child's rollout (a child that ended: its own text).
The answer (option `answer`):
  "value"   (default) the candidate with the highest r, the first on ties: rStar's
            highest-value trajectory, and what beam and dvts pick, so the strategies
            differ by how they search, not by how they choose
  "visits"  the most visited path: from the root, the child with the most visits (ties:
            the higher Q, then the earlier) among those with a candidate at or below
            them, down to the node whose candidate it is (AlphaGo's most visited move,
            at every level)

Mutual check (Qi et al. 2024, "Mutual Reasoning Makes Smaller LLMs Stronger
Problem-Solvers", rStar): with `mutual_check=True`, every candidate with a parsed answer
is cut after its first floor(check_fraction * n) of n steps (`split_completion`), and the
`checker` (a second `core.Policy`; default the policy itself) completes the cut path
once, at `sampling`'s settings. A candidate is mutually consistent when the checker's
answer equals its own; the answer rule then looks at consistent candidates only (at all
of them when none is: rStar falls back to its highest-value trajectory). The checker's
tokens count as generated tokens.

Batching and compute: `sampling.problems_per_call(expand)` problems share each sampler
call, and one simulation round of all of them is one `prime` + `fork` + `continue_`
(plus one `continue_` of the rollouts, and one verifier call). The selected leaves are
primed (each prefix computed once per round and shared by its `expand` children through
the fork) rather than kept: a simulation can select any node of the tree, and keeping a
cache row per node would make every decode step run every node's row. The rollouts
continue the children's own rows (nothing recomputed). Generated tokens: every sampled
step, rollout and check, EOS counted; verifier tokens: each round's call split over its
problems by their scored rows' tokens (prompt + text + EOS).

`SearchResult.tree`, for a notebook to draw (tree.py's layout: one level per depth, so
the same drawing code serves both): level d holds the nodes d + 1 steps deep in creation
order, each {"parent": its index at the level before (-1 at the first), "text": the
solution so far, "step": its own step, "score": its evaluation v, "visits": N, "value": Q,
"evaluations": the values backed up from the node itself (v, again at each revisit),
"live": can grow, "ended": its step ended the solution, "rollout": its rollout's text
(None without), "candidate": its candidate's index in `candidates` (None: none),
"agrees": the checker's verdict (None: not checked), "chosen": on the answer's path}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from o3lite import errors
from o3lite.data import formatting
from o3lite.sampling import sampler
from o3lite.sampling import stops as stops_lib
from o3lite.search import best_of_n
from o3lite.search import core
from o3lite.search import revise as revise_lib
from o3lite.verifiers import steps as steps_lib
from o3lite.verifiers import aggregation as aggregation_lib

VALUES = ("prm", "rollout")
ANSWERS = ("value", "visits")


def uct(value: float, visits: int, parent_visits: int, c: float) -> float:
  """Q + c * sqrt(ln N_parent / N_child); +inf for an unvisited child (N_child = 0)."""
  if visits == 0:
    return math.inf
  return value + c * math.sqrt(math.log(parent_visits) / visits)


def select_child(values: Sequence[float], visits: Sequence[int], parent_visits: int,
                 c: float) -> int:
  """The index of the child with the highest UCT score (ties: the earlier child)."""
  scores = [uct(q, n, parent_visits, c) for q, n in zip(values, visits)]
  return scores.index(max(scores))


@dataclasses.dataclass
class Node:
  """One partial solution of a problem's tree (node 0 is the root: the prompt alone)."""

  parent: int  # Its index in the problem's node list; -1 for the root.
  tokens: list[int]  # The solution so far (prompt excluded): its parent's + its step.
  step: int  # tokens[step:] is its own step.
  depth: int  # Steps from the root.
  live: bool = True  # Can be expanded.
  ended: bool = False  # Its step ended the solution (EOS, or step_tokens without "\n").
  score: float = 0.0  # Its evaluation v.
  children: list[int] = dataclasses.field(default_factory=list)
  visits: int = 0  # N: evaluations backed up through it.
  total: float = 0.0  # W: their sum.
  evaluations: list[float] = dataclasses.field(default_factory=list)  # Its own.
  rollout: list[int] | None = None  # value="rollout": the tokens its rollout added.
  steps: list[float] | None = None  # PRM step scores of its candidate text.
  rank: float | None = None  # Its candidate's score r.
  agrees: bool | None = None  # The mutual check's verdict.

  @property
  def value(self) -> float:
    """Q = W / N (0 before any visit)."""
    return self.total / self.visits if self.visits else 0.0

  @property
  def candidate_tokens(self) -> list[int]:
    return self.tokens + (self.rollout or [])


def select(nodes: list[Node], c: float) -> list[int]:
  """The UCT path: node indices from the root to the leaf it reaches."""
  path = [0]
  while nodes[path[-1]].children:
    node = nodes[path[-1]]
    kids = [nodes[i] for i in node.children]
    path.append(node.children[select_child([k.value for k in kids], [k.visits for k in kids],
                                           node.visits, c)])
  return path


def backup(nodes: list[Node], path: Sequence[int], values: Sequence[float]) -> None:
  """Every node on `path` gets the evaluations `values`: N += len, W += sum."""
  for i in path:
    nodes[i].visits += len(values)
    nodes[i].total += float(sum(values))


def most_visited(nodes: list[Node], candidates: set[int]) -> int:
  """The node at the end of the most visited path: from the root, the child with the
  most visits (ties: the higher Q, then the earlier) among those with a node of
  `candidates` at or below them, until none has: a node of `candidates`."""
  below = set()
  for i in sorted(candidates):
    while i >= 0 and i not in below:
      below.add(i)
      i = nodes[i].parent
  at = 0
  while True:
    kids = [k for k in nodes[at].children if k in below]
    if not kids:
      return at
    at = max(kids, key=lambda k: (nodes[k].visits, nodes[k].value, -k))


def _config(policy: core.Policy, sampling: core.Sampling, max_new_tokens: int,
            stops: tuple = ()) -> sampler.SamplingConfig:
  return dataclasses.replace(
      sampling.replace(max_new_tokens=max_new_tokens).config(policy.tokenizer), stops=stops)


def _simulations(chunk: list[dict], prompts: list[list[int]], policy: core.Policy,
                 verifier: Any, agg: Callable | None, budget: int, key: jax.Array,
                 expand: int, c: float, value: str, max_steps: int, step_tokens: int,
                 sampling: core.Sampling, per_call: int
                 ) -> tuple[list[list[Node]], np.ndarray, np.ndarray]:
  """`budget` simulation rounds of the problems of one call: their trees, generated and
  verifier tokens."""
  tok, where = policy.tokenizer, {"mesh": policy.mesh, "rules": policy.rules}
  step_cfg = _config(policy, sampling, step_tokens, stops_lib.stop_set(tok, ["\n"]).stops)
  roll_cfg = _config(policy, sampling, sampling.max_new_tokens)
  P, k = len(chunk), expand
  trees = [[Node(-1, [], 0, 0)] for _ in range(P)]
  generated, spent = np.zeros(P, np.int64), np.zeros(P, np.int64)
  for sim in range(budget):
    paths = [select(nodes, c) for nodes in trees]
    grow = [p for p in range(P) if trees[p][paths[p][-1]].live]
    for p in sorted(set(range(P)) - set(grow)):  # A leaf that cannot grow: revisit it.
      leaf = trees[p][paths[p][-1]]
      leaf.evaluations.append(leaf.score)
      backup(trees[p], paths[p], [leaf.score])
    if not grow:
      continue
    # Expand: each growing leaf primed once, forked k times, sampled to its next step.
    leaves = [trees[p][paths[p][-1]] if p in grow else None for p in range(P)]
    prefixes = [prompts[p] + leaves[p].tokens if leaves[p] else prompts[p] for p in range(P)]
    state = sampler.prime(policy.params, prefixes + [prompts[0]] * (per_call - P),
                          policy.model_cfg, step_cfg, **where)
    state = sampler.fork(state, [b // k for b in range(per_call * k)], **where)
    rows = [p * k + j for p in grow for j in range(k)]  # The growing leaves' children.
    suffixes = [None] * (per_call * k)
    for b in rows:
      suffixes[b] = []
    sim_key = jax.random.fold_in(key, sim)
    state = sampler.continue_(policy.params, state, suffixes, policy.model_cfg, step_cfg,
                              jax.random.fold_in(sim_key, 0), **where)
    children = {}
    for b, got in enumerate(sampler.completions(state, step_cfg)):
      if suffixes[b] is not None:
        leaf = leaves[b // k]
        ended = got.stop in (sampler.STOP_EOS, sampler.STOP_NONE)
        children[b] = Node(paths[b // k][-1], leaf.tokens + got.tokens, len(leaf.tokens),
                           leaf.depth + 1, live=not ended and leaf.depth + 1 < max_steps,
                           ended=ended)
        generated[b // k] += len(got.tokens) + int(got.finished)
    if value == "rollout":  # Every child that did not end runs on to the end.
      suffixes = [[] if b in children and not children[b].ended else None
                  for b in range(per_call * k)]
      if any(s is not None for s in suffixes):
        state = sampler.continue_(policy.params, state, suffixes, policy.model_cfg, roll_cfg,
                                  jax.random.fold_in(sim_key, 1), **where)
        for b, got in enumerate(sampler.completions(state, roll_cfg)):
          if suffixes[b] is not None:
            children[b].rollout = got.tokens
            generated[b // k] += len(got.tokens) + int(got.finished)
    # Evaluate: one verifier call for every new child of every problem.
    texts = [tok.decode(children[b].candidate_tokens) for b in rows]
    examples = [chunk[b // k] for b in rows]
    before = verifier.tokens_scored
    if agg is None:
      ranks, steps = verifier.score_outcomes(examples, texts), [None] * len(rows)
    else:
      steps = verifier.score_steps(examples, texts)
      ranks = [agg(s) if len(s) else aggregation_lib.NO_STEPS for s in steps]
    weights = np.zeros(P)
    for b in rows:
      weights[b // k] += len(prompts[b // k]) + len(children[b].candidate_tokens) + 1
    spent += np.asarray(core.split_count(verifier.tokens_scored - before, weights))
    for b, s, r in zip(rows, steps, ranks):
      child = children[b]
      child.steps = None if s is None else [float(x) for x in s]
      child.rank = float(r)
      child.score = (float(s[-1]) if s else aggregation_lib.NO_STEPS) if value == "prm" else child.rank
      child.visits, child.total, child.evaluations = 1, child.score, [child.score]
    # Back up: the new children join their leaf, their values go up its path.
    for p in grow:
      nodes, new = trees[p], [children[b] for b in rows if b // k == p]
      leaves[p].children = list(range(len(nodes), len(nodes) + len(new)))
      nodes += new
      backup(nodes, paths[p], [n.score for n in new])
  return trees, generated, spent


def _candidates(nodes: list[Node], value: str) -> list[int]:
  """The nodes whose candidates compete (see the module docstring)."""
  if value == "rollout":
    return list(range(1, len(nodes)))
  ended = [i for i in range(1, len(nodes)) if nodes[i].ended]
  return ended or [i for i in range(1, len(nodes)) if not nodes[i].children]


def _check(problems: list[dict], trees: list[list[Node]], pools: list[list[int]],
           checker: core.Policy, sampling: core.Sampling, fraction: float,
           key: jax.Array, generated: np.ndarray, decode: Callable) -> None:
  """rStar's mutual check: sets `agrees` on every candidate with a parsed answer."""
  tok = checker.tokenizer
  jobs, prefixes = [], []
  for p, (nodes, pool) in enumerate(zip(trees, pools)):
    for i in pool:
      text = decode(nodes[i].candidate_tokens)
      answer = formatting.parse_answer(text)
      if answer is None:
        continue
      steps = steps_lib.split_completion(text)
      keep = int(fraction * len(steps))
      cut = text[:steps[keep - 1].boundary] if keep else ""
      jobs.append((p, i, answer, cut))
      prefixes.append(formatting.encode_prompt(tok, problems[p]["question"])
                      + tok.encode(cut))
  if not jobs:
    return
  got = revise_lib.complete(checker, prefixes, sampling.config(tok, 1), key,
                            min(sampling.problems_per_call(1), len(prefixes)))
  for (p, i, answer, cut), completion in zip(jobs, got):
    theirs = formatting.parse_answer(cut + tok.decode(completion.tokens))
    trees[p][i].agrees = theirs == answer
    generated[p] += len(completion.tokens) + int(completion.finished)


_SAMPLING = core.Sampling()  # Its temperature, top_p, rows_per_call; max_new_tokens: rollouts.


@core.STRATEGIES.register("mcts")
def mcts(problems: Sequence[dict], policy: core.Policy, verifier: Any, budget: int,
         seed: int, *, expand: int = 4, c: float = 1.0, value: str = "prm",
         aggregation: str | None = None, answer: str = "value", mutual_check: bool = False,
         checker: core.Policy | None = None, check_fraction: float = 0.5,
         max_steps: int = 16, step_tokens: int = 32,
         sampling: core.Sampling = _SAMPLING) -> list[core.SearchResult]:
  """UCT over steps with `budget` simulations per problem, each expanding the selected
  leaf into `expand` sampled steps valued by the PRM (value="prm") or by the verifier's
  score of a rollout (value="rollout"), backed up as means; the answer by `answer`
  ("value": the best-scored candidate, rStar's; "visits": the most visited path), with
  rStar's mutual check as an option (see the module docstring)."""
  name = "mcts"
  if value not in VALUES:
    raise errors.ConfigError(f"search strategy {name!r}: value={value!r}: expected one of "
                             f"{list(VALUES)}")
  if answer not in ANSWERS:
    raise errors.ConfigError(f"search strategy {name!r}: answer={answer!r}: expected one "
                             f"of {list(ANSWERS)}")
  kind = core.verifier_kind(verifier, name)
  if value == "prm" and kind != "prm":
    raise errors.ConfigError(f"search strategy {name!r} with value='prm' scores steps: it "
                             "needs a PRM (value='rollout' takes an ORM)")
  agg = best_of_n.aggregator(verifier, name, aggregation)
  for what, n in (("expand", expand), ("max_steps", max_steps), ("step_tokens", step_tokens)):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise errors.ConfigError(f"search strategy {name!r}: {what}={n!r}: expected a "
                               "positive int")
  if not c >= 0:
    raise errors.ConfigError(f"search strategy {name!r}: c={c!r}: expected >= 0")
  if not 0 <= check_fraction < 1:
    raise errors.ConfigError(f"search strategy {name!r}: check_fraction={check_fraction!r}: "
                             "expected in [0, 1)")
  if checker is not None and not mutual_check:
    raise errors.ConfigError(f"search strategy {name!r}: a checker is used only with "
                             "mutual_check=True")
  if checker is not None and not isinstance(checker, core.Policy):
    raise errors.ConfigError(f"search strategy {name!r}: checker must be a core.Policy, "
                             f"not {type(checker).__name__}")
  tok = policy.tokenizer
  search_key, check_key = jax.random.split(jax.random.PRNGKey(seed))
  per_call = revise_lib.rows_per_call(
      policy, min(sampling.problems_per_call(expand), len(problems)))
  prompts = [formatting.encode_prompt(tok, p["question"]) for p in problems]
  trees, generated, spent = [], [], []
  for call, begin in enumerate(range(0, len(problems), per_call)):
    t, g, s = _simulations(problems[begin:begin + per_call], prompts[begin:begin + per_call],
                           policy, verifier, agg, budget, jax.random.fold_in(search_key, call),
                           expand, c, value, max_steps, step_tokens, sampling, per_call)
    trees += t
    generated += list(g)
    spent += list(s)
  generated = np.asarray(generated, np.int64)
  pools = [_candidates(nodes, value) for nodes in trees]
  if mutual_check:
    _check(problems, trees, pools, checker or policy, sampling, check_fraction, check_key,
           generated, tok.decode)
  return [_result(nodes, pool, prompts[p], answer, tok, int(generated[p]), int(spent[p]))
          for p, (nodes, pool) in enumerate(zip(trees, pools))]


def _result(nodes: list[Node], pool: list[int], prompt: list[int], answer: str, tok: Any,
            generated: int, spent: int) -> core.SearchResult:
  """The answer (among the mutually consistent candidates, when any is) and the record."""
  consistent = [i for i in pool if nodes[i].agrees] or pool
  if answer == "value":
    pick = max(consistent, key=lambda i: (nodes[i].rank, -pool.index(i)))
  else:
    pick = most_visited(nodes, set(consistent))
  texts = [tok.decode(nodes[i].candidate_tokens) for i in pool]
  steps = [nodes[i].steps for i in pool]
  drawn = core.Drawn(prompt, [], texts)
  out = core.result(drawn, pool.index(pick), [nodes[i].rank for i in pool],
                    None if steps and steps[0] is None else steps, spent)
  out.compute.generated_tokens = generated
  chosen = set()
  i = pick
  while i > 0:
    chosen.add(i)
    i = nodes[i].parent
  levels: list[list[dict]] = []
  where = {0: -1}  # Node -> its index in its level (the root: -1).
  for i, node in enumerate(nodes[1:], start=1):
    while len(levels) < node.depth:
      levels.append([])
    level = levels[node.depth - 1]
    where[i] = len(level)
    level.append({
        "parent": where[node.parent], "text": tok.decode(node.tokens),
        "step": tok.decode(node.tokens[node.step:]), "score": node.score,
        "visits": node.visits, "value": node.value, "evaluations": list(node.evaluations),
        "live": node.live, "ended": node.ended,
        "rollout": None if node.rollout is None else tok.decode(node.rollout),
        "candidate": pool.index(i) if i in pool else None, "agrees": node.agrees,
        "chosen": i in chosen})
  out.tree = levels
  return out
