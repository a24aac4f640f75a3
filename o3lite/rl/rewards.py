"""Reward functions for RL, registered by name and weighted in the config (`rl.rewards`).

A reward function sees the whole example and one completion:

  @register_reward("cites_spec")
  def cites_spec(example, completion, *, checker, num_tokens, max_tokens, **_) -> float:
    return float(example["spec"] in completion)

`example` is the training example's dict: "question", "answer" (the target), "cot" and
any metadata the data carries as further keys (a JSONL line's other keys, such as a spec
or step labels; a procedural task's "step_values"); `completion` is the generated text
(think segment and answer); `checker(predicted, target) -> bool` is the task's answer
checker; `num_tokens` is the completion's length in tokens (its EOS included when it
finished) and `max_tokens` the most it could have. Take `**_` for the context you do not
read. A batched function scores a whole sampling round in one call (a model judge):

  @register_reward("judge", batched=True)
  def judge(examples, completions, *, checker, num_tokens, max_tokens, **_):
    return judge_model.score(examples, completions)   # one float per completion

with lists in place of the single values: `examples[i]` is the example of
`completions[i]`, a group's completions are adjacent, and `num_tokens` is a list too.

A reward that needs the run (a model judge loads a model on the run's mesh and reads
its tokenizer) is registered as a factory: called once, when the run starts, with the
run's `RewardContext` and its options from the config (`rl.reward_options[name]`); it
returns the reward function (single or batched, as registered):

  @register_reward("judge", batched=True, factory=True)
  def judge(context, *, path, **_):
    judge = context.load_policy(path)          # a run folder or a Hugging Face folder
    return lambda examples, completions, **_: score_with(judge, examples, completions)

Per-step rewards (`STEP_REWARDS`: a PRM's process reward) are factories of the same
shape, `factory(context, **options)`, whose function scores sampled completions in the
policy's tokens, `fn(prompts, completions) -> [StepRewards(ends, scores)]`: each step's
last token (its index in the completion) and that step's reward. The learner places
them at those tokens (rollouts.process_rewards).

`RewardScorer` sums the configured functions with their weights. Failures never stop
training: a call that raises, returns a value that is not a finite number or runs past its
timeout scores 0 for its completions, which are counted (`failures`, `timeouts`: in
completions, summed over the functions), and the first failure of each function is logged
with its reason. A single call has `timeout_s`; a batched call of n completions has
n x `timeout_s` (what n single calls would have) and on timeout or error all n score 0. A
batched call returning the wrong number of scores fails for all its completions; a
non-finite entry fails for its own completion only.

Scoring happens on process 0 only. In a multi-process run every process calls
`RewardScorer.score` with the same completions (the sampler returns the whole global
batch on every host); process 0 runs the reward functions and broadcasts the scores and
counts, so every host computes the same advantages and, with dynamic sampling, takes the
same number of sampling rounds, and a judge runs once per round, not once per host.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from o3lite import errors
from o3lite.data import formatting
from o3lite.parallel import multiprocess
from o3lite.registry import Registry
from o3lite.training import policy_source
from o3lite.training import run_folder
from o3lite.verifiers import reward_model
from o3lite.verifiers import run as verifier_run


@dataclasses.dataclass(frozen=True)
class RewardContext:
  """What a reward factory is given: the run's answer checker, tokenizer and placement,
  and loaders for other models on the same mesh (a judge, a frozen PRM)."""

  checker: Callable | None = None  # checker(predicted, target) -> bool of the task.
  tokenizer: Any = None  # The policy's tokenizer.
  mesh: jax.sharding.Mesh | None = None
  rules: Any = None
  model_fields: Any = None  # The run's `model` section (a Hugging Face model's dtype).

  def load_policy(self, path: str, field: str = "rl.reward_options") -> Any:
    """A policy (run folder or local Hugging Face folder) as a `Policy` on this mesh."""
    return policy_source.load(path, self.model_fields, self.mesh, self.rules, field)

  def load_verifier(self, path: str, batch_size: int) -> Any:
    """The trained reward model of a verifier run folder, on this mesh's shape."""
    shape = None if self.mesh is None else tuple(self.mesh.devices.shape)
    return verifier_run.load_verifier(path, batch_size, shape)


