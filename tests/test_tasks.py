"""Tests of the procedural reasoning tasks."""

import re

import numpy as np
import pytest

from o3lite import errors
from o3lite.data import formatting
from o3lite.data import tasks


def _problems(name, n=200, seed=0, **difficulty):
  task = tasks.get_task(name, **difficulty)
  rng = np.random.default_rng(seed)
  return task, [task.generate(rng) for _ in range(n)]


def test_registry():
  assert {"addition", "multiplication", "opchain"} <= set(tasks.list_tasks())
  assert tasks.get_task("opchain").difficulty == {"steps": 5, "modulus": 10}
  assert tasks.get_task("multiplication", digits=3).difficulty == {
      "digits": 3, "multiplier_digits": 3}


def test_unknown_task_and_knobs_raise():
  with pytest.raises(errors.O3liteError, match=r"'nope'.*opchain"):
    tasks.get_task("nope")
  with pytest.raises(errors.O3liteError, match=r"'digits'.*'steps', 'modulus'"):
    tasks.get_task("opchain", digits=3)
  with pytest.raises(errors.O3liteError, match="modulus=1"):
    tasks.get_task("opchain", modulus=1)
  with pytest.raises(errors.O3liteError, match="digits='3'"):
    tasks.get_task("addition", digits="3")
  with pytest.raises(ValueError, match="already registered"):
    tasks.register_task("opchain")(tasks.OpChain)


@pytest.mark.parametrize("name", ["addition", "multiplication", "opchain"])
def test_generate_is_deterministic(name):
  _, first = _problems(name, n=50, seed=3)
  _, again = _problems(name, n=50, seed=3)
  _, other = _problems(name, n=50, seed=4)
  assert first == again
  assert first != other
  assert len({p.question for p in first}) > 40


@pytest.mark.parametrize("digits", [1, 3, 5])
def test_addition_steps_are_correct(digits):
  _, problems = _problems("addition", digits=digits)
  step_re = re.compile(r"(\d)\+(\d)\+(\d)=(\d+) w(\d) c(\d)")
  for p in problems:
    a, b = map(int, p.question.split("+"))
    assert len(str(a)) == len(str(b)) == digits
    assert p.answer == str(a + b)
    assert len(p.steps) == digits
    carry, written, totals = 0, [], []
    for column, step in enumerate(p.steps):
      da, db, cin, total, w, c = map(int, step_re.fullmatch(step).groups())
      assert (da, db, cin) == (a // 10**column % 10, b // 10**column % 10,
                               carry)
      assert total == da + db + cin and w == total % 10 and c == total // 10
      carry = c
      written.append(str(w))
      totals.append(total)
    assert p.step_values == tuple(totals)  # The column sums.
    assert p.answer == (str(carry) if carry else "") + "".join(written[::-1])


@pytest.mark.parametrize("digits, multiplier_digits", [(2, 2), (3, 1), (1, 3)])
def test_multiplication_steps_are_correct(digits, multiplier_digits):
  _, problems = _problems("multiplication", digits=digits,
                          multiplier_digits=multiplier_digits)
  for p in problems:
    a, b = map(int, p.question.split("*"))
    assert (len(str(a)), len(str(b))) == (digits, multiplier_digits)
    assert p.answer == str(a * b)
    products = p.steps[:multiplier_digits]
    sums = p.steps[multiplier_digits:]
    assert len(sums) == multiplier_digits - 1
    partials = []
    for place, step in enumerate(products):
      x, factor, product = map(int, re.fullmatch(r"(\d+)\*(\d+)=(\d+)",
                                                 step).groups())
      assert x == a and factor == b // 10**place % 10 * 10**place
      assert product == a * factor
      partials.append(product)
    total, values = partials[0], list(partials)
    for partial, step in zip(partials[1:], sums):
      x, y, z = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())
      assert (x, y, z) == (total, partial, total + partial)
      total = z
      values.append(z)
    assert str(total) == p.answer
    assert p.step_values == tuple(values)


