"""SFT on GSM8K (a TFDS builder over the copy in o3lite/data/gsm8k) with a pretrained model.

Meant for a GPU / TPU host: set `data.tokenizer` to the Hugging Face folder of the model
(e.g. a local Qwen2.5-0.5B) and the model fields to its shapes. With the tiny model and a
trained SentencePiece vocabulary it also runs on CPU, but learns little.
"""

from configs import sft
from o3lite.model import transformer as model_lib


def get_config():
  c = sft.get_config()
  c.data.source = "gsm8k"
  c.data.path = ""  # "" = the copy that ships in o3lite/data/gsm8k.
  c.data.vocab_size = 2048
  c.data.seq_len = 512
  # A few GSM8K chains run past 513 tokens of the trained SentencePiece vocabulary (the
  # longest has 587): dropped and counted (eval.json's dropped_too_long); raise seq_len
  # to keep them.
  c.data.drop_too_long = True
  c.model = sft.model_fields(model_lib.ModelConfig.small())
  c.sft.batch_size = 16
  c.loop.num_steps = 2000
  c.eval.num_examples = 200
  c.eval.batch_size = 50
  c.eval.max_new_tokens = 256
  return c
