"""Deterministic, resumable SFT batches with sequence packing.

A batch is a pure function of `position`, the number of examples consumed so
far in the run: epoch e = position // num_examples reads the examples in a
permutation seeded by (seed, e). Saving `position` with a checkpoint is all it
takes to resume without skipping or repeating data:

  batcher = SFTBatcher(examples, tokenizer, batch_size=64, seq_len=256, seed=0)
  batch, position = batcher.get_batch(position)

Each example is the token sequence prompt + completion + EOS, of length L; it
fills L - 1 (input, target) slots of a row. Rows of `seq_len` slots are packed
greedily with consecutive examples; `segment_ids` (1, 2, ... per example, 0 on
padding) keep them from attending to each other and `positions` restart at 0.
"""

from collections.abc import Sequence

import numpy as np

from o3lite import errors
from o3lite.data import formatting
from o3lite.data import tokenizers as tokenizer_lib

Batch = dict[str, np.ndarray]


def tokenize_example(ex: dict, tokenizer: tokenizer_lib.Tokenizer,
                     with_cot: bool) -> tuple[list[int], list[int]]:
  """Returns (prompt_ids, completion_ids); the completion ends with EOS."""
  prompt = formatting.encode_prompt(tokenizer, ex["question"])
  completion = tokenizer.encode(
      formatting.format_completion(ex["cot"], ex["answer"], with_cot))
  return prompt, completion + [tokenizer.eos_id]


def encode_prompts(examples: Sequence[dict],
                   tokenizer: tokenizer_lib.Tokenizer) -> list[list[int]]:
  """Prompt ids of each example, for sampling and evaluation."""
  return [formatting.encode_prompt(tokenizer, ex["question"])
          for ex in examples]


class SFTBatcher:
  """Packs tokenized examples into [batch_size, seq_len] training batches.

  Batch arrays, all [batch_size, seq_len]:
    inputs       int32 token ids (each sequence but its last token)
    targets      int32 next tokens
    loss_mask    float32, 1 where the target is a completion token (EOS
                 included), 0 on prompt targets and padding
    segment_ids  int32, 1, 2, ... per packed example in a row, 0 on padding
    positions    int32, 0, 1, ... restarting with each example
  Padding uses `tokenizer.pad_id`.
  """

  def __init__(self, examples: Sequence[dict],
               tokenizer: tokenizer_lib.Tokenizer, batch_size: int,
               seq_len: int, seed: int, with_cot: bool = True,
               pack: bool = True, drop_too_long: bool = False):
    """Tokenizes every example.

    Args:
      examples: dicts with "question", "cot" and "answer" (other keys unread).
      tokenizer: the tokenizer.
      batch_size: rows per batch.
      seq_len: slots per row.
      seed: seed of the per-epoch permutations.
      with_cot: train on the chains of thought, or on empty think blocks.
      pack: several examples per row, or one.
      drop_too_long: drop (and count, `num_dropped`) the examples of more than
        seq_len + 1 tokens, instead of raising.

    Raises:
      DataError: no examples, or (unless dropped) an example of more than
        seq_len + 1 tokens.
    """
    if not examples:
      raise errors.DataError("SFTBatcher needs at least one example.")
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.pack = pack
    self.pad_id = tokenizer.pad_id
    self._tokens, self._prompt_lens = [], []
    self.num_dropped = 0
    for index, ex in enumerate(examples):
      prompt, completion = tokenize_example(ex, tokenizer, with_cot)
      length = len(prompt) + len(completion)
      if length > seq_len + 1 and drop_too_long:
        self.num_dropped += 1
        continue
      if length > seq_len + 1:
        raise errors.DataError(
            f"Example {index} has {length} tokens, more than seq_len + 1 = "
            f"{seq_len + 1} (seq_len={seq_len}); raise data.seq_len, or set "
            "data.drop_too_long=True to drop such examples.")
      self._tokens.append(np.asarray(prompt + completion, np.int32))
      self._prompt_lens.append(len(prompt))
    if not self._tokens:
      raise errors.DataError(f"all {len(examples)} examples have more than seq_len + 1 = "
                             f"{seq_len + 1} tokens (seq_len={seq_len})")
    self._orders: dict[int, np.ndarray] = {}

  @property
  def num_examples(self) -> int:
    """Examples per epoch."""
    return len(self._tokens)

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) >= 2:
        self._orders.pop(min(self._orders))
      rng = np.random.default_rng([self.seed, epoch])
      self._orders[epoch] = rng.permutation(self.num_examples)
    return self._orders[epoch]

  def example_index(self, position: int) -> int:
    """Index (in `examples`) of the example read at `position`."""
    epoch, offset = divmod(position, self.num_examples)
    return int(self._order(epoch)[offset])

  def get_batch(self, position: int) -> tuple[Batch, int]:
    """Returns the batch starting at `position` and the position after it."""
    if position < 0:
      raise ValueError(f"position must be >= 0, got {position}.")
    shape = (self.batch_size, self.seq_len)
    batch = {
        "inputs": np.full(shape, self.pad_id, np.int32),
        "targets": np.full(shape, self.pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for row in range(self.batch_size):
      start, segment = 0, 0
      while True:
        index = self.example_index(position)
        tokens = self._tokens[index]
        n = len(tokens) - 1
        if start + n > self.seq_len:
          break  # Starts the next row (or the next batch).
        span = slice(start, start + n)
        segment += 1
        batch["inputs"][row, span] = tokens[:-1]
        batch["targets"][row, span] = tokens[1:]
        # targets[j] = tokens[j + 1] is a completion token iff j + 1 >= P.
        first_target = max(self._prompt_lens[index], 1) - 1
        batch["loss_mask"][row, start + first_target:start + n] = 1.0
        batch["segment_ids"][row, span] = segment
        batch["positions"][row, span] = np.arange(n)
        start += n
        position += 1
        if not self.pack:
          break
    return batch, position


def rollout_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  finished: Sequence[bool], seq_len: int, eos_id: int, pad_id: int
                  ) -> dict[str, np.ndarray]:
  """RL rows: prompt + completion (+ EOS if it stopped), left-aligned, [B, seq_len - 1].

  Arrays as in `SFTBatcher`, with `mask` (not `loss_mask`) 1 on the targets the policy
  sampled: the completion tokens and its EOS.
  """
  B, T = len(prompts), seq_len - 1
  batch = {k: np.zeros((B, T), np.int32) for k in ("inputs", "targets", "segment_ids")}
  batch["inputs"][:] = pad_id
  batch["targets"][:] = pad_id
  batch["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  batch["mask"] = np.zeros((B, T), np.float32)
  for b, (prompt, completion, done) in enumerate(zip(prompts, completions, finished)):
    row = list(prompt) + list(completion) + ([eos_id] if done else [])
    if len(row) > seq_len:
      raise errors.ConfigError(f"prompt + completion of {len(row)} tokens exceed rl seq_len "
                               f"{seq_len}")
    n = len(row) - 1
    batch["inputs"][b, :n] = row[:-1]
    batch["targets"][b, :n] = row[1:]
    batch["segment_ids"][b, :n] = 1
    batch["mask"][b, len(prompt) - 1:n] = 1
  return batch
