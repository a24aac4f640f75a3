"""RL: rollout batches, reward isolation, the learner on a mesh, end-to-end PPO and GRPO
runs, and resume after SIGKILL."""

import json
import os
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest

from configs import rl as rl_config
from o3lite import errors
from o3lite import stages
from o3lite.data import batching as pipeline
from o3lite.parallel import mesh as sharding_lib
from o3lite.rl import algorithms as alg
from o3lite.rl import rewards as rewards_lib
from o3lite.rl import run as rl_trainer
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import losses
from o3lite.training import run_folder
from o3lite.training import sft as sft_lib
from o3lite.training import stage as stage_lib
from o3lite.training import step as step_lib
from conftest import set_fields
import sigkill  # tests/sigkill.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rollout_batch_layout():
  batch = pipeline.rollout_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [True, False],
                                 seq_len=8, eos_id=1, pad_id=0)
  assert batch["inputs"].shape == (2, 7)
  assert batch["inputs"][0].tolist() == [5, 6, 7, 9, 10, 0, 0]
  assert batch["targets"][0].tolist() == [6, 7, 9, 10, 1, 0, 0]
  assert batch["mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0]  # 9, 10 and EOS.
  assert batch["targets"][1].tolist() == [11, 12, 13, 0, 0, 0, 0]
  assert batch["mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]  # Unfinished: no EOS.
  assert batch["segment_ids"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
  with pytest.raises(errors.O3liteError, match="exceed rl seq_len 4"):
    pipeline.rollout_batch([[5, 6, 7]], [[9, 10]], [True], 4, 1, 0)


# The reward context of these tests: the answer checker is string equality.
EQUAL = rewards_lib.RewardContext(lambda answer, target: answer == target)


def _examples(n, **metadata):
  return [{"question": f"q{i}", "cot": "", "answer": "2", **metadata} for i in range(n)]


def test_rewards_and_a_reward_function_that_raises_or_hangs():
  scorer = rewards_lib.RewardScorer({"correctness": 1.0, "format": 0.5}, EQUAL)
  texts = ["<think>1+1=2</think>2", "<think>1+1=3</think>3", "<think>1+1", "2"]
  scores = scorer.score(_examples(4), texts, [5, 5, 3, 1], max_tokens=10)
  assert scores.parts["correctness"].tolist() == [1.0, 0.0, 0.0, 0.0]
  assert scores.parts["format"].tolist() == [1.0, 1.0, 0.0, 0.0]
  assert scores.total.tolist() == [1.5, 0.5, 0.0, 0.0]
  assert scores.total.dtype == np.float32
  assert scores.failures == scores.timeouts == 0
  assert rewards_lib.length_penalty({}, "", num_tokens=5, max_tokens=10) == -0.5

  table = rewards_lib.RewardRegistry()

  @table.register("raises")
  def raises(example, completion, **_):
    if "boom" in completion:
      raise RuntimeError("reward bug")
    return float("nan") if "nan" in completion else 1.0

  release = threading.Event()

  @table.register("hangs")
  def hangs(example, completion, **_):
    if "slow" in completion:
      release.wait(5)
    return 1.0

  scorer = rewards_lib.RewardScorer({"raises": 1.0, "hangs": 1.0}, EQUAL, timeout_s=0.2,
                                    rewards=table)
  scores = scorer.score(_examples(5), ["ok", "boom", "slow", "ok", "nan"], [1] * 5, 1)
  # A call that raises or returns NaN scores 0; the other function still counts.
  assert scores.total.tolist() == [2.0, 1.0, 1.0, 2.0, 1.0]
  assert scores.failures == 2 and scores.timeouts == 1
  release.set()
  scorer.close()
  with pytest.raises(errors.O3liteError, match=r"unknown reward function\(s\) \['corectness'\]"):
    rewards_lib.RewardScorer({"corectness": 1.0}, EQUAL)


def test_a_reward_function_reads_the_question_and_the_metadata():
  table = rewards_lib.RewardRegistry()

  @table.register("cites_spec")
  def cites_spec(example, completion, *, checker, num_tokens, max_tokens, **_):
    assert checker("a", "a") and max_tokens == 8
    return float(example["spec"] in completion) + num_tokens / 100 + (
        example["question"] == "q1")

  examples = _examples(2, spec="rule 7")
  scores = rewards_lib.RewardScorer({"cites_spec": 2.0}, EQUAL,
                                    rewards=table).score(
      examples, ["by rule 7", "no rule"], [3, 5], max_tokens=8)
  np.testing.assert_array_equal(scores.parts["cites_spec"], np.float32([1.03, 1.05]))
  np.testing.assert_array_equal(scores.total, np.float32([2.06, 2.1]))
  assert scores.failures == scores.timeouts == 0


def test_a_batched_reward_function_scores_a_round_in_one_call():
  table = rewards_lib.RewardRegistry()
  calls = []

  @table.register("judge", batched=True)
  def judge(examples, completions, *, checker, num_tokens, max_tokens, **_):
    calls.append((examples, completions, num_tokens, max_tokens))
    if "boom" in completions:
      raise RuntimeError("judge down")
    if "short" in completions:
      return [1.0] * (len(completions) - 1)
    return [float(len(c)) if c != "nan" else float("nan") for c in completions]

  table.register("format")(rewards_lib.format_reward)
  assert table.batched == {"judge"}
  scorer = rewards_lib.RewardScorer({"judge": 1.0, "format": 1.0}, EQUAL,
                                    rewards=table)
  assert scorer.batched == {"judge"}
  examples = _examples(3)
  scores = scorer.score(examples, ["a", "bb", "ccc"], [1, 2, 3], max_tokens=4)
  assert scores.parts["judge"].tolist() == [1.0, 2.0, 3.0]
  assert calls == [(examples, ["a", "bb", "ccc"], [1, 2, 3], 4)]  # One call for all.
  assert scores.failures == scores.timeouts == 0
  # A batched call that raises or returns a wrong count fails all its completions; a
  # non-finite entry only its own. The other functions still count.
  for texts, failures, judged in [(["a", "boom"], 2, [0.0, 0.0]),
                                  (["a", "short"], 2, [0.0, 0.0]),
                                  (["a", "nan"], 1, [1.0, 0.0])]:
    scores = scorer.score(examples[:2], texts, [1, 1], 4)
    assert scores.parts["judge"].tolist() == judged and scores.failures == failures
    assert scores.parts["format"].tolist() == [0.0, 0.0]
  assert len(calls) == 4


def test_a_batched_call_past_its_timeout_scores_zero_for_all_its_completions():
  release = threading.Event()
  table = rewards_lib.RewardRegistry()
  table.register("hangs", batched=True)(lambda examples, completions, **_: (
      release.wait(5), [1.0] * len(completions))[1])
  scorer = rewards_lib.RewardScorer({"hangs": 1.0}, rewards_lib.RewardContext(),
                                    timeout_s=0.05, rewards=table)
  started = time.time()
  scores = scorer.score(_examples(3), ["a", "b", "c"], [1] * 3, 1)
  assert 0.15 <= time.time() - started < 2  # n x timeout_s for a batch of n.
  release.set()
  assert scores.total.tolist() == [0.0] * 3
  assert scores.timeouts == 3 and scores.failures == 0
  scorer.close()


def _config_like(run_dir, **overrides):
  """configs/rl.py on the data of the SFT run in `run_dir`, tiny sizes for tests."""
  with open(os.path.join(run_dir, "config.json")) as f:
    original = json.load(f)
  config = rl_config.get_config()
  for key, value in original["data"].items():
    if key not in ("tokenizer", "task_kwargs"):
      config.data[key] = value
  small = {"init_from": run_dir, "loop.num_steps": 2, "rl.prompts_per_step": 8,
           "rl.group_size": 4, "rl.minibatch_size": 16, "rl.max_new_tokens": 24,
           "loop.log_every": 1, "loop.checkpoint_every": 2, "eval.num_examples": 8,
           "eval.batch_size": 8, "eval.max_new_tokens": 24, "eval.num_samples": 2}
  return set_fields(config, {**small, **overrides})


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if '"reward"' in l]


def _plan(config, workdir, with_context=False):
  """stage.build's Plan of `config` (its threads closed), or (Context, Plan)."""
  _, ctx, plan = stage_lib.build(config, workdir)
  if plan.close:
    plan.close()
  return (ctx, plan) if with_context else plan


def _learner(config, workdir):
  """(ctx, spec, tx, algo, init) of an RL config, as stage.build resolves it; `init()`
  is the first state (its policy from init_from; the train step donates it)."""
  ctx, plan = _plan(config, workdir, with_context=True)
  algo = rl_trainer.algo_config(config.rl)
  spec, tx = rl_trainer.state_spec(ctx, algo)
  return ctx, spec, tx, algo, plan.init


@pytest.fixture(scope="module", params=["gae", "grpo"])
def rl_on_a_mesh(request, tiny_run, tmp_path_factory):
  """One 2-step RL run from the tiny SFT run on a (4, 2, 1) mesh, per advantage: its
  workdir, returned result, metrics lines and final checkpoint (shared by the tests
  below, which each check one side of it)."""
  advantage = request.param
  # GRPO samples at temperature 0.7: the learner scores at the same temperature, so the
  # sampler / learner gap stays at rounding level (asserted below for every step).
  extra = ({"rl.dynamic_sampling": True, "rl.temperature": 0.7} if advantage == "grpo"
           else {})
  # The 4-step tiny run is never right: a length penalty gives the rewards a spread, so
  # the advantages are not all zero and the policy really moves away from the reference.
  config = _config_like(tiny_run, **{"rl.advantage": advantage, "rl.kl_coef": 0.1,
                                     "mesh.shape": (4, 2, 1),
                                     "rl.rewards": {"correctness": 1.0,
                                                    "length_penalty": 1.0}, **extra})
  workdir = str(tmp_path_factory.mktemp("rl_on_a_mesh") / advantage)
  result = stages.run(config, workdir)
  plan = _plan(config, workdir)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
  latest = ckpt.latest_step()
  state, _ = ckpt.restore(plan.spec.abstract)
  ckpt.close()
  return types.SimpleNamespace(advantage=advantage, workdir=workdir, result=result,
                               steps=_metrics(workdir), latest=latest, state=state)


def test_rl_run_writes_its_result(rl_on_a_mesh):
  run = rl_on_a_mesh
  with open(os.path.join(run.workdir, "eval.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(run.result))
  assert written["stage"] == "rl" and written["step"] == int(run.state.step)
  assert written["metrics"] == written["after"]
  for phase in ("before", "after"):
    assert {"accuracy", "pass@1", "pass@2", "maj@2"} <= set(written[phase])
  with open(os.path.join(run.workdir, "eval_before.json")) as f:
    assert json.load(f) == written["before"]
  for name in ("eval_before_samples.jsonl", "eval_samples.jsonl"):
    with open(os.path.join(run.workdir, name)) as f:
      assert len(f.readlines()) == 8  # eval.num_examples.


def test_rl_run_logs_every_step(rl_on_a_mesh):
  run = rl_on_a_mesh
  assert [m["step"] for m in run.steps] == [1, 2]
  for m in run.steps:
    # Sampler and learner: the same function on the same arrays.
    assert m["sampler_learner_logp_max_abs_diff"] < 1e-4
    assert 0 < m["sampling_fraction"] < 1 and m["tokens_per_second"] > 0
    assert {"reward", "accuracy", "response_length", "kl_to_reference", "entropy",
            "clip_fraction", "grad_norm", "advantage_std"} <= set(m)
    assert ("explained_variance" in m) == ("value_loss" in m) == (run.advantage == "gae")
    if run.advantage == "grpo":  # DAPO: dropped groups are counted and refilled (<= 3 rounds).
      assert 1 <= m["sampling_rounds"] <= 3
      # Another round only starts while fewer than 8 groups have been kept.
      assert m["dropped_groups"] > 8 * (m["sampling_rounds"] - 2)


def test_rl_checkpoint_is_sharded_and_the_policy_moved(rl_on_a_mesh):
  run = rl_on_a_mesh
  # Two RL steps (the checkpoint's number) of two minibatch updates each (32 completions,
  # minibatches of 16): state.step counts updates.
  assert run.latest == 2
  assert int(run.state.step) == 4
  q = run.state.params["policy"]["layer_0"]["attn"]["q_kernel"]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[0] < q.shape[0]
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
           zip(jax.tree.leaves(run.state.params["policy"]),
               jax.tree.leaves(run.state.frozen["reference"]))]
  assert max(moved) > 0  # The policy learned; the reference stayed where it started.
  assert run.steps[1]["kl_to_reference"] > 0


def test_rl_run_folder_loads_and_evaluates_from_the_command_line(rl_on_a_mesh):
  run = rl_on_a_mesh
  _, policy = sft_lib.load_run(run.workdir)
  for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(run.state.params["policy"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = subprocess.run([sys.executable, "-m", "o3lite.evaluate", f"--workdir={run.workdir}",
                        "--num_examples=4", "--num_samples=0"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(run.workdir, "eval_test.json")) as f:
    assert json.load(f)["num_examples"] == 4


def test_rl_run_mesh_that_does_not_fit_is_a_mesh_error(rl_on_a_mesh):
  # On one device the run's (4, 2, 1) mesh does not fit: a one-line MeshError, and
  # --mesh_shape evaluates it there anyway.
  run = rl_on_a_mesh
  one_device = {**os.environ, "XLA_FLAGS": ""}
  args = [sys.executable, "-m", "o3lite.evaluate", f"--workdir={run.workdir}",
          "--num_examples=4", "--num_samples=0", "--split=validation"]
  out = subprocess.run(args, cwd=REPO, env=one_device, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1 and "MeshError" in out.stderr.strip().splitlines()[-1]
  out = subprocess.run(args + ["--mesh_shape=-1,1,1"], cwd=REPO, env=one_device,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(run.workdir, "eval_validation.json")) as f:
    assert json.load(f)["num_examples"] == 4


def test_rl_checkpoint_read_as_another_kind_is_not_called_corrupt(rl_on_a_mesh, tiny_run,
                                                                  tmp_path):
  run = rl_on_a_mesh
  sft_plan = _plan(run_folder.load_config(tiny_run), str(tmp_path / "x"))
  with pytest.raises(errors.CheckpointError,
                     match=f"holds a 'rl-{run.advantage}' state, not the 'sft' state") as e:
    checkpoint_lib.Checkpointer(os.path.join(run.workdir, "checkpoints"), 1, None,
                                kind="sft").restore(sft_plan.spec.abstract)
  assert "corrupt" not in str(e.value)


def _random_rl_minibatch(seed: int, ragged: bool) -> dict[str, np.ndarray]:
  """16 random rollout rows with the learner's inputs (advantages, returns, ...)."""
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(3, 20, 5)) for _ in range(16)]
  completions = [list(rng.integers(3, 20, int(rng.integers(2, 9)) if ragged else 6))
                 for _ in range(16)]
  batch = pipeline.rollout_batch(prompts, completions, [True] * 16, 16, 1, 0)
  mask = batch["mask"]
  batch.update(old_logp=-np.ones_like(mask), ref_logp=-np.ones_like(mask),
               advantages=rng.normal(size=mask.shape).astype(np.float32) * mask,
               returns=rng.normal(size=mask.shape).astype(np.float32) * mask,
               old_values=np.zeros_like(mask))
  return batch


def test_update_step_is_the_same_on_two_meshes(tiny_run, tmp_path):
  """RL updates with the batch over 8 devices and with parameters split 4 ways (fsdp)
  give the same numbers."""
  results = []
  for shape in [(8, 1, 1), (2, 4, 1)]:
    config = _config_like(tiny_run, **{"mesh.shape": shape, "rl.advantage": "gae",
                                       "rl.kl_coef": 0.05, "rl.entropy_coef": 0.01})
    ctx, spec, tx, algo, init = _learner(config, str(tmp_path / str(shape)))
    state = init()
    batch = _random_rl_minibatch(seed=0, ragged=False)
    bs = sharding_lib.batch_sharding(ctx.mesh, ctx.rules)
    loss_fn = losses.get_loss("ppo_actor_critic", ctx.model_cfg, algo=algo)
    update = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx),
                                     spec.shardings, bs, ctx.mesh, ctx.rules)
    state, m = update(state, sharding_lib.put_global_batch(batch, bs))
    state, m = update(state, sharding_lib.put_global_batch(batch, bs))
    results.append((jax.device_get(m), jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # Adam divides each gradient element by its own scale, so fp32 summation-order noise in
  # a near-zero gradient element can move that parameter by a small fraction of the
  # learning rate (2e-4 here after warmup): compare at 1% of it. Losses and norms above
  # are the tight check.
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def _cli(workdir, tiny_run, steps):
  config = _config_like(tiny_run)
  args = [sys.executable, "-m", "o3lite.train", "--config=configs/rl.py",
          f"--workdir={workdir}"]
  flat = {"data.data_dir": config.data.data_dir, "data.num_train": config.data.num_train,
          "data.num_validation": config.data.num_validation,
          "data.num_test": config.data.num_test, "init_from": tiny_run,
          "loop.num_steps": steps, "rl.prompts_per_step": 8, "rl.group_size": 4,
          "rl.minibatch_size": 16, "rl.max_new_tokens": 24, "loop.checkpoint_every": 2,
          "loop.keep_checkpoints": 10, "eval.num_examples": 4, "eval.batch_size": 4,
          "eval.max_new_tokens": 8, "eval.num_samples": 0}
  return args + [f"--config.{k}={v}" for k, v in flat.items()]


def test_rl_sigkill_then_restart_ends_like_an_uninterrupted_run(tiny_run, tmp_path):
  """An RL run from an SFT run folder (init_from), killed, resumes and ends bit-equal."""
  steps = 12
  env = {**os.environ, "XLA_FLAGS": ""}
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_cli(straight, tiny_run, steps), check=True, cwd=REPO, env=env,
                 capture_output=True, timeout=600)
  interrupted_at = sigkill.kill_after_checkpoint(_cli(killed, tiny_run, steps), killed, 4,
                                                 cwd=REPO, env=env)
  assert interrupted_at < steps, "the run finished before it was killed"
  out = subprocess.run(_cli(killed, tiny_run, steps), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resumed from step {interrupted_at}" in out.stdout
  # The evaluation before RL ran once, before the kill, and was not repeated.
  assert out.stdout.count("before rl:") == 0

  plan = _plan(_config_like(tiny_run), str(tmp_path / "build"))
  states = []
  for workdir in (straight, killed):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
    states.append(ckpt.restore(plan.spec.abstract))
    ckpt.close()
  (a, pos_a), (b, pos_b) = states
  # state.step counts updates: 32 completions a step, minibatches of 16.
  assert int(a.step) == int(b.step) == 2 * steps and pos_a == pos_b == steps * 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(killed, "eval.json")) as f, \
       open(os.path.join(straight, "eval.json")) as g:
    killed_result, straight_result = json.load(f), json.load(g)
  assert killed_result["after"] == straight_result["after"]
  assert killed_result["before"] == straight_result["before"]


def test_bad_rl_configs(tiny_run, tmp_path):
  with pytest.raises(errors.O3liteError, match="unknown advantage estimator 'gea'"):
    stages.run(_config_like(tiny_run, **{"rl.advantage": "gea"}), str(tmp_path / "a"))
  with pytest.raises(errors.O3liteError, match="rl.minibatch_size=12 does not divide"):
    stages.run(_config_like(tiny_run, **{"rl.minibatch_size": 12}), str(tmp_path / "b"))
  # The whole config is checked before the SFT warm start runs.
  with pytest.raises(errors.ConfigError, match="rl.minibatch_size=12 does not divide"):
    stages.run(_config_like(tiny_run, **{"rl.minibatch_size": 12, "init_from": ""}),
               str(tmp_path / "b2"))
  assert not os.path.exists(tmp_path / "b2" / "sft")
  with pytest.raises(errors.ConfigError, match="kl_in_reward=True with advantage='grpo'"):
    stages.run(_config_like(tiny_run, **{"rl.advantage": "grpo", "rl.kl_coef": 0.1,
                                         "rl.kl_in_reward": True}), str(tmp_path / "b3"))
  # The fields init_from and the loop / optimizer sections replaced: a one-line
  # ConfigError naming the new field.
  for old, value, new in [("rl.sft_init", tiny_run, "init_from"),
                          ("rl.init_from_hf", tiny_run, "init_from"),
                          ("rl.num_steps", 2, "loop.num_steps"),
                          ("rl.optimizer", {"learning_rate": 1e-3}, "optimizer")]:
    config = _config_like(tiny_run)
    section, name = old.split(".")
    config[section][name] = value
    with pytest.raises(errors.ConfigError, match=f"^{old} was replaced by {new}") as e:
      stage_lib.validate(config)
    assert len(str(e.value).splitlines()) == 1
  assert alg.RLAlgoConfig(advantage="rloo", group_size=2).uses_critic is False


def test_rl_from_a_hugging_face_folder(tiny_run, tmp_path):
  """`init_from` a Hugging Face folder (how configs/rl_qwen_gsm8k.py starts): policy and
  reference load from the folder, with its tokenizer; RL then runs."""
  from o3lite import export as export_lib  # pylint: disable=g-import-not-at-top
  hf_dir = str(tmp_path / "hf")
  export_lib.export_run(tiny_run, hf_dir)
  config = _config_like(tiny_run, **{"init_from": hf_dir, "loop.num_steps": 1,
                                     "eval.num_samples": 0})
  workdir = str(tmp_path / "run")
  result = stages.run(config, workdir)
  with open(os.path.join(tiny_run, "eval.json")) as f:
    sft_accuracy = json.load(f)["metrics"]["accuracy"]
  # The tiny run evaluated 4 problems, this one 8: compare on the first 4.
  with open(os.path.join(workdir, "eval_before_samples.jsonl")) as f:
    before = [json.loads(l)["correct"] for l in f][:4]
  assert sum(before) / 4 == sft_accuracy
  assert result["stage"] == "rl" and "after" in result and "before" in result
  assert not os.path.exists(os.path.join(workdir, "sft"))  # No warm start.


def test_rl_update_with_gradient_accumulation_equals_one_big_minibatch(tiny_run, tmp_path):
  """rl.grad_accum_steps splits a minibatch into microbatches (less memory): the update is
  the one of the whole minibatch, policy and critic (token-mean aggregation)."""
  config = _config_like(tiny_run, **{"mesh.shape": (8, 1, 1), "rl.advantage": "gae",
                                     "rl.kl_coef": 0.05})
  ctx, spec, tx, algo, init = _learner(config, str(tmp_path))
  batch = _random_rl_minibatch(seed=1, ragged=True)
  bs = sharding_lib.batch_sharding(ctx.mesh, ctx.rules)
  loss_fn = losses.get_loss("ppo_actor_critic", ctx.model_cfg, algo=algo)
  results = []
  for accum in (1, 2):
    update = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx, accum),
                                     spec.shardings, bs, ctx.mesh, ctx.rules)
    state, m = update(init(), sharding_lib.put_global_batch(batch, bs))
    results.append((jax.device_get(m), jax.device_get(state.params)))
  (m1, p1), (m2, p2) = results
  for k in ("loss", "policy_loss", "value_loss", "kl", "grad_norm", "count"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-6)
