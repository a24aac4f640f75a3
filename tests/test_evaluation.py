"""Evaluation: pass@k and maj@k against hand-computed values, the metrics of a real run,
and `python -m o3lite.evaluate` on a run folder."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from o3lite.evaluation import heldout as evaluation
from o3lite.data import formatting
from o3lite.data import sources
from o3lite.training import sft as trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),           # c / n.
    (5, 2, 2, 1 - 3 / 10),    # 1 - C(3,2) / C(5,2).
    (5, 0, 3, 0.0),
    (5, 3, 3, 1.0),           # n - c < k: every 3-subset holds a correct sample.
    (10, 1, 5, 0.5),          # 1 - C(9,5) / C(10,5) = 1 - 126 / 252.
])
def test_pass_at_k_hand_values(n, c, k, expected):
  assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_probability_over_subsets():
  """The estimator equals the fraction of k-subsets of the n samples holding a hit."""
  n = 7
  for c in range(n + 1):
    hits = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(hits, k))
      exact = sum(any(s) for s in subsets) / len(subsets)
      assert evaluation.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
      assert len(subsets) == math.comb(n, k)
  with pytest.raises(ValueError, match="pass@8 needs at least 8 samples"):
    evaluation.pass_at_k(4, 1, 8)


def test_majority_answer_and_thinking_length():
  assert evaluation.majority_answer(["5", None, "3", "3", "5"]) == "5"  # Tie: first seen.
  assert evaluation.majority_answer([None, "7", None, None]) == "7"  # None is no vote.
  assert evaluation.majority_answer([None, None]) is None
  assert evaluation.majority_answer([]) is None
  assert evaluation.thinking_length([4, 5, 6, 9, 1], think_end_id=9) == 3
  assert evaluation.thinking_length([4, 5], think_end_id=9) == 2
  assert evaluation._ks(8) == [1, 2, 4, 8] and evaluation._ks(6) == [1, 2, 4, 6]
  assert evaluation._ks(0) == []


def test_metrics_of_a_run_agree_with_its_samples(tiny_run):
  run, params = trainer.load_run(tiny_run)
  eval_cfg = run.config.eval
  with run.config.unlocked():
    eval_cfg.num_samples = 4
    eval_cfg.temperature = 1.0
    eval_cfg.max_new_tokens = 24
    eval_cfg.think_budgets = (2, 24)
  metrics, samples = trainer.evaluate(run, params, "test", 6)
  assert metrics["num_examples"] == len(samples) == 6 and metrics["split"] == "test"
  checker = sources.get_checker(run.config.data)
  # Greedy accuracy, pass@1 and maj@k recomputed from the written samples.
  assert metrics["accuracy"] == pytest.approx(
      sum(s["correct"] for s in samples) / 6)
  for s in samples:
    assert s["answer"] == formatting.parse_answer(s["completion"])
    assert s["correct"] == bool(checker(s["answer"], s["target"]))
    assert len(s["sample_answers"]) == 4
  hit_rates = [sum(bool(checker(a, s["target"])) for a in s["sample_answers"]) / 4
               for s in samples]
  assert metrics["pass@1"] == pytest.approx(sum(hit_rates) / 6)
  assert metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"]
  maj4 = [bool(checker(evaluation.majority_answer(s["sample_answers"]), s["target"]))
          for s in samples]
  assert metrics["maj@4"] == pytest.approx(sum(maj4) / 6)
  assert metrics["mean_thinking_tokens"] <= metrics["mean_completion_tokens"] <= 24
  # A budget as long as the whole completion changes nothing: greedy accuracy again.
  assert metrics["accuracy@think_budget=24"] == metrics["accuracy"]
  assert 0.0 <= metrics["accuracy@think_budget=2"] <= 1.0


def _env():
  return {**os.environ, "XLA_FLAGS": ""}  # One CPU device in the subprocess.


def test_evaluate_cli(tiny_run):
  result = subprocess.run(
      [sys.executable, "-m", "o3lite.evaluate", f"--workdir={tiny_run}", "--split=validation",
       "--num_examples=5", "--num_samples=2", "--think_budgets=3", "--max_new_tokens=16"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(tiny_run, "eval_validation.json")) as f:
    metrics = json.load(f)
  assert metrics["split"] == "validation" and metrics["num_examples"] == 5
  assert {"accuracy", "pass@1", "pass@2", "maj@2", "accuracy@think_budget=3",
          "mean_thinking_tokens"} <= set(metrics)
  with open(os.path.join(tiny_run, "eval_validation_samples.jsonl")) as f:
    assert len(f.readlines()) == 5
  assert "pass@2" in result.stdout and "wrote" in result.stdout
  # The training run's own eval.json came from the same code.
  with open(os.path.join(tiny_run, "eval.json")) as f:
    assert {"accuracy", "parsed_fraction", "mean_thinking_tokens"} <= set(json.load(f)["metrics"])


def test_evaluate_cli_on_a_missing_run(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "o3lite.evaluate", f"--workdir={tmp_path / 'nope'}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"o3lite: RunFolderError: run folder not found: {tmp_path / 'nope'}"]
