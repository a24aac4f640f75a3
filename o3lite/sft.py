"""Supervised fine-tuning: completion-only cross-entropy and the pure train step.

`train_step(state, batch) -> (state, metrics)` is compiled once with explicit shardings
and a donated state (see `make_train_step`). Gradient accumulation scans over
`grad_accum_steps` microbatches; the loss is normalized by the completion tokens of the
whole batch, so accumulation gives the same update as one big batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from o3lite import model as model_lib
from o3lite import sharding as sharding_lib
from o3lite.train_state import TrainState

Batch = dict[str, jax.Array]


def token_losses(params, batch: Batch, model: model_lib.Transformer):
  """Per-token negative log-likelihood and correctness, both [B, T]."""
  logits_BxTxV, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
  correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == batch["targets"])
  return nll_BxT, correct_BxT.astype(jnp.float32)


def _sums(params, batch: Batch, model):
  """Masked sums of the loss and of correct tokens over a (micro)batch."""
  nll_BxT, correct_BxT = token_losses(params, batch, model)
  mask_BxT = batch["loss_mask"]
  return jnp.sum(nll_BxT * mask_BxT), jnp.sum(correct_BxT * mask_BxT)


def _global_norm(tree) -> jax.Array:
  return optax.global_norm(tree)


def make_train_step(model_cfg: model_lib.ModelConfig, tx: optax.GradientTransformation,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, Batch], Any]:
  """The pure SFT step `(state, batch) -> (state, metrics)`."""
  model = model_lib.Transformer(model_cfg)

  def step(state: TrainState, batch: Batch):
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def loss_fn(params, micro):
      loss_sum, correct_sum = _sums(params, micro, model)
      return loss_sum / num_tokens, correct_sum

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
      (loss, correct), grads = grad_fn(state.params, batch)
    else:
      # [B, ...] -> [A, B/A, ...] taking rows i::A, so each microbatch stays sharded
      # along the batch axis exactly like the full batch.
      micro = jax.tree_util.tree_map(
          lambda x: jnp.swapaxes(
              x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]),
              0, 1), batch)

      def body(carry, mb):
        loss_acc, correct_acc, grads_acc = carry
        (loss, correct), grads = grad_fn(state.params, mb)
        grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
        return (loss_acc + loss, correct_acc + correct, grads_acc), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      (loss, correct, grads), _ = jax.lax.scan(
          body, (jnp.zeros(()), jnp.zeros(()), zeros), micro)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {
        "loss": loss,
        "token_accuracy": correct / num_tokens,
        "grad_norm": _global_norm(grads),
        "param_norm": _global_norm(params),
        "update_norm": _global_norm(updates),
        "completion_tokens": num_tokens,
    }
    return new_state, metrics

  return step


def jit_train_step(step_fn, state_shardings, batch_sharding, mesh, rules):
  """Compile once with explicit in/out shardings; the input state is donated.

  Calls run inside `activation_sharding`, so the activation hints apply when it traces.
  """
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

  def call(state: TrainState, batch: Batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return jitted(state, batch)

  return call


def eval_loss(params, batch: Batch, model_cfg: model_lib.ModelConfig) -> jax.Array:
  """Mean completion-token loss of a batch (no update)."""
  loss_sum, _ = _sums(params, batch, model_lib.Transformer(model_cfg))
  return loss_sum / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
