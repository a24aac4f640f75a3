"""The sampler's per-token logic: its static settings (`SamplingConfig`), the state of a
batch of rows (`SamplingState`), and choosing each row's next token: temperature, top-k,
top-p, the thinking budget, `min_think` and "Wait", and the stops that end a row.
`decoding.py` runs the model passes around it.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from o3lite import errors
from o3lite.model import transformer as model_lib

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
  # Attention over the KV cache reads it in chunks of this many slots, only those up to
  # the longest row's end (flash-decoding's online softmax): a step's cost follows the
  # filled part, not the cache's size. 0 = every slot at once.
  attention_chunk: int = 64

  def __post_init__(self):
    # Lists become tuples: the config must stay hashable.
    object.__setattr__(self, "wait_ids", tuple(int(t) for t in self.wait_ids))
    object.__setattr__(self, "stops", tuple(tuple(int(t) for t in s) for s in self.stops))
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise errors.ConfigError(f"invalid sampling settings: temperature={self.temperature}, "
                               f"top_k={self.top_k}, top_p={self.top_p}")
    if self.num_samples < 1 or self.max_new_tokens < 1 or self.attention_chunk < 0:
      raise errors.ConfigError("num_samples and max_new_tokens must be at least 1, "
                               "attention_chunk at least 0")
    if (self.think_budget or self.min_think or self.wait_ids) and self.think_end_id < 0:
      raise errors.ConfigError("think_budget / min_think / wait_ids need think_end_id")
    if self.wait_ids and not self.min_think:
      raise errors.ConfigError("wait_ids replace an early </think>: they need min_think")
    if any(not s for s in self.stops):
      raise errors.ConfigError("an empty stop sequence: every stop needs a token")

  def compiled(self) -> "SamplingConfig":
    """The settings a call compiles with: `max_new_tokens` rounded up to its bucket
    (`bucket`), so a new length in the same bucket compiles nothing new; the call's own
    limit is passed at run time."""
    return dataclasses.replace(self, max_new_tokens=bucket(self.max_new_tokens, 16))

  def cache_slots(self, needed: int) -> int:
    """Cache slots for rows that need `needed`: its bucket, a multiple of the attention
    chunk once it is bigger than one."""
    slots = bucket(needed, 16)
    chunk = self.attention_chunk
    return slots if not chunk or slots <= chunk else -(-slots // chunk) * chunk


_FINE_FROM = 4096  # Buckets above this are multiples of 1/8 of a power of two.


def bucket(n: int, smallest: int) -> int:
  """The least size >= n of: `smallest`, then 2^k and 3 * 2^(k-1) up to 4,096 (sizes that
  grow by at most 1.5x), then multiples of an eighth of the power of two at or below n
  (4,608, 5,120, ...; 16,400 -> 18,432). Few shapes compile; a bucket up to 4,096 wastes at
  most a third of its slots, a longer one (where the cache's memory counts) an eighth."""
  size = smallest
  while size < n and size < _FINE_FROM:
    size = size * 3 // 2 if (size & (size - 1)) == 0 and size >= 4 else 1 << size.bit_length()
  if size >= n:
    return size
  step = (1 << (n.bit_length() - 1)) // 8
  return -(-n // step) * step


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


def filter_logits(logits_BxV: jax.Array, cfg: SamplingConfig) -> jax.Array:
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


def temperature_scale(cfg: SamplingConfig) -> float:
  return cfg.temperature if cfg.temperature > 0 else 1.0


def tail_len(cfg: SamplingConfig) -> int:
  return max([len(s) for s in cfg.stops], default=1)


def matched_stop(tail_BxL: jax.Array, cfg: SamplingConfig) -> jax.Array:
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


def push(tail_BxL: jax.Array, tokens_BxT: jax.Array, length_B: jax.Array) -> jax.Array:
  """The latest L tokens after appending each row's first length_B[b] tokens."""
  L = tail_BxL.shape[1]
  joined = jnp.concatenate([tail_BxL, tokens_BxT.astype(tail_BxL.dtype)], axis=1)
  return jnp.take_along_axis(joined, length_B[:, None] + jnp.arange(L)[None], axis=1)


def advance(s: SamplingState, logits_BxV: jax.Array, active_B: jax.Array,
             cfg: SamplingConfig) -> SamplingState:
  """Chooses the next token of every active row from its logits and records it."""
  logprobs_BxV = jax.nn.log_softmax(
      logits_BxV.astype(jnp.float32) / temperature_scale(cfg), axis=-1)
  early_B = s.thinking_B & (s.think_len_B < cfg.min_think)
  if cfg.min_think and not cfg.wait_ids:  # Forbid ending the thought early.
    banned_V = jnp.zeros(logits_BxV.shape[-1], bool).at[
        jnp.array([cfg.think_end_id, cfg.eos_id])].set(True)
    logits_BxV = jnp.where(early_B[:, None] & banned_V, _NEG, logits_BxV)
  if cfg.temperature == 0.0:
    next_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  else:
    key = jax.random.fold_in(s.rng, s.step)
    next_B = jax.random.categorical(key, filter_logits(logits_BxV, cfg)).astype(jnp.int32)
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
  matched_B = matched_stop(tail_BxL, cfg)
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
