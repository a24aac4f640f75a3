"""Test-time search: majority, weighted majority and best-of-N on a tiny random policy,
their compute accounting, their bad input, and a real (random) reward model end to end.

The policy's vocabulary is whitespace and three answer tokens ("</think>1" ...), so every
sampled text parses to the answer of its last answer token: a few distinct answers per
problem, with clear majorities and minorities. Verifiers are fakes with known scores, and
once a random `reward_model.Verifier` on the same tokenizer.
"""

import collections
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import PieceTokenizer
from o3lite import errors
from o3lite.data import formatting
from o3lite.evaluation import heldout
from o3lite.model import heads
from o3lite.model import transformer as model_lib
from o3lite.sampling import sampler
from o3lite.search import core, voting
from o3lite.verifiers import reward_model as rm
from o3lite.verifiers import aggregation as aggregation_lib


# Pieces matched longest first; decoding and re-encoding gives the same ids (the pad
# piece is a tab: whitespace, so it never changes an answer).
TOK = PieceTokenizer(["\t", "</s>", "\n", " ", "</think>1", "</think>2", "</think>3"])
PROBLEMS = [{"question": q, "answer": "1"} for q in
            ["</think>1 </think>2", "</think>3", "</think>2\n</think>2", " </think>1 "]]
N, SEED = 8, 0
# 16 rows per sampler call: two problems of N = 8 samples (or all four of N = 1).
SAMPLING = core.Sampling(max_new_tokens=8, temperature=1.0, rows_per_call=16)


@pytest.fixture(scope="module")
def policy():
  cfg = model_lib.ModelConfig.tiny(vocab_size=TOK.vocab_size)
  return core.Policy(nn.unbox(model_lib.init_params(cfg, jax.random.key(0))), cfg, TOK)


@pytest.fixture(scope="module")
def drawn(policy):
  """The candidates every strategy samples at (PROBLEMS, N, SEED, SAMPLING)."""
  return core.draw(PROBLEMS, policy, N, SEED, SAMPLING)


class FakeVerifier:
  """Scores from a function of (question, solution): a list of step scores for a PRM,
  a number for an ORM. Counts one token per character of each solution, plus one."""

  def __init__(self, kind, score_fn):
    self.kind, self.score_fn, self.tokens_scored = kind, score_fn, 0
    self.calls = 0

  def _run(self, examples, solutions):
    self.calls += 1
    self.tokens_scored += sum(len(s) + 1 for s in solutions)
    return [self.score_fn(e["question"], s) for e, s in zip(examples, solutions)]

  def score_steps(self, examples, solutions):
    assert self.kind == "prm"
    return self._run(examples, solutions)

  def score_outcomes(self, examples, solutions):
    assert self.kind == "orm"
    return self._run(examples, solutions)


def _run(name, policy, verifier=None, budget=N, **options):
  return core.run_strategy(name, PROBLEMS, policy, verifier, budget, SEED,
                           sampling=SAMPLING, **options)


def test_the_strategies_are_registered():
  assert sorted(core.STRATEGIES) == ["beam", "best_of_n", "dvts", "majority", "mcts",
                                    "revise", "think_budget", "wait", "weighted_majority"]
  assert sorted(aggregation_lib.STEP_AGGREGATIONS) == ["last", "min", "prod"]


def test_majority_picks_the_most_frequent_answer(policy, drawn):
  results = _run("majority", policy)
  clear, not_first = 0, 0
  for r, d in zip(results, drawn):
    assert r.candidates == d.texts and r.answers == d.answers  # Same seed, same samples.
    counts = collections.Counter(a for a in r.answers if a is not None)
    top = max(counts.values())
    assert counts[r.answer] == top
    # Ties: the answer seen first among the most frequent.
    assert r.answer == next(a for a in r.answers if a is not None and counts[a] == top)
    assert r.solution == r.candidates[r.chosen] and r.chosen == r.answers.index(r.answer)
    assert formatting.parse_answer(r.solution) == r.answer
    assert r.scores is None and r.step_scores is None and r.compute.verifier_tokens == 0
    second = sorted(counts.values())[-2] if len(counts) > 1 else 0
    clear += top > second
    not_first += r.answer != r.answers[0]
  assert clear >= 2 and not_first >= 1  # Not won by ties or by the first sample alone.


