"""TFDS builders on bad inputs (clear errors, nothing half-written), the prepared-data
cache, the real tasks' config defaults and the build CLI. No TensorFlow anywhere."""
from __future__ import annotations

import os

import numpy as np
import pytest
from ml_collections import config_dict

import data_fixtures as fx
from lcfed_jax.config.defaults import base_config
from lcfed_jax.data import real
from lcfed_jax.util.errors import DataError, UserError
from test_data_builders import files_under, load, make_config


# ---------------------------------------------------------------------------- bad input

def test_missing_root_names_path_layout_and_instructions(tmp_path):
  missing = tmp_path / "nowhere"
  for task, text in (("polyp", "TrainDataset"), ("fundus", "ROIs"), ("faz", "site"),
                     ("prostate", "segmentation")):
    with pytest.raises(DataError) as e:
      load(task, missing, tmp_path)
    msg = str(e.value)
    assert str(missing) in msg and "Expected layout" in msg and text in msg
    assert "python -m lcfed_jax.data.build" in msg      # the manual instructions
  assert issubclass(DataError, UserError)


def test_no_data_dir(tmp_path, monkeypatch):
  monkeypatch.delenv("LCFED_DATA_DIR", raising=False)
  c = make_config("faz", "x", tmp_path)
  c.data.root = None
  with pytest.raises(DataError, match="LCFED_DATA_DIR"):
    real.load_real_task(c)


def test_data_dir_default_root(tmp_path, monkeypatch):
  fx.faz(tmp_path / "raw" / "faz", n_sites=1)
  fx.prostate_slices(tmp_path / "raw" / "samples" / "ProstateSlice", sites=("HK",))
  monkeypatch.setenv("LCFED_DATA_DIR", str(tmp_path / "raw"))
  for task, n in (("faz", 1), ("prostate", 1)):
    c = make_config(task, "x", tmp_path / "tfds")
    c.data.root = None
    fd = real.load_real_task(c)
    assert fd.num_sites == n
  assert fd.info["root"].endswith(os.path.join("samples", "ProstateSlice"))


def test_image_without_mask_and_reverse(tmp_path):
  root = fx.faz(tmp_path / "faz")
  (root / "site2" / "test" / "masks" / "2_test_1.png").unlink()
  with pytest.raises(DataError, match=r"2_test_1\.png has no mask"):
    load("faz", root, tmp_path)
  root = fx.faz(tmp_path / "faz2")
  (root / "site1" / "train" / "images" / "1_train_2.png").unlink()
  with pytest.raises(DataError, match=r"1_train_2\.png has no image"):
    load("faz", root, tmp_path)


def test_unexpected_mask_values(tmp_path):
  root = fx.faz(tmp_path / "faz", mask_value=200)
  with pytest.raises(DataError, match=r"1_train_0\.png has unexpected values \[200\]"):
    load("faz", root, tmp_path)
  assert files_under(tmp_path / "tfds") == []


def test_unreadable_image_and_clean_tfds_dir(tmp_path):
  root = fx.polyp_per_site(tmp_path / "polyp", kvasir=10, clinicdb=0, colondb=0)
  bad = root / "kvasir" / "images" / "cju004.png"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(DataError, match=r"Cannot read image .*cju004\.png"):
    load("polyp", root, tmp_path)
  assert files_under(tmp_path / "tfds") == []
  assert not [p for p in (tmp_path / "tfds").rglob("*incomplete*")]


def test_failed_second_site_keeps_first_and_leaves_nothing_half_written(tmp_path):
  root = fx.faz(tmp_path / "faz")
  (root / "site2" / "train" / "masks" / "2_train_0.png").write_bytes(b"junk")
  with pytest.raises(DataError, match=r"2_train_0\.png"):
    load("faz", root, tmp_path)
  dirs = sorted(p.name for p in (tmp_path / "tfds" / "lcfed_faz").iterdir())
  assert len(dirs) == 1 and dirs[0].startswith("site1_8px_")   # site1 finished, site2 not
  assert not [p for p in (tmp_path / "tfds").rglob("*incomplete*")]


def test_site_with_no_examples(tmp_path):
  root = fx.faz(tmp_path / "faz")
  for p in (root / "site2" / "test" / "images").iterdir():
    p.unlink()
  for p in (root / "site2" / "test" / "masks").iterdir():
    p.unlink()
  with pytest.raises(DataError, match="site2.*no test examples"):
    load("faz", root, tmp_path)
  root = fx.prostate_slices(tmp_path / "ps", sites=("HK",), inverted=True)
  for split in ("train", "test"):           # every slice empty -> no examples after filter
    for p in (root / "HK" / split / "mask").iterdir():
      fx.save(p, np.full((8, 8), 255, np.uint8))
  with pytest.raises(DataError):
    load("prostate", root, tmp_path, prostate_mask="inverted")


