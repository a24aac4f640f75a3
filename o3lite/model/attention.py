"""Grouped-query softmax attention over given keys and values: `attend` (all keys at
once; causal query blocks for XLA:CPU) and `attend_cache` (a KV cache read in chunks up
to its filled part, for decoding long chains). `transformer.Attention` projects the
queries, keys and values and chooses between them.

Shape letters as in transformer.py: B batch, T queries, S keys, N query heads, K kv
heads, G = N / K, H head dim, C a chunk of slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _heads_first(x_BxTxNxH, K: int):
  """[B, T, N, H] -> [B, K, G, T, H]: query head n reads kv head n // G."""
  B, T, N, H = x_BxTxNxH.shape
  return x_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)


def _heads_last(out_BxKxGxTxH):
  """[B, K, G, T, H] -> [B, T, N, H]."""
  B, K, G, T, H = out_BxKxGxTxH.shape
  return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


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
  T, K = q_BxTxNxH.shape[1], k_BxKxSxH.shape[1]
  if num_blocks == 1:
    return _heads_last(_attend_heads(_heads_first(q_BxTxNxH, K), k_BxKxSxH, v_BxKxSxH,
                                     mask_BxTxS))
  size, outs = T // num_blocks, []
  for lo in range(0, T, size):  # Queries [lo, lo + size) see keys [0, lo + size).
    hi = lo + size
    outs.append(_heads_last(_attend_heads(
        _heads_first(q_BxTxNxH[:, lo:hi], K), k_BxKxSxH[:, :, :hi], v_BxKxSxH[:, :, :hi],
        mask_BxTxS[:, lo:hi, :hi])))
  return jnp.concatenate(outs, axis=1)


def attend_cache(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, chunk: int, filled):
  """`attend` over the first `filled` (int32 scalar) slots of a cache, `chunk` slots at a
  time (S a multiple of it), with an online softmax (Milakov & Gimelshein 2018; flash-
  decoding): a running max, sum and weighted sum per query, rescaled as each chunk
  comes. One compiled loop whose trip count is ceil(filled / chunk), so a step reads the
  filled slots only, whatever the cache's size. Same values as `attend` (up to
  rounding) where no query may see a slot at or past `filled`."""
  B, T, N, H = q_BxTxNxH.shape
  K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
  G = N // K
  q_BxKxGxTxH = _heads_first(q_BxTxNxH, K)
  dt = q_BxTxNxH.dtype

  def one_chunk(c, carry):
    max_BxKxGxT, sum_BxKxGxT, acc_BxKxGxTxH = carry
    k_BxKxCxH = jax.lax.dynamic_slice_in_dim(k_BxKxSxH, c * chunk, chunk, axis=2)
    v_BxKxCxH = jax.lax.dynamic_slice_in_dim(v_BxKxSxH, c * chunk, chunk, axis=2)
    mask_BxTxC = jax.lax.dynamic_slice_in_dim(mask_BxTxS, c * chunk, chunk, axis=2)
    logits = jnp.einsum("bkgth,bkch->bkgtc", q_BxKxGxTxH, k_BxKxCxH).astype(jnp.float32)
    logits = jnp.where(mask_BxTxC[:, None, None], logits * H ** -0.5, -1e30)
    new_max = jnp.maximum(max_BxKxGxT, logits.max(-1))
    p_BxKxGxTxC = jnp.exp(logits - new_max[..., None])
    rescale = jnp.exp(max_BxKxGxT - new_max)
    acc = acc_BxKxGxTxH * rescale[..., None] + jnp.einsum(
        "bkgtc,bkch->bkgth", p_BxKxGxTxC.astype(dt), v_BxKxCxH).astype(jnp.float32)
    return new_max, sum_BxKxGxT * rescale + p_BxKxGxTxC.sum(-1), acc

  count = jnp.clip((filled + chunk - 1) // chunk, 1, S // chunk)
  init = (jnp.full((B, K, G, T), -1e30, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
          jnp.zeros((B, K, G, T, H), jnp.float32))
  _, total, acc = jax.lax.fori_loop(0, count, one_chunk, init)
  return _heads_last((acc / total[..., None]).astype(dt))
