"""Decoder-only transformer of the Llama / Qwen2 family, in pure-functional Flax.

Parameters are a plain pytree; `Transformer(config).apply({"params": p}, ...)` is a
pure function. RMSNorm, rotary embeddings (configurable theta), SwiGLU MLP, grouped-query
attention, optional QKV bias (Qwen2), tied or untied embeddings.

The KV cache is an explicit pytree passed in and returned (never module state):

  cache = {
    "index": int32 scalar,                 # next slot to write, shared by the batch
    "segment_ids": int32[B, S],            # 0 = empty slot, else the token's segment id
    "layers": [{"k": [B, K, S, H], "v": [B, K, S, H]}, ...],  # head-major
  }

One attention path serves training (no cache: keys are the T input tokens, with packing
segments) and cached prefill / decode (keys are the S cache slots). A query at slot q may
attend to key slot s iff s <= q and both carry the same non-zero segment id. Positions are
given by the caller, so right-padded prompts of different lengths keep correct positions.

Shape letters: B batch, T query length, S key length, D embed, N query heads,
K kv heads, G = N / K, H head dim, F mlp hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyperparameters (frozen, hashable; separate from the run config)."""

  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  # Llama-3 style RoPE frequency scaling ("rope_type": "llama3"); factor 1.0 = none.
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2 has biases on q, k, v projections.
  tie_embeddings: bool = True  # Output projection reuses the input embedding.
  dtype: str = "float32"  # Compute dtype: "float32" or "bfloat16". Params stay fp32.
  remat: bool = False  # Rematerialize each block in the backward pass.

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def tiny(cls, vocab_size: int = 128, **overrides) -> ModelConfig:
    """~0.1M-0.2M parameters: trains on a 2-core CPU in minutes."""
    kwargs = dict(vocab_size=vocab_size, num_layers=2, embed_dim=64, num_heads=4,
                  num_kv_heads=2, head_dim=16, mlp_dim=192)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def small(cls, vocab_size: int = 512, **overrides) -> ModelConfig:
    """4 layers, width 256: the benchmark shape."""
    kwargs = dict(vocab_size=vocab_size, num_layers=4, embed_dim=256, num_heads=4,
                  num_kv_heads=4, head_dim=64, mlp_dim=1024)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def qwen2_5_0_5b(cls, **overrides) -> ModelConfig:
    """The exact shapes of Qwen2.5-0.5B (494,032,768 parameters)."""
    kwargs = dict(vocab_size=151_936, num_layers=24, embed_dim=896, num_heads=14,
                  num_kv_heads=2, head_dim=64, mlp_dim=4864, rope_theta=1_000_000.0,
                  norm_eps=1e-6, qkv_bias=True, tie_embeddings=True)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def llama3_2_1b(cls, **overrides) -> ModelConfig:
    """The exact shapes of Llama-3.2-1B (1,235,814,400 parameters)."""
    kwargs = dict(vocab_size=128_256, num_layers=16, embed_dim=2048, num_heads=32,
                  num_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500_000.0,
                  rope_scaling_factor=32.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_len=8192,
                  norm_eps=1e-5, qkv_bias=False, tie_embeddings=True)
    return cls(**{**kwargs, **overrides})

  @classmethod
  def named(cls, name: str, **overrides) -> ModelConfig:
    sizes = {"tiny": cls.tiny, "small": cls.small, "qwen2_5_0_5b": cls.qwen2_5_0_5b,
             "llama3_2_1b": cls.llama3_2_1b}
    if name not in sizes:
      raise ValueError(f"unknown model size {name!r}; expected one of {sorted(sizes)}")
    return sizes[name](**overrides)


def init_cache(config: ModelConfig, batch_size: int, cache_len: int) -> Cache:
  """An empty KV cache with `cache_len` slots per sequence."""
  # Head-major [B, K, S, H]: attention reads each head's keys contiguously, with no
  # transpose of the whole cache at every decode step.
  shape = (batch_size, config.num_kv_heads, cache_len, config.head_dim)
  layer = lambda: {"k": jnp.zeros(shape, config.compute_dtype),
                   "v": jnp.zeros(shape, config.compute_dtype)}
  return {
      "index": jnp.zeros((), jnp.int32),
      "segment_ids": jnp.zeros((batch_size, cache_len), jnp.int32),
      "layers": [layer() for _ in range(config.num_layers)],
  }


