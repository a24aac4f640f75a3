"""The sampler's compiled core: jitted prefill / extend, then a `lax.while_loop` decode
on the explicit KV cache (donated), with states a caller can stop, fork and continue
(search). `sampler.py` is the host side: token lists in, completions out.

- Every row of the cache has its own end index (the next slot to write), so rows of one
  batch can be at different lengths. Prompts are right-padded to a length bucket (few
  shapes compile); padding carries segment id 0 (never attended) and is overwritten.
- Greedy (temperature 0), temperature, top-k and top-p; `num_samples` completions per
  prompt share one prefill (the prompt's cache rows are forked).
- A row stops at EOS, at any of `SamplingConfig.stops` (token sequences: a step
  delimiter, `</think>`; `stops.py` turns strings into them), or at `max_new_tokens`.
  The state records which stop ended each row (`stop_B`) and how many tokens the call
  gave it (`num_new_B`); the stopping token is chosen but not yet in the cache
  (`last_token_B`, "pending").
- `extend` appends given tokens to each row (ragged: row b gets its own count; the pending
  token first), returns their log-probabilities (scoring without generating) and chooses
  the next token, so `decode` goes on from there: `continue_`. `fork` copies rows of a
  state (cache included) to new rows without recomputing anything. `prime` puts prompts
  in the cache with their last token pending: the state a continuation is scored from.
- Returned log-probabilities are those of softmax(logits / temperature), the distribution
  the tokens are drawn from (temperature 1 when greedy), before top-k / top-p and
  forcing: what the RL learner computes at the same temperature.
- Thinking budget (budget forcing, s1): after `think_budget` thinking tokens `</think>` is
  forced; `min_think` keeps an early `</think>` (and EOS) from ending the thought: it is
  forbidden, or with `wait_ids` replaced by those tokens ("Wait"), so the model goes on.
- The cache grows `decode_segment` slots at a time, so attention reads about the filled
  part of it; the prefill attends over the prompt only and projects its last token only.
- Deterministic for a given key: token t of a call uses `fold_in(key, t)`.

The sampler reads the very parameter arrays the learner trains (no copy, no sync).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Sequence
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib

_NEG = -1e30
STOP_NONE = -1  # `stop_B`: not stopped (still running, or ran to max_new_tokens).
STOP_EOS = 0  # Stopped at EOS; 1 + i: stopped at `SamplingConfig.stops[i]`.


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static decode settings (hashable: part of the compiled function's identity)."""

  max_new_tokens: int  # Tokens one call (a prefill or extend, then decode) may add per row.
  eos_id: int
  pad_id: int = 0
  prompt_bucket: int = 16  # Prompt (and continuation) lengths are padded to a multiple.
  temperature: float = 0.0  # 0 = greedy.
  top_k: int = 0  # Keep the k most likely tokens; 0 = all.
  top_p: float = 1.0  # Keep the smallest set with this much probability; 1 = all.
  num_samples: int = 1  # Completions per prompt (consecutive rows of the output).
  think_end_id: int = -1  # Token id of `</think>`; needed by the three settings below.
  think_budget: int = 0  # Force `</think>` after this many thinking tokens; 0 = no cap.
  min_think: int = 0  # Keep `</think>` and EOS from ending fewer thinking tokens.
  # With min_think: an early `</think>` / EOS is replaced by these tokens (s1's "Wait")
  # instead of being forbidden.
  wait_ids: tuple[int, ...] = ()
  # A row pauses when its latest tokens equal one of these token sequences (step
  # delimiters, `</think>`); `stop_B` = 1 + its index. See stops.py for strings.
  stops: tuple[tuple[int, ...], ...] = ()
  # The KV cache grows by this many slots at a time during decoding, so attention reads
  # about the filled part only; each segment is one more loop in the compiled program.
  # 0 = one segment (the whole cache from the start).
  decode_segment: int = 32

  def __post_init__(self):
    # Lists become tuples: the config must stay hashable.
    object.__setattr__(self, "wait_ids", tuple(int(t) for t in self.wait_ids))
    object.__setattr__(self, "stops", tuple(tuple(int(t) for t in s) for s in self.stops))
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise errors.ConfigError(f"invalid sampling settings: temperature={self.temperature}, "
                               f"top_k={self.top_k}, top_p={self.top_p}")
    if self.num_samples < 1 or self.max_new_tokens < 1 or self.decode_segment < 0:
      raise errors.ConfigError("num_samples and max_new_tokens must be at least 1, "
                               "decode_segment at least 0")
    if (self.think_budget or self.min_think or self.wait_ids) and self.think_end_id < 0:
      raise errors.ConfigError("think_budget / min_think / wait_ids need think_end_id")
    if self.wait_ids and not self.min_think:
      raise errors.ConfigError("wait_ids replace an early </think>: they need min_think")
    if any(not s for s in self.stops):
      raise errors.ConfigError("an empty stop sequence: every stop needs a token")

  @property
  def segment(self) -> int:
    """Slots the cache grows by per decode segment."""
    return min(self.decode_segment or self.max_new_tokens, self.max_new_tokens)


