"""Stops given as strings or token ids -> `SamplingConfig.stops` (token sequences).

The decode loop compares token ids, never text. A string stop becomes:
- every single token whose own text contains the string (a byte-level BPE writes "\\n"
  inside ".\\n" or "\\n\\n" too): the row stops after that token, so its text may run a
  few characters past the string;
- the string's own tokenization, where that is several tokens, matched against the
  row's latest tokens (also across the prompt / continuation boundary).
An int is one token id. `StopSet.labels[i]` is the item stop i stands for, so
`labels[state.stop_B[b] - 1]` names what stopped row b.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from o3lite import errors


@dataclasses.dataclass(frozen=True)
class StopSet:
  stops: tuple[tuple[int, ...], ...]  # For SamplingConfig.stops.
  labels: tuple[str | int, ...]  # The string or id each stop stands for.

  def label(self, stop_code: int):
    """What a row's `stop_B` code (1 + stop index) stands for; None for EOS or no stop."""
    return self.labels[stop_code - 1] if stop_code >= 1 else None


def stop_set(tokenizer, items: Sequence[str | int]) -> StopSet:
  """Stops for `items` (strings and token ids), in their order, each sequence once."""
  stops, labels = [], []

  def add(seq, label):
    if seq not in stops:
      stops.append(seq)
      labels.append(label)

  texts = None
  for item in items:
    if isinstance(item, (int,)) and not isinstance(item, bool):
      if not 0 <= item < tokenizer.vocab_size:
        raise errors.ConfigError(f"stop token id {item} is outside the vocabulary "
                                 f"(size {tokenizer.vocab_size})")
      add((item,), item)
      continue
    if not isinstance(item, str) or not item:
      raise errors.ConfigError(f"a stop must be a non-empty string or a token id, got {item!r}")
    if texts is None:  # Each token's own text, decoded once.
      special = {getattr(tokenizer, name, -1) for name in ("eos_id", "pad_id", "bos_id")}
      texts = [("" if i in special else tokenizer.decode([i]))
               for i in range(tokenizer.vocab_size)]
    for i, text in enumerate(texts):
      if item in text:
        add((i,), item)
    encoded = tuple(tokenizer.encode(item))
    if len(encoded) > 1:
      add(encoded, item)
  return StopSet(tuple(stops), tuple(labels))
