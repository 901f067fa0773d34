"""Small file helpers: every file the run writes appears whole or not at all."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_text(path, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path, data: bytes) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def writable(folder) -> bool:
  """Whether a file can be created in `folder` (made if missing). Tried, not read off the
  permission bits, which say nothing for root or on a read-only mount."""
  try:
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      return True
  except OSError:
    return False


def atomic_write_json(path, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=jsonable) + "\n")


def append_jsonl(path, obj) -> None:
  """One whole line per record; fsync so a crash cannot leave half a line behind."""
  line = json.dumps(obj, sort_keys=True, default=jsonable) + "\n"
  with open(path, "a") as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path) -> list:
  path = Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    if line.strip():
      out.append(json.loads(line))
  return out


def jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, tuple)):
    return list(x)
  return str(x)
