"""Merge several workdirs (one per method) into one table like the paper's.

  python -m lcfed_jax.run.compare WORKDIR... [--out DIR]

Reads every workdir's `results.json` (written at the end of training and by
`--mode eval`), checks that they share the task's sites, and writes `compare.md` and
`compare.csv` to --out (default: the current directory): methods x (IoU per site, IoU
average, ASSD per site, ASSD average), the best value of every column in bold in the
markdown and named in the csv's last row ('best').
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from lcfed_jax.util import files as io_utils
from lcfed_jax.run import report
from lcfed_jax.util.errors import UserError


def load(workdir) -> Dict:
  path = Path(workdir) / "results.json"
  if not path.exists():
    raise UserError(f"{workdir}: no results.json (train there, or run --mode eval)")
  result = json.loads(path.read_text())
  result.setdefault("label", Path(workdir).name)
  return result


def columns(names: Sequence[str]):
  """(header, metric, site or None for the average) per column."""
  cols = [(f"IoU {s}", "iou", s) for s in names] + [("IoU avg", "iou", None)]
  cols += [(f"ASSD {s}", "assd", s) for s in names] + [("ASSD avg", "assd", None)]
  return cols


def value(result: Dict, metric: str, site) -> float:
  return float(result["mean"][metric] if site is None else result["sites"][site][metric])


def best_rows(results: Sequence[Dict], cols) -> List[List[int]]:
  """Per column, the indices of the best results (ties all marked; NaN never best)."""
  out = []
  for _, metric, site in cols:
    vals = [value(r, metric, site) for r in results]
    finite = [v for v in vals if v == v]
    if not finite:
      out.append([])
      continue
    best = max(finite) if report.HIGHER_IS_BETTER[metric] else min(finite)
    out.append([i for i, v in enumerate(vals) if v == best])
  return out


def row_label(result: Dict, labels_unique: bool) -> str:
  return result["method"] if labels_unique else f"{result['method']} ({result['label']})"


def merge(results: Sequence[Dict]):
  if not results:
    raise UserError("compare: give at least one workdir")
  names = report.site_names(results[0])
  for r in results[1:]:
    if report.site_names(r) != names:
      raise UserError(f"compare: {r['label']} has sites {report.site_names(r)}, "
                      f"{results[0]['label']} has {names}")
  cols = columns(names)
  best = best_rows(results, cols)
  unique = len({r["method"] for r in results}) == len(results)
  return names, cols, best, [row_label(r, unique) for r in results]


def to_markdown(results: Sequence[Dict]) -> str:
  names, cols, best, labels = merge(results)
  rows = []
  for i, r in enumerate(results):
    cells = []
    for j, (_, metric, site) in enumerate(cols):
      text = report.fmt(value(r, metric, site), metric)
      cells.append(f"**{text}**" if i in best[j] else text)
    rows.append([labels[i]] + cells)
  task = results[0].get("task", "?")
  sel = sorted({r["selection"] for r in results})
  return (f"# {task}: {len(results)} methods\n\nIoU in %, ASSD in pixels; best per column in bold. "
          f"Selection: {', '.join(sel)}.\n\n" + report.md_table(["Method"] + [c[0] for c in cols], rows) + "\n")


def to_csv(results: Sequence[Dict]) -> str:
  names, cols, best, labels = merge(results)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["method", "selection"] + [c[0] for c in cols])
  for i, r in enumerate(results):
    w.writerow([labels[i], r["selection"]] + [repr(value(r, m, s)) for _, m, s in cols])
  w.writerow(["best", ""] + [";".join(labels[i] for i in b) for b in best])
  return buf.getvalue()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m lcfed_jax.run.compare", description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--out", default=".")
  args = p.parse_args(argv)
  try:
    results = [load(w) for w in args.workdirs]
    md = to_markdown(results)
    io_utils.atomic_write_text(Path(args.out) / "compare.md", md)
    io_utils.atomic_write_text(Path(args.out) / "compare.csv", to_csv(results))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
