"""`--mode sweep`: every method for every seed, then one table in the paper's format.

  python launch.py --config configs/<task>.py --mode sweep --workdir DIR \
      --methods local,fedavg,ft,fedbn,fedrep,prrfl,lcfed --seeds 0,1,2 [--config.key=value ...]

Every (method, seed) trains in its own workdir `DIR/<label>/seed<seed>/` through
`train_and_evaluate`, so a run that finished (its results.json is there) is skipped and
an interrupted one resumes from its checkpoint. A method may carry its own overrides,
`lcfed:lcfed.hc=False`, as a separate row (label `lcfed[lcfed.hc=False]`, workdir
`lcfed_lcfed.hc=False/`). Everything is checked before anything compiles: the method
names, the seed list, every run's config and the workdir. One progress line per run
gives the ETA of the whole sweep.

Then DIR holds `results.md` (per method: IoU and ASSD per site and their averages, as
mean ± sample std over seeds when there are several), `results.csv` (every number,
per seed, plus the mean and std rows), `iou_curves.png` (mean test IoU per round of every
method, with its range over seeds) and `overlays_best_worst.png` (the test overlays of
the best and the worst method by mean IoU).
"""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
from absl import logging

from lcfed_jax.config.defaults import set_dotted
from lcfed_jax.config.validate import validate
from lcfed_jax.fed.methods import METHODS
from lcfed_jax.run import plots, progress, tables, workdir as workdir_lib
from lcfed_jax.run.train import train_and_evaluate
from lcfed_jax.util import files
from lcfed_jax.util.errors import ConfigError


def _value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def parse_methods(text: str, default: str) -> List[Tuple[str, str, Dict]]:
  """'a,b:key=v:key2=w' -> [(label, method, {key: value})]."""
  out = []
  for item in filter(None, (s.strip() for s in (text or default).split(","))):
    name, *pairs = item.split(":")
    if name not in METHODS:
      raise ConfigError(f"--methods: unknown method {name!r}; expected some of {sorted(METHODS)}")
    overrides = {}
    for pair in pairs:
      key, sep, value = pair.partition("=")
      if not sep:
        raise ConfigError(f"--methods: {item!r}: expected method:key=value")
      overrides[key] = _value(value)
    label = name + (f"[{','.join(f'{k}={v}' for k, v in overrides.items())}]" if overrides else "")
    out.append((label, name, overrides))
  labels = [o[0] for o in out]
  if len(set(labels)) != len(labels) or not out:
    raise ConfigError(f"--methods {text!r}: expected distinct methods, at least one")
  return out


