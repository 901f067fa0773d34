"""Train or evaluate a personalized federated segmentation method.

  python launch.py --config configs/synthetic.py[:<method>] --workdir DIR [--mode train|eval]
                   [--config.key=value ...] [--multihost]

--multihost (or --config.mesh.multihost=True) calls jax.distributed.initialize() first:
run the same command on every host (README, "Several devices and hosts").
"""
from absl import app, flags
from ml_collections import config_flags

from lcfed_jax import main as lcfed_main

config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/polyp.py:lcfed.")
flags.DEFINE_string("workdir", None, "Where config.json, metrics, results and checkpoints go.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming if possible) or evaluate.")
flags.DEFINE_bool("multihost", False, "Several processes (one per host): jax.distributed.initialize() "
                  "first; the same as --config.mesh.multihost=True.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if flags.FLAGS.multihost:
    flags.FLAGS.config.mesh.multihost = True
  return lcfed_main.run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.mode)


if __name__ == "__main__":
  app.run(main)
