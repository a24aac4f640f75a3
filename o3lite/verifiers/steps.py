"""The steps of a completion, as character and token spans, and their exact labels.

A completion in the one format (`data/formatting.py`) is

  "<think>" step_1 "\\n" ... step_n "</think>" answer

and its steps are the non-blank lines of the chain, stripped (`formatting.split_steps`).
`split_completion` says where each one is; `token_spans` where it is in the tokens the
model wrote, and where a prefix "up to and including step i" ends, the point from which
the Monte Carlo labeller samples completions (`labellers.py`).

The exact labeller reads the value a step writes (the number after its last "=") and
compares it with the problem's true intermediate value (`Problem.step_values`, carried by
examples as "step_values"). Convention (PRM800K, "Let's Verify Step by Step"; ProcessBench):
a step is correct when it is correct *given the problem*: its value is the true one.
A step that carries on correctly from an earlier wrong value writes a wrong value, so it
is wrong too; the first error (`first_error`) is the first wrong step. Unlike
`Task.label_steps` (the reference text, character for character), the operands and the
spacing are not compared: only the value the step computes.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
from typing import Callable, Sequence

from o3lite.data import formatting

_VALUE = re.compile(r"\s*(-?\d+)")


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of a completion: `text` (stripped) is completion[start:end]; a prefix up to
  and including the step is completion[:boundary] (after its "\\n" delimiter, or at the
  end of the chain for the last step)."""

  text: str
  start: int
  end: int
  boundary: int


@dataclasses.dataclass(frozen=True)
class TokenSpan:
  """A step in the completion's tokens: tokens[start:end] hold its text, and
  tokens[:boundary] is the prefix up to and including it (its delimiter included)."""

  start: int
  end: int
  boundary: int


def split_completion(completion: str) -> list[Step]:
  """The steps of a completion (or of a chain whose "<think>" is in the prompt).

  The chain is the text after the last "<think>" before the last "</think>" (as
  `formatting.parse_cot`); a chain that never closes runs to the end of the text, so a
  cut-off completion still has steps. The step texts are `formatting.split_steps` of it.
  """
  close = completion.rfind(formatting.THINK_END)
  close = len(completion) if close < 0 else close
  open_ = completion.rfind(formatting.THINK_START, 0, close)
  begin = 0 if open_ < 0 else open_ + len(formatting.THINK_START)
  steps, line_start = [], begin
  while line_start < close:
    newline = completion.find("\n", line_start, close)
    line_end = close if newline < 0 else newline
    line = completion[line_start:line_end]
    if line.strip():
      start = line_start + len(line) - len(line.lstrip())
      end = line_start + len(line.rstrip())
      steps.append(Step(line.strip(), start, end, line_end if newline < 0 else line_end + 1))
    line_start = line_end + 1
  return steps


def char_offsets(tokens: Sequence[int], decode: Callable[[Sequence[int]], str]) -> list[int]:
  """len(decode(tokens[:j])) for j = 0 .. len(tokens): where each token's text ends.

  One decode per token when the tokens' texts concatenate to the whole text (the usual
  case); else one decode per prefix (a tokenizer whose pieces decode differently in
  context)."""
  pieces = [decode([t]) for t in tokens]
  if "".join(pieces) == decode(tokens):
    return [0, *itertools.accumulate(len(p) for p in pieces)]
  return [len(decode(tokens[:j])) for j in range(len(tokens) + 1)]


def first_reaching(offsets: Sequence[int], position: int) -> int:
  """The fewest tokens whose text reaches character `position` (`offsets` from
  `char_offsets`; all the tokens if none does)."""
  return min(bisect.bisect_left(offsets, position), len(offsets) - 1)


def last_tokens(offsets: Sequence[int], ends: Sequence[int]) -> list[int]:
  """For each character position in `ends`, the index of the last of the fewest tokens
  whose text reaches it: where a verifier reads a step that ends there."""
  return [first_reaching(offsets, end) - 1 for end in ends]


def token_spans(tokens: Sequence[int], decode: Callable[[Sequence[int]], str],
                steps: Sequence[Step]) -> list[TokenSpan]:
  """Where `steps` (of the text `decode(tokens)`) are in `tokens`.

  A token belongs to the step its text overlaps; a token that also holds the start of
  the next step (a merged "\\n3") ends the prefix after it. Cost: `char_offsets`'.
  """
  offsets = char_offsets(tokens, decode)
  reach = lambda position: first_reaching(offsets, position)
  return [TokenSpan(max(reach(s.start + 1) - 1, 0), reach(s.end), reach(s.boundary))
          for s in steps]


def step_value(step: str) -> int | None:
  """The value a step writes: the integer right after its last "=" ("7*2=4" -> 4,
  "7+5+0=12 w2 c1" -> 12); None if there is none."""
  equals = step.rfind("=")
  match = _VALUE.match(step, equals + 1) if equals >= 0 else None
  return int(match.group(1)) if match else None


def exact_labels(completion: str, step_values: Sequence[int]) -> list[int]:
  """1 for each step of `completion` whose value is the true one, else 0.

  Step i is compared with step_values[i]; steps past the true chain's length, and steps
  that write no value, are wrong. See the module docstring for the convention.
  """
  return [int(i < len(step_values) and step_value(step.text) == int(step_values[i]))
          for i, step in enumerate(split_completion(completion))]


def first_error(labels: Sequence[float | None]) -> int:
  """Index of the first wrong step (a label below 0.5), or -1 if none (ProcessBench);
  steps without a label (None) are skipped."""
  return next((i for i, x in enumerate(labels) if x is not None and x < 0.5), -1)
