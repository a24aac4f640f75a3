r"""Can the PPO critic predict outcomes? A critic fitted offline to fixed rollouts.

  python -m bench.critic_fit --sft_dir=RUN/sft             # the warm start of configs/rl.py
  python -m bench.critic_fit --sft_dir=RUN/sft --steps=600 --learning_rates=1e-3,1e-4

Samples `--prompts` x 8 completions of training prompts from the run's policy (temperature
1, as RL does), labels each with the correctness reward, and fits the critic of
`configs/rl.py` (the policy's trunk, a zero head and bias; value loss 0.5 (V - R)^2 over
completion tokens, R = the outcome: Monte Carlo returns, gamma = lambda = 1) with AdamW on
those rollouts only, for `--steps` updates of 128 completions, through the same train step
RL uses. Reports explained variance 1 - Var(R - V) / Var(R) on held-out rollouts of other
prompts: over all completion tokens, over the tokens after the chain's `*` step (the
outcome is settled there: the step's product is right or not), and at the last token.
A critic that cannot do better than the mean here cannot in 100 RL steps either.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import common
from o3lite.data import batching
from o3lite.data import formatting
from o3lite.data import sources
from o3lite.model import heads
from o3lite.parallel import mesh as sharding_lib
from o3lite.rl import algorithms as alg
from o3lite.rl import rewards as rewards_lib
from o3lite.sampling import draws
from o3lite.sampling import policy as policy_lib
from o3lite.training import losses
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import sft as sft_lib
from o3lite.training import state as state_lib
from o3lite.training import step as step_lib

_SFT_DIR = flags.DEFINE_string("sft_dir", None, "SFT run folder (e.g. RL_DIR/sft).",
                               required=True)
_TRUNK_DIR = flags.DEFINE_string(
    "trunk_dir", None, "Run folder whose policy starts the critic's trunk (default: the "
    "SFT run's, as in RL); e.g. an RL run's, whose policy has learned the task.")
_PROMPTS = flags.DEFINE_integer("prompts", 256, "Training prompts (x 8 samples).")
_HELD_OUT = flags.DEFINE_integer("held_out_prompts", 64, "Held-out prompts (x 8).")
_STEPS = flags.DEFINE_integer("steps", 400, "Critic updates.")
_LRS = flags.DEFINE_list("learning_rates", ["1e-3", "1e-4"], "Critic learning rates.")


def _rollouts(run, policy, examples, key):
  tok = run.tokenizer
  prompts = batching.encode_prompts(examples, tok)
  drawn = draws.draw(policy_lib.Policy(policy, run.model_cfg, tok, run.mesh, run.rules),
                     prompts, 8, draws.Sampling(max_new_tokens=48, temperature=1.0,
                                                prompt_bucket=32), key, problems_per_call=64)
  scorer = rewards_lib.RewardScorer({"correctness": 1.0}, rewards_lib.RewardContext(
      sources.get_checker(run.config.data)))
  rows, comps, finished, texts, row_examples = [], [], [], [], []
  for ex, d in zip(examples, drawn):
    for c, text in zip(d.completions, d.texts):
      rows.append(d.prompt)
      comps.append(c.tokens)
      finished.append(c.finished)
      texts.append(text)
      row_examples.append(ex)
  scores = scorer.score(row_examples, texts, [1] * len(texts), 49).total
  scorer.close()
  batch = batching.rollout_batch(rows, comps, finished, 32 + 48 + 1, tok.eos_id, tok.pad_id)
  batch["returns"] = batch["mask"] * scores[:, None]
  # Targets after the result of the chain's last `*` step (where the outcome is settled:
  # the other steps do not slip): found on the decoded text, mapped back to tokens.
  after = np.zeros_like(batch["mask"])
  for b, (prompt, completion) in enumerate(zip(rows, comps)):
    text = tok.decode(completion)
    chain = text.split(formatting.THINK_END)[0]
    star = chain.rfind("*")
    if star < 0 or "=" not in chain[star:]:
      continue
    result_char = chain.index("=", star) + 1  # The step's (one-digit) result.
    for i in range(len(completion)):
      if len(tok.decode(completion[:i + 1])) > result_char:
        after[b, len(prompt) - 1 + i + 1:] = batch["mask"][b, len(prompt) - 1 + i + 1:]
        break
  batch["after_star"] = after
  return batch, scores


def main(argv):
  del argv
  common.setup_host_memory()
  run, policy = sft_lib.load_run(_SFT_DIR.value)
  train = sources.load_examples(run.config.data, "train")
  examples = [train[i] for i in range(_PROMPTS.value)]
  held = [train[i] for i in range(_PROMPTS.value, _PROMPTS.value + _HELD_OUT.value)]
  t0 = time.time()
  fit_batch, fit_scores = _rollouts(run, policy, examples, jax.random.PRNGKey(1))
  test_batch, test_scores = _rollouts(run, policy, held, jax.random.PRNGKey(2))
  print(f"rollouts: {len(fit_scores)} to fit (accuracy {fit_scores.mean():.3f}), "
        f"{len(test_scores)} held out ({test_scores.mean():.3f}); {time.time() - t0:.0f} s",
        flush=True)
  model_cfg = run.model_cfg
  critic = heads.ScalarHead(model_cfg)
  trunk = sft_lib.load_run(_TRUNK_DIR.value)[1] if _TRUNK_DIR.value else policy

  def value_loss(params, frozen, batch):
    del frozen
    values = critic.apply({"params": params["critic"]}, batch["inputs"],
                          batch["positions"], batch["segment_ids"])
    m = batch["mask"]
    return losses.LossSums(jnp.sum(0.5 * jnp.square(values - batch["returns"]) * m),
                           jnp.sum(m), {})

  def predict(params, batch):
    return critic.apply({"params": params["critic"]}, batch["inputs"], batch["positions"],
                        batch["segment_ids"])

  keys = ("inputs", "targets", "positions", "segment_ids", "mask", "returns")
  rows = []
  for lr in [float(x) for x in _LRS.value]:
    opt = ml_collections.ConfigDict(dict(learning_rate=lr, warmup_steps=5,
                                         final_lr_fraction=1.0, grad_clip_norm=1.0, b1=0.9,
                                         b2=0.99, eps=1e-8, weight_decay=0.0))
    tx, _ = optimizer_lib.make_optimizer(opt, _STEPS.value, {"critic": None})
    spec = state_lib.StateSpec(
        lambda rng: ({"critic": heads.init_scalar_head(model_cfg, rng)}, {}), tx,
        run.mesh, run.rules)
    zeros = lambda a: jnp.zeros(a.shape, a.dtype)
    start = {"critic": {"trunk": trunk,
                        "head": zeros(spec.abstract.params["critic"]["head"]),
                        "bias": zeros(spec.abstract.params["critic"]["bias"])}}
    state = spec.around(start, {}, 0)
    bs = sharding_lib.batch_sharding(run.mesh, run.rules)
    step = step_lib.jit_train_step(step_lib.make_train_step(value_loss, tx), spec.shardings,
                                   bs, run.mesh, run.rules)
    rng = np.random.default_rng(0)
    n = len(fit_scores)
    curve = []
    for i in range(_STEPS.value):
      idx = rng.choice(n, 128, replace=False)
      state, metrics = step(state, sharding_lib.put_global_batch(
          {k: fit_batch[k][idx] for k in keys}, bs))
      if (i + 1) % max(_STEPS.value // 4, 1) == 0:
        v = np.asarray(jax.jit(predict)(state.params, {k: test_batch[k] for k in keys}))
        curve.append((i + 1, alg.explained_variance(v, test_batch["returns"],
                                                    test_batch["mask"])))
    v = np.asarray(jax.jit(predict)(state.params, {k: test_batch[k] for k in keys}))
    last = np.zeros_like(test_batch["mask"])
    ends = test_batch["mask"].sum(1).astype(int) + (test_batch["mask"].argmax(1)) - 1
    last[np.arange(len(ends)), ends] = 1
    ev_all = alg.explained_variance(v, test_batch["returns"], test_batch["mask"])
    ev_after = alg.explained_variance(v, test_batch["returns"],
                                      test_batch["mask"] * test_batch["after_star"])
    ev_last = alg.explained_variance(v, test_batch["returns"], last)
    fit_v = np.asarray(jax.jit(predict)(state.params, {k: fit_batch[k] for k in keys}))
    ev_fit = alg.explained_variance(fit_v, fit_batch["returns"], fit_batch["mask"])
    rows.append([f"{lr:g}", str(_STEPS.value), f"{ev_fit:.3f}", f"{ev_all:.3f}",
                 f"{ev_after:.3f}", f"{ev_last:.3f}",
                 " ".join(f"{s}:{e:.3f}" for s, e in curve)])
    print(rows[-1], flush=True)
  print(common.markdown_table(
      ["critic lr", "updates", "EV on the fitted rollouts", "EV held out (all tokens)",
       "held out, after the * step", "held out, last token", "held-out EV by update"],
      rows))
  common.write_results("critic_fit", {"rows": rows, "sft_dir": _SFT_DIR.value})


if __name__ == "__main__":
  app.run(main)
