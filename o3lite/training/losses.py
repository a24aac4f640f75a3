"""Training losses, registered by name: every stage's objective plugs into one train step.

A loss is built by its registered factory from the model config and its options, and is
then a pure function

  loss_fn(params, frozen, batch) -> LossSums(loss_sum, count, metrics)

of the trainable parameters (a dict of named trees: "policy", and "critic" or other heads
where a stage has them), the frozen ones ("reference", ...) and one (micro)batch. It
returns *sums*: the step adds them over microbatches and divides once, so gradient
accumulation gives the update one big batch would. `metrics` maps a name to a
(sum, count) pair, averaged the same way.

  LOSSES["sft_cross_entropy"](model_cfg)            completion-only next-token NLL
  (o3lite.rl.learner registers "ppo_actor_critic" for PPO / GRPO; o3lite.verifiers.reward_model
  registers "verifier_bce" and "verifier_bradley_terry"; later stages add theirs.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from o3lite.model import cpu_kernels
from o3lite.model import transformer as model_lib
from o3lite.registry import Registry

Batch = dict[str, jax.Array]
LOSSES = Registry("loss")  # name -> factory `(model_cfg, **options) -> loss_fn`.
register_loss = LOSSES.register


@dataclasses.dataclass(frozen=True)
class LossSums:
  loss_sum: jax.Array  # Scalar: the loss summed over what `count` counts.
  count: jax.Array  # Scalar: tokens (or sequences) the loss is averaged over.
  metrics: dict[str, tuple[jax.Array, jax.Array]]  # name -> (sum, count).


jax.tree_util.register_dataclass(LossSums, data_fields=["loss_sum", "count", "metrics"],
                                 meta_fields=[])


def get_loss(name: str, model_cfg: model_lib.ModelConfig, **options) -> Callable:
  """The loss registered as `name`, built for `model_cfg` with `options`."""
  return LOSSES.lookup(name)(model_cfg, **options)


def chunked_token_logprobs(x_BxTxD: jax.Array, w_out: jax.Array, targets_BxT: jax.Array,
                           transposed: bool, chunk: int = 0, with_entropy: bool = False,
                           temperature: float = 1.0, kernels: str = "plain"):
  """log softmax(x W / temperature)[target] per token, [B, T] fp32, and the entropy of
  that distribution if asked, without materializing the [B, T, V] log-softmax.

  `w_out` is the output projection: [V, D] if `transposed` (a tied embedding), else
  [D, V]. The target's logit is x . w_target (one gathered row per token); log Z is an
  online log-sum-exp over vocabulary chunks of `chunk` columns, each chunk's logits
  recomputed in the backward pass (`jax.checkpoint`), so memory holds [B, T, chunk] at a
  time (chunk 0 or >= V: one plain pass over [B, T, V], for small vocabularies). Entropy
  H = log Z - E_p[logit] uses the same pass.
  """
  w_VxD = w_out if transposed else w_out.T
  V = w_VxD.shape[0]
  x = x_BxTxD.astype(jnp.float32)
  w_VxD = w_VxD.astype(x_BxTxD.dtype)
  rows_BxTxD = nn.with_logical_constraint(  # Laid out like x (batch-sharded), not like w.
      jnp.take(w_VxD, targets_BxT, axis=0).astype(jnp.float32),
      ("batch", "length", "activation_embed"))
  target_logit_BxT = jnp.einsum("btd,btd->bt", x, rows_BxTxD)
  target_logit_BxT = target_logit_BxT / temperature
  if chunk <= 0 or chunk >= V:  # One chunk: the plain log-softmax, nothing recomputed.
    logits_BxTxV = cpu_kernels.einsum("btd,vd->btv", x_BxTxD.astype(w_VxD.dtype), w_VxD,
                                      kernels).astype(jnp.float32) / temperature
    log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    entropy_BxT = None
    if with_entropy:
      p_BxTxV = jnp.exp(logits_BxTxV - log_z_BxT[..., None])
      entropy_BxT = log_z_BxT - jnp.sum(p_BxTxV * logits_BxTxV, axis=-1)
    return target_logit_BxT - log_z_BxT, entropy_BxT
  num_chunks = -(-V // chunk)
  pad = num_chunks * chunk - V
  w_CxKxD = jnp.pad(w_VxD, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
  valid_CxK = (jnp.arange(num_chunks * chunk) < V).reshape(num_chunks, chunk)

  @jax.checkpoint
  def body(carry, xs):
    m_BxT, s_BxT, t_BxT = carry
    w_KxD, valid_K = xs
    logits_BxTxK = cpu_kernels.einsum("btd,kd->btk", x_BxTxD.astype(w_KxD.dtype), w_KxD,
                                      kernels).astype(jnp.float32) / temperature
    logits_BxTxK = jnp.where(valid_K, logits_BxTxK, -jnp.inf)
    m_new = jnp.maximum(m_BxT, jnp.max(logits_BxTxK, axis=-1))
    scale = jnp.exp(m_BxT - m_new)
    e_BxTxK = jnp.exp(logits_BxTxK - m_new[..., None])
    s_new = s_BxT * scale + jnp.sum(e_BxTxK, axis=-1)
    t_new = t_BxT * scale
    if with_entropy:
      t_new = t_new + jnp.sum(e_BxTxK * jnp.where(valid_K, logits_BxTxK, 0.0), axis=-1)
    return (m_new, s_new, t_new), None

  B, T = targets_BxT.shape
  init = (jnp.full((B, T), -jnp.inf), jnp.zeros((B, T)), jnp.zeros((B, T)))
  (m_BxT, s_BxT, t_BxT), _ = jax.lax.scan(body, init, (w_CxKxD, valid_CxK))
  log_z_BxT = m_BxT + jnp.log(s_BxT)
  logp_BxT = target_logit_BxT - log_z_BxT
  entropy_BxT = (log_z_BxT - t_BxT / s_BxT) if with_entropy else None
  return logp_BxT, entropy_BxT


def policy_token_logprobs(params, batch: Batch, model_cfg: model_lib.ModelConfig,
                          chunk: int = 0, with_entropy: bool = False,
                          temperature: float = 1.0):
  """(log pi(target_t | inputs_<=t) [B, T], entropy [B, T] or None) of a policy tree,
  at `temperature` (the distribution the sampler draws from), vocabulary-chunked."""
  x_BxTxD, _ = model_lib.Transformer(model_cfg, hidden=True).apply(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  if model_cfg.tie_embeddings:
    w_out, transposed = params["embedding"], True
  else:
    w_out, transposed = params["lm_head"], False
  return chunked_token_logprobs(x_BxTxD.astype(model_cfg.compute_dtype), w_out,
                                batch["targets"], transposed, chunk, with_entropy,
                                temperature, model_cfg.kernels)


@register_loss("sft_cross_entropy")
def sft_cross_entropy(model_cfg: model_lib.ModelConfig, vocab_chunk: int = 0) -> Callable:
  """Completion-only next-token cross-entropy (SFT on prompt -> chain -> answer):

    L = sum_{t: loss_mask_t = 1} -log p(target_t | inputs_<=t) / sum_t loss_mask_t

  The batch has `inputs`, `targets`, `positions`, `segment_ids` (packing) and
  `loss_mask` (1 on completion tokens), all [B, T]. Metric: token accuracy (greedy
  argmax equals the target) on the same tokens.
  """
  model = model_lib.Transformer(model_cfg)

  def loss_fn(params, frozen, batch: Batch) -> LossSums:
    del frozen
    mask_BxT = batch["loss_mask"]
    if vocab_chunk:  # The big-vocabulary path: no [B, T, V] log-softmax.
      logp_BxT, _ = policy_token_logprobs(params["policy"], batch, model_cfg, vocab_chunk)
      nll_BxT, correct = -logp_BxT, None  # No argmax without the full logits.
    else:
      logits_BxTxV, _ = model.apply({"params": params["policy"]}, batch["inputs"],
                                    batch["positions"], batch["segment_ids"])
      nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV,
                                                                batch["targets"])
      correct = jnp.sum((jnp.argmax(logits_BxTxV, axis=-1) == batch["targets"]) * mask_BxT)
    count = jnp.sum(mask_BxT)
    metrics = {} if correct is None else {
        "token_accuracy": (correct.astype(jnp.float32), count)}
    return LossSums(jnp.sum(nll_BxT * mask_BxT), count, metrics)

  return loss_fn
