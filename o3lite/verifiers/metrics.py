"""How good a verifier is, judged on the process as well as the outcome.

Pure functions of predicted probabilities and labels (1 = correct, 0 = wrong):

  step_metrics       every step of every held-out solution as one binary decision (a step
                     is predicted wrong when p < threshold): error precision / recall /
                     F1 (the wrong steps are the class to find), correct-step F1, accuracy,
                     and AUC (threshold-free)
  first_error_f1     ProcessBench (Zheng et al. 2024): the predicted first error is the
                     first step with p < threshold (-1: none); accuracy on solutions with
                     an error (the exact step found) and on those without (-1 predicted),
                     F1 = their harmonic mean
  calibration        ECE = sum_b (n_b / n) |mean(y in b) - mean(p in b)| over equal-width
                     bins (Guo et al. 2017), the bins for a reliability diagram
  reliability_plot   that diagram as a PNG
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from o3lite.verifiers import steps as steps_lib


def _f1(precision: float, recall: float) -> float:
  return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
  """Area under the ROC curve of `scores` for the positive labels: the probability a
  random positive scores above a random negative (ties count one half); NaN without
  both classes (Mann-Whitney U / (n+ n-))."""
  s, y = np.asarray(scores, np.float64), np.asarray(labels) >= 0.5
  pos, neg = s[y], s[~y]
  if not len(pos) or not len(neg):
    return float("nan")
  order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
  ranks = np.empty(len(order))
  ranks[order] = np.arange(1, len(order) + 1)
  all_scores = np.concatenate([pos, neg])
  for value in np.unique(all_scores):  # Average ranks over ties.
    tied = all_scores == value
    ranks[tied] = ranks[tied].mean()
  u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
  return float(u / (len(pos) * len(neg)))


def step_metrics(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[int | None]],
                 threshold: float = 0.5) -> dict[str, float]:
  """Step-level metrics over every labelled step (None labels are skipped)."""
  s, y = [], []
  for row_s, row_y in zip(scores, labels, strict=True):
    if len(row_s) != len(row_y):
      raise ValueError(f"{len(row_s)} scores for {len(row_y)} labels")
    for p, label in zip(row_s, row_y):
      if label is not None:
        s.append(p), y.append(int(label >= 0.5))
  s, y = np.asarray(s, np.float64), np.asarray(y)
  wrong_pred, wrong = s < threshold, y == 0
  tp = float(np.sum(wrong_pred & wrong))
  precision = tp / max(float(np.sum(wrong_pred)), 1.0) if np.sum(wrong_pred) else 0.0
  recall = tp / float(np.sum(wrong)) if np.sum(wrong) else 0.0
  right_tp = float(np.sum(~wrong_pred & ~wrong))
  right_p = right_tp / float(np.sum(~wrong_pred)) if np.sum(~wrong_pred) else 0.0
  right_r = right_tp / float(np.sum(~wrong)) if np.sum(~wrong) else 0.0
  return {"steps": int(len(y)), "wrong_steps": int(np.sum(wrong)),
          "error_precision": precision, "error_recall": recall,
          "error_f1": _f1(precision, recall), "correct_f1": _f1(right_p, right_r),
          "accuracy": float(np.mean(wrong_pred == wrong)) if len(y) else float("nan"),
          "auc": auc(s, y)}


def first_error_f1(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[int | None]],
                   threshold: float = 0.5) -> dict[str, float]:
  """ProcessBench's metric: per solution, the predicted first error (first step scored
  below `threshold`, -1 if none) against the labels' (`steps.first_error`); solutions
  without steps are left out."""
  with_error, without = [], []
  for row_s, row_y in zip(scores, labels, strict=True):
    if not row_y:  # No steps: no process to judge.
      continue
    gold = steps_lib.first_error(row_y)
    predicted = next((i for i, p in enumerate(row_s) if p < threshold), -1)
    (with_error if gold >= 0 else without).append(predicted == gold)
  acc_error = float(np.mean(with_error)) if with_error else float("nan")
  acc_correct = float(np.mean(without)) if without else float("nan")
  f1 = (2 * acc_error * acc_correct / (acc_error + acc_correct)
        if with_error and without and acc_error + acc_correct else 0.0)
  return {"solutions_with_error": len(with_error), "solutions_without": len(without),
          "error_accuracy": acc_error, "correct_accuracy": acc_correct, "f1": f1}


def calibration(probabilities: Sequence[float], labels: Sequence[int], bins: int = 10
                ) -> dict[str, object]:
  """Accuracy (p >= 0.5 iff correct), expected calibration error and reliability bins
  (per bin: its range, count, mean predicted probability, fraction correct)."""
  p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
  table, ece = [], 0.0
  for b in range(bins):
    inside = which == b
    n = int(np.sum(inside))
    mean_p = float(np.mean(p[inside])) if n else float("nan")
    frac = float(np.mean(y[inside])) if n else float("nan")
    if n:
      ece += n / len(p) * abs(frac - mean_p)
    table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                  "mean_probability": mean_p, "fraction_correct": frac})
  return {"num": int(len(p)), "accuracy": float(np.mean((p >= 0.5) == (y >= 0.5))),
          "ece": float(ece), "auc": auc(p, y), "bins": table}


def reliability_plot(calib: dict, path: str, title: str = "reliability") -> None:
  """The reliability diagram of `calibration(...)` as a PNG: fraction correct against
  mean predicted probability per bin (bar width: the bin), the diagonal is perfect."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
  bins = [b for b in calib["bins"] if b["count"]]
  ax.bar([b["low"] for b in bins], [b["fraction_correct"] for b in bins],
         width=[b["high"] - b["low"] for b in bins], align="edge", edgecolor="black",
         alpha=0.7, label="fraction correct")
  ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
  ax.plot([b["mean_probability"] for b in bins], [b["fraction_correct"] for b in bins],
          "o-", color="tab:red", label="mean predicted")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(correct)", ylabel="fraction correct",
         title=f"{title}: ECE {calib['ece']:.3f}, n={calib['num']}")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
