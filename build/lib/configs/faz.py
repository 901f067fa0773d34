"""Foveal avascular zone (FAZ) segmentation in OCTA: five sites, four devices.

Sites <data_dir>/faz/site{1..5}/{train,test}/{images,masks}/*.png: FAZID (Zeiss),
OCTA-500 3 mm and 6 mm (Optovue), OCTA-25K (Topcon), ROSE (Optovue; 30 training
images). 256x256, 1 channel, 1 class (FAZ = mask value > 0), FedICRA's train/test split
as stored (lcfed_jax/data/builders/faz.py). No published LC-Fed table exists for it:
it tests whether the method carries over to a task nobody tuned it on.

  LCFED_DATA_DIR=/path/to/data python launch.py --config configs/faz.py:lcfed --workdir /tmp/faz
Quick CPU check at reduced size:
  python launch.py --config configs/faz.py:fedavg --workdir /tmp/faz_small \
      --config.image_size=96 --config.rounds=2 --config.local_steps=5 --config.lcfed.hc_rounds=1
Methods: local fedavg ft fedbn fedrep prrfl lcfed fedprox ditto fedper fedbabu (default lcfed).
"""
from lcfed_jax.config.defaults import apply_tiny, base_config, parse_arg


def get_config(arg: str = ""):
  a = parse_arg(arg, method="lcfed", tiny=False)
  c = base_config("faz", a.method)
  c.image_size = 256            # the images' native size
  return apply_tiny(c) if a.tiny else c
