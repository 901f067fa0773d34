"""PyTorch re-creation of the official LC-Fed / FedDG training pattern, for throughput only.

Same U-Net as spec section 3 (base 16, 3 convs per encoder block, InstanceNorm2d without
affine, nearest 2x upsample, 1x1 head, sigmoid, Dice loss; 3,179,857 parameters for RGB /
1 class). Every site has its own model and Adam (lr 1e-3); each round trains the sites one
after another, eagerly in fp32, `local_steps` steps of batch `batch` each, batches drawn
uniformly with replacement from in-memory uint8 tensors on the device; then the server
averages all parameters (FedAvg) and loads them back into every site.

Prints one JSON line with the fields of bench/throughput.py. Needs torch (not a project
dependency): python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy

Usage: python bench/torch_reference.py [--size 384] [--sites 4] [--batch 6]
       [--local_steps 50] [--rounds 2] [--base 16] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
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
  a = p.parse_args(argv)

  torch.manual_seed(a.seed)
  dev = torch.device(a.device)
  k, n = a.sites, a.train_size
  models = [Unet2D(3, a.base, 1).to(dev) for _ in range(k)]
  nparams = num_params(models[0])
  if a.base == 16:
    assert nparams == EXPECTED_PARAMS, (nparams, EXPECTED_PARAMS)
  opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
  g = torch.Generator(device="cpu").manual_seed(a.seed)
  images = [torch.randint(0, 256, (n, 3, a.size, a.size), dtype=torch.uint8, generator=g).to(dev)
            for _ in range(k)]
  masks = [torch.randint(0, 2, (n, 1, a.size, a.size), dtype=torch.uint8, generator=g).to(dev)
           for _ in range(k)]

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize(dev)

  def one_round():
    for s in range(k):   # sites one after another, as the official code
      model, opt = models[s], opts[s]
      model.train()
      for _ in range(a.local_steps):
        idx = torch.randint(0, n, (a.batch,), generator=g).to(dev)
        x = images[s][idx].float() / 255.0
        y = masks[s][idx].float()
        loss = dice_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():   # FedAvg of every parameter, uniform weights
      states = [m.state_dict() for m in models]
      avg = {key: sum(st[key] for st in states) / k for key in states[0]}
      for m in models:
        m.load_state_dict(avg)
    sync()

  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
  t0 = time.perf_counter()
  one_round()   # warm-up
  warm_s = time.perf_counter() - t0
  times = []
  for _ in range(a.rounds):
    t0 = time.perf_counter()
    one_round()
    times.append(time.perf_counter() - t0)
  round_s = statistics.median(times)
  if dev.type == "cuda":
    peak, peak_kind = torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated"
  else:
    peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"
  print(json.dumps({
      "bench": "throughput", "framework": f"torch {torch.__version__}", "backend": dev.type,
      "device": device_name(dev), "method": "fedavg (official pattern: sites in sequence, eager)",
      "impl": "torch_eager", "dtype": "float32", "sites": k, "batch": a.batch,
      "image_size": a.size, "base": a.base, "local_steps": a.local_steps,
      "img_per_s": round(k * a.batch * a.local_steps / round_s, 2), "round_s": round(round_s, 4),
      "round_s_all": [round(t, 4) for t in times], "compile_s": None,
      "warmup_round_s": round(warm_s, 4), "peak_mem_bytes": int(peak), "peak_mem_kind": peak_kind,
      "params": nparams, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
  sys.exit(main())
