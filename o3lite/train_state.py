"""The train state pytree, created directly on the mesh with its shardings.

Pattern (flax lm1b): `jax.eval_shape` of the init -> logical partition specs -> mesh
shardings -> `jax.jit(init, out_shardings=...)`, so no full copy ever sits on one device.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from o3lite import model as model_lib
from o3lite import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw PRNG key data (checkpoint-friendly).


def _init_boxed(model_cfg: model_lib.ModelConfig, tx: optax.GradientTransformation,
                seed: int) -> TrainState:
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  params = model_lib.init_params(model_cfg, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=state_rng)


def state_shardings(model_cfg, tx, mesh: Mesh, rules) -> tuple[Any, Any]:
  """(abstract unboxed state, NamedSharding tree) without allocating anything."""
  return abstract_and_shardings(lambda: _init_boxed(model_cfg, tx, 0), mesh, rules)


def abstract_and_shardings(init_boxed, mesh: Mesh, rules) -> tuple[Any, Any]:
  """(abstract unboxed pytree, NamedSharding tree) of what `init_boxed()` would build
  (a pytree of logically partitioned values), without allocating it."""
  abstract_boxed = jax.eval_shape(init_boxed)
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


def create_train_state(model_cfg, tx, mesh: Mesh, rules, seed: int,
                       params: Any = None) -> TrainState:
  """A fresh state, sharded over `mesh` from the start.

  `params` (already placed in the state's parameter shardings, e.g. a Hugging Face
  checkpoint from `hf.load_hf_checkpoint`) replace the random initialization; the
  optimizer state is built around them.
  """
  _, shardings = state_shardings(model_cfg, tx, mesh, rules)
  if params is None:
    init = jax.jit(lambda: nn.unbox(_init_boxed(model_cfg, tx, seed)),
                   out_shardings=shardings)
    return init()

  def around(p):
    state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=state_rng)
  return jax.jit(around, in_shardings=(shardings.params,), out_shardings=shardings)(params)
