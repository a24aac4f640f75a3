"""Device mesh and logical-to-mesh sharding rules: the one place sharding is declared.

Every parameter carries logical axis names (see `model/transformer.py`); the config maps
each logical name to mesh axes. The same code runs on 1 CPU, 8 simulated CPU devices, a
GPU or a TPU pod.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from o3lite import errors

Rules = tuple[tuple[str, Any], ...]

# Logical axis -> mesh axes. `batch` over data and fsdp; parameters' `embed` over fsdp
# (ZeRO-3 style); heads / mlp / vocab over tensor. Activation dims are not sharded on fsdp.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)




def make_mesh(axis_names: Sequence[str], shape: Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (or the given) devices; one entry of `shape` may be -1 (fill)."""
  devices = list(jax.devices() if devices is None else devices)
  axis_names, shape = tuple(axis_names), list(shape)
  if len(axis_names) != len(shape):
    raise errors.MeshError(f"mesh axes {axis_names} and shape {tuple(shape)} differ in length")
  if shape.count(-1) > 1:
    raise errors.MeshError(f"mesh shape {tuple(shape)} has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise errors.MeshError(f"mesh shape {tuple(shape)} has an invalid size")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise errors.MeshError(f"mesh shape {tuple(shape)} does not fit {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise errors.MeshError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                           f"but {len(devices)} are available")
  # Auto axes: XLA's partitioner places the activations from the parameters' shardings
  # and the `with_logical_constraint` hints.
  auto = (jax.sharding.AxisType.Auto,) * len(axis_names)
  return jax.make_mesh(tuple(shape), axis_names, axis_types=auto, devices=devices)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
  """Context in which the model's `nn.with_logical_constraint` hints take effect.

  Outside it they are no-ops; compile (trace) jitted model code inside it.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield


def logical_to_sharding(logical_tree, mesh: Mesh, rules: Rules):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def check_divisible(abstract_boxed_tree, mesh: Mesh, rules: Rules) -> None:
  """Raise errors.MeshError naming the first array dimension the mesh cannot split evenly."""
  rule_map = dict(rules)
  flat = jax.tree_util.tree_flatten_with_path(
      abstract_boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in flat:
    if not isinstance(leaf, nn.LogicallyPartitioned):
      continue
    for dim, name in zip(leaf.value.shape, leaf.names):
      axes = rule_map.get(name)
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        raise errors.MeshError(
            f"mesh axes {axes} of size {size} do not divide {name}={dim} of "
            f"{jax.tree_util.keystr(path)}; choose a mesh shape that divides it")


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [batch, length] arrays."""
  return logical_to_sharding(P("batch", "length"), mesh, rules)


def _batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
  spec = batch_sharding(mesh, rules).spec[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """Into how many pieces the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in _batch_axes(mesh, rules))


def check_batch(batch_size: int, mesh: Mesh, rules: Rules) -> None:
  axes, size = _batch_axes(mesh, rules), batch_shards(mesh, rules)
  if batch_size % size:
    raise errors.MeshError(f"batch size {batch_size} is not divisible by the {size} devices "
                           f"of mesh axes {axes}")


def put_global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding):
  """Place a batch that every process holds whole onto the mesh (multi-process safe)."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def to_host(tree):
  """Numpy copies of (possibly batch-sharded) global arrays, whole on every process."""
  if jax.process_count() > 1:  # Some rows live on other hosts' devices.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)
