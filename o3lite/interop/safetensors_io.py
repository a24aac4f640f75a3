"""safetensors checkpoint files, without torch: reading (memory-mapped, bf16 included,
single file or index + shards) and writing (sharded past a size, with the index)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors.numpy

from o3lite import errors

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16)}


def check_names(have: set, want: set, what: str) -> None:
  """A CheckpointError naming what is missing from, or unexpected in, a set of names."""
  missing, unexpected = sorted(want - have), sorted(have - want)
  for problem, names in (("missing", missing), ("unexpected", unexpected)):
    if names:
      shown = ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
      raise errors.CheckpointError(f"{len(names)} {problem} {what}: {shown}")


def require_weights(directory: str, what: str = "Hugging Face checkpoint") -> None:
  """A CheckpointError unless `directory` holds safetensors weights."""
  if not any(os.path.isfile(os.path.join(directory, name))
             for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)):
    raise errors.CheckpointError(
        f"{what} {directory} has no weights: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} "
        "(only safetensors checkpoints are supported)")


def _read_file(path: str) -> dict[str, np.ndarray]:
  """Memory-mapped arrays of a .safetensors file (read lazily; bf16 via ml_dtypes,
  which `safetensors.numpy` cannot load)."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if header else None
  arrays = {}
  for name, info in header.items():
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
      raise errors.CheckpointError(
          f"tensor {name} in {path} has dtype {info['dtype']}; expected one "
          f"of {sorted(_DTYPES)}")
    start, end = info["data_offsets"]
    arrays[name] = data[start:end].view(dtype).reshape(info["shape"])
  return arrays


def read(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint in `directory`, memory-mapped: `model.safetensors`,
  or the shards its index names (checked against the index)."""
  index_file = os.path.join(directory, WEIGHTS_INDEX_FILE)
  if os.path.isfile(index_file):
    with open(index_file) as f:
      weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      tensors.update(_read_file(os.path.join(directory, shard)))
    check_names(set(tensors), set(weight_map), f"tensors in the shards of {index_file}")
    return tensors
  require_weights(directory)
  return _read_file(os.path.join(directory, WEIGHTS_FILE))


def _shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int
            ) -> Iterator[dict[str, np.ndarray]]:
  shard, size = {}, 0
  for name, x in tensors.items():
    if shard and size + x.nbytes > max_shard_bytes:
      yield shard
      shard, size = {}, 0
    shard[name] = x
    size += x.nbytes
  yield shard


def write(tensors: Mapping[str, np.ndarray], out_dir: str,
          max_shard_bytes: int) -> None:
  """`model.safetensors` in `out_dir` (fp32 as given), or shards of at most
  `max_shard_bytes` and their index; earlier weight files there are removed first."""
  for name in os.listdir(out_dir):  # Stale weights of an earlier export.
    if name == WEIGHTS_INDEX_FILE or (name.startswith("model")
                                      and name.endswith(".safetensors")):
      os.remove(os.path.join(out_dir, name))
  metadata = {"format": "pt"}  # transformers refuses files without it.
  shards = list(_shards(tensors, max_shard_bytes))
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(out_dir, WEIGHTS_FILE), metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(out_dir, file), metadata)
    weight_map.update(dict.fromkeys(shard, file))
  total = sum(x.nbytes for x in tensors.values())
  with open(os.path.join(out_dir, WEIGHTS_INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
              sort_keys=True)
    f.write("\n")