@flax.struct.dataclass
class SamplingState:
  """A batch of rows being sampled. Per call (prefill / extend, then decode): `step`,
  `tokens_BxN`, `logprobs_BxN`, `num_new_B`; across calls: the rest."""

  step: jax.Array  # int32 scalar: tokens chosen in this call so far.
  rng: jax.Array  # This call's sampling key.
  last_token_B: jax.Array  # The latest chosen token: not in the cache yet (pending).
  tokens_BxN: jax.Array  # This call's tokens (pad once a row is done).
  logprobs_BxN: jax.Array  # Their log-probabilities at the temperature (0 on padding).
  num_new_B: jax.Array  # Tokens this call gave each row (a stop's own tokens included).
  done_B: jax.Array  # Stopped (EOS or a stop): decode leaves the row alone.
  stop_B: jax.Array  # STOP_NONE, STOP_EOS or 1 + the index of the stop it matched.
  thinking_B: jax.Array  # No `</think>` yet.
  think_len_B: jax.Array  # Tokens written while thinking (all calls).
  wait_pos_B: jax.Array  # Index into `wait_ids` being forced; -1 = none.
  tail_BxL: jax.Array  # The row's latest L tokens (L = longest stop; -1 = none yet).
  cache: model_lib.Cache

  @property
  def batch_size(self) -> int:
    return self.last_token_B.shape[0]


def _filter_logits(logits_BxV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus) on the scaled logits."""
  logits_BxV = logits_BxV / cfg.temperature
  if cfg.top_k:
    kth_B1 = jax.lax.top_k(logits_BxV, cfg.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, _NEG, logits_BxV)
  if cfg.top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Mass strictly before each sorted token; keep tokens whose prefix is < top_p.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_B = jnp.sum(before_BxV < cfg.top_p, axis=-1)
    cutoff_B1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, _NEG, logits_BxV)
  return logits_BxV


def _scale(cfg: SamplingConfig) -> float:
  return cfg.temperature if cfg.temperature > 0 else 1.0


def _tail_len(cfg: SamplingConfig) -> int:
  return max([len(s) for s in cfg.stops], default=1)


def _matched_stop(tail_BxL: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """1 + the index of the first stop the row's latest tokens end with, else STOP_NONE."""
  if not cfg.stops:
    return jnp.full(tail_BxL.shape[:1], STOP_NONE, jnp.int32)
  L = tail_BxL.shape[1]
  stops_MxL = np.full((len(cfg.stops), L), -1, np.int32)  # Right-aligned.
  for m, s in enumerate(cfg.stops):
    stops_MxL[m, L - len(s):] = s
  used_MxL = stops_MxL >= 0
  hit_BxM = jnp.all((tail_BxL[:, None, :] == stops_MxL[None]) | ~used_MxL[None], axis=-1)
  return jnp.where(hit_BxM.any(-1), 1 + jnp.argmax(hit_BxM, axis=-1), STOP_NONE).astype(
      jnp.int32)


