"""Tables over several runs: methods x seeds, mean ± sample std, in the paper's format.

`results` maps a row label (a method, or a method with overrides) to {seed: result},
a result being what `train_and_evaluate` writes to results.json. A run whose method has
stages that start from the selection of the stage before (LC-Fed's stage B) also
reports that earlier selection (`earlier_stages`): it becomes a row of its own,
`<label> (stage A)`, with the same seeds. Used by the sweep, by a run with several
seeds and by `--mode eval`.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from lcfed_jax.run import report
from lcfed_jax.util import files
from lcfed_jax.util.errors import UserError

METRICS = report.METRICS


def load_results(runs) -> Dict[str, Dict[int, Dict]]:
  """{label: {seed: results.json}} of [(label, seed, run dir)]."""
  out: Dict[str, Dict[int, Dict]] = {}
  for label, seed, wd in runs:
    path = Path(wd) / "results.json"
    if not path.exists():
      raise UserError(f"sweep: {path} is missing (the run did not finish)")
    out.setdefault(label, {})[seed] = json.loads(path.read_text())
  return out


def with_stage_rows(results: Dict[str, Dict[int, Dict]]) -> Dict[str, Dict[int, Dict]]:
  """Every row, followed by a row per earlier stage its runs report (`<label> (stage A)`)."""
  out: Dict[str, Dict[int, Dict]] = {}
  for label, per_seed in results.items():
    out[label] = per_seed
    stages = [e["stage"] for e in next(iter(per_seed.values())).get("earlier_stages", [])]
    for i, stage in enumerate(stages):
      out[f"{label} (stage {stage})"] = {
          seed: {**r, **r["earlier_stages"][i], "method": f"{r['method']} (stage {stage})"}
          for seed, r in per_seed.items()}
  return out


def aggregate(per_seed: Dict[int, Dict], sites: Sequence[str]) -> Dict[str, Dict[str, Tuple[float, float]]]:
  """{site or 'avg': {metric: (mean, sample std)}} over seeds (std 0 for one seed)."""
  def stats(values):
    v = np.asarray(values, np.float64)
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  out = {s: {m: stats([r["sites"][s][m] for r in per_seed.values()]) for m in METRICS} for s in sites}
  out["avg"] = {m: stats([r["mean"][m] for r in per_seed.values()]) for m in METRICS}
  return out


def _cell(stat: Tuple[float, float], metric: str, several: bool) -> str:
  mean, std = stat
  text = report.fmt(mean, metric)
  return f"{text} ± {report.fmt(std, metric)}" if several else text


def site_order(results: Dict[str, Dict[int, Dict]]) -> List[str]:
  """The task's site order (results.json keeps it; its 'sites' mapping is sorted)."""
  first = next(iter(next(iter(results.values())).values()))
  return list(first.get("site_names") or first["sites"])


def to_markdown(results: Dict[str, Dict[int, Dict]], protocol: str = "") -> str:
  first = next(iter(next(iter(results.values())).values()))
  sites = site_order(results)
  seeds = sorted({s for r in results.values() for s in r})
  several = len(seeds) > 1
  header = ["Method"] + [f"IoU {s}" for s in sites] + ["IoU avg"] + [f"ASSD {s}" for s in sites] + ["ASSD avg"]
  rows = []
  for label, per_seed in results.items():
    agg = aggregate(per_seed, sites)
    rows.append([label] + [_cell(agg[s]["iou"], "iou", several) for s in sites + ["avg"]] +
                [_cell(agg[s]["assd"], "assd", several) for s in sites + ["avg"]])
  what = (f"mean ± sample std (ddof=1) over seeds {seeds}" if several else f"seed {seeds[0]}")
  lines = [f"# {first.get('task', '?')}: {len(results)} methods", ""]
  if protocol:
    lines += [protocol, ""]
  lines += [f"IoU in %, ASSD in pixels, {what}; averages are plain means over sites. Selection: "
            f"{', '.join(sorted({r['selection'] for p in results.values() for r in p.values()}))}.", "",
            report.md_table(header, rows)]
  return "\n".join(lines) + "\n"


def to_csv(results: Dict[str, Dict[int, Dict]]) -> str:
  """method, seed ('mean'/'std' for the aggregates), site ('avg' for the site mean), metrics."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(("method", "seed", "site") + METRICS)
  sites = site_order(results)
  for label, per_seed in results.items():
    for seed in sorted(per_seed):
      r = per_seed[seed]
      for s in sites:
        w.writerow([label, seed, s] + [repr(float(r["sites"][s][m])) for m in METRICS])
      w.writerow([label, seed, "avg"] + [repr(float(r["mean"][m])) for m in METRICS])
    agg = aggregate(per_seed, sites)
    for i, row in enumerate(("mean", "std")):
      for s in sites + ["avg"]:
        w.writerow([label, row, s] + [repr(agg[s][m][i]) for m in METRICS])
  return buf.getvalue()


def read_csv(path) -> Dict[Tuple[str, str, str], Dict[str, float]]:
  """{(method, seed or 'mean'/'std', site or 'avg'): {metric: value}} of a sweep's results.csv."""
  with open(path) as f:
    return {(r["method"], r["seed"], r["site"]): {m: float(r[m]) for m in METRICS} for r in csv.DictReader(f)}


def write_seed_table(workdir, stem: str, results: Dict[str, Dict[int, Dict]], log) -> None:
  """`<stem>.md` and `<stem>.csv` of one run's seeds (and its earlier stages' rows)."""
  rows = with_stage_rows(results)
  files.atomic_write_text(Path(workdir) / f"{stem}.md", to_markdown(rows))
  files.atomic_write_text(Path(workdir) / f"{stem}.csv", to_csv(rows))
  log(to_markdown(rows))
