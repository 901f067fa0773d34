"""Process-wide JAX settings every entry point (launch.py, the notebooks) applies first."""
from __future__ import annotations

import os
import threading
import time

import jax


def setup_jax() -> None:
  """A persistent compilation cache ($LCFED_JAX_CACHE, default ~/.cache/lcfed_jax/xla;
  'off' disables it): a repeated run loads its compiled programs instead of compiling."""
  cache = os.environ.get("LCFED_JAX_CACHE", os.path.expanduser("~/.cache/lcfed_jax/xla"))
  if cache and cache != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def device_name() -> str:
  """The first device in words: the accelerator's kind, or the CPU model and core count."""
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{jax.device_count()} x {dev.device_kind}"
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    model = "CPU"
  return f"{model} ({os.cpu_count()} cores)"


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_intervals = []     # (start, end) of every compile event, perf_counter seconds
_lock = threading.Lock()
_listening = False


def _on_duration(name: str, seconds: float, **kwargs) -> None:
  if name in _COMPILE_EVENTS:
    end = time.perf_counter()
    with _lock:
      _intervals.append((end - float(seconds), end))


def track_compiles() -> None:
  """Start recording JAX's compile events (idempotent)."""
  global _listening
  if not _listening:
    from jax import monitoring
    monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True


def compile_seconds(since: float = 0.0) -> dict:
  """Seconds spent tracing, lowering and XLA-compiling since perf_counter `since`:
  'work' sums every program (threads compiling at once each count), 'wall' is the time
  during which anything was compiling (overlaps counted once)."""
  with _lock:
    spans = sorted((max(a, since), b) for a, b in _intervals if b > since)
  work = sum(b - a for a, b in spans)
  wall, cur_a, cur_b = 0.0, None, None
  for a, b in spans:
    if cur_b is None or a > cur_b:
      wall += 0.0 if cur_b is None else cur_b - cur_a
      cur_a, cur_b = a, b
    else:
      cur_b = max(cur_b, b)
  if cur_b is not None:
    wall += cur_b - cur_a
  return {"work": work, "wall": wall}
