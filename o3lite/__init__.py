"""o3lite: train o1/o3-style reasoning models in JAX.

The tree follows the recipe, one subpackage per stage. A layer imports only the layers
before it (tests/test_layout.py checks every import):

  errors       o3lite's error types (bad input: one line, non-zero exit)
  registry     functions registered by name (losses, advantages, rewards, ...)
  model        the transformer, heads on it, the XLA:CPU kernels
  parallel     device mesh and sharding rules, multi-process start, host memory
  data         tasks, the answer format, tokenizers, TFDS builders, batching
  interop      Hugging Face import / export
  sampling     the jitted sampler (prefill, extend, fork + decode loop on the explicit KV
               cache; stops and continuations for search; scoring)
  evaluation   held-out metrics: greedy accuracy, pass@k, maj@k, thinking budgets
  training     the train state, the one train step, losses, optimizer, loop, checkpoints,
               run folders, and the SFT run
  verifiers    step labels (exact, Monte Carlo, consensus) and their JSONL files; after
               training so that a reward model can be trained with the one train step
  search       test-time search: strategies (majority, weighted majority, best-of-N) that
               sample with the sampler and score with a verifier, and their compute
  rl           RL maths, rewards, the learner (its loss and scoring), the RL run
  stages       every stage registered with the harness (training/stage.py)
  train.py, evaluate.py, export.py   the entry points (thin: flags -> library)
"""

# The layers above, lowest first; tests/test_layout.py reads this.
LAYERS = ("errors", "registry", "model", "parallel", "data", "interop", "sampling", "evaluation",
          "training", "verifiers", "search", "rl", "stages", "train", "evaluate", "export")