class RewardRegistry(Registry):
  """Reward functions (or their factories) by name; `batched` holds the names of those
  that score lists, `factories` those registered as factories."""

  def __init__(self, what: str = "reward function"):
    super().__init__(what)
    self.batched: set[str] = set()
    self.factories: set[str] = set()
    self.validators: dict[str, Callable] = {}

  def register(self, name: str, batched: bool = False, factory: bool = False,
               validate: Callable | None = None):
    """Decorator registering `fn` under `name`; `batched=True`: it scores a whole round
    (`fn(examples, completions, ...) -> list[float]`); `factory=True`: it is called as
    `fn(context, **options)` and returns the reward function. `validate(**options)`, if
    given, checks a config's options before the run starts (a ConfigError)."""
    wrap = super().register(name)
    def register_fn(fn):
      if batched:
        self.batched.add(name)
      if factory:
        self.factories.add(name)
      if validate is not None:
        self.validators[name] = validate
      return wrap(fn)
    return register_fn

  def check_options(self, name: str, options: Mapping) -> None:
    """A ConfigError for an unknown name, or options it does not take (or that its
    validator rejects)."""
    self.lookup(name)
    if name not in self.factories and options:
      raise errors.ConfigError(f"{self.what} {name!r} takes no options; got "
                               f"{sorted(options)}")
    if name in self.validators:
      self.validators[name](**options)

  def build(self, name: str, context: RewardContext, options: Mapping | None = None
            ) -> Callable:
    """The function of `name`: itself, or its factory's result for `context`."""
    options = dict(options or {})
    self.check_options(name, options)
    fn = self[name]
    if name not in self.factories:
      return fn
    try:
      return fn(context, **options)
    except TypeError as e:  # A missing or unknown option of the factory.
      raise errors.ConfigError(f"{self.what} {name!r}: {e}") from e


REWARDS = RewardRegistry()
register_reward = REWARDS.register
# Per-step rewards: factories returning fn(prompts, completions) -> list[StepRewards].
STEP_REWARDS = RewardRegistry("step reward")


@dataclasses.dataclass
class StepRewards:
  """One completion's per-step rewards."""

  ends: list[int]  # Index in the completion of each step's last token.
  scores: list[float]  # Each step's reward (a PRM: P(step correct | steps so far)).


@register_reward("correctness")
def correctness(example: Mapping, completion: str, *, checker, **_) -> float:
  """1 if the parsed final answer passes the task's checker against the example's
  answer, else 0."""
  return float(bool(checker(formatting.parse_answer(completion), example["answer"])))


@register_reward("format")
def format_reward(example: Mapping, completion: str, **_) -> float:
  """1 if the completion closes its think segment and has a parseable answer, else 0."""
  del example
  closed = formatting.THINK_END in completion
  return float(closed and formatting.parse_answer(completion) is not None)


@register_reward("length_penalty")
def length_penalty(example: Mapping, completion: str, *, num_tokens: int,
                   max_tokens: int, **_) -> float:
  """-num_tokens / max_tokens: weight it to trade accuracy against length."""
  del example, completion
  return -float(num_tokens) / max(max_tokens, 1)


PRM_FIELD = "rl.process_reward.options.verifier"


def check_prm(verifier: str = "", batch_size: int = 64) -> None:
  """The "prm" step reward's options: a verifier run folder holding a PRM."""
  if not verifier:
    raise errors.ConfigError(f"{PRM_FIELD} is empty: the \"prm\" step reward needs a "
                             "PRM's run folder (configs/prm.py)")
  if not os.path.isdir(verifier) or run_folder.saved_method(verifier) != "verifier":
    raise errors.ConfigError(f"{PRM_FIELD}={verifier} is not a verifier run folder "
                             "(configs/prm.py)")
  if run_folder.load_config(verifier).verifier.kind != "prm":
    raise errors.ConfigError(f"{PRM_FIELD}={verifier} holds an ORM: process rewards "
                             "need a PRM")
  if batch_size < 1:
    raise errors.ConfigError("rl.process_reward.options.batch_size must be at least 1")


