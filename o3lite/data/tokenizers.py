"""Tokenizers: our own SentencePiece models, or a local Hugging Face one.

Both expose the same small interface (`Tokenizer`): `encode` adds no EOS,
`decode` stops at the first EOS and drops padding, and the think delimiters of
`o3lite.formatting` are single ids. A Hugging Face tokenizer can also wrap prompts in
its chat template (`chat`, from `data.chat_template`; `formatting.encode_prompt`).

  tokenizer = sources.get_tokenizer(config.data)   # o3lite.data.sources
"""

import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm

from o3lite import errors
from o3lite.data import formatting

SENTENCEPIECE_FILE = "tokenizer.model"
# Beside a saved Hugging Face tokenizer: {"chat_template": true} when its run's prompts
# were wrapped in the chat template, so whatever loads the run formats them the same way.
PROMPT_FORMAT_FILE = "o3lite_prompt_format.json"


class Tokenizer(Protocol):
  """What the rest of o3lite needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  eos_id: int
  think_start_id: int
  think_end_id: int
  path: str  # where it was loaded from: a .model file or a folder.
  chat: bool  # prompts are wrapped in the tokenizer's chat template (encode_chat).

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without EOS."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS, pad ids dropped."""

  def save(self, directory: str) -> None:
    """Writes the files `get_tokenizer` / the class reload it from."""


def _until_eos(ids: Sequence[int], eos_id: int, pad_id: int) -> list[int]:
  out = []
  for i in ids:
    i = int(i)
    if i == eos_id:
      break
    if i != pad_id:
      out.append(i)
  return out


def _single_id(tokenizer: Tokenizer, text: str) -> int:
  ids = tokenizer.encode(text)
  if len(ids) != 1:
    raise errors.DataError(f"{text!r} is not a single token in {tokenizer.path}: "
                           f"{ids}.")
  return ids[0]


class SentencePieceTokenizer:
  """A SentencePiece model file (as written by `train_sentencepiece`)."""

  def __init__(self, model_file: str):
    if not os.path.isfile(model_file):
      raise errors.ConfigError(f"SentencePiece model not found: {model_file}")
    self.path = model_file
    self.chat = False  # A SentencePiece model has no chat template.
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise errors.DataError(f"{model_file} has no EOS piece.")
    self.think_start_id = _single_id(self, formatting.THINK_START)
    self.think_end_id = _single_id(self, formatting.THINK_END)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(_until_eos(ids, self.eos_id, self.pad_id))

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SENTENCEPIECE_FILE), "wb") as f:
      f.write(self._sp.serialized_model_proto())


