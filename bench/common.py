"""What the benchmarks share: the machine description, result files, Markdown tables,
XLA's memory figures of a compiled function."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from typing import Any, Sequence

from absl import flags
import jax

from o3lite.parallel import host_memory

KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory", True, "As `python -m o3lite.train` does: glibc's malloc reuses "
    "freed memory on CPU-only machines (o3lite/parallel/host_memory.py). Process-wide: "
    "the torch baseline gets it too.")

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def setup_host_memory() -> bool:
  """Apply --keep_host_memory; call first in main(), before JAX starts its threads."""
  return (KEEP_HOST_MEMORY.value and host_memory.cpu_only()
          and host_memory.keep_freed_memory())


def environment() -> dict[str, Any]:
  """Where and on what a result was measured."""
  def git(*args):
    try:
      return subprocess.run(["git", *args], capture_output=True, text=True,
                            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return None

  commit = git("rev-parse", "--short", "HEAD") or "unknown"
  dirty = git("status", "--porcelain", "--untracked-files=no")
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "git_commit": commit,
      "git_dirty": bool(dirty),  # Uncommitted changes to tracked files were measured too.
      "host": platform.node(),
      "cpu_count": os.cpu_count(),
      "load_average_1_5_15min": os.getloadavg(),  # Other work on the machine skews timings.
      "jax": jax.__version__,
      "devices": [str(d) for d in jax.devices()],
      "keep_host_memory": KEEP_HOST_MEMORY.value,  # glibc malloc reuses freed memory.
  }


def warn_if_busy() -> None:
  """Prints a warning when other processes already load the CPUs (timings get noisy)."""
  load, cpus = os.getloadavg()[0], os.cpu_count() or 1
  if load > 0.5 * cpus:
    print(f"WARNING: 1-minute load average {load:.1f} on {cpus} CPUs: other work is "
          "running, so timings will be noisy.", flush=True)


def write_results(name: str, results: dict[str, Any]) -> str:
  """Writes `bench/results/{name}.json` with the environment added; returns the path."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"environment": environment(), **results}, f, indent=2)
  return path


def best_of(fn, repeats: int):
  """(best seconds of `repeats` timed calls, the last result): one untimed call first,
  which compiles."""
  result = fn()
  best = float("inf")
  for _ in range(repeats):
    begin = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - begin)
  return best, result


def best_of_interleaved(fns: Sequence[Any], repeats: int
                        ) -> list[tuple[float, Any, list[float]]]:
  """`best_of` for several functions that take turns (one untimed call each first), so
  a slow spell of the machine hits them alike: per function (best seconds, last result,
  every turn's seconds)."""
  results = [fn() for fn in fns]
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      begin = time.perf_counter()
      results[i] = fn()
      times[i].append(time.perf_counter() - begin)
  return [(min(t), r, t) for t, r in zip(times, results)]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table; cells are already-formatted strings (or str()-able)."""
  lines = ["| " + " | ".join(headers) + " |",
           "| " + " | ".join("---" for _ in headers) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
