"""A PRM that reads solutions as they are written: each row of a search keeps the PRM's
KV cache of its tokens, so a new step is scored from its own tokens only, not by
re-reading the question and every earlier step (step-level search: beam, DVTS).

  reader = step_reader.make(verifier, prompts, examples, tokenizer, copies=N)
  steps = reader.extend(step_tokens)      # per row: the scores of its steps so far
  reader.fork(parents)                    # row r becomes a copy of row parents[r]
  ahead = reader.peek(more_tokens)        # the same after more tokens; rows not moved

A step's score is the PRM's P(step i correct | question, steps 1..i), read at the step's
last token exactly as `reward_model.encode_sampled` places the reads (the steps of the
decoded text, `steps.split_completion`), so a row's scores equal `Verifier.score_sampled`
on the whole row (the cache holds the keys and values a full pass computes). Only the
steps whose read falls among the appended tokens are computed; the others keep their
scores: a line cut off mid-way (a row stopped at a token such as "\n7") is scored as it
stands and its score replaced once the line goes on. Steps are those of the text so far:
a later "<think>" or second "</think>" changes which earlier lines are steps (the chain
runs from the last "<think>" to the last "</think>"), which a reader of steps as they
are written cannot follow: such a row keeps the scores it read (the `Rereader` gives a
whole pass's).

`make` gives a `CachedReader` for an o3lite `reward_model.Verifier` on the policy's
tokenizer (its reads sit on the policy's tokens) and a `Rereader` for anything else with
`score_steps` (an external Hugging Face PRM, a verifier with another tokenizer): it
scores each changed row's whole decoded text again at every call, the same numbers at
the cost the cache saves. Both add the tokens they run to the verifier's `tokens_scored`
(compute accounting: the cached reader runs every real token once).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from o3lite import errors
from o3lite.model import heads
from o3lite.model import transformer as model_lib
from o3lite.sampling import decoding
from o3lite.parallel import mesh as sharding_lib
from o3lite.sampling import sampler
from o3lite.verifiers import reward_model
from o3lite.verifiers import steps as steps_lib

_BUCKET = 16  # Prompt and appended lengths are padded to a multiple (few compiled shapes).
_SLOTS = 32  # The cache grows by multiples of this many slots.


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("model_cfg", "capacity"))
def _prefill(params, prompt_BxP, length_B, model_cfg: model_lib.ModelConfig, capacity: int):
  """The prompts' keys and values in a fresh cache of `capacity` slots."""
  B, P = prompt_BxP.shape
  positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  segments_BxP = (positions_BxP < length_B[:, None]).astype(jnp.int32)
  _, cache = heads.ScalarHead(model_cfg).apply(
      {"params": params}, prompt_BxP, positions_BxP, segments_BxP,
      model_lib.init_cache(model_cfg, B, capacity), fresh_cache=True)
  return cache


