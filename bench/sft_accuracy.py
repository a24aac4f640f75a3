r"""Held-out accuracy of SFT with a chain of thought vs answer only, same model and steps.

  python -m bench.sft_accuracy                                   # both variants, as configured
  python -m bench.sft_accuracy --num_steps=30 --eval_examples=50 # smoke run
  python -m bench.sft_accuracy --variants=answer_only

Trains `configs/sft.py` then `configs/sft_answer_only.py` with `o3lite.stages.run`,
each in a fresh workdir, and reads each run's `eval.json`. The wall time covers the whole
run (tokenizer, compile, training, checkpoints, greedy evaluation); the dataset is
prepared beforehand so the first variant does not pay for it. Prints a Markdown table and
writes `bench/results/sft_accuracy.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax

from bench import common
from configs import sft, sft_answer_only
from o3lite.model import transformer as model_lib
from o3lite import stages
from o3lite.training import stage as stage_lib
from o3lite.data import sources

VARIANTS = {  # name -> (config module, label in the table)
    "cot": (sft, "chain of thought (`configs/sft.py`)"),
    "answer_only": (sft_answer_only, "answer only (`configs/sft_answer_only.py`)"),
}

_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Which of {list(VARIANTS)} to run.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Train steps (default: the config's).")
_EVAL_EXAMPLES = flags.DEFINE_integer(
    "eval_examples", None, "Held-out problems evaluated (default: the config's).")
_WORKDIR_ROOT = flags.DEFINE_string(
    "workdir_root", None, "Folder for the runs' workdirs (default: a new temporary one).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", os.path.expanduser("~/.cache/o3lite/datasets"), "Shared TFDS data dir.")


def count_params(workdir: str) -> int:
  """Parameters of the model a run trained, from its `model_config.json`."""
  with open(os.path.join(workdir, "model_config.json")) as f:
    model_cfg = model_lib.ModelConfig(**json.load(f))
  abstract = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
  return model_lib.count_params(abstract)


def read_eval(workdir: str) -> dict:
  """`eval.json`, with the mean completion length taken from the samples if absent."""
  with open(os.path.join(workdir, "eval.json")) as f:
    metrics = stage_lib.headline(json.load(f))
  if "mean_completion_tokens" not in metrics:
    with open(os.path.join(workdir, "eval_samples.jsonl")) as f:
      lengths = [json.loads(line)["completion_tokens"] for line in f if line.strip()]
    metrics["mean_completion_tokens"] = sum(lengths) / max(len(lengths), 1)
  return metrics


def run_variant(name: str, root: str) -> dict:
  module, label = VARIANTS[name]
  config = module.get_config()
  config.data.data_dir = _DATA_DIR.value
  if _NUM_STEPS.value is not None:
    config.loop.num_steps = _NUM_STEPS.value
  if _EVAL_EXAMPLES.value is not None:
    config.eval.num_examples = _EVAL_EXAMPLES.value
  sources.get_builder(config.data)  # Prepare (or find) the dataset outside the timing.
  workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=root)  # Fresh: never resumes.
  print(f"== {name}: {workdir}", flush=True)
  start = time.perf_counter()
  stages.run(config, workdir)
  wall_s = time.perf_counter() - start
  metrics = read_eval(workdir)
  return {
      "variant": name,
      "label": label,
      "workdir": workdir,
      "accuracy": metrics["accuracy"],
      "num_examples": metrics["num_examples"],
      "split": metrics["split"],
      "train_steps": metrics.get("step", config.loop.num_steps),
      "wall_seconds": wall_s,
      "parameters": count_params(workdir),
      "mean_completion_tokens": metrics["mean_completion_tokens"],
      "eval": metrics,
      "config": json.loads(config.to_json_best_effort()),
  }


def table(results: list[dict]) -> str:
  headers = ["variant", "held-out accuracy", "problems", "train steps", "wall time",
             "parameters", "mean completion tokens"]
  rows = [[r["label"], f"{r['accuracy']:.1%}", f"{r['num_examples']} ({r['split']})",
           r["train_steps"], f"{r['wall_seconds']:.0f} s", f"{r['parameters']:,}",
           f"{r['mean_completion_tokens']:.1f}"] for r in results]
  return common.markdown_table(headers, rows)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint save at INFO.
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
  common.warn_if_busy()
  root = _WORKDIR_ROOT.value or tempfile.mkdtemp(prefix="o3lite-bench-")
  os.makedirs(root, exist_ok=True)
  results = [run_variant(name, root) for name in _VARIANTS.value]
  path = common.write_results("sft_accuracy", {"runs": results})
  print(f"\nwrote {path}\n")
  print(table(results))


if __name__ == "__main__":
  app.run(main)
