r"""The sampler's search paths (fork, continue) against re-prefilling, same model, greedy.

  python -m bench.search_sampling                 # both parts, ModelConfig.small()
  python -m bench.search_sampling --quick         # smoke run
  python -m bench.search_sampling --model=qwen2_5_0_5b --dtype=bfloat16   # on a GPU

(a) Continuations of one prefix: k = 4, 16, 64 continuations of `--prefix_len` tokens,
    `--new_tokens` each.
      forked:   `sampler.prime` (the prefix once) -> `sampler.fork` (k rows) ->
                `sampler.continue_` (decode);
      separate: `sampler.start` on k copies of the prefix (k prefills of it, as a sampler
                without forks does).
    New tokens per second = k * new tokens / seconds.
(b) Step-by-step extension: `--partials` partial solutions (random prompts of
    `--prompt_len` tokens) extended `--steps` times by one step of `--step_tokens`
    tokens.
      continued:   `sampler.start` for the first step, then `sampler.continue_` from the
                   kept state for each further step (nothing recomputed);
      re-prefill:  every step samples prompt + everything so far from scratch (what
                   search code that re-encodes each prefix does, e.g. search-and-learn's
                   beam search).
    Wall time of all steps.
Every timed path compiles first (one untimed call of the same shapes); the best of
`--repeats` timed calls counts. Both paths of a part must give identical greedy tokens
(asserted: the bench fails otherwise). Target: forked and continued at least 2x faster
than re-prefilling. Prints Markdown tables, writes `bench/results/search_sampling.json`.
"""

from __future__ import annotations

import dataclasses

from absl import app
from absl import flags
import flax.linen as nn
import jax
import numpy as np

from bench import common
from o3lite.model import transformer as model_lib
from o3lite.sampling import sampler as sampling

_MODEL = flags.DEFINE_string("model", "small", "A ModelConfig.named size (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_KS = flags.DEFINE_list("ks", ["4", "16", "64"], "(a): continuations of the one prefix.")
_PREFIX_LEN = flags.DEFINE_integer("prefix_len", 256, "(a): prefix tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "(a): new tokens per continuation.")
_PARTIALS = flags.DEFINE_integer("partials", 32, "(b): partial solutions.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "(b): prompt tokens of each.")
_STEPS = flags.DEFINE_integer("steps", 8, "(b): steps of extension.")
_STEP_TOKENS = flags.DEFINE_integer("step_tokens", 8, "(b): tokens per step.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per path; the best counts.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: ks 4, prefix 32, 4 new tokens, "
                           "4 partials of 8 tokens, 2 steps of 4, 1 repeat.")


def continuations(params, cfg, k, prefix, new, repeats):
  scfg = sampling.SamplingConfig(max_new_tokens=new, eos_id=-1, prompt_bucket=16,
                                 attention_chunk=0)

  def forked():
    state = sampling.prime(params, [prefix], cfg, scfg)
    state = sampling.fork(state, [0] * k)
    return [c.tokens for c in sampling.completions(
        sampling.continue_(params, state, [[]] * k, cfg, scfg), scfg)]

  def separate():
    state = sampling.start(params, [prefix] * k, cfg, scfg)
    return [c.tokens for c in sampling.completions(state, scfg)]

  fork_s, fork_out = common.best_of(forked, repeats)
  sep_s, sep_out = common.best_of(separate, repeats)
  assert fork_out == sep_out, "forked and separate continuations differ"
  return {"k": k, "forked_seconds": fork_s, "separate_seconds": sep_s,
          "forked_tokens_per_second": k * new / fork_s,
          "separate_tokens_per_second": k * new / sep_s, "speedup": sep_s / fork_s}


def step_extension(params, cfg, prompts, steps, step_tokens, repeats):
  scfg = sampling.SamplingConfig(max_new_tokens=step_tokens, eos_id=-1, prompt_bucket=16,
                                 attention_chunk=0)

  def continued():
    state = sampling.start(params, prompts, cfg, scfg)
    out = [list(c.tokens) for c in sampling.completions(state, scfg)]
    for _ in range(steps - 1):
      state = sampling.continue_(params, state, [[]] * len(prompts), cfg, scfg)
      for row, c in zip(out, sampling.completions(state, scfg)):
        row += c.tokens
    return out

  def reprefill():
    out = [[] for _ in prompts]
    for _ in range(steps):
      state = sampling.start(params, [p + o for p, o in zip(prompts, out)], cfg, scfg)
      for row, c in zip(out, sampling.completions(state, scfg)):
        row += c.tokens
    return out

  cont_s, cont_out = common.best_of(continued, repeats)
  re_s, re_out = common.best_of(reprefill, repeats)
  assert cont_out == re_out, "continued and re-prefilled steps differ"
  return {"partials": len(prompts), "steps": steps, "step_tokens": step_tokens,
          "continued_seconds": cont_s, "reprefill_seconds": re_s, "speedup": re_s / cont_s}


def main(argv):
  del argv
  common.setup_host_memory()
  common.warn_if_busy()
  ks, P, new = [int(k) for k in _KS.value], _PREFIX_LEN.value, _NEW_TOKENS.value
  partials, prompt_len = _PARTIALS.value, _PROMPT_LEN.value
  steps, step_tokens, repeats = _STEPS.value, _STEP_TOKENS.value, _REPEATS.value
  if _QUICK.value:
    ks, P, new, partials, prompt_len, steps, step_tokens, repeats = [4], 32, 4, 4, 8, 2, 4, 1
  cfg = model_lib.ModelConfig.named(_MODEL.value, dtype=_DTYPE.value)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  V = cfg.vocab_size
  prefix = rng.integers(3, V, P).tolist()
  print(f"{_MODEL.value} ({model_lib.count_params(params) / 1e6:.1f}M parameters, "
        f"{cfg.dtype}) on {jax.devices()[0].platform} x{jax.device_count()}", flush=True)
  part_a = []
  for k in ks:
    part_a.append(continuations(params, cfg, k, prefix, new, repeats))
    print(part_a[-1], flush=True)
  prompts = [rng.integers(3, V, prompt_len).tolist() for _ in range(partials)]
  part_b = step_extension(params, cfg, prompts, steps, step_tokens, repeats)
  print(part_b, flush=True)
  path = common.write_results("search_sampling", {
      "model": _MODEL.value, "model_config": dataclasses.asdict(cfg), "quick": _QUICK.value,
      "prefix_len": P, "new_tokens": new, "repeats": repeats, "continuations": part_a,
      "step_extension": part_b})
  print(f"\nwrote {path}\n")
  print(common.markdown_table(
      ["k", "forked tok/s", "separate prefills tok/s", "speedup"],
      [[r["k"], f"{r['forked_tokens_per_second']:,.0f}",
        f"{r['separate_tokens_per_second']:,.0f}", f"{r['speedup']:.2f}x"] for r in part_a]))
  print()
  print(common.markdown_table(
      ["partials", "steps x tokens", "continued", "re-prefill every step", "speedup"],
      [[part_b["partials"], f"{steps} x {step_tokens}", f"{part_b['continued_seconds']:.2f} s",
        f"{part_b['reprefill_seconds']:.2f} s", f"{part_b['speedup']:.2f}x"]]))


if __name__ == "__main__":
  app.run(main)