def _push(tail_BxL: jax.Array, tokens_BxT: jax.Array, length_B: jax.Array) -> jax.Array:
  """The latest L tokens after appending each row's first length_B[b] tokens."""
  L = tail_BxL.shape[1]
  joined = jnp.concatenate([tail_BxL, tokens_BxT.astype(tail_BxL.dtype)], axis=1)
  return jnp.take_along_axis(joined, length_B[:, None] + jnp.arange(L)[None], axis=1)


def _advance(s: SamplingState, logits_BxV: jax.Array, active_B: jax.Array,
             cfg: SamplingConfig) -> SamplingState:
  """Chooses the next token of every active row from its logits and records it."""
  logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32) / _scale(cfg), axis=-1)
  early_B = s.thinking_B & (s.think_len_B < cfg.min_think)
  if cfg.min_think and not cfg.wait_ids:  # Forbid ending the thought early.
    banned_V = jnp.zeros(logits_BxV.shape[-1], bool).at[
        jnp.array([cfg.think_end_id, cfg.eos_id])].set(True)
    logits_BxV = jnp.where(early_B[:, None] & banned_V, _NEG, logits_BxV)
  if cfg.temperature == 0.0:
    next_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  else:
    key = jax.random.fold_in(s.rng, s.step)
    next_B = jax.random.categorical(key, _filter_logits(logits_BxV, cfg)).astype(jnp.int32)
  wait_pos_B = s.wait_pos_B
  if cfg.wait_ids:  # Replace an early end by "Wait", one token per step.
    wait_W = jnp.array(cfg.wait_ids, jnp.int32)
    W = len(cfg.wait_ids)
    forcing_B = wait_pos_B >= 0
    next_B = jnp.where(forcing_B, wait_W[jnp.maximum(wait_pos_B, 0)], next_B)
    begin_B = ~forcing_B & early_B & ((next_B == cfg.think_end_id) | (next_B == cfg.eos_id))
    next_B = jnp.where(begin_B, wait_W[0], next_B)
    wait_pos_B = jnp.where(begin_B, 1, jnp.where(forcing_B, wait_pos_B + 1, -1))
    wait_pos_B = jnp.where(wait_pos_B >= W, -1, wait_pos_B)
  if cfg.think_budget:
    next_B = jnp.where(s.thinking_B & (s.think_len_B >= cfg.think_budget), cfg.think_end_id,
                       next_B)
  logprob_B = jnp.take_along_axis(logprobs_BxV, next_B[:, None], axis=-1)[:, 0]
  next_B = jnp.where(active_B, next_B, cfg.pad_id)
  logprob_B = jnp.where(active_B, logprob_B, 0.0)
  tail_BxL = jnp.where(active_B[:, None],
                       jnp.concatenate([s.tail_BxL[:, 1:], next_B[:, None]], 1), s.tail_BxL)
  matched_B = _matched_stop(tail_BxL, cfg)
  eos_B = active_B & (next_B == cfg.eos_id)
  stopped_B = active_B & (matched_B != STOP_NONE)
  return s.replace(
      step=s.step + 1,
      last_token_B=jnp.where(active_B, next_B, s.last_token_B),
      tokens_BxN=jax.lax.dynamic_update_slice(s.tokens_BxN, next_B[:, None], (0, s.step)),
      logprobs_BxN=jax.lax.dynamic_update_slice(s.logprobs_BxN, logprob_B[:, None],
                                                (0, s.step)),
      num_new_B=s.num_new_B + active_B,
      done_B=s.done_B | eos_B | stopped_B,
      stop_B=jnp.where(eos_B, STOP_EOS, jnp.where(stopped_B, matched_B, s.stop_B)),
      think_len_B=s.think_len_B + (active_B & s.thinking_B),
      thinking_B=s.thinking_B & ~(active_B & (next_B == cfg.think_end_id)),
      wait_pos_B=jnp.where(active_B, wait_pos_B, s.wait_pos_B),
      tail_BxL=tail_BxL)


