r"""One GRPO step on SmolLM2-135M-Instruct: o3lite's RL step vs TRL's `GRPOTrainer` (CPU).

  pip install -e ".[bench]"               # TRL and its dependencies: the baseline only
  python -m o3lite.interop.gguf_folder    # once: ~/.cache/o3lite/smollm2-135m-instruct
  python -m bench.trl_grpo                # configs/rl_smollm2.py's step sizes, 3 timed steps
  python -m bench.trl_grpo --prompts_per_step=1 --group_size=2 --max_new_tokens=8 \
      --minibatch_size=2 --steps=1        # smoke run
  # --side=both|o3lite|trl  --model_dir=DIR  --torch_threads=N

Both sides run the same GRPO step: the same model (the fp32 Hugging Face folder of
`python -m o3lite.interop.gguf_folder`), the same prompts in the same order (the training
split of `configs/rl_smollm2.py`'s task, 3-digit addition, as the user's turn of the
model's chat template: 37 tokens, checked token for token), `--prompts_per_step` prompts
x `--group_size` completions sampled at temperature 1.0 with at most `--max_new_tokens`
new tokens (EOS included; rows stop at EOS on both sides), an outcome reward (o3lite's
`correctness` reward with the task's checker), group-normalized advantages, no KL term
and no reference model in the loss, then one pass of minibatch updates of
`--minibatch_size` completions (clipped ratio, token-mean loss, AdamW, clip 1.0):

  o3lite: `configs/rl_smollm2.py` with `init_from` = the folder (no SFT warm start:
          the pretrained model with its two new think rows samples fine for timing),
          `rl.dynamic_sampling` off (one sampling round per step, as TRL), built with
          `stage.build`; each step is one `plan.iterate` call: the in-process jitted
          sampler, decode and rewards (its `time_sampling_s`), the learner's scoring pass
          (policy and reference log-probs, advantages), then the minibatch updates (its
          `time_learning_s`) with the one jitted train step.
  TRL:    `trl.GRPOTrainer` on the CPU (`use_cpu`, fp32, no vLLM: `model.generate`),
          `num_generations` = group size, `max_completion_length` = new tokens,
          `per_device_train_batch_size` = minibatch, `gradient_accumulation_steps` 1,
          `steps_per_generation` = prompts x group / minibatch (one generation round
          of all completions, then that many optimizer steps), `beta` 0, loss "dapo"
          (token mean), `activation_checkpointing` as o3lite's `model.remat` (off),
          torch threads = the machine's cores. One step here is one generation round
          and its optimizer steps, timed from callbacks at each optimizer step's end;
          a subclass times `_generate_single_turn` (`model.generate`), `_generate`
          (tokenize, generate, decode), `_calculate_rewards` and the whole
          `_generate_and_score_completions`.

The learner work differs where o3lite does more: its scoring pass always computes the
policy's and the frozen reference's log-probs of the fresh samples (TRL computes old
log-probs only when `steps_per_generation` > 1, and no reference ones with `beta` 0);
its rows have one fixed length, `rl.max_prompt_len` (40) + new tokens + 1, with
log-probs at every position, where TRL's rows are the longest prompt (37) + the longest
completion of the batch with logits at completion positions only; and its vocabulary
has the two think rows (49,154 rows against 49,152).

The first step of each side is a warm-up (o3lite's compiles the sampler, the scoring
pass and the train step) and is reported apart; `--steps` further steps are timed, and
the figures are their means: seconds per step, sampling (generation, decode and rewards)
and learning (everything else in the step), new tokens (completion tokens, EOS
included: completions end at EOS, so the mean completion length is reported for both)
and new tokens per second of sampling. The speed-up is TRL's time over o3lite's (target:
at least 1.5x per step). Prints Markdown tables and writes `bench/results/trl_grpo.json`.
Measure on an idle machine: torch's threads slow down far more than XLA's when other
work shares the CPUs (with another job on both of 2 cores, TRL's smoke-run step took
51 s at 2 torch threads and 2.6 s at 1).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

from bench import common
from configs import rl_smollm2
from o3lite.data import formatting
from o3lite.data import sources
from o3lite.rl import rewards as rewards_lib
from o3lite.rl import rollouts
from o3lite.rl import run as rl_run
from o3lite.training import policy_source
from o3lite.training import stage as stage_lib

_PROMPTS_PER_STEP = flags.DEFINE_integer("prompts_per_step", None,
                                         "Prompts per step (default: the config's).")
_GROUP_SIZE = flags.DEFINE_integer("group_size", None,
                                   "Completions per prompt (default: the config's).")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "Most new tokens per completion, EOS included (default: the "
    "config's).")
_MINIBATCH_SIZE = flags.DEFINE_integer(
    "minibatch_size", None, "Completions per update, dividing prompts x group (default: "
    "the config's).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per side, after one warm-up step.")
_SIDE = flags.DEFINE_enum("side", "both", ["both", "o3lite", "trl"], "Which sides to run.")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", os.path.expanduser("~/.cache/o3lite/smollm2-135m-instruct"),
    "The Hugging Face folder of `python -m o3lite.interop.gguf_folder`.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None,
                                      "TRL's torch threads (default: os.cpu_count()).")

BASELINE_PACKAGES = ("trl", "transformers", "torch", "accelerate", "datasets")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What one step samples and trains on (the flags)."""

  prompts: int
  group: int
  new_tokens: int
  minibatch: int

  @property
  def rows(self) -> int:
    return self.prompts * self.group


