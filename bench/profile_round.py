"""Where a federated round spends its device time, and how close it runs to the roofline.

Compiles the round of a method's first stage (LC-Fed stage A by default) in the paper's
polyp setting (4 sites x batch 6, 384 px, base 16, 50 local steps), times --rounds rounds
after a warm-up, traces --profile_rounds more with `jax.profiler`, and reads the trace
(bench/trace_ops.py: the GPU's stream lines, or XLA:CPU's threads). Every op's exclusive
device time is matched to its instruction in the optimised HLO, which says what it is
(bench/hlo_ops.py):

  conv fwd / conv dgrad / conv wgrad   the scope `site_conv` traces each part under, else
                                       the cuDNN call's kind, else the shapes
  copy/transpose                       copies, transposes, fusions that only move data
  norm, max-pool, HC/PCS, elementwise  by where in the model the op was traced
  optimizer/server/sampling            everything outside the model's forward and backward

Prints JSON lines: a head (timing, device time, busy fraction, FLOPs and bytes per round
and the fraction of the device's peak they reach), the top ops until they cover
--coverage of the device time (at least --top), one line per category, and a summary. When
nothing in the trace is an op it prints the planes and lines it found and exits with 2;
when no op matches an instruction of the HLO, exits with 3: never a table of zero ops.

  python bench/profile_round.py                                   # paper setting (a GPU)
  python bench/profile_round.py --size 48 --base 8 --local_steps 10   # CPU-sized
  python bench/profile_round.py --trace T.xplane.pb --hlo H.txt --batch 6   # a saved trace
  python bench/profile_round.py ... --save_fixture tests/fixtures/profile_h200
      # also writes the trace trimmed to a few thousand events, and the HLO of their ops

Roofline: FLOPs (convolutions and dots) and bytes (each instruction's operands and
result) per round come from the optimised HLO with every loop body counted by its trip
count (`hlo_ops.round_cost`; XLA's `cost_analysis()`, which counts a loop body once, is
printed beside it). Achieved = per round / round_s; the fraction divides by --peak_tflops
and --peak_tbps, which default to the H200's measured bf16 peak (790 TFLOP/s) and HBM
bandwidth (4.8 TB/s) when the device is an H200. `roofline_img_per_s` is the rate at
which the slower of the two limits would be reached.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import hlo_ops  # noqa: E402
import trace_ops  # noqa: E402
import xla_flags  # noqa: E402

PEAKS = {"H200": (790.0, 4.8)}   # measured bf16 dense TFLOP/s, HBM TB/s


def kernel_category(name: str) -> str:
  """The category of a device event that names no HLO op, from its kernel name."""
  low = name.lower()
  if "memcpy" in low or "memset" in low:
    return "copy/transpose"
  for key, cat in (("fprop", "conv fwd"), ("dgrad", "conv dgrad"), ("wgrad", "conv wgrad")):
    if key in low:
      return cat
  return "?"


def label_of(op: str, kernel: str, labels):
  if op in labels:
    return labels[op]
  if op.split(":")[0] in labels:
    return labels[op.split(":")[0]]
  return (kernel_category(kernel if not op.startswith("[kernel]") else op), "")


def report(times: trace_ops.OpTimes, labels, rounds: int, coverage: float, top: int):
  """(op lines, category lines, summary) of the profile, each a list of dicts."""
  total = sum(times.ns.values())
  per = lambda ns: round(ns / 1e6 / rounds, 3)
  ops, cum = [], 0
  for rank, (name, ns) in enumerate(times.ns.most_common(), 1):
    if rank > top and cum / total >= coverage:
      break
    cum += ns
    cat, src = label_of(name, times.kernels.get(name, ""), labels)
    ops.append({"rank": rank, "op": name, "category": cat, "share": round(ns / total, 4),
                "cum_share": round(cum / total, 4), "ms_per_round": per(ns),
                "kernel": times.kernels.get(name, "")[:100], "source": src})
  by_cat = collections.Counter()
  for name, ns in times.ns.items():
    by_cat[label_of(name, times.kernels.get(name, ""), labels)[0]] += ns
  cats = [{"category": c, "share": round(ns / total, 4), "ms_per_round": per(ns)}
          for c, ns in by_cat.most_common()]
  in_hlo = sum(ns for name, ns in times.ns.items() if name in labels)
  summary = {"summary": True, "ops_listed": len(ops), "ops": len(times.ns),
             "listed_share": round(cum / total, 4),
             "classified_share": round(1 - by_cat.get("?", 0) / total, 4),
             "hlo_matched_share": round(in_hlo / total, 4)}
  return ops, cats, summary


def roofline(cost, round_s, images, peak_tflops, peak_tbps):
  out = {"flops_per_round": cost["flops"], "conv_flops_per_round": cost["conv_flops"],
         "bytes_per_round": cost["bytes"], "unknown_trip_loops": cost["unknown_trip_loops"]}
  if round_s:
    tflops, tbps = cost["flops"] / round_s / 1e12, cost["bytes"] / round_s / 1e12
    out["achieved_tflops"], out["achieved_tbps"] = round(tflops, 4), round(tbps, 4)
  if round_s and peak_tflops and peak_tbps:
    out["flops_fraction"] = round(tflops / peak_tflops, 5)
    out["bandwidth_fraction"] = round(tbps / peak_tbps, 5)
    bound_s = max(cost["flops"] / (peak_tflops * 1e12), cost["bytes"] / (peak_tbps * 1e12))
    out["roofline_img_per_s"] = round(images / bound_s, 1) if bound_s else None
    out["peaks"] = {"tflops": peak_tflops, "tbps": peak_tbps}
  return out


def run_round(a):
  """Compiles, times and traces the round; returns (head, hlo text, xplane path)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lcfed_jax.fed import setup
  from throughput import device_name, make_config, random_data, timed_rounds

  c = make_config(a.method, a.impl, a, a.size)
  if a.depth:
    c.model.depth = a.depth
  c.seeds = tuple(range(a.seeds)) if a.seeds > 1 else ()
  exp = setup.build(c, a.sites, 3, 1, (a.size, a.size, 3))
  state = exp.init_state()
  data = random_data(np.random.default_rng(0), a.sites, a.train_size, a.size)
  weights = jnp.full((a.sites,), 1.0 / a.sites, jnp.float32)
  t0 = time.perf_counter()
  compiled = exp.round_fn(exp.stages[0]).lower(state, data, weights).compile()
  compile_s = time.perf_counter() - t0
  text = compiled.as_text() or ""
  state, _, _ = timed_rounds(compiled, state, data, weights, 1)      # warm-up
  state, losses, times = timed_rounds(compiled, state, data, weights, a.rounds)
  round_s = statistics.median(times) if times else None
  images = a.sites * max(a.seeds, 1) * a.batch * a.local_steps
  # The timing first, in case tracing or reading the trace outlives a time limit.
  print(json.dumps({"bench": "profile_timing", "impl": exp.model.impl, "sites": a.sites, "seeds": a.seeds,
                    "compile_s": round(compile_s, 2), "round_s": round_s,
                    "img_per_s": round(images / round_s, 1) if round_s else None}), flush=True)
  logdir = tempfile.mkdtemp(prefix="lcfed_profile_")
  error = None
  try:   # a profiler that fails (no CUPTI, say) still leaves the timing above to report
    with jax.profiler.trace(logdir):
      for _ in range(a.profile_rounds):
        state, losses, _ = compiled(state, data, weights)
        jax.block_until_ready(losses)
  except Exception as e:  # noqa: BLE001
    error = f"{type(e).__name__}: {e}"[:400]
  found = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
  head = {"device": device_name(jax.devices()[0]), "framework": f"jax {jax.__version__}",
          "method": f"{a.method} stage {exp.stages[0].name}", "impl": exp.model.impl,
          "dtype": str(jnp.dtype(exp.model.dtype)), "compile_s": round(compile_s, 2),
          "round_s": round(round_s, 4) if round_s else None,
          "img_per_s": round(images / round_s, 1) if round_s else None,
          "loss_finite": bool(np.all(np.isfinite(np.asarray(losses)))),
          "xla_cost_analysis": hlo_ops.xla_cost(compiled), "trace": logdir}
  if error:
    head["profiler_error"] = error
  return head, text, found[0] if found else None


