"""A GPU profile of one federated round, CONSTRUCTED (not recorded) to the layout the GPU
profiler writes; a trace recorded on an H200 replaces it once a device is lent
(`bench/profile_round.py --save_fixture tests/fixtures/profile_gpu`, read by
tests/test_profile_round.py whenever that folder exists).

No GPU has been available to record one, so this follows the writers' source instead:
XLA's CUPTI collector (xla/backends/profiler/gpu/cupti_collector.cc) puts each kernel or
copy on a line 'Stream #<id>(<kinds>)' of the plane '/device:GPU:<n>', named by its
demangled kernel name, with the stats 'correlation_id' and 'kernel_details', plus the
keys of the annotation XLA's thunk ran under (xla/backends/gpu/runtime/annotation.cc:
'XlaModule:#hlo_module=..,program_id=..#::Thunk:#name=..,hlo_op=..,unique_hlo_op_id=..#'),
so 'hlo_op', 'hlo_module', 'program_id', and 'tf_op' (the outermost annotation's name).
CUPTI's own work lands on a line 'CUPTI overhead'. The host plane '/host:CPU' carries the
launches under the same annotations: host time, which a reader must not count. xprof
derives lines 'XLA Modules' / 'XLA Ops' from these when it converts a trace (variant
'derived': streams without op stats, op events on 'XLA Ops').

The round: a `while` of 50 local steps (known_trip_count) around cuDNN convolutions, each
traced under the scope of its role (lcfed_jax.models.conv.SCOPES) while its kernel is a
forward ('fprop') kernel for all three (the engine writes both gradients as forward
convolutions), one convolution launching two kernels, fusions for instance norm, an
activation, a transpose and Adam, the loop's condition, and a copy no annotation names.
Kernels of stream 14 overlap stream 13, so busy time is less than the kernels' sum.
"""
from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from trace_ops import Event, Line, Plane  # noqa: E402

MODULE = "jit_round_fn"
STEPS = 50
OP = "jit(round_fn)/while/body/closed_call"

