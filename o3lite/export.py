r"""Entry point: export an o3lite run as a Hugging Face checkpoint folder.

  python -m o3lite.export --workdir=DIR --out=HF_DIR [--step=N] [--overwrite]

Reads DIR/model_config.json and DIR/tokenizer/, restores only the parameters of the
latest (or given) checkpoint in DIR/checkpoints/ (orbax partial restore: the optimizer
state is neither read nor needed), and writes HF_DIR for
`transformers.AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(HF_DIR)`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from o3lite import checkpoint as checkpoint_lib
from o3lite import errors
from o3lite import hf
from o3lite import hf_tokenizer
from o3lite import model as model_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder of `python -m o3lite.train`.")
_OUT = flags.DEFINE_string("out", None, "Folder to write the Hugging Face checkpoint to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out.")


def restore_params(checkpoint_dir: str, cfg, step: int | None = None) -> tuple[Any, int]:
  """(fp32 numpy params, step) of a run checkpoint, without its optimizer state."""
  if not os.path.isdir(checkpoint_dir):
    raise checkpoint_lib.CheckpointError(f"no checkpoint folder {checkpoint_dir}")
  manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = list(manager.all_steps())
    if not steps:
      raise checkpoint_lib.CheckpointError(f"no checkpoint in {checkpoint_dir}")
    step = max(steps) if step is None else step
    if step not in steps:
      raise checkpoint_lib.CheckpointError(
          f"no checkpoint for step {step} in {checkpoint_dir}; steps: {sorted(steps)}")
    abstract = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(
        cfg, jax.random.PRNGKey(0))))
    item = {"params": abstract}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    try:
      restored = manager.restore(step, args=args)
    except Exception as e:  # Orbax raises many types for unreadable files.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise checkpoint_lib.CheckpointError(
          f"checkpoint {os.path.join(checkpoint_dir, str(step))} does not hold the "
          f"parameters of model_config.json: {type(e).__name__}: {reason[:300]}") from e
  finally:
    manager.close()
  return restored.state["params"], step


def export_run(workdir: str, out_dir: str, step: int | None = None,
               overwrite: bool = False) -> int:
  """Exports the parameters of `workdir`'s checkpoint at `step`; returns the step."""

  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"run folder not found: {workdir}")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to write into it")
  config_file = os.path.join(workdir, "model_config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no model_config.json in {workdir}")
  with open(config_file) as f:
    try:
      cfg = model_lib.ModelConfig(**json.load(f))
    except TypeError as e:
      raise ValueError(f"{config_file} does not fit ModelConfig: {e}") from e
  tokenizer = hf_tokenizer.load_saved(os.path.join(workdir, "tokenizer"))
  params, step = restore_params(os.path.join(workdir, "checkpoints"), cfg, step)
  hf.export(params, cfg, tokenizer, out_dir)
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  if not _WORKDIR.value or not _OUT.value:
    errors.exit_with(ValueError("--workdir and --out are required"))
  try:
    step = export_run(_WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value)
  except (*errors.USER_ERRORS, FileExistsError) as e:
    errors.exit_with(e)
  print(f"exported step {step} of {_WORKDIR.value} to {os.path.abspath(_OUT.value)}",
        flush=True)


if __name__ == "__main__":
  app.run(main)
