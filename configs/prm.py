"""A process reward model (PRM) of the tiny policy's own solutions, end to end.

  python -m o3lite.train --config=configs/prm.py [--workdir=DIR] [--config.verifier.a=value]

With `init_from` empty it first trains the policy (the nested `policy` section: the SFT
warm start of configs/rl.py, on chains with 30% slips, so it makes real mistakes) in
DIR/policy, samples
its solutions to training problems, labels every step (Monte Carlo, Math-Shepherd, by
default), trains the PRM (the policy's trunk + a scalar head, binary cross-entropy at
every step's last token) and judges it on held-out solutions against exact step labels:
DIR/eval.json, DIR/reliability.png. Every field is commented; a typo is an error.
"""

import ml_collections

from configs import rl
from configs import sft


def get_config() -> ml_collections.ConfigDict:
  c = rl.get_config()  # seed, model, data, mesh, eval; its warm start is our policy.
  c.method = "verifier"  # The stage that runs this config.
  # The policy whose solutions are labelled: an o3lite run folder or a local Hugging Face
  # folder; "" = the nested `policy` below (configs/sft.py's sections), SFT in DIR/policy.
  c.init_from = ""
  c.policy = c.warm_start
  del c["warm_start"]
  del c["rl"]
  # Chains written with slips at half configs/rl.py's rate: the policy's sampled held-out
  # pass@1 is then 40-60% (measured: 45.9%), so its solutions mix right and wrong steps.
  c.data.cot_slip_rate = 0.3
  c.eval.num_samples = 0  # The policy's own held-out evaluation: greedy only.

  v = c.verifier = ml_collections.ConfigDict()
  v.kind = "prm"  # prm (a score per step) | orm (a score per solution).
  # Where the verifier's trunk starts: a run folder or a local HF folder; "" = the policy.
  v.trunk_from = ""
  # Labelled JSONL files (o3lite.verifiers.label_files) to train / evaluate on instead of
  # sampling and labelling into DIR/labels/ ("" = make them).
  v.labels = ""
  v.eval_labels = ""

  # Solutions: the first num_problems training problems (eval_problems of eval.split for
  # the held-out judgement), samples_per_problem each.
  v.num_problems = 1000
  v.eval_problems = 200
  v.samples_per_problem = 4
  v.temperature = 1.0  # Sampling temperature of the solutions.
  v.max_new_tokens = 48  # Cap on solution tokens.
  v.sample_batch_size = 64  # Problems per sampler call.
  v.prompt_bucket = 32  # Prompt lengths are padded to a multiple of this.
  v.seed = 0  # Sampling seed (the held-out solutions use seed + 1).

  # Step labels (o3lite.verifiers.labellers): exact | monte_carlo | outcome; held-out
  # solutions always get exact labels where the task has them.
  v.labeller = "monte_carlo"
  v.consensus_with = ""  # "" | exact | outcome: keep only labels both labellers give.
  v.monte_carlo = ml_collections.ConfigDict({
      "k": 8,  # Completions per step prefix.
      "temperature": 1.0,  # Their sampling temperature.
      "max_new_tokens": 48,  # Tokens each may add after its prefix.
      "batch_size": 32,  # Step prefixes per sampler call (x k rows).
      "seed": 0,
      "prompt_bucket": 16,  # Prefix lengths are padded to a multiple of this.
  })
  v.soft_labels = False  # Train on the Monte Carlo fractions instead of the hard labels.
  # PRM: one more read, at the EOS after the answer, trained on the outcome: the PRM
  # then judges the final answer too (`score_outcomes`; search's aggregation "answer").
  v.answer_read = False

  # Training (the one train step and loop; the same optimizer fields as `optimizer`).
  v.loss = "bce"  # bce | bradley_terry (orm only: correct vs wrong pairs of a question).
  v.seq_len = 96  # Tokens per row: prompt + solution + EOS (a longer one is an error).
  v.batch_size = 32  # Solutions per step.
  c.loop = sft.loop(num_steps=300, log_every=50, eval_every=0, checkpoint_every=100,
                    keep_checkpoints=2)
  # The reward model's optimizer (o3lite.training.optimizer).
  c.optimizer = ml_collections.ConfigDict({
      "learning_rate": 1e-3, "warmup_steps": 30, "final_lr_fraction": 0.1,
      "grad_clip_norm": 1.0, "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 0.01})

  # Held-out judgement.
  v.eval_batch_size = 64  # Solutions scored per call.
  v.threshold = 0.5  # A step (solution) scored below this is called wrong.
  return c
