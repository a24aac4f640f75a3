"""Two CPU processes form one mesh and train exactly like one process.

Each process is started with 2 simulated CPU devices and joins the run through
`o3lite.distributed.maybe_initialize` (gloo collectives), so the mesh spans 4 devices
in 2 processes, as on a TPU pod slice or a multi-node GPU cluster. The references run in
this test process, on its simulated devices (see conftest.py). The first test runs the
SFT step alone, then RL reward scoring (process 0 scores, both processes get its scores);
the second the whole `python -m o3lite.train` entry point, started by
launch/gpu_multinode.sh as it is on each node of a GPU cluster.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

import multiprocess_worker
from configs import sft as sft_config
from o3lite.data import sources
from o3lite import stages

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(make_command, tmp_path: pathlib.Path) -> list[str]:
  """Start one process per id, running `make_command(coordinator, process_id)`; stdouts.

  Output goes to files, not pipes: a process blocked on a full pipe would stall its peer
  in a collective.
  """
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      os.environ.get("PYTHONPATH")])))
  procs, outs = [], []
  for pid in range(NUM_PROCESSES):
    out, err = tmp_path / f"process_{pid}.out", tmp_path / f"process_{pid}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
      procs.append(subprocess.Popen(make_command(coordinator, pid),
                                    cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr))
    outs.append((out, err))
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  stderrs = "\n".join(f"--- process {pid} stderr (last 4000 chars) ---\n"
                      f"{err.read_text()[-4000:]}" for pid, (_, err) in enumerate(outs))
  assert codes is not None, f"processes did not finish in {TIMEOUT_S} s\n{stderrs}"
  assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}\n{stderrs}"
  return [out.read_text() for out, _ in outs]


def test_two_processes_train_like_one(tmp_path):
  worker = str(REPO_ROOT / "tests" / "multiprocess_worker.py")
  stdouts = _run_processes(
      lambda coordinator, pid: [sys.executable, worker, coordinator, str(NUM_PROCESSES),
                                str(pid)], tmp_path)
  reports = [json.loads(out.strip().splitlines()[-1]) for out in stdouts]
  assert [r["process_index"] for r in reports] == [0, 1]
  for r in reports:
    assert r["process_count"] == 2
    assert r["num_devices"] == 4 and r["num_local_devices"] == 2
  assert reports[0]["losses"] == reports[1]["losses"]

  reference = multiprocess_worker.train_losses((1, 1, 1), jax.devices()[:1])
  assert reference[-1] < reference[0]  # The steps really train.
  np.testing.assert_allclose(reports[0]["losses"], reference, rtol=2e-5)

  # Rewards: scored on process 0 only, the same scores and counts on both processes.
  rewards = [r["rewards"] for r in reports]
  assert rewards[0]["direct"] == {"total": [0.0, 1.5, 2.0, 3.5], "failures": 2,
                                  "timeouts": 0}
  assert rewards[1]["direct"] == rewards[0]["direct"]
  assert rewards[1]["step"] == rewards[0]["step"]
  step = rewards[0]["step"]
  assert step["sampling_rounds"] == 1 and step["dropped_groups"] == 0  # Informative.
  assert step["position"] == 2
  # The judge gives row i the value i; flaky adds 0.5 but fails on q0 on process 0.
  assert step["scores"] == [[2 * g + 0.5 * (q != "q0"), 2 * g + 1 + 0.5 * (q != "q0")]
                            for g, q in enumerate(step["questions"])]
  assert step["reward_failures"] == 2 * step["questions"].count("q0")
  assert rewards[0]["calls"] == {"judge": 2, "flaky": 8}
  assert rewards[1]["calls"] == {"judge": 0, "flaky": 0}


# A tiny run of configs/sft.py: small splits, 4 steps, 8 evaluation problems.
TINY_RUN = {
    "data.num_train": 2000, "data.num_validation": 50, "data.num_test": 50,
    "loop.num_steps": 4, "loop.log_every": 2, "loop.eval_every": 0,
    "loop.checkpoint_every": 2, "eval.num_examples": 8, "eval.batch_size": 8,
    "eval.max_new_tokens": 16,
}


def _losses(metrics_path: pathlib.Path) -> dict[int, float]:
  lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
  return {m["step"]: m["loss"] for m in lines if "loss" in m}


def test_train_entry_point_in_two_processes(tmp_path):
  overrides = dict(TINY_RUN, **{"data.data_dir": str(tmp_path / "data")})
  config = sft_config.get_config()
  config.update_from_flattened_dict(overrides)
  # Prepare the dataset and tokenizer once, so the two processes only read them.
  sources.get_tokenizer(config.data)

  workdir = tmp_path / "run"
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  stdouts = _run_processes(
      lambda coordinator, pid: [
          "bash", str(REPO_ROOT / "launch" / "gpu_multinode.sh"),
          f"--coordinator={coordinator}", f"--num_processes={NUM_PROCESSES}",
          f"--process_id={pid}", f"--workdir={workdir}", "--", *flags], tmp_path)

  # Process 0 writes the outputs and reports; process 1 only trains.
  assert "sft: accuracy" in stdouts[0] and "sft: accuracy" not in stdouts[1]
  result = json.loads((workdir / "eval.json").read_text())
  assert result["stage"] == "sft" and result["step"] == 4
  assert result["metrics"]["split"] == "test" and result["metrics"]["num_examples"] == 8
  assert len((workdir / "eval_samples.jsonl").read_text().splitlines()) == 8
  assert (workdir / "checkpoints" / "4").is_dir()
  losses = _losses(workdir / "metrics.jsonl")
  assert sorted(losses) == [2, 4]

  stages.run(config, str(tmp_path / "reference"))
  reference = _losses(tmp_path / "reference" / "metrics.jsonl")
  np.testing.assert_allclose([losses[2], losses[4]], [reference[2], reference[4]],
                             rtol=2e-5)
