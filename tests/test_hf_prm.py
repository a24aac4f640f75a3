"""External PRMs in Hugging Face format (verifiers/hf_prm.py) on small random checkpoints
built here: a Mistral causal LM read with Math-Shepherd's tag and "+" / "-" tokens, and a
Qwen2 trunk with a 2-class `score` head in Qwen2ForProcessRewardModel's layout. o3lite's
step scores equal those of the model cards' torch code; one forward pass per batch and
rows independent of each other; detection; a mesh; bad input as one-line errors."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from o3lite import errors
from o3lite.parallel import mesh as sharding_lib
from o3lite.verifiers import hf_prm
from o3lite.verifiers import prm_conventions
from o3lite.verifiers import steps as steps_lib

QUESTIONS = ["What is 3 + 4 then times 2 then minus 5?", "What is 8 - 3?",
             "What is 2 + 2 then plus 1 then times 6 then minus 1 then plus 0?"]
SOLUTIONS = ["<think>3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9</think>9",
             "<think>8 - 3 = 5</think>5",
             "<think>2 + 2 = 5\n5 + 1 = 6\n6 * 6 = 36\n36 - 1 = 35\n35 + 0 = 35</think>35"]
EXAMPLES = [{"question": q} for q in QUESTIONS]
# A ChatML template: what Qwen2.5's writes for system / user / assistant messages.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TRUNK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")


def _steps(solution):
  return [s.text for s in steps_lib.split_completion(solution)]


def _corpus():
  """Texts in both conventions' formats (so the tags, "+" and "-" get their own merges)."""
  rng, texts = np.random.default_rng(0), []
  for _ in range(300):
    steps = [f"{a} {op} {b} = {c}" for a, op, b, c in
             zip(rng.integers(0, 40, 4), "+-*+", rng.integers(0, 9, 4), rng.integers(0, 99, 4))]
    question = f"What is {rng.integers(0, 9)} + {rng.integers(0, 9)} then times 2?"
    texts.append(prm_conventions.shepherd_input(None, question, steps, "ки"))
    texts.append(prm_conventions.QWEN_SYSTEM + question + "<extra_0>".join(steps) + "The answer is")
  return texts + QUESTIONS + SOLUTIONS


def _random_(module, seed):
  """Random weights (norms around 1), large enough that scores spread over (0, 1)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn_like(p)
      p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
  return module.eval()


def _shepherd_tokenizer():
  """A SentencePiece-style BPE with Mistral's conventions: words begin with "▁", BOS
  prepended by `encode`, so " ки" is the one token "▁ки" (id of `encode("ки")`)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split("\n", "isolated"),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")


def _qwen_tokenizer(chat_template=CHATML):
  """A byte-level BPE with Qwen2's special tokens (<extra_0> among them), no BOS."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=320, show_progress=False,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>")
  fast.chat_template = chat_template
  return fast


class _QwenPRM(torch.nn.Module):
  """Qwen2ForProcessRewardModel's layout (modeling_qwen2_rm.py of Qwen2.5-Math-PRM):
  `model` a Qwen2Model, `score` Linear(D, D) -> ReLU -> Linear(D, 2); logits per token."""

  def __init__(self, config):
    super().__init__()
    D = config.hidden_size
    self.model = transformers.Qwen2Model(config)
    self.score = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(),
                                     torch.nn.Linear(D, 2))

  def forward(self, input_ids):
    return self.score(self.model(input_ids=input_ids).last_hidden_state)


@pytest.fixture(scope="module")
def shepherd(tmp_path_factory):
  """A random Mistral (sliding window 4096, untied) + the Mistral-style tokenizer."""
  path = str(tmp_path_factory.mktemp("shepherd"))
  tokenizer = _shepherd_tokenizer()
  config = transformers.MistralConfig(vocab_size=len(tokenizer) + 6, sliding_window=4096,
                                      tie_word_embeddings=False, **TRUNK)
  model = _random_(transformers.MistralForCausalLM(config), seed=0)
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path, model, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """A random Qwen2 trunk + score head saved as Qwen2.5-Math-PRM is (model.* and score.*
  tensors, no lm_head, architectures Qwen2ForProcessRewardModel) + a Qwen-style tokenizer."""
  path = tmp_path_factory.mktemp("qwen")
  tokenizer = _qwen_tokenizer()
  config = transformers.Qwen2Config(vocab_size=len(tokenizer) + 4, tie_word_embeddings=False,
                                    **TRUNK)
  model = _random_(_QwenPRM(config), seed=1)
  tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
  safetensors.torch.save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
  config.architectures = ["Qwen2ForProcessRewardModel"]
  config.save_pretrained(str(path))
  tokenizer.save_pretrained(str(path))
  return str(path), model, transformers.AutoTokenizer.from_pretrained(str(path))


def _shepherd_reference(model, tokenizer, question, steps):
  """math-shepherd-mistral-7b-prm's model card, on one solution."""
  candidates = tokenizer.encode("+ -")[1:]
  tag_id = tokenizer.encode("ки")[-1]
  output = "\n".join(f"Step {i}: {s} ки" for i, s in enumerate(steps, 1))
  input_ids = torch.tensor([tokenizer.encode(f"{question} {output}")])
  with torch.no_grad():
    logits = model(input_ids).logits[:, :, candidates]
  scores = logits.softmax(dim=-1)[:, :, 0]
  return scores[input_ids == tag_id].tolist()


