"""SFT of the tiny model on the default reasoning task (5-step operation chain mod 10).

  python -m o3lite.train --config=configs/sft.py [--workdir=DIR] [--config.a.b=value]

Trains from scratch on this 2-core CPU in a few minutes; held-out greedy exact match ends
in DIR/eval.json. Every field is commented; an unknown key or a wrong type is an error.
"""

import dataclasses
import os

import ml_collections

from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib


def model_fields(model_cfg: model_lib.ModelConfig) -> ml_collections.ConfigDict:
  """The run config's `model` section, filled from a named size."""
  fields = ml_collections.ConfigDict(dataclasses.asdict(model_cfg))
  fields.vocab_size = 0  # 0: take the tokenizer's vocabulary size.
  return fields


def loop(num_steps: int, log_every: int = 50, eval_every: int = 0,
         checkpoint_every: int = 100, keep_checkpoints: int = 2) -> ml_collections.ConfigDict:
  """The `loop` section, the same fields in every stage (o3lite.training.stage)."""
  return ml_collections.ConfigDict({
      "num_steps": num_steps,  # Iterations (optimizer steps; RL: sample-score-update steps).
      "log_every": log_every,  # Iterations between console lines.
      "eval_every": eval_every,  # Iterations between held-out evaluations (0 = at the end only).
      "checkpoint_every": checkpoint_every,  # Iterations between checkpoints.
      "keep_checkpoints": keep_checkpoints,  # How many recent checkpoints to keep.
      "async_checkpointing": True,  # Save in the background while training goes on.
      "max_nonfinite_in_a_row": 10,  # Skipped (NaN / inf) iterations in a row that stop the run.
      # Compile the stage's steps first and stop with a one-line error when XLA's memory
      # estimate exceeds the device's (o3lite/training/memory.py).
      "memory_check": True,
  })


def nested(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An SFT config's own sections, as a nested stage of a bigger run (RL's `warm_start`,
  the verifier run's `policy`): it shares the run's seed, model, data, mesh and eval."""
  plain = c.to_dict()
  return ml_collections.ConfigDict({"method": "sft", **{
      name: plain[name] for name in ("init_from", "sft", "loop", "optimizer")}})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "sft"  # The stage that runs this config (o3lite.training.stage.STAGES).
  c.seed = 0  # Seeds parameter init and the training RNG.
  # Where the policy starts: an o3lite run folder (its latest checkpoint) or a local
  # Hugging Face Llama / Qwen2 folder (its shape replaces the `model` section, whose dtype
  # and remat still apply; its tokenizer replaces data.tokenizer). "" = random init.
  c.init_from = ""

  # Model hyperparameters: fields of o3lite.model.transformer.ModelConfig (tiny: ~0.1M parameters).
  # vocab_size, num_layers, embed_dim, num_heads, num_kv_heads, head_dim, mlp_dim,
  # rope_theta, norm_eps, qkv_bias, tie_embeddings, dtype (compute: float32 | bfloat16),
  # remat (rematerialize blocks in the backward pass).
  c.model = model_fields(model_lib.ModelConfig.tiny())

  c.data = ml_collections.ConfigDict()
  c.data.source = "task"  # "task" (procedural, below) | "gsm8k" | "jsonl".
  c.data.task = "opchain"  # Registered task: opchain | addition | multiplication.
  c.data.task_kwargs = ml_collections.ConfigDict({"steps": 5, "modulus": 10})  # Difficulty.
  c.data.path = ""  # Folder for gsm8k / jsonl sources ("" = GSM8K as shipped in o3lite/data/gsm8k).
  c.data.data_dir = os.path.expanduser("~/.cache/o3lite/datasets")  # TFDS data dir.
  c.data.num_train = 20_000  # Problems per split (task source).
  c.data.num_validation = 500
  c.data.num_test = 500
  c.data.seed = 0  # Seeds problem generation and the split assignment.
  c.data.tokenizer = ""  # SentencePiece .model or HF folder; "" = train one on the data.
  c.data.vocab_size = 128  # Size of the SentencePiece vocabulary trained when none given.
  # Wrap each prompt in the Hugging Face tokenizer's chat template (the question as the
  # user's turn, the completion as the assistant's); needs a tokenizer that has one.
  c.data.chat_template = False
  c.data.with_cot = True  # Train on the chain of thought; False = answer only.
  # Imperfect demonstrations (opchain only, train split only): each `cot_slip_op` step of
  # a training chain is written off by one with this probability (0 = clean chains).
  c.data.cot_slip_rate = 0.0
  c.data.cot_slip_op = "*"
  c.data.seq_len = 128  # Tokens per packed training row.
  # A training example longer than seq_len + 1 tokens: False = a one-line error naming
  # it; True = dropped, and counted in eval.json's `dropped_too_long`.
  c.data.drop_too_long = False
  c.data.pack = True  # Pack several examples per row (else one example per row).

  c.sft = ml_collections.ConfigDict()
  c.sft.batch_size = 32  # Rows per step (global, across all devices).
  c.sft.grad_accum_steps = 1  # Microbatches per step (batch_size must divide).
  # Log-probs over vocabulary chunks of this size (0 = one [B, T, V] log-softmax): a big
  # vocabulary's logits are never held whole (no token-accuracy metric then).
  c.sft.vocab_chunk = 0

  c.loop = loop(num_steps=800, log_every=50, eval_every=400, checkpoint_every=200,
                keep_checkpoints=3)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3  # Peak learning rate.
  c.optimizer.warmup_steps = 100  # Linear warmup from 0.
  c.optimizer.final_lr_fraction = 0.1  # Cosine decays to this fraction of the peak.
  c.optimizer.grad_clip_norm = 1.0  # Global-norm gradient clipping.
  c.optimizer.b1 = 0.9  # AdamW betas and epsilon.
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01  # Decoupled weight decay on matrices.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ("data", "fsdp", "tensor")  # Mesh axis names.
  c.mesh.shape = (-1, 1, 1)  # Devices per axis; -1 takes all remaining devices.
  c.mesh.rules = sharding_lib.DEFAULT_RULES  # Logical axis -> mesh axes.

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"  # Held-out split of the periodic and final evaluations.
  c.eval.num_examples = 500  # Problems evaluated (the first N of the split).
  c.eval.batch_size = 128  # Prompts decoded together.
  c.eval.max_new_tokens = 64  # Cap on generated tokens.
  c.eval.num_samples = 0  # Samples per problem for pass@k / maj@k (0 = greedy only).
  c.eval.temperature = 1.0  # Temperature of those samples.
  c.eval.top_p = 1.0  # Nucleus sampling of those samples (1 = off).
  c.eval.seed = 0  # Seed of those samples.
  c.eval.think_budgets = ()  # Greedy accuracy with the thinking capped at each budget.
  return c
