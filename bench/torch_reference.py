"""PyTorch re-creations of the LC-Fed / FedDG training pattern, for throughput only.

Same U-Net as lcfed_jax/models/unet.py (base 16, 3 convs per encoder block, InstanceNorm2d without
affine, nearest 2x upsample, 1x1 head, sigmoid, Dice loss; 3,179,857 parameters for RGB /
1 class). Every site has its own model and Adam (lr 1e-3); each round trains the sites one
after another, `local_steps` steps of batch `batch` each, batches drawn uniformly with
replacement from in-memory uint8 tensors on the device; then the server averages all
parameters (FedAvg) and loads them back into every site.

Two patterns are measured (`--patterns`, default both, one JSON line each):
- `eager` (`"impl": "torch_eager"`): the official pattern, what the paper's code does:
  eager fp32, NCHW. This is the baseline the paper's training times come from.
- `best` (`"impl": "torch_best"`): what a PyTorch user would write today for the same
  training: bf16 autocast (loss in fp32, backward outside autocast, no grad scaler needed
  for bf16), channels_last model and inputs, torch.compile of each site's model + Dice
  loss, fused Adam on CUDA (same hyper-parameters). Sites are still trained one after
  another with one model + optimizer each, with the same batch, local steps and rounds.
  The warm-up round compiles; `compile_s` is the time of each site's first step in it
  (compilation + one step), and no timed round includes compilation. If torch.compile
  fails (no C++ compiler or Triton, unsupported Python, ...) the line has
  `"skipped": true` and a `reason` instead, and the eager line is still printed.
Measuring both keeps the comparison honest: the first is the reference implementation as
published, the second is the strongest plain-PyTorch baseline, without changing the
algorithm.

Each line has the fields of bench/throughput.py; `round_s` is the median of the timed
rounds (one warm-up round first). Peak memory: torch.cuda.max_memory_allocated on GPU,
the process's peak resident set on CPU; the peak is reset between patterns. Needs torch
(not a project dependency): python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy

Usage: python bench/torch_reference.py [--size 384] [--sites 4] [--batch 6]
       [--local_steps 50] [--rounds 2] [--base 16] [--device cpu|cuda]
       [--patterns eager best] [--compile_mode default] [--compile_backend inductor]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED_PARAMS = 3_179_857   # base 16, 3 in, 1 class


class ConvD(nn.Module):
  def __init__(self, cin, cout, first):
    super().__init__()
    self.first = first
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.bn1 = nn.InstanceNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.bn2 = nn.InstanceNorm2d(cout)
    self.conv3 = nn.Conv2d(cout, cout, 3, padding=1)
    self.bn3 = nn.InstanceNorm2d(cout)

  def forward(self, x):
    if not self.first:
      x = F.max_pool2d(x, 2, 2)
    x = self.bn1(self.conv1(x))
    y = F.relu(self.bn2(self.conv2(x)))
    return F.relu(self.bn3(self.conv3(y)))


class ConvU(nn.Module):
  def __init__(self, planes, first):
    super().__init__()
    self.first = first
    if not first:
      self.conv1 = nn.Conv2d(2 * planes, planes, 3, padding=1)
      self.bn1 = nn.InstanceNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes // 2, 1)
    self.bn2 = nn.InstanceNorm2d(planes // 2)
    self.conv3 = nn.Conv2d(planes, planes, 3, padding=1)
    self.bn3 = nn.InstanceNorm2d(planes)

  def forward(self, x, prev):
    if not self.first:
      x = F.relu(self.bn1(self.conv1(x)))
    y = F.interpolate(x, scale_factor=2, mode="nearest")
    y = F.relu(self.bn2(self.conv2(y)))
    y = torch.cat([prev, y], 1)
    return F.relu(self.bn3(self.conv3(y)))


class Unet2D(nn.Module):
  """FedDG's Unet2D (norm 'in')."""

  def __init__(self, c=3, n=16, num_classes=1):
    super().__init__()
    self.convd1 = ConvD(c, n, first=True)
    self.convd2 = ConvD(n, 2 * n, False)
    self.convd3 = ConvD(2 * n, 4 * n, False)
    self.convd4 = ConvD(4 * n, 8 * n, False)
    self.convd5 = ConvD(8 * n, 16 * n, False)
    self.convu4 = ConvU(16 * n, first=True)
    self.convu3 = ConvU(8 * n, False)
    self.convu2 = ConvU(4 * n, False)
    self.convu1 = ConvU(2 * n, False)
    self.seg1 = nn.Conv2d(2 * n, num_classes, 1)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x1 = self.convd1(x)
    x2 = self.convd2(x1)
    x3 = self.convd3(x2)
    x4 = self.convd4(x3)
    x5 = self.convd5(x4)
    y4 = self.convu4(x5, x4)
    y3 = self.convu3(y4, x3)
    y2 = self.convu2(y3, x2)
    y1 = self.convu1(y2, x1)
    return torch.sigmoid(self.seg1(y1))


