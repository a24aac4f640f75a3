"""External process reward models (PRMs) from local Hugging Face checkpoints.

  prm = hf_prm.load_hf_prm("models/Qwen2.5-Math-PRM-7B")        # convention detected
  prm.score_steps([{"question": q}], [completion])            # [[p_1, ..., p_n]]
  prm.score_outcomes([{"question": q}], [completion])         # [p_n]

The public PRMs put a tag token after every step of a solution and read step i's score
at the i-th tag: every step of a solution in one forward pass. How each marks and scores
steps (its `Convention`: math_shepherd, qwen_prm, or one registered in `CONVENTIONS`) is
in `prm_conventions.py`; this file scores and loads.

Batches: solutions sorted by token count, `batch_size` per call, rows right-padded to a
power-of-two length (>= 64) and the tags to a power-of-two count (>= 8); the row count
is a power of two too (rounded up to a multiple of the mesh's batch shards): few shapes
compile. A row
attends to its own tokens only (segment ids), so a solution's scores do not depend on the
other rows. The trunk is o3lite's transformer (`interop.huggingface`: Llama, Qwen2, and
Mistral read as a Llama within its sliding window), its tensors read memory-mapped and
placed one at a time (on a mesh: into the parameter shardings of `rules`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from o3lite import errors
from o3lite.interop import hf_config
from o3lite.interop import huggingface as hf
from o3lite.interop import safetensors_io
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.verifiers import steps as steps_lib
from o3lite.verifiers.prm_conventions import (CONVENTIONS, Convention, check_tokenizer,
                                              encode_input)

_CLASSIFIER = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
_MIN_LENGTH, _MIN_TAGS = 64, 8  # Smallest length and tag-count buckets.
_PROBE = ("1 + 1 = ?", ["1 + 1 = 2", "The answer is 2"])  # Checks a convention at load.


# ---------------------------------------------------------------------------------------
# Scoring.


def _bucket(n: int, minimum: int = 1, multiple: int = 1) -> int:
  """The smallest power of two >= max(n, minimum), rounded up to a multiple of `multiple`."""
  power = max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
  return -(-power // multiple) * multiple


def step_probabilities(params, tokens_BxT, positions_BxT, segment_ids_BxT, tags_BxS, *,
                       model_cfg: model_lib.ModelConfig, head: str,
                       classes: tuple[int, int]):
  """p [B, S] (fp32): the score read at token positions `tags_BxS` of each row.

  head "lm": z = h W_out[:, (good, bad)] (only those two columns of the output matrix,
    the embedding's rows when tied), p = softmax(z)[0].
  head "classifier": z = relu(h W_1 + b_1) W_2 + b_2, p = softmax(z)[positive]; here
    `classes` = (positive, unused).
  h [B, S, D] is the final normed hidden state at the tags.
  """
  trunk = params["trunk"]
  x_BxTxD, _ = model_lib.Transformer(model_cfg, hidden=True).apply(
      {"params": trunk}, tokens_BxT, positions_BxT, segment_ids_BxT)
  h_BxSxD = jnp.take_along_axis(x_BxTxD, tags_BxS[:, :, None], axis=1)
  if head == "lm":
    good, bad = classes
    if model_cfg.tie_embeddings:
      out_Dx2 = trunk["embedding"][jnp.array([good, bad])].T
    else:
      out_Dx2 = trunk["lm_head"][:, jnp.array([good, bad])]
    z_BxSx2 = jnp.einsum("bsd,dc->bsc", h_BxSxD, out_Dx2.astype(jnp.float32))
    return jax.nn.softmax(z_BxSx2, axis=-1)[..., 0]
  w = params["head"]
  a_BxSxD = jax.nn.relu(jnp.einsum("bsd,de->bse", h_BxSxD, w["hidden_kernel"])
                        + w["hidden_bias"])
  z_BxSxC = jnp.einsum("bsd,dc->bsc", a_BxSxD, w["out_kernel"]) + w["out_bias"]
  return jax.nn.softmax(z_BxSxC, axis=-1)[..., classes[0]]


class HFProcessRewardModel:
  """A PRM from a Hugging Face folder, ready to score o3lite solutions.

    prm.score_steps(examples, solutions)     a probability per step of each solution
    prm.score_outcomes(examples, solutions)  the last step's probability

  `params` = {"trunk": o3lite transformer params, "head": classifier params or {}};
  `tokenizer` the folder's `transformers` tokenizer; `max_len` the most tokens a row
  may have (a Mistral's sliding window; None: no limit); `tokens_scored` counts the
  tokens put through the model (compute accounting). `kind` is "prm", as a trained
  `reward_model.Verifier`'s, so search and RL take either.
  """

  kind = "prm"

  def __init__(self, params, model_cfg: model_lib.ModelConfig, tokenizer: Any,
               convention: Convention, batch_size: int = 8, max_len: int | None = None,
               mesh=None, rules=None, path: str = ""):
    self.params, self.model_cfg, self.tokenizer = params, model_cfg, tokenizer
    self.convention, self.max_len, self.path = convention, max_len, path
    self.mesh, self.rules = mesh, rules
    self.shards = 1 if mesh is None else sharding_lib.batch_shards(mesh, rules)
    if batch_size < 1:
      raise errors.ConfigError(f"batch_size={batch_size}: expected >= 1")
    self.batch_size = _bucket(batch_size, multiple=self.shards)
    self.tag_id, lm_ids = check_tokenizer(tokenizer, convention, path)
    if lm_ids is not None:
      if max(lm_ids) >= model_cfg.vocab_size:
        raise errors.CheckpointError(f"PRM {path}: ids {lm_ids} of {convention.good_token!r} / "
                                     f"{convention.bad_token!r} are outside the model's "
                                     f"{model_cfg.vocab_size} rows")
      classes = lm_ids
    else:
      num_classes = params["head"]["out_bias"].shape[0]
      if convention.positive_class >= num_classes:
        raise errors.CheckpointError(f"PRM {path}: positive_class={convention.positive_class} "
                                     f"but its score head has {num_classes} classes")
      classes = (convention.positive_class, 0)
    self.classes = classes
    self.forward = jax.jit(functools.partial(step_probabilities, model_cfg=model_cfg,
                                             head=convention.head, classes=classes))
    self.tokens_scored = 0

  def encode(self, question: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """(token ids, positions of the step tags) of one solution's input."""
    ids, tags = encode_input(self.tokenizer, self.convention, self.tag_id, question, steps,
                             self.path)
    if self.max_len is not None and len(ids) > self.max_len:
      raise errors.DataError(f"a {self.convention.name} input of {len(ids)} tokens is longer "
                             f"than the {self.max_len} the PRM {self.path} attends over "
                             "(its sliding window)")
    return ids, tags

  def _put(self, **arrays: np.ndarray) -> dict[str, jax.Array]:
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    return sharding_lib.put_global_batch(
        arrays, sharding_lib.batch_sharding(self.mesh, self.rules))

  def _run(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[list[float]]:
    """Scores of rows (ids, tag positions) of one batch: one compiled call."""
    B = min(self.batch_size, _bucket(len(rows), multiple=self.shards))
    T = _bucket(max(len(ids) for ids, _ in rows), _MIN_LENGTH)
    S = _bucket(max(len(tags) for _, tags in rows), _MIN_TAGS)
    tokens_BxT = np.zeros((B, T), np.int32)
    segment_ids_BxT = np.zeros((B, T), np.int32)
    tags_BxS = np.zeros((B, S), np.int32)
    for b, (ids, tags) in enumerate(rows):
      tokens_BxT[b, :len(ids)] = ids
      segment_ids_BxT[b, :len(ids)] = 1
      tags_BxS[b, :len(tags)] = tags
    positions_BxT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    batch = self._put(tokens=tokens_BxT, positions=positions_BxT,
                      segment_ids=segment_ids_BxT, tags=tags_BxS)
    if self.mesh is None:
      p_BxS = self.forward(self.params, batch["tokens"], batch["positions"],
                           batch["segment_ids"], batch["tags"])
    else:
      with sharding_lib.activation_sharding(self.mesh, self.rules):
        p_BxS = self.forward(self.params, batch["tokens"], batch["positions"],
                             batch["segment_ids"], batch["tags"])
    p_BxS = np.asarray(sharding_lib.to_host(p_BxS))
    self.tokens_scored += sum(len(ids) for ids, _ in rows)
    return [[float(p) for p in p_BxS[b, :len(tags)]] for b, (_, tags) in enumerate(rows)]

  def score_steps(self, examples: Sequence[dict], solutions: Sequence[str]
                  ) -> list[list[float]]:
    """P(step i is good | question, steps 1..i) for every step of each solution
    (`steps.split_completion`); [] for a solution without steps. examples[i]["question"]
    is the question of solutions[i]."""
    if len(examples) != len(solutions):
      raise errors.DataError(f"{len(examples)} examples for {len(solutions)} solutions")
    encoded = {}
    for i, (example, solution) in enumerate(zip(examples, solutions)):
      if "question" not in example:
        raise errors.DataError(f"example {i} has no 'question'")
      steps = [s.text for s in steps_lib.split_completion(solution)]
      if steps:
        encoded[i] = self.encode(example["question"], steps)
    order = sorted(encoded, key=lambda i: -len(encoded[i][0]))  # Alike lengths together.
    out: list[list[float]] = [[] for _ in solutions]
    for begin in range(0, len(order), self.batch_size):
      chunk = order[begin:begin + self.batch_size]
      for i, scores in zip(chunk, self._run([encoded[i] for i in chunk])):
        out[i] = scores
    return out

  def score_outcomes(self, examples: Sequence[dict], solutions: Sequence[str]
                     ) -> list[float]:
    """The last step's score: the PRM's read after the whole chain, P(the chain is good
    through its end); 0.5 for a solution without steps (no evidence either way, as
    `reward_model.Verifier`). Other aggregates come from `score_steps`: Math-Shepherd's
    paper ranks solutions by the minimum step score."""
    return [p[-1] if p else 0.5 for p in self.score_steps(examples, solutions)]


# ---------------------------------------------------------------------------------------
# Loading.


def _read_config(path: str) -> tuple[dict, int | None]:
  """The folder's config.json as one `hf_config` reads, and the most tokens a row may
  have: a PRM's own architecture is read as the causal LM of its trunk, and a Mistral as
  a Llama (the same network) whose full causal attention equals Mistral's sliding-window
  attention on inputs of at most `sliding_window` tokens."""
  with open(os.path.join(path, hf.CONFIG_FILE)) as f:
    config = json.load(f)
  archs = config.get("architectures") or []
  max_len = None
  if archs == ["Qwen2ForProcessRewardModel"]:
    config["architectures"] = ["Qwen2ForCausalLM"]
  elif archs == ["MistralForCausalLM"] or (not archs and config.get("model_type") == "mistral"):
    max_len = config.pop("sliding_window", None)
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
  return config, max_len


def _classifier_head(tensors, D: int, path: str) -> dict[str, np.ndarray]:
  """score.0 (Linear D -> D) and score.2 (Linear D -> C) as [in, out] kernels."""
  missing = [n for n in _CLASSIFIER if n not in tensors]
  if missing:
    raise errors.CheckpointError(f"PRM {path} has no classifier head tensor(s) {missing} "
                                 "(convention qwen_prm needs score.0 and score.2)")
  w1, b1, w2, b2 = (np.asarray(tensors[n], np.float32) for n in _CLASSIFIER)
  C = w2.shape[0] if w2.ndim == 2 else -1
  want = {"score.0.weight": (D, D), "score.0.bias": (D,), "score.2.weight": (C, D),
          "score.2.bias": (C,)}
  for name, x in zip(_CLASSIFIER, (w1, b1, w2, b2)):
    if x.shape != want[name] or C < 2:
      raise errors.CheckpointError(f"tensor {name} of {path} has shape {x.shape}; expected "
                                   f"{want[name]} with at least 2 classes (hidden size {D})")
  return {"hidden_kernel": w1.T.copy(), "hidden_bias": b1, "out_kernel": w2.T.copy(),
          "out_bias": b2}


def detect_convention(path: str) -> str:
  """"qwen_prm" when the checkpoint has a classifier head (score.* tensors, or the
  Qwen2ForProcessRewardModel architecture), else "math_shepherd"."""
  hf.check_folder(path, "PRM checkpoint")
  with open(os.path.join(path, hf.CONFIG_FILE)) as f:
    archs = json.load(f).get("architectures") or []
  names = safetensors_io.read(path)  # Memory-mapped: reads headers only.
  if "Qwen2ForProcessRewardModel" in archs or any(n.startswith("score.") for n in names):
    return "qwen_prm"
  return "math_shepherd"


def load_hf_prm(path: str, convention: str | Convention | None = None, mesh=None,
                rules: sharding_lib.Rules | None = None, batch_size: int = 8,
                **overrides) -> HFProcessRewardModel:
  """A PRM from a local Hugging Face folder (config.json, safetensors, tokenizer).

  `convention`: a name in `CONVENTIONS`, a `Convention`, or None to detect it
  (`detect_convention`). `mesh` / `rules` (default `parallel.mesh.DEFAULT_RULES`):
  parameters placed in their shardings, rows split over the batch axes. `batch_size`:
  solutions per compiled call (rounded up to a power of two). `overrides` go to
  `hf_config.model_config_from_hf` (e.g. dtype="bfloat16").

  Raises:
    ConfigError: an unknown convention name.
    CheckpointError: no such folder, no config.json / weights / tokenizer in it, an
      unsupported architecture, tensors that do not fit, a step tag (or good / bad
      token) that is not one token of its tokenizer, a missing chat template.
  """
  if isinstance(convention, str):
    convention = CONVENTIONS.lookup(convention)()
  hf.check_folder(path, "PRM checkpoint")
  if convention is None:
    convention = CONVENTIONS[detect_convention(path)]()
  rules = sharding_lib.DEFAULT_RULES if rules is None else tuple(rules)
  tokenizer = _load_tokenizer(path)  # Its errors before the weights are read.
  tag_id, _ = check_tokenizer(tokenizer, convention, path)
  try:  # The convention's input on this tokenizer: a chat template, tags kept whole.
    encode_input(tokenizer, convention, tag_id, *_PROBE, path)
  except (ValueError, KeyError, TypeError, errors.DataError) as e:
    reason = " ".join(str(e).split())[:200]
    raise errors.CheckpointError(f"PRM {path}: convention {convention.name} does not fit its "
                                 f"tokenizer ({type(e).__name__}: {reason})") from e
  config, max_len = _read_config(path)
  cfg = hf_config.model_config_from_hf(config, **overrides)
  tensors = dict(safetensors_io.read(path))
  head: dict[str, Any] = {}
  if convention.head == "classifier":
    head = _classifier_head(tensors, cfg.embed_dim, path)
    # The classifier reads hidden states only: no output matrix is loaded (the real
    # checkpoint has none), so the trunk is built as if tied.
    cfg = dataclasses.replace(cfg, tie_embeddings=True)
    tensors = {n: x for n, x in tensors.items()
               if not n.startswith("score.") and n != "lm_head.weight"}
  if mesh is None:
    place = lambda where, x: jax.device_put(x)
    head = jax.device_put(head)
  else:
    shardings = jax.tree_util.tree_flatten_with_path(hf.param_shardings(cfg, mesh, rules))[0]
    by_path = {tuple(k.key for k in keys): s for keys, s in shardings}

    def place(where, x):  # Each device gets only its slice.
      return jax.make_array_from_callback(x.shape, by_path[where], lambda i: x[i])
    head = jax.device_put(head, NamedSharding(mesh, P()))
  # One tensor at a time: read, convert, place (the importer's own converter).
  trunk = hf._convert_from_hf(tensors, cfg, place)  # pylint: disable=protected-access
  return HFProcessRewardModel({"trunk": trunk, "head": head}, cfg, tokenizer, convention,
                              batch_size=batch_size, max_len=max_len, mesh=mesh, rules=rules,
                              path=path)


def _load_tokenizer(path: str):
  import transformers  # pylint: disable=g-import-not-at-top

  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' "cannot load".
    reason = " ".join(str(e).split())[:200]
    raise errors.CheckpointError(f"PRM {path}: no Hugging Face tokenizer could be loaded "
                                 f"from it ({type(e).__name__}: {reason})") from e