def _param(module, name, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


_kernel_init = nn.initializers.normal(stddev=0.02)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxI, w, w_transposed: bool):
  """x_MxI @ w_IxO (or @ w_OxI.T) with a hand-written backward pass.

  The weight gradient contracts the token dimension M of x and dy (`_tokens_contracted`).
  Left to autodiff, the einsum's weight gradient makes XLA:CPU fuse the preceding
  elementwise backward (SwiGLU, RoPE) into a strided transpose of the [M, O] activation
  gradient, which took about a third of the training step on CPU (see
  bench/train_speed.py); on GPU / TPU it is the same maths.
  """
  dims = ((1,), (1,)) if w_transposed else ((1,), (0,))
  return jax.lax.dot_general(x_MxI, w, (dims, ((), ())))


def _matmul_fwd(x_MxI, w, w_transposed):
  return _matmul(x_MxI, w, w_transposed), (x_MxI, w)


def _tokens_contracted(a_MxP, b_MxQ):
  """a^T b: [P, Q], contracting the token dimension M of both.

  The smaller operand is transposed into a [., M] copy first, so the product is a plain
  row-major GEMM. XLA:CPU hands those to its fast matmul library, while a dot that
  contracts the leading dimension of both operands falls back to a slower generic kernel
  (110 vs 180 GFLOP/s measured here). `optimization_barrier` keeps XLA from folding the
  transposes back into the dot.
  """
  barrier = jax.lax.optimization_barrier
  plain = (((1,), (0,)), ((), ()))
  if a_MxP.shape[1] <= b_MxQ.shape[1]:
    return jax.lax.dot_general(barrier(a_MxP.T), b_MxQ, plain)
  return barrier(jax.lax.dot_general(barrier(b_MxQ.T), a_MxP, plain)).T


def _matmul_bwd(w_transposed, residuals, dy_MxO):
  x_MxI, w = residuals
  if w_transposed:  # w is [O, I]: dx = dy @ w, dw = dy^T x.
    dx_MxI = jax.lax.dot_general(dy_MxO, w, (((1,), (0,)), ((), ())))
    dw = _tokens_contracted(dy_MxO, x_MxI)
  else:  # w is [I, O]: dx = dy @ w^T, dw = x^T dy.
    dx_MxI = jax.lax.dot_general(dy_MxO, w, (((1,), (1,)), ((), ())))
    dw = _tokens_contracted(x_MxI, dy_MxO)
  return dx_MxI.astype(x_MxI.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x, w, num_in: int = 1, w_transposed: bool = False):
  """Contract the last `num_in` axes of x with the first `num_in` axes of w.

  x[..., *in] @ w[*in, *out] -> [..., *out] (the einsum "btd,dnh->btnh" and friends),
  computed as one 2-D matmul; with `w_transposed`, w is [out, in] (a tied embedding used
  as the output projection) and no transposed copy of it is made.
  """
  if w_transposed:
    in_shape, out_shape = w.shape[1:], w.shape[:1]
  else:
    in_shape, out_shape = w.shape[:num_in], w.shape[num_in:]
  lead = x.shape[:x.ndim - num_in]
  size_in, size_out = math.prod(in_shape), math.prod(out_shape)
  w_2d = w.reshape((size_out, size_in) if w_transposed else (size_in, size_out))
  y_MxO = _matmul(x.reshape(-1, size_in), w_2d, w_transposed)
  return y_MxO.reshape(*lead, *out_shape)


