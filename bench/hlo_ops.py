"""What an optimised HLO module does: each instruction's category, and a round's work.

Both read the text of `compiled.as_text()` (the optimised HLO the device runs):

- `classify(text, batch)`: {instruction name: (category, where in the model)} for the
  profile. A convolution's role comes first from the named scope `site_conv` traces it
  under (conv_fwd / conv_dgrad / conv_wgrad, lcfed_jax/models/conv.py), which every
  implementation carries (cuDNN and Pallas calls, fused convolutions, the GEMMs of the
  `grouped` weight gradient); then from the cuDNN call's kind; then from its shapes.
- `round_cost(text)`: FLOPs and bytes a call of the module moves, with every `while`
  body counted as many times as XLA's `known_trip_count` says. XLA's own
  `compiled.cost_analysis()` counts a loop body once, whatever its trip count, so for a
  round (a `lax.scan` over local steps) it reports one local step; this walks the module
  instead. FLOPs are those of convolutions and dots (2 per multiply-add: what the tensor
  cores run); bytes are each top-level instruction's operands plus its result (a
  dynamic slice or in-place update counts the slice, as XLA does), i.e. the traffic
  with no reuse across instructions: an upper bound for HBM traffic, an estimate.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Dict, List, Optional, Tuple

CUDNN = {"__cudnn$convForward": "conv fwd", "__cudnn$convBackwardInput": "conv dgrad",
         "__cudnn$convBackwardFilter": "conv wgrad", "__cudnn$convBiasActivationForward": "conv fwd"}
GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
# Scopes lcfed_jax.models.conv traces the convolution's three parts under.
CONV_SCOPES = {"conv_fwd": "conv fwd", "conv_dgrad": "conv dgrad", "conv_wgrad": "conv wgrad"}
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "partition-id", "replica-id", "opt-barrier", "add-dependency", "while", "call",
        "conditional", "async-start", "async-done", "async-update"}
COPIES = {"copy", "transpose", "copy-start", "copy-done", "dynamic-slice", "dynamic-update-slice",
          "slice", "concatenate", "pad", "broadcast", "reshape"}
MOVES = {"parameter", "constant", "transpose", "copy", "bitcast", "reshape", "broadcast", "slice",
         "concatenate", "pad", "dynamic-slice", "dynamic-update-slice"}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
         "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
         "c64": 8, "c128": 16}

_HEAD = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


class Instr:
  __slots__ = ("name", "shape", "opcode", "operands", "raw", "attrs", "root")

  def __init__(self, name, shape, opcode, raw, attrs, root):
    self.name, self.shape, self.opcode = name, shape, opcode
    self.raw, self.attrs, self.root = raw, attrs, root
    self.operands = re.findall(r"%([\w.\-]+)", raw)

  def attr(self, pattern: str) -> Optional[str]:
    m = re.search(pattern, self.attrs)
    return m.group(1) if m else None

  @property
  def op_name(self) -> str:
    return self.attr(r'op_name="([^"]*)"') or ""

  @property
  def target(self) -> Optional[str]:
    return self.attr(r'custom_call_target="([^"]+)"')

  def called(self) -> List[str]:
    names = re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", self.attrs)
    branches = self.attr(r"branch_computations=\{([^}]*)\}")
    return names + ([b.strip().lstrip("%") for b in branches.split(",")] if branches else [])


def _split_call(rest: str) -> Tuple[str, str]:
  """'a, b), attrs' -> ('a, b', 'attrs'): the operand list up to its closing parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ""