def dice_loss(probs, target, smooth=1e-5):
  """The official Dice loss: per channel, sums over batch and image; no BCE."""
  inter = (probs * target).sum(dim=(0, 2, 3))
  denom = probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
  return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def num_params(model):
  return sum(p.numel() for p in model.parameters())


def device_name(dev):
  if dev.type == "cuda":
    return torch.cuda.get_device_name(dev)
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "cpu"


class WithLoss(nn.Module):
  """model + Dice loss as one module, so that torch.compile fuses the loss into the graph.
  The loss is computed in fp32 on the bf16 probabilities (the usual AMP practice)."""

  def __init__(self, net):
    super().__init__()
    self.net = net

  def forward(self, x, y):
    return dice_loss(self.net(x).float(), y)


def reset_peak(dev):
  """Starts a new peak-memory window; False where it cannot (CPU without clear_refs)."""
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
    return True
  try:   # Linux: writing 5 resets the process's peak resident set size (VmHWM)
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def read_peak(dev, was_reset):
  if dev.type == "cuda":
    return torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated"
  if was_reset:
    try:
      with open("/proc/self/status") as f:
        for line in f:
          if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024, "process_max_rss"
    except OSError:
      pass
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "process_max_rss" if was_reset else "process_max_rss (not reset: includes earlier patterns)")


class Setup:
  """One model + Adam per site and each site's in-memory uint8 data, built from the seed
  (so every pattern starts from the same weights and draws the same batches)."""

  def __init__(self, a, dev, channels_last=False, fused_adam=False):
    torch.manual_seed(a.seed)
    k, n = a.sites, a.train_size
    self.models = [Unet2D(3, a.base, 1).to(dev) for _ in range(k)]
    self.nparams = num_params(self.models[0])
    if a.base == 16:
      assert self.nparams == EXPECTED_PARAMS, (self.nparams, EXPECTED_PARAMS)
    if channels_last:
      self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
    kw = {"fused": True} if fused_adam else {}
    self.opts = [torch.optim.Adam(m.parameters(), lr=1e-3, **kw) for m in self.models]
    self.g = g = torch.Generator(device="cpu").manual_seed(a.seed)
    self.images = [torch.randint(0, 256, (n, 3, a.size, a.size), dtype=torch.uint8, generator=g).to(dev)
                   for _ in range(k)]
    self.masks = [torch.randint(0, 2, (n, 1, a.size, a.size), dtype=torch.uint8, generator=g).to(dev)
                  for _ in range(k)]

  def fedavg(self):
    with torch.no_grad():   # FedAvg of every parameter, uniform weights
      states = [m.state_dict() for m in self.models]
      avg = {key: sum(st[key] for st in states) / len(states) for key in states[0]}
      for m in self.models:
        m.load_state_dict(avg)


def time_rounds(one_round, rounds):
  t0 = time.perf_counter()
  one_round()   # warm-up
  warm_s = time.perf_counter() - t0
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    one_round()
    times.append(time.perf_counter() - t0)
  return warm_s, times


def result_line(a, dev, st, impl, dtype, method, warm_s, times, peak, peak_kind, **extra):
  round_s = statistics.median(times)
  k = a.sites
  line = {
      "bench": "throughput", "framework": f"torch {torch.__version__}", "backend": dev.type,
      "device": device_name(dev), "method": method,
      "impl": impl, "dtype": dtype, "sites": k, "batch": a.batch,
      "image_size": a.size, "base": a.base, "local_steps": a.local_steps,
      "img_per_s": round(k * a.batch * a.local_steps / round_s, 2), "round_s": round(round_s, 4),
      "round_s_all": [round(t, 4) for t in times], "compile_s": None,
      "warmup_round_s": round(warm_s, 4), "peak_mem_bytes": int(peak), "peak_mem_kind": peak_kind,
      "params": st.nparams, "threads": torch.get_num_threads()}
  line.update(extra)
  return line


