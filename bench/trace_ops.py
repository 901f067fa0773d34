"""Device time per HLO op, read from a `jax.profiler` trace (an XSpace protobuf).

Where the ops are, by backend (the XSpace as the profiler writes it, `*.xplane.pb`):

- GPU: a plane '/device:GPU:<n>' per GPU, written from CUPTI's activity records. Its
  lines are the CUDA streams, 'Stream #<id>(<kinds>)' (e.g. 'Stream #13(Kernel,MemcpyD2D)'),
  and the events on them are kernels and copies, named by the (demangled) kernel name,
  e.g. 'loop_multiply_fusion_3' or 'sm90_xmma_fprop_implicit_gemm_...'. XLA runs every
  thunk under an annotation 'XlaModule:#hlo_module=<m>,program_id=<id>#::Thunk:#name=<op
  path>,hlo_op=<instruction>,...#'; the tracer stores the annotation's keys as stats of
  each event it launched: 'hlo_op' (the optimised HLO instruction), 'hlo_module',
  'program_id', with 'correlation_id' and 'kernel_details' beside them. A CUPTI overhead
  line ('CUPTI overhead') and the host's planes ('/host:CPU', whose threads carry host
  annotations with the same keys) are not device time. Lines 'XLA Modules' / 'XLA Ops'
  are derived by xprof when it converts a trace; a trace written that way is read from
  its 'XLA Ops' line when its streams carry no op stats.
- CPU: no device plane; '/host:CPU' has one line per thread, and XLA:CPU's thunks are
  events with the same 'hlo_op' / 'hlo_module' stats on the threads that ran them
  ('tf_XLAEigen/...', 'tf_XLAPjRtCpuClient/...'); control flow ('while', ...) nests the
  ops it runs on the same line.

`op_times` sums each op's exclusive time (minus ops nested inside it on its line); when
nothing in the trace is an op it raises `NoOps` with a description of the planes and lines
it found. `to_text_proto` writes planes back as an XSpace text proto (for test fixtures;
`ProfileData.from_text_proto` reads it).
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Dict, List, Optional, Sequence

DEVICE_PREFIXES = ("/device:GPU:", "/device:TPU:", "/device:CUSTOM:")
CONTROL = ("while", "conditional", "call")   # host-side ops whose time is their body's


@dataclasses.dataclass
class Event:
  name: str
  start_ns: float
  end_ns: float
  stats: Dict[str, object]

  def op(self) -> Optional[str]:
    """The HLO instruction this event ran, from its stats or an annotation in its name."""
    hlo = self.stats.get("hlo_op")
    if hlo:
      return str(hlo)
    m = re.search(r"[#,]hlo_op=([^,#]+)", self.name)
    return m.group(1) if m else None


@dataclasses.dataclass
class Line:
  name: str
  events: List[Event]


@dataclasses.dataclass
class Plane:
  name: str
  lines: List[Line]
  stats: Dict[str, object]


def _op(e: Event, line: str) -> Optional[str]:
  """An event's op; on xprof's derived 'XLA Ops' line the event's name is the op."""
  return e.op() or (e.name if line == "XLA Ops" else None)


def _stats(pairs) -> Dict[str, object]:
  return {k: v for k, v in pairs if k is not None}


def load(path: str) -> List[Plane]:
  """The planes of an '.xplane.pb' file, or of an XSpace text proto ('.pbtxt')."""
  from jax.profiler import ProfileData
  if path.endswith(".pbtxt"):
    with open(path) as f:
      data = ProfileData.from_text_proto(f.read())
  else:
    data = ProfileData.from_file(path)
  return [Plane(p.name, [Line(ln.name, [Event(e.name, e.start_ns, e.end_ns, _stats(e.stats))
                                        for e in ln.events]) for ln in p.lines], _stats(p.stats))
          for p in data.planes]


