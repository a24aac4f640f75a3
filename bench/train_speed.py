r"""Training throughput of o3lite's jitted SFT step vs a transformers + torch AdamW step.

  pip install torch==2.13.0   # the baseline only; not an o3lite requirement
  python -m bench.train_speed                          # ModelConfig.small(), batch 32 x 128
  python -m bench.train_speed --steps=3 --warmup=1     # smoke run

Both sides train the same model shape (`ModelConfig.small()`: 4 layers, width 256,
vocabulary 512, 4 heads of 64, mlp 1024, tied embeddings) in fp32 on one synthetic batch
that stays on the device, so only the step is timed (no data pipeline, no host transfer):

  o3lite: `step.make_train_step` with the `sft_cross_entropy` loss + `step.jit_train_step`
          on the state of `state.policy_spec` (mesh ("data", "fsdp", "tensor") =
          (-1, 1, 1) over whatever devices JAX sees, `mesh.DEFAULT_RULES`), the optimizer
          of `configs/sft.py` (clip 1.0 + AdamW); metrics blocked on every step;
          `--kernels` picks `ModelConfig.kernels` (auto: the XLA:CPU forms on a CPU).
  torch:  `transformers.LlamaForCausalLM` (random init), logits -> cross-entropy,
          backward, `clip_grad_norm_(1.0)`, AdamW (decay on matrices only), zero_grad.

Each side runs `--warmup` untimed steps (compilation); then the two sides take turns, one
timed step each, `--steps` times (so drift in the machine's speed hits both alike); the
median step time gives tokens/s. The machine's fp32 matmul peak is the best of several
jitted `jnp.dot`s of square matrices; MFU = analytic step FLOPs / step time / that peak.
Prints a Markdown table and writes `bench/results/train_speed.json`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from configs import sft as sft_config
from o3lite.model import transformer as model_lib
from o3lite.training import optimizer as optimizer_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import losses
from o3lite.training import state as train_state_lib
from o3lite.training import step as step_lib

_MODEL = flags.DEFINE_string("model", "small", "Named o3lite.model.ModelConfig size.")
_KERNELS = flags.DEFINE_enum("kernels", "auto", ["auto", "xla_cpu", "plain"],
                             "ModelConfig.kernels of the o3lite side.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per framework.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first compiles).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak-FLOP/s matmul.")
_MATMUL_REPEATS = flags.DEFINE_integer("matmul_repeats", 10, "Peak matmul: best of this many.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", None, "torch intra-op threads (default: os.cpu_count()). On a busy "
    "machine torch's OpenMP threads slow down far more than XLA's: measure on an idle one.")


def import_torch():
  """(torch, transformers), or exit with how to install the baseline."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("bench/train_speed.py needs PyTorch for its baseline (it is not an o3lite "
             "requirement): pip install torch==2.13.0")
  import transformers  # pylint: disable=g-import-not-at-top
  return torch, transformers


def step_flops(cfg: model_lib.ModelConfig, batch_size: int, seq_len: int) -> float:
  """Analytic FLOPs of one training step (forward + backward = 3x forward).

    FLOPs = tokens * (6 * P_matmul + 6 * D * V + 12 * L * T * N * H)

  P_matmul are the weights of the per-layer matmuls (q, k, v, o, gate, up, down):
  L * (D*N*H + 2*D*K*H + N*H*D + 3*D*F); each costs 2 FLOPs per token forward and 4
  backward. 6 * D * V is the (tied) output projection; the embedding gather, norms,
  rotary, softmax and optimizer are not counted. 12 * L * T * N*H is attention: per query
  token, q.k^T and probs.v are 2 * T * N*H FLOPs each forward, x3 for the backward; the
  full T x T square is counted (the causal half is not subtracted), as in PaLM's MFU.
  """
  L, D, V, T = cfg.num_layers, cfg.embed_dim, cfg.vocab_size, seq_len
  N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  p_matmul = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
  per_token = 6 * p_matmul + 6 * D * V + 12 * L * T * N * H
  return float(batch_size * seq_len * per_token)


