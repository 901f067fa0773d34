"""Helpers for datasets whose sites are folders named Site<k> / Domain<k> / site<k>."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

_SITE_RE = re.compile(r"^(site|domain)[_-]?(\d+)$", re.IGNORECASE)


def numbered_site_dirs(root: Path) -> List[Tuple[str, Path]]:
  """(folder name, path) of every `Site<k>`/`Domain<k>` child of root, sorted by k."""
  if not root.is_dir():
    return []
  found = []
  for c in root.iterdir():
    m = _SITE_RE.match(c.name)
    if c.is_dir() and m:
      found.append((int(m.group(2)), c.name, c))
  return [(name, path) for _, name, path in sorted(found)]
