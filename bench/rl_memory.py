r"""Peak memory of one RL update and one scoring pass at the Qwen2.5-0.5B shape.

  python -m bench.rl_memory                      # configs/rl_qwen_gsm8k.py's settings
  python -m bench.rl_memory --vocab_chunks=0,8192 --grad_accum_steps=1,4

Nothing is allocated: the RL state (policy, frozen reference, AdamW moments) and one
minibatch are abstract shapes; each jitted function is lowered and compiled for the
devices JAX sees, and XLA's `memory_analysis()` gives the bytes of its arguments, outputs
and temporaries. Peak = arguments + temporaries + outputs not aliased to donated inputs.
Compiling the 0.5B model takes a few minutes on a 2-core CPU. The figures are XLA:CPU's
buffer assignment; a GPU's differs in detail (fusion, cuDNN workspace), not in what
dominates (parameters and optimizer state; then the logits, which chunking removes).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import numpy as np

from bench import common
from configs import rl_qwen_gsm8k
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.rl import learner
from o3lite.rl import run as rl_run
from o3lite.training import losses
from o3lite.training import memory
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import step as step_lib

_CHUNKS = flags.DEFINE_list("vocab_chunks", ["0", "8192"],
                            "rl.vocab_chunk values to compare (0 = the whole vocabulary).")
_MINIBATCH = flags.DEFINE_integer("minibatch_size", None, "Rows per update (default: "
                                  "configs/rl_qwen_gsm8k.py's).")
_ACCUM = flags.DEFINE_list("grad_accum_steps", None, "rl.grad_accum_steps values "
                           "(default: the config's).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: the config's "
                            "max_prompt_len + max_new_tokens).")

GIB = memory.GIB


def _analysis(compiled) -> dict[str, float]:
  return {f"{key}_gib": value / GIB for key, value in memory.compiled_memory(compiled).items()}


def main(argv):
  del argv
  config = rl_qwen_gsm8k.get_config()
  rl_cfg = config.rl
  model_cfg = model_lib.ModelConfig.qwen2_5_0_5b(dtype=config.model.dtype,
                                                 remat=config.model.remat)
  algo = rl_run.algo_config(rl_cfg)
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  B = _MINIBATCH.value or rl_cfg.minibatch_size
  T = _SEQ.value or rl_cfg.max_prompt_len + rl_cfg.max_new_tokens
  trees = {"policy": None, **({"critic": rl_cfg.value_learning_rate}
                              if algo.uses_critic else {})}
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, 1000, trees)
  spec = learner.state_spec(model_cfg, tx, algo.uses_critic, mesh, rules)
  bs = sharding_lib.batch_sharding(mesh, rules)
  batch = learner.abstract_batch(B, T, algo.uses_critic, bs)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract.params))
  print(f"Qwen2.5-0.5B shape ({params:,} trainable parameters), {config.model.dtype} "
        f"compute, remat={config.model.remat}, advantage={algo.advantage}, minibatch "
        f"{B} x {T} tokens, {len(jax.devices())} device(s)", flush=True)
  rows, results = [], []
  accums = [int(a) for a in (_ACCUM.value or [rl_cfg.grad_accum_steps])]
  cases = [(c, a) for c in [int(c) for c in _CHUNKS.value] for a in accums]
  for chunk, accum in cases:
    loss_fn = losses.get_loss("ppo_actor_critic", model_cfg, algo=algo,
                              temperature=rl_cfg.temperature, vocab_chunk=chunk)
    update = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx, accum),
                                     spec.shardings, bs, mesh, rules)
    score = step_lib.jit_eval_fn(
        learner.make_score_fn(model_cfg, algo.uses_critic, rl_cfg.temperature, chunk),
        spec.shardings, bs, mesh, rules)
    jobs = [("update step", update, (spec.abstract, batch))]
    if accum == accums[0]:  # The scoring pass does not accumulate.
      jobs.append(("scoring pass", score, (spec.abstract, {
          k: batch[k] for k in learner.ROLLOUT_KEYS})))
    for name, fn, args in jobs:
      t0 = time.time()
      compiled = fn.compile(*args)
      figures = _analysis(compiled)
      results.append({"vocab_chunk": chunk, "grad_accum_steps": accum, "function": name,
                      **figures, "compile_s": time.time() - t0})
      rows.append([str(chunk or "none (full vocabulary)"),
                   str(accum) if name == "update step" else "-", name,
                   f"{figures['arguments_gib']:.2f}", f"{figures['temporaries_gib']:.2f}",
                   f"{figures['peak_gib']:.2f}"])
      print(rows[-1], f"compiled in {time.time() - t0:.0f} s", flush=True)
  print(common.markdown_table(["vocab chunk", "grad accum", "function", "arguments GiB",
                               "temporaries GiB", "peak GiB"], rows))
  # The config's own shape is `rl_memory.json`; another row length gets its own file.
  own_length = T == rl_cfg.max_prompt_len + rl_cfg.max_new_tokens
  name = "rl_memory" if own_length else f"rl_memory_T{T}"
  path = common.write_results(name, {"minibatch": [B, T], "results": results})
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
