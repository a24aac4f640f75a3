"""Tests of the prompt / CoT / answer format."""

import pytest

from o3lite.data import formatting


def test_prompt_and_completion_layout():
  assert formatting.format_prompt("1+2") == "1+2\n"
  completion = formatting.format_completion("a\nb", "3")
  assert completion == "<think>a\nb</think>3"
  assert formatting.format_completion("a\nb", "3", with_cot=False) == (
      "<think></think>3")


def test_parse_answer_round_trips_completion():
  completion = formatting.format_completion("1+2=3\n3*2=6", "6")
  assert formatting.parse_answer(completion) == "6"
  prompt = formatting.format_prompt("1 +2 *2 mod 10")
  assert formatting.parse_answer(prompt + completion) == "6"


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think> 42 \n", "42"),
    ("<think>x</think>42</s>", "42"),
    ("<think>x</think>42<|endoftext|>", "42"),
    ("<think>x</think>42 </s></s>", "42"),
    ("<think>a</think>1 then <think>b</think>2", "2"),
    ("</think>7", "7"),
    ("<think>no end 42", None),
    ("42", None),
    ("<think>x</think>", None),
    ("<think>x</think>  \n", None),
    ("<think>x</think></s>", None),
])
def test_parse_answer(text, expected):
  assert formatting.parse_answer(text) == expected


def test_parse_cot():
  assert formatting.parse_cot("q\n<think>a\nb</think>7") == "a\nb"
  assert formatting.parse_cot("a\nb</think>7") == "a\nb"
  assert formatting.parse_cot("<think>a\nb") is None
  assert formatting.parse_cot("<think></think>7") == ""


def test_split_steps():
  assert formatting.split_steps("1+2=3\n 3*2=6 \n\n") == ["1+2=3", "3*2=6"]
  assert formatting.split_steps("") == []
  steps = ["a", "b", "c"]
  assert formatting.split_steps("\n".join(steps)) == steps


def test_the_one_prompt_builder_takes_a_hint_and_system_text():
  assert formatting.format_prompt("3 +4 mod 10") == "3 +4 mod 10\n"  # As always.
  assert formatting.format_prompt("3 +4 mod 10", hint="7") == "3 +4 mod 10 (answer: 7)\n"
  assert formatting.format_prompt("q?", system="Rule 1.") == "Rule 1.\n\nq?\n"

  class Chars:
    def encode(self, text):
      return [ord(c) for c in text]

  assert formatting.encode_prompt(Chars(), "q?", hint="1", system="S") == [
      ord(c) for c in "S\n\nq? (answer: 1)\n"]
