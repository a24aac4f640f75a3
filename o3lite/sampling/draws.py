"""Sample N completions of each prompt and decode them: the one path that RL rollouts,
held-out evaluation, a verifier's training solutions and test-time search share, with
the one settings type they share.

  sampling = Sampling(max_new_tokens=64, temperature=1.0)
  drawn = draw(policy, prompts, num_samples=8, sampling=sampling, rng=key)
  drawn[i].texts, drawn[i].answers, drawn[i].completions   # prompt i's 8 samples

`Sampling` is what a caller chooses (frozen, small); `Sampling.config` turns it into the
sampler's compiled settings (`SamplingConfig`) for a tokenizer and a sample count.
Stages build it from their config section once, at their edge.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax

from o3lite import errors
from o3lite.data import formatting
from o3lite.sampling import policy as policy_lib
from o3lite.sampling import sampler


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a policy samples: the settings every caller of `draw` chooses from."""

  max_new_tokens: int = 128  # Longest completion (EOS included).
  temperature: float = 0.8  # 0 = greedy. search-and-learn's and Snell et al.'s setting.
  top_p: float = 1.0
  top_k: int = 0
  think_budget: int = 0  # Force `</think>` after this many thinking tokens; 0 = no cap.
  min_think: int = 0  # Keep `</think>` and EOS from ending fewer thinking tokens.
  wait_ids: tuple[int, ...] = ()  # With min_think: an early `</think>` becomes these (s1).
  prompt_bucket: int = 16  # Prompt lengths are padded to a multiple (fewer compiles).
  # Rows (prompts x samples) per compiled sampler call: max(1, rows_per_call // N)
  # prompts at a time, so memory stays about the same along the N axis.
  rows_per_call: int = 256

  def __post_init__(self):
    if self.rows_per_call < 1:
      raise errors.ConfigError(f"rows_per_call={self.rows_per_call}: expected >= 1")
    if self.max_new_tokens < 1 or self.prompt_bucket < 1:
      raise errors.ConfigError(f"max_new_tokens={self.max_new_tokens}, prompt_bucket="
                               f"{self.prompt_bucket}: expected >= 1")

  def config(self, tokenizer: Any, num_samples: int = 1) -> sampler.SamplingConfig:
    """The sampler's compiled settings for `tokenizer`'s ids and `num_samples` rows per
    prompt."""
    return sampler.SamplingConfig(
        max_new_tokens=self.max_new_tokens, eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, prompt_bucket=self.prompt_bucket,
        temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
        num_samples=num_samples, think_end_id=getattr(tokenizer, "think_end_id", -1),
        think_budget=self.think_budget, min_think=self.min_think, wait_ids=self.wait_ids)

  def problems_per_call(self, num_samples: int) -> int:
    return max(1, self.rows_per_call // num_samples)

  def replace(self, **changes) -> "Sampling":
    return dataclasses.replace(self, **changes)


GREEDY = Sampling(temperature=0.0)


@dataclasses.dataclass
class Drawn:
  """N sampled completions of one prompt, decoded."""

  prompt: list[int]
  completions: list[sampler.Completion]
  texts: list[str]

  @functools.cached_property
  def answers(self) -> list[str | None]:
    """Each text's parsed final answer (`formatting.parse_answer`; None: none)."""
    return [formatting.parse_answer(t) for t in self.texts]

  @property
  def generated_tokens(self) -> list[int]:
    """Per completion: its tokens, EOS counted when it ended with one."""
    return [len(c.tokens) + int(c.finished) for c in self.completions]

  @property
  def row_tokens(self) -> int:
    """Tokens of its rows as a verifier reads them: prompt + completion + EOS, summed."""
    return sum(len(self.prompt) + len(c.tokens) + 1 for c in self.completions)


def draw(policy: policy_lib.Policy, prompts: Sequence[Sequence[int]], num_samples: int,
         sampling: Sampling, rng: jax.Array | None = None,
         problems_per_call: int | None = None) -> list[Drawn]:
  """`num_samples` completions of every prompt, in order, decoded with the policy's
  tokenizer; `problems_per_call` prompts per compiled call (default
  `sampling.problems_per_call(num_samples)`, at most the number of prompts; a last call
  with fewer is padded to the same shape), the sampler key `rng` (default `PRNGKey(0)`)
  folded with each call's index."""
  tok = policy.tokenizer
  per_call = problems_per_call or min(sampling.problems_per_call(num_samples), len(prompts))
  rows = sampler.sample(policy.params, prompts, policy.model_cfg,
                        sampling.config(tok, num_samples), max(per_call, 1), rng,
                        policy.mesh, policy.rules)
  return [Drawn(list(p), group, [tok.decode(c.tokens) for c in group])
          for p, group in zip(prompts, rows)]
