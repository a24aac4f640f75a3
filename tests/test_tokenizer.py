"""Tests of the SentencePiece and Hugging Face tokenizers."""

import os

import ml_collections
import numpy as np
import pytest

from o3lite import errors
from o3lite.data import formatting
from o3lite.data import tasks
from o3lite.data import sources
from o3lite.data import tokenizers as tokenizer_lib

ODD_TEXTS = [
    "", " ", "  two  spaces\n\n\tand a tab ", " leading", "trailing\n",
    "Ünïcödé 漢字 🙂", "<think></think>", "a</think>b<think>c",
    "1,234.50",
]


def _texts(n=60):
  texts = []
  rng = np.random.default_rng(0)
  for name in ("opchain", "addition", "multiplication"):
    task = tasks.get_task(name)
    for _ in range(n):
      p = task.generate(rng)
      for with_cot in (True, False):
        texts.append(formatting.format_prompt(p.question)
                     + formatting.format_completion(p.cot, p.answer, with_cot))
  return texts


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("spm") / "spm")
  return tokenizer_lib.train_sentencepiece(_texts(), 400, prefix)


def test_sentencepiece_round_trip(sp_tokenizer):
  for text in _texts(30) + ODD_TEXTS:
    ids = sp_tokenizer.encode(text)
    assert sp_tokenizer.eos_id not in ids
    assert sp_tokenizer.pad_id not in ids
    assert sp_tokenizer.decode(ids) == text


def test_sentencepiece_special_ids(sp_tokenizer):
  tok = sp_tokenizer
  assert (tok.pad_id, tok.eos_id) == (0, 2)
  assert tok.encode("<think>") == [tok.think_start_id]
  assert tok.encode("</think>") == [tok.think_end_id]
  assert len({tok.pad_id, tok.eos_id, tok.think_start_id,
              tok.think_end_id}) == 4
  ids = tok.encode("<think>1+2=3</think>3")
  assert ids[0] == tok.think_start_id and ids[-2] == tok.think_end_id
  assert tok.encode("7+15") == tok.encode("7") + tok.encode("+") + tok.encode(
      "1") + tok.encode("5")  # Digits are split.
  assert len(tok.encode("\n")) == 1
  assert max(max(tok.encode(t)) for t in _texts(10)) < tok.vocab_size


def test_sentencepiece_decode_stops_at_eos(sp_tokenizer):
  tok = sp_tokenizer
  ids = tok.encode("12</think>3")
  assert tok.decode(ids + [tok.eos_id] + tok.encode("junk")) == "12</think>3"
  assert tok.decode([tok.pad_id] + ids + [tok.pad_id] * 3) == "12</think>3"
  assert tok.decode(np.asarray(ids + [tok.eos_id], np.int32)) == "12</think>3"


def test_sentencepiece_save_reload(sp_tokenizer, tmp_path):
  sp_tokenizer.save(str(tmp_path / "saved"))
  reloaded = tokenizer_lib.SentencePieceTokenizer(
      str(tmp_path / "saved" / tokenizer_lib.SENTENCEPIECE_FILE))
  for text in _texts(10):
    assert reloaded.encode(text) == sp_tokenizer.encode(text)
  assert reloaded.vocab_size == sp_tokenizer.vocab_size


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(errors.O3liteError, match="nope.model"):
    tokenizer_lib.SentencePieceTokenizer(str(tmp_path / "nope.model"))
  with pytest.raises(errors.O3liteError, match="vocab_size=20 is too small"):
    tokenizer_lib.train_sentencepiece(_texts(5), 20, str(tmp_path / "small"))


def test_sentencepiece_small_vocab_without_byte_fallback(sp_tokenizer,
                                                         tmp_path):
  assert sp_tokenizer.vocab_size > 256  # Byte pieces: all text round-trips.
  tok = tokenizer_lib.train_sentencepiece(_texts(), 64, str(tmp_path / "s"))
  assert tok.vocab_size <= 64
  for text in _texts(30):
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<think>") == [tok.think_start_id]
  assert tok.encode("\n") != [1] and len(tok.encode("\n")) == 1
  assert tok.encode("é") == [1]  # Unseen character: unk.


def _data_cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      source="task", task="opchain", task_kwargs={"steps": 3}, path="",
      data_dir=str(data_dir), num_train=200, num_validation=20, num_test=20,
      seed=0, tokenizer="", vocab_size=320, with_cot=True))
  cfg.update(overrides)
  return cfg


