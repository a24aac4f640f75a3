"""Reward factories: a reward built once from the run's context and its options (a model
judge is one more reward), and per-step rewards through the same interface."""

import numpy as np
import pytest

from o3lite import errors
from o3lite.data import formatting
from o3lite.data import sources
from o3lite.rl import rewards as rewards_lib
from o3lite.rl import rollouts
from o3lite.sampling import draws
from o3lite.sampling import policy as policy_lib
from o3lite.sampling import sampler
from o3lite.training import run_folder
from o3lite.training import sft as trainer
from o3lite.training import stage as stage_lib


def test_a_factory_gets_the_context_and_its_options_once():
  table = rewards_lib.RewardRegistry()
  built = []

  @table.register("threshold", factory=True)
  def threshold(context, *, at: int, bonus: float = 0.0):
    built.append((context.tokenizer, at))
    return lambda example, completion, *, num_tokens, **_: float(num_tokens >= at) + bonus

  context = rewards_lib.RewardContext(checker=None, tokenizer="the tokenizer")
  scorer = rewards_lib.RewardScorer({"threshold": 2.0}, context, rewards=table,
                                    options={"threshold": {"at": 3, "bonus": 0.5}})
  scores = scorer.score([{}, {}, {}], ["a", "b", "c"], [1, 3, 5], max_tokens=8)
  assert scores.total.tolist() == [1.0, 3.0, 3.0]
  assert built == [("the tokenizer", 3)]  # Built once, not per call.
  scorer.close()


def test_reward_option_errors_are_one_line_config_errors():
  table = rewards_lib.RewardRegistry()
  table.register("plain")(lambda example, completion, **_: 1.0)
  table.register("needs_path", factory=True)(lambda context, *, path: None)
  context = rewards_lib.RewardContext()
  cases = [
      ({"plain": 1.0}, {"plain": {"x": 1}}, r"^reward function 'plain' takes no options"),
      ({"plain": 1.0}, {"needs_path": {"path": "p"}},
       r"^rl.reward_options.needs_path: 'needs_path' is not in rl.rewards"),
      ({"needs_path": 1.0}, {}, r"^reward function 'needs_path': .*missing .*'path'"),
      ({"needs_path": 1.0}, {"needs_path": {"path": "p", "typo": 1}},
       r"^reward function 'needs_path': .*unexpected keyword argument 'typo'"),
  ]
  for weights, options, message in cases:
    with pytest.raises(errors.ConfigError, match=message) as info:
      rewards_lib.RewardScorer(weights, context, rewards=table, options=options)
    assert "\n" not in str(info.value)


def test_a_model_judge_is_one_more_reward(tiny_run):
  """A batched reward whose factory loads a model (here the tiny run's policy) on the
  run's mesh and scores completions by their mean log-probability under it."""
  table = rewards_lib.RewardRegistry()

  @table.register("judge", batched=True, factory=True)
  def judge(context, *, path: str):
    model = context.load_policy(path)
    cfg = draws.Sampling(temperature=0.0).config(model.tokenizer)

    def score(examples, completions, **_):
      prompts = [formatting.encode_prompt(model.tokenizer, e["question"]) for e in examples]
      logps = sampler.score(model.params, prompts,
                            [model.tokenizer.encode(c) for c in completions],
                            model.model_cfg, cfg, 4, model.mesh, model.rules)
      return [float(np.mean(lp)) for lp in logps]
    return score

  config = run_folder.load_config(tiny_run)
  mesh, rules = stage_lib.mesh_and_rules(config)
  run, params = trainer.load_run(tiny_run)
  context = rewards_lib.RewardContext(sources.get_checker(config.data), run.tokenizer,
                                      mesh, rules, config.model)
  examples = trainer.held_out_examples(config.data, "test", 4)
  policy = policy_lib.Policy(params, run.model_cfg, run.tokenizer, mesh, rules)
  prompts = [formatting.encode_prompt(run.tokenizer, e["question"]) for e in examples]
  own = [d.texts[0] for d in draws.draw(policy, prompts, 1, draws.GREEDY.replace(
      max_new_tokens=16))]
  written = [formatting.format_completion(e["cot"], e["answer"])[:len(t)]
             for e, t in zip(examples, own)]
  assert written != own
  scorer = rewards_lib.RewardScorer({"judge": 1.0}, context, rewards=table,
                                    options={"judge": {"path": tiny_run}})
  scores = scorer.score(examples * 2, own + written, [16] * 8, 16)
  scorer.close()
  assert scores.failures == 0
  # The judge (the policy itself, barely trained) prefers its own greedy text to the
  # same length of the task's written chain.
  assert np.all(scores.total[:4] > scores.total[4:])


def test_a_step_reward_is_a_factory_with_its_own_return_type():
  table = rewards_lib.RewardRegistry("step reward")

  @table.register("every_other_token", factory=True)
  def every_other_token(context, *, value: float):
    del context
    return lambda prompts, completions: [
        rewards_lib.StepRewards(list(range(1, len(c), 2)), [value] * (len(c) // 2))
        for c in completions]

  fn = table.build("every_other_token", rewards_lib.RewardContext(), {"value": 0.25})
  steps = fn([[7, 8]], [[1, 2, 3, 4, 5]])
  assert steps == [rewards_lib.StepRewards([1, 3], [0.25, 0.25])]
  # The learner places them at the target positions of those completion tokens.
  record = {"prompt": [7, 8], "steps": steps}
  mask = np.zeros((1, 8), np.float32)
  rewards, where, scores = rollouts.process_rewards([record], mask, "score")
  assert np.nonzero(where[0])[0].tolist() == [2, 4]  # len(prompt) - 1 + end.
  assert rewards[0, 2] == rewards[0, 4] == 0.25 and scores == [0.25, 0.25]
  assert sorted(rewards_lib.STEP_REWARDS) == ["prm"]
