"""TFDS builders of question / chain-of-thought / answer datasets.

An example is a dict with "question", "cot" (steps joined by "\\n") and "answer"
strings, plus any metadata as further top-level keys (JSON values: a spec, step
labels, a task's "step_values"). Every builder writes array_record files with
four Text features, the three strings and `metadata`, the other keys as one JSON
object (TFDS features are fixed; metadata keys vary by dataset), and splits
train / validation / test that never share a question. `decode` turns a stored
record back into the example. They run without TensorFlow:

  builder = ReasoningTasks(data_dir=d, config=ReasoningTasks.make_config(
      "opchain", {"steps": 5}, (20000, 2000, 2000), seed=0),
      file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source("train")  # random access, values are bytes

Config names encode everything that changes the data (task knobs, sizes and
seed; a hash of the source folder for files), so a cache never mixes them.
"""

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from o3lite import errors
from o3lite.data import tasks

tfds.disable_progress_bar()
# TFDS warns about every config that is not declared in BUILDER_CONFIGS; ours
# are all made on the fly.
logging.getLogger("absl").addFilter(
    lambda record: "custom data configuration" not in record.getMessage())

Example = dict[str, Any]  # "question", "cot", "answer" strings + metadata keys.
TEXT_KEYS = ("question", "cot", "answer")

# GSM8K ships with the package (MIT, o3lite/data/gsm8k/LICENSE; SOURCE.md says whence).
DEFAULT_GSM8K_PATH = str(pathlib.Path(__file__).resolve().parent / "gsm8k")
SPLITS = tasks.SPLITS


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "question": tfds.features.Text(),
      "cot": tfds.features.Text(),
      "answer": tfds.features.Text(),
      "metadata": tfds.features.Text(),  # JSON object of the other keys.
  })


def encode(example: Example) -> dict[str, str]:
  """The stored record of an example: its metadata keys as one JSON string."""
  metadata = {k: v for k, v in example.items() if k not in TEXT_KEYS}
  return {**{k: example[k] for k in TEXT_KEYS},
          "metadata": json.dumps(metadata, separators=(",", ":"))}


def decode(record: Mapping[str, bytes]) -> Example:
  """The example of a stored record (values as bytes, as TFDS gives them)."""
  example = {k: record[k].decode("utf-8") for k in TEXT_KEYS}
  metadata = record["metadata"]
  if metadata != b"{}":
    example.update(json.loads(metadata))
  return example


