"""Model shapes, parameter counts, causality and KV-cache equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_same_loss_and_grads
from o3lite import errors
from o3lite.model import cpu_kernels
from o3lite.model import transformer as model_lib


@pytest.mark.parametrize("name,expected", [
    ("qwen2_5_0_5b", 494_032_768),
    ("llama3_2_1b", 1_235_814_400),
])
def test_named_sizes_have_exact_parameter_counts(name, expected):
  cfg = model_lib.ModelConfig.named(name)
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  assert model_lib.count_params(abstract) == expected


def test_every_parameter_has_logical_axes():
  cfg = model_lib.ModelConfig.tiny(qkv_bias=True, tie_embeddings=False)
  boxed = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  names = set(jax.tree_util.tree_leaves(nn.get_partition_spec(boxed),
                                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  assert names  # Specs exist for every box.


def _random_model(**overrides):
  cfg = model_lib.ModelConfig.tiny(vocab_size=61, **overrides)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(0)))
  # Larger weights than the init so that tokens really influence each other.
  params = jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim >= 2 else p, params)
  return cfg, params


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": False},
                                       {"num_kv_heads": 4, "rope_theta": 1e6}])
def test_cached_decoding_matches_full_forward(overrides):
  cfg, params = _random_model(**overrides)
  model = model_lib.Transformer(cfg)
  B, T = 3, 14
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  full, _ = model.apply({"params": params}, tokens, positions)
  cache = model_lib.init_cache(cfg, B, T + 3)
  logits, cache = model.apply({"params": params}, tokens[:, :6], positions[:, :6], cache=cache)
  pieces = [logits]
  for t in range(6, T):
    logits, cache = model.apply({"params": params}, tokens[:, t:t + 1],
                                positions[:, t:t + 1], cache=cache)
    pieces.append(logits)
  assert cache["end_index"].tolist() == [T] * B
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full[:, 1:] - full[:, :1])).max() > 1e-2  # Not degenerate.


def test_fresh_cache_prefill_matches_the_general_cached_path():
  """A prefill into an empty cache that attends over the prompt only, with logits at one
  position per row, gives that position's logits and the same cache (padded prompts)."""
  cfg, params = _random_model(num_kv_heads=4)
  model = model_lib.Transformer(cfg)
  B, P = 3, 8
  tokens = jax.random.randint(jax.random.key(1), (B, P), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(P), (B, P))
  lengths = jnp.array([8, 5, 1])
  segments = (positions < lengths[:, None]).astype(jnp.int32)
  general, general_cache = model.apply({"params": params}, tokens, positions, segments,
                                       model_lib.init_cache(cfg, B, P + 4))
  fresh, fresh_cache = model.apply({"params": params}, tokens, positions, segments,
                                   model_lib.init_cache(cfg, B, P + 4), fresh_cache=True,
                                   logits_index_B=lengths - 1)
  assert fresh.shape == (B, 1, cfg.vocab_size)
  np.testing.assert_allclose(fresh[:, 0], general[jnp.arange(B), lengths - 1],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(fresh_cache["segment_ids"], general_cache["segment_ids"])
  # Each row's end index is its prompt length: decoding overwrites the padding slots.
  assert fresh_cache["end_index"].tolist() == general_cache["end_index"].tolist() == [8, 5, 1]
  # Keys and values of real tokens agree; padded slots (segment 0) are never attended.
  valid_Bx1xSx1 = (general_cache["segment_ids"] != 0)[:, None, :, None]
  for got, want in zip(jax.tree_util.tree_leaves(fresh_cache["layers"]),
                       jax.tree_util.tree_leaves(general_cache["layers"])):
    np.testing.assert_allclose(np.where(valid_Bx1xSx1, got, 0),
                               np.where(valid_Bx1xSx1, want, 0), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="fresh_cache"):
    model.apply({"params": params}, tokens, positions, segments, fresh_cache=True)


def test_model_is_causal():
  cfg, params = _random_model()
  model = model_lib.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, cfg.vocab_size)
  positions = jnp.arange(10)[None]
  base, _ = model.apply({"params": params}, tokens, positions)
  changed, _ = model.apply({"params": params}, tokens.at[0, 6].set((tokens[0, 6] + 1) % 61),
                           positions)
  np.testing.assert_allclose(changed[:, :6], base[:, :6], atol=1e-6)
  assert np.abs(np.asarray(changed[:, 6:] - base[:, 6:])).max() > 1e-3


