"""XLA GPU settings worth measuring, as named presets the bench scripts take.

`--xla_preset NAME ...` (and `--xla_flags "..."` for anything else) on bench/compile.py,
bench/throughput.py and bench/profile_round.py append to `XLA_FLAGS` before jax is
imported (XLA reads the variable once, at backend start), and every JSON line of those
scripts names the flags it ran with. XLA aborts on a flag name or value it does not know,
so every preset is checked on CPU too: XLA:CPU parses the GPU flags and ignores them.

Presets:
  autotune0     --xla_gpu_autotune_level=0: no cuDNN / GEMM / fusion autotuning. Default
                level 4 times every candidate algorithm of every convolution shape while
                compiling, which is a large part of a round's compile time on a GPU.
  cmdbuf_off    --xla_gpu_enable_command_buffer=: no CUDA graphs (every kernel launched
                from the host). The baseline that shows what the default graphs save.
  cmdbuf_loops  add WHILE and CONDITIONAL to the command-buffer types: the local-step loop
                itself becomes a CUDA graph, so a latency-bound round stops paying one
                host round trip per loop iteration.
  lhs           --xla_gpu_enable_latency_hiding_scheduler=true: XLA's scheduler that
                overlaps independent work (streams, async copies).
"""
from __future__ import annotations

import os
import shlex
from typing import Dict, Sequence, Tuple

PRESETS: Dict[str, Tuple[str, ...]] = {
    "autotune0": ("--xla_gpu_autotune_level=0",),
    "cmdbuf_off": ("--xla_gpu_enable_command_buffer=",),
    "cmdbuf_loops": ("--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",),
    "lhs": ("--xla_gpu_enable_latency_hiding_scheduler=true",),
}


def flags_for(presets: Sequence[str] = (), extra: str = "") -> Tuple[str, ...]:
  """The XLA flags of `presets` (in order) followed by `extra` (a shell-quoted string)."""
  out = []
  for name in presets:
    if name not in PRESETS:
      raise SystemExit(f"--xla_preset {name!r}: expected one of {sorted(PRESETS)}")
    out.extend(PRESETS[name])
  return tuple(out) + tuple(shlex.split(extra or ""))


def apply(presets: Sequence[str] = (), extra: str = "") -> str:
  """Appends the flags to $XLA_FLAGS; returns what was added ('' for none). Call it
  before the first `import jax` of the process."""
  added = " ".join(flags_for(presets, extra))
  if added:
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), added]))
  return added


def add_arguments(parser) -> None:
  parser.add_argument("--xla_preset", nargs="*", default=[], choices=sorted(PRESETS),
                      help="named XLA GPU settings (bench/xla_flags.py)")
  parser.add_argument("--xla_flags", default="",
                      help="more XLA flags, appended to $XLA_FLAGS (write --xla_flags=\"--a=1 --b=2\")")


def apply_from_argv(argv: Sequence[str]) -> str:
  """`apply` for the --xla_preset/--xla_flags found in `argv`, parsed before jax is
  imported (the scripts' own parsers read them again, for the record)."""
  import argparse
  p = argparse.ArgumentParser(add_help=False)
  add_arguments(p)
  known, _ = p.parse_known_args(list(argv))
  return apply(known.xla_preset, known.xla_flags)