def _new_call(s: SamplingState, rng: jax.Array, cfg: SamplingConfig) -> SamplingState:
  """The state with this call's fields reset (no token chosen yet)."""
  B, N = s.batch_size, cfg.max_new_tokens
  return s.replace(step=jnp.zeros((), jnp.int32), rng=rng,
                   tokens_BxN=jnp.full((B, N), cfg.pad_id, jnp.int32),
                   logprobs_BxN=jnp.zeros((B, N), jnp.float32),
                   num_new_B=jnp.zeros((B,), jnp.int32))


def _prompt_state(params, prompt_BxP, feed_len_B, pending_B, rng, capacity: int,
                  model_cfg: model_lib.ModelConfig, cfg: SamplingConfig, tail_len_B=None):
  """The first feed_len_B[b] prompt tokens of each row in a fresh cache of `capacity`
  slots, `pending_B` pending, nothing chosen; and the logits after the fed tokens. The
  stop tail holds the prompt's latest tokens up to tail_len_B (default feed_len_B)."""
  B, P = prompt_BxP.shape
  cache = model_lib.init_cache(model_cfg, B, capacity)
  positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  segments_BxP = (positions_BxP < feed_len_B[:, None]).astype(jnp.int32)
  # The cache is empty: the prompt attends over itself only; logits at its last token.
  logits_Bx1xV, cache = model_lib.Transformer(model_cfg).apply(
      {"params": params}, prompt_BxP, positions_BxP, segments_BxP, cache,
      fresh_cache=True, logits_index_B=jnp.maximum(feed_len_B - 1, 0))
  L = _tail_len(cfg)
  tail_len_B = feed_len_B if tail_len_B is None else tail_len_B
  index_BxL = tail_len_B[:, None] - L + jnp.arange(L)[None]
  tail_BxL = jnp.where(index_BxL >= 0, jnp.take_along_axis(
      prompt_BxP, jnp.maximum(index_BxL, 0), axis=1), -1)
  state = _new_call(SamplingState(
      step=None, rng=rng, last_token_B=pending_B.astype(jnp.int32), tokens_BxN=None,
      logprobs_BxN=None, num_new_B=None, done_B=jnp.zeros((B,), bool),
      stop_B=jnp.full((B,), STOP_NONE, jnp.int32), thinking_B=jnp.ones((B,), bool),
      think_len_B=jnp.zeros((B,), jnp.int32), wait_pos_B=jnp.full((B,), -1, jnp.int32),
      tail_BxL=tail_BxL.astype(jnp.int32), cache=cache), rng, cfg)
  return state, logits_Bx1xV[:, 0]


def _take_rows(state: SamplingState, rows_R: jax.Array) -> SamplingState:
  take = lambda x: jnp.take(x, rows_R, axis=0)
  per_call = {"step": state.step, "rng": state.rng}
  rows = {f.name: take(getattr(state, f.name)) for f in dataclasses.fields(state)
          if f.name not in per_call and f.name != "cache"}
  return SamplingState(**per_call, **rows, cache=jax.tree_util.tree_map(take, state.cache))


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg"))
def prefill(params, prompt_BxP: jax.Array, prompt_len_B: jax.Array, rng: jax.Array,
            model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig) -> SamplingState:
  """Runs the prompts through the model once, then picks the first token of each sample.

  Returns a state of B * num_samples rows (the samples of a prompt are consecutive), its
  cache sized for the prompt and decode's first segment.
  """
  B, P = prompt_BxP.shape
  S = sampling_cfg.num_samples
  state, last_BxV = _prompt_state(params, prompt_BxP, prompt_len_B, jnp.zeros((B,), jnp.int32),
                                  rng, P + sampling_cfg.segment, model_cfg, sampling_cfg)
  if S > 1:  # The samples share the prompt's cache rows.
    rows = jnp.repeat(jnp.arange(B), S)
    state, last_BxV = _take_rows(state, rows), last_BxV[rows]
  return _advance(state, last_BxV, jnp.ones((B * S,), bool), sampling_cfg)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg", "capacity"))
