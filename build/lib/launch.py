"""Train, evaluate or sweep personalized federated segmentation methods.

  python launch.py --config configs/<task>.py[:<method>[,tiny]] --workdir DIR
                   [--mode train|eval|sweep] [--config.key=value ...] [--multihost]
  python launch.py --config configs/<task>.py --mode sweep --methods local,fedavg,lcfed \
                   --seeds 0,1,2 --workdir DIR

--multihost (or --config.mesh.multihost=True) calls jax.distributed.initialize() first:
run the same command on every host. Installed with pip, the same is the `lcfed` command,
and `configs/<task>.py` is found in the installed package when it is not a local file.
A mistake in the flags, the config or the data is one `error:` line and exit code 2.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/polyp.py:lcfed.")
flags.DEFINE_string("workdir", None, "Where config.json, metrics, results and checkpoints go.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sweep"],
                  "Train (resuming if possible), evaluate a workdir's checkpoint, or sweep methods x seeds.")
flags.DEFINE_bool("multihost", False, "Several processes (one per host): jax.distributed.initialize() "
                  "first; the same as --config.mesh.multihost=True.")
flags.DEFINE_string("methods", "", "--mode sweep: comma-separated methods (default: the config's).")
flags.DEFINE_string("seeds", "", "--mode sweep: comma-separated seeds (default: the config's seed).")
flags.DEFINE_string("note", "", "--mode sweep: a note put before the protocol line of results.md.")
FLAGS = flags.FLAGS


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _installed_config(arg: str) -> str:
  """`configs/<task>.py[:arg]` that is not a local file -> the installed package's file."""
  path, sep, rest = arg.partition(":")
  if os.path.exists(path) or not path.startswith("configs"):
    return arg
  try:
    import configs
  except ImportError:
    return arg
  candidate = os.path.join(os.path.dirname(configs.__file__), os.path.basename(path))
  return candidate + sep + rest if os.path.exists(candidate) else arg


def parse_flags(argv):
  """absl's parsing, with every mistake turned into one `error:` line and exit 2."""
  argv = [(a.split("=", 1)[0] + "=" + _installed_config(a.split("=", 1)[1])) if a.startswith("--config=")
          else a for a in argv]
  if "--config" in argv[:-1]:
    i = argv.index("--config") + 1
    argv[i] = _installed_config(argv[i])
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  if path is not None and not os.path.isfile(path.partition(":")[0]):
    _fail(f"--config {path}: no such file (expected configs/<task>.py[:<method>], task one of "
          f"synthetic, polyp, fundus, prostate, faz)")
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:   # the config file is loaded (and overridden) on first access
      FLAGS.config.get("method")
  except flags.Error as e:
    _fail(str(e).replace("\n", " "))
  except (OSError, SyntaxError) as e:   # the config file: missing, unreadable, broken
    cause = e.__cause__ or e
    _fail(f"--config: {str(cause).splitlines()[0]} ({' '.join(str(e).split())[:300]})")
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # --config.<key> overrides
    raw = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "'")
    text = " ".join(raw.split()).strip("'\"").replace("' Did", ": did")
    bad = [a for a in argv if a.startswith("--config.")]
    _fail(f"{' '.join(bad) or '--config'}: {text}")
  except Exception as e:   # noqa: BLE001 - a user error raised inside get_config()
    from lcfed_jax.util.errors import UserError
    if isinstance(e, UserError):
      _fail(str(e))
    raise
  for name in ("config", "workdir"):
    if getattr(FLAGS, name) is None:
      _fail(f"--{name} is required (python launch.py --config configs/<task>.py --workdir DIR)")
  return rest


def main(argv):
  del argv
  from lcfed_jax.fed import sharding
  from lcfed_jax.run.runtime import setup_jax
  from lcfed_jax.util.errors import UserError
  config = FLAGS.config
  if FLAGS.multihost:
    config.mesh.multihost = True
  logging.get_absl_handler().use_absl_log_file = lambda *a, **k: None   # stderr only
  try:
    sharding.initialize_distributed(config)    # before anything else touches JAX
    setup_jax()
    if FLAGS.mode == "train":
      from lcfed_jax.run.train import train_and_evaluate
      train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      from lcfed_jax.run.eval_checkpoint import evaluate_checkpoint
      evaluate_checkpoint(config, FLAGS.workdir)
    else:
      from lcfed_jax.run.sweep import run_sweep
      run_sweep(config, FLAGS.workdir, FLAGS.methods, FLAGS.seeds, FLAGS.note)
  except UserError as e:
    _fail(str(e))
  return 0


def console_main():
  """The `lcfed` console script."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  console_main()
