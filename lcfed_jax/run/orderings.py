"""The paper's claims held against a table with seeds: which orderings hold.

  python -m lcfed_jax.run.orderings results/faz/results.csv [--metric iou] [--out FILE]
  python -m lcfed_jax.run.orderings results/faz/ablation/results.csv --against lcfed

The paper ranks the methods by mean IoU over sites (its polyp table: LC-Fed, FedRep, FT,
FedAvg, FedBN, Local, PRR-FL; prostate and fundus put LC-Fed first too) and reports
that HC improves on LC-Fed without it. Every such claim "a above b" is read off a sweep's
results.csv (mean and sample std over seeds of the site-average): it *holds* when a's
mean is above b's by at least twice the larger of their two stds, is *reversed* when b's
is above by that much, and is *not separable* otherwise. For ASSD lower is better.
An ablation reads the same way against its default row (`--against`): "default > variant"
for every other row, so *reversed* marks a variant that beats the default.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Sequence, Tuple

from lcfed_jax.run import report, tables
from lcfed_jax.util import files
from lcfed_jax.util.errors import UserError

PAPER_RANKING = ("lcfed", "fedrep", "ft", "fedavg", "fedbn", "local", "prrfl")
EXTRA_CLAIMS = (("lcfed", "lcfed (stage A)"),)   # HC adds to stage A


def claims(present: Sequence[str], against: str = "") -> List[Tuple[str, str]]:
  """Every pair (a, b) with a ranked above b by the paper, among the rows present, or with
  `against` (an ablation's default row) every pair (against, other row)."""
  if against:
    if against not in present:
      raise UserError(f"--against {against}: no such row (rows: {', '.join(present)})")
    return [(against, m) for m in present if m != against]
  ranked = [m for m in PAPER_RANKING if m in present]
  out = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
  return out + [c for c in EXTRA_CLAIMS if c[0] in present and c[1] in present]


def verdict(a: Tuple[float, float], b: Tuple[float, float], higher_is_better: bool = True) -> Tuple[str, float]:
  """('holds' | 'reversed' | 'not separable', a - b) for (mean, std) pairs."""
  diff = a[0] - b[0]
  margin = 2.0 * max(a[1], b[1])
  better = diff if higher_is_better else -diff
  if better > margin:
    return "holds", diff
  if better < -margin:
    return "reversed", diff
  return "not separable", diff


def evaluate(table: Dict, metric: str = "iou", against: str = "") -> List[Dict]:
  rows = sorted({method for method, _, _ in table})
  stat = lambda m: (table[(m, "mean", "avg")][metric], table[(m, "std", "avg")][metric])
  out = []
  for a, b in claims(rows, against):
    v, diff = verdict(stat(a), stat(b), report.HIGHER_IS_BETTER[metric])
    out.append({"claim": f"{a} > {b}", "a": stat(a), "b": stat(b), "diff": diff, "verdict": v})
  return out


def to_markdown(results: List[Dict], metric: str, against: str = "") -> str:
  scale = report.SCALE[metric]
  fmt = lambda s: f"{s[0] * scale:.2f} ± {s[1] * scale:.2f}"
  rows = [[r["claim"], fmt(r["a"]), fmt(r["b"]), f"{r['diff'] * scale:+.2f}", r["verdict"]] for r in results]
  claim = "default > variant" if against else "paper's claim"
  head = [f"{claim} ({metric})", "a", "b", "a - b", "verdict (margin: 2 x the larger std)"]
  return report.md_table(head, rows) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("csv")
  p.add_argument("--metric", default="iou", choices=list(report.METRICS))
  p.add_argument("--out", default="")
  p.add_argument("--against", default="", help="an ablation's default row: compare every other row with it")
  args = p.parse_args(argv)
  try:
    text = to_markdown(evaluate(tables.read_csv(args.csv), args.metric, args.against), args.metric, args.against)
  except (OSError, KeyError) as e:
    raise UserError(f"{args.csv}: not a sweep's results.csv with mean and std rows ({e})") from None
  if args.out:
    files.atomic_write_text(args.out, text)
  sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
