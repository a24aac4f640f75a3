"""Hugging Face round trip: our logits vs transformers' on small random models, import
then export, greedy decoding, the export CLI on a trained run, the SentencePiece tokenizer
export, and bad input. Needs torch (CPU): `pip install torch==2.13.0`."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers

from o3lite import errors
from o3lite import export as export_lib
from o3lite.data import formatting
from o3lite.interop import hf_config
from o3lite.interop import huggingface as hf
from o3lite.interop import hf_tokenizer_files as hf_tokenizer
from o3lite.interop import safetensors_io
from o3lite.model import transformer as model_lib
from o3lite.sampling import sampler as sampling
from o3lite.parallel import mesh as sharding_lib
from o3lite.data import tasks
from o3lite.data import tokenizers as tokenizer_lib
from o3lite.training import checkpoint as checkpoint_lib
from o3lite.training import state as train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small random models in the shapes that matter: GQA, tied / untied embeddings, Qwen2's
# QKV bias with head_dim != hidden / heads, RoPE theta, Llama-3 RoPE scaling.
CASES = {
    "llama_gqa_untied": dict(
        arch="llama", vocab_size=96, hidden_size=32, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False),
    "llama_tied_theta": dict(
        arch="llama", vocab_size=128, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=96, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "qwen2_bias": dict(
        arch="qwen2", vocab_size=160, hidden_size=48, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=80, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
    "llama3_rope_scaling": dict(
        arch="llama", vocab_size=100, hidden_size=32, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
}
_CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def _hf_model(case, seed=0, dtype=torch.float32):
  """A random fp32 model; norms and biases random too, so their mapping is tested."""
  kwargs = dict(CASES[case])
  config_cls, model_cls = _CLASSES[kwargs.pop("arch")]
  config = config_cls(num_hidden_layers=2, attn_implementation="eager", **kwargs)
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn_like(p)
      p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
  return model.to(dtype)


def _hf_logits(model, tokens_BxT):
  with torch.no_grad():
    return model(torch.tensor(tokens_BxT)).logits.float().numpy()


def _our_logits(params, cfg, tokens_BxT):
  positions = np.broadcast_to(np.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  logits, _ = jax.jit(model_lib.Transformer(cfg).apply)({"params": params}, tokens_BxT,
                                                        positions)
  return np.asarray(logits)


def _tokens(vocab_size, shape=(2, 16), seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def _task_texts(per_task, seed=0):
  texts, rng = [], np.random.default_rng(seed)
  for name in ("opchain", "addition", "multiplication"):
    task = tasks.get_task(name)
    for i in range(per_task):
      p = task.generate(rng)
      texts.append(formatting.format_prompt(p.question)
                   + formatting.format_completion(p.cot, p.answer, with_cot=i % 4 != 0))
  return texts


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  """A small SentencePiece tokenizer (no byte pieces): fits every model of CASES."""
  prefix = str(tmp_path_factory.mktemp("spm") / "spm")
  return tokenizer_lib.train_sentencepiece(_task_texts(60), 64, prefix)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  model = _hf_model(case)
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_hf_checkpoint(str(tmp_path))
  spec = CASES[case]
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings, cfg.qkv_bias) == (
      spec["num_attention_heads"], spec["num_key_value_heads"],
      spec["tie_word_embeddings"], spec["arch"] == "qwen2")
  tokens = _tokens(cfg.vocab_size)
  expected = _hf_logits(model, tokens)
  assert np.abs(expected).max() > 1.0  # Logits far from zero: a wrong map shows.
  np.testing.assert_allclose(_our_logits(params, cfg, tokens), expected, atol=1e-4, rtol=0)
  if cfg.rope_scaling_factor != 1.0:  # The scaling matters at these positions.
    unscaled = dataclasses.replace(cfg, rope_scaling_factor=1.0)
    assert np.abs(_our_logits(params, unscaled, tokens) - expected).max() > 1e-2


@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_bias"])
def test_import_then_export_gives_identical_tensors(case, tmp_path, sp_tokenizer):
  model = _hf_model(case)
  model.save_pretrained(tmp_path / "hf")
  cfg, params = hf.load_hf_checkpoint(str(tmp_path / "hf"))
  out = tmp_path / "export"
  hf.export(params, cfg, sp_tokenizer, str(out), max_shard_bytes=30_000)  # Sharded.
  with open(out / safetensors_io.WEIGHTS_INDEX_FILE) as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) > 1
  exported = {}
  for shard in set(weight_map.values()):
    exported.update(safetensors.numpy.load_file(str(out / shard)))
  original = {k: v.numpy() for k, v in model.state_dict().items()}
  if cfg.tie_embeddings:
    del original["lm_head.weight"]
  assert exported.keys() == original.keys()
  for name, value in original.items():
    assert exported[name].dtype == np.float32
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  with open(out / "config.json") as f:
    assert hf_config.model_config_from_hf(json.load(f)) == cfg
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out),
                                                               attn_implementation="eager")
  assert type(reloaded) is type(model)
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))


def test_sharded_checkpoint_placed_on_mesh(tmp_path):
  model = _hf_model("llama_gqa_untied", seed=1)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / safetensors_io.WEIGHTS_INDEX_FILE)
  mesh = sharding_lib.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  with open(tmp_path / "config.json") as f:
    cfg = hf_config.model_config_from_hf(json.load(f))
  shardings = train_state.policy_spec(cfg, optax.sgd(0.1), mesh,
                                      sharding_lib.DEFAULT_RULES).shardings.params["policy"]
  _, params = hf.load_hf_checkpoint(str(tmp_path), shardings=shardings)
  _, params_from_mesh = hf.load_hf_checkpoint(str(tmp_path), mesh=mesh)
  for loaded in (params, params_from_mesh):
    leaves = jax.tree_util.tree_leaves_with_path(loaded)
    for (path, x), s in zip(leaves, jax.tree_util.tree_leaves(shardings)):
      assert x.sharding == s, jax.tree_util.keystr(path)
  q = params["layer_0"]["attn"]["q_kernel"]  # [D, N, H] over fsdp x tensor.
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_allclose(_our_logits(params, cfg, tokens), _hf_logits(model, tokens),
                             atol=1e-4, rtol=0)


def test_bf16_checkpoint(tmp_path):
  model = _hf_model("qwen2_bias", seed=2, dtype=torch.bfloat16)
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_hf_checkpoint(str(tmp_path))
  expected = {k: v.float().numpy() for k, v in model.state_dict().items()
              if k != "lm_head.weight"}
  ours = hf.params_to_hf(params, cfg)
  assert ours.keys() == expected.keys()
  for name in expected:  # bf16 -> fp32 is exact.
    np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)
  # transformers' fp32 model of the same weights (a fresh one: `model.float()` would keep
  # the RoPE frequencies rounded to bf16).
  fp32 = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager")
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_allclose(_our_logits(params, cfg, tokens), _hf_logits(fp32, tokens),
                             atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path, sp_tokenizer):
  _hf_model("qwen2_bias", seed=3).save_pretrained(tmp_path / "hf")
  cfg, params = hf.load_hf_checkpoint(str(tmp_path / "hf"))
  hf.export(params, cfg, sp_tokenizer, str(tmp_path / "export"))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                            attn_implementation="eager")
  eos, pad, new = sp_tokenizer.eos_id, sp_tokenizer.pad_id, 12
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 9, 17)]
  ours = sampling.generate(params, prompts, cfg,
                           sampling.SamplingConfig(max_new_tokens=new, eos_id=eos,
                                                   pad_id=pad), batch_size=4)
  total = 0
  for prompt, completion in zip(prompts, ours):  # One at a time: no HF padding.
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                           do_sample=False, max_new_tokens=new, eos_token_id=eos,
                           pad_token_id=pad)
    theirs = out[0, len(prompt):].tolist()
    theirs = theirs[:theirs.index(eos)] if eos in theirs else theirs
    assert completion == theirs
    total += len(completion)
  assert total >= new  # Not a comparison of empty completions.


@pytest.fixture
def trained_run(tiny_run):
  return tiny_run


def _env():
  return {**os.environ, "XLA_FLAGS": ""}  # One CPU device in the subprocess.


def test_export_cli_on_a_trained_run(trained_run, tmp_path):
  out = str(tmp_path / "hf")
  result = subprocess.run(
      [sys.executable, "-m", "o3lite.export", f"--workdir={trained_run}", f"--out={out}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "exported step 4" in result.stdout
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(model) is transformers.LlamaForCausalLM
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours_tok = hf_tokenizer.load_saved(os.path.join(trained_run, "tokenizer"))
  texts = _task_texts(4)
  for text in texts:
    assert hf_tok.encode(text, add_special_tokens=False) == ours_tok.encode(text)
  with open(os.path.join(trained_run, "model_config.json")) as f:
    cfg = model_lib.ModelConfig(**json.load(f))
  abstract = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  params, step = checkpoint_lib.restore_params(os.path.join(trained_run, "checkpoints"),
                                               {"policy": abstract})
  params = params["policy"]
  assert step == 4 and isinstance(jax.tree.leaves(params)[0], np.ndarray)
  encoded = [ours_tok.encode(t) for t in texts[:3]]
  tokens = np.array([ids[:min(map(len, encoded))] for ids in encoded], np.int32)
  np.testing.assert_allclose(_our_logits(params, cfg, tokens), _hf_logits(model, tokens),
                             atol=1e-4, rtol=0)

  # An existing, non-empty --out is refused: one line on stderr, exit status 1.
  result = subprocess.run(
      [sys.executable, "-m", "o3lite.export", f"--workdir={trained_run}", f"--out={out}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("o3lite: ConfigError:")
  assert export_lib.export_run(trained_run, out, step=4, overwrite=True) == 4


def test_export_run_errors(trained_run, tmp_path):
  with pytest.raises(errors.O3liteError, match="run folder not found"):
    export_lib.export_run(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  with pytest.raises(export_lib.errors.CheckpointError, match="step 99"):
    export_lib.export_run(trained_run, str(tmp_path / "out"), step=99)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "model_config.json").write_text(
      json.dumps(dataclasses.asdict(model_lib.ModelConfig.tiny())))
  os.symlink(os.path.join(trained_run, "tokenizer"), empty / "tokenizer")
  (empty / "checkpoints").mkdir()
  with pytest.raises(export_lib.errors.CheckpointError, match="no checkpoint in"):
    export_lib.export_run(str(empty), str(tmp_path / "out"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_to_a_file_is_refused_before_loading(tmp_path, overwrite):
  """--out naming a file is a ConfigError, checked before the run folder is read (this
  one has no model config or checkpoint), and the file is left as it was."""
  out = tmp_path / "model.safetensors"
  out.write_bytes(b"keep me")
  with pytest.raises(errors.ConfigError, match=r"model.safetensors exists and is not a folder"):
    export_lib.export_run(str(tmp_path), str(out), overwrite=overwrite)
  assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("vocab_size", [48, 400])  # Without and with byte fallback.
def test_sentencepiece_tokenizer_export(vocab_size, tmp_path):
  texts = _task_texts(200, seed=1)
  sp = tokenizer_lib.train_sentencepiece(_task_texts(100), vocab_size,
                                         str(tmp_path / "spm"))
  hf_tokenizer.save(sp, str(tmp_path / "hf"))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (
      sp.eos_id, sp.pad_id, None)
  assert hf_tok.convert_tokens_to_ids(["<think>", "</think>"]) == [sp.think_start_id,
                                                                   sp.think_end_id]
  odd = ["", " ", "  two  spaces\n\n\tand a tab ", "Ünïcödé 漢字 🙂", "a</think>b<think>c"]
  for text in texts + odd:
    ids = sp.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids, text
    if text in texts:
      assert hf_tok.decode(ids) == sp.decode(ids) == text
  reloaded = tokenizer_lib.HFTokenizer(str(tmp_path / "hf"))  # Our loader takes it too.
  assert (reloaded.vocab_size, reloaded.think_end_id) == (sp.vocab_size, sp.think_end_id)
  assert all(reloaded.encode(t) == sp.encode(t) for t in texts[:50])


def _config_dict(**changes):
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}
  return {**config, **changes}


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures="),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
     "use_sliding_window=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"hidden_size": None}, "'hidden_size'"),
])
def test_unsupported_configs(changes, message):
  with pytest.raises(errors.O3liteError, match=message.replace("(", r"\(")):
    hf_config.model_config_from_hf(_config_dict(**changes))


def test_config_fields_and_transformers4_keys():
  cfg = hf_config.model_config_from_hf(_config_dict(
      rope_theta=1234.0, rope_scaling={"rope_type": "llama3", "factor": 4.0,
                                       "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                       "original_max_position_embeddings": 512}))
  assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
          cfg.rope_high_freq_factor, cfg.rope_original_max_len) == (1234.0, 4.0, 2.0, 8.0,
                                                                    512)
  assert (cfg.head_dim, cfg.qkv_bias, cfg.tie_embeddings) == (8, False, False)
  config = hf_config.hf_config_from_model_config(cfg, eos_id=2, pad_id=0)
  assert hf_config.model_config_from_hf(config) == cfg
  with pytest.raises(errors.O3liteError, match="qkv_bias=True"):
    hf_config.hf_config_from_model_config(dataclasses.replace(cfg, qkv_bias=True), eos_id=2,
                                   pad_id=0, arch="llama")


def test_bad_checkpoints(tmp_path):
  with pytest.raises(errors.O3liteError, match="nowhere"):
    hf.load_hf_checkpoint(str(tmp_path / "nowhere"))
  (tmp_path / "config.json").write_text(json.dumps(_config_dict(
      architectures=["GPT2LMHeadModel"])))
  with pytest.raises(errors.O3liteError, match="GPT2LMHeadModel"):
    hf.load_hf_checkpoint(str(tmp_path))
  model = _hf_model("llama_gqa_untied")
  cfg = hf_config.model_config_from_hf(model.config.to_dict())
  good = {k: v.numpy() for k, v in model.state_dict().items()}
  name = "model.layers.0.self_attn.q_proj.weight"
  with pytest.raises(errors.O3liteError, match=rf"{name} has shape \(32, 31\).*expected \(32, 32\)"):
    hf.params_from_hf({**good, name: good[name][:, :31]}, cfg)
  with pytest.raises(errors.O3liteError, match="1 missing tensors.*lm_head.weight"):
    hf.params_from_hf({k: v for k, v in good.items() if k != "lm_head.weight"}, cfg)
  with pytest.raises(errors.O3liteError, match="1 unexpected tensors.*model.extra.weight"):
    hf.params_from_hf({**good, "model.extra.weight": good[name]}, cfg)
  ignored = {**good, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4)}
  assert hf.params_to_hf(hf.params_from_hf(ignored, cfg), cfg).keys() == good.keys()


@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_bias"])
def test_added_tokens_get_the_mean_row_in_spare_rows(case, tmp_path):
  """Qwen2.5's embedding has 151,936 rows for 151,665 tokens: the think delimiters added
  to its tokenizer land on spare, untrained rows, which must become the mean of the rows
  the tokenizer's own tokens trained, without growing the embedding."""
  model = _hf_model(case, seed=5)
  model.save_pretrained(tmp_path)
  rows = CASES[case]["vocab_size"]
  base = rows - 10  # The tokenizer knows 10 tokens fewer than the embedding has rows.
  tokenizer = types.SimpleNamespace(added_ids=[base, base + 1], base_size=base)
  cfg, params = hf.load_hf_checkpoint(str(tmp_path), min_vocab_size=base + 2,
                                      tokenizer=tokenizer)
  assert cfg.vocab_size == rows  # No growth: the rows were there.
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  names = [("embedding", "model.embed_tokens.weight")]
  if not cfg.tie_embeddings:
    names.append(("lm_head", "lm_head.weight"))
  for ours, theirs in names:
    got = np.asarray(params[ours])
    want = state[theirs]
    if ours == "lm_head":
      got = got.T  # Ours is [D, V].
    np.testing.assert_allclose(got[[base, base + 1]], np.broadcast_to(
        want[:base].mean(0), (2, cfg.embed_dim)), rtol=1e-5, atol=1e-7)
    keep = np.setdiff1d(np.arange(rows), [base, base + 1])
    np.testing.assert_array_equal(got[keep], want[keep])
  # With its text's pieces (HFTokenizer.added_pieces) a new row is their mean: the two
  # added tokens start apart.
  tokenizer.added_pieces = {base: [3, 5, 7], base + 1: [4, 5, 7]}
  _, params = hf.load_hf_checkpoint(str(tmp_path), min_vocab_size=base + 2,
                                    tokenizer=tokenizer)
  want = state["model.embed_tokens.weight"]
  got = np.asarray(params["embedding"])
  np.testing.assert_allclose(got[base], want[[3, 5, 7]].mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[base + 1], want[[4, 5, 7]].mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_bias"])
def test_vocabulary_grows_for_added_tokens(case, tmp_path):
  """Tokens a tokenizer adds (think delimiters) get mean rows; old tokens are unchanged."""
  model = _hf_model(case, seed=4)
  model.save_pretrained(tmp_path)
  old_vocab = CASES[case]["vocab_size"]
  cfg, params = hf.load_hf_checkpoint(str(tmp_path), min_vocab_size=old_vocab + 2)
  assert cfg.vocab_size == old_vocab + 2
  embedding = np.asarray(params["embedding"])
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  np.testing.assert_array_equal(embedding[:old_vocab], state["model.embed_tokens.weight"])
  np.testing.assert_allclose(embedding[old_vocab:], np.broadcast_to(
      state["model.embed_tokens.weight"].mean(0), (2, cfg.embed_dim)), rtol=1e-6)
  tokens = _tokens(old_vocab)
  ours = _our_logits(params, cfg, tokens)
  np.testing.assert_allclose(ours[..., :old_vocab], _hf_logits(model, tokens), atol=1e-4,
                             rtol=0)
  # A checkpoint whose tensors do not fit its own config.json is still an error.
  with open(tmp_path / "config.json") as f:
    bad = json.load(f)
  bad["vocab_size"] = old_vocab - 1
  with open(tmp_path / "config.json", "w") as f:
    json.dump(bad, f)
  with pytest.raises(errors.O3liteError, match="model.embed_tokens.weight has shape"):
    hf.load_hf_checkpoint(str(tmp_path), min_vocab_size=old_vocab + 2)


def test_sft_run_initialized_from_a_hugging_face_folder(trained_run, tmp_path):
  """`init_from` a Hugging Face folder: the exported run comes back with its weights and
  tokenizer, placed on an 8-device mesh; training then continues from it."""
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  from o3lite import stages  # pylint: disable=g-import-not-at-top
  from o3lite.training import sft as trainer  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "hf")
  export_lib.export_run(trained_run, out)
  with open(os.path.join(trained_run, "config.json")) as f:
    original = json.load(f)
  config = sft_config.get_config()
  for section in ("data", "eval"):
    for key, value in original[section].items():
      if key not in ("tokenizer", "task_kwargs"):
        config[section][key] = value
  config.init_from = out
  config.loop.num_steps = 2
  config.sft.batch_size = 8
  config.loop.eval_every = 0
  config.optimizer.learning_rate = 0.0  # The parameters stay the imported ones.
  config.mesh.shape = (4, 2, 1)  # The tiny vocabulary (33) does not split over tensor.
  workdir = str(tmp_path / "run")
  stages.run(config, workdir)

  run, params = trainer.load_run(workdir)
  _, original_params = trainer.load_run(trained_run)
  assert run.tokenizer.__class__.__name__ == "HFTokenizer"
  assert run.model_cfg == trainer.load_run(trained_run)[0].model_cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(original_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(workdir, "eval.json")) as f, \
       open(os.path.join(trained_run, "eval.json")) as g:
    assert json.load(f)["metrics"]["accuracy"] == json.load(g)["metrics"]["accuracy"]
  # A folder with the tokenizer and config but no weights: reported as that, before
  # anything is built (not as a tokenizer problem).
  no_weights = tmp_path / "no_weights"
  shutil.copytree(out, no_weights)
  os.remove(no_weights / safetensors_io.WEIGHTS_FILE)
  config.init_from = str(no_weights)
  with pytest.raises(errors.CheckpointError, match=r"has no weights: no model\.safetensors"):
    stages.run(config, str(tmp_path / "no_weights_run"))
  assert not os.path.exists(tmp_path / "no_weights_run")
  # A folder with weights but no tokenizer: a tokenizer problem, one line.
  no_tokenizer = tmp_path / "no_tokenizer"
  no_tokenizer.mkdir()
  for name in (hf.CONFIG_FILE, safetensors_io.WEIGHTS_FILE):
    shutil.copy(os.path.join(out, name), no_tokenizer / name)
  config.init_from = str(no_tokenizer)
  with pytest.raises(errors.DataError, match="no Hugging Face tokenizer could be loaded"):
    stages.run(config, str(tmp_path / "no_tokenizer_run"))
