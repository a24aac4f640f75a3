"""Multi-process runs: every process of a pod slice or cluster joins one mesh; host data
that one process decides reaches the others."""

from __future__ import annotations

from typing import Any

import jax


def maybe_initialize(multiprocess: bool, coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> None:
  """Call `jax.distributed.initialize()` when the run spans several processes.

  On TPU VMs the arguments are discovered from the environment; elsewhere give the
  coordinator's host:port, the number of processes and this process's id. On CPU the
  processes exchange data through gloo collectives.
  """
  if not multiprocess and coordinator_address is None:
    return
  # Only affects CPU devices; must be set before any backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def broadcast_from_process_0(tree: Any) -> Any:
  """Process 0's `tree` of numpy arrays, on every process (the others' values are only
  shapes: each process passes arrays of the same shapes and dtypes). A collective: every
  process calls it at the same point. With one process, the tree as it is."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.broadcast_one_to_all(tree)
