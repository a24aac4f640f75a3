"""The policy bundle: what travels wherever a policy goes (search, labellers, RL,
evaluation), instead of loose arguments.

  policy = Policy(params, model_cfg, tokenizer, mesh, rules)

With a mesh (and its logical rules) the sampler splits rows over the mesh's batch axes;
without one it runs on the default device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from o3lite.model import transformer as model_lib


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: never compare params trees.
class Policy:
  """A policy's parameters, frozen model config, tokenizer and placement."""

  params: Any
  model_cfg: model_lib.ModelConfig
  tokenizer: Any
  mesh: jax.sharding.Mesh | None = None
  rules: Any = None
