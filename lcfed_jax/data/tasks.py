"""One entry point for every task's data: `load_task(config) -> FederatedData`."""
from __future__ import annotations

from lcfed_jax.data.types import FederatedData


def load_task(config) -> FederatedData:
  task = config.data.task
  if task == "synthetic":
    from lcfed_jax.data.synthetic import generate
    return generate(num_sites=int(config.data.num_sites), image_size=int(config.image_size),
                    train_sizes=tuple(config.data.train_sizes), test_size=int(config.data.test_size),
                    seed=int(config.data.get("seed", config.seed)))
  from lcfed_jax.data.real import load_real_task   # TFDS: imported only for real tasks
  return load_real_task(config)