class Module:
  """The computations of an HLO module's text: {name: [Instr]}, and every instruction's
  shape by name (operands are printed by name only)."""

  def __init__(self, text: str):
    self.computations: Dict[str, List[Instr]] = {}
    self.headers: Dict[str, str] = {}
    self.lines: Dict[str, str] = {}   # instruction name -> its line of text
    self.shapes: Dict[str, str] = {}
    self.entry: Optional[str] = None
    current = None
    for line in text.splitlines():
      if not line.startswith(" "):
        m = _HEAD.match(line)
        current = None
        if m and "->" in line:
          current = self.computations.setdefault(m.group(1), [])
          self.headers[m.group(1)] = line
          if line.startswith("ENTRY"):
            self.entry = m.group(1)
        continue
      m = _INSTR.match(line)
      if m is None or current is None:
        continue
      name, shape, opcode, rest = m.groups()
      operands, attrs = _split_call(rest)
      ins = Instr(name, shape, opcode, operands, attrs, line.lstrip().startswith("ROOT"))
      current.append(ins)
      self.shapes[name] = shape
      self.lines[name] = line
    self.by_name = {i.name: i for comp in self.computations.values() for i in comp}

  def bytes_of(self, shape: str) -> float:
    return sum(BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(shape))

  def dims(self, name_or_shape: str) -> List[int]:
    shape = self.shapes.get(name_or_shape, name_or_shape)
    found = _ARRAY.findall(shape)
    return [int(d) for d in found[0][1].split(",") if d] if found else []

  def ops_inside(self, ins: Instr) -> List[Instr]:
    """Every instruction of the computations `ins` calls, recursively."""
    out, todo, seen = [], list(ins.called()), set()
    while todo:
      c = todo.pop()
      if c in seen or c not in self.computations:
        continue
      seen.add(c)
      for i in self.computations[c]:
        out.append(i)
        todo.extend(i.called())
    return out


@functools.lru_cache(maxsize=2)
def parse(text: str) -> Module:
  """The module of `text`, parsed once for the profile's several readings."""
  return Module(text)


# ---- FLOPs and bytes ----------------------------------------------------------------------

def _window_taps(ins: Instr, lhs: List[int], out: List[int], lhs_labels: str, out_labels: str) -> float:
  """Kernel taps that land inside the (unpadded) input, summed over output positions, as
  XLA counts them: per spatial dimension, output o and tap k read o*stride + k*dilation
  - pad_lo, which must lie in the input."""
  window = ins.attr(r"window=\{([^}]*)\}") or ""
  field = lambda key: (re.search(key + r"=([\d_x]+)", window) or [None, ""])[1]
  sizes = [int(s) for s in field("size").split("x") if s]
  if not sizes or field("lhs_dilate"):
    return float(math.prod(sizes) * math.prod(out[out_labels.index(str(d))] for d in range(len(sizes))))
  pads = [tuple(int(v) for v in p.split("_")) for p in field("pad").split("x")] if field("pad") else [(0, 0)] * len(sizes)
  strides = [int(s) for s in field("stride").split("x")] if field("stride") else [1] * len(sizes)
  dil = [int(s) for s in field("rhs_dilate").split("x")] if field("rhs_dilate") else [1] * len(sizes)
  total = 1.0
  for d, k in enumerate(sizes):
    n_in, n_out = lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))]
    total *= sum(1 for o in range(n_out) for t in range(k)
                 if 0 <= o * strides[d] + t * dil[d] - pads[d][0] < n_in)
  return total


