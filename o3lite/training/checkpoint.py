"""Orbax checkpoints: train state (params, optimizer state, step, RNG) and data position.

Saves every `save_every` steps, asynchronously, keeping the last `keep`. Orbax writes a
step to a temporary folder and renames it only when complete, so a save cut off half way
is never seen as a checkpoint and the previous one still restores.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from o3lite import errors


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items o3lite saves."""

  def __init__(self, directory: str, save_every: int, keep: int | None,
               async_save: bool = True, kind: str = ""):
    """`kind` names what the state is ("sft", "rl-gae", ...): saved beside it, so that
    restoring a checkpoint of another kind says so instead of calling it corrupt."""
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.kind = kind
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def due(self, step: int) -> bool:
    """Whether `step` is on the save interval."""
    return step % self.save_every == 0

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: int, force: bool = False) -> bool:
    """Save if `step` is on the interval (or `force`); returns whether it saved."""
    if step in self.all_steps() or (not force and not self.due(step)):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave({"position": int(data_position),
                                                      "kind": self.kind}))
    return self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
    """(state placed with `abstract_state`'s shardings, data position)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise errors.CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise errors.CheckpointError(f"no checkpoint for step {step} in {self.directory}")
    where = os.path.join(self.directory, str(step))
    try:
      data = self._manager.restore(step, args=ocp.args.Composite(
          data=ocp.args.JsonRestore())).data
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise errors.CheckpointError(f"checkpoint {where} is corrupt: its data position "
                                   f"cannot be read ({type(e).__name__})") from e
    kind = data.get("kind", "")
    if self.kind and kind and kind != self.kind:
      raise errors.CheckpointError(
          f"checkpoint {where} holds a {kind!r} state, not the {self.kind!r} state this "
          "run trains: use another workdir (its parameters can still be read: "
          "init_from, evaluate, export)")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # Orbax raises many types for unreadable files.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise errors.CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} is corrupt or "
          f"incompatible: {type(e).__name__}: {reason[:300]}") from e
    return restored.state, int(restored.data["position"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_params(directory: str, abstract_params: dict[str, Any],
                   step: int | None = None) -> tuple[dict[str, Any], int]:
  """(the named trainable trees of a checkpoint, its step) (latest, or `step`), e.g.
  `{"policy": abstract}`, placed with the shardings of `abstract_params`; nothing else
  is read (orbax partial restore). Works on any run folder's checkpoints, SFT or RL:
  every o3lite state keeps its policy at `params["policy"]`. The one way to take
  parameters from another run (warm starts, evaluation, export)."""
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f"checkpoint folder {directory} does not exist")
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise errors.CheckpointError(
          f"no checkpoint{'' if step is None else f' for step {step}'} in {directory}")
    item = {"params": abstract_params}
    # Leaves with a sharding are placed with it; leaves without one come back as host
    # numpy arrays (export reads a checkpoint that way, on no mesh).
    restore_args = jax.tree_util.tree_map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype)
        if getattr(a, "sharding", None) is not None
        else ocp.RestoreArgs(restore_type=np.ndarray), item)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    try:
      restored = manager.restore(step, args=args)
    except Exception as e:  # Orbax raises many types for unreadable files.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise errors.CheckpointError(
          f"checkpoint {os.path.join(directory, str(step))} does not hold "
          f"{sorted(abstract_params)} parameters of this model: {type(e).__name__}: "
          f"{reason[:300]}") from e
  finally:
    manager.close()
  return restored.state["params"], step
