r"""Held-out pass@1 (and greedy accuracy, pass@k) over the steps of an RL run, as a plot.

  python -m bench.rl_curve --workdir=DIR [--out=DIR/rl_curve.png]

Reads the run folder only: DIR/eval_before.json (step 0, the policy RL started from),
the periodic held-out evaluations in DIR/metrics.jsonl (`loop.eval_every`), the final
one in DIR/eval.json,
and each step's rollout accuracy (the mean correctness of the step's sampled completions
at the rollout temperature: pass@1 on that step's training prompts). Writes the PNG and
prints the held-out figures as a Markdown table.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from bench import common

_WORKDIR = flags.DEFINE_string("workdir", None, "An RL run folder.", required=True)
_OUT = flags.DEFINE_string("out", "", "The PNG (default: DIR/rl_curve.png).")


def read_curves(workdir: str) -> tuple[dict[int, dict], list[tuple[int, float]]]:
  """({step: held-out metrics}, [(step, rollout accuracy)]) of an RL run folder."""
  with open(os.path.join(workdir, "eval_before.json")) as f:
    held_out = {0: json.load(f)}
  rollouts = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      evals = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
      if evals:
        held_out[record["step"]] = evals
      elif "accuracy" in record:
        rollouts.append((record["step"], record["accuracy"]))
  # The final evaluation is eval.json's "after", at the last RL step (runs before this
  # fix logged it at the optimizer-update count instead).
  last = max((step for step, _ in rollouts), default=0)
  held_out = {step: m for step, m in held_out.items() if step <= last}
  with open(os.path.join(workdir, "eval.json")) as f:
    held_out[last] = json.load(f)["after"]
  return held_out, rollouts


def plot(held_out: dict[int, dict], rollouts: list[tuple[int, float]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = sorted(held_out)
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for key, style in (("pass@1", "o-"), ("accuracy", "s--"), ("pass@8", "^:")):
    points = [(s, held_out[s][key]) for s in steps if key in held_out[s]]
    if points:
      label = "greedy accuracy" if key == "accuracy" else key
      ax.plot(*zip(*points), style, label=f"held-out {label}")
  if rollouts:
    ax.plot(*zip(*rollouts), color="0.6", lw=1, label="rollout accuracy (training prompts)")
  ax.set_xlabel("RL step")
  ax.set_ylabel("fraction correct")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  held_out, rollouts = read_curves(_WORKDIR.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "rl_curve.png")
  plot(held_out, rollouts, out)
  keys = [k for k in ("accuracy", "pass@1", "pass@2", "pass@4", "pass@8", "maj@8")
          if k in held_out[0]]
  print(common.markdown_table(["RL step"] + ["greedy" if k == "accuracy" else k for k in keys],
                              [[s] + [f"{held_out[s][k]:.3f}" for k in keys]
                               for s in sorted(held_out)]))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
