r"""Sampling throughput of o3lite's jitted sampler vs transformers `generate`, same weights.

  pip install torch==2.13.0   # the baseline only; not an o3lite requirement
  python -m bench.sample_speed            # 3 cases, prompt 64, 128 new tokens, best of 3
  python -m bench.sample_speed --quick    # smoke run (short prompts, few tokens, 1 repeat)
  python -m bench.sample_speed --cases=tiny_b32 --prompt_len=64 --new_tokens=128

Cases (batch of random prompts, all `--prompt_len` long, no padding):

  tiny_b32, tiny_b256: `ModelConfig.small()`: 4 layers, width 256, vocabulary 512, 4 heads
                       of 64, 4 kv heads, mlp 1024 (SwiGLU), tied embeddings; 4.33M params.
  66m_b8:              8 layers, width 512, vocabulary 32000, 8 heads of 64, 8 kv heads,
                       mlp 2048, untied embeddings; 66.3M parameters.

o3lite's parameters are random (`model.init_params`, unboxed); `hf.params_to_hf` turns
them into the state dict of a `transformers.LlamaForCausalLM` built from
`hf_config.hf_config_from_model_config` (fp32, sdpa attention, eval, `torch.inference_mode`,
`torch.set_num_threads(os.cpu_count())`). Both sides decode greedily exactly
`--new_tokens` tokens per row with no EOS: o3lite gets `eos_id=-1` (outside the
vocabulary: argmax never picks it), transformers `eos_token_id=None` with
`min_new_tokens = max_new_tokens = --new_tokens`.

  o3lite:       `decoding.prefill` then `decoding.decode` (the jitted `lax.while_loop` that
                `sampling.sample` runs, minus its host-side prompt padding and result
                lists), blocked on the tokens.
  transformers: `model.generate(input_ids, attention_mask, do_sample=False, ...)`.

Each side warms up untimed first (o3lite: ahead-of-time compilation of prefill and decode,
timed and reported as the compile time, then a full call; transformers: a 4-token call),
then up to `--repeats` timed calls (none started once they took `--time_budget` seconds);
the best gives tokens/s = batch * new tokens / time (prefill included). The prefill alone
is timed too, so the decode steps get their own time per step. Correctness: every row's
o3lite tokens against transformers' (fraction of identical rows and of equal tokens;
random models have near-ties, so this is reported, not asserted), plus the max |logit
difference| of one forward on the prompts.

Roofline: the machine's fp32 matmul peak (best jitted `jnp.dot` of two 2048 x 2048
matrices, as in `bench/train_speed.py`) and read bandwidth (best jitted `jnp.sum` of a
256 MiB fp32 array). Per case the ideal time is the prefill plus every decode step, each
max(FLOPs / peak, bytes / bandwidth): FLOPs are 2 x the matmul weights per token (output
projection only at the last prompt position) plus attention 4 * L * context * N*H;
bytes are the parameters read once per step plus the KV cache read (the filled part,
context = prompt + tokens so far). "bound" names the larger of the two sums; the
roofline fraction is ideal time / measured time. The tiny model (17 MB) fits in L3, so
its memory term is pessimistic; it is an estimate, not a ceiling.
"matmuls alone/step" is the best time of one decode step's projections as plain
`jnp.dot`s of `batch` rows, chained in one jitted function with nothing else
(`matmul_only_step`): what XLA:CPU's own matmul kernels need per step, below which no
sampler change can go.
Prints Markdown tables and writes `bench/results/sample_speed.json`.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from o3lite.interop import hf_config
from o3lite.interop import huggingface as hf
from o3lite.model import transformer as model_lib
from o3lite.sampling import decoding
from o3lite.sampling import sampler as sampling

MODELS = {
    "tiny": lambda: model_lib.ModelConfig.small(),
    "66m": lambda: model_lib.ModelConfig(
        vocab_size=32_000, num_layers=8, embed_dim=512, num_heads=8, num_kv_heads=8,
        head_dim=64, mlp_dim=2048, tie_embeddings=False),
}
CASES = {"tiny_b32": ("tiny", 32), "tiny_b256": ("tiny", 256), "66m_b8": ("66m", 8)}

_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {list(CASES)} to run.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row (no padding).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row (no EOS).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per side after one warmup; best.")
_TIME_BUDGET = flags.DEFINE_float(
    "time_budget", 60.0, "No further timed call once a side's timed calls took this many "
    "seconds (at least one is made): bounds the slow transformers batch-256 case.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak-FLOP/s matmul.")
_MATMUL_REPEATS = flags.DEFINE_integer("matmul_repeats", 10, "Peak matmul: best of this many.")
_BANDWIDTH_MIB = flags.DEFINE_integer("bandwidth_mib", 256, "Array read for the bandwidth.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", None, "torch intra-op threads (default: os.cpu_count()).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke run: prompt 16, 8 new tokens, 1 repeat, batches capped at 8, "
    "fewer peak repeats (overrides those flags).")


def import_torch():
  """(torch, transformers), or exit with how to install the baseline."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("bench/sample_speed.py needs PyTorch for its baseline (it is not an o3lite "
             "requirement): pip install torch==2.13.0")
  import transformers  # pylint: disable=g-import-not-at-top
  return torch, transformers