def test_weighted_answer_is_majority_with_unit_weights_and_sums_the_weights():
  for answers in (["1", "2", "2", None, "1"], ["2", "1"], [None, None], ["3", None, "1", "1"]):
    assert voting.weighted_answer(answers, [1.0] * len(answers)) == \
        heldout.majority_answer(answers)
  # "1": 0.9 + 0.1 = 1.0 beats "2": 0.3 + 0.3 = 0.6; the unparsed 5.0 does not vote.
  assert voting.weighted_answer(["1", "2", "2", None, "1"], [0.9, 0.3, 0.3, 5.0, 0.1]) == "1"
  assert voting.weighted_answer(["1", "2", "2"], [0.5, 0.3, 0.3]) == "2"
  assert voting.weighted_answer(["2", "1"], [0.5, 0.5]) == "2"  # Tie: first seen.


def _minorities(drawn):
  """Per question: (its majority answer, its least frequent parsed answer)."""
  out = {}
  for p, d in zip(PROBLEMS, drawn):
    counts = collections.Counter(a for a in d.answers if a is not None)
    majority = heldout.majority_answer(d.answers)
    minority = min(counts, key=lambda a: (counts[a], -d.answers.index(a)))
    assert counts[minority] < counts[majority]  # The fixture has a real minority.
    out[p["question"]] = (majority, minority)
  return out


def test_weighted_majority_follows_the_verifier_to_a_minority_answer(policy, drawn):
  picks = _minorities(drawn)
  favour = lambda q, s: formatting.parse_answer(s) == picks[q][1]
  orm = FakeVerifier("orm", lambda q, s: 1.0 if favour(q, s) else 0.05)
  for r, p in zip(_run("weighted_majority", policy, orm), PROBLEMS):
    assert r.answer == picks[p["question"]][1] != picks[p["question"]][0]
    assert r.scores == [1.0 if a == r.answer else 0.05 for a in r.answers]
  # A PRM whose last step favours the minority and whose first step condemns it: "last"
  # follows the minority, "min" goes back to the majority (each other vote is 0.05).
  prm = FakeVerifier("prm", lambda q, s: [0.01, 1.0] if favour(q, s) else [0.5, 0.05])
  for aggregation, which in (("last", 1), ("min", 0)):
    for r, p in zip(_run("weighted_majority", policy, prm, aggregation=aggregation),
                    PROBLEMS):
      assert r.answer == picks[p["question"]][which]
      assert r.step_scores == [[0.01, 1.0] if a == picks[p["question"]][1] else [0.5, 0.05]
                               for a in r.answers]
  assert prm.calls == 2  # One verifier call per run, all problems together.


def test_aggregations_are_their_formulas():
  steps = [0.9, 0.5, 0.8]
  agg = aggregation_lib.STEP_AGGREGATIONS
  assert agg["last"](steps) == 0.8
  assert agg["min"](steps) == 0.5
  assert agg["prod"](steps) == pytest.approx(0.9 * 0.5 * 0.8, rel=1e-12)
  assert agg["prod"]([0.5]) == agg["min"]([0.5]) == agg["last"]([0.5]) == 0.5


# Step scores chosen so that each aggregation prefers a different solution:
#   X: last 0.99, min 0.10, prod 0.099;  Y: last 0.8, min 0.8, prod 0.4096;
#   Z: last 0.75, min 0.75, prod 0.7125; anything else 0.05.
TABLE = {"X": [0.1, 0.99], "Y": [0.8, 0.8, 0.8, 0.8], "Z": [0.95, 0.75]}
WINNER = {"last": "X", "min": "Y", "prod": "Z"}
FORMULA = {"last": lambda s: s[-1], "min": min, "prod": math.prod}


def _roles(drawn):
  """Per question: its first three distinct candidate texts as X, Y, Z."""
  roles = {}
  for p, d in zip(PROBLEMS, drawn):
    distinct = list(dict.fromkeys(d.texts))
    assert len(distinct) >= 4  # X, Y, Z and some other candidate.
    roles[p["question"]] = dict(zip(distinct[:3], "XYZ"))
  return roles


