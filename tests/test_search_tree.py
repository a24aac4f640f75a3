"""Step-level tree search (beam, DVTS) on a tiny random policy and a fake PRM: the
selection rule, the tree it grows, the answer it picks, its compute and its bad input."""

import flax.linen as nn
import jax
import pytest

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.search import core, tree
from o3lite.verifiers import steps as steps_lib
from o3lite.verifiers import aggregation as aggregation_lib
from test_search_voting import FakeVerifier, PROBLEMS, TOK

N, SEED = 8, 0
SAMPLING = core.Sampling(temperature=1.0, rows_per_call=16)


def test_select_keeps_the_best_live_rows_of_each_group():
  scores = [0.1, 0.9, 0.5, 0.7]
  assert tree.select(scores, [True] * 4, groups=1, keep=2, expand=2) == [1, 1, 3, 3]
  assert tree.select(scores, [True, False, True, True], 1, 2, 2) == [3, 3, 2, 2]
  assert tree.select(scores, [True] * 4, groups=2, keep=1, expand=2) == [1, 1, 3, 3]
  assert tree.select(scores, [False, False, False, True], 1, 2, 2) == [3, 3, 3, 3]
  assert tree.select(scores, [False, False, True, False], 2, 1, 2) == [0, 1, 2, 2]
  assert tree.select([0.5] * 4, [True] * 4, 1, 2, 2) == [0, 0, 1, 1]  # Ties: earlier.


def _step_score(question, solution):
  """A fake PRM: a step scores high when it is short (so the search has a preference)."""
  return [1.0 / (1 + len(s.text)) for s in steps_lib.split_completion(solution)]


@pytest.fixture(scope="module")
def policy():
  cfg = model_lib.ModelConfig.tiny(vocab_size=TOK.vocab_size)
  return core.Policy(nn.unbox(model_lib.init_params(cfg, jax.random.key(0))), cfg, TOK)


def _run(name, policy, verifier, **options):
  return core.run_strategy(name, PROBLEMS, policy, verifier, N, SEED, sampling=SAMPLING,
                           step_tokens=6, max_steps=5, **options)


@pytest.mark.parametrize("name,groups,keep", [("beam", 1, 4), ("dvts", 4, 1)])
def test_tree_search_grows_its_tree_by_the_prms_scores(policy, name, groups, keep):
  prm = FakeVerifier("prm", _step_score)
  results = _run(name, policy, prm, expand=2)
  assert len(results) == len(PROBLEMS)
  total_verifier = 0
  for r in results:
    levels = r.tree
    assert 1 <= len(levels) <= 5 and all(len(level) == N for level in levels)
    for before, after in zip(levels, levels[1:]):
      parents = tree.select([n["score"] for n in before], [n["live"] for n in before],
                            groups, keep, 2)
      assert [n["parent"] for n in after] == parents
      for node in after:  # A row continues its parent's text.
        parent = before[node["parent"]]
        if node["text"] is not None and parent["live"]:
          assert node["text"].startswith(parent["text"])
          assert node["text"] != parent["text"] or not node["live"]  # (EOS adds no text.)
    # The answer is the finished candidate with the best last-step score.
    assert r.scores == [aggregation_lib.last(s) if s else 0.5 for s in r.step_scores]
    assert r.chosen == r.scores.index(max(r.scores)) and r.solution == r.candidates[r.chosen]
    assert r.step_scores[r.chosen] == _step_score(None, r.solution)
    # Every row's first step was generated; no row writes past 5 steps of 6 (+ EOS).
    first = sum(len(TOK.encode(n["text"])) for n in levels[0])
    assert first <= r.compute.generated_tokens <= N * 5 * (6 + 1)
    total_verifier += r.compute.verifier_tokens
  assert total_verifier == prm.tokens_scored  # Padding rows are never scored.


def test_dvts_with_one_subtree_is_beam_search(policy):
  a = _run("beam", policy, FakeVerifier("prm", _step_score), expand=N)
  b = _run("dvts", policy, FakeVerifier("prm", _step_score), expand=N)
  assert [r.candidates for r in a] == [r.candidates for r in b]
  assert [r.tree for r in a] == [r.tree for r in b]


def test_lookahead_scores_where_greedy_steps_lead(policy):
  prm = FakeVerifier("prm", _step_score)
  plain = _run("beam", policy, FakeVerifier("prm", _step_score), expand=2)
  ahead = _run("beam", policy, prm, expand=2, lookahead=1)
  # Same first step (same seed), scored one greedy step further on: other scores.
  assert [r.tree[0][0]["text"] for r in ahead] == [r.tree[0][0]["text"] for r in plain]
  assert sum(r.compute.generated_tokens for r in ahead) > sum(
      r.compute.generated_tokens for r in plain)


def test_tree_search_bad_input(policy):
  with pytest.raises(errors.ConfigError, match="needs a PRM"):
    _run("beam", policy, FakeVerifier("orm", lambda q, s: 0.5))
  with pytest.raises(errors.ConfigError, match="expand=3 must be >= 1 and divide the budget 8"):
    _run("dvts", policy, FakeVerifier("prm", _step_score), expand=3)
  with pytest.raises(errors.ConfigError, match="needs a verifier"):
    _run("beam", policy, None)


def test_beam_search_can_pick_by_the_prms_answer_read(policy):
  from test_search_voting import AnswerReadingPRM  # pylint: disable=g-import-not-at-top
  answer_of = lambda q, s: 1.0 / (1 + len(s))  # The shortest finished candidate wins.
  prm = AnswerReadingPRM(_step_score, answer_of)
  results = _run("beam", policy, prm, expand=2, aggregation="answer")
  for r in results:
    assert r.scores == [answer_of(None, s) for s in r.candidates]
    assert r.chosen == r.scores.index(max(r.scores))
  # The answer reads are counted with the step reads.
  assert sum(r.compute.verifier_tokens for r in results) == prm.tokens_scored