class NoOps(RuntimeError):
  """Nothing in the trace is an HLO op; `found` describes what is there."""

  def __init__(self, msg: str, found: List[Dict]):
    super().__init__(msg)
    self.found = found


def describe(planes: Sequence[Plane]) -> List[Dict]:
  """One dict per line: plane, line, events, events with an op, one example event."""
  out = []
  for p in planes:
    for ln in p.lines:
      ex = next((e for e in ln.events if e.end_ns > e.start_ns), None)
      out.append({"plane": p.name, "line": ln.name, "events": len(ln.events),
                  "op_events": sum(_op(e, ln.name) is not None for e in ln.events),
                  "example": None if ex is None else {"name": ex.name[:120],
                                                     "stats": sorted(ex.stats)[:12]}})
    if not p.lines:
      out.append({"plane": p.name, "line": None, "events": 0, "op_events": 0, "example": None})
  return out


def _device_lines(plane: Plane) -> List[Line]:
  streams = [ln for ln in plane.lines if ln.name.startswith("Stream #")]
  if any(e.op() for ln in streams for e in ln.events):
    return streams
  return [ln for ln in plane.lines if ln.name == "XLA Ops"]


def source_lines(planes: Sequence[Plane]):
  """(kind, [(plane name, line)]): the lines holding the device's ops. A trace with a
  device plane is read there alone (its host planes hold launches, not device time)."""
  device = [p for p in planes if p.name.startswith(DEVICE_PREFIXES)]
  if device:
    return "device", [(p.name, ln) for p in device for ln in _device_lines(p)]
  host = [p for p in planes if p.name == "/host:CPU"]
  return "host", [(p.name, ln) for p in host for ln in p.lines if any(e.op() for e in ln.events)]


@dataclasses.dataclass
class OpTimes:
  kind: str                      # 'device' or 'host'
  ns: collections.Counter        # op -> exclusive ns (the selected module, or all)
  kernels: Dict[str, str]        # op -> its longest kernel's name (GPU) or event name
  modules: collections.Counter   # hlo_module -> ns, every module seen
  lines: List[str]               # 'plane/line' read
  busy_ns: float                 # union of the op intervals (device busy time)
  span_ns: float                 # first op start to last op end


def _self_times(events: List[Event]):
  """[(event, exclusive ns)] of one line's events; nested events are subtracted."""
  evs = sorted((e for e in events if e.end_ns > e.start_ns), key=lambda e: (e.start_ns, -e.end_ns))
  out, stack = [], []
  for e in evs:
    while stack and stack[-1][0] <= e.start_ns:
      stack.pop()
    if stack:
      out[stack[-1][1]][1] -= min(e.end_ns, stack[-1][0]) - e.start_ns
    out.append([e, e.end_ns - e.start_ns])
    stack.append((e.end_ns, len(out) - 1))
  return out


def _union(intervals) -> float:
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e > end:
      total += e - max(s, end)
      end = e
  return total


def op_times(planes: Sequence[Plane], module: Optional[str] = None) -> OpTimes:
  """Exclusive time per op of `module` (every module if None or not in the trace).
  Device events without an op (an unannotated copy or kernel) count as '[kernel] name'."""
  kind, lines = source_lines(planes)
  per_module = collections.defaultdict(collections.Counter)
  longest: Dict[str, tuple] = {}
  spans = collections.defaultdict(list)
  for _, ln in lines:
    # Host threads nest ops inside control flow; kernels on a stream never nest, and a
    # derived line's events may overlap (concurrent streams) without nesting.
    pairs = _self_times(ln.events) if kind == "host" else [
        (e, e.end_ns - e.start_ns) for e in ln.events if e.end_ns > e.start_ns]
    for e, ns in pairs:
      op = _op(e, ln.name)
      if op is None and (kind == "host" or e.name.startswith("CUPTI")):
        continue
      if kind == "host" and op.split(".")[0] in CONTROL:
        continue
      mod = str(e.stats.get("hlo_module") or "")
      key = op or f"[kernel] {e.name[:80]}"
      per_module[mod][key] += max(ns, 0)
      spans[mod].append((e.start_ns, e.end_ns))
      if key not in longest or longest[key][0] < ns:
        longest[key] = (ns, e.name)
  modules = collections.Counter({m: sum(c.values()) for m, c in per_module.items()})
  if not modules or sum(modules.values()) <= 0:
    raise NoOps(f"no HLO op events in the trace's {kind} lines", describe(planes))
  keep = [module, ""] if module in per_module else list(per_module)
  ns = sum((per_module[m] for m in keep if m in per_module), collections.Counter())
  iv = [iv for m in keep for iv in spans.get(m, [])]
  return OpTimes(kind, ns, {k: longest[k][1] for k in ns}, modules,
                 [f"{p}/{ln.name}" for p, ln in lines], _union(iv),
                 max(e for _, e in iv) - min(s for s, _ in iv))