def test_best_of_n_picks_the_candidate_each_aggregation_says(policy, drawn):
  roles = _roles(drawn)
  steps_of = lambda q, s: TABLE.get(roles[q].get(s), [0.05])
  prm = FakeVerifier("prm", steps_of)
  for aggregation, winner in WINNER.items():
    results = _run("best_of_n", policy, prm, aggregation=aggregation)
    for r, p in zip(results, PROBLEMS):
      q = p["question"]
      assert roles[q][r.solution] == winner
      assert r.chosen == r.candidates.index(r.solution)  # The first of equal texts.
      assert r.answer == formatting.parse_answer(r.solution)
      assert r.step_scores == [steps_of(q, s) for s in r.candidates]
      np.testing.assert_allclose(
          r.scores, [FORMULA[aggregation](steps_of(q, s)) for s in r.candidates], rtol=1e-12)
  # Under an ORM: the highest outcome score.
  orm = FakeVerifier("orm", lambda q, s: {"X": 0.3, "Y": 0.2, "Z": 0.9}.get(roles[q].get(s), 0.1))
  for r, p in zip(_run("best_of_n", policy, orm), PROBLEMS):
    assert roles[p["question"]][r.solution] == "Z" and max(r.scores) == 0.9


def test_a_solution_without_steps_scores_one_half(policy):
  prm = FakeVerifier("prm", lambda q, s: [])
  for r in _run("best_of_n", policy, prm, budget=N, aggregation="prod"):
    assert r.scores == [0.5] * N and r.chosen == 0


def test_compute_accounting_equals_the_counted_tokens(policy):
  prompts = [TOK.encode(formatting.format_prompt(p["question"])) for p in PROBLEMS]
  direct = sampler.sample(policy.params, prompts, policy.model_cfg, SAMPLING.config(TOK, N),
                          SAMPLING.problems_per_call(N), jax.random.PRNGKey(SEED))
  orm = FakeVerifier("orm", lambda q, s: 0.5)
  results = _run("best_of_n", policy, orm)
  finished = 0
  for r, completions in zip(results, direct):
    assert r.candidates == [TOK.decode(c.tokens) for c in completions]
    assert r.compute.generated_tokens == sum(len(c.tokens) + c.finished for c in completions)
    finished += sum(c.finished for c in completions)
  assert 0 < finished < N * len(PROBLEMS)  # Some ended with EOS (counted), some ran out.
  assert sum(r.compute.verifier_tokens for r in results) == orm.tokens_scored > 0
  seconds = [r.compute.wall_seconds for r in results]
  assert seconds[0] > 0 and len(set(seconds)) == 1  # The call's time, shared out.
  assert core.split_count(10, [1, 1, 1]) == [4, 3, 3]
  assert core.split_count(7, [0, 0]) == [4, 3] and core.split_count(5, [2, 0, 3]) == [2, 0, 3]


def test_best_of_one_is_the_single_sample(policy):
  prompts = [TOK.encode(formatting.format_prompt(p["question"])) for p in PROBLEMS]
  single = sampler.sample(policy.params, prompts, policy.model_cfg, SAMPLING.config(TOK, 1),
                          SAMPLING.problems_per_call(1), jax.random.PRNGKey(SEED))
  orm = FakeVerifier("orm", lambda q, s: 0.7)
  best = _run("best_of_n", policy, orm, budget=1)
  vote = _run("majority", policy, budget=1)
  for b, v, (c,) in zip(best, vote, single):
    assert b.candidates == [b.solution] == [TOK.decode(c.tokens)] == v.candidates
    assert b.chosen == 0 and b.answer == formatting.parse_answer(b.solution)
    assert b.compute.generated_tokens == len(c.tokens) + c.finished


def _one_line(error_type, match, fn):
  with pytest.raises(error_type, match=match) as info:
    fn()
  assert "\n" not in str(info.value)


def test_bad_input_is_one_line(policy):
  orm, prm = FakeVerifier("orm", lambda q, s: 0.5), FakeVerifier("prm", lambda q, s: [0.5])
  run = lambda name="best_of_n", budget=N, verifier=prm, problems=PROBLEMS, **o: (
      core.run_strategy(name, problems, policy, verifier, budget, SEED, **o))
  _one_line(errors.ConfigError, r"^unknown search strategy 'beem'; registered: "
            r"\['beam', 'best_of_n', 'dvts', 'majority', 'mcts', 'revise', 'think_budget', "
            r"'wait', 'weighted_majority'\]$", lambda: run("beem"))
  for budget in (0, -4, 2.5, "8", True, None):
    _one_line(errors.ConfigError, "^search budget .*: expected a positive int$",
              lambda: run(budget=budget))
  _one_line(errors.ConfigError, r"has no option\(s\) \['beam_width'\]; its options: "
            r"\['aggregation', 'sampling'\]$", lambda: run(beam_width=4))
  _one_line(errors.ConfigError, r"^unknown PRM step aggregation 'mean'; registered: "
            r"\['last', 'min', 'prod'\]$", lambda: run(aggregation="mean"))
  _one_line(errors.ConfigError, "an ORM scores whole solutions",
            lambda: run(verifier=orm, aggregation="min"))
  for name in ("best_of_n", "weighted_majority"):
    _one_line(errors.ConfigError, f"^search strategy '{name}' needs a verifier",
              lambda: run(name, verifier=None))
  _one_line(errors.ConfigError, "^verifier kind 'judge'",
            lambda: run(verifier=FakeVerifier("judge", None)))
  _one_line(errors.ConfigError, "^rows_per_call=0", lambda: core.Sampling(rows_per_call=0))
  _one_line(errors.DataError, "^problem 1 has no 'question'$",
            lambda: run(problems=[PROBLEMS[0], {"answer": "1"}]))
  assert prm.tokens_scored == orm.tokens_scored == 0  # Nothing ran.
  assert run(problems=[]) == []


