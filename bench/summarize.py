"""A short table of a bench/gpu_check.sh run, from its bench.jsonl.

  python bench/summarize.py gpu_out/bench.jsonl

Prints each step's status, one row per measured configuration (img/s, compile and round
seconds, peak memory), LC-Fed's speed over the PyTorch official pattern, and the profile's
categories, busy fraction and roofline fractions: what bench/README.md's table needs.
"""
from __future__ import annotations

import json
import sys


def load(path):
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("{"):
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          pass
  return rows


def fmt(v, nd=2):
  if v is None:
    return "-"
  return f"{v:,.{nd}f}" if isinstance(v, float) else str(v)


def main(path):
  rows = load(path)
  print("| step | status | wall s | limit s |")
  print("|---|---|---|---|")
  for r in rows:
    if "status" in r:
      print(f"| {r['step']} | {r['status']} (rc {r['rc']}) | {r['wall_s']} | {r['limit_s']} |")
  print()
  print("| step | impl | sites x seeds | flags | compile s | round s | img/s | peak GB |")
  print("|---|---|---|---|---|---|---|---|")
  torch_eager = None
  lcfed = None
  for r in rows:
    if r.get("impl") == "torch_eager" and r.get("img_per_s"):
      torch_eager = r["img_per_s"]
    if "img_per_s" not in r and not r.get("timed_out") and not r.get("failed"):
      continue
    if r.get("step") == "profile" and "rank" not in r and "category" not in r:
      lcfed = r.get("img_per_s")
    impl = r.get("impl", "?") + (f" ({r['impl_used']})" if r.get("impl_used") not in (None, r.get("impl")) else "")
    mem = r.get("peak_mem_bytes")
    flags = r.get("xla_flags", "") or ""
    flags = " ".join(f for f in flags.split() if "gpu" in f or "command" in f)
    state = "timed out" if r.get("timed_out") else ("failed" if r.get("failed") else "")
    print(f"| {r.get('step')} | {impl} | {r.get('sites', '-')} x {r.get('seeds', 1) or 1} | {flags} | "
          f"{fmt(r.get('compile_s'))} | {fmt(r.get('round_s'), 3)} | {fmt(r.get('img_per_s'), 1)} {state} | "
          f"{fmt(mem / 1e9 if mem else None, 1)} |")
  if lcfed and torch_eager:
    print(f"\nLC-Fed stage A (profile step) / PyTorch official pattern: {lcfed / torch_eager:.2f}x")
  head = next((r for r in rows if r.get("step") == "profile" and "trace_kind" in r), None)
  if head:
    keys = ("device_ms_per_round", "busy_ms_per_round", "busy_fraction", "flops_per_round", "bytes_per_round",
            "achieved_tflops", "achieved_tbps", "flops_fraction", "bandwidth_fraction", "roofline_img_per_s")
    print("\nprofile: " + ", ".join(f"{k}={head[k]}" for k in keys if k in head))
    for r in rows:
      if r.get("step") == "profile" and "category" in r and "rank" not in r:
        print(f"  {r['category']:28s} {100 * r['share']:5.1f}%  {r['ms_per_round']:9.2f} ms/round")
  errors = [r for r in rows if r.get("step") == "profile" and ("error" in r or "found" in r)]
  for r in errors[:12]:
    print("profile:", json.dumps(r)[:300])


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "gpu_out/bench.jsonl")
