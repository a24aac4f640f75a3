"""Test-time compute: every search strategy at every budget, accuracy against compute.

  python -m o3lite.evaluate --config=configs/test_time.py --workdir=DIR [--config.a=value]

With `init_from` (the policy), `prm` and `orm` empty, the verifier issue's defaults are made first
(configs/prm.py's pipeline in DIR/prm: the policy, its labelled solutions, a PRM;
configs/orm.py's ORM on the same policy and labels in DIR/orm). Then each entry of
`strategies` runs at each of its budgets on the same held-out problems. Writes
DIR/test_time.json, DIR/test_time.md, DIR/test_time.png (accuracy against generated
tokens per problem) and DIR/test_time_difficulty.png (the same per difficulty bin).
"""

import ml_collections

from configs import orm
from configs import prm
from o3lite.parallel import mesh as sharding_lib


def entry(strategy, verifier, budgets, sampling=None, **options):
  return ml_collections.ConfigDict({"strategy": strategy, "verifier": verifier,
                                    "budgets": tuple(budgets), "options": options,
                                    "sampling": sampling or {}})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "test_time"  # The stage that runs this config (no training of its own).
  c.init_from = ""  # Policy run folder; "" = the PRM pipeline's policy (DIR/prm/policy).
  c.prm = ""  # PRM run folder (configs/prm.py); "" = made in DIR/prm.
  c.orm = ""  # ORM run folder (configs/orm.py); "" = made in DIR/orm.
  c.prm_pipeline = prm.get_config()  # How DIR/prm is made when `prm` is empty.
  c.orm_pipeline = orm.get_config()  # How DIR/orm is made when `orm` is empty.

  c.split = "test"  # Held-out split of the policy's data.
  c.num_problems = 200  # The first N problems of the split.
  c.seed = 0  # Sampling seed (the same candidates for every strategy at one N).
  c.mesh_shape = ()  # () = the policy run's mesh; else e.g. (-1, 1, 1).
  c.verifier_batch_size = 256  # Solutions per verifier call.
  # The sampler's settings for every strategy (o3lite.search.core.Sampling); tree
  # searches take their step length from `step_tokens` instead of max_new_tokens.
  c.sampling = ml_collections.ConfigDict({
      "max_new_tokens": 48, "temperature": 1.0, "top_p": 1.0, "rows_per_call": 1024})
  # Difficulty: quantile bins of each problem's pass@1 among this entry's samples at its
  # largest budget ("" = no difficulty plot).
  c.difficulty_from = "majority"
  c.difficulty_bins = 4

  # Label -> {strategy (registered in o3lite.search), verifier ("" | prm | orm),
  # budgets (the strategy's compute knob), options (its keyword options), sampling
  # (this entry's changes to `sampling`)}.
  n = (1, 2, 4, 8, 16, 32, 64)
  c.strategies = ml_collections.ConfigDict({
      "majority": entry("majority", "", n),
      "orm_best_of_n": entry("best_of_n", "orm", n),
      "prm_best_of_n": entry("best_of_n", "prm", n, aggregation="min"),
      "prm_weighted_majority": entry("weighted_majority", "prm", n, aggregation="min"),
      "beam": entry("beam", "prm", (4, 8, 16, 32, 64), expand=4, step_tokens=16,
                     max_steps=8),
      "dvts": entry("dvts", "prm", (4, 8, 16, 32, 64), expand=4, step_tokens=16,
                     max_steps=8),
      # MCTS: each simulation expands one leaf by a step; rollouts finish the children,
      # so every simulation count has finished candidates (value: the PRM's min).
      "mcts": entry("mcts", "prm", (4, 8, 16, 32), expand=4, step_tokens=16, max_steps=8,
                     value="rollout", aggregation="min"),
      "revise": entry("revise", "prm", (1, 2, 4)),
      # s1's budget forcing decodes greedily: one completion, its thinking capped.
      "think_budget": entry("think_budget", "", (4, 8, 16, 32),
                             sampling={"temperature": 0.0}),
  })
  return c
