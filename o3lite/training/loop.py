"""The one training loop: stepping, logging one step late, checkpoints, periodic
evaluation, non-finite steps and resume. SFT, RL and every later stage run through it.

  state = fit(state, iterate, Loop(...), checkpointer, writer, evaluate=...)

`iterate(state, position, step) -> (state, position, metrics)` does one iteration: an
SFT step on the batch at data position `position`, or an RL step (sample, score, update).
`metrics` may be device arrays: they are read one iteration late (nanodo), so the host
never waits on the step it just dispatched. A checkpoint holds the state and the data
position after the step it is named by; resuming restores both, so a killed run ends as
an uninterrupted one would.

Non-finite steps: an iteration whose metrics carry `nonfinite` > 0 applied no update
(see `step.make_train_step`); `Loop.max_nonfinite_in_a_row` of them in a row stop the
run with `NonFiniteError` naming the step. Checkpoints are saved only after finite
steps, so every checkpoint saved stays a good one to resume from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from o3lite import errors
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import metric_writer as metrics_lib


@dataclasses.dataclass(frozen=True)
class Loop:
  num_steps: int  # Iterations of the whole run (resume continues up to it).
  log_every: int = 50  # Iterations between console lines (metrics.jsonl: every logged one).
  log_all: bool = False  # Write every iteration's metrics to metrics.jsonl (RL), or only
  #                        every `log_every`-th (SFT).
  eval_every: int = 0  # Iterations between periodic evaluations (0 = none).
  max_nonfinite_in_a_row: int = 10  # Non-finite iterations in a row that stop the run.
  shown: tuple[str, ...] = ("loss",)  # Metrics on the console line.

  def __post_init__(self):
    if self.num_steps < 0 or self.log_every < 1 or self.eval_every < 0:
      raise errors.ConfigError(
          f"num_steps={self.num_steps}, log_every={self.log_every}, eval_every="
          f"{self.eval_every}: need num_steps >= 0, log_every >= 1, eval_every >= 0")
    if self.max_nonfinite_in_a_row < 1:
      raise errors.ConfigError(
          f"max_nonfinite_in_a_row={self.max_nonfinite_in_a_row} must be at least 1")


def restore_or_init(checkpointer: checkpoint_lib.Checkpointer, abstract_state: Any,
                    init: Callable[[], Any]) -> tuple[Any, int, int]:
  """(state, data position, iteration) from the latest checkpoint, else (init(), 0, 0)."""
  latest = checkpointer.latest_step()
  if latest is None:
    return init(), 0, 0
  state, position = checkpointer.restore(abstract_state)
  print(f"resumed from step {latest} of {checkpointer.directory}", flush=True)
  return state, position, latest


def fit(state: Any, iterate: Callable[[Any, int, int], tuple[Any, int, dict]],
        loop: Loop, checkpointer: checkpoint_lib.Checkpointer,
        writer: metrics_lib.MetricWriter, position: int = 0, start: int = 0,
        evaluate: Callable[[Any, int], dict] | None = None,
        host_metrics: Callable[[int], dict] | None = None) -> Any:
  """Runs iterations `start .. loop.num_steps - 1`; returns the final state.

  `evaluate(state, done) -> metrics` runs every `loop.eval_every` iterations (not at the
  last: the caller's final evaluation covers it); `host_metrics(done)` adds host-side
  figures (tokens/s, learning rate) to each logged line.
  """
  pending = None  # (done, metrics, extra, logged) of the previous iteration, read late.
  nonfinite_run, nonfinite_total = 0, 0

  def flush(item) -> None:
    nonlocal nonfinite_run, nonfinite_total
    done, metrics, extra, logged = item
    # Off the log interval only the non-finite flag leaves the device.
    bad = float(np.asarray(jax.device_get(metrics.get("nonfinite", 0.0)))) > 0
    nonfinite_run = nonfinite_run + 1 if bad else 0
    nonfinite_total += int(bad)
    if logged or bad:
      values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
      values.update(extra)
      values["nonfinite_steps"] = float(nonfinite_total)
      writer.write(done, values)
      if done % loop.log_every == 0 or done == loop.num_steps:
        writer.progress(done, {k: values[k] for k in loop.shown if k in values})
    if bad:
      print(f"step {done}: non-finite loss or gradient; update skipped "
            f"({nonfinite_run} in a row)", flush=True)
    if nonfinite_run >= loop.max_nonfinite_in_a_row:
      raise errors.NonFiniteError(
          f"{nonfinite_run} non-finite steps in a row, the last at step {done} (loss or "
          f"gradient NaN / inf; check the learning rate and the data); last checkpoint "
          f"at step {checkpointer.latest_step()} in {checkpointer.directory}")

  try:
    for step in range(start, loop.num_steps):
      state, position, metrics = iterate(state, position, step)
      done = step + 1
      last = done == loop.num_steps
      if pending is not None:
        flush(pending)
      logged = loop.log_all or done % loop.log_every == 0 or last
      extra = host_metrics(done) if logged and host_metrics else {}
      pending = (done, metrics, extra, logged)
      if checkpointer.due(done) or last:
        # A checkpoint only after a finite step: read this step's metrics now (rarely).
        flush(pending)
        pending = None
        if nonfinite_run == 0:
          checkpointer.save(done, state, position, force=True)
      if evaluate and loop.eval_every and done % loop.eval_every == 0 and not last:
        evaluate(state, done)
    if pending is not None:
      flush(pending)
  finally:
    checkpointer.wait()
  return state
