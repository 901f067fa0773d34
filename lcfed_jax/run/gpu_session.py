"""What runs inside one device command (results/gpu_run.sh) and what collects its archive
(results/gpu_collect.sh): a task's methods x seeds at the GPU protocol, spread over
device sessions that keep nothing and return only a few files.

  python -m lcfed_jax.run.gpu_session run TASK --pack DIR --out DIR --results DIR --runs DIR
      --methods a,b:key=v --seeds 0,1,2 --deadline_s 530 --start EPOCH [--config_arg tiny]
      [--seeds_per_program 0] -- <launch.py --config.* flags>
  python -m lcfed_jax.run.gpu_collect ARCHIVE [--results_root results] [--cache_dir .xla_cache]

`run` skips every (method, seed) whose results.json is already collected under --results,
then runs the rest a method at a time (`launch.py --mode sweep`, a method's seeds in one
program), in order. A method starts only if its estimated time fits before the deadline
(estimates: earlier runs' timing.json and interrupted attempts, collected or from this
command; none known: it starts); it is stopped at the deadline otherwise, and its
checkpoints stay in --runs, where a second command on the same warm machine resumes it.
Where a method's seeds together would not fit a whole command but one seed would, its
seeds run one program each (`--seeds_per_program 1` forces that). After every finished
method the archive `$OUT/gpu_<task>.tar.gz` is rewritten whole: every finished seed's
config.json, timing.json, metrics.jsonl, results.json (and the lowest seed's
results_overlays.png) under runs/<method>/seed<s>/, labels.json (each folder's row
label), the session log and the methods' logs. The persistent XLA cache comes back as
`$OUT/xla_cache.tar.gz` when it fits. `lcfed_jax/run/gpu_collect.py` unpacks both.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]    # the repository: launch.py, configs/
ARCHIVE = "gpu_{task}.tar.gz"
CACHE_ARCHIVE = "xla_cache.tar.gz"
RESULT_FILES = ("config.json", "timing.json", "metrics.jsonl", "results.json")
MAX_RETURN_BYTES = 15 * 2**20     # a file the device returns: 16 MiB at most
RESERVE_S = 20.0                  # for the archives after the last method
STARTUP_S = 20.0                  # a method's process: imports, data, before compiling
MARGIN = 1.15                     # estimates are stretched by this much


class Session:
  def __init__(self, args, launch_flags: List[str]):
    self.args, self.flags = args, launch_flags
    self.t0 = float(args.start or time.time())
    self.out, self.results, self.runs = Path(args.out), Path(args.results), Path(args.runs)
    self.out.mkdir(parents=True, exist_ok=True)
    self.log_path = self.out / "gpu_run.jsonl"
    self.finished: List[Dict] = []     # {'label', 'dir', 'seeds', 'sweep'} of this command
    self.events: List[Dict] = []

  def elapsed(self) -> float:
    return time.time() - self.t0

  def left(self) -> float:
    return float(self.args.deadline_s) - self.elapsed() - RESERVE_S

  def log(self, event: str, **fields) -> None:
    rec = {"event": event, "task": self.args.task, "t": round(self.elapsed(), 1), **fields}
    self.events.append(rec)
    with open(self.log_path, "a") as f:
      f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
    print(f"[gpu_run {rec['t']:6.1f}s] {event} " + json.dumps(fields, default=str), flush=True)


# ------------------------------------------------------------------ planning

def load_config(task: str, config_arg: str, flags: List[str]):
  """The config launch.py builds from the same file, argument and --config.key=value flags
  (each value read as a Python literal where it is one, as ml_collections does)."""
  import ast
  import importlib.util
  from lcfed_jax.config.defaults import set_dotted
  spec = importlib.util.spec_from_file_location(f"_config_{task}", ROOT / "configs" / f"{task}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(config_arg)
  for flag in flags:
    if not flag.startswith("--config."):
      continue
    key, _, text = flag[len("--config."):].partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    set_dotted(config, key, value)
  return config


def collected_seeds(results: Path, run_dir: str) -> set:
  return {int(p.parent.name[4:]) for p in (results / "runs" / run_dir).glob("seed*/results.json")}


def speed_samples(results: Path, events: List[Dict]) -> List[Dict]:
  """{'dir', 'nseeds', 'per_round', 'compile'} of every finished or interrupted program
  known: collected timing.json files (one per program), earlier sessions' logged
  attempts, and this command's events."""
  out, seen = [], set()
  for timing in sorted(results.glob("runs/*/seed*/timing.json")):
    cfg = json.loads((timing.parent / "config.json").read_text())
    t = json.loads(timing.read_text())
    key = (timing.parent.parent.name, tuple(cfg.get("seeds") or ()), t["wall_s"])
    if key in seen or not t.get("rounds_run"):
      continue
    seen.add(key)
    out.append({"dir": timing.parent.parent.name,
                "nseeds": max(1, len(cfg.get("seeds") or ())),
                "per_round": (t["wall_s"] - t["compile_wall_s"]) / t["rounds_run"], "compile": t["compile_wall_s"]})
  old = [json.loads(l) for l in (results / "sessions.jsonl").read_text().splitlines()] \
      if (results / "sessions.jsonl").exists() else []
  for e in old + events:
    if e["event"] == "interrupted" and e.get("rounds_done"):
      out.append({"dir": e["dir"], "nseeds": len(e["seeds"]),     # its compilation counted in
                  "per_round": e["elapsed_s"] / e["rounds_done"], "compile": 0.0})
    if e["event"] == "finished" and e.get("rounds"):
      out.append({"dir": e["dir"], "nseeds": len(e["seeds"]),
                  "per_round": (e["wall_s"] - e["compile_s"]) / e["rounds"], "compile": e["compile_s"]})
  return out