HLO = f"""HloModule {MODULE}, is_scheduled=true

%fused_norm (param_0.1: bf16[6,64,64,16]) -> f32[6,16] {{
  %param_0.1 = bf16[6,64,64,16]{{3,2,1,0}} parameter(0)
  %convert.1 = f32[6,64,64,16]{{3,2,1,0}} convert(%param_0.1)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[6,16]{{1,0}} reduce(%convert.1, %constant.1), dimensions={{1,2}}, to_apply=%add
}}

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}}

%fused_relu (param_0.2: bf16[6,64,64,16]) -> bf16[6,64,64,16] {{
  %param_0.2 = bf16[6,64,64,16]{{3,2,1,0}} parameter(0)
  %constant.2 = bf16[] constant(0)
  %broadcast.2 = bf16[6,64,64,16]{{3,2,1,0}} broadcast(%constant.2), dimensions={{}}
  ROOT %maximum.2 = bf16[6,64,64,16]{{3,2,1,0}} maximum(%param_0.2, %broadcast.2)
}}

%fused_transpose (param_0.3: bf16[6,64,64,16]) -> bf16[16,64,64,6] {{
  %param_0.3 = bf16[6,64,64,16]{{3,2,1,0}} parameter(0)
  ROOT %transpose.3 = bf16[16,64,64,6]{{3,2,1,0}} transpose(%param_0.3), dimensions={{3,1,2,0}}
}}

%fused_adam (param_0.4: f32[3,3,16,16], param_1.4: f32[3,3,16,16]) -> f32[3,3,16,16] {{
  %param_0.4 = f32[3,3,16,16]{{3,2,1,0}} parameter(0)
  %param_1.4 = f32[3,3,16,16]{{3,2,1,0}} parameter(1)
  ROOT %subtract.4 = f32[3,3,16,16]{{3,2,1,0}} subtract(%param_0.4, %param_1.4)
}}

%body (p.5: (s32[], bf16[6,64,64,16], f32[3,3,16,16])) -> (s32[], bf16[6,64,64,16], f32[3,3,16,16]) {{
  %p.5 = (s32[], bf16[6,64,64,16]{{3,2,1,0}}, f32[3,3,16,16]{{3,2,1,0}}) parameter(0)
  %x.5 = bf16[6,64,64,16]{{3,2,1,0}} get-tuple-element(%p.5), index=1
  %w.5 = f32[3,3,16,16]{{3,2,1,0}} get-tuple-element(%p.5), index=2
  %wb.5 = bf16[3,3,16,16]{{3,2,1,0}} convert(%w.5)
  %cudnn-conv.1 = (bf16[6,64,64,16]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%x.5, %wb.5), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={{op_name="{OP}/vmap(jvp(SegModel))/down1/conv1/conv_fwd/conv_general_dilated"}}
  %y.1 = bf16[6,64,64,16]{{3,2,1,0}} get-tuple-element(%cudnn-conv.1), index=0
  %input_reduce_fusion.2 = f32[6,16]{{1,0}} fusion(%y.1), kind=kInput, calls=%fused_norm, metadata={{op_name="{OP}/vmap(jvp(SegModel))/down1/norm1/reduce_sum"}}
  %loop_maximum_fusion.4 = bf16[6,64,64,16]{{3,2,1,0}} fusion(%y.1), kind=kLoop, calls=%fused_relu, metadata={{op_name="{OP}/vmap(jvp(SegModel))/down1/max"}}
  %cudnn-conv.2 = (bf16[6,64,64,16]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%loop_maximum_fusion.4, %wb.5), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={{op_name="{OP}/vmap(transpose(jvp(SegModel)))/down1/conv1/conv_dgrad/conv_general_dilated"}}
  %loop_transpose_fusion.5 = bf16[16,64,64,6]{{3,2,1,0}} fusion(%y.1), kind=kLoop, calls=%fused_transpose, metadata={{op_name="{OP}/vmap(transpose(jvp(SegModel)))/down1/conv1/conv_wgrad/transpose"}}
  %g_t.5 = bf16[64,64,6,16]{{3,2,1,0}} copy(%loop_maximum_fusion.4)
  %cudnn-conv.3 = (bf16[16,3,3,16]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%loop_transpose_fusion.5, %g_t.5), window={{size=64x64 pad=1_1x1_1}}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={{op_name="{OP}/vmap(transpose(jvp(SegModel)))/down1/conv1/conv_wgrad/conv_general_dilated"}}
  %loop_add_fusion.9 = f32[3,3,16,16]{{3,2,1,0}} fusion(%w.5, %w.5), kind=kLoop, calls=%fused_adam, metadata={{op_name="{OP}/adam/sub"}}
  %i.5 = s32[] get-tuple-element(%p.5), index=0
  ROOT %t.5 = (s32[], bf16[6,64,64,16]{{3,2,1,0}}, f32[3,3,16,16]{{3,2,1,0}}) tuple(%i.5, %y.1, %loop_add_fusion.9)
}}

%cond (p.6: (s32[], bf16[6,64,64,16], f32[3,3,16,16])) -> pred[] {{
  %p.6 = (s32[], bf16[6,64,64,16]{{3,2,1,0}}, f32[3,3,16,16]{{3,2,1,0}}) parameter(0)
  %i.6 = s32[] get-tuple-element(%p.6), index=0
  %n.6 = s32[] constant({STEPS})
  ROOT %wrapped_compare = pred[] compare(%i.6, %n.6), direction=LT
}}

ENTRY %main.7 (x.7: bf16[6,64,64,16], w.7: f32[3,3,16,16]) -> (s32[], bf16[6,64,64,16], f32[3,3,16,16]) {{
  %x.7 = bf16[6,64,64,16]{{3,2,1,0}} parameter(0)
  %w.7 = f32[3,3,16,16]{{3,2,1,0}} parameter(1)
  %zero.7 = s32[] constant(0)
  %tuple.7 = (s32[], bf16[6,64,64,16]{{3,2,1,0}}, f32[3,3,16,16]{{3,2,1,0}}) tuple(%zero.7, %x.7, %w.7)
  ROOT %while.7 = (s32[], bf16[6,64,64,16]{{3,2,1,0}}, f32[3,3,16,16]{{3,2,1,0}}) while(%tuple.7), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"{STEPS}"}}}}
}}
"""

