"""Answer-only baseline of configs/sft.py: same task, model and budget, no chain of thought.

The completion is an empty think block then the answer, so the model must compute the
5-step chain "in its head"; compare its held-out accuracy with configs/sft.py.
"""

from configs import sft


def get_config():
  c = sft.get_config()
  c.data.with_cot = False  # Train on "<think></think>answer" only.
  return c
