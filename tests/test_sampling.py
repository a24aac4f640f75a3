"""Greedy cached generation equals step-by-step argmax of the full forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o3lite import model as model_lib
from o3lite import sampling

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
  state = sampling.prefill(p_u, jnp.array([[5, 6, 1, 1], [7, 1, 1, 1]]), jnp.array([2, 1]),
                           cfg_u, eos0)
  state = sampling.decode(p_u, state, cfg_u, eos0)
  assert int(state.step) == 1 and bool(state.done_B.all())
  assert sampling.generate(p_u, [[5, 6]], cfg_u, eos0, batch_size=1) == [[]]


def test_padding_edge_cases():
  scfg = sampling.SamplingConfig(max_new_tokens=4, eos_id=EOS, prompt_bucket=8)
  tokens, lengths = sampling.pad_prompts([[1] * 8, [3]], 4, scfg)
  assert tokens.shape == (4, 8) and lengths.tolist() == [8, 1, 8, 8]
  tokens, _ = sampling.pad_prompts([[1] * 9], 1, scfg)
  assert tokens.shape == (1, 16)
  with pytest.raises(ValueError, match="empty prompt"):
    sampling.pad_prompts([[]], 1, scfg)
