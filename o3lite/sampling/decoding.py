"""The sampler's compiled core: jitted prefill / extend, then a `lax.while_loop` decode
on the explicit KV cache (donated), with states a caller can stop, fork and continue
(search). `choice.py` holds the settings, the state and how each next token is chosen;
`sampler.py` is the host side: token lists in, completions out.

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
- One cache per call, sized once from the rows' needs (prompt + `max_new_tokens`) by
  `SamplingConfig.cache_slots`' buckets, and one compiled `while_loop` whatever the length:
  attention reads the cache `attention_chunk` slots at a time up to the longest row's
  end (`model.attend_cache`), so a step costs what the filled part costs. `max_new_tokens`
  is compiled as its bucket (`SamplingConfig.compiled`) and the call's own limit is a run
  time value: a new length in the same bucket compiles nothing. The prefill attends over
  the prompt only and projects its last token only.
- Deterministic for a given key: token t of a call uses `fold_in(key, t)`.

The sampler reads the very parameter arrays the learner trains (no copy, no sync).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from o3lite.model import transformer as model_lib
from o3lite.sampling import choice
from o3lite.sampling.choice import STOP_NONE, SamplingConfig, SamplingState



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
  L = choice.tail_len(cfg)
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


def prefill(params, prompt_BxP: jax.Array, prompt_len_B: jax.Array, rng: jax.Array,
            model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig,
            capacity: int | None = None) -> SamplingState:
  """Runs the prompts through the model once, then picks the first token of each sample.

  Returns a state of B * num_samples rows (the samples of a prompt are consecutive), its
  cache of `capacity` slots (default: the bucket of P + max_new_tokens), compiled with
  `sampling_cfg.compiled()`.
  """
  P = prompt_BxP.shape[1]
  capacity = capacity or sampling_cfg.cache_slots(P + sampling_cfg.max_new_tokens)
  return _prefill(params, prompt_BxP, prompt_len_B, rng, model_cfg,
                  sampling_cfg.compiled(), capacity)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg", "capacity"))
def _prefill(params, prompt_BxP: jax.Array, prompt_len_B: jax.Array, rng: jax.Array,
             model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig,
             capacity: int) -> SamplingState:
  B, P = prompt_BxP.shape
  S = sampling_cfg.num_samples
  state, last_BxV = _prompt_state(params, prompt_BxP, prompt_len_B, jnp.zeros((B,), jnp.int32),
                                  rng, max(capacity, P + 1), model_cfg, sampling_cfg)
  if S > 1:  # The samples share the prompt's cache rows.
    rows = jnp.repeat(jnp.arange(B), S)
    state, last_BxV = _take_rows(state, rows), last_BxV[rows]
  return choice.advance(state, last_BxV, jnp.ones((B * S,), bool), sampling_cfg)


def prime(params, prompt_BxP: jax.Array, prompt_len_B: jax.Array, rng: jax.Array,
          model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig,
          capacity: int) -> SamplingState:
  """The prompts in the cache but their last token, which is left pending, and nothing
  chosen (rows done, `stop_B` STOP_NONE): `extend` scores or continues from here, as if
  the prompt had just been sampled."""
  return _prime(params, prompt_BxP, prompt_len_B, rng, model_cfg, sampling_cfg.compiled(),
                capacity)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg", "capacity"))
def _prime(params, prompt_BxP, prompt_len_B, rng, model_cfg, sampling_cfg, capacity):
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
  return _extend(params, state, new_BxT, new_len_B, feed_last_B, rng, model_cfg,
                 sampling_cfg.compiled(), capacity, score)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg", "capacity", "score"),
                   donate_argnames=("state",))
def _extend(params, state, new_BxT, new_len_B, feed_last_B, rng, model_cfg, sampling_cfg,
            capacity, score):
  cfg, (B, T) = sampling_cfg, new_BxT.shape
  fed_BxT1 = jnp.where(feed_last_B[:, None],
                       jnp.concatenate([state.last_token_B[:, None], new_BxT], 1),
                       jnp.concatenate([new_BxT, jnp.full((B, 1), cfg.pad_id, jnp.int32)], 1))
  fed_len_B = new_len_B + feed_last_B.astype(jnp.int32)
  active_B = fed_len_B > 0
  end_B = state.cache["end_index"]
  positions_BxT1 = end_B[:, None] + jnp.arange(T + 1, dtype=jnp.int32)[None]
  segments_BxT1 = (jnp.arange(T + 1)[None] < fed_len_B[:, None]).astype(jnp.int32)
  cache = resize_cache(state.cache, capacity)
  logits_BxTxV, cache = model_lib.Transformer(model_cfg, cache_chunk=cfg.attention_chunk).apply(
      {"params": params}, fed_BxT1, positions_BxT1, segments_BxT1, cache,
      logits_index_B=None if score else jnp.maximum(fed_len_B - 1, 0))
  last_BxV = (jnp.take_along_axis(logits_BxTxV, jnp.maximum(fed_len_B - 1, 0)[:, None, None],
                                  axis=1) if score else logits_BxTxV)[:, 0]
  logprobs_BxT = jnp.zeros((B, T), jnp.float32)
  if score:  # Logits at fed token t score fed token t + 1.
    lp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :T] / choice.temperature_scale(cfg),
                                  axis=-1)
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
      tail_BxL=choice.push(state.tail_BxL, new_BxT, new_len_B))
  return choice.advance(s, last_BxV, active_B, cfg), logprobs_BxT


def decode(params, state: SamplingState, model_cfg: model_lib.ModelConfig,
           sampling_cfg: SamplingConfig) -> SamplingState:
  """Decodes one token at a time until every row is done, the call has
  `max_new_tokens` tokens, or a row reaches the cache's end.

  `state` comes from `prefill` or `extend` (compiled with `sampling_cfg.compiled()`),
  whose cache has room for the tokens to come. One `while_loop`, compiled per cache size
  and `max_new_tokens` bucket; the call's own `max_new_tokens` is a run-time value. A
  done row feeds nothing (its end index stays). `state` is donated and its cache updated
  in place.
  """
  return _decode(params, state, jnp.int32(sampling_cfg.max_new_tokens), model_cfg,
                 sampling_cfg.compiled())


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg"),
                   donate_argnames=("state",))
def _decode(params, state: SamplingState, limit: jax.Array,
            model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig) -> SamplingState:
  model = model_lib.Transformer(model_cfg, cache_chunk=sampling_cfg.attention_chunk)
  cfg = sampling_cfg
  room = state.cache["segment_ids"].shape[1]

  def body(s: SamplingState):
    active_B = ~s.done_B
    logits_Bx1xV, cache = model.apply(
        {"params": params}, s.last_token_B[:, None], s.cache["end_index"][:, None],
        active_B[:, None].astype(jnp.int32), s.cache)
    return choice.advance(s.replace(cache=cache), logits_Bx1xV[:, 0], active_B, cfg)

  return jax.lax.while_loop(
      lambda s: ((s.step < jnp.minimum(limit, cfg.max_new_tokens)) & ~jnp.all(s.done_B)
                 & (jnp.max(s.cache["end_index"]) < room)),
      body, state)


@contextlib.contextmanager
def grown_cache_donation_expected(resized: bool = True):
  """Where `resized` (the call's output cache has another size than its donated input:
  `extend` growing the cache, the verifiers' step reader), silences JAX's warning that
  the donated cache went unused; otherwise silences nothing, so a cache that keeps its
  size and is not reused still warns."""
  if not resized:
    yield
    return
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    yield


def resize_cache(cache: model_lib.Cache, slots: int) -> model_lib.Cache:
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
