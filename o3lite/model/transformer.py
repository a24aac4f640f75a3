"""Decoder-only transformer of the Llama / Qwen2 family, in pure-functional Flax.

Parameters are a plain pytree; `Transformer(config).apply({"params": p}, ...)` is a
pure function. RMSNorm, rotary embeddings (configurable theta), SwiGLU MLP, grouped-query
attention, optional QKV bias (Qwen2), tied or untied embeddings. Heads on the trunk (the
PPO critic, reward models) are in `heads.py`. Projections are einsums; on the CPU
backend `cpu_kernels.py` computes them (and SwiGLU, RoPE, causal attention) in forms
XLA:CPU runs faster, with the same values (`ModelConfig.kernels`).

The KV cache is an explicit pytree passed in and returned (never module state):

  cache = {
    "end_index": int32[B],                 # each row's next slot to write (gemma's end_index)
    "segment_ids": int32[B, S],            # 0 = empty slot, else the token's segment id
    "layers": [{"k": [B, K, S, H], "v": [B, K, S, H]}, ...],  # head-major
  }

One attention path serves training (no cache: keys are the T input tokens, with packing
segments) and cached prefill / decode (keys are the S cache slots). By default a query at
slot q may attend to key slot s iff s <= q and both carry the same non-zero segment id
(`default_mask`); a caller may pass its own mask [B, T, S] instead (e.g. Quiet-STaR's
thoughts, which see their own prefix only), and the model assumes nothing of it. Positions
are given by the caller, so right-padded prompts of different lengths keep correct positions.
The attention itself (`attend`, `attend_cache`) is in attention.py. Each row writes its T
new tokens at its own `end_index` and advances it by the number of them with a non-zero
segment id (right-padded input: its real tokens), so the rows of one
batch can be at different lengths: a sampler appends ragged continuations, forks rows, and
stopped rows stay where they are.

Shape letters: B batch, T query length, S key length, D embed, N query heads,
K kv heads, G = N / K, H head dim, F mlp hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from o3lite import errors
from o3lite.model import cpu_kernels as kernels
from o3lite.model.attention import attend, attend_cache

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
  # How projections, SwiGLU, RoPE tables and causal attention are computed: "plain"
  # (einsums: what a newcomer reads; GPU, TPU), "xla_cpu" (the forms XLA:CPU runs
  # faster, same values: cpu_kernels.py), "auto" = xla_cpu on the CPU backend.
  kernels: str = "auto"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise errors.ConfigError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise errors.ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.dtype not in ("float32", "bfloat16"):
      raise errors.ConfigError(f"dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
    if self.kernels not in kernels.MODES:
      raise errors.ConfigError(f"kernels={self.kernels!r}: expected one of {kernels.MODES}")

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
      raise errors.ConfigError(f"unknown model size {name!r}; expected one of {sorted(sizes)}")
    return sizes[name](**overrides)


def init_cache(config: ModelConfig, batch_size: int, cache_len: int) -> Cache:
  """An empty KV cache with `cache_len` slots per sequence."""
  # Head-major [B, K, S, H]: attention reads each head's keys contiguously, with no
  # transpose of the whole cache at every decode step.
  shape = (batch_size, config.num_kv_heads, cache_len, config.head_dim)
  layer = lambda: {"k": jnp.zeros(shape, config.compute_dtype),
                   "v": jnp.zeros(shape, config.compute_dtype)}
  return {
      "end_index": jnp.zeros((batch_size,), jnp.int32),
      "segment_ids": jnp.zeros((batch_size, cache_len), jnp.int32),
      "layers": [layer() for _ in range(config.num_layers)],
  }


def write_rows(cache_Bx___, new_Bx___, start_B, axis: int = 0):
  """Writes row b of `new` into row b of `cache` at offset start_B[b] along `axis` (of
  the row, i.e. without the batch dimension). The caller keeps start + length within
  the cache: XLA clamps a write that would run past the end."""
  def one_row(cache_row, new_row, start):
    offsets = [0] * cache_row.ndim
    offsets[axis] = start
    return jax.lax.dynamic_update_slice(cache_row, new_row.astype(cache_row.dtype), offsets)
  return jax.vmap(one_row)(cache_Bx___, new_Bx___, start_B)


def _slots(segment_ids_BxT, cache, fresh_cache):
  """(q_slot_BxT, k_segment_BxS): the queries' slots, the keys' (inputs or cache) segments."""
  B, T = segment_ids_BxT.shape
  if cache is None or fresh_cache:
    return jnp.broadcast_to(jnp.arange(T)[None], (B, T)), segment_ids_BxT
  end_B = cache["end_index"]
  q_slot_BxT = end_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  return q_slot_BxT, write_rows(cache["segment_ids"], segment_ids_BxT.astype(jnp.int32), end_B)


def default_mask(segment_ids_BxT, cache=None, fresh_cache: bool = False):
  """The mask the model builds when given none: bool [B, T, S], True where query t may see
  key slot s (s <= t's slot, same non-zero segment id); S = T without a cache or with
  `fresh_cache`, else the cache's slots. Start from it to build a custom mask."""
  q_slot_BxT, k_segment_BxS = _slots(segment_ids_BxT, cache, fresh_cache)
  k_slot_S = jnp.arange(k_segment_BxS.shape[1])
  return ((k_slot_S[None, None, :] <= q_slot_BxT[:, :, None])
          & (k_segment_BxS[:, None, :] == segment_ids_BxT[:, :, None])
          & (k_segment_BxS[:, None, :] != 0))


def param(module, name, init, shape, axes):
  """An fp32 parameter with logical axis names (the one place sharding comes from)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


_kernel_init = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    scale_D = param(self, "scale", nn.initializers.ones, (x_BxTxD.shape[-1],), ("norm",))
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


class Attention(nn.Module):
  config: ModelConfig
  fresh_cache: bool = False  # See `Transformer.__call__`.
  num_blocks: int = 1  # Query blocks of `attend`: > 1 only for the default causal mask.
  cache_chunk: int = 0  # See `Transformer.cache_chunk`.

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, q_slot_BxT, mask_BxTxS, layer_cache):
    cfg = self.config
    D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    wq_DxNxH = param(self, "q_kernel", _kernel_init, (D, N, H), ("embed", "q_heads", "head_dim"))
    wk_DxKxH = param(self, "k_kernel", _kernel_init, (D, K, H), ("embed", "kv_heads", "head_dim"))
    wv_DxKxH = param(self, "v_kernel", _kernel_init, (D, K, H), ("embed", "kv_heads", "head_dim"))
    wo_NxHxD = param(self, "o_kernel", _kernel_init, (N, H, D), ("q_heads", "head_dim", "embed"))
    k_ = cfg.kernels
    q_BxTxNxH = kernels.einsum("btd,dnh->btnh", x_BxTxD, wq_DxNxH.astype(dt), k_)
    k_BxTxKxH = kernels.einsum("btd,dkh->btkh", x_BxTxD, wk_DxKxH.astype(dt), k_)
    v_BxTxKxH = kernels.einsum("btd,dkh->btkh", x_BxTxD, wv_DxKxH.astype(dt), k_)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxNxH += param(self, "q_bias", zeros, (N, H), ("q_heads", "head_dim")).astype(dt)
      k_BxTxKxH += param(self, "k_bias", zeros, (K, H), ("kv_heads", "head_dim")).astype(dt)
      v_BxTxKxH += param(self, "v_bias", zeros, (K, H), ("kv_heads", "head_dim")).astype(dt)
    sin_cos = kernels.rope_tables(positions_BxT, rope_frequencies(cfg), k_)  # q and k.
    q_BxTxNxH = kernels.apply_rope(q_BxTxNxH, *sin_cos, k_)
    k_BxTxKxH = kernels.apply_rope(k_BxTxKxH, *sin_cos, k_)

    k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3)
    v_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3)
    if layer_cache is None:  # Keys are the input tokens themselves.
      k_BxKxSxH, v_BxKxSxH, new_cache = k_BxKxTxH, v_BxKxTxH, None
    elif self.fresh_cache:  # Empty cache: attend over the inputs, store them at slot 0.
      k_BxKxSxH, v_BxKxSxH = k_BxKxTxH, v_BxKxTxH
      new_cache = {name: jax.lax.dynamic_update_slice(
          layer_cache[name], new.astype(layer_cache[name].dtype), (0, 0, 0, 0))
                   for name, new in (("k", k_BxKxTxH), ("v", v_BxKxTxH))}
    else:  # Write the new keys at each row's end index, then attend over all slots.
      start_B = q_slot_BxT[:, 0]
      k_BxKxSxH = write_rows(layer_cache["k"], k_BxKxTxH, start_B, axis=1)
      v_BxKxSxH = write_rows(layer_cache["v"], v_BxKxTxH, start_B, axis=1)
      new_cache = {"k": k_BxKxSxH, "v": v_BxKxSxH}

    S = k_BxKxSxH.shape[2]
    chunk = self.cache_chunk
    if layer_cache is not None and not self.fresh_cache and chunk and S > chunk \
        and S % chunk == 0:  # Only the chunks up to the longest row's last new token.
      out_BxTxNxH = attend_cache(q_BxTxNxH, k_BxKxSxH.astype(dt), v_BxKxSxH.astype(dt),
                                 mask_BxTxS, chunk, jnp.max(q_slot_BxT) + 1)
    else:
      out_BxTxNxH = attend(q_BxTxNxH, k_BxKxSxH.astype(dt), v_BxKxSxH.astype(dt),
                           mask_BxTxS, self.num_blocks)
    out_BxTxD = kernels.einsum("btnh,nhd->btd", out_BxTxNxH, wo_NxHxD.astype(dt), k_)
    return out_BxTxD, new_cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    dt = cfg.compute_dtype
    D, F = cfg.embed_dim, cfg.mlp_dim
    gate_DxF = param(self, "gate_kernel", _kernel_init, (D, F), ("embed", "mlp"))
    up_DxF = param(self, "up_kernel", _kernel_init, (D, F), ("embed", "mlp"))
    down_FxD = param(self, "down_kernel", _kernel_init, (F, D), ("mlp", "embed"))
    gate_BxTxF = kernels.einsum("btd,df->btf", x_BxTxD, gate_DxF.astype(dt), cfg.kernels)
    up_BxTxF = kernels.einsum("btd,df->btf", x_BxTxD, up_DxF.astype(dt), cfg.kernels)
    h_BxTxF = nn.with_logical_constraint(kernels.swiglu(gate_BxTxF, up_BxTxF, cfg.kernels),
                                         ("batch", "length", "activation_mlp"))
    return kernels.einsum("btf,fd->btd", h_BxTxF, down_FxD.astype(dt), cfg.kernels)


class Block(nn.Module):
  config: ModelConfig
  fresh_cache: bool = False
  num_blocks: int = 1
  cache_chunk: int = 0

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, q_slot_BxT, mask_BxTxS, layer_cache):
    cfg = self.config
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x_BxTxD)
    h, new_cache = Attention(cfg, self.fresh_cache, self.num_blocks, self.cache_chunk,
                             name="attn")(
        h, positions_BxT, q_slot_BxT, mask_BxTxS, layer_cache)
    x_BxTxD = x_BxTxD + h
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(h)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "activation_embed"))
    return x_BxTxD, new_cache


class Transformer(nn.Module):
  """Returns `(logits_BxTxV in fp32, new_cache or None)`; with `hidden=True`, the final
  normed hidden states `x_BxTxD` (fp32) instead of logits (same parameters, same cache)."""

  config: ModelConfig
  hidden: bool = False
  # > 0: attention over a cache (not a fresh one) of more slots than this reads it this
  # many slots at a time, up to the last slot a query may see (`attend_cache`): a decode
  # step's cost follows the filled part of the cache. 0: all slots at once (`attend`).
  cache_chunk: int = 0

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT=None, cache=None,
               fresh_cache: bool = False, logits_index_B=None, mask_BxTxS=None):
    """With a cache, each row's T tokens go to slots [end_index, end_index + T) of its row
    (right-padded rows: padding carries segment id 0, is never attended, and the row's
    end index advances by its real tokens only, so later writes overwrite the padding).
    `fresh_cache=True` promises an empty `cache` (end index 0), as in a sampler's
    prefill: queries then attend over the T input tokens only (not all the cache's
    slots) and their keys are stored in slots [0, T). `logits_index_B` (int32 [B]) computes the
    logits at that one position per row only: [B, 1, V] (a prefill needs no others).
    `mask_BxTxS` (bool [B, T, S], as `default_mask` builds) replaces the default mask; the
    XLA:CPU kernels then attend over all keys in one block (nothing proves it causal)."""
    cfg = self.config
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(tokens_BxT)
    embedding_VxD = param(self, "embedding", _kernel_init,
                           (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"))
    x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(cfg.compute_dtype)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "activation_embed"))

    if fresh_cache and cache is None:
      raise ValueError("fresh_cache=True needs a cache to fill")
    q_slot_BxT, k_segment_BxS = _slots(segment_ids_BxT, cache, fresh_cache)
    custom_mask = mask_BxTxS is not None
    if not custom_mask:
      mask_BxTxS = default_mask(segment_ids_BxT, cache, fresh_cache)
    B, T, S = *tokens_BxT.shape, k_segment_BxS.shape[1]
    if mask_BxTxS.shape != (B, T, S):
      raise ValueError(f"mask_BxTxS has shape {mask_BxTxS.shape}, expected {(B, T, S)}")
    self_attention = cache is None or fresh_cache  # Keys are the T inputs.
    num_blocks = kernels.causal_blocks(T, cfg.kernels, custom_mask) if self_attention else 1

    block_cls = nn.remat(Block) if cfg.remat else Block
    new_layers = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BxTxD, new_layer = block_cls(cfg, fresh_cache, num_blocks, self.cache_chunk,
                                     name=f"layer_{i}")(
          x_BxTxD, positions_BxT, q_slot_BxT, mask_BxTxS, layer_cache)
      new_layers.append(new_layer)
    if logits_index_B is not None:
      x_BxTxD = jnp.take_along_axis(x_BxTxD, logits_index_B[:, None, None], axis=1)
    x_BxTxD = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x_BxTxD)

    if not cfg.tie_embeddings:  # Declared even with `hidden`: one tree for both uses.
      out_DxV = param(self, "lm_head", _kernel_init, (cfg.embed_dim, cfg.vocab_size),
                       ("embed", "vocab"))
    if self.hidden:
      out = x_BxTxD.astype(jnp.float32)
    else:  # Tied: the [V, D] embedding, used transposed without a copy.
      out = (kernels.einsum("btd,vd->btv", x_BxTxD, embedding_VxD.astype(cfg.compute_dtype),
                            cfg.kernels) if cfg.tie_embeddings else
             kernels.einsum("btd,dv->btv", x_BxTxD, out_DxV.astype(cfg.compute_dtype),
                            cfg.kernels))
      out = nn.with_logical_constraint(out.astype(jnp.float32),
                                       ("batch", "length", "activation_vocab"))

    if cache is None:
      return out, None
    if fresh_cache:
      k_segment_BxS = jax.lax.dynamic_update_slice(
          cache["segment_ids"], segment_ids_BxT.astype(jnp.int32), (0, 0))
    written_B = jnp.sum(segment_ids_BxT != 0, axis=1).astype(jnp.int32)
    end_B = written_B if fresh_cache else cache["end_index"] + written_B
    new_cache = {"end_index": end_B, "segment_ids": k_segment_BxS, "layers": new_layers}
    return out, new_cache


def init_params(config: ModelConfig, rng: jax.Array) -> Any:
  """Boxed (logically partitioned) parameters; use `nn.unbox` for plain arrays."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(config).init(rng, tokens, tokens)["params"]


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(params)))
