"""The RL learner: one state pytree (policy, critic, frozen reference, optimizer states,
RNG), a jitted scoring pass and a pure, once-compiled update step.

The sampler (`o3lite.sampling`) reads `state.params`, the very arrays this module
updates, so there is no weight sync. The update step is
`(state, minibatch) -> (state, metrics)` with explicit shardings and the state donated.

Minibatch arrays, all [B, T] (rows are prompt + completion, left-aligned, padded):
  inputs, targets, positions, segment_ids   as in SFT
  mask         1 on targets the policy sampled (completion tokens, EOS included)
  old_logp     log-prob of each target under the policy that sampled (recomputed by the
               learner; the sampler's own are compared in the metrics)
  ref_logp     log-prob under the frozen reference policy
  advantages   per token
  returns, old_values   per token (critic only)
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from o3lite import algorithms as alg
from o3lite import model as model_lib
from o3lite import sharding as sharding_lib
from o3lite import train_state as train_state_lib

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class RLState:
  step: jax.Array
  params: Any  # The policy: what the sampler reads.
  opt_state: Any
  value_params: Any  # The critic ({} without one).
  value_opt_state: Any
  ref_params: Any  # The frozen reference policy (KL anchor).
  rng: jax.Array


def _boxed_state(model_cfg, tx, value_tx, use_critic: bool, policy=None):
  """An RLState of boxed (logically partitioned) values, for its shapes and shardings."""
  params = model_lib.init_params(model_cfg, jax.random.PRNGKey(0)) if policy is None \
      else policy
  value_params, value_opt = {}, {}
  if use_critic:
    value_params = model_lib.init_value_params(model_cfg, jax.random.PRNGKey(1))
    value_opt = value_tx.init(value_params)
  return RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                 value_params=value_params, value_opt_state=value_opt, ref_params=params,
                 rng=jax.random.PRNGKey(0))


def state_shardings(model_cfg, tx, value_tx, use_critic: bool, mesh: Mesh, rules
                    ) -> tuple[Any, Any]:
  """(abstract unboxed RLState, its NamedSharding tree), allocating nothing."""
  return train_state_lib.abstract_and_shardings(
      lambda: _boxed_state(model_cfg, tx, value_tx, use_critic), mesh, rules)


def create_state(policy_params, model_cfg, tx, value_tx, use_critic: bool, shardings,
                 seed: int) -> RLState:
  """The RL start: policy and reference from `policy_params` (e.g. the SFT result); the
  critic's trunk starts from the policy too, with a zero value head."""

  def build(p):
    value_params, value_opt = {}, {}
    if use_critic:
      head = jnp.zeros((model_cfg.embed_dim,), jnp.float32)
      value_params = {"trunk": p, "head": head}
      value_opt = value_tx.init(value_params)
    return RLState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                   value_params=value_params, value_opt_state=value_opt,
                   ref_params=jax.tree_util.tree_map(jnp.copy, p),
                   rng=jax.random.PRNGKey(seed))

  return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(
      policy_params)


def _token_logp(logits_BxTxV, targets_BxT):
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return logp_BxT, logp_BxTxV


def token_logprobs(params, batch: Batch, model: model_lib.Transformer) -> jax.Array:
  """log pi(target_t | inputs_<=t), [B, T], fp32: the quantity sampler and learner share."""
  logits_BxTxV, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])
  return _token_logp(logits_BxTxV, batch["targets"])[0]


def make_score_fn(model_cfg, use_critic: bool) -> Callable:
  """`(state, batch) -> {"logp", "ref_logp"[, "values"]}`: the learner's view of fresh
  samples, before any update."""
  policy, critic = model_lib.Transformer(model_cfg), model_lib.ValueModel(model_cfg)

  def score(state: RLState, batch: Batch):
    out = {"logp": token_logprobs(state.params, batch, policy),
           "ref_logp": token_logprobs(state.ref_params, batch, policy)}
    if use_critic:
      out["values"] = critic.apply({"params": state.value_params}, batch["inputs"],
                                   batch["positions"], batch["segment_ids"])
    return out

  return score


def make_update_step(model_cfg, tx, value_tx, algo: alg.RLAlgoConfig) -> Callable:
  """The pure minibatch update `(state, batch) -> (state, metrics)`."""
  policy, critic = model_lib.Transformer(model_cfg), model_lib.ValueModel(model_cfg)
  aggregate = alg.AGGREGATIONS[algo.loss_aggregation]
  policy_loss = alg.POLICY_LOSSES[algo.policy_loss]
  kl_estimator = alg.KL_ESTIMATORS[algo.kl_estimator]
  mean = alg.token_mean

  def step(state: RLState, batch: Batch):
    mask = batch["mask"]

    def loss_fn(params):
      logits_BxTxV, _ = policy.apply({"params": params}, batch["inputs"],
                                     batch["positions"], batch["segment_ids"])
      logp, logp_all = _token_logp(logits_BxTxV, batch["targets"])
      entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
      pg, clipped = policy_loss(logp, batch["old_logp"], batch["advantages"], algo)
      kl = kl_estimator(logp, batch["ref_logp"])
      per_token = pg
      if algo.kl_coef and not algo.kl_in_reward:
        per_token = per_token + algo.kl_coef * kl
      if algo.entropy_coef:
        per_token = per_token - algo.entropy_coef * entropy
      aux = {"policy_loss": aggregate(pg, mask), "kl": mean(kl, mask),
             "entropy": mean(entropy, mask), "clip_fraction": mean(clipped, mask),
             "approx_kl_to_old": mean(0.5 * jnp.square(logp - batch["old_logp"]), mask)}
      return aggregate(per_token, mask), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads),
               "update_norm": optax.global_norm(updates),
               "param_norm": optax.global_norm(params)}
    value_params, value_opt_state = state.value_params, state.value_opt_state
    if algo.uses_critic:
      def value_loss_fn(vp):
        values = critic.apply({"params": vp}, batch["inputs"], batch["positions"],
                              batch["segment_ids"])
        return mean(alg.value_loss(values, batch["old_values"], batch["returns"],
                                   algo.value_clip), mask)

      v_loss, v_grads = jax.value_and_grad(value_loss_fn)(state.value_params)
      v_updates, value_opt_state = value_tx.update(v_grads, state.value_opt_state,
                                                   state.value_params)
      value_params = optax.apply_updates(state.value_params, v_updates)
      metrics.update(value_loss=v_loss, value_grad_norm=optax.global_norm(v_grads))
    new_state = state.replace(step=state.step, params=params, opt_state=opt_state,
                              value_params=value_params, value_opt_state=value_opt_state)
    return new_state, metrics

  return step


def jit_update_step(step_fn, shardings, batch_sharding, mesh, rules):
  """Compiled once with explicit shardings; the input state is donated."""
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=(0,))

  def call(state: RLState, batch: Batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return jitted(state, batch)

  return call


def jit_score_fn(score_fn, shardings, batch_sharding, mesh, rules):
  jitted = jax.jit(score_fn, in_shardings=(shardings, batch_sharding))

  def call(state: RLState, batch: Batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return jitted(state, batch)

  return call
