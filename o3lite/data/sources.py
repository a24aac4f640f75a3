"""Examples of a data config as decoded dicts, and the matching checker.

`data_cfg` is the `data` section of a run config (an ml_collections ConfigDict
or anything with these attributes):

  source         "task" | "gsm8k" | "jsonl"
  task           task name, for source "task"
  task_kwargs    its difficulty knobs (dict / ConfigDict)
  path           folder of JSONL files for gsm8k / jsonl ("" = GSM8K as shipped in o3lite/data/gsm8k)
  data_dir       TFDS data dir where datasets are prepared and cached
  num_train, num_validation, num_test, seed   split sizes and seed (task)
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import logging
import os
import tempfile

import tensorflow_datasets as tfds

from o3lite import errors
from o3lite.data import tasks
from o3lite.data import builders
from o3lite.data import formatting
from o3lite.data import tokenizers

SOURCES = ("task", "gsm8k", "jsonl")


def _as_dict(kwargs: Any) -> dict[str, Any]:
  if kwargs is None:
    return {}
  if hasattr(kwargs, "to_dict"):  # ml_collections.ConfigDict
    return kwargs.to_dict()
  return dict(kwargs)


def get_builder(data_cfg: Any) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of `data_cfg` (prepares it if needed).

  Raises:
    ValueError: unknown source (or task / knob, see `tasks.get_task`).
    FileNotFoundError: missing source folder for gsm8k / jsonl.
  """
  source = data_cfg.source
  if source == "task":
    builder_cls = builders.ReasoningTasks
    config = builder_cls.make_config(
        data_cfg.task, _as_dict(data_cfg.task_kwargs),
        (data_cfg.num_train, data_cfg.num_validation, data_cfg.num_test),
        data_cfg.seed)
  elif source == "gsm8k":
    builder_cls = builders.Gsm8k
    config = builder_cls.make_config(data_cfg.path)
  elif source == "jsonl":
    builder_cls = builders.JsonlDataset
    config = builder_cls.make_config(data_cfg.path)
  else:
    raise errors.ConfigError(f"Unknown data source {source!r}; valid: {list(SOURCES)}.")
  builder = builder_cls(data_dir=data_cfg.data_dir, config=config,
                        file_format="array_record")
  builder.download_and_prepare()
  return builder


def load_examples(data_cfg: Any, split: str) -> Sequence[dict[str, Any]]:
  """Returns the examples of `split`: dicts of "question", "cot" and "answer"
  strings plus the example's metadata as further keys (a JSONL line's other keys,
  a task's "step_values"; see `builders`).

  The order is the (deterministic) order of the prepared files.
  """
  if split not in builders.SPLITS:
    raise errors.ConfigError(
        f"Unknown split {split!r}; valid: {list(builders.SPLITS)}.")
  source = get_builder(data_cfg).as_data_source(split)
  records = source.__getitems__(range(len(source))) if len(source) else []
  return [builders.decode(record) for record in records]


def get_checker(data_cfg: Any) -> Callable[[str | None, str], bool]:
  """Returns `check(predicted, target) -> bool` for the data's answers."""
  if data_cfg.source == "task":
    return tasks.get_task(data_cfg.task, **_as_dict(data_cfg.task_kwargs)).check
  if data_cfg.source in SOURCES:
    return tasks.numeric_match
  raise errors.ConfigError(
      f"Unknown data source {data_cfg.source!r}; valid: {list(SOURCES)}.")


def _training_texts(examples: Iterable[dict[str, str]]) -> Iterable[str]:
  for ex in examples:
    yield (formatting.format_prompt(ex["question"])
           + formatting.format_completion(ex["cot"], ex["answer"]))


def get_tokenizer(data_cfg: Any) -> tokenizers.Tokenizer:
  """The tokenizer of a data config.

  `data_cfg.tokenizer` is a `.model` file (SentencePiece), a folder (Hugging
  Face), or "": then a SentencePiece model of `data_cfg.vocab_size` pieces is
  trained on the train split's prompts + completions (with CoT) and cached in
  the prepared dataset's folder, so the same data always get the same one.
  """
  path = data_cfg.tokenizer
  chat = bool(data_cfg.get("chat_template", False))
  if path and os.path.isdir(path):
    return tokenizers.HFTokenizer(path, chat)
  if chat:
    raise errors.ConfigError("data.chat_template=True needs a Hugging Face tokenizer "
                             "folder (init_from or data.tokenizer); this run's tokenizer "
                             "is SentencePiece, which has no chat template")
  if path:
    if path.endswith(".model"):
      return tokenizers.SentencePieceTokenizer(path)
    raise errors.ConfigError(f"Tokenizer {path!r} is neither a SentencePiece "
                             ".model file nor a Hugging Face folder.")
  builder = get_builder(data_cfg)
  cached = os.path.join(os.fspath(builder.data_dir), "tokenizer",
                        f"spm_bpe_v{data_cfg.vocab_size}.model")
  if not os.path.isfile(cached):
    examples = load_examples(data_cfg, "train")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(cached)) as tmp:
      trained = tokenizers.train_sentencepiece(_training_texts(examples),
                                    data_cfg.vocab_size,
                                    os.path.join(tmp, "spm"))
      os.replace(trained.path, cached)  # Atomic: readers see all or nothing.
    logging.info("Trained tokenizer %s (%d pieces).", cached,
                 trained.vocab_size)
  return tokenizers.SentencePieceTokenizer(cached)
