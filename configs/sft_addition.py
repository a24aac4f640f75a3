"""SFT on multi-digit addition (column by column with carries)."""

from configs import sft


def get_config():
  c = sft.get_config()
  c.data.task = "addition"
  c.data.task_kwargs = {"digits": 3}  # Digits per operand.
  return c