def save_fixture(path, planes, module, text, head, max_events):
  """A small recorded test fixture: trace.pbtxt (the lines read, trimmed), hlo.txt (the
  instructions of its ops and the computations they call), meta.json (the head line)."""
  os.makedirs(path, exist_ok=True)
  trimmed = trace_ops.trim(planes, module, max_events)
  ops = set()
  for p in trimmed:
    for ln in p.lines:
      for e in ln.events:
        e.stats = {k: v for k, v in e.stats.items() if not k.startswith("_")}
        ops.add(e.op() or (e.name if ln.name == "XLA Ops" else None))
  note = (f"Recorded by bench/profile_round.py --save_fixture on {head.get('device')}, "
          f"{head.get('framework')}, {time.strftime('%Y-%m-%d')}: {head.get('method')}, "
          f"{head.get('impl')}, {head.get('dtype')}; the first {max_events} events of each line.")
  with open(os.path.join(path, "trace.pbtxt"), "w") as f:
    f.write(trace_ops.to_text_proto(trimmed, note))
  with open(os.path.join(path, "hlo.txt"), "w") as f:
    f.write(hlo_ops.excerpt(text, sorted(o for o in ops if o)))
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(dict(head, note=note), f, indent=1)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="lcfed")
  p.add_argument("--impl", default="auto")
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--depth", type=int, default=0, help="U-Net levels (0: the config's)")
  p.add_argument("--sites", type=int, default=4)
  p.add_argument("--seeds", type=int, default=1, help="seeds in one program (1: none)")
  p.add_argument("--batch", type=int, default=6)
  p.add_argument("--local_steps", type=int, default=50)
  p.add_argument("--dtype", default="auto")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds (median), before profiling")
  p.add_argument("--profile_rounds", type=int, default=2, help="profiled rounds")
  p.add_argument("--top", type=int, default=15, help="ops listed at least")
  p.add_argument("--coverage", type=float, default=0.9, help="list ops until this share")
  p.add_argument("--train_size", type=int, default=16)
  p.add_argument("--peak_tflops", type=float, default=None)
  p.add_argument("--peak_tbps", type=float, default=None)
  p.add_argument("--trace", default=None, help="read this trace (.xplane.pb / .pbtxt) instead of running")
  p.add_argument("--hlo", default=None, help="with --trace: the optimised HLO text of its program")
  p.add_argument("--round_s", type=float, default=None, help="with --trace: the measured round time")
  p.add_argument("--save_fixture", default=None, help="write a trimmed trace + HLO excerpt here")
  p.add_argument("--fixture_events", type=int, default=600, help="events kept per line")
  xla_flags.add_arguments(p)
  a = p.parse_args(argv)
  added = " ".join(xla_flags.flags_for(a.xla_preset, a.xla_flags))   # applied before jax started
  setting = {"bench": "profile", "sites": a.sites, "seeds": a.seeds, "batch": a.batch,
             "image_size": a.size, "base": a.base, "local_steps": a.local_steps,
             "xla_flags": added}
  if a.trace:
    head, xplane = {"trace": a.trace, "round_s": a.round_s}, a.trace
    text = open(a.hlo).read() if a.hlo else ""
    rounds = a.profile_rounds
  else:
    head, text, xplane = run_round(a)
    rounds = a.profile_rounds
  head = dict(setting, **head)
  images = a.sites * max(a.seeds, 1) * a.batch * a.local_steps
  peak = next((v for k, v in PEAKS.items() if k in str(head.get("device", ""))), (None, None))
  peaks = (a.peak_tflops or peak[0], a.peak_tbps or peak[1])
  if xplane is None:
    if text:
      head.update(roofline(hlo_ops.round_cost(text), head.get("round_s"), images, *peaks))
    print(json.dumps(dict(head, error="the profiler wrote no .xplane.pb")), flush=True)
    return 2
  planes = trace_ops.load(xplane)
  module = hlo_ops.module_name(text)
  try:
    times = trace_ops.op_times(planes, module)
  except trace_ops.NoOps as e:
    print(json.dumps(dict(head, error=str(e))), flush=True)
    for line in e.found:
      print(json.dumps({"found": line}), flush=True)
      print(f"found: {line}", file=sys.stderr)
    return 2
  labels = hlo_ops.classify(text, a.batch) if text else {}
  ops, cats, summary = report(times, labels, rounds, a.coverage, a.top)
  total = sum(times.ns.values())
  head.update({"trace_kind": times.kind, "module": module, "lines_read": len(times.lines),
               "device_ms_per_round": round(total / 1e6 / rounds, 3),
               "busy_ms_per_round": round(times.busy_ns / 1e6 / rounds, 3),
               "span_ms_per_round": round(times.span_ns / 1e6 / rounds, 3),
               "other_modules_ms": {m: round(ns / 1e6, 3) for m, ns in times.modules.items()
                                    if m not in (module, "")}})
  if head.get("round_s"):
    head["busy_fraction"] = round(times.busy_ns / 1e9 / rounds / head["round_s"], 4)
  if text:
    head.update(roofline(hlo_ops.round_cost(text), head.get("round_s"), images, *peaks))
  print(json.dumps(head), flush=True)
  for line in ops + cats + [summary]:
    print(json.dumps(line), flush=True)
  if a.save_fixture:
    save_fixture(a.save_fixture, planes, module, text, head, a.fixture_events)
  if text and not any(op in labels for op in times.ns):
    print(json.dumps({"error": "no op of the trace is an instruction of the HLO",
                      "trace_ops": list(times.ns)[:10], "hlo_instructions": list(labels)[:10]}), flush=True)
    return 3
  return 0


if __name__ == "__main__":
  xla_flags.apply_from_argv(sys.argv[1:])
  sys.exit(main())
