"""The rollout sampler: a jitted prefill, then a `lax.while_loop` decode on the explicit
KV cache, with the cache donated.

- Prompts of different lengths are right-padded to a length bucket (few shapes compile);
  each sequence keeps its own positions, and padded slots carry segment id 0 so no query
  attends to them.
- Greedy (temperature 0), temperature, top-k and top-p; `num_samples` completions per
  prompt share one prefill (the cache is repeated along the batch).
- Per-sequence stop at EOS and a `max_new_tokens` cap.
- Returned log-probabilities are those of softmax(logits / temperature), the distribution
  the tokens are drawn from (temperature 1 when greedy), before top-k / top-p and
  forcing: what the RL learner computes at the same temperature.
- Thinking budget (budget forcing, s1): after `think_budget` tokens without `</think>`,
  `</think>` is forced and the answer follows; `min_think` suppresses an early `</think>`
  (and EOS) so the model thinks longer.
- The cache grows `decode_segment` slots at a time, so attention reads about the filled
  part of it; the prefill attends over the prompt only and projects its last token only.
- Deterministic for a given key: token t of every sequence uses `fold_in(key, t)`.

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


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static decode settings (hashable: part of the compiled function's identity)."""

  max_new_tokens: int
  eos_id: int
  pad_id: int = 0
  prompt_bucket: int = 16  # Prompt lengths are padded up to a multiple of this.
  temperature: float = 0.0  # 0 = greedy.
  top_k: int = 0  # Keep the k most likely tokens; 0 = all.
  top_p: float = 1.0  # Keep the smallest set with this much probability; 1 = all.
  num_samples: int = 1  # Completions per prompt (consecutive rows of the output).
  think_end_id: int = -1  # Token id of `</think>`; needed by the two settings below.
  think_budget: int = 0  # Force `</think>` after this many thinking tokens; 0 = no cap.
  min_think: int = 0  # Forbid `</think>` and EOS before this many thinking tokens.
  # The KV cache grows by this many slots at a time during decoding, so attention reads
  # about the filled part only; each segment is one more loop in the compiled program.
  # 0 = one segment (the whole cache from the start).
  decode_segment: int = 32

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise errors.ConfigError(f"invalid sampling settings: temperature={self.temperature}, "
                               f"top_k={self.top_k}, top_p={self.top_p}")
    if self.num_samples < 1 or self.max_new_tokens < 1 or self.decode_segment < 0:
      raise errors.ConfigError("num_samples and max_new_tokens must be at least 1, "
                               "decode_segment at least 0")
    if (self.think_budget or self.min_think) and self.think_end_id < 0:
      raise errors.ConfigError("think_budget / min_think need think_end_id")


@flax.struct.dataclass
class SamplingState:
  step: jax.Array  # int32 scalar: tokens generated so far.
  rng: jax.Array  # The sampling key.
  last_token_B: jax.Array  # The token to feed next.
  position_B: jax.Array  # Its position.
  tokens_BxN: jax.Array  # Generated tokens (pad after a sequence is done).
  logprobs_BxN: jax.Array  # Their log-probabilities at the temperature (0 on padding).
  done_B: jax.Array  # Whether the sequence has emitted EOS.
  thinking_B: jax.Array  # Whether the sequence has not yet emitted `</think>`.
  cache: model_lib.Cache


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