FPROP = ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_"
         "warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cudnn")
# (stream, hlo op or None, kernel name, category, ns per launch): one local step.
STEP = [
    (13, "cudnn-conv.1", FPROP, "conv fwd", 9000),
    (13, "cudnn-conv.1", "cudnn::engines_precompiled::nchwToNhwcKernel", "conv fwd", 1000),
    (13, "input_reduce_fusion.2", "input_reduce_fusion_2", "norm", 3000),
    (14, "loop_maximum_fusion.4", "loop_maximum_fusion_4", "elementwise fwd", 2000),
    (13, "cudnn-conv.2", FPROP, "conv dgrad", 8000),
    (14, "loop_transpose_fusion.5", "loop_transpose_fusion_5", "copy/transpose", 1500),
    (13, "cudnn-conv.3", FPROP, "conv wgrad", 12000),
    (13, "loop_add_fusion.9", "loop_add_fusion_9", "optimizer/server/sampling", 700),
    (13, "wrapped_compare", "wrapped_compare", "optimizer/server/sampling", 300),
    (13, None, "MemcpyD2D", "copy/transpose", 500),
]


def _device_event(op, kernel, start, ns, corr, derived):
  stats = {"correlation_id": corr, "kernel_details": "regs:96 static_shared:0 grid:384,1,1 block:128,1,1"}
  if op is not None and not derived:
    stats.update(hlo_op=op, hlo_module=MODULE, program_id=7, tf_op="XlaModule",
                 unique_hlo_op_id=100 + corr % 50)
  return Event(kernel, start, start + ns, stats)


def build(variant: str = "streams", rounds: int = 2):
  """(planes, expected): the trace of `rounds` rounds and what a reader must find:
  {'op_ns': {op: total ns}, 'category_ns': {category: ns}, 'busy_ns': union}. Variants:
  'streams' (as recorded), 'derived' (xprof's 'XLA Ops' line), 'unannotated' (no op stats)."""
  lines = collections.defaultdict(list)
  xla_ops, host = [], []
  op_ns, cat_ns = collections.Counter(), collections.Counter()
  intervals = []
  t, corr = 1_000_000.0, 1
  for _ in range(rounds * STEPS):
    clock = {13: t, 14: t + 2500}   # stream 14 starts while stream 13 is busy
    for stream, op, kernel, cat, ns in STEP:
      start = clock[stream]
      lines[stream].append(_device_event(op, kernel, start, ns, corr, variant != "streams"))
      if op is not None and variant == "derived":
        xla_ops.append(Event(op, start, start + ns, {"hlo_module": MODULE}))
      host.append(Event("Thunk", start - 40_000, start - 35_000, {"hlo_op": op or "?", "hlo_module": MODULE}))
      clock[stream] = start + ns + 200
      corr += 1
      if op is None and variant == "derived":
        continue   # xprof's op line holds annotated work only
      op_ns[op or f"[kernel] {kernel}"] += ns
      cat_ns[cat] += ns
      intervals.append((start, start + ns))
    t = max(clock.values()) + 5000
  device_lines = [Line(f"Stream #{s}(Kernel,MemcpyD2D)" if s == 13 else f"Stream #{s}(Kernel)", evs)
                  for s, evs in sorted(lines.items())]
  device_lines.append(Line("CUPTI overhead", [Event("CUPTI buffer flush", 1e6, 1e6 + 9e6, {})]))
  if variant == "derived":
    device_lines += [Line("XLA Modules", [Event(MODULE, 1e6, t, {})]), Line("XLA Ops", xla_ops)]
  planes = [
      Plane("/host:metadata", [], {"jax_version": "constructed"}),
      Plane("/device:GPU:0", device_lines, {"devvendor": "Nvidia", "gpu_device_name": "NVIDIA H200"}),
      Plane("/host:CPU", [Line("python", [Event("$profiler.py trace", 0, t, {})]),
                          Line("tf_XLAGpuLaunch/1", host)], {}),
      Plane("Task Environment", [], {}),
  ]
  from trace_ops import _union
  return planes, {"op_ns": dict(op_ns), "category_ns": dict(cat_ns), "busy_ns": _union(intervals)}
