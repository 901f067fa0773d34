"""What the notebooks (`notebooks/*.ipynb`) call besides `train` and `report`.

`load_config`        a task config (`configs/<task>.py:<method>`), at full size or at the
                     tiny size CI runs (`LCFED_NOTEBOOK_TINY=1`: `:<method>,tiny`), with a data folder.
`checkpoint_config`  the config saved in a workdir's latest checkpoint (what `launch.py`
                     wrote), to pass to `eval_checkpoint.evaluate_checkpoint`.
`learning_curves`    metrics.jsonl as per-site test IoU curves.
`curves_png`, `overlays_png`  the figures a run wrote into its workdir (`lcfed_jax.plots`).
`runtime`            the JAX devices in words.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, Optional

import ml_collections

from lcfed_jax.util import files as io_utils
from lcfed_jax.run import plots
from lcfed_jax.config.defaults import set_dotted
from lcfed_jax.util.errors import UserError

TINY_ENV = "LCFED_NOTEBOOK_TINY"


def tiny_requested() -> bool:
  """True when the environment asks for the tiny size (`LCFED_NOTEBOOK_TINY=1`)."""
  return os.environ.get(TINY_ENV, "0").strip().lower() in ("1", "true", "yes")


def _set(config, key: str, value) -> None:
  try:
    set_dotted(config, key, value)
  except (AttributeError, KeyError):
    raise UserError(f"config has no key {key!r}") from None


def configs_dir() -> Path:
  """The task configs: the checkout's configs/ (or the installed `configs` package)."""
  import configs
  return Path(configs.__file__).resolve().parent


def load_config(task: str = "synthetic", method: str = "lcfed", data_dir: str = "", tiny: bool = False,
                overrides: Optional[Dict] = None) -> ml_collections.ConfigDict:
  """`configs/<task>.py`'s get_config('<method>[,tiny]'), `data_dir` set for a real task,
  then `overrides` ({'dotted.key': value})."""
  path = configs_dir() / f"{task}.py"
  if not path.exists():
    known = sorted(p.stem for p in path.parent.glob("*.py") if not p.stem.startswith("_"))
    raise UserError(f"no config for task {task!r}: expected one of {known}")
  if data_dir and task == "synthetic":
    raise UserError("a data folder was given for the synthetic task: set the task to the dataset's "
                    "(polyp, fundus, prostate or faz)")
  spec = importlib.util.spec_from_file_location(f"lcfed_configs_{task}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(method + (",tiny" if tiny else ""))
  if data_dir:
    config.data_dir = str(data_dir)
  for key, value in (overrides or {}).items():
    _set(config, key, value)
  return config


def checkpoint_config(workdir, data_dir: str = "", overrides: Optional[Dict] = None
                      ) -> ml_collections.ConfigDict:
  """The config stored in the latest checkpoint of `workdir` (model, method, data, eval
  settings), with `data_dir` replaced when given, then `overrides`."""
  from lcfed_jax.run import checkpoints
  ckpts = checkpoints.Checkpoints(workdir, read_only=True)
  try:
    config = ml_collections.ConfigDict(ckpts.read_meta()["config"])
  finally:
    ckpts.close()
  if data_dir:
    config.data_dir = str(data_dir)
  for key, value in (overrides or {}).items():
    _set(config, key, value)
  return config


def runtime() -> Dict:
  """{'platform': 'tpu'|'gpu'|'cpu', 'count', 'kind', 'text'} of `jax.devices()`."""
  import jax
  devices = jax.devices()
  platform = devices[0].platform
  kind = devices[0].device_kind
  text = f"{platform.upper()}: {len(devices)} x {kind} (jax {jax.__version__}, backend {jax.default_backend()})"
  return {"platform": platform, "count": len(devices), "kind": kind, "text": text}


def learning_curves(workdir) -> Dict:
  """{'round': [...], 'sites': {site: [test IoU ...]}, 'mean': [...]} from metrics.jsonl."""
  records = io_utils.read_jsonl(Path(workdir) / "metrics.jsonl")
  if not records:
    raise UserError(f"{workdir}: no metrics.jsonl records (train there first)")
  names = list(records[0]["sites"].keys())
  return {"round": [int(r["round"]) for r in records],
          "sites": {s: [float(r["sites"][s]["iou"]) for r in records] for s in names},
          "mean": [float(r["mean"]["iou"]) for r in records]}


def curves_png(workdir, result: Optional[Dict] = None) -> Path:
  """The per-site IoU curves of a workdir: the iou_curves.png training drew, else drawn now
  from metrics.jsonl (the selected rounds marked when `result` is given)."""
  path = Path(workdir) / "iou_curves.png"
  if path.exists():
    return path
  records = io_utils.read_jsonl(Path(workdir) / "metrics.jsonl")
  if not records:
    raise UserError(f"{workdir}: no metrics.jsonl records (train there first)")
  names = list(records[0]["sites"].keys())
  return plots.iou_curves(records, names, path, (result or {}).get("site_rounds"))


def overlays_png(workdir, result: Dict) -> Path:
  """The qualitative overlays `evaluate_checkpoint` (or training) drew for `result`: image,
  ground truth, prediction and, for LC-Fed, the HC's peak map of head disagreement."""
  stem = "results" if result.get("checkpoint", "best") == "best" else "eval_latest"
  path = Path(workdir) / f"{stem}_overlays.png"
  if not path.exists():
    raise UserError(f"{path} does not exist (config.eval.plots is off?)")
  return path
