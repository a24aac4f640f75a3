"""PPO-family RL of Qwen2.5-0.5B on GSM8K with its `####` answer checker.

  python -m o3lite.train --config=configs/rl_qwen_gsm8k.py \\
      --config.init_from=/path/to/Qwen2.5-0.5B-Instruct [--workdir=DIR]

Starts straight from a local Hugging Face Qwen2 folder (config.json, safetensors, tokenizer;
nothing is downloaded): no SFT warm start. The think delimiters become two new tokens
(embedding rows set to the mean of the trained rows), and the model learns to use them
from the format reward. Memory (`python -m bench.rl_memory`, XLA's memory analysis of the
compiled functions): an update of a 32-completion minibatch of 768 tokens, in 4
microbatches, with log-probs over vocabulary chunks of 8,192, peaks at 37 GiB (7.4 GiB
of policy, reference and AdamW state in fp32); the scoring pass at 10 GiB; the rollouts'
KV cache (16 prompts x 8 samples x 769 slots, bf16) adds about 1.1 GiB. So one 80 GB GPU
(H100 / A100-80GB) holds it with room; a 40 GB one does not reliably. Without chunks and
microbatches the update needed 129 GiB. On 8 devices the mesh below shards parameters
over fsdp and the batch over data. On this repository's 2-core CPU it only builds and
starts (minutes per step).
"""

from configs import rl


def get_config():
  c = rl.get_config()
  c.data.source = "gsm8k"
  c.data.path = ""  # "" = the copy that ships in o3lite/data/gsm8k.
  c.data.vocab_size = 2048  # Unused: the checkpoint's tokenizer is used.
  c.data.cot_slip_rate = 0.0  # No warm start, and slips are an opchain device anyway.
  c.data.seq_len = 512
  c.model.dtype = "bfloat16"  # Compute dtype (parameters and optimizer stay fp32).
  c.model.remat = True  # Rematerialize blocks in the backward pass.
  c.mesh.shape = (-1, 1, 1)  # e.g. (2, 4, 1) on 8 devices to shard parameters (fsdp).

  c.init_from = ""  # Required: the local Qwen2.5-0.5B(-Instruct) folder.
  c.rl.advantage = "grpo"  # Group-normalized outcome rewards, no critic.
  c.rl.loss_aggregation = "token-mean"
  c.rl.clip_high = 0.28  # DAPO clip-higher.
  c.rl.kl_coef = 0.001  # Small anchor to the starting model, k3 in the loss.
  c.loop.num_steps = 200
  c.rl.prompts_per_step = 16
  c.rl.group_size = 8
  c.rl.minibatch_size = 32
  c.rl.grad_accum_steps = 4  # Microbatches of 8 completions (bench/rl_memory.py).
  c.rl.max_prompt_len = 256
  c.rl.max_new_tokens = 512
  c.optimizer.learning_rate = 1e-6
  c.optimizer.warmup_steps = 10
  c.rl.vocab_chunk = 8192  # Log-probs over 19 chunks of the 151,936-token vocabulary.
  c.rl.dynamic_sampling = True  # DAPO: refill groups whose rewards are all equal.
  c.loop.checkpoint_every = 20
  c.loop.eval_every = 50

  c.eval.num_examples = 200
  c.eval.batch_size = 32
  c.eval.max_new_tokens = 512
  c.eval.num_samples = 4
  return c
