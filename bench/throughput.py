"""Training throughput of one federated round: all sites in one jitted step.

Drives the engine's real `make_round_fn` (stage A of the method: for lcfed the head-then-
body phases with PCS, L_con and the personal head; fedavg: all parameters averaged) on
random uint8 data of the task's shape, already on the device. For every (size, method,
conv impl) prints one JSON line:

  {"bench": "throughput", "backend", "device", "method", "impl", "dtype", "sites",
   "batch", "image_size", "base", "local_steps", "img_per_s", "round_s" (median of
   --rounds timed rounds after one warm-up round), "compile_s" (lower + compile of the
   round), "peak_mem_bytes", "peak_mem_kind", ...}

Peak memory: `device.memory_stats()['peak_bytes_in_use']` where the backend reports it
(GPU/TPU; the peak of the whole process so far, so run one configuration per process for
exact per-configuration peaks); on CPU the process's max RSS (getrusage), also cumulative.

With --torch, also runs bench/torch_reference.py at the same settings (one JSON line per
size) with --torch_python (default: this interpreter) when that interpreter can import
torch, else prints a JSON line saying why it was skipped.

Examples:
  python bench/throughput.py --sizes 64 --base 16 --local_steps 10 --torch \
      --torch_python /tmp/torchvenv/bin/python
  python bench/throughput.py --paper --impls unroll im2col --torch   # 4 x 6, 384 px, 50 steps
  python bench/throughput.py --paper --impls unroll --xla_preset cmdbuf_loops   # an XLA setting
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import xla_flags  # noqa: E402

if __name__ == "__main__":   # XLA reads its flags once, when jax starts
  xla_flags.apply_from_argv(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.synthetic import get_config  # noqa: E402
from lcfed_jax.data.device import SiteArrays  # noqa: E402
from lcfed_jax.fed import setup  # noqa: E402
from lcfed_jax.models.conv import IMPLEMENTATIONS  # noqa: E402

PAPER = dict(sizes=[384], sites=4, batch=6, local_steps=50, base=16)


def device_name(dev) -> str:
  if dev.platform != "cpu":
    return dev.device_kind
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
  except OSError:
    pass
  return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def peak_memory(dev):
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device.memory_stats peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def make_config(method, impl, a, size):
  c = get_config(method)
  c.image_size = size
  c.model.base = a.base
  c.batch_size = a.batch
  c.local_steps = a.local_steps
  c.data.num_sites = a.sites
  c.model.conv_impl = impl
  c.model.dtype = a.dtype
  c.model.scan_unroll = max(int(getattr(a, "scan_unroll", 1)), 1)
  # Head-only steps scale with the local steps as in the paper (10 of 50).
  c.lcfed.head_iters = c.fedrep.head_iters = max(1, a.local_steps // 5)
  return c


def random_data(rng, sites, n, size) -> SiteArrays:
  images = rng.integers(0, 256, (sites, n, size, size, 3), dtype=np.uint8)
  masks = (rng.random((sites, n, size, size, 1)) < 0.3).astype(np.uint8)
  counts = np.full((sites,), n, np.int32)
  return jax.device_put(SiteArrays(images, masks, counts))


_INIT_CACHE = {}


def init_state(exp, c, a, size):
  """The initial state does not depend on the conv impl (unmapped init: plain convs), so
  it is built once per (method, size) and copied (the round donates its state)."""
  key = (c.method, size)
  if key not in _INIT_CACHE:
    t0 = time.perf_counter()
    state = jax.block_until_ready(exp.init_state())
    _INIT_CACHE[key] = (state, time.perf_counter() - t0)
  state, init_s = _INIT_CACHE[key]
  return jax.tree.map(jnp.copy, state), init_s


def timed_rounds(compiled, state, data, weights, rounds: int):
  """(last state, last losses, seconds of each of `rounds` calls): each call waits for
  its results, so a time is one whole round on the device."""
  times, losses = [], None
  for _ in range(rounds):
    t0 = time.perf_counter()
    state, losses, _ = compiled(state, data, weights)
    jax.block_until_ready((state, losses))
    times.append(time.perf_counter() - t0)
  return state, losses, times


def bench_one(method, impl, size, a, data, dev):
  c = make_config(method, impl, a, size)
  exp = setup.build(c, a.sites, 3, 1, (size, size, 3))
  stage = exp.stages[0]
  state, init_s = init_state(exp, c, a, size)
  weights = jnp.full((a.sites,), 1.0 / a.sites, jnp.float32)
  round_fn = exp.round_fn(stage)
  t0 = time.perf_counter()
  compiled = round_fn.lower(state, data, weights).compile()
  compile_s = time.perf_counter() - t0
  state, _, (warm_s,) = timed_rounds(compiled, state, data, weights, 1)   # warm-up round
  state, losses, times = timed_rounds(compiled, state, data, weights, a.rounds)
  round_s = statistics.median(times)
  peak, kind = peak_memory(dev)
  loss = np.asarray(losses)
  return {
      "bench": "throughput", "framework": f"jax {jax.__version__}", "backend": dev.platform,
      "device": device_name(dev), "method": f"{method} stage {stage.name}", "impl": impl,
      "impl_used": exp.model.impl,
      "dtype": str(jnp.dtype(setup.compute_dtype(c))), "sites": a.sites, "batch": a.batch,
      "image_size": size, "base": a.base, "local_steps": a.local_steps,
      "img_per_s": round(a.sites * a.batch * a.local_steps / round_s, 2),
      "round_s": round(round_s, 4), "round_s_all": [round(t, 4) for t in times],
      "compile_s": round(compile_s, 2), "warmup_round_s": round(warm_s, 4),
      "init_s": round(init_s, 2), "peak_mem_bytes": int(peak), "peak_mem_kind": kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "loss_finite": bool(np.all(np.isfinite(loss)))}


def run_torch(a, size):
  py = a.torch_python or sys.executable
  probe = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
  if probe.returncode != 0:
    err = (probe.stderr.strip().splitlines() or ["?"])[-1]
    print(json.dumps({"bench": "throughput", "impl": "torch_eager", "skipped": True,
                      "reason": f"torch not importable with {py}: {err}"}), flush=True)
    return
  cmd = [py, os.path.join(ROOT, "bench", "torch_reference.py"), "--size", str(size),
         "--sites", str(a.sites), "--batch", str(a.batch), "--local_steps", str(a.local_steps),
         "--rounds", str(a.rounds), "--base", str(a.base)]
  out = subprocess.run(cmd, capture_output=True, text=True)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if out.returncode != 0 or not lines:
    print(json.dumps({"bench": "throughput", "impl": "torch_eager", "skipped": True,
                      "reason": f"torch_reference failed (rc {out.returncode}): "
                                f"{out.stderr.strip()[-500:]}"}), flush=True)
    return
  for ln in lines:
    print(ln, flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", type=int, nargs="+", default=[64])
  p.add_argument("--sites", type=int, default=4)
  p.add_argument("--batch", type=int, default=6)
  p.add_argument("--local_steps", type=int, default=10)
  p.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=("auto",) + IMPLEMENTATIONS)
  p.add_argument("--methods", nargs="+", default=["lcfed", "fedavg"])
  p.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up round")
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  p.add_argument("--scan_unrolls", type=int, nargs="+", default=[1],
                 help="local steps per iteration of the local-step loop (1: rolled)")
  p.add_argument("--train_size", type=int, default=32, help="random examples per site on device")
  p.add_argument("--paper", action="store_true",
                 help="polyp setting: 4 sites, batch 6, 384 px, 50 local steps, base 16")
  p.add_argument("--torch", action="store_true", help="also run bench/torch_reference.py")
  p.add_argument("--torch_python", default=None,
                 help="interpreter for the torch reference (default: this one)")
  xla_flags.add_arguments(p)
  p.add_argument("--cache_dir", default=None,
                 help="persistent compilation cache (default: none, so compile_s is cold)")
  a = p.parse_args(argv)
  if a.paper:   # the paper's values as defaults: arguments given explicitly still win
    p.set_defaults(**PAPER)
    a = p.parse_args(argv)
  if a.cache_dir:
    jax.config.update("jax_compilation_cache_dir", a.cache_dir)
  dev = jax.devices()[0]
  rng = np.random.default_rng(0)
  for size in a.sizes:
    data = random_data(rng, a.sites, a.train_size, size)
    for method in a.methods:
      for impl in a.impls:
        for unroll in a.scan_unrolls:
          a.scan_unroll = unroll
          out = bench_one(method, impl, size, a, data, dev)
          out["scan_unroll"] = unroll
          print(json.dumps(out), flush=True)
    if a.torch:
      run_torch(a, size)


if __name__ == "__main__":
  main()
