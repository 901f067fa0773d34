"""bench/profile_round.py reads device time per op from real and GPU-layout traces.

- CPU: a real `jax.profiler` trace of a small jitted program (two site convolutions
  under `vmap`, their gradients, a named norm, a `lax.scan`), read through the script's
  `--trace/--hlo` path: every op is an instruction of the program's HLO, the three
  convolution roles are told apart, another program run during the trace is kept out,
  and the listed ops cover >= 90% of the time.
- GPU: the constructed trace of tests/gpu_trace_fixture.py (stream lines, and xprof's
  derived 'XLA Ops' line): per-op and per-category times equal the fixture's, host
  launches and CUPTI overhead are not counted, overlapping streams give busy < sum.
  A trace without op stats, or an HLO of another program, exits non-zero with what it
  found; a recorded H200 trace (tests/fixtures/profile_gpu, once saved) is read too.
- FLOPs and bytes of `hlo_ops.round_cost` equal XLA's cost analysis on a loop-free
  program and multiply a loop body by its trip count (which XLA's does not).
"""
from __future__ import annotations

import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_trace_fixture as fixture  # noqa: E402
import hlo_ops  # noqa: E402
import profile_round  # noqa: E402
import trace_ops  # noqa: E402

from lcfed_jax.models.conv import site_conv  # noqa: E402

RECORDED = os.path.join(ROOT, "tests", "fixtures", "profile_gpu")


def _run(capsys, *args):
  rc = profile_round.main([str(a) for a in args])
  lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
  return rc, lines


def _parts(lines):
  head = lines[0]
  ops = [ln for ln in lines if "rank" in ln]
  cats = {ln["category"]: ln["ms_per_round"] for ln in lines if "category" in ln and "rank" not in ln}
  summary = next(ln for ln in lines if ln.get("summary"))
  return head, ops, cats, summary


# ---- CPU: a real trace --------------------------------------------------------------------

def _site_loss(w, x):
  y = jax.nn.relu(site_conv(x, w["c1"], "map"))
  with jax.named_scope("norm1"):
    y = (y - y.mean((1, 2), keepdims=True)) * lax.rsqrt(y.var((1, 2), keepdims=True) + 1e-5)
  return jnp.mean(site_conv(y, w["c2"], "map") ** 2)


def step(w, x):
  def body(w, _):
    g = jax.vmap(jax.grad(_site_loss))(w, x)
    return jax.tree.map(lambda p, d: p - 0.1 * d, w, g), None
  return lax.scan(body, w, None, length=2)[0]


@pytest.fixture(scope="module")
def cpu_trace(tmp_path_factory):
  rng = np.random.default_rng(0)
  w = {"c1": jnp.asarray(rng.normal(size=(2, 3, 3, 3, 8)), jnp.float32),
       "c2": jnp.asarray(rng.normal(size=(2, 3, 3, 8, 8)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(2, 2, 16, 16, 3)), jnp.float32)
  compiled = jax.jit(step).lower(w, x).compile()
  other = jax.jit(lambda a: jnp.sin(a) @ a)
  jax.block_until_ready((compiled(w, x), other(w["c2"][0, 0, 0])))
  out = tmp_path_factory.mktemp("cpu_trace")
  with jax.profiler.trace(str(out)):
    for _ in range(2):
      jax.block_until_ready((compiled(w, x), other(w["c2"][0, 0, 0])))
  hlo = out / "hlo.txt"
  hlo.write_text(compiled.as_text())
  return glob.glob(f"{out}/**/*.xplane.pb", recursive=True)[0], str(hlo)


def test_cpu_trace(capsys, cpu_trace):
  xplane, hlo = cpu_trace
  rc, lines = _run(capsys, "--trace", xplane, "--hlo", hlo, "--batch", 2, "--profile_rounds", 2, "--top", 3)
  assert rc == 0, lines
  head, ops, cats, summary = _parts(lines)
  assert head["trace_kind"] == "host" and head["module"] == "jit_step"
  assert any(m.startswith("jit_") and m != "jit_step" for m in head["other_modules_ms"]), head
  assert {"conv fwd", "conv dgrad", "conv wgrad"} <= set(cats), cats
  assert any(c.startswith("norm") for c in cats), cats
  assert summary["hlo_matched_share"] == 1.0 and summary["classified_share"] == 1.0
  assert summary["listed_share"] >= 0.9 and ops[-1]["cum_share"] >= 0.9
  assert sum(cats.values()) == pytest.approx(head["device_ms_per_round"], rel=1e-3, abs=0.01)
  assert head["flops_per_round"] > 0 and head["bytes_per_round"] > 0


def test_cpu_trace_without_ops_exits_2(capsys, tmp_path):
  with jax.profiler.trace(str(tmp_path)):
    sum(range(1000))
  xplane = glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)[0]
  rc, lines = _run(capsys, "--trace", xplane)
  assert rc == 2
  assert not [ln for ln in lines if "rank" in ln or "category" in ln]
  assert any(ln.get("found", {}).get("plane") == "/host:CPU" for ln in lines), lines


