"""The one prompt / chain-of-thought / answer text format of o3lite.

Every example, whatever its source, is rendered as two strings:

  prompt     = [system + "\\n\\n"] + question + [" (answer: " + hint + ")"] + "\\n"
  completion = "<think>" + step_1 + "\\n" + ... + step_n + "</think>" + answer

The model sees the prompt and is trained to write the completion; the tokenizer
appends the EOS id after it. The final answer is read back with `parse_answer`,
the only answer parser of the project, so training, evaluation, rewards and
search all agree on what "the answer" is.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"

# EOS strings of the tokenizers we support. Decoding stops at the EOS id, but a
# model can still spell an EOS out as plain text; it is never part of an answer.
_EOS_STRINGS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<eos>")


def format_prompt(question: str, hint: str | None = None, system: str | None = None) -> str:
  """The prompt the model is conditioned on: the one prompt builder of o3lite.

  `hint`: an answer given in the prompt (STaR's rationalization: the model explains a
  known answer), after the question as in the STaR code; `system`: text before the
  question (a written spec for deliberative alignment, a system instruction)."""
  text = question if hint is None else f"{question} (answer: {hint})"
  return text + "\n" if system is None else f"{system}\n\n{text}\n"


def encode_prompt(tokenizer, question: str, hint: str | None = None,
                  system: str | None = None) -> list[int]:
  """The prompt's token ids (see `format_prompt`); with a chat tokenizer (`tokenizer.chat`,
  from `data.chat_template`) the question (and hint) is the user's turn and `system` the
  system turn of its chat template, and the ids end where the assistant's turn begins."""
  if getattr(tokenizer, "chat", False):
    return tokenizer.encode_chat(format_prompt(question, hint).removesuffix("\n"), system)
  return tokenizer.encode(format_prompt(question, hint, system))


def format_completion(cot: str, answer: str, with_cot: bool = True) -> str:
  """Returns the completion: the think block, then the final answer.

  Args:
    cot: the chain of thought, steps joined by "\\n".
    answer: the final answer.
    with_cot: if False the think block is empty ("<think></think>" + answer),
      which trains an answer-only baseline with the same format.
  """
  thinking = cot if with_cot else ""
  return THINK_START + thinking + THINK_END + answer


def _strip_eos(text: str) -> str:
  text = text.strip()
  stripped = True
  while stripped:
    stripped = False
    for eos in _EOS_STRINGS:
      if text.endswith(eos):
        text = text[: -len(eos)].rstrip()
        stripped = True
  return text


def parse_answer(text: str) -> str | None:
  """Returns the final answer written in a completion, or None.

  The answer is the text after the last THINK_END, stripped of whitespace and
  of a trailing EOS string. A completion that never closes its thinking, or
  that closes it without an answer, has no answer (None).

  Args:
    text: a completion (or prompt + completion) as decoded text.
  """
  end = text.rfind(THINK_END)
  if end < 0:
    return None
  answer = _strip_eos(text[end + len(THINK_END):])
  return answer or None


def parse_cot(text: str) -> str | None:
  """Returns the chain of thought of a completion, or None if not closed.

  The chain of thought is the text between the last THINK_START before the last
  THINK_END and that THINK_END (from the start of `text` if there is no
  THINK_START, as when a prompt already opened the think block).
  """
  end = text.rfind(THINK_END)
  if end < 0:
    return None
  start = text.rfind(THINK_START, 0, end)
  start = 0 if start < 0 else start + len(THINK_START)
  return text[start:end]


def split_steps(cot: str) -> list[str]:
  """Splits a chain of thought into its steps: its non-blank lines, stripped."""
  return [line.strip() for line in cot.split("\n") if line.strip()]
