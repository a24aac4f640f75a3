r"""Decoding long chains: compile time, steady new tokens per second and the process's peak
resident memory at 256 to 16,384 new tokens, against a floor.

  python -m bench.long_decode                        # 256, 1024, 4096, 16384 new tokens
  python -m bench.long_decode --lengths=256,1024 --before_src=/path/to/old/checkout

`ModelConfig.small()` (4 layers, width 256, 4 heads of 64, 4 kv heads, vocabulary 512;
random weights), batch 8, random prompts of 16 tokens, greedy, no EOS (`eos_id=-1`): every
row decodes exactly N tokens. Each length runs in its own process (`--child`), so its
peak resident memory (`ru_maxrss`) is its own. In the child:

  compile   seconds of ahead-of-time compilation of the prefill and the decode loop
  decode    a timed decode call of N - 1 steps (the prefill chose the first token) with
            the compiled executable (best of 3 up to 1,024 tokens, else one): new
            tokens/s = 8 x (N - 1) / seconds, and ms per step
  floor     ms per step of the same step as plain `jnp` ops chained in one jitted
            function: the projections, the output head, and attention over a filled cache
            of the chain's mean context (prompt + N / 2) as einsums and a softmax, nothing
            else (no cache writes, norms, RoPE or sampling). Attention's cost grows with
            the context linearly, so the floor at the mean context is the mean floor.

`--before_src=DIR` also runs the lengths up to 4,096 with the o3lite in DIR (an older
checkout: its `decoding.prefill` / `decoding.decode` API, the cache grown in 32-slot
segments, one loop per segment): the "before" column. Writes
`bench/results/long_decode.json` and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096", "16384"], "New tokens.")
_BEFORE = flags.DEFINE_string("before_src", "", "An older o3lite checkout: the 'before' column.")
_BEFORE_MAX = flags.DEFINE_integer("before_max", 4096, "Longest length run 'before'.")
_CHILD = flags.DEFINE_bool("child", False, "Measure one length in this process.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "The child's length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_DECODE_MAX = flags.DEFINE_integer("decode_max", 4096, "Longer lengths are compiled and "
                                   "measured for memory, not decoded (a 16,384-token "
                                   "chain takes over 10 minutes on a 2-core CPU).")
_CHUNK = flags.DEFINE_integer("attention_chunk", -1, "SamplingConfig.attention_chunk "
                              "(-1: its default).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def floor_step_ms(cfg, B: int, context: int, repeats: int = 5) -> float:
  """Best ms of one decode step as plain jnp ops (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  D, N, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  shapes = [(D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, F), (D, F), (F, D)]
  keys = iter(jax.random.split(jax.random.key(0), (len(shapes) + 1) * cfg.num_layers + 2))
  layers = [[jax.random.normal(next(keys), s) * 0.02 for s in shapes]
            for _ in range(cfg.num_layers)]
  caches = [(jax.random.normal(next(keys), (B, K, context, H)),) * 2
            for _ in range(cfg.num_layers)]
  head = jax.random.normal(next(keys), (D, cfg.vocab_size)) * 0.02
  x = jax.random.normal(next(keys), (B, D))

  @jax.jit
  def step(x, layers, caches, head):
    for (wq, wk, wv, wo, wg, wu, wd), (k_c, v_c) in zip(layers, caches):
      q = (x @ wq).reshape(B, K, N // K, H)
      k, v = x @ wk, x @ wv  # Would be written to the cache.
      logits = jnp.einsum("bkgh,bksh->bkgs", q, k_c) * H ** -0.5
      attn = jnp.einsum("bkgs,bksh->bkgh", jax.nn.softmax(logits, axis=-1), v_c)
      x = x + (attn.reshape(B, N * H) + jnp.tile(k + v, N // K) * 0.0) @ wo
      x = (x + ((x @ wg) * (x @ wu)) @ wd) * 0.5
    return x @ head

  step(x, layers, caches, head).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    step(x, layers, caches, head).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def child() -> dict:
  """One length, this process: compile seconds, decode tokens/s, floor, peak RSS."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from o3lite.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from o3lite.sampling import decoding  # pylint: disable=g-import-not-at-top
  from o3lite.sampling.choice import SamplingConfig  # pylint: disable=g-import-not-at-top

  B, P, new = _BATCH.value, _PROMPT.value, _NEW.value
  cfg = model_lib.ModelConfig.small()
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(0)))
  prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (B, P)), jnp.int32)
  lengths = jnp.full((B,), P, jnp.int32)
  rng = jax.random.PRNGKey(0)
  scfg = SamplingConfig(max_new_tokens=new, eos_id=-1, pad_id=0,
                        **({} if _CHUNK.value < 0 else {"attention_chunk": _CHUNK.value}))
  current = hasattr(decoding, "_decode")  # This checkout's one-loop decode.

  t0 = time.perf_counter()
  if current:
    capacity = scfg.cache_slots(P + new)
    ccfg = scfg.compiled()
    prefill = decoding._prefill.lower(  # pylint: disable=protected-access
        params, prompt, lengths, rng, cfg, ccfg, capacity).compile()
    state = prefill(params, prompt, lengths, rng)
    decode = decoding._decode.lower(  # pylint: disable=protected-access
        params, state, jnp.int32(new), cfg, ccfg).compile()
    run_prefill = lambda: prefill(params, prompt, lengths, rng)
    run_decode = lambda s: decode(params, s, jnp.int32(new))
    slots = capacity
  else:  # An older checkout: decode is the jitted function itself.
    prefill = decoding.prefill.lower(params, prompt, lengths, rng, cfg, scfg).compile()
    state = prefill(params, prompt, lengths, rng)
    decode = decoding.decode.lower(params, state, cfg, scfg).compile()
    run_prefill = lambda: prefill(params, prompt, lengths, rng)
    run_decode = lambda s: decode(params, s)
    slots = P + new
  compile_s = time.perf_counter() - t0  # (Includes one prefill: milliseconds.)

  decoded = new <= _DECODE_MAX.value
  row = {"new_tokens": new, "batch": B, "prompt_len": P, "cache_slots": slots,
         "one_loop": current, "compile_s": compile_s, "decoded": decoded}
  if decoded:
    decode_s = float("inf")
    for _ in range(3 if new <= 1024 else 1):  # Best of 3 where a call is short.
      state = run_prefill()
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      state = run_decode(state)
      tokens = np.asarray(state.tokens_BxN)
      decode_s = min(decode_s, time.perf_counter() - t0)
    assert int(state.num_new_B.min()) == new, "every row decodes exactly N tokens"
    steps = new - 1
    row.update(decode_s=decode_s, tokens_per_s=B * steps / decode_s,
               ms_per_step=decode_s / steps * 1e3,
               floor_ms_per_step=floor_step_ms(cfg, B, P + new // 2),
               first_tokens=tokens[0, :8].tolist())
  row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return row


def run_child(new: int, src: str) -> dict:
  env = {**os.environ, "PYTHONPATH": src}
  # This script, with the o3lite of `src` first on the path.
  chunk = [f"--attention_chunk={_CHUNK.value}"] if src == ROOT else []
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                        f"--new_tokens={new}", f"--batch={_BATCH.value}",
                        f"--prompt_len={_PROMPT.value}",
                        f"--decode_max={_DECODE_MAX.value}", *chunk],
                       cwd=src, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"child at {new} tokens ({src}) failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(child()), flush=True)
    return
  sys.path.insert(0, ROOT)
  from bench import common  # pylint: disable=g-import-not-at-top
  common.warn_if_busy()
  rows = []
  for n in [int(x) for x in _LENGTHS.value]:
    row = {"after": run_child(n, ROOT)}
    if _BEFORE.value and n <= _BEFORE_MAX.value:
      row["before"] = run_child(n, os.path.abspath(_BEFORE.value))
    rows.append(row)
    print(json.dumps(row), flush=True)
  table = []
  for row in rows:
    a, b = row["after"], row.get("before")
    fmt = lambda r, key, f: "" if r is None else f.format(r[key])
    decoded = a["decoded"]
    table.append([a["new_tokens"], fmt(b, "compile_s", "{:.1f} s"), f"{a['compile_s']:.1f} s",
                  fmt(b, "tokens_per_s", "{:,.0f}"),
                  f"{a['tokens_per_s']:,.0f}" if decoded else "not decoded",
                  f"{a['ms_per_step']:.2f} / {a['floor_ms_per_step']:.2f} "
                  f"({a['ms_per_step'] / a['floor_ms_per_step']:.2f}x)" if decoded else "",
                  fmt(b, "peak_rss_gib", "{:.2f}"), f"{a['peak_rss_gib']:.2f}"])
  print(common.markdown_table(
      ["new tokens", "compile before", "compile after", "tokens/s before", "tokens/s after",
       "ms/step after / floor", "peak RSS GiB before", "peak RSS GiB after"], table))
  print("wrote", common.write_results("long_decode", {"rows": rows}))


if __name__ == "__main__":
  app.run(main)
