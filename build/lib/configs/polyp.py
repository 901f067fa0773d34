"""Polyp segmentation in colonoscopy: one site per source dataset.

Sites (data.layout 'per_site': <data_dir>/polyp/<site>/{images,masks}/): kvasir
(Kvasir-SEG), etis (ETIS-LaribPolypDB), colondb (CVC-ColonDB), clinicdb (CVC-ClinicDB),
whichever are present, in that order; or PraNet's TrainDataset/TestDataset layout. RGB,
1 class (polyp = mask grey value > 127). Splits: PraNet's test lists, or a seeded 90/10
split per site, with ColonDB's official frames (lcfed_jax/data/builders/polyp.py). The
paper: 384 px, 300 rounds of 50 local steps (batch 6, Adam 1e-3), then 300 HC rounds.

  LCFED_DATA_DIR=/path/to/data python launch.py --config configs/polyp.py:lcfed --workdir /tmp/polyp
Quick CPU check at reduced size:
  python launch.py --config configs/polyp.py:fedavg --workdir /tmp/polyp_small \
      --config.image_size=96 --config.rounds=2 --config.local_steps=5 --config.lcfed.hc_rounds=1
Methods: local fedavg ft fedbn fedrep prrfl lcfed fedprox ditto fedper fedbabu (default lcfed).
"""
from lcfed_jax.config.defaults import apply_tiny, base_config, parse_arg


def get_config(arg: str = ""):
  a = parse_arg(arg, method="lcfed", tiny=False)
  c = base_config("polyp", a.method)
  return apply_tiny(c) if a.tiny else c
