r"""How many rows of a long chain fit a GPU's memory when decoding at the Qwen2.5-0.5B shape.

  python -m bench.long_memory                     # 16,384 new tokens, bf16 cache, 80 GiB
  python -m bench.long_memory --new_tokens=4096 --memory_gib=40

Nothing is allocated: as `bench/rl_memory.py` does, the decode loop (`decoding._decode`,
the one compiled `while_loop`) is lowered for abstract parameters and an abstract
sampling state and compiled for the devices JAX sees; XLA's `memory_analysis()` gives
its bytes (arguments + temporaries + outputs not aliased to the donated state). The
cache has `SamplingConfig.cache_slots(prompt + new_tokens)` slots per row (the bucket
the sampler picks). Peak memory is affine in the rows B, so two batch sizes give the
fixed part (parameters, the compiled loop's own buffers) and the part per row (the KV
cache above all); the most rows that fit is then checked by compiling at that B.

XLA:CPU cannot update a bf16 buffer in place: its loop holds an fp32 copy of a bf16
cache (temporaries of twice the cache's bytes, where an fp32 cache has none). The second
row of the table is what a backend that updates bf16 in place needs: the fp32 compile's
fixed and non-cache bytes per row, plus the bf16 cache.

The parameters are kept in fp32, as o3lite keeps them (compute in bf16 casts them per
use); the figures are XLA:CPU's buffer assignment, which on a GPU differs in detail
(fusion, workspaces), not in what dominates (the cache). The learner's side of long rows
is `python -m bench.rl_memory --seq_len=4096 --minibatch_size=1` (see RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from o3lite.model import transformer as model_lib
from o3lite.sampling import decoding
from o3lite.sampling.choice import SamplingConfig
from o3lite.training import memory as memory_lib

_NEW = flags.DEFINE_integer("new_tokens", 16_384, "New tokens per row.")
_PROMPT = flags.DEFINE_integer("prompt_len", 256, "Prompt tokens per row.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute and cache dtype.")
_MEMORY = flags.DEFINE_float("memory_gib", 80.0, "The accelerator's memory, GiB.")

GIB = 1024 ** 3


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def decode_peak_bytes(model_cfg, sampling_cfg, rows: int, prompt_len: int) -> dict:
  """XLA's peak bytes of the decode loop for `rows` rows (nothing allocated)."""
  params = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(model_cfg,
                                                                  jax.random.key(0))))
  capacity = sampling_cfg.cache_slots(prompt_len + sampling_cfg.max_new_tokens)
  ccfg = sampling_cfg.compiled()
  prompt = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
  lengths = jax.ShapeDtypeStruct((rows,), jnp.int32)
  state = jax.eval_shape(
      lambda p, x, n: decoding._prefill(  # pylint: disable=protected-access
          p, x, n, jax.random.PRNGKey(0), model_cfg, ccfg, capacity), params, prompt, lengths)
  compiled = decoding._decode.lower(  # pylint: disable=protected-access
      params, state, jax.ShapeDtypeStruct((), jnp.int32), model_cfg, ccfg).compile()
  memory = memory_lib.compiled_memory(compiled)
  return {"rows": rows, "cache_slots": capacity, "peak_bytes": memory["peak"],
          "cache_bytes": tree_bytes(state.cache), "temporaries_bytes": memory["temporaries"],
          "parameter_bytes": tree_bytes(params)}


def affine(model_cfg, sampling_cfg, prompt_len: int) -> tuple[float, float, float]:
  """(fixed bytes, bytes per row, cache bytes per row) of the decode loop, from B = 8, 16."""
  small, large = (decode_peak_bytes(model_cfg, sampling_cfg, b, prompt_len) for b in (8, 16))
  per_row = (large["peak_bytes"] - small["peak_bytes"]) / 8
  return small["peak_bytes"] - 8 * per_row, per_row, small["cache_bytes"] / 8


def main(argv):
  del argv
  model_cfg = model_lib.ModelConfig.qwen2_5_0_5b(dtype=_DTYPE.value)
  scfg = SamplingConfig(max_new_tokens=_NEW.value, eos_id=-1)
  P, budget = _PROMPT.value, _MEMORY.value * GIB
  t0 = time.time()
  fixed, per_row, cache_row = affine(model_cfg, scfg, P)
  rows = int((budget - fixed) // per_row)
  rows -= rows % 8  # Rows split over a mesh's batch shards in multiples of 8.
  fits = decode_peak_bytes(model_cfg, scfg, rows, P)
  while fits["peak_bytes"] > budget:  # The affine fit was off: step down.
    rows -= 8
    fits = decode_peak_bytes(model_cfg, scfg, rows, P)
  # XLA:CPU has no bf16 in-place update: it holds an fp32 copy of a bf16 cache in the
  # loop (temporaries of twice the cache's bytes; an fp32 cache has none). A backend
  # that updates bf16 in place (GPU, TPU) needs the fp32 compile's fixed and non-cache
  # per-row bytes plus the bf16 cache: the second figure, computed from both compiles.
  fixed32, per_row32, cache_row32 = affine(
      dataclasses.replace(model_cfg, dtype="float32"), scfg, P)
  in_place_row = per_row32 - cache_row32 + cache_row
  in_place_rows = int((budget - fixed32) // in_place_row)
  in_place_rows -= in_place_rows % 8
  result = {
      "model": "Qwen2.5-0.5B shape", "dtype": _DTYPE.value, "prompt_len": P,
      "new_tokens": _NEW.value, "cache_slots": fits["cache_slots"],
      "kv_bytes_per_token": 2 * model_cfg.num_layers * model_cfg.num_kv_heads
                            * model_cfg.head_dim * jnp.dtype(_DTYPE.value).itemsize,
      "cache_gib_per_row": cache_row / GIB,
      "per_row_gib": per_row / GIB, "fixed_gib": fixed / GIB, "memory_gib": _MEMORY.value,
      "rows_that_fit": rows, "peak_gib_at_rows": fits["peak_bytes"] / GIB,
      "parameter_gib": fits["parameter_bytes"] / GIB,
      "in_place_per_row_gib": in_place_row / GIB, "in_place_fixed_gib": fixed32 / GIB,
      "in_place_rows_that_fit": in_place_rows,
      "compile_and_analysis_s": time.time() - t0}
  print(common.markdown_table(
      ["new tokens", "cache slots", "dtype", "cache GiB per row", "loop", "GiB per row",
       "fixed GiB", f"rows in {_MEMORY.value:g} GiB"],
      [[f"{_NEW.value:,}", f"{fits['cache_slots']:,}", _DTYPE.value, f"{cache_row / GIB:.3f}",
        "XLA:CPU (measured)", f"{per_row / GIB:.3f}", f"{fixed / GIB:.2f}", str(rows)],
       [f"{_NEW.value:,}", f"{fits['cache_slots']:,}", _DTYPE.value, f"{cache_row / GIB:.3f}",
        "cache updated in place", f"{in_place_row / GIB:.3f}", f"{fixed32 / GIB:.2f}",
        str(in_place_rows)]]))
  print("wrote", common.write_results(f"long_memory_{_NEW.value}", result))


if __name__ == "__main__":
  app.run(main)
