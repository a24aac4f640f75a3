"""End-to-end SFT runs: outputs, resume after SIGKILL, and bad input on the command line."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft as sft_config
from o3lite import errors
from o3lite import stages
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import sft as trainer
from o3lite.training import stage as stage_lib
import sigkill  # tests/sigkill.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("datasets"))


def _small_overrides(data_dir, steps):
  return {
      "data.data_dir": data_dir, "data.num_train": 2000, "data.num_validation": 50,
      "data.num_test": 50, "loop.num_steps": steps, "loop.log_every": 10,
      "loop.eval_every": 0, "eval.num_examples": 16, "eval.batch_size": 16,
      "sft.batch_size": 8, "data.seq_len": 64,
  }


def _config(data_dir, steps, **extra):
  config = sft_config.get_config()
  for key, value in {**_small_overrides(data_dir, steps), **extra}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _cli(workdir, data_dir, steps, *extra):
  args = [sys.executable, "-m", "o3lite.train", "--config=configs/sft.py",
          f"--workdir={workdir}"]
  for key, value in _small_overrides(data_dir, steps).items():
    args.append(f"--config.{key}={value}")
  return args + list(extra)


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # One CPU device in the subprocess.
  return env


def test_sft_run_writes_every_output(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  result = stages.run(_config(data_dir, 20, **{"loop.checkpoint_every": 10}), workdir)
  metrics = result["metrics"]
  assert result["stage"] == "sft" and result["step"] == 20
  assert metrics["split"] == "test" and metrics["num_examples"] == 16
  with open(os.path.join(workdir, "eval.json")) as f:
    on_disk = json.load(f)
  assert on_disk == result
  assert on_disk["metrics"]["accuracy"] == metrics["accuracy"]
  assert {"accuracy", "num_examples", "split"} <= set(on_disk["metrics"])
  assert stage_lib.headline(on_disk) == metrics
  with open(os.path.join(workdir, "eval_samples.jsonl")) as f:
    samples = [json.loads(l) for l in f]
  assert len(samples) == 16
  assert {"prompt", "completion", "answer", "target", "correct"} <= set(samples[0])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(l) for l in f]
  train_lines = [l for l in logged if "loss" in l]
  assert [l["step"] for l in train_lines] == [10, 20]
  for key in ("loss", "token_accuracy", "grad_norm", "param_norm", "update_norm",
              "tokens_per_second", "learning_rate"):
    assert np.isfinite(train_lines[-1][key]), key
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.listdir(os.path.join(workdir, "tokenizer"))
  assert checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 10, 3).all_steps() == [10, 20]


def _final_params(workdir, data_dir, steps):
  config = _config(data_dir, steps)
  _, _, plan = stage_lib.build(config, workdir + "-probe")
  assert not os.path.exists(workdir + "-probe")  # build writes no run folder.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 10)
  state, position = ckpt.restore(plan.spec.abstract)
  ckpt.close()
  return jax.device_get(state.params), position, int(state.step)


def test_sigkill_then_restart_ends_like_an_uninterrupted_run(tmp_path, data_dir):
  steps = 240
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  every = ["--config.loop.checkpoint_every=60"]
  subprocess.run(_cli(straight, data_dir, steps, *every), check=True, cwd=REPO, env=_env(),
                 capture_output=True, timeout=600)

  interrupted_at = sigkill.kill_after_checkpoint(_cli(killed, data_dir, steps, *every),
                                                 killed, 60, cwd=REPO, env=_env())
  assert interrupted_at < steps, "the run finished before it was killed"
  assert not os.path.exists(os.path.join(killed, "eval.json"))

  out = subprocess.run(_cli(killed, data_dir, steps, *every), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resumed from step {interrupted_at}" in out.stdout

  a, pos_a, step_a = _final_params(straight, data_dir, steps)
  b, pos_b, step_b = _final_params(killed, data_dir, steps)
  assert step_a == step_b == steps and pos_a == pos_b
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    logged_steps = [json.loads(l)["step"] for l in f if '"loss"' in l]
  assert logged_steps == sorted(set(logged_steps))  # No step logged twice after resume.


def _run_cli_expecting_error(tmp_path, data_dir, *extra):
  out = subprocess.run(_cli(str(tmp_path / "bad"), data_dir, 5, *extra), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  return out.stderr


def test_config_typo_is_an_error_naming_the_key(tmp_path, data_dir):
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.loop.num_stepz=3")
  assert err.strip().splitlines() == [
      "o3lite: config error: unknown config key 'num_stepz' "
      "Did you mean \"num_steps\" instead of \"num_stepz\"?"]


def test_a_removed_train_section_key_is_a_one_line_config_error(tmp_path, data_dir):
  """The `train` section is gone (its fields moved to `loop` and `sft`): setting one of
  its old keys on the command line is a config error, not a silent new key."""
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.train.num_steps=3")
  assert err.strip().splitlines() == [
      "o3lite: config error: train.num_steps was replaced by loop.num_steps "
      "(RL's warm start: warm_start.loop.num_steps)"]
  assert not os.path.exists(tmp_path / "bad" / "config.json")


def test_an_old_init_from_field_is_a_config_error_naming_its_replacement(tmp_path, data_dir):
  config = _config(data_dir, 5)
  config.train = {"init_from": ""}
  with pytest.raises(errors.ConfigError, match=r"^train\.init_from was replaced by "
                     r"init_from \("):
    stages.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_impossible_mesh_is_a_one_line_error(tmp_path, data_dir):
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.mesh.shape=(3,1,1)")
  lines = [l for l in err.splitlines() if l.startswith("o3lite:")]
  assert len(lines) == 1 and "MeshError" in lines[0] and "needs 3 devices" in lines[0]
  assert "Traceback" not in err


def test_a_negative_sft_vocab_chunk_is_a_one_line_error(tmp_path, data_dir):
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.sft.vocab_chunk=-8")
  assert "sft.vocab_chunk=-8 must be at least 0" in err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_wrong_type_is_an_error(tmp_path, data_dir):
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.loop.num_steps=many")
  assert err.strip().startswith("o3lite: config error: flag --config.loop.num_steps=many")
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_folder_is_an_error(tmp_path, data_dir):
  config = _config(data_dir, 5, **{"data.source": "gsm8k", "data.path": str(tmp_path / "nope")})
  with pytest.raises(errors.O3liteError, match="nope"):
    stages.run(config, str(tmp_path / "run"))


def test_malformed_jsonl_is_an_error_naming_file_and_line(tmp_path, data_dir):
  folder = tmp_path / "mydata"
  folder.mkdir()
  good = json.dumps({"question": "1+1", "answer": "2"})
  (folder / "train.jsonl").write_text(good + "\n" + good + "\n{not json\n")
  config = _config(data_dir, 5, **{"data.source": "jsonl", "data.path": str(folder)})
  with pytest.raises(errors.O3liteError, match=r"train\.jsonl:3"):
    stages.run(config, str(tmp_path / "run"))


def test_corrupt_checkpoint_is_an_error_and_nothing_is_lost(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  stages.run(_config(data_dir, 10, **{"loop.checkpoint_every": 5}), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for path in glob.glob(os.path.join(ckpt_dir, "10", "state", "**", "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, "r+b") as f:
        f.write(b"\x00garbage" * 8)
  before = sorted(os.listdir(ckpt_dir))
  snapshot = str(tmp_path / "snapshot")
  shutil.copytree(ckpt_dir, snapshot)
  with pytest.raises(errors.CheckpointError, match="corrupt"):
    stages.run(_config(data_dir, 20, **{"loop.checkpoint_every": 5}), workdir)
  assert sorted(os.listdir(ckpt_dir)) == before
  for path in glob.glob(os.path.join(snapshot, "**", "*"), recursive=True):
    if os.path.isfile(path):
      twin = os.path.join(ckpt_dir, os.path.relpath(path, snapshot))
      with open(path, "rb") as f, open(twin, "rb") as g:
        assert f.read() == g.read()


def test_interrupted_save_does_not_block_restore(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  stages.run(_config(data_dir, 10, **{"loop.checkpoint_every": 5}), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # What a save killed half way leaves: a temporary folder that was never committed.
  partial = os.path.join(ckpt_dir, "15.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(ckpt_dir, "10"), partial)
  with open(os.path.join(partial, "_CHECKPOINT_METADATA"), "w") as f:
    f.write("{")
  assert checkpoint_lib.Checkpointer(ckpt_dir, 5, 3).latest_step() == 10
  result = stages.run(_config(data_dir, 15, **{"loop.checkpoint_every": 5}), workdir)
  assert result["step"] == 15


# ---------------------------------------------------------------------------------------
# Non-finite steps.


def _poisoned_loss(model_cfg):
  """SFT cross-entropy, made NaN on batches whose `poison` is set."""
  from o3lite.training import losses  # pylint: disable=g-import-not-at-top
  inner = losses.get_loss("sft_cross_entropy", model_cfg)

  def loss_fn(params, frozen, batch):
    out = inner(params, frozen, batch)
    poison = jnp.where(jnp.max(batch["poison"]) > 0, jnp.nan, 0.0)
    return dataclasses.replace(out, loss_sum=out.loss_sum + poison)
  return loss_fn


def _tiny_step(tmp_path):
  from o3lite.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from o3lite.parallel import mesh as sharding_lib  # pylint: disable=g-import-not-at-top
  from o3lite.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from o3lite.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from o3lite.training import step as step_lib  # pylint: disable=g-import-not-at-top
  model_cfg = model_lib.ModelConfig.tiny(vocab_size=32)
  tx, _ = optimizer_lib.make_optimizer(sft_config.get_config().optimizer, 100)
  mesh = sharding_lib.make_mesh(("data", "fsdp", "tensor"), (1, 1, 1), jax.devices()[:1])
  spec = state_lib.policy_spec(model_cfg, tx, mesh, sharding_lib.DEFAULT_RULES)
  step = step_lib.jit_train_step(step_lib.make_train_step(_poisoned_loss(model_cfg), tx),
                                 spec.shardings, None, mesh, sharding_lib.DEFAULT_RULES)
  rng = np.random.default_rng(0)

  def batch(poison):
    return dict(inputs=rng.integers(0, 32, (4, 8)).astype(np.int32),
                targets=rng.integers(0, 32, (4, 8)).astype(np.int32),
                loss_mask=np.ones((4, 8), np.float32),
                segment_ids=np.ones((4, 8), np.int32),
                positions=np.tile(np.arange(8), (4, 1)).astype(np.int32),
                poison=np.full((4, 8), float(poison), np.float32))
  return spec, step, batch


def test_a_non_finite_step_is_not_applied(tmp_path):
  spec, step, batch = _tiny_step(tmp_path)
  state = spec.create(seed=0)
  state, metrics = step(state, batch(poison=False))
  assert float(metrics["nonfinite"]) == 0 and int(state.step) == 1
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, batch(poison=True))
  assert float(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 2  # Counted (the data moved on), not applied:
  after = jax.device_get((state.params, state.opt_state))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  state, metrics = step(state, batch(poison=False))  # And training goes on.
  assert float(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))


def test_a_run_of_non_finite_steps_stops_the_loop_and_keeps_checkpoints(tmp_path):
  from o3lite.training import loop as loop_lib  # pylint: disable=g-import-not-at-top
  from o3lite.training import metric_writer  # pylint: disable=g-import-not-at-top
  spec, step, batch = _tiny_step(tmp_path)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), 1, 10, async_save=False,
                                     kind="sft")
  writer = metric_writer.MetricWriter(str(tmp_path), 20)

  def iterate(state, position, i):  # Steps 4, 5, 6, ... are NaN.
    state, metrics = step(state, batch(poison=i >= 3))
    return state, position + 1, metrics

  loop = loop_lib.Loop(num_steps=20, log_every=1, max_nonfinite_in_a_row=3)
  with pytest.raises(errors.NonFiniteError, match="3 non-finite steps in a row, the last "
                     "at step 6.*last checkpoint at step 3"):
    loop_lib.fit(spec.create(0), iterate, loop, ckpt, writer)
  assert ckpt.all_steps() == [1, 2, 3]  # Nothing saved after the first NaN step.
  state, position = ckpt.restore(spec.abstract)
  assert int(state.step) == 3 and position == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(l) for l in f]
  assert [l["nonfinite"] for l in logged] == [0, 0, 0, 1, 1, 1]
  assert logged[-1]["nonfinite_steps"] == 3
  writer.close()
  ckpt.close()


def test_nan_learning_rate_is_a_one_line_error(tmp_path, data_dir):
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.optimizer.learning_rate=nan")
  assert err.strip().splitlines()[-1] == (
      "o3lite: ConfigError: optimizer.learning_rate=nan is not a finite number")
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "bad" / "config.json")  # Checked before any work.


# ---------------------------------------------------------------------------------------
# Run folders, and what a new user tries.


def test_rerun_with_another_model_shape_is_refused_and_the_run_is_kept(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  stages.run(_config(data_dir, 5, **{"loop.checkpoint_every": 5}), workdir)
  saved = {name: open(os.path.join(workdir, name), "rb").read()
           for name in ("config.json", "model_config.json")}
  steps = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 5, 3).all_steps()
  for key, value in (("model.embed_dim", 96), ("data.seq_len", 48),
                     ("data.vocab_size", 100)):
    with pytest.raises(errors.RunFolderError, match=rf"{key}={value} \(saved: "):
      stages.run(_config(data_dir, 10, **{key: value}), workdir)
  for name, content in saved.items():  # Nothing was rewritten.
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read() == content, name
  assert checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 5,
                                     3).all_steps() == steps
  run, params = trainer.load_run(workdir)  # The run still evaluates.
  assert run.model_cfg.embed_dim == 64 and jax.tree.leaves(params)
  # A longer run with the same model and data resumes.
  stages.run(_config(data_dir, 10, **{"loop.checkpoint_every": 5}), workdir)


def test_what_a_new_user_tries(tmp_path, data_dir):
  # A --config file that does not exist.
  out = subprocess.run([sys.executable, "-m", "o3lite.train", "--config=configs/nope.py"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("o3lite: config error: ")
  assert "configs/nope.py" in out.stderr
  # A --workdir that is a file.
  (tmp_path / "afile").write_text("x")
  out = subprocess.run(_cli(str(tmp_path / "afile"), data_dir, 5), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f"o3lite: RunFolderError: --workdir={tmp_path / 'afile'} is a file, not a folder")
  assert (tmp_path / "afile").read_text() == "x"
  # evaluate pointed at a folder that is not a run.
  (tmp_path / "notarun").mkdir()
  out = subprocess.run([sys.executable, "-m", "o3lite.evaluate",
                        f"--workdir={tmp_path / 'notarun'}"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      f"o3lite: RunFolderError: {tmp_path / 'notarun'} is not a run folder: no config.json"]


def test_a_bug_shows_its_traceback(tmp_path):
  """Only o3lite's own error types become one line: a ValueError from inside the run (a
  bug, in o3lite or a library) keeps its traceback and a non-zero exit."""
  code = ("import sys; from absl import app; import o3lite.train as t; "
          "import o3lite.stages\n"
          "def boom(config, workdir): raise ValueError('a bug deep inside')\n"
          "o3lite.stages.run = boom\n"
          f"sys.argv = ['train', '--workdir={tmp_path / 'w'}']\n"
          "app.run(t.main, flags_parser=t.errors.parse_flags)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "Traceback" in out.stderr and "ValueError: a bug deep inside" in out.stderr
  assert "o3lite: ValueError" not in out.stderr


def _policy(workdir):
  return jax.device_get(trainer.load_run(workdir)[1])


def test_sft_stage_in_process_takes_examples_and_a_starting_run(tmp_path, data_dir):
  """An outer loop (STaR, distillation) runs the SFT stage on its own examples
  (`stage=sft.SFT(examples)`), starting from another run (`init_from`), and reads the
  trained parameters back from the run folder."""
  first_dir = str(tmp_path / "first")
  stages.run(_config(data_dir, 3), first_dir)
  first = _policy(first_dir)
  examples = [{"question": "3 +4 mod 10", "cot": "3 +4 = 7", "answer": "7"}] * 8
  config = _config(data_dir, 2, **{"optimizer.learning_rate": 0.0})
  config.init_from = first_dir
  stage_lib.run(config, str(tmp_path / "frozen"), stage=trainer.SFT(examples))
  frozen = _policy(str(tmp_path / "frozen"))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(first)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # lr 0: unchanged.
  config = _config(data_dir, 2)
  config.init_from = first_dir
  moved_result = stage_lib.run(config, str(tmp_path / "moved"), stage=trainer.SFT(examples))
  moved = _policy(str(tmp_path / "moved"))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(moved), jax.tree.leaves(first)))
  assert moved_result["metrics"]["num_examples"] == 16
  with pytest.raises(errors.DataError, match="at least one example"):
    stage_lib.run(_config(data_dir, 2), str(tmp_path / "none"), stage=trainer.SFT([]))