def _short_hash(text: str) -> str:
  return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared pieces: version, features, and examples keyed by position."""

  # A new version is prepared in its own folder under data_dir: a cache written by an
  # older version is never read as this one.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "A `metadata` feature: each example's keys other than question, cot and "
               "answer as a JSON object (JSONL lines' extra keys, tasks' step_values).",
  }

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources`, which we do not install.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    # Not `dataset_info_from_configs`: it needs the builder to live in a TFDS
    # package with metadata files.
    return tfds.core.DatasetInfo(builder=self, features=_features())

  def _generate_examples(
      self, examples: Sequence[Example]) -> Iterator[tuple[int, dict[str, str]]]:
    for index, example in enumerate(examples):
      yield index, encode(example)


# --- Procedural tasks. ---


@dataclasses.dataclass(eq=False)
class ReasoningTasksConfig(tfds.core.BuilderConfig):
  """A task, its difficulty knobs, the split sizes and the seed."""

  task: str = "opchain"
  task_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  num_examples: tuple[int, int, int] = (20000, 2000, 2000)
  seed: int = 0


class ReasoningTasks(_Builder, skip_registration=True):
  """Problems of a registered procedural task (see `o3lite.tasks`)."""

  @staticmethod
  def make_config(task: str, task_kwargs: Mapping[str, Any],
                  num_examples: Sequence[int],
                  seed: int) -> ReasoningTasksConfig:
    """Returns the config; its name lists every knob, defaults included.

    Args:
      task: a registered task name.
      task_kwargs: its difficulty knobs; unknown or invalid ones raise.
      num_examples: sizes of the train, validation and test splits.
      seed: seed of the problem stream.
    """
    difficulty = tasks.get_task(task, **task_kwargs).difficulty
    sizes = tuple(int(n) for n in num_examples)
    if len(sizes) != len(SPLITS) or min(sizes) < 0:
      raise errors.ConfigError(f"num_examples must be 3 sizes >= 0, got {sizes}.")
    knobs = "".join(f"-{k}{v}" for k, v in difficulty.items())
    name = f"{task}{knobs}-n{'-'.join(map(str, sizes))}-s{seed}"
    return ReasoningTasksConfig(name=name, task=task, task_kwargs=difficulty,
                                num_examples=sizes, seed=seed)

  def _split_generators(self, dl_manager):
    del dl_manager
    task = tasks.get_task(self.builder_config.task,
                          **self.builder_config.task_kwargs)
    splits = {}
    for split, size in zip(SPLITS, self.builder_config.num_examples):
      problems = tasks.generate_split(task, split, size,
                                      self.builder_config.seed)
      splits[split] = self._generate_examples(
          [{"question": p.question, "cot": p.cot, "answer": p.answer,
            "step_values": list(p.step_values)} for p in problems])
    return splits


# --- JSONL files. ---


def read_jsonl(path: str,
               parse: Callable[[dict[str, Any]], Example]) -> list[Example]:
  """Reads a JSONL file of objects, one example per non-blank line.

  Args:
    path: the file.
    parse: turns one JSON object into an example; raises ValueError with a
      short reason when the object is malformed.

  Raises:
    DataError: "path:line: reason" for the first malformed line (or for the first
      line that is not valid UTF-8).
  """
  examples = []
  try:
    with open(path, encoding="utf-8") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise errors.DataError(f"invalid JSON ({e.msg})") from None
          if not isinstance(record, dict):
            raise errors.DataError(
                f"expected a JSON object, got {type(record).__name__}")
          examples.append(parse(record))
        except errors.DataError as e:
          raise errors.DataError(f"{path}:{line_number}: {e}") from None
  except UnicodeDecodeError:  # Decoded a chunk at a time: find the line in the bytes.
    raise _not_utf8(path) from None
  return examples


def _not_utf8(path: str) -> errors.DataError:
  """The error for a file that is not valid UTF-8, naming its first bad line and byte."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    return errors.DataError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x})")
  return errors.DataError(f"{path}: not valid UTF-8")


def _get_str(record: Mapping[str, Any], key: str, required: bool = True) -> str:
  if key not in record:
    if required:
      raise errors.DataError(f"missing key {key!r}")
    return ""
  value = record[key]
  if not isinstance(value, str):
    raise errors.DataError(f"key {key!r} must be a string, got "
                           f"{type(value).__name__}")
  return value


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.split("\n") if line.strip()]


_CALCULATOR = re.compile(r"<<[^>]*>>")


def parse_gsm8k(record: Mapping[str, Any]) -> Example:
  """A GSM8K record: solution lines, calculator annotations, "#### answer"."""
  question = _get_str(record, "question").strip()
  solution, marker, answer = _get_str(record, "answer").rpartition("####")
  if not marker:
    raise errors.DataError("answer has no '####' final-answer line")
  answer = answer.strip().replace(",", "")
  if not answer:
    raise errors.DataError("empty final answer after '####'")
  cot = "\n".join(_lines(_CALCULATOR.sub("", solution)))
  return {"question": question, "cot": cot, "answer": answer}


def parse_record(record: Mapping[str, Any]) -> Example:
  """A user record: question, answer (strings), an optional cot, and any other keys
  kept as they are, the example's metadata (`record["spec"]` is `example["spec"]`)."""
  question = _get_str(record, "question").strip()
  answer = _get_str(record, "answer").strip()
  cot = "\n".join(_lines(_get_str(record, "cot", required=False)))
  if not question:
    raise errors.DataError("empty 'question'")
  if not answer:
    raise errors.DataError("empty 'answer'")
  return {"question": question, "cot": cot, "answer": answer,
          **{k: v for k, v in record.items() if k not in TEXT_KEYS}}