def estimate(run_dir: str, rounds: int, nseeds: int, samples: List[Dict]) -> Optional[float]:
  """Seconds a program of `nseeds` seeds of this method needs, or None if nothing is known.
  Its own samples first, else the slowest method's; seconds per round scale with the seeds."""
  own = [s for s in samples if s["dir"] == run_dir] or samples
  if not own:
    return None
  per_round = max(s["per_round"] * nseeds / s["nseeds"] for s in own)
  compile_s = max([s["compile"] for s in samples] + [0.0])
  return STARTUP_S + MARGIN * (compile_s + rounds * per_round)


def plan(session: Session) -> List[Dict]:
  """The programs still to run, in method order: {'label', 'item', 'dir', 'seeds', 'rounds',
  'done'} ('done': rounds checkpointed on this machine by an interrupted command)."""
  from lcfed_jax.fed.methods import get_method
  from lcfed_jax.run import sweep
  a = session.args
  config = load_config(a.task, a.config_arg, session.flags)
  config.data.pack = a.pack
  seeds = sweep.parse_seeds(a.seeds, 0)
  units = []
  for item in filter(None, (s.strip() for s in a.methods.split(","))):
    (label, _, c, wd), = [r for r in sweep.plan(config, session.runs, item, str(seeds[0]))]
    run_dir = wd.parent.name
    rounds = sum(s.rounds for s in get_method(c).stages)
    done = collected_seeds(session.results, run_dir)
    todo = [s for s in seeds if s not in done]
    if not todo:
      session.log("skip", label=label, dir=run_dir, seeds=sorted(done), reason="collected already")
      continue
    groups = [todo]
    resumable = checkpointed_round(session.runs, run_dir, todo) > 0   # an earlier command's, this machine
    if a.seeds_per_program == 1 or (len(todo) > 1 and not resumable and _split(session, run_dir, rounds, len(todo))):
      groups = [[s] for s in todo]
    units += [{"label": label, "item": item, "dir": run_dir, "seeds": g, "rounds": rounds,
               "done": checkpointed_round(session.runs, run_dir, g)} for g in groups]
  return units


def sweep_dir(runs: Path, seeds) -> Path:
  return runs / ("seeds_" + "-".join(map(str, seeds)))