# ---------------------------------------------------------------------------------------
# The machine.


def best_seconds(fn, repeats: int) -> float:
  return common.best_of(fn, repeats)[0]


def matmul_peak(n: int, repeats: int) -> float:
  """Best fp32 FLOP/s of a jitted n x n @ n x n matmul (as in bench/train_speed.py)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return 2 * n ** 3 / best_seconds(lambda: dot(a, b).block_until_ready(), repeats)


def read_bandwidth(mib: int, repeats: int) -> float:
  """Best bytes/s of a jitted sum over an fp32 array of `mib` MiB (read once)."""
  x = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.nbytes / best_seconds(lambda: total(x).block_until_ready(), repeats)


# ---------------------------------------------------------------------------------------
# Work per case.


def matmul_weights(cfg: model_lib.ModelConfig) -> tuple[int, int]:
  """(weights of the per-layer matmuls of all layers, weights of the output projection)."""
  D, N, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return cfg.num_layers * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F), \
      D * cfg.vocab_size


def matmul_only_step(cfg: model_lib.ModelConfig, B: int, repeats: int) -> float:
  """Best seconds of one decode step's matmuls alone, on this machine's XLA:CPU kernels.

  The model's projections (q, k, v, o, gate, up, down per layer, then the output
  projection) as plain `jnp.dot`s of B rows, chained in one jitted function, nothing
  else: no attention, norms or sampling. A decode step cannot be faster than this with
  XLA's own fp32 matmuls, so it bounds what any change to the sampler can reach.
  """
  D, N, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  shapes = [(D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, F), (D, F), (F, D)]
  keys = iter(jax.random.split(jax.random.key(0), len(shapes) * cfg.num_layers + 2))
  layers = [[jax.random.normal(next(keys), shape) * 0.02 for shape in shapes]
            for _ in range(cfg.num_layers)]
  head = jax.random.normal(next(keys), (D, cfg.vocab_size)) * 0.02
  x = jax.random.normal(next(keys), (B, D))

  @jax.jit
  def step(x, layers, head):
    for wq, wk, wv, wo, wg, wu, wd in layers:
      q, k, v = x @ wq, x @ wk, x @ wv  # k, v would go to the cache.
      x = x + (q + jnp.tile(k + v, N // K)) @ wo
      x = (x + ((x @ wg) * (x @ wu)) @ wd) * 0.5  # Keeps the values bounded.
    return x @ head

  return best_seconds(lambda: step(x, layers, head).block_until_ready(), repeats)


def roofline(cfg: model_lib.ModelConfig, num_params: int, B: int, P: int, new: int,
             peak: float, bandwidth: float) -> dict:
  """Ideal seconds of one generate call (prefill + new-1 decode steps) and its bound.

  FLOPs: 2 per matmul weight per token (the output projection only where a token is
  chosen), attention 4 * L * context * N*H per token (q.k and p.v; causal in the prefill).
  Bytes: every parameter read once per forward, the filled KV cache read, the new keys
  and values written (4 bytes each, fp32).
  """
  L, N, K, H = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layers_w, head_w = matmul_weights(cfg)
  kv_bytes_per_token = 2 * L * K * H * 4
  param_bytes = 4 * num_params
  prefill_flops = B * (P * 2 * layers_w + 2 * head_w + 4 * L * N * H * P * (P + 1) / 2)
  prefill_bytes = param_bytes + B * P * kv_bytes_per_token
  ideal = max(prefill_flops / peak, prefill_bytes / bandwidth)
  compute_s = memory_s = 0.0
  for t in range(1, new):  # Decode step t feeds token t-1 at slot P + t - 1.
    context = P + t
    flops = B * (2 * (layers_w + head_w) + 4 * L * N * H * context)
    nbytes = param_bytes + B * context * kv_bytes_per_token
    compute_s += flops / peak
    memory_s += nbytes / bandwidth
    ideal += max(flops / peak, nbytes / bandwidth)
  return {"ideal_seconds": ideal, "prefill_flops": prefill_flops,
          "decode_compute_seconds": compute_s, "decode_memory_seconds": memory_s,
          "bound": "memory" if memory_s > compute_s else "compute"}


# ---------------------------------------------------------------------------------------
# The two samplers.


def hf_model(torch, transformers, cfg: model_lib.ModelConfig, params, max_len: int):
  """A transformers LlamaForCausalLM holding exactly `params`."""
  config = hf_config.hf_config_from_model_config(cfg, eos_id=None, pad_id=0,
                                          max_position_embeddings=max_len)
  config = transformers.LlamaConfig.from_dict(config, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(config).float().eval()
  state = {k: torch.tensor(v) for k, v in hf.params_to_hf(params, cfg).items()}  # Copies.
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
    raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  if cfg.tie_embeddings and (model.lm_head.weight.data_ptr()
                             != model.model.embed_tokens.weight.data_ptr()):
    raise RuntimeError("lm_head is not tied to embed_tokens")
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def o3lite_runner(params, cfg, prompt_BxP: np.ndarray, new: int, compile_s: dict):
  """(generate() -> tokens, prefill() -> None, warmup() -> None) on o3lite's sampler.

  The warmup compiles both functions ahead of time (into the jit cache the calls use),
  recording the seconds in `compile_s["seconds"]`, then makes one full call.
  """
  scfg = sampling.SamplingConfig(max_new_tokens=new, eos_id=-1, pad_id=0)
  prompt = jnp.asarray(prompt_BxP)
  lengths = jnp.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], jnp.int32)
  rng = jax.random.PRNGKey(0)

  def prefill():
    jax.block_until_ready(decoding.prefill(params, prompt, lengths, rng, cfg, scfg))

  def generate():
    state = decoding.prefill(params, prompt, lengths, rng, cfg, scfg)
    state = decoding.decode(params, state, cfg, scfg)
    return np.asarray(state.tokens_BxN)

  def warmup():
    start = time.perf_counter()
    decoding.prefill.lower(params, prompt, lengths, rng, cfg, scfg).compile()
    state = jax.eval_shape(lambda: decoding.prefill(params, prompt, lengths, rng, cfg, scfg))
    with sampling.grown_cache_donation_expected():
      decoding.decode.lower(params, state, cfg, scfg).compile()
    compile_s["seconds"] = time.perf_counter() - start
    generate()

  return generate, prefill, warmup


def hf_runner(torch, model, prompt_BxP: np.ndarray, new: int):
  """(generate() -> tokens, prefill() -> None, warmup() -> None) on transformers."""
  ids = torch.from_numpy(prompt_BxP).long()
  mask = torch.ones_like(ids)

  def prefill():  # What generate's first forward does: a fresh cache, last logits only.
    with torch.inference_mode():
      model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

  def generate(new=new):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                           max_new_tokens=new, min_new_tokens=new)
    return out[:, ids.shape[1]:].numpy().astype(np.int32)

  return generate, prefill, lambda: generate(min(new, 4))


def cpu_seconds() -> tuple[float, float] | None:
  """(CPU seconds all processes have used, CPU seconds this one has), or None off Linux."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  busy = sum(fields[:8]) - fields[3] - fields[4]  # All but idle and iowait.
  own = os.times()
  return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def time_side(generate, prefill, repeats: int, budget_s: float, warmup) -> dict:
  """Times `generate` after one untimed `warmup` call.

  `other_cpu_cores`: CPU cores other processes used on average during the timed calls and
  prefills (from /proc/stat less this process's own time); well above 0: skewed timings.
  """
  start = time.perf_counter()
  warmup()  # o3lite: compiles, then a full call. transformers: a short call.
  first = time.perf_counter() - start
  seconds, tokens = [], None
  cpu_before, wall_start = cpu_seconds(), time.perf_counter()
  while len(seconds) < repeats and sum(seconds) < budget_s:
    start = time.perf_counter()
    tokens = generate()
    seconds.append(time.perf_counter() - start)
  prefill_s = best_seconds(prefill, len(seconds))
  cpu_after, wall, other = cpu_seconds(), time.perf_counter() - wall_start, None
  if cpu_before and cpu_after:
    other = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / wall
  return {"tokens": tokens, "first_call_seconds": first, "seconds": seconds,
          "best_seconds": min(seconds), "median_seconds": statistics.median(seconds),
          "prefill_seconds": prefill_s, "other_cpu_cores": other}


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
  same = ours == theirs
  diverge = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
  return {"rows_identical": float(same.all(1).mean()), "tokens_equal": float(same.mean()),
          "mean_tokens_before_divergence": float(diverge.mean()),
          "distinct_tokens_generated": int(len(np.unique(ours)))}


