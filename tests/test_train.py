"""End-to-end SFT runs: outputs, resume after SIGKILL, and bad input on the command line."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from o3lite import checkpoint as checkpoint_lib
from o3lite import trainer
import sigkill  # tests/sigkill.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("datasets"))


def _small_overrides(data_dir, steps):
  return {
      "data.data_dir": data_dir, "data.num_train": 2000, "data.num_validation": 50,
      "data.num_test": 50, "train.num_steps": steps, "train.log_every": 10,
      "train.eval_every": 0, "eval.num_examples": 16, "eval.batch_size": 16,
      "train.batch_size": 8, "data.seq_len": 64,
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
  metrics = trainer.run_sft(_config(data_dir, 20, **{"train.checkpoint_every": 10}), workdir)
  assert metrics["split"] == "test" and metrics["num_examples"] == 16
  with open(os.path.join(workdir, "eval.json")) as f:
    on_disk = json.load(f)
  assert on_disk["accuracy"] == metrics["accuracy"]
  assert {"accuracy", "num_examples", "split"} <= set(on_disk)
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
  run = trainer.setup(config, workdir + "-probe")
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 10)
  state, position = ckpt.restore(run.abstract_state)
  ckpt.close()
  return jax.device_get(state.params), position, int(state.step)


def test_sigkill_then_restart_ends_like_an_uninterrupted_run(tmp_path, data_dir):
  steps = 240
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  every = ["--config.train.checkpoint_every=60"]
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
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.train.num_stepz=3")
  assert err.strip().splitlines() == [
      "o3lite: config error: unknown config key 'num_stepz' "
      "Did you mean \"num_steps\" instead of \"num_stepz\"?"]


def test_impossible_mesh_is_a_one_line_error(tmp_path, data_dir):
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.mesh.shape=(3,1,1)")
  lines = [l for l in err.splitlines() if l.startswith("o3lite:")]
  assert len(lines) == 1 and "MeshError" in lines[0] and "needs 3 devices" in lines[0]
  assert "Traceback" not in err


def test_wrong_type_is_an_error(tmp_path, data_dir):
  err = _run_cli_expecting_error(tmp_path, data_dir, "--config.train.num_steps=many")
  assert err.strip().startswith("o3lite: config error: flag --config.train.num_steps=many")
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_folder_is_an_error(tmp_path, data_dir):
  config = _config(data_dir, 5, **{"data.source": "gsm8k", "data.path": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match="nope"):
    trainer.run_sft(config, str(tmp_path / "run"))


def test_malformed_jsonl_is_an_error_naming_file_and_line(tmp_path, data_dir):
  folder = tmp_path / "mydata"
  folder.mkdir()
  good = json.dumps({"question": "1+1", "answer": "2"})
  (folder / "train.jsonl").write_text(good + "\n" + good + "\n{not json\n")
  config = _config(data_dir, 5, **{"data.source": "jsonl", "data.path": str(folder)})
  with pytest.raises(ValueError, match=r"train\.jsonl:3"):
    trainer.run_sft(config, str(tmp_path / "run"))


def test_missing_init_checkpoint_is_an_error(tmp_path, data_dir):
  config = _config(data_dir, 5, **{"train.init_from": str(tmp_path / "absent")})
  with pytest.raises(checkpoint_lib.CheckpointError, match="absent"):
    trainer.run_sft(config, str(tmp_path / "run"))


def test_corrupt_checkpoint_is_an_error_and_nothing_is_lost(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  trainer.run_sft(_config(data_dir, 10, **{"train.checkpoint_every": 5}), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for path in glob.glob(os.path.join(ckpt_dir, "10", "state", "**", "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, "r+b") as f:
        f.write(b"\x00garbage" * 8)
  before = sorted(os.listdir(ckpt_dir))
  snapshot = str(tmp_path / "snapshot")
  shutil.copytree(ckpt_dir, snapshot)
  with pytest.raises(checkpoint_lib.CheckpointError, match="corrupt"):
    trainer.run_sft(_config(data_dir, 20, **{"train.checkpoint_every": 5}), workdir)
  assert sorted(os.listdir(ckpt_dir)) == before
  for path in glob.glob(os.path.join(snapshot, "**", "*"), recursive=True):
    if os.path.isfile(path):
      twin = os.path.join(ckpt_dir, os.path.relpath(path, snapshot))
      with open(path, "rb") as f, open(twin, "rb") as g:
        assert f.read() == g.read()


def test_interrupted_save_does_not_block_restore(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  trainer.run_sft(_config(data_dir, 10, **{"train.checkpoint_every": 5}), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # What a save killed half way leaves: a temporary folder that was never committed.
  partial = os.path.join(ckpt_dir, "15.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(ckpt_dir, "10"), partial)
  with open(os.path.join(partial, "_CHECKPOINT_METADATA"), "w") as f:
    f.write("{")
  assert checkpoint_lib.Checkpointer(ckpt_dir, 5, 3).latest_step() == 10
  metrics = trainer.run_sft(_config(data_dir, 15, **{"train.checkpoint_every": 5}), workdir)
  assert metrics["step"] == 15
