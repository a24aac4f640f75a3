r"""Entry point: `python -m o3lite.train --config=configs/sft.py [--workdir=DIR]`.

Parses flags and calls into the library. Without --workdir a fresh folder under ./runs is
made and printed; with an existing one the run resumes from its latest checkpoint.
Overrides: `--config.loop.num_steps=100`; an unknown key or wrong type is an error.
Multi-process (TPU pod slice, multi-node GPU, or the local two-process CPU test): pass
--multiprocess (TPU VMs find their peers themselves) or the coordinator flags.
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from o3lite import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/sft.py", "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (checkpoints, metrics, eval). Default: a new ./runs/...")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() (auto-detected on TPU VMs).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory", True, "On CPU-only machines, let glibc's malloc reuse freed memory "
    "instead of unmapping it (XLA:CPU steps run about 1.2x faster; see "
    "o3lite/parallel/host_memory.py).")


def _default_workdir(config) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  name = {"sft": f"sft-{config.data.task}" if "data" in config else "sft",
          "verifier": config.get("verifier", {}).get("kind", "verifier")}.get(
              config.get("method"), config.get("method", "run"))
  return os.path.join("runs", f"{name}-{stamp}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from o3lite.parallel import host_memory  # Before JAX starts its threads.
  if _KEEP_HOST_MEMORY.value and host_memory.cpu_only():
    host_memory.keep_freed_memory()
  # Imports jax: after flag parsing, before any use.
  from o3lite.parallel import multiprocess as distributed
  distributed.maybe_initialize(_MULTIPROCESS.value, _COORDINATOR.value,
                               _NUM_PROCESSES.value, _PROCESS_ID.value)
  from o3lite import stages  # Registers every stage.

  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):  # The file did not load.
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    reason = "no such file" if not os.path.isfile(path) else "it failed to import"
    print(f"o3lite: config error: --config={path}: {reason}", file=sys.stderr, flush=True)
    sys.exit(1)
  workdir = _WORKDIR.value or _default_workdir(config)
  print(f"workdir: {os.path.abspath(workdir)}", flush=True)
  try:
    stages.run(config, workdir)
  except errors.O3liteError as e:
    errors.exit_with(e)


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