def logit_diff(torch, model, params, cfg, prompt_BxP: np.ndarray) -> float:
  rows = prompt_BxP[:4]
  positions = np.broadcast_to(np.arange(rows.shape[1], dtype=np.int32), rows.shape)
  ours, _ = jax.jit(model_lib.Transformer(cfg).apply)({"params": params}, rows, positions)
  with torch.inference_mode():
    theirs = model(input_ids=torch.from_numpy(rows).long()).logits.float().numpy()
  return float(np.abs(np.asarray(ours) - theirs).max())


def fmt_cores(cores: float | None) -> str:
  return "?" if cores is None else f"{cores:.2f}"


def run_case(name, torch, transformers, cfg, params, B, P, new, repeats, budget_s, peak,
             bandwidth):
  num_params = model_lib.count_params(params)
  prompt_BxP = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, P)).astype(np.int32)
  model = hf_model(torch, transformers, cfg, params, P + new)
  hf_params = sum(p.numel() for p in model.parameters())  # Tied weights counted once.
  if hf_params != num_params:
    raise RuntimeError(f"parameter counts differ: {num_params} (o3lite) vs {hf_params}")
  load = os.getloadavg()[0]
  sides, compile_s = {}, {}
  for side, (generate, prefill, warmup) in [
      ("o3lite", o3lite_runner(params, cfg, prompt_BxP, new, compile_s)),
      ("transformers", hf_runner(torch, model, prompt_BxP, new)),
  ]:
    sides[side] = time_side(generate, prefill, repeats, budget_s, warmup)
    s = sides[side]
    if s["tokens"].shape != (B, new):
      raise RuntimeError(f"{side} generated {s['tokens'].shape}, expected {(B, new)}")
    s["tokens_per_second"] = B * new / s["best_seconds"]
    s["decode_ms_per_step"] = (s["best_seconds"] - s["prefill_seconds"]) / (new - 1) * 1e3
    print(f"  {side}: best {s['best_seconds']:.3f} s (median {s['median_seconds']:.3f}), "
          f"{len(s['seconds'])} calls, warmup {s['first_call_seconds']:.2f} s, prefill "
          f"{s['prefill_seconds'] * 1e3:.1f} ms, {s['tokens_per_second']:,.0f} tok/s, "
          f"other processes {fmt_cores(s['other_cpu_cores'])} cores", flush=True)
  match = compare(sides["o3lite"].pop("tokens"), sides["transformers"].pop("tokens"))
  match["max_abs_logit_diff"] = logit_diff(torch, model, params, cfg, prompt_BxP)
  ideal = roofline(cfg, num_params, B, P, new, peak, bandwidth)
  ideal["matmul_only_step_seconds"] = matmul_only_step(cfg, B, max(repeats, 10))
  for s in sides.values():
    s["roofline_fraction"] = ideal["ideal_seconds"] / s["best_seconds"]
  o3, th = sides["o3lite"], sides["transformers"]
  o3["compile_seconds"] = compile_s["seconds"]  # Tracing, lowering and XLA compilation.
  del model
  gc.collect()
  return {"case": name, "model": dataclasses.asdict(cfg), "parameters": num_params,
          "batch_size": B, "prompt_len": P, "new_tokens": new,
          "load_average_1min_before": load, "o3lite": o3, "transformers": th,
          "o3lite_over_transformers": o3["tokens_per_second"] / th["tokens_per_second"],
          "match": match, "roofline": ideal}


