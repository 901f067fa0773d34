"""A procedural multi-site polyp-like dataset: the zero-download default task.

Each image is an endoscopy-like RGB frame: pink mucosa with low-frequency texture and
folds, a circular endoscope vignette at some sites, and one to three lesions of two
kinds: *raised* (reddish dome, shading, specular highlights) and *flat* (pale, low
contrast). Sites differ the way hospitals do:

- appearance: colour tint, brightness/contrast/gamma, texture strength, sensor noise,
  optical blur, vignette;
- lesion statistics: size, elongation, boundary irregularity, how many and which kinds;
- annotation protocol: most sites label every lesion, one site (`raised_only`) labels
  only raised lesions, one (`margin`) draws generous outlines.

The `raised_only` site looks like site 0 (same optics and tint), so a model shared by
all sites cannot know whether a flat lesion there is foreground: a personal part (a
head, PCS, BN statistics) is needed to fit both protocols. That is the shift
personalization has to fix. Everything is drawn from one seed, in memory, in seconds.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from lcfed_jax.data.types import FederatedData, SiteSplit
from lcfed_jax.util.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SiteStyle:
  name: str
  tint: Sequence[float]           # RGB gain
  brightness: float
  contrast: float
  gamma: float
  texture: float                  # amplitude of the mucosa texture
  texture_scale: float            # its correlation length, fraction of the image
  noise: float                    # sensor noise std
  blur: float                     # optical blur sigma, fraction of the image
  vignette: bool
  radius: Sequence[float]         # lesion radius range, fraction of the image
  elongation: float               # max axis ratio
  irregularity: float             # boundary harmonics amplitude
  flat_prob: float                # chance that an extra flat lesion is present
  protocol: str                   # 'all' | 'raised_only' | 'margin'


SITE_STYLES: List[SiteStyle] = [
    SiteStyle("clinic_a", (1.0, 0.55, 0.50), 0.0, 1.0, 1.0, 0.10, 0.08, 0.02, 0.004, True,
              (0.10, 0.20), 1.3, 0.10, 0.5, "all"),
    SiteStyle("clinic_b", (0.95, 0.65, 0.45), 0.08, 0.8, 0.8, 0.18, 0.05, 0.05, 0.010, False,
              (0.06, 0.12), 1.8, 0.20, 0.4, "all"),
    SiteStyle("clinic_c", (1.0, 0.55, 0.50), 0.0, 1.0, 1.0, 0.10, 0.08, 0.02, 0.004, True,
              (0.10, 0.20), 1.3, 0.10, 0.8, "raised_only"),
    SiteStyle("clinic_d", (0.85, 0.50, 0.60), -0.06, 1.25, 1.2, 0.06, 0.12, 0.03, 0.0, True,
              (0.14, 0.26), 1.2, 0.05, 0.4, "margin"),
    SiteStyle("clinic_e", (1.05, 0.60, 0.40), 0.04, 0.9, 0.9, 0.14, 0.06, 0.04, 0.008, False,
              (0.08, 0.16), 1.6, 0.15, 0.5, "all"),
    SiteStyle("clinic_f", (0.90, 0.58, 0.55), -0.02, 1.1, 1.1, 0.08, 0.10, 0.03, 0.006, True,
              (0.12, 0.22), 1.4, 0.12, 0.5, "all"),
]


def _smooth_noise(rng, size, scale, channels=1):
  field = rng.normal(size=(size, size, channels))
  sigma = max(scale * size, 0.5)
  field = ndimage.gaussian_filter(field, (sigma, sigma, 0), mode="wrap")
  return field / (field.std() + 1e-8)


def _lesion_mask(rng, size, style, yy, xx):
  r = rng.uniform(*style.radius) * size
  ratio = rng.uniform(1.0, style.elongation)
  theta = rng.uniform(0, np.pi)
  cy, cx = rng.uniform(0.25, 0.75, size=2) * size
  dy, dx = yy - cy, xx - cx
  u = (dx * np.cos(theta) + dy * np.sin(theta)) / ratio
  v = -dx * np.sin(theta) + dy * np.cos(theta)
  rho = np.sqrt(u ** 2 + v ** 2)
  ang = np.arctan2(v, u)
  edge = np.ones_like(ang)
  for k in (2, 3, 5):
    edge += style.irregularity / k * rng.normal() * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
  d = rho / (r * np.clip(edge, 0.5, 1.5))
  return d, r


def _render(rng, size: int, style: SiteStyle):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  base = np.array(style.tint) * 0.75
  tex = _smooth_noise(rng, size, style.texture_scale, 3) * style.texture
  ang = rng.uniform(0, np.pi)
  folds = 0.06 * np.sin((xx * np.cos(ang) + yy * np.sin(ang)) / size * 2 * np.pi *
                        rng.uniform(1.5, 3.5) + rng.uniform(0, 6.3))
  img = base[None, None, :] * (1 + tex * 0.6) + folds[..., None]
  target = np.zeros((size, size), bool)
  kinds = ["raised"] + (["flat"] if rng.uniform() < style.flat_prob else [])
  if rng.uniform() < 0.3:
    kinds.append("raised" if rng.uniform() < 0.5 else "flat")
  for kind in kinds:
    d, r = _lesion_mask(rng, size, style, yy, xx)
    inside = d < 1.0
    if kind == "raised":
      dome = np.sqrt(np.clip(1 - d ** 2, 0, 1))
      colour = np.array([0.85, 0.25, 0.25]) * np.array(style.tint) / 0.6
      img = np.where(inside[..., None], img * (1 - 0.55 * dome[..., None]) +
                     colour * 0.55 * dome[..., None] + 0.12 * dome[..., None], img)
      for _ in range(rng.integers(1, 4)):   # specular highlights
        hy, hx = np.argwhere(d < 0.6)[rng.integers(0, max((d < 0.6).sum(), 1))] \
            if (d < 0.6).any() else (0, 0)
        img += 0.5 * np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * (0.015 * size + 0.5) ** 2))[..., None]
    else:
      pale = np.clip(1.0 - d, 0, 1) ** 0.3
      img = np.where(inside[..., None], img * (1 - 0.6 * pale[..., None]) +
                     np.array([0.95, 0.85, 0.65]) * 0.6 * pale[..., None], img)
    if kind == "raised" or style.protocol != "raised_only":
      target |= inside
  if style.protocol == "margin":
    target = ndimage.binary_dilation(target, iterations=max(1, int(round(0.04 * size))))
  if style.blur > 0:
    img = ndimage.gaussian_filter(img, (style.blur * size, style.blur * size, 0))
  img = np.clip((img - 0.5) * style.contrast + 0.5 + style.brightness, 0, 1) ** style.gamma
  img = img + rng.normal(size=img.shape) * style.noise
  if style.vignette:
    rr = np.sqrt((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2)
    img = img * np.clip(1.25 - rr, 0, 1)[..., None] ** 0.7
  return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), target.astype(np.uint8)


def _split(seed, k, which, n, size):
  """Site k's train (which=0) or test (1) split: its own random stream, so changing one
  size or generating a subset of the sites changes nothing else."""
  rng, style = np.random.default_rng([seed, k, which]), SITE_STYLES[k]
  pairs = [_render(rng, size, style) for _ in range(n)]
  images = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, size, size, 3), np.uint8)
  masks = np.stack([p[1] for p in pairs])[..., None] if pairs else np.zeros((0, size, size, 1), np.uint8)
  return images, masks


_PARALLEL_PIXELS = 64 * 10 ** 6     # about 430 images at 384 px


def _render_in_processes(jobs):
  ctx = multiprocessing.get_context("spawn")
  try:
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count()), mp_context=ctx) as ex:
      futures = {key: ex.submit(_split, *args) for key, args in jobs.items()}
      return {key: f.result() for key, f in futures.items()}
  except concurrent.futures.process.BrokenProcessPool:   # e.g. a __main__ read from stdin
    return {key: _split(*args) for key, args in jobs.items()}


IN_CHANNELS, CLASSES = 3, ("lesion",)


def site_names(num_sites: int) -> List[str]:
  if not 1 <= num_sites <= len(SITE_STYLES):
    raise ConfigError(f"config.data.num_sites={num_sites}: the synthetic task has 1..{len(SITE_STYLES)} sites")
  return [SITE_STYLES[k].name for k in range(num_sites)]


def generate(num_sites: int = 4, image_size: int = 64, train_sizes: Sequence[int] = (120, 80, 60, 100),
             test_size: int = 40, seed: int = 0, sites: Optional[Iterable[int]] = None) -> FederatedData:
  """K sites of synthetic polyp-like data; `train_sizes` is cycled if shorter than K.
  `sites`: the indices to generate (default all); the others' splits are None (a host of
  a multi-host run makes only its own sites, each the same as in a full generation)."""
  names = site_names(num_sites)
  wanted = set(range(num_sites)) if sites is None else {int(i) for i in sites}
  jobs = {(k, which): (seed, k, which, n, image_size) for k in sorted(wanted)
          for which, n in ((0, int(train_sizes[k % len(train_sizes)])), (1, int(test_size)))}
  pixels = sum(j[3] for j in jobs.values()) * image_size ** 2
  if pixels > _PARALLEL_PIXELS and len(jobs) > 1 and (os.cpu_count() or 1) > 2:
    # Large sets (paper-sized benchmarks) render one split per process ('spawn': the
    # parent may already run JAX's threads, which do not survive a fork).
    arrays = _render_in_processes(jobs)
  else:
    arrays = {key: _split(*args) for key, args in jobs.items()}
  train, test = [None] * num_sites, [None] * num_sites
  for (k, which), (images, masks) in arrays.items():
    kind = ("train", "test")[which]
    split = SiteSplit(images, masks, [f"{names[k]}/{kind}/{i:04d}" for i in range(len(images))])
    (train if which == 0 else test)[k] = split
  return FederatedData(task="synthetic", site_names=names, train=train, test=test, in_channels=IN_CHANNELS,
                       num_classes=len(CLASSES), class_names=list(CLASSES), eval_unit="image", postprocess="none",
                       info={"protocols": [SITE_STYLES[k].protocol for k in range(num_sites)]})
