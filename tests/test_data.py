"""Tests of the TFDS builders, the example sources and the SFT batcher."""

import collections
import json
import os

import ml_collections
import numpy as np
import pytest

from o3lite import errors
from o3lite.data import formatting
from o3lite.data import tasks
from o3lite.data import builders
from o3lite.data import batching as pipeline
from o3lite.data import sources

# GSM8K as it ships with the package (the default `data.path`).
GSM8K = builders.DEFAULT_GSM8K_PATH
SIZES = {"train": 120, "validation": 30, "test": 30}


def _data_cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      source="task", task="opchain", task_kwargs={"steps": 3}, path="",
      data_dir=str(data_dir), num_train=SIZES["train"],
      num_validation=SIZES["validation"], num_test=SIZES["test"], seed=0,
      tokenizer="", vocab_size=320, with_cot=True))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
  cfg = _data_cfg(tmp_path_factory.mktemp("tfds"))
  return cfg, {split: sources.load_examples(cfg, split) for split in SIZES}


@pytest.fixture(scope="module")
def tokenizer(task_data):
  return sources.get_tokenizer(task_data[0])


# --- Builders and sources. ---


def test_task_splits_sizes_and_disjoint(task_data):
  cfg, splits = task_data
  task = tasks.get_task("opchain", steps=3)
  for split, examples in splits.items():
    assert len(examples) == SIZES[split]
    assert {p.question for p in tasks.generate_split(
        task, split, SIZES[split], seed=0)} == {
            ex["question"] for ex in examples}
    for ex in examples:
      assert set(ex) == {"question", "cot", "answer", "step_values"}
      assert all(isinstance(ex[k], str) for k in builders.TEXT_KEYS)
      # Metadata: the number each reference step computes, as ints.
      assert ex["step_values"] == [int(step.split("=")[1])
                                   for step in ex["cot"].split("\n")]
      assert tasks.split_of(ex["question"]) == split
      assert formatting.split_steps(ex["cot"])[-1].endswith("=" + ex["answer"])
  questions = [ex["question"] for exs in splits.values() for ex in exs]
  assert len(set(questions)) == len(questions) == sum(SIZES.values())
  name = sources.get_builder(cfg).builder_config.name
  assert name == "opchain-steps3-modulus10-n120-30-30-s0"


def test_task_configs_never_collide():
  make = builders.ReasoningTasks.make_config
  names = {make("opchain", {}, (10, 2, 2), 0).name,
           make("opchain", {"modulus": 7}, (10, 2, 2), 0).name,
           make("opchain", {}, (10, 2, 3), 0).name,
           make("opchain", {}, (10, 2, 2), 1).name,
           make("addition", {}, (10, 2, 2), 0).name}
  assert len(names) == 5
  assert make("opchain", {"steps": 5}, (10, 2, 2), 0).name == make(
      "opchain", {}, (10, 2, 2), 0).name
  with pytest.raises(errors.O3liteError, match="'digits'"):
    make("opchain", {"digits": 2}, (10, 2, 2), 0)


def test_sources_errors(tmp_path):
  with pytest.raises(errors.O3liteError, match="'hub'"):
    sources.load_examples(_data_cfg(tmp_path, source="hub"), "train")
  with pytest.raises(errors.O3liteError, match="'dev'"):
    sources.load_examples(_data_cfg(tmp_path), "dev")
  with pytest.raises(errors.O3liteError, match="'hub'"):
    sources.get_checker(_data_cfg(tmp_path, source="hub"))


def test_get_checker(tmp_path):
  check = sources.get_checker(_data_cfg(tmp_path))
  assert check("7", "7") and not check("7", "8") and not check(None, "7")
  numeric = sources.get_checker(_data_cfg(tmp_path, source="gsm8k"))
  assert numeric("1,000", "1000") and not numeric("999", "1000")


def test_gsm8k(tmp_path):
  cfg = _data_cfg(tmp_path, source="gsm8k", path=GSM8K)
  splits = {split: sources.load_examples(cfg, split) for split in SIZES}
  assert len(splits["train"]) + len(splits["validation"]) == 7473
  assert len(splits["test"]) == 1319
  assert 300 < len(splits["validation"]) < 450
  train_q = {ex["question"] for ex in splits["train"]}
  assert not train_q & {ex["question"] for ex in splits["validation"]}
  for examples in splits.values():
    for ex in examples:
      assert "####" not in ex["answer"] and "," not in ex["answer"]
      assert ex["answer"] and ex["question"] and ex["cot"]
      assert all("<<" not in line and ">>" not in line and line
                 for line in ex["cot"].split("\n"))
  answers = {ex["question"]: ex["answer"] for ex in splits["train"]}
  assert answers[next(q for q in answers if q.startswith("Natalia sold"))] == (
      "72")
  default = sources.get_builder(_data_cfg(tmp_path, source="gsm8k"))
  assert default.builder_config.path == os.path.abspath(GSM8K)


