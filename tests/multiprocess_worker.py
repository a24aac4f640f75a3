r"""One process of the two-process CPU test (spawned by tests/test_multiprocess.py).

  PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python tests/multiprocess_worker.py 127.0.0.1:PORT NUM_PROCESSES PROCESS_ID

Joins the run with `o3lite.distributed.maybe_initialize`, builds one mesh over every
process's devices, trains the tiny model for a few SFT steps on a fixed global batch,
scores a fixed round and one RL sampling step with reward functions that would give
each process other values (see `reward_rounds`), and prints one JSON line: process
count, global and local device counts, the losses and the rewards. The test imports
`train_losses` to run the same steps in one process as the reference.
"""

from __future__ import annotations

import json
import sys
import types

import jax
import ml_collections
import numpy as np

from o3lite.parallel import multiprocess as distributed
from o3lite.model import transformer as model_lib
from o3lite.training import optimizer as optimizer_lib
from o3lite.training import losses as losses_lib
from o3lite.training import step as step_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import state as train_state_lib
from o3lite.rl import rewards as rewards_lib
from o3lite.rl import rollouts
from o3lite.sampling import draws
from o3lite.sampling import policy as policy_lib

AXES = ("data", "fsdp", "tensor")
MESH_SHAPE = (2, 2, 1)  # data x fsdp over the 4 global devices of two processes.
RULES = sharding_lib.DEFAULT_RULES
NUM_STEPS = 3


def opt_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, final_lr_fraction=0.1, grad_clip_norm=1.0,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


def global_batch(B: int = 8, T: int = 16, V: int = 64) -> dict[str, np.ndarray]:
  """The same random [B, T] batch in every process (fixed seed)."""
  rng = np.random.default_rng(0)
  return dict(inputs=rng.integers(0, V, (B, T)).astype(np.int32),
              targets=rng.integers(0, V, (B, T)).astype(np.int32),
              loss_mask=(rng.random((B, T)) > 0.3).astype(np.float32),
              segment_ids=np.ones((B, T), np.int32),
              positions=np.tile(np.arange(T), (B, 1)).astype(np.int32))


def train_losses(mesh_shape, devices, steps: int = NUM_STEPS) -> list[float]:
  """Losses of `steps` SFT steps of the tiny model on a mesh over `devices`."""
  return train(mesh_shape, devices, steps)[0]


def train(mesh_shape, devices, steps: int = NUM_STEPS):
  """(losses, the train state after them, the mesh) of `train_losses`."""
  model_cfg = model_lib.ModelConfig.tiny(vocab_size=64)
  tx, _ = optimizer_lib.make_optimizer(opt_config(), 10)
  mesh = sharding_lib.make_mesh(AXES, mesh_shape, devices)
  spec = train_state_lib.policy_spec(model_cfg, tx, mesh, RULES)
  state = spec.create(seed=0)
  batch_sharding = sharding_lib.batch_sharding(mesh, RULES)
  step = step_lib.jit_train_step(step_lib.make_train_step(
      losses_lib.get_loss("sft_cross_entropy", model_cfg), tx),
      spec.shardings, batch_sharding, mesh, RULES)
  batch = sharding_lib.put_global_batch(global_batch(), batch_sharding)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))  # Replicated scalar: readable in every process.
  return losses, state, mesh


def reward_rounds(state, mesh) -> dict:
  """A fixed round scored directly, then one DAPO sampling step (`sample_groups`) of the
  model in `state` on `mesh`, with two reward functions that give these values on
  process 0 only: a batched "judge" (the completion's index: every group informative)
  and "flaky" (raises on question q0). Elsewhere the judge gives 0 to all (no group
  informative, so more sampling rounds) and flaky never fails: only scores broadcast
  from process 0 keep the processes in step. Returns the scores, the counts and each
  function's calls in this process."""
  is_main = jax.process_index() == 0
  calls = {"judge": 0, "flaky": 0}
  table = rewards_lib.RewardRegistry()

  @table.register("judge", batched=True)
  def judge(examples, completions, **_):
    calls["judge"] += 1
    return [float(i) if is_main else 0.0 for i in range(len(completions))]

  @table.register("flaky")
  def flaky(example, completion, **_):
    calls["flaky"] += 1
    if is_main and example["question"] == "q0":
      raise RuntimeError("reward bug on process 0")
    return 1.0

  scorer = rewards_lib.RewardScorer({"judge": 1.0, "flaky": 0.5}, rewards_lib.RewardContext(),
                                    rewards=table)
  examples = [{"question": f"q{i % 2}", "answer": "2"} for i in range(4)]
  direct = scorer.score(examples, ["a", "b", "c", "d"], [1, 2, 3, 4], max_tokens=8)

  model_cfg = model_lib.ModelConfig.tiny(vocab_size=64)
  tokenizer = types.SimpleNamespace(eos_id=1, pad_id=0,
                                    encode=lambda text: [3 + len(text) % 50, 4, 5],
                                    decode=lambda tokens: " ".join(map(str, tokens)))
  stream = rollouts.PromptStream([{"question": f"q{i}", "cot": "", "answer": "2"}
                                  for i in range(4)], tokenizer, seed=0, max_prompt_len=8)
  settings = rollouts.RolloutSettings(prompts_per_step=2, group_size=2,
                                      dynamic_sampling=True, max_sampling_rounds=3)
  policy = policy_lib.Policy(state.params["policy"], model_cfg, tokenizer, mesh, RULES)
  groups, position, stats = rollouts.sample_groups(
      policy, settings, draws.Sampling(max_new_tokens=4, temperature=1.0, prompt_bucket=8),
      stream, 0, jax.random.fold_in(state.rng, 0), scorer)
  scorer.close()
  return {"direct": {"total": direct.total.tolist(), "failures": direct.failures,
                     "timeouts": direct.timeouts},
          "step": {"questions": [stream.examples[i]["question"]
                                 for i in stream.take(0, 2)[0]],
                   "scores": [g["scores"].tolist() for g in groups],
                   "completions": [[c.tokens for c in g["group"]] for g in groups],
                   "position": position, **stats},
          "calls": calls}


def main(argv: list[str]) -> None:
  coordinator, num_processes, process_id = argv[1], int(argv[2]), int(argv[3])
  distributed.maybe_initialize(True, coordinator, num_processes, process_id)
  losses, state, mesh = train(MESH_SHAPE, jax.devices())
  rewards = reward_rounds(state, mesh)
  print(json.dumps({"process_index": jax.process_index(),
                    "process_count": jax.process_count(),
                    "num_devices": len(jax.devices()),
                    "num_local_devices": len(jax.local_devices()),
                    "losses": losses, "rewards": rewards}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
