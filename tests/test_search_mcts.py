"""MCTS over steps on a tiny random policy and fake verifiers: UCT's formula, the path
each simulation selects, visits and backed-up means, the answer rules, rStar's mutual
check, the compute, and bad input."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from o3lite import errors
from o3lite.data import formatting
from o3lite.model import transformer as model_lib
from o3lite.sampling import sampler
from o3lite.search import core, mcts
from o3lite.verifiers import steps as steps_lib
from test_search_voting import FakeVerifier, PROBLEMS, TOK

BUDGET, EXPAND, SEED = 6, 2, 0
# 16 rows per call: all four problems (padded to 8) x 2 children; rollouts of 16 tokens.
SAMPLING = core.Sampling(max_new_tokens=16, temperature=1.0, rows_per_call=16)


def _step_score(question, solution):
  """A fake PRM: a step scores high when it is short (so the search has a preference)."""
  return [1.0 / (1 + len(s.text)) for s in steps_lib.split_completion(solution)]


def _outcome(question, solution):
  """A fake ORM: likes the answer "1"."""
  return 0.9 if formatting.parse_answer(solution) == "1" else 0.2


@pytest.fixture(scope="module")
def policy():
  cfg = model_lib.ModelConfig.tiny(vocab_size=TOK.vocab_size)
  return core.Policy(nn.unbox(model_lib.init_params(cfg, jax.random.key(0))), cfg, TOK)


def _run(policy, verifier, **options):
  options = {"expand": EXPAND, "step_tokens": 6, "max_steps": 4, **options}
  return core.run_strategy("mcts", PROBLEMS, policy, verifier, BUDGET, SEED,
                           sampling=SAMPLING, **options)


def test_uct_is_its_formula():
  assert mcts.uct(0.4, 1, 6, 1.0) == pytest.approx(0.4 + math.sqrt(math.log(6)), rel=1e-12)
  assert mcts.uct(0.5, 4, 6, 2.0) == pytest.approx(0.5 + 2 * math.sqrt(math.log(6) / 4))
  assert mcts.uct(0.3, 0, 6, 1.0) == math.inf
  # 0.2 + 1.339 = 1.539, 0.5 + 0.669 = 1.169, 0.4 + 1.339 = 1.739: exploration wins.
  assert mcts.select_child([0.2, 0.5, 0.4], [1, 4, 1], 6, c=1.0) == 2
  assert mcts.select_child([0.2, 0.5, 0.4], [1, 4, 1], 6, c=0.0) == 1  # Greedy on Q.
  assert mcts.select_child([0.9, 0.1], [3, 0], 3, c=0.0) == 1  # Unvisited first.
  assert mcts.select_child([0.5, 0.5], [2, 2], 4, c=1.0) == 0  # Ties: the earlier.
  assert mcts.select_child([0.1, 0.7], [1, 1], 1, c=5.0) == 1  # ln 1 = 0: Q alone.


def _hand_tree():
  """root -> a (children c, d), b; a leaf per child."""
  N = mcts.Node
  nodes = [N(-1, [], 0, 0), N(0, [1], 0, 1), N(0, [2], 0, 1), N(1, [1, 3], 1, 2),
           N(1, [1, 4], 1, 2, live=False, ended=True)]
  nodes[0].children, nodes[1].children = [1, 2], [3, 4]
  return nodes


def test_select_backup_and_the_most_visited_path_by_hand():
  nodes = _hand_tree()
  for i, v in ((1, 0.2), (2, 0.6), (3, 0.9), (4, 0.1)):  # Each child's own evaluation.
    nodes[i].visits, nodes[i].total = 1, v
  mcts.backup(nodes, [0, 1], [0.9, 0.1])  # The expansion of a into c, d.
  mcts.backup(nodes, [0], [0.2, 0.6])  # The expansion of the root into a, b.
  assert (nodes[1].visits, nodes[1].value) == (3, pytest.approx((0.2 + 0.9 + 0.1) / 3))
  assert (nodes[0].visits, nodes[0].value) == (4, pytest.approx((0.2 + 0.9 + 0.1 + 0.6) / 4))
  # UCT at the root: a = 0.4 + sqrt(ln 4 / 3) = 1.08, b = 0.6 + sqrt(ln 4) = 1.78.
  assert mcts.select(nodes, 1.0) == [0, 2]
  assert mcts.select(nodes, 0.1) == [0, 2]  # b's Q is higher too.
  nodes[2].total = 0.3  # Now a: 0.4 + 0.068 > b: 0.3 + 0.118 -> c (0.9) beats d (0.1).
  assert mcts.select(nodes, 0.1) == [0, 1, 3]
  # The most visited path: a (3 visits) over b (1), then c over d on ties by Q.
  assert mcts.most_visited(nodes, {2, 3, 4}) == 3
  assert mcts.most_visited(nodes, {2, 4}) == 4  # Only paths to candidates count.
  assert mcts.most_visited(nodes, {2}) == 2


def _subtree_evaluations(levels, depth, index):
  node = levels[depth][index]
  out = list(node["evaluations"])
  if depth + 1 < len(levels):
    for j, child in enumerate(levels[depth + 1]):
      if child["parent"] == index:
        out += _subtree_evaluations(levels, depth + 1, j)
  return out


def _children(levels, depth, index):
  return [] if depth + 1 >= len(levels) else [
      j for j, n in enumerate(levels[depth + 1]) if n["parent"] == index]


def _check_tree(r, expand, budget):
  """The invariants of every search tree: visits, means, simulations, texts."""
  levels = r.tree
  expansions, revisits, first = 1, 0, 0  # The root is expanded by the first simulation.
  assert len(levels[0]) == expand
  for d, level in enumerate(levels):
    for i, node in enumerate(level):
      below = _subtree_evaluations(levels, d, i)
      assert node["visits"] == len(below)  # N: the evaluations in the subtree.
      assert node["value"] == pytest.approx(np.mean(below), abs=1e-12)  # Q: their mean.
      assert node["evaluations"][0] == node["score"]
      assert set(node["evaluations"]) == {node["score"]}  # Revisits repeat its value.
      kids = _children(levels, d, i)
      assert len(kids) in (0, expand)
      assert not kids or (node["live"] and len(node["evaluations"]) == 1)
      expansions += bool(kids)
      revisits += len(node["evaluations"]) - 1
      parent_text = "" if d == 0 else levels[d - 1][node["parent"]]["text"]
      assert node["text"] == parent_text + node["step"]
      assert node["live"] == (not node["ended"] and d + 1 < 4)
      first += len(TOK.encode(node["step"]))
  assert expansions + revisits == budget  # Each simulation: one expansion or one revisit.
  assert sum(n["visits"] for n in levels[0]) == expand * expansions + revisits
  return first


@pytest.mark.parametrize("value", ["prm", "rollout"])
def test_every_simulation_follows_uct_and_backs_up_means(policy, value, monkeypatch):
  seen = []
  real_select = mcts.select

  def recording(nodes, c):
    # Each step of the path by UCT's formula, on the tree as the simulation saw it.
    at, want = 0, [0]
    while nodes[at].children:
      kids = nodes[at].children
      ucb = [nodes[k].total / nodes[k].visits
             + c * math.sqrt(math.log(nodes[at].visits) / nodes[k].visits) for k in kids]
      at = kids[int(np.argmax(ucb))]
      want.append(at)
    path = real_select(nodes, c)
    seen.append((path, want))
    return path

  monkeypatch.setattr(mcts, "select", recording)
  prm = FakeVerifier("prm", _step_score)
  results = _run(policy, prm, value=value, c=0.5)
  assert len(seen) == BUDGET * len(PROBLEMS)
  assert all(path == want for path, want in seen)
  assert max(len(path) for path, _ in seen) >= 3  # The search went below the first level.
  total_verifier = 0
  for r in results:
    first = _check_tree(r, EXPAND, BUDGET)
    nodes = [n for level in r.tree for n in level]
    rolled = 0
    for n in nodes:
      scored = n["text"] + (n["rollout"] or "")
      if value == "prm":
        assert n["rollout"] is None
        assert n["score"] == (_step_score(None, scored) or [0.5])[-1]
      else:  # The rollout's text, scored by the PRM's last step (the default aggregation).
        assert (n["rollout"] is None) == n["ended"]
        assert n["score"] == (_step_score(None, scored) or [0.5])[-1]
        rolled += len(TOK.encode(n["rollout"] or ""))
    assert first + rolled <= r.compute.generated_tokens <= first + rolled + 2 * len(nodes)
    total_verifier += r.compute.verifier_tokens
    # The answer (default "value"): the best-scored candidate, the first on ties.
    assert r.chosen == int(np.argmax(r.scores)) and r.solution == r.candidates[r.chosen]
    assert r.step_scores == [_step_score(None, c) for c in r.candidates]
    assert r.scores == [(s or [0.5])[-1] for s in r.step_scores]
    cands = [n for n in nodes if n["candidate"] is not None]
    assert sorted(n["candidate"] for n in cands) == list(range(len(r.candidates)))
    if value == "rollout":
      assert len(cands) == len(nodes)  # Every child's rollout competes.
    elif any(n["ended"] for n in nodes):
      assert all(n["ended"] for n in cands)  # Finished solutions only, when there are any.
    assert [n["chosen"] for n in nodes].count(True) == len(
        _path_to(r.tree, r.chosen))
  assert total_verifier == prm.tokens_scored  # Padding rows are never scored.


def _path_to(levels, candidate):
  """The nodes from the first level down to the one whose candidate is `candidate`."""
  for d, level in enumerate(levels):
    for i, node in enumerate(level):
      if node["candidate"] == candidate:
        path = [(d, i)]
        while d > 0:
          i = levels[d][i]["parent"]
          d -= 1
          path.append((d, i))
        assert all(levels[e][j]["chosen"] for e, j in path)
        return path
  raise AssertionError(f"no node holds candidate {candidate}")


def test_the_most_visited_path_and_an_orm_on_rollouts(policy):
  orm = FakeVerifier("orm", _outcome)
  by_value = _run(policy, orm, value="rollout")
  by_visits = _run(policy, FakeVerifier("orm", _outcome), value="rollout", answer="visits")
  differ = 0
  for a, b in zip(by_value, by_visits):
    assert b.tree == [[{**n, "chosen": m["chosen"]} for n, m in zip(la, lb)]
                      for la, lb in zip(a.tree, b.tree)]  # The same search.
    assert a.step_scores is None and a.scores == [_outcome(None, c) for c in a.candidates]
    assert a.chosen == int(np.argmax(a.scores))
    _check_tree(b, EXPAND, BUDGET)
    # From the first level down: the most visited (then the higher Q, then the earlier).
    levels, d, i = b.tree, 0, None
    while True:
      options = [j for j in (range(len(levels[0])) if d == 0 else _children(levels, d - 1, i))]
      if not options:
        break
      i = max(options, key=lambda j: (levels[d][j]["visits"], levels[d][j]["value"], -j))
      d += 1
    assert levels[d - 1][i]["candidate"] == b.chosen  # Every node holds a rollout here.
    differ += a.chosen != b.chosen
  assert differ >= 1  # The two rules really choose differently somewhere.


def test_the_mutual_check_keeps_the_candidates_the_checker_agrees_with(policy, monkeypatch):
  plain = _run(policy, FakeVerifier("prm", _step_score), value="rollout")
  prefixes = []

  def checker_writes_one(checker, cut_prompts, cfg, rng, rows):
    """A checker that always answers "1": it agrees with the candidates that say "1"."""
    prefixes.extend(cut_prompts)
    return [sampler.Completion([TOK.encode("</think>1")[0]], [0.0], True, sampler.STOP_EOS)
            for _ in cut_prompts]

  monkeypatch.setattr(mcts.revise_lib, "complete", checker_writes_one)
  checked = _run(policy, FakeVerifier("prm", _step_score), value="rollout",
                 mutual_check=True, check_fraction=0.5)
  want_prefixes = []
  for p, (a, b) in zip(PROBLEMS, zip(plain, checked)):
    assert a.candidates == b.candidates and a.scores == b.scores  # The same search.
    nodes = sorted((n for level in b.tree for n in level), key=lambda n: n["candidate"])
    for n, text, ans in zip(nodes, b.candidates, b.answers):
      assert n["agrees"] == (None if ans is None else ans == "1")
      if ans is not None:
        steps = steps_lib.split_completion(text)
        cut = text[:steps[len(steps) // 2 - 1].boundary] if len(steps) >= 2 else ""
        want_prefixes.append(TOK.encode(formatting.format_prompt(p["question"]))
                             + TOK.encode(cut))
    checks = sum(a is not None for a in b.answers)
    assert b.compute.generated_tokens == a.compute.generated_tokens + 2 * checks
    ones = [i for i, ans in enumerate(b.answers) if ans == "1"]
    if ones:  # The best-scored candidate among those the checker agrees with.
      assert b.chosen == max(ones, key=lambda i: (b.scores[i], -i))
    else:  # None agrees: every candidate competes again.
      assert b.chosen == a.chosen
  assert sorted(map(tuple, prefixes)) == sorted(map(tuple, want_prefixes))
  assert sum(b.answer == "1" for b in checked) > sum(a.answer == "1" for a in plain)


def test_the_mutual_check_with_a_real_checker(policy):
  results = _run(policy, FakeVerifier("prm", _step_score), mutual_check=True,
                 checker=policy, check_fraction=0.0)
  verdicts = [n["agrees"] for r in results for level in r.tree for n in level]
  assert True in verdicts and False in verdicts
  for r in results:
    nodes = [n for level in r.tree for n in level]
    agreed = [n["candidate"] for n in nodes if n["agrees"]]
    if agreed:
      assert r.chosen in agreed


def _one_line(match, fn):
  with pytest.raises(errors.ConfigError, match=match) as info:
    fn()
  assert "\n" not in str(info.value)


def test_mcts_bad_input(policy):
  prm, orm = FakeVerifier("prm", _step_score), FakeVerifier("orm", _outcome)
  _one_line("^search strategy 'mcts' needs a verifier", lambda: _run(policy, None))
  _one_line("with value='prm' scores steps: it needs a PRM", lambda: _run(policy, orm))
  _one_line(r"value='mc': expected one of \['prm', 'rollout'\]",
            lambda: _run(policy, prm, value="mc"))
  _one_line(r"answer='best': expected one of \['value', 'visits'\]",
            lambda: _run(policy, prm, answer="best"))
  for what in ("expand", "max_steps", "step_tokens"):
    _one_line(f"{what}=0: expected a positive int", lambda: _run(policy, prm, **{what: 0}))
  _one_line(r"c=-1.0: expected >= 0", lambda: _run(policy, prm, c=-1.0))
  _one_line(r"check_fraction=1.0: expected in \[0, 1\)",
            lambda: _run(policy, prm, check_fraction=1.0))
  _one_line("a checker is used only with mutual_check=True",
            lambda: _run(policy, prm, checker=policy))
  _one_line("checker must be a core.Policy", lambda: _run(policy, prm, mutual_check=True,
                                                          checker="phi-3"))
  _one_line("an ORM scores whole solutions",
            lambda: _run(policy, orm, value="rollout", aggregation="min"))
  _one_line("has no option", lambda: _run(policy, prm, beam_width=4))
  assert prm.tokens_scored == orm.tokens_scored == 0  # Nothing ran.
