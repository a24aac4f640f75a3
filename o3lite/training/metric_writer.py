"""Metric outputs: console progress (rate, ETA), TensorBoard events, metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import numpy as np
from tensorboardX import SummaryWriter


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricWriter:
  """Writes one flat dict of scalars per logged step to every output.

  On resume from step `start_step`, lines of metrics.jsonl past that step (written after
  the last checkpoint by the interrupted run) are dropped, so the file has each step once.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               enabled: bool = True, stream=sys.stdout):
    self.enabled = enabled
    self.total_steps = total_steps
    self._stream = stream
    self._t0, self._step0 = time.time(), start_step
    if not enabled:
      return
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.jsonl_path):
      with open(self.jsonl_path) as f:
        kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= start_step]
      with open(self.jsonl_path, "w") as f:
        f.writelines(kept)
    self._jsonl = open(self.jsonl_path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    scalars = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def progress(self, step: int, metrics: Mapping[str, float]) -> None:
    """One console line with the key metrics, steps/s and ETA."""
    if not self.enabled:
      return
    elapsed = time.time() - self._t0
    rate = (step - self._step0) / elapsed if elapsed > 0 else float("nan")
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    shown = "  ".join(f"{k} {float(np.asarray(v)):.4g}" for k, v in metrics.items())
    print(f"step {step}/{self.total_steps}  {shown}  |  {rate:.2f} steps/s  "
          f"ETA {_fmt_seconds(eta)}", file=self._stream, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
