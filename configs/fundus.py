"""Fundus optic disc / cup segmentation (4 sites: Drishti-GS, RIM-ONE r3, REFUGE x2; spec 2.3).

The paper's protocol: 300 rounds of 50 local steps (batch 6, Adam 1e-3), 384x384,
then 300 rounds of HC training for LC-Fed. Data from config.data_dir or LCFED_DATA_DIR
(prepared once into TFDS array_record files; see lcfed_jax/data/real.py).

  LCFED_DATA_DIR=/path/to/data python launch.py --config configs/fundus.py:lcfed --workdir /tmp/fundus
Quick CPU check at reduced size:
  python launch.py --config configs/fundus.py:fedavg --workdir /tmp/fundus_small \
      --config.image_size=96 --config.rounds=2 --config.local_steps=5 --config.lcfed.hc_rounds=1
Methods: local fedavg ft fedbn fedrep prrfl lcfed (default lcfed).
"""
from lcfed_jax.config_defaults import base_config


def get_config(arg: str = "lcfed"):
  c = base_config("fundus", arg or "lcfed")
  return c