def test_get_tokenizer_trains_and_caches(tmp_path, monkeypatch):
  cfg = _data_cfg(tmp_path / "a")
  tok = sources.get_tokenizer(cfg)
  assert tok.path.startswith(str(tmp_path / "a"))
  assert os.path.basename(tok.path) == "spm_bpe_v320.model"
  assert "opchain-steps3-modulus10-n200-20-20-s0" in tok.path
  assert os.listdir(os.path.dirname(tok.path)) == ["spm_bpe_v320.model"]
  mtime = os.path.getmtime(tok.path)

  def fail(*args, **kwargs):
    raise AssertionError("retrained a cached tokenizer")

  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", fail)
  cached = sources.get_tokenizer(cfg)
  assert cached.path == tok.path and os.path.getmtime(tok.path) == mtime
  monkeypatch.undo()

  again = sources.get_tokenizer(_data_cfg(tmp_path / "b"))
  assert again.vocab_size == tok.vocab_size  # Same data -> same tokenizer.
  for text in _texts(20):
    assert again.encode(text) == tok.encode(text)
  other = sources.get_tokenizer(_data_cfg(tmp_path / "a",
                                                vocab_size=300))
  assert other.path != tok.path

  explicit = sources.get_tokenizer(
      _data_cfg(tmp_path, tokenizer=tok.path))
  assert isinstance(explicit, tokenizer_lib.SentencePieceTokenizer)
  assert explicit.encode("3 +4 mod 10\n") == tok.encode("3 +4 mod 10\n")


def test_get_tokenizer_bad_path(tmp_path):
  for name in ("missing.txt", "gone.model"):
    with pytest.raises(errors.O3liteError, match=name):
      sources.get_tokenizer(
          _data_cfg(tmp_path, tokenizer=str(tmp_path / name)))


def _save_hf_tokenizer(directory, with_pad):
  """Builds a tiny byte-level BPE tokenizer and saves it like a checkpoint."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  specials = ["<|endoftext|>"] + (["<pad>"] if with_pad else [])
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_texts(20), trainer=trainer)
  kwargs = {"pad_token": "<pad>"} if with_pad else {}
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", **kwargs)
  fast.save_pretrained(str(directory))
  return len(fast)


def test_hf_tokenizer(tmp_path):
  base_size = _save_hf_tokenizer(tmp_path / "hf", with_pad=False)
  tok = sources.get_tokenizer(_data_cfg(tmp_path,
                                              tokenizer=str(tmp_path / "hf")))
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert tok.vocab_size == base_size + 2  # The two think delimiters.
  assert tok.base_size == base_size and tok.added_ids == [base_size, base_size + 1]
  pieces = tok.added_pieces  # Each delimiter's ids before it was added: distinct, old.
  assert set(pieces) == set(tok.added_ids) and pieces[base_size] != pieces[base_size + 1]
  assert all(len(p) > 1 and max(p) < base_size for p in pieces.values())
  assert tok.encode("<think>") == [tok.think_start_id]
  assert tok.encode("</think>") == [tok.think_end_id]
  assert tok.eos_id == 0 and tok.pad_id == tok.eos_id
  for text in _texts(10) + ODD_TEXTS:
    ids = tok.encode(text)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text
  ids = tok.encode("<think>1+2=3</think>3")
  assert ids[0] == tok.think_start_id
  assert tok.decode(ids + [tok.eos_id, 5, 6]) == "<think>1+2=3</think>3"

  tok.save(str(tmp_path / "saved"))
  reloaded = tokenizer_lib.HFTokenizer(str(tmp_path / "saved"))
  assert reloaded.vocab_size == tok.vocab_size
  assert reloaded.think_end_id == tok.think_end_id


def test_hf_tokenizer_pad_and_errors(tmp_path):
  _save_hf_tokenizer(tmp_path / "hf", with_pad=True)
  tok = tokenizer_lib.HFTokenizer(str(tmp_path / "hf"))
  assert tok.pad_id == 1 and tok.eos_id == 0
  ids = tok.encode("12")
  assert tok.decode([tok.pad_id] + ids + [tok.pad_id]) == "12"
  with pytest.raises(errors.O3liteError, match="no_such_dir"):
    tokenizer_lib.HFTokenizer(str(tmp_path / "no_such_dir"))
