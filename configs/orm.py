"""An outcome reward model (ORM) of the tiny policy's solutions, end to end.

  python -m o3lite.train --config=configs/orm.py [--workdir=DIR] [--config.verifier.a=value]

As configs/prm.py (same policy, same solutions), but one score per solution,
P(answer correct | question, solution), trained with binary cross-entropy on the outcome
at the EOS (`verifier.loss='bradley_terry'`: pairwise on correct vs wrong solutions of
a question). DIR/eval.json holds its held-out accuracy, AUC and calibration (ECE);
DIR/reliability.png the reliability diagram.
"""

import ml_collections

from configs import prm


def get_config() -> ml_collections.ConfigDict:
  c = prm.get_config()
  c.verifier.kind = "orm"
  c.verifier.labeller = "exact"  # Step labels kept in the file (no model needed); the
  #                                ORM itself trains on each solution's outcome.
  return c
