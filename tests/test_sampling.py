"""Greedy cached generation equals step-by-step argmax of the full forward pass."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.sampling import choice
from o3lite.sampling import decoding
from o3lite.sampling import sampler as sampling

V, EOS = 37, 2


def _model(seed=0):
  cfg = model_lib.ModelConfig.tiny(vocab_size=V)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(seed)))
  params = jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim >= 2 else p, params)
  return cfg, params


def _reference(cfg, params, prompt, max_new, width=32):
  """Argmax of the full (uncached) forward pass, one token at a time. The sequence is
  right-padded to a fixed width (causality makes the padding irrelevant): one compile."""
  forward = jax.jit(lambda p, t: model_lib.Transformer(cfg).apply(
      {"params": p}, t, jnp.arange(width)[None])[0])
  seq, out = list(prompt), []
  for _ in range(max_new):
    logits = forward(params, jnp.array([seq + [0] * (width - len(seq))]))
    nxt = int(jnp.argmax(logits[0, len(seq) - 1]))
    if nxt == EOS:
      break
    out.append(nxt)
    seq.append(nxt)
  return out


def test_greedy_generation_matches_full_forward_argmax():
  cfg, params = _model()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, V, n).tolist() for n in (1, 5, 9, 17)]
  scfg = sampling.SamplingConfig(max_new_tokens=12, eos_id=EOS, prompt_bucket=8)
  got = sampling.generate(params, prompts, cfg, scfg, batch_size=3)  # 2 batches, 1 padded.
  want = [_reference(cfg, params, p, 12) for p in prompts]
  assert got == want
  # Attention over the cache in chunks of 8 slots (up to 4 chunks here), and over every
  # slot at once, give the same tokens.
  for chunk in (8, 0):
    chunked = dataclasses.replace(scfg, attention_chunk=chunk)
    assert sampling.generate(params, prompts, cfg, chunked, batch_size=3) == want
  assert len({tuple(w) for w in want}) == len(want)  # Prompts really lead apart.


def test_generation_stops_at_eos_and_caps_length():
  cfg, params = _model()
  scfg = sampling.SamplingConfig(max_new_tokens=5, eos_id=EOS)
  out = sampling.generate(params, [[5, 6], [7]], cfg, scfg, batch_size=2)
  assert [len(o) for o in out] == [5, 5] and EOS not in sum(out, [])
  # An all-zero output head makes every logit equal: argmax is token 0. With 0 as EOS
  # every sequence stops after its first token.
  cfg_u = model_lib.ModelConfig.tiny(vocab_size=V, tie_embeddings=False)
  p_u = nn.unbox(model_lib.init_params(cfg_u, jax.random.key(1)))
  p_u["lm_head"] = jnp.zeros_like(p_u["lm_head"])
  eos0 = sampling.SamplingConfig(max_new_tokens=5, eos_id=0, pad_id=1)
  state = decoding.prefill(p_u, jnp.array([[5, 6, 1, 1], [7, 1, 1, 1]]), jnp.array([2, 1]),
                           jax.random.PRNGKey(0), cfg_u, eos0)
  state = decoding.decode(p_u, state, cfg_u, eos0)
  assert int(state.step) == 1 and bool(state.done_B.all())
  assert sampling.generate(p_u, [[5, 6]], cfg_u, eos0, batch_size=1) == [[]]


def test_padding_edge_cases():
  scfg = sampling.SamplingConfig(max_new_tokens=4, eos_id=EOS, prompt_bucket=8)
  tokens, lengths = sampling.pad_prompts([[1] * 8, [3]], 4, scfg)
  assert tokens.shape == (4, 8) and lengths.tolist() == [8, 1, 8, 8]
  tokens, _ = sampling.pad_prompts([[1] * 9], 1, scfg)
  assert tokens.shape == (1, 16)
  with pytest.raises(errors.O3liteError, match="empty prompt"):
    sampling.pad_prompts([[]], 1, scfg)


def _full_logprobs(cfg, params, prompt, completion, temperature=1.0):
  seq = jnp.array([list(prompt) + list(completion)])
  logits, _ = model_lib.Transformer(cfg).apply({"params": params}, seq,
                                               jnp.arange(seq.shape[1])[None])
  logprobs = jax.nn.log_softmax(logits[0] / temperature, axis=-1)
  n = len(prompt)
  return np.array([float(logprobs[n - 1 + i, t]) for i, t in enumerate(completion)])


def test_logprobs_equal_the_training_forward_pass():
  cfg, params = _model(seed=3)
  prompts = [[5, 9, 11], [4, 8, 15, 16, 23, 30, 31]]
  for scfg in [sampling.SamplingConfig(max_new_tokens=10, eos_id=EOS, temperature=1.0,
                                       num_samples=2),
               sampling.SamplingConfig(max_new_tokens=10, eos_id=EOS, temperature=0.7,
                                       top_k=5, top_p=0.9, attention_chunk=8)]:
    out = sampling.sample(params, prompts, cfg, scfg, batch_size=2, rng=jax.random.PRNGKey(1))
    assert [len(o) for o in out] == [scfg.num_samples] * 2
    for prompt, samples in zip(prompts, out):
      for s in samples:
        # The distribution the tokens were drawn from: logits / temperature (before
        # top-k / top-p), what the RL learner scores at the same temperature.
        want = _full_logprobs(cfg, params, prompt, s.tokens, scfg.temperature)
        assert np.max(np.abs(np.array(s.logprobs) - want)) <= 1e-5


def test_sample_frequencies_match_the_softmax():
  cfg, params = _model(seed=4)
  params = jax.tree_util.tree_map(lambda p: p / 4.0 if p.ndim >= 2 else p, params)
  prompt = [7, 3, 12]
  logits, _ = model_lib.Transformer(cfg).apply({"params": params}, jnp.array([prompt]),
                                               jnp.arange(3)[None])
  probs = np.asarray(jax.nn.softmax(logits[0, -1]))
  n = 4000
  for top_k in (0, 4):
    scfg = sampling.SamplingConfig(max_new_tokens=1, eos_id=-1, temperature=1.0,
                                   num_samples=n, top_k=top_k)
    samples = sampling.sample(params, [prompt], cfg, scfg, batch_size=1,
                              rng=jax.random.PRNGKey(7))[0]
    counts = np.bincount([s.tokens[0] for s in samples], minlength=V)
    expected = probs.copy()
    if top_k:
      expected[np.argsort(probs)[:-top_k]] = 0.0
      expected /= expected.sum()
      assert set(np.nonzero(counts)[0]) <= set(np.argsort(probs)[-top_k:])
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) <= 4.5 * sigma + 1e-9)
    assert probs.max() < 0.5  # A spread distribution: the test can fail.


def test_top_p_keeps_the_nucleus_only():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  scfg = sampling.SamplingConfig(max_new_tokens=1, eos_id=0, temperature=1.0, top_p=0.8)
  kept = np.asarray(choice.filter_logits(logits, scfg)[0] > -1e29)
  assert kept.tolist() == [True, True, False, False]
  scfg = sampling.SamplingConfig(max_new_tokens=1, eos_id=0, temperature=1.0, top_p=0.81)
  kept = np.asarray(choice.filter_logits(logits, scfg)[0] > -1e29)
  assert kept.tolist() == [True, True, True, False]


def test_sampling_is_deterministic_for_a_key_and_sharding_does_not_change_it():
  from o3lite.parallel import mesh as sharding_lib
  cfg, params = _model(seed=5)
  prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
  scfg = sampling.SamplingConfig(max_new_tokens=8, eos_id=EOS, temperature=1.0, num_samples=2)
  a = sampling.sample(params, prompts, cfg, scfg, batch_size=4, rng=jax.random.PRNGKey(3))
  b = sampling.sample(params, prompts, cfg, scfg, batch_size=4, rng=jax.random.PRNGKey(3))
  c = sampling.sample(params, prompts, cfg, scfg, batch_size=4, rng=jax.random.PRNGKey(4))
  tokens = lambda out: [[s.tokens for s in x] for x in out]
  assert tokens(a) == tokens(b) and tokens(a) != tokens(c)
  mesh = sharding_lib.make_mesh(("data", "fsdp", "tensor"), (4, 1, 2))
  sharded = sampling.sample(params, prompts, cfg, scfg, batch_size=4,
                            rng=jax.random.PRNGKey(3), mesh=mesh,
                            rules=sharding_lib.DEFAULT_RULES)
  assert tokens(sharded) == tokens(a)
  # Several chunks on the mesh; a batch of 3 is padded to 4 rows, one per data shard.
  more = prompts + [[6, 6], [7, 8, 9]]
  plain = sampling.sample(params, more, cfg, scfg, batch_size=4, rng=jax.random.PRNGKey(3))
  chunked = sampling.sample(params, more, cfg, scfg, batch_size=3, rng=jax.random.PRNGKey(3),
                            mesh=mesh, rules=sharding_lib.DEFAULT_RULES)
  assert tokens(chunked) == tokens(plain)
  # Attention in chunks of 8 slots changes no sample, sharded or not.
  segmented = dataclasses.replace(scfg, attention_chunk=8)
  assert tokens(sampling.sample(params, prompts, cfg, segmented, batch_size=4,
                                rng=jax.random.PRNGKey(3))) == tokens(a)
  assert tokens(sampling.sample(params, more, cfg, segmented, batch_size=3,
                                rng=jax.random.PRNGKey(3), mesh=mesh,
                                rules=sharding_lib.DEFAULT_RULES)) == tokens(plain)


def test_thinking_budget_forces_the_end_of_thinking():
  cfg, params = _model(seed=6)
  think_end = 3
  prompts = [[5, 6, 7], [9]]
  free = sampling.SamplingConfig(max_new_tokens=12, eos_id=EOS, think_end_id=think_end)
  unforced = sampling.generate(params, prompts, cfg, free, batch_size=2)
  assert all(think_end not in u[:4] for u in unforced)  # It would think past 4 tokens.
  capped = dataclasses.replace(free, think_budget=4)
  out = sampling.sample(params, prompts, cfg, capped, batch_size=2)
  for (s,), u in zip(out, unforced):
    assert s.tokens[:4] == u[:4] and s.tokens[4] == think_end
    assert len(s.tokens) > 5  # The answer follows the forced </think>.


def _choose(logits_1xV, think_len, thinking, scfg, wait_pos=-1):
  """The token (and its log-prob) `decode` picks from these logits in this state."""
  state = choice.SamplingState(
      step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0),
      last_token_B=jnp.zeros((1,), jnp.int32), tokens_BxN=jnp.zeros((1, 4), jnp.int32),
      logprobs_BxN=jnp.zeros((1, 4)), num_new_B=jnp.zeros((1,), jnp.int32),
      done_B=jnp.zeros((1,), bool), stop_B=jnp.full((1,), -1, jnp.int32),
      thinking_B=jnp.array([thinking]), think_len_B=jnp.array([think_len], jnp.int32),
      wait_pos_B=jnp.array([wait_pos], jnp.int32), tail_BxL=jnp.full((1, 1), -1, jnp.int32),
      cache=None)
  out = choice.advance(state, logits_1xV, jnp.ones((1,), bool), scfg)
  return int(out.last_token_B[0]), float(out.logprobs_BxN[0, 0]), int(out.wait_pos_B[0])


def test_min_think_suppresses_an_early_end_of_thinking():
  scfg = sampling.SamplingConfig(max_new_tokens=8, eos_id=EOS, think_end_id=3, min_think=4)
  # The model prefers </think> (3), then EOS, then token 5.
  logits = jnp.zeros((1, V)).at[0, 3].set(5.0).at[0, EOS].set(4.0).at[0, 5].set(1.0)
  assert _choose(logits, 2, True, scfg)[0] == 5  # Too early: </think> and EOS are banned.
  assert _choose(logits, 4, True, scfg)[0] == 3  # Enough thinking.
  assert _choose(logits, 2, False, scfg)[0] == 3  # Already answering: nothing to suppress.
  # The log-probability is the model's own, not the suppressed distribution's.
  np.testing.assert_allclose(_choose(logits, 2, True, scfg)[1],
                             jax.nn.log_softmax(logits)[0, 5], atol=1e-6)


def test_wait_replaces_an_early_end_of_thinking():
  """s1's "Wait": an early </think> becomes the wait tokens, forced one per step."""
  scfg = sampling.SamplingConfig(max_new_tokens=8, eos_id=EOS, think_end_id=3, min_think=4,
                                 wait_ids=(20, 21))
  logits = jnp.zeros((1, V)).at[0, 3].set(5.0).at[0, 5].set(1.0)
  assert _choose(logits, 2, True, scfg)[::2] == (20, 1)  # Early: "Wait" begins.
  assert _choose(logits, 3, True, scfg, wait_pos=1)[::2] == (21, -1)  # ... and ends.
  assert _choose(logits, 4, True, scfg)[::2] == (3, -1)  # Enough thinking: </think>.
  with pytest.raises(errors.ConfigError, match="min_think"):
    sampling.SamplingConfig(max_new_tokens=8, eos_id=EOS, think_end_id=3, wait_ids=(20,))