@pytest.mark.parametrize("steps, modulus", [(5, 10), (2, 7), (8, 100)])
def test_opchain_steps_are_correct(steps, modulus):
  _, problems = _problems("opchain", steps=steps, modulus=modulus)
  ops_seen = set()
  for p in problems:
    tokens = p.question.split()
    assert tokens[-2:] == ["mod", str(modulus)]
    value = int(tokens[0])
    assert 0 <= value < modulus
    assert len(p.steps) == len(tokens) - 3 == steps
    values = []
    for token, step in zip(tokens[1:-2], p.steps):
      op, operand = token[0], int(token[1:])
      ops_seen.add(op)
      assert 0 <= operand < modulus
      result = {"+": value + operand, "-": value - operand,
                "*": value * operand}[op] % modulus
      assert step == f"{value}{op}{operand}={result}"
      value = result
      values.append(result)
    assert p.answer == str(value)
    assert p.step_values == tuple(values)
  assert ops_seen == {"+", "-", "*"}


def test_default_opchain_text_is_short():
  _, problems = _problems("opchain")
  assert max(len(p.question) for p in problems) <= 40
  assert max(len(p.cot) for p in problems) <= 60


def test_checkers():
  task = tasks.get_task("opchain")
  assert task.check("7", "7")
  assert task.check(" 7 ", "7")
  assert task.check("1,000", "1000")
  assert task.check("1000.0", "1,000")
  assert task.check("0.5", "1/2")
  assert not task.check("8", "7")
  assert not task.check(None, "7")
  assert not task.check("", "7")
  assert not task.check("12345678901234567891", "12345678901234567890")
  assert task.check("abc", "abc") and not task.check("abc", "abd")
  assert tasks.numeric_match("-3", "-3.00")


def test_opchain_label_steps():
  task = tasks.get_task("opchain")
  problem = task.generate(np.random.default_rng(0))
  steps = list(problem.steps)
  assert task.label_steps(steps, problem) == [True] * len(steps)
  assert task.label_steps([" " + s + " " for s in steps], problem) == (
      [True] * len(steps))
  corrupted = list(steps)
  lhs, result = corrupted[2].split("=")
  corrupted[2] = f"{lhs}={(int(result) + 1) % 10}"
  labels = task.label_steps(corrupted, problem)
  assert labels == [True, True, False, True, True]
  assert task.label_steps(steps[:2], problem) == [True, True]
  assert task.label_steps(steps + ["1+1=2"], problem)[-1] is False
  written = formatting.split_steps(formatting.parse_cot(
      formatting.format_completion(problem.cot, problem.answer)))
  assert task.label_steps(written, problem) == [True] * len(steps)


def test_split_assignment_is_stable():
  assert tasks.split_of("1 +2 mod 10") == tasks.split_of("1 +2 mod 10")
  counts = {s: 0 for s in tasks.SPLITS}
  for i in range(5000):
    counts[tasks.split_of(f"q{i}")] += 1
  assert 3800 < counts["train"] < 4200
  assert 380 < counts["validation"] < 620 and 380 < counts["test"] < 620


def test_generate_split_disjoint_and_deterministic():
  task = tasks.get_task("opchain", steps=3)
  splits = {s: tasks.generate_split(task, s, n, seed=0)
            for s, n in [("train", 300), ("validation", 40), ("test", 40)]}
  questions = {s: {p.question for p in ps} for s, ps in splits.items()}
  for split, problems in splits.items():
    assert len(questions[split]) == len(problems)
    assert all(tasks.split_of(q) == split for q in questions[split])
  assert not questions["train"] & questions["validation"]
  assert not questions["train"] & questions["test"]
  assert not questions["validation"] & questions["test"]
  assert tasks.generate_split(task, "test", 40, seed=0) == splits["test"]
  assert tasks.generate_split(task, "test", 40, seed=1) != splits["test"]
  other_seed = tasks.generate_split(task, "train", 300, seed=1)
  assert not {p.question for p in other_seed} & questions["test"]


def test_generate_split_errors():
  task = tasks.get_task("opchain", steps=1, modulus=2)  # 12 questions.
  with pytest.raises(errors.O3liteError, match="too few distinct train questions"):
    tasks.generate_split(task, "train", 20, seed=0)
  with pytest.raises(errors.O3liteError, match="'dev'"):
    tasks.generate_split(task, "dev", 1, seed=0)
  everything = [task.generate(np.random.default_rng(i)) for i in range(500)]
  train = {p.question for p in everything if tasks.split_of(p.question)
           == "train"}
  assert len(tasks.generate_split(task, "train", len(train), seed=0)) == len(
      train)
