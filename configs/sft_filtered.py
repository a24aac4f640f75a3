"""SFT on chains a process reward model approves of, against SFT on all of them.

  python -m o3lite.train --config=configs/sft_filtered.py [--workdir=DIR]

The training chains are configs/rl.py's imperfect ones (60% written with slips). With
`filter.verifier` empty, the nested `verifier_pipeline` (configs/prm.py's own sections)
runs first in DIR/verifier: an SFT
policy on all the chains (DIR/verifier/policy/eval.json: the unfiltered baseline), its
solutions, Monte Carlo step labels, a PRM. The PRM then scores every training chain;
those whose lowest step score is under the threshold are dropped (DIR/filter.json: how
many, and how many of the flawed ones), and the same SFT runs on the rest (DIR/eval.json).
"""

import ml_collections

from configs import prm
from o3lite.training import stage as stage_lib


def get_config() -> ml_collections.ConfigDict:
  p = prm.get_config()
  c = ml_collections.ConfigDict({name: p[name] for name in stage_lib.SHARED})
  c.method = "filtered_sft"  # The stage that runs this config.
  c.data.cot_slip_rate = 0.6  # configs/rl.py's imperfect chains.
  # The SFT on the kept chains: the same settings as the PRM's policy (configs/prm.py).
  c.init_from = p.policy.init_from  # Where it starts ("" = random init).
  c.sft = p.policy.sft
  c.loop = p.policy.loop
  c.optimizer = p.policy.optimizer
  # How DIR/verifier is made when filter.verifier is empty: configs/prm.py's own
  # sections (method, init_from, policy, loop, optimizer, verifier), sharing this run's
  # seed, model, data, mesh and eval.
  c.verifier_pipeline = ml_collections.ConfigDict({
      name: p[name] for name in ("method", "init_from", "policy", "loop", "optimizer",
                                 "verifier")})
  c.filter = ml_collections.ConfigDict()
  c.filter.verifier = ""  # A verifier run folder; "" = configs/prm.py's in DIR/verifier.
  c.filter.score = "min"  # min | last (a PRM's step scores) | outcome (an ORM's).
  c.filter.threshold = 0.5  # Chains scored below this are dropped.
  c.filter.best_k = 0  # > 0: keep the k best chains of each question instead.
  c.filter.batch_size = 64  # Chains scored per verifier call.
  return c
