"""Which leaves are personal: regex rules over '/'-joined parameter paths.

Paths start with the collection: 'params/down1/conv1/kernel', 'batch_stats/up4/norm2/mean'.
A method lists the personal patterns; everything else is shared (averaged by the server).
Masks are pytrees of Python bools with the structure of the tree they describe.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import jax


def path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_paths(tree) -> list:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def match_mask(tree: Any, patterns: Sequence[str]) -> Any:
  """Bool pytree: True where the leaf's path matches any of `patterns` (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(c.search(path_str(p)) for c in compiled), tree)


def invert(mask: Any) -> Any:
  return jax.tree.map(lambda m: not m, mask)


def both(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: bool(x and y), a, b)


def check_patterns_match(tree: Any, patterns: Iterable[str], what: str) -> None:
  """Every rule must address at least one leaf: a typo must not silently share a head."""
  paths = leaf_paths(tree)
  for p in patterns:
    if not any(re.search(p, s) for s in paths):
      raise ValueError(f"{what} pattern {p!r} matches no parameter; paths look like {paths[:3]}")
