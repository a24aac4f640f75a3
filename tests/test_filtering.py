"""Quality filtering of training chains by a reward model, and SFT on what is kept."""

import json
import os

import numpy as np
import pytest

from configs import sft_filtered
from conftest import data_of, set_fields
from o3lite import errors
from o3lite import stages
from o3lite.training import sft as sft_lib
from o3lite.training import stage as stage_lib
from o3lite.verifiers import filtering
from o3lite.verifiers import run as verifier_run


def test_keep_by_threshold_or_best_k_per_question():
  examples = [{"question": q} for q in "aabbbc"]
  scores = [0.2, 0.9, 0.5, 0.7, 0.6, 0.1]
  assert filtering.keep(examples, scores, 0.5) == [1, 2, 3, 4]
  assert filtering.keep(examples, scores, 0.5, best_k=1) == [1, 3, 5]
  assert filtering.keep(examples, scores, 0.0, best_k=2) == [0, 1, 3, 4, 5]


def _config(tiny_run, tiny_prm, **extra):
  return set_fields(sft_filtered.get_config(), {
      **data_of(tiny_run), "data.cot_slip_rate": 0.6, "filter.verifier": tiny_prm,
      "loop.num_steps": 2, "sft.batch_size": 8, "loop.checkpoint_every": 2,
      "data.seq_len": 64, "eval.num_examples": 4, "eval.batch_size": 4,
      "eval.max_new_tokens": 8, **extra})


def test_filtered_sft_trains_on_the_chains_the_prm_keeps(tiny_run, tiny_prm, tmp_path):
  verifier = verifier_run.load_verifier(tiny_prm, 64)
  config = _config(tiny_run, tiny_prm)
  examples = sft_lib.train_examples(config.data)
  examples = [examples[i] for i in range(len(examples))]
  scores = np.asarray(filtering.chain_scores(verifier, examples, "min"))
  threshold = float(np.median(scores))
  config.filter.threshold = threshold
  workdir = str(tmp_path / "filtered")
  result = stages.run(config, workdir)
  with open(os.path.join(workdir, "filter.json")) as f:
    stats = json.load(f)
  assert stats["examples"] == len(examples)
  assert stats["kept"] == int(np.sum(scores >= threshold)) and 0 < stats["kept"] < len(examples)
  # The slipped chains of the training data are found by their exact step labels.
  assert 0.3 < stats["flawed_fraction_before"] < 0.9
  assert result["stage"] == "filtered_sft" and result["step"] == 2
  assert result["metrics"]["num_examples"] == 4
  with pytest.raises(errors.ConfigError, match="filter.score='outcome' needs an ORM"):
    filtering.chain_scores(verifier, examples[:2], "outcome")


def test_filter_config_errors(tiny_run, tiny_prm):
  with pytest.raises(errors.ConfigError, match="is not a verifier run folder"):
    stage_lib.validate(_config(tiny_run, tiny_prm, **{"filter.verifier": tiny_run}))
  with pytest.raises(errors.ConfigError, match="filter.score='mean'"):
    stage_lib.validate(_config(tiny_run, tiny_prm, **{"filter.score": "mean"}))


def test_step_scores_aggregate_by_one_rule_everywhere():
  """Filtering reads a PRM's chains with the same aggregation (and the same score for a
  chain without steps) as search and the verifier's evaluation."""
  from o3lite.verifiers import aggregation  # pylint: disable=g-import-not-at-top

  class FakePRM:
    kind = "prm"

    def score_steps(self, examples, completions):
      return [[0.9, 0.2, 0.6], []][:len(completions)]

  examples = [{"question": "q", "cot": "1+1=2", "answer": "2"}] * 2
  for name, want in (("min", 0.2), ("last", 0.6), ("prod", 0.9 * 0.2 * 0.6)):
    assert filtering.chain_scores(FakePRM(), examples, name) == pytest.approx(
        [want, aggregation.NO_STEPS])
    assert aggregation.aggregate(name, []) == aggregation.NO_STEPS == 0.5
