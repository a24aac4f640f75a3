"""A reward model's training data: labelled records as verifier rows, Bradley-Terry
pairs from outcomes, and deterministic, resumable batches of them (as `SFTBatcher`)."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from o3lite import errors
from o3lite.verifiers import label_files
from o3lite.verifiers import reward_model as rm


def encode_records(records: Sequence[label_files.LabelledSolution], tokenizer, kind: str,
                   soft: bool = False, answer_read: bool = False) -> list[rm.Encoded]:
  """The verifier rows of labelled records (PRM: per-step labels, soft if asked and
  present, and with `answer_read` the `outcome` at the EOS; ORM: the `outcome`
  metadata)."""
  out = []
  for i, r in enumerate(records):
    outcome = None
    if kind == "orm" or answer_read:
      if r.metadata.get("outcome") not in (0, 1):
        raise errors.DataError(f"labelled solution {i} has no 'outcome' (0 or 1): an "
                               f"{'ORM' if kind == 'orm' else 'answer read'} trains on "
                               "outcomes")
      outcome = float(r.metadata["outcome"])
    if kind == "orm":
      labels = [outcome]
    else:
      labels = r.soft_labels if soft and r.soft_labels is not None else r.labels
    out.append(rm.encode(r.question, r.solution, tokenizer, kind, r.steps, labels,
                         answer_read, outcome))
  return out


class Batches:
  """Deterministic, resumable training batches of encoded rows (as `SFTBatcher`): the
  batch at data position p holds items p .. p + B - 1 of epoch-wise permutations."""

  def __init__(self, items: Sequence, batch_size: int, seq_len: int, pad_id: int,
               seed: int, pairs: bool = False):
    self.items, self.B, self.seq_len, self.pad_id = list(items), batch_size, seq_len, pad_id
    self.seed, self.pairs = seed, pairs

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

  def get_batch(self, position: int) -> tuple[dict, int]:
    n = len(self.items)
    chosen = [self.items[self._order(p // n)[p % n]] for p in range(position, position + self.B)]
    if self.pairs:
      batch = rm.pair_rows([c for c, _ in chosen], [r for _, r in chosen], self.seq_len,
                           self.pad_id)
    else:
      batch = rm.rows(chosen, self.seq_len, self.pad_id)
    return batch, position + self.B


def preference_pairs(records: Sequence[label_files.LabelledSolution],
                     encoded: Sequence[rm.Encoded]) -> list[tuple[rm.Encoded, rm.Encoded]]:
  """(correct, wrong) solution pairs of each question: every correct one with every
  wrong one (Bradley-Terry data from outcomes)."""
  by_question: dict[str, tuple[list, list]] = {}
  for r, e in zip(records, encoded):
    by_question.setdefault(r.question, ([], []))[1 - int(r.metadata["outcome"])].append(e)
  return [(c, w) for right, wrong in by_question.values() for c in right for w in wrong]
