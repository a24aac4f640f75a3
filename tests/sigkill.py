"""Kill a training command with SIGKILL once it has saved a given checkpoint."""

import os
import signal
import subprocess
import time

from o3lite.training import checkpoint as checkpoint_lib


def kill_after_checkpoint(cmd, workdir, step, *, cwd, env, timeout=300) -> int:
  """Run `cmd`, SIGKILL it as soon as `workdir/checkpoints/<step>` exists, and return the
  latest checkpoint step it left behind."""
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
    assert proc.poll() is None and time.time() < deadline, f"run ended before step {step}"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return max(checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), 1, 10).all_steps())
