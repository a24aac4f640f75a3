"""Test-time search under a PRM that also reads the answer (configs/prm.py with
`verifier.answer_read=True`): best-of-N, weighted majority and beam search ranked by
its answer read against its weakest step, on the same problems and candidates.

  python -m o3lite.evaluate --config=configs/test_time_answer.py --workdir=DIR

With `prm` empty, DIR/prm is made with the answer read (and DIR/orm as in
configs/test_time.py).
"""

import ml_collections

from configs import test_time


def get_config() -> ml_collections.ConfigDict:
  c = test_time.get_config()
  c.prm_pipeline.verifier.answer_read = True
  entry = test_time.entry
  n = (1, 4, 16, 64)
  c.strategies = ml_collections.ConfigDict({
      "majority": entry("majority", "", n),
      "prm_best_of_n_min": entry("best_of_n", "prm", n, aggregation="min"),
      "prm_best_of_n_answer": entry("best_of_n", "prm", n, aggregation="answer"),
      "prm_weighted_majority_answer": entry("weighted_majority", "prm", n,
                                            aggregation="answer"),
      "beam_answer": entry("beam", "prm", (4, 16, 64), expand=4, step_tokens=16,
                           max_steps=8, aggregation="answer"),
  })
  return c