def matmul_peak(n: int, repeats: int) -> float:
  """Best fp32 FLOP/s of a jitted n x n @ n x n matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def torch_matmul_rate(torch, n: int, repeats: int) -> float:
  """Best fp32 FLOP/s of torch.mm at the same size (for comparison, not the peak)."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """One fully packed row per sequence: every token is a completion token."""
  rng = np.random.default_rng(0)
  shape = (batch_size, seq_len)
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
      "segment_ids": np.ones(shape, np.int32),
      "loss_mask": np.ones(shape, np.float32),
  }


def time_steps(steps_by_name: dict, warmup: int, steps: int) -> dict:
  """{name: (losses of the warmup steps, seconds of each timed step)}; each `step()` must
  block. The timed steps alternate between the frameworks, so a machine whose speed
  drifts (a shared host, throttling) slows both alike instead of whichever ran second."""
  losses = {name: [step() for _ in range(warmup)] for name, step in steps_by_name.items()}
  seconds = {name: [] for name in steps_by_name}
  for _ in range(steps):
    for name, step in steps_by_name.items():
      start = time.perf_counter()
      step()
      seconds[name].append(time.perf_counter() - start)
  return {name: (losses[name], seconds[name]) for name in steps_by_name}


def o3lite_runner(model_cfg, batch_np, total_steps: int):
  """(params, step() -> loss) for o3lite's jitted, donated SFT step."""
  mesh = sharding_lib.make_mesh(("data", "fsdp", "tensor"), (-1, 1, 1))
  rules = sharding_lib.DEFAULT_RULES
  tx, _ = optimizer_lib.make_optimizer(sft_config.get_config().optimizer, total_steps)
  # The schedule's warmup starts at learning rate 0, so the first step leaves the
  # parameters unchanged (same loss twice); the speed does not depend on it.
  spec = train_state_lib.policy_spec(model_cfg, tx, mesh, rules)
  state = spec.create(seed=0)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  step_fn = step_lib.jit_train_step(step_lib.make_train_step(
      losses.get_loss("sft_cross_entropy", model_cfg), tx), spec.shardings, batch_sharding,
                                    mesh, rules)
  batch = sharding_lib.put_global_batch(batch_np, batch_sharding)
  num_params = model_lib.count_params(state.params)
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch)
    return float(jax.block_until_ready(metrics)["loss"])

  return num_params, step