def test_packed_segments_do_not_see_each_other():
  cfg, params = _random_model()
  model = model_lib.Transformer(cfg)
  a = jax.random.randint(jax.random.key(3), (1, 5), 0, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(4), (1, 7), 0, cfg.vocab_size)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
  positions = jnp.concatenate([jnp.arange(5), jnp.arange(7), jnp.zeros(4, jnp.int32)])[None]
  segments = jnp.array([[1] * 5 + [2] * 7 + [0] * 4])
  out, _ = model.apply({"params": params}, packed, positions, segments)
  alone_a, _ = model.apply({"params": params}, a, jnp.arange(5)[None])
  alone_b, _ = model.apply({"params": params}, b, jnp.arange(7)[None])
  np.testing.assert_allclose(out[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:12], alone_b, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  cfg, params = _random_model()
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  f32, _ = model_lib.Transformer(cfg).apply({"params": params}, tokens, positions)
  bf16_cfg = model_lib.ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
  bf16, _ = model_lib.Transformer(bf16_cfg).apply({"params": params}, tokens, positions)
  assert bf16.dtype == jnp.float32
  p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(bf16)
  assert float(jnp.abs(p32 - p16).max()) < 0.1


def test_invalid_model_configs_are_rejected():
  with pytest.raises(errors.O3liteError, match="num_kv_heads"):
    model_lib.ModelConfig.tiny(num_heads=4, num_kv_heads=3)
  with pytest.raises(errors.O3liteError, match="unknown model size"):
    model_lib.ModelConfig.named("huge")


def test_remat_gives_the_same_gradients():
  cfg, params = _random_model()
  remat_cfg = model_lib.ModelConfig(**{**cfg.__dict__, "remat": True})
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))

  def loss(p, c):
    logits, _ = model_lib.Transformer(c).apply({"params": p}, tokens, positions)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  g1 = jax.grad(loss)(params, cfg)
  g2 = jax.grad(loss)(params, remat_cfg)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_shape,w_shape,spec", [
    ((2, 3, 4), (4, 6), "btd,df->btf"),
    ((2, 3, 4), (4, 2, 5), "btd,dnh->btnh"),
    ((2, 3, 2, 5), (2, 5, 4), "btnh,nhd->btd"),
    ((2, 3, 4), (7, 4), "btd,vd->btv"),
])
def test_cpu_projection_values_and_gradients_match_einsum(x_shape, w_shape, spec):
  """The XLA:CPU projection (one 2-D matmul, hand-written backward) is the einsum."""
  assert cpu_kernels._parse(spec) is not None  # It really takes the fast path.
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  out_shape = jnp.einsum(spec, x, w).shape
  cotangent = jax.random.normal(kc, out_shape)
  ours = lambda x, w: jnp.sum(cpu_kernels.einsum(spec, x, w, "xla_cpu") * cotangent)
  reference = lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * cotangent)
  np.testing.assert_allclose(cpu_kernels.einsum(spec, x, w, "xla_cpu"),
                             jnp.einsum(spec, x, w), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert cpu_kernels._parse("btd,btd->bt") is None  # Not a projection: plain einsum.


def test_cpu_swiglu_values_and_gradients_match_autodiff():
  """The recomputing backward pass of SwiGLU is autodiff's of silu(gate) * up."""
  kg, ku, kc = jax.random.split(jax.random.key(0), 3)
  gate = 3 * jax.random.normal(kg, (4, 5, 6))
  up = jax.random.normal(ku, (4, 5, 6))
  cotangent = jax.random.normal(kc, (4, 5, 6))
  ours = lambda g, u: jnp.sum(cpu_kernels.swiglu(g, u, "xla_cpu") * cotangent)
  reference = lambda g, u: jnp.sum(nn.silu(g) * u * cotangent)
  np.testing.assert_allclose(cpu_kernels.swiglu(gate, up, "xla_cpu"), nn.silu(gate) * up,
                             rtol=1e-6)
  for got, want in zip(jax.grad(ours, (0, 1))(gate, up), jax.grad(reference, (0, 1))(gate, up)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_causal_blocks():
  assert [cpu_kernels.causal_blocks(t, "xla_cpu")
          for t in (128, 512, 96, 64, 48, 8)] == [4, 4, 2, 2, 1, 1]
  assert cpu_kernels.causal_blocks(128, "plain") == 1
  assert cpu_kernels.active("auto") == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("qkv_bias,tie", [(False, True), (True, False)])
def test_the_two_kernel_paths_give_the_same_model(qkv_bias, tie):
  """One switch: the plain einsum model (GPU / TPU) and the XLA:CPU forms compute the
  same logits and the same gradients, over a length that takes causal blocks (128)."""
  cfgs = [model_lib.ModelConfig.tiny(vocab_size=50, kernels=k, qkv_bias=qkv_bias,
                                     tie_embeddings=tie) for k in ("plain", "xla_cpu")]
  params = nn.unbox(model_lib.init_params(cfgs[0], jax.random.PRNGKey(3)))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(4),
                                                               p.shape), params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 50, (2, 128)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(128), (2, 128))
  segments = jnp.asarray(np.r_[np.ones(70), 2 * np.ones(50), np.zeros(8)][None].repeat(
      2, 0), jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)

  def loss(p, cfg):
    logits, _ = model_lib.Transformer(cfg).apply({"params": p}, tokens, positions, segments)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1) * (segments > 0)[..., None])

  assert_same_loss_and_grads(loss, params, cfgs)


@pytest.mark.parametrize("num_blocks", [2, 4])
def test_blocked_attention_matches_one_block(num_blocks):
  """Skipping the key blocks after each query block changes nothing: same values and
  gradients, with grouped-query heads, packed segments and padding."""
  B, T, N, K, H = 2, 16, 4, 2, 8
  kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(kq, (B, T, N, H))
  k = jax.random.normal(kk, (B, K, T, H))
  v = jax.random.normal(kv, (B, K, T, H))
  cotangent = jax.random.normal(kc, (B, T, N, H))
  segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16])
  slots = jnp.arange(T)
  mask = ((slots[None, None, :] <= slots[None, :, None])
          & (segments[:, None, :] == segments[:, :, None]) & (segments[:, None, :] != 0))

  def loss(blocks):
    return lambda q, k, v: jnp.sum(model_lib.attend(q, k, v, mask, blocks) * cotangent)

  np.testing.assert_allclose(model_lib.attend(q, k, v, mask, num_blocks),
                             model_lib.attend(q, k, v, mask), rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.grad(loss(num_blocks), (0, 1, 2))(q, k, v),
                       jax.grad(loss(1), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
