"""Reward models: their rows, losses, metrics, the verifier run end to end, bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import PieceTokenizer, set_fields
from o3lite import errors
from o3lite import stages
from o3lite.data import formatting
from o3lite.model import transformer as model_lib
from o3lite.training import losses
from o3lite.verifiers import label_files, metrics, reward_model as rm
from o3lite.verifiers import run as verifier_run
from o3lite.verifiers import verifier_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tokens are pieces of several characters (merged "=7\n" style), as a real tokenizer's.
_PIECES = ["<pad>", "</s>", "<think>", "</think>", "=7\n", "=4\n", "3+4", "7*2", "4-1", "=3",
           "3 +4 *2 -1 mod 10", "\n", "3", "4", "=5\n", "5-1", "=4"]
_PieceTokenizer = lambda: PieceTokenizer(_PIECES, keep_pad=False)
QUESTION = "3 +4 *2 -1 mod 10"
RIGHT = formatting.format_completion("3+4=7\n7*2=4\n4-1=3", "3")


def test_prm_reads_each_steps_last_token_and_orm_the_eos():
  tok = _PieceTokenizer()
  e = rm.encode(QUESTION, RIGHT, tok, "prm", labels=[1, 1, None])
  prompt = len(tok.encode(formatting.format_prompt(QUESTION)))
  assert e.tokens[-1] == tok.eos_id and e.tokens[:prompt] == tok.encode(QUESTION + "\n")
  # Each read is the token that completes the step's text ("=7\n" ends "3+4=7").
  for read, step in zip(e.reads, ["3+4=7", "7*2=4", "4-1=3"]):
    text = tok.decode(e.tokens[prompt:read + 1])
    assert text.rstrip("\n").endswith(step)
    assert not tok.decode(e.tokens[prompt:read]).rstrip("\n").endswith(step)
  assert e.labels == [1, 1, None]
  o = rm.encode(QUESTION, RIGHT, tok, "orm", labels=[0.0])
  assert o.reads == [len(o.tokens) - 1] and o.labels == [0.0]
  batch = rm.rows([e, o], 24, tok.pad_id)
  assert batch["label_mask"][0].sum() == 2 and batch["labels"][0, e.reads[0]] == 1
  assert batch["label_mask"][0, e.reads[2]] == 0  # Unlabelled step: no loss there.
  assert batch["label_mask"][1, o.reads[0]] == 1 and batch["labels"][1].sum() == 0
  assert (batch["segment_ids"][0] > 0).sum() == len(e.tokens)
  with pytest.raises(errors.ConfigError, match="does not fit the verifier's seq_len 8"):
    rm.rows([e], 8, tok.pad_id)
  with pytest.raises(errors.DataError, match="2 labels for 3 steps"):
    rm.encode(QUESTION, RIGHT, tok, "prm", labels=[1, 1])
  with pytest.raises(errors.DataError, match="step 0 .* is not in the solution"):
    rm.encode(QUESTION, RIGHT, tok, "prm", steps=["9+9=9"])


def _tiny_model():
  cfg = model_lib.ModelConfig.tiny()
  cfg = model_lib.ModelConfig(**{**cfg.__dict__, "vocab_size": 32})
  from o3lite.model import heads
  import flax.linen as nn
  params = nn.unbox(heads.init_scalar_head(cfg, jax.random.PRNGKey(0)))
  params["head"] = jax.random.normal(jax.random.PRNGKey(1), params["head"].shape)
  return cfg, params


def test_losses_are_their_formulas():
  cfg, params = _tiny_model()
  tok = _PieceTokenizer()
  a = rm.encode(QUESTION, RIGHT, tok, "prm", labels=[1, 0.25, 0])
  b = rm.encode(QUESTION, RIGHT, tok, "prm", labels=[None, 1, 1])
  batch = rm.rows([a, b], 24, tok.pad_id)
  z = np.asarray(rm.logits(params, batch, cfg), np.float64)  # The reference in fp64.
  out = losses.get_loss("verifier_bce", cfg)({"verifier": params}, {}, batch)
  want, n = 0.0, 0
  for row, e in enumerate([a, b]):
    for t, y in zip(e.reads, e.labels):
      if y is not None:
        p = 1 / (1 + np.exp(-z[row, t]))
        want += -(y * np.log(p) + (1 - y) * np.log(1 - p))
        n += 1
  np.testing.assert_allclose(float(out.loss_sum), want, rtol=1e-5)
  assert float(out.count) == n == 5
  # Bradley-Terry: -log sigmoid(r_chosen - r_rejected) at the EOS reads.
  c = rm.encode(QUESTION, RIGHT, tok, "orm")
  r = rm.encode(QUESTION, formatting.format_completion("3+4=7\n7*2=5\n5-1=4", "4"), tok, "orm")
  pair = rm.pair_rows([c, r], [r, c], 24, tok.pad_id)
  bt = losses.get_loss("verifier_bradley_terry", cfg)({"verifier": params}, {}, pair)
  zc = np.asarray(rm.logits(params, pair, cfg), np.float64)
  zr = np.asarray(rm.logits(params, pair, cfg, "rejected_"), np.float64)
  m = [zc[0, c.reads[0]] - zr[0, r.reads[0]], zc[1, r.reads[0]] - zr[1, c.reads[0]]]
  np.testing.assert_allclose(float(bt.loss_sum), sum(np.log1p(np.exp(-x)) for x in m),
                             rtol=1e-5)
  assert float(bt.count) == 2


def test_verifier_scores_do_not_depend_on_the_batch():
  cfg, params = _tiny_model()
  tok = _PieceTokenizer()
  ex = {"question": QUESTION, "answer": "3"}
  wrong = formatting.format_completion("3+4=7\n7*2=5\n5-1=4", "4")
  v = rm.Verifier(params, cfg, tok, "prm", seq_len=24, batch_size=2)
  together = v.score_steps([ex] * 3, [RIGHT, wrong, RIGHT])
  alone = [v.score_steps([ex], [s])[0] for s in (RIGHT, wrong)]
  np.testing.assert_allclose(together[0], alone[0], rtol=1e-5)
  np.testing.assert_allclose(together[1], alone[1], rtol=1e-5)
  assert len(together[0]) == 3 and together[0] == together[2]
  # The first step reads the same prefix in both solutions: the same score.
  assert together[0][0] == pytest.approx(together[1][0], abs=1e-6)
  assert v.score_outcomes([ex], [wrong]) == [pytest.approx(together[1][-1], abs=1e-6)]
  assert v.tokens_scored > 0
  with pytest.raises(errors.ConfigError, match="scores whole solutions"):
    rm.Verifier(params, cfg, tok, "orm", 24).score_steps([ex], [RIGHT])


def test_a_prm_with_an_answer_read_also_judges_the_answer():
  cfg, params = _tiny_model()
  tok = _PieceTokenizer()
  e = rm.encode(QUESTION, RIGHT, tok, "prm", labels=[1, 1, 0], answer_read=True,
                answer_label=1.0)
  plain = rm.encode(QUESTION, RIGHT, tok, "prm", labels=[1, 1, 0])
  assert e.reads == plain.reads + [len(e.tokens) - 1] and e.labels == [1, 1, 0, 1.0]
  record = label_files.LabelledSolution(QUESTION, "3", RIGHT, ["3+4=7", "7*2=4", "4-1=3"],
                                        [1, 1, 1], metadata={"outcome": 0})
  (row,) = verifier_data.encode_records([record], tok, "prm", answer_read=True)
  assert row.reads == e.reads and row.labels == [1, 1, 1, 0.0]
  with pytest.raises(errors.DataError, match="has no 'outcome'.*answer read"):
    verifier_data.encode_records([dataclasses.replace(record, metadata={})], tok, "prm",
                                 answer_read=True)
  ex = {"question": QUESTION, "answer": "3"}
  v = rm.Verifier(params, cfg, tok, "prm", seq_len=24, answer_read=True)
  reads = v._probabilities([e])[0]
  assert v.score_steps([ex], [RIGHT]) == [reads[:3]]  # Steps: the same three reads.
  assert v.score_outcomes([ex], [RIGHT]) == [reads[3]]  # The answer: the EOS read.
  assert rm.Verifier(params, cfg, tok, "prm", 24).score_steps([ex], [RIGHT]) == [
      pytest.approx(reads[:3], rel=1e-5)]
  with pytest.raises(errors.ConfigError, match="an ORM reads only the answer"):
    rm.Verifier(params, cfg, tok, "orm", 24, answer_read=True)


def test_auc_and_step_metrics_on_known_cases():
  rng = np.random.default_rng(0)
  s, y = rng.random(200), rng.random(200) < 0.4
  s[:20] = 0.5  # Ties.
  brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
  assert metrics.auc(s, y) == pytest.approx(brute)
  assert np.isnan(metrics.auc([0.1, 0.2], [1, 1]))
  scores = [[0.9, 0.2, 0.1], [0.8, 0.7], [0.3, 0.9]]
  labels = [[1, 0, 0], [1, 1], [1, None]]
  m = metrics.step_metrics(scores, labels)
  # Wrong steps: 2 (both found); predicted wrong: 3 (one false alarm).
  assert m["steps"] == 6 and m["wrong_steps"] == 2
  assert m["error_recall"] == 1.0 and m["error_precision"] == pytest.approx(2 / 3)
  assert m["error_f1"] == pytest.approx(0.8) and m["accuracy"] == pytest.approx(5 / 6)
  f = metrics.first_error_f1(scores, labels)
  # With an error: [1, 0, 0] found at 1. Without: [1, 1] right (-1), [1, None] wrong (0).
  assert (f["error_accuracy"], f["correct_accuracy"]) == (1.0, 0.5)
  assert f["f1"] == pytest.approx(2 * 0.5 / 1.5)
  assert metrics.first_error_f1(scores + [[]], labels + [[]]) == f  # No steps: left out.


def test_calibration_and_its_plot(tmp_path):
  p = [0.05, 0.15, 0.95, 0.9, 0.55]
  y = [0, 0, 1, 0, 1]
  c = metrics.calibration(p, y, bins=10)
  # Bins: [0,.1) 0.05 -> 0; [.1,.2) 0.15 -> 0; [.5,.6) 0.55 -> 1; [.9,1] {0.95, 0.9} -> 1/2.
  want = (abs(0 - 0.05) + abs(0 - 0.15) + abs(1 - 0.55) + 2 * abs(0.5 - 0.925)) / 5
  assert c["ece"] == pytest.approx(want) and c["accuracy"] == pytest.approx(4 / 5)
  assert sum(b["count"] for b in c["bins"]) == 5
  path = tmp_path / "r.png"
  metrics.reliability_plot(c, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _verifier_config(data_dir, **overrides):
  from configs import prm
  c = prm.get_config()
  values = {"data.data_dir": data_dir, "data.num_train": 400, "data.num_validation": 20,
            "data.num_test": 40, "policy.loop.num_steps": 20, "policy.sft.batch_size": 16,
            "policy.loop.checkpoint_every": 20, "eval.num_examples": 8, "eval.batch_size": 8,
            "verifier.num_problems": 12, "verifier.eval_problems": 8,
            "verifier.samples_per_problem": 2, "verifier.sample_batch_size": 8,
            "verifier.monte_carlo.k": 2, "verifier.monte_carlo.batch_size": 8,
            "loop.num_steps": 6, "verifier.batch_size": 8, "loop.log_every": 3,
            "loop.checkpoint_every": 3, "verifier.eval_batch_size": 8, **overrides}
  return set_fields(c, values)


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("prm")
  workdir = str(root / "run")
  config = _verifier_config(str(root / "data"))
  result = stages.run(config, workdir)
  return workdir, config, result


def test_prm_run_makes_a_policy_labels_trains_and_judges(prm_run):
  workdir, config, result = prm_run
  assert os.path.isfile(os.path.join(workdir, "policy", "eval.json"))
  train = label_files.read_labelled(os.path.join(workdir, "labels", "train.jsonl"))
  held_out = label_files.read_labelled(os.path.join(workdir, "labels", "eval.jsonl"))
  stats = json.load(open(os.path.join(workdir, "labels", "train_stats.json")))
  assert len(train) == 12 * 2 - stats["dropped_solutions"] and len(train) >= 12
  assert len(held_out) >= 8
  assert all(r.metadata["labeller"] == "monte_carlo" and r.soft_labels is not None
             for r in train)
  assert all(r.metadata["labeller"] == "exact" for r in held_out)
  with open(os.path.join(workdir, "eval.json")) as f:
    whole = json.load(f)
  assert whole["stage"] == "verifier" and whole["step"] == 6
  assert json.dumps(whole) == json.dumps(result)  # (NaN where a metric has no cases.)
  assert whole["train_solutions"] == len(train)
  saved = whole["metrics"]
  assert saved["kind"] == "prm" and saved["solutions"] == len(held_out)
  assert saved["step"]["steps"] >= len(held_out)
  assert 0 <= saved["first_error"]["f1"] <= 1
  assert set(saved["outcome"]) == {"last", "min"}
  assert open(os.path.join(workdir, "reliability.png"), "rb").read(4) == b"\x89PNG"
  # The saved verifier scores the held-out solutions as the run judged them.
  verifier = verifier_run.load_verifier(workdir)
  again = verifier_run.evaluate(verifier, held_out, config.verifier.threshold)
  assert json.dumps(again["step"]) == json.dumps(saved["step"])


def test_orm_trains_on_a_given_labelled_file_and_reuses_the_policy(prm_run, tmp_path):
  workdir, config, _ = prm_run
  records = label_files.read_labelled(os.path.join(workdir, "labels", "train.jsonl"))
  given = str(tmp_path / "given.jsonl")
  label_files.write_labelled(given, records)
  orm = _verifier_config(config.data.data_dir, **{
      "verifier.kind": "orm", "verifier.loss": "bradley_terry",
      "init_from": os.path.join(workdir, "policy"), "verifier.labels": given,
      "verifier.eval_labels": os.path.join(workdir, "labels", "eval.jsonl")})
  if not any(r.metadata["outcome"] for r in records):  # The tiny policy is always wrong.
    with pytest.raises(errors.DataError, match="no question with both a correct and a wrong"):
      stages.run(orm, str(tmp_path / "no_pairs"))
  seen = set()
  for r in records:  # Outcomes as a labelled file may bring them: one right per question.
    r.metadata["outcome"] = int(r.question not in seen)
    seen.add(r.question)
  label_files.write_labelled(given, records)
  orm = _verifier_config(config.data.data_dir, **{
      "verifier.kind": "orm", "verifier.loss": "bradley_terry",
      "init_from": os.path.join(workdir, "policy"), "verifier.labels": given,
      "verifier.eval_labels": os.path.join(workdir, "labels", "eval.jsonl")})
  out = stages.run(orm, str(tmp_path / "orm"))["metrics"]
  assert not os.path.exists(tmp_path / "orm" / "policy")
  assert not os.path.exists(tmp_path / "orm" / "labels")
  assert out["kind"] == "orm" and 0 <= out["outcome"]["ece"] <= 1


def _cli(tmp_path, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "o3lite.train", "--config=configs/prm.py",
                         f"--workdir={tmp_path / 'run'}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_missing_policy_run_is_a_one_line_error(tmp_path):
  out = _cli(tmp_path, f"--config.init_from={tmp_path / 'no_such_run'}")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      f"o3lite: ConfigError: init_from={tmp_path / 'no_such_run'} does not exist")
  # The field it replaced names the new one.
  out = _cli(tmp_path, f"--config.verifier.policy={tmp_path}")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "o3lite: config error: verifier.policy was replaced by init_from (a run folder or a "
      "local Hugging Face folder)")


def test_bad_labelled_file_is_an_error_naming_file_and_line(prm_run, tmp_path):
  workdir, config, _ = prm_run
  lines = open(os.path.join(workdir, "labels", "train.jsonl")).read().splitlines()
  record = json.loads(lines[0])
  record["labels"][0] = 1.5
  bad = tmp_path / "bad.jsonl"
  bad.write_text(lines[1] + "\n" + json.dumps(record) + "\n")
  given = _verifier_config(config.data.data_dir, **{
      "init_from": os.path.join(workdir, "policy"), "verifier.labels": str(bad),
      "verifier.eval_labels": os.path.join(workdir, "labels", "eval.jsonl")})
  with pytest.raises(errors.DataError, match=f"^{bad}:2: labels\\[0\\] = 1.5 is not a "
                     r"number in \[0, 1\]"):
    stages.run(given, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # Checked before training.


def test_a_run_folder_from_before_a_setting_existed_reruns_with_it_off(tmp_path):
  from configs import prm as prm_config  # pylint: disable=g-import-not-at-top
  from o3lite.training import run_folder  # pylint: disable=g-import-not-at-top
  config = prm_config.get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["verifier"]["answer_read"]  # A PRM run made before the answer read existed.
  (tmp_path / run_folder.CONFIG_FILE).write_text(json.dumps(saved))
  cfg = model_lib.ModelConfig.tiny()
  fields = ("verifier.kind", "verifier.answer_read")
  run_folder.check_rerun(str(tmp_path), config, cfg, fields)  # Off: the same run.
  config.verifier.answer_read = True
  with pytest.raises(errors.RunFolderError, match="verifier.answer_read=True"):
    run_folder.check_rerun(str(tmp_path), config, cfg, fields)
  config.verifier.answer_read, config.verifier.kind = False, "orm"
  with pytest.raises(errors.RunFolderError, match="verifier.kind='orm'"):
    run_folder.check_rerun(str(tmp_path), config, cfg, fields)
