"""The ServerApp: reads the run config, then runs the method's schedule (`coordinator`).

  flwr run . [<superlink connection>] --run-config "config='configs/synthetic.py:fedavg,tiny'"

A mistake in the run config, the experiment's config or a site's setup is logged as one
`error:` line naming the setting, site or parameter path, and ends the run.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lcfed_jax.deploy.coordinator import Coordinator
from lcfed_jax.deploy.settings import RunSettings
from lcfed_jax.run.runtime import setup_jax
from lcfed_jax.util.errors import UserError


def make_app(defaults: Optional[Mapping] = None) -> ServerApp:
  """The ServerApp; `defaults` fill run-config keys the run does not set (Flower's
  Python simulation API passes no run config)."""
  defaults = dict(defaults or {})
  app = ServerApp()

  @app.main()
  def main(grid: Grid, context: Context) -> None:
    log = logging.getLogger("flwr")
    setup_jax()
    try:
      Coordinator(grid, RunSettings.from_run_config(context.run_config, defaults), log.info)()
    except UserError as e:
      log.error(f"error: {e}")
      raise

  return app


app = make_app()
