"""The attention mask as a model input: the default causal / segment mask given explicitly
changes nothing, and a custom non-causal one (Quiet-STaR style thoughts, bidirectional
blocks) is obeyed, with the same values and gradients on both kernel paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_same_loss_and_grads
from o3lite.model import cpu_kernels
from o3lite.model import transformer as model_lib

T = 128  # Long enough that the XLA:CPU path would take causal blocks (4 of 32).
PREFIX, THOUGHT = 48, 96  # Row 0: keys [0, 48) are a bidirectional prefix, [96, T) a thought.


def _params(cfg, scale=1.0):
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(3)))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape),
                        params)
  # A larger scale makes tokens really influence each other.
  return jax.tree.map(lambda p: p * scale if p.ndim >= 2 else p, params)


def _inputs(B=2, vocab=50):
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, vocab)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  return tokens, positions


def _custom_mask():
  """[2, T, T]. Row 0: a prefix-LM over [0, 48) (queries there see later keys, across the
  32-token blocks), text [48, 96) causal, and a thought [96, T) that sees the prefix and
  its whole own span only (not the text [48, 96)). Row 1: bidirectional blocks of 40."""
  causal_TxS = model_lib.default_mask(jnp.ones((1, T), jnp.int32))[0]
  slot = jnp.arange(T)
  prefix, thought = slot < PREFIX, slot >= THOUGHT
  text_TxS = (causal_TxS | (prefix[:, None] & prefix[None, :])) & ~thought[None, :]
  thought_TxS = prefix[None, :] | thought[None, :]
  row0_TxS = jnp.where(thought[:, None], thought_TxS, text_TxS)
  row1_TxS = (slot[:, None] // 40) == (slot[None, :] // 40)
  return jnp.stack([row0_TxS, row1_TxS])


def _row_change(a_TxV, b_TxV):
  return np.abs(np.asarray(a_TxV - b_TxV)).max(axis=-1)


def test_the_default_mask_given_explicitly_changes_nothing():
  """Not giving a mask is giving `default_mask`: the same logits with packing and
  padding, on both kernel paths, and on the cached and fresh-cache paths."""
  cfg = model_lib.ModelConfig.tiny(vocab_size=50, kernels="plain")
  params = _params(cfg)
  tokens, positions = _inputs()
  segments = jnp.asarray(np.r_[np.ones(70), 2 * np.ones(50), np.zeros(8)][None].repeat(
      2, 0), jnp.int32)
  mask = model_lib.default_mask(segments)
  assert mask.shape == (2, T, T) and mask.dtype == jnp.bool_
  for kernels in ("plain", "xla_cpu"):
    model = model_lib.Transformer(model_lib.ModelConfig.tiny(vocab_size=50, kernels=kernels))
    implicit, _ = model.apply({"params": params}, tokens, positions, segments)
    explicit, _ = model.apply({"params": params}, tokens, positions, segments,
                              mask_BxTxS=mask)
    # Padding rows attend nowhere (uniform over whatever keys a block reads): not compared.
    real_BxTx1 = (segments != 0)[..., None]
    np.testing.assert_allclose(np.where(real_BxTx1, explicit, 0),
                               np.where(real_BxTx1, implicit, 0), rtol=1e-5, atol=1e-5)
  model = model_lib.Transformer(cfg)
  tokens, positions = tokens[:, :12], positions[:, :12]  # Short: the cache's paths.
  segments = jnp.array([[1] * 12, [1] * 9 + [0] * 3])  # Row 1 right-padded.
  for fresh in (False, True):  # The cache's mask is over its S slots (S = 12 when fresh).
    cache = model_lib.init_cache(cfg, 2, 16)
    implicit, implicit_cache = model.apply({"params": params}, tokens, positions, segments,
                                           cache, fresh_cache=fresh)
    explicit, explicit_cache = model.apply(
        {"params": params}, tokens, positions, segments, cache, fresh_cache=fresh,
        mask_BxTxS=model_lib.default_mask(segments, cache, fresh))
    np.testing.assert_array_equal(explicit, implicit)
    for a, b in zip(jax.tree.leaves(explicit_cache), jax.tree.leaves(implicit_cache)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="mask_BxTxS"):
    model.apply({"params": params}, tokens, positions, segments, model_lib.init_cache(
        cfg, 2, 16), mask_BxTxS=mask[:, :12, :12])  # [B, T, T], but the keys are 16 slots.


def test_a_custom_mask_gives_the_same_values_and_gradients_on_both_kernel_paths():
  """A non-causal mask (queries in block 0 see keys in block 1) takes one attention block
  on XLA:CPU, never the causal shortcut: the same loss and gradients as the plain path."""
  assert cpu_kernels.causal_blocks(T, "xla_cpu") == 4
  assert cpu_kernels.causal_blocks(T, "xla_cpu", custom_mask=True) == 1
  cfgs = [model_lib.ModelConfig.tiny(vocab_size=50, kernels=k) for k in ("plain", "xla_cpu")]
  params = _params(cfgs[0])
  tokens, positions = _inputs()
  mask, targets = _custom_mask(), jnp.roll(tokens, -1, axis=1)

  def loss(p, cfg):
    logits, _ = model_lib.Transformer(cfg).apply({"params": p}, tokens, positions,
                                                 mask_BxTxS=mask)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  assert_same_loss_and_grads(loss, params, cfgs)


def test_a_custom_mask_is_obeyed():
  """It changes the output where it differs from causal, and a token a query may not see
  (directly or through other tokens) cannot change that query's logits."""
  cfg = model_lib.ModelConfig.tiny(vocab_size=50, kernels="xla_cpu")
  params = _params(cfg, scale=8.0)
  model = model_lib.Transformer(cfg)
  tokens, positions = _inputs()
  mask = _custom_mask()
  custom, _ = model.apply({"params": params}, tokens, positions, mask_BxTxS=mask)
  causal, _ = model.apply({"params": params}, tokens, positions)
  # The prefix sees its later tokens; the thought does not see the text [48, 96).
  assert _row_change(custom[0, :PREFIX - 1], causal[0, :PREFIX - 1]).min() > 1e-3
  assert _row_change(custom[0, THOUGHT:], causal[0, THOUGHT:]).min() > 1e-3

  changed_tokens = tokens.at[:, 60].set((tokens[:, 60] + 1) % 50)  # Row 0's text.
  changed, _ = model.apply({"params": params}, changed_tokens, positions, mask_BxTxS=mask)
  np.testing.assert_allclose(changed[0, :60], custom[0, :60], atol=1e-6)
  np.testing.assert_allclose(changed[0, THOUGHT:], custom[0, THOUGHT:], atol=1e-6)
  assert _row_change(changed[0, 60:THOUGHT], custom[0, 60:THOUGHT]).max() > 1e-3
  # Row 1 (blocks [40, 80)): its block sees token 60 both ways (queries 40..59 too, which
  # a causal mask hides it from), other blocks never.
  np.testing.assert_allclose(changed[1, :40], custom[1, :40], atol=1e-6)
  np.testing.assert_allclose(changed[1, 80:], custom[1, 80:], atol=1e-6)
  assert _row_change(changed[1, 40:60], custom[1, 40:60]).max() > 1e-3