def prime(params, prompt_BxP: jax.Array, prompt_len_B: jax.Array, rng: jax.Array,
          model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig,
          capacity: int) -> SamplingState:
  """The prompts in the cache but their last token, which is left pending, and nothing
  chosen (rows done, `stop_B` STOP_NONE): `extend` scores or continues from here, as if
  the prompt had just been sampled."""
  B, P = prompt_BxP.shape
  pending_B = jnp.take_along_axis(prompt_BxP, (prompt_len_B - 1)[:, None], axis=1)[:, 0]
  state, _ = _prompt_state(params, prompt_BxP, prompt_len_B - 1, pending_B, rng,
                           max(capacity, P), model_cfg, sampling_cfg, tail_len_B=prompt_len_B)
  return state.replace(done_B=jnp.ones((B,), bool))


@jax.jit
def fork(state: SamplingState, rows_R: jax.Array) -> SamplingState:
  """Row r of the result is row rows_R[r] of `state`, its cache included (a copy, no
  recomputation): k continuations of one prefix are k entries of the same row."""
  return _take_rows(state, rows_R)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg", "capacity", "score"),
                   donate_argnames=("state",))
def extend(params, state: SamplingState, new_BxT: jax.Array, new_len_B: jax.Array,
           feed_last_B: jax.Array, rng: jax.Array, model_cfg: model_lib.ModelConfig,
           sampling_cfg: SamplingConfig, capacity: int, score: bool = False
           ) -> tuple[SamplingState, jax.Array]:
  """Appends to each row its pending token (where `feed_last_B`) and its first
  new_len_B[b] tokens of `new_BxT`, then chooses the row's next token; rows given
  nothing stay as they are (done). The cache is first resized to `capacity` slots, which
  must hold every row's end index + T + 1 (slots past every row's end hold nothing, so
  a smaller capacity drops only empty slots: the host keeps it near the longest row).

  Returns the state, ready for `decode`, and with `score` the log-probabilities (at the
  temperature) of the new tokens [B, T]: 0 past a row's length, and NaN for a first new
  token that follows no fed token (feed_last False: its context was not kept).
  """
  cfg, (B, T) = sampling_cfg, new_BxT.shape
  fed_BxT1 = jnp.where(feed_last_B[:, None],
                       jnp.concatenate([state.last_token_B[:, None], new_BxT], 1),
                       jnp.concatenate([new_BxT, jnp.full((B, 1), cfg.pad_id, jnp.int32)], 1))
  fed_len_B = new_len_B + feed_last_B.astype(jnp.int32)
  active_B = fed_len_B > 0
  end_B = state.cache["end_index"]
  positions_BxT1 = end_B[:, None] + jnp.arange(T + 1, dtype=jnp.int32)[None]
  segments_BxT1 = (jnp.arange(T + 1)[None] < fed_len_B[:, None]).astype(jnp.int32)
  cache = _resize_cache(state.cache, capacity)
  logits_BxTxV, cache = model_lib.Transformer(model_cfg).apply(
      {"params": params}, fed_BxT1, positions_BxT1, segments_BxT1, cache,
      logits_index_B=None if score else jnp.maximum(fed_len_B - 1, 0))
  last_BxV = (jnp.take_along_axis(logits_BxTxV, jnp.maximum(fed_len_B - 1, 0)[:, None, None],
                                  axis=1) if score else logits_BxTxV)[:, 0]
  logprobs_BxT = jnp.zeros((B, T), jnp.float32)
  if score:  # Logits at fed token t score fed token t + 1.
    lp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :T] / _scale(cfg), axis=-1)
    next_lp_BxT = jnp.take_along_axis(lp_BxTxV, fed_BxT1[:, 1:, None], axis=-1)[..., 0]
    shifted_BxT = jnp.concatenate([jnp.full((B, 1), jnp.nan), next_lp_BxT[:, :T - 1]], 1)
    logprobs_BxT = jnp.where(feed_last_B[:, None], next_lp_BxT, shifted_BxT)
    logprobs_BxT = jnp.where(jnp.arange(T)[None] < new_len_B[:, None], logprobs_BxT, 0.0)
  # Thinking and the stop tail see the new tokens (the pending one was counted when chosen).
  valid_BxT = jnp.arange(T)[None] < new_len_B[:, None]
  ends_BxT = valid_BxT & (new_BxT == cfg.think_end_id)
  thinking_BxT = state.thinking_B[:, None] & (jnp.cumsum(ends_BxT, axis=1) - ends_BxT == 0)
  s = _new_call(state, rng, cfg).replace(
      cache=cache, done_B=~active_B,
      stop_B=jnp.where(active_B, STOP_NONE, state.stop_B),
      think_len_B=state.think_len_B + jnp.sum(valid_BxT & thinking_BxT, axis=1),
      thinking_B=state.thinking_B & ~ends_BxT.any(axis=1),
      tail_BxL=_push(state.tail_BxL, new_BxT, new_len_B))
  return _advance(s, last_BxV, active_B, cfg), logprobs_BxT


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg"),
                   donate_argnames=("state",))
