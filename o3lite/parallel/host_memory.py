"""Keep freed host memory for reuse: glibc malloc settings for XLA:CPU's step buffers.

XLA:CPU allocates a compiled step's temporaries as one buffer (590 MB for the SFT step of
`bench/train_speed.py`) from a worker thread, and frees it when the step ends. glibc
serves an allocation that large with a fresh `mmap` and unmaps it on free, so every step
page-faults all its temporaries in again: there, 150,000 page faults and 350 ms of kernel
time per step. With one malloc arena that never maps nor trims, the freed pages are reused:
the step ran 1.2x faster (RESULTS.md, "Train step speed").

`keep_freed_memory()` must run before JAX starts its CPU client (threads choose their
arena at their first malloc), so `python -m o3lite.train` calls it first thing, where
`cpu_only()` says JAX will run on the CPU (never on a GPU or TPU machine); pass
`--nokeep_host_memory` to leave glibc's defaults. The price: the process keeps its peak
host memory until it exits, and its threads share one arena's lock.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_only() -> bool:
  """Whether JAX will compute on the CPU, told without starting JAX (the setting must
  come first): JAX_PLATFORMS if set, else no NVIDIA, AMD or TPU device node. The setting
  helps XLA:CPU's step buffers only; on an accelerator it would just keep host memory."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not (glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
              or os.path.exists("/dev/kfd"))


def keep_freed_memory() -> bool:
  """Set glibc's malloc to reuse freed memory; False (and nothing changed) off glibc."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only.
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  settings = ((_M_ARENA_MAX, 1),  # One arena: the main one, grown with brk.
              (_M_MMAP_MAX, 0),  # Never serve a request with its own mmap.
              (_M_TRIM_THRESHOLD, 2**31 - 1))  # Never give freed memory back to the OS.
  return all(mallopt(param, value) == 1 for param, value in settings)
