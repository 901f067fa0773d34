"""Synthetic multi-site polyp-like task: the zero-download default.

Four procedurally generated endoscopy-like sites with colour, texture, noise and lesion
shifts and two conflicting annotation protocols (lcfed_jax/data/synthetic.py), generated
in memory from the seed. 48 px, base width 8, 20 + 10 rounds of 10 local steps.

  python launch.py --config configs/synthetic.py --workdir /tmp/lcfed_synthetic
Another method, fewer rounds; the test-suite size:
  python launch.py --config configs/synthetic.py:fedavg --workdir /tmp/syn_fedavg --config.rounds=5
  python launch.py --config configs/synthetic.py:fedavg,tiny --workdir /tmp/syn_tiny
Methods: local fedavg ft fedbn fedrep prrfl lcfed fedprox ditto fedper fedbabu (default lcfed).
"""
from lcfed_jax.config.defaults import apply_tiny, base_config, parse_arg


def get_config(arg: str = ""):
  a = parse_arg(arg, method="lcfed", tiny=False)
  c = base_config("synthetic", a.method)
  c.rounds = 20
  c.local_steps = 10
  c.batch_size = 6
  c.image_size = 48
  c.eval_every = 5
  c.checkpoint_every = 10
  c.data.num_sites = 4
  c.data.train_sizes = (120, 80, 60, 100)
  c.data.test_size = 40
  c.model.base = 8
  c.lcfed.head_iters = 2        # the paper's 10 of 50, scaled
  c.fedrep.head_iters = 2
  c.lcfed.hc_rounds = 10
  # HC trains at the paper's 1e-3 here. Measured on this task (2026-12-02, seed 0): HC
  # lifts mean test IoU from 0.406 after stage A to 0.708 in its 10 rounds at 1e-3 (0.724
  # at 1e-2). With the official PyTorch init of HC's conv this converges; the 20x larger
  # Kaiming init used before needed 1e-2.
  c.ft.rounds = 10
  c.fedbabu.ft_rounds = 10
  return apply_tiny(c) if a.tiny else c