def checkpointed_round(runs: Path, run_dir: str, seeds) -> int:
  """The latest checkpointed round of a program of `seeds` left on this machine by an
  interrupted command (0: none); the sweep resumes from it."""
  wd = sweep_dir(runs, seeds) / run_dir
  wd = wd if len(seeds) > 1 else wd / f"seed{seeds[0]}"
  steps = [int(p.name) for p in (wd / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps, default=0)


def _split(session, run_dir, rounds, nseeds) -> bool:
  """Whether a method's seeds should run one program each: together they would not fit a
  whole command, one seed would."""
  samples = speed_samples(session.results, session.events)
  budget = float(session.args.deadline_s) - RESERVE_S
  together, one = estimate(run_dir, rounds, nseeds, samples), estimate(run_dir, rounds, 1, samples)
  return together is not None and together > budget and one <= budget


# ------------------------------------------------------------------ running

def rounds_done(where: Path, run_dir: str) -> int:
  """The last evaluated round of an interrupted program (its metrics.jsonl files)."""
  last = 0
  for path in (where / run_dir).glob("**/metrics.jsonl"):
    for line in path.read_text().splitlines():
      if line.strip():
        last = max(last, int(json.loads(line)["round"]))
  return last


def seed_folder(where: Path, run_dir: str, seed: int) -> Path:
  return where / run_dir / f"seed{seed}"


def run_unit(session: Session, unit: Dict, timeout: float) -> str:
  """Runs one program of a method's seeds: 'finished', 'failed' or 'interrupted'."""
  a = session.args
  sweep = sweep_dir(session.runs, unit["seeds"])
  cmd = [sys.executable, str(ROOT / "launch.py"),
         f"--config={ROOT / 'configs' / f'{a.task}.py'}" + (f":{a.config_arg}" if a.config_arg else ""),
         "--mode=sweep", f"--workdir={sweep}", f"--methods={unit['item']}",
         f"--seeds={','.join(map(str, unit['seeds']))}", *session.flags, f"--config.data.pack={a.pack}"]
  log_file = session.runs / "logs" / f"{unit['dir']}.seeds_{'-'.join(map(str, unit['seeds']))}.log"
  log_file.parent.mkdir(parents=True, exist_ok=True)
  t = time.time()
  session.log("start", **{k: unit[k] for k in ("label", "dir", "seeds", "rounds", "done")}, timeout_s=round(timeout))
  with open(log_file, "a") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
      rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      session.log("interrupted", label=unit["label"], dir=unit["dir"], seeds=unit["seeds"],
                  elapsed_s=round(time.time() - t, 1), rounds_done=rounds_done(sweep, unit["dir"]) - unit["done"],
                  rounds=unit["rounds"], checkpointed=checkpointed_round(session.runs, unit["dir"], unit["seeds"]),
                  note=f"stopped at the deadline; its checkpoints stay in {sweep} for a second command on this machine")
      return "interrupted"
  wall = time.time() - t
  if rc != 0 or not all((seed_folder(sweep, unit["dir"], s) / "results.json").exists() for s in unit["seeds"]):
    tail = log_file.read_text()[-1500:]
    session.log("failed", label=unit["label"], dir=unit["dir"], seeds=unit["seeds"], rc=rc, tail=tail)
    return "failed"
  timing = _timing(sweep, unit)
  session.log("finished", label=unit["label"], dir=unit["dir"], seeds=unit["seeds"], wall_s=round(wall, 1),
              compile_s=timing.get("compile_wall_s", 0.0), rounds=unit["rounds"] - unit["done"], device=timing.get("device"),
              mean_iou={s: json.loads((seed_folder(sweep, unit["dir"], s) / "results.json").read_text())["mean"]["iou"]
                        for s in unit["seeds"]})
  session.finished.append(dict(unit, sweep=sweep))
  return "finished"


def _beside(seed_dir: Path, name: str) -> Path:
  """A seed's own file, or its program's (seeds in one program share config and timing)."""
  return seed_dir / name if (seed_dir / name).exists() else seed_dir.parent / name


def _timing(where: Path, unit: Dict) -> Dict:
  return json.loads(_beside(seed_folder(where, unit["dir"], unit["seeds"][0]), "timing.json").read_text())


def write_archive(session: Session) -> Path:
  """Every finished seed's small files, the session log and the methods' logs: one tar.gz,
  replaced whole (a kill leaves the previous one)."""
  path = session.out / ARCHIVE.format(task=session.args.task)
  tmp = path.with_suffix(".tmp")
  with tarfile.open(tmp, "w:gz") as tar:
    for unit in session.finished:
      for s in unit["seeds"]:
        seed_dir = seed_folder(unit["sweep"], unit["dir"], s)
        for name in RESULT_FILES:
          src = _beside(seed_dir, name)
          _add(tar, f"runs/{unit['dir']}/seed{s}/{name}", src.read_bytes())
        overlays = seed_dir / "results_overlays.png"
        if s == min(unit["seeds"]) and overlays.exists():
          _add(tar, f"runs/{unit['dir']}/seed{s}/results_overlays.png", overlays.read_bytes())
    labels = {u["dir"]: u["label"] for u in session.finished}
    _add(tar, "labels.json", (json.dumps(labels, indent=1, sort_keys=True) + "\n").encode())
    for log in sorted((session.runs / "logs").glob("*.log")):
      _add(tar, f"logs/{log.name}", log.read_bytes()[-200_000:])
    _add(tar, "session.jsonl", session.log_path.read_bytes())
  os.replace(tmp, path)
  return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(data), int(time.time())
  tar.addfile(info, io.BytesIO(data))


def archive_cache(session: Session) -> None:
  cache = Path(os.environ.get("LCFED_JAX_CACHE", ""))
  if not str(cache) or not cache.is_dir():
    return
  raw = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
  if raw > 4 * MAX_RETURN_BYTES:    # compiled programs compress about 3x: not worth trying
    session.log("cache", returned=False, mib_uncompressed=round(raw / 2**20, 1), reason="too large")
    return
  path = session.out / CACHE_ARCHIVE
  with tarfile.open(path, "w:gz") as tar:
    tar.add(cache, arcname=".")
  size = path.stat().st_size
  if size > MAX_RETURN_BYTES:
    path.unlink()
    session.log("cache", returned=False, mib=round(size / 2**20, 1), reason="over 15 MiB")
  else:
    session.log("cache", returned=True, mib=round(size / 2**20, 1))


def device_check(session: Session) -> bool:
  probe = subprocess.run([sys.executable, "-c", "import jax, json; d = jax.devices(); print(json.dumps("
                          "{'backend': jax.default_backend(), 'devices': [x.device_kind for x in d], "
                          "'jax': jax.__version__}))"], capture_output=True, text=True, timeout=120)
  info = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {"error": probe.stderr[-800:]}
  ok = probe.returncode == 0 and (info["backend"] == "gpu" or not session.args.require_gpu)
  session.log("device", ok=ok, **info)
  return ok


def run(args, launch_flags: List[str]) -> int:
  session = Session(args, launch_flags)
  session.log("begin", methods=args.methods, seeds=args.seeds, pack=args.pack, deadline_s=args.deadline_s,
              flags=launch_flags)
  from lcfed_jax.data.packfile import read_manifest
  from lcfed_jax.util.errors import UserError
  try:
    manifest = read_manifest(args.pack)
    units = plan(session)
  except UserError as e:
    session.log("error", message=str(e))
    print(f"error: {e}", file=sys.stderr)
    return 2
  session.log("plan", pack_bytes=manifest.get("total_bytes"), image_codec=manifest["image_codec"],
              units=[{k: u[k] for k in ("label", "seeds", "rounds", "done")} for u in units])
  if units and not device_check(session):
    print("error: no GPU visible to JAX (SMOKE=1 runs on a CPU)", file=sys.stderr)
    return 3
  remaining = list(units)
  while remaining:
    unit = remaining[0]
    est = estimate(unit["dir"], unit["rounds"] - unit["done"], len(unit["seeds"]),
                   speed_samples(session.results, session.events))
    if est is not None and est > session.left():
      session.log("stop", reason="the next method would not finish before the deadline", label=unit["label"],
                  seeds=unit["seeds"], estimate_s=round(est), left_s=round(session.left()))
      break
    if session.left() <= 0:
      session.log("stop", reason="deadline", label=unit["label"], left_s=round(session.left()))
      break
    outcome = run_unit(session, unit, session.left())
    if outcome != "interrupted":   # a failed method is logged with its error; the next one runs
      remaining.pop(0)
    write_archive(session)
    if outcome == "interrupted":
      break
  archive = write_archive(session)
  archive_cache(session)
  session.log("end", finished=[[u["label"], u["seeds"]] for u in session.finished],
              remaining=[[u["label"], u["seeds"]] for u in remaining], archive=str(archive),
              archive_bytes=archive.stat().st_size)
  write_archive(session)   # once more, so the archive's log holds its own end
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  launch_flags = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(prog="python -m lcfed_jax.run.gpu_session", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=["run"])
  p.add_argument("task")
  p.add_argument("--pack", required=True)
  p.add_argument("--out", required=True, help="what comes back from the device ($OUT)")
  p.add_argument("--results", required=True, help="results/<task>/gpu: what is collected already")
  p.add_argument("--runs", required=True, help="the workdirs, on the machine (checkpoints stay there)")
  p.add_argument("--methods", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--deadline_s", type=float, default=530.0)
  p.add_argument("--start", type=float, default=0.0, help="epoch seconds the deadline counts from")
  p.add_argument("--config_arg", default="")
  p.add_argument("--seeds_per_program", type=int, default=0, choices=(0, 1),
                 help="0: a method's seeds in one program unless that cannot fit a command; 1: one each")
  p.add_argument("--require_gpu", type=int, default=1)
  return run(p.parse_args(argv), launch_flags)


if __name__ == "__main__":
  sys.exit(main())
