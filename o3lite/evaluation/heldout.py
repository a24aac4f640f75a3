"""Held-out evaluation, used by training and by `python -m o3lite.evaluate`.

Metrics: greedy exact match (`accuracy`), pass@k with the unbiased estimator of Chen et
al. 2021 and maj@k (self-consistency over parsed answers) from `num_samples` samples per
problem, mean chain-of-thought length, and greedy accuracy per thinking budget.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from o3lite.data import formatting
from o3lite.sampling import draws
from o3lite.sampling import policy as policy_lib

Checker = Callable[[str | None, str], bool]


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), n samples, c correct."""
  if k > n:
    raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_answer(answers: Sequence[str | None]) -> str | None:
  """The most frequent parsed answer (first seen wins ties); None if none parsed."""
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None
  best = max(counts.values())
  return next(a for a in answers if a is not None and counts[a] == best)


def thinking_length(tokens: Sequence[int], think_end_id: int) -> int:
  """Tokens of the completion before `</think>` (all of them if it never closes)."""
  return tokens.index(think_end_id) if think_end_id in tokens else len(tokens)


def _ks(n: int) -> list[int]:
  """k = 1, 2, 4, ... up to n (and n itself)."""
  return sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n}) if n else []


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What a held-out evaluation measures (a run config's `eval` section, read once by the
  stage: `EvalSettings.of(config.eval)`)."""

  max_new_tokens: int = 64  # Cap on generated tokens.
  batch_size: int = 128  # Prompts decoded together.
  num_samples: int = 0  # Samples per problem for pass@k / maj@k (0 = greedy only).
  temperature: float = 1.0  # Temperature of those samples.
  top_p: float = 1.0
  seed: int = 0  # Seed of those samples.
  think_budgets: tuple[int, ...] = ()  # Greedy accuracy with the thinking capped at each.

  @classmethod
  def of(cls, section) -> "EvalSettings":
    """The fields of a config section (other keys, such as `split`, are not read)."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in dict(section).items() if k in names}
    fields["think_budgets"] = tuple(int(b) for b in fields.get("think_budgets", ()))
    return cls(**fields)


def evaluate(policy: policy_lib.Policy, examples: Sequence[dict], checker: Checker,
             settings: EvalSettings, split: str,
             rng: jax.Array | None = None) -> tuple[dict[str, Any], list[dict]]:
  """All held-out metrics of `settings` on `examples`, and one record per problem."""
  tokenizer = policy.tokenizer
  prompts_text = [formatting.format_prompt(ex["question"]) for ex in examples]
  prompts = [formatting.encode_prompt(tokenizer, ex["question"]) for ex in examples]
  greedy = draws.Sampling(max_new_tokens=settings.max_new_tokens, temperature=0.0)
  run = lambda sampling, n=1, key=None: draws.draw(policy, prompts, n, sampling, key,
                                                   problems_per_call=settings.batch_size)

  samples, correct = [], []
  for prompt, d, ex in zip(prompts_text, run(greedy), examples):
    completion, text, answer = d.completions[0], d.texts[0], d.answers[0]
    correct.append(bool(checker(answer, ex["answer"])))
    samples.append({"prompt": prompt, "completion": text, "answer": answer,
                    "target": ex["answer"], "correct": correct[-1],
                    "completion_tokens": len(completion.tokens),
                    "thinking_tokens": thinking_length(completion.tokens,
                                                       tokenizer.think_end_id)})
  metrics: dict[str, Any] = {
      "split": split,
      "num_examples": len(samples),
      "accuracy": float(np.mean(correct)) if samples else 0.0,
      "parsed_fraction": float(np.mean([s["answer"] is not None for s in samples])),
      "mean_completion_tokens": float(np.mean([s["completion_tokens"] for s in samples])),
      "mean_thinking_tokens": float(np.mean([s["thinking_tokens"] for s in samples])),
  }

  n = settings.num_samples
  if n:
    sampled = greedy.replace(temperature=settings.temperature, top_p=settings.top_p)
    key = jax.random.PRNGKey(settings.seed) if rng is None else rng
    per_problem = []
    for d, ex, record in zip(run(sampled, n, key), examples, samples):
      hits = [bool(checker(a, ex["answer"])) for a in d.answers]
      record["sample_answers"] = d.answers
      per_problem.append((d.answers, hits))
    for k in _ks(n):
      metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, sum(h), k) for _, h in per_problem]))
      metrics[f"maj@{k}"] = float(np.mean([
          checker(majority_answer(a[:k]), ex["answer"])
          for (a, _), ex in zip(per_problem, examples)]))
    metrics["sample_temperature"] = settings.temperature

  for budget in settings.think_budgets:
    hits = [checker(d.answers[0], ex["answer"])
            for d, ex in zip(run(greedy.replace(think_budget=budget)), examples)]
    metrics[f"accuracy@think_budget={budget}"] = float(np.mean(hits))
  return metrics, samples


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The numeric entries of an evaluation's metrics (for metrics.jsonl / TensorBoard)."""
  return {k: v for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def write_json(path: str, tree: Any) -> None:
  """`tree` as JSON at `path`, atomically (a temporary name, then a rename)."""
  with open(path + ".tmp", "w") as f:
    json.dump(tree, f, indent=2)
  os.replace(path + ".tmp", path)


def write_eval(workdir: str, metrics: dict[str, Any], samples: Sequence[dict] | None,
               name: str = "eval") -> str:
  """`DIR/{name}.json` and (unless `samples` is None) `DIR/{name}_samples.jsonl`, each
  written atomically."""
  path = os.path.join(workdir, f"{name}.json")
  write_json(path, metrics)
  if samples is not None:
    samples_path = os.path.join(workdir, f"{name}_samples.jsonl")
    with open(samples_path + ".tmp", "w") as f:
      for s in samples:
        f.write(json.dumps(s) + "\n")
    os.replace(samples_path + ".tmp", samples_path)
  return path


def read_samples(workdir: str, name: str = "eval") -> list[dict] | None:
  """The records `write_eval` wrote to `DIR/{name}_samples.jsonl`; None if there are none."""
  path = os.path.join(workdir, f"{name}_samples.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return [json.loads(line) for line in f]


def format_table(metrics: dict[str, Any]) -> str:
  rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
