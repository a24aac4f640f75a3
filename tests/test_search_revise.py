"""Sequential revision on a tiny random policy and a fake PRM: each revision keeps the
solution up to its first low step and regenerates the rest, the rounds stop when every
step passes or the budget is spent, the answer rules, the compute, and bad input."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.search import core, revise
from o3lite.verifiers import steps as steps_lib
from test_search_voting import FakeVerifier, PROBLEMS, TOK

BUDGET, SEED = 3, 0
SAMPLING = core.Sampling(max_new_tokens=16, temperature=1.0, rows_per_call=16)


def _low_on_two(question, solution):
  """A fake PRM: a step that writes "</think>2" is wrong (0.1), any other is right (0.9)."""
  return [0.1 if "</think>2" in s.text else 0.9
          for s in steps_lib.split_completion(solution)]


@pytest.fixture(scope="module")
def policy():
  cfg = model_lib.ModelConfig.tiny(vocab_size=TOK.vocab_size)
  return core.Policy(nn.unbox(model_lib.init_params(cfg, jax.random.key(0))), cfg, TOK)


def _run(policy, verifier, budget=BUDGET, **options):
  return core.run_strategy("revise", PROBLEMS, policy, verifier, budget, SEED,
                           sampling=SAMPLING, **options)


def test_first_below():
  assert revise.first_below([0.9, 0.4, 0.2], 0.5) == 1
  assert revise.first_below([0.9, 0.5], 0.5) is None  # At the threshold passes.
  assert revise.first_below([0.3], 0.5) == 0
  assert revise.first_below([], 0.5) is None


def test_revise_regenerates_from_the_first_low_step(policy):
  prm = FakeVerifier("prm", _low_on_two)
  results = _run(policy, prm)
  y0 = core.draw(PROBLEMS, policy, 1, SEED, SAMPLING)  # Best-of-N's first sample.
  rounds, changed = [], 0
  for r, d in zip(results, y0):
    chain = [level[0] for level in r.tree]
    assert [n["text"] for n in chain] == r.candidates and chain[0]["text"] == d.texts[0]
    assert [n["parent"] for n in chain] == [-1] + [0] * (len(chain) - 1)
    rounds.append(len(chain) - 1)
    assert rounds[-1] <= BUDGET
    for before, after in zip(chain, chain[1:]):
      # Revised only where a step was low; the kept text is everything before that step.
      j = before["first_low"]
      steps = steps_lib.split_completion(before["text"])
      assert j == next(i for i, s in enumerate(_low_on_two(None, before["text"])) if s < 0.5)
      kept = before["kept"]
      assert before["text"].startswith(kept) and after["text"].startswith(kept)
      assert (steps[j - 1].end if j else 0) <= len(kept) <= steps[j].start
      assert before["steps"][:j] == [0.9] * j  # The kept steps all pass, and stay.
      changed += after["text"][len(kept):] != before["text"][len(kept):]
    last = chain[-1]
    # Stopped because every step passed, or because the budget ran out.
    assert (last["first_low"] is None) or rounds[-1] == BUDGET
    assert last["kept"] is None
    if last["first_low"] is None:
      assert min(last["steps"], default=1.0) >= 0.5
    # The record: every revision's step scores; the answer is the last revision.
    assert r.step_scores == [_low_on_two(None, t) for t in r.candidates]
    assert r.scores == [(s or [0.5])[-1] for s in r.step_scores]
    assert r.chosen == len(chain) - 1 and r.solution == chain[-1]["text"]
    # Generated: y_0 (its EOS counted when it had one) + each regenerated tail.
    tails = sum(len(TOK.encode(a["text"])) - len(TOK.encode(a_before["kept"]))
                for a_before, a in zip(chain, chain[1:]))
    assert (d.generated_tokens[0] + tails <= r.compute.generated_tokens
            <= d.generated_tokens[0] + tails + len(chain) - 1)
  assert 0 in rounds and max(rounds) >= 2  # Some passed at once, some were revised twice.
  assert changed >= 2  # Regenerated tails really differ from the ones they replace.
  assert prm.calls == max(rounds) + 1  # One verifier call per round, all problems at once.
  assert sum(r.compute.verifier_tokens for r in results) == prm.tokens_scored


def test_the_budget_caps_the_rounds_and_best_picks_the_best_scored(policy):
  one = _run(policy, FakeVerifier("prm", _low_on_two), budget=1)
  three = _run(policy, FakeVerifier("prm", _low_on_two))
  for a, b in zip(one, three):
    assert len(a.tree) <= 2 and a.candidates == b.candidates[:len(a.candidates)]
  # A PRM that likes short steps (every step here scores below 0.2): revisions run to the
  # budget, and the best of them by its shortest step is often not the last.
  by_length = lambda q, s: [1.0 / (1 + len(x.text)) for x in steps_lib.split_completion(s)]
  last = _run(policy, FakeVerifier("prm", by_length), threshold=0.2, aggregation="min")
  best = _run(policy, FakeVerifier("prm", by_length), threshold=0.2, aggregation="min",
              answer="best")
  for b, c in zip(last, best):
    assert c.candidates == b.candidates  # The same revisions, another choice.
    assert c.scores == [min(s) if s else 0.5 for s in c.step_scores]
    assert c.chosen == int(np.argmax(c.scores)) and b.chosen == len(b.candidates) - 1
  assert any(c.chosen != b.chosen for b, c in zip(last, best))


def test_a_prm_that_passes_everything_revises_nothing(policy):
  prm = FakeVerifier("prm", lambda q, s: [0.9] * len(steps_lib.split_completion(s)))
  single = core.run_strategy("best_of_n", PROBLEMS, policy, FakeVerifier("orm", lambda q, s: 0.5),
                             1, SEED, sampling=SAMPLING)
  for r, s in zip(_run(policy, prm), single):
    assert r.candidates == s.candidates and len(r.tree) == 1
    assert r.compute.generated_tokens == s.compute.generated_tokens
  assert prm.calls == 1


def test_revise_bad_input(policy):
  prm, orm = FakeVerifier("prm", _low_on_two), FakeVerifier("orm", lambda q, s: 0.5)

  def one_line(match, fn):
    with pytest.raises(errors.ConfigError, match=match) as info:
      fn()
    assert "\n" not in str(info.value)

  one_line("^search strategy 'revise' needs a verifier", lambda: _run(policy, None))
  one_line("finds the first low step: it needs a PRM", lambda: _run(policy, orm))
  for threshold in (0.0, -0.5, 1.5):
    one_line(rf"threshold={threshold} must be in \(0, 1\]",
             lambda: _run(policy, prm, threshold=threshold))
  one_line(r"answer='first': expected one of \['last', 'best'\]",
           lambda: _run(policy, prm, answer="first"))
  one_line("unknown PRM step aggregation 'mean'", lambda: _run(policy, prm, aggregation="mean"))
  one_line("^search budget 0: expected a positive int$", lambda: _run(policy, prm, budget=0))
  assert prm.tokens_scored == orm.tokens_scored == 0  # Nothing ran.
