r"""What the verifiers' shared passes save: PRM step scores in one forward pass, and Monte
Carlo step labels from primed, forked prefixes, each against its naive form.

  python -m bench.verifier_speed            # both parts, ~5 min on 2 idle cores
  python -m bench.verifier_speed --quick    # smoke run (~40 s)
  # --models=tiny,small --solutions=256 --batch_size=64 --seq_len=0
  # --mc_solutions=64 --ks=4,16 --mc_batch_size=32 --max_new_tokens=48 --repeats=3
  # --parts=prm,monte_carlo --data_dir=DIR

Data: the default task of `configs/sft.py` (its tokenizer, `sources.get_tokenizer`; the
first problems of its test split), solutions = the reference chains,
`formatting.format_completion(cot, answer)`, so step counts and lengths are the real
ones (5 steps; prompt + solution + EOS about 49 tokens). Weights are random.

(1) PRM scoring. A random verifier (`heads.init_scalar_head`, unboxed, its zero head
    replaced by N(0, 1 / D) so the scores are not all 0.5) of each `--models` shape
    (vocabulary = the tokenizer's), `--solutions` solutions, rows of
    [`--batch_size`, `--seq_len`] on both paths (`--seq_len=0`: the longest row rounded
    up to 16):
      one pass:   `Verifier(kind="prm").score_steps`: one row per solution, every step's
                  score read at its last token in the same forward pass;
      per prefix: one row per (solution, step i): prompt + the solution's tokens up to
                  step i's last token, its score read at the row's last position (a PRM
                  without the one-pass read, or an outcome model used to score steps).
                  Built here from the same public pieces (`encode`, `rows`, `logits` in
                  the same jitted sigmoid); it encodes every solution as the one pass does.
    Both give the same scores (asserted, max |difference| <= 1e-5) before timing.
    solutions/s, steps/s (steps scored), tokens/s (prompt + solution + EOS of the scored
    solutions, each counted once: the work done, so its ratio is the speedup too);
    "tokens fed" counts the non-padding tokens each path puts through the model.
(2) Monte Carlo labels (Math-Shepherd): a random `ModelConfig.tiny()` policy
    (`model.init_params`), `--mc_solutions` solutions, k completions of every distinct
    (solution, step) prefix, greedy (temperature 0: a random policy's text is garbage,
    so only identical tokens make the two paths comparable), `--max_new_tokens` each
    (a row may still stop earlier at EOS), `--mc_batch_size` prefixes per sampler call:
      forked:     `labellers.LABELLERS["monte_carlo"]`: per call, `sampler.prime` puts the
                  batch_size prefixes in the cache once, `sampler.fork` makes k rows of
                  each, `sampler.continue_` decodes all batch_size * k rows;
      re-prefill: the same prefixes and k completions through `sampler.sample` with
                  `num_samples=1` on each prefix repeated k times, batch_size * k rows per
                  call: `decoding.prefill` runs every row's whole prefix through the model
                  (no row shares another's cache: only `num_samples > 1` would fork
                  after the prefill), then the same `decoding.decode`. Same prefixes
                  (`steps.token_spans` boundaries, shared prefixes once), sampling
                  settings, call shapes, outcome check.
    Both must give identical labels and identical completion texts, in the same order
    (asserted; the outcome check records every text it judges: a random policy's labels
    are all 0). prefixes/s, rollouts/s (prefixes x k), speedup. Forking saves prefill
    rows only (k times fewer), so the speedup shrinks as decoding dominates: about 35
    prefix tokens against 48 new ones here; `--max_new_tokens=1` isolates the prefill.
Every timed path runs once untimed first (compiles), then the best of `--repeats`
(`common.best_of`). Prints Markdown tables, writes `bench/results/verifier_speed.json`.
"""

from __future__ import annotations

import dataclasses

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from configs import sft as sft_config
from o3lite.data import formatting, sources
from o3lite.model import heads
from o3lite.model import transformer as model_lib
from o3lite.sampling import sampler
from o3lite.verifiers import labellers
from o3lite.verifiers import reward_model as rm
from o3lite.verifiers import steps as steps_lib

_PARTS = flags.DEFINE_list("parts", ["prm", "monte_carlo"], "Which parts to run.")
_MODELS = flags.DEFINE_list("models", ["tiny", "small"], "(1): ModelConfig.named sizes.")
_SOLUTIONS = flags.DEFINE_integer("solutions", 256, "(1): solutions scored.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "(1): rows per forward pass.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "(1): tokens per row; 0 = the longest "
                                "solution's row rounded up to 16.")