def _qwen_reference(model, tokenizer, question, steps):
  """Qwen2.5-Math-PRM-7B's model card, on one solution."""
  messages = [{"role": "system", "content": prm_conventions.QWEN_SYSTEM},
              {"role": "user", "content": question},
              {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
  input_ids = tokenizer.encode(text, return_tensors="pt")
  with torch.no_grad():
    probabilities = model(input_ids).softmax(dim=-1)
  tag_id = tokenizer.encode("<extra_0>")[0]
  return probabilities[input_ids == tag_id][:, 1].tolist()


@pytest.mark.parametrize("name", ["math_shepherd", "qwen_prm"])
def test_scores_match_the_model_cards(name, shepherd, qwen):
  path, model, tokenizer = shepherd if name == "math_shepherd" else qwen
  reference = _shepherd_reference if name == "math_shepherd" else _qwen_reference
  prm = hf_prm.load_hf_prm(path)  # Detected.
  assert prm.convention.name == name
  solutions = SOLUTIONS + ["<think></think>7"]  # The last one has no steps.
  examples = EXAMPLES + [{"question": "What is 3 + 4?"}]
  got = prm.score_steps(examples, solutions)
  assert got[-1] == []
  for example, solution, scores in zip(examples, solutions, got[:-1]):
    expected = reference(model, tokenizer, example["question"], _steps(solution))
    assert len(scores) == len(_steps(solution)) == len(expected)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
  flat = np.concatenate(got[:-1])
  assert flat.max() - flat.min() > 0.1  # Scores spread: reading a wrong position shows.
  outcomes = prm.score_outcomes(examples, solutions)
  assert outcomes == [s[-1] for s in got[:-1]] + [0.5]
  # A tag in the texts is not a step: removed before formatting.
  tag = prm.convention.step_tag
  tagged = prm.score_steps([{"question": QUESTIONS[0] + tag}],
                           [SOLUTIONS[0].replace("= 7", f"= 7{tag}")])
  np.testing.assert_allclose(tagged[0], got[0], atol=1e-6, rtol=0)


def test_one_forward_pass_per_batch_and_rows_are_independent(qwen):
  prm = hf_prm.load_hf_prm(qwen[0], "qwen_prm", batch_size=4)
  shapes, forward = [], prm.forward
  prm.forward = lambda params, tokens, *rest: (shapes.append(tokens.shape)
                                               or forward(params, tokens, *rest))
  together = prm.score_steps(EXAMPLES, SOLUTIONS)
  assert len(shapes) == 1 and shapes[0][0] == 4  # 3 rows padded to 4: one call.
  assert prm.tokens_scored > 0
  for example, solution, scores in zip(EXAMPLES, SOLUTIONS, together):
    alone = prm.score_steps([example], [solution])[0]
    np.testing.assert_allclose(alone, scores, atol=1e-6, rtol=0)
  shapes.clear()
  prm.batch_size = 2
  np.testing.assert_allclose(np.concatenate(prm.score_steps(EXAMPLES, SOLUTIONS)),
                             np.concatenate(together), atol=1e-6, rtol=0)
  assert [s[0] for s in shapes] == [2, 1]  # Two calls: 2 + 1 rows.


def test_on_a_mesh(qwen):
  mesh = sharding_lib.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  plain = hf_prm.load_hf_prm(qwen[0]).score_steps(EXAMPLES, SOLUTIONS)
  prm = hf_prm.load_hf_prm(qwen[0], mesh=mesh)
  q = prm.params["trunk"]["layer_0"]["attn"]["q_kernel"]  # [D, N, H] over fsdp x tensor.
  assert q.addressable_shards[0].data.shape == (32, 2, 16)
  assert prm.batch_size % 4 == 0
  np.testing.assert_allclose(np.concatenate(prm.score_steps(EXAMPLES, SOLUTIONS)),
                             np.concatenate(plain), atol=1e-5, rtol=0)


def _copy(src, dst, keep):
  os.makedirs(dst)
  for name in os.listdir(src):
    if keep(name):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  return dst


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value)
  return str(excinfo.value)


def test_bad_input(shepherd, qwen, tmp_path):
  with pytest.raises(errors.ConfigError) as e:
    hf_prm.load_hf_prm(qwen[0], "nope")
  assert _one_line(e) == ("unknown PRM convention 'nope'; registered: ['math_shepherd', "
                          "'qwen_prm']")
  with pytest.raises(errors.CheckpointError, match="PRM checkpoint folder not found") as e:
    hf_prm.load_hf_prm(str(tmp_path / "missing"))
  _one_line(e)
  weights = lambda name: name == "config.json" or name.endswith(".safetensors")
  # Math-Shepherd's weights with a byte-level tokenizer: "ки" is several tokens.
  lm_qwen_tokenizer = _copy(shepherd[0], str(tmp_path / "lm_qwen_tokenizer"), weights)
  qwen[2].save_pretrained(lm_qwen_tokenizer)
  with pytest.raises(errors.CheckpointError, match="step tag 'ки' of math_shepherd is not one "
                     "token") as e:
    hf_prm.load_hf_prm(lm_qwen_tokenizer)
  _one_line(e)
  # Qwen's weights with a tokenizer that has no <extra_0>.
  no_tag = _copy(qwen[0], str(tmp_path / "no_tag"), weights)
  shepherd[2].save_pretrained(no_tag)
  with pytest.raises(errors.CheckpointError, match="step tag '<extra_0>' of qwen_prm") as e:
    hf_prm.load_hf_prm(no_tag)
  _one_line(e)
  # No chat template for the Qwen convention.
  no_template = _copy(qwen[0], str(tmp_path / "no_template"), weights)
  _qwen_tokenizer(chat_template=None).save_pretrained(no_template)
  with pytest.raises(errors.CheckpointError, match="qwen_prm does not fit its tokenizer") as e:
    hf_prm.load_hf_prm(no_template)
  _one_line(e)
  # The classifier convention on a causal LM without a score head.
  with pytest.raises(errors.CheckpointError, match="no classifier head tensor") as e:
    hf_prm.load_hf_prm(lm_qwen_tokenizer, "qwen_prm")
  _one_line(e)
  # An input longer than a Mistral's sliding window.
  window = _copy(shepherd[0], str(tmp_path / "window"), lambda name: True)
  with open(os.path.join(window, "config.json")) as f:
    config = json.load(f)
  config["sliding_window"] = 16
  with open(os.path.join(window, "config.json"), "w") as f:
    json.dump(config, f)
  prm = hf_prm.load_hf_prm(window)
  assert prm.max_len == 16
  with pytest.raises(errors.DataError, match="longer than the 16") as e:
    prm.score_steps(EXAMPLES[:1], SOLUTIONS[:1])
  _one_line(e)
  with pytest.raises(errors.DataError, match="2 examples for 1 solutions"):
    prm.score_steps(EXAMPLES[:2], SOLUTIONS[:1])