def test_bad_option_values(tmp_path):
  root = fx.polyp_per_site(tmp_path / "polyp", kvasir=10, clinicdb=0, colondb=0)
  with pytest.raises(DataError, match="polyp_site2"):
    load("polyp", root, tmp_path, polyp_site2="etis_typo")
  with pytest.raises(DataError, match="layout"):
    load("polyp", root, tmp_path, layout="nifti")
  with pytest.raises(DataError, match="task"):
    load("cifar", root, tmp_path)


# ---------------------------------------------------------------------------- cache, config, CLI

def test_cache_reuse_and_size_in_config_name(tmp_path):
  root = fx.faz(tmp_path / "faz", n_sites=1)
  a = load("faz", root, tmp_path)
  assert a.info["build_seconds"]["site1"] is not None
  b = load("faz", root, tmp_path)
  assert b.info["build_seconds"]["site1"] is None               # read from the cache
  np.testing.assert_array_equal(a.train[0].images, b.train[0].images)
  assert a.train[0].names == b.train[0].names
  c = load("faz", root, tmp_path, image_size=12)
  assert c.info["build_seconds"]["site1"] is not None
  assert c.train[0].images.shape[1:] == (12, 12, 1)
  names = sorted(p.name for p in (tmp_path / "tfds" / "lcfed_faz").iterdir())
  assert [n.split("_")[1] for n in names] == ["12px", "8px"]


def test_loading_some_sites_builds_and_reads_only_those(tmp_path):
  """A host of a multi-host run passes its own sites: the others are neither built nor
  read (no TFDS folder appears for them), and its sites equal a full load's."""
  root = fx.faz(tmp_path / "faz", n_sites=3)
  cfg = make_config("faz", root, tmp_path / "tfds_part", image_size=8)
  part = real.load_real_task(cfg, sites=[1])
  assert part.site_names == ["site1", "site2", "site3"]
  assert part.train[0] is None and part.test[2] is None and part.info["loaded_sites"] == ["site2"]
  built = sorted(p.name.split("_")[0] for p in (tmp_path / "tfds_part" / "lcfed_faz").iterdir())
  assert built == ["site2"]
  full = load("faz", root, tmp_path)
  for split in ("train", "test"):
    a, b = getattr(part, split)[1], getattr(full, split)[1]
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.names == b.names


def test_synthetic_some_sites_equal_full_generation(monkeypatch):
  from lcfed_jax.data import synthetic, tasks
  full = synthetic.generate(4, 16, (3, 2, 4, 2), 2, seed=5)
  monkeypatch.setattr(synthetic, "_PARALLEL_PIXELS", 0)          # one process per split
  monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 4)
  part = synthetic.generate(4, 16, (3, 2, 4, 2), 2, seed=5, sites=[2, 3])
  assert part.site_names == full.site_names and part.train[:2] == [None, None]
  for k in (2, 3):
    np.testing.assert_array_equal(part.train[k].images, full.train[k].images)
    np.testing.assert_array_equal(part.test[k].masks, full.test[k].masks)
  c = config_dict.ConfigDict({"data": {"task": "synthetic", "num_sites": 3}})
  assert tasks.site_names(c) == full.site_names[:3]
  with pytest.raises(UserError, match="data.num_sites=7"):
    synthetic.site_names(7)


def test_real_task_defaults():
  c = base_config("faz")
  assert c.data.task == "faz" and c.data.layout == "auto" and c.data.polyp_site2 == "etis"
  assert c.data.prostate_mask == "auto" and c.data.prostate_norm == "range"
  assert c.data.foreground_slices_only is True and c.data.root == "" and c.data.tfds_dir == ""


def test_build_cli(tmp_path, capsys):
  from lcfed_jax.data import build
  fx.faz(tmp_path / "raw" / "faz", n_sites=2)
  rc = build.main(["--task", "faz", "--data_dir", str(tmp_path / "raw"), "--image_size", "8",
                   "--tfds_dir", str(tmp_path / "tfds")])
  out = capsys.readouterr().out
  assert rc == 0
  assert "site1" in out and "train     3" in out and "test     2" in out and "build" in out
  rc = build.main(["--task", "faz", "--data_dir", str(tmp_path / "none"),
                   "--tfds_dir", str(tmp_path / "tfds")])
  assert rc == 2
  assert "none" in capsys.readouterr().err