def parse_seeds(text: str, default: int) -> List[int]:
  try:
    seeds = [int(s) for s in (text or str(default)).split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ConfigError(f"--seeds {text!r}: expected distinct integers >= 0")
  return seeds


def run_dir(workdir: Path, label: str, seed: int) -> Path:
  """`lcfed[lcfed.hc=False]` runs in `lcfed_lcfed.hc=False/`: no glob characters in a
  checkpoint's path (see `workdir.check_writable`)."""
  return Path(workdir) / re.sub(r"[^A-Za-z0-9_.=,-]+", "_", label).strip("_") / f"seed{seed}"


def plan(config, workdir, methods_text: str, seeds_text: str):
  """[(label, seeds, config, run workdir)], every config validated. With several seeds
  and `config.sweep.seeds == 'together'` a method's seeds are one run (the replica axis
  `config.seeds`), whose seed<s>/ folders hold what separate runs would."""
  runs = []
  seeds = parse_seeds(seeds_text, config.seed)
  together = config.sweep.seeds == "together" and len(seeds) > 1
  for label, method, overrides in parse_methods(methods_text, config.method):
    groups = [tuple(seeds)] if together else [(seed,) for seed in seeds]
    for group in groups:
      c = copy.deepcopy(config)
      c.method, c.seed, c.seeds = method, group[0], group if together else ()
      for key, value in overrides.items():
        try:
          set_dotted(c, key, value)
        except (AttributeError, KeyError):
          raise ConfigError(f"--methods {label}: no setting config.{key}") from None
      validate(c)
      wd = Path(workdir) / run_dir(workdir, label, 0).parent.name
      runs.append((label, group, c, wd if together else run_dir(workdir, label, group[0])))
  return runs


def seed_dirs(run) -> List[Tuple[int, Path]]:
  """(seed, the folder of that seed's results) of a planned run."""
  _, seeds, c, wd = run
  return [(s, wd / f"seed{s}") for s in seeds] if tuple(c.seeds) else [(seeds[0], wd)]


def protocol_line(config, runs, note: str = "") -> str:
  """Size, rounds, local steps, seeds, device and wall time of a sweep (from its runs)."""
  timings = [json.loads((Path(wd) / "timing.json").read_text()) for _, _, _, wd in runs
             if (Path(wd) / "timing.json").exists()]
  wall = sum(t["wall_s"] for t in timings)
  devices = sorted({t["device"] for t in timings})
  seeds = sorted({seed for _, group, _, _ in runs for seed in group})
  c = config
  text = (f"Protocol: {c.image_size} px, U-Net base {c.model.base}, {c.rounds} rounds of {c.local_steps} local "
          f"steps (batch {c.batch_size}, {c.optimizer.name} {c.learning_rate:g}), LC-Fed +{c.lcfed.hc_rounds} HC "
          f"rounds, FT +{c.ft.rounds} rounds, evaluation every {c.eval_every} rounds, selection "
          f"'{c.eval.selection}', seeds {seeds}; {', '.join(devices) or '?'}; wall time "
          f"{progress.fmt_eta(wall)} for {len(timings)} runs"
          f"{' (seeds in one program)' if any(tuple(r[2].seeds) for r in runs) else ''}.")
  return f"**{note}** {text}" if note else text


def run_sweep(config, workdir, methods_text: str = "", seeds_text: str = "", note: str = "",
              log: Callable[[str], None] = logging.info) -> Dict:
  workdir = Path(workdir)
  runs = plan(config, workdir, methods_text, seeds_text)
  workdir_lib.check_writable(workdir)
  todo = [r for r in runs if not all((d / "results.json").exists() for _, d in seed_dirs(r))]
  log(f"sweep: {len(runs)} runs ({len(runs) - len(todo)} finished already) in {workdir}")
  times: List[float] = []
  for i, (label, seeds, c, wd) in enumerate(todo):
    t0 = time.time()
    tag = f"{label} seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    out = train_and_evaluate(c, str(wd), log=lambda line, p=f"[{tag}] ": log(p + line))
    times.append(time.time() - t0)
    eta = progress.fmt_eta(np.mean(times) * (len(todo) - i - 1))
    means = [r["mean"]["iou"] for r in (out["result"] if isinstance(out["result"], list) else [out["result"]])]
    log(f"sweep: {len(runs) - len(todo) + i + 1}/{len(runs)} runs done ({tag}: mean IoU "
        f"{np.mean(means):.4f} in {times[-1]:.0f}s), ETA {eta}")
  done = [(label, seed, d) for r in runs for seed, d in seed_dirs(r) for label in [r[0]]]
  return write_summary(workdir, done, log, protocol_line(config, runs, note))


# ------------------------------------------------------------------ the summary

def write_summary(workdir, runs, log: Callable[[str], None] = logging.info, protocol: str = "") -> Dict:
  results = tables.load_results(runs)
  rows = tables.with_stage_rows(results)
  md = tables.to_markdown(rows, protocol)
  files.atomic_write_text(Path(workdir) / "results.md", md)
  files.atomic_write_text(Path(workdir) / "results.csv", tables.to_csv(rows))
  curves = {label: [files.read_jsonl(Path(wd) / "metrics.jsonl") for lb, _, wd in runs if lb == label]
            for label in results}
  plots.method_curves(curves, Path(workdir) / "iou_curves.png")
  means = {label: np.mean([r["mean"]["iou"] for r in per_seed.values()]) for label, per_seed in results.items()}
  best, worst = max(means, key=means.get), min(means, key=means.get)
  first_seed = lambda label: next(wd for lb, _, wd in runs if lb == label)
  pngs = [(f"best: {best}", Path(first_seed(best)) / "results_overlays.png"),
          (f"worst: {worst}", Path(first_seed(worst)) / "results_overlays.png")]
  if all(p.exists() for _, p in pngs):
    plots.side_by_side(pngs, Path(workdir) / "overlays_best_worst.png")
  log(md)
  return results
