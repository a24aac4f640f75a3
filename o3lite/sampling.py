"""Jitted generation on the explicit KV cache: a jitted prefill, then a `lax.while_loop`
decode with the cache donated.

Prompts of different lengths are right-padded to a length bucket (few shapes compile);
each sequence keeps its own positions, and padded slots carry segment id 0 so no query
attends to them. This module serves greedy evaluation; sampling strategies plug in at
`_select` (the `SamplingConfig` is static and hashable).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from o3lite import model as model_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static decode settings (hashable: part of the compiled function's identity)."""

  max_new_tokens: int
  eos_id: int
  pad_id: int = 0
  prompt_bucket: int = 16  # Prompt lengths are padded up to a multiple of this.


@flax.struct.dataclass
class SamplingState:
  step: jax.Array  # int32 scalar: decode steps taken.
  last_token_B: jax.Array  # The token to feed next.
  position_B: jax.Array  # Its position.
  tokens_BxN: jax.Array  # Generated tokens (pad after a sequence is done).
  done_B: jax.Array  # Whether the sequence has emitted EOS.
  cache: model_lib.Cache


def _select(logits_BxV: jax.Array) -> jax.Array:
  """Greedy choice of the next token."""
  return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg"))
def prefill(params, prompt_BxP: jax.Array, prompt_len_B: jax.Array,
            model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig) -> SamplingState:
  """Run the prompts through the model, filling the cache, and pick the first token."""
  B, P = prompt_BxP.shape
  N = sampling_cfg.max_new_tokens
  cache = model_lib.init_cache(model_cfg, B, P + N)
  positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  segments_BxP = (positions_BxP < prompt_len_B[:, None]).astype(jnp.int32)
  logits_BxPxV, cache = model_lib.Transformer(model_cfg).apply(
      {"params": params}, prompt_BxP, positions_BxP, segments_BxP, cache)
  last_BxV = jnp.take_along_axis(logits_BxPxV, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
  first_B = _select(last_BxV)
  tokens_BxN = jnp.full((B, N), sampling_cfg.pad_id, jnp.int32).at[:, 0].set(first_B)
  return SamplingState(step=jnp.ones((), jnp.int32), last_token_B=first_B,
                       position_B=prompt_len_B.astype(jnp.int32), tokens_BxN=tokens_BxN,
                       done_B=first_B == sampling_cfg.eos_id, cache=cache)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg"),
                   donate_argnames=("state",))
def decode(params, state: SamplingState, model_cfg: model_lib.ModelConfig,
           sampling_cfg: SamplingConfig) -> SamplingState:
  """Decode one token at a time until every sequence is done or the cap is reached."""
  model = model_lib.Transformer(model_cfg)
  N = sampling_cfg.max_new_tokens

  def cond(s: SamplingState):
    return (s.step < N) & ~jnp.all(s.done_B)

  def body(s: SamplingState):
    logits_Bx1xV, cache = model.apply(
        {"params": params}, s.last_token_B[:, None], s.position_B[:, None],
        jnp.ones_like(s.last_token_B)[:, None], s.cache)
    next_B = jnp.where(s.done_B, sampling_cfg.pad_id, _select(logits_Bx1xV[:, 0]))
    tokens_BxN = jax.lax.dynamic_update_slice(s.tokens_BxN, next_B[:, None], (0, s.step))
    return SamplingState(step=s.step + 1, last_token_B=next_B, position_B=s.position_B + 1,
                         tokens_BxN=tokens_BxN,
                         done_B=s.done_B | (next_B == sampling_cfg.eos_id), cache=cache)

  return jax.lax.while_loop(cond, body, state)


def pad_prompts(prompts: Sequence[Sequence[int]], batch_size: int,
                sampling_cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad to a bucketed length; pad the batch with copies of the first prompt."""
  if not prompts:
    raise ValueError("no prompts to generate from")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("empty prompt: every prompt needs at least one token")
  longest = max(len(p) for p in prompts)
  bucket = sampling_cfg.prompt_bucket
  P = -(-longest // bucket) * bucket
  rows = list(prompts) + [prompts[0]] * (batch_size - len(prompts))
  prompt_BxP = np.full((len(rows), P), sampling_cfg.pad_id, np.int32)
  for i, p in enumerate(rows):
    prompt_BxP[i, :len(p)] = p
  return prompt_BxP, np.array([len(p) for p in rows], np.int32)


def generate(params, prompts: Sequence[Sequence[int]], model_cfg: model_lib.ModelConfig,
             sampling_cfg: SamplingConfig, batch_size: int) -> list[list[int]]:
  """Greedy completions (without EOS and padding) for each prompt, in order."""
  completions = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    prompt_BxP, prompt_len_B = pad_prompts(chunk, batch_size, sampling_cfg)
    state = prefill(params, jnp.asarray(prompt_BxP), jnp.asarray(prompt_len_B),
                    model_cfg, sampling_cfg)
    state = decode(params, state, model_cfg, sampling_cfg)
    tokens_BxN = np.asarray(jax.device_get(state.tokens_BxN))
    for row in tokens_BxN[:len(chunk)]:
      row = row.tolist()
      if sampling_cfg.eos_id in row:
        row = row[:row.index(sampling_cfg.eos_id)]
      completions.append(row)
  return completions
