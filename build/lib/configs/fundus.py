"""Optic disc and cup segmentation in fundus photographs: four sites.

Sites <data_dir>/fundus/{Site1..4 | Domain1..4}/{train,test}/ROIs/{image,mask}/ (the
FedDG layout): Drishti-GS, RIM-ONE r3, REFUGE train, REFUGE validation. RGB ROIs, 2
classes (optic disc including the cup; optic cup) from masks {255 bg, 128 disc, 0 cup};
evaluation per image on the largest connected component of each class
(lcfed_jax/data/builders/fundus.py). The paper: 384 px, 300 + 300 rounds of 50 steps.

  LCFED_DATA_DIR=/path/to/data python launch.py --config configs/fundus.py:lcfed --workdir /tmp/fundus
Quick CPU check at reduced size:
  python launch.py --config configs/fundus.py:fedavg --workdir /tmp/fundus_small \
      --config.image_size=96 --config.rounds=2 --config.local_steps=5 --config.lcfed.hc_rounds=1
Methods: local fedavg ft fedbn fedrep prrfl lcfed fedprox ditto fedper fedbabu (default lcfed).
"""
from lcfed_jax.config.defaults import apply_tiny, base_config, parse_arg


def get_config(arg: str = ""):
  a = parse_arg(arg, method="lcfed", tiny=False)
  c = base_config("fundus", a.method)
  return apply_tiny(c) if a.tiny else c