def torch_runner(torch, transformers, model_cfg, batch_np):
  """(params, step() -> loss) for an eager transformers Llama with torch AdamW."""
  if model_cfg.qkv_bias or not model_cfg.tie_embeddings:
    raise ValueError("the torch baseline models a Llama with tied embeddings only")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.embed_dim,
      intermediate_size=model_cfg.mlp_dim, num_hidden_layers=model_cfg.num_layers,
      num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_kv_heads,
      head_dim=model_cfg.head_dim, rms_norm_eps=model_cfg.norm_eps,
      rope_theta=model_cfg.rope_theta, max_position_embeddings=batch_np["inputs"].shape[1],
      attention_bias=False, mlp_bias=False, tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(config).float().train()
  opt_cfg = sft_config.get_config().optimizer
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW(
      [{"params": decay, "weight_decay": opt_cfg.weight_decay},
       {"params": no_decay, "weight_decay": 0.0}],
      lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
  inputs = torch.from_numpy(batch_np["inputs"]).long()
  targets = torch.from_numpy(batch_np["targets"]).long()
  positions = torch.from_numpy(batch_np["positions"]).long()
  num_params = sum(p.numel() for p in model.parameters())  # Tied weights counted once.

  def step():
    logits_BxTxV = model(input_ids=inputs, position_ids=positions).logits
    loss = torch.nn.functional.cross_entropy(
        logits_BxTxV.reshape(-1, logits_BxTxV.shape[-1]).float(), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  return num_params, step


def summarize(name: str, num_params: int, losses, seconds, tokens: int, flops: float,
              peak: float) -> dict:
  median = statistics.median(seconds)
  return {
      "framework": name,
      "parameters": num_params,
      "warmup_losses": losses,
      "step_seconds": seconds,
      "median_step_seconds": median,
      "mean_step_seconds": statistics.fmean(seconds),
      "tokens_per_second": tokens / median,
      "flops_per_second": flops / median,
      "mfu": flops / median / peak,
  }


def main(argv):
  del argv
  common.setup_host_memory()
  torch, transformers = import_torch()  # Fail before any work if the baseline is missing.
  common.warn_if_busy()
  model_cfg = model_lib.ModelConfig.named(_MODEL.value, kernels=_KERNELS.value)
  B, T = _BATCH_SIZE.value, _SEQ_LEN.value
  tokens, flops = B * T, step_flops(model_cfg, B, T)
  batch_np = synthetic_batch(model_cfg.vocab_size, B, T)

  torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count())
  peak = matmul_peak(_MATMUL_SIZE.value, _MATMUL_REPEATS.value)
  torch_mm = torch_matmul_rate(torch, _MATMUL_SIZE.value, _MATMUL_REPEATS.value)
  print(f"fp32 matmul {_MATMUL_SIZE.value}^3: jnp.dot {peak / 1e9:.1f} GFLOP/s (peak), "
        f"torch.mm {torch_mm / 1e9:.1f} GFLOP/s", flush=True)

  total_steps = _WARMUP.value + _STEPS.value
  runners = {
      "o3lite (JAX)": o3lite_runner(model_cfg, batch_np, total_steps),
      "transformers + torch": torch_runner(torch, transformers, model_cfg, batch_np),
  }
  timings = time_steps({name: step for name, (_, step) in runners.items()},
                       _WARMUP.value, _STEPS.value)
  runs = []
  for name, (num_params, _) in runners.items():
    losses, seconds = timings[name]
    runs.append(summarize(name, num_params, losses, seconds, tokens, flops, peak))
    print(f"{name}: median step {runs[-1]['median_step_seconds'] * 1e3:.1f} ms, "
          f"warmup losses {[round(x, 3) for x in losses]}", flush=True)
  if runs[0]["parameters"] != runs[1]["parameters"]:
    raise RuntimeError(f"parameter counts differ: {runs[0]['parameters']} (o3lite) vs "
                       f"{runs[1]['parameters']} (torch); the shapes do not match")

  ratio = runs[0]["tokens_per_second"] / runs[1]["tokens_per_second"]
  results = {
      "model": dataclasses.asdict(model_cfg), "batch_size": B, "seq_len": T,
      "steps": _STEPS.value, "warmup": _WARMUP.value, "torch": torch.__version__,
      "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
      "matmul_size": _MATMUL_SIZE.value, "peak_flops_per_second": peak,
      "torch_matmul_flops_per_second": torch_mm, "step_flops": flops,
      "o3lite_over_torch": ratio, "runs": runs,
  }
  path = common.write_results("train_speed", results)
  print(f"\nwrote {path}\n")
  headers = ["framework", "median step", "tokens/s", "GFLOP/s", "MFU", "vs torch"]
  rows = [[r["framework"], f"{r['median_step_seconds'] * 1e3:.1f} ms",
           f"{r['tokens_per_second']:,.0f}", f"{r['flops_per_second'] / 1e9:.1f}",
           f"{r['mfu']:.1%}", f"{r['tokens_per_second'] / runs[1]['tokens_per_second']:.2f}x"]
          for r in runs]
  print(common.markdown_table(headers, rows))
  print(f"\nModelConfig.{_MODEL.value}(): {runs[0]['parameters']:,} parameters; "
        f"batch {B} x {T}; {flops / 1e9:.2f} GFLOP per step; fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (jnp.dot {_MATMUL_SIZE.value}^3, best of "
        f"{_MATMUL_REPEATS.value}); median of {_STEPS.value} alternating steps after "
        f"{_WARMUP.value} warmup; {jax.devices()[0].platform} x{jax.device_count()}, "
        f"torch {torch.get_num_threads()} threads.")


if __name__ == "__main__":
  app.run(main)
