"""The sharded train step on 8 simulated CPU devices matches one device."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from o3lite import errors
from o3lite.model import transformer as model_lib
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import losses as losses_lib
from o3lite.training import step as step_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import state as train_state_lib

AXES = ("data", "fsdp", "tensor")
RULES = sharding_lib.DEFAULT_RULES


def _opt_cfg():
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, final_lr_fraction=0.1, grad_clip_norm=1.0,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


def _batch(B=8, T=16, V=64):
  rng = np.random.default_rng(0)
  return dict(inputs=rng.integers(0, V, (B, T)).astype(np.int32),
              targets=rng.integers(0, V, (B, T)).astype(np.int32),
              loss_mask=(rng.random((B, T)) > 0.3).astype(np.float32),
              segment_ids=np.ones((B, T), np.int32),
              positions=np.tile(np.arange(T), (B, 1)).astype(np.int32))


def _losses(mesh_shape, grad_accum=1, steps=3):
  model_cfg = model_lib.ModelConfig.tiny(vocab_size=64)
  tx, _ = optimizer_lib.make_optimizer(_opt_cfg(), 10)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding_lib.make_mesh(AXES, mesh_shape, devices)
  spec = train_state_lib.policy_spec(model_cfg, tx, mesh, RULES)
  state = spec.create(seed=0)
  batch_sharding = sharding_lib.batch_sharding(mesh, RULES)
  step = step_lib.jit_train_step(step_lib.make_train_step(
      losses_lib.get_loss("sft_cross_entropy", model_cfg), tx, grad_accum),
      spec.shardings, batch_sharding, mesh, RULES)
  batch = sharding_lib.put_global_batch(_batch(), batch_sharding)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state


def test_simulated_devices_exist():
  assert len(jax.devices()) == 8


@pytest.mark.parametrize("mesh_shape,grad_accum", [((2, 2, 2), 1), ((1, 4, 2), 1),
                                                   ((8, 1, 1), 1), ((4, 2, 1), 2)])
def test_sharded_losses_match_one_device(mesh_shape, grad_accum):
  reference, _ = _losses((1, 1, 1))
  losses, state = _losses(mesh_shape, grad_accum)
  assert reference[-1] < reference[0]  # The steps really train.
  np.testing.assert_allclose(losses, reference, rtol=2e-5, atol=2e-5)
  kernel = state.params["policy"]["layer_0"]["mlp"]["gate_kernel"]  # [embed, mlp]
  shard_shape = kernel.sharding.shard_shape(kernel.shape)
  assert shard_shape == (kernel.shape[0] // mesh_shape[1], kernel.shape[1] // mesh_shape[2])
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")["policy"]["layer_0"]["mlp"]["gate_kernel"]
  assert mu.sharding == kernel.sharding  # Optimizer state is sharded like its parameter.


def test_grad_accumulation_matches_full_batch():
  full, _ = _losses((1, 1, 1), grad_accum=1)
  accum, _ = _losses((1, 1, 1), grad_accum=4)
  np.testing.assert_allclose(accum, full, rtol=2e-5, atol=2e-5)


def test_mesh_that_does_not_fit_devices_is_an_error():
  with pytest.raises(errors.MeshError, match="needs 12 devices"):
    sharding_lib.make_mesh(AXES, (3, 2, 2))
  with pytest.raises(errors.MeshError, match="does not fit 8 devices"):
    sharding_lib.make_mesh(AXES, (-1, 3, 1))
  with pytest.raises(errors.MeshError, match="more than one -1"):
    sharding_lib.make_mesh(AXES, (-1, -1, 1))


def test_mesh_that_does_not_divide_the_model_is_an_error():
  model_cfg = model_lib.ModelConfig.tiny(vocab_size=64)  # 4 heads, 2 kv heads.
  tx, _ = optimizer_lib.make_optimizer(_opt_cfg(), 10)
  mesh = sharding_lib.make_mesh(AXES, (1, 1, 8))
  with pytest.raises(errors.MeshError, match="do not divide"):
    train_state_lib.policy_spec(model_cfg, tx, mesh, RULES)


def test_batch_that_does_not_divide_the_mesh_is_an_error():
  mesh = sharding_lib.make_mesh(AXES, (4, 2, 1))
  with pytest.raises(errors.MeshError, match="batch size 12"):
    sharding_lib.check_batch(12, mesh, RULES)
