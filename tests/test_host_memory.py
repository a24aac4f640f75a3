"""glibc malloc settings that let XLA:CPU reuse its freed step buffers."""

import subprocess
import sys
import textwrap


def _refault_count(keep: bool) -> int:
  """Page faults of malloc-ing, touching and freeing a 200 MB buffer a second time (as
  XLA:CPU does with its temporaries at every step), in a fresh process."""
  code = textwrap.dedent(f"""
      import ctypes, resource
      from o3lite.parallel import host_memory
      if {keep}:
        assert host_memory.keep_freed_memory()
      libc = ctypes.CDLL(None)
      libc.malloc.restype = ctypes.c_void_p
      libc.free.argtypes = [ctypes.c_void_p]
      size = 200 * 2**20
      def step():
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)
        libc.free(buffer)
      step()
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      step()
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  return int(result.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
  # glibc's default maps the 200 MB afresh each time: 51,200 first-touch faults of 4 KiB
  # pages here (fewer where transparent huge pages are on for all memory).
  assert _refault_count(keep=True) < 100


def test_the_setting_is_for_cpu_only_machines(monkeypatch):
  from o3lite.parallel import host_memory  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.cpu_only()
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(host_memory.glob, "glob",
                      lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
  assert not host_memory.cpu_only()
