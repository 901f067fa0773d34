"""Where a federated round spends its device time: the top ops of two profiled rounds.

Compiles the round of a method's first stage (LC-Fed stage A by default) in the paper's
polyp setting (4 sites x batch 6, 384 px, base 16, 50 local steps), runs a warm-up round,
traces two rounds with `jax.profiler`, and reads the trace back (`jax.profiler.ProfileData`):
every device op's exclusive time is summed over the two rounds and matched to its
instruction in the optimised HLO, which says what the op is:

  conv fwd / conv dgrad / conv wgrad   by the cuDNN call's kind on GPU, else by whether it
                                       comes from the backward pass and what its output is
  norm, HC/PCS, elementwise fwd/bwd    by where in the model it was traced
  copy/transpose                       by the HLO opcode
  optimizer/server/sampling            everything outside the model's forward and backward

Prints one JSON line per op of the top --top (share of the profiled device time, ms per
round, category, HLO name, source) and one line per category.

  python bench/profile_round.py                              # paper setting (a GPU)
  python bench/profile_round.py --size 48 --base 8 --local_steps 10 --top 10   # CPU-sized
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcfed_jax.fed import setup  # noqa: E402
from throughput import device_name, make_config, random_data  # noqa: E402

CUDNN = {"__cudnn$convForward": "conv fwd", "__cudnn$convBackwardInput": "conv dgrad",
         "__cudnn$convBackwardFilter": "conv wgrad", "__cudnn$convBiasActivationForward": "conv fwd"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\(")
SKIP = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end:", "while", "conditional", "call")


def classify_hlo(text: str, batch: int):
  """{instruction name: (category, where in the model)} of an optimised HLO module.

  A convolution is forward when it comes from the model's forward pass, else a weight
  gradient when its output is not batched by images (our weight gradient contracts the
  images: [Ci, kh, kw, Co]) and an input gradient otherwise; on GPU the cuDNN call says."""
  out = {}
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    dims = (re.search(r"\[([\d,]*)\]", shape) or [None, ""])[1]
    path = (re.search(r'op_name="([^"]+)"', line) or [None, ""])[1]
    where = "/".join(p for p in path.split("/") if not p.startswith(("jit(", "while", "body", "closed_call")))
    target = re.search(r'custom_call_target="([^"]+)"', line)
    backward = "transpose(" in path
    first = int(dims.split(",")[0]) if dims else 0
    if target and target.group(1) in CUDNN:
      cat = CUDNN[target.group(1)]
    elif opcode == "convolution" or path.endswith("conv_general_dilated"):   # or fused into one
      cat = "conv fwd" if not backward else ("conv dgrad" if first == batch else "conv wgrad")
    elif "reduce-window" in name or "select-and-scatter" in name or opcode in ("reduce-window", "select-and-scatter"):
      cat = "max-pool" + (" (bwd)" if backward or "select-and-scatter" in name else "")
    elif opcode in ("copy", "transpose", "copy-start", "copy-done"):
      cat = "copy/transpose"
    elif "/norm" in path:
      cat = "norm" + (" (bwd)" if backward else "")
    elif "/hc/" in path or "/pcs_" in path:
      cat = "HC/PCS"
    elif "jvp(" in path:
      cat = "elementwise bwd" if backward else "elementwise fwd"
    else:
      cat = "optimizer/server/sampling"
    out[name] = (cat, where[-120:])
  return out


def device_op_times(xplane_path: str):
  """{op name: exclusive ns} of the device (GPU/TPU planes, else the CPU's XLA threads);
  an op's time excludes the ops nested inside it on the same line (loops, thunks)."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(xplane_path)
  times = collections.Counter()
  devices = [p for p in data.planes if p.name.startswith("/device:")]
  for plane in devices or [p for p in data.planes if p.name == "/host:CPU"]:
    for line in plane.lines:
      if (devices and line.name not in ("XLA Ops", "Ops")) or (not devices and not line.name.startswith("tf_XLA")):
        continue
      events = sorted((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events if ev.duration_ns > 0)
      stack = []   # (end, name, index into self times)
      selfs = []
      for start, end, name in events:
        while stack and stack[-1][0] <= start:
          stack.pop()
        if stack:
          selfs[stack[-1][2]][1] -= min(end, stack[-1][0]) - start
        selfs.append([name, end - start])
        stack.append((end, name, len(selfs) - 1))
      for name, ns in selfs:
        if not name.startswith(SKIP) and ns > 0:
          times[name] += ns
  return times


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="lcfed")
  p.add_argument("--impl", default="auto")
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--sites", type=int, default=4)
  p.add_argument("--batch", type=int, default=6)
  p.add_argument("--local_steps", type=int, default=50)
  p.add_argument("--dtype", default="auto")
  p.add_argument("--rounds", type=int, default=2, help="profiled rounds")
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--train_size", type=int, default=16)
  a = p.parse_args(argv)
  c = make_config(a.method, a.impl, a, a.size)
  exp = setup.build(c, a.sites, 3, 1, (a.size, a.size, 3))
  state = exp.init_state()
  data = random_data(np.random.default_rng(0), a.sites, a.train_size, a.size)
  weights = jnp.full((a.sites,), 1.0 / a.sites, jnp.float32)
  compiled = exp.round_fn(exp.stages[0]).lower(state, data, weights).compile()
  labels = classify_hlo(compiled.as_text() or "", a.batch)
  state, losses, _ = compiled(state, data, weights)      # warm-up
  jax.block_until_ready(losses)
  logdir = tempfile.mkdtemp(prefix="lcfed_profile_")
  with jax.profiler.trace(logdir):
    for _ in range(a.rounds):
      state, losses, _ = compiled(state, data, weights)
      jax.block_until_ready(losses)
  times = device_op_times(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
  total = sum(times.values()) or 1
  head = {"bench": "profile", "device": device_name(jax.devices()[0]), "method": f"{a.method} stage "
          f"{exp.stages[0].name}", "impl": exp.model.impl, "dtype": str(jnp.dtype(exp.model.dtype)),
          "sites": a.sites, "batch": a.batch, "image_size": a.size, "base": a.base, "local_steps": a.local_steps,
          "device_ms_per_round": round(total / 1e6 / a.rounds, 2), "ops": len(times), "trace": logdir}
  print(json.dumps(head), flush=True)
  for rank, (name, ns) in enumerate(times.most_common(a.top), 1):
    cat, src = labels.get(name, labels.get(name.split(":")[0], ("?", "")))
    print(json.dumps({"rank": rank, "op": name, "category": cat, "share": round(ns / total, 4),
                      "ms_per_round": round(ns / 1e6 / a.rounds, 3), "source": src}), flush=True)
  by_cat = collections.Counter()
  for name, ns in times.items():
    by_cat[labels.get(name, ("?", ""))[0]] += ns
  for cat, ns in by_cat.most_common():
    print(json.dumps({"category": cat, "share": round(ns / total, 4),
                      "ms_per_round": round(ns / 1e6 / a.rounds, 3)}), flush=True)


if __name__ == "__main__":
  main()
