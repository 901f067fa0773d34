"""Result tables in the paper's format: `results.md`, `results.csv`, `results.json`.

A result is the dict `train`/`evaluate_checkpoint` build:
  {'method', 'task', 'selection', 'checkpoint', 'site_rounds': {site: round},
   'sites': {site: {metric: value}}, 'mean': {...}, 'std': {...}}
(the numbers are the ones `lcfed_jax.evaluate` computes, unscaled).

The paper (Tables 1-3) reports IoU x 100 and ASSD in pixels per site and their plain
mean over sites; `results.md` shows that row first, then every metric per site.
`results.csv` holds the same numbers unscaled and unrounded (one row per site, then
'mean' and 'std'), so it can be compared with `metrics.jsonl` exactly.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Dict, List, Sequence

from lcfed_jax.util import files as io_utils

METRICS = ("iou", "dice", "assd", "hd95")
SCALE = {"iou": 100.0, "dice": 100.0, "assd": 1.0, "hd95": 1.0}
LABEL = {"iou": "IoU (%)", "dice": "Dice (%)", "assd": "ASSD (px)", "hd95": "HD95 (px)"}
HIGHER_IS_BETTER = {"iou": True, "dice": True, "assd": False, "hd95": False}
CSV_FIELDS = ("method", "selection", "site", "round") + METRICS


def fmt(value, metric: str) -> str:
  if value is None or value != value:
    return "nan"
  return f"{value * SCALE[metric]:.2f}"


def site_names(result: Dict) -> List[str]:
  return list(result["sites"].keys())


def selected_rounds_text(result: Dict) -> str:
  rounds = result["site_rounds"]
  vals = set(rounds.values())
  if len(vals) == 1:
    return f"round {vals.pop()}"
  return "per site: " + ", ".join(f"{s} {r}" for s, r in rounds.items())


def paper_row(result: Dict, names: Sequence[str]) -> List[str]:
  """IoU per site, average IoU, ASSD per site, average ASSD (formatted)."""
  return ([fmt(result["sites"][s]["iou"], "iou") for s in names] + [fmt(result["mean"]["iou"], "iou")] +
          [fmt(result["sites"][s]["assd"], "assd") for s in names] + [fmt(result["mean"]["assd"], "assd")])


def paper_header(names: Sequence[str]) -> List[str]:
  return ([f"IoU {s}" for s in names] + ["IoU avg"] + [f"ASSD {s}" for s in names] + ["ASSD avg"])


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def to_markdown(result: Dict) -> str:
  names = site_names(result)
  out = [f"# {result['method']} on {result.get('task', '?')}", "",
         f"Model: checkpoint '{result.get('checkpoint', 'best')}', selection "
         f"'{result['selection']}', {selected_rounds_text(result)}. IoU and Dice in %, "
         f"ASSD and HD95 in pixels; averages are plain means over sites.", "",
         md_table(["Method"] + paper_header(names), [[result["method"]] + paper_row(result, names)] +
                  [[f"{result['method']} (stage {e['stage']})"] + paper_row(e, names)
                   for e in result.get("earlier_stages", [])]),
         "", "## Every metric per site", ""]
  for e in result.get("earlier_stages", []):
    out[-3:-3] = ["", f"The stage after stage {e['stage']} started from its selected model "
                  f"({selected_rounds_text(e)}), shown in the row '(stage {e['stage']})' with the "
                  f"test scores it had."]
  rows = [[s, str(result["site_rounds"][s])] + [fmt(result["sites"][s][m], m) for m in METRICS]
          for s in names]
  rows.append(["mean", ""] + [fmt(result["mean"][m], m) for m in METRICS])
  rows.append(["std", ""] + [fmt(result["std"][m], m) for m in METRICS])
  out.append(md_table(["Site", "Round"] + [LABEL[m] for m in METRICS], rows))
  return "\n".join(out) + "\n"


def to_csv(result: Dict) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_FIELDS)
  head = [result["method"], result["selection"]]
  for s in site_names(result):
    w.writerow(head + [s, result["site_rounds"][s]] + [repr(float(result["sites"][s][m])) for m in METRICS])
  for row in ("mean", "std"):
    w.writerow(head + [row, ""] + [repr(float(result[row][m])) for m in METRICS])
  return buf.getvalue()


def read_csv(path) -> Dict[str, Dict[str, float]]:
  """{site or 'mean'/'std': {metric: float, 'round': str}}."""
  with open(path) as f:
    return {r["site"]: {**{m: float(r[m]) for m in METRICS}, "round": r["round"]}
            for r in csv.DictReader(f)}


def write(workdir, result: Dict, stem: str = "results") -> Dict[str, Path]:
  workdir = Path(workdir)
  paths = {"md": workdir / f"{stem}.md", "csv": workdir / f"{stem}.csv", "json": workdir / f"{stem}.json"}
  io_utils.atomic_write_text(paths["md"], to_markdown(result))
  io_utils.atomic_write_text(paths["csv"], to_csv(result))
  io_utils.atomic_write_json(paths["json"], result)
  return paths
