"""Reward models on the o3lite transformer: the outcome (ORM) and process (PRM) verifiers,
their rows, their registered losses, and a `Verifier` that scores solutions.

A verifier is the policy's trunk with a scalar head (`model.heads.ScalarHead`, params
`{"verifier": {"trunk", "head", "bias"}}`): a logit z_t per position, read as
p_t = sigmoid(z_t) at chosen positions of the row prompt + solution + EOS:

  ORM  (Cobbe et al. 2021; Lightman et al. 2023)  one read, at the EOS after the solution:
       P(final answer correct | question, solution)
  PRM  (Lightman et al. 2023, "Let's Verify Step by Step"; Math-Shepherd)  one read at the
       last token of each step: P(step i correct | question, steps 1..i), every step of a
       solution in one forward pass (the causal mask keeps later steps out of each read);
       with `answer_read`, one more read at the EOS, trained on the outcome: the PRM
       judges the final answer after "</think>" too (`Verifier.score_outcomes`)

Rows (`encode`, `rows`): one solution per row, left-aligned, [B, T] arrays
  inputs, positions, segment_ids   as in SFT (segment 1 on tokens, 0 on padding)
  labels        float label in [0, 1] at each read position (0 elsewhere)
  label_mask    1 at read positions that carry a label (an unlabelled step: 0)
Pairs for Bradley-Terry carry the rejected solution's rows under "rejected_*" keys, so
the train step's microbatches keep pairs together.

Losses (registered in `training.losses.LOSSES`, run by the one train step):
  verifier_bce            sum_{t: m_t = 1} BCE(sigmoid(z_t), y_t) / sum_t m_t, y soft or
                          hard (Math-Shepherd trains on both)
  verifier_bradley_terry  -log sigmoid(r_chosen - r_rejected) per pair, r the logit at
                          the last read position (Bradley & Terry 1952; InstructGPT's RM)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from o3lite import errors
from o3lite.data import formatting
from o3lite.model import heads
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.training import losses
from o3lite.training import state as state_lib
from o3lite.verifiers import steps as steps_lib

KINDS = ("orm", "prm")
LENGTH_BUCKET = 32  # `Verifier` pads rows to a multiple of this (one compiled shape each).
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One solution as a verifier row: `tokens` = prompt + solution + EOS, `reads` the
  positions whose score is read (each step's last token, or the EOS), `labels` one per
  read (None: unlabelled)."""

  tokens: list[int]
  reads: list[int]
  labels: list[float | None]


def step_ends(solution: str, steps: Sequence[str]) -> list[int]:
  """Character offset just past each step of `solution`, each found after the last."""
  ends, at = [], 0
  for i, step in enumerate(steps):
    found = solution.find(step, at)
    if found < 0:
      raise errors.DataError(f"step {i} {step[:40]!r} is not in the solution")
    at = found + len(step)
    ends.append(at)
  return ends


def encode(question: str, solution: str, tokenizer: Any, kind: str,
           steps: Sequence[str] | None = None,
           labels: Sequence[float | None] | None = None, answer_read: bool = False,
           answer_label: float | None = None) -> Encoded:
  """The verifier row of `solution` to `question`.

  PRM: a read at the last token of each step (`steps`, default the `split_completion`
  of the tokens' decoded text), located in the tokens by their decoded text (a token that ends a
  step's text is its last token); with `answer_read`, one more at the EOS, labelled
  `answer_label` (the outcome: the answer after the chain judged too). ORM: one read, at
  the EOS. `labels`: one per step for a PRM, one (or one per step, the last taken) for an
  ORM; None leaves them unlabelled.
  """
  if kind not in KINDS:
    raise errors.ConfigError(f"verifier kind {kind!r}: expected one of {list(KINDS)}")
  prompt = formatting.encode_prompt(tokenizer, question)
  written = tokenizer.encode(solution)
  if kind == "orm":
    tokens = prompt + written + [tokenizer.eos_id]
    return Encoded(tokens, [len(tokens) - 1], [labels[-1] if labels else None])
  row = _prm_row(prompt, written, tokenizer, steps, labels)
  if not answer_read:
    return row
  return Encoded(row.tokens, row.reads + [len(row.tokens) - 1], row.labels + [answer_label])


