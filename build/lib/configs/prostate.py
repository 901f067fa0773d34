"""Prostate segmentation in T2 MRI: six sites (the SAML collection).

Sites BIDMC, BMC, HK, I2CVB, RUNMC, UCL as .nii.gz volumes (data.layout 'nifti') or as
sliced PNGs ('slices', inverted masks detected); 1 channel, 1 class. Evaluation per
volume: each case's slices are predicted, reduced to their largest component and stacked
in slice order into 3-D before IoU and ASSD (lcfed_jax/data/builders/prostate.py). The
paper: 384 px, 300 + 300 rounds of 50 local steps.

  LCFED_DATA_DIR=/path/to/data python launch.py --config configs/prostate.py:lcfed --workdir /tmp/prostate
Quick CPU check at reduced size:
  python launch.py --config configs/prostate.py:fedavg --workdir /tmp/prostate_small \
      --config.image_size=96 --config.rounds=2 --config.local_steps=5 --config.lcfed.hc_rounds=1
Methods: local fedavg ft fedbn fedrep prrfl lcfed fedprox ditto fedper fedbabu (default lcfed).
"""
from lcfed_jax.config.defaults import apply_tiny, base_config, parse_arg


def get_config(arg: str = ""):
  a = parse_arg(arg, method="lcfed", tiny=False)
  c = base_config("prostate", a.method)
  return apply_tiny(c) if a.tiny else c
