"""o3lite's error types. Bad input ends a run with one clear line and a non-zero exit.

Bad input (a config, data, a mesh, a checkpoint, a run folder the user points at) raises
one of the `O3liteError` types below, and the entry points turn exactly those into one
line on stderr (`exit_with`). Anything else is a bug, in o3lite or a library, and shows
its traceback. This module imports nothing of o3lite: every layer may raise these.
"""

from __future__ import annotations

import sys


class O3liteError(Exception):
  """Base of every error that reports bad input (never a bug)."""


class ConfigError(O3liteError):
  """A config value that is wrong, out of range, or inconsistent with another."""


class DataError(O3liteError):
  """Data that is missing, empty or malformed (a folder, a file, a line)."""


class MeshError(O3liteError):
  """A mesh that does not fit the devices, the model or the batch."""


class CheckpointError(O3liteError):
  """A checkpoint that is missing, cannot be read, or is not of the expected kind."""


class RunFolderError(O3liteError):
  """A run folder that is not one, or whose saved settings differ from this run's."""


class NonFiniteError(O3liteError):
  """Training produced a run of non-finite losses or gradients (e.g. a NaN learning
  rate, or data that overflows the model): the run stops, earlier checkpoints stay."""


# Config fields renamed since an earlier o3lite, and what replaced each: a config (or a
# --config.x= flag) that still names one is a one-line error naming the new field.
RENAMED = {
    "train.init_from": "init_from", "train.init_from_hf": "init_from",
    "rl.sft_init": "init_from", "rl.init_from_hf": "init_from",
    "verifier.policy": "init_from", "verifier.init_from": "verifier.trunk_from",
    "verifier.init_from_hf": "verifier.trunk_from",
    "train.num_steps": "loop.num_steps (RL's warm start: warm_start.loop.num_steps)",
    "train.batch_size": "sft.batch_size (RL's warm start: warm_start.sft.batch_size)",
    "rl.num_steps": "loop.num_steps", "rl.optimizer": "optimizer",
    "verifier.num_steps": "loop.num_steps", "verifier.optimizer": "optimizer",
    "rl.process_reward.verifier": "rl.process_reward.options.verifier (with "
                                  "rl.process_reward.function=prm)",
    "rl.process_reward.batch_size": "rl.process_reward.options.batch_size",
}


def renamed_message(old: str) -> str:
  new = RENAMED[old]
  what = " (a run folder or a local Hugging Face folder)" if new == "init_from" else ""
  return f"{old} was replaced by {new}{what}"


def exit_with(error) -> None:
  """Print `o3lite: <Type>: <first line>` on stderr and exit with status 1."""
  message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
  name = type(error).__name__ if isinstance(error, BaseException) else "error"
  print(f"o3lite: {name}: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser for the entry points, but a bad flag or config override is one
  line (`o3lite: config error: ...`) and exit status 1."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for arg in argv[1:]:
    key = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and key in RENAMED:
      print(f"o3lite: config error: {renamed_message(key)}", file=sys.stderr, flush=True)
      sys.exit(1)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, and config_flags' KeyError/AttributeError/...
    while e.args and isinstance(e.args[0], BaseException):  # Unwrap nested re-raises.
      e = e.args[0]
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    if isinstance(e, KeyError):
      message = f"unknown config key {message}"
    message = " ".join(message.split())
    print(f"o3lite: config error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
