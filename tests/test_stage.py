"""The stage harness: a new stage needs only its own parts; old run folders and config
fields; one registry of stages."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import rl as rl_config
from configs import sft as sft_config
from conftest import data_of, set_fields
from o3lite import errors
from o3lite import stages
from o3lite.model import transformer as model_lib
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import losses
from o3lite.training import memory
from o3lite.training import sft
from o3lite.training import stage as stage_lib
from o3lite.training import state as state_lib
from o3lite.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_RUN = os.path.join(REPO, "tests", "data", "old_sft_run")


class Interrupted(Exception):
  """Stands for a kill in the middle of a run."""


class Toy(stage_lib.Stage):
  """A new stage, in a few dozen lines: teach the policy to say `toy.token` after any
  random tokens. Everything else (folder, resume, loop, result) is the harness's."""

  name = "toy"
  shown = ("loss",)

  def __init__(self, stop_at: int = -1):
    self.stop_at = stop_at  # Raise in this iteration (a kill), once.

  def validate(self, config):
    if not 0 <= config.toy.token < 32:
      raise errors.ConfigError(f"toy.token={config.toy.token} must be in [0, 32)")

  def setup(self, ctx):
    tx = optax.adam(1e-2)
    spec = state_lib.policy_spec(ctx.model_cfg, tx, ctx.mesh, ctx.rules)
    token, model = ctx.config.toy.token, model_lib.Transformer(ctx.model_cfg)

    def loss_fn(params, frozen, batch):
      del frozen
      logits, _ = model.apply({"params": params["policy"]}, batch["tokens"],
                              batch["positions"])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))[..., token]
      return losses.LossSums(-logp.sum(), jnp.asarray(logp.size, jnp.float32), {})

    step_fn = jax.jit(step_lib.make_train_step(loss_fn, tx))

    def batch_at(position):  # The data: a pure function of the position.
      tokens = np.random.default_rng(position).integers(0, 32, (4, 8)).astype(np.int32)
      return {"tokens": tokens, "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1))}

    def iterate(state, position, step):
      if step == self.stop_at:
        self.stop_at = -1
        raise Interrupted(step)
      state, metrics = step_fn(state, batch_at(position))
      return state, position + 4, metrics

    def evaluate(state, tag):
      loss = loss_fn(state.params, {}, batch_at(10**6))
      return {"mean_logp": float(-loss.loss_sum / loss.count)}, None

    return stage_lib.Plan(spec=spec, init=lambda: spec.create(ctx.config.seed),
                          iterate=iterate, evaluate=evaluate)


stage_lib.register(Toy())


def _toy_config(tiny_run, **changes):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = sft_config.get_config()
  del c["sft"]
  c.method = "toy"
  c.toy = ml_collections.ConfigDict({"token": 5})
  set_fields(c, {**data_of(tiny_run), "loop.num_steps": 8, "loop.checkpoint_every": 2,
                 "loop.log_every": 4, "loop.eval_every": 0, **changes})
  return c


def _params(workdir):
  _, params = sft.load_run(workdir)
  return jax.device_get(params)


def test_a_new_stage_trains_checkpoints_is_killed_and_resumes_identically(tiny_run,
                                                                          tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  result = stages.run(_toy_config(tiny_run), straight)
  assert result["stage"] == "toy" and result["step"] == 8
  assert result["metrics"]["mean_logp"] > np.log(1 / 128)  # It learned something.
  with pytest.raises(Interrupted):
    stage_lib.run(_toy_config(tiny_run), killed, stage=Toy(stop_at=5))
  assert checkpoint_lib.Checkpointer(os.path.join(killed, "checkpoints"), 2,
                                     None).latest_step() == 4
  assert not os.path.exists(os.path.join(killed, "eval.json"))
  again = stages.run(_toy_config(tiny_run), killed)  # Resumes at step 4.
  assert again["metrics"] == result["metrics"]
  for a, b in zip(jax.tree.leaves(_params(killed)), jax.tree.leaves(_params(straight))):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [4, 8, 8]  # Each once (+ eval).
  with pytest.raises(errors.ConfigError, match=r"^toy.token=40 must be in \[0, 32\)$"):
    stages.run(_toy_config(tiny_run, **{"toy.token": 40}), str(tmp_path / "bad"))
  # Another stage's run in the folder is refused, and the folder kept.
  with pytest.raises(errors.RunFolderError, match="holds a 'toy' run, not a 'sft' run"):
    stages.run(set_fields(sft_config.get_config(), data_of(tiny_run)), straight)


def test_loop_section_and_stage_name_errors(tiny_run, tmp_path):
  bad = _toy_config(tiny_run, **{"loop.checkpoint_every": 0})
  with pytest.raises(errors.ConfigError, match=r"^loop.checkpoint_every=0 must be at least 1$"):
    stages.run(bad, str(tmp_path / "a"))
  bad = _toy_config(tiny_run)
  bad.method = "tyo"
  with pytest.raises(errors.ConfigError, match=r"unknown stage \(config.method\) 'tyo'"):
    stages.run(bad, str(tmp_path / "b"))
  assert {"sft", "rl", "verifier", "filtered_sft", "test_time"} <= set(stages.STAGES)


def test_renamed_fields_name_the_new_one(tmp_path):
  config = sft_config.get_config()
  with config.unlocked():
    config.train = {"init_from_hf": "x"}
  with pytest.raises(errors.ConfigError, match=r"^train.init_from_hf was replaced by "
                     r"init_from \(a run folder or a local Hugging Face folder\)$"):
    stages.run(config, str(tmp_path / "a"))
  out = subprocess.run([sys.executable, "-m", "o3lite.train", "--config=configs/rl.py",
                        f"--workdir={tmp_path / 'b'}", "--config.rl.sft_init=somewhere"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      "o3lite: config error: rl.sft_init was replaced by init_from (a run folder or a "
      "local Hugging Face folder)"]
  assert not os.path.exists(tmp_path / "b")


def test_init_from_that_is_not_a_policy_is_one_line_before_any_work(tmp_path):
  """The one check of every stage's policy source (`policy_source.resolve`, run by the
  harness's validation before anything is made)."""
  config = sft_config.get_config()
  config.init_from = str(tmp_path / "absent")
  with pytest.raises(errors.ConfigError) as e:
    stages.run(config, str(tmp_path / "run"))
  assert str(e.value) == f"init_from={tmp_path / 'absent'} does not exist"
  assert not os.path.exists(tmp_path / "run")  # Checked before any work.
  # A folder that is neither a run folder nor a Hugging Face folder: one line too.
  (tmp_path / "neither").mkdir()
  (tmp_path / "neither" / "notes.txt").write_text("x")
  config.init_from = str(tmp_path / "neither")
  with pytest.raises(errors.ConfigError) as e:
    stages.run(config, str(tmp_path / "run"))
  assert str(e.value) == (
      f"init_from={tmp_path / 'neither'} is neither an o3lite run folder (no "
      "model_config.json) nor a Hugging Face folder (no config.json)")
  assert not os.path.exists(tmp_path / "run")
  # The same in a stage that would otherwise run a nested stage first (RL's warm start).
  rl = rl_config.get_config()
  rl.init_from = str(tmp_path / "neither")
  with pytest.raises(errors.ConfigError, match=r"^init_from=.* is neither an o3lite"):
    stages.run(rl, str(tmp_path / "rl"))
  assert not os.path.exists(tmp_path / "rl")


def test_steps_that_do_not_fit_the_device_are_one_line_before_any_work(tiny_run, tmp_path,
                                                                      monkeypatch):
  """The harness compiles a stage's steps at their shapes (`Plan.compile`) and holds
  XLA's estimate against the device's memory (here made 1 MiB) before any state exists;
  the error names the settings that shrink the step."""
  monkeypatch.setattr(memory, "device_bytes", lambda mesh: 2**20)
  config = set_fields(sft_config.get_config(), data_of(tiny_run))
  with pytest.raises(errors.ConfigError, match=(
      r"^the SFT train step needs about [0-9.]+ GiB per device \(XLA's estimate\), more "
      r"than the 0.0 GiB a device has here: lower sft.batch_size, raise "
      r"sft.grad_accum_steps, set sft.vocab_chunk \(e.g. 8192\) or model.remat=True "
      r"\(or loop.memory_check=False to run anyway\)$")):
    stages.run(config, str(tmp_path / "sft"))
  assert os.listdir(tmp_path / "sft") == []  # Nothing saved.
  rl = set_fields(rl_config.get_config(), {**data_of(tiny_run), "init_from": tiny_run})
  with pytest.raises(errors.ConfigError, match=(
      r"^the RL (update|scoring pass) needs about .* lower rl.minibatch_size, raise "
      r"rl.grad_accum_steps, set rl.vocab_chunk")):
    stages.run(rl, str(tmp_path / "rl"))
  assert os.listdir(tmp_path / "rl") == []
  # The estimates themselves: the SFT step of the tiny run holds at least its state.
  monkeypatch.setattr(memory, "device_bytes", lambda mesh: 2**40)
  _, ctx, plan = stage_lib.build(config, str(tmp_path / "b"))
  compiled = plan.compile()
  peaks = memory.check(compiled, 2**40, "")
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(plan.spec.abstract.params))
  devices = ctx.mesh.devices.size
  assert set(peaks) == {"SFT train step"} and peaks["SFT train step"] >= state_bytes / devices


def test_a_run_folder_from_before_the_harness_evaluates_exports_and_starts_sft(tmp_path):
  """tests/data/old_sft_run was made by o3lite before this harness (config fields
  train.*, train.init_from(_hf); a flat eval.json): it still evaluates, exports and is a
  policy source."""
  old = str(tmp_path / "old")
  shutil.copytree(OLD_RUN, old)
  with open(os.path.join(old, "config.json")) as f:
    saved = json.load(f)
  assert "init_from_hf" in saved["train"]  # Really the old shape.
  saved["data"]["data_dir"] = str(tmp_path / "data")  # Where data live may move.
  with open(os.path.join(old, "config.json"), "w") as f:
    json.dump(saved, f)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "o3lite.evaluate", f"--workdir={old}",
                        "--num_examples=4", "--max_new_tokens=8"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  with open(os.path.join(old, "eval_test.json")) as f:
    assert json.load(f)["num_examples"] == 4
  out = subprocess.run([sys.executable, "-m", "o3lite.export", f"--workdir={old}",
                        f"--out={tmp_path / 'hf'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
  assert stage_lib.headline(json.load(open(os.path.join(OLD_RUN, "eval.json"))))[
      "num_examples"] == 4  # The old flat result file reads as the new one's metrics.
  # As a policy source: SFT continues from its parameters.
  config = set_fields(sft_config.get_config(), {
      "init_from": old, "data.data_dir": str(tmp_path / "data"), "data.num_train": 300,
      "data.num_validation": 20, "data.num_test": 20, "data.seq_len": 64,
      "loop.num_steps": 1, "loop.checkpoint_every": 1, "sft.batch_size": 8,
      "optimizer.learning_rate": 0.0, "eval.num_examples": 4, "eval.batch_size": 4,
      "eval.max_new_tokens": 8})
  stages.run(config, str(tmp_path / "continued"))
  for a, b in zip(jax.tree.leaves(_params(str(tmp_path / "continued"))),
                  jax.tree.leaves(_params(old))):
    np.testing.assert_array_equal(a, b)  # Learning rate 0: the same parameters.
