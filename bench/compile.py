"""Compile cost and speed of one federated round for K sites and each conv implementation.

For every (sites, impl, scan_unroll) a fresh subprocess (cold: no compilation cache,
nothing compiled before) builds the synthetic default's LC-Fed stage-A round (or
--method) and prints one JSON line:

  {"bench": "compile", "sites", "impl" (as asked; 'auto' picks by backend and models),
   "impl_used", "scan_unroll", "trace_lower_s", "compile_s",
   "first_round_s" (the first call, compiled before), "round_s" (median of --rounds),
   "img_per_s", "convs_lowered" (convolution ops in the lowered StableHLO),
   "convs_compiled" (convolution instructions in the optimised HLO), "peak_mem_bytes",
   "xla_flags", "device", ...}

--xla_preset / --xla_flags (bench/xla_flags.py) set XLA_FLAGS for the child processes.

A configuration that runs past --timeout prints {"timed_out": true}. Examples:

  python bench/compile.py                                   # K = 2 4 8 16, every impl
  python bench/compile.py --sites 4 --impls unroll grouped --scan_unrolls 1 10
  python bench/compile.py --sites 4 --impls map --seeds 1 2 4               # seeds in one program
  python bench/compile.py --size 384 --base 16 --local_steps 50 --sites 4 32   # paper setting
  python bench/compile.py --sites 32 --impls auto map grouped         # many models in one program
  python bench/compile.py --sites 4 --impls unroll --xla_preset autotune0   # an XLA setting
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def measure(a) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from throughput import device_name, make_config, peak_memory, random_data, timed_rounds
  from lcfed_jax.fed import setup

  a.sites = a.one_sites
  c = make_config(a.method, a.one_impl, a, a.size)
  c.model.scan_unroll = a.one_unroll
  c.seeds = tuple(range(a.one_seeds)) if a.one_seeds > 1 else ()
  if a.depth:
    c.model.depth = a.depth
  exp = setup.build(c, a.sites, 3, 1, (a.size, a.size, 3))
  method = exp.method
  state = exp.init_state()
  data = random_data(np.random.default_rng(0), a.sites, a.train_size, a.size)
  weights = jnp.full((a.sites,), 1.0 / a.sites, jnp.float32)
  round_fn = exp.round_fn(method.stages[0])
  t0 = time.perf_counter()
  lowered = round_fn.lower(state, data, weights)
  text = lowered.as_text()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  state, _, (first_s,) = timed_rounds(compiled, state, data, weights, 1)
  state, losses, times = timed_rounds(compiled, state, data, weights, a.rounds)
  round_s = statistics.median(times)
  hlo = compiled.as_text() or ""
  dev = jax.devices()[0]
  return {"bench": "compile", "framework": f"jax {jax.__version__}", "device": device_name(dev),
          "method": f"{a.method} stage {method.stages[0].name}", "sites": a.sites,
          "impl": a.one_impl, "impl_used": exp.model.impl, "scan_unroll": a.one_unroll,
          "image_size": a.size, "base": a.base, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "batch": a.batch, "local_steps": a.local_steps,
          "trace_lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
          "first_round_s": round(first_s, 3), "round_s": round(round_s, 4),
          "seeds": a.one_seeds,
          "img_per_s": round(a.sites * max(a.one_seeds, 1) * a.batch * a.local_steps / round_s, 1),
          "convs_lowered": text.count("stablehlo.convolution"),
          "convs_compiled": len(re.findall(r"= \S+ convolution\(", hlo)),
          "peak_mem_bytes": peak_memory(dev)[0],
          "loss_finite": bool(np.all(np.isfinite(np.asarray(losses))))}


def main(argv=None):
  import xla_flags
  from lcfed_jax.models.conv import IMPLEMENTATIONS
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8, 16])
  p.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=("auto",) + IMPLEMENTATIONS)
  p.add_argument("--depth", type=int, default=0, help="U-Net levels (0: the config's)")
  xla_flags.add_arguments(p)
  p.add_argument("--scan_unrolls", type=int, nargs="+", default=[1])
  p.add_argument("--method", default="lcfed")
  p.add_argument("--size", type=int, default=48)
  p.add_argument("--base", type=int, default=8)
  p.add_argument("--batch", type=int, default=6)
  p.add_argument("--local_steps", type=int, default=10)
  p.add_argument("--train_size", type=int, default=16)
  p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
  p.add_argument("--seeds", type=int, nargs="+", default=[1],
                 help="seeds on the replica axis (S federations in one program); 1: none")
  p.add_argument("--one", nargs=4, metavar=("SITES", "IMPL", "UNROLL", "SEEDS"), help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.one:
    a.one_sites, a.one_impl, a.one_unroll, a.one_seeds = int(a.one[0]), a.one[1], int(a.one[2]), int(a.one[3])
    print(json.dumps(measure(a)), flush=True)
    return
  passthrough = [f"--{k}={getattr(a, k)}" for k in ("method", "size", "base", "batch", "local_steps",
                                                   "train_size", "dtype", "rounds", "depth")]
  env = dict(os.environ, LCFED_JAX_CACHE="off")
  added = " ".join(xla_flags.flags_for(a.xla_preset, a.xla_flags))
  if added:
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), added]))
  configs = [(k, impl, unroll, seeds) for k in a.sites for impl in a.impls for unroll in a.scan_unrolls
             for seeds in a.seeds]
  for k, impl, unroll, seeds in configs:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(k), impl, str(unroll), str(seeds)] + passthrough
    base = {"bench": "compile", "sites": k, "impl": impl, "scan_unroll": unroll, "seeds": seeds,
            "xla_flags": env.get("XLA_FLAGS", "")}
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # A step limit (bench/gpu_check.sh) stops this process with SIGTERM: stop the child
    # too, or it would keep the device busy for the next step.
    signal.signal(signal.SIGTERM, lambda *_: (child.kill(), sys.exit(143)))
    try:
      stdout, stderr = child.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
      child.kill()
      child.communicate()
      print(json.dumps(dict(base, timed_out=True, timeout_s=a.timeout)), flush=True)
      continue
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if child.returncode or not lines:
      print(json.dumps(dict(base, failed=True, error=stderr.strip()[-400:])), flush=True)
    else:
      print(lines[-1], flush=True)

if __name__ == "__main__":
  main()