def main(argv):
  del argv
  common.setup_host_memory()
  torch, transformers = import_torch()  # Fail before any work if the baseline is missing.
  unknown = sorted(set(_CASES.value) - set(CASES))
  if unknown:
    raise app.UsageError(f"unknown cases {unknown}; expected some of {list(CASES)}")
  common.warn_if_busy()
  P, new, repeats = _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value
  matmul_repeats, max_batch = _MATMUL_REPEATS.value, None
  if _QUICK.value:
    P, new, repeats, matmul_repeats, max_batch = 16, 8, 1, 3, 8
  if new < 2:
    raise app.UsageError("--new_tokens must be at least 2 (one prefill, one decode step)")
  torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count())
  load_start = os.getloadavg()
  print(f"load average (1, 5, 15 min): {load_start[0]:.2f} {load_start[1]:.2f} "
        f"{load_start[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
  peak = matmul_peak(_MATMUL_SIZE.value, matmul_repeats)
  bandwidth = read_bandwidth(_BANDWIDTH_MIB.value, matmul_repeats)
  print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (jnp.dot {_MATMUL_SIZE.value}^3), read "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s (jnp.sum of {_BANDWIDTH_MIB.value} MiB)",
        flush=True)

  results, params_by_model = [], {}
  for name in _CASES.value:
    model_name, B = CASES[name]
    B = min(B, max_batch) if max_batch else B
    cfg = MODELS[model_name]()
    if model_name not in params_by_model:
      params_by_model[model_name] = nn.unbox(model_lib.init_params(cfg, jax.random.key(0)))
    print(f"== {name}: batch {B}, prompt {P}, {new} new tokens", flush=True)
    results.append(run_case(name, torch, transformers, cfg, params_by_model[model_name], B,
                            P, new, repeats, _TIME_BUDGET.value, peak, bandwidth))

  load_end = os.getloadavg()
  out = {"prompt_len": P, "new_tokens": new, "repeats": repeats, "quick": _QUICK.value,
         "torch": torch.__version__, "transformers": transformers.__version__,
         "torch_threads": torch.get_num_threads(), "matmul_size": _MATMUL_SIZE.value,
         "peak_flops_per_second": peak, "read_bandwidth_bytes_per_second": bandwidth,
         "load_average_start": load_start, "load_average_end": load_end, "cases": results}
  path = common.write_results("sample_speed", out)
  print(f"\nwrote {path}\n")

  headers = ["case", "params", "batch", "o3lite tok/s", "transformers tok/s", "o3lite / tf",
             "bound", "o3lite roofline", "tf roofline", "rows identical", "tokens equal"]
  rows = [[r["case"], f"{r['parameters'] / 1e6:.2f}M", r["batch_size"],
           f"{r['o3lite']['tokens_per_second']:,.0f}",
           f"{r['transformers']['tokens_per_second']:,.0f}",
           f"{r['o3lite_over_transformers']:.2f}x", r["roofline"]["bound"],
           f"{r['o3lite']['roofline_fraction']:.1%}",
           f"{r['transformers']['roofline_fraction']:.1%}",
           f"{r['match']['rows_identical']:.0%}", f"{r['match']['tokens_equal']:.1%}"]
          for r in results]
  print(common.markdown_table(headers, rows))
  headers = ["case", "o3lite compile", "o3lite prefill", "tf prefill", "o3lite decode/step",
             "tf decode/step", "matmuls alone/step", "ideal", "max abs logit diff",
             "distinct tokens",
             "other load (o3lite / tf)"]
  rows = [[r["case"], f"{r['o3lite']['compile_seconds']:.1f} s",
           f"{r['o3lite']['prefill_seconds'] * 1e3:.1f} ms",
           f"{r['transformers']['prefill_seconds'] * 1e3:.1f} ms",
           *[f"{r[side]['decode_ms_per_step']:.2f} ms"
             if r[side]["decode_ms_per_step"] > 0 else "n/a (noise)"
             for side in ("o3lite", "transformers")],
           f"{r['roofline']['matmul_only_step_seconds'] * 1e3:.2f} ms",
           f"{r['roofline']['ideal_seconds'] * 1e3:.0f} ms",
           f"{r['match']['max_abs_logit_diff']:.1e}", r["match"]["distinct_tokens_generated"],
           f"{fmt_cores(r['o3lite']['other_cpu_cores'])} / "
           f"{fmt_cores(r['transformers']['other_cpu_cores'])} cores"]
          for r in results]
  print()
  print(common.markdown_table(headers, rows))
  print(f"\nprompt {P}, {new} new tokens per row, greedy, no EOS; best of up to {repeats} "
        f"calls (--time_budget {_TIME_BUDGET.value:.0f} s) after 1 warmup, prefill included; "
        f"fp32; {jax.devices()[0].platform} x{jax.device_count()}, torch "
        f"{torch.get_num_threads()} threads; peak "
        f"{peak / 1e9:.1f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s; load average "
        f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end (1 min).")
  busiest = max((r[side]["other_cpu_cores"] or 0.0) for r in results
                for side in ("o3lite", "transformers"))
  if busiest > 0.2:
    print(f"WARNING: other processes used up to {busiest:.2f} of {os.cpu_count()} cores "
          "while this ran: the timings are skewed (torch's threads far more than XLA's). "
          "Measure on an idle machine.")


if __name__ == "__main__":
  app.run(main)