def decode(params, state: SamplingState, model_cfg: model_lib.ModelConfig,
           sampling_cfg: SamplingConfig) -> SamplingState:
  """Decodes one token at a time until every row is done or the call has
  `max_new_tokens` tokens.

  `state` comes from `prefill` or `extend`, whose cache has at least one segment of
  free slots past the longest row. Each later segment zero-pads the cache by
  `decode_segment` slots (one copy), so attention reads about the filled slots instead of
  all of them from the first step; a segment ends early when a row reaches the cache's
  end. A done row feeds nothing (its end index stays). The donated cache is updated in
  place when there is one segment; with several, the donated first-segment cache cannot
  be the (larger) output's buffer, and JAX says so in a warning.
  """
  model = model_lib.Transformer(model_cfg)
  cfg = sampling_cfg

  def body(s: SamplingState):
    active_B = ~s.done_B
    logits_Bx1xV, cache = model.apply(
        {"params": params}, s.last_token_B[:, None], s.cache["end_index"][:, None],
        active_B[:, None].astype(jnp.int32), s.cache)
    return _advance(s.replace(cache=cache), logits_Bx1xV[:, 0], active_B, cfg)

  slots = state.cache["segment_ids"].shape[1]
  segments = -(-cfg.max_new_tokens // cfg.segment)
  for k in range(segments):
    cache = _resize_cache(state.cache, slots + k * cfg.segment)
    room = cache["segment_ids"].shape[1]
    state = jax.lax.while_loop(
        lambda s, room=room: ((s.step < cfg.max_new_tokens) & ~jnp.all(s.done_B)
                              & (jnp.max(s.cache["end_index"]) < room)),
        body, state.replace(cache=cache))
  return state


@contextlib.contextmanager
def grown_cache_donation_expected():
  """Silences JAX's warning that a donated cache went unused: expected where the output
  cache is larger than the input (`decode`'s segments, `extend`'s growth)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    yield


def _resize_cache(cache: model_lib.Cache, slots: int) -> model_lib.Cache:
  """The cache zero-padded (empty slots, segment id 0) or cut to `slots` slots."""
  extra = slots - cache["segment_ids"].shape[1]
  if extra == 0:
    return cache
  if extra < 0:
    cut = lambda x, axis: jax.lax.slice_in_dim(x, 0, slots, axis=axis)
    return {"end_index": cache["end_index"], "segment_ids": cut(cache["segment_ids"], 1),
            "layers": [{name: cut(x, 2) for name, x in layer.items()}
                       for layer in cache["layers"]]}
  pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))
  return {"end_index": cache["end_index"],
          "segment_ids": jnp.pad(cache["segment_ids"], ((0, 0), (0, extra))),
          "layers": [{name: pad_kv(x) for name, x in layer.items()}
                     for layer in cache["layers"]]}
