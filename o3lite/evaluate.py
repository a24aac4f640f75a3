"""Held-out evaluation: greedy decoding, answer parsing and exact match.

Writes `eval.json` (`accuracy`, `num_examples`, `split`, ...) and `eval_samples.jsonl`
(one line per problem: `prompt`, `completion`, `answer`, `target`, `correct`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from o3lite import formatting
from o3lite import sampling


def evaluate_greedy(params, model_cfg, examples: Sequence[dict], tokenizer,
                    checker: Callable[[str | None, str], bool], max_new_tokens: int,
                    batch_size: int, split: str) -> tuple[dict[str, Any], list[dict]]:
  """Exact match of greedy completions against the targets."""
  prompts_text = [formatting.format_prompt(ex["question"]) for ex in examples]
  prompts = [tokenizer.encode(p) for p in prompts_text]
  cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id)
  completions = sampling.generate(params, prompts, model_cfg, cfg, batch_size)
  samples = []
  for prompt, ids, ex in zip(prompts_text, completions, examples):
    text = tokenizer.decode(ids)
    answer = formatting.parse_answer(text)
    samples.append({"prompt": prompt, "completion": text, "answer": answer,
                    "target": ex["answer"], "correct": bool(checker(answer, ex["answer"])),
                    "completion_tokens": len(ids)})
  correct = np.array([s["correct"] for s in samples], np.float64)
  metrics = {
      "split": split,
      "num_examples": len(samples),
      "accuracy": float(correct.mean()) if len(samples) else 0.0,
      "parsed_fraction": float(np.mean([s["answer"] is not None for s in samples])),
      "mean_completion_tokens": float(np.mean([s["completion_tokens"] for s in samples])),
  }
  return metrics, samples


def write_eval(workdir: str, metrics: dict[str, Any], samples: Sequence[dict],
               name: str = "eval") -> None:
  """`DIR/{name}.json` and `DIR/{name}_samples.jsonl`, written atomically."""
  path = os.path.join(workdir, f"{name}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, indent=2)
  os.replace(path + ".tmp", path)
  path = os.path.join(workdir, f"{name}_samples.jsonl")
  with open(path + ".tmp", "w") as f:
    for s in samples:
      f.write(json.dumps(s) + "\n")
  os.replace(path + ".tmp", path)
