"""Step labels: steps and their spans, exact labels, Monte Carlo labels through the
sampler (a tiny random model), consensus, and the JSONL file of labelled solutions."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import PieceTokenizer
from o3lite import errors
from o3lite.data import formatting, tasks
from o3lite.model import transformer as model_lib
from o3lite.sampling import sampler
from o3lite.verifiers import label_files, labellers, steps as steps_lib


# One token per character; 0 pads, 1 is EOS.
_CharTokenizer = lambda: PieceTokenizer(list("\x00\x01" + "0123456789+-*= \n<>/thinkmod"),
                                        keep_pad=False)


def _completion(*steps, answer):
  return formatting.format_completion("\n".join(steps), answer)


# "3 +4 *2 -1 mod 10": true steps 3+4=7, 7*2=4, 4-1=3.
OPCHAIN = {"question": "3 +4 *2 -1 mod 10", "answer": "3", "step_values": [7, 4, 3]}
RIGHT = _completion("3+4=7", "7*2=4", "4-1=3", answer="3")
SLIPPED = _completion("3+4=7", "7*2=5", "5-1=4", answer="4")  # Follows its wrong value.


def test_split_completion_gives_the_steps_and_their_spans():
  text = "<think>3+4=7\n 7*2=4 \n\n4-1=3</think>3"
  found = steps_lib.split_completion(text)
  assert [s.text for s in found] == formatting.split_steps(formatting.parse_cot(text))
  assert [text[s.start:s.end] for s in found] == ["3+4=7", "7*2=4", "4-1=3"]
  assert [text[:s.boundary] for s in found] == [
      "<think>3+4=7\n", "<think>3+4=7\n 7*2=4 \n", "<think>3+4=7\n 7*2=4 \n\n4-1=3"]
  # A chain cut off before "</think>" still has its steps; a prompt may open the think.
  assert [s.text for s in steps_lib.split_completion("<think>1+1=2\n2*3=")] == ["1+1=2", "2*3="]
  assert [s.text for s in steps_lib.split_completion("1+1=2\n2+2=4</think>4")] == [
      "1+1=2", "2+2=4"]
  assert steps_lib.split_completion("<think></think>4") == []


def test_token_spans_follow_merged_tokens():
  pieces = ["<think>", "3+4", "=7\n", "7*2", "=4", "\n", "</think>", "3"]
  decode = lambda ids: "".join(pieces[i] for i in ids)
  tokens = list(range(len(pieces)))
  found = steps_lib.split_completion(decode(tokens))
  spans = steps_lib.token_spans(tokens, decode, found)
  assert [(s.start, s.end, s.boundary) for s in spans] == [(1, 3, 3), (3, 5, 6)]
  # Characters as tokens: the spans are the character spans, less "<think>".
  tok = _CharTokenizer()
  spans = steps_lib.token_spans(tok.encode(RIGHT), tok.decode, steps_lib.split_completion(RIGHT))
  assert [(s.start, s.end, s.boundary) for s in spans] == [(7, 12, 13), (13, 18, 19),
                                                           (19, 24, 24)]


def test_exact_labels_value_given_the_problem():
  assert steps_lib.exact_labels(RIGHT, OPCHAIN["step_values"]) == [1, 1, 1]
  assert steps_lib.exact_labels(SLIPPED, OPCHAIN["step_values"]) == [1, 0, 0]
  assert steps_lib.first_error([1, 0, 0]) == 1 and steps_lib.first_error([1, 1]) == -1
  assert steps_lib.first_error([None, 0.9, 0.2]) == 2
  # A later step whose value is the true one again is right (its value, given the
  # problem), though it started from the wrong one; Task.label_steps (the text) says no.
  values = [7, 4, 0]  # "3 +4 *2 *0 mod 10"
  back = _completion("3+4=7", "7*2=5", "5*0=0", answer="0")
  assert steps_lib.exact_labels(back, values) == [1, 0, 1]
  # Steps past the true chain, and steps without a value, are wrong.
  assert steps_lib.exact_labels(_completion("3+4=7", "7*2=4", "4-1=3", "3+0=3", answer="3"),
                                [7, 4, 3]) == [1, 1, 1, 0]
  assert steps_lib.exact_labels(_completion("3+4=seven", "7*2", answer="4"), [7, 4]) == [0, 0]
  assert steps_lib.step_value("7+5+0=12 w2 c1") == 12 and steps_lib.step_value("5-9=-4") == -4
  # Every task's reference chain is right at every step; the written values are read.
  rng = np.random.default_rng(0)
  for name in tasks.list_tasks():
    problem = tasks.get_task(name).generate(rng)
    completion = formatting.format_completion(problem.cot, problem.answer)
    assert steps_lib.exact_labels(completion, problem.step_values) == [1] * len(problem.steps)
    wrong = list(problem.step_values)
    wrong[-1] += 1
    assert steps_lib.exact_labels(completion, wrong)[-1] == 0


def test_registered_exact_and_outcome_labellers_and_consensus():
  assert {"exact", "monte_carlo", "outcome"} <= set(labellers.LABELLERS)
  examples, solutions = [OPCHAIN, OPCHAIN], [RIGHT, SLIPPED]
  exact = labellers.LABELLERS.lookup("exact")(examples, solutions)
  assert [x.hard for x in exact] == [[1, 1, 1], [1, 0, 0]]
  outcome = labellers.LABELLERS.lookup("outcome")(examples, solutions)
  assert [x.hard for x in outcome] == [[1, 1, 1], [0, 0, 0]]
  with pytest.raises(errors.DataError, match="no step_values"):
    labellers.exact([{"question": "q", "answer": "1"}], [RIGHT])
  with pytest.raises(errors.ConfigError, match="unknown step labeller 'mc'"):
    labellers.LABELLERS.lookup("mc")
  # Monte Carlo-like labels against exact ones: 4 of 6 steps agree.
  mc = [labellers.StepLabels([1, 1, 0], [1.0, 0.5, 0.0]),
        labellers.StepLabels([1, 1, 0], [0.75, 0.25, 0.0])]
  got = labellers.consensus(mc, exact)
  assert got.labels == [[1, 1, None], [1, None, 0]]
  assert got.soft == [[1.0, 0.5, None], [0.75, None, 0.0]]
  assert (got.kept, got.total) == (4, 6) and got.kept_fraction == pytest.approx(4 / 6)
  against_outcome = labellers.consensus(mc, outcome)
  assert against_outcome.labels == [[1, 1, None], [None, None, 0]]
  assert against_outcome.kept == 3
  assert labellers.consensus(exact, outcome).soft is None
  with pytest.raises(errors.DataError, match="solution 0: 3 steps labelled by one"):
    labellers.consensus([labellers.StepLabels([1, 1, 0])], [labellers.StepLabels([1])])


@pytest.fixture(scope="module")
def policy():
  tok = _CharTokenizer()
  cfg = model_lib.ModelConfig.tiny(vocab_size=tok.vocab_size)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(3)))
  params = jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim >= 2 else p, params)
  return cfg, params, tok


def _parity(example, text):  # A made-up outcome that the continuation decides.
  del example
  return sum(map(ord, text)) % 2 == 0


def _counting(monkeypatch):
  calls = []
  for name in ("prime", "fork", "continue_"):
    real = getattr(sampler, name)

    def wrapped(*args, _real=real, _name=name, **kwargs):
      rows = args[1] if _name != "continue_" else args[2]
      calls.append((_name, len(rows)))
      return _real(*args, **kwargs)

    monkeypatch.setattr(sampler, name, wrapped)
  return calls


def test_monte_carlo_greedy_labels_are_the_greedy_continuations(policy, monkeypatch):
  cfg, params, tok = policy
  examples = [OPCHAIN] * 3
  solutions = [RIGHT, _completion("3+4=7", "7*2=5", answer="5"), RIGHT]
  mc = labellers.MonteCarloConfig(k=3, temperature=0.0, max_new_tokens=6, batch_size=3)
  calls = _counting(monkeypatch)
  got = labellers.monte_carlo(examples, solutions,
                              labellers.Rollouts(params, cfg, tok, mc, outcome=_parity))
  # 8 step prefixes, 4 distinct (the first step is shared, the third solution is the
  # first), 3 per call: 2 calls, each primes 3 rows once and forks them into 9.
  assert calls == [("prime", 3), ("fork", 9), ("continue_", 9)] * 2
  monkeypatch.undo()
  # Greedy: the k completions are one, so soft labels are 0 or 1, and each is the
  # outcome of the greedy continuation of that prefix sampled from scratch.
  want = []
  scfg = sampler.SamplingConfig(max_new_tokens=6, eos_id=tok.eos_id, prompt_bucket=16)
  for example, solution in zip(examples, solutions):
    row = []
    for step in steps_lib.split_completion(solution):
      prompt = tok.encode(formatting.format_prompt(example["question"]))
      written = tok.encode(solution[:step.boundary])
      out = sampler.completions(sampler.start(params, [prompt + written], cfg, scfg), scfg)[0]
      row.append(int(_parity(example, tok.decode(written + out.tokens))))
    want.append(row)
  assert [x.hard for x in got] == want
  assert [x.soft for x in got] == [[float(h) for h in row] for row in want]
  assert {0, 1} <= {h for row in want for h in row}  # The check could fail both ways.


def test_monte_carlo_sampled_fractions(policy):
  cfg, params, tok = policy
  seen = []

  def outcome(example, text):
    seen.append(text)
    return _parity(example, text)

  mc = labellers.MonteCarloConfig(k=4, temperature=1.0, max_new_tokens=6, batch_size=2)
  got = labellers.monte_carlo([OPCHAIN], [RIGHT], labellers.Rollouts(params, cfg, tok, mc,
                                                                     outcome=outcome))
  [labels] = got
  assert len(labels.soft) == 3 and all(s * 4 == round(s * 4) for s in labels.soft)
  assert labels.hard == [int(s > 0) for s in labels.soft]
  # 4 completions of each step's prefix, and they are sampled, not copies.
  assert len(seen) == 12
  for i, step in enumerate(steps_lib.split_completion(RIGHT)):
    group = seen[4 * i:4 * i + 4]
    assert all(t.startswith(RIGHT[:step.boundary]) for t in group)
  assert any(len(set(seen[4 * i:4 * i + 4])) > 1 for i in range(3))
  with pytest.raises(errors.ConfigError, match="k=0"):
    labellers.MonteCarloConfig(k=0)
  with pytest.raises(errors.ConfigError, match="needs rollouts"):
    labellers.monte_carlo([OPCHAIN], [RIGHT])


def test_labelled_file_round_trip(tmp_path):
  path = str(tmp_path / "labels.jsonl")
  exact = labellers.exact([OPCHAIN, OPCHAIN], [RIGHT, SLIPPED])
  records = [label_files.labelled(OPCHAIN, RIGHT, exact[0], step_values=[7, 4, 3]),
             label_files.labelled(OPCHAIN, SLIPPED, [1, None, 0], [1.0, None, 0.125])]
  label_files.write_labelled(path, records)
  back = label_files.read_labelled(path)
  assert back == records
  assert back[0].steps == ["3+4=7", "7*2=4", "4-1=3"] and back[0].soft_labels is None
  assert back[0].metadata == {"step_values": [7, 4, 3]}
  assert back[1].labels == [1, None, 0] and back[1].soft_labels == [1.0, None, 0.125]


def _good():
  return {"question": OPCHAIN["question"], "answer": "3", "solution": RIGHT,
          "steps": ["3+4=7", "7*2=4", "4-1=3"], "labels": [1, 1, 0.5]}


@pytest.mark.parametrize("change, message", [
    (lambda r: "{not json", r"not JSON: "),
    (lambda r: [1, 2], r"not a JSON object: list"),
    (lambda r: {**r, "solution": None}, r"'solution' is missing or not a string"),
    (lambda r: {**r, "steps": ["3+4=7", 5]}, r"'steps' is missing or not a list"),
    (lambda r: {**r, "steps": ["3+4=7", "4-1=3", "7*2=4"]},
     r"step 2 '7\*2=4' is not in the solution after step 1"),
    (lambda r: {**r, "steps": ["3+4=8"]}, r"step 0 '3\+4=8' is not in the solution"),
    (lambda r: {**r, "labels": [1, 1]}, r"2 labels for 3 steps"),
    (lambda r: {**r, "labels": [1, 1.5, 0]}, r"labels\[1\] = 1.5 is not a number in \[0, 1\]"),
    (lambda r: {**r, "labels": [1, True, 0]}, r"labels\[1\] = True is not a number"),
    (lambda r: {**r, "soft_labels": [0.5, -0.1, 0]}, r"soft_labels\[1\] = -0.1 is not"),
    (lambda r: {**r, "soft_labels": {"a": 1}}, r"soft_labels is not a list"),
])
def test_a_bad_labelled_line_is_a_one_line_error(tmp_path, change, message):
  path = tmp_path / "labels.jsonl"
  bad = change(_good())
  bad = bad if isinstance(bad, str) else json.dumps(bad)
  path.write_text(json.dumps(_good()) + "\n\n" + bad + "\n")
  with pytest.raises(errors.DataError) as raised:
    label_files.read_labelled(str(path))
  assert str(raised.value).startswith(f"{path}:3: ")
  assert "\n" not in str(raised.value)
  assert raised.match(message)


def test_labelled_file_not_utf8_is_a_one_line_error(tmp_path):
  path = tmp_path / "labels.jsonl"
  good = json.dumps(_good()).encode()
  path.write_bytes(good + b"\r\n\r\n" + good[:20] + b"\xff\xfe" + good[20:] + b"\n")
  with pytest.raises(errors.DataError) as raised:
    label_files.read_labelled(str(path))
  assert str(raised.value) == f"{path}:3: not valid UTF-8 (byte 0xff)"
  path.write_bytes(good + b"\r\n\r\n" + good + b"\r")  # CRLF and CR read as text mode does.
  assert len(label_files.read_labelled(str(path))) == 2


def test_empty_missing_and_unwritable_records(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(errors.DataError, match="empty.jsonl: no labelled solutions$"):
    label_files.read_labelled(str(empty))
  with pytest.raises(errors.DataError, match="missing.jsonl: cannot read"):
    label_files.read_labelled(str(tmp_path / "missing.jsonl"))
  record = label_files.labelled(OPCHAIN, RIGHT, [1, 1, 2])
  path = tmp_path / "out.jsonl"
  with pytest.raises(errors.DataError, match=r"out.jsonl: record 0: labels\[2\] = 2 is not"):
    label_files.write_labelled(str(path), [record])
  assert not path.exists()


def test_char_offsets_fast_and_in_context():
  tok = _CharTokenizer()
  ids = tok.encode(RIGHT)
  slow = [len(tok.decode(ids[:j])) for j in range(len(ids) + 1)]
  assert steps_lib.char_offsets(ids, tok.decode) == slow
  # Pieces that decode differently at the start (a leading space dropped, as
  # SentencePiece's "▁"): per-token texts do not add up, so prefixes are decoded.
  pieces = [" a", " b", "c"]
  decode = lambda ids: "".join(pieces[i] for i in ids).lstrip(" ")
  assert steps_lib.char_offsets([0, 1, 2], decode) == [0, 1, 3, 4]
