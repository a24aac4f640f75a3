"""The accuracy-against-compute sweep: every configured strategy at every budget, on the
same held-out problems, with the compute each spent, drawn as curves.

  python -m o3lite.evaluate --config=configs/test_time.py --workdir=DIR

`run_sweep(config, workdir)` writes
  DIR/test_time.json            one record per (strategy, budget): accuracy, generated and
                                verifier tokens per problem, wall time, per-problem hits
  DIR/test_time.md              the same as a table, and the compute-optimal choices
  DIR/test_time.png             accuracy against generated tokens per problem (log x), a
                                line per strategy
  DIR/test_time_difficulty.png  the same per difficulty bin (quantile bins of the policy's
                                own pass@1 on each problem, from `difficulty_from`'s
                                samples, as Snell et al. 2024 bin by difficulty), the
                                compute-optimal points of each bin ringed: those no other
                                point beats on accuracy with fewer generated tokens

It is a stage without training (`o3lite.training.stage`, method "test_time"): the harness
owns its run folder and DIR/eval.json (each strategy's accuracy at each budget).
With `init_from` (the policy), `prm` and `orm` empty it first makes them as the verifier issue does
(the `prm_pipeline` config, configs/prm.py's, in DIR/prm; `orm_pipeline`, configs/orm.py's,
on its policy and labels in DIR/orm), then sweeps. A verifier whose tokenizer is not the policy's, an unknown
strategy or a budget that is not positive is a one-line error, before any sampling.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from o3lite import errors
from o3lite.data import sources
from o3lite.training import run_folder
from o3lite.training import sft as sft_lib
from o3lite.training import stage as stage_lib
from o3lite.search import core
from o3lite.verifiers import reward_model
from o3lite.verifiers import run as verifier_run

VERIFIERS = ("", "prm", "orm")


def validate(config: ml_collections.ConfigDict) -> None:
  """Every entry names a registered strategy, a verifier slot and positive budgets."""
  if not config.strategies:
    raise errors.ConfigError("strategies is empty: give at least one")
  for label, entry in config.strategies.items():
    core.STRATEGIES.lookup(entry.strategy)
    if entry.verifier not in VERIFIERS:
      raise errors.ConfigError(f"strategies.{label}.verifier={entry.verifier!r}: expected "
                               f"one of {list(VERIFIERS)}")
    if not entry.budgets:
      raise errors.ConfigError(f"strategies.{label}.budgets is empty")
    for b in entry.budgets:
      if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise errors.ConfigError(f"strategies.{label}.budgets: {b!r} is not a positive int")
  if config.num_problems < 1 or config.difficulty_bins < 1:
    raise errors.ConfigError("num_problems and difficulty_bins must be at least 1")
  if config.difficulty_from and config.difficulty_from not in config.strategies:
    raise errors.ConfigError(f"difficulty_from={config.difficulty_from!r} is not one of "
                             f"the strategies {list(config.strategies)}")
  for name in ("init_from", "prm", "orm"):
    if config[name] and not run_folder.is_run(config[name]):
      raise errors.ConfigError(f"{name}={config[name]} is not an o3lite run folder")
  for slot in ("prm", "orm"):  # The verifier runs it makes first, checked now.
    if not config[slot]:
      stage_lib.validate(config[f"{slot}_pipeline"])


def prepare_models(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """The run folders of the policy and the verifiers; missing ones are made (and reused
  by a rerun) as the module docstring says."""
  folders = {"policy": config.init_from, "prm": config.prm, "orm": config.orm}
  used = {e.verifier for e in config.strategies.values()}
  if not folders["prm"] and ("prm" in used or not folders["policy"]):
    folders["prm"] = os.path.join(workdir, "prm")
    if stage_lib.read_result(folders["prm"]) is None:
      prm_cfg = ml_collections.ConfigDict(config.prm_pipeline.to_dict())
      if folders["policy"]:
        prm_cfg.init_from = folders["policy"]
      print(f"PRM: configs/prm.py's pipeline in {folders['prm']}", flush=True)
      stage_lib.run(prm_cfg, folders["prm"])
  if not folders["policy"]:
    folders["policy"] = os.path.join(folders["prm"], "policy")
  if not folders["orm"] and "orm" in used:
    folders["orm"] = os.path.join(workdir, "orm")
    if stage_lib.read_result(folders["orm"]) is None:
      orm_cfg = ml_collections.ConfigDict(config.orm_pipeline.to_dict())
      orm_cfg.init_from = folders["policy"]
      labels = os.path.join(folders["prm"] or "", verifier_run.TRAIN_LABELS)
      if folders["prm"] and os.path.isfile(labels):
        orm_cfg.verifier.labels = labels
        orm_cfg.verifier.eval_labels = os.path.join(folders["prm"], verifier_run.EVAL_LABELS)
      print(f"ORM: configs/orm.py in {folders['orm']}", flush=True)
      stage_lib.run(orm_cfg, folders["orm"])
  return folders


def load(config: ml_collections.ConfigDict, folders: dict[str, str]
         ) -> tuple[core.Policy, dict[str, Any], Any, list[dict]]:
  """(policy, {"prm": Verifier, "orm": Verifier} of the slots used, checker, problems)."""
  mesh_shape = tuple(config.mesh_shape) if config.mesh_shape else None
  run, params = sft_lib.load_run(folders["policy"], mesh_shape=mesh_shape)
  policy = core.Policy(params, run.model_cfg, run.tokenizer, run.mesh, run.rules)
  verifiers: dict[str, Any] = {"": None}
  for slot in ("prm", "orm"):
    if any(e.verifier == slot for e in config.strategies.values()):
      if not folders[slot]:
        raise errors.ConfigError(f"a strategy uses the {slot.upper()} but `{slot}` is empty")
      v = verifier_run.load_verifier(folders[slot], config.verifier_batch_size,
                                     tuple(run.config.mesh.shape) if mesh_shape is None
                                     else mesh_shape)
      if v.kind != slot:
        raise errors.ConfigError(f"{slot}={folders[slot]} holds a {v.kind.upper()}")
      reward_model.check_same_tokenizer(v.tokenizer, run.tokenizer,
                                        f"{slot}={folders[slot]}")
      verifiers[slot] = v
  problems = sft_lib.held_out_examples(run.config.data, config.split, config.num_problems)
  return policy, verifiers, sources.get_checker(run.config.data), problems


def difficulty(records: list[dict], label: str, bins: int) -> tuple[list[float], list[int]]:
  """Each problem's pass@1 (the fraction of `label`'s largest-budget candidates that
  are right) and its quantile bin, 0 = hardest."""
  mine = max((r for r in records if r["label"] == label), key=lambda r: r["budget"])
  pass1 = np.asarray(mine["candidate_accuracy"], np.float64)
  edges = np.quantile(pass1, np.linspace(0, 1, bins + 1)[1:-1]) if bins > 1 else []
  return pass1.tolist(), np.searchsorted(edges, pass1, side="right").astype(int).tolist()


def pareto(points: list[tuple[float, float, Any]]) -> list[Any]:
  """The (compute, accuracy, tag) points no other point beats: none reaches at least
  their accuracy with less compute (ties in compute: the more accurate)."""
  best, out = -1.0, []
  for x, y, tag in sorted(points, key=lambda p: (p[0], -p[1])):
    if y > best:
      out.append(tag)
      best = y
  return out


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Every strategy at every budget; writes and returns DIR/test_time.json's content
  (through the harness the config is checked first; called directly, from a notebook,
  the folder is made here)."""
  run_folder.prepare(workdir)
  folders = prepare_models(config, workdir)
  policy, verifiers, checker, problems = load(config, folders)
  sampling = core.Sampling(**dict(config.sampling))
  records = []
  for label, entry in config.strategies.items():
    for budget in entry.budgets:
      verifier = verifiers[entry.verifier]
      mine = sampling
      if entry.get("sampling"):  # This entry's own sampler settings.
        mine = core.Sampling(**{**dict(config.sampling), **dict(entry.sampling)})
      before = time.perf_counter()
      results = core.run_strategy(entry.strategy, problems, policy, verifier, budget,
                                  config.seed, sampling=mine, **dict(entry.options))
      seconds = time.perf_counter() - before
      hits = [bool(checker(r.answer, p["answer"])) for r, p in zip(results, problems)]
      record = {
          "label": label, "strategy": entry.strategy, "verifier": entry.verifier,
          "budget": int(budget), "accuracy": float(np.mean(hits)), "correct": hits,
          "generated_tokens": float(np.mean([r.compute.generated_tokens for r in results])),
          "verifier_tokens": float(np.mean([r.compute.verifier_tokens for r in results])),
          "wall_seconds": seconds, "seconds_per_problem": seconds / len(problems),
          "candidate_accuracy": [float(np.mean([bool(checker(a, p["answer"]))
                                                for a in r.answers])) if r.answers else 0.0
                                 for r, p in zip(results, problems)]}
      records.append(record)
      print(f"{label} @ {budget}: accuracy {record['accuracy']:.3f}, "
            f"{record['generated_tokens']:.0f} generated + {record['verifier_tokens']:.0f} "
            f"verifier tokens per problem, {seconds:.1f} s", flush=True)
  out: dict[str, Any] = {"policy": folders["policy"], "prm": folders["prm"],
                         "orm": folders["orm"], "split": config.split,
                         "num_problems": len(problems), "records": records}
  if config.difficulty_from:
    pass1, bins = difficulty(records, config.difficulty_from, config.difficulty_bins)
    out["pass_at_1"], out["difficulty_bin"] = pass1, bins
    out["bins"] = []
    for b in range(config.difficulty_bins):
      inside = [i for i, x in enumerate(bins) if x == b]
      rows = [{"label": r["label"], "budget": r["budget"],
               "generated_tokens": r["generated_tokens"],
               "accuracy": float(np.mean([r["correct"][i] for i in inside])) if inside
               else float("nan")} for r in records]
      optimal = pareto([(r["generated_tokens"], r["accuracy"], (r["label"], r["budget"]))
                        for r in rows if inside])
      out["bins"].append({"bin": b, "problems": len(inside),
                          "pass_at_1": float(np.mean([pass1[i] for i in inside]))
                          if inside else float("nan"),
                          "records": rows, "compute_optimal": [list(t) for t in optimal]})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "test_time.json"), "w") as f:
      json.dump(out, f, indent=1)
    with open(os.path.join(workdir, "test_time.md"), "w") as f:
      f.write(table(out))
    plot(out, os.path.join(workdir, "test_time.png"),
         os.path.join(workdir, "test_time_difficulty.png") if "bins" in out else None)
    print(f"wrote {workdir}/test_time.json, test_time.md, test_time.png", flush=True)
  return out