def encode_sampled(prompt: Sequence[int], written: Sequence[int], tokenizer: Any) -> Encoded:
  """The PRM row of a sampled completion, in the tokens the policy wrote (no
  re-tokenization): reads at the last token of each step of `decode(written)`, so
  `reads[i] - len(prompt)` indexes the completion token that ends step i."""
  return _prm_row(list(prompt), list(written), tokenizer)


def _prm_row(prompt: list[int], written: list[int], tokenizer: Any,
             steps: Sequence[str] | None = None,
             labels: Sequence[float | None] | None = None) -> Encoded:
  """prompt + written + EOS with a read at the last token of each step: `steps` found
  in order in the tokens' decoded text, or (None) that text's own steps (a token with no
  text, such as SentencePiece's unknown piece, can change a step's characters, not its
  line)."""
  text = tokenizer.decode(written)
  if steps is None:
    found = steps_lib.split_completion(text)
    steps, ends = [x.text for x in found], [x.end for x in found]
  else:
    try:
      ends = step_ends(text, steps)
    except errors.DataError as e:
      raise errors.DataError(f"{e} once tokenized and decoded: the tokenizer cannot "
                             "place its steps") from None
  offsets = steps_lib.char_offsets(written, tokenizer.decode)
  reads = [len(prompt) + t for t in steps_lib.last_tokens(offsets, ends)]
  labels = [None] * len(steps) if labels is None else list(labels)
  if len(labels) != len(steps):
    raise errors.DataError(f"{len(labels)} labels for {len(steps)} steps")
  return Encoded(prompt + written + [tokenizer.eos_id], reads, labels)