def test_parse_gsm8k():
  ex = builders.parse_gsm8k({"question": " Q? ", "answer":
                             "a 2*3 = <<2*3=6>>6.\n\nb <<6+1=7>>7\n#### 1,007"})
  assert ex == {"question": "Q?", "cot": "a 2*3 = 6.\nb 7", "answer": "1007"}
  with pytest.raises(errors.O3liteError, match="####"):
    builders.parse_gsm8k({"question": "Q", "answer": "no marker"})


def test_gsm8k_missing_folder(tmp_path):
  missing = str(tmp_path / "no_gsm8k")
  with pytest.raises(errors.O3liteError, match="no_gsm8k"):
    sources.load_examples(_data_cfg(tmp_path, source="gsm8k", path=missing),
                          "train")


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record))
              + "\n")


def _records(n, prefix="q"):
  return [{"question": f"{prefix}{i}?", "answer": str(i),
           **({"cot": f"step {i}\nstep {i + 1}"} if i % 2 else {})}
          for i in range(n)]


def test_jsonl_carves_missing_splits(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", _records(300))
  cfg = _data_cfg(tmp_path / "tfds", source="jsonl", path=str(tmp_path))
  splits = {split: sources.load_examples(cfg, split) for split in SIZES}
  assert sum(len(exs) for exs in splits.values()) == 300
  expected = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1)}
  for split, (low, high) in expected.items():
    assert 10 < len(splits[split])
    assert all(low <= tasks.hash_fraction(ex["question"]) < high
               for ex in splits[split])
  by_question = {ex["question"]: ex for exs in splits.values() for ex in exs}
  assert by_question["q3?"] == {"question": "q3?", "answer": "3",
                                "cot": "step 3\nstep 4"}
  assert by_question["q4?"]["cot"] == ""


