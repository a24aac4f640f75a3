r"""Entry point: evaluate a training run's checkpoint on a held-out split, or sweep
test-time search strategies.

  python -m o3lite.evaluate --config=configs/test_time.py --workdir=DIR
      # every strategy of the config at every budget: DIR/test_time.{json,md,png}
      # (o3lite/search/sweep.py); overrides as in training: --config.num_problems=50

  python -m o3lite.evaluate --workdir=DIR [--split=test] [--num_examples=500]
      [--mesh_shape=-1,1,1]   # another mesh than the run's (e.g. fewer devices)
      [--num_samples=8 --temperature=0.8] [--think_budgets=4,8,16]

The checkpoint, tokenizer and config come from DIR; settings default to the run's `eval`
section. Writes DIR/eval_<split>.json and DIR/eval_<split>_samples.jsonl, prints a table.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder of a training run (or, with "
                               "--config, the sweep's output folder).", required=True)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A test-time sweep config (configs/test_time.py).", lock_config=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string("split", None, "Held-out split (default: the run's).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Problems to evaluate.")
_OVERRIDES = {
    "max_new_tokens": flags.DEFINE_integer("max_new_tokens", None, "Generated tokens cap."),
    "batch_size": flags.DEFINE_integer("batch_size", None, "Prompts decoded together."),
    "num_samples": flags.DEFINE_integer("num_samples", None,
                                        "Samples per problem for pass@k / maj@k."),
    "temperature": flags.DEFINE_float("temperature", None, "Temperature of the samples."),
    "top_p": flags.DEFINE_float("top_p", None, "Nucleus sampling of the samples."),
    "seed": flags.DEFINE_integer("seed", None, "Sampling seed."),
}
_BUDGETS = flags.DEFINE_list("think_budgets", None, "Thinking budgets (tokens) to try.")
_MESH = flags.DEFINE_list("mesh_shape", None, "Mesh shape to evaluate on, e.g. -1,1,1 "
                          "(default: the run's own, which must fit the devices here).")


def _run_stage(config) -> None:
  """A config file given: run its stage (the test-time sweep, or any registered one)."""
  from o3lite import errors  # pylint: disable=g-import-not-at-top
  from o3lite import stages  # pylint: disable=g-import-not-at-top
  try:
    stages.run(config, _WORKDIR.value)
  except errors.O3liteError as e:
    errors.exit_with(e)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is not None:
    return _run_stage(_CONFIG.value)
  import jax  # pylint: disable=g-import-not-at-top
  from o3lite import errors  # pylint: disable=g-import-not-at-top
  from o3lite.evaluation import heldout as evaluation  # pylint: disable=g-import-not-at-top
  from o3lite.training import sft  # pylint: disable=g-import-not-at-top
  try:
    mesh_shape = None
    if _MESH.value is not None:
      try:
        mesh_shape = tuple(int(s) for s in _MESH.value)
      except ValueError:
        raise errors.ConfigError(f"--mesh_shape={','.join(_MESH.value)}: expected "
                                 "integers, e.g. -1,1,1") from None
    run, params = sft.load_run(_WORKDIR.value, _STEP.value, mesh_shape)
    eval_cfg = run.config.eval
    with run.config.unlocked():
      for key, flag in _OVERRIDES.items():
        if flag.value is not None:
          eval_cfg[key] = flag.value
      if _BUDGETS.value is not None:
        eval_cfg.think_budgets = tuple(int(b) for b in _BUDGETS.value)
    split = _SPLIT.value or eval_cfg.split
    metrics, samples = sft.evaluate(run, params, split,
                                    _NUM_EXAMPLES.value or eval_cfg.num_examples)
  except errors.O3liteError as e:
    errors.exit_with(e)
  if jax.process_index() == 0:
    path = evaluation.write_eval(_WORKDIR.value, metrics, samples, name=f"eval_{split}")
    print(evaluation.format_table(metrics))
    print(f"wrote {path}")


if __name__ == "__main__":
  from o3lite import errors as errors_lib  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=errors_lib.parse_flags)