# ---- writing planes back (fixtures) -----------------------------------------------------

def _q(s: str) -> str:
  return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _stat(sid: int, value) -> str:
  if isinstance(value, bool) or isinstance(value, int):
    return f"stats {{ metadata_id: {sid} int64_value: {int(value)} }}"
  if isinstance(value, float):
    return f"stats {{ metadata_id: {sid} double_value: {value!r} }}"
  return f"stats {{ metadata_id: {sid} str_value: {_q(value)} }}"


def to_text_proto(planes: Sequence[Plane], header: str = "") -> str:
  """An XSpace text proto of `planes` (times in ns; events on a line keep their order)."""
  out = [f"# {ln}" for ln in header.splitlines()]
  for pid, p in enumerate(planes, 1):
    ev_ids: Dict[str, int] = {}
    st_ids: Dict[str, int] = {}
    body = []
    sid = lambda k: st_ids.setdefault(k, len(st_ids) + 1)
    plane_stats = [_stat(sid(k), v) for k, v in p.stats.items()]
    for lid, ln in enumerate(p.lines, 1):
      t0 = int(min((e.start_ns for e in ln.events), default=0))
      evs = []
      for e in ln.events:
        mid = ev_ids.setdefault(e.name, len(ev_ids) + 1)
        stats = " ".join(_stat(sid(k), v) for k, v in e.stats.items())
        evs.append(f"    events {{ metadata_id: {mid} offset_ps: {int(round((e.start_ns - t0) * 1000))} "
                   f"duration_ps: {int(round((e.end_ns - e.start_ns) * 1000))} {stats} }}")
      body.append(f"  lines {{ id: {lid} name: {_q(ln.name)} timestamp_ns: {t0}\n" + "\n".join(evs) + "\n  }")
    meta = [f"  event_metadata {{ key: {i} value {{ id: {i} name: {_q(n)} }} }}" for n, i in ev_ids.items()]
    smeta = [f"  stat_metadata {{ key: {i} value {{ id: {i} name: {_q(n)} }} }}" for n, i in st_ids.items()]
    out.append(f"planes {{\n  id: {pid} name: {_q(p.name)}\n" + "\n".join(
        body + meta + smeta + ["  " + s for s in plane_stats]) + "\n}")
  return "\n".join(out) + "\n"


def trim(planes: Sequence[Plane], module: Optional[str], max_events: int) -> List[Plane]:
  """The planes and lines `op_times` reads, with the first `max_events` events of
  `module` (and unannotated device events) on each line: a small recorded fixture."""
  _, lines = source_lines(planes)
  keep = {id(ln) for _, ln in lines}
  out = []
  for p in planes:
    lns = []
    for ln in p.lines:
      if id(ln) not in keep:
        continue
      evs = [e for e in sorted(ln.events, key=lambda e: e.start_ns)
             if module is None or str(e.stats.get("hlo_module") or module) == module]
      lns.append(Line(ln.name, evs[:max_events]))
    if lns:
      out.append(Plane(p.name, lns, dict(p.stats)))
  return out
