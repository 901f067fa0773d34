"""The methods as Flower apps: a ServerApp and a ClientApp built from launch.py's config files.

A Flower run trains what `launch.py --config <the same file>` simulates, with every site's
data on its own machine: each client runs its own site's local round with the same jitted
program the simulation maps over sites (`lcfed_jax.fed.engine`, one site of K), and keeps
its personal leaves, its optimizer state and its selected model in its state dir; only the
leaves the method shares travel, addressed by their parameter paths. The server applies
the method's server step, asks the clients for their scores, selects, and writes
metrics.jsonl and results.{md,csv,json} as a simulation does.

  settings.py    the run config and node config, the experiment's config, their checks
  records.py     parameter paths <-> Flower records; what travels in each stage
  store.py       a client's state dir (atomic files that survive a restart)
  site.py        one site's data, model and jitted programs (no Flower)
  client_app.py  the ClientApp
  aggregate.py   the server step on the replies of one round
  coordinator.py the server's schedule: rounds, evaluation, selection, result files
  server_app.py  the ServerApp
  inprocess.py   a Grid that runs the apps in one process (tests, debugging)

docs/deploy.md says how to run them.
"""
