"""Methods as data: which parameters are personal, which local phases a round has, how
the server aggregates, and which stages follow each other. The engine
(`lcfed_jax.engine`) reads these records and never asks which method it is running.

A method name maps to a function of the config that returns a `Method`, so ablation
switches (`config.lcfed.pcs_shared`, `config.lcfed.hc`, ...) become different records.

Trainable groups a phase can name:
  'personal'  leaves matched by `Method.personal`, except HC (the official switch never
              touches 'hc*': HC trains only in its own stage or with `hc_joint`);
  'shared'    every other leaf, except HC;
  'all'       everything except HC;
  'hc'        HC only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

HEAD = r"^params/head/"
HC = r"^params/hc/"
PCS = r"^params/pcs_"
BN = (r"^params/.*/norm\d/", r"^batch_stats/")   # FedBN: BN scale, bias and statistics
ALL = (r".",)


@dataclasses.dataclass(frozen=True)
class Phase:
  train: str                     # trainable group (see module doc)
  steps: Optional[int] = None    # None: the rest of the local steps


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  rounds: int
  phases: Tuple[Phase, ...]
  server: str = "mean"           # 'mean' | 'fourier' (PRR-FL) | 'none'
  learning_rate: Optional[float] = None   # None: config.learning_rate
  loss: str = "seg"              # 'seg' (own head) | 'hc' (HC output only)
  contrastive: float = 0.0       # weight of L_con
  hc_joint: bool = False         # also train HC on its own Dice in this stage
  output: str = "probs"          # what evaluation reads: 'probs' | 'hc'
  per_site_selection: bool = False   # FT: every site keeps its own best round


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  personal: Tuple[str, ...]
  stages: Tuple[Stage, ...]
  norm: Optional[str] = None     # forces the model's norm (FedBN: 'bn')
  pcs: bool = False
  hc: bool = False


def _head_then_body(config):
  return (Phase("personal", int(config.lcfed.head_iters)), Phase("shared"))


def local(config):
  return Method("local", ALL, (Stage("train", config.rounds, (Phase("all"),), server="none"),))


def fedavg(config):
  return Method("fedavg", (), (Stage("train", config.rounds, (Phase("all"),)),))


def ft(config):
  return Method("ft", (), (
      Stage("fedavg", config.rounds, (Phase("all"),)),
      Stage("finetune", config.ft.rounds, (Phase("all"),), server="none",
            learning_rate=config.ft.learning_rate, per_site_selection=True)))


def fedbn(config):
  return Method("fedbn", BN, (Stage("train", config.rounds, (Phase("all"),)),), norm="bn")


def fedrep(config):
  return Method("fedrep", (HEAD,), (Stage("train", config.rounds, _head_then_body(config)),))


def prrfl(config):
  personal = BN if config.model.norm == "bn" else ()
  return Method("prrfl", personal, (Stage("train", config.rounds, (Phase("all"),), server="fourier"),))


def lcfed(config):
  c = config.lcfed
  personal = (HEAD,) + ((HC,) if c.hc else ()) + ((PCS,) if c.pcs and not c.pcs_shared else ())
  joint = bool(c.hc and c.hc_joint)
  stages = [Stage("A", config.rounds, _head_then_body(config), contrastive=float(c.alpha) if c.pcs else 0.0,
                  hc_joint=joint, output="hc" if joint else "probs")]
  if c.hc and not joint:
    stages.append(Stage("B", c.hc_rounds, (Phase("hc"),), server="none",
                        learning_rate=c.hc_learning_rate, loss="hc", output="hc"))
  return Method("lcfed", personal, tuple(stages), pcs=bool(c.pcs), hc=bool(c.hc))


METHODS: Dict[str, Callable] = {
    "local": local, "fedavg": fedavg, "ft": ft, "fedbn": fedbn,
    "fedrep": fedrep, "prrfl": prrfl, "lcfed": lcfed,
}


def get_method(config) -> Method:
  if config.method not in METHODS:
    raise KeyError(config.method)
  return METHODS[config.method](config)