# ---- GPU: the constructed trace -------------------------------------------------------------

def _write(tmp_path, variant, hlo=fixture.HLO):
  planes, expected = fixture.build(variant)
  trace = tmp_path / f"{variant}.pbtxt"
  trace.write_text(trace_ops.to_text_proto(planes, "constructed: tests/gpu_trace_fixture.py"))
  (tmp_path / "hlo.txt").write_text(hlo)
  return str(trace), str(tmp_path / "hlo.txt"), expected


@pytest.mark.parametrize("variant", ["streams", "derived"])
def test_gpu_layout(capsys, tmp_path, variant):
  trace, hlo, expected = _write(tmp_path, variant)
  rc, lines = _run(capsys, "--trace", trace, "--hlo", hlo, "--batch", 6, "--profile_rounds", 2,
                   "--round_s", 0.01, "--peak_tflops", 790, "--peak_tbps", 4.8, "--top", 1)
  assert rc == 0, lines
  head, ops, cats, summary = _parts(lines)
  assert head["trace_kind"] == "device"
  total = sum(expected["op_ns"].values())
  assert head["device_ms_per_round"] == pytest.approx(total / 2e6, abs=1e-3)
  assert head["busy_ms_per_round"] == pytest.approx(expected["busy_ns"] / 2e6, abs=1e-3)
  assert head["busy_ms_per_round"] < head["device_ms_per_round"]
  assert cats == pytest.approx({c: ns / 2e6 for c, ns in expected["category_ns"].items()}, abs=1e-3)
  want = {op: cat for _, op, _, cat, _ in fixture.STEP if op}
  assert all(o["category"] == want[o["op"]] for o in ops if o["op"] in want), ops
  assert ops[-1]["cum_share"] >= 0.9 and summary["classified_share"] == 1.0
  # Roofline: 50 steps of three 3x3 convolutions, 6 x 64 x 64 x 16 -> 16, valid taps only.
  flops = 50 * 3 * 2 * 6 * 16 * 16 * 190 ** 2
  assert head["flops_per_round"] == flops
  assert head["flops_fraction"] == pytest.approx(flops / 0.01 / 790e12, rel=1e-2)
  assert head["bandwidth_fraction"] == pytest.approx(head["bytes_per_round"] / 0.01 / 4.8e12, rel=1e-2)


def test_gpu_saved_fixture_reads_back(capsys, tmp_path):
  trace, hlo, _ = _write(tmp_path, "streams")
  saved = tmp_path / "saved"
  rc, first = _run(capsys, "--trace", trace, "--hlo", hlo, "--batch", 6, "--save_fixture", saved,
                   "--fixture_events", 100)
  assert rc == 0 and sorted(os.listdir(saved)) == ["hlo.txt", "meta.json", "trace.pbtxt"]
  rc, again = _run(capsys, "--trace", saved / "trace.pbtxt", "--hlo", saved / "hlo.txt", "--batch", 6)
  assert rc == 0
  cats_first, cats_again = _parts(first)[2], _parts(again)[2]
  assert set(cats_again) == set(cats_first) and _parts(again)[3]["hlo_matched_share"] > 0.9


def test_gpu_trace_without_op_stats_exits_2(capsys, tmp_path):
  trace, hlo, _ = _write(tmp_path, "unannotated")
  rc, lines = _run(capsys, "--trace", trace, "--hlo", hlo)
  assert rc == 2
  found = [ln["found"] for ln in lines if "found" in ln]
  assert {"/device:GPU:0", "/host:CPU"} <= {f["plane"] for f in found}
  assert any((f["line"] or "").startswith("Stream #13") for f in found)
  assert not [ln for ln in lines if "rank" in ln or "category" in ln]


