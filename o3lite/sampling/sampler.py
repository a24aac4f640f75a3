"""The sampler's host side: token lists in, completions out, on `decoding.py`'s compiled
core.

- `sample` / `generate`: `num_samples` completions of many prompts, `batch_size` prompts
  per compiled call (RL rollouts, evaluation).
- For search, one batch of rows at a time, kept on the device between calls:
  `start` (prefill + decode), `prime` (a prompt ready to be continued or scored),
  `fork` (copy rows, cache included), `continue_` (append ragged tokens per row and
  decode on), `completions` (this call's tokens per row, with the stop that ended each).
- `score`: log-probabilities of given continuations of given prefixes (verifiers, DPO,
  judges), through `prime` / `fork` / `extend`, the sampler's own compiled shapes;
  shared prefixes are put in the cache once.

With a mesh (and its logical rules), rows are split over the batch axes of the mesh
and the model's activation hints apply; params keep the shardings they have. A state's
row count must then be a multiple of the batch shards (`start` pads).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.sampling import decoding
from o3lite.sampling.choice import STOP_EOS, STOP_NONE, SamplingConfig, SamplingState

__all__ = ["STOP_EOS", "STOP_NONE", "SamplingConfig", "SamplingState", "Completion",
           "pad_prompts", "sample", "generate", "start", "prime", "fork", "continue_",
           "extend", "completions", "score"]

grown_cache_donation_expected = decoding.grown_cache_donation_expected


@dataclasses.dataclass
class Completion:
  """One row's tokens from one call: EOS excluded, a stop's own tokens included."""

  tokens: list[int]
  logprobs: list[float]
  finished: bool  # Ended with EOS (False: a stop, or max_new_tokens).
  stop: int = STOP_NONE  # STOP_EOS, 1 + the index of the stop it matched, or STOP_NONE.


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where rows live: the default device, or split over a mesh's batch axes."""

  mesh: jax.sharding.Mesh | None = None
  rules: tuple | None = None

  @property
  def shards(self) -> int:
    return 1 if self.mesh is None else sharding_lib.batch_shards(self.mesh, self.rules)

  def context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding_lib.activation_sharding(self.mesh, self.rules)

  def put(self, **arrays: np.ndarray) -> dict[str, jax.Array]:
    """[B] and [B, T] host arrays onto the device(s), rows split over the batch axes."""
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    as_2d = {k: v if v.ndim == 2 else v[:, None] for k, v in arrays.items()}
    placed = sharding_lib.put_global_batch(
        as_2d, sharding_lib.batch_sharding(self.mesh, self.rules))
    return {k: placed[k] if arrays[k].ndim == 2 else placed[k][:, 0] for k in arrays}

  def check_rows(self, rows: int) -> None:
    if rows % self.shards:
      raise errors.MeshError(f"{rows} rows do not split over the mesh's {self.shards} "
                             f"batch shards: use a multiple of {self.shards}")