def test_a_real_reward_model_end_to_end(policy, drawn):
  """Random ScalarHead reward models on the policy's tokenizer: best-of-N takes exactly
  their scores, and their token counter, problem by problem."""
  cfg = policy.model_cfg
  params = nn.unbox(heads.init_scalar_head(cfg, jax.random.PRNGKey(1)))
  params["head"] = jax.random.normal(jax.random.PRNGKey(2), params["head"].shape)
  examples = [p for p, d in zip(PROBLEMS, drawn) for _ in d.texts]
  solutions = [t for d in drawn for t in d.texts]
  for kind in ("prm", "orm"):
    verifier = rm.Verifier(params, cfg, TOK, kind, seq_len=24, batch_size=16)
    options = {"aggregation": "min"} if kind == "prm" else {}
    results = _run("best_of_n", policy, verifier, **options)
    counted = verifier.tokens_scored
    if kind == "prm":
      steps = verifier.score_steps(examples, solutions)
      assert any(steps) and not all(steps)  # Both kinds: scored steps, and none (0.5).
      want = [min(s) if s else 0.5 for s in steps]
    else:
      want = verifier.score_outcomes(examples, solutions)
    for i, (r, p, d) in enumerate(zip(results, PROBLEMS, drawn)):
      np.testing.assert_allclose(r.scores, want[i * N:(i + 1) * N], rtol=1e-6)
      assert r.chosen == int(np.argmax(r.scores)) and r.solution == d.texts[r.chosen]
      if kind == "prm":
        assert [len(s) for s in r.step_scores] == [len(s) for s in steps[i * N:(i + 1) * N]]
      # Exact per problem: this tokenizer reads the policy's tokens back unchanged.
      rows = sum(len(rm.encode(p["question"], t, TOK, kind).tokens) for t in d.texts)
      assert r.compute.verifier_tokens == rows
    assert sum(r.compute.verifier_tokens for r in results) == counted


class AnswerReadingPRM(FakeVerifier):
  """A fake PRM trained with an answer read: `score_outcomes` is its read of the answer."""

  answer_read = True

  def __init__(self, steps_fn, answer_fn):
    super().__init__("prm", steps_fn)
    self.answer_fn = answer_fn

  def score_outcomes(self, examples, solutions):
    self.tokens_scored += sum(len(s) + 1 for s in solutions)
    return [self.answer_fn(e["question"], s) for e, s in zip(examples, solutions)]


def test_aggregation_answer_ranks_by_the_prms_answer_read(policy, drawn):
  roles = _roles(drawn)
  answer_of = lambda q, s: {"X": 0.2, "Y": 0.8, "Z": 0.4}.get(roles[q].get(s), 0.1)
  prm = AnswerReadingPRM(lambda q, s: TABLE.get(roles[q].get(s), [0.05]), answer_of)
  for r, p in zip(_run("best_of_n", policy, prm, aggregation="answer"), PROBLEMS):
    assert roles[p["question"]][r.solution] == "Y"
    assert r.scores == [answer_of(p["question"], s) for s in r.candidates]
  weighted = _run("weighted_majority", policy, prm, aggregation="answer")
  assert all(r.scores == [answer_of(p["question"], s) for s in r.candidates]
             for r, p in zip(weighted, PROBLEMS))
  plain = FakeVerifier("prm", lambda q, s: [0.5])
  _one_line(errors.ConfigError, "needs a PRM with an answer read",
            lambda: _run("best_of_n", policy, plain, aggregation="answer"))
  _one_line(errors.ConfigError, "^search strategy 'revise' ranks by step scores",
            lambda: _run("revise", policy, prm, budget=1, aggregation="answer"))