def _conv_flops(m: Module, ins: Instr) -> float:
  """2 x (output element, in-bounds tap) pairs x input features per group, in terms of
  the forward convolution the dimension labels describe: a cuDNN backward call's result
  is the forward input (BackwardInput) or kernel (BackwardFilter), its operands the rest."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not labels or len(ins.operands) < 2:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  result, a, b = m.dims(ins.shape), m.dims(ins.operands[0]), m.dims(ins.operands[1])
  lhs, rhs, out = {"__cudnn$convBackwardInput": (result, b, a),
                   "__cudnn$convBackwardFilter": (a, result, b)}.get(ins.target, (a, b, result))
  if not (lhs and rhs and out) or "i" not in rhs_labels:
    return 0.0
  spatial = math.prod(out[i] for i, c in enumerate(out_labels) if c.isdigit())
  per_position = math.prod(out) / max(spatial, 1)   # batch x output features
  taps = _window_taps(ins, lhs, out, lhs_labels, out_labels)
  return 2.0 * per_position * taps * rhs[rhs_labels.index("i")]


def _dot_flops(m: Module, ins: Instr) -> float:
  lhs = m.dims(ins.operands[0]) if ins.operands else []
  out = m.dims(ins.shape)
  contracting = ins.attr(r"lhs_contracting_dims=\{([\d,]*)\}")
  if contracting is None:   # a cuBLAS call: the dimension numbers are in its backend config
    contracting = ins.attr(r'"lhs_contracting_dimensions":\[([^\]]*)\]') or ""
    contracting = contracting.replace('"', "")
  k = math.prod(lhs[int(d)] for d in contracting.split(",") if d.strip()) if lhs else 0
  return 2.0 * math.prod(out) * k


def instr_flops(m: Module, ins: Instr) -> float:
  if ins.opcode == "convolution" or (ins.opcode == "custom-call" and ins.target in CUDNN):
    return _conv_flops(m, ins)
  if ins.opcode == "dot" or (ins.opcode == "custom-call" and ins.target in GEMM_TARGETS):
    return _dot_flops(m, ins)
  if ins.opcode == "fusion":
    return sum(instr_flops(m, i) for i in m.ops_inside(ins) if i.opcode != "fusion")
  return 0.0


def _fusion_io_bytes(m: Module, ins: Instr) -> float:
  """A fusion's operands and result, where a parameter read only through dynamic slices
  counts the slices, and a result updated in place counts the update."""
  inner = [i for c in ins.called() for i in m.computations.get(c, [])]
  params = {int(i.raw): i for i in inner if i.opcode == "parameter" and i.raw.strip().isdigit()}
  users: Dict[str, List[Instr]] = {}
  for i in inner:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  total = m.bytes_of(ins.shape)
  root = next((i for i in inner if i.root), None)
  if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
    total = 2 * m.bytes_of(m.shapes.get(root.operands[1], ""))
  for pos, name in enumerate(ins.operands):
    p = params.get(pos)
    us = users.get(p.name, []) if p is not None else []
    sliced = lambda u: u.opcode in ("dynamic-slice", "slice")
    in_place = lambda u: u.opcode == "dynamic-update-slice" and u.operands[0] == p.name
    if us and all(sliced(u) or in_place(u) for u in us):
      # Read through slices only; a buffer updated in place adds nothing to the result's count.
      total += sum(m.bytes_of(u.shape) for u in us if sliced(u))
    else:
      total += m.bytes_of(m.shapes.get(name, ""))
  return total


def instr_bytes(m: Module, ins: Instr) -> float:
  if ins.opcode in FREE:
    return 0.0
  if ins.opcode == "fusion":
    return _fusion_io_bytes(m, ins)
  if ins.opcode == "dynamic-slice":
    return 2 * m.bytes_of(ins.shape)
  if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
    return 2 * m.bytes_of(m.shapes.get(ins.operands[1], ""))
  # A cuDNN / cuBLAS call's result is (output, u8[] workspace): the workspace is scratch.
  out = m.bytes_of(ins.shape.split(", u8[")[0]) if ins.opcode == "custom-call" else m.bytes_of(ins.shape)
  return out + sum(m.bytes_of(m.shapes.get(o, "")) for o in ins.operands)


def trip_count(ins: Instr) -> Optional[int]:
  n = ins.attr(r'"known_trip_count":\{"n":"(\d+)"')
  return int(n) if n is not None else None


def round_cost(text: str) -> Dict:
  """{'flops', 'conv_flops', 'dot_flops', 'bytes', 'loops': [[name, trips]],
  'unknown_trip_loops'} of one call of the module."""
  m = parse(text)
  acc = {"flops": 0.0, "conv_flops": 0.0, "dot_flops": 0.0, "bytes": 0.0, "loops": [],
         "unknown_trip_loops": 0}

  def walk(comp: str, mult: float, depth: int):
    for ins in m.computations.get(comp, []):
      if ins.opcode == "while":
        n = trip_count(ins)
        acc["loops"].append([ins.name, n])
        acc["unknown_trip_loops"] += n is None
        body = ins.attr(r"body=%?([\w.\-]+)")
        cond = ins.attr(r"condition=%?([\w.\-]+)")
        walk(body, mult * (n or 1), depth + 1)
        walk(cond, mult * ((n or 1) + 1), depth + 1)
        continue
      if ins.opcode in ("call", "conditional") or (ins.opcode == "custom-call" and ins.called()):
        for c in ins.called():
          walk(c, mult / max(1, len(ins.called())) if ins.opcode == "conditional" else mult, depth + 1)
        if ins.opcode != "custom-call":
          continue
      f = instr_flops(m, ins)
      inside = m.ops_inside(ins) if ins.opcode == "fusion" else [ins]
      conv = any(i.opcode == "convolution" or i.target in CUDNN for i in inside)
      acc["flops"] += mult * f
      acc["conv_flops" if conv else "dot_flops"] += mult * f
      acc["bytes"] += mult * instr_bytes(m, ins)

  if m.entry:
    walk(m.entry, 1.0, 0)
  return acc


# ---- categories ---------------------------------------------------------------------------

def _is_moves_only(m: Module, ins: Instr) -> bool:
  inner = m.ops_inside(ins)
  return bool(inner) and all(i.opcode in MOVES for i in inner) and any(
      i.opcode not in ("parameter", "constant", "bitcast") for i in inner)


def _category(m: Module, ins: Instr, batch: int) -> str:
  path = ins.op_name
  backward = "transpose(" in path
  inner = m.ops_inside(ins) if ins.opcode == "fusion" else []
  has_conv = (ins.opcode == "convolution" or ins.target in CUDNN
              or any(i.opcode == "convolution" or i.target in CUDNN for i in inner)
              or path.endswith("conv_general_dilated"))
  has_gemm = ins.opcode == "dot" or ins.target in GEMM_TARGETS or any(i.opcode == "dot" for i in inner)
  if ins.opcode in COPIES or (ins.opcode == "fusion" and _is_moves_only(m, ins)):
    return "copy/transpose"
  scope = next((CONV_SCOPES[s] for s in re.findall(r"(conv_fwd|conv_dgrad|conv_wgrad)", path)[-1:]), None)
  pallas = ins.opcode == "custom-call" and ins.target and ("triton" in ins.target or "mosaic" in ins.target)
  if scope and (has_conv or has_gemm or pallas):
    return scope
  if ins.target in CUDNN:
    return CUDNN[ins.target]
  if has_conv:
    first = (m.dims(ins.shape) or [0])[0]
    return "conv fwd" if not backward else ("conv dgrad" if first == batch else "conv wgrad")
  if "reduce-window" in ins.name or "select-and-scatter" in ins.name or ins.opcode in (
      "reduce-window", "select-and-scatter"):
    return "max-pool" + (" (bwd)" if backward or "select-and-scatter" in ins.name else "")
  if re.search(r"(^|[/(])\w*norm\w*([/)]|$)", path, re.IGNORECASE):
    return "norm" + (" (bwd)" if backward else "")
  if "/hc/" in path or "/pcs_" in path:
    return "HC/PCS"
  if "jvp(" in path:
    return "elementwise bwd" if backward else "elementwise fwd"
  return "optimizer/server/sampling"


def classify(text: str, batch: int) -> Dict[str, Tuple[str, str]]:
  """{instruction name: (category, where in the model)} of every instruction."""
  m = parse(text)
  out = {}
  for ins in m.by_name.values():
    where = "/".join(p for p in ins.op_name.split("/")
                     if not p.startswith(("jit(", "while", "body", "closed_call")))
    out[ins.name] = (_category(m, ins, batch), where[-120:])
  return out


def excerpt(text: str, names) -> str:
  """The module's text cut down to the instructions `names` (in one ENTRY computation)
  and every computation they call: what `classify` needs to label them."""
  m = parse(text)
  keep = [n for n in names if n in m.lines]
  loops = ("while", "call", "conditional")   # their bodies are ops of their own
  called, todo = [], [c for n in keep if m.by_name[n].opcode not in loops for c in m.by_name[n].called()]
  while todo:
    c = todo.pop(0)
    if c in m.computations and c not in called:
      called.append(c)
      todo.extend(x for i in m.computations[c] for x in i.called())
  out = [f"HloModule {module_name(text) or 'module'}", ""]
  for c in called:
    out += [m.headers[c]] + [m.lines[i.name] for i in m.computations[c]] + ["}", ""]
  out += ["ENTRY %excerpt () -> () {"] + [m.lines[n] for n in keep] + ["}", ""]
  return "\n".join(out)


def module_name(text: str) -> Optional[str]:
  m = re.match(r"\s*HloModule\s+([\w.\-]+)", text)
  return m.group(1) if m else None


def xla_cost(compiled) -> Dict:
  """XLA's own cost analysis of a compiled program (loop bodies counted once)."""
  try:
    ca = compiled.cost_analysis()
  except Exception as e:  # noqa: BLE001 - a backend without cost analysis
    return {"error": str(e)[:200]}
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {k: float(ca[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in (ca or {})}