@STEP_REWARDS.register("prm", factory=True, validate=check_prm)
def prm_step_rewards(context: RewardContext, *, verifier: str, batch_size: int = 64):
  """A frozen PRM's score of every sampled step (process supervision: Lightman et al.
  2023; as RL rewards, Wang et al. 2024 "Math-Shepherd" and DeepSeekMath), read in the
  policy's own tokens, so the PRM must share the policy's tokenizer."""
  prm = context.load_verifier(verifier, batch_size)
  reward_model.check_same_tokenizer(prm.tokenizer, context.tokenizer,
                                    f"{PRM_FIELD}={verifier}")

  def score(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
            ) -> list[StepRewards]:
    return [StepRewards(list(ends), [float(p) for p in probs])
            for ends, probs in prm.score_sampled(prompts, completions)]
  return score


@dataclasses.dataclass
class Scores:
  total: np.ndarray  # [N] float32: the weighted sum per completion.
  parts: dict[str, np.ndarray]  # [N] float32: each reward function's own values.
  failures: int  # Completions a call failed on (raised, wrong count, not finite).
  timeouts: int  # Completions whose call ran past its timeout.


def validate_weights(weights: Mapping[str, float],
                     table: RewardRegistry | None = None,
                     options: Mapping[str, Mapping] | None = None) -> None:
  """A ConfigError for unknown reward names, an empty set of rewards, or options for a
  reward that is not weighted or does not take them."""
  table = REWARDS if table is None else table
  unknown = sorted(set(weights) - set(table))
  if unknown:
    raise errors.ConfigError(
        f"unknown reward function(s) {unknown}; registered: {sorted(table)}")
  if not weights:
    raise errors.ConfigError(
        "rl.rewards is empty: give at least one reward function a weight")
  for name, opts in (options or {}).items():
    if name not in weights:
      raise errors.ConfigError(f"rl.reward_options.{name}: {name!r} is not in rl.rewards")
    table.check_options(name, dict(opts))