def _choose(logits_BxV: jax.Array, step: jax.Array, state_rng: jax.Array,
            thinking_B: jax.Array, cfg: SamplingConfig):
  """Next tokens and their log-probabilities under softmax(logits / temperature), the
  distribution they are drawn from (temperature 1 when greedy). Top-k / top-p
  truncation is not in these log-probs: RL, which compares them with the learner's,
  samples without it."""
  scale = cfg.temperature if cfg.temperature > 0 else 1.0
  logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32) / scale, axis=-1)
  if cfg.min_think:
    early_B1 = (thinking_B & (step < cfg.min_think))[:, None]
    banned_V = jnp.zeros(logits_BxV.shape[-1], bool).at[
        jnp.array([cfg.think_end_id, cfg.eos_id])].set(True)
    logits_BxV = jnp.where(early_B1 & banned_V, _NEG, logits_BxV)
  if cfg.temperature == 0.0:
    next_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  else:
    key = jax.random.fold_in(state_rng, step)
    next_B = jax.random.categorical(key, _filter_logits(logits_BxV, cfg)).astype(jnp.int32)
  if cfg.think_budget:
    next_B = jnp.where(thinking_B & (step >= cfg.think_budget), cfg.think_end_id, next_B)
  return next_B, jnp.take_along_axis(logprobs_BxV, next_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg"))
def prefill(params, prompt_BxP: jax.Array, prompt_len_B: jax.Array, rng: jax.Array,
            model_cfg: model_lib.ModelConfig, sampling_cfg: SamplingConfig) -> SamplingState:
  """Run the prompts through the model once, then pick the first token of each sample.

  Returns a state of B * num_samples rows (the samples of a prompt are consecutive).
  """
  B, P = prompt_BxP.shape
  N, S = sampling_cfg.max_new_tokens, sampling_cfg.num_samples
  # Slots for the prompt and decode's first segment; `decode` grows it for later ones.
  cache = model_lib.init_cache(model_cfg, B, P + _segment_ends(sampling_cfg)[0] - 1)
  positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  segments_BxP = (positions_BxP < prompt_len_B[:, None]).astype(jnp.int32)
  # The cache is empty: the prompt attends over itself only; logits at its last token.
  logits_Bx1xV, cache = model_lib.Transformer(model_cfg).apply(
      {"params": params}, prompt_BxP, positions_BxP, segments_BxP, cache,
      fresh_cache=True, logits_index_B=prompt_len_B - 1)
  last_BxV = logits_Bx1xV[:, 0]
  if S > 1:
    repeat = lambda x: jnp.repeat(x, S, axis=0) if x.ndim else x
    cache = jax.tree_util.tree_map(repeat, cache)
    last_BxV, prompt_len_B = repeat(last_BxV), repeat(prompt_len_B)
  rows = B * S
  step = jnp.zeros((), jnp.int32)
  thinking_B = jnp.ones((rows,), bool)
  first_B, logprob_B = _choose(last_BxV, step, rng, thinking_B, sampling_cfg)
  tokens_BxN = jnp.full((rows, N), sampling_cfg.pad_id, jnp.int32).at[:, 0].set(first_B)
  logprobs_BxN = jnp.zeros((rows, N), jnp.float32).at[:, 0].set(logprob_B)
  return SamplingState(
      step=step + 1, rng=rng, last_token_B=first_B, position_B=prompt_len_B.astype(jnp.int32),
      tokens_BxN=tokens_BxN, logprobs_BxN=logprobs_BxN,
      done_B=first_B == sampling_cfg.eos_id,
      thinking_B=thinking_B & (first_B != sampling_cfg.think_end_id), cache=cache)


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampling_cfg"),
                   donate_argnames=("state",))
def decode(params, state: SamplingState, model_cfg: model_lib.ModelConfig,
           sampling_cfg: SamplingConfig) -> SamplingState:
  """Decode one token at a time until every sequence is done or the cap is reached.

  `state` comes from `prefill`. The token fed at step s goes to cache slot P + s - 1, so
  the steps [1, end) of a segment need P + end - 1 slots: before each later segment the
  cache is zero-padded to that (one copy per segment), and attention in the segment reads
  those slots only instead of all P + N - 1 from the first step. The donated cache is
  updated in place when there is one segment; with several, the donated first-segment
  cache cannot be the (larger) output's buffer, and JAX says so in a warning.
  """
  model = model_lib.Transformer(model_cfg)
  N, cfg = sampling_cfg.max_new_tokens, sampling_cfg
  ends = _segment_ends(cfg)
  prompt_slots = state.cache["segment_ids"].shape[1] - (ends[0] - 1)

  def body(s: SamplingState):
    logits_Bx1xV, cache = model.apply(
        {"params": params}, s.last_token_B[:, None], s.position_B[:, None],
        jnp.ones_like(s.last_token_B)[:, None], s.cache)
    next_B, logprob_B = _choose(logits_Bx1xV[:, 0], s.step, s.rng, s.thinking_B, cfg)
    next_B = jnp.where(s.done_B, cfg.pad_id, next_B)
    logprob_B = jnp.where(s.done_B, 0.0, logprob_B)
    return SamplingState(
        step=s.step + 1, rng=s.rng, last_token_B=next_B, position_B=s.position_B + 1,
        tokens_BxN=jax.lax.dynamic_update_slice(s.tokens_BxN, next_B[:, None], (0, s.step)),
        logprobs_BxN=jax.lax.dynamic_update_slice(
            s.logprobs_BxN, logprob_B[:, None], (0, s.step)),
        done_B=s.done_B | (next_B == cfg.eos_id),
        thinking_B=s.thinking_B & (next_B != cfg.think_end_id), cache=cache)

  for end in ends:
    cache = _grow_cache(state.cache, prompt_slots + end - 1)
    state = jax.lax.while_loop(
        lambda s, end=end: (s.step < end) & ~jnp.all(s.done_B), body,
        state.replace(cache=cache))
  return state


