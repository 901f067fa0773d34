"""TFDS builders on tiny generated fixtures: counts, shapes, dtypes, mask conventions and
split rules of every task. No TensorFlow anywhere."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # repo root, if not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_fixtures as fx  # noqa: E402
from lcfed_jax.config.defaults import base_config
from lcfed_jax.data import real
from lcfed_jax.data.builders import prostate as prostate_lib
from lcfed_jax.util.errors import DataError


def make_config(task, root, tfds_dir, image_size=8, **data):
  c = base_config(task)
  c.data_dir = ""
  c.image_size = image_size
  c.data.root = str(root)
  c.data.tfds_dir = str(tfds_dir)
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def load(task, root, tmp_path, **kw):
  return real.load_real_task(make_config(task, root, tmp_path / "tfds", **kw))


def files_under(d: Path):
  return [p for p in d.rglob("*") if p.is_file()] if d.exists() else []


def idx(fd, site):
  return fd.site_names.index(site)


# ---------------------------------------------------------------------------- polyp

def test_polyp_per_site_splits_and_masks(tmp_path):
  root = fx.polyp_per_site(tmp_path / "polyp")
  fd = load("polyp", root, tmp_path)
  assert fd.site_names == ["kvasir", "colondb", "clinicdb"]   # code order, ETIS absent
  assert (fd.in_channels, fd.num_classes, fd.eval_unit, fd.postprocess) == (3, 1, "image", "none")
  assert fd.info["layout"] == "per_site"
  col = idx(fd, "colondb")
  assert len(fd.train[col]) == 327 and len(fd.test[col]) == 52
  assert fd.test[col].names == [str(i) for i in range(221, 273)]
  assert fd.train[col].names == [str(i) for i in list(range(1, 221)) + list(range(273, 380))]
  assert "380" not in fd.train[col].names + fd.test[col].names
  # kvasir: fixed-seed 90/10 of the sorted names
  names = sorted(f"cju{i:03d}" for i in range(20))
  perm = np.random.default_rng(0).permutation(20)
  want_test = sorted(names[i] for i in perm[:math.ceil(0.1 * 20)])
  kv = idx(fd, "kvasir")
  assert fd.test[kv].names == want_test and len(fd.train[kv]) == 18
  assert not set(fd.test[kv].names) & set(fd.train[kv].names)
  cl = idx(fd, "clinicdb")
  assert len(fd.train[cl]) + len(fd.test[cl]) == 10 and len(fd.test[cl]) == 1
  for split in fd.train + fd.test:
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (8, 8, 3)
    assert split.masks.dtype == np.uint8 and split.masks.shape[1:] == (8, 8, 1)
    assert split.volume_ids is None
  # binarised at > 127: value 200 -> 1, value 100 -> 0
  want = (fx.polyp_mask() > 127).astype(np.uint8)[..., None]
  np.testing.assert_array_equal(fd.train[col].masks[0], want)
  np.testing.assert_array_equal(fd.train[col].images[0], fx.rgb(150))   # PNG: exact
  assert fd.info["site_counts"]["colondb"] == {"train": 327, "test": 52}
  assert "tensorflow" not in sys.modules


def test_polyp_per_site_site2_switch(tmp_path):
  root = fx.polyp_per_site(tmp_path / "polyp", kvasir=10, clinicdb=0, colondb=380, etis=196)
  fd = load("polyp", root, tmp_path)
  assert fd.site_names == ["kvasir", "etis", "colondb"]
  e = idx(fd, "etis")
  assert len(fd.train[e]) == 170 and len(fd.test[e]) == 26
  assert np.all(fd.train[e].images[..., 0] == 50)                      # from the etis folder
  fd2 = load("polyp", root, tmp_path, polyp_site2="colondb_as_released")
  e = idx(fd2, "etis")
  assert len(fd2.train[e]) == 170 and len(fd2.test[e]) == 26
  assert np.all(fd2.train[e].images[..., 0] == 150)                    # colondb frames
  assert fd.info["config_names"]["etis"] != fd2.info["config_names"]["etis"]
  assert fd.info["config_names"]["kvasir"] == fd2.info["config_names"]["kvasir"]


def test_polyp_pranet_layout(tmp_path):
  root = fx.polyp_pranet(tmp_path / "polyp")
  fd = load("polyp", root, tmp_path, image_size=16)
  assert fd.info["layout"] == "pranet"
  assert fd.site_names == ["kvasir", "etis", "colondb", "clinicdb"]
  counts = {s: (len(fd.train[i]), len(fd.test[i])) for i, s in enumerate(fd.site_names)}
  assert counts == {"kvasir": (3, 2), "etis": (170, 26), "colondb": (327, 52),
                    "clinicdb": (4, 2)}
  assert fd.train[0].names == ["cju0", "cju1", "cju2"]
  assert fd.train[3].names == ["1", "2", "3", "4"]
  assert np.all(fd.train[1].images[..., 0] == 50)                      # ETIS
  assert fd.train[0].images.shape == (3, 16, 16, 3)
  assert fd.train[0].masks.shape == (3, 16, 16, 1)
  assert set(np.unique(fd.train[0].masks)) == {0, 1}
  # nearest resize of the 2x2 foreground block at 8 -> 4x4 block at 16
  assert int(fd.train[0].masks[0].sum()) == 16
  fd2 = load("polyp", root, tmp_path, image_size=16, polyp_site2="colondb_as_released",
             layout="pranet")
  assert np.all(fd2.train[1].images[..., 0] == 150)


# ---------------------------------------------------------------------------- fundus

@pytest.mark.parametrize("prefix,rgb_mask", [("Site", True), ("Domain", False)])
def test_fundus_layout_and_targets(tmp_path, prefix, rgb_mask):
  root = fx.fundus(tmp_path / "fundus", prefix=prefix, rgb_mask=rgb_mask)
  fd = load("fundus", root, tmp_path)
  assert fd.site_names == [f"{prefix}1", f"{prefix}2"]
  assert (fd.num_classes, fd.class_names) == (2, ["optic_disc", "optic_cup"])
  assert (fd.eval_unit, fd.postprocess) == ("image", "largest_component")
  assert [len(s) for s in fd.train] == [2, 2] and [len(s) for s in fd.test] == [1, 1]
  m = fx.fundus_mask(rgb_mask=False)
  np.testing.assert_array_equal(fd.train[0].masks[0, ..., 0], (m < 255).astype(np.uint8))
  np.testing.assert_array_equal(fd.train[0].masks[0, ..., 1], (m == 0).astype(np.uint8))
  assert fd.train[0].images.shape == (2, 8, 8, 3)


def test_fundus_bad_masks(tmp_path):
  root = fx.fundus(tmp_path / "fundus")
  bad = root / "Site1" / "train" / "ROIs" / "mask" / "s1_train_0.png"
  m = fx.fundus_mask(rgb_mask=False)
  m[0, 0] = 77
  fx.save(bad, m)
  with pytest.raises(DataError, match=r"s1_train_0\.png.*77"):
    load("fundus", root, tmp_path)
  m = fx.fundus_mask()
  m[0, 0, 1] = 0
  fx.save(bad, m)
  with pytest.raises(DataError, match=r"s1_train_0\.png.*channels that differ"):
    load("fundus", root, tmp_path)
  assert files_under(tmp_path / "tfds") == []


# ---------------------------------------------------------------------------- faz

def test_faz(tmp_path):
  root = fx.faz(tmp_path / "faz", n_sites=3, mask_value=127)
  fd = load("faz", root, tmp_path, image_size=16)
  assert fd.site_names == ["site1", "site2", "site3"]
  assert (fd.in_channels, fd.num_classes, fd.eval_unit) == (1, 1, "image")
  assert [len(s) for s in fd.train] == [3, 3, 3] and [len(s) for s in fd.test] == [2, 2, 2]
  assert load("faz", root, tmp_path, image_size=16, num_sites=2).site_names == ["site1", "site2"]
  with pytest.raises(DataError, match="num_sites"):
    load("faz", root, tmp_path, image_size=16, num_sites=4)
  assert fd.train[1].images.shape == (3, 16, 16, 1)
  assert np.all(fd.train[1].images[0] == 80)
  assert int(fd.test[2].masks[1].sum()) == 6 * 4        # 2x3 block, x2 each side
  assert fd.test[2].names == ["3_test_0", "3_test_1"]


# ---------------------------------------------------------------------------- prostate

def test_prostate_nifti(tmp_path):
  root = fx.prostate_nifti(tmp_path / "prostate")
  fd = load("prostate", root, tmp_path)
  assert fd.site_names == ["BIDMC", "I2CVB"]
  assert (fd.in_channels, fd.eval_unit, fd.postprocess) == (1, "volume", "largest_component")
  assert fd.info["layout"] == "nifti"
  for k in range(2):   # 5 cases: int(0.8*5) = 4 train cases, 1 test; 3 foreground slices
    tr, te = fd.train[k], fd.test[k]
    assert len(tr) == 12 and len(te) == 3
    assert tr.volume_ids.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert te.volume_ids.tolist() == [4] * 3
    assert tr.slice_index.tolist() == [2, 3, 4] * 4
    assert te.names == ["Case04/slice_002", "Case04/slice_003", "Case04/slice_004"]
  img, seg = fx.nifti_volume(seed=4)
  np.testing.assert_array_equal(fd.test[0].masks[0, ..., 0], (seg[:, :, 2].T > 0).astype(np.uint8))
  want = np.round(prostate_lib.mr_norm(img[:, :, 2].T, "range") * 255).astype(np.uint8)
  np.testing.assert_array_equal(fd.test[0].images[0, ..., 0], want)
  assert fd.test[0].images[0].min() == 0 and fd.test[0].images[0].max() == 255
  # all slices, and the released /vmax normalisation
  fd2 = load("prostate", root, tmp_path, foreground_slices_only=False,
             prostate_norm="vmax_as_released")
  assert len(fd2.train[0]) == 24 and len(fd2.test[0]) == 6
  assert fd2.test[0].slice_index.tolist() == list(range(6))
  rel = np.round(prostate_lib.mr_norm(img[:, :, 2].T, "vmax_as_released") * 255)
  np.testing.assert_array_equal(fd2.test[0].images[2, ..., 0], rel.astype(np.uint8))
  assert fd2.test[0].images[2].max() < 255      # /vmax with vmin > 0 never reaches 1


def test_mr_norm_modes():
  x = np.arange(1, 101, dtype=np.float64).reshape(10, 10) + 99.0     # 100..199
  r = prostate_lib.mr_norm(x, "range")
  assert r.min() == 0.0 and r.max() == 1.0
  q = prostate_lib.mr_norm(x, "vmax_as_released")
  vmax = np.sort(x.ravel())[99]
  np.testing.assert_allclose(q.max(), (vmax - 100) / vmax)
  with pytest.raises(DataError, match="prostate_norm"):
    prostate_lib.mr_norm(x, "nope")


@pytest.mark.parametrize("inverted,setting,detected", [
    (True, "auto", "inverted"), (False, "auto", "foreground_255"),
    (True, "inverted", "inverted"), (False, "foreground_255", "foreground_255")])
def test_prostate_slices_conventions(tmp_path, inverted, setting, detected):
  root = fx.prostate_slices(tmp_path / "ps", inverted=inverted)
  fd = load("prostate", root, tmp_path, prostate_mask=setting)
  assert fd.info["layout"] == "slices"
  assert fd.info["mask_convention"] == {"BIDMC": detected, "HK": detected}
  tr, te = fd.train[0], fd.test[0]
  assert len(tr) == 2 and len(te) == 1              # the empty slice 02_09 is dropped
  assert tr.names == ["00_03", "01_05"]
  assert tr.volume_ids.tolist() == [0, 1] and tr.slice_index.tolist() == [3, 5]
  assert int(tr.masks[0].sum()) == 6                # prostate = the 2x3 block
  assert tr.masks[0, 2, 3, 0] == 1 and tr.masks[0, 0, 0, 0] == 0
  fd_all = load("prostate", root, tmp_path, prostate_mask=setting,
                foreground_slices_only=False)
  assert len(fd_all.test[0]) == 2


def test_prostate_wrong_explicit_convention_gives_large_foreground(tmp_path):
  root = fx.prostate_slices(tmp_path / "ps", inverted=True, empty_extra=False)
  fd = load("prostate", root, tmp_path, prostate_mask="foreground_255")
  assert int(fd.train[0].masks[0].sum()) == 64 - 6


def test_prostate_auto_undecidable(tmp_path):
  root = fx.prostate_slices(tmp_path / "ps", sites=("BIDMC",), inverted=True)
  m = np.zeros((8, 8), np.uint8)
  m[:2, :2] = 255                                   # looks like foreground_255
  fx.save(root / "BIDMC" / "train" / "mask" / "01_05.png", m)
  with pytest.raises(DataError, match="prostate_mask"):
    load("prostate", root, tmp_path)
  assert files_under(tmp_path / "tfds") == []


def test_prostate_nifti_missing_image(tmp_path):
  root = fx.prostate_nifti(tmp_path / "prostate", sites=("BIDMC",), n_cases=2)
  (root / "BIDMC" / "Case01.nii.gz").unlink()
  with pytest.raises(DataError, match=r"Case01_segmentation\.nii\.gz has no image"):
    load("prostate", root, tmp_path)
  root2 = fx.prostate_nifti(tmp_path / "p2", sites=("BIDMC",), n_cases=2)
  (root2 / "BIDMC" / "Case00_segmentation.nii.gz").unlink()
  with pytest.raises(DataError, match=r"Case00\.nii\.gz has no mask"):
    load("prostate", root2, tmp_path)
