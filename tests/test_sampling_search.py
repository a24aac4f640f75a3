"""The sampler for search: per-row cache ends, stops, continue, fork, prime and score,
each against sampling the whole sequence from scratch, also on an 8-device mesh."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.sampling import sampler as sampling
from o3lite.sampling import stops as stops_lib

V, EOS = 37, 2
PROMPTS = [[5, 9, 11], [4, 8, 15, 16, 23, 30, 31], [7], [12, 13, 14, 6, 9]]
MESH = None  # Set per test: None, or the 8-device mesh below.


def _model(seed=0):
  cfg = model_lib.ModelConfig.tiny(vocab_size=V)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(seed)))
  params = jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim >= 2 else p, params)
  return cfg, params


@pytest.fixture(scope="module")
def model():
  return _model(seed=11)


def _mesh(kind):
  if kind == "single":
    return {}
  mesh = sharding_lib.make_mesh(("data", "fsdp", "tensor"), (4, 1, 2))
  return {"mesh": mesh, "rules": sharding_lib.DEFAULT_RULES}


def _scratch(cfg, params, prompts, scfg, where):
  """Each prompt sampled from scratch (a fresh prefill), rows as `start` gives them."""
  state = sampling.start(params, prompts, cfg, scfg, **where)
  return sampling.completions(state, scfg)[:len(prompts)]


def _greedy_free(cfg, params, n=12):
  scfg = sampling.SamplingConfig(max_new_tokens=n, eos_id=-1, prompt_bucket=8)
  return [c.tokens for c in _scratch(cfg, params, PROMPTS, scfg, {})]


@pytest.mark.parametrize("where", ["single", "mesh"])
def test_stop_then_continue_equals_sampling_the_concatenation(model, where):
  cfg, params = model
  where = _mesh(where)
  free = _greedy_free(cfg, params)
  # The step delimiter: a token that row 0 writes at its 6th step (and row 3 at its 4th).
  delim = free[0][5]
  scfg = sampling.SamplingConfig(max_new_tokens=12, eos_id=-1, prompt_bucket=8,
                                 stops=((delim,),))
  state = sampling.start(params, PROMPTS, cfg, scfg, **where)
  first = sampling.completions(state, scfg)
  for row, f in zip(first, free):  # Each row stops on its first delimiter, or runs on.
    at = f.index(delim) + 1 if delim in f else len(f)
    assert row.tokens == f[:at]
    assert row.stop == (1 if delim in f else sampling.STOP_NONE)
  assert sum(r.stop == 1 for r in first) >= 2  # Rows really stopped at different lengths.
  assert len({len(r.tokens) for r in first}) >= 3
  # Ragged suffixes (one row gets none: it goes on from its pending token).
  suffixes = [[20, 21], [22], [], [23, 24, 25, 26, 27, 28, 29, 30, 31]]
  state = sampling.continue_(params, state, suffixes, cfg, scfg, **where)
  second = sampling.completions(state, scfg)
  whole = [p + r.tokens + s for p, r, s in zip(PROMPTS, first, suffixes)]
  scratch = _scratch(cfg, params, whole, scfg, where)
  for got, want in zip(second, scratch):
    assert got.tokens == want.tokens and got.stop == want.stop
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
  assert any(len(s.tokens) > 3 for s in second)


@pytest.mark.parametrize("where", ["single", "mesh"])
def test_fork_rows_decode_as_separate_prefills(model, where):
  cfg, params = model
  where = _mesh(where)
  scfg = sampling.SamplingConfig(max_new_tokens=6, eos_id=-1, prompt_bucket=8)
  # Fork mid-sample: rows 1 and 3 of a started batch, k = 4 copies each, then ragged
  # continuations.
  state = sampling.start(params, PROMPTS, cfg, scfg, **where)
  first = sampling.completions(state, scfg)
  rows = [1, 1, 1, 1, 3, 3, 3, 3]
  forked = sampling.fork(state, rows, **where)
  suffixes = [[], [20], [21, 22], [23, 24, 25], [], [26], [27, 28], [29, 30, 31]]
  out = sampling.completions(sampling.continue_(params, forked, suffixes, cfg, scfg, **where),
                             scfg)
  whole = [PROMPTS[r] + first[r].tokens + s for r, s in zip(rows, suffixes)]
  for got, want in zip(out, _scratch(cfg, params, whole, scfg, where)):
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
  assert len({tuple(o.tokens) for o in out}) == len(out)  # They really differ.
  # A primed prompt continued with nothing samples what `start` samples.
  primed = sampling.prime(params, PROMPTS, cfg, scfg, **where)
  again = sampling.completions(sampling.continue_(params, primed, [[]] * 4, cfg, scfg,
                                                  **where), scfg)
  assert [a.tokens for a in again] == [f.tokens for f in first]
  # Forking onto rows that do not split over the mesh is a one-line error.
  if where:
    with pytest.raises(errors.MeshError, match="batch shards"):
      sampling.fork(state, [0, 1, 2], **where)


@functools.lru_cache
def _forward(cfg, width):
  return jax.jit(lambda p, t: model_lib.Transformer(cfg).apply(
      {"params": p}, t, jnp.arange(width)[None])[0])


def _full_logprobs(cfg, params, prefix, continuation, temperature=1.0, width=24):
  """The training forward pass (no cache) over the sequence right-padded to `width`
  (causality makes the padding irrelevant): one compile."""
  seq = list(prefix) + list(continuation)
  logits = _forward(cfg, width)(params, jnp.array([seq + [0] * (width - len(seq))]))
  logprobs = jax.nn.log_softmax(logits[0] / temperature, axis=-1)
  n = len(prefix)
  return np.array([float(logprobs[n - 1 + i, t]) for i, t in enumerate(continuation)])


@pytest.mark.parametrize("where", ["single", "mesh"])
def test_score_equals_the_full_forward_pass(model, where):
  cfg, params = model
  where = _mesh(where)
  prefixes = [PROMPTS[0], PROMPTS[1], PROMPTS[0], [8], PROMPTS[3]]  # One shared twice.
  conts = [[20, 21, 22], [23], [24, 25, 26, 27, 28, 29, 30, 31, 32, 33], [10, 11], [3, 4]]
  for temperature in (0.0, 0.7):
    scfg = sampling.SamplingConfig(max_new_tokens=4, eos_id=EOS, prompt_bucket=8,
                                   temperature=temperature)
    got = sampling.score(params, prefixes, conts, cfg, scfg, batch_size=4, **where)
    for p, c, g in zip(prefixes, conts, got):
      want = _full_logprobs(cfg, params, p, c, temperature or 1.0)
      assert g.shape == (len(c),)
      np.testing.assert_allclose(g, want, atol=1e-5, rtol=0)


def test_stop_sequences_strings_and_eos(model):
  cfg, params = model
  free = _greedy_free(cfg, params)
  row = free[0]
  pair = tuple(row[4:6])  # A two-token stop that row 0 writes at steps 5-6 (first).
  assert pair[0] not in row[:4] and pair[1] not in row[:4] and row[6] not in row[:6]
  scfg = sampling.SamplingConfig(max_new_tokens=12, eos_id=-1, prompt_bucket=8,
                                 stops=((row[6],), pair))
  out = sampling.completions(sampling.start(params, PROMPTS, cfg, scfg), scfg)
  assert out[0].tokens == row[:6] and out[0].stop == 2
  # A stop whose earlier tokens are the prompt's last ones matches across the boundary.
  across = dataclasses.replace(scfg, stops=((PROMPTS[2][-1], free[2][0]),))
  out = sampling.completions(sampling.start(params, PROMPTS, cfg, across), across)
  assert out[2].tokens == free[2][:1] and out[2].stop == 1
  # EOS ends a row, is not in its tokens, and is reported as such.
  eos = sampling.SamplingConfig(max_new_tokens=12, eos_id=row[3], prompt_bucket=8)
  out = sampling.completions(sampling.start(params, PROMPTS, cfg, eos), eos)
  assert out[0].tokens == row[:3] and out[0].finished and out[0].stop == sampling.STOP_EOS


class _ToyTokenizer:
  """Characters as tokens; token 0 pads, 1 is EOS."""
  chars = "\x00\x01abc\n.:"
  vocab_size = len(chars)
  eos_id, pad_id = 1, 0

  def encode(self, text):
    return [self.chars.index(c) for c in text]

  def decode(self, ids):
    return "".join(self.chars[i] for i in ids)


class _MergingTokenizer(_ToyTokenizer):
  """Also one token for ".\\n" (id 8), as byte-level BPE vocabularies have."""
  vocab_size = 9

  def decode(self, ids):
    return "".join(".\n" if i == 8 else self.chars[i] for i in ids)


def test_stop_strings_become_token_sequences():
  got = stops_lib.stop_set(_MergingTokenizer(), ["\n", "c:", 2])
  # "\n": its own token and the merged ".\n"; "c:": a two-token sequence; 2: an id.
  assert got.stops == ((5,), (8,), (4, 7), (2,))
  assert got.labels == ("\n", "\n", "c:", 2)
  assert got.label(3) == "c:" and got.label(sampling.STOP_EOS) is None
  with pytest.raises(errors.ConfigError, match="outside the vocabulary"):
    stops_lib.stop_set(_ToyTokenizer(), [99])
  with pytest.raises(errors.ConfigError, match="non-empty"):
    stops_lib.stop_set(_ToyTokenizer(), [""])
  with pytest.raises(errors.ConfigError, match="empty stop"):
    sampling.SamplingConfig(max_new_tokens=4, eos_id=1, stops=((),))


def test_thinking_budget_counts_across_continuations(model):
  """The budget counts thinking tokens over every call of a row, appended ones too."""
  cfg, params = model
  think_end = 3
  free = _greedy_free(cfg, params, n=16)
  assert all(think_end not in f[:10] for f in free[:2])
  scfg = sampling.SamplingConfig(max_new_tokens=4, eos_id=-1, prompt_bucket=8,
                                 think_end_id=think_end, think_budget=9)
  state = sampling.start(params, PROMPTS[:2], cfg, scfg)  # 4 thinking tokens each.
  first = sampling.completions(state, scfg)
  state = sampling.continue_(params, state, [[20, 21], [22]], cfg, scfg)
  second = sampling.completions(state, scfg)
  # Row 0: 4 + 2 appended + 3 chosen = 9, then </think>; row 1: 4 + 1 + 4 = 9 at the cap.
  assert second[0].tokens[3] == think_end and think_end not in second[0].tokens[:3]
  assert think_end not in second[1].tokens
  state = sampling.continue_(params, state, [None, []], cfg, scfg)
  third = sampling.completions(state, scfg)
  assert third[0].tokens == [] and third[1].tokens[0] == think_end  # Row 0 left alone.
  assert len(first[0].tokens) == 4