def same_tokenizer(a: Any, b: Any) -> bool:
  """Whether tokenizers `a` and `b` have the same vocabulary (the same text for every
  id and the same EOS), as a verifier reading a policy's tokens needs."""
  return a.vocab_size == b.vocab_size and a.eos_id == b.eos_id and all(
      a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def check_same_tokenizer(a: Any, b: Any, what: str) -> None:
  """A one-line ConfigError unless `same_tokenizer(a, b)`."""
  if not same_tokenizer(a, b):
    raise errors.ConfigError(f"{what}: its tokenizer differs from the policy's (a verifier "
                             "must read the policy's tokens)")


def rows(encoded: Sequence[Encoded], seq_len: int, pad_id: int,
         batch_size: int | None = None) -> Batch:
  """[B, seq_len] arrays of `encoded` (B = batch_size, padded with empty rows)."""
  B = len(encoded) if batch_size is None else batch_size
  out = {"inputs": np.full((B, seq_len), pad_id, np.int32),
         "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len)).copy(),
         "segment_ids": np.zeros((B, seq_len), np.int32),
         "labels": np.zeros((B, seq_len), np.float32),
         "label_mask": np.zeros((B, seq_len), np.float32)}
  for b, e in enumerate(encoded):
    if len(e.tokens) > seq_len:
      raise errors.ConfigError(f"a solution of {len(e.tokens)} tokens (prompt + solution "
                               f"+ EOS) does not fit the verifier's seq_len {seq_len}")
    out["inputs"][b, :len(e.tokens)] = e.tokens
    out["segment_ids"][b, :len(e.tokens)] = 1
    for t, y in zip(e.reads, e.labels):
      if y is not None:
        out["labels"][b, t], out["label_mask"][b, t] = y, 1.0
  return out


def pair_rows(chosen: Sequence[Encoded], rejected: Sequence[Encoded], seq_len: int,
              pad_id: int) -> Batch:
  """Bradley-Terry rows: the chosen solutions' arrays, and the rejected ones' under
  "rejected_*"; the read of each row is its EOS (label_mask 1 there)."""
  mark = lambda es: [Encoded(e.tokens, e.reads[-1:], [1.0]) for e in es]
  out = rows(mark(chosen), seq_len, pad_id)
  out.update({f"rejected_{k}": v for k, v in rows(mark(rejected), seq_len, pad_id).items()
              if k != "labels"})
  return out


def logits(params, batch: Batch, model_cfg: model_lib.ModelConfig, prefix: str = ""
           ) -> jax.Array:
  """The verifier's logit at every position, [B, T] fp32."""
  return heads.ScalarHead(model_cfg).apply(
      {"params": params}, batch[prefix + "inputs"], batch[prefix + "positions"],
      batch[prefix + "segment_ids"]).astype(jnp.float32)


@losses.register_loss("verifier_bce")
def verifier_bce(model_cfg: model_lib.ModelConfig) -> Callable:
  """Binary cross-entropy at the read positions (ORM: the EOS; PRM: every step's end):

    L = sum_t m_t * [-y_t log sigmoid(z_t) - (1 - y_t) log(1 - sigmoid(z_t))] / sum_t m_t

  with y_t in [0, 1] (hard 0 / 1 labels, or Math-Shepherd's soft Monte Carlo fractions).
  Metrics: accuracy (z_t > 0 iff y_t >= 0.5) and the mean predicted probability.
  """

  def loss_fn(params, frozen, batch: Batch) -> losses.LossSums:
    del frozen
    z_BxT = logits(params["verifier"], batch, model_cfg)
    y_BxT, m_BxT = batch["labels"], batch["label_mask"]
    bce_BxT = optax.sigmoid_binary_cross_entropy(z_BxT, y_BxT)
    count = jnp.sum(m_BxT)
    right = ((z_BxT > 0) == (y_BxT >= 0.5)).astype(jnp.float32)
    return losses.LossSums(jnp.sum(bce_BxT * m_BxT), count, {
        "accuracy": (jnp.sum(right * m_BxT), count),
        "mean_probability": (jnp.sum(jax.nn.sigmoid(z_BxT) * m_BxT), count)})

  return loss_fn


@losses.register_loss("verifier_bradley_terry")
def verifier_bradley_terry(model_cfg: model_lib.ModelConfig) -> Callable:
  """Pairwise preference loss on (chosen, rejected) solutions of one question:

    L = sum_pairs -log sigmoid(r_c - r_r) / #pairs,   r = z at the row's read (EOS)

  Metric: pair accuracy (r_c > r_r). Rows with no read (padding) are not pairs.
  """

  def loss_fn(params, frozen, batch: Batch) -> losses.LossSums:
    del frozen
    read = lambda prefix: jnp.sum(logits(params["verifier"], batch, model_cfg, prefix)
                                  * batch[prefix + "label_mask"], axis=1)
    margin_B = read("") - read("rejected_")
    valid_B = jnp.minimum(jnp.sum(batch["label_mask"], axis=1),
                          jnp.sum(batch["rejected_label_mask"], axis=1))
    count = jnp.sum(valid_B)
    return losses.LossSums(jnp.sum(-jax.nn.log_sigmoid(margin_B) * valid_B), count, {
        "accuracy": (jnp.sum((margin_B > 0) * valid_B), count),
        "margin": (jnp.sum(margin_B * valid_B), count)})

  return loss_fn


def state_spec(model_cfg: model_lib.ModelConfig, tx, mesh, rules) -> state_lib.StateSpec:
  """The verifier's train state: one trainable tree, {"verifier": ScalarHead params}."""
  return state_lib.StateSpec(
      lambda rng: ({"verifier": heads.init_scalar_head(model_cfg, rng)}, {}), tx, mesh, rules)


def from_policy(spec: state_lib.StateSpec, policy_params, seed: int):
  """A verifier state whose trunk is a copy of `policy_params`, head and bias zero (every
  first prediction is 0.5)."""
  shardings = spec.shardings.params["verifier"]
  abstract = spec.abstract.params["verifier"]
  zeros = lambda name: jax.device_put(jnp.zeros(abstract[name].shape, abstract[name].dtype),
                                      shardings[name])
  return spec.around({"verifier": {"trunk": policy_params, "head": zeros("head"),
                                   "bias": zeros("bias")}}, {}, seed)


class Verifier:
  """A reward model ready to score solutions: its params (the ScalarHead tree), model
  config, tokenizer, kind and, for a PRM, `answer_read`. Rows go `batch_size` at a time,
  [batch_size, T] with T the chunk's longest row rounded up to a multiple of
  `LENGTH_BUCKET` (at most `seq_len`, the longest row it takes): few compiled shapes,
  and short solutions do not pay for `seq_len` (on a mesh, rows split over its batch
  axes).

    verifier.score_steps(examples, solutions)     PRM: a probability per step
    verifier.score_outcomes(examples, solutions)  ORM: P(correct); PRM: its answer read
                                                  (`answer_read`), else its last step's
  """

  def __init__(self, params, model_cfg: model_lib.ModelConfig, tokenizer: Any, kind: str,
               seq_len: int, batch_size: int = 32, mesh=None, rules=None,
               answer_read: bool = False):
    if kind not in KINDS:
      raise errors.ConfigError(f"verifier kind {kind!r}: expected one of {list(KINDS)}")
    if answer_read and kind != "prm":
      raise errors.ConfigError("answer_read adds a read to a PRM's steps; an ORM reads "
                               "only the answer")
    self.params, self.model_cfg, self.tokenizer, self.kind = params, model_cfg, tokenizer, kind
    self.answer_read = answer_read
    self.seq_len, self.mesh, self.rules = seq_len, mesh, rules
    shards = 1 if mesh is None else sharding_lib.batch_shards(mesh, rules)
    self.batch_size = -(-batch_size // shards) * shards
    self._probability = jax.jit(lambda p, b: jax.nn.sigmoid(logits(p, b, model_cfg)))
    if mesh is not None:
      self._batch_sharding = sharding_lib.batch_sharding(mesh, rules)
    self.tokens_scored = 0  # Solution + prompt tokens through the model (compute accounting).

  def _probabilities(self, encoded: Sequence[Encoded]) -> list[list[float]]:
    out = []
    for begin in range(0, len(encoded), self.batch_size):
      chunk = encoded[begin:begin + self.batch_size]
      longest = max(len(e.tokens) for e in chunk)
      length = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, self.seq_len)
      batch = rows(chunk, length, self.tokenizer.pad_id, self.batch_size)
      batch = {k: batch[k] for k in ("inputs", "positions", "segment_ids")}
      if self.mesh is None:
        p_BxT = self._probability(self.params, batch)
      else:
        with sharding_lib.activation_sharding(self.mesh, self.rules):
          p_BxT = self._probability(
              self.params, sharding_lib.put_global_batch(batch, self._batch_sharding))
      p_BxT = np.asarray(jax.device_get(p_BxT))
      out += [[float(p_BxT[b, t]) for t in e.reads] for b, e in enumerate(chunk)]
      self.tokens_scored += sum(len(e.tokens) for e in chunk)
    return out

  def score_sampled(self, prompts: Sequence[Sequence[int]],
                    completions: Sequence[Sequence[int]]) -> list[tuple[list[int], list[float]]]:
    """PRM scores of sampled completions in the policy's own tokens (same tokenizer):
    per completion, (index of each step's last token in the completion, its score)."""
    if self.kind != "prm":
      raise errors.ConfigError("an outcome reward model has no step scores")
    encoded = [encode_sampled(p, c, self.tokenizer) for p, c in zip(prompts, completions)]
    return [([r - len(p) for r in e.reads], probs) for p, e, probs in
            zip(prompts, encoded, self._probabilities(encoded))]

  def score_steps(self, examples: Sequence[dict], solutions: Sequence[str]
                  ) -> list[list[float]]:
    """P(step i correct | question, steps 1..i) for every step of each solution (its
    `split_completion`), one forward pass per solution."""
    if self.kind != "prm":
      raise errors.ConfigError("an outcome reward model scores whole solutions "
                               "(score_outcomes), not steps")
    return [p[:-1] if self.answer_read else p for p in self._prm_reads(examples, solutions)]

  def _prm_reads(self, examples, solutions) -> list[list[float]]:
    return self._probabilities([encode(e["question"], s, self.tokenizer, "prm",
                                       answer_read=self.answer_read)
                                for e, s in zip(examples, solutions)])

  def score_outcomes(self, examples: Sequence[dict], solutions: Sequence[str]
                     ) -> list[float]:
    """P(the solution's answer is correct): the ORM's read at the EOS; for a PRM, its
    answer read (`answer_read`) or else the score of the last step (0.5 for a solution
    without steps: no evidence)."""
    if self.kind == "orm":
      return [p[0] for p in self._probabilities(
          [encode(e["question"], s, self.tokenizer, "orm") for e, s in zip(examples, solutions)])]
    if self.answer_read:
      return [p[-1] for p in self._prm_reads(examples, solutions)]
    return [p[-1] if p else 0.5 for p in self.score_steps(examples, solutions)]
