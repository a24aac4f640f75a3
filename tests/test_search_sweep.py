"""The test-time sweep: strategies x budgets on one policy and PRM, its files, the
difficulty bins and compute-optimal points, and its bad input."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

from configs import test_time
from o3lite import errors
from o3lite import stages
from o3lite.data import tokenizers
from o3lite.search import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(policy, prm, **changes):
  c = test_time.get_config()
  c.init_from, c.prm, c.num_problems, c.difficulty_bins = policy, prm, 6, 2
  c.sampling.max_new_tokens, c.sampling.rows_per_call = 16, 32
  c.strategies = ml_collections.ConfigDict({
      "majority": test_time.entry("majority", "", (1, 4)),
      "prm_best_of_n": test_time.entry("best_of_n", "prm", (4,), aggregation="min"),
      "beam": test_time.entry("beam", "prm", (4,), expand=2, step_tokens=8, max_steps=3),
      "think_budget": test_time.entry("think_budget", "", (4,),
                                       sampling={"temperature": 0.0}),
  })
  for key, value in changes.items():
    c[key] = value
  return c


def test_pareto_keeps_the_points_nothing_beats():
  points = [(10, 0.5, "a"), (20, 0.4, "b"), (20, 0.7, "c"), (40, 0.7, "d"), (80, 0.9, "e")]
  assert sweep.pareto(points) == ["a", "c", "e"]


def test_sweep_writes_its_table_and_plots(tiny_run, tiny_prm, tmp_path):
  workdir = str(tmp_path / "sweep")
  result = stages.run(_config(tiny_run, tiny_prm), workdir)
  with open(os.path.join(workdir, "test_time.json")) as f:
    saved = json.load(f)
  assert saved["num_problems"] == 6
  got = [(r["label"], r["budget"]) for r in saved["records"]]
  assert sorted(got) == sorted([("majority", 1), ("majority", 4), ("prm_best_of_n", 4),
                                ("beam", 4), ("think_budget", 4)])
  for r in saved["records"]:
    assert r["accuracy"] == pytest.approx(sum(r["correct"]) / 6)
    assert r["generated_tokens"] > 0
    assert (r["verifier_tokens"] > 0) == (r["verifier"] == "prm")
  majority = {r["budget"]: r for r in saved["records"] if r["label"] == "majority"}
  assert majority[4]["generated_tokens"] > majority[1]["generated_tokens"]
  # Difficulty: pass@1 from majority's 4 samples per problem, two quantile bins.
  assert saved["pass_at_1"] == majority[4]["candidate_accuracy"]
  assert sum(b["problems"] for b in saved["bins"]) == 6
  for b in saved["bins"]:  # (The tiny policy is never right: one bin may be empty.)
    assert bool(b["compute_optimal"]) == (b["problems"] > 0)
  text = open(os.path.join(workdir, "test_time.md")).read()
  assert "| beam | prm | 4 |" in text and "compute-optimal" in text
  for name in ("test_time.png", "test_time_difficulty.png"):
    assert open(os.path.join(workdir, name), "rb").read(4) == b"\x89PNG"
  # The harness's result file: each strategy's accuracy at each budget.
  assert result["stage"] == "test_time" and result["metrics"]["num_problems"] == 6
  assert result["metrics"]["accuracy"]["majority@4"] == majority[4]["accuracy"]


def test_sweep_bad_input(tiny_run, tiny_prm, tmp_path):
  bad = _config(tiny_run, tiny_prm)
  bad.strategies.beam.budgets = (4, 0)
  with pytest.raises(errors.ConfigError, match="strategies.beam.budgets: 0 is not a positive"):
    stages.run(bad, str(tmp_path / "a"))
  bad = _config(tiny_run, tiny_prm)
  bad.strategies.beam.strategy = "beem"
  with pytest.raises(errors.ConfigError, match="unknown search strategy 'beem'"):
    stages.run(bad, str(tmp_path / "b"))
  # A PRM whose tokenizer is not the policy's.
  other = str(tmp_path / "other_prm")
  shutil.copytree(tiny_prm, other)
  tokenizers.train_sentencepiece(["abc def 123\n"] * 50, 24,
                                 os.path.join(other, "tokenizer", "tokenizer"))
  with pytest.raises(errors.ConfigError, match=f"^prm={other}: its tokenizer differs"):
    stages.run(_config(tiny_run, other), str(tmp_path / "c"))


def test_evaluate_cli_runs_a_sweep_config_and_reports_bad_input(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "o3lite.evaluate", "--config=configs/test_time.py",
       f"--workdir={tmp_path / 'w'}", "--config.num_problems=0"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
      text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "o3lite: ConfigError: num_problems and difficulty_bins must be at least 1")
