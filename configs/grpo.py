"""GRPO (group-normalized outcome rewards, no critic) on the task of configs/rl.py.

  python -m o3lite.train --config=configs/grpo.py
"""

from configs import rl


def get_config():
  c = rl.get_config()
  c.rl.advantage = "grpo"  # (r - group mean) / group std, no critic.
  c.rl.loss_aggregation = "seq-mean-token-mean"  # As in the GRPO paper.
  c.rl.kl_coef = 0.0  # DAPO and Dr. GRPO drop the KL term; set > 0 to anchor.
  return c