def placement(mesh, rules) -> Placement:
  return Placement(mesh, None if rules is None else tuple(rules))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_prompts(prompts: Sequence[Sequence[int]], batch_size: int,
                sampling_cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad to a bucketed length; pad the batch with copies of the first prompt."""
  if not prompts:
    raise errors.DataError("no prompts to generate from")
  if any(len(p) == 0 for p in prompts):
    raise errors.DataError("empty prompt: every prompt needs at least one token")
  longest = max(len(p) for p in prompts)
  P = _round_up(longest, sampling_cfg.prompt_bucket)
  rows = list(prompts) + [prompts[0]] * (batch_size - len(prompts))
  prompt_BxP = np.full((len(rows), P), sampling_cfg.pad_id, np.int32)
  for i, p in enumerate(rows):
    prompt_BxP[i, :len(p)] = p
  return prompt_BxP, np.array([len(p) for p in rows], np.int32)


def start(params, prompts: Sequence[Sequence[int]], model_cfg: model_lib.ModelConfig,
          cfg: SamplingConfig, rng: jax.Array | None = None, mesh=None, rules=None,
          batch_size: int | None = None) -> SamplingState:
  """Prefill + decode of one batch: rows [i * num_samples, (i + 1) * num_samples) are
  prompt i's samples. The batch is padded (copies of the first prompt) to `batch_size`
  prompts and to a multiple of the mesh's batch shards."""
  where = placement(mesh, rules)
  batch_size = _round_up(max(batch_size or 0, len(prompts)), where.shards)
  prompt_BxP, prompt_len_B = pad_prompts(prompts, batch_size, cfg)
  placed = where.put(prompt=prompt_BxP, length=prompt_len_B)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  with where.context():
    state = decoding.prefill(params, placed["prompt"], placed["length"], rng, model_cfg, cfg)
    return decoding.decode(params, state, model_cfg, cfg)


def prime(params, prompts: Sequence[Sequence[int]], model_cfg: model_lib.ModelConfig,
          cfg: SamplingConfig, mesh=None, rules=None) -> SamplingState:
  """One row per prompt (their count a multiple of the mesh's batch shards), each in the
  cache but its last token, which is pending: `continue_` with an empty suffix samples
  exactly what `start` would, and `extend(..., score=True)` scores continuations."""
  where = placement(mesh, rules)
  where.check_rows(len(prompts))
  prompt_BxP, prompt_len_B = pad_prompts(prompts, len(prompts), cfg)
  placed = where.put(prompt=prompt_BxP, length=prompt_len_B)
  capacity = cfg.cache_slots(prompt_BxP.shape[1] + 1)
  with where.context():
    return decoding.prime(params, placed["prompt"], placed["length"], jax.random.PRNGKey(0),
                          model_cfg, cfg, capacity)


def fork(state: SamplingState, rows: Sequence[int], mesh=None, rules=None) -> SamplingState:
  """Row r of the result is a copy of row rows[r] of `state`, cache included (nothing is
  recomputed): k continuations of one prefix are k copies of its row."""
  where = placement(mesh, rules)
  where.check_rows(len(rows))
  with where.context():
    return decoding.fork(state, where.put(rows=np.asarray(rows, np.int32))["rows"])


def extend(params, state: SamplingState, suffixes: Sequence[Sequence[int] | None],
           model_cfg: model_lib.ModelConfig, cfg: SamplingConfig,
           rng: jax.Array | None = None, mesh=None, rules=None,
           feed_last: bool | Sequence[bool] = True, score: bool = False
           ) -> tuple[SamplingState, list[np.ndarray] | None]:
  """Appends suffixes[b] to row b (after its pending token where `feed_last`) and
  chooses its next token; a None suffix leaves the row as it is (done). With `score`,
  also the log-probabilities of each suffix's tokens (see `decoding.extend`). `state`
  is donated: use the returned one."""
  B = state.batch_size
  if len(suffixes) != B:
    raise errors.DataError(f"{len(suffixes)} suffixes for a state of {B} rows")
  where = placement(mesh, rules)
  feed = np.broadcast_to(np.asarray(feed_last, bool), (B,)) & np.array(
      [s is not None for s in suffixes])
  lengths = np.array([len(s or ()) for s in suffixes], np.int32)
  T = _round_up(int(lengths.max()), cfg.prompt_bucket)
  new_BxT = np.full((B, T), cfg.pad_id, np.int32)
  for b, s in enumerate(suffixes):
    new_BxT[b, :len(s or ())] = s or ()
  end_B = sharding_lib.to_host(state.cache["end_index"])
  # Room for the fed tokens and a decode of max_new_tokens, bucketed: few shapes compile.
  slots = state.cache["segment_ids"].shape[1]
  capacity = max(slots, cfg.cache_slots(int(end_B.max()) + T + 1 + cfg.max_new_tokens))
  placed = where.put(new=new_BxT, length=lengths, feed=feed)
  rng = jax.random.fold_in(state.rng, 1) if rng is None else rng
  with where.context(), grown_cache_donation_expected(resized=capacity != slots):
    state, logprobs_BxT = decoding.extend(params, state, placed["new"], placed["length"],
                                          placed["feed"], rng, model_cfg, cfg, capacity,
                                          score)
  if not score:
    return state, None
  logprobs_BxT = np.asarray(sharding_lib.to_host(logprobs_BxT))
  return state, [logprobs_BxT[b, :n] for b, n in enumerate(lengths)]


def continue_(params, state: SamplingState, suffixes: Sequence[Sequence[int] | None],
              model_cfg: model_lib.ModelConfig, cfg: SamplingConfig,
              rng: jax.Array | None = None, mesh=None, rules=None,
              feed_last: bool | Sequence[bool] = True) -> SamplingState:
  """`extend`, then decode on: row b continues from its tokens so far + suffixes[b] as
  if it had been sampled from that whole prefix (rows given None stay done)."""
  state, _ = extend(params, state, suffixes, model_cfg, cfg, rng, mesh, rules, feed_last)
  with placement(mesh, rules).context():
    return decoding.decode(params, state, model_cfg, cfg)


def completions(state: SamplingState, cfg: SamplingConfig) -> list[Completion]:
  """This call's tokens of every row (host copies)."""
  tokens, logprobs, num_new, stop = sharding_lib.to_host(
      (state.tokens_BxN, state.logprobs_BxN, state.num_new_B, state.stop_B))
  out = []
  for b in range(len(num_new)):
    n = int(num_new[b]) - int(stop[b] == STOP_EOS)  # EOS is not part of the text.
    out.append(Completion(np.asarray(tokens[b, :n]).tolist(),
                          np.asarray(logprobs[b, :n]).tolist(), bool(stop[b] == STOP_EOS),
                          int(stop[b])))
  return out


def sample(params, prompts: Sequence[Sequence[int]], model_cfg: model_lib.ModelConfig,
           sampling_cfg: SamplingConfig, batch_size: int, rng: jax.Array | None = None,
           mesh: jax.sharding.Mesh | None = None, rules=None) -> list[list[Completion]]:
  """`num_samples` completions for each prompt, in order; prompts go `batch_size` at a
  time (one compiled shape; on a mesh, rounded up to fill its batch shards)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  batch_size = _round_up(batch_size, placement(mesh, rules).shards)  # Padding rows fill it.
  S, results = sampling_cfg.num_samples, []
  for chunk_index, begin in enumerate(range(0, len(prompts), batch_size)):
    chunk = prompts[begin:begin + batch_size]
    state = start(params, chunk, model_cfg, sampling_cfg, jax.random.fold_in(rng, chunk_index),
                  mesh, rules, batch_size)
    rows = completions(state, sampling_cfg)
    results += [rows[i * S:(i + 1) * S] for i in range(len(chunk))]
  return results


def generate(params, prompts: Sequence[Sequence[int]], model_cfg: model_lib.ModelConfig,
             sampling_cfg: SamplingConfig, batch_size: int) -> list[list[int]]:
  """Greedy (or first-sample) completions without EOS and padding, one per prompt."""
  return [s[0].tokens for s in sample(params, prompts, model_cfg, sampling_cfg, batch_size)]


def score(params, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
          model_cfg: model_lib.ModelConfig, cfg: SamplingConfig, batch_size: int,
          mesh=None, rules=None) -> list[np.ndarray]:
  """log p(continuation token | prefix and the tokens before it) at `cfg.temperature`
  (1 when greedy), one array per (prefix, continuation) pair, `batch_size` pairs per
  call; within a call each distinct prefix is computed once and forked."""
  if len(prefixes) != len(continuations):
    raise errors.DataError(f"{len(prefixes)} prefixes for {len(continuations)} continuations")
  where = placement(mesh, rules)
  batch_size = _round_up(batch_size, where.shards)
  out = []
  for begin in range(0, len(prefixes), batch_size):
    pairs = list(zip(prefixes[begin:begin + batch_size],
                     continuations[begin:begin + batch_size]))
    distinct = list(dict.fromkeys(tuple(p) for p, _ in pairs))
    primed = distinct + [distinct[0]] * (batch_size - len(distinct))
    state = prime(params, primed, model_cfg, cfg, mesh, rules)
    rows = [distinct.index(tuple(p)) for p, _ in pairs]
    state = fork(state, rows + [0] * (batch_size - len(rows)), mesh, rules)
    suffixes = [list(c) for _, c in pairs] + [[]] * (batch_size - len(pairs))
    _, logprobs = extend(params, state, suffixes, model_cfg, cfg, mesh=mesh, rules=rules,
                         score=True)
    out += logprobs[:len(pairs)]
  return out
