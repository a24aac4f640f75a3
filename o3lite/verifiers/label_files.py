"""Labelled solutions as JSONL, to save once and train verifiers from many times.

One line per solution:

  {"question": str, "answer": str, "solution": str, "steps": [str, ...],
   "labels": [0 | 1 | p | null, ...], "soft_labels"?: [p | null, ...], ...}

`answer` is the reference answer, `solution` the completion that was labelled, `steps`
its steps in order (each found in `solution` after the one before), `labels[i]` the label
of step i (in [0, 1]; null where none was kept, e.g. where two labellers disagreed),
`soft_labels` the Monte Carlo fractions if any. Any other keys ("step_values",
"labeller", ...) are kept as metadata. A line that breaks these rules is a one-line
DataError naming the file and the line; writing checks every record the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

from o3lite import errors
from o3lite.verifiers import labellers, steps as steps_lib

_KEYS = ("question", "answer", "solution", "steps", "labels", "soft_labels")


@dataclasses.dataclass
class LabelledSolution:
  question: str
  answer: str
  solution: str
  steps: list[str]
  labels: list[float | None]
  soft_labels: list[float | None] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    record = {**self.metadata, "question": self.question, "answer": self.answer,
              "solution": self.solution, "steps": self.steps, "labels": self.labels}
    if self.soft_labels is not None:
      record["soft_labels"] = self.soft_labels
    return record


def labelled(example: dict[str, Any], solution: str,
             labels: labellers.StepLabels | Sequence[float | None],
             soft_labels: Sequence[float | None] | None = None,
             **metadata: Any) -> LabelledSolution:
  """A record of `solution` to `example` with its steps (`split_completion`) and labels
  (a labeller's StepLabels, or a list such as a Consensus row); `metadata` is kept."""
  if isinstance(labels, labellers.StepLabels):
    labels, soft_labels = labels.hard, labels.soft if soft_labels is None else soft_labels
  return LabelledSolution(
      example["question"], example["answer"], solution,
      [s.text for s in steps_lib.split_completion(solution)], list(labels),
      None if soft_labels is None else list(soft_labels), metadata)


def _label_problem(values: Any, what: str, count: int) -> str | None:
  if not isinstance(values, list):
    return f"{what} is not a list"
  if len(values) != count:
    return f"{len(values)} {what} for {count} steps"
  for i, x in enumerate(values):
    if x is None:
      continue
    if (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
        or not 0 <= x <= 1):
      return f"{what}[{i}] = {x!r} is not a number in [0, 1] (or null)"
  return None


def check_record(record: Any) -> LabelledSolution:
  """The record as a LabelledSolution; a ValueError saying what is wrong with it."""
  if not isinstance(record, dict):
    raise ValueError(f"not a JSON object: {type(record).__name__}")
  for key in ("question", "answer", "solution"):
    if not isinstance(record.get(key), str):
      raise ValueError(f"{key!r} is missing or not a string")
  steps = record.get("steps")
  if not isinstance(steps, list) or not all(isinstance(s, str) and s.strip() for s in steps):
    raise ValueError("'steps' is missing or not a list of non-empty strings")
  at = 0
  for i, step in enumerate(steps):
    found = record["solution"].find(step, at)
    if found < 0:
      raise ValueError(f"step {i} {step[:40]!r} is not in the solution"
                       + (f" after step {i - 1}" if i else ""))
    at = found + len(step)
  problem = _label_problem(record.get("labels"), "labels", len(steps))
  if problem is None and record.get("soft_labels") is not None:
    problem = _label_problem(record["soft_labels"], "soft_labels", len(steps))
  if problem:
    raise ValueError(problem)
  metadata = {k: v for k, v in record.items() if k not in _KEYS}
  return LabelledSolution(record["question"], record["answer"], record["solution"], steps,
                          record["labels"], record.get("soft_labels"), metadata)


def write_labelled(path: str, records: Sequence[LabelledSolution]) -> None:
  """Writes `records` as JSONL (through a temporary file renamed into place), each
  checked first: a bad one is a DataError naming it and nothing is written."""
  lines = []
  for i, record in enumerate(records):
    as_json = record.to_json()
    try:
      check_record(as_json)
    except ValueError as e:
      raise errors.DataError(f"{path}: record {i}: {e}") from None
    lines.append(json.dumps(as_json, ensure_ascii=False) + "\n")
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines)
  os.replace(tmp, path)


def read_labelled(path: str) -> list[LabelledSolution]:
  """The labelled solutions of a JSONL file; blank lines are skipped. A missing or empty
  file, a bad line, or bytes that are not UTF-8, is a one-line DataError naming the
  file (and the line)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise errors.DataError(f"{path}: cannot read labelled solutions: {e.strerror}") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise errors.DataError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x})") from None
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # As text mode reads.
  out = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      out.append(check_record(json.loads(line)))
    except json.JSONDecodeError as e:
      raise errors.DataError(f"{path}:{number}: not JSON: {e.msg}") from None
    except ValueError as e:
      raise errors.DataError(f"{path}:{number}: {e}") from None
  if not out:
    raise errors.DataError(f"{path}: no labelled solutions")
  return out
