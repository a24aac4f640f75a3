"""Budget forcing (s1) as search strategies: the cap and the "Wait" floor on thinking."""

import flax.linen as nn
import jax
import pytest

from conftest import PieceTokenizer
from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.search import core


TOK = PieceTokenizer(["\t", "</s>", "</think>", "\n", "1", "2", "3", " "], think_end_id=2)
PROBLEMS = [{"question": q, "answer": "1"} for q in ["1 2", "3", "2 2 1", "1"]]


@pytest.fixture(scope="module")
def policy():
  cfg = model_lib.ModelConfig.tiny(vocab_size=TOK.vocab_size)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(3)))
  # Make </think> likely, so that the cap and the floor both have work to do.
  params["embedding"] = params["embedding"].at[TOK.think_end_id].multiply(4.0)
  return core.Policy(params, cfg, TOK)


def _thinking(text):
  """Thinking tokens: those before </think> (all of them if it never closed)."""
  return len(TOK.encode(text.split("</think>")[0]))


def test_think_budget_caps_and_wait_extends_the_thinking(policy):
  sampling = core.Sampling(max_new_tokens=24, temperature=1.0, rows_per_call=4)
  free = core.run_strategy("majority", PROBLEMS, policy, None, 1, 0, sampling=sampling)
  lengths = [_thinking(r.solution) for r in free]
  assert any(n > 3 for n in lengths) and any(n < 6 for n in lengths)  # Both have work.
  capped = core.run_strategy("think_budget", PROBLEMS, policy, None, 3, 0, sampling=sampling)
  for r in capped:
    assert _thinking(r.solution) <= 3 and r.compute.verifier_tokens == 0
  extended = core.run_strategy("wait", PROBLEMS, policy, None, 6, 0, sampling=sampling)
  for r in extended:  # No </think> or EOS before 6 thinking tokens.
    assert _thinking(r.solution) >= 6


def test_budget_forcing_bad_input(policy):
  with pytest.raises(errors.ConfigError, match="expected a positive int"):
    core.run_strategy("think_budget", PROBLEMS, policy, None, 0, 0)
  with pytest.raises(errors.ConfigError, match="encodes to no tokens"):
    core.run_strategy("wait", PROBLEMS, policy, None, 4, 0, wait="")
