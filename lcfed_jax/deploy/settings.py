"""What a Flower run trains and where each side keeps its files.

The experiment is a config file of `configs/`, exactly as `launch.py --config` reads it,
with launch.py's `--config.key=value` overrides. The run config (pyproject.toml's
`[tool.flwr.app.config]`, `flwr run --run-config`) names it for the server and every
client:

  config         'configs/<task>.py[:<arg>]' (e.g. 'configs/synthetic.py:fedavg,tiny')
  overrides      'key=value key=value ...' (e.g. 'rounds=5 eval.selection=test')
  workdir        the server's folder: config.json, metrics.jsonl, results.{md,csv,json}
  state-dir      where a client keeps its state when its node config names no state-dir:
                 <state-dir>/<site name> ('': <workdir>/clients)
  min-clients    a round goes on when at least this many sites reply (0: every site)
  round-timeout  seconds the server waits for a round's replies
  node-timeout   seconds the server waits for every site to connect

A node config (`flower-supernode --node-config "..."`) says which site a client is:
`site` (name or index), `task` (must be the config's), `data-dir`, `state-dir`, and
`overrides` for settings that may differ per site (`SITE_LOCAL`: where the data lives, the
evaluation batch size, the convolution implementation). In Flower's simulation a node's
site is its `partition-id`. Every other setting must equal the server's: a client whose
config differs is refused, with the keys that differ (`differences`).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import shlex
from pathlib import Path
from typing import List, Mapping

from lcfed_jax.config.defaults import set_dotted
from lcfed_jax.config.validate import flatten, validate
from lcfed_jax.util.errors import ConfigError

# Settings a site may set for itself: where its data lives and how its hardware runs.
SITE_LOCAL = ("data_dir", "data.root", "data.tfds_dir", "eval.batch_size", "eval.plots",
              "eval.overlay_examples", "model.conv_impl", "model.scan_unroll", "log.", "mesh.",
              "checkpoint.", "resume")

RUN_DEFAULTS = {"config": "configs/synthetic.py", "overrides": "", "workdir": "workdirs/flower",
                "state-dir": "", "min-clients": 0, "round-timeout": 3600.0, "node-timeout": 600.0}


def _config_file(path: str) -> Path:
  """A config file: a path, or `configs/<task>.py` of the installed package."""
  p = Path(path)
  if p.is_file():
    return p
  try:
    import configs
    installed = Path(configs.__file__).parent / p.name
  except ImportError:
    installed = None
  if installed is not None and p.parts[:1] == ("configs",) and installed.is_file():
    return installed
  raise ConfigError(f"run config 'config'={path!r}: no such file (expected configs/<task>.py[:<arg>])")


def _convert(key: str, old, text: str):
  """`text` as a value of the type of `old`, as launch.py's --config.key=value converts."""
  try:
    if isinstance(old, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if isinstance(old, (int, float)):
      return type(old)(text)
    if isinstance(old, (tuple, list)):
      value = ast.literal_eval(text)
      return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return text
  except (ValueError, SyntaxError):
    raise ConfigError(f"override {key}={text!r}: expected a value like {old!r}") from None


def apply_overrides(config, overrides: str, what: str = "overrides") -> None:
  """'key=value key=value ...' onto `config`; an unknown key is one clear error."""
  flat = flatten(config)
  for item in shlex.split(overrides or ""):
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"{what}: {item!r} is not key=value")
    key = key.removeprefix("--").removeprefix("config.")
    if key not in flat:
      raise ConfigError(f"{what}: config.{key}: no such setting")
    set_dotted(config, key, _convert(key, flat[key], text))


def load_config(spec: str, overrides: str = ""):
  """The config of 'configs/<task>.py[:<arg>]' with `overrides`, as launch.py builds it."""
  path, _, arg = spec.partition(":")
  file = _config_file(path)
  module_spec = importlib.util.spec_from_file_location(f"_lcfed_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides)
  return config


def check_deployable(config) -> None:
  """What a Flower run cannot do, as one clear error; then the usual validation."""
  validate(config)
  if config.method == "local":
    raise ConfigError("config.method='local' trains every site alone: it needs no server "
                      "(run it with launch.py)")
  if tuple(config.seeds):
    raise ConfigError(f"config.seeds={tuple(config.seeds)}: a Flower run trains one federation "
                      f"(one seed, config.seed); start one run per seed")
  if config.federated.opt_state == "mean":
    raise ConfigError("config.federated.opt_state='mean' averages optimizer state, which never "
                      "leaves a client in a Flower run: use 'keep' or 'reset'")


def _site_local(key: str) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in SITE_LOCAL)


def config_json(config) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, default=repr)


def differences(server_json: str, client_json: str) -> List[str]:
  """'config.key: the server's value, the site's' for every setting that differs and that a
  site may not set alone (the configs as `config_json` writes them)."""
  a, b = flatten(json.loads(server_json)), flatten(json.loads(client_json))
  out = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
    if not _site_local(key) and x != y:
      out.append(f"config.{key}: {x!r} at the server, {y!r} at the site")
  return out


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The run config, the same on the server and every client."""
  config: str
  overrides: str
  workdir: str
  state_dir: str
  min_clients: int
  round_timeout: float
  node_timeout: float

  @classmethod
  def from_run_config(cls, run_config: Mapping, defaults: Mapping = ()) -> "RunSettings":
    merged = dict(RUN_DEFAULTS, **dict(defaults), **dict(run_config))
    get = lambda key, kind: kind(merged[key])
    return cls(config=get("config", str), overrides=get("overrides", str), workdir=get("workdir", str),
               state_dir=get("state-dir", str), min_clients=get("min-clients", int),
               round_timeout=get("round-timeout", float), node_timeout=get("node-timeout", float))

  def experiment(self):
    return load_config(self.config, self.overrides)


@dataclasses.dataclass(frozen=True)
class NodeSettings:
  """One client's node config (`flower-supernode --node-config`)."""
  site: str             # a site name or index
  task: str             # '' : the config's
  data_dir: str         # '' : the config's
  state_dir: str        # '' : <run state-dir>/<site name>
  overrides: str

  @classmethod
  def from_node_config(cls, node_config: Mapping) -> "NodeSettings":
    site = node_config.get("site", node_config.get("partition-id"))
    if site is None or str(site) == "":
      raise ConfigError("node config: 'site' is missing (flower-supernode --node-config "
                        "\"site=<name or index> data-dir=... state-dir=...\")")
    get = lambda key: str(node_config.get(key, ""))
    return cls(str(site), get("task"), get("data-dir"), get("state-dir"), get("overrides"))

  def experiment(self, run: RunSettings):
    """This site's config: the run's, with what the node config sets for this site."""
    config = run.experiment()
    if self.task:
      config.data.task = self.task
    if self.data_dir:
      config.data_dir = os.path.expanduser(self.data_dir)
    apply_overrides(config, self.overrides, "node config overrides")
    return config

  def site_index(self, names: List[str]) -> int:
    if self.site in names:
      return names.index(self.site)
    if self.site.isdigit() and int(self.site) < len(names):
      return int(self.site)
    raise ConfigError(f"node config: site={self.site!r} is not a site of this task: expected one "
                      f"of {names} or an index 0..{len(names) - 1}")

  def state_path(self, run: RunSettings, site_name: str) -> Path:
    if self.state_dir:
      return Path(os.path.expanduser(self.state_dir))
    root = run.state_dir or os.path.join(run.workdir, "clients")
    return Path(os.path.expanduser(root)) / site_name
