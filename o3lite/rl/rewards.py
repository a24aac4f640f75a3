"""Reward functions for RL, registered by name and weighted in the config.

A reward function is `fn(completion: str, target: str, checker, **kwargs) -> float`,
where `completion` is the generated text (think segment and answer) and `checker` the
task's answer checker. `RewardScorer` sums the configured functions with their weights;
a function that raises or runs past its timeout scores 0 for that completion, is counted,
and never stops training.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Mapping, Sequence

from o3lite import errors
from o3lite.data import formatting
from o3lite.registry import Registry

REWARDS = Registry("reward function")
register_reward = REWARDS.register


@register_reward("correctness")
def correctness(completion: str, target: str, checker, **_) -> float:
  """1 if the parsed final answer passes the task's checker, else 0."""
  return float(bool(checker(formatting.parse_answer(completion), target)))


@register_reward("format")
def format_reward(completion: str, target: str, checker, **_) -> float:
  """1 if the completion closes its think segment and has a parseable answer, else 0."""
  del target, checker
  closed = formatting.THINK_END in completion
  return float(closed and formatting.parse_answer(completion) is not None)


@register_reward("length_penalty")
def length_penalty(completion: str, target: str, checker, num_tokens: int = 0,
                   max_tokens: int = 1, **_) -> float:
  """-num_tokens / max_tokens: weight it to trade accuracy against length."""
  del completion, target, checker
  return -float(num_tokens) / max(max_tokens, 1)


@dataclasses.dataclass
class Scores:
  total: list[float]  # Weighted sum per completion.
  parts: dict[str, list[float]]  # Each reward function's own value per completion.
  failures: int  # Calls that raised.
  timeouts: int  # Calls that ran past the timeout.


def validate_weights(weights: Mapping[str, float],
                     table: Mapping[str, Callable[..., float]] | None = None) -> None:
  """A ConfigError for unknown reward names or an empty set of rewards."""
  table = REWARDS if table is None else table
  unknown = sorted(set(weights) - set(table))
  if unknown:
    raise errors.ConfigError(
        f"unknown reward function(s) {unknown}; registered: {sorted(table)}")
  if not weights:
    raise errors.ConfigError(
        "rl.rewards is empty: give at least one reward function a weight")


class RewardScorer:
  """Scores completions with weighted reward functions, isolating their failures."""

  def __init__(self, weights: Mapping[str, float], checker, timeout_s: float = 5.0,
               rewards: Mapping[str, Callable[..., float]] | None = None):
    table = REWARDS if rewards is None else rewards
    validate_weights(weights, table)
    self.fns = {name: table[name] for name in weights}
    self.weights = dict(weights)
    self.checker = checker
    self.timeout_s = timeout_s
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

  def _call(self, fn, completion: str, target: str, kwargs) -> tuple[float, str]:
    future = self._pool.submit(fn, completion, target, self.checker, **kwargs)
    try:
      return float(future.result(timeout=self.timeout_s)), ""
    except concurrent.futures.TimeoutError:
      # The hung call keeps its thread; a fresh pool serves the calls that follow.
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
      return 0.0, "timeout"
    except Exception:  # pylint: disable=broad-except
      return 0.0, "failure"

  def score(self, completions: Sequence[str], targets: Sequence[str],
            num_tokens: Sequence[int], max_tokens: int) -> Scores:
    parts = {name: [] for name in self.fns}
    failures = timeouts = 0
    for completion, target, n in zip(completions, targets, num_tokens):
      for name, fn in self.fns.items():
        value, problem = self._call(fn, completion, target,
                                    {"num_tokens": int(n), "max_tokens": max_tokens})
        failures += problem == "failure"
        timeouts += problem == "timeout"
        parts[name].append(value)
    total = [sum(self.weights[name] * parts[name][i] for name in self.fns)
             for i in range(len(completions))]
    return Scores(total, parts, failures, timeouts)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
