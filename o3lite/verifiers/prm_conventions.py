"""How external process reward models mark and score steps: their conventions.

The public PRMs put a tag token after every step of a solution and read step i's score
at the position t_i of the i-th tag: the state after the question and steps 1..i, so
all the steps of a solution are scored in one forward pass (the causal mask keeps later
steps out of each read). Two conventions are registered (`CONVENTIONS`):

  math_shepherd   Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs
                  Step-by-step without Human Annotations" (peiyi9979/math-shepherd-
                  mistral-7b-prm: Mistral-7B under a Llama config.json; its main branch
                  has PyTorch .bin weights only, the hub's refs/pr/5 safetensors).
                  Input, as the model card's example and the Math-Shepherd data's "input":
                    BOS question " Step 1: " s_1 " ки\\nStep 2: " s_2 " ки\\n" ... s_n " ки"
                  Score: the LM head's logits z at the tag's own position (as the card
                  reads them: they predict the token after the tag), over the good and
                  bad tokens only:  p_i = softmax([z_{t_i}[good], z_{t_i}[bad]])[0]
                  (good / bad ids as the card takes them: encode("+ -")).
  qwen_prm        Zhang et al. 2025, "The Lessons of Developing Process Reward Models
                  in Mathematical Reasoning" (Qwen/Qwen2.5-Math-PRM-7B /-72B,
                  architecture Qwen2ForProcessRewardModel: the Qwen2 trunk `model.*`,
                  no LM head, and a classifier `score` = Linear(D, D) -> ReLU ->
                  Linear(D, 2), tensors score.0.{weight,bias}, score.2.{weight,bias}).
                  Input: the tokenizer's chat template of
                    system "Please reason step by step, and put your final answer
                            within \\boxed{}.", user question,
                    assistant s_1 "<extra_0>" s_2 "<extra_0>" ... s_n "<extra_0>"
                  Score: h_t the final normed hidden state at the tag,
                    p_i = softmax(W_2 relu(W_1 h_{t_i} + b_1) + b_2)[1]

A `Convention` holds what differs: the tag, the head ("lm": two tokens of the LM head;
"classifier": the 2-class `score` head), the good / bad tokens, the positive class, and
the function that writes the input text. Register another with
`CONVENTIONS.register(name)(lambda: Convention(...))`, or pass a Convention.

The steps are `steps.split_completion(solution)`: the lines of the chain between
"<think>" and "</think>" (the answer after "</think>" is not shown to the PRM). The tag
string is removed from the question and the step texts, so every tag in the input is
one the formatter wrote. Text is encoded by the folder's own `transformers` tokenizer,
as the model cards do (`tokenizer.encode(text)`: Mistral's BOS, no BOS for Qwen), not
by `data.tokenizers.HFTokenizer`, which adds the think delimiters as new tokens (the
PRM never saw them) and encodes without special tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from o3lite import errors
from o3lite.registry import Registry

HEADS = ("lm", "classifier")
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# Input text of one solution: (tokenizer, question, steps, tag) -> text.
FormatFn = Callable[[Any, str, Sequence[str], str], str]


@dataclasses.dataclass(frozen=True)
class Convention:
  """How a PRM marks and scores steps.

  step_tag: the text after each step; one token of the tokenizer.
  head: "lm" (p = softmax over the LM head's logits of [good_token, bad_token], taking
    good) or "classifier" (p = softmax of the `score.*` head's logits, taking
    `positive_class`).
  format_input: writes the input text of (tokenizer, question, steps, step_tag).
  good_token / bad_token: "lm" only; their ids are `encode(f"{good} {bad}")` without
    special tokens, which must be two ids (as Math-Shepherd's card takes them).
  positive_class: "classifier" only; the class whose probability is the score.
  """

  name: str
  step_tag: str
  head: str
  format_input: FormatFn
  good_token: str = "+"
  bad_token: str = "-"
  positive_class: int = 1

  def __post_init__(self):
    if self.head not in HEADS:
      raise errors.ConfigError(f"PRM convention {self.name!r}: head={self.head!r}; "
                               f"expected one of {list(HEADS)}")
    if not self.step_tag:
      raise errors.ConfigError(f"PRM convention {self.name!r}: empty step_tag")
    if self.positive_class < 0:
      raise errors.ConfigError(f"PRM convention {self.name!r}: positive_class="
                               f"{self.positive_class} is negative")


def shepherd_input(tokenizer, question: str, steps: Sequence[str], tag: str) -> str:
  """question " Step 1: " s_1 " " tag "\\nStep 2: " ... s_n " " tag (Math-Shepherd's card)."""
  del tokenizer
  return f"{question} " + "\n".join(f"Step {i}: {s} {tag}" for i, s in enumerate(steps, 1))


def qwen_chat_input(tokenizer, question: str, steps: Sequence[str], tag: str) -> str:
  """The tokenizer's chat template of (system QWEN_SYSTEM, user question, assistant the
  steps each followed by the tag), without a generation prompt (Qwen2.5-Math-PRM's card)."""
  messages = [{"role": "system", "content": QWEN_SYSTEM},
              {"role": "user", "content": question},
              {"role": "assistant", "content": tag.join(steps) + tag}]
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


CONVENTIONS = Registry("PRM convention")


@CONVENTIONS.register("math_shepherd")
def math_shepherd() -> Convention:
  return Convention("math_shepherd", step_tag="ки", head="lm", format_input=shepherd_input,
                    good_token="+", bad_token="-")


@CONVENTIONS.register("qwen_prm")
def qwen_prm() -> Convention:
  return Convention("qwen_prm", step_tag="<extra_0>", head="classifier",
                    format_input=qwen_chat_input, positive_class=1)


def check_tokenizer(tokenizer, convention: Convention, path: str
                    ) -> tuple[int, tuple[int, int] | None]:
  """(the step tag's id, the (good, bad) ids of an "lm" head or None).

  Raises:
    CheckpointError: the tag is not one token, or good / bad are not two tokens of
      `encode(f"{good} {bad}")` (as Math-Shepherd's card takes them).
  """
  tag_ids = tokenizer.encode(convention.step_tag, add_special_tokens=False)
  if len(tag_ids) != 1:
    raise errors.CheckpointError(
        f"step tag {convention.step_tag!r} of {convention.name} is not one token of the "
        f"tokenizer in {path} (it encodes to {len(tag_ids)} tokens: {tag_ids[:8]})")
  if convention.head != "lm":
    return tag_ids[0], None
  text = f"{convention.good_token} {convention.bad_token}"
  ids = tokenizer.encode(text, add_special_tokens=False)
  if len(ids) != 2:
    raise errors.CheckpointError(f"good / bad tokens {text!r} of {convention.name} are not two "
                                 f"tokens of the tokenizer in {path}: {ids[:8]}")
  return tag_ids[0], (ids[0], ids[1])


def encode_input(tokenizer, convention: Convention, tag_id: int, question: str,
                 steps: Sequence[str], path: str = "") -> tuple[list[int], list[int]]:
  """(token ids, positions of the tags) of one solution's input; the tag string is
  removed from the question and steps first.

  Raises:
    DataError: the ids hold another number of tags than steps (the tokenizer merged a
      tag with the text next to it).
  """
  tag = convention.step_tag
  text = convention.format_input(tokenizer, question.replace(tag, ""),
                                 [s.replace(tag, "") for s in steps], tag)
  ids = list(tokenizer.encode(text))
  tags = [t for t, i in enumerate(ids) if i == tag_id]
  if len(tags) != len(steps):
    raise errors.DataError(
        f"{len(tags)} step tags {tag!r} in the {convention.name} input of a solution with "
        f"{len(steps)} steps: the tokenizer of {path} merges the tag with the text next to it")
  return ids, tags