class RewardScorer:
  """Scores completions with weighted reward functions on process 0, isolating their
  failures; every process gets process 0's scores (see the module docstring)."""

  def __init__(self, weights: Mapping[str, float], context: RewardContext,
               timeout_s: float = 5.0, rewards: RewardRegistry | None = None,
               options: Mapping[str, Mapping] | None = None):
    table = REWARDS if rewards is None else rewards
    options = {k: dict(v) for k, v in (options or {}).items()}
    validate_weights(weights, table, options)
    self.fns = {name: table.build(name, context, options.get(name)) for name in weights}
    self.batched = {name for name in weights if name in table.batched}
    self.weights = dict(weights)
    self.checker = context.checker
    self.timeout_s = timeout_s
    self._reported: set[str] = set()  # Functions whose first failure is logged.
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

  def score(self, examples: Sequence[Mapping], completions: Sequence[str],
            num_tokens: Sequence[int], max_tokens: int) -> Scores:
    """Scores of `completions[i]` (of `examples[i]`, `num_tokens[i]` tokens long).

    A collective in a multi-process run: every process calls it with the same
    completions; process 0 scores them and the others receive its result.
    """
    if jax.process_count() == 1:
      return self._score_here(examples, completions, num_tokens, max_tokens)
    if jax.process_index() == 0:
      scores = self._score_here(examples, completions, num_tokens, max_tokens)
    else:  # Shapes for the broadcast; process 0's values replace these.
      zeros = np.zeros(len(completions), np.float32)
      scores = Scores(zeros, {name: zeros for name in self.fns}, 0, 0)
    tree = multiprocess.broadcast_from_process_0(
        {"total": scores.total, "parts": scores.parts,
         "counts": np.array([scores.failures, scores.timeouts], np.int32)})
    return Scores(np.asarray(tree["total"], np.float32),
                  {k: np.asarray(v, np.float32) for k, v in tree["parts"].items()},
                  int(tree["counts"][0]), int(tree["counts"][1]))

  def _score_here(self, examples, completions, num_tokens, max_tokens) -> Scores:
    N = len(completions)
    if not len(examples) == len(num_tokens) == N:
      raise ValueError(f"{len(examples)} examples and {len(num_tokens)} lengths for "
                       f"{N} completions")
    parts, failures, timeouts = {}, 0, 0
    for name, fn in self.fns.items():
      if not N:
        values, failed, timed_out = np.zeros(0), np.zeros(0, bool), 0
      elif name in self.batched:
        values, failed, timed_out = self._batched(name, fn, examples, completions,
                                                  num_tokens, max_tokens)
      else:
        values, failed, timed_out = self._singles(name, fn, examples, completions,
                                                  num_tokens, max_tokens)
      parts[name] = np.where(failed, 0.0, values).astype(np.float32)
      failures += int(failed.sum()) - timed_out
      timeouts += timed_out
    total = np.zeros(N, np.float32)
    for name in self.fns:
      total += np.float32(self.weights[name]) * parts[name]
    return Scores(total, parts, failures, timeouts)

  def _singles(self, name, fn, examples, completions, num_tokens, max_tokens):
    """One call per completion: (values [N], failed [N], number timed out)."""
    values, failed, timed_out = np.zeros(len(completions)), [], 0
    for i, (example, completion, n) in enumerate(zip(examples, completions, num_tokens)):
      result, problem = self._call(fn, self.timeout_s, example, completion,
                                   checker=self.checker, num_tokens=int(n),
                                   max_tokens=max_tokens)
      if not problem:
        try:
          values[i] = float(result)
          if not math.isfinite(values[i]):
            problem = f"returned {values[i]}"
        except (TypeError, ValueError):
          problem = f"returned {result!r}, not a number"
      timed_out += problem == "timeout"
      failed.append(bool(problem))
      self._report(name, problem)
    return values, np.asarray(failed, bool), timed_out

  def _batched(self, name, fn, examples, completions, num_tokens, max_tokens):
    """One call for all completions: (values [N], failed [N], number timed out)."""
    N = len(completions)
    result, problem = self._call(fn, self.timeout_s * N, list(examples),
                                 list(completions), checker=self.checker,
                                 num_tokens=[int(n) for n in num_tokens],
                                 max_tokens=max_tokens)
    values, failed = np.zeros(N), np.zeros(N, bool)
    if not problem:
      try:
        values = np.asarray(result, np.float64)
        if values.shape != (N,):
          problem = f"returned {values.size} scores for {N} completions"
      except (TypeError, ValueError):
        problem = f"returned {type(result).__name__}, not a list of numbers"
    if problem:
      self._report(name, problem)
      return np.zeros(N), np.ones(N, bool), N if problem == "timeout" else 0
    failed = ~np.isfinite(values)
    if failed.any():
      self._report(name, f"returned {values[failed][0]} for completion "
                         f"{int(np.argmax(failed))}")
    return values, failed, 0

  def _call(self, fn, timeout_s: float, *args, **kwargs) -> tuple[object, str]:
    """(fn's result, "") or (None, what went wrong: "timeout" or the exception)."""
    future = self._pool.submit(fn, *args, **kwargs)
    try:
      return future.result(timeout=timeout_s), ""
    except concurrent.futures.TimeoutError:
      # The hung call keeps its thread; a fresh pool serves the calls that follow.
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
      return None, "timeout"
    except Exception as e:  # pylint: disable=broad-except
      return None, f"raised {type(e).__name__}: {e}"

  def _report(self, name: str, problem: str) -> None:
    if problem and name not in self._reported:
      self._reported.add(name)
      logging.warning("reward function %r %s; it scores 0 there (counted in "
                      "reward_failures / reward_timeouts; later failures are only "
                      "counted)", name, "timed out" if problem == "timeout" else problem)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
