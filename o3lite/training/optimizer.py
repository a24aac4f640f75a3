"""The one optimizer factory: AdamW with linear warmup and cosine decay, global-norm
gradient clipping, weight decay on matrices only.

Every stage builds its optimizer here from an `optimizer`-shaped config section
(learning_rate, warmup_steps, final_lr_fraction, grad_clip_norm, b1, b2, eps,
weight_decay). A state that trains several trees (PPO's policy and critic) gets one
AdamW per tree, each clipped on its own, with its own peak learning rate if given.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import optax

from o3lite import errors

FIELDS = ("learning_rate", "warmup_steps", "final_lr_fraction", "grad_clip_norm", "b1",
          "b2", "eps", "weight_decay")


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int,
                           final_lr_fraction: float = 0.1) -> optax.Schedule:
  """0 -> lr linearly over `warmup_steps`, then cosine to `lr * final_lr_fraction`
  (final_lr_fraction 1: constant after the warmup)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=max(warmup_steps, 1),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * final_lr_fraction)


def _decay_mask(params):
  """Weight decay on matrices only: not on norms' scales or biases."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def validate(opt_cfg, where: str = "optimizer") -> None:
  """A one-line ConfigError for values no run can train with."""
  for name in FIELDS:
    value = opt_cfg[name]
    if not math.isfinite(value):
      raise errors.ConfigError(f"{where}.{name}={value} is not a finite number")
  if opt_cfg.learning_rate < 0:
    raise errors.ConfigError(f"{where}.learning_rate={opt_cfg.learning_rate} is negative")
  if opt_cfg.grad_clip_norm <= 0:
    raise errors.ConfigError(f"{where}.grad_clip_norm={opt_cfg.grad_clip_norm} must be > 0")
  if not (0 <= opt_cfg.b1 < 1 and 0 <= opt_cfg.b2 < 1):
    raise errors.ConfigError(f"{where}.b1={opt_cfg.b1}, b2={opt_cfg.b2} must be in [0, 1)")
  if opt_cfg.warmup_steps < 0 or not 0 <= opt_cfg.final_lr_fraction <= 1:
    raise errors.ConfigError(f"{where}: warmup_steps={opt_cfg.warmup_steps} must be >= 0 "
                             f"and final_lr_fraction={opt_cfg.final_lr_fraction} in [0, 1]")


def _adamw(opt_cfg, schedule) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip_norm),
      optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay, mask=_decay_mask))


def make_optimizer(opt_cfg, total_steps: int, trees: Mapping[str, float | None] | None = None,
                   where: str = "optimizer"
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule of the first tree) for a state's `params` dict.

  `trees` names the state's trainable trees with a peak learning rate each (None: the
  section's); default {"policy": None}. Each tree gets its own clipped AdamW.
  """
  validate(opt_cfg, where)
  trees = dict(trees or {"policy": None})
  schedules = {name: learning_rate_schedule(
      opt_cfg.learning_rate if lr is None else lr, opt_cfg.warmup_steps, total_steps,
      opt_cfg.final_lr_fraction) for name, lr in trees.items()}
  tx = optax.multi_transform(
      {name: _adamw(opt_cfg, schedule) for name, schedule in schedules.items()},
      lambda params: {name: jax.tree_util.tree_map(lambda _, n=name: n, tree)
                      for name, tree in params.items()})
  return tx, schedules[next(iter(trees))]
