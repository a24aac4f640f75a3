"""Multi-process start-up: every process of a pod slice or cluster joins one mesh."""

from __future__ import annotations

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