class TestTimeSweep(stage_lib.Stage):
  """The accuracy-against-compute sweep (no training of its own)."""

  name = "test_time"
  trains = False

  def validate(self, config) -> None:
    validate(config)

  def evaluate_only(self, config, workdir: str) -> dict:
    out = run_sweep(config, workdir)
    return {"split": out["split"], "num_problems": out["num_problems"],
            "accuracy": {f"{r['label']}@{r['budget']}": r["accuracy"]
                         for r in out["records"]}}


stage_lib.register(TestTimeSweep())


def table(out: dict[str, Any]) -> str:
  """The sweep as markdown: one row per (strategy, budget); then the compute-optimal
  choices of each difficulty bin."""
  lines = [f"Test-time compute on {out['num_problems']} {out['split']} problems.", "",
           "| strategy | verifier | budget | accuracy | generated tokens / problem | "
           "verifier tokens / problem | seconds / problem |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in out["records"]:
    lines.append(f"| {r['label']} | {r['verifier'] or '-'} | {r['budget']} | "
                 f"{r['accuracy']:.1%} | {r['generated_tokens']:,.0f} | "
                 f"{r['verifier_tokens']:,.0f} | {r['seconds_per_problem']:.3f} |")
  for b in out.get("bins", []):
    choices = ", ".join(f"{label} @ {budget}" for label, budget in b["compute_optimal"])
    lines.append("")
    lines.append(f"Bin {b['bin']} ({b['problems']} problems, policy pass@1 "
                 f"{b['pass_at_1']:.1%}): compute-optimal {choices}")
  return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: str, difficulty_path: str | None) -> None:
  """The accuracy-against-compute curves (see the module docstring)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = list(dict.fromkeys(r["label"] for r in out["records"]))

  def draw(ax, records, title, optimal=()):
    for label in labels:
      mine = sorted((r for r in records if r["label"] == label), key=lambda r: r["budget"])
      ax.plot([r["generated_tokens"] for r in mine], [r["accuracy"] for r in mine], "o-",
              label=label, markersize=4)
    for label, budget in optimal:
      r = next(r for r in records if r["label"] == label and r["budget"] == budget)
      ax.plot(r["generated_tokens"], r["accuracy"], "o", markersize=11, fillstyle="none",
              color="black")
    ax.set_xscale("log")
    ax.set(xlabel="generated tokens per problem", ylabel="accuracy", title=title,
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)

  fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
  draw(ax, out["records"], f"{out['num_problems']} {out['split']} problems")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  if difficulty_path:
    bins = out["bins"]
    fig, axes = plt.subplots(1, len(bins), figsize=(4 * len(bins), 4), dpi=100,
                             squeeze=False)
    for ax, b in zip(axes[0], bins):
      draw(ax, b["records"], f"bin {b['bin']}: pass@1 {b['pass_at_1']:.0%} "
           f"({b['problems']})", [tuple(t) for t in b["compute_optimal"]])
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(difficulty_path)
    plt.close(fig)
