"""PPO on verifiable rewards: the design card's main command.

  python -m o3lite.train --config=configs/rl.py [--workdir=DIR] [--config.rl.a=value]

With `init_from` empty it first runs a short SFT warm start in DIR/sft (the nested
`warm_start` section: configs/sft.py's own sections, with this run's model, data, mesh and
eval; it stops early on purpose, so RL has room to improve), then RL from it. DIR/eval.json holds the held-out
metrics before and after RL. Every field is commented; a typo is an error.
"""

import ml_collections

from configs import sft


def get_config() -> ml_collections.ConfigDict:
  c = sft.get_config()  # seed, model, data, mesh, eval: shared with the warm start.
  c.method = "rl"  # The stage that runs this config.
  # The policy RL starts from: an o3lite run folder or a local Hugging Face folder;
  # "" = the `warm_start` below, trained in DIR/sft.
  c.init_from = ""

  # The SFT warm start, on imperfect demonstrations: in 60% of the training chains each
  # `*` step is written off by one, so the warm-started model slips the same way and RL
  # has something real to fix (measured: RESULTS.md).
  c.data.cot_slip_rate = 0.6
  c.warm_start = sft.nested(c)  # method, init_from, sft, loop, optimizer (configs/sft.py).
  c.warm_start.loop.num_steps = 800  # SFT steps of the warm start.
  c.warm_start.loop.eval_every = 0  # No periodic evaluation during the warm start.
  c.warm_start.loop.checkpoint_every = 50
  del c["sft"]

  c.eval.num_examples = 500  # Held-out problems evaluated before and after RL.
  c.eval.num_samples = 8  # Samples per problem for pass@k and maj@k.

  # RL steps (sample, score, update); metrics.jsonl gets every step.
  c.loop = sft.loop(num_steps=100, log_every=10, eval_every=50, checkpoint_every=10,
                    keep_checkpoints=2)
  # The RL updates' optimizer (o3lite.training.optimizer): steps are minibatch updates;
  # final_lr_fraction 1 keeps the rate constant after warmup.
  c.optimizer = ml_collections.ConfigDict({
      "learning_rate": 3e-4,  # Policy AdamW peak learning rate.
      "warmup_steps": 5,  # Linear warmup of both models' learning rates, in updates.
      "final_lr_fraction": 1.0,  # Constant after the warmup.
      "grad_clip_norm": 1.0,  # Global-norm clipping of each model's gradient.
      "b1": 0.9, "b2": 0.99, "eps": 1e-8,  # AdamW betas and epsilon.
      "weight_decay": 0.0,  # Decoupled weight decay on matrices.
  })

  c.rl = ml_collections.ConfigDict()
  c.rl.prompts_per_step = 32  # Training prompts sampled per step.
  c.rl.group_size = 8  # Completions per prompt.
  c.rl.max_prompt_len = 32  # Prompts are padded to this many tokens (one compile).
  c.rl.max_new_tokens = 48  # Cap on completion tokens.
  c.rl.temperature = 1.0  # Sampling temperature of the rollouts.
  c.rl.epochs = 1  # Passes over each step's samples.
  c.rl.minibatch_size = 128  # Completions per update (divides prompts x group).
  c.rl.grad_accum_steps = 1  # Microbatches per update (same update, less memory).
  c.rl.value_learning_rate = 1e-3  # The critic's peak learning rate (same schedule).
  c.rl.vocab_chunk = 0  # Vocabulary columns per log-sum-exp chunk in the learner (0 = all).

  # The algorithm (o3lite.rl.algorithms; names are registered functions).
  c.rl.advantage = "gae"  # gae (PPO with a critic) | grpo | dr_grpo | rloo.
  c.rl.policy_loss = "ppo"  # Clipped-ratio surrogate.
  c.rl.loss_aggregation = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum.
  c.rl.gamma = 1.0  # GAE discount.
  c.rl.lam = 0.95  # GAE lambda.
  c.rl.clip_low = 0.2  # Ratio clipped to [1 - clip_low, 1 + clip_high].
  c.rl.clip_high = 0.2  # > clip_low: DAPO clip-higher.
  c.rl.dual_clip = 0.0  # Dual-clip constant (> 1) for negative advantages; 0 = off.
  c.rl.value_clip = 0.2  # Clip of the critic's move from its old values; 0 = off.
  c.rl.kl_estimator = "k3"  # k1 | k2 | k3 estimator of KL(policy || reference).
  c.rl.kl_coef = 0.0  # KL weight (0 = no KL term).
  c.rl.kl_in_reward = False  # True: KL penalty per token in the reward; False: in the loss.
  c.rl.entropy_coef = 0.0  # Entropy bonus weight.
  c.rl.eps = 1e-6  # Added to the group std (grpo).
  c.rl.dynamic_sampling = False  # DAPO: drop groups with equal rewards and refill.
  c.rl.max_sampling_rounds = 3  # Sampling rounds per step when refilling.

  # Weighted reward functions (o3lite.rl.rewards): correctness, format, length_penalty.
  # Correctness alone here: the warm start already keeps the format, and a small format
  # weight would, after group normalization, turn format noise into full-size advantages.
  c.rl.rewards = ml_collections.ConfigDict({"correctness": 1.0})
  # A reward call past this (per completion: a batched call of n gets n x this) scores
  # 0 and is counted.
  c.rl.reward_timeout_s = 5.0

  # Options of reward functions registered as factories (a model judge): {name: {...}}.
  c.rl.reward_options = ml_collections.ConfigDict()

  # Process rewards: a registered step reward (o3lite.rl.rewards.STEP_REWARDS) scores every
  # sampled step; its reward sits at the step's last token, added to the outcome rewards
  # above (set rl.rewards.correctness=0 for process rewards alone). "prm": a frozen PRM
  # (a verifier run folder, configs/prm.py) scores each step.
  c.rl.process_reward = ml_collections.ConfigDict({
      "function": "",  # The step reward's name ("prm"); "" = no process rewards.
      "options": ml_collections.ConfigDict({  # Its options (prm: these two).
          "verifier": "",  # The PRM's run folder.
          "batch_size": 64,  # Completions per PRM call.
      }),
      "weight": 1.0,  # Scale of the step rewards.
      "mode": "score",  # score (r_i = p_i) | difference (r_i = p_i - p_{i-1}, p_0 = 0).
  })
  return c
