"""SFT on multi-digit multiplication written as partial products and their sum."""

from configs import sft


def get_config():
  c = sft.get_config()
  c.data.task = "multiplication"
  c.data.task_kwargs = {"digits": 2, "multiplier_digits": 2}  # Digits of each operand.
  # 2 x 2 digits make 8,100 distinct questions, about 6,480 of which hash into the train
  # split (o3lite.data.tasks.split_of): ask for fewer than that.
  c.data.num_train = 6000
  c.loop.num_steps = 3000  # Longer chains need more steps.
  c.eval.max_new_tokens = 96
  return c
