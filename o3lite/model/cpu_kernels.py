"""XLA:CPU kernels: the tricks that make the training step fast on a CPU, in one place,
behind one switch.

The model calls `einsum`, `swiglu`, `rope_tables` and `causal_blocks` from here. With
`ModelConfig.kernels` = "plain" they are what they say: `jnp.einsum`, silu(gate) * up,
sin / cos tables, one attention block: the maths a newcomer reads, and what runs on GPU
and TPU. With "xla_cpu" (what "auto", the default, picks when JAX's backend is the CPU)
the same values come from forms XLA:CPU runs faster (bench/train_speed.py, README
"Train step speed"):

* projections as one 2-D matmul with a hand-written backward pass, whose weight
  gradient is a plain row-major GEMM (one transposed copy of the smaller operand): a dot
  contracting the leading dimension of both operands ran on XLA:CPU's generic kernel at
  110 GFLOP/s against 180 for the library GEMM;
* SwiGLU with a backward pass that recomputes the sigmoid (the forward is one pass);
* RoPE tables written out once (`optimization_barrier`): left to fusion, XLA:CPU
  recomputed the sines in every consumer, per head;
* causal self-attention in 4 (or 2) query blocks, block i reading key blocks 0..i only.
  Only with the model's own causal mask: a mask given by the caller
  (`Transformer(...)(..., mask_BxTxS=...)`, e.g. thoughts that see their own prefix
  only) may let a query see later keys, and nothing at trace time proves it does not,
  so `causal_blocks` then answers one block over all keys (and so does the cached path,
  whose keys are the cache's slots).

tests/test_model.py checks that both paths give the same values and gradients.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("auto", "xla_cpu", "plain")


def active(mode: str) -> bool:
  """Whether a model config's `kernels` mode uses the XLA:CPU forms (read at trace
  time; the mode is part of the frozen config, so compiled functions key on it)."""
  if mode == "auto":
    return jax.default_backend() == "cpu"
  return mode == "xla_cpu"


# ---------------------------------------------------------------------------------------
# Projections.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxI, w, w_transposed: bool):
  """x_MxI @ w_IxO (or @ w_OxI.T) with the hand-written backward pass below."""
  dims = ((1,), (1,)) if w_transposed else ((1,), (0,))
  return jax.lax.dot_general(x_MxI, w, (dims, ((), ())))


def _matmul_fwd(x_MxI, w, w_transposed):
  return _matmul(x_MxI, w, w_transposed), (x_MxI, w)


def _tokens_contracted(a_MxP, b_MxQ):
  """a^T b: [P, Q], contracting the token dimension M of both, as a plain row-major GEMM:
  the smaller operand is transposed into a [., M] copy first. `optimization_barrier`
  keeps XLA from folding the transposes back into the dot."""
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


def _parse(spec: str) -> tuple[int, bool] | None:
  """(contracted axes, weight transposed) of a projection einsum "x,w->y" that
  contracts the last axes of x with the first (or, for one axis, the last) of w and
  keeps the rest in order; None for any other einsum."""
  inputs, out = spec.replace(" ", "").split("->")
  x, w = inputs.split(",")
  contracted = "".join(c for c in x if c in w and c not in out)
  n = len(contracted)
  if not n or not x.endswith(contracted) or "." in x:
    return None
  lead = x[:-n]
  if w.startswith(contracted) and out == lead + w[n:]:
    return n, False
  if n == 1 and w.endswith(contracted) and out == lead + w[:-1] and len(w) == 2:
    return n, True
  return None


def einsum(spec: str, x, w, mode: str):
  """A projection `jnp.einsum(spec, x, w)` ("btd,dnh->btnh", "btnh,nhd->btd",
  "btd,vd->btv"); on XLA:CPU one 2-D `_matmul` with the fast backward pass."""
  parsed = _parse(spec) if active(mode) else None
  if parsed is None:
    return jnp.einsum(spec, x, w)
  num_in, w_transposed = parsed
  if w_transposed:
    in_shape, out_shape = w.shape[1:], w.shape[:1]
  else:
    in_shape, out_shape = w.shape[:num_in], w.shape[num_in:]
  lead = x.shape[:x.ndim - num_in]
  size_in, size_out = math.prod(in_shape), math.prod(out_shape)
  w_2d = w.reshape((size_out, size_in) if w_transposed else (size_in, size_out))
  y_MxO = _matmul(x.reshape(-1, size_in), w_2d, w_transposed)
  return y_MxO.reshape(*lead, *out_shape)


# ---------------------------------------------------------------------------------------
# SwiGLU.


@jax.custom_vjp
def _swiglu_recomputed(gate, up):
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return _swiglu_recomputed(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
  # The barrier keeps XLA from merging this recomputation with the forward's (CSE),
  # which would make the forward write sigmoid(gate) and silu(gate) out after all.
  gate, up = jax.lax.optimization_barrier(residuals)
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  # d silu / d gate = sig + gate * sig * (1 - sig) = sig * (1 + gate * (1 - sig)).
  dgate = dh * up * sig * (1 + gate * (1 - sig))
  return dgate.astype(gate.dtype), (dh * silu).astype(up.dtype)


_swiglu_recomputed.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(gate, up, mode: str):
  """silu(gate) * up."""
  return _swiglu_recomputed(gate, up) if active(mode) else nn.silu(gate) * up


# ---------------------------------------------------------------------------------------
# RoPE tables and causal attention blocks.


def rope_tables(positions_BxT, inv_freq_H2, mode: str):
  """(sin, cos) of the rotary angles, each [B, T, 1, H] (each frequency twice: the
  half-split layout). On XLA:CPU the sin table carries the sign of its half (see
  `apply_rope`) and both are written out once, behind a barrier."""
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H2
  sin, cos = jnp.sin(angles_BxTxH2), jnp.cos(angles_BxTxH2)
  cos_BxTxH = jnp.concatenate([cos, cos], axis=-1)
  if not active(mode):
    return jnp.concatenate([sin, sin], axis=-1)[:, :, None], cos_BxTxH[:, :, None]
  sin_BxTxH, cos_BxTxH = jax.lax.optimization_barrier(
      (jnp.concatenate([-sin, sin], axis=-1), cos_BxTxH))
  return sin_BxTxH[:, :, None], cos_BxTxH[:, :, None]


def apply_rope(x_BxTxNxH, sin_BxTx1xH, cos_BxTx1xH, mode: str):
  """Rotary embedding, half-split convention (as Llama / Qwen2 in transformers):
  [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] = x cos + rotate_half(x) sin, with
  rotate_half(x) = [-x2, x1]; on XLA:CPU the minus sits in the sin table instead."""
  half = x_BxTxNxH.shape[-1] // 2
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  rotated = jnp.concatenate([x2, x1] if active(mode) else [-x2, x1], axis=-1)
  return (x * cos_BxTx1xH + rotated * sin_BxTx1xH).astype(x_BxTxNxH.dtype)


def causal_blocks(length: int, mode: str, custom_mask: bool = False) -> int:
  """Query blocks for a self-attention of `length` under the model's default causal mask:
  on XLA:CPU 4 (or 2) blocks of at least 32 tokens (block i reads key blocks 0..i only,
  skipping 3/8 of the score matrix, all masked); 1 otherwise, and 1 for a `custom_mask`
  (the caller's own, not known to be causal: every query block reads every key)."""
  if custom_mask or not active(mode):
    return 1
  for blocks in (4, 2):
    if length % blocks == 0 and length // blocks >= 32:
      return blocks
  return 1
