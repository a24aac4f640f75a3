"""Our tokenizers as Hugging Face tokenizer files (`AutoTokenizer.from_pretrained`).

An `HFTokenizer` saves itself (`save_pretrained`). A `SentencePieceTokenizer` (as
`train_sentencepiece` writes it: BPE, identity normalization, no dummy prefix) becomes a
`tokenizers` BPE tokenizer built from its model proto, giving the same ids:

  * vocabulary: the pieces with their ids; merges: every split of a piece into two
    pieces, ranked by the merged piece's id (SentencePiece BPE merges the pair whose
    merged piece scores highest, and scores fall with the id);
  * normalizer: " " -> "▁" only; no pre-tokenizer, so BPE sees the whole text, as in
    SentencePiece; unknown characters become `<0xNN>` byte pieces (byte fallback) or
    one fused unk;
  * user-defined pieces (`<think>`, `</think>`, "\\n") and control pieces (pad, eos) are
    added tokens, matched before BPE; the think delimiters and control pieces are
    special. Unlike SentencePiece, a text that spells out a control piece ("</s>")
    gets its id, as is usual for Hugging Face tokenizers;
  * no BOS or EOS is added; decoding maps "▁" back to " " and fuses byte pieces.

`tokenizer_config.json` names `PreTrainedTokenizerFast`, which transformers 4 and 5 load.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, normalizers

from o3lite import errors
from o3lite.data import formatting
from o3lite.data import tokenizers as tokenizer_lib

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4  # SentencePiece piece types.
_BPE = 2  # SentencePiece model type.


def _load_proto(model_file: str) -> Any:
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_file, "rb") as f:
    proto.ParseFromString(f.read())
  checks = {
      "trainer_spec.model_type": (proto.trainer_spec.model_type, _BPE),
      "normalizer_spec.name": (proto.normalizer_spec.name, "identity"),
      "normalizer_spec.add_dummy_prefix": (proto.normalizer_spec.add_dummy_prefix, False),
      "normalizer_spec.remove_extra_whitespaces": (
          proto.normalizer_spec.remove_extra_whitespaces, False),
  }
  for field, (value, expected) in checks.items():
    if value != expected:
      raise errors.DataError(f"{model_file}: {field}={value!r} cannot be converted; expected "
                             f"{expected!r} (as train_sentencepiece writes)")
  return proto


def sentencepiece_to_hf(model_file: str) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` giving the same ids as the SentencePiece `model_file`."""
  proto = _load_proto(model_file)
  pieces = [(p.piece, p.type) for p in proto.pieces]
  vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
  normal = {piece for piece, kind in pieces if kind == _NORMAL}
  ranked = []
  for i, (piece, kind) in enumerate(pieces):
    if kind != _NORMAL:
      continue
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in normal and right in normal:
        ranked.append((i, vocab[left], (left, right)))
  merges = [merge for *_, merge in sorted(ranked)]
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
      byte_fallback=proto.trainer_spec.byte_fallback))
  tok.normalizer = normalizers.Replace(" ", "▁")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  special = {formatting.THINK_START, formatting.THINK_END}
  tok.add_tokens([
      tokenizers.AddedToken(piece, special=kind == _CONTROL or piece in special,
                            normalized=False)
      for piece, kind in pieces if kind in (_CONTROL, _USER_DEFINED)])
  return tok


def _save_sentencepiece(tokenizer: tokenizer_lib.SentencePieceTokenizer,
                        out_dir: str) -> None:
  proto = _load_proto(tokenizer.path)
  pieces = [p.piece for p in proto.pieces]
  sentencepiece_to_hf(tokenizer.path).save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": pieces[tokenizer.eos_id],
      "pad_token": pieces[tokenizer.pad_id] if tokenizer.pad_id >= 0 else None,
      "unk_token": proto.trainer_spec.unk_piece,
      "add_bos_token": False,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")


def save(tokenizer: Any, out_dir: str) -> None:
  """Writes Hugging Face tokenizer files of an o3lite tokenizer into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    _save_sentencepiece(tokenizer, out_dir)
  elif isinstance(tokenizer, tokenizer_lib.HFTokenizer):
    tokenizer.save(out_dir)
  else:
    raise errors.ConfigError(f"cannot export a {type(tokenizer).__name__} as a Hugging Face "
                             "tokenizer")


def load_saved(directory: str) -> Any:
  """The tokenizer that `Tokenizer.save(directory)` wrote (e.g. a run's tokenizer/)."""
  if not os.path.isdir(directory):
    raise errors.DataError(f"tokenizer folder not found: {directory}")
  if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
    return tokenizer_lib.HFTokenizer(directory)
  model_file = os.path.join(directory, tokenizer_lib.SENTENCEPIECE_FILE)
  if os.path.isfile(model_file):
    return tokenizer_lib.SentencePieceTokenizer(model_file)
  raise errors.DataError(f"no tokenizer_config.json or {tokenizer_lib.SENTENCEPIECE_FILE} "
                         f"in {directory}")
