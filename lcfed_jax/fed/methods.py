"""Methods as data: which parameters are personal, which local phases a round has, which
loss terms and server step each stage uses, and which stages follow each other. The
engine (`lcfed_jax.fed.engine`) reads these records and never asks which method it runs.

A method name maps to a function of the config that returns a `Method`; it reads its own
config subtree (`config.fedrep.head_iters`, `config.prrfl.*`, ...), so ablation switches
become different records. Loss terms (`lcfed_jax.fed.losses`) and server steps
(`lcfed_jax.fed.server`) are looked up and their settings bound here: a typo in a name
fails when the record is built.

What a phase trains (`Phase.train`, a union of entries):
  'personal'  leaves matched by `Method.personal`, except `Method.exclusive` ones;
  'shared'    every other leaf, except `Method.exclusive` ones;
  'all'       everything except `Method.exclusive` leaves;
  a regex     the leaves whose path ('params/down1/conv1/kernel') it matches.
`Method.exclusive` leaves (LC-Fed's HC) train only where a phase names them by regex:
the official head/body switch never touches HC.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple, Union

from lcfed_jax.fed import losses, server as servers
from lcfed_jax.util.errors import ConfigError

HEAD = r"^params/head/"
HC = r"^params/hc/"
PCS = r"^params/pcs_"
LAST_DECODER = r"^params/up1/"
BN = (r"^params/.*/norm\d/", r"^batch_stats/")   # FedBN: BN scale, bias and statistics
PERSONAL_MODEL = r"^params/personal/"              # Ditto's second model
ALL = (r".",)
GROUPS = ("personal", "shared", "all")


@dataclasses.dataclass(frozen=True)
class Phase:
  train: Union[str, Tuple[str, ...]]   # see the module doc
  steps: Optional[int] = None          # None: the rest of the local steps

  def __post_init__(self):
    if isinstance(self.train, str):
      object.__setattr__(self, "train", (self.train,))


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  rounds: int
  phases: Tuple[Phase, ...]
  loss: Tuple[losses.Term, ...] = (losses.term("dice"),)
  server: servers.Step = servers.step("mean")
  learning_rate: Optional[float] = None   # None: config.learning_rate
  output: str = "probs"                   # what evaluation reads: 'probs' | 'hc'
  per_site_selection: bool = False        # FT: every site keeps its own best round
  from_selected: bool = False             # LC-Fed B: every site starts from its model selected so far

  @property
  def needs(self) -> frozenset:
    """What the loss terms need besides the batch ('heads', 'start')."""
    return frozenset().union(*(t.needs for t in self.loss)) | (
        {"heads"} if self.output == "hc" else set())


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  norm: Optional[str] = None     # forces the model's norm (FedBN: 'bn')
  pcs: bool = False
  hc: bool = False
  twin: bool = False             # a global and a personal copy of the network (Ditto)


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  personal: Tuple[str, ...]
  stages: Tuple[Stage, ...]
  model: ModelSpec = ModelSpec()
  exclusive: Tuple[str, ...] = ()     # trained only by a phase naming them
  synced_init: Tuple[str, ...] = ()   # start equal at every site (site 0's draw)


def _head_then_body(head_iters: int):
  return (Phase("personal", int(head_iters)), Phase("shared"))


def _train(config, **kw) -> Stage:
  return Stage("train", config.rounds, (Phase("all"),), **kw)


def local(config):
  return Method("local", ALL, (_train(config, server=servers.step("none")),))


def fedavg(config):
  return Method("fedavg", (), (_train(config),))


def ft(config):
  return Method("ft", (), (
      Stage("fedavg", config.rounds, (Phase("all"),)),
      Stage("finetune", config.ft.rounds, (Phase("all"),), server=servers.step("none"),
            learning_rate=config.ft.learning_rate, per_site_selection=True)))


def fedbn(config):
  return Method("fedbn", BN, (_train(config),), model=ModelSpec(norm="bn"))


def fedrep(config):
  return Method("fedrep", (HEAD,), (Stage("train", config.rounds, _head_then_body(config.fedrep.head_iters)),))


def prrfl(config):
  personal = BN if config.model.norm == "bn" else ()
  p = config.prrfl
  step = servers.step("fourier", l0=float(p.l0), slope=float(p.slope), period=float(p.period),
                     cap=float(p.cap), official_divisor=bool(p.official_divisor))
  return Method("prrfl", personal, (_train(config, server=step),))


def lcfed(config):
  c = config.lcfed
  personal = (HEAD,) + ((HC,) if c.hc else ()) + ((PCS,) if c.pcs and not c.pcs_shared else ())
  joint = bool(c.hc and c.hc_joint)
  loss = (losses.term("dice"),)
  if c.pcs and c.alpha:
    loss += (losses.term("contrastive", float(c.alpha)),)
  if joint:   # HC trains on its own Dice beside stage A, on detached inputs
    loss += (losses.term("hc_dice"),)
  extra = (HC,) if joint else ()
  phases = (Phase(("personal",) + extra, int(c.head_iters)), Phase(("shared",) + extra))
  stages = [Stage("A", config.rounds, phases, loss=loss, output="hc" if joint else "probs")]
  if c.hc and not joint:
    stages.append(Stage("B", c.hc_rounds, (Phase(HC),), loss=(losses.term("hc_dice"),),
                        server=servers.step("none"), learning_rate=c.hc_learning_rate, output="hc",
                        from_selected=True))
  return Method("lcfed", personal, tuple(stages), model=ModelSpec(pcs=bool(c.pcs), hc=bool(c.hc)),
                exclusive=(HC,) if c.hc else ())


def fedprox(config):
  mu = float(config.fedprox.mu)
  return Method("fedprox", (), (_train(config, loss=(losses.term("dice"), losses.term("prox", mu=mu))),))


def ditto(config):
  """A global model trained by FedAvg and a personal one per site pulled towards it; both
  take a step on every batch; evaluation reads the personal model."""
  lam = float(config.ditto.lam)
  loss = (losses.term("global_dice"), losses.term("dice"), losses.term("ditto_prox", lam=lam))
  return Method("ditto", (PERSONAL_MODEL,), (_train(config, loss=loss),), model=ModelSpec(twin=True))


def fedper(config):
  return Method("fedper", (HEAD, LAST_DECODER), (_train(config),))


def fedbabu(config):
  """The body trained federatedly under a head frozen at one random init shared by all
  sites, then the head fine-tuned at every site alone."""
  b = config.fedbabu
  return Method("fedbabu", (HEAD,), (
      Stage("body", config.rounds, (Phase("shared"),)),
      Stage("finetune", b.ft_rounds, (Phase("personal"),), server=servers.step("none"),
            learning_rate=b.ft_learning_rate, per_site_selection=True)),
      synced_init=(HEAD,))


METHODS: Dict[str, Callable] = {
    "local": local, "fedavg": fedavg, "ft": ft, "fedbn": fedbn, "fedrep": fedrep,
    "prrfl": prrfl, "lcfed": lcfed, "fedprox": fedprox, "ditto": ditto, "fedper": fedper,
    "fedbabu": fedbabu,
}


def get_method(config) -> Method:
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r}: expected one of {sorted(METHODS)}")
  return METHODS[config.method](config)
