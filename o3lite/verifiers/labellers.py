"""Step labellers, registered by name: exact, Monte Carlo (Math-Shepherd), outcome; and
the consensus of two of them.

Every labeller is `labeller(examples, solutions, rollouts=None) -> list[StepLabels]`:
`examples[i]` is the problem of `solutions[i]` (a dict with "question", "answer" and, for
the exact labeller, "step_values"), `solutions[i]` a completion in the one format, and
the result has one label per step of `steps.split_completion(solutions[i])`.

  exact        the step's value equals the true intermediate value (`steps.py`)
  monte_carlo  Math-Shepherd (Wang et al., 2024): from the prefix up to and including
               step i, k completions; hard = 1 if any reaches the right answer, soft =
               the fraction that do
  outcome      every step gets the outcome of the whole solution (the answer check)

  labels = LABELLERS.lookup("monte_carlo")(examples, solutions, Rollouts(params, cfg, tok))
  agreed = consensus(labels, LABELLERS["exact"](examples, solutions))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax

from o3lite import errors
from o3lite.data import formatting, tasks
from o3lite.model import transformer as model_lib
from o3lite.registry import Registry
from o3lite.sampling import sampler
from o3lite.verifiers import steps as steps_lib

LABELLERS = Registry("step labeller")


@dataclasses.dataclass
class StepLabels:
  """One solution's labels: `hard` (0 / 1 per step), `soft` (a probability per step,
  the Monte Carlo fraction) where the labeller has one."""

  hard: list[int]
  soft: list[float] | None = None


def answer_outcome(check: Callable[[str | None, str], bool] = tasks.numeric_match
                   ) -> Callable[[dict, str], bool]:
  """`outcome(example, completion) -> bool`: the completion's answer (`parse_answer`)
  checked against example["answer"] with `check` (a task's or `sources.get_checker`)."""
  return lambda example, text: bool(check(formatting.parse_answer(text), example["answer"]))


@dataclasses.dataclass(frozen=True)
class MonteCarloConfig:
  """How the Monte Carlo labeller samples."""

  k: int = 8  # Completions per step prefix.
  temperature: float = 0.7  # Sampling temperature of the completions (0 = greedy).
  max_new_tokens: int = 64  # Tokens each completion may add after its prefix.
  batch_size: int = 8  # Step prefixes per sampler call (k rows each; a multiple of the
  #                      mesh's batch shards on a mesh).
  seed: int = 0  # Sampling key; batch c uses fold_in(key, c).
  prompt_bucket: int = 16  # Prefix lengths are padded to a multiple (few compiled shapes).

  def __post_init__(self):
    for name in ("k", "max_new_tokens", "batch_size", "prompt_bucket"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise errors.ConfigError(f"Monte Carlo labeller: {name}={value!r}, expected an "
                                 "int >= 1")
    if not self.temperature >= 0:
      raise errors.ConfigError(f"Monte Carlo labeller: temperature={self.temperature!r}, "
                               "expected >= 0")


@dataclasses.dataclass
class Rollouts:
  """What the Monte Carlo labeller samples with: a policy, its tokenizer, the settings,
  and `outcome(example, completion) -> bool` (default: the answer, numerically)."""

  params: Any
  model_cfg: model_lib.ModelConfig
  tokenizer: Any
  config: MonteCarloConfig = MonteCarloConfig()
  outcome: Callable[[dict, str], bool] = dataclasses.field(default_factory=answer_outcome)
  mesh: Any = None
  rules: Any = None


def _check_counts(examples, solutions) -> None:
  if len(examples) != len(solutions):
    raise errors.DataError(f"{len(examples)} examples for {len(solutions)} solutions")


@LABELLERS.register("exact")
def exact(examples: Sequence[dict], solutions: Sequence[str],
          rollouts: Rollouts | None = None) -> list[StepLabels]:
  """Exact labels from each example's "step_values" (`steps.exact_labels`); no model."""
  del rollouts  # Needs no model.
  _check_counts(examples, solutions)
  out = []
  for i, (example, solution) in enumerate(zip(examples, solutions)):
    if "step_values" not in example:
      raise errors.DataError(f"example {i} ({example.get('question')!r}) has no "
                             "step_values: the exact labeller needs a task's examples")
    out.append(StepLabels(steps_lib.exact_labels(solution, example["step_values"])))
  return out


@LABELLERS.register("outcome")
def outcome(examples: Sequence[dict], solutions: Sequence[str],
            rollouts: Rollouts | None = None) -> list[StepLabels]:
  """Each step labelled with its whole solution's outcome (an outcome reward model's
  labels), by `rollouts.outcome` or, without rollouts, the answer checked numerically."""
  _check_counts(examples, solutions)
  judge = rollouts.outcome if rollouts is not None else answer_outcome()
  return [StepLabels([int(judge(example, solution))] * len(steps_lib.split_completion(solution)))
          for example, solution in zip(examples, solutions)]


@dataclasses.dataclass(frozen=True)
class _Prefix:
  solution: int  # Index into solutions.
  step: int
  tokens: list[int]  # Prompt + the completion's tokens up to and including the step.
  written: list[int]  # The completion's part of `tokens`.


def _prefixes(examples, solutions, tokenizer) -> tuple[list[_Prefix], list[int]]:
  """Every (solution, step) prefix, and each solution's step count."""
  prefixes, counts = [], []
  for s, (example, solution) in enumerate(zip(examples, solutions)):
    prompt = formatting.encode_prompt(tokenizer, example["question"])
    written = tokenizer.encode(solution)
    text = tokenizer.decode(written)
    found = steps_lib.split_completion(text)
    if [x.text for x in found] != [x.text for x in steps_lib.split_completion(solution)]:
      raise errors.DataError(f"solution {s}: its steps change when tokenized and decoded; "
                             "the tokenizer cannot place them")
    counts.append(len(found))
    for i, span in enumerate(steps_lib.token_spans(written, tokenizer.decode, found)):
      prefixes.append(_Prefix(s, i, prompt + written[:span.boundary], written[:span.boundary]))
  return prefixes, counts


@LABELLERS.register("monte_carlo")
def monte_carlo(examples: Sequence[dict], solutions: Sequence[str],
                rollouts: Rollouts | None = None) -> list[StepLabels]:
  """Math-Shepherd labels (Wang et al., 2024, "Math-Shepherd: Verify and Reinforce LLMs
  Step-by-step without Human Annotations"): for step i of a solution, k completions
  c_1..c_k of prompt + steps 1..i; with correct(c) the outcome of prefix + c,

    soft_i = (1 / k) * sum_j correct(c_j)        hard_i = 1 if soft_i > 0 else 0.

  A prefix shared by several solutions of one problem (the same tokens, the same answer)
  is sampled once and its labels given to each. Distinct prefixes go `batch_size` at a
  time, every call the same shapes: `prime` puts them in the cache once (a short last
  batch is padded with copies of its first prefix), `fork` makes k rows of each, one
  `continue_` samples all batch_size * k completions.
  """
  if rollouts is None:
    raise errors.ConfigError("the monte_carlo step labeller needs rollouts (a policy)")
  _check_counts(examples, solutions)
  cfg, tok = rollouts.config, rollouts.tokenizer
  where = {"mesh": rollouts.mesh, "rules": rollouts.rules}
  sampling_cfg = sampler.SamplingConfig(
      max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
      temperature=cfg.temperature, prompt_bucket=cfg.prompt_bucket)
  prefixes, counts = _prefixes(examples, solutions, tok)
  shared: dict[tuple, list[_Prefix]] = {}  # Distinct prefix -> the (solution, step)s.
  for p in prefixes:
    shared.setdefault((tuple(p.tokens), examples[p.solution]["answer"]), []).append(p)
  distinct = [group[0] for group in shared.values()]
  hits = [[0] * n for n in counts]
  key, B, k = jax.random.PRNGKey(cfg.seed), cfg.batch_size, cfg.k
  for call, begin in enumerate(range(0, len(distinct), B)):
    chunk = distinct[begin:begin + B]
    primed = [p.tokens for p in chunk] + [chunk[0].tokens] * (B - len(chunk))
    state = sampler.prime(rollouts.params, primed, rollouts.model_cfg, sampling_cfg, **where)
    state = sampler.fork(state, [r for r in range(B) for _ in range(k)], **where)
    state = sampler.continue_(rollouts.params, state, [[]] * (B * k), rollouts.model_cfg,
                              sampling_cfg, jax.random.fold_in(key, call), **where)
    rows = sampler.completions(state, sampling_cfg)
    for r, p in enumerate(chunk):
      correct = sum(int(rollouts.outcome(examples[p.solution], tok.decode(p.written + row.tokens)))
                    for row in rows[r * k:(r + 1) * k])
      for same in shared[(tuple(p.tokens), examples[p.solution]["answer"])]:
        hits[same.solution][same.step] = correct
  return [StepLabels([int(h > 0) for h in row], [h / k for h in row]) for row in hits]


@dataclasses.dataclass
class Consensus:
  """Labels kept where two labellers agree: `labels[s][i]` is the agreed hard label of
  step i of solution s, or None where they disagree; `soft` the first labeller's soft
  labels where kept (None elsewhere), if it has them."""

  labels: list[list[int | None]]
  soft: list[list[float | None]] | None
  kept: int
  total: int

  @property
  def kept_fraction(self) -> float:
    return self.kept / self.total if self.total else 0.0


def consensus(first: Sequence[StepLabels], second: Sequence[StepLabels]) -> Consensus:
  """Keeps a step's label only where `first` (e.g. Monte Carlo) and `second` (exact
  labels, or the solution's outcome) give the same hard label; counts what is kept."""
  if len(first) != len(second):
    raise errors.DataError(f"consensus of {len(first)} and {len(second)} solutions")
  labels, soft, kept, total = [], [], 0, 0
  for s, (a, b) in enumerate(zip(first, second)):
    if len(a.hard) != len(b.hard):
      raise errors.DataError(f"solution {s}: {len(a.hard)} steps labelled by one "
                             f"labeller, {len(b.hard)} by the other")
    agree = [x == y for x, y in zip(a.hard, b.hard)]
    labels.append([x if ok else None for x, ok in zip(a.hard, agree)])
    if a.soft is not None:
      soft.append([x if ok else None for x, ok in zip(a.soft, agree)])
    kept, total = kept + sum(agree), total + len(agree)
  has_soft = all(a.soft is not None for a in first) and bool(first)
  return Consensus(labels, soft if has_soft else None, kept, total)