def test_jsonl_given_splits_and_decontamination(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", _records(50))
  _write_jsonl(tmp_path / "validation.jsonl", _records(5, prefix="v"))
  _write_jsonl(tmp_path / "test.jsonl", _records(4))  # q0..q3 also in train.
  cfg = _data_cfg(tmp_path / "tfds", source="jsonl", path=str(tmp_path))
  splits = {split: sources.load_examples(cfg, split) for split in SIZES}
  assert len(splits["validation"]) == 5 and len(splits["test"]) == 4
  assert len(splits["train"]) == 46
  assert not {"q0?", "q1?", "q2?", "q3?"} & {
      ex["question"] for ex in splits["train"]}


@pytest.mark.parametrize("bad_line, reason", [
    ('{"question": "q", "answer": ', "invalid JSON"),
    ('{"question": "q"}', "missing key 'answer'"),
    ('{"question": "q", "answer": 7}',
     "key 'answer' must be a string, got int"),
    ('{"question": "q", "answer": "1", "cot": ["a"]}', "key 'cot' must be"),
    ('["q", "a"]', "expected a JSON object"),
])
def test_jsonl_malformed_line(tmp_path, bad_line, reason):
  lines = [json.dumps(r) for r in _records(3)] + ["", bad_line]
  _write_jsonl(tmp_path / "train.jsonl", lines)
  cfg = _data_cfg(tmp_path / "tfds", source="jsonl", path=str(tmp_path))
  with pytest.raises(errors.O3liteError) as error:
    sources.load_examples(cfg, "train")
  message = str(error.value)
  assert message.startswith(f"{tmp_path / 'train.jsonl'}:5: {reason}")
  assert "\n" not in message


@pytest.mark.parametrize("before", [3, 400])
def test_jsonl_not_utf8_is_a_one_line_error(tmp_path, before):
  """The file and the line, also where the bad bytes lie past the text reader's first
  chunk (8 KiB), which decodes a chunk at a time."""
  lines = [json.dumps(r).encode() for r in _records(before)]
  assert before < 10 or len(b"\n".join(lines)) > 8192
  lines += [b'{"question": "q\xff\xfe?", "answer": "1"}', b"{}"]
  (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  cfg = _data_cfg(tmp_path / "tfds", source="jsonl", path=str(tmp_path))
  with pytest.raises(errors.DataError) as error:
    sources.load_examples(cfg, "train")
  assert str(error.value) == (f"{tmp_path / 'train.jsonl'}:{before + 1}: "
                              "not valid UTF-8 (byte 0xff)")


def test_jsonl_metadata_reaches_a_reward_function(tmp_path):
  """A line's keys other than question / answer / cot come back as the example's
  own keys, JSON values intact, and a reward function reads them."""
  from o3lite.rl import rewards as rewards_lib  # Only this test needs the RL stage.
  extra = {"spec": "Cite rule 7. ü", "step_labels": [1, 0], "meta": {"k": [1.5, None]}}
  records = _records(20)
  records[3] = {**records[3], **extra}
  _write_jsonl(tmp_path / "train.jsonl", records)
  _write_jsonl(tmp_path / "test.jsonl", [{**records[3], "question": "t?"}])
  cfg = _data_cfg(tmp_path / "tfds", source="jsonl", path=str(tmp_path))
  by_question = {ex["question"]: ex for split in SIZES
                 for ex in sources.load_examples(cfg, split)}
  assert by_question["q3?"] == {"question": "q3?", "cot": "step 3\nstep 4",
                                "answer": "3", **extra}
  assert by_question["t?"]["step_labels"] == [1, 0]
  assert by_question["q2?"] == {"question": "q2?", "cot": "", "answer": "2"}

  table = rewards_lib.RewardRegistry()

  @table.register("follows_spec")
  def follows_spec(example, completion, **_):
    return float(example.get("spec", "").startswith(completion)) + sum(
        example.get("step_labels", []))

  examples = [by_question["q3?"], by_question["q2?"]]
  context = rewards_lib.RewardContext(lambda a, t: a == t)
  scores = rewards_lib.RewardScorer({"follows_spec": 1.0}, context, rewards=table).score(
      examples, ["Cite rule", "Cite rule"], [1, 1], max_tokens=4)
  assert scores.total.tolist() == [2.0, 0.0]
  assert scores.failures == 0


def test_jsonl_missing_train(tmp_path):
  _write_jsonl(tmp_path / "test.jsonl", _records(3))
  with pytest.raises(errors.O3liteError, match="train.jsonl"):
    sources.load_examples(_data_cfg(tmp_path / "tfds", source="jsonl",
                                    path=str(tmp_path)), "test")


# --- SFT batching. ---


def _segments(batch):
  """Yields (row, inputs, targets, loss_mask, positions) per packed example."""
  for row in range(batch["inputs"].shape[0]):
    segment_ids = batch["segment_ids"][row]
    used = int((segment_ids > 0).sum())
    assert (segment_ids[used:] == 0).all()
    for segment in range(1, int(segment_ids.max()) + 1):
      where = np.flatnonzero(segment_ids == segment)
      assert where.size and (np.diff(where) == 1).all()
      yield row, *(batch[k][row, where] for k in
                   ("inputs", "targets", "loss_mask", "positions"))


@pytest.fixture(scope="module")
def examples():
  """120 distinct opchain problems of 1 to 6 steps: varied lengths."""
  rng = np.random.default_rng(0)
  problems = {}
  while len(problems) < 120:
    p = tasks.get_task("opchain", steps=len(problems) % 6 + 1).generate(rng)
    problems[p.question] = {"question": p.question, "cot": p.cot,
                            "answer": p.answer}
  return list(problems.values())


def _batcher(examples, tokenizer, **kwargs):
  args = dict(batch_size=4, seq_len=64, seed=0)
  args.update(kwargs)
  return pipeline.SFTBatcher(examples, tokenizer, **args)


def test_tokenize_example(examples, tokenizer):
  ex = examples[0]
  prompt, completion = pipeline.tokenize_example(ex, tokenizer, with_cot=True)
  assert tokenizer.decode(prompt) == ex["question"] + "\n"
  assert completion[-1] == tokenizer.eos_id
  assert tokenizer.decode(completion) == formatting.format_completion(
      ex["cot"], ex["answer"])
  _, short = pipeline.tokenize_example(ex, tokenizer, with_cot=False)
  assert tokenizer.decode(short) == "<think></think>" + ex["answer"]
  assert pipeline.encode_prompts([ex], tokenizer) == [prompt]


@pytest.mark.parametrize("with_cot", [True, False])
def test_batch_layout_and_loss_mask(examples, tokenizer, with_cot):
  batcher = _batcher(examples, tokenizer, with_cot=with_cot)
  batch, position = batcher.get_batch(0)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "inputs": ((4, 64), "int32"), "targets": ((4, 64), "int32"),
      "loss_mask": ((4, 64), "float32"), "segment_ids": ((4, 64), "int32"),
      "positions": ((4, 64), "int32")}
  consumed = 0
  for _, inputs, targets, mask, positions in _segments(batch):
    ex = examples[batcher.example_index(consumed)]
    prompt, completion = pipeline.tokenize_example(ex, tokenizer, with_cot)
    tokens = prompt + completion
    assert inputs.tolist() == tokens[:-1] and targets.tolist() == tokens[1:]
    assert positions.tolist() == list(range(len(tokens) - 1))
    assert mask.tolist() == [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    assert targets[mask == 1].tolist() == completion
    consumed += 1
  assert consumed == position > 4  # Packed: more examples than rows.
  padding = batch["segment_ids"] == 0
  assert padding.any()
  assert (batch["inputs"][padding] == tokenizer.pad_id).all()
  assert (batch["targets"][padding] == tokenizer.pad_id).all()
  assert (batch["loss_mask"][padding] == 0).all()


def test_packing_is_greedy(examples, tokenizer):
  batcher = _batcher(examples, tokenizer, batch_size=8, seq_len=80)
  batch, _ = batcher.get_batch(3)
  segments = list(_segments(batch))
  rows = [s[0] for s in segments]
  assert rows == sorted(rows) and set(rows) == set(range(8))
  free = 80 - (batch["segment_ids"] > 0).sum(axis=1)
  assert free[:7].max() > 0 and len(segments) > 8
  for row in range(7):
    next_row_start = segments[rows.index(row + 1)]
    assert len(next_row_start[1]) > free[row]  # It did not fit this row.


def test_determinism_and_resume(examples, tokenizer):
  batcher = _batcher(examples, tokenizer, seq_len=128)
  positions, batches, position = [], [], 0
  for _ in range(40):  # Several epochs of 120 examples.
    positions.append(position)
    batch, position = batcher.get_batch(position)
    batches.append(batch)
  assert position > 2 * len(examples)
  resumed = _batcher(examples, tokenizer, seq_len=128)  # As after a restart.
  for i in (17, 3, 39, 30):
    batch, next_position = resumed.get_batch(positions[i])
    assert all((batch[k] == batches[i][k]).all() for k in batch)
    assert i == 39 or next_position == positions[i + 1]
  other_seed = _batcher(examples, tokenizer, seq_len=128,
                        seed=1).get_batch(0)[0]
  assert not (other_seed["inputs"] == batches[0]["inputs"]).all()


def test_each_epoch_reads_every_example_once(examples, tokenizer):
  batcher = _batcher(examples, tokenizer, batch_size=3, seq_len=80)
  n = len(examples)
  read, position = [], 0
  while position < 2 * n:
    batch, position = batcher.get_batch(position)
    read += [tokenizer.decode(inputs).split("\n")[0]
             for _, inputs, *_ in _segments(batch)]
  expected = collections.Counter(ex["question"] for ex in examples)
  assert collections.Counter(read[:n]) == expected
  assert collections.Counter(read[n:2 * n]) == expected
  assert read[:n] != read[n:2 * n]  # A new permutation each epoch.


def test_unpacked_rows(examples, tokenizer):
  batch, position = _batcher(examples, tokenizer, pack=False).get_batch(118)
  assert position == 122
  assert (batch["segment_ids"].max(axis=1) == 1).all()
  assert len(list(_segments(batch))) == 4


def test_too_long_example(examples, tokenizer):
  length = sum(len(ids) for ids in pipeline.tokenize_example(
      examples[0], tokenizer, with_cot=True))
  with pytest.raises(errors.O3liteError, match=rf"{length} tokens.*seq_len=10\b"):
    _batcher(examples[:1], tokenizer, seq_len=10)
  batcher = _batcher(examples[:1], tokenizer, seq_len=length - 1)
  batch, _ = batcher.get_batch(0)
  assert (batch["segment_ids"] == 1).all()  # Fits exactly: L - 1 slots.
  with pytest.raises(errors.O3liteError, match="at least one"):
    _batcher([], tokenizer)


def test_jsonl_edited_in_place_is_read_again(tmp_path):
  """The prepared copy is keyed by the files' content (size, mtime), not by the folder
  path alone: an edited train.jsonl serves its new lines."""
  data = tmp_path / "mine"
  data.mkdir()
  _write_jsonl(data / "train.jsonl", _records(40))
  cfg = _data_cfg(tmp_path / "tfds", source="jsonl", path=str(data))
  first = {ex["question"] for ex in sources.load_examples(cfg, "train")}
  assert first and all(q.startswith("q") for q in first)
  _write_jsonl(data / "train.jsonl", _records(40, prefix="new"))
  again = {ex["question"] for ex in sources.load_examples(cfg, "train")}
  assert again and all(q.startswith("new") for q in again)
  # Unchanged files reuse the prepared copy: the same builder folder.
  assert sources.get_builder(cfg).data_dir == sources.get_builder(cfg).data_dir


def test_jsonl_empty_train_is_an_error(tmp_path):
  (tmp_path / "train.jsonl").write_text("")
  with pytest.raises(errors.DataError, match="train.jsonl has no examples"):
    sources.load_examples(_data_cfg(tmp_path / "tfds", source="jsonl",
                                    path=str(tmp_path)), "train")
