"""The one train step: `(state, batch) -> (state, metrics)` for any registered loss.

`make_train_step(loss_fn, tx, grad_accum_steps)` builds it; `jit_train_step` compiles it
once with explicit shardings and the state donated. SFT, PPO / GRPO (policy and critic
in one tree) and every later stage use this same step with their own loss.

Gradient accumulation scans over `grad_accum_steps` microbatches, adding the loss's sums,
counts and gradients of the sums, and divides once at the end, so accumulation gives the
same update as one big batch.

Non-finite steps: when the loss or the gradient is not finite, the update is not applied
(parameters and optimizer state are returned unchanged) and `metrics["nonfinite"]` is 1;
`state.step` still counts the step (the data moved on). The loop (`loop.fit`) stops a
run after too many in a row.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from o3lite.parallel import mesh as sharding_lib
from o3lite.training.losses import LossSums
from o3lite.training.state import TrainState

Batch = dict[str, jax.Array]


def _microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [A, B/A, ...] taking rows i::A, so each microbatch stays sharded along
  the batch axis exactly like the full batch."""
  return jax.tree_util.tree_map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn: Callable[[Any, Any, Batch], LossSums],
                    tx: optax.GradientTransformation,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, Batch], Any]:
  """The pure step `(state, batch) -> (state, metrics)` of `loss_fn` (see `losses`).

  Metrics (flat dict of scalars): `loss`, the loss's own metrics, `grad_norm`,
  `param_norm`, `update_norm`, `count` (what the loss averaged over) and `nonfinite`.
  """

  def sums_and_grads(params, frozen, batch):
    def summed(p):
      out = loss_fn(p, frozen, batch)
      return out.loss_sum, out
    (_, out), grads = jax.value_and_grad(summed, has_aux=True)(params)
    return out, grads

  def step(state: TrainState, batch: Batch):
    if grad_accum_steps == 1:
      out, grads = sums_and_grads(state.params, state.frozen, batch)
    else:
      def body(carry, micro):
        out, grads = sums_and_grads(state.params, state.frozen, micro)
        return jax.tree_util.tree_map(jnp.add, carry, (out, grads)), None

      first = jax.tree_util.tree_map(lambda x: x[0], _microbatches(batch, grad_accum_steps))
      zeros = jax.tree_util.tree_map(
          jnp.zeros_like, jax.eval_shape(sums_and_grads, state.params, state.frozen, first))
      (out, grads), _ = jax.lax.scan(body, zeros,
                                     _microbatches(batch, grad_accum_steps))
    count = jnp.maximum(out.count, 1.0)
    loss = out.loss_sum / count
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss,
               **{k: s / jnp.maximum(c, 1.0) for k, (s, c) in out.metrics.items()},
               "grad_norm": grad_norm, "param_norm": optax.global_norm(params),
               "update_norm": jnp.where(finite, optax.global_norm(updates), 0.0),
               "count": out.count, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if len(state.params) > 1:  # Per-tree norms where a state trains several (PPO).
      metrics.update({f"{name}_grad_norm": optax.global_norm(grads[name])
                      for name in state.params})
    return new_state, metrics

  return step


def jit_train_step(step_fn, state_shardings, batch_sharding, mesh, rules):
  """Compile once with explicit in / out shardings; the input state is donated.

  Calls run inside `activation_sharding`, so the model's activation hints apply when it
  traces.
  """
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

  def call(state: TrainState, batch: Batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return jitted(state, batch)

  call.jitted = jitted  # For `.lower(...)`: memory analysis, cost analysis.
  call.compile = _compile_for(jitted, mesh, rules)
  return call


def jit_eval_fn(fn, state_shardings, batch_sharding, mesh, rules):
  """`fn(state, batch) -> outputs` compiled once with the same shardings, no donation
  (scoring passes: RL's log-probs and values, eval losses)."""
  jitted = jax.jit(fn, in_shardings=(state_shardings, batch_sharding))

  def call(state: TrainState, batch: Batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return jitted(state, batch)

  call.jitted = jitted
  call.compile = _compile_for(jitted, mesh, rules)
  return call


def _compile_for(jitted, mesh, rules):
  """`compile(state, batch)`: the executable for abstract (ShapeDtypeStruct) arguments,
  traced as a call is; a later call with arrays of those shapes reuses it."""
  def compile_for(state, batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return jitted.lower(state, batch).compile()
  return compile_for
