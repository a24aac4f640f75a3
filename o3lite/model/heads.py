"""Heads on the transformer trunk: a scalar per position (the PPO critic; reward models).

`ScalarHead(config)` runs the trunk (`Transformer(hidden=True)`, the policy's parameter
tree, so it can start from the policy's weights) and a linear map of the final normed
hidden state to one number per position:
{"trunk": <policy-shaped tree>, "head": [D], "bias": []}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from o3lite.model.transformer import ModelConfig, Transformer, param


class ScalarHead(nn.Module):
  """The transformer trunk, then a scalar per position, [B, T] in fp32 (the PPO
  critic's V(s_t) reads position t: the state after inputs_<=t)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT=None, cache=None,
               fresh_cache: bool = False):
    """The scalars [B, T]; with a KV `cache` (the trunk's, as `Transformer` takes it),
    `(scalars, new cache)`: a reader that scores tokens as they are written."""
    x_BxTxD, new_cache = Transformer(self.config, hidden=True, name="trunk")(
        tokens_BxT, positions_BxT, segment_ids_BxT, cache, fresh_cache)
    head_D = param(self, "head", nn.initializers.zeros, (self.config.embed_dim,),
                   ("embed",))
    bias = param(self, "bias", nn.initializers.zeros, (), ())
    values_BxT = jnp.einsum("btd,d->bt", x_BxTxD, head_D) + bias
    return values_BxT if cache is None else (values_BxT, new_cache)


def init_scalar_head(config: ModelConfig, rng: jax.Array) -> Any:
  """Boxed parameters: {"trunk": <policy-shaped tree>, "head": [D], "bias": []}."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return ScalarHead(config).init(rng, tokens, tokens)["params"]
