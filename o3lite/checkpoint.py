"""Orbax checkpoints: train state (params, optimizer state, step, RNG) and data position.

Saves every `save_every` steps, asynchronously, keeping the last `keep`. Orbax writes a
step to a temporary folder and renames it only when complete, so a save cut off half way
is never seen as a checkpoint and the previous one still restores.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that is missing or cannot be read."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items o3lite saves."""

  def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: int, force: bool = False) -> bool:
    """Save if `step` is on the interval (or `force`); returns whether it saved."""
    if step in self.all_steps() or (not force and step % self.save_every):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave({"position": int(data_position)}))
    return self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
    """(state placed with `abstract_state`'s shardings, data position)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # Orbax raises many types for unreadable files.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} is corrupt or "
          f"incompatible: {type(e).__name__}: {reason[:300]}") from e
    return restored.state, int(restored.data["position"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_params(directory: str, abstract_state: Any) -> Any:
  """Parameters of the latest checkpoint in `directory` (e.g. an SFT run's)."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint folder {directory} does not exist")
  ckpt = Checkpointer(directory, save_every=1, keep=1, async_save=False)
  try:
    state, _ = ckpt.restore(abstract_state)
  finally:
    ckpt.close()
  return state.params


def restore_params_only(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Only the parameters of a checkpoint (latest, or `step`), placed with the shardings
  of `abstract_params`; the optimizer state is never read (orbax partial restore)."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint folder {directory} does not exist")
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise CheckpointError(f"no checkpoint{'' if step is None else f' for step {step}'} "
                            f"in {directory}")
    item = {"params": abstract_params}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    try:
      restored = manager.restore(step, args=args)
    except Exception as e:  # Orbax raises many types for unreadable files.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {os.path.join(directory, str(step))} does not hold parameters of "
          f"this model: {type(e).__name__}: {reason[:300]}") from e
  finally:
    manager.close()
  return restored.state["params"]
