r"""Wall time of step-level PRM beam search against best-of-N at the same budget, and
MCTS problems per second.

  python -m bench.search_speed --policy=RUN --prm=PRM_RUN    # a trained policy and PRM
  python -m bench.search_speed                                # random tiny policy and PRM
  python -m bench.search_speed --quick                        # smoke run

For each N in `--budgets`, on the same `--problems` held-out problems (the policy run's
test split, or the default task's): `best_of_n` (N samples per problem, the PRM scores
every candidate once) and `beam` (N beams, keep N / `--expand`, one step at a time, the
PRM scoring every live beam after every step), both through `o3lite.search.core`; each
path runs once untimed (compiling its shapes), then the two take turns for `--repeats`
timed runs each (a slow spell of the machine hits both). Reported: generated tokens per
problem, verifier tokens per problem, the best seconds of each, and beam's wall time
over best-of-N's: best over best, per generated token, and the median (and range) of
the paired turns, each beam turn over the best-of-N turn just before it. Target (issue 11): at
most 1.5x (search-and-learn's beam search is about 20x best-of-N's wall time, one
prompt at a time). Then `mcts` at `--mcts_simulations` simulations: problems per second
(if the strategy is registered). Writes `bench/results/search_speed.json`.
"""

from __future__ import annotations

from absl import app
from absl import flags
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from bench import common
from o3lite.data import sources
from o3lite.model import heads
from o3lite.model import transformer as model_lib
from o3lite.search import core
from o3lite.training import sft as sft_lib
from o3lite.verifiers import reward_model
from o3lite.verifiers import run as verifier_run

_POLICY = flags.DEFINE_string("policy", "", "Policy run folder ('' = random tiny model).")
_PRM = flags.DEFINE_string("prm", "", "PRM run folder ('' = random head on the policy).")
_PROBLEMS = flags.DEFINE_integer("problems", 64, "Held-out problems searched together.")
_BUDGETS = flags.DEFINE_list("budgets", ["4", "16", "64"], "N: samples / beams.")
_EXPAND = flags.DEFINE_integer("expand", 4, "Beam: each kept beam is forked this often.")
_STEP_TOKENS = flags.DEFINE_integer("step_tokens", 16, "Beam: most tokens per step.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 8, "Beam: most steps.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Best-of-N: most tokens.")
_MCTS = flags.DEFINE_integer("mcts_simulations", 16, "MCTS simulations per problem.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per path, taking turns "
                                "(the best counts).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 8 problems, N = 4.")


def _setup():
  if _POLICY.value:
    run, params = sft_lib.load_run(_POLICY.value)
    policy = core.Policy(params, run.model_cfg, run.tokenizer, run.mesh, run.rules)
    data_cfg = run.config.data
  else:
    from configs import sft  # pylint: disable=g-import-not-at-top
    data_cfg = sft.get_config().data
    tok = sources.get_tokenizer(data_cfg)
    cfg = model_lib.ModelConfig.tiny(vocab_size=tok.vocab_size)
    policy = core.Policy(nn.unbox(model_lib.init_params(cfg, jax.random.key(0))), cfg, tok)
  if _PRM.value:
    prm = verifier_run.load_verifier(_PRM.value, 256)
  else:
    head = nn.unbox(heads.init_scalar_head(policy.model_cfg, jax.random.key(1)))
    head["head"] = jax.random.normal(jax.random.key(2), head["head"].shape)
    prm = reward_model.Verifier(head, policy.model_cfg, policy.tokenizer, "prm", 128, 256)
  examples = sources.load_examples(ml_collections.ConfigDict(data_cfg.to_dict()), "test")
  problems = [examples[i] for i in range(_PROBLEMS.value if not _QUICK.value else 8)]
  return policy, prm, problems


def main(argv):
  del argv
  common.setup_host_memory()
  common.warn_if_busy()
  policy, prm, problems = _setup()
  budgets = [4] if _QUICK.value else [int(b) for b in _BUDGETS.value]
  sampling = core.Sampling(max_new_tokens=_MAX_NEW.value, temperature=1.0,
                           rows_per_call=max(budgets) * len(problems))
  rows, results = [], {"problems": len(problems), "budgets": budgets, "runs": []}

  def call(name, budget, **options):
    return lambda: core.run_strategy(name, problems, policy, prm, budget, 0,
                                     sampling=sampling, **options)

  def record(name, budget, seconds, out, **options):
    gen = sum(r.compute.generated_tokens for r in out) / len(out)
    ver = sum(r.compute.verifier_tokens for r in out) / len(out)
    return {"strategy": name, "budget": budget, "seconds": seconds,
            "generated_tokens": gen, "verifier_tokens": ver, **options}

  for n in budgets:
    options = {"expand": min(_EXPAND.value, n), "step_tokens": _STEP_TOKENS.value,
               "max_steps": _MAX_STEPS.value}
    (bon_s, bon_out, bon_t), (beam_s, beam_out, beam_t) = common.best_of_interleaved(
        [call("best_of_n", n), call("beam", n, **options)], _REPEATS.value)
    bon = record("best_of_n", n, bon_s, bon_out)
    beam = record("beam", n, beam_s, beam_out, **options)
    ratio = beam["seconds"] / bon["seconds"]
    # Each turn's beam time over the best-of-N time just before it: paired, so a slow
    # spell of the machine cancels; their median and range.
    turns = sorted(b / o for b, o in zip(beam_t, bon_t))
    beam["turn_ratios"] = turns
    per_token = ratio * bon["generated_tokens"] / max(beam["generated_tokens"], 1)
    results["runs"] += [bon, beam]
    for r in (bon, beam):
      rows.append([r["strategy"], n, f"{r['generated_tokens']:,.0f}",
                   f"{r['verifier_tokens']:,.0f}", f"{r['seconds']:.2f} s",
                   f"{ratio:.2f}x / {per_token:.2f}x; turns: median {np.median(turns):.2f}x "
                   f"({turns[0]:.2f}-{turns[-1]:.2f})" if r is beam else ""])
  print(f"{len(problems)} problems searched together")
  print(common.markdown_table(
      ["strategy", "N", "generated tok / problem", "verifier tok / problem", "seconds",
       "beam / best-of-N (best / best, per generated token; paired turns)"], rows))
  if "mcts" in core.STRATEGIES and _MCTS.value:
    mcts = record("mcts", _MCTS.value, *common.best_of(call("mcts", _MCTS.value),
                                                       _REPEATS.value))
    mcts["problems_per_second"] = len(problems) / mcts["seconds"]
    results["mcts"] = mcts
    print(f"mcts, {_MCTS.value} simulations: {mcts['problems_per_second']:.2f} problems/s "
          f"({mcts['generated_tokens']:,.0f} generated tokens per problem)")
  print(f"wrote {common.write_results('search_speed', results)}")


if __name__ == "__main__":
  app.run(main)