def carve_split(examples: Sequence[Example], low: float,
                high: float) -> tuple[list[Example], list[Example]]:
  """Splits off the examples whose question hashes into [low, high).

  Returns:
    (kept, carved): a stable, deterministic partition; equal questions always
    land on the same side.
  """
  kept, carved = [], []
  for example in examples:
    inside = low <= tasks.hash_fraction(example["question"]) < high
    (carved if inside else kept).append(example)
  return kept, carved


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """A folder of JSONL files."""

  path: str = ""


def _content_key(path: str) -> str:
  """The folder and every JSONL file in it by name, size and modification time: a file
  edited in place (or added, or removed) gives another key, so the prepared copy is
  rebuilt instead of silently serving stale data."""
  parts = [path]
  if os.path.isdir(path):
    for name in sorted(os.listdir(path)):
      if name.endswith(".jsonl"):
        stat = os.stat(os.path.join(path, name))
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
  return "|".join(parts)


def _folder_config(prefix: str, path: str) -> FolderConfig:
  path = os.path.abspath(os.path.expanduser(path))
  return FolderConfig(name=f"{prefix}-{_short_hash(_content_key(path))}", path=path)


def _require_folder(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise errors.DataError(f"{what} folder not found: {path}")


class Gsm8k(_Builder, skip_registration=True):
  """GSM8K grade-school maths from local train.jsonl / test.jsonl.

  test is test.jsonl; validation is the ~5% of train.jsonl whose question
  hashes into [0.95, 1); train is the rest.
  """

  VALIDATION_FRACTION = 0.05

  @staticmethod
  def make_config(path: str = "") -> FolderConfig:
    """Config for the folder `path` ("" = the shared GSM8K copy)."""
    return _folder_config("gsm8k", path or DEFAULT_GSM8K_PATH)

  def _split_generators(self, dl_manager):
    del dl_manager
    path = self.builder_config.path
    _require_folder(path, "GSM8K")
    train = read_jsonl(os.path.join(path, "train.jsonl"), parse_gsm8k)
    test = read_jsonl(os.path.join(path, "test.jsonl"), parse_gsm8k)
    train, validation = carve_split(train, 1 - self.VALIDATION_FRACTION, 1.0)
    return {"train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
            "test": self._generate_examples(test)}


class JsonlDataset(_Builder, skip_registration=True):
  """Users' own data: a folder with train.jsonl and optional eval files.

  Lines are {"question": str, "answer": str, "cot": str (optional)}; any other keys
  are the example's metadata, kept as they are (`example["spec"]`). A missing
  validation.jsonl (test.jsonl) is carved from train: the questions hashing
  into [0.8, 0.9) ([0.9, 1.0)). Train examples whose question is in an
  evaluation split are dropped, so splits never share a question.
  """

  CARVE = {"validation": (0.8, 0.9), "test": (0.9, 1.0)}

  @staticmethod
  def make_config(path: str) -> FolderConfig:
    """Config for the folder `path`."""
    if not path:
      raise errors.ConfigError("JsonlDataset needs a folder path.")
    return _folder_config("jsonl", path)

  def _split_generators(self, dl_manager):
    del dl_manager
    path = self.builder_config.path
    _require_folder(path, "JSONL dataset")
    train_file = os.path.join(path, "train.jsonl")
    if not os.path.isfile(train_file):
      raise errors.DataError(f"JSONL dataset has no train.jsonl: {train_file}")
    splits = {"train": read_jsonl(train_file, parse_record)}
    if not splits["train"]:
      raise errors.DataError(f"{train_file} has no examples (empty file)")
    for split, (low, high) in self.CARVE.items():
      file = os.path.join(path, f"{split}.jsonl")
      if os.path.isfile(file):
        splits[split] = read_jsonl(file, parse_record)
      else:
        splits["train"], splits[split] = carve_split(splits["train"], low, high)
    held_out = {ex["question"] for s in self.CARVE for ex in splits[s]}
    train = [ex for ex in splits["train"] if ex["question"] not in held_out]
    if len(train) < len(splits["train"]):
      logging.warning("%s: dropped %d train examples whose question is in "
                      "validation or test.", path,
                      len(splits["train"]) - len(train))
    splits["train"] = train
    return {split: self._generate_examples(splits[split]) for split in SPLITS}
