"""The real data folder (polyp 3 sites, FAZ 5 sites, fundus and prostate samples)
builds through the TFDS builders with the counts its README gives, at 32x32.

Skipped with a reason when the data is absent. The data is found at $LCFED_DATA_DIR or at
<repo>/../shared/data; it is only read, the prepared data goes to a pytest tmp dir.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcfed_jax.config.defaults import base_config
from lcfed_jax.data import real  # noqa: E402


def _data_dir():
  env = os.environ.get("LCFED_DATA_DIR")
  for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[1].parent / "shared" / "data"]:
    if (cand / "README.md").exists() or (cand / "polyp").is_dir():
      return cand
  return None


DATA = _data_dir()
pytestmark = pytest.mark.skipif(
    DATA is None, reason="real data not found: set LCFED_DATA_DIR or place it at ../shared/data")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds_real")


def _load(task, tfds_dir, **data):
  c = base_config(task)
  c.data_dir = str(DATA)
  c.image_size = 32
  c.data.tfds_dir = str(tfds_dir)
  for k, v in data.items():
    setattr(c.data, k, v)
  root = DATA / {"fundus": "samples/Fundus", "prostate": "samples/ProstateSlice"}.get(task, task)
  if not root.is_dir():
    pytest.skip(f"{root} is absent")
  return real.load_real_task(c)


def _counts(fd):
  return {s: (len(fd.train[i]), len(fd.test[i])) for i, s in enumerate(fd.site_names)}


def test_real_polyp(tfds_dir):
  fd = _load("polyp", tfds_dir)
  # README: kvasir 998, clinicdb 609, colondb 380 pairs; ColonDB LC-Fed split 327/52
  # (frame 380 unused); others ceil(10%) test with seed 0.
  assert _counts(fd) == {"kvasir": (898, 100), "colondb": (327, 52), "clinicdb": (548, 61)}
  assert fd.info["layout"] == "per_site"
  for s in fd.train + fd.test:
    assert s.images.shape[1:] == (32, 32, 3) and s.images.dtype == np.uint8
    assert s.masks.shape[1:] == (32, 32, 1) and set(np.unique(s.masks)) <= {0, 1}
  # README: no mask is empty or all foreground; mean polyp fraction 0.154 (kvasir)
  frac = fd.train[0].masks.mean(axis=(1, 2, 3))
  assert 0.10 < frac.mean() < 0.21 and frac.max() < 1.0
  assert "tensorflow" not in sys.modules


def test_real_faz(tfds_dir):
  fd = _load("faz", tfds_dir)
  assert _counts(fd) == {"site1": (244, 60), "site2": (150, 50), "site3": (200, 100),
                         "site4": (708, 304), "site5": (30, 9)}
  assert fd.in_channels == 1 and fd.train[0].images.shape[1:] == (32, 32, 1)
  # README: mean FAZ fraction site4 test 0.075, site1 train 0.028
  assert 0.05 < fd.test[3].masks.mean() < 0.10
  assert 0.015 < fd.train[0].masks.mean() < 0.045


def test_real_fundus_sample(tfds_dir):
  fd = _load("fundus", tfds_dir)
  assert fd.site_names == ["Domain1", "Domain2", "Domain3", "Domain4"]
  assert _counts(fd) == {f"Domain{k}": (1, 1) for k in range(1, 5)}
  assert fd.train[0].names == ["gdrishtiGS_002"] and fd.test[1].names == ["G-2-R"]
  for s in fd.train + fd.test:
    od, oc = s.masks[..., 0], s.masks[..., 1]
    assert s.masks.shape[1:] == (32, 32, 2)
    assert od.sum() > oc.sum() > 0 and np.all(oc <= od)    # cup inside disc
    assert od.mean() < 0.5                                  # background dominates the ROI


def test_real_prostate_sample(tfds_dir):
  fd = _load("prostate", tfds_dir)
  assert fd.site_names == ["BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL"]
  assert _counts(fd) == {s: (1, 1) for s in fd.site_names}
  # README: inverted convention (0 = prostate); auto detection must find it
  assert set(fd.info["mask_convention"].values()) == {"inverted"}
  for s in fd.train + fd.test:
    assert 0 < s.masks.mean() < 0.05 and s.images.shape[1:] == (32, 32, 1)
  i2 = fd.site_names.index("I2CVB")
  assert fd.train[i2].names == ["00_01"] and fd.train[i2].slice_index.tolist() == [1]
  assert fd.eval_unit == "volume" and fd.train[i2].volume_ids.tolist() == [0]
