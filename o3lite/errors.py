"""Bad input ends a run with one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import sys

from o3lite.checkpoint import CheckpointError
from o3lite.sharding import MeshError

# Errors that come from the user's input (data, config, mesh, checkpoint), not from bugs.
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, CheckpointError,
               MeshError)


def exit_with(error) -> None:
  message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
  name = type(error).__name__ if isinstance(error, BaseException) else "error"
  print(f"o3lite: {name}: {message}", file=sys.stderr, flush=True)
  sys.exit(1)
