r"""Entry point: export an o3lite run as a Hugging Face checkpoint folder.

  python -m o3lite.export --workdir=DIR --out=HF_DIR [--step=N] [--overwrite]

Reads DIR/model_config.json and DIR/tokenizer/, restores only the parameters of the
latest (or given) checkpoint in DIR/checkpoints/ (orbax partial restore: the optimizer
state is neither read nor needed), and writes HF_DIR for
`transformers.AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(HF_DIR)`.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import flax.linen as nn
import jax

from o3lite.training import checkpoint as checkpoint_lib
from o3lite import errors
from o3lite.interop import huggingface as hf
from o3lite.interop import hf_tokenizer_files as hf_tokenizer
from o3lite.model import transformer as model_lib
from o3lite.training import run_folder

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder of `python -m o3lite.train`.")
_OUT = flags.DEFINE_string("out", None, "Folder to write the Hugging Face checkpoint to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out.")


def export_run(workdir: str, out_dir: str, step: int | None = None,
               overwrite: bool = False) -> int:
  """Exports the parameters of `workdir`'s checkpoint at `step`; returns the step."""

  if not os.path.isdir(workdir):
    raise errors.RunFolderError(f"run folder not found: {workdir}")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise errors.ConfigError(f"{out_dir} exists and is not a folder; give --out a folder")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise errors.ConfigError(f"{out_dir} is not empty; pass --overwrite to write into it")
  cfg = run_folder.load_model_config(workdir)
  tokenizer = hf_tokenizer.load_saved(os.path.join(workdir, "tokenizer"))
  abstract = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(
      cfg, jax.random.PRNGKey(0))))  # No shardings: restored as host numpy arrays.
  params, step = checkpoint_lib.restore_params(
      os.path.join(workdir, run_folder.CHECKPOINT_DIR), {"policy": abstract}, step)
  hf.export(params["policy"], cfg, tokenizer, out_dir)
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  if not _WORKDIR.value or not _OUT.value:
    errors.exit_with(errors.ConfigError("--workdir and --out are required"))
  try:
    step = export_run(_WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value)
  except errors.O3liteError as e:
    errors.exit_with(e)
  print(f"exported step {step} of {_WORKDIR.value} to {os.path.abspath(_OUT.value)}",
        flush=True)


if __name__ == "__main__":
  app.run(main)
