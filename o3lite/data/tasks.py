"""Procedural reasoning tasks with exact chains of thought and checkers.

A task is a frozen dataclass whose fields are its difficulty knobs. It draws
`Problem`s (question, steps, answer, and the number each step computes) from a
numpy Generator, checks predicted answers, and labels written steps right or
wrong (process supervision).

  task = get_task("opchain", steps=5, modulus=10)
  train = generate_split(task, "train", num_examples=1000, seed=0)

Questions are kept a few dozen characters long: the models trained on them are
tiny and run on CPU.
"""

import dataclasses
import fractions
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from o3lite import errors

SPLITS = ("train", "validation", "test")
# Fraction of the question hash space owned by each split.
SPLIT_FRACTIONS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem: a question, the reference chain of thought, the answer.

  `step_values[i]` is the number reference step i computes (what its "=" gives):
  the exact intermediate values a process reward model or step checker compares
  against. The dataset carries them as the example's "step_values" (a list of ints).
  """

  question: str
  steps: tuple[str, ...]
  answer: str
  step_values: tuple[int, ...] = ()

  @property
  def cot(self) -> str:
    return "\n".join(self.steps)


def _to_number(text: str) -> fractions.Fraction | None:
  try:
    return fractions.Fraction(text)
  except (ValueError, ZeroDivisionError):
    return None


def numeric_match(predicted: str | None, target: str) -> bool:
  """Whether a predicted answer equals the target answer.

  Both are stripped and their commas dropped; they are compared as exact
  numbers when both parse as numbers ("1,000" == "1000.0"), else as strings.
  A missing prediction (None) is wrong.
  """
  if predicted is None:
    return False
  predicted = predicted.strip().replace(",", "")
  target = target.strip().replace(",", "")
  predicted_number, target_number = _to_number(predicted), _to_number(target)
  if predicted_number is not None and target_number is not None:
    return predicted_number == target_number
  return predicted == target


def _squash(step: str) -> str:
  return "".join(step.split())


@dataclasses.dataclass(frozen=True)
class Task:
  """Base of the tasks: subclasses add their difficulty knobs as fields."""

  name: ClassVar[str] = ""

  def generate(self, rng: np.random.Generator) -> Problem:
    """Draws one problem; deterministic given the state of `rng`."""
    raise NotImplementedError

  def check(self, predicted: str | None, target: str) -> bool:
    """Whether `predicted` is a correct final answer for `target`."""
    return numeric_match(predicted, target)

  def label_steps(self, predicted_steps: Sequence[str],
                  problem: Problem) -> list[bool]:
    """Marks each written step right (True) or wrong (False).

    Our chains of thought are deterministic, so step i is right exactly when it
    equals the reference step i (whitespace ignored). A step that builds on an
    earlier mistake is wrong too, and steps past the reference length are wrong.
    """
    reference = [_squash(step) for step in problem.steps]
    return [i < len(reference) and _squash(step) == reference[i]
            for i, step in enumerate(predicted_steps)]

  @property
  def difficulty(self) -> dict[str, int]:
    """The difficulty knobs, in field order."""
    return dataclasses.asdict(self)

  def _validate(self, **minimums: int) -> None:
    for knob, minimum in minimums.items():
      value = getattr(self, knob)
      if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
          or value < minimum):
        raise errors.ConfigError(
            f"Task {self.name!r}: difficulty {knob}={value!r} is invalid, "
            f"expected an int >= {minimum}.")


_TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
  """Class decorator registering a Task subclass under `name`."""

  def decorator(cls: type[Task]) -> type[Task]:
    if name in _TASKS:
      raise ValueError(f"Task {name!r} is already registered.")
    cls.name = name
    _TASKS[name] = cls
    return cls

  return decorator


def list_tasks() -> list[str]:
  """Names of the registered tasks, sorted."""
  return sorted(_TASKS)


def get_task(name: str, **difficulty: Any) -> Task:
  """Returns the task `name` with the given difficulty knobs.

  Raises:
    ValueError: unknown task name, unknown knob, or invalid knob value.
  """
  if name not in _TASKS:
    raise errors.ConfigError(f"Unknown task {name!r}; valid tasks: {list_tasks()}.")
  cls = _TASKS[name]
  knobs = [field.name for field in dataclasses.fields(cls)]
  for knob in difficulty:
    if knob not in knobs:
      raise errors.ConfigError(f"Unknown difficulty {knob!r} for task {name!r}; "
                               f"valid: {knobs}.")
  return cls(**difficulty)


def _draw_number(rng: np.random.Generator, digits: int) -> int:
  low = 0 if digits == 1 else 10**(digits - 1)
  return int(rng.integers(low, 10**digits))


@register_task("addition")
@dataclasses.dataclass(frozen=True)
class Addition(Task):
  """a + b of two `digits`-digit numbers, one column per step from the right.

  Step for a column: "digit_a+digit_b+carry_in=sum wD cC" where D is the digit
  written and C the carry out, e.g. "457+385" gives steps
  "7+5+0=12 w2 c1", "5+8+1=14 w4 c1", "4+3+1=8 w8 c0" and answer "842"; the step
  values are the column sums 12, 14, 8.
  """

  digits: int = 3

  def __post_init__(self):
    self._validate(digits=1)

  def generate(self, rng: np.random.Generator) -> Problem:
    a, b = _draw_number(rng, self.digits), _draw_number(rng, self.digits)
    steps, values, carry = [], [], 0
    for column in range(self.digits):
      da, db = a // 10**column % 10, b // 10**column % 10
      total = da + db + carry
      steps.append(f"{da}+{db}+{carry}={total} w{total % 10} c{total // 10}")
      values.append(total)
      carry = total // 10
    return Problem(question=f"{a}+{b}", steps=tuple(steps), answer=str(a + b),
                   step_values=tuple(values))


@register_task("multiplication")
@dataclasses.dataclass(frozen=True)
class Multiplication(Task):
  """a * b: one shifted partial product per digit of b, then their sums.

  E.g. "47*36" gives steps "47*6=282", "47*30=1410", "282+1410=1692" (step values
  282, 1410, 1692) and answer "1692". `multiplier_digits` defaults to `digits`.
  """

  digits: int = 2
  multiplier_digits: int | None = None

  def __post_init__(self):
    if self.multiplier_digits is None:
      object.__setattr__(self, "multiplier_digits", self.digits)
    self._validate(digits=1, multiplier_digits=1)

  def generate(self, rng: np.random.Generator) -> Problem:
    a = _draw_number(rng, self.digits)
    b = _draw_number(rng, self.multiplier_digits)
    steps, partials = [], []
    for place in range(self.multiplier_digits):
      factor = b // 10**place % 10 * 10**place
      partials.append(a * factor)
      steps.append(f"{a}*{factor}={a * factor}")
    values, total = list(partials), partials[0]
    for partial in partials[1:]:
      steps.append(f"{total}+{partial}={total + partial}")
      total += partial
      values.append(total)
    return Problem(question=f"{a}*{b}", steps=tuple(steps), answer=str(a * b),
                   step_values=tuple(values))


_OPS = ("+", "-", "*")


@register_task("opchain")
@dataclasses.dataclass(frozen=True)
class OpChain(Task):
  """A chain of `steps` operations modulo `modulus`, applied left to right.

  "3 +4 *2 -1 mod 10" gives steps "3+4=7", "7*2=4", "4-1=3" (step values 7, 4, 3)
  and answer "3".
  Start value and operands are in [0, modulus); operations in {+, -, *}.
  """

  steps: int = 5
  modulus: int = 10

  def __post_init__(self):
    self._validate(steps=1, modulus=2)

  def generate(self, rng: np.random.Generator) -> Problem:
    draws = rng.integers(0, [self.modulus] + [3, self.modulus] * self.steps)
    value = int(draws[0])
    question, steps, values = [str(value)], [], []
    for op_index, operand in draws[1:].reshape(self.steps, 2).tolist():
      op = _OPS[op_index]
      if op == "+":
        result = (value + operand) % self.modulus
      elif op == "-":
        result = (value - operand) % self.modulus
      else:
        result = (value * operand) % self.modulus
      question.append(f"{op}{operand}")
      steps.append(f"{value}{op}{operand}={result}")
      values.append(result)
      value = result
    question.append(f"mod {self.modulus}")
    return Problem(question=" ".join(question), steps=tuple(steps),
                   answer=str(value), step_values=tuple(values))


def hash_fraction(text: str) -> float:
  """A stable pseudo-random number in [0, 1) for `text` (sha1-based)."""
  digest = hashlib.sha1(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def split_of(question: str) -> str:
  """The split that owns `question`, by a stable hash of its text."""
  point, upper = hash_fraction(question), 0.0
  for split, fraction in SPLIT_FRACTIONS:
    upper += fraction
    if point < upper:
      return split
  return SPLIT_FRACTIONS[-1][0]


def generate_split(task: Task, split: str, num_examples: int,
                   seed: int) -> list[Problem]:
  """Draws `num_examples` distinct problems belonging to `split`.

  All splits read one stream seeded by `seed` and keep the problems whose
  question hashes into them (`split_of`), so no question is in two splits,
  whatever the seeds. Duplicate questions are skipped.

  Raises:
    ValueError: unknown split, or the task has too few distinct questions in
      this split (no new one found in a long run of draws).
  """
  if split not in SPLITS:
    raise errors.ConfigError(f"Unknown split {split!r}; valid: {list(SPLITS)}.")
  rng = np.random.default_rng(seed)
  problems, seen = [], set()
  patience = max(10_000, 10 * num_examples)
  draws_since_new = 0
  while len(problems) < num_examples:
    problem = task.generate(rng)
    if problem.question in seen or split_of(problem.question) != split:
      draws_since_new += 1
      if draws_since_new > patience:
        raise errors.ConfigError(
            f"Task {task.name!r} with {task.difficulty} has too few distinct "
            f"{split} questions: found {len(problems)} of {num_examples} "
            f"requested; make it harder or ask for fewer examples.")
      continue
    draws_since_new = 0
    seen.add(problem.question)
    problems.append(problem)
  return problems


def slip_opchain(example: dict[str, Any], op: str, rate: float, modulus: int,
                 seed: int = 0) -> dict[str, Any]:
  """An opchain example whose chain makes a systematic slip: each `op` step's result is
  written off by one, (r + 1) mod `modulus`, with probability `rate`; the later steps
  and the answer follow the wrong value, as a person's chain would. Deterministic per
  question. Imperfect demonstrations like these leave room for RL: a model imitating
  them slips too, and only a verifier tells it which of its chains are right. Other keys
  (metadata such as "step_values") are kept: they still describe the problem's correct
  chain.
  """
  rng = np.random.default_rng([seed, int(hash_fraction(example["question"]) * 2**32)])
  lines, value = [], None
  for line in example["cot"].split("\n"):
    left, _ = line.split("=")
    step_op = next(c for c in left[1:] if c in "+-*")  # The first char may be a digit.
    a, b = left.split(step_op, 1)
    a = int(a) if value is None else value
    b = int(b)
    result = {"+": a + b, "-": a - b, "*": a * b}[step_op] % modulus
    if step_op == op and rng.random() < rate:
      result = (result + 1) % modulus
    lines.append(f"{a}{step_op}{b}={result}")
    value = result
  return {**example, "cot": "\n".join(lines), "answer": str(value)}
