"""AdamW with linear warmup and cosine decay, and global-norm gradient clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int,
                           final_lr_fraction: float = 0.1) -> optax.Schedule:
  """0 -> lr linearly over `warmup_steps`, then cosine to `lr * final_lr_fraction`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=max(warmup_steps, 1),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * final_lr_fraction)


def _decay_mask(params):
  """Weight decay on matrices only: not on norms' scales or biases."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) from the `optimizer` section of a run config."""
  schedule = learning_rate_schedule(opt_cfg.learning_rate, opt_cfg.warmup_steps,
                                    total_steps, opt_cfg.final_lr_fraction)
  tx = optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip_norm),
      optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay, mask=_decay_mask),
  )
  return tx, schedule
