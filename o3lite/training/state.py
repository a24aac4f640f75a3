"""The train state pytree, created directly on the mesh with its shardings.

One state for every stage:

  TrainState(step, params, frozen, opt_state, rng)
    params  dict of trainable trees: {"policy": <transformer>} for SFT; PPO adds
            {"critic": {"trunk", "head"}}; reward models {"policy", "head"}, ...
    frozen  dict of trees the loss reads but never updates: {"reference": ...} for RL's
            KL anchor; {} for SFT.

Pattern (flax lm1b): `jax.eval_shape` of the init -> logical partition specs -> mesh
shardings -> `jax.jit(init, out_shardings=...)`, so no full copy ever sits on one device.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: train steps taken (optimizer updates, or skipped ones).
  params: dict[str, Any]  # Trainable trees by name; "policy" is what the sampler reads.
  frozen: dict[str, Any]  # Trees the loss reads but never updates (a reference policy).
  opt_state: Any
  rng: jax.Array  # uint32[2] raw PRNG key data (checkpoint-friendly).


def abstract_and_shardings(init_boxed: Callable[[], Any], mesh: Mesh, rules
                           ) -> tuple[Any, Any]:
  """(abstract unboxed pytree, NamedSharding tree) of what `init_boxed()` would build
  (a pytree of logically partitioned values), without allocating it."""
  abstract_boxed = jax.eval_shape(init_boxed)
  # optax.multi_transform keeps each tree's state over the whole `params` dict with
  # placeholders (MaskedNode) for the other trees: unbox those, they hold no array.
  abstract_boxed = jax.tree_util.tree_map(
      lambda x: x.value if isinstance(x, nn.LogicallyPartitioned)
      and not hasattr(x.value, "shape") else x, abstract_boxed,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  sharding_lib.check_divisible(abstract_boxed, mesh, rules)
  logical_specs = nn.get_partition_spec(abstract_boxed)
  shardings = sharding_lib.logical_to_sharding(logical_specs, mesh, rules)
  # Scalars and the RNG have no logical names: replicate them.
  shardings = jax.tree_util.tree_map(
      lambda s: s if isinstance(s, NamedSharding) else NamedSharding(mesh, P()),
      shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, P)) or x is None)
  abstract = nn.unbox(abstract_boxed)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def _state(params, frozen, tx, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    opt_state=tx.init(params),
                    rng=jax.random.split(jax.random.PRNGKey(seed))[1])


class StateSpec:
  """How to build a stage's state: `init_boxed(rng) -> (params, frozen)` of boxed
  (logically partitioned) random trees, and `tx`. Gives the abstract state and its
  shardings without allocating, a fresh sharded state, or one built around given trees.
  """

  def __init__(self, init_boxed: Callable[[jax.Array], tuple[dict, dict]],
               tx: optax.GradientTransformation, mesh: Mesh, rules):
    self.init_boxed, self.tx, self.mesh, self.rules = init_boxed, tx, mesh, rules
    self.abstract, self.shardings = abstract_and_shardings(
        lambda: _state(*init_boxed(jax.random.PRNGKey(0)), tx, 0), mesh, rules)

  def create(self, seed: int) -> TrainState:
    """A random state (parameters from `seed`), sharded over the mesh from the start."""
    def init():
      params, frozen = self.init_boxed(jax.random.split(jax.random.PRNGKey(seed))[0])
      return nn.unbox(_state(params, frozen, self.tx, seed))
    return jax.jit(init, out_shardings=self.shardings)()

  def around(self, params: dict, frozen: dict, seed: int) -> TrainState:
    """A state holding the given trees (already placed, e.g. restored or imported from
    Hugging Face), with a fresh optimizer state. Trees are copied, never aliased."""
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    build = lambda p, f: _state(copy(p), copy(f), self.tx, seed)
    return jax.jit(build, in_shardings=(self.shardings.params, self.shardings.frozen),
                   out_shardings=self.shardings)(params, frozen)


def policy_spec(model_cfg: model_lib.ModelConfig, tx, mesh: Mesh, rules) -> StateSpec:
  """The SFT state: one trainable tree, the policy; nothing frozen."""
  return StateSpec(lambda rng: ({"policy": model_lib.init_params(model_cfg, rng)}, {}),
                   tx, mesh, rules)
