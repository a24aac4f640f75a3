r"""`transformers` generating from an exported o3lite run: its greedy accuracy on the run's
held-out problems, beside o3lite's own.

  python -m o3lite.export --workdir=DIR --out=HF_DIR
  python -m bench.hf_generate --workdir=DIR --hf_dir=HF_DIR [--num_examples=64]

Loads HF_DIR with `AutoModelForCausalLM` / `AutoTokenizer` (torch, fp32, CPU), builds each
prompt with the tokenizer's own chat template when the run used one (`data.chat_template`;
else o3lite's plain prompt text), generates greedily with `model.generate` up to the run's
`eval.max_new_tokens`, and checks the answers with the run's task checker. Prints one
completion and the accuracy next to DIR/eval.json's greedy accuracy (the same problems:
the first `eval.num_examples` of the run's `eval.split`). torch is a test / bench
dependency, never a training one.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from o3lite.data import formatting
from o3lite.data import sources
from o3lite.training import run_folder
from o3lite.training import sft

_WORKDIR = flags.DEFINE_string("workdir", None, "The exported o3lite run.", required=True)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Its `o3lite.export` folder.", required=True)
_NUM = flags.DEFINE_integer("num_examples", None, "Held-out problems (default: the run's "
                            "eval.num_examples).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Prompts per `generate` call.")


def prompts_of(tokenizer, questions: list[str], chat: bool) -> list[str]:
  """The prompt text of each question as the run built it (chat template or plain)."""
  if not chat:
    return [formatting.format_prompt(q) for q in questions]
  return [tokenizer.apply_chat_template(
      [{"role": "user", "content": formatting.format_prompt(q).removesuffix("\n")}],
      add_generation_prompt=True, tokenize=False) for q in questions]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int
             ) -> list[str]:
  """Greedy completions (text up to, not including, EOS; special tokens kept)."""
  import torch  # pylint: disable=g-import-not-at-top
  tokenizer.padding_side = "left"
  out = []
  for start in range(0, len(prompts), batch):
    enc = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    with torch.no_grad():
      ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
    for row in ids[:, enc["input_ids"].shape[1]:].tolist():
      if tokenizer.eos_token_id in row:
        row = row[:row.index(tokenizer.eos_token_id)]
      out.append(tokenizer.decode(row, skip_special_tokens=False))
  return out


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = run_folder.load_config(_WORKDIR.value)
  num = _NUM.value or config.eval.num_examples
  examples = sft.held_out_examples(config.data, config.eval.split, num)
  checker = sources.get_checker(config.data)
  tokenizer = transformers.AutoTokenizer.from_pretrained(_HF_DIR.value)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  model = transformers.AutoModelForCausalLM.from_pretrained(
      _HF_DIR.value, dtype=torch.float32).eval()
  chat = bool(config.data.get("chat_template", False))
  prompts = prompts_of(tokenizer, [ex["question"] for ex in examples], chat)
  texts = generate(model, tokenizer, prompts, config.eval.max_new_tokens, _BATCH.value)
  correct = [bool(checker(formatting.parse_answer(t), ex["answer"]))
             for t, ex in zip(texts, examples)]
  print(f"prompt (transformers' chat template: {chat}):\n{prompts[0]}")
  print(f"completion:\n{texts[0]}\n(target {examples[0]['answer']})\n")
  accuracy = sum(correct) / len(correct)
  line = f"transformers greedy accuracy: {accuracy:.3f} on {len(correct)} problems"
  result = os.path.join(_WORKDIR.value, "eval.json")
  if os.path.exists(result):
    with open(result) as f:
      line += f"; o3lite's (eval.json): {json.load(f)['metrics']['accuracy']:.3f}"
  print(line)


if __name__ == "__main__":
  app.run(main)