def import_trl():
  """(trl, torch, transformers), or exit with how to install the baseline."""
  try:
    import trl  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("bench/trl_grpo.py needs TRL for its baseline (not an o3lite requirement): "
             'pip install -e ".[bench]"')
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return trl, torch, transformers


def bench_config(model_dir: str, sizes: Sizes, num_steps: int):
  """`configs/rl_smollm2.py` from the pretrained folder, cut to the bench's sizes."""
  config = rl_smollm2.get_config()
  config.init_from = model_dir
  config.loop.num_steps = num_steps  # Only the learning-rate schedule reads it.
  rl = config.rl
  rl.prompts_per_step, rl.group_size = sizes.prompts, sizes.group
  rl.max_new_tokens, rl.minibatch_size = sizes.new_tokens, sizes.minibatch
  rl.dynamic_sampling = False  # One sampling round per step, as TRL takes.
  return config


def bench_prompts(config, num_prompts: int) -> tuple[list[dict], list[list[int]]]:
  """The first `num_prompts` training examples in the order o3lite's RL stream takes
  them, and their prompt ids (the chat template's user turn, o3lite's tokenizer)."""
  tokenizer = policy_source.resolve(config.init_from).tokenizer(config.data.chat_template)
  stream = rollouts.PromptStream(sources.load_examples(config.data, "train"), tokenizer,
                                 config.data.seed, config.rl.max_prompt_len)
  indices, _ = stream.take(0, num_prompts)
  return [stream.examples[i] for i in indices], [stream.prompts[i] for i in indices]


def summarize(records: list[dict], rows: int) -> dict:
  """Means over the timed steps (all but the first, the warm-up) of a side's records."""
  timed = records[1:]
  mean = lambda key: statistics.fmean(r[key] for r in timed)
  out = {key: mean(key) for key in timed[0]}
  out["learning_s"] = out["step_s"] - out["sampling_s"]
  out["mean_completion_length"] = out["new_tokens"] / rows
  out["sampling_new_tokens_per_s"] = out["new_tokens"] / out["sampling_s"]
  out["step_new_tokens_per_s"] = out["new_tokens"] / out["step_s"]
  out["warmup_step_s"] = records[0]["step_s"]
  out["median_step_s"] = statistics.median(r["step_s"] for r in timed)
  return out


# ---------------------------------------------------------------------------------------
# o3lite.


def run_o3lite(config, sizes: Sizes, steps: int) -> dict:
  """o3lite's RL step, `steps` + 1 times (the first compiles): per-step records."""
  with tempfile.TemporaryDirectory() as workdir:  # build writes nothing there.
    _, _, plan = stage_lib.build(config, workdir, rl_run.RL())
  state, position, records = plan.init(), 0, []
  for step in range(steps + 1):
    start = time.perf_counter()
    state, position, metrics = plan.iterate(state, position, step)
    seconds = time.perf_counter() - start
    records.append({
        "step_s": seconds,
        "sampling_s": metrics["time_sampling_s"],  # Sampler, decode, rewards.
        # The learner's scoring pass (policy and reference log-probs), advantages.
        "scoring_pass_s": metrics["time_scoring_s"],
        # The minibatch updates (time_learning_s counts the scoring pass too).
        "updates_s": metrics["time_learning_s"] - metrics["time_scoring_s"],
        "new_tokens": metrics["response_length"] * sizes.rows,  # EOS included.
        "reward": metrics["reward"],
    })
    print(f"  o3lite step {step}: {seconds:.2f} s (sampling "
          f"{metrics['time_sampling_s']:.2f} s, learning {metrics['time_learning_s']:.2f} s),"
          f" mean completion {metrics['response_length']:.1f} tokens", flush=True)
  plan.close()
  return {"steps": records, **summarize(records, sizes.rows)}


