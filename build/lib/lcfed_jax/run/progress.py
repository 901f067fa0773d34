"""Round log lines: rate and ETA from steady rounds only, and a one-line progress bar
when stdout is a terminal.

Training compiles its programs before the first round and says so ('compiling N
programs...'); the first round of every stage still pays one-off costs (first-touch
allocations, a program that had to compile late), so it is kept out of the rate. The
ETA is the remaining rounds times the median of the current stage's steady rounds.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, List, Sequence


def fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  def __init__(self, total: int, log: Callable[[str], None], bar: bool = None, label: str = ""):
    self.total, self.log, self.label = int(total), log, label
    self.bar = sys.stdout.isatty() if bar is None else bool(bar)
    self.steady: List[float] = []
    self.first = True
    self.t_call = None

  def stage(self, name: str, first_round: int) -> None:
    """A new stage: its first round is kept out of the rate (it may compile)."""
    self.first, self.steady = True, []
    self.log(f"stage {name}: from round {first_round + 1}/{self.total}")

  def start(self) -> None:
    self.t_call = time.perf_counter()

  def done(self, done: int, stage: str, losses: Sequence[float]) -> None:
    seconds = time.perf_counter() - self.t_call
    loss = " ".join(f"{x:.4f}" for x in losses)
    head = f"round {done}/{self.total} [{stage}] loss {loss}"
    if self.first:
      self.first = False
      self.log(f"{head} | first round of the stage in {seconds:.1f}s, ETA after the next round")
    else:
      self.steady.append(seconds)
      per = statistics.median(self.steady[-20:])
      eta = fmt_eta((self.total - done) * per)
      self.log(f"{head} | {1.0 / max(per, 1e-9):.2f} rounds/s, ETA {eta}")
    if self.bar:
      self._draw(done, stage)

  def _draw(self, done: int, stage: str) -> None:
    width = 30
    filled = int(width * done / max(self.total, 1))
    eta = fmt_eta((self.total - done) * statistics.median(self.steady[-20:])) if self.steady else "?"
    sys.stdout.write(f"\r{self.label}[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                     f"{stage} ETA {eta} ")
    if done >= self.total:
      sys.stdout.write("\n")
    sys.stdout.flush()
