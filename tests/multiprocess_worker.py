r"""One process of the two-process CPU test (spawned by tests/test_multiprocess.py).

  PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python tests/multiprocess_worker.py 127.0.0.1:PORT NUM_PROCESSES PROCESS_ID

Joins the run with `o3lite.distributed.maybe_initialize`, builds one mesh over every
process's devices, trains the tiny model for a few SFT steps on a fixed global batch and
prints one JSON line: process count, global and local device counts, and the losses.
The test imports `train_losses` to run the same steps in one process as the reference.
"""

from __future__ import annotations

import json
import sys

import jax
import ml_collections
import numpy as np

from o3lite.parallel import multiprocess as distributed
from o3lite.model import transformer as model_lib
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import losses as losses_lib
from o3lite.training import step as step_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import state as train_state_lib

AXES = ("data", "fsdp", "tensor")
MESH_SHAPE = (2, 2, 1)  # data x fsdp over the 4 global devices of two processes.
RULES = sharding_lib.DEFAULT_RULES
NUM_STEPS = 3


def opt_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, final_lr_fraction=0.1, grad_clip_norm=1.0,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


def global_batch(B: int = 8, T: int = 16, V: int = 64) -> dict[str, np.ndarray]:
  """The same random [B, T] batch in every process (fixed seed)."""
  rng = np.random.default_rng(0)
  return dict(inputs=rng.integers(0, V, (B, T)).astype(np.int32),
              targets=rng.integers(0, V, (B, T)).astype(np.int32),
              loss_mask=(rng.random((B, T)) > 0.3).astype(np.float32),
              segment_ids=np.ones((B, T), np.int32),
              positions=np.tile(np.arange(T), (B, 1)).astype(np.int32))


def train_losses(mesh_shape, devices, steps: int = NUM_STEPS) -> list[float]:
  """Losses of `steps` SFT steps of the tiny model on a mesh over `devices`."""
  model_cfg = model_lib.ModelConfig.tiny(vocab_size=64)
  tx, _ = optimizer_lib.make_optimizer(opt_config(), 10)
  mesh = sharding_lib.make_mesh(AXES, mesh_shape, devices)
  spec = train_state_lib.policy_spec(model_cfg, tx, mesh, RULES)
  state = spec.create(seed=0)
  batch_sharding = sharding_lib.batch_sharding(mesh, RULES)
  step = step_lib.jit_train_step(step_lib.make_train_step(
      losses_lib.get_loss("sft_cross_entropy", model_cfg), tx),
      spec.shardings, batch_sharding, mesh, RULES)
  batch = sharding_lib.put_global_batch(global_batch(), batch_sharding)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))  # Replicated scalar: readable in every process.
  return losses


def main(argv: list[str]) -> None:
  coordinator, num_processes, process_id = argv[1], int(argv[2]), int(argv[3])
  distributed.maybe_initialize(True, coordinator, num_processes, process_id)
  losses = train_losses(MESH_SHAPE, jax.devices())
  print(json.dumps({"process_index": jax.process_index(),
                    "process_count": jax.process_count(),
                    "num_devices": len(jax.devices()),
                    "num_local_devices": len(jax.local_devices()),
                    "losses": losses}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
