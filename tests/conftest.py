"""Tests run on 8 simulated CPU devices, so meshes can be tested without accelerators."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The workdir of a tiny SFT run (4 steps of the default task), shared by tests."""
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  from o3lite.training import sft as trainer  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("tiny_run")
  config = sft_config.get_config()
  overrides = {"data.data_dir": str(root / "data"), "data.num_train": 2000,
               "data.num_validation": 20, "data.num_test": 20, "train.num_steps": 4,
               "train.log_every": 2, "train.eval_every": 0, "train.batch_size": 8,
               "data.seq_len": 64, "eval.num_examples": 4, "eval.batch_size": 4,
               "eval.max_new_tokens": 8}
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  workdir = str(root / "workdir")
  trainer.run_sft(config, workdir)
  return workdir
