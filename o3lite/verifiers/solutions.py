"""A verifier's training data: a policy's sampled solutions, labelled step by step.

  solutions = sample_solutions(policy, examples, num_samples=4, sampling=draws.Sampling(...))
  records, stats = label_solutions(examples_of_each, solutions, "monte_carlo", rollouts,
                                   consensus_with="exact")
  label_files.write_labelled(path, records)

Every record carries its steps' labels (`labels`, and Monte Carlo fractions in
`soft_labels`), the whole solution's outcome (`outcome`: 1 if its answer checks) and,
where the task has them, its exact step labels (`exact_labels`), so one file serves an
ORM, a PRM and their evaluation.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from o3lite import errors
from o3lite.data import batching
from o3lite.sampling import draws
from o3lite.sampling import policy as policy_lib
from o3lite.verifiers import label_files
from o3lite.verifiers import labellers
from o3lite.verifiers import steps as steps_lib


def _round_trips(text: str, tokenizer: Any) -> bool:
  """Whether `text`'s steps survive encoding and decoding (not so where the policy wrote
  a token with no text, such as SentencePiece's unknown piece)."""
  again = tokenizer.decode(tokenizer.encode(text))
  return ([s.text for s in steps_lib.split_completion(again)]
          == [s.text for s in steps_lib.split_completion(text)])


def sample_solutions(policy: policy_lib.Policy, examples: Sequence[dict], num_samples: int,
                     sampling: draws.Sampling, seed: int = 0,
                     problems_per_call: int | None = None
                     ) -> tuple[list[dict], list[str], int]:
  """(the example of each solution, the solutions' text, how many were dropped):
  `num_samples` per problem, in problem order (`draws.draw`, key `PRNGKey(seed)`). A
  solution whose steps change when its text is tokenized again cannot be labelled or
  scored step by step, and is dropped."""
  tokenizer = policy.tokenizer
  drawn = draws.draw(policy, batching.encode_prompts(examples, tokenizer), num_samples,
                     sampling, jax.random.PRNGKey(seed), problems_per_call)
  of, texts, dropped = [], [], 0
  for example, d in zip(examples, drawn):
    for text in d.texts:
      if not _round_trips(text, tokenizer):
        dropped += 1
        continue
      of.append(example)
      texts.append(text)
  return of, texts, dropped


def label_solutions(examples: Sequence[dict], solutions: Sequence[str], labeller: str,
                    rollouts: labellers.Rollouts | None = None, consensus_with: str = "",
                    ) -> tuple[list[label_files.LabelledSolution], dict[str, Any]]:
  """Labelled records of `solutions` (examples[i] is the problem of solutions[i]) by the
  registered `labeller`; with `consensus_with` (another labeller's name), only the step
  labels both give are kept (the rest null). Stats: solutions, steps, labelled steps,
  the kept fraction, the fraction of steps labelled correct and of correct outcomes."""
  if consensus_with and consensus_with == labeller:
    raise errors.ConfigError(f"consensus of the {labeller!r} labeller with itself")
  main = labellers.LABELLERS.lookup(labeller)(examples, solutions, rollouts)
  outcomes = labellers.LABELLERS["outcome"](examples, solutions, rollouts)
  judge = rollouts.outcome if rollouts is not None else labellers.answer_outcome()
  has_exact = all("step_values" in e for e in examples)
  exact = labellers.LABELLERS["exact"](examples, solutions) if has_exact else None
  stats: dict[str, Any] = {"labeller": labeller, "solutions": len(solutions)}
  hard = [x.hard for x in main]
  soft = [x.soft for x in main] if all(x.soft is not None for x in main) else None
  if consensus_with:
    second = {"exact": exact, "outcome": outcomes}.get(consensus_with)
    if second is None:
      second = labellers.LABELLERS.lookup(consensus_with)(examples, solutions, rollouts)
    agreed = labellers.consensus(main, second)
    hard, soft = agreed.labels, agreed.soft
    stats.update(consensus_with=consensus_with, kept_fraction=agreed.kept_fraction)
  records = []
  for i, (example, solution) in enumerate(zip(examples, solutions)):
    metadata = {"outcome": int(judge(example, solution)), "labeller": labeller}
    if exact is not None:
      metadata["exact_labels"] = exact[i].hard
    records.append(label_files.labelled(example, solution, hard[i],
                                        None if soft is None else soft[i], **metadata))
  labelled_steps = [y for r in records for y in r.labels if y is not None]
  stats.update(steps=sum(len(r.labels) for r in records), labelled_steps=len(labelled_steps),
               correct_step_fraction=(sum(y >= 0.5 for y in labelled_steps)
                                      / max(len(labelled_steps), 1)),
               outcome_accuracy=sum(r.metadata["outcome"] for r in records)
               / max(len(records), 1))
  return records, stats