_SPECIAL_PIECES = (formatting.THINK_START, formatting.THINK_END, "\n")
_NUM_META_PIECES = 3  # pad, unk, eos.
_NUM_BYTE_PIECES = 256


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        model_prefix: str) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece model; writes `model_prefix`.model / .vocab.

  Digits are split, "<think>", "</think>" and "\n" are single pieces and text
  is not normalized, so decode(encode(s)) == s for every s made of characters
  of `texts`. When `vocab_size` has room for the 256 byte pieces next to every
  character of `texts`, unknown characters fall back to bytes and every s
  round-trips; a smaller vocabulary (a tiny model on a task with a dozen
  characters) keeps all characters of `texts` but no byte pieces, and unseen
  characters become unk. `vocab_size` is a soft limit: a small corpus gives
  fewer pieces.

  Args:
    texts: the training texts (e.g. prompt + completion of each example).
    vocab_size: the most pieces to learn.
    model_prefix: path prefix of the files written.

  Raises:
    ValueError: `vocab_size` below the characters of `texts` plus 6 special
      pieces, or SentencePiece failed.
  """
  texts = list(texts)
  chars = set()
  for text in texts:
    for piece in _SPECIAL_PIECES:
      text = text.replace(piece, "")
    chars.update(text)
  required = _NUM_META_PIECES + len(_SPECIAL_PIECES) + len(chars)
  if vocab_size < required:
    raise errors.ConfigError(
        f"vocab_size={vocab_size} is too small: the data have {len(chars)} "
        f"distinct characters, so at least {required} pieces are needed.")
  byte_fallback = vocab_size >= required + _NUM_BYTE_PIECES
  spm.set_random_generator_seed(0)  # Sampling of large corpora.
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        pad_id=0, unk_id=1, eos_id=2, bos_id=-1,
        user_defined_symbols=list(_SPECIAL_PIECES),
        byte_fallback=byte_fallback,
        # Without byte pieces every training character must get a piece.
        character_coverage=0.9995 if byte_fallback else 1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise errors.DataError(f"SentencePiece training failed (vocab_size="
                           f"{vocab_size}): {e}") from e
  return SentencePieceTokenizer(model_prefix + ".model")


class HFTokenizer:
  """A Hugging Face tokenizer from a local folder (no downloads).

  The think delimiters are added as special tokens if they are not single
  tokens already; `vocab_size` then counts them, so the model's embedding
  must be resized to it. `added_ids` are their ids, `base_size` the number of
  tokens the folder's tokenizer had (the rows a checkpoint trained) and
  `added_pieces` each added token's ids before it was added, so the importer can
  start each new row as the mean of its pieces' trained rows, even where the
  embedding already had spare rows (Qwen2.5: 151,936 rows, 151,665 tokens).
  """

  def __init__(self, local_dir: str, chat_template: bool = False):
    """`chat_template`: wrap prompts in the folder's chat template (also on when the
    folder was saved by a run that did); a one-line DataError when it has none."""
    if not os.path.isdir(local_dir):
      raise errors.ConfigError(f"Hugging Face tokenizer folder not found: "
                               f"{local_dir}")
    import transformers  # pylint: disable=g-import-not-at-top

    self.path = local_dir
    try:
      self._tok = transformers.AutoTokenizer.from_pretrained(
          local_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # transformers' "cannot load" errors.
      reason = " ".join(str(e).split())[:200]
      raise errors.DataError(f"{local_dir}: no Hugging Face tokenizer could be loaded "
                             f"from it ({type(e).__name__}: {reason})") from e
    self.base_size = len(self._tok)
    self.added_ids: list[int] = []
    # Each added token's ids in the original vocabulary ("<think>" -> "<", "think", ">"):
    # the importer starts its row as their mean, so the two delimiters differ from the
    # start (from one shared mean row, SmolLM2's warm start wrote </think> for <think>).
    self.added_pieces: dict[int, list[int]] = {}
    for delimiter in (formatting.THINK_START, formatting.THINK_END):
      pieces = self.encode(delimiter)
      if len(pieces) != 1:
        self._tok.add_tokens([delimiter], special_tokens=True)
        self.added_ids.append(self._tok.convert_tokens_to_ids(delimiter))
        self.added_pieces[self.added_ids[-1]] = pieces
    if self._tok.eos_token_id is None:
      raise errors.DataError(f"Tokenizer in {local_dir} has no EOS token.")
    self.eos_id = self._tok.eos_token_id
    pad = self._tok.pad_token_id
    self.pad_id = self.eos_id if pad is None else pad
    self.vocab_size = len(self._tok)
    self.think_start_id = _single_id(self, formatting.THINK_START)
    self.think_end_id = _single_id(self, formatting.THINK_END)
    self.chat = bool(chat_template) or _saved_chat(local_dir)
    if self.chat and not getattr(self._tok, "chat_template", None):
      raise errors.DataError(f"{local_dir}: its tokenizer has no chat template, so prompts "
                             "cannot be chat-formatted: set data.chat_template=False")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False)

  def encode_chat(self, user: str, system: str | None = None) -> list[int]:
    """Ids of the chat template's prompt: [the system turn,] the user turn, and the
    opening of the assistant's turn (the generation prompt), which the model completes."""
    messages = [{"role": "system", "content": system}] if system else []
    text = self._tok.apply_chat_template(messages + [{"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)
    return self.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(_until_eos(ids, self.eos_id, self.pad_id),
                            skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)

  def save(self, directory: str) -> None:
    self._tok.save_pretrained(directory)
    if self.chat:
      with open(os.path.join(directory, PROMPT_FORMAT_FILE), "w") as f:
        json.dump({"chat_template": True}, f)


def _saved_chat(directory: str) -> bool:
  path = os.path.join(directory, PROMPT_FORMAT_FILE)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return bool(json.load(f).get("chat_template", False))


def saved_path(directory: str) -> str:
  """The `data.tokenizer` value that reloads a tokenizer written by `save(directory)`."""
  if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
    return directory  # A Hugging Face tokenizer folder.
  return os.path.join(directory, SENTENCEPIECE_FILE)