@jax.custom_vjp
def swiglu(gate, up):
  """silu(gate) * up, with a backward pass that recomputes the sigmoid.

  Autodiff keeps sigmoid(gate) and silu(gate) as extra [tokens, mlp] residuals, which
  XLA:CPU writes out in separate passes over memory in the forward; here the forward is
  one fused pass and the backward one more, from `gate` and `up` alone.
  """
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
  # The barrier keeps XLA from merging this recomputation with the forward's (CSE),
  # which would make the forward write sigmoid(gate) and silu(gate) out after all.
  gate, up = jax.lax.optimization_barrier(residuals)
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  # d silu / d gate = sig + gate * sig * (1 - sig) = sig * (1 + gate * (1 - sig)).
  dgate = dh * up * sig * (1 + gate * (1 - sig))
  return dgate.astype(gate.dtype), (dh * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    scale_D = _param(self, "scale", nn.initializers.ones, (x_BxTxD.shape[-1],), ("norm",))
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(self.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2] of the rotary embedding, with Llama-3 scaling if set."""
  half = cfg.head_dim // 2
  inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  if cfg.rope_scaling_factor == 1.0:
    return inv_freq
  factor, low, high = (cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                       cfg.rope_high_freq_factor)
  wavelen = 2 * jnp.pi / inv_freq
  low_freq_wavelen = cfg.rope_original_max_len / low
  high_freq_wavelen = cfg.rope_original_max_len / high
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_BxT, inv_freq_H2):
  """(sin, cos) of the rotary angles, each [B, T, 1, H], sin with the sign of its half.

  Written out once (the barrier): left to fusion, XLA:CPU recomputes the sines and
  cosines inside every consumer, per head, which made RoPE's backward pass 4x slower.
  """
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H2
  sin, cos = jnp.sin(angles_BxTxH2), jnp.cos(angles_BxTxH2)
  sin_BxTxH, cos_BxTxH = jax.lax.optimization_barrier(
      (jnp.concatenate([-sin, sin], axis=-1), jnp.concatenate([cos, cos], axis=-1)))
  return sin_BxTxH[:, :, None], cos_BxTxH[:, :, None]


def apply_rope(x_BxTxNxH, sin_BxTx1xH, cos_BxTx1xH):
  """Rotary embedding, half-split convention (as in Llama / Qwen2 in transformers):
  [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], with the tables of `rope_tables`."""
  half = x_BxTxNxH.shape[-1] // 2
  x = x_BxTxNxH.astype(jnp.float32)
  rotated = jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)
  return (x * cos_BxTx1xH + rotated * sin_BxTx1xH).astype(x_BxTxNxH.dtype)


def causal_blocks(length: int) -> int:
  """How many query blocks `attend` splits a causal self-attention of `length` into:
  4 (or 2) blocks of at least 32 tokens. Block i reads key blocks 0..i only, which skips
  3/8 of the score matrix (all masked); smaller blocks make matmuls too small to pay."""
  for blocks in (4, 2):
    if length % blocks == 0 and length // blocks >= 32:
      return blocks
  return 1


def _attend_heads(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS):
  logits_BxKxGxTxS = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH,
                                k_BxKxSxH).astype(jnp.float32)
  logits_BxKxGxTxS *= q_BxKxGxTxH.shape[-1] ** -0.5
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, -1e30)
  probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(q_BxKxGxTxH.dtype)
  return jnp.einsum("bkgts,bksh->bkgth", probs_BxKxGxTxS, v_BxKxSxH)


def attend(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, num_blocks: int = 1):
  """Grouped-query softmax attention: softmax(q k^T / sqrt(H), masked) v -> [B, T, N, H].

  Query head n reads kv head n // G. Logits and softmax are in fp32; masked-out slots
  get -1e30 (a row with no allowed slot, e.g. padding, averages v uniformly: harmless,
  nothing reads it). `num_blocks` > 1 promises causal self-attention (S == T and
  `mask_BxTxS` only allows key slot <= query slot): query block i then attends over key
  blocks 0..i only (the same result; a padding row averages those blocks' v instead).
  """
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxKxSxH.shape[1]

  def heads_first(q_BxTxNxH):
    return q_BxTxNxH.reshape(B, -1, K, N // K, H).transpose(0, 2, 3, 1, 4)

  def heads_last(out_BxKxGxTxH):
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, -1, N, H)

  if num_blocks == 1:
    return heads_last(_attend_heads(heads_first(q_BxTxNxH), k_BxKxSxH, v_BxKxSxH,
                                    mask_BxTxS))
  size, outs = T // num_blocks, []
  for lo in range(0, T, size):  # Queries [lo, lo + size) see keys [0, lo + size).
    hi = lo + size
    outs.append(heads_last(_attend_heads(
        heads_first(q_BxTxNxH[:, lo:hi]), k_BxKxSxH[:, :, :hi], v_BxKxSxH[:, :, :hi],
        mask_BxTxS[:, lo:hi, :hi])))
  return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  config: ModelConfig
  fresh_cache: bool = False  # See `Transformer.__call__`.

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, q_segment_BxT, q_slot_BxT,
               k_segment_BxS, layer_cache):
    cfg = self.config
    D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    wq_DxNxH = _param(self, "q_kernel", _kernel_init, (D, N, H), ("embed", "q_heads", "head_dim"))
    wk_DxKxH = _param(self, "k_kernel", _kernel_init, (D, K, H), ("embed", "kv_heads", "head_dim"))
    wv_DxKxH = _param(self, "v_kernel", _kernel_init, (D, K, H), ("embed", "kv_heads", "head_dim"))
    wo_NxHxD = _param(self, "o_kernel", _kernel_init, (N, H, D), ("q_heads", "head_dim", "embed"))
    q_BxTxNxH = dense(x_BxTxD, wq_DxNxH.astype(dt))
    k_BxTxKxH = dense(x_BxTxD, wk_DxKxH.astype(dt))
    v_BxTxKxH = dense(x_BxTxD, wv_DxKxH.astype(dt))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxNxH += _param(self, "q_bias", zeros, (N, H), ("q_heads", "head_dim")).astype(dt)
      k_BxTxKxH += _param(self, "k_bias", zeros, (K, H), ("kv_heads", "head_dim")).astype(dt)
      v_BxTxKxH += _param(self, "v_bias", zeros, (K, H), ("kv_heads", "head_dim")).astype(dt)
    sin_cos = rope_tables(positions_BxT, rope_frequencies(cfg))  # Once for q and k.
    q_BxTxNxH = apply_rope(q_BxTxNxH, *sin_cos)
    k_BxTxKxH = apply_rope(k_BxTxKxH, *sin_cos)

    k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3)
    v_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3)
    if layer_cache is None:  # Keys are the input tokens themselves.
      k_BxKxSxH, v_BxKxSxH, new_cache = k_BxKxTxH, v_BxKxTxH, None
    elif self.fresh_cache:  # Empty cache: attend over the inputs, store them at slot 0.
      k_BxKxSxH, v_BxKxSxH = k_BxKxTxH, v_BxKxTxH
      new_cache = {name: jax.lax.dynamic_update_slice(
          layer_cache[name], new.astype(layer_cache[name].dtype), (0, 0, 0, 0))
                   for name, new in (("k", k_BxKxTxH), ("v", v_BxKxTxH))}
    else:  # Write the new keys at the cache index, then attend over all slots.
      index = q_slot_BxT[0, 0]
      k_BxKxSxH = jax.lax.dynamic_update_slice(
          layer_cache["k"], k_BxKxTxH.astype(layer_cache["k"].dtype), (0, 0, index, 0))
      v_BxKxSxH = jax.lax.dynamic_update_slice(
          layer_cache["v"], v_BxKxTxH.astype(layer_cache["v"].dtype), (0, 0, index, 0))
      new_cache = {"k": k_BxKxSxH, "v": v_BxKxSxH}

    S = k_BxKxSxH.shape[2]
    k_slot_S = jnp.arange(S)
    mask_BxTxS = ((k_slot_S[None, None, :] <= q_slot_BxT[:, :, None])
                  & (k_segment_BxS[:, None, :] == q_segment_BxT[:, :, None])
                  & (k_segment_BxS[:, None, :] != 0))
    self_attention = layer_cache is None or self.fresh_cache  # Causal over the inputs.
    out_BxTxNxH = attend(q_BxTxNxH, k_BxKxSxH.astype(dt), v_BxKxSxH.astype(dt), mask_BxTxS,
                         causal_blocks(S) if self_attention else 1)
    out_BxTxD = dense(out_BxTxNxH, wo_NxHxD.astype(dt), num_in=2)
    return out_BxTxD, new_cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    dt = cfg.compute_dtype
    D, F = cfg.embed_dim, cfg.mlp_dim
    gate_DxF = _param(self, "gate_kernel", _kernel_init, (D, F), ("embed", "mlp"))
    up_DxF = _param(self, "up_kernel", _kernel_init, (D, F), ("embed", "mlp"))
    down_FxD = _param(self, "down_kernel", _kernel_init, (F, D), ("mlp", "embed"))
    gate_BxTxF = dense(x_BxTxD, gate_DxF.astype(dt))
    up_BxTxF = dense(x_BxTxD, up_DxF.astype(dt))
    h_BxTxF = nn.with_logical_constraint(swiglu(gate_BxTxF, up_BxTxF),
                                         ("batch", "length", "activation_mlp"))
    return dense(h_BxTxF, down_FxD.astype(dt))


class Block(nn.Module):
  config: ModelConfig
  fresh_cache: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, q_segment_BxT, q_slot_BxT, k_segment_BxS,
               layer_cache):
    cfg = self.config
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x_BxTxD)
    h, new_cache = Attention(cfg, self.fresh_cache, name="attn")(
        h, positions_BxT, q_segment_BxT, q_slot_BxT, k_segment_BxS, layer_cache)
    x_BxTxD = x_BxTxD + h
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(h)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "activation_embed"))
    return x_BxTxD, new_cache


class Transformer(nn.Module):
  """Returns `(logits_BxTxV in fp32, new_cache or None)`; with `hidden=True`, the final
  normed hidden states `x_BxTxD` (fp32) instead of logits (same parameters)."""

  config: ModelConfig
  hidden: bool = False

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT=None, cache=None,
               fresh_cache: bool = False, logits_index_B=None):
    """`fresh_cache=True` promises an empty `cache` (index 0), as in a sampler's prefill:
    queries then attend over the T input tokens only (not all the cache's slots) and
    their keys are stored in slots [0, T). `logits_index_B` (int32 [B]) computes the
    logits at that one position per row only: [B, 1, V] (a prefill needs no others)."""
    cfg = self.config
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(tokens_BxT)
    embedding_VxD = _param(self, "embedding", _kernel_init,
                           (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"))
    x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(cfg.compute_dtype)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "activation_embed"))

    T = tokens_BxT.shape[1]
    if fresh_cache and cache is None:
      raise ValueError("fresh_cache=True needs a cache to fill")
    if cache is None or fresh_cache:
      q_slot_BxT = jnp.broadcast_to(jnp.arange(T)[None], tokens_BxT.shape)
      k_segment_BxS = segment_ids_BxT
    else:
      index = cache["index"]
      q_slot_BxT = jnp.broadcast_to(index + jnp.arange(T)[None], tokens_BxT.shape)
      k_segment_BxS = jax.lax.dynamic_update_slice(
          cache["segment_ids"], segment_ids_BxT.astype(jnp.int32), (0, index))

    block_cls = nn.remat(Block) if cfg.remat else Block
    new_layers = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BxTxD, new_layer = block_cls(cfg, fresh_cache, name=f"layer_{i}")(
          x_BxTxD, positions_BxT, segment_ids_BxT, q_slot_BxT, k_segment_BxS, layer_cache)
      new_layers.append(new_layer)
    if logits_index_B is not None:
      x_BxTxD = jnp.take_along_axis(x_BxTxD, logits_index_B[:, None, None], axis=1)
    x_BxTxD = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x_BxTxD)

    if not cfg.tie_embeddings:  # Declared even with `hidden`: one tree for both uses.
      out_DxV = _param(self, "lm_head", _kernel_init, (cfg.embed_dim, cfg.vocab_size),
                       ("embed", "vocab"))
    if self.hidden:
      return x_BxTxD.astype(jnp.float32), None
    if cfg.tie_embeddings:  # [V, D], used transposed without a copy.
      logits_BxTxV = dense(x_BxTxD, embedding_VxD.astype(cfg.compute_dtype),
                           w_transposed=True)
    else:
      logits_BxTxV = dense(x_BxTxD, out_DxV.astype(cfg.compute_dtype))
    logits_BxTxV = nn.with_logical_constraint(
        logits_BxTxV.astype(jnp.float32), ("batch", "length", "activation_vocab"))

    if cache is None:
      return logits_BxTxV, None
    if fresh_cache:
      k_segment_BxS = jax.lax.dynamic_update_slice(
          cache["segment_ids"], segment_ids_BxT.astype(jnp.int32), (0, 0))
    new_cache = {"index": cache["index"] + T, "segment_ids": k_segment_BxS,
                 "layers": new_layers}
    return logits_BxTxV, new_cache


class ValueModel(nn.Module):
  """A critic for PPO: the transformer trunk, then a scalar head, V_BxT in fp32.

  Its `trunk` has the policy's parameter tree, so it can start from the policy's weights.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT=None):
    x_BxTxD, _ = Transformer(self.config, hidden=True, name="trunk")(
        tokens_BxT, positions_BxT, segment_ids_BxT)
    head_D = _param(self, "head", nn.initializers.zeros, (self.config.embed_dim,),
                    ("embed",))
    return jnp.einsum("btd,d->bt", x_BxTxD, head_D)


def init_value_params(config: ModelConfig, rng: jax.Array) -> Any:
  """Boxed critic parameters: {"trunk": <policy-shaped tree>, "head": [D]}."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return ValueModel(config).init(rng, tokens, tokens)["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> Any:
  """Boxed (logically partitioned) parameters; use `nn.unbox` for plain arrays."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(config).init(rng, tokens, tokens)["params"]


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(params)))