# ---------------------------------------------------------------------------------------
# TRL.


class RoundClock:
  """Seconds, new tokens and mean reward of each TRL generation round, part by part."""

  def __init__(self):
    self.rounds: list[collections.defaultdict] = []

  def start_round(self) -> None:
    self.rounds.append(collections.defaultdict(float))

  def timed(self, part: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    self.rounds[-1][part] += time.perf_counter() - start
    return out


def timed_trainer_class(trl, clock: RoundClock):
  """A `GRPOTrainer` whose rollout parts report to `clock` (nothing else changes)."""

  class TimedGRPOTrainer(trl.GRPOTrainer):

    def _generate_and_score_completions(self, inputs):
      clock.start_round()
      return clock.timed("rollout_s", super()._generate_and_score_completions, inputs)

    def _generate(self, prompts):  # Tokenize, generate, decode.
      return clock.timed("generate_and_decode_s", super()._generate, prompts)

    def _generate_single_turn(self, *args, **kwargs):  # model.generate.
      completion_ids, logprobs = clock.timed(
          "transformers_generate_s", super()._generate_single_turn, *args, **kwargs)
      clock.rounds[-1]["new_tokens"] += sum(len(c) for c in completion_ids)  # EOS included.
      return completion_ids, logprobs

    def _calculate_rewards(self, *args, **kwargs):
      rewards = clock.timed("rewards_s", super()._calculate_rewards, *args, **kwargs)
      clock.rounds[-1]["reward"] = float(rewards.sum(1).mean())
      return rewards

  return TimedGRPOTrainer


def step_clock(transformers):
  """A trainer callback recording the time at the start of training and at the end of
  every optimizer step (`marks`)."""

  class StepClock(transformers.TrainerCallback):

    def __init__(self):
      self.marks: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
      self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
      self.marks.append(time.perf_counter())

  return StepClock()


def trl_reward(checker):
  """TRL's reward function: o3lite's `correctness` reward of each completion."""

  def correctness(prompts, completions, answer, **kwargs):
    del prompts, kwargs
    return [rewards_lib.correctness({"answer": a}, c[-1]["content"], checker=checker)
            for c, a in zip(completions, answer)]

  return correctness


def trl_args(trl, config, sizes: Sizes, steps: int, output_dir: str):
  """GRPOConfig of the same step: one generation round of prompts x group completions,
  then `epochs` passes of minibatch optimizer steps, the same optimizer settings."""
  rl, opt = config.rl, config.optimizer
  return trl.GRPOConfig(
      output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, seed=config.seed,
      num_generations=sizes.group, max_completion_length=sizes.new_tokens,
      temperature=rl.temperature, top_p=1.0, top_k=0,
      per_device_train_batch_size=sizes.minibatch, gradient_accumulation_steps=1,
      steps_per_generation=sizes.rows // sizes.minibatch, num_iterations=rl.epochs,
      max_steps=(steps + 1) * updates_per_step(config, sizes), shuffle_dataset=False,
      beta=rl.kl_coef, epsilon=rl.clip_low, epsilon_high=rl.clip_high, loss_type="dapo",
      scale_rewards="group", activation_checkpointing=config.model.remat,
      learning_rate=opt.learning_rate, lr_scheduler_type="constant_with_warmup",
      warmup_steps=opt.warmup_steps, adam_beta1=opt.b1, adam_beta2=opt.b2,
      adam_epsilon=opt.eps, weight_decay=opt.weight_decay, max_grad_norm=opt.grad_clip_norm,
      logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
      dataloader_pin_memory=False)


def updates_per_step(config, sizes: Sizes) -> int:
  return config.rl.epochs * sizes.rows // sizes.minibatch


def check_prompt_ids(tokenizer, conversations, prompt_ids) -> None:
  """TRL's prompt ids (its chat template call) must be o3lite's, token for token."""
  theirs = tokenizer.apply_chat_template(conversations, add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
  if [list(t) for t in theirs] != [list(p) for p in prompt_ids]:
    raise RuntimeError("TRL's chat-template prompt ids differ from o3lite's")


def trl_records(clock: RoundClock, marks: list[float], updates: int, rows: int) -> list[dict]:
  """Per step (a generation round and its optimizer steps): seconds and parts."""
  if len(clock.rounds) * updates != len(marks) - 1:
    raise RuntimeError(f"{len(clock.rounds)} generation rounds for {len(marks) - 1} "
                       f"optimizer steps; expected {updates} steps per round")
  records = []
  for i, r in enumerate(clock.rounds):
    step_s = marks[(i + 1) * updates] - marks[i * updates]
    sampling_s = r["generate_and_decode_s"] + r["rewards_s"]
    records.append({
        "step_s": step_s,
        "sampling_s": sampling_s,  # Tokenize, generate, decode, rewards.
        "transformers_generate_s": r["transformers_generate_s"],
        # Padding, old log-probs (when steps_per_generation > 1), advantages.
        "rollout_rest_s": r["rollout_s"] - sampling_s,
        # Forward, backward, AdamW and the trainer's own work.
        "training_steps_s": step_s - r["rollout_s"],
        "new_tokens": r["new_tokens"],
        "reward": r["reward"],
    })
    print(f"  TRL step {i}: {step_s:.2f} s (sampling {sampling_s:.2f} s, of which generate "
          f"{r['transformers_generate_s']:.2f} s), mean completion "
          f"{r['new_tokens'] / rows:.1f} tokens", flush=True)
  return records


def run_trl(config, sizes: Sizes, steps: int, examples, prompt_ids, threads: int) -> dict:
  """TRL's GRPOTrainer on the same prompts, `steps` + 1 generation rounds."""
  trl, torch, transformers = import_trl()
  import datasets  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  tokenizer = transformers.AutoTokenizer.from_pretrained(config.init_from)
  model = transformers.AutoModelForCausalLM.from_pretrained(config.init_from,
                                                            dtype=torch.float32)
  conversations = [[{"role": "user",
                     "content": formatting.format_prompt(ex["question"]).removesuffix("\n")}]
                   for ex in examples]
  check_prompt_ids(tokenizer, conversations, prompt_ids)
  dataset = datasets.Dataset.from_list(
      [{"prompt": c, "answer": ex["answer"]} for c, ex in zip(conversations, examples)])
  clock, marks = RoundClock(), step_clock(transformers)
  with tempfile.TemporaryDirectory() as output_dir:
    trainer = timed_trainer_class(trl, clock)(
        model=model, reward_funcs=trl_reward(sources.get_checker(config.data)),
        args=trl_args(trl, config, sizes, steps, output_dir), train_dataset=dataset,
        processing_class=tokenizer, callbacks=[marks])
    trainer.train()
  records = trl_records(clock, marks.marks, updates_per_step(config, sizes), sizes.rows)
  return {"steps": records, **summarize(records, sizes.rows),
          "steps_per_generation": trainer.args.steps_per_generation,
          "generation_batch_size": trainer.args.generation_batch_size,
          "optim": str(trainer.args.optim), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------
# Report.


def versions() -> dict[str, str | None]:
  """Installed versions of the baseline's packages (None: not installed)."""
  out = {}
  for name in BASELINE_PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def rate(x: float) -> str:
  return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"


def main_table(sides: dict[str, dict]) -> str:
  headers = ["side", "s / step", "sampling s", "learning s", "new tokens / step",
             "mean completion", "sampling new tok/s", "step new tok/s", "reward"]
  rows = [[name, f"{s['step_s']:.2f}", f"{s['sampling_s']:.2f}", f"{s['learning_s']:.2f}",
           f"{s['new_tokens']:.0f}", f"{s['mean_completion_length']:.1f}",
           rate(s["sampling_new_tokens_per_s"]), rate(s["step_new_tokens_per_s"]),
           f"{s['reward']:.3f}"] for name, s in sides.items()]
  if len(sides) == 2:
    o3, th = sides["o3lite"], sides["TRL"]
    x = lambda a, b: f"{a / b:.2f}x"
    rows.append(["o3lite speed-up", x(th["step_s"], o3["step_s"]),
                 x(th["sampling_s"], o3["sampling_s"]), x(th["learning_s"], o3["learning_s"]),
                 "", "", x(o3["sampling_new_tokens_per_s"], th["sampling_new_tokens_per_s"]),
                 x(o3["step_new_tokens_per_s"], th["step_new_tokens_per_s"]), ""])
  return common.markdown_table(headers, rows)


PARTS = {  # side -> (record key, what it covers)
    "o3lite": [("sampling_s", "in-process sampler, decode, rewards"),
               ("scoring_pass_s", "learner scoring pass (policy + reference log-probs), "
                "advantages"),
               ("updates_s", "minibatch updates (the jitted train step)")],
    "TRL": [("sampling_s", "sampling: tokenize, `model.generate`, decode, rewards"),
            ("transformers_generate_s", "(of which `model.generate`)"),
            ("rollout_rest_s", "padding, old log-probs (steps_per_generation > 1), "
             "advantages"),
            ("training_steps_s", "optimizer steps: forward, backward, AdamW, trainer")],
}


def parts_table(sides: dict[str, dict]) -> str:
  rows = []
  for name, s in sides.items():
    rows.append([name, "warm-up step (first; o3lite compiles)", f"{s['warmup_step_s']:.2f}", ""])
    rows += [[name, label, f"{s[key]:.2f}", f"{s[key] / s['step_s']:.0%}"]
             for key, label in PARTS[name]]
  return common.markdown_table(["side", "part", "s / step", "of the step"], rows)


def main(argv):
  del argv
  common.setup_host_memory()
  shipped = rl_smollm2.get_config().rl
  pick = lambda flag, default: default if flag.value is None else flag.value
  sizes = Sizes(pick(_PROMPTS_PER_STEP, shipped.prompts_per_step),
                pick(_GROUP_SIZE, shipped.group_size),
                pick(_MAX_NEW_TOKENS, shipped.max_new_tokens),
                pick(_MINIBATCH_SIZE, shipped.minibatch_size))
  if sizes.group < 2 or sizes.rows % sizes.minibatch or _STEPS.value < 1:
    raise app.UsageError("need --group_size >= 2, --steps >= 1 and --minibatch_size "
                         "dividing prompts x group")
  if _SIDE.value != "o3lite":
    import_trl()  # Fail before any work if the baseline is missing.
  common.warn_if_busy()
  steps, threads = _STEPS.value, _TORCH_THREADS.value or os.cpu_count()
  config = bench_config(_MODEL_DIR.value, sizes, steps + 1)
  examples, prompt_ids = bench_prompts(config, sizes.prompts * (steps + 1))
  print(f"{sizes.prompts} prompts x {sizes.group} completions, at most {sizes.new_tokens} "
        f"new tokens, minibatch {sizes.minibatch}; prompts of {len(prompt_ids[0])} tokens; "
        f"1 warm-up + {steps} timed steps per side", flush=True)
  sides, load = {}, {"start": os.getloadavg()}
  if _SIDE.value in ("both", "o3lite"):
    print("o3lite:", flush=True)
    sides["o3lite"] = run_o3lite(config, sizes, steps)
    load["after_o3lite"] = os.getloadavg()
    gc.collect()
  if _SIDE.value in ("both", "trl"):
    print("TRL:", flush=True)
    sides["TRL"] = run_trl(config, sizes, steps, examples, prompt_ids, threads)
    load["after_trl"] = os.getloadavg()

  out = {"sizes": dataclasses.asdict(sizes), "timed_steps": steps,
         "prompt_tokens": len(prompt_ids[0]), "model_dir": _MODEL_DIR.value,
         "versions": versions(), "load_average_1_5_15min": load, **sides}
  if len(sides) == 2:
    out["o3lite_speedup_per_step"] = sides["TRL"]["step_s"] / sides["o3lite"]["step_s"]
  path = common.write_results("trl_grpo", out)
  print(f"\nwrote {path}\n")
  print(main_table(sides))
  print()
  print(parts_table(sides))
  print(f"\nmeans of {steps} timed steps after 1 warm-up; fp32 on "
        f"{os.cpu_count()} CPUs, torch {threads} threads; load average (1 min) "
        + ", ".join(f"{k} {v[0]:.2f}" for k, v in load.items()) + ".")
  if len(sides) == 2:
    speedup = out["o3lite_speedup_per_step"]
    print(f"o3lite per step: {speedup:.2f}x TRL's speed (target: at least 1.5x): "
          f"{'met' if speedup >= 1.5 else 'not met'}.")


if __name__ == "__main__":
  app.run(main)