_MC_SOLUTIONS = flags.DEFINE_integer("mc_solutions", 64, "(2): solutions labelled.")
_KS = flags.DEFINE_list("ks", ["4", "16"], "(2): completions per step prefix.")
_MC_BATCH_SIZE = flags.DEFINE_integer("mc_batch_size", 32, "(2): prefixes per sampler call "
                                      "(configs/prm.py's).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 48, "(2): tokens per completion "
                                       "(configs/prm.py's).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per path; the best counts.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: configs/sft.py's).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: (1) 32 solutions, batch 16; (2) 8 "
                           "solutions, k 4, 4 prefixes per call, 8 new tokens; 1 repeat.")

_SCORE_TOLERANCE = 1e-5


def random_verifier(cfg: model_lib.ModelConfig, seed: int = 0):
  """A ScalarHead tree with random trunk and head (the init's zero head scores all 0.5)."""
  trunk_key, head_key = jax.random.split(jax.random.key(seed))
  params = nn.unbox(heads.init_scalar_head(cfg, trunk_key))
  D = cfg.embed_dim
  params["head"] = jax.random.normal(head_key, (D,), jnp.float32) / np.sqrt(D)
  return params


def prm_scoring(name, cfg, tokenizer, examples, solutions, batch_size, seq_len, repeats):
  """(1) for one model shape: the one-pass PRM against one row per step prefix."""
  params = random_verifier(cfg)
  verifier = rm.Verifier(params, cfg, tokenizer, "prm", seq_len, batch_size)
  probability = jax.jit(lambda p, batch: jax.nn.sigmoid(rm.logits(p, batch, cfg)))

  def one_pass():
    return verifier.score_steps(examples, solutions)

  def per_prefix():
    encoded = [rm.encode(e["question"], s, tokenizer, "prm")
               for e, s in zip(examples, solutions)]
    prefixes = [rm.Encoded(e.tokens[:r + 1], [r], [None]) for e in encoded for r in e.reads]
    flat = []
    for begin in range(0, len(prefixes), batch_size):
      chunk = prefixes[begin:begin + batch_size]
      batch = rm.rows(chunk, seq_len, tokenizer.pad_id, batch_size)
      p_BxT = np.asarray(probability(
          params, {k: batch[k] for k in ("inputs", "positions", "segment_ids")}))
      flat += [float(p_BxT[b, e.reads[0]]) for b, e in enumerate(chunk)]
    out, at = [], 0
    for e in encoded:
      out.append(flat[at:at + len(e.reads)])
      at += len(e.reads)
    return out

  one_s, one_out = common.best_of(one_pass, repeats)
  pre_s, pre_out = common.best_of(per_prefix, repeats)
  assert [len(x) for x in one_out] == [len(x) for x in pre_out], "step counts differ"
  one_flat, pre_flat = np.concatenate(one_out), np.concatenate(pre_out)
  max_diff = float(np.max(np.abs(one_flat - pre_flat)))
  assert max_diff <= _SCORE_TOLERANCE, f"{name}: one-pass and per-prefix scores differ " \
      f"by up to {max_diff:.2e}"
  assert np.std(one_flat) > 1e-3, f"{name}: the random verifier's scores are all alike"
  # The host's share of both paths: tokenizing the solutions and placing their steps.
  encode_s, encoded = common.best_of(
      lambda: [rm.encode(e["question"], s, tokenizer, "prm") for e, s in zip(examples, solutions)],
      repeats)
  n, steps = len(solutions), int(sum(len(e.reads) for e in encoded))
  tokens = int(sum(len(e.tokens) for e in encoded))
  fed_prefix = int(sum(r + 1 for e in encoded for r in e.reads))
  calls = lambda rows: -(-rows // batch_size)
  path = lambda seconds, rows, fed: {
      "seconds": seconds, "rows": rows, "forward_passes": calls(rows), "tokens_fed": fed,
      "solutions_per_second": n / seconds, "steps_per_second": steps / seconds,
      "tokens_per_second": tokens / seconds}
  return {"model": name, "parameters": model_lib.count_params(params), "solutions": n,
          "steps": steps, "tokens": tokens, "batch_size": batch_size, "seq_len": seq_len,
          "max_abs_score_difference": max_diff, "encode_seconds": encode_s,
          "one_pass": path(one_s, n, tokens), "per_prefix": path(pre_s, steps, fed_prefix),
          "speedup": pre_s / one_s}


def reprefilled_labels(examples, solutions, rollouts: labellers.Rollouts
                       ) -> tuple[list[labellers.StepLabels], dict[str, int]]:
  """The Monte Carlo labels of `labellers.monte_carlo` with every one of the k rows of a
  prefix prefilling that whole prefix itself; and the tokens of the distinct prefixes and
  the new tokens sampled."""
  mc, tok = rollouts.config, rollouts.tokenizer
  sampling_cfg = sampler.SamplingConfig(
      max_new_tokens=mc.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
      temperature=mc.temperature, prompt_bucket=mc.prompt_bucket, num_samples=1)
  shared: dict[tuple, list[tuple]] = {}  # Distinct prefix -> its (solution, step, written)s.
  step_counts = []
  for s, (example, solution) in enumerate(zip(examples, solutions)):
    prompt = tok.encode(formatting.format_prompt(example["question"]))
    written = tok.encode(solution)
    found = steps_lib.split_completion(tok.decode(written))
    step_counts.append(len(found))
    for i, span in enumerate(steps_lib.token_spans(written, tok.decode, found)):
      prefix = written[:span.boundary]
      shared.setdefault((tuple(prompt + prefix), example["answer"]), []).append((s, i, prefix))
  k = mc.k
  repeated = [list(tokens) for tokens, _ in shared for _ in range(k)]
  rows = sampler.sample(rollouts.params, repeated, rollouts.model_cfg, sampling_cfg,
                        mc.batch_size * k, jax.random.PRNGKey(mc.seed))
  hits = [[0] * n for n in step_counts]
  for d, group in enumerate(shared.values()):
    first, _, written = group[0]
    correct = sum(int(rollouts.outcome(examples[first], tok.decode(written + row[0].tokens)))
                  for row in rows[d * k:(d + 1) * k])
    for s, i, _ in group:
      hits[s][i] = correct
  labels = [labellers.StepLabels([int(h > 0) for h in row], [h / k for h in row])
            for row in hits]
  return labels, {"prefix_tokens": sum(len(tokens) for tokens, _ in shared),
                  "new_tokens": sum(len(row[0].tokens) for row in rows)}


def monte_carlo_labelling(params, cfg, tokenizer, examples, solutions, checker, k,
                          batch_size, max_new_tokens, repeats):
  """(2) for one k: the registered labeller (prime / fork / continue_) against
  re-prefilling every row."""
  judged: list[str] = []  # Every completion text the outcome check sees, in order.
  check = labellers.answer_outcome(checker)

  def outcome(example, text):
    judged.append(text)
    return check(example, text)

  rollouts = labellers.Rollouts(
      params, cfg, tokenizer,
      labellers.MonteCarloConfig(k=k, temperature=0.0, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size),
      outcome)

  def forked():
    judged.clear()
    return labellers.LABELLERS["monte_carlo"](examples, solutions, rollouts), list(judged)

  def reprefill():
    judged.clear()
    labels, counts = reprefilled_labels(examples, solutions, rollouts)
    return labels, list(judged), counts

  fork_s, (fork_labels, fork_texts) = common.best_of(forked, repeats)
  re_s, (re_labels, re_texts, counts) = common.best_of(reprefill, repeats)
  assert fork_texts == re_texts, f"k={k}: forked and re-prefilled completions differ"
  assert fork_labels == re_labels, f"k={k}: forked and re-prefilled labels differ"
  prefixes = len(re_texts) // k
  rollout_count = prefixes * k
  calls = -(-prefixes // batch_size)
  return {"k": k, "prefixes": prefixes, "rollouts": rollout_count,
          "sampler_calls": calls, "prefill_rows_forked": calls * batch_size,
          "prefill_rows_reprefill": calls * batch_size * k,
          "mean_prefix_tokens": counts["prefix_tokens"] / prefixes,
          "mean_new_tokens": counts["new_tokens"] / rollout_count,
          "positive_labels": float(np.mean([h for x in fork_labels for h in x.hard])),
          "forked_seconds": fork_s, "reprefill_seconds": re_s,
          "forked_prefixes_per_second": prefixes / fork_s,
          "reprefill_prefixes_per_second": prefixes / re_s,
          "forked_rollouts_per_second": rollout_count / fork_s,
          "reprefill_rollouts_per_second": rollout_count / re_s,
          "speedup": re_s / fork_s}


def main(argv):
  del argv
  common.setup_host_memory()
  common.warn_if_busy()
  models, n, batch_size, seq_len = (_MODELS.value, _SOLUTIONS.value, _BATCH_SIZE.value,
                                    _SEQ_LEN.value)
  mc_n, ks, mc_batch, max_new = (_MC_SOLUTIONS.value, [int(k) for k in _KS.value],
                                 _MC_BATCH_SIZE.value, _MAX_NEW_TOKENS.value)
  repeats = _REPEATS.value
  if _QUICK.value:
    n, batch_size, mc_n, ks, mc_batch, max_new, repeats = 32, 16, 8, [4], 4, 8, 1
  data_cfg = sft_config.get_config().data
  if _DATA_DIR.value:
    data_cfg.data_dir = _DATA_DIR.value
  tokenizer = sources.get_tokenizer(data_cfg)
  examples = list(sources.load_examples(data_cfg, "test"))
  solutions = [formatting.format_completion(e["cot"], e["answer"]) for e in examples]
  print(f"{data_cfg.task} test split: {len(examples)} problems, tokenizer of "
        f"{tokenizer.vocab_size} pieces; {jax.devices()[0].platform} x{jax.device_count()}",
        flush=True)
  results = {"quick": _QUICK.value, "repeats": repeats, "task": data_cfg.task,
             "task_kwargs": dict(data_cfg.task_kwargs), "vocab_size": tokenizer.vocab_size}

  prm = []
  if "prm" in _PARTS.value:
    ex, sols = examples[:n], solutions[:n]
    if not seq_len:
      longest = max(len(rm.encode(e["question"], s, tokenizer, "prm").tokens)
                    for e, s in zip(ex, sols))
      seq_len = -(-longest // 16) * 16
    for name in models:
      cfg = model_lib.ModelConfig.named(name, vocab_size=tokenizer.vocab_size)
      prm.append(prm_scoring(name, cfg, tokenizer, ex, sols, batch_size, seq_len, repeats))
      prm[-1]["model_config"] = dataclasses.asdict(cfg)
      print({k: v for k, v in prm[-1].items() if k != "model_config"}, flush=True)
    results["prm_scoring"] = prm

  mc = []
  if "monte_carlo" in _PARTS.value:
    cfg = model_lib.ModelConfig.tiny(vocab_size=tokenizer.vocab_size)
    params = nn.unbox(model_lib.init_params(cfg, jax.random.key(0)))
    checker = sources.get_checker(data_cfg)
    for k in ks:
      mc.append(monte_carlo_labelling(params, cfg, tokenizer, examples[:mc_n],
                                      solutions[:mc_n], checker, k, mc_batch, max_new,
                                      repeats))
      print(mc[-1], flush=True)
    results["monte_carlo"] = {"model": "tiny", "model_config": dataclasses.asdict(cfg),
                              "parameters": model_lib.count_params(params),
                              "solutions": mc_n, "batch_size": mc_batch,
                              "max_new_tokens": max_new, "temperature": 0.0, "runs": mc}

  path = common.write_results("verifier_speed", results)
  print(f"\nwrote {path}\n")
  if prm:
    rows = []
    for r in prm:
      for key, label in (("one_pass", "one pass"), ("per_prefix", "per prefix")):
        p = r[key]
        rows.append([f"{r['model']} ({r['parameters'] / 1e6:.2f}M)", label,
                     f"{p['rows']} x {r['seq_len']}", f"{p['tokens_fed']:,}",
                     f"{p['seconds']:.3f} s",
                     f"{p['solutions_per_second']:,.0f}", f"{p['steps_per_second']:,.0f}",
                     f"{p['tokens_per_second']:,.0f}",
                     f"{r['speedup']:.2f}x" if key == "one_pass" else ""])
    print(f"PRM scoring: {prm[0]['solutions']} solutions, {prm[0]['steps']} steps, "
          f"batch {prm[0]['batch_size']}")
    print(common.markdown_table(
        ["model", "path", "rows", "tokens fed", "seconds", "solutions/s", "steps/s", "tokens/s",
         "speedup"], rows))
    print(f"(both paths include encoding the solutions on the host, `reward_model.encode`: "
          f"{prm[0]['encode_seconds']:.3f} s)\n")
  if mc:
    print(f"Monte Carlo labels: {mc_n} solutions, tiny policy, greedy, {max_new} new "
          f"tokens max, {mc_batch} prefixes per call")
    print(common.markdown_table(
        ["k", "prefixes", "rollouts", "forked prefixes/s", "re-prefill prefixes/s",
         "forked rollouts/s", "re-prefill rollouts/s", "speedup"],
        [[r["k"], r["prefixes"], r["rollouts"], f"{r['forked_prefixes_per_second']:,.1f}",
          f"{r['reprefill_prefixes_per_second']:,.1f}",
          f"{r['forked_rollouts_per_second']:,.0f}",
          f"{r['reprefill_rollouts_per_second']:,.0f}", f"{r['speedup']:.2f}x"]
         for r in mc]))


if __name__ == "__main__":
  app.run(main)