@contextlib.contextmanager
def grown_cache_donation_expected():
  """Silences JAX's warning that `decode`'s donated cache went unused: expected with
  several segments (see `decode`), where the output cache is larger than the input."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    yield


def _segment_ends(cfg: SamplingConfig) -> list[int]:
  """The (exclusive) last step of each decode segment: [seg, 2 seg, ..., N]."""
  N, segment = cfg.max_new_tokens, cfg.decode_segment or cfg.max_new_tokens
  return [*range(segment, N, segment), N]


def _grow_cache(cache: model_lib.Cache, slots: int) -> model_lib.Cache:
  """The cache zero-padded (empty slots, segment id 0) to `slots` slots."""
  extra = slots - cache["segment_ids"].shape[1]
  if extra <= 0:
    return cache
  pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))
  return {"index": cache["index"],
          "segment_ids": jnp.pad(cache["segment_ids"], ((0, 0), (0, extra))),
          "layers": [{name: pad_kv(x) for name, x in layer.items()}
                     for layer in cache["layers"]]}


def pad_prompts(prompts: Sequence[Sequence[int]], batch_size: int,
                sampling_cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad to a bucketed length; pad the batch with copies of the first prompt."""
  if not prompts:
    raise errors.DataError("no prompts to generate from")
  if any(len(p) == 0 for p in prompts):
    raise errors.DataError("empty prompt: every prompt needs at least one token")
  longest = max(len(p) for p in prompts)
  bucket = sampling_cfg.prompt_bucket
  P = -(-longest // bucket) * bucket
  rows = list(prompts) + [prompts[0]] * (batch_size - len(prompts))
  prompt_BxP = np.full((len(rows), P), sampling_cfg.pad_id, np.int32)
  for i, p in enumerate(rows):
    prompt_BxP[i, :len(p)] = p
  return prompt_BxP, np.array([len(p) for p in rows], np.int32)


@dataclasses.dataclass
class Completion:
  """One sampled completion: tokens (EOS excluded) and their log-probabilities."""

  tokens: list[int]
  logprobs: list[float]
  finished: bool  # Ended with EOS (False: hit max_new_tokens).


def sample(params, prompts: Sequence[Sequence[int]], model_cfg: model_lib.ModelConfig,
           sampling_cfg: SamplingConfig, batch_size: int, rng: jax.Array | None = None,
           mesh: jax.sharding.Mesh | None = None, rules=None) -> list[list[Completion]]:
  """`num_samples` completions for each prompt, in order; prompts go `batch_size` at a time.

  With a mesh (and its logical rules), prompts are split over the batch axes of the mesh
  and the model's activation hints apply; params keep the shardings they have.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  context = contextlib.nullcontext  # Entered once per chunk: a factory.
  if mesh is not None:
    batch_sharding = sharding_lib.batch_sharding(mesh, rules)
    shards = sharding_lib.batch_shards(mesh, rules)
    batch_size = -(-batch_size // shards) * shards  # Padding rows fill the mesh.
    context = lambda: sharding_lib.activation_sharding(mesh, rules)
  results = []
  for chunk_index, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = prompts[start:start + batch_size]
    prompt_BxP, prompt_len_B = pad_prompts(chunk, batch_size, sampling_cfg)
    if mesh is None:
      prompt_BxP, prompt_len_B = jnp.asarray(prompt_BxP), jnp.asarray(prompt_len_B)
    else:
      placed = sharding_lib.put_global_batch(
          {"prompt": prompt_BxP, "length": prompt_len_B[:, None]}, batch_sharding)
      prompt_BxP, prompt_len_B = placed["prompt"], placed["length"][:, 0]
    with context():
      state = prefill(params, prompt_BxP, prompt_len_B,
                      jax.random.fold_in(rng, chunk_index), model_cfg, sampling_cfg)
      with grown_cache_donation_expected():
        state = decode(params, state, model_cfg, sampling_cfg)
    tokens, logprobs = sharding_lib.to_host((state.tokens_BxN, state.logprobs_BxN))
    S = sampling_cfg.num_samples
    for i in range(len(chunk)):
      samples = []
      for row in range(i * S, (i + 1) * S):
        toks = np.asarray(tokens[row]).tolist()
        end = toks.index(sampling_cfg.eos_id) if sampling_cfg.eos_id in toks else len(toks)
        samples.append(Completion(toks[:end], np.asarray(logprobs[row][:end]).tolist(),
                                  end < len(toks)))
      results.append(samples)
  return results


def generate(params, prompts: Sequence[Sequence[int]], model_cfg: model_lib.ModelConfig,
             sampling_cfg: SamplingConfig, batch_size: int) -> list[list[int]]:
  """Greedy (or first-sample) completions without EOS and padding, one per prompt."""
  return [s[0].tokens for s in sample(params, prompts, model_cfg, sampling_cfg, batch_size)]
