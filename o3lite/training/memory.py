"""The memory check before a stage's work: its jitted steps compiled at their shapes
(nothing allocated) and XLA's buffer assignment held against what a device has.

A stage's `Plan.compile` returns its steps compiled ahead of time for abstract arguments
(`step.jit_train_step(...).compile(abstract_state, abstract_batch)`); the later calls
reuse those executables, so the check costs a trace, not a compile. Each step needs

  peak = arguments + temporaries + outputs not aliased to donated arguments

bytes per device (`compiled_memory`). The harness (`stage.run`) raises a one-line
ConfigError naming the stage's settings that shrink it when the largest peak exceeds
`device_bytes`: a GPU's or TPU's memory limit, or on the CPU the machine's physical
memory shared by its (simulated) devices, less what an o3lite process holds beside its
step buffers (`CPU_PROCESS_BYTES`: the libraries, the compiler's working memory, data
and host copies; measured in RESULTS.md, "SmolLM2 RL").
"""

from __future__ import annotations

import os
from typing import Any

import jax

from o3lite import errors

GIB = 1024 ** 3
# What a CPU process holds beside its steps' buffers: measured (RESULTS.md) for
# SmolLM2-135M, whose compiles alone take about 2.5 GiB of host memory.
CPU_PROCESS_BYTES = 3 * GIB


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's buffer assignment of a compiled function, in bytes per device: its arguments,
  outputs (those aliased to donated arguments counted once), temporaries, and the peak =
  arguments + temporaries + outputs not aliased to a donated input."""
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
  out["peak"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
  return out


def device_bytes(mesh: jax.sharding.Mesh) -> int | None:
  """Bytes one device of `mesh` can hold for a step; None where the backend does not say.
  On the CPU: physical memory less CPU_PROCESS_BYTES, split over the local devices."""
  device = mesh.devices.flat[0]
  if device.platform == "cpu":
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (physical - CPU_PROCESS_BYTES) // len(jax.local_devices(backend="cpu"))
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def check(compiled: dict[str, Any], limit: int | None, settings: str) -> dict[str, int]:
  """{name: peak bytes} of each compiled step; a ConfigError naming the largest and
  `settings` (what shrinks it) when it exceeds `limit`."""
  peaks = {name: compiled_memory(c)["peak"] for name, c in compiled.items()}
  if limit is None or not peaks:
    return peaks
  name, peak = max(peaks.items(), key=lambda kv: kv[1])
  if peak > limit:
    raise errors.ConfigError(
        f"the {name} needs about {peak / GIB:.1f} GiB per device (XLA's estimate), more "
        f"than the {limit / GIB:.1f} GiB a device has here: {settings} (or "
        "loop.memory_check=False to run anyway)")
  return peaks