def test_gpu_trace_against_other_hlo_exits_3(capsys, tmp_path):
  other = "HloModule jit_other\n\nENTRY %main (p: f32[2]) -> f32[2] {\n  ROOT %p = f32[2]{0} parameter(0)\n}\n"
  trace, hlo, _ = _write(tmp_path, "streams", hlo=other)
  rc, lines = _run(capsys, "--trace", trace, "--hlo", hlo)
  assert rc == 3 and "error" in lines[-1]


@pytest.mark.skipif(not os.path.isdir(RECORDED), reason="no GPU trace recorded yet (needs a device)")
def test_recorded_gpu_trace(capsys):
  meta = json.load(open(os.path.join(RECORDED, "meta.json")))
  rc, lines = _run(capsys, "--trace", os.path.join(RECORDED, "trace.pbtxt"),
                   "--hlo", os.path.join(RECORDED, "hlo.txt"), "--batch", meta["batch"])
  assert rc == 0
  head, ops, cats, summary = _parts(lines)
  assert head["trace_kind"] == "device" and summary["hlo_matched_share"] > 0.9
  assert {"conv fwd", "conv dgrad", "conv wgrad"} <= set(cats)


# ---- FLOPs and bytes ------------------------------------------------------------------------

def _net(x, w, m):
  y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(-1, y.shape[-1]) @ m


def _args():
  return jnp.ones((2, 10, 12, 8)), jnp.ones((3, 3, 8, 16)), jnp.ones((16, 32))


def test_cost_equals_xla_without_loops():
  compiled = jax.jit(_net).lower(*_args()).compile()
  mine, xla = hlo_ops.round_cost(compiled.as_text()), hlo_ops.xla_cost(compiled)
  assert mine["flops"] == xla["flops"]
  assert mine["bytes"] == pytest.approx(xla["bytes accessed"], rel=1e-3)


def test_cost_counts_loop_trips():
  def scanned(x, w, m, n):
    body = lambda c, _: (c + 1e-3 * jax.grad(lambda c: jnp.tanh(_net(c, w, m)).sum())(c), None)
    return lax.scan(body, x, None, length=n)[0]
  one, five = (jax.jit(scanned, static_argnums=3).lower(*_args(), n).compile() for n in (1, 5))
  c1, c5 = hlo_ops.round_cost(one.as_text()), hlo_ops.round_cost(five.as_text())
  assert c5["loops"] and c5["unknown_trip_loops"] == 0
  assert c5["conv_flops"] == 5 * c1["conv_flops"] and c5["dot_flops"] == 5 * c1["dot_flops"]
  assert hlo_ops.xla_cost(five)["flops"] < 2 * hlo_ops.xla_cost(one)["flops"]   # XLA: the body once


def test_cudnn_calls_count_as_their_forward_convolution():
  """XLA:GPU may rewrite a convolution into cuDNN's backward-input / backward-filter call,
  whose result is the forward input or kernel: each counts the forward's FLOPs."""
  conv = ('  %{n} = ({shape}, u8[0]{{0}}) custom-call({ops}), window={{size=3x3 pad=1_1x1_1}}, '
          'dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$conv{kind}"')
  act, ker = "bf16[6,64,64,16]{3,2,1,0}", "bf16[3,3,16,16]{3,2,1,0}"
  body = [f"  %x = {act} parameter(0)", f"  %w = {ker} parameter(1)", f"  %dy = {act} parameter(2)",
          conv.format(n="f", shape=act, ops="%x, %w", kind="Forward"),
          conv.format(n="i", shape=act, ops="%dy, %w", kind="BackwardInput"),
          conv.format(n="k", shape=ker, ops="%x, %dy", kind="BackwardFilter"),
          "  ROOT %t = () tuple()"]
  text = "HloModule m\n\nENTRY %main (x: bf16[1]) -> () {\n" + "\n".join(body) + "\n}\n"
  cost = hlo_ops.round_cost(text)
  assert cost["conv_flops"] == 3 * 2 * 6 * 16 * 16 * 190 ** 2
  cats = hlo_ops.classify(text, 6)
  assert [cats[n][0] for n in "fik"] == ["conv fwd", "conv dgrad", "conv wgrad"]