def _append(params, cache, new_BxT, length_B, model_cfg: model_lib.ModelConfig,
            capacity: int):
  """new_BxT[b, :length_B[b]] appended to row b; the PRM's probability at each of them
  [B, T] (padding: meaningless) and the cache resized to `capacity` slots."""
  cache = decoding.resize_cache(cache, capacity)
  T = new_BxT.shape[1]
  positions_BxT = cache["end_index"][:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  segments_BxT = (jnp.arange(T)[None] < length_B[:, None]).astype(jnp.int32)
  values_BxT, cache = heads.ScalarHead(model_cfg).apply(
      {"params": params}, new_BxT, positions_BxT, segments_BxT, cache)
  return jax.nn.sigmoid(values_BxT), cache


_STATIC = ("model_cfg", "capacity")
_extend = jax.jit(_append, static_argnames=_STATIC, donate_argnames=("cache",))
_peek = jax.jit(_append, static_argnames=_STATIC)  # Keeps the cache it was given.
_take = jax.jit(lambda cache, rows_R: jax.tree_util.tree_map(
    lambda x: jnp.take(x, rows_R, axis=0), cache))


@dataclasses.dataclass(frozen=True)
class _Text:
  """A row's tokens, their decoded text and where each token's text ends
  (`steps.char_offsets`), kept up to date one call's tokens at a time."""

  tokens: tuple[int, ...] = ()
  text: str = ""
  offsets: tuple[int, ...] = (0,)
  by_pieces: bool = True  # The tokens' own texts concatenate to `text`.

  def plus(self, new: Sequence[int], decode, piece) -> _Text:
    tokens = self.tokens + tuple(new)
    text = decode(list(tokens))
    pieces = [piece(t) for t in new] if self.by_pieces else []
    if self.by_pieces and self.text + "".join(pieces) == text:
      offsets = self.offsets + tuple(len(self.text) + n
                                     for n in itertools.accumulate(len(p) for p in pieces))
      return _Text(tokens, text, offsets, True)
    return _Text(tokens, text, tuple(steps_lib.char_offsets(tokens, decode)), False)

  def reads(self) -> list[int]:
    """The index of each step's last token (as `reward_model.encode_sampled`)."""
    return steps_lib.last_tokens(
        self.offsets, [s.end for s in steps_lib.split_completion(self.text)])


class CachedReader:
  """Rows of growing solutions, each with its KV cache of the PRM (`verifier`, an
  o3lite `reward_model.Verifier` of kind "prm" on the policy's tokenizer): row
  i * copies + j starts as prompts[i]; `pad_to` prompts in all, the missing ones copies
  of the first (padding: never counted as verifier work, their rows never fed). On a
  mesh (the verifier's), rows split over its batch axes: their count must be a multiple
  of the batch shards. A row longer than the verifier's `seq_len` (prompt + solution +
  EOS) is a one-line ConfigError, as `Verifier` makes it."""

  def __init__(self, verifier: reward_model.Verifier, prompts: Sequence[Sequence[int]],
               copies: int = 1, pad_to: int | None = None):
    self.verifier = verifier
    self._where = sampler.placement(verifier.mesh, verifier.rules)
    count = max(pad_to or 0, len(prompts))
    self._where.check_rows(count * copies)
    tok = verifier.tokenizer
    self._decode, self._pieces = tok.decode, {}
    # The prefill's rows: the prompts, padded to `count` and to the batch shards.
    padded = list(prompts) + [prompts[0]] * (_round_up(count, self._where.shards)
                                             - len(prompts))
    lengths = np.array([len(p) for p in padded], np.int32)
    P = _round_up(int(lengths.max()), _BUCKET)
    prompt_BxP = np.full((len(padded), P), tok.pad_id, np.int32)
    for b, p in enumerate(padded):
      prompt_BxP[b, :len(p)] = p
    placed = self._where.put(prompt=prompt_BxP, length=lengths)
    with self._where.context():
      cache = _prefill(verifier.params, placed["prompt"], placed["length"],
                       verifier.model_cfg, P)
    verifier.tokens_scored += int(lengths[:len(prompts)].sum())
    rows = np.repeat(np.arange(count), copies)
    self._cache = self._fork(cache, rows)
    self._length = lengths[rows]  # Tokens in each row's cache (prompt + written).
    self._texts = [_Text() for _ in rows]
    self._steps: list[tuple[float, ...]] = [() for _ in rows]

  @property
  def rows(self) -> int:
    return len(self._texts)

  def tokens(self, row: int) -> list[int]:
    """What row `row` has written so far."""
    return list(self._texts[row].tokens)

  def text(self, row: int) -> str:
    """Its decoded text."""
    return self._texts[row].text

  def _piece(self, token: int) -> str:
    if token not in self._pieces:
      self._pieces[token] = self._decode([token])
    return self._pieces[token]

  def _fork(self, cache, rows: Sequence[int]):
    with self._where.context():
      return _take(cache, self._where.put(rows=np.asarray(rows, np.int32))["rows"])

  def fork(self, parents: Sequence[int]) -> None:
    """Row r becomes a copy of row parents[r] (cache included, nothing recomputed)."""
    self._where.check_rows(len(parents))
    self._cache = self._fork(self._cache, parents)
    self._length = self._length[np.asarray(parents)]
    self._texts = [self._texts[p] for p in parents]
    self._steps = [self._steps[p] for p in parents]

  def extend(self, new: Sequence[Sequence[int] | None]) -> list[list[float]]:
    """Appends new[b] to row b (None or []: nothing); per row, the scores of all its
    steps so far (only the steps whose last token is among the appended ones are read)."""
    self._steps, self._cache, self._length, self._texts = self._run(new, keep=False)
    return [list(s) for s in self._steps]

  def peek(self, new: Sequence[Sequence[int] | None]) -> list[list[float]]:
    """`extend`'s scores, the rows left as they were (lookahead)."""
    return [list(s) for s in self._run(new, keep=True)[0]]

  def _run(self, new, keep: bool):
    if len(new) != self.rows:
      raise ValueError(f"{len(new)} token lists for {self.rows} rows")
    counts = np.array([len(n or ()) for n in new], np.int32)
    longest = int((self._length + counts).max()) + 1  # + the EOS a verifier row ends with.
    if longest > self.verifier.seq_len:
      raise errors.ConfigError(f"a solution of {longest} tokens (prompt + solution + EOS) "
                               f"does not fit the verifier's seq_len {self.verifier.seq_len}")
    T = _round_up(max(int(counts.max()), 1), _BUCKET)
    new_BxT = np.full((self.rows, T), self.verifier.tokenizer.pad_id, np.int32)
    for b, n in enumerate(new):
      new_BxT[b, :counts[b]] = n or ()
    capacity = _round_up(int(self._length.max()) + T, _SLOTS)
    placed = self._where.put(new=new_BxT, length=counts)
    run = _peek if keep else _extend
    resized = capacity != self._cache["segment_ids"].shape[1]
    with self._where.context(), decoding.grown_cache_donation_expected(resized):
      p_BxT, cache = run(self.verifier.params, self._cache, placed["new"], placed["length"],
                         self.verifier.model_cfg, capacity)
    self.verifier.tokens_scored += int(counts.sum())
    # Where the steps are read, worked out on the host while the device runs: a row
    # keeps the scores of its steps read before the appended tokens.
    texts, reads = [], []
    for b, text in enumerate(self._texts):
      if counts[b]:
        before, text = len(text.tokens), text.plus(new[b], self._decode, self._piece)
        at = text.reads()
        kept = sum(r < before for r in at)
        reads.append((min(kept, len(self._steps[b])), [r - before for r in at[kept:]]))
      else:
        reads.append((len(self._steps[b]), []))
      texts.append(text)
    p_BxT = np.asarray(sharding_lib.to_host(p_BxT))
    steps = [self._steps[b][:kept] + tuple(float(p_BxT[b, t]) for t in at)
             for b, (kept, at) in enumerate(reads)]
    return steps, cache, self._length + counts, texts


class Rereader:
  """`CachedReader`'s interface for any PRM with `score_steps(examples, solutions)`:
  every call scores each changed row's whole decoded text again (row i * copies + j is
  examples[i]'s; `pad_to` as `CachedReader`'s)."""

  def __init__(self, verifier: Any, examples: Sequence[dict], tokenizer: Any,
               copies: int = 1, pad_to: int | None = None):
    self.verifier, self._decode = verifier, tokenizer.decode
    examples = list(examples) + [examples[0]] * (max(pad_to or 0, len(examples))
                                                 - len(examples))
    self._examples = [e for e in examples for _ in range(copies)]
    self._tokens = [[] for _ in self._examples]
    self._steps = [[] for _ in self._examples]

  @property
  def rows(self) -> int:
    return len(self._tokens)

  def tokens(self, row: int) -> list[int]:
    return list(self._tokens[row])

  def text(self, row: int) -> str:
    return self._decode(self._tokens[row])

  def fork(self, parents: Sequence[int]) -> None:
    self._examples = [self._examples[p] for p in parents]
    self._tokens = [self._tokens[p] for p in parents]
    self._steps = [self._steps[p] for p in parents]

  def extend(self, new: Sequence[Sequence[int] | None]) -> list[list[float]]:
    self._tokens = [t + list(n or ()) for t, n in zip(self._tokens, new)]
    self._steps = self._score(self._tokens, new)
    return [list(s) for s in self._steps]

  def peek(self, new: Sequence[Sequence[int] | None]) -> list[list[float]]:
    return self._score([t + list(n or ()) for t, n in zip(self._tokens, new)], new)

  def _score(self, tokens, new) -> list[list[float]]:
    todo = [b for b, n in enumerate(new) if n]
    scored = self.verifier.score_steps([self._examples[b] for b in todo],
                                       [self._decode(tokens[b]) for b in todo])
    out = [list(s) for s in self._steps]
    for b, steps in zip(todo, scored):
      out[b] = [float(x) for x in steps]
    return out


def readers(verifier: Any, tokenizer: Any
            ) -> Callable[..., CachedReader | Rereader]:
  """`make` for many batches of rows, the reader kind chosen once (the vocabulary check
  decodes every id): (prompts, examples, copies=1, pad_to=None) -> a reader."""
  cached = isinstance(verifier, reward_model.Verifier) and (
      verifier.tokenizer is tokenizer
      or reward_model.same_tokenizer(verifier.tokenizer, tokenizer))

  def reader(prompts, examples, copies: int = 1, pad_to: int | None = None):
    if cached:
      return CachedReader(verifier, prompts, copies, pad_to)
    return Rereader(verifier, examples, tokenizer, copies, pad_to)

  return reader


def make(verifier: Any, prompts: Sequence[Sequence[int]], examples: Sequence[dict],
         tokenizer: Any, copies: int = 1, pad_to: int | None = None
         ) -> CachedReader | Rereader:
  """A `CachedReader` for an o3lite PRM (`reward_model.Verifier`) on `tokenizer`'s
  vocabulary, else a `Rereader`; prompts[i] is `formatting.format_prompt(
  examples[i]["question"])` in `tokenizer`'s tokens (the policy's)."""
  return readers(verifier, tokenizer)(prompts, examples, copies, pad_to)
