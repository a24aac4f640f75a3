"""SFT on chains a process reward model approves of, against SFT on all of them.

  python -m o3lite.train --config=configs/sft_filtered.py [--workdir=DIR]

The training chains are configs/rl.py's imperfect ones (60% written with slips). With
`filter.verifier` empty, configs/prm.py's pipeline runs first in DIR/verifier: an SFT
policy on all the chains (DIR/verifier/policy/eval.json: the unfiltered baseline), its
solutions, Monte Carlo step labels, a PRM. The PRM then scores every training chain;
those whose lowest step score is under the threshold are dropped (DIR/filter.json: how
many, and how many of the flawed ones), and the same SFT runs on the rest (DIR/eval.json).
"""

import ml_collections

from configs import prm


def get_config() -> ml_collections.ConfigDict:
  c = prm.get_config()  # model, data (slipped chains), train, optimizer, eval, verifier.
  c.method = "filtered_sft"  # Which trainer runs this config.
  c.data.cot_slip_rate = 0.6  # configs/rl.py's imperfect chains.
  c.filter = ml_collections.ConfigDict()
  c.filter.verifier = ""  # A verifier run folder; "" = configs/prm.py's in DIR/verifier.
  c.filter.score = "min"  # min | last (a PRM's step scores) | outcome (an ORM's).
  c.filter.threshold = 0.5  # Chains scored below this are dropped.
  c.filter.best_k = 0  # > 0: keep the k best chains of each question instead.
  c.filter.batch_size = 64  # Chains scored per verifier call.
  return c