def run_eager(a, dev):
  """The official pattern: eager fp32, NCHW, sites one after another."""
  st = Setup(a, dev)
  was_reset = reset_peak(dev)
  k, n, g = a.sites, a.train_size, st.g

  def one_round():
    for s in range(k):   # sites one after another, as the official code
      model, opt = st.models[s], st.opts[s]
      model.train()
      for _ in range(a.local_steps):
        idx = torch.randint(0, n, (a.batch,), generator=g).to(dev)
        x = st.images[s][idx].float() / 255.0
        y = st.masks[s][idx].float()
        loss = dice_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    st.fedavg()
    sync(dev)

  warm_s, times = time_rounds(one_round, a.rounds)
  peak, peak_kind = read_peak(dev, was_reset)
  return result_line(a, dev, st, "torch_eager", "float32",
                     "fedavg (official pattern: sites in sequence, eager)",
                     warm_s, times, peak, peak_kind)


def run_best(a, dev):
  """The best-practice pattern: bf16 autocast, channels_last, torch.compile of each site's
  model + loss, fused Adam on CUDA; sites still one after another."""
  fused = dev.type == "cuda"
  st = Setup(a, dev, channels_last=True, fused_adam=fused)
  was_reset = reset_peak(dev)
  k, n, g = a.sites, a.train_size, st.g
  cl = torch.channels_last
  steps = [torch.compile(WithLoss(m), mode=a.compile_mode, backend=a.compile_backend)
           for m in st.models]

  def site_step(s):
    idx = torch.randint(0, n, (a.batch,), generator=g).to(dev)
    x = (st.images[s][idx].float() / 255.0).contiguous(memory_format=cl)
    y = st.masks[s][idx].float().contiguous(memory_format=cl)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
      loss = steps[s](x, y)
    st.opts[s].zero_grad()
    loss.backward()   # outside autocast, as the AMP recipe
    st.opts[s].step()
    return loss

  first_step_s, last_loss = [], [None]

  def one_round(warm=False):
    for s in range(k):   # sites one after another, as the official code
      st.models[s].train()
      for i in range(a.local_steps):
        if warm and i == 0:   # the first step of each site compiles (or re-uses) its graphs
          sync(dev)
          t0 = time.perf_counter()
          last_loss[0] = site_step(s)
          sync(dev)
          first_step_s.append(time.perf_counter() - t0)
        else:
          last_loss[0] = site_step(s)
    st.fedavg()
    sync(dev)

  # Compilation happens in the warm-up round, before any timed round.
  t0 = time.perf_counter()
  one_round(warm=True)
  warm_s = time.perf_counter() - t0
  times = []
  for _ in range(a.rounds):
    t0 = time.perf_counter()
    one_round()
    times.append(time.perf_counter() - t0)
  peak, peak_kind = read_peak(dev, was_reset)
  loss = last_loss[0].item()
  return result_line(
      a, dev, st, "torch_best", "bfloat16",
      "fedavg (best-practice pattern: sites in sequence, bf16 autocast, channels_last, "
      "torch.compile" + (", fused Adam" if fused else "") + ")",
      warm_s, times, peak, peak_kind,
      compile_s=round(sum(first_step_s), 2), channels_last=True, torch_compile=True,
      compile_mode=a.compile_mode, compile_backend=a.compile_backend, fused_adam=fused,
      loss_finite=bool(math.isfinite(loss)))


def sync(dev):
  if dev.type == "cuda":
    torch.cuda.synchronize(dev)


def release(dev):
  gc.collect()
  if dev.type == "cuda":
    torch.cuda.empty_cache()


PATTERNS = ("eager", "best")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--sites", type=int, default=4)
  p.add_argument("--batch", type=int, default=6)
  p.add_argument("--local_steps", type=int, default=50)
  p.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--train_size", type=int, default=32, help="in-memory examples per site")
  p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS,
                 help="eager: the official pattern; best: bf16 autocast + channels_last + "
                      "torch.compile (one JSON line each, in this order)")
  p.add_argument("--compile_mode", default="default",
                 help="torch.compile mode of the best pattern (default, max-autotune-no-cudagraphs, ...)")
  p.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the best pattern")
  a = p.parse_args(argv)

  dev = torch.device(a.device)
  for pattern in a.patterns:
    if pattern == "eager":
      line = run_eager(a, dev)
    else:
      try:
        line = run_best(a, dev)
      except Exception as e:   # e.g. no C++ compiler / Triton for inductor
        msg = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
        line = {"bench": "throughput", "framework": f"torch {torch.__version__}",
                "backend": dev.type, "device": device_name(dev), "impl": "torch_best",
                "skipped": True, "reason": f"torch.compile failed: {' | '.join(msg[:3])[:500]}"}
    print(json.dumps(line), flush=True)
    release(dev)


if __name__ == "__main__":
  sys.exit(main())
